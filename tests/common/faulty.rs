//! A reverse proxy in front of a registry that misbehaves on request, for one layer blob:
//! answers 500 (`failing`), holds its answers until released (`hold`/`release`), or flips a
//! byte in the middle of each answer's body (`corrupting`). Everything else is relayed. One
//! request per connection (`Connection: close`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// The body of an injected 500, so a daemon's log can be checked for the cause.
pub const INJECTED: &str = "injected by the test proxy";

#[derive(Default)]
pub struct Faults {
    /// Answer 500 to requests for the blob.
    pub failing: AtomicBool,
    /// 500s answered so far.
    pub failed: AtomicUsize,
    /// Flip a byte in the middle of every answer for the blob.
    pub corrupting: AtomicBool,
    /// Requests for the blob waiting for a release, and whether they are held.
    held: Mutex<(usize, bool)>,
    released: Condvar,
    /// Body bytes of the blob relayed so far.
    pub blob_bytes: AtomicUsize,
}

/// A running faulty proxy.
pub struct FaultyProxy {
    port: u16,
    pub faults: Arc<Faults>,
}

impl FaultyProxy {
    /// A proxy to `upstream` (`host:port`) that misbehaves for `blob` (`sha256:…`) as told.
    pub fn start(upstream: String, blob: &str) -> FaultyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Faults::default());
        let suffix = format!("/blobs/{blob}");
        let f = faults.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (f, up, suffix) = (f.clone(), upstream.clone(), suffix.clone());
                std::thread::spawn(move || {
                    let _ = relay(client, &up, &suffix, &f);
                });
            }
        });
        FaultyProxy { port, faults }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// From now on, requests for the blob wait until [`FaultyProxy::release`].
    pub fn hold(&self) {
        self.faults.held.lock().unwrap().1 = true;
    }

    /// Lets held requests (and later ones) through.
    pub fn release(&self) {
        self.faults.held.lock().unwrap().1 = false;
        self.faults.released.notify_all();
    }

    /// Requests for the blob waiting now.
    pub fn waiting(&self) -> usize {
        self.faults.held.lock().unwrap().0
    }

    /// Waits (30 s at most) until a request for the blob is held.
    pub fn wait_for_held_request(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut held = self.faults.held.lock().unwrap();
        while held.0 == 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "no request for the blob reached the proxy");
            held = self.faults.released.wait_timeout(held, left).unwrap().0;
        }
    }
}

/// Reads one request; answers 500 itself (a blob request while failing), or forwards it to
/// `upstream` with `Connection: close` (after a release, if held) and pipes the answer back
/// (corrupted, if told).
fn relay(client: TcpStream, upstream: &str, suffix: &str, faults: &Faults) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = String::new();
    reader.read_line(&mut head)?;
    let mut parts = head.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_string();
    let body = super::proxy::read_headers_and_body(&mut reader, &mut head)?;
    let mut client = client;
    let ours = path.ends_with(suffix);
    if ours && faults.failing.load(Ordering::SeqCst) {
        faults.failed.fetch_add(1, Ordering::SeqCst);
        let msg = format!(r#"{{"errors":[{{"code":"UNKNOWN","message":"{INJECTED}"}}]}}"#);
        write!(
            client,
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            msg.len()
        )?;
        if method != "HEAD" {
            client.write_all(msg.as_bytes())?;
        }
        return client.shutdown(Shutdown::Write);
    }
    if ours {
        let mut held = faults.held.lock().unwrap();
        if held.1 {
            held.0 += 1;
            faults.released.notify_all();
            while held.1 {
                held = faults.released.wait(held).unwrap();
            }
            held.0 -= 1;
        }
    }
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(head.as_bytes())?;
    up.write_all(&body)?;
    if !ours {
        std::io::copy(&mut up, &mut client)?;
        return client.shutdown(Shutdown::Both);
    }
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    let start = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(answer.len(), |p| p + 4);
    let len = answer.len() - start;
    if len > 0 && faults.corrupting.load(Ordering::SeqCst) {
        answer[start + len / 2] ^= 0x5a;
    }
    faults.blob_bytes.fetch_add(len, Ordering::SeqCst);
    client.write_all(&answer)?;
    client.shutdown(Shutdown::Both)
}
