//! Registry client behaviour on faults a real registry does not produce on demand: schema 1,
//! 5xx/429 retries, token refresh on 403, size caps, timeouts, TLS and refused connections.
//! These use a scripted in-process HTTP server (a unit-level fake); everything a real registry
//! can show is tested against one in `tests/pull.rs`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stratafs::reference::Reference;
use stratafs::registry::{RegistryClient, RegistryError, RegistrySettings};

type Handler = dyn Fn(&tiny_http::Request, usize) -> Option<tiny_http::ResponseBox> + Send + Sync;

/// A scripted HTTP server: `handler(request, n)` answers the n-th request (None: no answer,
/// the connection is held open). Records every request URL.
struct Fake {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    _server: Arc<tiny_http::Server>,
}

impl Fake {
    fn start(
        handler: impl Fn(&tiny_http::Request, usize) -> Option<tiny_http::ResponseBox>
            + Send
            + Sync
            + 'static,
    ) -> Fake {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let (s, log) = (server.clone(), seen.clone());
        std::thread::spawn(move || {
            let count = AtomicUsize::new(0);
            let mut held = Vec::new();
            for req in s.incoming_requests() {
                log.lock().unwrap().push(req.url().to_string());
                match handler(&req, count.fetch_add(1, Ordering::SeqCst)) {
                    Some(resp) => {
                        let _ = req.respond(resp);
                    }
                    None => held.push(req),
                }
            }
        });
        Fake {
            port,
            seen,
            _server: server,
        }
    }

    fn reference(&self, repo_tag: &str) -> Reference {
        format!("127.0.0.1:{}/{repo_tag}", self.port)
            .parse()
            .unwrap()
    }

    fn urls(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

fn respond(status: u16, content_type: &str, body: &[u8]) -> Option<tiny_http::ResponseBox> {
    let resp = tiny_http::Response::from_data(body.to_vec())
        .with_status_code(status)
        .with_header(tiny_http::Header::from_bytes("Content-Type", content_type).unwrap());
    Some(resp.boxed())
}

fn client(settings: RegistrySettings) -> RegistryClient {
    RegistryClient::new(settings, BTreeMap::new(), true)
}

fn fast() -> RegistrySettings {
    RegistrySettings {
        connect_timeout_secs: 1,
        request_timeout_secs: 1,
        retry_max_elapsed_secs: 3,
        ..Default::default()
    }
}

const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

#[tokio::test]
async fn schema1_manifests_are_refused_with_an_explanation() {
    let fake = Fake::start(|_, _| {
        respond(
            200,
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            br#"{"schemaVersion":1,"name":"old","tag":"v1","fsLayers":[]}"#,
        )
    });
    let r = fake.reference("old:v1");
    let err = client(fast()).resolve(&r).await.unwrap_err();
    assert!(matches!(err, RegistryError::Schema1 { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("schema 1") && msg.contains(&r.to_string()),
        "{msg}"
    );
}

#[tokio::test]
async fn server_errors_and_rate_limits_are_retried() {
    let fake = Fake::start(|_, n| match n {
        0 => respond(503, "text/plain", b"busy"),
        1 => {
            let r = tiny_http::Response::from_string("slow down")
                .with_status_code(429)
                .with_header(tiny_http::Header::from_bytes("Retry-After", "0").unwrap());
            Some(r.boxed())
        }
        _ => respond(200, OCI_MANIFEST, MANIFEST.as_bytes()),
    });
    let c = client(fast());
    let fetched = c.resolve(&fake.reference("app:v1")).await.unwrap();
    assert_eq!(fetched.data, MANIFEST.as_bytes());
    assert_eq!(fetched.media_type, OCI_MANIFEST);
    assert_eq!(fake.urls().len(), 3);
    assert_eq!(c.requests_sent(), 3);
}

#[tokio::test]
async fn persistent_server_errors_end_within_the_retry_budget() {
    let fake = Fake::start(|_, _| {
        respond(
            500,
            "application/json",
            br#"{"errors":[{"code":"UNKNOWN","message":"disk on fire"}]}"#,
        )
    });
    let started = Instant::now();
    let err = client(fast())
        .resolve(&fake.reference("app:v1"))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "bounded: {:?}",
        started.elapsed()
    );
    let msg = err.to_string();
    assert!(msg.contains("500") && msg.contains("disk on fire"), "{msg}");
    assert!(fake.urls().len() > 2, "retried: {:?}", fake.urls());
}

#[tokio::test]
async fn a_token_refused_with_403_is_renewed_once() {
    // 401 challenge → token t0 → 403 → token t1 → 200.
    let port_cell = Arc::new(Mutex::new(0u16));
    let pc = port_cell.clone();
    let tokens = Arc::new(AtomicUsize::new(0));
    let t = tokens.clone();
    let fake = Fake::start(move |req, _| {
        let url = req.url().to_string();
        if url.starts_with("/token") {
            assert!(url.contains("scope=repository%3Aorg%2Fapp%3Apull"), "{url}");
            let n = t.fetch_add(1, Ordering::SeqCst);
            return respond(
                200,
                "application/json",
                format!(r#"{{"token":"t{n}","expires_in":300}}"#).as_bytes(),
            );
        }
        let auth = req
            .headers()
            .iter()
            .find(|h| h.field.equiv("Authorization"))
            .map(|h| h.value.to_string());
        match auth.as_deref() {
            None => {
                let challenge = format!(
                    r#"Bearer realm="http://127.0.0.1:{}/token",service="fake",scope="repository:org/app:pull""#,
                    pc.lock().unwrap()
                );
                let r = tiny_http::Response::from_string("")
                    .with_status_code(401)
                    .with_header(
                        tiny_http::Header::from_bytes("WWW-Authenticate", challenge).unwrap(),
                    );
                Some(r.boxed())
            }
            Some("Bearer t0") => respond(
                403,
                "application/json",
                br#"{"errors":[{"code":"DENIED"}]}"#,
            ),
            Some("Bearer t1") => respond(200, OCI_MANIFEST, MANIFEST.as_bytes()),
            Some(other) => panic!("unexpected authorization {other}"),
        }
    });
    *port_cell.lock().unwrap() = fake.port;
    let c = client(fast());
    c.resolve(&fake.reference("org/app:v1")).await.unwrap();
    assert_eq!(
        tokens.load(Ordering::SeqCst),
        2,
        "token fetched again after 403"
    );

    // A second request reuses the cached token: no new token, no new challenge.
    let before = fake.urls().len();
    c.resolve(&fake.reference("org/app:v1")).await.unwrap();
    assert_eq!(fake.urls().len(), before + 1);
    assert_eq!(tokens.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn oversized_manifests_are_refused() {
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(4096));
    let fake = Fake::start(move |_, _| respond(200, OCI_MANIFEST, big.as_bytes()));
    let settings = RegistrySettings {
        max_manifest_bytes: 1024,
        ..fast()
    };
    let err = client(settings)
        .resolve(&fake.reference("big:v1"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::TooLarge { limit: 1024, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("big:v1"), "{err}");
}

#[tokio::test]
async fn a_registry_that_never_answers_times_out() {
    let fake = Fake::start(|_, _| None);
    let started = Instant::now();
    let err = client(fast())
        .resolve(&fake.reference("hang:v1"))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Timeout { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("127.0.0.1:{}", fake.port)),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn refused_connections_name_the_registry() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r: Reference = format!("127.0.0.1:{port}/nobody:v1").parse().unwrap();
    let err = client(fast()).resolve(&r).await.unwrap_err();
    assert!(matches!(err, RegistryError::Connect { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

#[tokio::test]
async fn tls_to_a_plain_http_server_is_a_tls_error() {
    // A plain HTTP server answers a TLS ClientHello the way Go's net/http does: with a 400.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n");
        }
    });
    // [::ffff:127.0.0.1] reaches the loopback listener but is not treated as a loopback
    // registry, so there is no fallback to plain HTTP: the TLS handshake must fail.
    let r: Reference = format!("[::ffff:127.0.0.1]:{port}/app:v1").parse().unwrap();
    let c = RegistryClient::new(fast(), BTreeMap::new(), false);
    let err = c.resolve(&r).await.unwrap_err();
    assert!(matches!(err, RegistryError::Tls { .. }), "{err}");
}

#[tokio::test]
async fn loopback_registries_fall_back_to_plain_http_once() {
    let fake = Fake::start(|_, _| respond(200, OCI_MANIFEST, MANIFEST.as_bytes()));
    let c = RegistryClient::new(fast(), BTreeMap::new(), false);
    c.resolve(&fake.reference("app:v1")).await.unwrap();
    c.resolve(&fake.reference("app:v2")).await.unwrap();
    // One failed TLS attempt, then two plain requests.
    assert_eq!(c.requests_sent(), 3);
    assert_eq!(
        fake.urls(),
        ["/v2/app/manifests/v1", "/v2/app/manifests/v2"]
    );
}

#[tokio::test]
async fn a_range_cut_short_is_asked_for_again_from_where_it_broke() {
    let (blob, got, ranges) = read_resumed_from(400).await;
    // Every byte once, in order: the second request asked for the rest only.
    assert_eq!(got.unwrap(), blob);
    assert_eq!(ranges, ["bytes=0-999", "bytes=400-999"]);
}

/// A blob of 1000 bytes whose range reads are answered 206, the first promising the whole
/// range but cut short after 400 bytes and the next (the rest, asked for again) from byte
/// `resumed_at`, as its Content-Range says: the blob, what reading all of it gave, and the
/// Range headers asked.
async fn read_resumed_from(
    resumed_at: usize,
) -> (Vec<u8>, Result<Vec<u8>, RegistryError>, Vec<String>) {
    let blob: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let (b, seen) = (blob.clone(), ranges.clone());
    let fake = Fake::start(move |req, n| {
        let range = req
            .headers()
            .iter()
            .find(|h| h.field.equiv("Range"))
            .map(|h| h.value.to_string())
            .unwrap_or_default();
        seen.lock().unwrap().push(range.clone());
        let to: usize = range.split_once('-').unwrap().1.parse().unwrap();
        let (from, body) = match n {
            0 => (0, b[..400].to_vec()),
            _ => (resumed_at, b[resumed_at..=to].to_vec()),
        };
        let header = |k: &str, v: String| tiny_http::Header::from_bytes(k, v).unwrap();
        Some(
            tiny_http::Response::new(
                tiny_http::StatusCode(206),
                vec![
                    header("Content-Range", format!("bytes {from}-{to}/{}", b.len())),
                    header("Connection", "close".into()),
                ],
                std::io::Cursor::new(body),
                Some(to + 1 - from),
                None,
            )
            .boxed(),
        )
    });
    let c = client(fast());
    let digest: oci_spec::image::Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
    let got = c
        .read_blob_range(&fake.reference("app:v1"), &digest, 0, 1000)
        .await;
    let asked = ranges.lock().unwrap().clone();
    (blob, got, asked)
}

#[tokio::test]
async fn a_resumed_range_answered_from_an_earlier_offset_is_skipped_to_the_byte_asked_for() {
    let (blob, got, _) = read_resumed_from(100).await;
    assert_eq!(got.unwrap(), blob);
}

#[tokio::test]
async fn a_resumed_range_answered_from_a_later_offset_is_an_error_not_shifted_bytes() {
    let e = read_resumed_from(500).await.1.unwrap_err().to_string();
    assert!(
        e.contains("asked for bytes from 400, answered bytes from 500"),
        "{e}"
    );
}
