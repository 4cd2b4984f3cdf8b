//! Upstream destinations: OpenAI-compatible servers on the LAN or in a cloud, called only
//! for requests the policy allows there. HTTPS with full certificate verification
//! (against the destination's `ca_file`, else the system's bundle); no "accept anything"
//! mode exists. One connection per request (HTTP/1.1).

use std::sync::Arc;
use std::time::Duration;

use appliance_api::worker::WireMessage;
use appliance_policy::Destination;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// Circuit breakers, one per destination: after `breaker_failures` failures in a row a
/// destination is skipped for `breaker_cooldown_ms`; then one request probes it
/// (half-open): success closes the circuit, failure opens it again.
#[derive(Debug, Default)]
pub struct Breakers {
    state: std::sync::Mutex<std::collections::HashMap<String, Breaker>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Breaker {
    failures: u32,
    open_until: Option<std::time::Instant>,
    probing: bool,
}

impl Breakers {
    /// Whether a request may try `dest` now (and, if it is the half-open probe, marks it).
    pub fn allow(&self, dest: &Destination) -> bool {
        let mut m = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let b = m.entry(dest.name.clone()).or_default();
        match b.open_until {
            None => true,
            Some(t) if std::time::Instant::now() < t => false,
            Some(_) if b.probing => false,
            Some(_) => {
                b.probing = true;
                true
            }
        }
    }

    pub fn success(&self, dest: &Destination) {
        let mut m = self.state.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(dest.name.clone(), Breaker::default());
    }

    pub fn failure(&self, dest: &Destination) {
        let mut m = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let b = m.entry(dest.name.clone()).or_default();
        b.failures += 1;
        if b.probing || b.failures >= dest.breaker_failures {
            if b.open_until.is_none() || b.probing {
                log::warn!(
                    "upstream {}: circuit open for {} ms after {} failure(s)",
                    dest.name,
                    dest.breaker_cooldown_ms,
                    b.failures
                );
            }
            b.open_until =
                Some(std::time::Instant::now() + Duration::from_millis(dest.breaker_cooldown_ms));
            b.probing = false;
        }
    }

    /// `closed`, `open` or `half_open`.
    #[cfg(test)]
    fn state(&self, name: &str) -> &'static str {
        let m = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(name).and_then(|b| b.open_until) {
            None => "closed",
            Some(t) if std::time::Instant::now() < t => "open",
            Some(_) => "half_open",
        }
    }
}

/// The system's CA bundle (Debian), used when a destination names no `ca_file`.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Answers larger than this are refused.
const MAX_ANSWER: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Nothing reached the client yet: another destination may be tried.
    #[error("{0}")]
    Unavailable(String),
    /// The upstream answered, but not a usable chat completion.
    #[error("{0}")]
    Bad(String),
}

/// A completed chat answer from an upstream.
#[derive(Debug, Clone)]
pub struct Answer {
    pub content: String,
    pub finish_reason: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// The parts of an `http(s)://host[:port]/base` URL.
struct Url<'a> {
    tls: bool,
    host: &'a str,
    port: u16,
    base: &'a str,
}

fn parse_url(url: &str) -> Result<Url<'_>, UpstreamError> {
    let bad = || UpstreamError::Bad(format!("bad upstream url {url:?}"));
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(bad());
    };
    let (authority, base) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            (h, p.parse().map_err(|_| bad())?)
        }
        _ => (authority, if tls { 443 } else { 80 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Url {
        tls,
        host,
        port,
        base: base.trim_end_matches('/'),
    })
}

/// The roots a destination's certificate must chain to.
fn roots(dest: &Destination) -> Result<rustls::RootCertStore, UpstreamError> {
    let path = dest.ca_file.as_deref().unwrap_or(SYSTEM_CA_BUNDLE);
    let mut store = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| UpstreamError::Unavailable(format!("CA bundle {path}: {e}")))?;
    for c in certs.flatten() {
        let _ = store.add(c);
    }
    if store.is_empty() {
        return Err(UpstreamError::Unavailable(format!(
            "CA bundle {path}: no certificate"
        )));
    }
    Ok(store)
}

/// Sends a chat completion to `dest` and returns its answer. `credential` is the bearer
/// token (never logged).
pub async fn chat(
    dest: &Destination,
    credential: Option<&str>,
    messages: &[WireMessage],
    max_tokens: Option<usize>,
) -> Result<Answer, UpstreamError> {
    let limit = Duration::from_millis(dest.timeout_ms.max(1));
    match tokio::time::timeout(limit, exchange(dest, credential, messages, max_tokens)).await {
        Ok(r) => r,
        Err(_) => Err(UpstreamError::Unavailable(format!(
            "{}: no answer within {} ms",
            dest.name, dest.timeout_ms
        ))),
    }
}

async fn exchange(
    dest: &Destination,
    credential: Option<&str>,
    messages: &[WireMessage],
    max_tokens: Option<usize>,
) -> Result<Answer, UpstreamError> {
    let url = dest.url.as_deref().unwrap_or("");
    let u = parse_url(url)?;
    let down = |what: &str, e: &dyn std::fmt::Display| {
        UpstreamError::Unavailable(format!("{}: {what}: {e}", dest.name))
    };
    let tcp = tokio::net::TcpStream::connect((u.host, u.port))
        .await
        .map_err(|e| down("connect", &e))?;
    let _ = tcp.set_nodelay(true);
    let mut body = serde_json::json!({
        "model": dest.model.clone().unwrap_or_default(),
        "messages": messages.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
        "stream": false,
    });
    if let Some(n) = max_tokens {
        body["max_tokens"] = n.into();
    }
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("{}/chat/completions", u.base))
        .header(http::header::HOST, u.host)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "sovereign-appliance");
    if let Some(c) = credential {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {c}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| UpstreamError::Bad(e.to_string()))?;
    let resp = if u.tls {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| UpstreamError::Bad(e.to_string()))?
            .with_root_certificates(roots(dest)?)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(u.host.to_string())
            .map_err(|e| UpstreamError::Bad(format!("{}: {e}", dest.name)))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| down("TLS", &e))?;
        send(TokioIo::new(tls), req).await
    } else {
        send(TokioIo::new(tcp), req).await
    }
    .map_err(|e| down("HTTP", &e))?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| down("reading the answer", &e))?
        .to_bytes();
    if status.is_server_error() {
        return Err(UpstreamError::Unavailable(format!(
            "{}: HTTP {status}",
            dest.name
        )));
    }
    if !status.is_success() {
        return Err(UpstreamError::Bad(format!("{}: HTTP {status}", dest.name)));
    }
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| UpstreamError::Bad(format!("{}: not JSON: {e}", dest.name)))?;
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .ok_or_else(|| {
            UpstreamError::Bad(format!("{}: no choices[0].message.content", dest.name))
        })?;
    Ok(Answer {
        content: content.to_string(),
        finish_reason: v["choices"][0]["finish_reason"]
            .as_str()
            .unwrap_or("stop")
            .to_string(),
        prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
        completion_tokens: v["usage"]["completion_tokens"].as_u64().unwrap_or(0),
    })
}

async fn send<T>(
    io: TokioIo<T>,
    req: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, hyper::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(failures: u32, cooldown_ms: u64) -> Destination {
        appliance_policy::parse(&format!(
            "[destinations.d]\nkind = \"external\"\nurl = \"https://x.example/v1\"\njurisdiction = \"EU\"\nbreaker_failures = {failures}\nbreaker_cooldown_ms = {cooldown_ms}\n"
        ))
        .unwrap()
        .destinations["d"]
        .clone()
    }

    #[test]
    fn breakers_open_after_failures_and_probe_once_after_the_cooldown() {
        let d = dest(2, 50);
        let b = Breakers::default();
        assert!(b.allow(&d));
        b.failure(&d);
        assert!(b.allow(&d), "one failure of two");
        b.failure(&d);
        assert_eq!(b.state("d"), "open");
        assert!(!b.allow(&d));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.state("d"), "half_open");
        assert!(b.allow(&d), "the probe");
        assert!(!b.allow(&d), "only one probe at a time");
        b.failure(&d);
        assert_eq!(b.state("d"), "open", "a failed probe opens it again");
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.allow(&d));
        b.success(&d);
        assert_eq!(b.state("d"), "closed");
        assert!(b.allow(&d) && b.allow(&d));
    }

    #[test]
    fn urls() {
        let u = parse_url("https://api.example.eu/v1").unwrap();
        assert_eq!(
            (u.tls, u.host, u.port, u.base),
            (true, "api.example.eu", 443, "/v1")
        );
        let u = parse_url("http://10.0.0.5:8000/v1/").unwrap();
        assert_eq!(
            (u.tls, u.host, u.port, u.base),
            (false, "10.0.0.5", 8000, "/v1")
        );
        let u = parse_url("https://[fd00::5]:8443/v1").unwrap();
        assert_eq!((u.host, u.port), ("fd00::5", 8443));
        assert!(parse_url("ftp://x").is_err());
        assert!(parse_url("https://:443/v1").is_err());
    }
}
