//! An exact-match response cache for non-streaming requests.
//!
//! The key is the SHA-256 of the target id and the request body as forwarded (after
//! redaction), so two requests share an answer only if the provider would have seen the same
//! bytes. Each config gets a fresh cache: a reload never serves answers of the old policy.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::config::CacheSettings;

pub type CacheKey = [u8; 32];

pub fn key(target_id: &str, body: &[u8]) -> CacheKey {
    let mut hasher = Sha256::new();
    hasher.update(target_id.as_bytes());
    hasher.update([0]);
    hasher.update(body);
    hasher.finalize().into()
}

#[derive(Debug)]
struct Inner {
    entries: HashMap<CacheKey, (Instant, Bytes)>,
    /// Insertion order, for evicting the oldest entry first.
    order: VecDeque<CacheKey>,
    hits: u64,
    misses: u64,
}

#[derive(Debug)]
pub struct ResponseCache {
    settings: CacheSettings,
    inner: Mutex<Inner>,
}

impl ResponseCache {
    pub fn new(settings: CacheSettings) -> Self {
        ResponseCache {
            settings,
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                order: VecDeque::new(),
                hits: 0,
                misses: 0,
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    pub fn get(&self, key: &CacheKey) -> Option<Bytes> {
        if !self.settings.enabled {
            return None;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = inner
            .entries
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.settings.ttl)
            .map(|(_, body)| body.clone());
        match fresh {
            Some(body) => {
                inner.hits += 1;
                Some(body)
            }
            None => {
                inner.misses += 1;
                None
            }
        }
    }

    pub fn put(&self, key: CacheKey, body: Bytes) {
        if !self.settings.enabled {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.entries.insert(key, (Instant::now(), body)).is_none() {
            inner.order.push_back(key);
        }
        while inner.entries.len() > self.settings.max_entries {
            match inner.order.pop_front() {
                Some(oldest) => {
                    inner.entries.remove(&oldest);
                }
                None => break,
            }
        }
    }

    /// Entries held and the hit rate in percent.
    pub fn stats(&self) -> (u64, f64) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let lookups = inner.hits + inner.misses;
        let rate = if lookups == 0 {
            0.0
        } else {
            inner.hits as f64 * 100.0 / lookups as f64
        };
        (inner.entries.len() as u64, rate)
    }

    pub fn ttl(&self) -> Duration {
        self.settings.ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(max_entries: usize, ttl: Duration) -> ResponseCache {
        ResponseCache::new(CacheSettings {
            enabled: true,
            max_entries,
            ttl,
        })
    }

    #[test]
    fn hits_misses_and_hit_rate() {
        let c = cache(10, Duration::from_secs(60));
        let k = key("t", b"body");
        assert!(c.get(&k).is_none());
        c.put(k, Bytes::from_static(b"answer"));
        assert_eq!(c.get(&k).as_deref(), Some(&b"answer"[..]));
        assert_eq!(c.stats(), (1, 50.0));
        assert_ne!(
            key("t", b"body"),
            key("u", b"body"),
            "the target is part of the key"
        );
    }

    #[test]
    fn evicts_oldest_and_expires() {
        let c = cache(2, Duration::from_secs(60));
        for i in 0..3u8 {
            c.put(key("t", &[i]), Bytes::from(vec![i]));
        }
        assert!(c.get(&key("t", &[0])).is_none());
        assert!(c.get(&key("t", &[2])).is_some());
        let expired = cache(2, Duration::ZERO);
        expired.put(key("t", b"x"), Bytes::new());
        assert!(expired.get(&key("t", b"x")).is_none());
    }

    #[test]
    fn disabled_cache_stores_nothing() {
        let c = ResponseCache::new(CacheSettings::default());
        c.put(key("t", b"x"), Bytes::new());
        assert!(c.get(&key("t", b"x")).is_none());
        assert_eq!(c.stats(), (0, 0.0));
    }
}
