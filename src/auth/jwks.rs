//! Keys from an identity provider's JSON Web Key Set (`--jwks-url`, RFC 7517).
//!
//! The set is fetched at start, again every hour, and when a token names a key id the set does
//! not hold (at most once per [`UNKNOWN_KID_INTERVAL`], so that tokens with made-up ids cannot
//! make the hub hammer the provider). A failed fetch keeps the last good set and is logged. Only
//! the configured URL is ever fetched: redirects are not followed, and nothing a token says (its
//! `jku`, `x5u` or `jwk` headers) names a key.
//!
//! Only asymmetric keys are taken (RSA, EC, Ed25519): an HMAC secret in a public document would
//! let anyone sign, and a public key must never be usable as one. A key's own `alg`, when it
//! has one, must be the token's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Limited};
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use parking_lot::{Mutex, RwLock};

use crate::client::{Connection, Target};

/// How often the set is fetched again.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(3600);
/// The least time between two fetches asked for by an unknown key id.
pub const UNKNOWN_KID_INTERVAL: Duration = Duration::from_secs(300);
/// The largest key set accepted.
const MAX_BODY: usize = 1 << 20;
/// How long one fetch may take, connection included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed scheduled fetch, the first retry comes this soon, then twice as late each
/// time, up to [`REFRESH_INTERVAL`]: a provider down at start is used within a minute of its
/// return, not an hour.
const RETRY_FIRST: Duration = Duration::from_secs(30);

/// The algorithms a key from a set may verify, by key type: no HMAC (see the module's doc).
const RSA: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];
const ELLIPTIC_CURVE: &[Algorithm] = &[Algorithm::ES256, Algorithm::ES384];
const OCTET_KEY_PAIR: &[Algorithm] = &[Algorithm::EdDSA];

/// Whether a key from a set may verify `alg` at all.
fn is_set_algorithm(alg: Algorithm) -> bool {
    [RSA, ELLIPTIC_CURVE, OCTET_KEY_PAIR]
        .iter()
        .any(|family| family.contains(&alg))
}

/// One usable key of the set.
struct SetKey {
    kid: Option<String>,
    /// The key's own `alg`, when it names one.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

/// A key set kept fresh from one URL.
pub struct Jwks {
    url: String,
    target: Target,
    keys: RwLock<Arc<Vec<SetKey>>>,
    /// Counts the sets taken: a token verified with an older set is verified again (its key
    /// may have been withdrawn).
    generation: AtomicU64,
    /// Fetches started, for the log and the tests' view through `/metrics`.
    fetches: AtomicU64,
    /// When a fetch was last started for an unknown key id.
    last_unknown_fetch: Mutex<Option<Instant>>,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
}

/// Names the URL only.
impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Jwks({})", self.url)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("--jwks-url {0:?} is not an http:// or https:// URL")]
    BadUrl(String),
    #[error("fetching the key set from {url} failed: {cause}")]
    Fetch { url: String, cause: String },
}

impl Jwks {
    /// A key set for `url`, empty until [`Jwks::refresh`] first succeeds.
    pub fn new(url: &str) -> Result<Arc<Jwks>, JwksError> {
        let target = Target::parse(url).map_err(|_| JwksError::BadUrl(url.to_owned()))?;
        Ok(Arc::new(Jwks {
            url: url.to_owned(),
            target,
            keys: RwLock::new(Arc::new(Vec::new())),
            generation: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
            last_unknown_fetch: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
        }))
    }

    /// Fetches the set at start, then every [`REFRESH_INTERVAL`] for as long as the returned
    /// task runs. A failing first fetch does not stop the hub: tokens are refused until a fetch
    /// succeeds.
    pub fn spawn_refresh(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let jwks = self.clone();
        tokio::spawn(async move {
            let mut retry = RETRY_FIRST;
            loop {
                let wait = match jwks.refresh().await {
                    Ok(n) => {
                        tracing::info!(url = %jwks.url, keys = n, "JWKS fetched");
                        retry = RETRY_FIRST;
                        REFRESH_INTERVAL
                    }
                    Err(e) => {
                        tracing::warn!("{e}; keeping the last good key set, next try in {retry:?}");
                        let wait = retry;
                        retry = (retry * 2).min(REFRESH_INTERVAL);
                        wait
                    }
                };
                tokio::time::sleep(wait).await;
            }
        })
    }

    /// Fetches the set now and, when it parses, replaces the keys. Returns how many usable
    /// keys it holds.
    pub async fn refresh(&self) -> Result<usize, JwksError> {
        let _one = self.fetching.lock().await;
        self.fetch_locked().await
    }

    /// [`Jwks::refresh`], with the fetching lock held.
    async fn fetch_locked(&self) -> Result<usize, JwksError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let fail = |cause: String| JwksError::Fetch {
            url: self.url.clone(),
            cause,
        };
        let set = tokio::time::timeout(FETCH_TIMEOUT, self.fetch())
            .await
            .map_err(|_| fail(format!("no answer within {FETCH_TIMEOUT:?}")))?
            .map_err(fail)?;
        let keys: Vec<SetKey> = set.keys.iter().filter_map(usable).collect();
        if keys.is_empty() {
            return Err(fail("the set holds no usable public key".into()));
        }
        let n = keys.len();
        *self.keys.write() = Arc::new(keys);
        self.generation.fetch_add(1, Ordering::Release);
        Ok(n)
    }

    async fn fetch(&self) -> Result<JwkSet, String> {
        let mut conn = Connection::open(&self.target)
            .await
            .map_err(|e| e.to_string())?;
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/jwk-set+json, application/json"),
        );
        let resp = conn
            .send(
                Method::GET,
                &self.target.path_and_query,
                &headers,
                bytes::Bytes::new(),
            )
            .await
            .map_err(|e| e.to_string())?;
        if resp.status() != StatusCode::OK {
            return Err(format!("answered {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("not a JWK Set: {e}"))
    }

    /// Which set is in use: it changes with every successful fetch.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// How many fetches were started since the hub started.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// The URL the set is fetched from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The keys that may verify a token with key id `kid` signed with `alg`: the one with that
    /// id, or every key when the token names none.
    pub fn keys_for(&self, kid: Option<&str>, alg: Algorithm) -> Vec<DecodingKey> {
        if !is_set_algorithm(alg) {
            return Vec::new();
        }
        let keys = self.keys.read().clone();
        keys.iter()
            .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
            .filter(|k| k.alg.is_none_or(|a| a == alg))
            .map(|k| k.key.clone())
            .collect()
    }

    /// True when the set holds no key (none fetched yet, or none usable).
    pub fn is_empty(&self) -> bool {
        self.keys.read().is_empty()
    }

    /// True when the set holds a key with this id.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys
            .read()
            .iter()
            .any(|k| k.kid.as_deref() == Some(kid))
    }

    /// For a token naming a key id the set lacks (or naming none while the set is empty):
    /// fetches the set again, unless that was done for an unknown id less than
    /// [`UNKNOWN_KID_INTERVAL`] ago, or a fetch that ended while this one waited its turn
    /// brought the id. True when the id is known afterwards (for no id: when the set has keys).
    pub async fn refresh_for_unknown(&self, kid: Option<&str>) -> bool {
        let known = || match kid {
            Some(kid) => self.has_kid(kid),
            None => !self.keys.read().is_empty(),
        };
        {
            let mut last = self.last_unknown_fetch.lock();
            if last.is_some_and(|t| t.elapsed() < UNKNOWN_KID_INTERVAL) {
                return known();
            }
            *last = Some(Instant::now());
        }
        let seen = self.generation();
        let _one = self.fetching.lock().await;
        if self.generation() != seen && known() {
            return true;
        }
        match self.fetch_locked().await {
            Ok(n) => {
                tracing::info!(url = %self.url, keys = n, kid, "JWKS fetched for an unknown key id")
            }
            Err(e) => tracing::warn!("{e}; keeping the last good key set"),
        }
        known()
    }
}

/// The key of `jwk` if the hub may use it: a public key of a family it verifies, meant for
/// signatures, with an `alg` (if any) of its type's family ([`RSA`], [`ELLIPTIC_CURVE`], [`OCTET_KEY_PAIR`]).
fn usable(jwk: &Jwk) -> Option<SetKey> {
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != jsonwebtoken::jwk::PublicKeyUse::Signature)
    {
        return None;
    }
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(a) => Some(algorithm(a)?),
    };
    let fits = |family: &[Algorithm]| alg.is_none_or(|a| family.contains(&a));
    let ok = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => fits(RSA),
        AlgorithmParameters::EllipticCurve(_) => fits(ELLIPTIC_CURVE),
        AlgorithmParameters::OctetKeyPair(_) => fits(OCTET_KEY_PAIR),
        // A shared secret published in a key set is no key at all; other types are unknown.
        _ => false,
    };
    if !ok {
        return None;
    }
    Some(SetKey {
        kid: jwk.common.key_id.clone(),
        alg,
        key: DecodingKey::from_jwk(jwk).ok()?,
    })
}

/// The signing algorithm a JWK's `alg` names, if the hub verifies it.
fn algorithm(a: KeyAlgorithm) -> Option<Algorithm> {
    let alg = match a {
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    };
    Some(alg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(json: &str) -> Vec<SetKey> {
        let set: JwkSet = serde_json::from_str(json).unwrap();
        set.keys.iter().filter_map(usable).collect()
    }

    /// Serves `answers` in turn (status, body), one per connection, on 127.0.0.1.
    async fn provider(answers: Vec<(u16, &'static str)>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        tokio::spawn(async move {
            for (status, body) in answers {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                let mut buf = [0u8; 512];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = conn.read(&mut buf).await.unwrap();
                    assert!(n > 0);
                    head.extend_from_slice(&buf[..n]);
                }
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                conn.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        url
    }

    const ONE_KEY: &str = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"ed"}]}"#;

    #[tokio::test]
    async fn a_failed_fetch_keeps_the_last_good_set() {
        let url = provider(vec![
            (200, ONE_KEY),
            (500, ""),
            (200, "not json"),
            (200, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#),
        ])
        .await;
        let jwks = Jwks::new(&url).unwrap();
        assert_eq!(jwks.generation(), 0);
        assert_eq!(jwks.refresh().await.unwrap(), 1);
        assert_eq!(jwks.generation(), 1);
        for why in ["answered 500", "not a JWK Set", "no usable public key"] {
            let e = jwks.refresh().await.unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
            assert!(jwks.has_kid("ed"), "the last good set is kept");
            assert_eq!(jwks.generation(), 1);
        }
        assert_eq!(jwks.fetches(), 4);
        assert_eq!(jwks.keys_for(Some("ed"), Algorithm::EdDSA).len(), 1);
        assert!(jwks.keys_for(Some("ed"), Algorithm::HS256).is_empty());
        assert!(jwks.keys_for(Some("other"), Algorithm::EdDSA).is_empty());
        assert_eq!(jwks.keys_for(None, Algorithm::EdDSA).len(), 1);
    }

    #[tokio::test]
    async fn unknown_key_ids_fetch_at_most_once_per_interval() {
        let url = provider(vec![(200, ONE_KEY)]).await;
        let jwks = Jwks::new(&url).unwrap();
        assert!(jwks.refresh_for_unknown(Some("ed")).await);
        // Within the interval: answered from the set in hand, the provider is not asked (it
        // would not answer: it serves one connection).
        assert!(!jwks.refresh_for_unknown(Some("other")).await);
        assert!(jwks.refresh_for_unknown(Some("ed")).await);
        assert!(jwks.refresh_for_unknown(None).await, "the set has keys");
        assert_eq!(jwks.fetches(), 1);
    }

    #[test]
    fn urls_other_than_http_are_refused() {
        assert!(Jwks::new("ftp://127.0.0.1/jwks").is_err());
    }

    #[test]
    fn secrets_and_mismatched_algorithms_are_not_keys() {
        let keys = set(r#"{"keys":[
              {"kty":"oct","k":"c2VjcmV0","kid":"hmac"},
              {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"ed"},
              {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"ed-as-rs","alg":"RS256"},
              {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"enc","use":"enc"}
            ]}"#);
        let kids: Vec<_> = keys.iter().map(|k| k.kid.clone().unwrap()).collect();
        assert_eq!(kids, ["ed"]);
    }
}
