//! Stage 4: bounded buffering, only for requests that may need trimming. Every buffered byte is
//! reserved first from one global budget (`[server] buffer_budget`) shared by all requests, so
//! the proxy never holds more than the budget in bodies however many arrive at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;

use crate::limit::BodyError;

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

/// Reads a whole (already size-limited) body into memory, reserving every byte first.
pub async fn collect<B>(
    mut body: B,
    capacity_hint: usize,
    reservation: &mut Reservation,
) -> Result<Bytes, CollectError>
where
    B: Body<Data = Bytes, Error = BodyError> + Unpin,
{
    reservation.ensure(capacity_hint as u64)?;
    let mut buf = BytesMut::with_capacity(capacity_hint);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            let total = (buf.len() + data.len()) as u64;
            reservation.ensure(total)?;
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
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
        assert_eq!(collect(body, 4, &mut res).await.unwrap(), "0123456789");
        assert_eq!(budget.in_use(), 10);
    }
}
