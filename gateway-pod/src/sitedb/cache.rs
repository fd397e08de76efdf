//! In front of the site database: concurrent lookups for the same site share one query, and a
//! site that is missing or malformed is remembered briefly, so a misconfigured peer retrying
//! IKE_SA_INIT cannot hammer the database. Successful lookups are not cached here: the dynamic
//! eroute built from them holds the site.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::sync::OnceCell;

use super::{LookupError, Site};

/// What a lookup is keyed by, per egroup.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    PeerId { egroup: String, peer_id: String },
    Subnet { egroup: String, subnet: IpNet },
}

type Cell = Arc<OnceCell<Result<Site, LookupError>>>;

/// Coalescing and negative caching of site lookups.
#[derive(Debug)]
pub struct LookupCache {
    inflight: Mutex<HashMap<Key, Cell>>,
    negative: Mutex<HashMap<Key, (Instant, LookupError)>>,
    negative_ttl: Duration,
    max_negative: usize,
}

impl LookupCache {
    /// Remembers failures for `negative_ttl`, at most `max_negative` of them.
    pub fn new(negative_ttl: Duration, max_negative: usize) -> Self {
        Self {
            inflight: Mutex::default(),
            negative: Mutex::default(),
            negative_ttl,
            max_negative,
        }
    }

    /// The site for `key`: a remembered failure, the result of a query already in flight, or
    /// the result of `lookup`, run once for all concurrent callers.
    pub async fn get<F, Fut>(&self, key: Key, now: Instant, lookup: F) -> Result<Site, LookupError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Site, LookupError>>,
    {
        if let Some((until, e)) = lock(&self.negative).get(&key)
            && *until > now
        {
            return Err(e.clone());
        }
        let cell = lock(&self.inflight).entry(key.clone()).or_default().clone();
        let result = cell.get_or_init(lookup).await.clone();
        {
            let mut inflight = lock(&self.inflight);
            if inflight.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                inflight.remove(&key);
            }
        }
        // Only a site's own misconfiguration is remembered; an outage is retried next time.
        if let Err(e @ (LookupError::NotFound | LookupError::Malformed { .. })) = &result {
            let mut neg = lock(&self.negative);
            if neg.len() >= self.max_negative {
                neg.retain(|_, (until, _)| *until > now);
                if neg.len() >= self.max_negative {
                    neg.clear();
                }
            }
            neg.insert(key, (now + self.negative_ttl, e.clone()));
        }
        result
    }

    /// Forgets a remembered failure (the site was fixed, e.g. after an import).
    pub fn forget(&self, key: &Key) {
        lock(&self.negative).remove(key);
    }
}

// The maps stay consistent even if a holder panicked: entries are inserted or removed whole.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::secret::Secret;

    fn key(p: &str) -> Key {
        Key::PeerId {
            egroup: "g".into(),
            peer_id: p.into(),
        }
    }

    fn site() -> Site {
        Site {
            peer_id: "a".into(),
            psk: Secret::new(b"k".to_vec()),
            remote_subnet: "10.0.0.0/24".parse().unwrap(),
            peer_address: None,
            backup_peer_address: None,
        }
    }

    #[tokio::test]
    async fn concurrent_lookups_for_one_site_share_one_query() {
        let cache = Arc::new(LookupCache::new(Duration::from_secs(30), 100));
        let calls = Arc::new(AtomicUsize::new(0));
        let entered = Arc::new(AtomicUsize::new(0));
        let (release, gate) = tokio::sync::watch::channel(false);
        let now = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (cache, calls, mut gate) = (cache.clone(), calls.clone(), gate.clone());
            let entered = entered.clone();
            tasks.push(tokio::spawn(async move {
                // Counted in the same poll that registers the task on the in-flight lookup.
                entered.fetch_add(1, Ordering::SeqCst);
                cache
                    .get(key("a"), now, || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        let _ = gate.wait_for(|open| *open).await;
                        Ok(site())
                    })
                    .await
            }));
        }
        // Every task reaches the cache before the one query completes (single-threaded
        // runtime: the tasks run only while this one yields).
        while entered.load(Ordering::SeqCst) < 10 {
            tokio::task::yield_now().await;
        }
        release.send(true).unwrap();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().peer_id, "a");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Success is not cached: the next lookup queries again.
        cache.get(key("a"), now, || async { Ok(site()) }).await.unwrap();
    }

    #[tokio::test]
    async fn a_missing_site_is_remembered_for_the_ttl_only() {
        let cache = LookupCache::new(Duration::from_secs(30), 100);
        let calls = AtomicUsize::new(0);
        let t0 = Instant::now();
        let missing = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(LookupError::NotFound)
        };
        assert_eq!(cache.get(key("x"), t0, missing).await, Err(LookupError::NotFound));
        assert_eq!(
            cache.get(key("x"), t0 + Duration::from_secs(29), missing).await,
            Err(LookupError::NotFound)
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "answered from the negative cache"
        );
        let _ = cache.get(key("x"), t0 + Duration::from_secs(31), missing).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2, "asked again after the TTL");
        cache.forget(&key("x"));
        let _ = cache.get(key("x"), t0 + Duration::from_secs(32), missing).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_outage_is_not_remembered() {
        let cache = LookupCache::new(Duration::from_secs(30), 100);
        let t0 = Instant::now();
        let down = || async { Err(LookupError::Unreachable("refused".into())) };
        let _ = cache.get(key("y"), t0, down).await;
        let r = cache.get(key("y"), t0, || async { Ok(site()) }).await;
        assert!(r.is_ok(), "the database came back: no stale failure");
    }

    #[tokio::test]
    async fn the_negative_cache_is_bounded() {
        let cache = LookupCache::new(Duration::from_secs(30), 3);
        let t0 = Instant::now();
        for i in 0..10 {
            let _ = cache
                .get(key(&i.to_string()), t0, || async { Err(LookupError::NotFound) })
                .await;
        }
        assert!(lock(&cache.negative).len() <= 3);
    }
}
