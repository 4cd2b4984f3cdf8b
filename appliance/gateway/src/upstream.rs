//! Upstream destinations: OpenAI-compatible servers on the LAN or in a cloud, called only
//! for requests the policy allows there. HTTPS with full certificate verification
//! (against the destination's `ca_file`, else the system's bundle); no "accept anything"
//! mode exists. Connections are kept alive and reused (HTTP/1.1, a pool per destination);
//! each destination keeps its load (requests in flight), a moving average of its latency
//! and its circuit breaker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appliance_policy::Destination;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// Answers larger than this are refused.
const MAX_ANSWER: usize = 8 << 20;
/// Idle connections kept per destination, and how long one may idle before it is closed
/// (below the usual server keep-alive timeouts, so a reused connection is rarely stale).
const MAX_IDLE: usize = 256;
const IDLE_FOR: Duration = Duration::from_secs(30);

/// The system's CA bundle (Debian), used when a destination names no `ca_file`.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Nothing reached the client yet: another destination may be tried.
    #[error("{0}")]
    Unavailable(String),
    /// The upstream answered, but not something usable.
    #[error("{0}")]
    Bad(String),
}

#[derive(Debug, Default, Clone, Copy)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

/// One destination's connections and health. Rebuilt when the destination's URL or CA
/// bundle changes with a policy reload.
struct Endpoint {
    url: String,
    ca_file: Option<String>,
    tls: Mutex<Option<Arc<rustls::ClientConfig>>>,
    idle: Mutex<Vec<(SendRequest<Full<Bytes>>, Instant)>>,
    in_flight: AtomicU32,
    /// Moving average of the latency to the answer's first byte, µs; 0 = not measured.
    ewma_us: AtomicU64,
    breaker: Mutex<Breaker>,
}

/// What the gateway knows of a destination now (for ranking, explain and metrics).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Health {
    pub circuit: &'static str,
    pub in_flight: u32,
    /// Moving average latency to the first byte of the answer, ms (None: never measured).
    pub latency_ms: Option<f64>,
}

/// The upstream destinations the gateway has talked to: connection pools, load, latency
/// and circuit breakers. After `breaker_failures` failures in a row a destination is
/// skipped for `breaker_cooldown_ms`; then one request probes it (half-open): success
/// closes the circuit, failure opens it again.
#[derive(Default)]
pub struct Upstreams {
    map: Mutex<HashMap<String, Arc<Endpoint>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Upstreams {
    fn endpoint(&self, dest: &Destination) -> Arc<Endpoint> {
        let url = dest.url.clone().unwrap_or_default();
        let mut m = lock(&self.map);
        if let Some(e) = m.get(&dest.name) {
            if e.url == url && e.ca_file == dest.ca_file {
                return e.clone();
            }
        }
        let e = Arc::new(Endpoint {
            url,
            ca_file: dest.ca_file.clone(),
            tls: Mutex::new(None),
            idle: Mutex::new(vec![]),
            in_flight: AtomicU32::new(0),
            ewma_us: AtomicU64::new(0),
            breaker: Mutex::new(Breaker::default()),
        });
        m.insert(dest.name.clone(), e.clone());
        e
    }

    /// Whether a request may try `dest` now (and, if it is the half-open probe, marks it).
    pub fn allow(&self, dest: &Destination) -> bool {
        let e = self.endpoint(dest);
        let mut b = lock(&e.breaker);
        match b.open_until {
            None => true,
            Some(t) if Instant::now() < t => false,
            Some(_) if b.probing => false,
            Some(_) => {
                b.probing = true;
                true
            }
        }
    }

    pub fn success(&self, dest: &Destination) {
        *lock(&self.endpoint(dest).breaker) = Breaker::default();
    }

    pub fn failure(&self, dest: &Destination) {
        let e = self.endpoint(dest);
        let mut b = lock(&e.breaker);
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
            b.open_until = Some(Instant::now() + Duration::from_millis(dest.breaker_cooldown_ms));
            b.probing = false;
        }
    }

    pub fn health(&self, dest: &Destination) -> Health {
        let e = self.endpoint(dest);
        let circuit = match lock(&e.breaker).open_until {
            None => "closed",
            Some(t) if Instant::now() < t => "open",
            Some(_) => "half_open",
        };
        let us = e.ewma_us.load(Ordering::Relaxed);
        Health {
            circuit,
            in_flight: e.in_flight.load(Ordering::Relaxed),
            latency_ms: (us > 0).then(|| us as f64 / 1000.0),
        }
    }

    /// Orders `chain` for trying: destinations keep the rule's order between tiers;
    /// within a tier (destinations a rule lists as equally preferred) the one expected to
    /// answer first goes first (latency average × (requests in flight + 1); one never
    /// measured counts as fastest, so each gets tried), then the cheaper.
    pub fn rank(&self, chain: &mut [(Destination, usize)]) {
        let cost = |d: &Destination| {
            let e = self.endpoint(d);
            e.ewma_us.load(Ordering::Relaxed) * (u64::from(e.in_flight.load(Ordering::Relaxed)) + 1)
        };
        if chain.len() < 2 {
            return;
        }
        // The total order of `f64::total_cmp`, as an integer key.
        let price = |d: &Destination| {
            let b = (d.price_in_per_1k + d.price_out_per_1k).to_bits() as i64;
            b ^ (((b >> 63) as u64) >> 1) as i64
        };
        // Stable: equal destinations keep the rule's order.
        chain.sort_by_cached_key(|(d, tier)| (*tier, cost(d), price(d)));
    }

    /// Sends `body` (JSON) to `dest`'s `path` and waits for the status line (within the
    /// destination's timeout). 5xx and connection failures are `Unavailable`.
    pub async fn post(
        &self,
        dest: &Destination,
        credential: Option<&str>,
        path: &str,
        body: Bytes,
    ) -> Result<Answer, UpstreamError> {
        let e = self.endpoint(dest);
        let limit = Duration::from_millis(dest.timeout_ms.max(1));
        let lease = Lease::new(e.clone());
        let sent = tokio::time::timeout(limit, e.exchange(dest, credential, path, body)).await;
        let (sender, resp) = match sent {
            Ok(r) => r?,
            Err(_) => {
                return Err(UpstreamError::Unavailable(format!(
                    "{}: no answer within {} ms",
                    dest.name, dest.timeout_ms
                )))
            }
        };
        let status = resp.status();
        if status.is_server_error() {
            return Err(UpstreamError::Unavailable(format!(
                "{}: HTTP {status}",
                dest.name
            )));
        }
        if !status.is_success() {
            // The body may echo the request: it is not read into any message.
            return Err(UpstreamError::Bad(format!("{}: HTTP {status}", dest.name)));
        }
        Ok(Answer {
            name: dest.name.clone(),
            limit,
            deadline: Instant::now() + limit,
            body: resp.into_body(),
            buf: Vec::new(),
            lease,
            sender: Some(sender),
            done: false,
        })
    }
}

/// A request in flight to a destination: counts its load, measures its latency and hands
/// the connection back to the pool when the answer was read to its end.
struct Lease {
    e: Arc<Endpoint>,
    started: Instant,
    measured: bool,
}

impl Lease {
    fn new(e: Arc<Endpoint>) -> Self {
        e.in_flight.fetch_add(1, Ordering::Relaxed);
        Lease {
            e,
            started: Instant::now(),
            measured: false,
        }
    }

    /// The first byte of the answer arrived: one latency sample (weight 1/8).
    fn first_byte(&mut self) {
        if self.measured {
            return;
        }
        self.measured = true;
        let us = (self.started.elapsed().as_micros() as u64).max(1);
        let old = self.e.ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { old - old / 8 + us / 8 };
        self.e.ewma_us.store(new.max(1), Ordering::Relaxed);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.e.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Endpoint {
    fn tls_config(&self, dest: &Destination) -> Result<Arc<rustls::ClientConfig>, UpstreamError> {
        if let Some(c) = lock(&self.tls).as_ref() {
            return Ok(c.clone());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| UpstreamError::Bad(e.to_string()))?
            .with_root_certificates(roots(dest)?)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        *lock(&self.tls) = Some(cfg.clone());
        Ok(cfg)
    }

    /// An idle connection that is still open, if any.
    async fn pooled(&self) -> Option<SendRequest<Full<Bytes>>> {
        loop {
            let (mut s, since) = lock(&self.idle).pop()?;
            if s.is_closed() || since.elapsed() > IDLE_FOR {
                continue;
            }
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(100), s.ready()).await {
                return Some(s);
            }
        }
    }

    async fn connect(
        &self,
        dest: &Destination,
        u: &Url<'_>,
    ) -> Result<SendRequest<Full<Bytes>>, UpstreamError> {
        let down = |what: &str, e: &dyn std::fmt::Display| {
            UpstreamError::Unavailable(format!("{}: {what}: {e}", dest.name))
        };
        let tcp = tokio::net::TcpStream::connect((u.host, u.port))
            .await
            .map_err(|e| down("connect", &e))?;
        let _ = tcp.set_nodelay(true);
        if u.tls {
            let name = ServerName::try_from(u.host.to_string())
                .map_err(|e| UpstreamError::Bad(format!("{}: {e}", dest.name)))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls_config(dest)?)
                .connect(name, tcp)
                .await
                .map_err(|e| down("TLS", &e))?;
            handshake(TokioIo::new(tls)).await
        } else {
            handshake(TokioIo::new(tcp)).await
        }
        .map_err(|e| down("HTTP", &e))
    }

    async fn exchange(
        &self,
        dest: &Destination,
        credential: Option<&str>,
        path: &str,
        body: Bytes,
    ) -> Result<
        (
            SendRequest<Full<Bytes>>,
            http::Response<hyper::body::Incoming>,
        ),
        UpstreamError,
    > {
        let url = dest.url.as_deref().unwrap_or("");
        let u = parse_url(url)?;
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("{}{path}", u.base))
            .header(http::header::HOST, u.host)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "sovereign-appliance");
        if let Some(c) = credential {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {c}"));
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| UpstreamError::Bad(e.to_string()))?;
        // A pooled connection the server closed meanwhile gives the request back
        // unsent: it then goes on a new connection.
        let mut req = Some(req);
        if let Some(mut s) = self.pooled().await {
            match s.try_send_request(req.take().expect("request")).await {
                Ok(resp) => return Ok((s, resp)),
                Err(mut e) => match e.take_message() {
                    Some(r) => req = Some(r),
                    None => {
                        return Err(UpstreamError::Unavailable(format!(
                            "{}: HTTP: {}",
                            dest.name,
                            e.error()
                        )))
                    }
                },
            }
        }
        let mut s = self.connect(dest, &u).await?;
        let resp = s
            .send_request(req.expect("request"))
            .await
            .map_err(|e| UpstreamError::Unavailable(format!("{}: HTTP: {e}", dest.name)))?;
        Ok((s, resp))
    }
}

async fn handshake<T>(io: TokioIo<T>) -> Result<SendRequest<Full<Bytes>>, hyper::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Hands a connection whose answer was read to its end back to the pool.
fn pool(e: &Endpoint, s: SendRequest<Full<Bytes>>) {
    if !s.is_closed() {
        let mut idle = lock(&e.idle);
        if idle.len() < MAX_IDLE {
            idle.push((s, Instant::now()));
        }
    }
}

/// An upstream's answer, status checked: read whole (`json`) or as server-sent events
/// (`event`). Each read waits at most the destination's timeout; a whole answer must
/// come within it. Read to its end, the connection goes back to the pool.
pub struct Answer {
    name: String,
    limit: Duration,
    deadline: Instant,
    body: hyper::body::Incoming,
    buf: Vec<u8>,
    lease: Lease,
    sender: Option<SendRequest<Full<Bytes>>>,
    done: bool,
}

impl Answer {
    fn release(&mut self) {
        if let Some(s) = self.sender.take() {
            pool(&self.lease.e, s);
        }
    }

    /// The whole answer's bytes.
    pub async fn bytes(self) -> Result<Bytes, UpstreamError> {
        let Answer {
            name,
            limit,
            deadline,
            body,
            mut lease,
            sender,
            ..
        } = self;
        let left = deadline.saturating_duration_since(Instant::now());
        let bytes = match tokio::time::timeout(left, Limited::new(body, MAX_ANSWER).collect()).await
        {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) => {
                return Err(UpstreamError::Unavailable(format!(
                    "{name}: reading the answer: {e}"
                )))
            }
            Err(_) => {
                return Err(UpstreamError::Unavailable(format!(
                    "{name}: no whole answer within {} ms",
                    limit.as_millis()
                )))
            }
        };
        lease.first_byte();
        if let Some(s) = sender {
            pool(&lease.e, s);
        }
        Ok(bytes)
    }

    /// The next server-sent event's data (`None` after `[DONE]` or at the end of the
    /// body). An error means the stream broke (or stalled past the timeout).
    pub async fn event(&mut self) -> Result<Option<String>, UpstreamError> {
        loop {
            if let Some(data) = self.take_event()? {
                if data == "[DONE]" {
                    self.done = true;
                }
                if self.done {
                    self.drain().await;
                    return Ok(None);
                }
                self.lease.first_byte();
                return Ok(Some(data));
            }
            if self.done {
                return Ok(None);
            }
            let frame = match tokio::time::timeout(self.limit, self.body.frame()).await {
                Err(_) => {
                    return Err(UpstreamError::Unavailable(format!(
                        "{}: nothing for {} ms in the stream",
                        self.name,
                        self.limit.as_millis()
                    )))
                }
                Ok(None) => {
                    self.done = true;
                    if self.buf.iter().all(u8::is_ascii_whitespace) {
                        self.release();
                        // The end came without [DONE]: the caller decides whether the
                        // answer was complete.
                        return Ok(None);
                    }
                    return Err(UpstreamError::Unavailable(format!(
                        "{}: the stream ended inside an event",
                        self.name
                    )));
                }
                Ok(Some(Err(e))) => {
                    return Err(UpstreamError::Unavailable(format!(
                        "{}: the stream broke: {e}",
                        self.name
                    )))
                }
                Ok(Some(Ok(f))) => f,
            };
            if let Ok(data) = frame.into_data() {
                if self.buf.len() + data.len() > MAX_ANSWER {
                    return Err(UpstreamError::Bad(format!(
                        "{}: an event over {MAX_ANSWER} bytes",
                        self.name
                    )));
                }
                self.buf.extend_from_slice(&data);
            }
        }
    }

    /// After [DONE]: reads what is left of the body (normally nothing) so the connection
    /// can be reused.
    async fn drain(&mut self) {
        if self.sender.is_none() {
            return;
        }
        loop {
            match tokio::time::timeout(Duration::from_millis(200), self.body.frame()).await {
                Ok(None) => return self.release(),
                Ok(Some(Ok(_))) => continue,
                _ => return,
            }
        }
    }

    /// One complete event from the buffer: its `data:` lines joined by newlines
    /// (comments and other fields are skipped; events without data too).
    fn take_event(&mut self) -> Result<Option<String>, UpstreamError> {
        loop {
            let Some((end, sep)) = find_blank_line(&self.buf) else {
                return Ok(None);
            };
            let raw: Vec<u8> = self.buf.drain(..end + sep).collect();
            let text = std::str::from_utf8(&raw[..end]).map_err(|_| {
                UpstreamError::Bad(format!("{}: an event that is not UTF-8", self.name))
            })?;
            let mut data: Option<String> = None;
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("data:") {
                    let v = v.strip_prefix(' ').unwrap_or(v);
                    match &mut data {
                        Some(d) => {
                            d.push('\n');
                            d.push_str(v);
                        }
                        None => data = Some(v.to_string()),
                    }
                }
            }
            if let Some(d) = data {
                return Ok(Some(d));
            }
        }
    }
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

/// The end of the first event in `buf` and the length of the blank line ending it.
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some((i, 2));
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, 3));
            }
        }
        i += 1;
    }
    None
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
        let b = Upstreams::default();
        assert!(b.allow(&d));
        b.failure(&d);
        assert!(b.allow(&d), "one failure of two");
        b.failure(&d);
        assert_eq!(b.health(&d).circuit, "open");
        assert!(!b.allow(&d));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.health(&d).circuit, "half_open");
        assert!(b.allow(&d), "the probe");
        assert!(!b.allow(&d), "only one probe at a time");
        b.failure(&d);
        assert_eq!(
            b.health(&d).circuit,
            "open",
            "a failed probe opens it again"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.allow(&d));
        b.success(&d);
        assert_eq!(b.health(&d).circuit, "closed");
        assert!(b.allow(&d) && b.allow(&d));
    }

    fn priced(name: &str, price: f64) -> Destination {
        let mut d = dest(3, 1000);
        d.name = name.into();
        d.price_in_per_1k = price;
        d
    }

    #[test]
    fn ranking_keeps_tiers_then_prefers_fast_unloaded_then_cheap() {
        let u = Upstreams::default();
        let names = |c: &[(Destination, usize)]| -> Vec<String> {
            c.iter().map(|(d, _)| d.name.clone()).collect()
        };
        let (a, b, c) = (priced("a", 3.0), priced("b", 1.0), priced("c", 0.1));
        // Nothing measured: the cheaper of a tier first; tiers keep the rule's order.
        let mut chain = vec![(a.clone(), 0), (b.clone(), 0), (c.clone(), 1)];
        u.rank(&mut chain);
        assert_eq!(names(&chain), ["b", "a", "c"]);
        // Measured: the faster first, whatever the price ...
        u.endpoint(&a).ewma_us.store(10_000, Ordering::Relaxed);
        u.endpoint(&b).ewma_us.store(40_000, Ordering::Relaxed);
        u.rank(&mut chain);
        assert_eq!(names(&chain), ["a", "b", "c"]);
        // ... unless it is busy: 10 ms × (4 + 1) in flight is worse than 40 ms idle.
        u.endpoint(&a).in_flight.store(4, Ordering::Relaxed);
        u.rank(&mut chain);
        assert_eq!(names(&chain), ["b", "a", "c"]);
        let h = u.health(&a);
        assert_eq!(
            (h.circuit, h.in_flight, h.latency_ms),
            ("closed", 4, Some(10.0))
        );
    }

    #[test]
    fn latency_is_a_moving_average_and_leases_count_load() {
        let u = Upstreams::default();
        let d = priced("d", 0.0);
        let e = u.endpoint(&d);
        {
            let mut l = Lease::new(e.clone());
            assert_eq!(u.health(&d).in_flight, 1);
            l.started -= Duration::from_millis(80);
            l.first_byte();
            l.first_byte();
        }
        assert_eq!(u.health(&d).in_flight, 0);
        let first = u.health(&d).latency_ms.unwrap();
        assert!((80.0..200.0).contains(&first), "{first}");
        let mut l = Lease::new(e.clone());
        l.first_byte();
        drop(l);
        let second = u.health(&d).latency_ms.unwrap();
        assert!(
            second < first && second > first * 0.8,
            "{first} then {second}"
        );
    }

    #[test]
    fn server_sent_events_are_split_on_blank_lines() {
        assert_eq!(find_blank_line(b"data: x\n\ndata: y"), Some((7, 2)));
        assert_eq!(find_blank_line(b"data: x\r\n\r\n"), Some((8, 3)));
        assert_eq!(find_blank_line(b"data: x\n"), None);
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
