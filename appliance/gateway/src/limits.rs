//! Per-key limits: requests per minute and tokens per minute as token buckets (full at
//! start, refilled continuously), and concurrent requests as a counter whose permit is
//! released when the response (stream included) ends.
//!
//! Tokens are charged after a request finishes, with the real count; a key whose token
//! bucket is in debt is refused until it refills. All state changes happen under one
//! lock per key, so limits hold under any concurrency.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    pub max_concurrency: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Denied {
    Concurrency { limit: u32 },
    Requests { limit: u32, retry_after: Duration },
    Tokens { limit: u32, retry_after: Duration },
}

impl Denied {
    pub fn retry_after(&self) -> Duration {
        match *self {
            // A concurrent request usually ends within seconds.
            Denied::Concurrency { .. } => Duration::from_secs(1),
            Denied::Requests { retry_after, .. } | Denied::Tokens { retry_after, .. } => {
                retry_after
            }
        }
    }
}

/// What the `x-ratelimit-*` headers report.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateInfo {
    pub requests: Option<(u32, u32, Duration)>,
    pub tokens: Option<(u32, u32, Duration)>,
}

impl RateInfo {
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        let secs = |d: Duration| format!("{:.3}s", d.as_secs_f64());
        if let Some((limit, remaining, reset)) = self.requests {
            h.push(("x-ratelimit-limit-requests", limit.to_string()));
            h.push(("x-ratelimit-remaining-requests", remaining.to_string()));
            h.push(("x-ratelimit-reset-requests", secs(reset)));
        }
        if let Some((limit, remaining, reset)) = self.tokens {
            h.push(("x-ratelimit-limit-tokens", limit.to_string()));
            h.push(("x-ratelimit-remaining-tokens", remaining.to_string()));
            h.push(("x-ratelimit-reset-tokens", secs(reset)));
        }
        h
    }
}

#[derive(Debug)]
struct Buckets {
    requests: f64,
    tokens: f64,
    updated: Option<Instant>,
}

/// The live state of one key's limits.
#[derive(Debug)]
pub struct Limiter {
    buckets: Mutex<Buckets>,
    in_flight: AtomicU32,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter {
            buckets: Mutex::new(Buckets {
                requests: f64::NAN,
                tokens: f64::NAN,
                updated: None,
            }),
            in_flight: AtomicU32::new(0),
        }
    }
}

/// Held for the life of a request; releases its concurrency slot when dropped.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Refill rate; a limit of 0 (refuse everything) refills as 1/min so waits stay finite.
fn per_sec(per_min: u32) -> f64 {
    per_min.max(1) as f64 / 60.0
}

impl Buckets {
    /// Refills both buckets up to `now` (full on first use or after a limit change).
    fn refill(&mut self, limits: &Limits, now: Instant) {
        let dt = self
            .updated
            .map(|u| now.saturating_duration_since(u).as_secs_f64())
            .unwrap_or(0.0);
        self.updated = Some(now);
        if let Some(rpm) = limits.rpm {
            let cap = rpm as f64;
            self.requests = if self.requests.is_nan() {
                cap
            } else {
                (self.requests + dt * per_sec(rpm)).min(cap)
            };
        }
        if let Some(tpm) = limits.tpm {
            let cap = tpm as f64;
            self.tokens = if self.tokens.is_nan() {
                cap
            } else {
                (self.tokens + dt * per_sec(tpm)).min(cap)
            };
        }
    }

    fn info(&self, limits: &Limits) -> RateInfo {
        let reset = |level: f64, cap: u32| {
            Duration::from_secs_f64(((cap as f64 - level).max(0.0) / per_sec(cap)).min(60.0))
        };
        RateInfo {
            requests: limits.rpm.map(|l| {
                (
                    l,
                    self.requests.max(0.0).floor() as u32,
                    reset(self.requests, l),
                )
            }),
            tokens: limits.tpm.map(|l| {
                (
                    l,
                    self.tokens.max(0.0).floor() as u32,
                    reset(self.tokens, l),
                )
            }),
        }
    }
}

impl Limiter {
    /// Admits one request or says which limit refused it.
    pub fn admit(
        self: &Arc<Self>,
        limits: &Limits,
        now: Instant,
    ) -> Result<(Permit, RateInfo), (Denied, RateInfo)> {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        b.refill(limits, now);
        if let Some(limit) = limits.max_concurrency {
            if self.in_flight.load(Ordering::Acquire) >= limit {
                return Err((Denied::Concurrency { limit }, b.info(limits)));
            }
        }
        if let Some(rpm) = limits.rpm {
            if b.requests < 1.0 {
                let retry_after = Duration::from_secs_f64((1.0 - b.requests) / per_sec(rpm));
                return Err((
                    Denied::Requests {
                        limit: rpm,
                        retry_after,
                    },
                    b.info(limits),
                ));
            }
        }
        if let Some(tpm) = limits.tpm {
            if b.tokens <= 0.0 {
                let retry_after = Duration::from_secs_f64((1.0 - b.tokens) / per_sec(tpm));
                return Err((
                    Denied::Tokens {
                        limit: tpm,
                        retry_after,
                    },
                    b.info(limits),
                ));
            }
        }
        if limits.rpm.is_some() {
            b.requests -= 1.0;
        }
        // Counted under the bucket lock, so two racing requests cannot both take the last slot.
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Ok((
            Permit {
                limiter: self.clone(),
            },
            b.info(limits),
        ))
    }

    /// Charges the tokens a finished request used.
    pub fn charge_tokens(&self, limits: &Limits, tokens: usize, now: Instant) {
        if limits.tpm.is_none() {
            return;
        }
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        b.refill(limits, now);
        b.tokens -= tokens as f64;
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_per_minute_refill_continuously() {
        let l = Arc::new(Limiter::default());
        let lim = Limits {
            rpm: Some(2),
            ..Default::default()
        };
        let t0 = Instant::now();
        let a = l.admit(&lim, t0).unwrap();
        let b = l.admit(&lim, t0).unwrap();
        assert_eq!(b.1.requests.unwrap().1, 0);
        let (d, _) = l.admit(&lim, t0).unwrap_err();
        // One request comes back every 30 s.
        assert!(
            matches!(d, Denied::Requests { retry_after, .. } if (retry_after.as_secs_f64() - 30.0).abs() < 0.01)
        );
        assert!(l.admit(&lim, t0 + Duration::from_secs(29)).is_err());
        assert!(l.admit(&lim, t0 + Duration::from_secs(31)).is_ok());
        drop((a, b));
    }

    #[test]
    fn concurrency_permits_are_released_on_drop() {
        let l = Arc::new(Limiter::default());
        let lim = Limits {
            max_concurrency: Some(1),
            ..Default::default()
        };
        let t = Instant::now();
        let p = l.admit(&lim, t).unwrap();
        assert!(matches!(
            l.admit(&lim, t),
            Err((Denied::Concurrency { limit: 1 }, _))
        ));
        drop(p);
        assert_eq!(l.in_flight(), 0);
        assert!(l.admit(&lim, t).is_ok());
    }

    #[test]
    fn tokens_are_charged_after_the_fact() {
        let l = Arc::new(Limiter::default());
        let lim = Limits {
            tpm: Some(60),
            ..Default::default()
        };
        let t0 = Instant::now();
        drop(l.admit(&lim, t0).unwrap());
        l.charge_tokens(&lim, 90, t0);
        // 30 tokens in debt at one token per second: refused until it is positive again.
        let (d, _) = l.admit(&lim, t0 + Duration::from_secs(10)).unwrap_err();
        assert!(
            matches!(d, Denied::Tokens { retry_after, .. } if retry_after > Duration::from_secs(20))
        );
        assert!(l.admit(&lim, t0 + Duration::from_secs(31)).is_ok());
    }

    #[test]
    fn limits_hold_under_concurrency() {
        let l = Arc::new(Limiter::default());
        let lim = Limits {
            rpm: Some(100),
            ..Default::default()
        };
        let t = Instant::now();
        let admitted: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    let l = l.clone();
                    s.spawn(move || (0..50).filter(|_| l.admit(&lim, t).is_ok()).count())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, 100);
    }
}
