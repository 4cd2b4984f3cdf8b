//! The console's pages: each GET renders, each POST acts (after the checks in `lib.rs`)
//! and answers with the page and a message. Every action writes its audit record first;
//! if that fails, nothing is done.

use std::fmt::Write;

use appliance_store::audit::AuditFilter;
use appliance_store::NewKey;
use bytes::Bytes;
use http::{header, Method, Response, StatusCode};
use http_body_util::Full;

use crate::html::{
    self, button, csrf_field, esc, field, frame, select, table, time, Flash, Viewer,
};
use crate::{forbidden, html as page, password, redirect, with_cookie, Console, Req, Resp, Role};

const CSS: &str = include_str!("../assets/app.css");
const JS: &str = include_str!("../assets/app.js");
const ICON: &str = include_str!("../assets/icon.svg");

fn now() -> i64 {
    appliance_gateway::server::unix_now()
}

fn asset(kind: &str, text: &'static str) -> Resp {
    Response::builder()
        .header(header::CONTENT_TYPE, kind)
        .header(header::CACHE_CONTROL, "private, max-age=300")
        .body(Full::new(Bytes::from_static(text.as_bytes())))
        .unwrap_or_default()
}

pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// Routes anyone may reach: assets, login, first-run setup.
pub(crate) async fn open(c: &Console, r: &Req) -> Resp {
    match (r.path.as_str(), &r.method) {
        ("/static/app.css", _) => asset("text/css; charset=utf-8", CSS),
        ("/static/app.js", _) => asset("text/javascript; charset=utf-8", JS),
        ("/favicon.ico", _) => asset("image/svg+xml", ICON),
        ("/login", &Method::POST) => login_post(c, r).await,
        ("/login", _) => login_page(r, Flash::None),
        ("/setup", &Method::POST) => setup_post(c, r).await,
        ("/setup", _) => {
            let token = r.q("token").unwrap_or("");
            if !c.setup_valid(token, false) {
                return setup_invalid();
            }
            setup_page(r, token, "", Flash::None)
        }
        _ => page(
            StatusCode::NOT_FOUND,
            frame("Not found", None, &Flash::None, ""),
        ),
    }
}

/// A form token for pages without a session, as a cookie and a field (double submit):
/// the browser's current one if it has one (several tabs, or a favicon request that
/// ended on the login page, must not invalidate an open form), else a new one.
fn pre_session_token(r: &Req) -> String {
    match r.cookies.get(crate::CSRF) {
        Some(t) if t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()) => t.clone(),
        _ => crate::random_hex(16),
    }
}

fn pre_session_ok(r: &Req) -> bool {
    let cookie = r.cookies.get(crate::CSRF).map(String::as_str).unwrap_or("");
    !cookie.is_empty() && crate::same(cookie, r.f("csrf"))
}

/// A page outside a session, with its form token also set as a cookie.
fn pre_session_page(
    status: StatusCode,
    title: &str,
    flash: &Flash,
    body: &str,
    token: &str,
) -> Resp {
    with_cookie(
        page(status, frame(title, None, flash, body)),
        crate::CSRF,
        token,
        false,
    )
}

fn login_page(r: &Req, flash: Flash) -> Resp {
    let token = pre_session_token(r);
    let status = match flash {
        Flash::Error(_) => StatusCode::UNAUTHORIZED,
        _ => StatusCode::OK,
    };
    let body = format!(
        "<form method=\"post\" action=\"/login\" class=\"card narrow\">{}{}{}<p><button type=\"submit\">Log in</button></p></form>",
        csrf_field(&token),
        field("user", "User name", "text", "", "autocomplete=\"username\" required autofocus"),
        field("password", "Password", "password", "", "autocomplete=\"current-password\" required"),
    );
    pre_session_page(status, "Log in", &flash, &body, &token)
}

async fn login_post(c: &Console, r: &Req) -> Resp {
    if !pre_session_ok(r) {
        return forbidden(
            "The form's security token is missing or wrong; reload the page and try again.",
        );
    }
    let name = r.f("user").trim().to_string();
    let pw = r.f("password").to_string();
    // A few Argon2 checks at a time (bounded memory and CPU); the account's state is
    // read inside the permit, so parallel guesses cannot all pass a stale "not locked".
    let _permit = c.argon.acquire().await;
    let user = if valid_name(&name) {
        c.store.user(&name).await.ok().flatten()
    } else {
        None
    };
    let t = now();
    let locked = user
        .as_ref()
        .is_some_and(|u| u.locked_until.is_some_and(|l| l > t));
    // The hash is checked even for an unknown, disabled or locked user: the same time.
    let stored = user.as_ref().map(|u| u.password_hash.clone());
    let ok = tokio::task::spawn_blocking(move || password::verify(&pw, stored.as_deref()))
        .await
        .unwrap_or(false);
    let Some(u) = user.filter(|u| !u.disabled) else {
        // The typed name is not recorded for an unknown user (it may be a password typed
        // in the wrong field, and its length is the sender's choice).
        let known = c.store.user(&name).await.ok().flatten().is_some();
        let _ = c
            .record(
                known.then_some(name.as_str()),
                r.peer,
                "console.login",
                401,
                None,
                Some(
                    if known {
                        "disabled user"
                    } else {
                        "unknown user"
                    }
                    .into(),
                ),
            )
            .await;
        return login_page(r, Flash::Error("Wrong user name or password.".into()));
    };
    if locked {
        let _ = c
            .record(
                Some(&name),
                r.peer,
                "console.login",
                423,
                None,
                Some("locked".into()),
            )
            .await;
        return login_page(
            r,
            Flash::Error(format!(
                "This account is locked after {} failed logins; try again later or ask an admin.",
                crate::MAX_FAILURES
            )),
        );
    }
    if !ok {
        let now_locked = c
            .store
            .user_login_failed(&u.name, t, crate::MAX_FAILURES, crate::LOCK_SECS)
            .await
            .unwrap_or(false);
        let _ = c
            .record(
                Some(&u.name),
                r.peer,
                "console.login",
                401,
                None,
                Some("wrong password".into()),
            )
            .await;
        if now_locked {
            log::warn!(
                "console: user {} locked for {} minutes after {} failed logins (last from {})",
                u.name,
                crate::LOCK_SECS / 60,
                crate::MAX_FAILURES,
                r.peer.ip()
            );
            let _ = c
                .record(
                    Some(&u.name),
                    r.peer,
                    "console.lockout",
                    423,
                    None,
                    Some(format!("{} minutes", crate::LOCK_SECS / 60)),
                )
                .await;
        }
        return login_page(r, Flash::Error("Wrong user name or password.".into()));
    }
    // Locked by parallel failures while this one was being checked: refused too.
    let now_locked = c
        .store
        .user(&u.name)
        .await
        .ok()
        .flatten()
        .is_some_and(|x| x.disabled || x.locked_until.is_some_and(|l| l > now()));
    if now_locked {
        return login_page(r, Flash::Error("Wrong user name or password.".into()));
    }
    let Some(role) = Role::parse(&u.role) else {
        return login_page(r, Flash::Error("This account has no valid role.".into()));
    };
    if let Err(e) = c
        .record(Some(&u.name), r.peer, "console.login", 200, None, None)
        .await
    {
        return login_page(r, Flash::Error(e));
    }
    let _ = c.store.user_logged_in(&u.name, t).await;
    let id = c.new_session(&u.name, role);
    with_cookie(
        with_cookie(redirect("/"), crate::SESSION, &id, false),
        crate::CSRF,
        "",
        true,
    )
}

fn setup_invalid() -> Resp {
    page(
        StatusCode::NOT_FOUND,
        frame(
            "Setup link not valid",
            None,
            &Flash::Error("This setup link is not valid: it was used, it expired, or the appliance already has an admin. A new link is printed when the daemon starts with no console user.".into()),
            "<p><a href=\"/login\">Log in</a></p>",
        ),
    )
}

fn setup_page(r: &Req, token: &str, user: &str, flash: Flash) -> Resp {
    let form_token = pre_session_token(r);
    let body = format!(
        "<p>Create the first administrator of this appliance. The password needs at least {} characters and may not be a common one.</p>\
<form method=\"post\" action=\"/setup\" class=\"card narrow\">{}<input type=\"hidden\" name=\"token\" value=\"{}\">{}{}{}<p><button type=\"submit\">Create the admin account</button></p></form>",
        password::MIN_LENGTH,
        csrf_field(&form_token),
        esc(token),
        field("user", "User name", "text", user, "autocomplete=\"username\" required autofocus"),
        field("password", "Password", "password", "", "autocomplete=\"new-password\" required"),
        field("confirm", "Password again", "password", "", "autocomplete=\"new-password\" required"),
    );
    let status = match flash {
        Flash::Error(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::OK,
    };
    pre_session_page(status, "First-run setup", &flash, &body, &form_token)
}

async fn setup_post(c: &Console, r: &Req) -> Resp {
    if !pre_session_ok(r) {
        return forbidden(
            "The form's security token is missing or wrong; reload the page and try again.",
        );
    }
    let token = r.f("token");
    if !c.setup_valid(token, false) {
        return setup_invalid();
    }
    let name = r.f("user").trim();
    let pw = r.f("password");
    if !valid_name(name) {
        return setup_page(
            r,
            token,
            name,
            Flash::Error(
                "The user name must be 1 to 64 letters, digits, '.', '_', ':' or '-'.".into(),
            ),
        );
    }
    if pw != r.f("confirm") {
        return setup_page(
            r,
            token,
            name,
            Flash::Error("The two passwords differ.".into()),
        );
    }
    if let Some(why) = password::weakness(name, pw) {
        return setup_page(r, token, name, Flash::Error(why));
    }
    let pw = pw.to_string();
    let Ok(Ok(hash)) = tokio::task::spawn_blocking(move || password::hash(&pw)).await else {
        return setup_page(
            r,
            token,
            name,
            Flash::Error("The password could not be hashed.".into()),
        );
    };
    if let Err(e) = c
        .record(
            Some(name),
            r.peer,
            "console.setup",
            200,
            Some(format!("user:{name}")),
            Some("first admin".into()),
        )
        .await
    {
        return setup_page(r, token, name, Flash::Error(e));
    }
    // Taken only now: a refused form leaves the link usable.
    if !c.setup_valid(token, true) {
        return setup_invalid();
    }
    match c.store.create_first_user(name, &hash, now()).await {
        Ok(Some(_)) => {}
        _ => return setup_invalid(),
    }
    log::info!("console: first admin {name} created from {}", r.peer.ip());
    let id = c.new_session(name, Role::Admin);
    with_cookie(
        with_cookie(redirect("/"), crate::SESSION, &id, false),
        crate::CSRF,
        "",
        true,
    )
}

/// Logged-in routes.
pub(crate) async fn route(c: &Console, r: &Req, v: &Viewer<'_>) -> Resp {
    let post = r.method == Method::POST;
    match r.path.as_str() {
        "/" if !post => dashboard(c, v, Flash::None).await,
        "/api/stats" if !post => stats(c),
        "/models" if !post => models(c, v, Flash::None).await,
        "/models/progress" if !post => import_progress(c),
        "/models/import" if post => {
            let flash = import_start(c, r, v).await;
            models(c, v, flash).await
        }
        "/models/pin" if post => {
            let name = r.f("model").to_string();
            let device = r.f("device").trim().to_string();
            let flash = if !valid_name(&name) {
                Flash::Error("Choose a model.".into())
            } else {
                let resource = format!("model:{name}");
                let device = (!device.is_empty() && device != "auto").then_some(device);
                c.audited(
                    v.user,
                    r.peer,
                    ("model.pin", resource, 400),
                    c.ops.pin_model(name, device),
                )
                .await
            };
            models(c, v, flash).await
        }
        "/models/remove" if post => {
            let name = r.f("model").to_string();
            let flash = if c.gateway.model(&name).is_some() {
                Flash::Error(format!("{name} is loaded; unload it before removing it."))
            } else {
                let resource = format!("model:{name}");
                c.audited(
                    v.user,
                    r.peer,
                    ("model.remove", resource, 409),
                    c.ops.remove_model(name),
                )
                .await
            };
            models(c, v, flash).await
        }
        "/models/action" if post => {
            let (name, load) = (r.f("model").to_string(), r.f("action") == "load");
            let action = if load { "model.load" } else { "model.unload" };
            let resource = format!("model:{name}");
            let flash = c
                .audited(
                    v.user,
                    r.peer,
                    (action, resource, 409),
                    c.ops.model_action(name, load),
                )
                .await;
            models(c, v, flash).await
        }
        "/keys" if !post => keys(c, v, Flash::None, None).await,
        "/keys/tenant" if post => {
            let name = r.f("name").trim().to_string();
            let flash = if !valid_name(&name) {
                Flash::Error(
                    "A tenant name is 1 to 64 letters, digits, '.', '_', ':' or '-'.".into(),
                )
            } else {
                let act = async {
                    c.store
                        .create_tenant(&name, now())
                        .await
                        .map(|_| format!("Tenant {name} created."))
                        .map_err(|e| e.to_string())
                };
                c.audited(
                    v.user,
                    r.peer,
                    ("tenant.create", format!("tenant:{name}"), 409),
                    act,
                )
                .await
            };
            keys(c, v, flash, None).await
        }
        "/keys/create" if post => key_create(c, r, v).await,
        "/keys/revoke" if post => {
            let id = r.f("id").to_string();
            let act = async {
                c.store
                    .revoke_key(&id, now())
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = c.gateway.keys().reload_if_changed().await;
                Ok(format!("Key {id} revoked."))
            };
            let flash = c
                .audited(
                    v.user,
                    r.peer,
                    ("key.revoke", format!("key:{id}"), 404),
                    act,
                )
                .await;
            keys(c, v, flash, None).await
        }
        "/keys/rotate" if post => key_rotate(c, r, v).await,
        "/keys/usage.csv" if !post => {
            let days: i64 = r
                .q("days")
                .and_then(|d| d.parse().ok())
                .unwrap_or(31)
                .clamp(1, 3660);
            if let Err(e) = c
                .record(
                    Some(v.user),
                    r.peer,
                    "usage.export",
                    200,
                    None,
                    Some(format!("{days} days")),
                )
                .await
            {
                return keys(c, v, Flash::Error(e), None).await;
            }
            let _ = c.store.add_usage(&c.gateway.take_usage()).await;
            let since = now().div_euclid(3600) - days * 24;
            let mut csv = String::from(
                "hour_utc,tenant,key_id,model,requests,prompt_tokens,completion_tokens\n",
            );
            for u in c.store.usage(since).await.unwrap_or_default() {
                let cell = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
                let _ = writeln!(
                    csv,
                    "{},{},{},{},{},{},{}",
                    time(Some(u.hour * 3600)),
                    cell(&u.tenant),
                    cell(&u.key_id),
                    cell(&u.model),
                    u.requests,
                    u.prompt_tokens,
                    u.completion_tokens
                );
            }
            Response::builder()
                .header(header::CONTENT_TYPE, "text/csv; charset=utf-8")
                .header(
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"usage.csv\"",
                )
                .body(Full::new(Bytes::from(csv)))
                .unwrap_or_default()
        }
        "/policy" if !post => policy(c, v, Flash::None, None, None).await,
        "/policy/apply" if post => policy_apply(c, r, v).await,
        "/policy/explain" if post => {
            let tenant = r.f("tenant");
            let request = r.f("request");
            let state = c.gateway.policy();
            let cfg = appliance_gateway::GatewayConfig::default();
            let out = appliance_gateway::openai::explain(
                &state.policy,
                tenant,
                request.as_bytes(),
                &cfg,
                Some(&c.gateway),
                None,
            );
            let _ = c
                .record(
                    Some(v.user),
                    r.peer,
                    "policy.explain",
                    200,
                    Some(format!("tenant:{tenant}")),
                    None,
                )
                .await;
            let shown = match out {
                Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
                Err(e) => format!("error: {e}"),
            };
            policy(
                c,
                v,
                Flash::None,
                None,
                Some((tenant.to_string(), request.to_string(), shown)),
            )
            .await
        }
        "/upstreams" if !post => upstreams(c, v, Flash::None).await,
        "/upstreams/credential" if post => credential(c, r, v).await,
        "/audit" if !post => audit(c, r, v, Flash::None).await,
        "/audit/record" if !post => audit_record(c, r, v).await,
        "/audit/verify" if post => {
            let result = c.ops.verify_audit().await;
            let (status, flash) = match result {
                Ok(m) => (200, Flash::Ok(m)),
                Err(m) => (409, Flash::Error(m)),
            };
            let detail = match &flash {
                Flash::Ok(m) | Flash::Error(m) => Some(m.clone()),
                Flash::None => None,
            };
            let _ = c
                .record(Some(v.user), r.peer, "audit.verify", status, None, detail)
                .await;
            audit(c, r, v, flash).await
        }
        "/audit/export" if !post => {
            let (since, until) = (
                r.q("since").map(str::to_string),
                r.q("until").map(str::to_string),
            );
            if let Err(e) = c
                .record(
                    Some(v.user),
                    r.peer,
                    "audit.export",
                    200,
                    None,
                    Some(format!("since {since:?} until {until:?}")),
                )
                .await
            {
                return audit(c, r, v, Flash::Error(e)).await;
            }
            match c.ops.export_audit(since, until).await {
                Ok(bytes) => Response::builder()
                    .header(header::CONTENT_TYPE, "application/x-ndjson")
                    .header(
                        header::CONTENT_DISPOSITION,
                        "attachment; filename=\"audit-export.jsonl\"",
                    )
                    .body(Full::new(Bytes::from(bytes)))
                    .unwrap_or_default(),
                Err(e) => audit(c, r, v, Flash::Error(e)).await,
            }
        }
        "/audit/public-key" if !post => Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"audit-public-key.txt\"",
            )
            .body(Full::new(Bytes::from(c.ops.audit_public_key() + "\n")))
            .unwrap_or_default(),
        "/users" if !post => users(c, v, Flash::None).await,
        "/users/create" | "/users/role" | "/users/disable" | "/users/enable" | "/users/reset"
            if post =>
        {
            let flash = user_action(c, r, v).await;
            users(c, v, flash).await
        }
        "/system" if !post => system(c, v, Flash::None).await,
        "/system/certificate" if post => {
            let (cert, key) = (
                r.f("cert").replace("\r\n", "\n"),
                r.f("key").replace("\r\n", "\n"),
            );
            // Checked first; recorded before anything changes.
            if let Err(e) = appliance_gateway::tls::certified_key(
                cert.as_bytes(),
                key.as_bytes(),
                "the new certificate",
            ) {
                let _ = c
                    .record(
                        Some(v.user),
                        r.peer,
                        "certificate.replace",
                        400,
                        None,
                        Some(e.clone()),
                    )
                    .await;
                return system(c, v, Flash::Error(e)).await;
            }
            if let Err(e) = c
                .record(Some(v.user), r.peer, "certificate.replace", 200, None, None)
                .await
            {
                return system(c, v, Flash::Error(e)).await;
            }
            let flash = match c.ops.replace_certificate(cert, key) {
                Ok(m) => Flash::Ok(m),
                Err(e) => Flash::Error(e),
            };
            system(c, v, flash).await
        }
        "/system/backup" if post => {
            let pass = r.f("passphrase").to_string();
            if let Some(why) = password::weakness("", &pass) {
                return system(c, v, Flash::Error(format!("Backup passphrase: {why}"))).await;
            }
            if let Err(e) = c
                .record(
                    Some(v.user),
                    r.peer,
                    "backup.create",
                    200,
                    None,
                    Some("download".into()),
                )
                .await
            {
                return system(c, v, Flash::Error(e)).await;
            }
            match c.ops.backup(pass).await {
                Ok(bytes) => Response::builder()
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .header(
                        header::CONTENT_DISPOSITION,
                        "attachment; filename=\"appliance-backup.bin\"",
                    )
                    .body(Full::new(Bytes::from(bytes)))
                    .unwrap_or_default(),
                Err(e) => system(c, v, Flash::Error(e)).await,
            }
        }
        _ => page(
            StatusCode::NOT_FOUND,
            frame(
                "Not found",
                Some(v),
                &Flash::Error("No such page.".into()),
                "",
            ),
        ),
    }
}

fn ok_page(title: &str, v: &Viewer<'_>, flash: Flash, body: &str) -> Resp {
    let status = match flash {
        Flash::Error(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::OK,
    };
    page(status, frame(title, Some(v), &flash, body))
}

async fn dashboard(c: &Console, v: &Viewer<'_>, flash: Flash) -> Resp {
    let inv = appliance_supervisor::inventory::read(&c.data_dir);
    let mut b = String::new();
    b.push_str("<section class=\"grid\"><div class=\"card\"><h2>Hardware</h2><dl>");
    let _ = write!(
        b,
        "<dt>CPU</dt><dd>{} ({} cores, {} threads), load {:.2}</dd><dt>Memory</dt><dd>{} available of {}</dd><dt>Disk (data)</dt><dd>{} free of {}</dd>",
        esc(&inv.cpu_model),
        inv.cpu_cores,
        inv.cpu_threads,
        inv.load_average[0],
        html::bytes(inv.memory_available),
        html::bytes(inv.memory_total),
        html::bytes(inv.disk_available),
        html::bytes(inv.disk_total)
    );
    if inv.gpus.is_empty() {
        let _ = write!(
            b,
            "<dt>GPUs</dt><dd>none{}</dd>",
            inv.gpu_note
                .as_deref()
                .map(|n| format!(" ({})", esc(n)))
                .unwrap_or_default()
        );
    }
    for g in &inv.gpus {
        let _ = write!(
            b,
            "<dt>GPU {}</dt><dd>{}: {} used of {}, {}% busy, {} °C</dd>",
            g.index,
            esc(&g.name),
            html::bytes(g.memory_used),
            html::bytes(g.memory_total),
            g.utilization_percent,
            g.temperature_celsius
        );
    }
    b.push_str("</dl></div>");
    let status = c.gateway.status();
    let rows: Vec<Vec<String>> = status["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            vec![
                esc(w["model"].as_str().unwrap_or("")),
                w["instance"].to_string(),
                format!(
                    "<span class=\"state {0}\">{0}</span>",
                    esc(w["state"].as_str().unwrap_or(""))
                ),
                esc(w["device"].as_str().unwrap_or("")),
                w["in_flight"].to_string(),
                w["restarts"].to_string(),
                esc(w["last_error"].as_str().unwrap_or("")),
            ]
        })
        .collect();
    let _ = write!(
        b,
        "<div class=\"card\"><h2>Workers</h2>{}</div></section>",
        table(
            "Model workers",
            &[
                "Model",
                "Instance",
                "State",
                "Device",
                "In flight",
                "Restarts",
                "Last error"
            ],
            &rows
        )
    );
    b.push_str(
        "<section class=\"grid charts\" id=\"live\" aria-live=\"off\">\
<figure class=\"card\"><figcaption>Requests/s <output id=\"v-rps\">–</output></figcaption><svg id=\"c-rps\" viewBox=\"0 0 300 80\" role=\"img\" aria-label=\"Requests per second, last minutes\"></svg></figure>\
<figure class=\"card\"><figcaption>Tokens/s <output id=\"v-tps\">–</output></figcaption><svg id=\"c-tps\" viewBox=\"0 0 300 80\" role=\"img\" aria-label=\"Tokens per second\"></svg></figure>\
<figure class=\"card\"><figcaption>Error rate <output id=\"v-err\">–</output></figcaption><svg id=\"c-err\" viewBox=\"0 0 300 80\" role=\"img\" aria-label=\"Share of server errors\"></svg></figure>\
<figure class=\"card\"><figcaption>p95 latency <output id=\"v-p95\">–</output></figcaption><svg id=\"c-p95\" viewBox=\"0 0 300 80\" role=\"img\" aria-label=\"95th percentile generation latency\"></svg></figure>\
<div class=\"card\"><h2>Top tenants</h2><ol id=\"tenants\"><li>–</li></ol></div></section>",
    );
    ok_page("Dashboard", v, flash, &b)
}

fn stats(c: &Console) -> Resp {
    let s = c.gateway.metrics_summary();
    let body = serde_json::json!({
        "time_ms": c.started.elapsed().as_millis() as u64,
        "in_flight": c.gateway.in_flight(),
        "summary": s,
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_default()
}

/// Starts an import in the background (one at a time); the page then polls
/// `/models/progress`.
async fn import_start(c: &Console, r: &Req, v: &Viewer<'_>) -> Flash {
    let path = r.f("path").trim().to_string();
    let name = r.f("name").trim().to_string();
    if !path.starts_with('/') {
        return Flash::Error(
            "Give the absolute path of a .gguf file or a signed bundle on the appliance.".into(),
        );
    }
    if !name.is_empty() && !valid_name(&name) {
        return Flash::Error(
            "A model name is 1 to 64 letters, digits, '.', '_', ':' or '-'.".into(),
        );
    }
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() || m.is_dir() => {}
        _ => {
            return Flash::Error(format!(
                "{path} is not a file or bundle folder this appliance can read."
            ))
        }
    }
    let progress = std::sync::Arc::new(crate::Progress::default());
    {
        // Checked and taken under one lock: never two imports at once.
        let mut slot = crate::lock(&c.import);
        if slot.as_ref().is_some_and(|i| i.result.is_none()) {
            return Flash::Error("An import is already running; wait for it to finish.".into());
        }
        *slot = Some(crate::Import {
            source: path.clone(),
            by: v.user.to_string(),
            progress: progress.clone(),
            result: None,
        });
    }
    if let Err(e) = c
        .record(
            Some(v.user),
            r.peer,
            "model.import.start",
            200,
            Some(format!("file:{path}")),
            (!name.is_empty()).then(|| format!("name {name}")),
        )
        .await
    {
        if let Some(i) = crate::lock(&c.import).as_mut() {
            i.result = Some(Err(e.clone()));
        }
        return Flash::Error(e);
    }
    spawn_import(
        c,
        path.into(),
        (!name.is_empty()).then_some(name),
        progress,
        v.user.to_string(),
        r.peer,
        false,
    );
    Flash::Ok("Import started.".into())
}

/// Runs an import in the background: its outcome is recorded and kept for the progress
/// poll; with `delete_after` (an upload) the source file is removed when it ends.
pub(crate) fn spawn_import(
    c: &Console,
    path: std::path::PathBuf,
    name: Option<String>,
    progress: std::sync::Arc<crate::Progress>,
    user: String,
    peer: std::net::SocketAddr,
    delete_after: bool,
) {
    let fut = c.ops.import_model(path.clone(), name, progress);
    let (slot, auditor) = (c.import.clone(), c.auditor.clone());
    tokio::spawn(async move {
        let result = fut.await;
        if delete_after {
            let _ = std::fs::remove_file(&path);
        }
        let mut rec =
            appliance_audit::Record::action("model.import", if result.is_ok() { 200 } else { 400 });
        rec.user = Some(user);
        rec.source = Some(peer.ip().to_string());
        rec.resource = Some(if delete_after {
            format!(
                "upload:{}",
                path.file_name().unwrap_or_default().to_string_lossy()
            )
        } else {
            format!("file:{}", path.display())
        });
        rec.detail = Some(match &result {
            Ok(m) | Err(m) => m.chars().take(200).collect(),
        });
        if result.is_err() {
            rec.error = Some("failed".into());
        }
        let _ = auditor.record(rec).await;
        if let Some(i) = crate::lock(&slot).as_mut() {
            i.result = Some(result);
        }
    });
}

fn import_progress(c: &Console) -> Resp {
    let body = match crate::lock(&c.import).as_ref() {
        None => serde_json::json!({"active": false}),
        Some(i) => serde_json::json!({
            "active": i.result.is_none(),
            "source": i.source,
            "by": i.by,
            "done": i.progress.done.load(std::sync::atomic::Ordering::Relaxed),
            "total": i.progress.total.load(std::sync::atomic::Ordering::Relaxed),
            "ok": i.result.as_ref().map(|r| r.is_ok()),
            "message": i.result.as_ref().map(|r| match r { Ok(m) | Err(m) => m.clone() }),
        }),
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_default()
}

async fn models(c: &Console, v: &Viewer<'_>, flash: Flash) -> Resp {
    let registry = c.store.models().await.unwrap_or_default();
    let pins = c.store.model_devices().await.unwrap_or_default();
    let served = c.gateway.status();
    let mut rows = vec![];
    let mut names: Vec<String> = registry.iter().map(|m| m.name.clone()).collect();
    for m in c.gateway.models() {
        if !names.contains(&m.name) {
            names.push(m.name.clone());
        }
    }
    for name in &names {
        let reg = registry.iter().find(|m| &m.name == name);
        let states: Vec<String> = served["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| w["model"].as_str() == Some(name))
            .map(|w| {
                format!(
                    "{} on {}",
                    w["state"].as_str().unwrap_or(""),
                    w["device"].as_str().unwrap_or("")
                )
            })
            .collect();
        let loaded = !states.is_empty();
        let action = if v.role == Role::Admin || v.role == Role::Operator {
            button(
                "/models/action",
                if loaded { "Unload" } else { "Load" },
                v.csrf,
                &[
                    ("model", name),
                    ("action", if loaded { "unload" } else { "load" }),
                ],
                loaded,
            )
        } else {
            String::new()
        };
        rows.push(vec![
            esc(name),
            reg.map(|m| html::bytes(m.size.max(0) as u64))
                .unwrap_or_else(|| "–".into()),
            reg.map(|m| esc(&m.quantization))
                .unwrap_or_else(|| "–".into()),
            reg.map(|m| m.context_length.to_string())
                .unwrap_or_else(|| "–".into()),
            reg.map(|m| esc(&m.architecture))
                .unwrap_or_else(|| "–".into()),
            if loaded {
                esc(&states.join(", "))
            } else {
                "not loaded".into()
            },
            pins.get(name)
                .map(|d| esc(d))
                .unwrap_or_else(|| "automatic".into()),
            action,
        ]);
    }
    // Pinning: one form for every model (the table's rows stay one button each).
    let pin_form = if registry.is_empty() {
        String::new()
    } else {
        let inv = appliance_supervisor::inventory::read(&c.data_dir);
        let gpus: Vec<String> = inv
            .gpus
            .iter()
            .map(|g| format!("cuda:{}", g.index))
            .collect();
        let mut devices: Vec<(&str, &str)> =
            vec![("auto", "automatic (by free memory)"), ("cpu", "cpu")];
        devices.extend(gpus.iter().map(|g| (g.as_str(), g.as_str())));
        let names: Vec<(&str, &str)> = registry
            .iter()
            .map(|m| (m.name.as_str(), m.name.as_str()))
            .collect();
        format!(
            "<section class=\"card narrow\"><h2>Placement</h2><p>Pin a model to a device: it is placed there from its next load (a loaded model moves when it is unloaded and loaded again). A pin in appliance.toml's <code>[devices]</code> takes precedence and is changed there.</p><form method=\"post\" action=\"/models/pin\">{}{}{}<p><button type=\"submit\">Pin</button></p></form></section>",
            csrf_field(v.csrf),
            select("model", "Model", &names, ""),
            select("device", "Device", &devices, "auto"),
        )
    };
    let running = crate::lock(&c.import)
        .as_ref()
        .is_some_and(|i| i.result.is_none());
    let body = format!(
        "{}<section class=\"card narrow\"><h2>Import</h2><p>A GGUF file or a signed bundle already on the appliance (for example on a mounted USB drive): its signature is checked against the site's trusted signers.</p><form method=\"post\" action=\"/models/import\">{}{}{}<p><button type=\"submit\">Import</button></p></form><div id=\"import\" data-active=\"{}\"><label for=\"import-bar\">Import progress</label> <progress id=\"import-bar\" max=\"1\" value=\"0\"></progress> <output id=\"import-status\"></output></div></section>\
<section class=\"card narrow\"><h2>Upload</h2><p>A GGUF file or a signed bundle (.tar) from this computer: it is sent to the appliance, then imported with the same checks.</p><form id=\"upload\">{}<p class=\"field\"><label for=\"up-file\">Model file</label><input id=\"up-file\" type=\"file\" accept=\".gguf,.tar\" required></p><p class=\"field\"><label for=\"up-name\">Name of the uploaded model (empty: the bundle's or the file's)</label><input id=\"up-name\" type=\"text\"></p><p><button type=\"submit\">Upload and import</button></p><p><label for=\"upload-bar\">Upload progress</label> <progress id=\"upload-bar\" max=\"1\" value=\"0\"></progress> <output id=\"upload-status\" role=\"status\"></output></p></form></section>",
        table(
            "Models",
            &["Name", "Size", "Quantization", "Context", "Architecture", "State", "Device", ""],
            &rows
        ),
        csrf_field(v.csrf),
        field("path", "Path on the appliance", "text", "", "required placeholder=\"/media/usb/model.bundle\""),
        field("name", "Name (empty: the bundle's or the file's)", "text", "", ""),
        running,
        csrf_field(v.csrf)
    ) + &pin_form;
    ok_page("Models", v, flash, &body)
}

async fn keys(c: &Console, v: &Viewer<'_>, flash: Flash, secret: Option<(String, String)>) -> Resp {
    let tenants = c.store.tenants().await.unwrap_or_default();
    let all = c.store.keys(None).await.unwrap_or_default();
    let t = now();
    let (day, month) = usage_by_key(c, t).await;
    let mut b = String::new();
    if let Some((id, text)) = secret {
        let _ = write!(
            b,
            "<div class=\"card secret\" role=\"region\" aria-label=\"New key\"><h2>Key {} created</h2><p>Copy the secret now: it is shown only once and cannot be recovered.</p>\
<p><label for=\"new-secret\">Secret</label><input id=\"new-secret\" type=\"text\" readonly value=\"{}\"> <button type=\"button\" class=\"copy\" data-copy=\"new-secret\">Copy</button></p></div>",
            esc(&id),
            esc(&text)
        );
    }
    let trows: Vec<Vec<String>> = tenants
        .iter()
        .map(|tn| {
            let n = all
                .iter()
                .filter(|k| k.tenant == tn.name && k.status(t) == "active")
                .count();
            let (req, tok) = all
                .iter()
                .filter(|k| k.tenant == tn.name)
                .filter_map(|k| month.get(&k.id))
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            vec![
                esc(&tn.name),
                time(Some(tn.created_at)),
                n.to_string(),
                format!("{req} / {tok}"),
            ]
        })
        .collect();
    let _ = write!(
        b,
        "<section class=\"grid\"><div class=\"card\">{}<form method=\"post\" action=\"/keys/tenant\">{}{}<p><button type=\"submit\">Create tenant</button></p></form></div>",
        table("Tenants", &["Tenant", "Created", "Active keys", "30 days: requests / tokens"], &trows),
        csrf_field(v.csrf),
        field("name", "New tenant name", "text", "", "required")
    );
    let options: Vec<(&str, &str)> = tenants
        .iter()
        .map(|tn| (tn.name.as_str(), tn.name.as_str()))
        .collect();
    let _ = write!(
        b,
        "<div class=\"card\"><h2>New API key</h2><form method=\"post\" action=\"/keys/create\">{}{}{}{}{}{}{}{}<p><button type=\"submit\">Create key</button></p></form></div></section>",
        csrf_field(v.csrf),
        select("tenant", "Tenant", &options, ""),
        field("label", "Label (the application using it)", "text", "", ""),
        field("days", "Expires after (days; empty: never)", "number", "", "min=\"1\" max=\"3650\""),
        field("models", "Models (comma-separated; empty: all)", "text", "", ""),
        field("rpm", "Requests per minute (empty: no limit)", "number", "", "min=\"1\""),
        field("tpm", "Tokens per minute (empty: no limit)", "number", "", "min=\"1\""),
        field("concurrency", "Requests at once (empty: no limit)", "number", "", "min=\"1\""),
    );
    let krows: Vec<Vec<String>> = all
        .iter()
        .map(|k| {
            let status = k.status(t);
            let actions = if status == "active" {
                format!(
                    "{} {}",
                    button("/keys/rotate", "Rotate", v.csrf, &[("id", &k.id)], true),
                    button("/keys/revoke", "Revoke", v.csrf, &[("id", &k.id)], true)
                )
            } else {
                String::new()
            };
            let (req, tok) = month.get(&k.id).copied().unwrap_or((0, 0));
            let hours = day.get(&k.id).cloned().unwrap_or_default();
            vec![
                format!("<code>{}</code>", esc(&k.id)),
                esc(&k.tenant),
                esc(k.label.as_deref().unwrap_or("")),
                esc(&k.scope),
                format!("<span class=\"state {0}\">{0}</span>", status),
                time(Some(k.created_at)),
                time(k.expires_at),
                esc(&k
                    .models
                    .as_ref()
                    .map(|m| m.join(", "))
                    .unwrap_or_else(|| "all".into())),
                format!("{} {req} / {tok}", sparkline(&hours, &k.id)),
                actions,
            ]
        })
        .collect();
    b.push_str(&table(
        "API keys (secrets are never shown again)",
        &[
            "Id",
            "Tenant",
            "Label",
            "Scope",
            "Status",
            "Created",
            "Expires",
            "Models",
            "Requests / tokens",
            "",
        ],
        &krows,
    ));
    b.push_str("<p><a href=\"/keys/usage.csv?days=31\">Download usage by hour, tenant, key and model (CSV, last 31 days)</a></p>");
    ok_page("Tenants & keys", v, flash, &b)
}

/// Per key: requests in each of the last 24 hours, and (requests, tokens) over 30 days.
/// What the gateway counted since the last flush is added to the store first.
#[allow(clippy::type_complexity)]
async fn usage_by_key(
    c: &Console,
    now_s: i64,
) -> (
    std::collections::HashMap<String, Vec<i64>>,
    std::collections::HashMap<String, (i64, i64)>,
) {
    let _ = c.store.add_usage(&c.gateway.take_usage()).await;
    let hour = now_s.div_euclid(3600);
    let rows = c.store.usage(hour - 24 * 30).await.unwrap_or_default();
    let mut day: std::collections::HashMap<String, Vec<i64>> = Default::default();
    let mut month: std::collections::HashMap<String, (i64, i64)> = Default::default();
    for u in rows {
        let m = month.entry(u.key_id.clone()).or_default();
        m.0 += u.requests;
        m.1 += u.prompt_tokens + u.completion_tokens;
        let back = hour - u.hour;
        if (0..24).contains(&back) {
            day.entry(u.key_id).or_insert_with(|| vec![0; 24])[(23 - back) as usize] += u.requests;
        }
    }
    (day, month)
}

/// Requests per hour over the last 24 hours as a small inline SVG (no script).
fn sparkline(hours: &[i64], key: &str) -> String {
    let max = hours.iter().copied().max().unwrap_or(0).max(1) as f64;
    let points: Vec<String> = (0..24)
        .map(|i| {
            let v = hours.get(i).copied().unwrap_or(0) as f64;
            format!("{},{:.1}", i * 4, 18.0 - v / max * 16.0)
        })
        .collect();
    format!(
        "<svg class=\"spark\" viewBox=\"0 0 92 20\" role=\"img\" aria-label=\"Requests per hour for key {}, last 24 hours: {} in all\"><polyline points=\"{}\"/></svg>",
        esc(key),
        hours.iter().sum::<i64>(),
        points.join(" ")
    )
}

fn opt_u32(s: &str, what: &str) -> Result<Option<u32>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    match s.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(Some(n)),
        _ => Err(format!("{what} must be a whole number of at least 1.")),
    }
}

async fn key_create(c: &Console, r: &Req, v: &Viewer<'_>) -> Resp {
    let parsed = (|| {
        let days = opt_u32(r.f("days"), "The expiry")?;
        let models: Option<Vec<String>> = {
            let list: Vec<String> = r
                .f("models")
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            if list.iter().any(|m| !valid_name(m)) {
                return Err(
                    "A model name is 1 to 64 letters, digits, '.', '_', ':' or '-'.".to_string(),
                );
            }
            (!list.is_empty()).then_some(list)
        };
        Ok((
            days,
            models,
            opt_u32(r.f("rpm"), "Requests per minute")?,
            opt_u32(r.f("tpm"), "Tokens per minute")?,
            opt_u32(r.f("concurrency"), "Requests at once")?,
        ))
    })();
    let (days, models, rpm, tpm, concurrency) = match parsed {
        Ok(x) => x,
        Err(e) => return keys(c, v, Flash::Error(e), None).await,
    };
    let label = r.f("label").trim();
    let secret = appliance_gateway::keys::generate();
    let t = now();
    let rec = c
        .store
        .insert_key(
            &NewKey {
                id: secret.id.clone(),
                tenant: r.f("tenant").to_string(),
                secret_sha256: secret.sha256.clone(),
                expires_at: days.map(|d| t + i64::from(d) * 86_400),
                models,
                rpm,
                tpm,
                max_concurrency: concurrency,
                label: (!label.is_empty()).then(|| label.chars().take(100).collect()),
                scope: "inference".into(),
            },
            t,
        )
        .await;
    let rec = match rec {
        Ok(k) => k,
        Err(e) => return keys(c, v, Flash::Error(e.to_string()), None).await,
    };
    let message = format!("Key {} created for {}.", rec.id, rec.tenant);
    let detail = format!("tenant {}", rec.tenant);
    let resource = format!("key:{}", rec.id);
    publish_key(
        c,
        r,
        v,
        ("key.create", resource, detail),
        rec.id,
        secret.text,
        message,
    )
    .await
}

/// Records a new key's creation (withdrawing the key if that fails), tells the gateway,
/// and shows the secret once.
async fn publish_key(
    c: &Console,
    r: &Req,
    v: &Viewer<'_>,
    (action, resource, detail): (&str, String, String),
    id: String,
    secret: String,
    message: String,
) -> Resp {
    // Recorded before the secret is shown; unrecorded, the key is withdrawn.
    if let Err(e) = c
        .record(
            Some(v.user),
            r.peer,
            action,
            200,
            Some(resource),
            Some(detail),
        )
        .await
    {
        let _ = c.store.revoke_key(&id, now()).await;
        return keys(c, v, Flash::Error(e), None).await;
    }
    let _ = c.gateway.keys().reload_if_changed().await;
    keys(c, v, Flash::Ok(message), Some((id, secret))).await
}

async fn key_rotate(c: &Console, r: &Req, v: &Viewer<'_>) -> Resp {
    let id = r.f("id");
    let Ok(Some(old)) = c.store.key(id).await else {
        return keys(c, v, Flash::Error(format!("No key {id}.")), None).await;
    };
    let secret = appliance_gateway::keys::generate();
    let t = now();
    let new = old.successor(secret.id.clone(), secret.sha256.clone());
    // Recorded first (naming the new key), then done; the old key keeps working for a
    // day, as with `appliance key rotate`.
    let resource = format!("key:{id}");
    if let Err(e) = c
        .record(
            Some(v.user),
            r.peer,
            "key.rotate",
            200,
            Some(resource.clone()),
            Some(format!("replaced by {}", secret.id)),
        )
        .await
    {
        return keys(c, v, Flash::Error(e), None).await;
    }
    let rec = match c.store.rotate_key(id, &new, t + 86_400, t).await {
        Ok(k) => k,
        Err(e) => {
            let _ = c
                .record(
                    Some(v.user),
                    r.peer,
                    "key.rotate",
                    409,
                    Some(resource),
                    Some(e.to_string()),
                )
                .await;
            return keys(c, v, Flash::Error(e.to_string()), None).await;
        }
    };
    let _ = c.gateway.keys().reload_if_changed().await;
    let message = format!(
        "Key {id} replaced by {}; the old one works for 24 hours more.",
        rec.id
    );
    keys(c, v, Flash::Ok(message), Some((rec.id, secret.text))).await
}

fn policy_path(c: &Console) -> std::path::PathBuf {
    c.data_dir.join("policy").join("policy.toml")
}

async fn policy(
    c: &Console,
    v: &Viewer<'_>,
    flash: Flash,
    draft: Option<(String, Vec<appliance_policy::Problem>)>,
    explained: Option<(String, String, String)>,
) -> Resp {
    let state = c.gateway.policy();
    let p = &state.policy;
    let on_disk = std::fs::read_to_string(policy_path(c)).ok();
    let (text, problems) = match draft {
        Some((t, ps)) => (t, ps),
        None => (on_disk.clone().unwrap_or_default(), vec![]),
    };
    let mut b = format!(
        "<section class=\"card\"><h2>In force</h2><dl><dt>Name</dt><dd>{}</dd><dt>Version</dt><dd><code>{}</code></dd><dt>Rules</dt><dd>{}</dd><dt>Source</dt><dd>{}</dd></dl></section>",
        esc(&p.name),
        esc(&p.version),
        p.rules.len(),
        if on_disk.is_some() { "DATA/policy/policy.toml" } else { "built-in (no policy file): every request stays on the appliance's own models" }
    );
    if !problems.is_empty() {
        b.push_str("<div class=\"card problems\" role=\"alert\"><h2>Not applied: the draft has problems</h2><ul>");
        for pr in &problems {
            let _ = write!(
                b,
                "<li><a href=\"#f-policy\" data-line=\"{}\">policy.toml:{}:{}</a>: {}</li>",
                pr.line,
                pr.line,
                pr.column,
                esc(&pr.message)
            );
        }
        b.push_str("</ul></div>");
    }
    let _ = write!(
        b,
        "<section class=\"card\"><h2>Edit</h2><form method=\"post\" action=\"/policy/apply\">{}<p class=\"field\"><label for=\"f-policy\">policy.toml (docs/POLICY.md has the schema)</label><textarea id=\"f-policy\" name=\"policy\" rows=\"24\" spellcheck=\"false\">{}</textarea></p><p><button type=\"submit\">Validate and apply</button></p></form></section>",
        csrf_field(v.csrf),
        esc(&text)
    );
    let (tenant, request, result) = explained.unwrap_or_else(|| {
        (
            String::new(),
            "{\"model\": \"default\", \"messages\": [{\"role\": \"user\", \"content\": \"Summarise the referral for NHS number 943 476 5919.\"}]}".into(),
            String::new(),
        )
    });
    let _ = write!(
        b,
        "<section class=\"card\"><h2>Dry run</h2><p>Nothing is sent: the result says what the policy in force would do.</p><form method=\"post\" action=\"/policy/explain\">{}{}<p class=\"field\"><label for=\"f-request\">Request (JSON, as an application would send it)</label><textarea id=\"f-request\" name=\"request\" rows=\"6\" spellcheck=\"false\">{}</textarea></p><p><button type=\"submit\">Explain</button></p></form>{}</section>",
        csrf_field(v.csrf),
        field("tenant", "Tenant", "text", &tenant, "required"),
        esc(&request),
        if result.is_empty() { String::new() } else { format!("<h3>Result</h3><pre id=\"explain-result\">{}</pre>", esc(&result)) }
    );
    ok_page("Policy", v, flash, &b)
}

async fn policy_apply(c: &Console, r: &Req, v: &Viewer<'_>) -> Resp {
    let text = r.f("policy").replace("\r\n", "\n");
    if let Err(problems) = appliance_policy::parse(&text) {
        let _ = c
            .record(
                Some(v.user),
                r.peer,
                "policy.apply",
                400,
                None,
                Some(format!("{} problem(s)", problems.len())),
            )
            .await;
        return policy(
            c,
            v,
            Flash::Error("The draft does not validate; the policy in force is unchanged.".into()),
            Some((text, problems)),
            None,
        )
        .await;
    }
    if let Err(e) = c
        .record(Some(v.user), r.peer, "policy.apply", 200, None, None)
        .await
    {
        return policy(c, v, Flash::Error(e), Some((text, vec![])), None).await;
    }
    let path = policy_path(c);
    let write = (|| {
        std::fs::create_dir_all(path.parent().unwrap_or(&c.data_dir))?;
        let tmp = path.with_extension("toml.new");
        std::fs::write(&tmp, &text)?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = write {
        return policy(
            c,
            v,
            Flash::Error(format!("Writing the policy: {e}")),
            Some((text, vec![])),
            None,
        )
        .await;
    }
    let flash = match c.ops.reload_policy().await {
        Ok(version) => Flash::Ok(format!("Policy {version} is in force.")),
        Err(e) => Flash::Error(e),
    };
    policy(c, v, flash, None, None).await
}

async fn upstreams(c: &Console, v: &Viewer<'_>, flash: Flash) -> Resp {
    let state = c.gateway.policy();
    let rows: Vec<Vec<String>> = c
        .gateway
        .upstream_health()
        .into_iter()
        .map(|(d, h)| {
            let cred = match &d.credential {
                Some(n) if state.credentials.contains_key(n) => format!("{} (set)", esc(n)),
                Some(n) => format!("{} (<strong>missing</strong>)", esc(n)),
                None => "–".into(),
            };
            vec![
                esc(&d.name),
                match d.kind {
                    appliance_policy::Kind::OnPrem => "on-prem".into(),
                    _ => "external".into(),
                },
                esc(d.url.as_deref().unwrap_or("")),
                esc(d.jurisdiction.as_deref().unwrap_or("–")),
                esc(d.provider.as_deref().unwrap_or("–")),
                format!("{} / {}", d.price_in_per_1k, d.price_out_per_1k),
                format!("<span class=\"state {0}\">{0}</span>", h.circuit),
                h.in_flight.to_string(),
                h.latency_ms
                    .map(|l| format!("{l:.0} ms"))
                    .unwrap_or_else(|| "–".into()),
                cred,
            ]
        })
        .collect();
    let mut b = table(
        "Upstream destinations of the policy in force",
        &[
            "Name",
            "Kind",
            "URL",
            "Jurisdiction",
            "Provider",
            "Price in/out per 1k",
            "Circuit",
            "In flight",
            "Latency (avg)",
            "Credential",
        ],
        &rows,
    );
    if v.role == Role::Admin {
        let _ = write!(
            b,
            "<section class=\"card narrow\"><h2>Set a credential</h2><p>Write-only: a stored credential is never shown again.</p><form method=\"post\" action=\"/upstreams/credential\">{}{}{}<p><button type=\"submit\">Store</button></p></form></section>",
            csrf_field(v.csrf),
            field("name", "Credential name (as in the destination's credential =)", "text", "", "required"),
            field("secret", "Secret", "password", "", "required autocomplete=\"off\"")
        );
    }
    ok_page("Upstreams", v, flash, &b)
}

async fn credential(c: &Console, r: &Req, v: &Viewer<'_>) -> Resp {
    let name = r.f("name").trim();
    let secret = r.f("secret").trim();
    if !valid_name(name) || secret.is_empty() || secret.contains('\n') {
        return upstreams(c, v, Flash::Error("Give a credential name (letters, digits, '.', '_', ':', '-') and a one-line secret.".into())).await;
    }
    if let Err(e) = c
        .record(
            Some(v.user),
            r.peer,
            "credential.set",
            200,
            Some(format!("credential:{name}")),
            None,
        )
        .await
    {
        return upstreams(c, v, Flash::Error(e)).await;
    }
    let dir = c.data_dir.join("policy").join("credentials");
    let write = (|| {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let tmp = dir.join(format!(".{name}.new"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, secret.as_bytes())?;
        std::fs::rename(&tmp, dir.join(name))
    })();
    if let Err(e) = write {
        return upstreams(c, v, Flash::Error(format!("Storing the credential: {e}"))).await;
    }
    let flash = match c.ops.reload_policy().await {
        Ok(_) => Flash::Ok(format!("Credential {name} stored and in use.")),
        Err(e) => Flash::Error(format!("Stored, but the policy did not reload: {e}")),
    };
    upstreams(c, v, flash).await
}

/// Percent-encodes a query-string component (everything but unreserved characters).
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM` (UTC) to unix milliseconds.
fn parse_when(s: &str) -> Option<i64> {
    let s = s.trim();
    let date = s.get(..10)?;
    let mut it = date.split('-');
    let (y, m, d): (i64, i64, i64) = (
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let (hh, mm) = match s.get(11..16) {
        Some(t) => {
            let (h, mi) = t.split_once(':')?;
            (h.parse::<i64>().ok()?, mi.parse::<i64>().ok()?)
        }
        None => (0, 0),
    };
    // Days from civil (Howard Hinnant).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400) + hh * 3600 + mm * 60) * 1000)
}

/// The export form's fields (ids of their own: the filter form above has `since` too).
const EXPORT_FIELDS: &str = "<p class=\"field\"><label for=\"x-since\">From (RFC 3339 or date; empty: the start)</label><input id=\"x-since\" name=\"since\" type=\"text\"></p>\
<p class=\"field\"><label for=\"x-until\">Until (empty: now)</label><input id=\"x-until\" name=\"until\" type=\"text\"></p>";

async fn audit(c: &Console, r: &Req, v: &Viewer<'_>, flash: Flash) -> Resp {
    let mut f = AuditFilter {
        since_ms: r.q("since").and_then(parse_when),
        until_ms: r.q("until").and_then(parse_when),
        tenant: r.q("tenant").map(str::to_string),
        key_id: r.q("key").map(str::to_string),
        action: r.q("action").map(str::to_string),
        outcome: r
            .q("outcome")
            .filter(|o| *o == "ok" || *o == "error")
            .map(str::to_string),
        before_seq: r.q("before").and_then(|s| s.parse().ok()),
        limit: 100,
    };
    f.limit = 100;
    // The store trails the journal by milliseconds: show everything committed.
    let _ = c.auditor.settle().await;
    let found = c.audit_db.search(&f).await;
    let _ = c
        .record(
            Some(v.user),
            r.peer,
            "audit.read",
            200,
            None,
            Some(format!(
                "filter {:?}",
                r.query
                    .iter()
                    .filter(|(_, v)| !v.is_empty())
                    .collect::<std::collections::BTreeMap<_, _>>()
            )),
        )
        .await;
    let mut b = String::new();
    let val = |k: &str| r.q(k).unwrap_or("").to_string();
    let _ = write!(
        b,
        "<form method=\"get\" action=\"/audit\" class=\"card filters\"><div class=\"row\">{}{}{}{}{}{}</div><p><button type=\"submit\">Filter</button> <a href=\"/audit\">Clear</a></p></form>",
        field("since", "From (UTC, YYYY-MM-DD[THH:MM])", "text", &val("since"), ""),
        field("until", "Until (UTC)", "text", &val("until"), ""),
        field("tenant", "Tenant", "text", &val("tenant"), ""),
        field("key", "Key id", "text", &val("key"), ""),
        field("action", "Action", "text", &val("action"), "list=\"actions\""),
        select("outcome", "Outcome", &[("", "any"), ("ok", "success"), ("error", "refused or failed")], &val("outcome")),
    );
    b.push_str("<datalist id=\"actions\"><option value=\"chat.completions\"><option value=\"completions\"><option value=\"console.login\"><option value=\"key.create\"><option value=\"key.revoke\"><option value=\"policy.load\"><option value=\"audit.verify\"></datalist>");
    let rows: Vec<Vec<String>> = match &found {
        Ok(list) => list
            .iter()
            .filter_map(|(seq, text)| {
                let rec: serde_json::Value = serde_json::from_str(text).ok()?;
                let actor = rec["user"]
                    .as_str()
                    .map(|u| format!("user {u}"))
                    .or_else(|| {
                        rec["tenant"]
                            .as_str()
                            .map(|t| format!("{t} / {}", rec["key_id"].as_str().unwrap_or("-")))
                    });
                Some(vec![
                    format!("<a href=\"/audit/record?seq={seq}\">{seq}</a>"),
                    esc(rec["time"].as_str().unwrap_or("")),
                    esc(&actor.unwrap_or_else(|| "–".into())),
                    esc(rec["action"].as_str().unwrap_or("")),
                    esc(rec["resource"].as_str().unwrap_or("")),
                    esc(rec["destination"].as_str().unwrap_or("")),
                    esc(rec["decision"].as_str().unwrap_or("")),
                    format!(
                        "<span class=\"status s{}\">{}</span>",
                        rec["status"].as_u64().unwrap_or(0) / 100,
                        rec["status"].as_u64().unwrap_or(0)
                    ),
                ])
            })
            .collect(),
        Err(_) => vec![],
    };
    let last = found.as_ref().ok().and_then(|l| l.last().map(|x| x.0));
    b.push_str(&table(
        "Audit records, newest first",
        &[
            "Seq",
            "Time (UTC)",
            "Actor",
            "Action",
            "Resource",
            "Destination",
            "Decision",
            "Status",
        ],
        &rows,
    ));
    if let (Some(last), 100) = (last, rows.len()) {
        let mut q: Vec<String> = r
            .query
            .iter()
            .filter(|(k, v)| *k != "before" && !v.is_empty())
            .map(|(k, v)| format!("{}={}", url_encode(k), url_encode(v)))
            .collect();
        q.push(format!("before={last}"));
        let _ = write!(
            b,
            "<p><a href=\"/audit?{}\">Older records</a></p>",
            q.join("&amp;")
        );
    }
    let _ = write!(
        b,
        "<section class=\"grid\"><div class=\"card\"><h2>Verify</h2><p>Recomputes the whole tree from the stored records and checks every signed checkpoint.</p>{}</div>\
<div class=\"card\"><h2>Export</h2><form method=\"get\" action=\"/audit/export\">{}<p><button type=\"submit\">Download export</button> <a href=\"/audit/public-key\">Download the public key</a></p></form><p class=\"hint\">Check an export anywhere with <code>appliance audit verify-export FILE --public-key KEY</code>.</p></div></section>",
        button("/audit/verify", "Verify now", v.csrf, &[], false),
        EXPORT_FIELDS,
    );
    let flash = match (flash, &found) {
        (Flash::None, Err(e)) => Flash::Error(format!("Reading the audit log: {e}")),
        (f, _) => f,
    };
    ok_page("Audit", v, flash, &b)
}

async fn audit_record(c: &Console, r: &Req, v: &Viewer<'_>) -> Resp {
    let seq: u64 = r.q("seq").and_then(|s| s.parse().ok()).unwrap_or(0);
    let _ = c.auditor.settle().await;
    let rows = c.audit_db.rows(seq, 1).await.unwrap_or_default();
    let _ = c
        .record(
            Some(v.user),
            r.peer,
            "audit.read",
            200,
            Some(format!("record:{seq}")),
            None,
        )
        .await;
    let Some(row) = rows.into_iter().find(|x| x.seq == seq) else {
        return page(
            StatusCode::NOT_FOUND,
            frame(
                "Audit record",
                Some(v),
                &Flash::Error(format!("No record {seq}.")),
                "",
            ),
        );
    };
    let body = match &row.body {
        Some(text) => serde_json::from_str::<serde_json::Value>(text)
            .map(|j| serde_json::to_string_pretty(&j).unwrap_or_default())
            .unwrap_or_else(|_| text.clone()),
        None => "(pruned: only its hash is kept)".into(),
    };
    let b = format!(
        "<p><a href=\"/audit\">All records</a></p><dl><dt>Sequence</dt><dd>{}</dd><dt>Leaf hash</dt><dd><code>{}</code></dd></dl><pre>{}</pre>",
        row.seq,
        appliance_gateway::keys::hex(&row.leaf),
        esc(&body)
    );
    ok_page(&format!("Audit record {seq}"), v, Flash::None, &b)
}

async fn users(c: &Console, v: &Viewer<'_>, flash: Flash) -> Resp {
    let list = c.store.users().await.unwrap_or_default();
    let t = now();
    let roles = [
        ("admin", "admin"),
        ("operator", "operator"),
        ("auditor", "auditor"),
    ];
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|u| {
            let state = if u.disabled {
                "disabled"
            } else if u.locked_until.is_some_and(|l| l > t) {
                "locked"
            } else {
                "active"
            };
            let me = u.name == v.user;
            let mut actions = String::new();
            if !me {
                let _ = write!(
                    actions,
                    "<form method=\"post\" action=\"/users/role\" class=\"inline\">{0}<input type=\"hidden\" name=\"user\" value=\"{1}\"><label class=\"sr\" for=\"r-{1}\">Role of {1}</label><select id=\"r-{1}\" name=\"role\">{2}</select> <button type=\"submit\">Set role</button></form> ",
                    csrf_field(v.csrf),
                    esc(&u.name),
                    roles
                        .iter()
                        .map(|(r, _)| format!("<option{}>{r}</option>", if *r == u.role { " selected" } else { "" }))
                        .collect::<String>()
                );
                actions.push_str(&if u.disabled {
                    button("/users/enable", "Enable", v.csrf, &[("user", &u.name)], false)
                } else {
                    button("/users/disable", "Disable", v.csrf, &[("user", &u.name)], true)
                });
            }
            vec![
                esc(&u.name),
                esc(&u.role),
                format!("<span class=\"state {state}\">{state}</span>"),
                time(u.last_login),
                time(Some(u.created_at)),
                actions,
            ]
        })
        .collect();
    let mut b = table(
        "Console users",
        &["User", "Role", "State", "Last login", "Created", ""],
        &rows,
    );
    let _ = write!(
        b,
        "<section class=\"grid\"><div class=\"card\"><h2>New user</h2><form method=\"post\" action=\"/users/create\">{}{}{}{}<p><button type=\"submit\">Create user</button></p></form></div>\
<div class=\"card\"><h2>Reset a password</h2><form method=\"post\" action=\"/users/reset\">{}{}{}<p><button type=\"submit\">Set password</button></p></form><p class=\"hint\">Ends the user's sessions and clears a lockout.</p></div></section>",
        csrf_field(v.csrf),
        field("user", "User name", "text", "", "required autocomplete=\"off\""),
        select("role", "Role", &roles, "operator"),
        field("password", &format!("Initial password (at least {} characters)", password::MIN_LENGTH), "password", "", "required autocomplete=\"new-password\""),
        csrf_field(v.csrf),
        field("reset-user", "User name", "text", "", "required autocomplete=\"off\""),
        field("reset-password", "New password", "password", "", "required autocomplete=\"new-password\""),
    );
    ok_page("Users", v, flash, &b)
}

async fn user_action(c: &Console, r: &Req, v: &Viewer<'_>) -> Flash {
    let target = match r.path.as_str() {
        "/users/reset" => r.f("reset-user").trim(),
        _ => r.f("user").trim(),
    }
    .to_string();
    if !valid_name(&target) {
        return Flash::Error(
            "A user name is 1 to 64 letters, digits, '.', '_', ':' or '-'.".into(),
        );
    }
    if target == v.user && r.path != "/users/reset" {
        return Flash::Error("You cannot change your own role or disable yourself.".into());
    }
    let action = match r.path.as_str() {
        "/users/create" => "user.create",
        "/users/role" => "user.role",
        "/users/disable" => "user.disable",
        "/users/enable" => "user.enable",
        _ => "user.reset",
    };
    let role = r.f("role");
    if matches!(action, "user.create" | "user.role") && Role::parse(role).is_none() {
        return Flash::Error("Choose a role: admin, operator or auditor.".into());
    }
    let pw = match action {
        "user.create" => r.f("password").to_string(),
        "user.reset" => r.f("reset-password").to_string(),
        _ => String::new(),
    };
    let hash = if action == "user.create" || action == "user.reset" {
        if let Some(why) = password::weakness(&target, &pw) {
            return Flash::Error(why);
        }
        match tokio::task::spawn_blocking(move || password::hash(&pw)).await {
            Ok(Ok(h)) => Some(h),
            _ => return Flash::Error("The password could not be hashed.".into()),
        }
    } else {
        None
    };
    let detail = matches!(action, "user.create" | "user.role").then(|| format!("role {role}"));
    if let Err(e) = c
        .record(
            Some(v.user),
            r.peer,
            action,
            200,
            Some(format!("user:{target}")),
            detail,
        )
        .await
    {
        return Flash::Error(e);
    }
    let result = match action {
        "user.create" => c
            .store
            .create_user(&target, role, hash.as_deref().unwrap_or(""), now())
            .await
            .map(|_| ()),
        "user.role" => c.store.set_user_role(&target, role).await,
        "user.disable" => c.store.set_user_disabled(&target, true).await,
        "user.enable" => c.store.set_user_disabled(&target, false).await,
        _ => {
            c.store
                .set_user_password(&target, hash.as_deref().unwrap_or(""))
                .await
        }
    };
    match result {
        Err(e) => Flash::Error(e.to_string()),
        Ok(()) => {
            if action != "user.create" && action != "user.enable" {
                c.end_sessions_of(&target);
            }
            Flash::Ok(match action {
                "user.create" => format!("User {target} created as {role}."),
                "user.role" => format!("{target} is now {role}."),
                "user.disable" => format!("{target} is disabled and logged out."),
                "user.enable" => format!("{target} is enabled."),
                _ => format!("{target}'s password was reset."),
            })
        }
    }
}

fn dir_size(p: &std::path::Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if meta.is_file() {
        return meta.len();
    }
    if !meta.is_dir() {
        return 0;
    }
    std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| dir_size(&e.path()))
        .sum()
}

async fn system(c: &Console, v: &Viewer<'_>, flash: Flash) -> Resp {
    let cert = std::fs::read(&c.tls_cert).ok();
    let fingerprint = cert
        .as_deref()
        .and_then(appliance_gateway::tls::fingerprint)
        .unwrap_or_else(|| "–".into());
    let mut rows = vec![];
    for (what, sub) in [
        ("Key store", "appliance.db"),
        ("Audit log", "audit"),
        ("Models", "models"),
        ("Policy", "policy"),
        ("TLS", "tls"),
    ] {
        rows.push(vec![
            esc(what),
            format!("<code>{sub}</code>"),
            html::bytes(dir_size(&c.data_dir.join(sub))),
        ]);
    }
    let up = c.started.elapsed().as_secs();
    let b = format!(
        "<section class=\"grid\"><div class=\"card\"><h2>Appliance</h2><dl><dt>Version</dt><dd>{}</dd><dt>Up for</dt><dd>{}h {}m</dd><dt>Data directory</dt><dd><code>{}</code></dd></dl></div>\
<div class=\"card\"><h2>Certificate</h2><dl><dt>File</dt><dd><code>{}</code></dd><dt>SHA-256 fingerprint</dt><dd><code class=\"wrap\">{}</code></dd></dl><form method=\"post\" action=\"/system/certificate\">{}<p class=\"field\"><label for=\"f-cert\">The site's certificate chain (PEM)</label><textarea id=\"f-cert\" name=\"cert\" rows=\"5\" spellcheck=\"false\" required></textarea></p><p class=\"field\"><label for=\"f-key\">Its private key (PEM)</label><textarea id=\"f-key\" name=\"key\" rows=\"4\" spellcheck=\"false\" required></textarea></p><p><button type=\"submit\">Replace the certificate</button></p></form></div>\
<div class=\"card\"><h2>Audit public key</h2><pre class=\"wrap\">{}</pre></div></section>{}",
        env!("CARGO_PKG_VERSION"),
        up / 3600,
        up % 3600 / 60,
        esc(&c.data_dir.display().to_string()),
        esc(&c.tls_cert.display().to_string()),
        fingerprint,
        csrf_field(v.csrf),
        esc(&c.ops.audit_public_key()),
        table("Data directory usage", &["Part", "Path", "Size"], &rows)
    );
    let b = format!(
        "{b}<section class=\"card narrow\"><h2>Backup</h2><p>The key store, the audit log and its keys, TLS material, policy and credentials, and the configuration (not the models), encrypted with a passphrase you choose.</p><form method=\"post\" action=\"/system/backup\">{}{}<p><button type=\"submit\">Download a backup</button></p></form></section>\
<section class=\"card narrow\"><h2>Restore</h2><p>A backup of this appliance: it is decrypted and checked here (its manifest, its audit log against its own key and checkpoints), then the appliance restarts and puts it in place; what it replaces is kept in the data directory. A backup that does not decrypt or verify, or another appliance's, is refused and nothing changes (another appliance's backup is restored with <code>appliance backup restore FILE --new-appliance</code> while the daemon is stopped).</p><form id=\"restore\">{}<p class=\"field\"><label for=\"rs-file\">Backup file</label><input id=\"rs-file\" type=\"file\" required></p><p class=\"field\"><label for=\"rs-pass\">The backup's passphrase</label><input id=\"rs-pass\" type=\"password\" autocomplete=\"off\" required></p><p><button type=\"submit\">Restore and restart</button></p><p><output id=\"restore-status\" role=\"status\"></output></p></form></section>",
        csrf_field(v.csrf),
        field("passphrase", &format!("Passphrase (at least {} characters; keep it: the backup cannot be read without it)", password::MIN_LENGTH), "password", "", "required autocomplete=\"new-password\""),
        csrf_field(v.csrf),
    );
    ok_page("System", v, flash, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse() {
        assert_eq!(parse_when("1970-01-01"), Some(0));
        assert_eq!(
            parse_when("2000-03-01T01:02"),
            Some((951_868_800 + 3720) * 1000)
        );
        assert_eq!(parse_when("2026-13-01"), None);
        assert_eq!(parse_when("yesterday"), None);
        assert_eq!(url_encode("a b&c=<d>é"), "a%20b%26c%3D%3Cd%3E%C3%A9");
        assert_eq!(parse_when("2026-11-22T11:37"), Some(1_795_347_420_000));
    }
}
