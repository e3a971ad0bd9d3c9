//! Stage 4: bounded buffering, only for requests that may need trimming. Every buffered byte is
//! reserved first from one global budget (`[server] buffer_budget`) shared by all requests, so
//! the proxy never holds more than the budget in bodies however many arrive at once.
//!
//! The budget counts what is allocated, not just what is filled: a body of known length gets
//! one buffer of exactly that length; a body of unknown length (chunked, HTTP/2) is gathered in
//! blocks of [`BLOCK_BYTES`] (each reserved before it is allocated) and joined once at the end,
//! with the join's copy reserved too. A growing buffer that doubles would hold up to three
//! times the body while it reallocates, outside any count.
//!
//! The budget bounds bytes; [`BodySlots`] bounds how many *large* bodies (over
//! [`LARGE_BODY_BYTES`]) are held in memory at once. A large body waits for a slot before it is
//! read past its first [`LARGE_BODY_BYTES`], so the rest of it waits in the kernel (or the
//! sender) instead of in the proxy's memory; with 8 senders of 5 MiB at once, one body per
//! worker thread is held rather than eight. The slot is kept while the body arrives, is trimmed
//! and is delivered (the 413 ladder needs the original until the receiver has answered).
//! Neither a slow sender nor a slow receiver can stall the others: a slot is held at most
//! [`SLOT_GRACE`], after which the body goes on without it, and a request that waits
//! [`SLOT_WAIT`] for a slot reads its body without one. Bodies without a slot are held as
//! before, within the budget.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::limit::BodyError;

/// The blocks a body of unknown length is gathered in after its first [`MIN_BLOCK_BYTES`].
/// 1 MiB is over mimalloc's largest "large" size (512 KiB), so each block has pages of its own
/// that go back to the system once freed; smaller blocks share pages with other allocations and
/// kept about 20 MiB resident after a load of chunked bodies (benches/overload/).
pub const BLOCK_BYTES: usize = 1024 * 1024;
/// The first block of a body of unknown length: most webhooks fit in it.
pub const MIN_BLOCK_BYTES: usize = 16 * 1024;

/// Bodies over this many bytes are read into memory only with a [`BodySlots`] slot (when one
/// comes within [`SLOT_WAIT`]). 1 MiB: most webhooks are far smaller and never wait.
pub const LARGE_BODY_BYTES: u64 = 1024 * 1024;
/// How long a large body waits for a slot before it is read without one.
pub const SLOT_WAIT: Duration = Duration::from_millis(500);
/// How long a large body may hold its slot: one that is not received, trimmed and answered by
/// then (a slow sender or a slow receiver) gives it up and goes on without one.
pub const SLOT_GRACE: Duration = Duration::from_millis(500);

/// How many large bodies are read and trimmed in memory at once (see the module docs).
#[derive(Debug)]
pub struct BodySlots {
    semaphore: Arc<Semaphore>,
    slots: usize,
}

/// A slot of [`BodySlots`]; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    /// When the slot must be given up ([`SLOT_GRACE`] after it was taken).
    pub deadline: tokio::time::Instant,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit) -> Slot {
        Slot {
            _permit: permit,
            deadline: tokio::time::Instant::now() + SLOT_GRACE,
        }
    }
}

impl BodySlots {
    /// `slots` slots (at least one).
    pub fn new(slots: usize) -> Arc<BodySlots> {
        let slots = slots.max(1);
        Arc::new(BodySlots {
            semaphore: Arc::new(Semaphore::new(slots)),
            slots,
        })
    }

    /// The number of slots.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Slots free right now.
    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }

    /// A slot, waiting for one at most `wait`; `None` when none came in time.
    pub async fn acquire(&self, wait: Duration) -> Option<Slot> {
        if let Ok(permit) = self.semaphore.clone().try_acquire_owned() {
            return Some(Slot::new(permit));
        }
        match tokio::time::timeout(wait, self.semaphore.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Some(Slot::new(permit)),
            // Timed out (the semaphore is never closed).
            _ => None,
        }
    }
}

/// A body's claim on a slot while it is collected (see [`collect_slotted`]).
#[derive(Debug)]
pub struct SlotClaim {
    slots: Arc<BodySlots>,
    slot: Option<Slot>,
    /// A slot was asked for already (it is asked for once).
    asked: bool,
}

impl SlotClaim {
    /// A claim on `slots`: `slot` when the caller already holds one (a body declared large
    /// waits for it before a byte is read), else one is asked for when the body grows past
    /// [`LARGE_BODY_BYTES`].
    pub fn new(slots: Arc<BodySlots>, slot: Option<Slot>, asked: bool) -> SlotClaim {
        SlotClaim {
            asked: asked || slot.is_some(),
            slots,
            slot,
        }
    }

    /// The slot, when the body holds one.
    pub fn into_slot(self) -> Option<Slot> {
        self.slot
    }
}

/// The global budget for buffered bodies.
#[derive(Debug)]
pub struct BufferBudget {
    limit_bytes: u64,
    used_bytes: AtomicU64,
}

/// The budget is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("buffer budget exhausted")]
pub struct Exhausted;

impl BufferBudget {
    /// A budget of `limit_bytes`.
    pub fn new(limit_bytes: u64) -> Arc<BufferBudget> {
        Arc::new(BufferBudget {
            limit_bytes,
            used_bytes: AtomicU64::new(0),
        })
    }

    /// Bytes reserved right now.
    pub fn in_use(&self) -> u64 {
        self.used_bytes.load(Ordering::Relaxed)
    }

    /// The budget's size.
    pub fn limit(&self) -> u64 {
        self.limit_bytes
    }

    /// Reserves `bytes`, or fails at once when that would go over the budget.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Reservation, Exhausted> {
        self.take(bytes)?;
        Ok(Reservation {
            budget: self.clone(),
            bytes,
        })
    }

    fn take(&self, bytes: u64) -> Result<(), Exhausted> {
        let mut used = self.used_bytes.load(Ordering::Relaxed);
        loop {
            let next = used.checked_add(bytes).ok_or(Exhausted)?;
            if next > self.limit_bytes {
                return Err(Exhausted);
            }
            match self.used_bytes.compare_exchange_weak(
                used,
                next,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => used = actual,
            }
        }
    }
}

/// Bytes reserved from the budget; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BufferBudget>,
    bytes: u64,
}

impl Reservation {
    /// Bytes held by this reservation.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Makes sure at least `total` bytes are reserved.
    pub fn ensure(&mut self, total: u64) -> Result<(), Exhausted> {
        if total > self.bytes {
            self.budget.take(total - self.bytes)?;
            self.bytes = total;
        }
        Ok(())
    }

    /// Gives back what is reserved beyond `total` (memory that was freed).
    pub fn release_to(&mut self, total: u64) {
        if total < self.bytes {
            self.budget
                .used_bytes
                .fetch_sub(self.bytes - total, Ordering::AcqRel);
            self.bytes = total;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget
            .used_bytes
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Why a body could not be buffered.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// The body failed (size, timeouts, sender); the body's stats say why.
    #[error("request body failed: {0}")]
    Body(#[from] BodyError),
    /// The budget ran out.
    #[error(transparent)]
    Budget(#[from] Exhausted),
}

/// Reads a whole (already size-limited) body into memory, reserving every allocation first.
/// `capacity_hint` is the declared length (0: unknown). On return the reservation holds exactly
/// the body's length.
pub async fn collect<B>(
    mut body: B,
    capacity_hint: usize,
    reservation: &mut Reservation,
) -> Result<Bytes, CollectError>
where
    B: Body<Data = Bytes, Error = BodyError> + Unpin,
{
    let mut gather = Gather::new(capacity_hint, reservation)?;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            gather.push(&data, reservation)?;
        }
    }
    gather.finish(reservation)
}

/// [`collect`] for a body that may be large: before it is read past [`LARGE_BODY_BYTES`] it
/// waits (at most [`SLOT_WAIT`]) for a slot, unless it holds one already; a slot it holds is
/// given up when the body is still arriving at the slot's deadline. Returns the body and the
/// slot it still holds (the caller keeps it while it works on the body, until the deadline).
pub async fn collect_slotted<B>(
    mut body: B,
    capacity_hint: usize,
    reservation: &mut Reservation,
    mut claim: SlotClaim,
) -> Result<(Bytes, Option<Slot>), CollectError>
where
    B: Body<Data = Bytes, Error = BodyError> + Unpin,
{
    let mut gather = Gather::new(capacity_hint, reservation)?;
    let far = tokio::time::Instant::now() + SLOT_GRACE;
    let grace = tokio::time::sleep_until(claim.slot.as_ref().map_or(far, |s| s.deadline));
    tokio::pin!(grace);
    loop {
        let frame = if claim.slot.is_some() {
            tokio::select! {
                biased;
                frame = body.frame() => frame,
                () = &mut grace => {
                    tracing::debug!(received = gather.len, "slow large body: its slot goes to the next one");
                    claim.slot = None;
                    continue;
                }
            }
        } else {
            body.frame().await
        };
        let Some(frame) = frame else { break };
        if let Ok(data) = frame?.into_data() {
            if !claim.asked && (gather.len + data.len()) as u64 > LARGE_BODY_BYTES {
                claim.asked = true;
                claim.slot = claim.slots.acquire(SLOT_WAIT).await;
                if let Some(slot) = &claim.slot {
                    grace.as_mut().reset(slot.deadline);
                }
            }
            gather.push(&data, reservation)?;
        }
    }
    Ok((gather.finish(reservation)?, claim.into_slot()))
}

/// A body being gathered: full blocks and the one being filled, all reserved.
struct Gather {
    blocks: Vec<Bytes>,
    current: BytesMut,
    /// Bytes allocated (the capacities of the blocks), all reserved.
    allocated: u64,
    len: usize,
}

impl Gather {
    fn new(capacity_hint: usize, reservation: &mut Reservation) -> Result<Gather, Exhausted> {
        reservation.ensure(capacity_hint as u64)?;
        Ok(Gather {
            blocks: Vec::new(),
            current: BytesMut::with_capacity(capacity_hint),
            allocated: capacity_hint as u64,
            len: 0,
        })
    }

    fn push(&mut self, mut data: &[u8], reservation: &mut Reservation) -> Result<(), Exhausted> {
        while !data.is_empty() {
            let spare = self.current.capacity() - self.current.len();
            if spare == 0 {
                let block = if self.allocated == 0 {
                    MIN_BLOCK_BYTES
                } else {
                    BLOCK_BYTES
                };
                reservation.ensure(self.allocated + block as u64)?;
                self.allocated += block as u64;
                let full = std::mem::replace(&mut self.current, BytesMut::with_capacity(block));
                if !full.is_empty() {
                    self.blocks.push(full.freeze());
                }
                continue;
            }
            let take = spare.min(data.len());
            self.current.extend_from_slice(&data[..take]);
            self.len += take;
            data = &data[take..];
        }
        Ok(())
    }

    /// One contiguous buffer of exactly the body (joined when it took several blocks).
    fn finish(self, reservation: &mut Reservation) -> Result<Bytes, CollectError> {
        let Gather {
            blocks,
            current,
            allocated,
            len,
        } = self;
        let joined = if blocks.is_empty() && current.capacity() == len {
            current.freeze()
        } else {
            // The join's copy exists next to the blocks until they are dropped.
            reservation.ensure(allocated + len as u64)?;
            let mut out = BytesMut::with_capacity(len);
            for block in &blocks {
                out.extend_from_slice(block);
            }
            out.extend_from_slice(&current);
            drop((blocks, current));
            out.freeze()
        };
        reservation.release_to(len as u64);
        Ok(joined)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_and_released() {
        let budget = BufferBudget::new(100);
        let mut a = budget.reserve(60).unwrap();
        assert_eq!(budget.reserve(50).unwrap_err(), Exhausted);
        let b = budget.reserve(40).unwrap();
        assert_eq!(a.ensure(61), Err(Exhausted));
        drop(b);
        a.ensure(100).unwrap();
        assert_eq!(budget.in_use(), 100);
        drop(a);
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn collect_reserves_as_it_reads() {
        let budget = BufferBudget::new(10);
        let mut res = budget.reserve(0).unwrap();
        let body = http_body_util::Full::new(Bytes::from_static(b"0123456789abc"))
            .map_err(|never| match never {});
        let err = collect(body, 0, &mut res).await.unwrap_err();
        assert!(matches!(err, CollectError::Budget(_)));
        let mut res = budget.reserve(0).unwrap();
        let body = http_body_util::Full::new(Bytes::from_static(b"0123456789"))
            .map_err(|never| match never {});
        assert_eq!(collect(body, 10, &mut res).await.unwrap(), "0123456789");
        assert_eq!(budget.in_use(), 10);
    }

    /// A body of `len` bytes in `frame`-sized frames of unknown total length.
    fn chunked(len: usize, frame: usize) -> impl Body<Data = Bytes, Error = BodyError> + Unpin {
        let frames: Vec<Result<http_body::Frame<Bytes>, BodyError>> = (0..len)
            .step_by(frame)
            .map(|at| {
                let n = frame.min(len - at);
                Ok(http_body::Frame::data(Bytes::from(vec![b'x'; n])))
            })
            .collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_reserves_its_blocks_and_the_join() {
        let len = 3 * BLOCK_BYTES + 1000;
        // 16 KiB, then three 1 MiB blocks.
        let blocks = (MIN_BLOCK_BYTES + 3 * BLOCK_BYTES) as u64;
        // The blocks and the joined copy exist at once: both must fit in the budget.
        let budget = BufferBudget::new(blocks + len as u64 - 1);
        let mut res = budget.reserve(0).unwrap();
        let result = collect(chunked(len, 16 * 1024), 0, &mut res).await;
        assert!(matches!(result, Err(CollectError::Budget(_))));
        drop(res);
        assert_eq!(budget.in_use(), 0);

        let budget = BufferBudget::new(blocks + len as u64);
        let mut res = budget.reserve(0).unwrap();
        let body = collect(chunked(len, 16 * 1024), 0, &mut res).await.unwrap();
        assert_eq!(body.len(), len);
        // Afterwards exactly the body is held, and counted.
        assert_eq!(budget.in_use(), len as u64);
        assert_eq!(res.bytes(), len as u64);
        drop(res);
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn a_body_of_declared_length_takes_one_exact_buffer() {
        let len = 3 * BLOCK_BYTES + 1000;
        // No blocks, no join: the declared length is all it needs.
        let budget = BufferBudget::new(len as u64);
        let mut res = budget.reserve(len as u64).unwrap();
        let body = collect(chunked(len, 16 * 1024), len, &mut res)
            .await
            .unwrap();
        assert_eq!(body.len(), len);
        assert_eq!(budget.in_use(), len as u64);
    }

    #[tokio::test]
    async fn a_small_body_of_unknown_length_holds_only_its_length_afterwards() {
        let budget = BufferBudget::new(MIN_BLOCK_BYTES as u64 + 10);
        let mut res = budget.reserve(0).unwrap();
        let body = collect(chunked(10, 3), 0, &mut res).await.unwrap();
        assert_eq!(body, "xxxxxxxxxx");
        assert_eq!(budget.in_use(), 10);
    }

    /// A body of `len` bytes of unknown length that counts the bytes read from it.
    fn counted(
        len: usize,
        read: Arc<AtomicU64>,
    ) -> impl Body<Data = Bytes, Error = BodyError> + Unpin {
        chunked(len, 64 * 1024).map_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                read.fetch_add(data.len() as u64, Ordering::SeqCst);
            }
            frame
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_is_waited_for_at_most_slot_wait() {
        let slots = BodySlots::new(1);
        let held = slots.acquire(SLOT_WAIT).await.expect("a free slot");
        assert_eq!(slots.available(), 0);
        let started = tokio::time::Instant::now();
        assert!(slots.acquire(SLOT_WAIT).await.is_none());
        assert_eq!(started.elapsed(), SLOT_WAIT);
        drop(held);
        assert!(slots.acquire(SLOT_WAIT).await.is_some());
        assert_eq!(slots.available(), 1, "slots are given back when dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_body_is_not_read_past_the_threshold_until_it_has_a_slot() {
        let slots = BodySlots::new(1);
        let held = slots.acquire(SLOT_WAIT).await.unwrap();
        let budget = BufferBudget::new(64 * 1024 * 1024);
        let read = Arc::new(AtomicU64::new(0));
        let len = 3 * LARGE_BODY_BYTES as usize;
        let body = counted(len, read.clone());
        let claim = SlotClaim::new(slots.clone(), None, false);
        let collecting = tokio::spawn(async move {
            let mut res = budget.reserve(0).unwrap();
            collect_slotted(body, 0, &mut res, claim).await
        });
        // Half the wait: the body has stopped at the threshold (one frame past it at most).
        tokio::time::sleep(SLOT_WAIT / 2).await;
        assert!(!collecting.is_finished());
        let stopped_at = read.load(Ordering::SeqCst);
        assert!(
            stopped_at <= LARGE_BODY_BYTES + 64 * 1024,
            "read {stopped_at} bytes without a slot"
        );
        drop(held);
        let (body, slot) = collecting.await.unwrap().unwrap();
        assert_eq!(body.len(), len, "nothing lost");
        assert!(slot.is_some(), "the body holds the slot it waited for");
        assert_eq!(slots.available(), 0);
        drop(slot);
        assert_eq!(slots.available(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_waits_too_long_for_a_slot_is_read_without_one() {
        let slots = BodySlots::new(1);
        let _held = slots.acquire(SLOT_WAIT).await.unwrap();
        let budget = BufferBudget::new(64 * 1024 * 1024);
        let mut res = budget.reserve(0).unwrap();
        let len = 2 * LARGE_BODY_BYTES as usize;
        let started = tokio::time::Instant::now();
        let claim = SlotClaim::new(slots.clone(), None, false);
        let (body, slot) = collect_slotted(chunked(len, 64 * 1024), 0, &mut res, claim)
            .await
            .unwrap();
        assert_eq!(started.elapsed(), SLOT_WAIT);
        assert_eq!(body.len(), len, "nothing lost");
        assert!(slot.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_body_gives_its_slot_up_at_the_deadline() {
        let slots = BodySlots::new(1);
        let slot = slots.acquire(SLOT_WAIT).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, BodyError>>(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|frame| (frame, rx))
        });
        let body = http_body_util::StreamBody::new(Box::pin(stream));
        let claim = SlotClaim::new(slots.clone(), Some(slot), true);
        let budget = BufferBudget::new(64 * 1024 * 1024);
        let collecting = tokio::spawn(async move {
            let mut res = budget.reserve(0).unwrap();
            collect_slotted(body, 0, &mut res, claim).await
        });
        tx.send(Ok(http_body::Frame::data(Bytes::from(vec![b'x'; 1000]))))
            .await
            .unwrap();
        tokio::time::sleep(SLOT_GRACE).await;
        tokio::task::yield_now().await;
        assert_eq!(slots.available(), 1, "the stalled body gave its slot up");
        assert!(!collecting.is_finished());
        tx.send(Ok(http_body::Frame::data(Bytes::from(vec![b'y'; 1000]))))
            .await
            .unwrap();
        drop(tx);
        let (body, slot) = collecting.await.unwrap().unwrap();
        assert_eq!(body.len(), 2000, "nothing lost");
        assert!(slot.is_none());
    }
}
