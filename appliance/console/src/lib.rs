//! The admin web console: its own HTTPS listener (`serve --console-listen`), users with
//! Argon2id passwords and roles, server-side sessions, CSRF tokens on every state
//! change, security headers on every response, and server-rendered pages whose assets
//! are embedded in the binary. Every action is an audit record.
//!
//! Security rules kept here: no state change on GET; every POST carries the session's
//! CSRF token (login and setup: a double-submit cookie); every route checks the role on
//! the server; session ids are 128-bit random, stored only as their SHA-256; cookies are
//! `__Host-` prefixed, Secure, HttpOnly, SameSite=Strict; sessions end after 15 minutes
//! idle or 8 hours in all, and at logout on the server.

mod html;
mod pages;
pub mod password;
mod upload;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appliance_audit::{Auditor, Record};
use appliance_gateway::Gateway;
use appliance_store::audit::AuditDb;
use appliance_store::Store;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub use html::Flash;

/// Session lifetimes and the lockout rule.
pub const IDLE: Duration = Duration::from_secs(15 * 60);
pub const ABSOLUTE: Duration = Duration::from_secs(8 * 3600);
pub const MAX_FAILURES: i64 = 10;
pub const LOCK_SECS: i64 = 30 * 60;
/// How long the first-run setup link works.
pub const SETUP_VALID: Duration = Duration::from_secs(24 * 3600);

const SESSION_COOKIE: &str = "__Host-console";
const CSRF_COOKIE: &str = "__Host-console-csrf";
const MAX_FORM: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Operator,
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            "auditor" => Some(Role::Auditor),
            _ => None,
        }
    }
}

pub type OpsFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the console asks of the daemon (which owns these operations for the command
/// line too).
pub trait Ops: Send + Sync {
    /// Re-reads `DATA/policy/policy.toml` and puts it in force (recording
    /// `policy.load`); the version, or why not.
    fn reload_policy(&self) -> OpsFuture<Result<String, String>>;
    /// Verifies the whole audit log: a one-line result, `Err` when it does not verify.
    fn verify_audit(&self) -> OpsFuture<Result<String, String>>;
    /// An export (JSON lines) of the records between the times (RFC 3339 or dates).
    fn export_audit(
        &self,
        since: Option<String>,
        until: Option<String>,
    ) -> OpsFuture<Result<Vec<u8>, String>>;
    /// The audit log's public key (signed-note verifier key text).
    fn audit_public_key(&self) -> String;
    /// Loads or unloads a model.
    fn model_action(&self, model: String, load: bool) -> OpsFuture<Result<String, String>>;
    /// Imports a model file or signed bundle from a path on the appliance (signature
    /// checked against the site's trust policy), reporting bytes done of total.
    fn import_model(
        &self,
        path: PathBuf,
        name: Option<String>,
        progress: Arc<Progress>,
    ) -> OpsFuture<Result<String, String>>;
    /// Removes a model that is not loaded.
    fn remove_model(&self, name: String) -> OpsFuture<Result<String, String>>;
    /// Pins a registry model to a device (`cpu`, `cuda:N`; `None`: automatic) for its
    /// next load; refused where appliance.toml pins it, or the device cannot exist here.
    fn pin_model(&self, name: String, device: Option<String>) -> OpsFuture<Result<String, String>>;
    /// Replaces the certificate of the API and console listeners (PEM chain and key,
    /// checked to belong together), for new connections at once and after restarts.
    fn replace_certificate(&self, cert_pem: String, key_pem: String) -> Result<String, String>;
    /// An encrypted backup of the appliance's state (`appliance backup` format).
    fn backup(&self, passphrase: String) -> OpsFuture<Result<Vec<u8>, String>>;
    /// Decrypts and verifies a backup of this appliance and stages it to be restored at
    /// the daemon's next start; its summary, or why it is refused.
    fn stage_restore(
        &self,
        backup: Vec<u8>,
        passphrase: String,
    ) -> OpsFuture<Result<String, String>>;
    /// Stops the daemon (draining) so that it is restarted.
    fn restart(&self);
}

/// How far a running import is.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: std::sync::atomic::AtomicU64,
    pub total: std::sync::atomic::AtomicU64,
}

/// The console's one model import at a time.
pub(crate) struct Import {
    pub source: String,
    pub by: String,
    pub progress: Arc<Progress>,
    /// Set when it has ended.
    pub result: Option<Result<String, String>>,
}

pub(crate) struct Session {
    pub user: String,
    pub role: Role,
    pub csrf: String,
    created: Instant,
    last: Instant,
}

struct SetupToken {
    sha256: [u8; 32],
    expires: Instant,
}

pub struct Console {
    pub(crate) store: Store,
    pub(crate) audit_db: AuditDb,
    pub(crate) auditor: Auditor,
    pub(crate) gateway: Arc<Gateway>,
    pub(crate) ops: Arc<dyn Ops>,
    pub(crate) data_dir: PathBuf,
    pub(crate) tls_cert: PathBuf,
    pub(crate) started: Instant,
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    setup: Mutex<Option<SetupToken>>,
    pub(crate) import: Arc<Mutex<Option<Import>>>,
    /// Concurrent password checks (Argon2 takes 19 MiB and ~50 ms each).
    pub(crate) argon: tokio::sync::Semaphore,
    /// Open connections per client address.
    per_address: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
}

/// Connections one address may hold open at once.
const PER_ADDRESS: usize = 16;

/// One open connection of an address; released on drop.
struct AddressSlot {
    map: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut m = lock(&self.map);
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    // The system's randomness failing is not survivable for a security component.
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("system randomness");
    appliance_gateway::keys::hex(&b)
}

fn sha256(s: &str) -> [u8; 32] {
    appliance_audit::merkle::sha256_of(s.as_bytes())
}

/// Constant-time equality of two strings' bytes.
pub(crate) fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A request as the pages see it.
pub(crate) struct Req {
    pub method: Method,
    pub path: String,
    pub query: HashMap<String, String>,
    pub form: HashMap<String, String>,
    pub cookies: HashMap<String, String>,
    pub peer: SocketAddr,
}

impl Req {
    pub fn q(&self, name: &str) -> Option<&str> {
        self.query
            .get(name)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    pub fn f(&self, name: &str) -> &str {
        self.form.get(name).map(String::as_str).unwrap_or("")
    }
}

pub(crate) type Resp = Response<Full<Bytes>>;

/// `application/x-www-form-urlencoded` (and query strings) into a map.
pub(crate) fn parse_form(s: &str) -> HashMap<String, String> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                    match u8::from_str_radix(hex, 16) {
                        Ok(v) => {
                            out.push(v);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

pub(crate) fn cookies_of(h: &http::HeaderMap) -> HashMap<String, String> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// The headers every console response carries, errors included.
fn secure(mut r: Resp) -> Resp {
    let h = r.headers_mut();
    let set = |h: &mut http::HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(
        h,
        "content-security-policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'",
    );
    set(h, "strict-transport-security", "max-age=31536000");
    set(h, "x-content-type-options", "nosniff");
    set(h, "referrer-policy", "same-origin");
    set(h, "x-frame-options", "DENY");
    set(h, "cross-origin-opener-policy", "same-origin");
    set(h, "cross-origin-resource-policy", "same-origin");
    set(
        h,
        "permissions-policy",
        "camera=(), microphone=(), geolocation=()",
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, "cache-control", "no-store");
    }
    r
}

pub(crate) fn html(status: StatusCode, body: String) -> Resp {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

pub(crate) fn redirect(to: &str) -> Resp {
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, to)
        .body(Full::new(Bytes::new()))
        .unwrap_or_default()
}

pub(crate) fn with_cookie(mut r: Resp, name: &str, value: &str, clear: bool) -> Resp {
    let v = if clear {
        format!("{name}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0")
    } else {
        format!("{name}={value}; Path=/; Secure; HttpOnly; SameSite=Strict")
    };
    if let Ok(v) = HeaderValue::from_str(&v) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

/// What a route needs.
enum Access {
    /// Anyone (login, setup, static assets).
    Open,
    /// A logged-in user with one of these roles.
    Roles(&'static [Role]),
}

fn access(path: &str) -> Access {
    use Role::*;
    const ALL: &[Role] = &[Admin, Operator, Auditor];
    match path {
        "/login" | "/setup" | "/static/app.css" | "/static/app.js" | "/favicon.ico" => Access::Open,
        "/" | "/api/stats" | "/logout" => Access::Roles(ALL),
        p if p.starts_with("/models") || p.starts_with("/upstreams") => {
            if p == "/upstreams/credential" {
                Access::Roles(&[Admin])
            } else {
                Access::Roles(&[Admin, Operator])
            }
        }
        p if p.starts_with("/audit") => Access::Roles(&[Admin, Auditor]),
        _ => Access::Roles(&[Admin]),
    }
}

impl Console {
    #[allow(clippy::too_many_arguments)]
    pub async fn new(
        store: Store,
        audit_db: AuditDb,
        auditor: Auditor,
        gateway: Arc<Gateway>,
        ops: Arc<dyn Ops>,
        data_dir: PathBuf,
        tls_cert: PathBuf,
    ) -> Arc<Console> {
        Arc::new(Console {
            store,
            audit_db,
            auditor,
            gateway,
            ops,
            data_dir,
            tls_cert,
            started: Instant::now(),
            sessions: Mutex::new(HashMap::new()),
            setup: Mutex::new(None),
            import: Arc::new(Mutex::new(None)),
            argon: tokio::sync::Semaphore::new(4),
            per_address: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// With no console user yet: a new one-time setup token (the previous one, if any,
    /// stops working). `None` when an admin exists.
    pub async fn setup_token(&self) -> Option<String> {
        match self.store.user_count().await {
            Ok(0) => {}
            Ok(_) => return None,
            Err(e) => {
                log::error!("console: reading users: {e}");
                return None;
            }
        }
        let token = random_hex(16);
        *lock(&self.setup) = Some(SetupToken {
            sha256: sha256(&token),
            expires: Instant::now() + SETUP_VALID,
        });
        Some(token)
    }

    /// Takes the setup token if `token` is it and it has not expired (it then works no
    /// more).
    pub(crate) fn setup_valid(&self, token: &str, take: bool) -> bool {
        let mut s = lock(&self.setup);
        let ok = s.as_ref().is_some_and(|t| {
            Instant::now() < t.expires
                && t.sha256
                    .iter()
                    .zip(sha256(token))
                    .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                    == 0
        });
        if ok && take {
            *s = None;
        }
        ok
    }

    pub(crate) fn new_session(&self, user: &str, role: Role) -> String {
        let id = random_hex(16);
        let now = Instant::now();
        let mut s = lock(&self.sessions);
        s.retain(|_, v| {
            now.duration_since(v.last) < IDLE && now.duration_since(v.created) < ABSOLUTE
        });
        s.insert(
            sha256(&id),
            Session {
                user: user.to_string(),
                role,
                csrf: random_hex(16),
                created: now,
                last: now,
            },
        );
        id
    }

    /// The session of a cookie, if it is live (and, unless `poll`, marks it used: a page
    /// polling in the background must not keep an unattended session alive).
    fn session(&self, id: &str, poll: bool) -> Option<(String, Role, String)> {
        let key = sha256(id);
        let now = Instant::now();
        let mut s = lock(&self.sessions);
        let live = s.get(&key).is_some_and(|v| {
            now.duration_since(v.last) < IDLE && now.duration_since(v.created) < ABSOLUTE
        });
        if !live {
            s.remove(&key);
            return None;
        }
        let v = s.get_mut(&key)?;
        if !poll {
            v.last = now;
        }
        Some((v.user.clone(), v.role, v.csrf.clone()))
    }

    pub(crate) fn end_session(&self, id: &str) {
        lock(&self.sessions).remove(&sha256(id));
    }

    /// Ends every session of a user (disabled, role changed, password reset).
    pub(crate) fn end_sessions_of(&self, user: &str) {
        lock(&self.sessions).retain(|_, v| v.user != user);
    }

    /// An audit record of a console action by `user` from `peer`.
    pub(crate) async fn record(
        &self,
        user: Option<&str>,
        peer: SocketAddr,
        action: &str,
        status: u16,
        resource: Option<String>,
        detail: Option<String>,
    ) -> Result<(), String> {
        let cap = |s: &str| s.chars().take(200).collect::<String>();
        let mut r = Record::action(action, status);
        r.user = user.map(cap);
        r.source = Some(peer.ip().to_string());
        r.resource = resource.as_deref().map(cap);
        r.detail = detail.map(|d| d.chars().take(200).collect());
        if status >= 400 {
            r.error = Some("refused".into());
        }
        self.auditor
            .record(r)
            .await
            .map(|_| ())
            .map_err(|e| format!("the audit log cannot be written ({e}); nothing was done"))
    }

    /// An action done the audited way: its record first (nothing happens if that fails),
    /// then the action; a failed action is recorded again with `fail_status`. The
    /// message for the page either way.
    pub(crate) async fn audited(
        &self,
        user: &str,
        peer: SocketAddr,
        (action, resource, fail_status): (&str, String, u16),
        act: impl Future<Output = Result<String, String>>,
    ) -> Flash {
        if let Err(e) = self
            .record(Some(user), peer, action, 200, Some(resource.clone()), None)
            .await
        {
            return Flash::Error(e);
        }
        match act.await {
            Ok(m) => Flash::Ok(m),
            Err(e) => {
                let _ = self
                    .record(
                        Some(user),
                        peer,
                        action,
                        fail_status,
                        Some(resource),
                        Some(e.clone()),
                    )
                    .await;
                Flash::Error(e)
            }
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Resp {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path().to_string();
        let query = parse_form(parts.uri.query().unwrap_or(""));
        let cookies = cookies_of(&parts.headers);
        let method = parts.method.clone();
        if method != Method::GET && method != Method::POST && method != Method::HEAD {
            return html(
                StatusCode::METHOD_NOT_ALLOWED,
                html::frame(
                    "Not allowed",
                    None,
                    &Flash::None,
                    "<p>This method is not accepted.</p>",
                ),
            );
        }
        // Uploads answer early when refused (session, role, token, size): whatever of
        // the body is left is read and dropped first, so the client sees the answer.
        if method == Method::POST && (path == "/models/upload" || path == "/system/restore") {
            let mut body = body;
            let resp = if path == "/models/upload" {
                self.upload(parts, &mut body, peer).await
            } else {
                self.restore(parts, &mut body, peer).await
            };
            upload::drain(&mut body).await;
            return resp;
        }
        let form = if method == Method::POST {
            let form_type = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
            let read = tokio::time::timeout(
                Duration::from_secs(30),
                Limited::new(body, MAX_FORM).collect(),
            )
            .await;
            let bytes = match read {
                Ok(Ok(b)) => b.to_bytes(),
                _ => {
                    return html(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        html::frame(
                            "Too large",
                            None,
                            &Flash::None,
                            "<p>The form is larger than 1 MiB.</p>",
                        ),
                    )
                }
            };
            if !form_type {
                return forbidden("The form was not sent by this console.");
            }
            parse_form(&String::from_utf8_lossy(&bytes))
        } else {
            HashMap::new()
        };
        let r = Req {
            method,
            path,
            query,
            form,
            cookies,
            peer,
        };
        let roles = match access(&r.path) {
            Access::Open => return pages::open(&self, &r).await,
            Access::Roles(roles) => roles,
        };
        let session_id = r.cookies.get(SESSION_COOKIE).cloned().unwrap_or_default();
        let poll = r.path == "/api/stats" || r.path == "/models/progress";
        let Some((user, role, csrf)) = self.session(&session_id, poll) else {
            if r.method == Method::GET && r.path != "/api/stats" {
                return redirect("/login");
            }
            return html(
                StatusCode::UNAUTHORIZED,
                html::frame(
                    "Signed out",
                    None,
                    &Flash::Error("Your session has ended; log in again.".into()),
                    "<p><a href=\"/login\">Log in</a></p>",
                ),
            );
        };
        if !roles.contains(&role) {
            let _ = self
                .record(
                    Some(&user),
                    r.peer,
                    "console.denied",
                    403,
                    Some(r.path.clone()),
                    None,
                )
                .await;
            return forbidden("Your role may not open this page.");
        }
        // Every state change carries the session's token.
        if r.method == Method::POST && !same(r.f("csrf"), &csrf) {
            let _ = self
                .record(
                    Some(&user),
                    r.peer,
                    "console.csrf",
                    403,
                    Some(r.path.clone()),
                    None,
                )
                .await;
            return forbidden(
                "The form's security token is missing or wrong; reload the page and try again.",
            );
        }
        let viewer = html::Viewer {
            user: &user,
            role,
            csrf: &csrf,
            path: &r.path,
        };
        if r.path == "/logout" && r.method == Method::POST {
            // Recorded first; the session ends whatever happens to the record.
            let _ = self
                .record(Some(&user), r.peer, "console.logout", 200, None, None)
                .await;
            self.end_session(&session_id);
            return with_cookie(redirect("/login"), SESSION_COOKIE, "", true);
        }
        pages::route(&self, &r, &viewer).await
    }

    /// Serves the console on `listener` until `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: impl Future<Output = ()>,
    ) {
        // HTTP/1.1 only: the console is a handful of pages and one JSON poll.
        let mut cfg = (*tls).clone();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let open = Arc::new(tokio::sync::Semaphore::new(256));
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(x) => x,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            let Ok(permit) = open.clone().try_acquire_owned() else {
                continue;
            };
            let slot = {
                let mut m = lock(&self.per_address);
                let n = m.entry(peer.ip()).or_insert(0);
                if *n >= PER_ADDRESS {
                    continue;
                }
                *n += 1;
                AddressSlot {
                    map: self.per_address.clone(),
                    ip: peer.ip(),
                }
            };
            let (acceptor, console) = (acceptor.clone(), self.clone());
            tokio::spawn(async move {
                let _permit = (permit, slot);
                let Ok(Ok(tls)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| {
                    let console = console.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(secure(console.handle(req, peer).await))
                    }
                });
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http1_only();
                // A client that sends nothing (or trickles its headers) is dropped.
                builder
                    .http1()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10));
                let conn = builder.serve_connection(TokioIo::new(tls), service);
                let _ = tokio::time::timeout(Duration::from_secs(600), conn).await;
            });
        }
    }
}

pub(crate) fn forbidden(why: &str) -> Resp {
    html(
        StatusCode::FORBIDDEN,
        html::frame(
            "Forbidden",
            None,
            &Flash::Error(why.to_string()),
            "<p><a href=\"/\">Back to the dashboard</a></p>",
        ),
    )
}

pub(crate) const SESSION: &str = SESSION_COOKIE;
pub(crate) const CSRF: &str = CSRF_COOKIE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode() {
        let f = parse_form("a=1+2&b=%3Cx%3E&c=&d&e=%zz&f=%4");
        assert_eq!(f["a"], "1 2");
        assert_eq!(f["b"], "<x>");
        assert_eq!(f["c"], "");
        assert_eq!(f["d"], "");
        assert_eq!(f["e"], "%zz");
        assert_eq!(f["f"], "%4");
    }

    #[test]
    fn routes_need_their_roles() {
        let roles = |p: &str| match access(p) {
            Access::Open => None,
            Access::Roles(r) => Some(r.to_vec()),
        };
        assert_eq!(roles("/login"), None);
        assert!(!roles("/keys").unwrap().contains(&Role::Auditor));
        assert!(!roles("/keys/create").unwrap().contains(&Role::Operator));
        assert!(roles("/audit/verify").unwrap().contains(&Role::Auditor));
        assert!(!roles("/users").unwrap().contains(&Role::Operator));
        assert!(roles("/models").unwrap().contains(&Role::Operator));
        assert!(!roles("/upstreams/credential")
            .unwrap()
            .contains(&Role::Operator));
        assert!(!roles("/anything-else").unwrap().contains(&Role::Auditor));
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
