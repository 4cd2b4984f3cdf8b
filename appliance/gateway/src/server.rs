//! The HTTPS listener: accept, TLS handshake, HTTP/1.1 or HTTP/2 (ALPN), routing, and the
//! drain on shutdown.
//!
//! Drain: once the shutdown future resolves, new API requests get 503 (the listener stays
//! open, so clients get an answer rather than a refused connection) while requests in
//! flight run to their end. At the drain deadline the remaining streams end with an error
//! event, connections are closed gracefully, and `serve` returns.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use appliance_audit::{Auditor, Record};
use appliance_supervisor::Worker;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::auth::{KeyEntry, KeyTable};
use crate::conn::{ConnWatch, PerAddress, Watched};
use crate::error::ApiError;
use crate::metrics::{Metrics, Snapshot};

/// Limits and timeouts of the API listener. Every field has a documented default.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// Most chat messages in one request.
    pub max_messages: usize,
    /// Largest `max_tokens` a client may ask for; also the default when it asks none.
    pub max_tokens_cap: usize,
    /// Requests admitted per model at once (running or queued in its worker); 503 above.
    pub queue_per_model: usize,
    /// Time to receive a request's headers (HTTP/1.1).
    pub header_timeout: Duration,
    /// Time to receive a request's body.
    pub body_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    /// Open connections at most; further ones are closed at once.
    pub max_connections: usize,
    /// Open connections per client address at most.
    pub max_connections_per_address: usize,
    /// A connection with no traffic and no request being handled for this long is closed.
    pub idle_timeout: Duration,
    /// A stream whose client reads nothing for this long is ended (its slot freed).
    pub stall_timeout: Duration,
    /// How long in-flight requests get to finish on shutdown.
    pub drain_timeout: Duration,
    /// The data directory, whose disk the hardware inventory reports.
    pub data_dir: Option<std::path::PathBuf>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_body_bytes: 1 << 20,
            max_messages: 256,
            max_tokens_cap: 4096,
            queue_per_model: 64,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_connections_per_address: 512,
            idle_timeout: Duration::from_secs(120),
            stall_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            data_dir: None,
        }
    }
}

/// One worker process serving a model, where placement put it.
#[derive(Debug)]
pub struct Instance {
    pub worker: Arc<Worker>,
    /// "cpu", "cuda:0".
    pub device: String,
    /// Placement's memory estimate in bytes.
    pub estimate: u64,
    /// Requests admitted to this instance and not finished.
    pub in_flight: AtomicUsize,
}

impl Instance {
    pub fn new(worker: Arc<Worker>, device: String, estimate: u64) -> Instance {
        Instance {
            worker,
            device,
            estimate,
            in_flight: AtomicUsize::new(0),
        }
    }
}

/// A model the API serves: one or more instances, and its gateway-side queue.
#[derive(Debug)]
pub struct ModelRoute {
    pub name: String,
    pub instances: Vec<Instance>,
    pub created: u64,
    /// Requests admitted for the model (all instances) and not finished.
    pub in_flight: AtomicUsize,
}

/// A queue slot on one instance; released when dropped.
pub(crate) struct Slot(Arc<ModelRoute>, usize);

impl Slot {
    pub fn instance(&self) -> &Instance {
        &self.0.instances[self.1]
    }

    pub fn index(&self) -> usize {
        self.1
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.instances[self.1]
            .in_flight
            .fetch_sub(1, Ordering::AcqRel);
    }
}

impl ModelRoute {
    pub fn new(name: String, instances: Vec<Instance>) -> ModelRoute {
        ModelRoute {
            name,
            instances,
            created: unix_now() as u64,
            in_flight: AtomicUsize::new(0),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.instances.iter().any(|i| i.worker.is_ready())
    }

    /// Every instance failed for good: the model file cannot be used.
    pub fn gave_up(&self) -> bool {
        self.instances.iter().all(|i| i.worker.gave_up())
    }

    /// A slot on the ready instance with the fewest requests (not one in `skip`), if the
    /// model's queue (`max` per instance) has room.
    pub(crate) fn try_slot(self: &Arc<Self>, max: usize, skip: &[usize]) -> Option<Slot> {
        let cap = max * self.instances.len();
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()?;
        let best = self
            .instances
            .iter()
            .enumerate()
            .filter(|(k, i)| i.worker.is_ready() && !skip.contains(k))
            .min_by_key(|(_, i)| i.in_flight.load(Ordering::Acquire))
            .map(|(k, _)| k);
        match best {
            Some(k) => {
                self.instances[k].in_flight.fetch_add(1, Ordering::AcqRel);
                Some(Slot(self.clone(), k))
            }
            None => {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                None
            }
        }
    }
}

/// Counts a generation request in flight for the drain.
pub(crate) struct InFlight(Arc<Gateway>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct Gateway {
    pub(crate) cfg: GatewayConfig,
    pub(crate) keys: Arc<KeyTable>,
    models: std::sync::RwLock<Vec<Arc<ModelRoute>>>,
    pub(crate) metrics: Metrics,
    /// Usage not yet in the store, by key id (looked up borrowed: a request copies no
    /// name once its key, hour and model have a row).
    usage: std::sync::Mutex<std::collections::HashMap<String, Vec<UsageRow>>>,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    pub(crate) hard_stop: watch::Sender<bool>,
    request_prefix: String,
    request_counter: AtomicU64,
    admin: std::sync::OnceLock<Arc<dyn crate::admin::AdminOps>>,
    pub(crate) audit: Auditor,
    policy: std::sync::RwLock<Arc<PolicyState>>,
    pub(crate) upstreams: crate::upstream::Upstreams,
}

/// The policy in force and what its audit content mode needs.
pub struct PolicyState {
    pub policy: appliance_policy::Policy,
    pub content: Evidence,
    /// Upstream credentials by name (secrets: never logged, never recorded).
    pub credentials: std::collections::BTreeMap<String, String>,
}

/// The content evidence a policy asks each request's record to carry.
pub enum Evidence {
    /// None (the default): no trace of the texts.
    None,
    /// A keyed HMAC of the texts (the site's key).
    Hmac(ring::hmac::Key),
    /// The texts sealed to the auditor's X25519 public key.
    Sealed([u8; 32]),
}

impl Evidence {
    /// The evidence for request `id` with these texts; `Err` when sealing failed (the
    /// request is then refused: the policy asked for a record it cannot get).
    pub fn of(&self, id: &str, parts: &[&str]) -> Result<Option<String>, String> {
        match self {
            Evidence::None => Ok(None),
            Evidence::Hmac(k) => Ok(Some(crate::openai::content_hmac(k, parts))),
            Evidence::Sealed(r) => appliance_audit::content::seal(r, id, parts)
                .map(Some)
                .map_err(|e| e.to_string()),
        }
    }
}

/// What the policy decided about a request, for its audit record.
#[derive(Clone, Debug, Default)]
pub(crate) struct PolicyNote {
    pub decision: String,
    pub classes: Vec<String>,
    pub version: String,
    pub content: Option<String>,
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What the access log and metrics record about a request: never its content.
#[derive(Clone)]
pub(crate) struct ReqCtx {
    pub id: String,
    pub method: Method,
    pub version: http::Version,
    pub route: &'static str,
    pub start: Instant,
    pub peer: SocketAddr,
    pub tenant: Option<String>,
    pub key: Option<String>,
    pub model: Option<String>,
    /// The audit record's action (from the route; admin routes refine it).
    pub action: &'static str,
    /// Where the request was sent, once routed.
    pub destination: Option<String>,
    /// The destination's jurisdiction, when it is an upstream.
    pub jurisdiction: Option<String>,
    /// The policy's decision, once made.
    pub policy: Option<PolicyNote>,
}

/// A handler's answer: complete (the caller records it), or a generation that records
/// itself (when it ends, whether answered whole, streamed, or abandoned by its client).
pub(crate) enum Reply {
    Done(Response<Body>),
    Settled(Response<Body>),
}

/// `format!("req_{prefix}{n:010x}")` without the formatting machinery (once a request).
fn request_id(prefix: &str, n: u64) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (16 - n.leading_zeros().min(60) as usize / 4).max(10);
    let mut id = String::with_capacity(4 + prefix.len() + digits);
    id.push_str("req_");
    id.push_str(prefix);
    for i in (0..digits).rev() {
        id.push(HEX[(n >> (4 * i) & 0xf) as usize] as char);
    }
    id
}

/// One key's usage in one hour with one model, not yet in the store.
struct UsageRow {
    hour: i64,
    tenant: String,
    model: String,
    requests: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
}

/// Response bodies: complete bytes or a stream of SSE frames from a channel.
pub enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Body::Full(Some(b)) => http_body::SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => http_body::SizeHint::with_exact(0),
            Body::Stream(_) => http_body::SizeHint::default(),
        }
    }
}

fn base_response(
    status: StatusCode,
    content_type: &'static str,
    id: &str,
) -> http::response::Builder {
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-store")
        .header("x-content-type-options", "nosniff")
        .header("strict-transport-security", "max-age=31536000");
    if let Ok(v) = HeaderValue::from_str(id) {
        b = b.header("x-request-id", v);
    }
    b
}

pub(crate) fn json_response<T: Serialize>(status: StatusCode, v: &T, id: &str) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    base_response(status, "application/json", id)
        .body(Body::Full(Some(body.into())))
        .unwrap_or_else(|_| Response::new(Body::Full(None)))
}

pub(crate) fn error_response(e: &ApiError, id: &str) -> Response<Body> {
    let mut r = json_response(e.status(), &e.body(), id);
    for (name, value) in e.headers() {
        if let Ok(v) = HeaderValue::from_str(&value) {
            r.headers_mut().insert(name, v);
        }
    }
    if matches!(e, ApiError::Draining) {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

pub(crate) fn sse_response(rx: mpsc::Receiver<Bytes>, id: &str) -> Response<Body> {
    base_response(StatusCode::OK, "text/event-stream", id)
        .header("x-accel-buffering", "no")
        .body(Body::Stream(rx))
        .unwrap_or_else(|_| Response::new(Body::Full(None)))
}

fn route_of(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/models" => "/v1/models",
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        "/admin/v1/status" => "/admin/v1/status",
        "/v1/policy/explain" => "/v1/policy/explain",
        p if p.starts_with("/admin/v1/models/")
            && (p.ends_with("/load") || p.ends_with("/unload")) =>
        {
            "/admin/v1/models/{id}/{action}"
        }
        _ => "other",
    }
}

/// The methods a route answers (the `Allow` header of a 405).
fn allowed_methods(route: &str) -> &'static str {
    match route {
        "/v1/chat/completions"
        | "/v1/completions"
        | "/v1/policy/explain"
        | "/admin/v1/models/{id}/{action}" => "POST",
        _ => "GET, HEAD",
    }
}

/// An answer to HEAD: the GET answer's status and headers (its length included), no body.
fn without_body(resp: Response<Body>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    if let Some(n) = http_body::Body::size_hint(&body).exact() {
        parts.headers.insert(header::CONTENT_LENGTH, n.into());
    }
    Response::from_parts(parts, Body::Full(None))
}

/// The audit action of a route.
fn action_of(route: &str) -> &'static str {
    match route {
        "/v1/chat/completions" => "chat.completions",
        "/v1/completions" => "completions",
        "/v1/models" => "models.list",
        "/v1/models/{id}" => "models.get",
        "/metrics" => "metrics.read",
        "/admin/v1/status" => "admin.status",
        "/v1/policy/explain" => "policy.explain",
        "/admin/v1/models/{id}/{action}" => "admin.model",
        "/healthz" | "/readyz" => "health",
        _ => "unknown_route",
    }
}

impl Gateway {
    pub fn new(
        cfg: GatewayConfig,
        keys: Arc<KeyTable>,
        models: Vec<Arc<ModelRoute>>,
        audit: Auditor,
    ) -> Arc<Gateway> {
        let (hard_stop, _) = watch::channel(false);
        Arc::new(Gateway {
            cfg,
            keys,
            models: std::sync::RwLock::new(models),
            metrics: Metrics::default(),
            usage: Default::default(),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            hard_stop,
            request_prefix: crate::keys::random_hex::<4>(),
            request_counter: AtomicU64::new(0),
            admin: std::sync::OnceLock::new(),
            audit,
            upstreams: Default::default(),
            policy: std::sync::RwLock::new(Arc::new(PolicyState {
                policy: appliance_policy::Policy::builtin(),
                content: Evidence::None,
                credentials: Default::default(),
            })),
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<PolicyState> {
        self.policy
            .read()
            .map(|p| p.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Puts a (validated) policy in force for the requests that start from now on.
    pub fn set_policy(&self, state: PolicyState) {
        let state = Arc::new(state);
        match self.policy.write() {
            Ok(mut p) => *p = state,
            Err(e) => *e.into_inner() = state,
        }
    }

    /// The usage counted since the last call (for the daemon to add to the store).
    pub fn take_usage(&self) -> Vec<appliance_store::Usage> {
        let taken = std::mem::take(&mut *self.usage.lock().unwrap_or_else(|e| e.into_inner()));
        taken
            .into_iter()
            .flat_map(|(key_id, rows)| {
                rows.into_iter().map(move |r| appliance_store::Usage {
                    hour: r.hour,
                    tenant: r.tenant,
                    key_id: key_id.clone(),
                    model: r.model,
                    requests: r.requests,
                    prompt_tokens: r.prompt_tokens,
                    completion_tokens: r.completion_tokens,
                })
            })
            .collect()
    }

    /// Totals for the console's dashboard.
    pub fn metrics_summary(&self) -> crate::metrics::Summary {
        self.metrics.summary()
    }

    /// Each upstream destination of the policy in force, with what the gateway knows of
    /// its health now.
    pub fn upstream_health(&self) -> Vec<(appliance_policy::Destination, crate::upstream::Health)> {
        self.policy()
            .policy
            .destinations
            .values()
            .filter(|d| d.kind != appliance_policy::Kind::Local)
            .map(|d| (d.clone(), self.upstreams.health(d)))
            .collect()
    }

    pub fn keys(&self) -> &Arc<KeyTable> {
        &self.keys
    }

    /// Connects the admin API to the daemon's model set.
    pub fn set_admin(&self, ops: Arc<dyn crate::admin::AdminOps>) {
        let _ = self.admin.set(ops);
    }

    fn authenticate_admin(
        &self,
        headers: &http::HeaderMap,
        ctx: &mut ReqCtx,
    ) -> Result<Arc<KeyEntry>, ApiError> {
        let key = self.authenticate(headers, ctx)?;
        if !key.admin {
            return Err(ApiError::WrongScope(
                "This endpoint needs an admin key (appliance key create --admin).",
            ));
        }
        Ok(key)
    }

    /// The models served now.
    pub fn models(&self) -> Vec<Arc<ModelRoute>> {
        self.models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts routing to a model; false if the name is taken.
    pub fn add_model(&self, route: Arc<ModelRoute>) -> bool {
        let mut m = self.models.write().unwrap_or_else(|p| p.into_inner());
        if m.iter().any(|r| r.name == route.name) {
            return false;
        }
        m.push(route);
        true
    }

    /// Stops routing to a model (new requests get 404); requests in flight go on.
    pub fn remove_model(&self, name: &str) -> Option<Arc<ModelRoute>> {
        let mut m = self.models.write().unwrap_or_else(|p| p.into_inner());
        let i = m.iter().position(|r| r.name == name)?;
        Some(m.remove(i))
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    pub(crate) fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    pub fn model(&self, name: &str) -> Option<Arc<ModelRoute>> {
        self.models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|m| m.name == name)
            .cloned()
    }

    fn next_request_id(&self) -> String {
        let n = self.request_counter.fetch_add(1, Ordering::Relaxed);
        request_id(&self.request_prefix, n)
    }

    /// Workers and hardware, for the CLI (`appliance status`) and the console.
    pub fn status(&self) -> serde_json::Value {
        let mut workers = Vec::new();
        for m in self.models() {
            for (k, inst) in m.instances.iter().enumerate() {
                let st = inst.worker.status();
                workers.push(serde_json::json!({
                    "model": m.name,
                    "instance": k,
                    "state": st.state.as_str(),
                    "pid": st.pid,
                    "restarts": st.restarts,
                    "consecutive_failures": st.consecutive_failures,
                    "last_error": st.last_error,
                    "gave_up": st.gave_up,
                    "device": inst.device,
                    "estimate_bytes": inst.estimate,
                    "in_flight": inst.in_flight.load(Ordering::Acquire),
                }));
            }
        }
        serde_json::json!({
            "draining": self.is_draining(),
            "in_flight": self.in_flight(),
            "workers": workers,
            "inventory": self.cfg.data_dir.as_ref().map(|d| appliance_supervisor::inventory::read(d)),
        })
    }

    fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot {
            inventory: self
                .cfg
                .data_dir
                .as_ref()
                .map(|d| appliance_supervisor::inventory::read(d)),
            in_flight: self.in_flight() as u64,
            keys: self.keys.len() as u64,
            draining: self.is_draining(),
            ..Default::default()
        };
        for m in &self.models() {
            s.queue_depth
                .push((m.name.clone(), m.in_flight.load(Ordering::Acquire) as u64));
            for (k, inst) in m.instances.iter().enumerate() {
                let st = inst.worker.status();
                let id = (m.name.clone(), k);
                for state in appliance_supervisor::WorkerState::ALL {
                    s.worker_states
                        .push((id.clone(), state.as_str(), u8::from(st.state == state)));
                }
                s.worker_restarts.push((id.clone(), st.restarts));
                s.worker_failures
                    .push((id.clone(), st.consecutive_failures as u64));
                s.placements.push((id, inst.device.clone(), inst.estimate));
            }
        }
        s
    }

    /// Records a finished request in the metrics and the access log.
    pub(crate) fn finish(&self, ctx: &ReqCtx, status: u16, usage: Option<(usize, usize)>) {
        let elapsed = ctx.start.elapsed();
        let tenant = ctx.tenant.as_deref().unwrap_or("-");
        self.metrics.request(
            ctx.route,
            status,
            tenant,
            ctx.key.as_deref().unwrap_or("-"),
            elapsed,
        );
        if let (Some((p, c)), Some(key), Some(model)) = (usage, &ctx.key, &ctx.model) {
            self.metrics.tokens(tenant, key, model, p, c);
        }
        if let (Some(t), Some(k)) = (&ctx.tenant, &ctx.key) {
            let (p, c) = usage.unwrap_or((0, 0));
            let hour = unix_now().div_euclid(3600);
            let model = ctx.model.as_deref().unwrap_or("-");
            let mut u = self.usage.lock().unwrap_or_else(|e| e.into_inner());
            if !u.contains_key(k.as_str()) {
                u.insert(k.clone(), Vec::new());
            }
            let rows = u.get_mut(k.as_str()).expect("present: inserted above");
            let i = match rows
                .iter()
                .position(|r| r.hour == hour && r.tenant == *t && r.model == model)
            {
                Some(i) => i,
                None => {
                    rows.push(UsageRow {
                        hour,
                        tenant: t.clone(),
                        model: model.to_string(),
                        requests: 0,
                        prompt_tokens: 0,
                        completion_tokens: 0,
                    });
                    rows.len() - 1
                }
            };
            let r = &mut rows[i];
            r.requests += 1;
            r.prompt_tokens += p as i64;
            r.completion_tokens += c as i64;
        }
        let (p, c) = usage.unwrap_or((0, 0));
        let key = ctx.key.as_deref().unwrap_or("-");
        let model = ctx.model.as_deref().unwrap_or("-");
        let ms = elapsed.as_secs_f64() * 1e3;
        // Key-values become journal fields (REQUEST_ID, TENANT, ...) under systemd.
        log::info!(
            target: "access",
            request_id = ctx.id.as_str(), client:% = ctx.peer.ip(), route = ctx.route,
            status = status, tenant = tenant, key_id = key, model = model,
            prompt_tokens = p, completion_tokens = c, ms = ms;
            "{} {} {} {} status={status} tenant={tenant} key={key} model={model} prompt_tokens={p} completion_tokens={c} ms={ms:.1}",
            ctx.id,
            ctx.peer.ip(),
            ctx.method,
            ctx.route,
        );
    }

    async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        watch: Arc<ConnWatch>,
    ) -> Response<Body> {
        let _handling = watch.handler();
        let route = route_of(req.uri().path());
        // HEAD is GET without the body (load balancers probe with it).
        let head = req.method() == Method::HEAD;
        if head {
            *req.method_mut() = Method::GET;
        }
        let mut ctx = ReqCtx {
            id: self.next_request_id(),
            method: req.method().clone(),
            version: req.version(),
            route,
            start: Instant::now(),
            peer,
            tenant: None,
            key: None,
            model: None,
            action: action_of(route),
            destination: None,
            jurisdiction: None,
            policy: None,
        };
        // Health probes carry no identity and touch nothing: the only unaudited routes.
        let audited = !matches!(route, "/healthz" | "/readyz");
        let (resp, error) = match self.dispatch(req, &mut ctx).await {
            Ok(Reply::Settled(resp)) => return resp,
            Ok(Reply::Done(resp)) => (resp, None),
            Err(e) => (error_response(&e, &ctx.id), Some(e)),
        };
        let status = resp.status().as_u16();
        if audited {
            let code = error.as_ref().map(ApiError::code);
            let record = self.audit_record(&ctx, status, code, None);
            if self.audit.record(record).await.is_err() {
                // No record, no answer.
                self.finish(&ctx, 503, None);
                return error_response(&ApiError::AuditUnavailable, &ctx.id);
            }
        }
        self.finish(&ctx, status, None);
        let mut resp = resp;
        if status == 405 {
            if let Ok(v) = http::HeaderValue::from_str(allowed_methods(route)) {
                resp.headers_mut().insert(header::ALLOW, v);
            }
        }
        if head {
            return without_body(resp);
        }
        resp
    }

    /// Writes the record that resolves a request's intent. `Err` when it could not be
    /// written: a 503 `audit_unavailable` record is then left to the writer to retry, and
    /// the client must get 503 instead of the outcome.
    pub(crate) async fn record_outcome(
        &self,
        ctx: &ReqCtx,
        ticket: appliance_audit::Ticket,
        status: u16,
        error: Option<String>,
        usage: Option<(usize, usize)>,
    ) -> Result<(), ()> {
        let record = self.audit_record(ctx, status, error, usage);
        match ticket.finish(record).await {
            Ok(_) => Ok(()),
            Err((_, t)) => {
                let refused = ApiError::AuditUnavailable;
                t.finish_later(self.audit_record(ctx, 503, Some(refused.code()), usage));
                Err(())
            }
        }
    }

    /// The audit record of a request: who, from where, what, on what, with what outcome;
    /// never its content.
    pub(crate) fn audit_record(
        &self,
        ctx: &ReqCtx,
        status: u16,
        error: Option<String>,
        usage: Option<(usize, usize)>,
    ) -> Record {
        let (p, c) = usage.unwrap_or((0, 0));
        let policy = ctx.policy.clone().unwrap_or_default();
        Record {
            decision: (!policy.decision.is_empty()).then_some(policy.decision),
            classes: policy.classes,
            policy_version: (!policy.version.is_empty()).then_some(policy.version),
            content: policy.content,
            tenant: ctx.tenant.clone(),
            key_id: ctx.key.clone(),
            source: Some(ctx.peer.ip().to_string()),
            action: ctx.action.to_string(),
            resource: ctx.model.clone(),
            destination: ctx.destination.clone(),
            jurisdiction: ctx.jurisdiction.clone(),
            status,
            error,
            prompt_tokens: p as u64,
            completion_tokens: c as u64,
            latency_ms: ctx.start.elapsed().as_millis() as u64,
            request_id: Some(ctx.id.clone()),
            ..Record::default()
        }
    }

    pub(crate) fn authenticate(
        &self,
        headers: &http::HeaderMap,
        ctx: &mut ReqCtx,
    ) -> Result<Arc<KeyEntry>, ApiError> {
        let key = self.keys.authenticate(
            headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
            unix_now(),
        )?;
        ctx.tenant = Some(key.tenant.clone());
        ctx.key = Some(key.id.clone());
        Ok(key)
    }

    async fn dispatch(
        self: &Arc<Self>,
        req: Request<Incoming>,
        ctx: &mut ReqCtx,
    ) -> Result<Reply, ApiError> {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        match (ctx.route, &method) {
            ("/healthz", &Method::GET) => Ok(Reply::Done(json_response(
                StatusCode::OK,
                &serde_json::json!({"status": "ok"}),
                &ctx.id,
            ))),
            ("/readyz", &Method::GET) => {
                let models = self.models();
                let ready: Vec<&str> = models
                    .iter()
                    .filter(|m| m.is_ready())
                    .map(|m| m.name.as_str())
                    .collect();
                let ok = !ready.is_empty() && !self.is_draining();
                let status = if ok {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let body = serde_json::json!({
                    "status": if ok { "ready" } else if self.is_draining() { "draining" } else { "not_ready" },
                    "ready_models": ready,
                });
                Ok(Reply::Done(json_response(status, &body, &ctx.id)))
            }
            ("/metrics", &Method::GET) => {
                let text = self.metrics.render(&self.snapshot());
                let r = base_response(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    &ctx.id,
                )
                .body(Body::Full(Some(text.into())))
                .unwrap_or_else(|_| Response::new(Body::Full(None)));
                Ok(Reply::Done(r))
            }
            ("/admin/v1/status", &Method::GET) => {
                self.authenticate_admin(req.headers(), ctx)?;
                Ok(Reply::Done(json_response(
                    StatusCode::OK,
                    &self.status(),
                    &ctx.id,
                )))
            }
            ("/v1/policy/explain", &Method::POST) => {
                let (parts, body) = req.into_parts();
                if let Err(e) = self.authenticate_admin(&parts.headers, ctx) {
                    let _ = self.read_body(ctx, &parts.headers, body, false).await;
                    return Err(e);
                }
                let body = self.read_body(ctx, &parts.headers, body, true).await?;
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Explain {
                    tenant: String,
                    request: Box<serde_json::value::RawValue>,
                }
                let e: Explain = crate::openai::parse_json(&body)?;
                let state = self.policy();
                let out = crate::openai::explain(
                    &state.policy,
                    &e.tenant,
                    e.request.get().as_bytes(),
                    &self.cfg,
                    Some(self),
                    None,
                )
                .map_err(|m| ApiError::invalid(format!("'request': {m}"), Some("request")))?;
                let note = PolicyNote {
                    decision: format!("explain: {}", out["rule"].as_str().unwrap_or("")),
                    classes: vec![],
                    version: state.policy.version.clone(),
                    content: None,
                };
                ctx.policy = Some(note);
                Ok(Reply::Done(json_response(StatusCode::OK, &out, &ctx.id)))
            }
            ("/admin/v1/models/{id}/{action}", &Method::POST) => {
                let (parts, body) = req.into_parts();
                let _ = self.read_body(ctx, &parts.headers, body, false).await;
                self.authenticate_admin(&parts.headers, ctx)?;
                let rest = &path["/admin/v1/models/".len()..];
                let (name, action) = rest.rsplit_once('/').unwrap_or((rest, ""));
                ctx.model = Some(crate::openai::loggable(name));
                ctx.action = if action == "load" {
                    "admin.model.load"
                } else {
                    "admin.model.unload"
                };
                let ops = self
                    .admin
                    .get()
                    .ok_or_else(|| ApiError::AdminFailed("the admin API is not connected".into()))?
                    .clone();
                let result = match action {
                    "load" => ops.load(name.to_string()).await,
                    _ => ops.unload(name.to_string()).await,
                };
                log::info!(target: "admin", "{} {action} {name} by key {}: {result:?}", ctx.id, ctx.key.as_deref().unwrap_or("-"));
                match result {
                    Ok(message) => Ok(Reply::Done(json_response(
                        StatusCode::OK,
                        &serde_json::json!({"model": name, "action": action, "message": message}),
                        &ctx.id,
                    ))),
                    Err(crate::admin::AdminError::NotFound(_)) => {
                        Err(ApiError::ModelNotFound(name.to_string()))
                    }
                    Err(crate::admin::AdminError::Conflict(m)) => Err(ApiError::Conflict(m)),
                    Err(crate::admin::AdminError::Failed(m)) => Err(ApiError::AdminFailed(m)),
                }
            }
            ("/v1/models", &Method::GET) => {
                let key = self.authenticate(req.headers(), ctx)?;
                if key.admin {
                    return Err(ApiError::WrongScope(
                        "Admin keys are for the admin API; use an inference key.",
                    ));
                }
                Ok(Reply::Done(json_response(
                    StatusCode::OK,
                    &self.model_list(&key),
                    &ctx.id,
                )))
            }
            ("/v1/models/{id}", &Method::GET) => {
                let key = self.authenticate(req.headers(), ctx)?;
                if key.admin {
                    return Err(ApiError::WrongScope(
                        "Admin keys are for the admin API; use an inference key.",
                    ));
                }
                let name = &path["/v1/models/".len()..];
                ctx.model = Some(crate::openai::loggable(name));
                let m = self
                    .model(name)
                    .ok_or_else(|| ApiError::ModelNotFound(name.to_string()))?;
                if !key.may_use(name) {
                    return Err(ApiError::ModelNotAllowed(name.to_string()));
                }
                Ok(Reply::Done(json_response(
                    StatusCode::OK,
                    &model_object(&m),
                    &ctx.id,
                )))
            }
            ("/v1/chat/completions", &Method::POST) => crate::openai::chat(self, req, ctx).await,
            ("/v1/completions", &Method::POST) => crate::openai::completions(self, req, ctx).await,
            (route, _) => {
                // Read what the client sent so the error reaches it (see read_body).
                let (parts, body) = req.into_parts();
                let _ = self.read_body(ctx, &parts.headers, body, false).await;
                Err(if route == "other" {
                    ApiError::NoRoute(path)
                } else {
                    ApiError::MethodNotAllowed
                })
            }
        }
    }

    fn model_list(&self, key: &KeyEntry) -> appliance_api::openai::ModelList {
        appliance_api::openai::ModelList {
            object: "list",
            data: self
                .models()
                .iter()
                .filter(|m| key.may_use(&m.name))
                .map(|m| model_object(m))
                .collect(),
        }
    }

    /// Reads a request body up to the configured limit (`keep`), or drops it (`!keep`:
    /// an answer that does not need it), so that the client sees the answer. A body is
    /// read before any answer, and one over the limit (or not needed) is still read and
    /// dropped, up to 16 MiB past the limit: an HTTP/1.1 connection closed with unread
    /// data resets, and some HTTP/2 clients (curl 7.88) fail a request whose stream is
    /// reset while they still send, even after a complete answer. Except:
    ///
    /// - HTTP/1.1 with `Expect: 100-continue`, when the body is not needed or its
    ///   declared length is over the limit: answered before the client is told to send.
    /// - HTTP/2, a declared length beyond what would be drained: answered at once.
    ///
    /// On HTTP/2 a stream whose body is left unread is reset with NO_ERROR once its
    /// answer has been sent (the h2 crate does so), which asks the client to stop sending
    /// without failing its request (RFC 9113 §8.1); the connection stays up.
    pub(crate) async fn read_body(
        &self,
        ctx: &ReqCtx,
        headers: &http::HeaderMap,
        mut body: Incoming,
        keep: bool,
    ) -> Result<Bytes, ApiError> {
        let limit = self.cfg.max_body_bytes as u64;
        let give_up = limit + (16 << 20);
        let h2 = ctx.version == http::Version::HTTP_2;
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let waits = !h2
            && headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let too_large = declared.is_some_and(|d| d > limit);
        if (waits && (!keep || too_large)) || (h2 && declared.is_some_and(|d| d > give_up)) {
            return if keep && too_large {
                Err(ApiError::BodyTooLarge(limit as usize))
            } else {
                Ok(Bytes::new())
            };
        }
        let capacity = if keep {
            declared.unwrap_or(0).min(limit).min(64 << 10)
        } else {
            0
        };
        let mut buf = bytes::BytesMut::with_capacity(capacity as usize);
        let mut seen: u64 = 0;
        let read = async {
            while let Some(frame) = body.frame().await {
                let frame = frame
                    .map_err(|_| ApiError::invalid("the request body could not be read", None))?;
                if let Ok(data) = frame.into_data() {
                    seen += data.len() as u64;
                    if seen > give_up {
                        break;
                    }
                    if keep && seen <= limit {
                        buf.extend_from_slice(&data);
                    }
                }
            }
            Ok::<_, ApiError>(())
        };
        match tokio::time::timeout(self.cfg.body_timeout, read).await {
            Err(_) => Err(ApiError::BodyTimeout),
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) if seen > limit => Err(ApiError::BodyTooLarge(limit as usize)),
            Ok(Ok(())) => Ok(buf.freeze()),
        }
    }

    /// One connection: TLS handshake, then HTTP/1.1 or HTTP/2 as ALPN says, watched for a
    /// first request and for idleness.
    async fn connection(
        self: Arc<Self>,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
        acceptor: tokio_rustls::TlsAcceptor,
        graceful: hyper_util::server::graceful::Watcher,
        h1: Arc<auto::Builder<TokioExecutor>>,
        h2: Arc<auto::Builder<TokioExecutor>>,
    ) {
        let tls = match tokio::time::timeout(self.cfg.tls_handshake_timeout, acceptor.accept(tcp))
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                log::debug!("TLS handshake with {peer} failed: {e}");
                return;
            }
            Err(_) => {
                log::debug!("TLS handshake with {peer} timed out");
                return;
            }
        };
        let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let watch = ConnWatch::new();
        let io = TokioIo::new(Watched::new(tls, watch.clone()));
        let gw = self.clone();
        let w = watch.clone();
        let svc = hyper::service::service_fn(move |req| {
            let gw = gw.clone();
            let w = w.clone();
            async move { Ok::<_, Infallible>(gw.handle(req, peer, w).await) }
        });
        let builder = if is_h2 { h2 } else { h1 };
        let conn = graceful.watch(builder.serve_connection(io, svc).into_owned());
        tokio::pin!(conn);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                r = &mut conn => {
                    if let Err(e) = r {
                        log::debug!("connection from {peer}: {e}");
                    }
                    return;
                }
                _ = tick.tick() => {
                    let first_request_late = watch.requests.load(Ordering::Relaxed) == 0
                        && watch.age() > self.cfg.header_timeout;
                    let idle = watch.handlers.load(Ordering::Acquire) == 0
                        && watch.idle_for() > self.cfg.idle_timeout;
                    if first_request_late || idle {
                        log::debug!("closing {} connection from {peer}", if idle { "an idle" } else { "a silent" });
                        return;
                    }
                }
            }
        }
    }

    /// Serves HTTPS on `listener` until `shutdown` resolves, then drains.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: impl Future<Output = ()>,
    ) {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let graceful = GracefulShutdown::new();
        let connections = Arc::new(Semaphore::new(self.cfg.max_connections));
        let per_address = Arc::new(PerAddress::default());
        // The protocol comes from ALPN: no sniffing of the first bytes (which has no
        // timeout of its own).
        let mut h1 = auto::Builder::new(TokioExecutor::new()).http1_only();
        h1.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.cfg.header_timeout)
            .max_buf_size(64 * 1024);
        let mut h2 = auto::Builder::new(TokioExecutor::new()).http2_only();
        h2.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(128)
            .max_header_list_size(64 * 1024)
            .max_pending_accept_reset_streams(Some(64));
        let (h1, h2) = (Arc::new(h1), Arc::new(h2));
        tokio::pin!(shutdown);
        let mut drain_started: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (tcp, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            // Out of descriptors and the like: back off a little.
                            log::warn!("accept: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Ok(permit) = connections.clone().try_acquire_owned() else {
                        log::warn!("connection from {peer} refused: {} connections open", self.cfg.max_connections);
                        continue;
                    };
                    let Some(address_slot) = per_address.try_open(peer.ip(), self.cfg.max_connections_per_address) else {
                        log::warn!("connection from {peer} refused: {} connections open from that address", self.cfg.max_connections_per_address);
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let acceptor = acceptor.clone();
                    let watcher = graceful.watcher();
                    let (h1, h2) = (h1.clone(), h2.clone());
                    let gw = self.clone();
                    tokio::spawn(async move {
                        gw.connection(tcp, peer, acceptor, watcher, h1, h2).await;
                        drop((permit, address_slot));
                    });
                }
                _ = &mut shutdown, if drain_started.is_none() => {
                    self.draining.store(true, Ordering::Release);
                    drain_started = Some(Instant::now());
                    log::info!("draining: {} request(s) in flight, deadline {:?}", self.in_flight(), self.cfg.drain_timeout);
                }
                _ = tick.tick(), if drain_started.is_some() => {
                    let waited = drain_started.map(|t| t.elapsed()).unwrap_or_default();
                    if self.in_flight() == 0 || waited >= self.cfg.drain_timeout {
                        break;
                    }
                }
            }
        }
        drop(listener);
        if self.in_flight() > 0 {
            log::warn!(
                "drain deadline reached: ending {} request(s)",
                self.in_flight()
            );
            // send_replace: stored even while no stream is subscribed yet.
            self.hard_stop.send_replace(true);
            let t = Instant::now();
            while self.in_flight() > 0 && t.elapsed() < Duration::from_secs(2) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
            .await
            .is_err()
        {
            log::warn!("some connections did not close in time");
        }
        log::info!("API listener closed");
    }
}

fn model_object(m: &ModelRoute) -> appliance_api::openai::ModelObject {
    appliance_api::openai::ModelObject {
        id: m.name.clone(),
        object: "model",
        created: m.created,
        owned_by: "appliance".into(),
    }
}

/// A plain-HTTP listener that only redirects to the HTTPS one.
pub async fn serve_redirect(
    listener: TcpListener,
    https_port: u16,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let open = Arc::new(Semaphore::new(256));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Ok(permit) = open.clone().try_acquire_owned() else { continue };
                tokio::spawn(async move {
                    let _permit = permit;
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                        let host = req
                            .headers()
                            .get(header::HOST)
                            .and_then(|h| h.to_str().ok())
                            .map(|h| h.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map(|(h, _)| h).unwrap_or(h))
                            .filter(|h| h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-[]:".contains(&b)))
                            .unwrap_or("localhost")
                            .to_string();
                        let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
                        let location = format!("https://{host}:{https_port}{path}");
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(StatusCode::PERMANENT_REDIRECT)
                                .header(header::LOCATION, location)
                                .header(header::CONNECTION, "close")
                                .body(Body::Full(None))
                                .unwrap_or_else(|_| Response::new(Body::Full(None))),
                        )
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(5))
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
            _ = &mut shutdown => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::request_id;

    #[test]
    fn request_ids_are_the_prefix_and_at_least_ten_hex_digits() {
        for n in [
            0,
            1,
            0xabc,
            0xff_ffff_ffff,
            0x100_0000_0000,
            1 << 60,
            u64::MAX,
        ] {
            assert_eq!(request_id("1a2b3c4d", n), format!("req_1a2b3c4d{n:010x}"));
        }
    }
}
