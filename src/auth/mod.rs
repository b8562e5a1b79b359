//! Tokens to rights, and where a request carries its token.
//!
//! Two token dialects are served side by side, told apart by the JOSE header alone. A token
//! typed `at+jwt` is a Mercure 1.0 access token (RFC 9068): `iss`, `aud` and `exp` are
//! required and its grants are RFC 9396 `authorization_details`. Any other JWS is a 0.x token
//! whose `mercure` claim lists the topic selectors a client may publish to and receive private
//! updates from. A token never switches dialect after failing: a 1.0 token refused for its
//! audience is not tried again as a 0.x one, which would check nothing of the kind.
//! Verification is jsonwebtoken's; this module decides which key and algorithm apply, reads
//! the grants, and turns every failure into a one-line reason (for the body and the log; the
//! challenge says only `invalid_token`).

pub mod jwks;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::Mutex;
use serde_json::Value;
use subtle::ConstantTimeEq;

use crate::hub::Matcher;
use jwks::Jwks;

/// Clock leeway for `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 5;

/// The cookie a browser carried its token in under Mercure 0.x: read only when the request
/// has no cookie of the configured name (`--cookie-name`).
pub const COOKIE_NAME: &str = "mercureAuthorization";

/// The Mercure 1.0 cookie's default name (`--cookie-name`).
pub const DEFAULT_COOKIE_NAME: &str = "__Secure-mercure_access_token";

/// The `type` of the `authorization_details` entries that are Mercure grants.
pub const DETAIL_TYPE: &str = "https://mercure.rocks/authorization-detail";

/// Mercure entries one token may hold, topic matchers across them, and bytes per matcher:
/// a token is parsed on every subscribe, and each matcher is compiled.
pub const MAX_DETAILS: usize = 100;
pub const MAX_DETAIL_TOPICS: usize = 100;
pub const MAX_PATTERN_BYTES: usize = 4096;

/// Which protocol a token was issued for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Dialect {
    /// Any JWS with a `mercure` claim (or none).
    #[default]
    Legacy,
    /// An `at+jwt` access token with `authorization_details`.
    V1,
}

/// What a token must have been issued for, besides being signed by the hub's key.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// `--issuer`: `iss` must equal it. `None`: any `iss` (the self-issued setup).
    pub issuer: Option<&'a str>,
    /// The hub's resource identifier, that `aud` must contain.
    pub audience: &'a str,
    /// The audience was configured (`--resource-identifier`), not derived from the request:
    /// only then is it checked on a 0.x token that carries `aud`.
    pub audience_configured: bool,
}

impl Expected<'_> {
    /// No issuer, an audience no token names: for tools and tests of 0.x tokens.
    pub const LEGACY: Expected<'static> = Expected {
        issuer: None,
        audience: "",
        audience_configured: false,
    };
}

/// What a verified token allows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rights {
    /// `mercure.publish`: selectors the holder may publish to. `None` when absent.
    pub publish: Option<Vec<Matcher>>,
    /// `mercure.subscribe`: selectors of private updates the holder may receive.
    pub subscribe: Option<Vec<Matcher>>,
    /// `mercure.payload`, echoed in subscription events (0.x tokens).
    pub payload: Option<Value>,
    /// A 1.0 token's `subscribe` entries in order: their topics and their `payload`. A
    /// subscription's payload is that of the first entry one of whose topics matches the
    /// subscription's own matcher (see [`Rights::payload_for`]).
    pub subscribe_payloads: Vec<(Vec<Matcher>, Option<Value>)>,
    /// The token's `exp`.
    pub expires_at: Option<SystemTime>,
    /// The dialect of the token the rights come from.
    pub dialect: Dialect,
}

impl Rights {
    /// These rights, unless the token is past its `exp`. Verification lets a token a few
    /// seconds past it through (the leeway for clock skew); what opens a stream or answers with
    /// subscribers' data refuses it all the same.
    pub fn unexpired(self) -> Result<Self, AuthError> {
        if self.expires_at.is_some_and(|exp| exp <= SystemTime::now()) {
            return Err(AuthError::Invalid("the token has expired".into()));
        }
        Ok(self)
    }

    /// The payload of a subscription to `m`: a 0.x token's `mercure.payload`; for a 1.0
    /// token, that of the first `subscribe` entry one of whose topics matches `m`'s own text
    /// read as a topic (Mercure 1.0 §7.1), if any.
    pub fn payload_for(&self, m: &Matcher) -> Option<Arc<Value>> {
        self.payloads_for(std::slice::from_ref(m), &|t| {
            Arc::new(crate::hub::Selector::compile(t))
        })
        .pop()
        .flatten()
    }

    /// The payload of each of `matchers` (see [`Rights::payload_for`]), in their order, with
    /// the grants compiled by `compile` once each (the hub's cache, against the hub's URL): a
    /// token of many patterns and a request of many matchers must not compile them again for
    /// every pair. Equal payloads are shared, not copied per matcher.
    pub fn payloads_for(
        &self,
        matchers: &[Matcher],
        compile: &dyn Fn(&Matcher) -> Arc<crate::hub::Selector>,
    ) -> Vec<Option<Arc<Value>>> {
        if self.dialect == Dialect::Legacy {
            let p = self.payload.clone().map(Arc::new);
            return vec![p; matchers.len()];
        }
        if self.subscribe_payloads.iter().all(|(_, p)| p.is_none()) {
            return vec![None; matchers.len()];
        }
        type Grant = (Vec<Arc<crate::hub::Selector>>, Option<Arc<Value>>);
        let grants: Vec<Grant> = self
            .subscribe_payloads
            .iter()
            .map(|(topics, p)| {
                (
                    topics.iter().map(compile).collect(),
                    p.clone().map(Arc::new),
                )
            })
            .collect();
        // The first grant one of whose topics matches the matcher's text decides, even
        // when it has no payload (later grants are not consulted).
        matchers
            .iter()
            .map(|m| {
                grants
                    .iter()
                    .find(|(topics, _)| topics.iter().any(|t| t.matches(&m.pattern)))
                    .and_then(|(_, p)| p.clone())
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing token: send it as \"Authorization: Bearer <jwt>\" or in the hub's cookie")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("{0}")]
    Forbidden(String),
    /// The token was presented wrongly (two Authorization headers, another scheme…): 400
    /// `invalid_request`.
    #[error("{0}")]
    BadRequest(String),
    /// A well-formed token signed by a key this one is not (refused as `Invalid` is; another
    /// of the hub's keys may take it: see [`AuthError::is_wrong_key`]).
    #[error("invalid token: {}", .0.reason())]
    WrongKey(Unverified),
}

/// Why jsonwebtoken (or the key set) did not verify a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unverified {
    Expired,
    NotYet,
    /// Signed with another key than the hub's.
    WrongKey,
    /// Signed with neither the hub's key nor one of the issuer's key set.
    NotInSet,
    WrongAlgorithm,
    Malformed,
    /// The hub has no key to verify with (an issuer's key set only, still empty).
    NoKey,
    Other,
}

impl Unverified {
    fn of(e: &jsonwebtoken::errors::Error) -> Unverified {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::ExpiredSignature => Unverified::Expired,
            K::ImmatureSignature => Unverified::NotYet,
            K::InvalidSignature => Unverified::WrongKey,
            K::InvalidAlgorithm => Unverified::WrongAlgorithm,
            K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => Unverified::Malformed,
            _ => Unverified::Other,
        }
    }

    /// The one-line reason given to the client and the log.
    pub fn reason(self) -> &'static str {
        match self {
            Unverified::Expired => "the token has expired",
            Unverified::NotYet => "the token is not valid yet (nbf)",
            Unverified::WrongKey => "the signature does not match the hub's key",
            Unverified::NotInSet => {
                "the signature matches neither the hub's key nor a key of the issuer's key set \
                 (--jwks-url)"
            }
            Unverified::WrongAlgorithm => "the token's algorithm is not the one the hub accepts",
            Unverified::Malformed => "it is not a well-formed JWS",
            Unverified::NoKey => "the hub has no key to verify tokens",
            Unverified::Other => "it could not be verified",
        }
    }

    /// A failure another key might not have: the issuer's key set is tried after it.
    fn another_key_may_verify(self) -> bool {
        matches!(
            self,
            Unverified::WrongKey | Unverified::WrongAlgorithm | Unverified::NoKey
        )
    }

    fn into_error(self) -> AuthError {
        match self {
            Unverified::WrongKey | Unverified::NotInSet => AuthError::WrongKey(self),
            _ => AuthError::Invalid(self.reason().to_owned()),
        }
    }
}

/// What jsonwebtoken checks of a token signed with `alg`, for the hub's key and the issuer's
/// set alike: the signature, `exp` and `nbf` within the leeway; `iss` and `aud` are the
/// hub's own checks (they depend on the token's dialect).
fn validation_for(alg: Algorithm) -> Validation {
    let mut validation = Validation::new(alg);
    validation.leeway = LEEWAY_SECS;
    validation.required_spec_claims = HashSet::new();
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.validate_aud = false;
    validation
}

/// Verifies `token` with the keys of `jwks` its header allows (its `kid`'s, with its `alg`;
/// every key when it names none). `Err(None)`: no key of the set applies; `Err(Some(e))`: the
/// last applicable key's reason.
fn verify_with_set(
    jwks: &Jwks,
    token: &str,
    header: &Header,
) -> Result<jsonwebtoken::TokenData<Value>, Option<jsonwebtoken::errors::Error>> {
    let validation = validation_for(header.alg);
    let mut last = None;
    for key in jwks.keys_for(header.kid.as_deref(), header.alg) {
        match jsonwebtoken::decode::<Value>(token, &key, &validation) {
            Ok(data) => return Ok(data),
            Err(e) => last = Some(e),
        }
    }
    Err(last)
}

impl AuthError {
    /// The token was signed with another key (so another of the hub's keys may take it).
    pub fn is_wrong_key(&self) -> bool {
        matches!(self, AuthError::WrongKey(_))
    }
}

/// A key that verifies tokens (and, for secrets and private keys, signs them).
#[derive(Clone)]
pub struct Key {
    algorithm: Algorithm,
    decoding: Option<DecodingKey>,
    encoding: Option<EncodingKey>,
    validation: Validation,
    verified: Arc<Verified>,
    /// `--jwks-url`: the identity provider's keys, which verify Mercure 1.0 tokens the
    /// configured key does not.
    jwks: Option<Arc<Jwks>>,
}

/// Names the algorithm only: key material stays out of logs.
impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({:?})", self.algorithm)
    }
}

/// Publisher tokens this key has already verified, with their rights.
///
/// A publisher usually sends the same token with every request; decoding it again each time
/// (base64, two JSON documents, the signature) was an eighth of the hub's CPU per publish.
/// Only the publish path uses it (subscribers verify once per connection, and their many
/// distinct tokens would push the publishers' out). An entry is used only while the token has
/// not expired (without the leeway: the full check decides in that last stretch); tokens with
/// `nbf` are never kept; the whole token is compared in constant time; tokens that fail are
/// never kept. Bounded: it is emptied when full.
struct Verified {
    hasher: RandomState,
    entries: Mutex<HashMap<u64, Arc<Entry>>>,
}

struct Entry {
    token: Box<[u8]>,
    audience: Box<str>,
    rights: Arc<Rights>,
    /// The key set's generation when the token was verified (0 without a key set): once the
    /// set changes, the token is verified again, as its key may have been withdrawn.
    generation: u64,
}

/// Tokens kept at most, and the longest kept (a token's size is the client's choice).
const VERIFIED_ENTRIES: usize = 256;
const VERIFIED_TOKEN_MAX: usize = 4096;

impl Verified {
    fn new() -> Self {
        Verified {
            hasher: RandomState::new(),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The rights `token` was verified to hold for `audience` (the resource identifier the
    /// request was checked against: a token accepted for one host is not for another).
    fn get(
        &self,
        token: &str,
        audience: &str,
        generation: u64,
        now: SystemTime,
    ) -> Option<Arc<Rights>> {
        if token.len() > VERIFIED_TOKEN_MAX {
            return None;
        }
        let key = self.hasher.hash_one((token, audience));
        let entry = self.entries.lock().get(&key).cloned()?;
        let same: bool = entry.token.as_ref().ct_eq(token.as_bytes()).into();
        (same
            && *entry.audience == *audience
            && entry.generation == generation
            && still_valid(entry.rights.expires_at, now))
        .then(|| entry.rights.clone())
    }

    fn put(&self, token: &str, audience: &str, generation: u64, rights: &Arc<Rights>) {
        self.put_at(
            self.hasher.hash_one((token, audience)),
            token,
            audience,
            generation,
            rights,
        );
    }

    fn put_at(&self, key: u64, token: &str, audience: &str, generation: u64, rights: &Arc<Rights>) {
        if token.len() > VERIFIED_TOKEN_MAX || audience.len() > VERIFIED_TOKEN_MAX {
            return;
        }
        let entry = Arc::new(Entry {
            token: token.as_bytes().into(),
            audience: audience.into(),
            rights: rights.clone(),
            generation,
        });
        let mut entries = self.entries.lock();
        let full = entries.len() >= VERIFIED_ENTRIES && !entries.contains_key(&key);
        // Emptied when full; the old entries are freed after the lock is released.
        let old = if full {
            std::mem::take(&mut *entries)
        } else {
            HashMap::new()
        };
        entries.insert(key, entry);
        drop(entries);
        drop(old);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().len()
    }
}

/// May a verified token's rights still be used from memory at `now`? Strictly before `exp`.
fn still_valid(expires_at: Option<SystemTime>, now: SystemTime) -> bool {
    expires_at.is_none_or(|exp| now < exp)
}

/// Parses `--jwt-algorithm`. `none` is not an algorithm jsonwebtoken knows, so it is refused.
/// True when the token's JOSE header has a `crit` member. The hub implements no JWS
/// extension, so any `crit` names one it does not understand and the token must be refused
/// (jsonwebtoken ignores the member). A header that cannot be read is left to jsonwebtoken,
/// which refuses it with its own reason.
fn has_crit_header(token: &str) -> bool {
    use base64::Engine as _;
    let Some(header) = token.split('.').next() else {
        return false;
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|h| h.get("crit").is_some())
}

pub fn parse_algorithm(s: &str) -> Result<Algorithm, String> {
    let alg = match s.to_ascii_uppercase().as_str() {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EDDSA" => Algorithm::EdDSA,
        "NONE" => return Err("unsigned tokens (alg \"none\") are never accepted".into()),
        _ => {
            return Err(format!(
                "unknown JWT algorithm {s:?}: use one of HS256, HS384, HS512, RS256, RS384, RS512, ES256, ES384, EdDSA"
            ))
        }
    };
    Ok(alg)
}

pub fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// True for the JOSE `typ` of an RFC 9068 access token: `at+jwt`, with or without the
/// `application/` prefix, in any case.
fn is_access_token_type(typ: &str) -> bool {
    let t = typ.trim();
    let t = match t.get(..12) {
        Some(p) if p.eq_ignore_ascii_case("application/") => &t[12..],
        _ => t,
    };
    t.eq_ignore_ascii_case("at+jwt")
}

fn check_issuer(iss: &str, expected: &Expected<'_>) -> Result<(), AuthError> {
    match expected.issuer {
        Some(want) if want != iss => Err(AuthError::Invalid(
            "the token was issued by another issuer (\"iss\")".into(),
        )),
        _ => Ok(()),
    }
}

/// `aud`, a string or an array of strings, must name the hub's resource identifier.
fn check_audience(aud: &Value, expected: &Expected<'_>) -> Result<(), AuthError> {
    let names = |a: &str| !expected.audience.is_empty() && a == expected.audience;
    let ok = match aud {
        Value::String(a) => names(a),
        Value::Array(list) => list.iter().any(|a| a.as_str().is_some_and(names)),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(AuthError::Invalid(
            "the token is not for this hub (\"aud\")".into(),
        ))
    }
}

impl Key {
    /// An HMAC secret.
    pub fn secret(algorithm: Algorithm, secret: &[u8]) -> Key {
        debug_assert!(is_hmac(algorithm));
        Key::build(
            algorithm,
            Some(DecodingKey::from_secret(secret)),
            Some(EncodingKey::from_secret(secret)),
        )
    }

    /// `--…-jwt-key` as the user gave it: the secret itself for HMAC algorithms, the path of a
    /// PEM file holding the public key for the others. The key verifies tokens.
    pub fn load(algorithm: Algorithm, key: &str) -> Result<Key, String> {
        let k = Key::load_any(algorithm, key)?;
        if k.decoding.is_none() {
            return Err(format!(
                "{key:?} holds no public key for {algorithm:?}: give the PEM file of the public key"
            ));
        }
        Ok(k)
    }

    /// Like [`Key::load`], for signing: a secret, or a PEM file holding the private key.
    pub fn load_signing(algorithm: Algorithm, key: &str) -> Result<Key, String> {
        let k = Key::load_any(algorithm, key)?;
        if k.encoding.is_none() {
            return Err(format!(
                "{key:?} holds no private key for {algorithm:?}: give the PEM file of the private key"
            ));
        }
        Ok(k)
    }

    fn load_any(algorithm: Algorithm, key: &str) -> Result<Key, String> {
        if is_hmac(algorithm) {
            if key.is_empty() {
                return Err("the JWT secret is empty".into());
            }
            // A key file given without --jwt-algorithm would otherwise become the secret
            // itself: its path, or its public text, which anyone could sign with.
            if key.trim_start().starts_with("-----BEGIN") {
                return Err(format!(
                    "this is a PEM key, not an {algorithm:?} secret: for RSA, EC or Ed25519 keys \
                     give --jwt-algorithm (RS256, ES256, EdDSA, …) and the key's file"
                ));
            }
            if Path::new(key).is_file() {
                return Err(format!(
                    "{key:?} names a file, but {algorithm:?} takes the secret itself: for a key \
                     file give --jwt-algorithm (RS256, ES256, EdDSA, …)"
                ));
            }
            return Ok(Key::secret(algorithm, key.as_bytes()));
        }
        // The value is not repeated in errors: it may be a secret given with the wrong
        // algorithm.
        let pem = std::fs::read(Path::new(key))
            .map_err(|e| format!("cannot read the key file for {algorithm:?}: {e}"))?;
        let (decoding, encoding) = match algorithm {
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => (
                DecodingKey::from_rsa_pem(&pem).ok(),
                EncodingKey::from_rsa_pem(&pem).ok(),
            ),
            Algorithm::ES256 | Algorithm::ES384 => (
                DecodingKey::from_ec_pem(&pem).ok(),
                EncodingKey::from_ec_pem(&pem).ok(),
            ),
            _ => (
                DecodingKey::from_ed_pem(&pem).ok(),
                EncodingKey::from_ed_pem(&pem).ok(),
            ),
        };
        if decoding.is_none() && encoding.is_none() {
            return Err(format!(
                "the key file holds no PEM key usable with {algorithm:?}"
            ));
        }
        Ok(Key::build(algorithm, decoding, encoding))
    }

    fn build(
        algorithm: Algorithm,
        decoding: Option<DecodingKey>,
        encoding: Option<EncodingKey>,
    ) -> Key {
        let validation = validation_for(algorithm);
        Key {
            algorithm,
            decoding,
            encoding,
            validation,
            verified: Arc::new(Verified::new()),
            jwks: None,
        }
    }

    /// This key, with the identity provider's key set (`--jwks-url`) verifying the Mercure
    /// 1.0 tokens it does not.
    pub fn with_jwks(mut self, jwks: Arc<Jwks>) -> Key {
        self.jwks = Some(jwks);
        self
    }

    /// The key set's generation, or 0 without one.
    fn jwks_generation(&self) -> u64 {
        self.jwks.as_ref().map_or(0, |j| j.generation())
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Signs `claims` with the JOSE header type `typ` (`at+jwt` for a Mercure 1.0 token).
    pub fn sign(&self, typ: &str, claims: &Value) -> Result<String, String> {
        let enc = self.encoding.as_ref().ok_or_else(|| {
            "this key cannot sign tokens (give the private key, or the secret for HS*)".to_owned()
        })?;
        let mut header = Header::new(self.algorithm);
        header.typ = Some(typ.to_owned());
        jsonwebtoken::encode(&header, claims, enc)
            .map_err(|e| format!("cannot sign the token: {e}"))
    }

    /// Verifies `token` and reads its rights: a 1.0 token (`typ: at+jwt`) against `expected`,
    /// a 0.x one as 0.x tokens always were (plus `iss` and `aud` when it has them and the hub
    /// was configured with them).
    pub fn verify(&self, token: &str, expected: &Expected<'_>) -> Result<Rights, AuthError> {
        self.verify_fully(token, expected).map(|(rights, _)| rights)
    }

    /// Like [`Key::verify`], for the publish path: remembers the tokens it verified (see
    /// `Verified`), so that a publisher's token is checked once, not with every publish.
    pub fn verify_publisher(
        &self,
        token: &str,
        expected: &Expected<'_>,
    ) -> Result<Arc<Rights>, AuthError> {
        // Read before verifying: a set taken meanwhile makes the entry stale, never the
        // other way round.
        let generation = self.jwks_generation();
        if let Some(rights) =
            self.verified
                .get(token, expected.audience, generation, SystemTime::now())
        {
            return Ok(rights);
        }
        let (rights, claims) = self.verify_fully(token, expected)?;
        let rights = Arc::new(rights);
        if claims.get("nbf").is_none() {
            self.verified
                .put(token, expected.audience, generation, &rights);
        }
        Ok(rights)
    }

    fn verify_fully(
        &self,
        token: &str,
        expected: &Expected<'_>,
    ) -> Result<(Rights, Value), AuthError> {
        if has_crit_header(token) {
            return Err(AuthError::Invalid(
                "the token's header has \"crit\", naming extensions the hub does not \
                 understand (RFC 7515 §4.1.11 requires refusing it)"
                    .into(),
            ));
        }
        let invalid = |m: &str| AuthError::Invalid(m.to_owned());
        // The header alone decides the dialect; an unreadable one (or `alg: none`, which
        // jsonwebtoken does not know) is refused below with the decoding's own reason.
        let header = jsonwebtoken::decode_header(token).ok();
        let v1 = header
            .as_ref()
            .and_then(|h| h.typ.as_deref())
            .is_some_and(is_access_token_type);
        let mut result = match &self.decoding {
            Some(decoding) => jsonwebtoken::decode::<Value>(token, decoding, &self.validation)
                .map_err(|e| Unverified::of(&e)),
            None => Err(Unverified::NoKey),
        };
        // The identity provider's keys verify 1.0 tokens only, and only those the configured
        // key does not: signed by another key, or with another algorithm.
        if let (Some(jwks), Some(h), true) = (&self.jwks, &header, v1) {
            if matches!(result, Err(u) if u.another_key_may_verify()) {
                result = verify_with_set(jwks, token, h).map_err(|e| match e {
                    Some(e) => Unverified::of(&e),
                    None => Unverified::NotInSet,
                });
            }
        }
        let claims = result.map_err(Unverified::into_error)?.claims;
        if !claims.is_object() {
            return Err(invalid("its claims are not a JSON object"));
        }
        let rights = if v1 {
            if claims.get("exp").is_none() {
                return Err(invalid("a Mercure 1.0 token must have \"exp\""));
            }
            match claims.get("iss") {
                Some(Value::String(iss)) => check_issuer(iss, expected)?,
                _ => return Err(invalid("a Mercure 1.0 token must have \"iss\"")),
            }
            match claims.get("aud") {
                Some(aud) => check_audience(aud, expected)?,
                None => return Err(invalid("a Mercure 1.0 token must have \"aud\"")),
            }
            rights_from_details(&claims).map_err(AuthError::Invalid)?
        } else {
            // Mercure 1.0 grants are honoured only under 1.0 validation (iss, aud, exp).
            if claims.get("authorization_details").is_some() {
                return Err(invalid(
                    "\"authorization_details\" needs a Mercure 1.0 token (typ \"at+jwt\")",
                ));
            }
            if let Some(iss) = claims.get("iss") {
                if expected.issuer.is_some() {
                    check_issuer(iss.as_str().unwrap_or(""), expected)?;
                }
            }
            if let Some(aud) = claims.get("aud") {
                if expected.audience_configured {
                    check_audience(aud, expected)?;
                }
            }
            rights_from_claims(&claims).map_err(AuthError::Invalid)?
        };
        Ok((rights, claims))
    }

    /// Signs a token granting `publish` and `subscribe`, valid for `ttl` (forever when `None`).
    pub fn mint(
        &self,
        publish: Option<&[String]>,
        subscribe: Option<&[String]>,
        ttl: Option<Duration>,
    ) -> Result<String, String> {
        let enc = self.encoding.as_ref().ok_or_else(|| {
            "this key cannot sign tokens (give the private key, or the secret for HS*)".to_owned()
        })?;
        let mut mercure = serde_json::Map::new();
        if let Some(p) = publish {
            mercure.insert("publish".into(), p.into());
        }
        if let Some(s) = subscribe {
            mercure.insert("subscribe".into(), s.into());
        }
        let mut claims = serde_json::Map::new();
        claims.insert("mercure".into(), Value::Object(mercure));
        if let Some(ttl) = ttl {
            let exp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                + ttl;
            claims.insert("exp".into(), exp.as_secs().into());
        }
        jsonwebtoken::encode(&Header::new(self.algorithm), &Value::Object(claims), enc)
            .map_err(|e| format!("cannot sign the token: {e}"))
    }
}

/// Reads the `mercure` claim (or its namespaced form `https://mercure.rocks/`).
pub fn rights_from_claims(claims: &Value) -> Result<Rights, String> {
    let mut rights = Rights {
        expires_at: expires_at(claims)?,
        ..Rights::default()
    };
    let Some(m) = claims
        .get("mercure")
        .or_else(|| claims.get("https://mercure.rocks/"))
    else {
        return Ok(rights);
    };
    if !m.is_object() {
        return Err("the \"mercure\" claim is not an object".into());
    }
    let list = |name: &str| -> Result<Option<Vec<Matcher>>, String> {
        match m.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(Matcher::topic)
                        .ok_or_else(|| format!("\"mercure.{name}\" must be an array of strings"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(format!("\"mercure.{name}\" must be an array of strings")),
        }
    };
    rights.publish = list("publish")?;
    rights.subscribe = list("subscribe")?;
    rights.payload = m.get("payload").cloned();
    Ok(rights)
}

/// Reads a 1.0 token's grants from its `authorization_details`. Entries of other types
/// belong to other APIs and are skipped; one Mercure entry that does not parse refuses the
/// whole token (using the others would grant what the issuer did not write).
pub fn rights_from_details(claims: &Value) -> Result<Rights, String> {
    let mut rights = Rights {
        dialect: Dialect::V1,
        expires_at: expires_at(claims)?,
        ..Rights::default()
    };
    let entries = match claims.get("authorization_details") {
        None => return Ok(rights),
        Some(Value::Array(entries)) => entries,
        Some(_) => return Err("\"authorization_details\" must be an array".into()),
    };
    let (mut details, mut matchers) = (0, 0);
    let (mut publish, mut subscribe) = (None::<Vec<Matcher>>, None::<Vec<Matcher>>);
    for entry in entries {
        let Value::Object(entry) = entry else {
            return Err("an \"authorization_details\" entry is not an object".into());
        };
        if entry.get("type").and_then(Value::as_str) != Some(DETAIL_TYPE) {
            continue;
        }
        details += 1;
        if details > MAX_DETAILS {
            return Err(format!(
                "more than {MAX_DETAILS} Mercure authorization details"
            ));
        }
        let actions = match entry.get("actions") {
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|a| a.as_str().ok_or("an action is not a string"))
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err("\"actions\" must be a non-empty array of strings".into()),
        };
        let topics = match entry.get("topics") {
            Some(Value::Array(t)) if !t.is_empty() => t,
            _ => return Err("\"topics\" must be a non-empty array of matchers".into()),
        };
        matchers += topics.len();
        if matchers > MAX_DETAIL_TOPICS {
            return Err(format!(
                "more than {MAX_DETAIL_TOPICS} topic matchers in the authorization details"
            ));
        }
        let topics = topics
            .iter()
            .map(detail_matcher)
            .collect::<Result<Vec<_>, _>>()?;
        // Unknown actions grant nothing; they are not an error (the registry may grow).
        if actions.contains(&"publish") {
            publish
                .get_or_insert_default()
                .extend(topics.iter().cloned());
        }
        if actions.contains(&"subscribe") {
            subscribe
                .get_or_insert_default()
                .extend(topics.iter().cloned());
            rights
                .subscribe_payloads
                .push((topics, entry.get("payload").cloned()));
        }
    }
    rights.publish = publish;
    rights.subscribe = subscribe;
    Ok(rights)
}

/// One `{"match": …, "match_type": …}` of a detail's `topics`.
fn detail_matcher(topic: &Value) -> Result<Matcher, String> {
    let Value::Object(topic) = topic else {
        return Err("a topic matcher must be an object {\"match\": …}".into());
    };
    let pattern = match topic.get("match") {
        Some(Value::String(p)) if !p.is_empty() => p,
        _ => return Err("a topic matcher's \"match\" must be a non-empty string".into()),
    };
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(format!(
            "a topic matcher is longer than {MAX_PATTERN_BYTES} bytes"
        ));
    }
    // The characters a request's matcher may not hold (controls could split a log line or a
    // header; format characters make two patterns look alike).
    if crate::hub::update::has_control_or_format(pattern) {
        return Err("a topic matcher holds control or format characters".into());
    }
    let m = match topic.get("match_type") {
        None => Matcher::exact(pattern.as_str()),
        Some(Value::String(t)) if t == "exact" => Matcher::exact(pattern.as_str()),
        Some(Value::String(t)) if t == "urlpattern" => Matcher::url_pattern(pattern.as_str()),
        Some(_) => {
            return Err(
                "a topic matcher's \"match_type\" must be \"exact\" or \"urlpattern\"".into(),
            )
        }
    };
    if m.kind == crate::hub::MatchType::UrlPattern && !url_pattern_compiles(&m) {
        return Err("a topic matcher is not a valid URL pattern".into());
    }
    Ok(m)
}

/// Whether a token's URL pattern compiles, remembered for the next verification of the same
/// token (subscriber tokens are verified at every subscribe, and a token of a hundred patterns
/// would otherwise be compiled a hundred times each time). Bounded: forgotten when full.
fn url_pattern_compiles(m: &Matcher) -> bool {
    static CHECKED: std::sync::LazyLock<Mutex<HashMap<String, bool>>> =
        std::sync::LazyLock::new(Default::default);
    const MAX_CHECKED: usize = 4096;
    if let Some(&ok) = CHECKED.lock().get(&m.pattern) {
        return ok;
    }
    let ok = !matches!(
        crate::hub::Selector::compile(m),
        crate::hub::Selector::Never(_)
    );
    let mut checked = CHECKED.lock();
    if checked.len() >= MAX_CHECKED {
        checked.clear();
    }
    checked.insert(m.pattern.clone(), ok);
    ok
}

/// The claims' `exp`, if any.
fn expires_at(claims: &Value) -> Result<Option<SystemTime>, String> {
    let Some(exp) = claims.get("exp") else {
        return Ok(None);
    };
    let secs = exp
        .as_u64()
        .or_else(|| exp.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
        .ok_or("\"exp\" is not a number")?;
    Ok(Some(
        UNIX_EPOCH + Duration::from_secs(secs.min(u32::MAX as u64 * 4)),
    ))
}

/// Where a request's token came from. A cookie makes a publish subject to the CSRF check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Header,
    Query,
    Cookie,
}

/// The `authorization` query parameter among a request's `pairs`, refused when there are
/// several (for the same reason as several Authorization headers).
pub fn query_token(
    pairs: impl IntoIterator<Item = (String, String)>,
) -> Result<Option<String>, AuthError> {
    let mut found = None;
    for (name, value) in pairs {
        if name == "authorization" {
            keep_query_token(&mut found, value)?;
        }
    }
    Ok(found)
}

/// Keeps `value`, one `authorization` query parameter, in `found`: refused if it already
/// holds one.
pub fn keep_query_token(found: &mut Option<String>, value: String) -> Result<(), AuthError> {
    if found.replace(value).is_some() {
        return Err(AuthError::BadRequest(
            "the request has several authorization query parameters: send one".into(),
        ));
    }
    Ok(())
}

/// Finds the token: the `Authorization` header wins, then the `authorization` query parameter
/// (0.x requests only: the caller passes it as `query_token`), then the cookie named
/// `cookie_name`, and only without that cookie the 0.x `mercureAuthorization` one (an invalid
/// 1.0 cookie is not made up for by a legacy one).
pub fn find_token<'a>(
    headers: &'a http::HeaderMap,
    query_token: Option<&'a str>,
    cookie_name: &str,
) -> Result<Option<(&'a str, TokenSource)>, AuthError> {
    let bad = |m: &str| AuthError::BadRequest(m.to_owned());
    let mut authorization = headers.get_all(http::header::AUTHORIZATION).iter();
    if let Some(v) = authorization.next() {
        // Authorization is a single-value field (RFC 9110 §11.6.2). With two, a proxy and the
        // hub could each act on a different one: refuse rather than pick.
        if authorization.next().is_some() {
            return Err(bad(
                "the request has several Authorization headers: send one",
            ));
        }
        let v = v
            .to_str()
            .map_err(|_| bad("the Authorization header is not ASCII"))?;
        let token = v
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|t| !t.is_empty() && !t.contains([' ', '\t', ',']))
            .ok_or_else(|| bad("the Authorization header must be \"Bearer <jwt>\""))?;
        return Ok(Some((token, TokenSource::Header)));
    }
    if let Some(t) = query_token {
        // The query string is 0.x's way; a 1.0 token in a URL would end up in logs and
        // histories (Mercure 1.0 §5.3), so it is refused there rather than read.
        if is_access_token(t) {
            return Err(bad(
                "a Mercure 1.0 access token is never read from the URL: send it as \"Authorization: Bearer <jwt>\"",
            ));
        }
        return Ok(Some((t, TokenSource::Query)));
    }
    let mut legacy = None;
    for v in headers.get_all(http::header::COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for pair in v.split(';') {
            if let Some((name, value)) = pair.trim().split_once('=') {
                let value = value.trim().trim_matches('"');
                if name == cookie_name {
                    return Ok(Some((value, TokenSource::Cookie)));
                }
                if name == COOKIE_NAME && legacy.is_none() {
                    legacy = Some(value);
                }
            }
        }
    }
    Ok(legacy.map(|t| (t, TokenSource::Cookie)))
}

/// Whether `token` says it is a Mercure 1.0 access token (RFC 9068: JOSE header `typ`
/// `at+jwt` or `application/at+jwt`), read without verifying anything: only to choose which
/// dialect to answer in, never to grant.
pub fn is_access_token(token: &str) -> bool {
    use base64::Engine as _;
    let Some(header) = token.split('.').next() else {
        return false;
    };
    let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header) else {
        return false;
    };
    serde_json::from_slice::<Value>(&json)
        .ok()
        .and_then(|h| h.get("typ")?.as_str().map(is_access_token_type))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_and_verify_round_trip() {
        let k = Key::secret(Algorithm::HS256, b"secret");
        let t = k
            .mint(Some(&["a".into()]), None, Some(Duration::from_secs(60)))
            .unwrap();
        let r = k.verify(&t, &Expected::LEGACY).unwrap();
        assert_eq!(r.publish, Some(vec![Matcher::topic("a")]));
        assert_eq!(r.subscribe, None);
        assert!(r.expires_at.is_some());
        let other = Key::secret(Algorithm::HS256, b"other");
        assert!(matches!(
            other.verify(&t, &Expected::LEGACY),
            Err(AuthError::WrongKey(Unverified::WrongKey))
        ));
    }

    fn marker(publish: &str, expires_at: Option<SystemTime>) -> Arc<Rights> {
        Arc::new(Rights {
            publish: Some(vec![Matcher::topic(publish)]),
            expires_at,
            ..Rights::default()
        })
    }

    #[test]
    fn debug_shows_no_key_material() {
        let k = Key::secret(Algorithm::HS256, b"do-not-print-me");
        assert_eq!(format!("{k:?}"), "Key(HS256)");
    }

    #[test]
    fn a_verified_publisher_token_is_remembered() {
        let k = Key::secret(Algorithm::HS256, b"secret");
        let t = k
            .mint(Some(&["a".into()]), None, Some(Duration::from_secs(60)))
            .unwrap();
        k.verify(&t, &Expected::LEGACY).unwrap();
        assert_eq!(k.verified.len(), 0, "verify() keeps nothing");
        assert_eq!(
            k.verify_publisher(&t, &Expected::LEGACY).unwrap().publish,
            Some(vec![Matcher::topic("a")])
        );
        assert_eq!(k.verified.len(), 1, "kept after the full check");
        // A hit is served from memory: swap in a marker and it comes back.
        k.verified.put(&t, "", 0, &marker("from memory", None));
        assert_eq!(
            k.verify_publisher(&t, &Expected::LEGACY).unwrap().publish,
            Some(vec![Matcher::topic("from memory")])
        );
        // Clones of a key share what it verified; another key knows nothing of it.
        assert_eq!(k.clone().verified.len(), 1);
        let other = Key::secret(Algorithm::HS256, b"other");
        assert!(other.verify_publisher(&t, &Expected::LEGACY).is_err());
    }

    #[test]
    fn a_remembered_entry_never_stands_for_another_token_or_past_exp() {
        let k = Key::secret(Algorithm::HS256, b"secret");
        let t = k.mint(Some(&["a".into()]), None, None).unwrap();
        // Same length, one character of the signature changed, filed under the forged token's
        // own hash slot as if the two collided: the constant-time compare refuses it.
        let mut forged = t.clone().into_bytes();
        let last = forged.len() - 2;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        let slot = k.verified.hasher.hash_one((forged.as_str(), ""));
        k.verified.put_at(slot, &t, "", 0, &marker("*", None));
        assert!(matches!(
            k.verify_publisher(&forged, &Expected::LEGACY),
            Err(AuthError::WrongKey(Unverified::WrongKey))
        ));
        assert_eq!(k.verified.len(), 1, "a failed token is never kept");
        // An entry past its exp is not used: this unsigned token only passes from memory.
        let unsigned = "eyJhbGciOiJIUzI1NiJ9.e30.";
        k.verified.put(
            unsigned,
            "",
            0,
            &marker("*", Some(SystemTime::now() - Duration::from_secs(1))),
        );
        assert!(k.verify_publisher(unsigned, &Expected::LEGACY).is_err());
        k.verified.put(unsigned, "", 0, &marker("*", None));
        assert!(
            k.verify_publisher(unsigned, &Expected::LEGACY).is_ok(),
            "the entry itself is read"
        );
    }

    #[test]
    fn remembered_rights_end_at_exp_and_tokens_with_nbf_are_not_kept() {
        let now = SystemTime::now();
        let s = Duration::from_secs(1);
        assert!(still_valid(None, now));
        assert!(still_valid(Some(now + s), now));
        assert!(
            !still_valid(Some(now), now),
            "from exp on, the full check decides"
        );
        assert!(!still_valid(Some(now - s), now));
        let k = Key::secret(Algorithm::HS256, b"secret");
        let secs = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let claims = serde_json::json!({"nbf": secs - 10, "mercure": {"publish": ["*"]}});
        let enc = EncodingKey::from_secret(b"secret");
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &enc).unwrap();
        assert!(k.verify_publisher(&t, &Expected::LEGACY).is_ok());
        assert_eq!(k.verified.len(), 0);
    }

    #[test]
    fn remembered_tokens_are_bounded() {
        let k = Key::secret(Algorithm::HS256, b"secret");
        for i in 0..VERIFIED_ENTRIES + 10 {
            let t = k.mint(Some(&[format!("t{i}")]), None, None).unwrap();
            k.verify_publisher(&t, &Expected::LEGACY).unwrap();
            assert!(k.verified.len() <= VERIFIED_ENTRIES);
        }
        let huge = k
            .mint(Some(&["x".repeat(VERIFIED_TOKEN_MAX)]), None, None)
            .unwrap();
        let before = k.verified.len();
        k.verify_publisher(&huge, &Expected::LEGACY).unwrap();
        assert_eq!(
            k.verified.len(),
            before,
            "an oversized token is checked, not kept"
        );
    }

    #[test]
    fn namespaced_claim() {
        let r = rights_from_claims(
            &serde_json::json!({"https://mercure.rocks/": {"subscribe": ["x"], "payload": {"a": 1}}}),
        )
        .unwrap();
        assert_eq!(r.subscribe, Some(vec![Matcher::topic("x")]));
        assert!(r.payload.is_some());
        assert!(rights_from_claims(&serde_json::json!({"mercure": {"publish": "x"}})).is_err());
    }

    #[test]
    fn a_subscription_takes_the_payload_of_the_first_entry_matching_its_matcher() {
        let d = |topics: Value, payload: Value| serde_json::json!({"type": DETAIL_TYPE, "actions": ["subscribe"], "topics": topics, "payload": payload});
        let claims = serde_json::json!({"authorization_details": [
            d(serde_json::json!([{"match": "https://a.example/:id", "match_type": "urlpattern"}]), serde_json::json!(1)),
            d(serde_json::json!([{"match": "*"}]), serde_json::json!(2)),
        ]});
        let r = rights_from_details(&claims).unwrap();
        assert_eq!(r.dialect, Dialect::V1);
        assert_eq!(r.subscribe.as_ref().map(Vec::len), Some(2));
        assert_eq!(r.publish, None);
        let payload = |m: Matcher| r.payload_for(&m).map(|p| (*p).clone());
        assert_eq!(
            payload(Matcher::exact("https://a.example/7")),
            Some(serde_json::json!(1))
        );
        assert_eq!(
            payload(Matcher::exact("https://b.example/7")),
            Some(serde_json::json!(2))
        );
        // A 0.x token's payload is the same for every subscription.
        let legacy = rights_from_claims(&serde_json::json!({"mercure": {"payload": 3}})).unwrap();
        assert_eq!(
            legacy
                .payload_for(&Matcher::topic("x"))
                .map(|p| (*p).clone()),
            Some(serde_json::json!(3))
        );
        // Each matcher of one request has its own: the first entry matching it decides,
        // even one without a payload.
        let none_first = rights_from_details(&serde_json::json!({"authorization_details": [
            {"type": DETAIL_TYPE, "actions": ["subscribe"], "topics": [{"match": "https://c.example/x"}]},
            d(serde_json::json!([{"match": "*"}]), serde_json::json!(4)),
        ]}))
        .unwrap();
        let each = none_first.payloads_for(
            &[
                Matcher::exact("https://a.example/1"),
                Matcher::exact("https://c.example/x"),
            ],
            &|t| Arc::new(crate::hub::Selector::compile(t)),
        );
        let each: Vec<_> = each.iter().map(|p| p.as_deref().cloned()).collect();
        assert_eq!(each, [Some(serde_json::json!(4)), None]);
    }

    #[test]
    fn the_access_token_type_is_read_loosely() {
        for t in [
            "at+jwt",
            "AT+JWT",
            "application/at+jwt",
            "Application/At+Jwt",
        ] {
            assert!(is_access_token_type(t), "{t}");
        }
        for t in [
            "JWT",
            "jwt",
            "application/jwt",
            "at+jwt+x",
            "",
            "application/",
        ] {
            assert!(!is_access_token_type(t), "{t}");
        }
    }

    #[test]
    fn none_is_refused() {
        assert!(parse_algorithm("none").is_err());
        assert_eq!(parse_algorithm("es256"), Ok(Algorithm::ES256));
    }

    #[test]
    fn access_tokens_are_told_by_their_typ() {
        use base64::Engine as _;
        let token = |header: &str| {
            let h = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(header);
            format!("{h}.e30.sig")
        };
        assert!(is_access_token(&token(r#"{"alg":"HS256","typ":"at+jwt"}"#)));
        assert!(is_access_token(&token(
            r#"{"alg":"HS256","typ":"application/AT+JWT"}"#
        )));
        assert!(!is_access_token(&token(r#"{"alg":"HS256","typ":"JWT"}"#)));
        assert!(!is_access_token(&token(r#"{"alg":"HS256"}"#)));
        assert!(!is_access_token("garbage"));
        assert!(!is_access_token(""));
    }
}
