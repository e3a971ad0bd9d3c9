//! Stage 1, on the raw bytes: watch HTTP/1 request framing to catch requests that carry both
//! `Content-Length` and `Transfer-Encoding`, a request-smuggling vector. hyper resolves such a
//! request by the Transfer-Encoding and silently drops the Content-Length, so the conflict is
//! invisible once the request is parsed; [`FramingWatch`] follows the message boundaries of the
//! connection (heads with httparse, bodies by their length or chunk framing) and marks which
//! request index had both, so the pipeline can answer it with 400 and close the connection.
//! HTTP/2 connections (and anything it cannot follow) are passed through untouched.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Heads larger than this are not followed (hyper refuses them anyway, with 431).
const MAX_HEAD_BYTES: usize = 1024 * 1024;
/// Chunk-size and trailer lines longer than this are not followed.
const MAX_LINE_BYTES: usize = 8 * 1024;

/// What the watcher learned, shared with the connection's request handler.
#[derive(Debug, Default)]
pub struct FramingFlags {
    /// 1 + the index of the first request with both headers (0: none).
    conflicting: AtomicU64,
    /// Requests handed to the handler so far.
    handled: AtomicU64,
}

impl FramingFlags {
    /// Called once per request by the handler, in order: whether this request had both
    /// `Content-Length` and `Transfer-Encoding`.
    pub fn next_request_conflicts(&self) -> bool {
        let index = self.handled.fetch_add(1, Ordering::AcqRel);
        self.conflicting.load(Ordering::Acquire) == index + 1
    }
}

#[derive(Debug)]
enum State {
    /// Reading a request head.
    Head,
    /// Skipping a length-delimited body.
    Length(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Skipping chunk data (then its CRLF).
    ChunkData(u64),
    /// Reading trailer lines until the empty one.
    Trailers,
    /// Not following (HTTP/2, or framing we cannot follow): hyper decides.
    Passthrough,
}

/// Parses a request head at the start of `buf`: its length, the state after it and whether it
/// had both framing headers; `None` while it is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, State, bool)>, ()> {
    // Left uninitialised: httparse writes the headers it finds (128 of them zeroed on every
    // request cost more than the parse).
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(head_len)) => {
            let (next, conflict) = after_head(req.headers);
            Ok(Some((head_len, next, conflict)))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(()),
    }
}

/// An I/O wrapper that follows request framing on the bytes hyper reads.
pub struct FramingWatch<T> {
    inner: T,
    state: State,
    pending: Vec<u8>,
    requests: u64,
    flags: Arc<FramingFlags>,
}

impl<T> FramingWatch<T> {
    /// Wraps a connection; `flags` tells the handler what was seen.
    pub fn new(inner: T, flags: Arc<FramingFlags>) -> Self {
        FramingWatch {
            inner,
            state: State::Head,
            pending: Vec::new(),
            requests: 0,
            flags,
        }
    }

    fn observe(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Passthrough => return,
                State::Head => {
                    // The common case, a whole head in one read, is parsed where it lies;
                    // only a head split over reads is gathered in `pending`.
                    let before = self.pending.len();
                    let parsed = if before == 0 {
                        parse_head(data)
                    } else {
                        self.pending.extend_from_slice(data);
                        parse_head(&self.pending)
                    };
                    match parsed {
                        Ok(Some((head_len, next, conflict))) => {
                            if conflict {
                                let _ = self.flags.conflicting.compare_exchange(
                                    0,
                                    self.requests + 1,
                                    Ordering::AcqRel,
                                    Ordering::Acquire,
                                );
                            }
                            data = &data[head_len - before..];
                            self.pending.clear();
                            self.requests += 1;
                            self.state = next;
                        }
                        Ok(None) => {
                            if before == 0 {
                                self.pending.extend_from_slice(data);
                            }
                            if self.pending.len() > MAX_HEAD_BYTES {
                                self.pass();
                            }
                            return;
                        }
                        Err(()) => {
                            self.pass();
                            return;
                        }
                    }
                }
                State::Length(left) => {
                    let take = (data.len() as u64).min(left);
                    data = &data[take as usize..];
                    self.state = if left == take {
                        State::Head
                    } else {
                        State::Length(left - take)
                    };
                }
                State::ChunkData(left) => {
                    let take = (data.len() as u64).min(left);
                    data = &data[take as usize..];
                    self.state = if left == take {
                        State::ChunkSize
                    } else {
                        State::ChunkData(left - take)
                    };
                }
                State::ChunkSize | State::Trailers => {
                    let Some(end) = memchr::memchr(b'\n', data) else {
                        self.pending.extend_from_slice(data);
                        if self.pending.len() > MAX_LINE_BYTES {
                            self.pass();
                        }
                        return;
                    };
                    self.pending.extend_from_slice(&data[..=end]);
                    data = &data[end + 1..];
                    let line = std::mem::take(&mut self.pending);
                    let text = trim_line(&line);
                    self.state = match self.state {
                        State::ChunkSize if text.is_empty() => State::ChunkSize, // CRLF after data
                        State::ChunkSize => match chunk_size(text) {
                            Some(0) => State::Trailers,
                            Some(size) => State::ChunkData(size),
                            None => State::Passthrough,
                        },
                        _ if text.is_empty() => State::Head,
                        _ => State::Trailers,
                    };
                }
            }
        }
    }

    fn pass(&mut self) {
        self.state = State::Passthrough;
        self.pending = Vec::new();
    }
}

/// The body framing after a head, and whether it had both Content-Length and Transfer-Encoding.
fn after_head(headers: &[httparse::Header<'_>]) -> (State, bool) {
    let mut length: Option<u64> = None;
    let mut has_length = false;
    let mut transfer_encoding: Option<&[u8]> = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            has_length = true;
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.split(',').next())
                .and_then(|v| v.trim().parse().ok());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = Some(h.value);
        }
    }
    let conflict = has_length && transfer_encoding.is_some();
    let state = match (transfer_encoding, length) {
        (Some(te), _) => {
            let chunked = te
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| trim_line(last).eq_ignore_ascii_case(b"chunked"));
            if chunked {
                State::ChunkSize
            } else {
                State::Passthrough
            }
        }
        (None, Some(0)) | (None, None) if !has_length => State::Head,
        (None, Some(0)) => State::Head,
        (None, Some(n)) => State::Length(n),
        (None, None) => State::Passthrough,
    };
    (state, conflict)
}

fn trim_line(line: &[u8]) -> &[u8] {
    let start = line
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(line.len());
    let end = line
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &line[start..end.max(start)]
}

fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|&b| b == b';').next()?;
    let text = std::str::from_utf8(trim_line(digits)).ok()?;
    u64::from_str_radix(text, 16).ok()
}

impl<T: AsyncRead + Unpin> AsyncRead for FramingWatch<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result
            && !matches!(this.state, State::Passthrough)
        {
            this.observe(&buf.filled()[before..]);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramingWatch<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(chunks: &[&[u8]]) -> (FramingWatch<()>, Arc<FramingFlags>) {
        let flags = Arc::new(FramingFlags::default());
        let mut w = FramingWatch::new((), flags.clone());
        for c in chunks {
            w.observe(c);
        }
        (w, flags)
    }

    #[test]
    fn flags_only_the_conflicting_request() {
        let (w, flags) = watch(&[
            b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello",
            b"POST /b HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
            b"lo\r\n0\r\n\r\n",
            b"POST /c HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        ]);
        assert_eq!(w.requests, 3);
        assert!(!flags.next_request_conflicts());
        assert!(!flags.next_request_conflicts());
        assert!(flags.next_request_conflicts());
    }

    #[test]
    fn byte_by_byte_heads_and_chunk_extensions_are_followed() {
        let text: &[u8] = b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\ntrailer: v\r\n\r\nGET /b HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        let chunks: Vec<&[u8]> = text.chunks(1).collect();
        let (w, flags) = watch(&chunks);
        assert_eq!(w.requests, 2);
        assert!(!flags.next_request_conflicts());
        assert!(flags.next_request_conflicts());
    }

    #[test]
    fn http2_preface_is_passed_through() {
        let (w, _) = watch(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]);
        assert!(matches!(w.state, State::Passthrough));
    }
}
