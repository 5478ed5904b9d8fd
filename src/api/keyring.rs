//! The tenants' API keys as the API checks them: read at start, and where
//! they live in a secret, read again once they are older than
//! [`TENANT_KEYS_MAX_AGE`], so a rotated or revoked key takes effect in a
//! running process (a Lambda container, a worker serving calls) without a
//! restart or a redeploy.
//!
//! The re-read happens on the request that finds the keys stale, not on a
//! timer: a Lambda container is frozen between invocations, so only a
//! request can be relied on to run. One request at a time re-reads; the
//! others go on with the keys they have. A re-read that fails keeps the
//! keys read before (logged, never the keys) and is tried again after
//! another [`TENANT_KEYS_MAX_AGE`].

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::http::HeaderMap;

use super::ApiError;
use crate::config::TenantKey;
use crate::domain::TenantId;

/// How long a process uses the tenant keys it read before reading them
/// again. With API Gateway's authorizer cache (300 s in the CDK app) this
/// bounds how long a revoked key keeps working: 6 minutes.
pub const TENANT_KEYS_MAX_AGE: Duration = Duration::from_secs(60);

/// A re-read that takes longer than this is abandoned (the request goes on
/// with the keys it has).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the tenants' keys are read again from.
#[async_trait]
pub trait TenantKeySource: Send + Sync {
    async fn load(&self) -> anyhow::Result<Vec<TenantKey>>;
}

/// The keys in use, and how to read them again.
pub struct TenantKeyring {
    current: RwLock<(Arc<Vec<TenantKey>>, Instant)>,
    source: Option<(Box<dyn TenantKeySource>, Duration)>,
    reloading: tokio::sync::Mutex<()>,
}

impl TenantKeyring {
    /// Keys that never change (from the process environment).
    pub fn fixed(keys: Vec<TenantKey>) -> Self {
        Self { current: RwLock::new((Arc::new(keys), Instant::now())), source: None, reloading: Default::default() }
    }

    /// `keys`, read again from `source` once older than `max_age`.
    pub fn reloading(keys: Vec<TenantKey>, source: Box<dyn TenantKeySource>, max_age: Duration) -> Self {
        Self {
            current: RwLock::new((Arc::new(keys), Instant::now())),
            source: Some((source, max_age)),
            reloading: Default::default(),
        }
    }

    fn snapshot(&self) -> (Arc<Vec<TenantKey>>, Instant) {
        let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
        (guard.0.clone(), guard.1)
    }

    /// The keys to check a request against, read again first if stale.
    pub async fn keys(&self) -> Arc<Vec<TenantKey>> {
        let (keys, at) = self.snapshot();
        let Some((source, max_age)) = &self.source else { return keys };
        if at.elapsed() < *max_age {
            return keys;
        }
        // Another request is re-reading: go on with what there is.
        let Ok(_one) = self.reloading.try_lock() else { return keys };
        let (keys, at) = self.snapshot();
        if at.elapsed() < *max_age {
            return keys;
        }
        let fresh = match tokio::time::timeout(RELOAD_TIMEOUT, source.load()).await {
            Ok(Ok(fresh)) => Arc::new(fresh),
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read the tenant keys again; the ones read before stay in use");
                keys
            }
            Err(_) => {
                tracing::warn!("reading the tenant keys again timed out; the ones read before stay in use");
                keys
            }
        };
        let mut guard = self.current.write().unwrap_or_else(|p| p.into_inner());
        *guard = (fresh.clone(), Instant::now());
        fresh
    }

    /// The tenant whose key is in `Authorization: Bearer KEY`.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<TenantId, ApiError> {
        super::authenticate_among(&self.keys().await, headers)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::http::header;

    use super::*;

    fn key(tenant: &str, key: &str) -> TenantKey {
        TenantKey { tenant: TenantId::parse(tenant).unwrap(), key: key.to_string().into() }
    }

    fn bearer(k: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, format!("Bearer {k}").parse().unwrap());
        h
    }

    /// Hands out whatever the test put in; `None` fails the read.
    struct Scripted {
        next: Mutex<Option<Vec<TenantKey>>>,
        reads: AtomicUsize,
    }

    #[async_trait]
    impl TenantKeySource for Arc<Scripted> {
        async fn load(&self) -> anyhow::Result<Vec<TenantKey>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.next.lock().unwrap().clone().ok_or_else(|| anyhow::anyhow!("secret unreadable"))
        }
    }

    #[tokio::test]
    async fn a_rotated_key_takes_effect_once_the_keys_are_stale_and_a_failed_read_keeps_the_old_ones() {
        let old = "old-key-0123456789abcdef";
        let new = "new-key-0123456789abcdef";
        let source = Arc::new(Scripted { next: Mutex::new(None), reads: AtomicUsize::new(0) });
        let ring =
            TenantKeyring::reloading(vec![key("alpha", old)], Box::new(source.clone()), Duration::from_millis(200));
        assert_eq!(ring.authenticate(&bearer(old)).await.unwrap().as_str(), "alpha");
        assert_eq!(source.reads.load(Ordering::SeqCst), 0, "fresh keys are not read again");

        // Rotated in the secret: the old key still works until the keys are stale.
        *source.next.lock().unwrap() = Some(vec![key("alpha", new)]);
        assert!(ring.authenticate(&bearer(new)).await.is_err());
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(ring.authenticate(&bearer(new)).await.unwrap().as_str(), "alpha");
        assert!(ring.authenticate(&bearer(old)).await.is_err(), "the revoked key is refused");
        assert_eq!(source.reads.load(Ordering::SeqCst), 1);

        // The secret cannot be read: the keys read before stay, and the
        // next read waits for another max age.
        *source.next.lock().unwrap() = None;
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(ring.authenticate(&bearer(new)).await.unwrap().as_str(), "alpha");
        assert_eq!(ring.authenticate(&bearer(new)).await.unwrap().as_str(), "alpha");
        assert_eq!(source.reads.load(Ordering::SeqCst), 2, "one failed read, then no retry before the max age");
    }

    #[tokio::test]
    async fn fixed_keys_are_never_read_again() {
        let ring = TenantKeyring::fixed(vec![key("alpha", "alpha-key-0123456789abcdef")]);
        assert!(ring.authenticate(&bearer("alpha-key-0123456789abcdef")).await.is_ok());
        assert!(matches!(ring.authenticate(&HeaderMap::new()).await, Err(ApiError::Unauthorized)));
    }
}
