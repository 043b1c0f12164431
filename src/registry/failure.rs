//! How a failed HTTP exchange becomes a [`RegistryError`]: a timeout, TLS (told apart by
//! rustls's error type, and whether the certificate was the problem), DNS or the connection;
//! messages carry the innermost cause, never reqwest's own text with its URL (which may be a
//! signed one).

use super::RegistryError;

/// The TLS error (rustls's) behind a transport error, if TLS is what failed: found by type
/// along the error's sources (an I/O error carries it inside).
pub(crate) fn tls_failure(e: &reqwest::Error) -> Option<&rustls::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        // An I/O error's `source` skips the error it wraps (which may be another I/O error,
        // as hyper's connector wraps tokio-rustls's): look inside.
        let mut inner: &(dyn std::error::Error + 'static) = s;
        while let Some(io) = inner.downcast_ref::<std::io::Error>() {
            match io.get_ref() {
                Some(wrapped) => inner = wrapped,
                None => break,
            }
        }
        if let Some(t) = inner.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        source = s.source();
    }
    None
}

/// Whether a TLS failure says the server spoke TLS but its certificate (or lack of one) is
/// not trusted.
pub(crate) fn untrusted(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::InvalidCertRevocationList(_)
    )
}

/// Classifies a transport error: timeout, TLS (by rustls's error type), DNS or connection.
pub(crate) fn map_reqwest(host: &str, url: &str, e: reqwest::Error) -> RegistryError {
    if e.is_timeout() {
        return RegistryError::Timeout {
            host: host.to_string(),
            url: url.to_string(),
        };
    }
    let tls = tls_failure(&e).is_some();
    // reqwest's own message names the URL, which may be a signed one (a redirect's).
    let e = e.without_url();
    let mut chain = Vec::new();
    let mut source: Option<&dyn std::error::Error> = Some(&e);
    while let Some(s) = source {
        chain.push(s.to_string());
        source = s.source();
    }
    let detail = chain.last().cloned().unwrap_or_default();
    let all = chain.join(": ").to_ascii_lowercase();
    let host = host.to_string();
    if tls {
        RegistryError::Tls { host, detail }
    } else if all.contains("dns error") || all.contains("failed to lookup address") {
        // hyper's resolver error has no public type: its message is all there is.
        RegistryError::Dns { host, detail }
    } else {
        RegistryError::Connect { host, detail }
    }
}
