//! kube-proxy's client-side rate limit (`--kube-api-qps`, `--kube-api-burst`): a token
//! bucket in front of every request to the API server, so the relists that follow API
//! errors are spaced out instead of storming a struggling server.
use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tower_layer::Layer;
use tower_service::Service;

/// Requests per second, and how many may go at once after a quiet spell.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ApiRate {
    pub qps: f64,
    pub burst: u32,
}

/// The shared bucket: tokens refill at `qps` up to `burst`; a request takes one, and
/// waits while the bucket is in debt (each waiter has reserved its own token).
#[derive(Debug)]
struct Bucket {
    rate: ApiRate,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes a token; how long to wait before using it.
    fn reserve(&mut self, now: Instant) -> Duration {
        let burst = f64::from(self.rate.burst);
        let refilled = now.saturating_duration_since(self.at).as_secs_f64() * self.rate.qps;
        self.tokens = (self.tokens + refilled).min(burst) - 1.0;
        self.at = now;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate.qps)
        }
    }
}

/// The layer kube's client stack takes.
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    bucket: Arc<Mutex<Bucket>>,
}

impl RateLimitLayer {
    #[must_use]
    pub fn new(rate: ApiRate) -> Self {
        Self {
            bucket: Arc::new(Mutex::new(Bucket {
                rate,
                tokens: f64::from(rate.burst),
                at: Instant::now(),
            })),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimited {
            inner,
            bucket: Arc::clone(&self.bucket),
            wait: None,
            reserved: false,
        }
    }
}

/// A service that is ready only once its request's token is due.
pub struct RateLimited<S> {
    inner: S,
    bucket: Arc<Mutex<Bucket>>,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A token is held for the next `call`.
    reserved: bool,
}

impl<S, R> Service<R> for RateLimited<S>
where
    S: Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if !self.reserved {
            let wait = self
                .bucket
                .lock()
                .map_or(Duration::ZERO, |mut b| b.reserve(Instant::now()));
            self.reserved = true;
            if !wait.is_zero() {
                self.wait = Some(Box::pin(tokio::time::sleep(wait)));
            }
        }
        if let Some(wait) = &mut self.wait {
            if wait.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.wait = None;
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        self.reserved = false;
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{ApiRate, Bucket};

    #[test]
    fn a_burst_goes_at_once_and_the_rest_at_the_rate() {
        let start = Instant::now();
        let mut bucket = Bucket {
            rate: ApiRate {
                qps: 5.0,
                burst: 10,
            },
            tokens: 10.0,
            at: start,
        };
        let waits: Vec<Duration> = (0..12).map(|_| bucket.reserve(start)).collect();
        assert!(waits[..10].iter().all(Duration::is_zero), "{waits:?}");
        assert_eq!(waits[10], Duration::from_millis(200));
        assert_eq!(waits[11], Duration::from_millis(400));
        // After a quiet spell the bucket is full again, never fuller.
        let later = start + Duration::from_mins(1);
        let waits: Vec<Duration> = (0..11).map(|_| bucket.reserve(later)).collect();
        assert!(waits[..10].iter().all(Duration::is_zero), "{waits:?}");
        assert_eq!(waits[10], Duration::from_millis(200));
    }
}
