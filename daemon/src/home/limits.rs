//! Rates a home holds its users and peers to: token buckets by key (a
//! handle, a peer home, an address), and the failed-login backoff.
//!
//! A bucket holds up to `burst` tokens and gains `rate` a second; each
//! action takes one. Without a token the caller is told how long until the
//! next, and says so to whoever asked (`rate_limited`, with the time to
//! retry): a limited message is late, never lost.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One bucket per key.
pub struct Buckets {
    rate: f64,
    burst: f64,
    map: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Buckets {
    /// `rate` tokens a second, at most `burst` saved.
    pub fn new(rate: f64, burst: f64) -> Buckets {
        Buckets {
            rate,
            burst: burst.max(1.0),
            map: Mutex::default(),
        }
    }

    /// Takes a token of `key`'s bucket, or says how long until one comes.
    pub fn take(&self, key: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        // Looked up by `&str` first: a key is copied only for its first
        // token, not for every message of a busy sender.
        if !map.contains_key(key) {
            map.insert(
                key.to_owned(),
                Bucket {
                    tokens: self.burst,
                    at: now,
                },
            );
        }
        let Some(b) = map.get_mut(key) else {
            return Ok(());
        };
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }

    /// Forgets the buckets that are full again (their keys went quiet), so
    /// the map holds only the busy ones.
    pub fn sweep(&self) {
        let now = Instant::now();
        let (rate, burst) = (self.rate, self.burst);
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
    }
}

/// Failed logins: after `free` failures in a row from one address (or
/// for one handle), each next try waits twice as long as the last, up to
/// `max`; a success forgets the address's and the handle's failures. The
/// log gets one line per address per interval, not one per guess.
pub struct LoginGuard {
    free: u32,
    max: Duration,
    map: Mutex<HashMap<String, Failures>>,
}

struct Failures {
    count: u32,
    last: Instant,
    /// Not said in the log yet.
    unsaid: u32,
    said: Option<Instant>,
}

/// How often one address's failed logins are summed up in the log.
const SAY_EVERY: Duration = Duration::from_secs(60);

impl LoginGuard {
    pub fn new(free: u32, max: Duration) -> LoginGuard {
        LoginGuard {
            free,
            max,
            map: Mutex::default(),
        }
    }

    /// How long `key` must wait before its next try is heard (zero: now).
    pub fn wait(&self, key: &str) -> Duration {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let Some(f) = map.get(key) else {
            return Duration::ZERO;
        };
        let over = f.count.saturating_sub(self.free);
        if over == 0 {
            return Duration::ZERO;
        }
        let backoff = Duration::from_millis(250)
            .saturating_mul(1 << over.min(20))
            .min(self.max);
        backoff.saturating_sub(f.last.elapsed())
    }

    /// A failed try of `key`; returns how many failures to say now (zero:
    /// say nothing yet) and how many in a row.
    pub fn failed(&self, key: &str) -> (u32, u32) {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let f = map.entry(key.to_owned()).or_insert(Failures {
            count: 0,
            last: now,
            unsaid: 0,
            said: None,
        });
        f.count += 1;
        f.last = now;
        f.unsaid += 1;
        if f.said.is_none_or(|s| s.elapsed() >= SAY_EVERY) {
            f.said = Some(now);
            (std::mem::take(&mut f.unsaid), f.count)
        } else {
            (0, f.count)
        }
    }

    /// A successful login: its failures are forgiven.
    pub fn succeeded(&self, key: &str) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Forgets keys quiet for longer than the longest backoff.
    pub fn sweep(&self) {
        let max = self.max.max(SAY_EVERY);
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, f| f.last.elapsed() < max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_lets_a_burst_through_then_says_when() {
        let b = Buckets::new(10.0, 3.0);
        for _ in 0..3 {
            b.take("alice").unwrap();
        }
        let wait = b.take("alice").unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
        b.take("bob").unwrap();
        std::thread::sleep(Duration::from_millis(110));
        b.take("alice").unwrap();
    }

    #[test]
    fn failed_logins_back_off_and_are_said_once_per_interval() {
        let g = LoginGuard::new(3, Duration::from_secs(30));
        assert_eq!(g.failed("1.2.3.4"), (1, 1));
        for _ in 0..3 {
            assert_eq!(g.failed("1.2.3.4").0, 0, "said once per interval");
        }
        assert!(g.wait("1.2.3.4") > Duration::from_millis(250));
        assert_eq!(g.wait("5.6.7.8"), Duration::ZERO);
        g.succeeded("1.2.3.4");
        assert_eq!(g.wait("1.2.3.4"), Duration::ZERO);
    }
}
