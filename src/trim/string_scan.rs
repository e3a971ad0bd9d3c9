//! The scanner's fast path for string content on x86_64, where a large body spends almost all
//! of its bytes: 64 bytes per step, as bit masks (one bit per byte) of the quotes,
//! backslashes, control bytes and escape letters, the way simdjson finds its strings. The masks
//! are made 64 bytes at a time with AVX-512BW where the CPU has it, straight into mask
//! registers; else 32 at a time with AVX2 (checked at run time, once per string; the whole loop
//! is compiled for the instruction set so the masks inline into it); else 16 at a time with
//! SSE2, which every x86_64 CPU has.
//!
//! A transcript has an escape (`\n` above all) every few dozen bytes. Stepping from escape to
//! escape makes each step wait for the last (find the backslash, read the escaped byte, skip
//! it, search again), so the escapes are instead resolved for the whole block at once:
//! which bytes are escaped follows from the runs of backslashes alone, carried from block to
//! block, and the escaped bytes are checked against the masks of `n`, `"`, `u` and hex digits.
//! Only the rare escapes (`\t`, `\/`, ...) are looked at one by one. The fast path says
//! "valid, closing quote here" or "not valid"; on the second answer the scanner reruns its
//! exact byte-by-byte loop, which names the error and its offset, so errors read exactly as
//! before. UTF-8 is validated separately, for the whole body.

use super::scan::Utf8Prefix;

/// Finds the closing quote of the string whose content starts at `start` (just after the
/// opening quote), validating every escape and refusing control bytes. Returns the quote's
/// offset and whether the content has any escape, or `None` if the string is invalid or
/// unterminated. The bytes scanned are validated as UTF-8 on the way (`utf8`); invalid UTF-8
/// is `None` too.
pub(super) fn closing_quote(
    body: &[u8],
    start: usize,
    utf8: &mut Utf8Prefix,
) -> Option<(usize, bool)> {
    if let Some(avx512) = Avx512::detect() {
        return avx512.closing_quote(body, start, utf8);
    }
    match Avx2::detect() {
        Some(avx2) => avx2.closing_quote(body, start, utf8),
        None => scan(body, start, utf8, masks),
    }
}

/// Proof that the CPU running this code has AVX-512BW (and so AVX-512F): only
/// [`Avx512::detect`] makes one.
#[derive(Debug, Clone, Copy)]
struct Avx512(());

impl Avx512 {
    /// `Some` if the CPU has AVX-512BW (checked at run time and cached, as for [`Avx2`]).
    #[inline]
    fn detect() -> Option<Self> {
        std::is_x86_feature_detected!("avx512bw").then_some(Self(()))
    }

    /// [`closing_quote`] with the masks made 64 bytes at a time.
    #[inline]
    #[allow(unsafe_code)]
    fn closing_quote(
        self,
        body: &[u8],
        start: usize,
        utf8: &mut Utf8Prefix,
    ) -> Option<(usize, bool)> {
        // SAFETY: `closing_quote_avx512` needs AVX-512BW (which implies AVX-512F) and nothing
        // else, and `self` exists only if `detect` found AVX-512BW on this CPU.
        unsafe { closing_quote_avx512(body, start, utf8) }
    }

    /// The masks of a block, made 64 bytes at a time.
    #[cfg(test)]
    #[allow(unsafe_code)]
    fn masks(self, block: &[u8; BLOCK]) -> Masks {
        // SAFETY: `masks_avx512` needs AVX-512BW and nothing else, and `self` exists only if
        // `detect` found AVX-512BW on this CPU.
        unsafe { masks_avx512(block) }
    }
}

/// Proof that the CPU running this code has AVX2: only [`Avx2::detect`] makes one.
#[derive(Debug, Clone, Copy)]
struct Avx2(());

impl Avx2 {
    /// `Some` if the CPU has AVX2 (checked at run time; the answer is cached after the first
    /// call, so this is a load and a bit test).
    #[inline]
    fn detect() -> Option<Self> {
        std::is_x86_feature_detected!("avx2").then_some(Self(()))
    }

    /// [`closing_quote`] with the masks made 32 bytes at a time.
    #[inline]
    #[allow(unsafe_code)]
    fn closing_quote(
        self,
        body: &[u8],
        start: usize,
        utf8: &mut Utf8Prefix,
    ) -> Option<(usize, bool)> {
        // SAFETY: `closing_quote_avx2` needs AVX2 and nothing else, and `self` exists only if
        // `detect` found AVX2 on this CPU.
        unsafe { closing_quote_avx2(body, start, utf8) }
    }

    /// The masks of a block, made 32 bytes at a time.
    #[cfg(test)]
    #[allow(unsafe_code)]
    fn masks(self, block: &[u8; BLOCK]) -> Masks {
        // SAFETY: `masks_avx2` needs AVX2 and nothing else, and `self` exists only if `detect`
        // found AVX2 on this CPU.
        unsafe { masks_avx2(block) }
    }
}

/// The whole scan compiled for AVX-512BW, so that the masks inline into the block loop.
#[target_feature(enable = "avx512bw")]
fn closing_quote_avx512(body: &[u8], start: usize, utf8: &mut Utf8Prefix) -> Option<(usize, bool)> {
    scan(body, start, utf8, |block| masks_avx512(block))
}

/// The whole scan compiled for AVX2, so that the masks inline into the block loop.
#[target_feature(enable = "avx2")]
fn closing_quote_avx2(body: &[u8], start: usize, utf8: &mut Utf8Prefix) -> Option<(usize, bool)> {
    scan(body, start, utf8, |block| masks_avx2(block))
}

/// The scan, with the masks of a block made by `masks`. Inlined into each caller, so each
/// instruction set gets its own copy of the loop with its masks inline.
#[inline(always)]
fn scan(
    body: &[u8],
    start: usize,
    utf8: &mut Utf8Prefix,
    masks: impl Fn(&[u8; BLOCK]) -> Masks,
) -> Option<(usize, bool)> {
    let mut pos = start;
    let mut escapes = Escapes::default();
    // Hex digits of a `\u` escape that run into the next block (bits 0..4 of it).
    let mut hex_carry = 0;
    let mut backslashes = 0;
    while let Some(block) = body.get(pos..pos + BLOCK) {
        if !utf8.covers(body, pos + BLOCK) {
            return None;
        }
        prefetch(body, pos + PREFETCH_AHEAD);
        let m = masks(block.try_into().expect("a block is 64 bytes"));
        let escaped = escapes.next(m.backslash);
        let ends = m.quote & !escaped;
        // The bits up to and including the closing quote; all of them when there is none.
        let within = ends ^ ends.wrapping_sub(1);
        let escaped = escaped & within;
        let unicode = escaped & m.unicode;
        // A `\u` must be followed by four hex digits. If the string ended among them, the
        // closing quote is one of them (and is no hex digit).
        let hex_digits = unicode << 1 | unicode << 2 | unicode << 3 | unicode << 4 | hex_carry;
        hex_carry = unicode >> 60 | unicode >> 61 | unicode >> 62 | unicode >> 63;
        if m.control & within != 0 || hex_digits & !m.hex != 0 {
            return None;
        }
        let mut rare = escaped & !(m.n | m.quote | m.unicode);
        while rare != 0 {
            let at = pos + rare.trailing_zeros() as usize;
            if !matches!(body[at], b'\\' | b'/' | b'b' | b'f' | b'r' | b't') {
                return None;
            }
            rare &= rare - 1;
        }
        backslashes |= m.backslash & within;
        if ends != 0 {
            return Some((pos + ends.trailing_zeros() as usize, backslashes != 0));
        }
        pos += BLOCK;
    }
    // Fewer than 64 bytes left: byte by byte, from the backslash that escapes the first byte if
    // the last block ended with it, after the hex digits carried from it.
    if escapes.odd_run_carry != 0 {
        pos -= 1;
    }
    let carried = hex_carry.count_ones() as usize;
    if !body
        .get(pos..pos + carried)?
        .iter()
        .all(u8::is_ascii_hexdigit)
    {
        return None;
    }
    pos += carried;
    let mut escaped = backslashes != 0;
    loop {
        match *body.get(pos)? {
            b'"' => return utf8.covers(body, pos).then_some((pos, escaped)),
            b'\\' => {
                escaped = true;
                pos = escape_end(body, pos)?;
            }
            b if b < 0x20 => return None,
            _ => pos += 1,
        }
    }
}

/// Bytes per step of the fast path (one bit each in a `u64` mask).
const BLOCK: usize = 64;

/// How far ahead of the block being scanned the CPU is asked to load. The hardware prefetcher
/// stops at each 4 KiB page boundary, so without this the scan of a large string waits on
/// memory at every new page (measured on the trim route with the AVX2 masks: 1,590 -> 1,480 µs
/// of user time per 5 MiB payload; 2048 bytes ahead measured the same as 1024).
const PREFETCH_AHEAD: usize = 1024;

/// Asks the CPU to start loading the cache line of `body[at]` (nothing if `at` is past the end).
#[inline(always)]
#[allow(unsafe_code)]
fn prefetch(body: &[u8], at: usize) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    if let Some(byte) = body.get(at) {
        // SAFETY: the pointer is to a byte of `body`, so it is valid; a prefetch only hints the
        // cache, reads nothing into the program and never faults. SSE is part of every x86_64
        // target.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(byte).cast()) }
    }
}

/// Which bytes of a block are escaped, block after block (simdjson's odd-backslash-sequence
/// method): a byte is escaped iff it follows a run of backslashes of odd length, counting a run
/// from where it began, possibly in an earlier block.
#[derive(Debug, Default)]
struct Escapes {
    /// 1 if the previous block ended inside a run of backslashes whose length so far is odd
    /// (so the next byte is escaped).
    odd_run_carry: u64,
}

impl Escapes {
    /// The escaped bytes of the next block (other than escaped backslashes, which need no
    /// check), given its backslashes.
    fn next(&mut self, backslash: u64) -> u64 {
        const EVEN: u64 = 0x5555_5555_5555_5555;
        const ODD: u64 = !EVEN;
        let starts = backslash & !(backslash << 1);
        // A run continuing from the last block counts as starting at an odd bit if its length
        // so far is odd.
        let even_start_mask = EVEN ^ self.odd_run_carry;
        let even_starts = starts & even_start_mask;
        let odd_starts = starts & !even_start_mask;
        // Adding a run's start bit to the run carries to the byte just past it.
        let even_carries = backslash.wrapping_add(even_starts);
        let (odd_carries, carried_out) = backslash.overflowing_add(odd_starts);
        let odd_carries = odd_carries | self.odd_run_carry;
        self.odd_run_carry = u64::from(carried_out);
        // A run from an even bit to an odd bit past it (or odd to even) has odd length.
        let even_start_odd_end = even_carries & !backslash & ODD;
        let odd_start_even_end = odd_carries & !backslash & EVEN;
        even_start_odd_end | odd_start_even_end
    }
}

/// The offset after the escape whose backslash is at `at`, or `None` if it is not one of
/// JSON's escapes.
fn escape_end(body: &[u8], at: usize) -> Option<usize> {
    match *body.get(at + 1)? {
        b'n' | b'"' | b'\\' | b'/' | b't' | b'r' | b'b' | b'f' => Some(at + 2),
        b'u' => {
            let hex = body.get(at + 2..at + 6)?;
            hex.iter().all(u8::is_ascii_hexdigit).then_some(at + 6)
        }
        _ => None,
    }
}

/// One bit per byte of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Masks {
    /// `"`
    quote: u64,
    /// `\`
    backslash: u64,
    /// Below 0x20.
    control: u64,
    /// `n`, the commonest escape.
    n: u64,
    /// `u`
    unicode: u64,
    /// `0-9`, `a-f`, `A-F`
    hex: u64,
}

impl Masks {
    /// The masks from a function of their index, in field order (the order `masks16` and
    /// `masks32` return them in).
    #[inline(always)]
    fn joined(join: impl Fn(usize) -> u64) -> Masks {
        Masks {
            quote: join(0),
            backslash: join(1),
            control: join(2),
            n: join(3),
            unicode: join(4),
            hex: join(5),
        }
    }
}

/// The masks of a block, made 16 bytes at a time (SSE2).
#[inline]
#[allow(unsafe_code)]
fn masks(block: &[u8; BLOCK]) -> Masks {
    let lane = |i: usize| -> &[u8; 16] { block[i..i + 16].try_into().expect("16 of 64 bytes") };
    // SAFETY: `masks16` needs SSE2 and nothing else, and SSE2 is part of every x86_64 target
    // (asserted at compile time below), so it is available wherever this code runs.
    let [a, b, c, d] = unsafe {
        [
            masks16(lane(0)),
            masks16(lane(16)),
            masks16(lane(32)),
            masks16(lane(48)),
        ]
    };
    let join = |i: usize| a[i] | b[i] << 16 | c[i] << 32 | d[i] << 48;
    Masks::joined(join)
}

const _: () = assert!(cfg!(target_feature = "sse2"), "x86_64 always has SSE2");

/// The masks of 16 bytes, in [`Masks`] order. The two 8-byte reads compile to one unaligned
/// 16-byte load (no pointer, so nothing `unsafe` inside).
#[inline]
#[target_feature(enable = "sse2")]
fn masks16(bytes: &[u8; 16]) -> [u64; 6] {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128, _mm_set_epi64x,
        _mm_set1_epi8, _mm_sub_epi8,
    };
    let half = |i: usize| i64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 of 16 bytes"));
    let v = _mm_set_epi64x(half(8), half(0));
    let splat = |b: u8| _mm_set1_epi8(b as i8);
    let bits = |m: __m128i| u64::from(_mm_movemask_epi8(m) as u16);
    // Unsigned `x <= max` is `min(x, max) == x`.
    let at_most = |x: __m128i, max: u8| _mm_cmpeq_epi8(_mm_min_epu8(x, splat(max)), x);
    let digit = at_most(_mm_sub_epi8(v, splat(b'0')), 9);
    let letter = at_most(_mm_sub_epi8(_mm_or_si128(v, splat(0x20)), splat(b'a')), 5);
    [
        bits(_mm_cmpeq_epi8(v, splat(b'"'))),
        bits(_mm_cmpeq_epi8(v, splat(b'\\'))),
        bits(at_most(v, 0x1F)),
        bits(_mm_cmpeq_epi8(v, splat(b'n'))),
        bits(_mm_cmpeq_epi8(v, splat(b'u'))),
        bits(_mm_or_si128(digit, letter)),
    ]
}

/// The masks of a block, made 32 bytes at a time (AVX2).
#[inline]
#[target_feature(enable = "avx2")]
fn masks_avx2(block: &[u8; BLOCK]) -> Masks {
    let half = |i: usize| -> &[u8; 32] { block[i..i + 32].try_into().expect("32 of 64 bytes") };
    let (lo, hi) = (masks32(half(0)), masks32(half(32)));
    let join = |i: usize| lo[i] | hi[i] << 32;
    Masks::joined(join)
}

/// The masks of 32 bytes, in [`Masks`] order: [`masks16`] on 32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
#[allow(unsafe_code)]
fn masks32(bytes: &[u8; 32]) -> [u64; 6] {
    use std::arch::x86_64::{
        __m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_min_epu8, _mm256_movemask_epi8,
        _mm256_or_si256, _mm256_set1_epi8, _mm256_sub_epi8,
    };
    // (Built from four 8-byte reads, as `masks16` does, the vector takes six instructions
    // instead of one load.)
    // SAFETY: `bytes` is a reference to 32 bytes, so all 32 bytes from its start are readable,
    // and `_mm256_loadu_si256` reads exactly those 32 with no alignment requirement. AVX2 is
    // enabled for this function.
    let v = unsafe { _mm256_loadu_si256(bytes.as_ptr().cast::<__m256i>()) };
    let splat = |b: u8| _mm256_set1_epi8(b as i8);
    let bits = |m: __m256i| u64::from(_mm256_movemask_epi8(m) as u32);
    // Unsigned `x <= max` is `min(x, max) == x`.
    let at_most = |x: __m256i, max: u8| _mm256_cmpeq_epi8(_mm256_min_epu8(x, splat(max)), x);
    let digit = at_most(_mm256_sub_epi8(v, splat(b'0')), 9);
    let letter = at_most(
        _mm256_sub_epi8(_mm256_or_si256(v, splat(0x20)), splat(b'a')),
        5,
    );
    [
        bits(_mm256_cmpeq_epi8(v, splat(b'"'))),
        bits(_mm256_cmpeq_epi8(v, splat(b'\\'))),
        bits(at_most(v, 0x1F)),
        bits(_mm256_cmpeq_epi8(v, splat(b'n'))),
        bits(_mm256_cmpeq_epi8(v, splat(b'u'))),
        bits(_mm256_or_si256(digit, letter)),
    ]
}

/// The masks of a block, made 64 bytes at a time (AVX-512BW): each comparison gives its 64
/// bits directly, with no movemask and no joining of halves.
#[inline]
#[target_feature(enable = "avx512bw")]
#[allow(unsafe_code)]
fn masks_avx512(block: &[u8; BLOCK]) -> Masks {
    use std::arch::x86_64::{
        _mm512_cmpeq_epi8_mask, _mm512_cmplt_epu8_mask, _mm512_loadu_si512, _mm512_or_si512,
        _mm512_set1_epi8, _mm512_sub_epi8,
    };
    // SAFETY: `block` is a reference to 64 bytes, so all 64 bytes from its start are readable,
    // and `_mm512_loadu_si512` reads exactly those 64 with no alignment requirement.
    // AVX-512BW (and with it AVX-512F) is enabled for this function.
    let v = unsafe { _mm512_loadu_si512(block.as_ptr().cast()) };
    let splat = |b: u8| _mm512_set1_epi8(b as i8);
    let is = |b: u8| _mm512_cmpeq_epi8_mask(v, splat(b));
    // Unsigned `x - lo < n` is `lo <= x < lo + n`.
    let digit = _mm512_cmplt_epu8_mask(_mm512_sub_epi8(v, splat(b'0')), splat(10));
    let letter = _mm512_cmplt_epu8_mask(
        _mm512_sub_epi8(_mm512_or_si512(v, splat(0x20)), splat(b'a')),
        splat(6),
    );
    Masks {
        quote: is(b'"'),
        backslash: is(b'\\'),
        control: _mm512_cmplt_epu8_mask(v, splat(0x20)),
        n: is(b'n'),
        unicode: is(b'u'),
        hex: digit | letter,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_masks(block: &[u8; BLOCK]) -> Masks {
        let bits = |f: fn(u8) -> bool| {
            block
                .iter()
                .enumerate()
                .fold(0, |m, (i, &b)| m | u64::from(f(b)) << i)
        };
        Masks {
            quote: bits(|b| b == b'"'),
            backslash: bits(|b| b == b'\\'),
            control: bits(|b| b < 0x20),
            n: bits(|b| b == b'n'),
            unicode: bits(|b| b == b'u'),
            hex: bits(|b| b.is_ascii_hexdigit()),
        }
    }

    /// A naive reference: the closing quote of valid content, else `None`.
    fn naive_closing_quote(body: &[u8], mut pos: usize) -> Option<(usize, bool)> {
        let mut escaped = false;
        loop {
            match *body.get(pos)? {
                b'"' => return Some((pos, escaped)),
                b'\\' => {
                    escaped = true;
                    match *body.get(pos + 1)? {
                        b'u' => {
                            let hex = body.get(pos + 2..pos + 6)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            pos += 6;
                        }
                        b'n' | b'"' | b'\\' | b'/' | b't' | b'r' | b'b' | b'f' => pos += 2,
                        _ => return None,
                    }
                }
                b if b < 0x20 => return None,
                _ => pos += 1,
            }
        }
    }

    /// The instruction sets whose scan can run here: SSE2 always, AVX2 and AVX-512BW if the
    /// CPU has them.
    #[derive(Debug, Clone, Copy)]
    enum Isa {
        Sse2,
        Avx2(Avx2),
        Avx512(Avx512),
    }

    fn isas() -> Vec<Isa> {
        let mut isas = vec![Isa::Sse2];
        match Avx2::detect() {
            Some(avx2) => isas.push(Isa::Avx2(avx2)),
            None => println!("skipping the AVX2 path: this CPU has no AVX2"),
        }
        match Avx512::detect() {
            Some(avx512) => isas.push(Isa::Avx512(avx512)),
            None => println!("skipping the AVX-512 path: this CPU has no AVX-512BW"),
        }
        isas
    }

    /// [`closing_quote`] forced onto one instruction set.
    fn closing_quote_with(isa: Isa, body: &[u8], start: usize) -> Option<(usize, bool)> {
        let utf8 = &mut Utf8Prefix::default();
        match isa {
            Isa::Sse2 => scan(body, start, utf8, masks),
            Isa::Avx2(avx2) => avx2.closing_quote(body, start, utf8),
            Isa::Avx512(avx512) => avx512.closing_quote(body, start, utf8),
        }
    }

    /// Checks `masks` against the naive masks for every byte value in every lane of a block.
    fn check_masks_exact(masks: impl Fn(&[u8; BLOCK]) -> Masks, isa: &str) {
        for b in 0..=255u8 {
            for lane in 0..BLOCK {
                let mut block = [b'a'; BLOCK];
                block[lane] = b;
                // Neighbours that differ, to catch a lane or bit out of place.
                if lane > 0 {
                    block[lane - 1] = 0x80;
                }
                if lane < BLOCK - 1 {
                    block[lane + 1] = b.wrapping_add(1);
                }
                let want = naive_masks(&block);
                assert_eq!(masks(&block), want, "{isa}: byte {b:#x} lane {lane}");
                // And the byte alone in a block of its own kind.
                let block = [b; BLOCK];
                assert_eq!(masks(&block), naive_masks(&block), "{isa}: all {b:#x}");
            }
        }
    }

    #[test]
    fn sse2_masks_are_exact_for_every_byte_value_in_every_lane() {
        check_masks_exact(masks, "sse2");
    }

    #[test]
    fn avx2_masks_are_exact_for_every_byte_value_in_every_lane() {
        let Some(avx2) = Avx2::detect() else {
            println!("skipping the AVX2 masks: this CPU has no AVX2");
            return;
        };
        check_masks_exact(|block| avx2.masks(block), "avx2");
    }

    #[test]
    fn avx512_masks_are_exact_for_every_byte_value_in_every_lane() {
        let Some(avx512) = Avx512::detect() else {
            println!("skipping the AVX-512 masks: this CPU has no AVX-512BW");
            return;
        };
        check_masks_exact(|block| avx512.masks(block), "avx512");
    }

    #[test]
    fn escaped_bytes_follow_odd_runs_across_blocks() {
        // Runs of every length up to 140 backslashes, starting at every offset of the first
        // block, then a byte: it is escaped iff the run is odd.
        for offset in 0..BLOCK {
            for run in 0..140 {
                let mut bytes = vec![b'a'; 4 * BLOCK];
                bytes[offset..offset + run].fill(b'\\');
                let mut escapes = Escapes::default();
                let mut escaped = Vec::new();
                for (k, block) in bytes.chunks_exact(BLOCK).enumerate() {
                    let mask = escapes.next(naive_masks(block.try_into().unwrap()).backslash);
                    escaped.extend(
                        (0..BLOCK)
                            .filter(|i| mask >> i & 1 == 1)
                            .map(|i| k * BLOCK + i),
                    );
                }
                let want = if run % 2 == 1 {
                    vec![offset + run]
                } else {
                    vec![]
                };
                assert_eq!(escaped, want, "run of {run} at {offset}");
            }
        }
    }

    #[test]
    fn escapes_across_block_boundaries() {
        // Every escape kind placed so that it starts at each offset around the first and
        // second block boundaries (content starts at 1, after the opening quote).
        let escapes: [&[u8]; 12] = [
            br"\n",
            br#"\""#,
            br"\\",
            br"\/",
            br"\b",
            br"\f",
            br"\r",
            br"\t",
            br"\u00e9",
            br"\uD83D\uDE00",
            br"\\\\",
            br#"\\\""#,
        ];
        for esc in escapes {
            for at in 50..140 {
                let mut body = vec![b'"'];
                body.extend(std::iter::repeat_n(b'x', at));
                body.extend_from_slice(esc);
                body.extend_from_slice(b"yz\"");
                let close = at + esc.len() + 3;
                // At the very end of the body (the last bytes go byte by byte) and before more.
                let short = body.clone();
                body.extend_from_slice(b" tail \"not this one\"");
                for isa in isas() {
                    assert_eq!(
                        closing_quote_with(isa, &short, 1),
                        Some((close, true)),
                        "{isa:?}: {esc:?} at {at}"
                    );
                    assert_eq!(
                        closing_quote_with(isa, &body, 1),
                        Some((close, true)),
                        "{isa:?}: {esc:?} at {at}"
                    );
                }
                assert_eq!(
                    closing_quote(&body, 1, &mut Utf8Prefix::default()),
                    Some((close, true))
                );
                assert_eq!(naive_closing_quote(&body, 1), Some((close, true)));
            }
        }
    }

    #[test]
    fn invalid_content_is_refused_anywhere() {
        let bad: [&[u8]; 12] = [
            br"\x",
            br"\u12g4",
            // The string would end inside the hex digits.
            br#"\u12"4"#,
            br#"\u"#,
            br#"\u0"#,
            br#"\u00e"#,
            br"\U0041",
            b"\\\x01",
            b"\x01",
            b"\x1f",
            b"\t",
            b"\n",
        ];
        for token in bad {
            for at in 0..140 {
                let mut body = vec![b'"'];
                body.extend(std::iter::repeat_n(b'x', at));
                body.extend_from_slice(token);
                body.extend_from_slice(b"\"");
                let short = body.clone();
                body.extend_from_slice(b"abc\" and more text after the string, \"x\"");
                for isa in isas() {
                    assert_eq!(
                        closing_quote_with(isa, &short, 1),
                        None,
                        "{isa:?}: {token:?} at {at}"
                    );
                    assert_eq!(
                        closing_quote_with(isa, &body, 1),
                        None,
                        "{isa:?}: {token:?} at {at}"
                    );
                }
                assert_eq!(closing_quote(&body, 1, &mut Utf8Prefix::default()), None);
            }
        }
        // Unterminated, including a lone backslash or a cut `\u` at the very end.
        for end in [&b""[..], b"\\", b"\\u12"] {
            for len in 0..140 {
                let mut body = vec![b'"'];
                body.extend(std::iter::repeat_n(b'x', len));
                body.extend_from_slice(end);
                for isa in isas() {
                    assert_eq!(closing_quote_with(isa, &body, 1), None, "{isa:?}: {len}");
                }
                assert_eq!(closing_quote(&body, 1, &mut Utf8Prefix::default()), None);
            }
        }
    }

    #[test]
    fn invalid_utf8_is_refused_anywhere() {
        for bad in [&b"\xFF"[..], b"\xC3", b"\xED\xA0\x80"] {
            for at in 0..140 {
                let mut body = vec![b'"'];
                body.extend(std::iter::repeat_n(b'x', at));
                body.extend_from_slice(bad);
                body.extend_from_slice(b"yz\" and more after the string");
                for isa in isas() {
                    assert_eq!(
                        closing_quote_with(isa, &body, 1),
                        None,
                        "{isa:?}: {bad:?} at {at}"
                    );
                }
            }
        }
    }

    #[test]
    fn agrees_with_a_naive_scan_on_random_content() {
        // Deterministic xorshift over a small alphabet dense in escapes and quotes.
        let alphabet: [&[u8]; 12] = [
            b"a",
            b"\\",
            b"\"",
            b"n",
            b"u",
            b"0",
            b"\xC3\xA9",
            b"\\n",
            b"\\u00",
            b"\x1f",
            b"bcdefghijklmnop",
            b"\\\\",
        ];
        let isas = isas();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..20_000 {
            let mut body = vec![b'"'];
            let len = (state % 200) as usize;
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                body.extend_from_slice(alphabet[(state % 12) as usize]);
            }
            let want = naive_closing_quote(&body, 1);
            for &isa in &isas {
                assert_eq!(
                    closing_quote_with(isa, &body, 1),
                    want,
                    "{isa:?}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            assert_eq!(closing_quote(&body, 1, &mut Utf8Prefix::default()), want);
        }
    }
}
