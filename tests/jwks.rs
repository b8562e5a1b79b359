//! `--jwks-url`: Mercure 1.0 tokens verified with an identity provider's keys. The provider is
//! a real HTTP server on 127.0.0.1 serving a JWK Set it can change while the hub runs; keys are
//! Ed25519 and P-256 pairs made for the test.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::{request, take_data, TestHub, SECRET};
use http::{Method, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HUB: &str = "/.well-known/mercure";
const ISSUER: &str = "https://idp.example";
const DETAIL: &str = "https://mercure.rocks/authorization-detail";

/// A signing key of the provider, with its public half as a JWK.
struct Pair {
    alg: Algorithm,
    kid: &'static str,
    private_pem: String,
    jwk: Value,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Pair {
    fn ed25519(kid: &'static str) -> Pair {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        Pair {
            alg: Algorithm::EdDSA,
            kid,
            private_pem: kp.serialize_pem(),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": b64(kp.public_key_raw()),
                        "kid": kid, "use": "sig", "alg": "EdDSA"}),
        }
    }

    fn p256(kid: &'static str) -> Pair {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        // The uncompressed point: 0x04, then x and y.
        let point = kp.public_key_raw();
        assert_eq!(point.len(), 65);
        Pair {
            alg: Algorithm::ES256,
            kid,
            private_pem: kp.serialize_pem(),
            jwk: json!({"kty": "EC", "crv": "P-256", "x": b64(&point[1..33]),
                        "y": b64(&point[33..]), "kid": kid}),
        }
    }

    fn encoding(&self) -> EncodingKey {
        match self.alg {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(self.private_pem.as_bytes()).unwrap(),
            _ => EncodingKey::from_ec_pem(self.private_pem.as_bytes()).unwrap(),
        }
    }

    /// Signs `claims` with header type `typ` and, when `with_kid`, the key id.
    fn sign(&self, typ: Option<&str>, with_kid: bool, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.typ = typ.map(str::to_owned);
        header.kid = with_kid.then(|| self.kid.to_owned());
        jsonwebtoken::encode(&header, claims, &self.encoding()).unwrap()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A 1.0 access token's claims for `hub`, from `iss`, allowing publish and subscribe on `*`.
fn claims(hub: &TestHub, iss: &str) -> Value {
    json!({
        "iss": iss,
        "aud": hub.url(HUB),
        "exp": now() + 300,
        "authorization_details": [
            {"type": DETAIL, "actions": ["publish", "subscribe"], "topics": [{"match": "*"}]},
        ],
    })
}

/// The identity provider: serves `set` at `/jwks` (or `status` when it is not 200) and
/// counts the fetches.
#[derive(Clone)]
struct Provider {
    addr: SocketAddr,
    set: Arc<Mutex<(u16, String)>>,
    fetches: Arc<AtomicUsize>,
    /// Answer nothing, holding the connection open (a provider that hangs).
    hang: Arc<std::sync::atomic::AtomicBool>,
}

impl Provider {
    async fn start(keys: &[&Pair]) -> Provider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let p = Provider {
            addr: listener.local_addr().unwrap(),
            set: Arc::new(Mutex::new((200, String::new()))),
            fetches: Arc::new(AtomicUsize::new(0)),
            hang: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        p.serve(keys);
        let server = p.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let server = server.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    server.fetches.fetch_add(1, Ordering::SeqCst);
                    if server.hang.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    let (status, body) = server.set.lock().unwrap().clone();
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/jwk-set+json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
        });
        p
    }

    /// From now on the set holds `keys`.
    fn serve(&self, keys: &[&Pair]) {
        let keys: Vec<Value> = keys.iter().map(|k| k.jwk.clone()).collect();
        *self.set.lock().unwrap() = (200, json!({ "keys": keys }).to_string());
    }

    /// From now on the provider answers `status` with no set.
    fn fail(&self, status: u16) {
        *self.set.lock().unwrap() = (status, String::new());
    }

    fn url(&self) -> String {
        format!("http://{}/jwks", self.addr)
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Waits until the provider has been asked at least `n` times.
    async fn wait_fetches(&self, n: usize) {
        let until = Instant::now() + Duration::from_secs(10);
        while self.fetches() < n {
            assert!(
                Instant::now() < until,
                "the hub fetched the set {} times, not {n}",
                self.fetches()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn start_hub(provider: &Provider) -> TestHub {
    TestHub::start(&["--issuer", ISSUER, "--jwks-url", &provider.url()])
}

async fn publish(hub: &TestHub, token: &str, topic: &str) -> (StatusCode, String, Option<String>) {
    let auth = format!("Bearer {token}");
    let body = format!("topic={topic}&data=x");
    let ((status, text), headers) = request(
        hub,
        Method::POST,
        HUB,
        &[
            ("authorization", &auth),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        &body,
    )
    .await;
    let challenge = headers
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, text, challenge)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_issuers_keys_verify_tokens_and_a_key_rotated_in_is_fetched_once() {
    let ed = Pair::ed25519("ed-1");
    let ec = Pair::p256("ec-2");
    let provider = Provider::start(&[&ed]).await;
    let hub = start_hub(&provider);
    provider.wait_fetches(1).await;

    // A token signed by the provider's key: publish, and a private update delivered to a
    // subscriber presenting such a token.
    let token = ed.sign(Some("at+jwt"), true, &claims(&hub, ISSUER));
    let auth = format!("Bearer {token}");
    let mut stream = hub
        .subscribe(
            "match=https%3A%2F%2Fexample.com%2Fprivate",
            &[("authorization", &auth)],
        )
        .await;
    let body = "topic=https://example.com/private&data=secret&private=on";
    let ((status, text), _) = request(
        &hub,
        Method::POST,
        HUB,
        &[
            ("authorization", &auth),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(take_data(&mut stream, 1).await, ["secret"]);

    // The hub's own key still verifies both dialects beside the set.
    let own = hub.publisher_token();
    assert_eq!(publish(&hub, &own, "own").await.0, StatusCode::OK);

    // Signed by the set's key but from another issuer, or as a 0.x token: refused.
    let other = ed.sign(Some("at+jwt"), true, &claims(&hub, "https://other.example"));
    let (status, text, challenge) = publish(&hub, &other, "a").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    assert!(challenge.unwrap().contains("error=\"invalid_token\""));
    let legacy = ed.sign(None, true, &json!({"mercure": {"publish": ["*"]}}));
    let (status, text, _) = publish(&hub, &legacy, "a").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    let fetched = provider.fetches();
    // A token from another issuer naming an unknown key id does not make the hub fetch the
    // set (nor spend the 5-minute budget the rotation below needs).
    let junk =
        Pair::ed25519("junk").sign(Some("at+jwt"), true, &claims(&hub, "https://other.example"));
    assert_eq!(publish(&hub, &junk, "a").await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(provider.fetches(), fetched);

    // The provider rotates a second key in: the first token naming it makes the hub fetch the
    // set again, and is accepted.
    provider.serve(&[&ed, &ec]);
    let rotated = ec.sign(Some("at+jwt"), true, &claims(&hub, ISSUER));
    let (status, text, _) = publish(&hub, &rotated, "b").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(provider.fetches(), fetched + 1);
    // A token naming no key id is tried with every key of the set.
    let no_kid = ec.sign(Some("at+jwt"), false, &claims(&hub, ISSUER));
    assert_eq!(publish(&hub, &no_kid, "c").await.0, StatusCode::OK);

    // Made-up key ids: refused, and the provider is not asked again within 5 minutes.
    let stranger = Pair::ed25519("made-up");
    for _ in 0..5 {
        let t = stranger.sign(Some("at+jwt"), true, &claims(&hub, ISSUER));
        let (status, text, _) = publish(&hub, &t, "d").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
        assert!(text.contains("--jwks-url"), "{text}");
    }
    // A token naming a known id but signed by another key is refused too.
    let forged = Pair {
        kid: "ed-1",
        ..Pair::ed25519("ed-1")
    }
    .sign(Some("at+jwt"), true, &claims(&hub, ISSUER));
    assert_eq!(
        publish(&hub, &forged, "e").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        provider.fetches(),
        fetched + 1,
        "made-up ids fetched the set again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_down_at_start_does_not_stop_the_hub_and_is_used_once_it_answers() {
    let ed = Pair::ed25519("ed-1");
    let provider = Provider::start(&[&ed]).await;
    provider.fail(503);
    let hub = start_hub(&provider);
    provider.wait_fetches(1).await;
    assert!(hub.wait_for_log("keeping the last good key set", Duration::from_secs(10)));
    assert_eq!(common::get(&hub, "/healthz", &[]).await.0, StatusCode::OK);
    // The hub's own key works meanwhile.
    assert_eq!(
        publish(&hub, &hub.publisher_token(), "a").await.0,
        StatusCode::OK
    );

    // The provider comes back: the first token from the issuer makes the hub fetch the set
    // (naming no key id: the set is empty, so any will do).
    provider.serve(&[&ed]);
    let token = ed.sign(Some("at+jwt"), false, &claims(&hub, ISSUER));
    let (status, text, _) = publish(&hub, &token, "b").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(provider.fetches(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_hmac_key_in_the_set_verifies_nothing() {
    // A shared secret published in a key set would let anyone sign: the hub takes no `oct`
    // key, so a token signed with it is refused even though the set names its id.
    let secret = b"a secret anyone can read from the set";
    let provider = Provider::start(&[]).await;
    *provider.set.lock().unwrap() = (
        200,
        json!({"keys": [{"kty": "oct", "k": b64(secret), "kid": "hmac", "alg": "HS256"}]})
            .to_string(),
    );
    let hub = start_hub(&provider);
    provider.wait_fetches(1).await;
    let mut header = Header::new(Algorithm::HS256);
    header.typ = Some("at+jwt".into());
    header.kid = Some("hmac".into());
    let token = jsonwebtoken::encode(
        &header,
        &claims(&hub, ISSUER),
        &EncodingKey::from_secret(secret),
    )
    .unwrap();
    let (status, text, _) = publish(&hub, &token, "a").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    // The hub's own HS256 secret is not confused with it either.
    assert_ne!(secret.as_slice(), SECRET.as_bytes());
}

/// `ssehub serve` with `args`: its exit status and what it printed.
fn serve_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--data-dir", "none"])
        .args(args)
        .stdin(Stdio::null())
        .env_remove("SSEHUB_ISSUER")
        .env_remove("SSEHUB_JWKS_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_key_set_without_an_issuer_or_of_another_scheme_is_refused_at_start() {
    let err = serve_fails(&["--jwks-url", "http://127.0.0.1:1/jwks"]);
    assert!(err.contains("--jwks-url needs --issuer"), "{err}");
    let err = serve_fails(&["--jwks-url", "file:///etc/jwks.json", "--issuer", ISSUER]);
    assert!(err.contains("not an http:// or https:// URL"), "{err}");
    let err = serve_fails(&[
        "--jwks-url",
        "http://127.0.0.1:1/jwks",
        "--issuer",
        ISSUER,
        "--protocol",
        "0.x",
    ]);
    assert!(err.contains("--protocol 0.x"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_provider_holds_a_request_for_seconds_not_for_the_fetch() {
    let ed = Pair::ed25519("ed-1");
    let provider = Provider::start(&[&ed]).await;
    let hub = start_hub(&provider);
    provider.wait_fetches(1).await;
    provider.hang.store(true, Ordering::SeqCst);
    // A rotated key: the fetch it asks for hangs (for the hub's 10 s fetch timeout); the
    // request goes on after a few seconds, refused, and is not stuck behind the fetch.
    let rotated = Pair::ed25519("ed-2");
    let token = rotated.sign(Some("at+jwt"), true, &claims(&hub, ISSUER));
    let began = Instant::now();
    let (status, text, _) = publish(&hub, &token, "a").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    assert!(
        began.elapsed() < Duration::from_secs(8),
        "the request waited {:?}",
        began.elapsed()
    );
    assert_eq!(provider.fetches(), 2);
    // Keys already held still verify meanwhile, at once.
    let token = ed.sign(Some("at+jwt"), true, &claims(&hub, ISSUER));
    assert_eq!(publish(&hub, &token, "b").await.0, StatusCode::OK);
}

/// A token whose unverified `exp` is the largest number there is gets a clear 401, as any
/// forged token does: the check that decides whether a key fetch is worth it must not
/// overflow (`exp + leeway`, a panic in debug builds that drops the connection).
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_exp_at_the_end_of_time_is_refused_not_a_panic() {
    let ed = Pair::ed25519("ed-1");
    let provider = Provider::start(&[&ed]).await;
    let hub = start_hub(&provider);
    provider.wait_fetches(1).await;
    let mut forged = claims(&hub, ISSUER);
    forged["exp"] = json!(u64::MAX);
    let token = Pair::ed25519("unknown").sign(Some("at+jwt"), true, &forged);
    let (status, text, _) = publish(&hub, &token, "a").await;
    // A panic would have dropped the connection instead (`request` fails on that).
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
}
