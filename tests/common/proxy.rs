//! A minimal HTTP forward proxy on loopback, recording the absolute URLs it relays, to check
//! that clients honour `HTTP_PROXY`. One request per connection (`Connection: close`).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// A running forward proxy.
pub struct ForwardProxy {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

impl ForwardProxy {
    pub fn start() -> ForwardProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let log = log.clone();
                std::thread::spawn(move || {
                    let _ = relay(client, &log);
                });
            }
        });
        ForwardProxy { port, seen }
    }

    /// `http://127.0.0.1:PORT`, for `HTTP_PROXY`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The absolute URLs requested through the proxy so far.
    pub fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// Reads the header lines after a request line up to the blank line, appends them to `head`
/// (without `Proxy-*` and `Connection`, then `Connection: close` and the blank line), and
/// returns the body (`Content-Length` bytes).
pub fn read_headers_and_body(
    reader: &mut impl BufRead,
    head: &mut String,
) -> std::io::Result<Vec<u8>> {
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("proxy-") || lower.starts_with("connection:") {
            continue;
        }
        if let Some(v) = lower.strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
        head.push_str(&line);
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    Ok(body)
}

/// Reads one request with an absolute URL, forwards it with an origin-form target, and pipes
/// the response back.
fn relay(client: TcpStream, log: &Mutex<Vec<String>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let (method, target, version) = (
        parts.next().unwrap_or_default().to_string(),
        parts.next().unwrap_or_default().to_string(),
        parts.next().unwrap_or("HTTP/1.1").to_string(),
    );
    let rest = target.strip_prefix("http://").unwrap_or(&target);
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    log.lock().unwrap().push(format!("{method} {target}"));
    let mut head = format!(
        "{method} {} {version}\r\n",
        if path.is_empty() { "/" } else { path }
    );
    let body = read_headers_and_body(&mut reader, &mut head)?;
    let mut upstream = TcpStream::connect(authority)?;
    upstream.write_all(head.as_bytes())?;
    upstream.write_all(&body)?;
    let mut client = client;
    std::io::copy(&mut upstream, &mut client)?;
    client.shutdown(std::net::Shutdown::Both)
}
