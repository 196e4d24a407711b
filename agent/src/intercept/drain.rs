//! Stopping without cutting pulls: after SIGTERM the agent detaches first
//! (new connections go straight to their destinations), then waits here for
//! the connections it already carries. Terminated ones are asked to close
//! once their requests in flight are answered (hyper's graceful shutdown:
//! idle keep-alive connections close at once); spliced ones are opaque and
//! run to their end. Whatever is left when the grace period ends is cut.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::{Notify, watch};

#[derive(Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

struct Inner {
    active: AtomicUsize,
    idle: Notify,
    draining: watch::Sender<bool>,
}

/// Held by each connection's task; the connection counts until it is dropped.
pub struct Tracked {
    inner: Arc<Inner>,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                active: AtomicUsize::new(0),
                idle: Notify::new(),
                draining: watch::channel(false).0,
            }),
        }
    }
}

impl Drain {
    pub fn track(&self) -> Tracked {
        self.inner.active.fetch_add(1, Ordering::SeqCst);
        Tracked {
            inner: self.inner.clone(),
        }
    }

    /// Connections being carried now.
    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::SeqCst)
    }

    /// Tell every terminated connection to finish what it is answering and close.
    pub fn start(&self) {
        self.inner.draining.send_replace(true);
    }

    /// Resolves once [`Drain::start`] was called (at once if it was).
    pub async fn started(&self) {
        let mut rx = self.inner.draining.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Resolves when no connection is left.
    pub async fn idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so a last drop in between still wakes us.
            notified.as_mut().enable();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.inner.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn idle_waits_for_the_last_connection_and_started_for_the_signal() {
        let drain = Drain::default();
        drain.idle().await; // nothing tracked: at once
        let (a, b) = (drain.track(), drain.track());
        assert_eq!(drain.active(), 2);
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.idle().await }
        });
        let started = tokio::spawn({
            let drain = drain.clone();
            async move { drain.started().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!started.is_finished());
        drain.start();
        started.await.unwrap();
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "one connection is still carried");
        drop(b);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("idle once the last one is gone")
            .unwrap();
        drain.started().await; // after the signal: at once
    }
}
