//! A future that is polled only when it asked to be.
//!
//! hyper's HTTP/1 server polls a request's service future whenever the connection's task
//! wakes, and while a large body streams through, that task wakes for every block it reads
//! from the sender. The handler has nothing to do then (its body is read by the upstream
//! connection's task), but each poll costs it a large stack frame and a round of `select!`,
//! timer and channel polls: about 1 ms of CPU per 200 MiB upload under `perf`. [`WakeGate`]
//! passes a poll on only when one of the wakers the inner future registered was woken.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Polls `F` on its first poll and then only after `F` was woken.
pub struct WakeGate<F> {
    inner: F,
    gate: Arc<Gate>,
    /// `gate` as a waker, made once.
    waker: Waker,
}

struct Gate {
    /// Set when the inner future is woken; taken by the poll that passes it on.
    woken: AtomicBool,
    /// The task polling the gate.
    outer: AtomicWaker,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Set before waking, so the poll the wake causes sees it.
        self.woken.store(true, Ordering::Release);
        self.outer.wake();
    }
}

impl<F> WakeGate<F> {
    /// Gates `inner`.
    pub fn new(inner: F) -> WakeGate<F> {
        let gate = Arc::new(Gate {
            woken: AtomicBool::new(true),
            outer: AtomicWaker::new(),
        });
        WakeGate {
            inner,
            waker: Waker::from(gate.clone()),
            gate,
        }
    }
}

impl<F: Future + Unpin> Future for WakeGate<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Registered before `woken` is read: a wake between the two wakes this task again,
        // and a wake after the read finds this waker.
        self.gate.outer.register(cx.waker());
        if !self.gate.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let this = &mut *self;
        Pin::new(&mut this.inner).poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `ready` is set, else stores the waker it was given.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = &'static str;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<&'static str> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.load(Ordering::SeqCst) {
                return Poll::Ready("done");
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// A waker that counts its wakes.
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn polls_the_inner_future_only_after_it_was_woken() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let inner_waker = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let mut gated = WakeGate::new(Probe {
            polls: polls.clone(),
            ready: ready.clone(),
            waker: inner_waker.clone(),
        });
        let outer = Arc::new(Counter(AtomicUsize::new(0)));
        let outer_waker = Waker::from(outer.clone());
        let mut cx = Context::from_waker(&outer_waker);

        // The first poll goes through.
        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1);

        // The connection's task woke for something else: the inner future is not polled.
        for _ in 0..5 {
            assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        assert_eq!(outer.0.load(Ordering::SeqCst), 0);

        // The inner future's own waker fires: the outer task is woken and the next poll
        // reaches the inner future, which is ready now.
        ready.store(true, Ordering::SeqCst);
        inner_waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(
            outer.0.load(Ordering::SeqCst),
            1,
            "the outer task was not woken"
        );
        assert_eq!(Pin::new(&mut gated).poll(&mut cx), Poll::Ready("done"));
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_wake_during_the_inner_poll_is_not_lost() {
        /// Wakes itself once from inside its poll (as a yield does), then is ready.
        struct YieldOnce(bool);
        impl Future for YieldOnce {
            type Output = ();
            fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                if self.0 {
                    return Poll::Ready(());
                }
                self.0 = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
        let mut gated = WakeGate::new(YieldOnce(false));
        let outer = Arc::new(Counter(AtomicUsize::new(0)));
        let outer_waker = Waker::from(outer.clone());
        let mut cx = Context::from_waker(&outer_waker);
        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        assert_eq!(outer.0.load(Ordering::SeqCst), 1);
        assert!(Pin::new(&mut gated).poll(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn a_gated_future_completes_on_a_runtime() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let task = tokio::spawn(WakeGate::new(Box::pin(async move {
            tokio::task::yield_now().await;
            rx.await.unwrap() + 1
        })));
        tokio::task::yield_now().await;
        tx.send(41).unwrap();
        assert_eq!(task.await.unwrap(), 42);
    }
}
