//! `appliance serve`: the daemon. Wires the store, the key table, TLS, the supervisor and
//! the gateway together; handles signals (SIGTERM/SIGINT drain) and the control socket
//! through which the CLI tells it that keys changed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use appliance_audit::{Auditor, Record};
use appliance_gateway::auth::KeyTable;
use appliance_gateway::{tls, Gateway, Instance, ModelRoute};
use appliance_store::Store;
use appliance_supervisor::placement::{Device, Needs, Placement};
use appliance_supervisor::{Supervisor, WorkerSpec};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};

use crate::config;

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub data: DataDir,
    /// HTTPS API address (default from appliance.toml, else 0.0.0.0:8443).
    #[arg(long, env = "APPLIANCE_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
    /// A model to serve, as NAME=PATH.gguf or the NAME of a registry model (repeatable).
    /// Without any: the [models] of appliance.toml, else every registry model.
    #[arg(long = "model", value_parser = config::parse_model_arg)]
    pub models: Vec<(String, PathBuf)>,
    /// Plain-HTTP address that only redirects to HTTPS.
    #[arg(long, env = "APPLIANCE_REDIRECT_LISTEN")]
    pub redirect_listen: Option<SocketAddr>,
    /// HTTPS address of the web console (same certificate as the API); off when absent.
    #[arg(long, env = "APPLIANCE_CONSOLE_LISTEN")]
    pub console_listen: Option<SocketAddr>,
    /// The site's certificate chain (PEM), instead of the self-signed one.
    #[arg(long, env = "APPLIANCE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The site's private key (PEM).
    #[arg(long, env = "APPLIANCE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Compute threads per worker (0 = all cores).
    #[arg(long, env = "APPLIANCE_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Seconds in-flight requests get on shutdown.
    #[arg(long, env = "APPLIANCE_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<u64>,
}

#[derive(clap::Args, Clone)]
pub struct DataDir {
    /// The appliance's data directory: config, database, TLS material, sockets.
    #[arg(long, env = "APPLIANCE_DATA_DIR", default_value = "/var/lib/appliance")]
    pub data_dir: PathBuf,
}

impl DataDir {
    /// Creates the directory (0700) if needed and returns it made absolute.
    pub fn prepare(&self) -> Result<PathBuf> {
        let d = &self.data_dir;
        if !d.exists() {
            std::fs::create_dir_all(d)
                .with_context(|| format!("creating data directory {}", d.display()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
        }
        let d =
            std::fs::canonicalize(d).with_context(|| format!("data directory {}", d.display()))?;
        Ok(d)
    }

    pub fn db(dir: &Path) -> PathBuf {
        dir.join("appliance.db")
    }

    pub fn control_socket(dir: &Path) -> PathBuf {
        dir.join("run").join("control.sock")
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The exit status of a daemon that stopped to restart itself (to apply a restore
/// staged from the console); the unit restarts it (`RestartForceExitStatus=75`).
pub const RESTART_STATUS: i32 = 75;

/// Set when the console asks the daemon to restart.
static RESTART: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn run(a: ServeArgs) -> Result<()> {
    runtime()?.block_on(serve(a))?;
    if RESTART.load(std::sync::atomic::Ordering::Acquire) {
        log::info!("exiting with status {RESTART_STATUS} to be restarted");
        std::process::exit(RESTART_STATUS);
    }
    Ok(())
}

async fn serve(a: ServeArgs) -> Result<()> {
    let dir = a.data.prepare()?;
    let file = config::load(&dir)?;
    let run_dir = dir.join("run");
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700))?;
    }
    // One daemon per data directory: held until this function returns (or the process dies).
    let Some(lock) = try_lock(&dir)? else {
        bail!(
            "another appliance daemon is running on {} (it holds {})",
            dir.display(),
            run_dir.join("serve.lock").display()
        );
    };

    let restart = Arc::new(tokio::sync::Notify::new());
    // A restore staged from the console is applied before anything is opened.
    let restored = crate::backup::apply_staged(&dir)?;
    let file = match &restored {
        Some(what) => {
            log::info!("restore: {what}");
            config::load(&dir)?
        }
        None => file,
    };
    let store = Store::open(&DataDir::db(&dir)).await?;
    // The audit log first: nothing is served unless it can be written.
    let (auditor, audit_task) = crate::audit::start(&dir, &file.audit).await?;
    if let Some(what) = &restored {
        let mut r = Record::action("backup.restore", 200);
        r.source = Some("local".into());
        r.detail = Some(what.chars().take(200).collect());
        auditor
            .record(r)
            .await
            .context("the audit log cannot be written; not starting")?;
    }
    let mut started = Record::action("daemon.start", 200);
    started.source = Some("local".into());
    // The configuration in force, by hash: a changed file shows as a changed hash.
    let config_hash = match std::fs::read(dir.join("appliance.toml")) {
        Ok(bytes) => format!(
            "sha256:{}",
            appliance_gateway::keys::hex(&appliance_audit::merkle::sha256_of(&bytes)[..8])
        ),
        Err(_) => "none".into(),
    };
    started.detail = Some(format!(
        "appliance {}; appliance.toml {config_hash}",
        env!("CARGO_PKG_VERSION")
    ));
    auditor
        .record(started)
        .await
        .context("the audit log cannot be written; not starting")?;
    // From here on a failed start is recorded as a stop that says why, and the audit
    // writer is stopped cleanly (its journal applied to the store), as after serving.
    let mut started_daemon: Option<Arc<Daemon>> = None;
    let mut background: Vec<tokio::task::AbortHandle> = vec![];
    let served: Result<()> = async {
        // The site's policy; one that does not validate keeps the daemon from starting.
        let policy_state = crate::policy::load_site(&dir)?;
        log::info!(
            "policy: {} ({}), {} rule(s)",
            policy_state.policy.name,
            policy_state.policy.version,
            policy_state.policy.rules.len()
        );
        auditor
            .record(crate::policy::load_record(Some(&policy_state), None))
            .await
            .context("the audit log cannot be written; not starting")?;
        let retention_task = (file.audit.retention_days > 0).then(|| {
            let auditor = auditor.clone();
            let days = file.audit.retention_days as i64;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(3600));
                loop {
                    tick.tick().await;
                    let cutoff = appliance_gateway::server::unix_now() * 1000 - days * 86_400_000;
                    match auditor.prune(cutoff).await {
                        Ok(0) => {}
                        Ok(n) => {
                            log::info!("audit: pruned the text of {n} records older than {days} days")
                        }
                        Err(e) => log::warn!("audit: pruning failed: {e}"),
                    }
                }
            })
        });
        // Models: the flags (NAME=PATH, or NAME of a registry model), else the file's
        // [models], else every model in the registry.
        let registry = appliance_registry::Store::new(&dir);
        let mut models: Vec<(String, PathBuf)> = Vec::new();
        if !a.models.is_empty() {
            for (name, path) in &a.models {
                let path = if path.as_os_str().is_empty() {
                    let m = store.model(name).await?.with_context(|| {
                        format!("--model {name}: no such model in the registry (appliance model list)")
                    })?;
                    registry.path_of(&m.sha256)
                } else {
                    path.clone()
                };
                models.push((name.clone(), path));
            }
        } else if !file.models.is_empty() {
            for (n, p) in &file.models {
                config::valid_name("model", n)?;
                models.push((
                    n.clone(),
                    if p.is_absolute() {
                        p.clone()
                    } else {
                        dir.join(p)
                    },
                ));
            }
        } else {
            for m in store.models().await? {
                models.push((m.name.clone(), registry.path_of(&m.sha256)));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (name, path) in &models {
            if !seen.insert(name) {
                bail!("model {name} is given twice");
            }
            if !path.is_file() {
                bail!("model {name}: {} is not a file", path.display());
            }
        }
        if models.is_empty() {
            log::warn!("no models: import one (appliance model import), give --model NAME=PATH.gguf, or add [models] to appliance.toml");
        }
        let keys = Arc::new(KeyTable::load(store.clone()).await?);

        let tls_files = match (
            a.tls_cert.or(file.tls.cert.clone()),
            a.tls_key.or(file.tls.key.clone()),
        ) {
            (Some(cert), Some(key)) => tls::TlsFiles {
                cert,
                key,
                generated: false,
            },
            (None, None) => tls::ensure_self_signed(&dir, &tls::host_names())?,
            _ => bail!("TLS: give both a certificate and a key, or neither (self-signed)"),
        };
        let (tls_config, live_cert) = tls::server_config(&tls_files)?;
        // The console may replace the certificate only when it is the data directory's own
        // (self-signed or placed there), not one the configuration names.
        let cert_in_data_dir = tls_files.cert == dir.join("tls").join("cert.pem");

        let listen = a.api_listen.unwrap_or(file.api.listen);
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        let bound = listener.local_addr()?;
        let console_listener = listen_on(a.console_listen.or(file.api.console_listen), "console").await?;
        let redirect = listen_on(a.redirect_listen.or(file.api.redirect_listen), "redirect").await?;

        // Workers: as an unprivileged user when the daemon is root.
        let run_as = worker_user(&file.workers)?;
        let sockets = run_dir.join("workers");
        std::fs::create_dir_all(&sockets).with_context(|| format!("creating {}", sockets.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let set = |p: &Path, mode: u32| {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                    .with_context(|| format!("chmod {}", p.display()))
            };
            set(&sockets, 0o700)?;
            if let Some((uid, gid, name)) = &run_as {
                // The worker reaches its socket folder and the registry's files, and nothing
                // else: traverse-only folders, group-readable model files.
                use nix::unistd::{chown, Gid, Uid};
                chown(
                    &sockets,
                    Some(Uid::from_raw(*uid)),
                    Some(Gid::from_raw(*gid)),
                )?;
                set(&dir, 0o711)?;
                set(&run_dir, 0o711)?;
                log::info!("workers run as {name} (uid {uid}, gid {gid})");
            }
        }
        let launcher = Launcher {
            dir: dir.clone(),
            sockets,
            exe: std::env::current_exe().context("locating the appliance binary")?,
            threads: a.worker_threads.unwrap_or(file.workers.threads),
            run_as,
            workers: file.workers.clone(),
            devices: file.devices.clone(),
            instances: file.instances.clone(),
            store: store.clone(),
            pins: std::sync::Mutex::new(store.model_devices().await?),
        };
        // Placement: each model's memory estimate against what the box has free.
        let inventory = appliance_supervisor::inventory::read(&dir);
        log::info!(
            "hardware: {} ({} cores, {} threads), {:.1} GiB RAM available of {:.1}, {} GPU(s){}",
            inventory.cpu_model,
            inventory.cpu_cores,
            inventory.cpu_threads,
            inventory.memory_available as f64 / (1u64 << 30) as f64,
            inventory.memory_total as f64 / (1u64 << 30) as f64,
            inventory.gpus.len(),
            inventory
                .gpu_note
                .as_ref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        );
        let mut needs = Vec::new();
        for (name, path) in &models {
            needs.extend(launcher.needs_all(name, path)?);
        }
        for d in file.devices.keys() {
            if !models.iter().any(|m| &m.0 == d) {
                log::warn!("[devices] names {d}, which is not served");
            }
        }
        let placements =
            appliance_supervisor::placement::place(&needs, &inventory, cfg!(feature = "cuda"))
                .map_err(|e| anyhow::anyhow!("placement: {e}"))?;
        let liveness = file.workers.liveness();
        log::info!(
            "supervision: a hung worker is replaced within {:.1}s; restarts back off from {:?} to {:?}",
            liveness.bound().as_secs_f64(),
            file.workers.backoff().base,
            file.workers.backoff().max
        );
        let mut supervisor = Supervisor::start(vec![], file.workers.backoff(), liveness);
        if file.workers.memory_limit {
            match appliance_supervisor::cgroup::Cgroups::detect() {
                Ok(cg) => {
                    log::info!("workers get a cgroup v2 memory limit (placement's estimate + 25%)");
                    supervisor.set_cgroups(Some(cg));
                }
                Err(why) => log::info!("no per-worker memory limit: {why}"),
            }
        }
        let mut gcfg = file.gateway();
        gcfg.data_dir = Some(dir.clone());
        if let Some(t) = a.drain_timeout {
            gcfg.drain_timeout = Duration::from_secs(t);
        }
        let drain_timeout = gcfg.drain_timeout;
        let gateway = Gateway::new(gcfg, keys.clone(), vec![], auditor.clone());
        gateway.set_policy(policy_state);
        let hup_task = {
            let (gateway, auditor, dir) = (gateway.clone(), auditor.clone(), dir.clone());
            tokio::spawn(async move {
                let Ok(mut hup) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                else {
                    return;
                };
                while hup.recv().await.is_some() {
                    match reload_policy(&dir, &gateway, &auditor).await {
                        Ok(v) => log::info!("SIGHUP: policy {v} in force"),
                        Err(e) => log::error!("SIGHUP: policy not reloaded: {e:#}"),
                    }
                }
            })
        };
        background.push(hup_task.abort_handle());
        background.extend(retention_task.as_ref().map(|t| t.abort_handle()));
        let daemon = Arc::new(Daemon {
            launcher,
            supervisor,
            gateway: gateway.clone(),
            changes: tokio::sync::Mutex::new(()),
            drain_timeout,
        });
        started_daemon = Some(daemon.clone());
        for (name, path) in &models {
            daemon.start_model(name, path, &placements)?;
        }
        let admin_link = Arc::new(AdminLink(daemon.clone()));
        gateway.set_admin(admin_link.clone());

        // The CLI's channel to the daemon, and a slower safety net for key changes.
        let control = control_listener(&dir)?;
        let control_task = tokio::spawn(serve_control(
            control,
            keys.clone(),
            daemon.clone(),
            auditor.clone(),
        ));
        background.push(control_task.abort_handle());
        let poll_keys = keys.clone();
        let poll_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                match poll_keys.reload_if_changed().await {
                    Ok(true) => log::info!("keys reloaded ({} keys)", poll_keys.len()),
                    Ok(false) => {}
                    Err(e) => log::warn!("checking for key changes: {e}"),
                }
            }
        });
        background.push(poll_task.abort_handle());

        let host = if bound.ip().is_unspecified() {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into())
        } else {
            bound.ip().to_string()
        };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        println!("appliance: API     https://{host}:{}/v1", bound.port());
        if tls_files.generated {
            println!(
                "appliance: TLS     self-signed; trust {} (e.g. curl --cacert)",
                tls_files.cert.display()
            );
        }
        println!(
            "appliance: models  {}",
            if models.is_empty() {
                "none".to_string()
            } else {
                models
                    .iter()
                    .map(|m| m.0.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
        let console = match &console_listener {
            Some(l) => {
                let port = l.local_addr()?.port();
                let audit_db = appliance_store::audit::AuditDb::open(
                    &crate::audit::db_path(&dir),
                    Duration::from_secs(10),
                )
                .await?;
                let ops = Arc::new(ConsoleOps {
                    dir: dir.clone(),
                    gateway: gateway.clone(),
                    auditor: auditor.clone(),
                    admin: admin_link.clone(),
                    live_cert: live_cert.clone(),
                    cert_in_data_dir,
                    pinned_in_config: file.devices.clone(),
                    restart: restart.clone(),
                });
                let c = appliance_console::Console::new(
                    store.clone(),
                    audit_db,
                    auditor.clone(),
                    gateway.clone(),
                    ops,
                    dir.clone(),
                    tls_files.cert.clone(),
                )
                .await;
                println!("appliance: console https://{host}:{port}/");
                // For the machine's screen (the image's banner): the certificate's
                // fingerprint, and the setup token while there is one; root-readable only.
                let token = c.setup_token().await;
                let fp = std::fs::read(&tls_files.cert)
                    .ok()
                    .and_then(|pem| appliance_gateway::tls::fingerprint(&pem));
                for (name, value) in [("console-setup-token", &token), ("certificate-sha256", &fp)] {
                    let path = dir.join("run").join(name);
                    match value {
                        Some(v) => crate::backup::write_private(&path, format!("{v}\n").as_bytes())?,
                        None => {
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
                if let Some(token) = token {
                    // The one secret ever printed: it works once, for 24 hours, and only
                    // while the console has no user.
                    let link = format!("https://{host}:{port}/setup?token={token}");
                    println!("appliance: console setup (one time): {link}");
                    log::warn!("console: no user yet; first-run setup link (one time, 24 h): {link}");
                }
                Some(c)
            }
            None => None,
        };
        println!("appliance: data    {}", dir.display());
        if keys.is_empty() {
            println!(
                "appliance: no API keys yet: appliance tenant create NAME --data-dir {0} && appliance key create --tenant NAME --data-dir {0}",
                dir.display()
            );
        }
        log::info!(
            "serving the API on {bound} ({} model(s), {} key(s)); pid {}",
            models.len(),
            keys.len(),
            std::process::id()
        );

        // systemd: READY once the API listens and every model's worker is ready (or has
        // had its ready timeout), the watchdog pinged from the runtime that serves requests.
        let notify_workers: Vec<_> = daemon.supervisor.workers();
        let ready_timeout = Duration::from_secs(file.workers.ready_timeout_secs);
        let listen_note = bound.to_string();
        let notify_task = tokio::spawn(async move {
            for w in &notify_workers {
                w.wait_ready(ready_timeout).await;
            }
            let ready: Vec<&str> = notify_workers
                .iter()
                .filter(|w| w.is_ready())
                .map(|w| w.name.as_str())
                .collect();
            crate::sdnotify::notify(&format!(
                "READY=1\nSTATUS=Serving {} of {} model(s) on {listen_note}",
                ready.len(),
                notify_workers.len()
            ));
            log::info!(
                "ready: {} of {} model(s) serving",
                ready.len(),
                notify_workers.len()
            );
        });
        let watchdog_task = crate::sdnotify::watchdog().map(|period| {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period / 2);
                loop {
                    tick.tick().await;
                    crate::sdnotify::notify("WATCHDOG=1");
                }
            })
        });

        // Usage accounting: the gateway counts, the store keeps hourly rows.
        let usage_task = {
            let (gateway, store) = (gateway.clone(), store.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    if let Err(e) = store.add_usage(&gateway.take_usage()).await {
                        log::warn!("usage accounting: {e}");
                    }
                }
            })
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let console_task = match (console, console_listener) {
            (Some(c), Some(l)) => {
                let mut rx = stop_rx.clone();
                Some(tokio::spawn(c.serve(l, tls_config.clone(), async move {
                    let _ = rx.wait_for(|s| *s).await;
                })))
            }
            _ => None,
        };
        let redirect_task = redirect.map(|l| {
            let mut rx = stop_rx.clone();
            tokio::spawn(appliance_gateway::server::serve_redirect(
                l,
                bound.port(),
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                },
            ))
        });
        let restart_wait = restart.clone();
        let shutdown = async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing the SIGTERM handler");
            let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .expect("installing the SIGINT handler");
            tokio::select! {
                _ = term.recv() => log::info!("SIGTERM: shutting down"),
                _ = int.recv() => log::info!("SIGINT: shutting down"),
                _ = restart_wait.notified() => {
                    RESTART.store(true, std::sync::atomic::Ordering::Release);
                    log::info!("restart requested from the console: shutting down");
                }
            }
            crate::sdnotify::notify("STOPPING=1\nSTATUS=Draining");
            let _ = stop_tx.send(true);
        };
        gateway.clone().serve(listener, tls_config, shutdown).await;
        if let Some(t) = redirect_task {
            let _ = t.await;
        }
        if let Some(t) = console_task {
            let _ = t.await;
        }
        usage_task.abort();
        if let Err(e) = store.add_usage(&gateway.take_usage()).await {
            log::warn!("usage accounting: {e}");
        }
        log::info!("stopping workers");
        daemon.supervisor.shutdown().await;
        control_task.abort();
        poll_task.abort();
        notify_task.abort();
        if let Some(t) = watchdog_task {
            t.abort();
        }
        let _ = std::fs::remove_file(DataDir::control_socket(&dir));
        if let Some(t) = retention_task {
            t.abort();
        }
        hup_task.abort();
        Ok(())
    }
    .await;
    if served.is_err() {
        // What had started is stopped as after serving, before the record and the lock.
        for t in &background {
            t.abort();
        }
        if let Some(daemon) = &started_daemon {
            daemon.supervisor.shutdown().await;
        }
        let _ = std::fs::remove_file(DataDir::control_socket(&dir));
    }
    let mut stopped = Record::action("daemon.stop", if served.is_ok() { 200 } else { 500 });
    stopped.source = Some("local".into());
    if let Err(e) = &served {
        stopped.error = Some("start_failed".into());
        stopped.detail = Some(format!("{e:#}").chars().take(200).collect());
    }
    auditor.stop(Some(stopped)).await;
    let _ = audit_task.await;
    store.close().await;
    if served.is_ok() {
        log::info!("stopped");
    }
    drop(lock);
    served
}

/// What a model will need: weights (for the CPU engine, the file plus its widened Q4_1
/// scales, ~25%) and the KV cache (f32 keys and values, every layer) for `max_batch`
/// sequences of the served context. A file whose header cannot be read is estimated by
/// its size; its worker will then fail and say why.
fn estimate(name: &str, path: &Path, w: &config::WorkersSection, pinned: Option<Device>) -> Needs {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let on_cpu = !matches!(pinned, Some(Device::Cuda(_))) && !cfg!(feature = "cuda");
    let weights = if on_cpu { size + size / 4 } else { size };
    match appliance_engine::gguf::GgufFile::open(path) {
        Ok(f) => {
            let c = &f.config;
            let context = if w.max_context > 0 {
                w.max_context.min(c.context_length)
            } else {
                c.context_length.min(32768)
            };
            Needs {
                model: name.to_string(),
                weights,
                kv_per_token: (c.n_layer * c.n_head_kv * c.head_dim * 2 * 4) as u64,
                context: context as u64,
                batch: w.max_batch.max(1) as u64,
                pinned,
            }
        }
        Err(e) => {
            log::warn!("model {name}: cannot read its header for placement ({e})");
            Needs {
                model: name.to_string(),
                weights,
                kv_per_token: 0,
                context: 0,
                batch: 0,
                pinned,
            }
        }
    }
}

/// The user workers run as: only when the daemon is root; the configured user, else
/// `appliance-worker` if it exists (the image creates it), else root with a warning.
fn worker_user(w: &config::WorkersSection) -> Result<Option<(u32, u32, String)>> {
    let root = nix::unistd::geteuid().is_root();
    let name = w.user.clone().unwrap_or_else(|| "appliance-worker".into());
    if !root {
        if w.user.is_some() {
            bail!(
                "[workers] user = {name:?} needs the daemon to run as root (it runs as uid {}); \
                 remove the setting to run workers as this user",
                nix::unistd::geteuid()
            );
        }
        return Ok(None);
    }
    match nix::unistd::User::from_name(&name) {
        Ok(Some(u)) if u.uid.is_root() => bail!("[workers] user {name:?} is root"),
        Ok(Some(u)) => Ok(Some((u.uid.as_raw(), u.gid.as_raw(), name))),
        _ if w.user.is_some() => bail!("[workers] user {name:?} does not exist"),
        _ => {
            log::warn!(
                "the daemon runs as root and there is no user {name:?}: workers run as root too; \
                 create the user (the image does) or set [workers] user"
            );
            Ok(None)
        }
    }
}

fn control_listener(dir: &Path) -> Result<UnixListener> {
    let path = DataDir::control_socket(dir);
    if path.exists() {
        // A live daemon answers; a stale socket from a crash does not.
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            bail!(
                "another appliance daemon is running on {} (its control socket {} answers)",
                dir.display(),
                path.display()
            );
        }
        std::fs::remove_file(&path)
            .with_context(|| format!("removing stale {}", path.display()))?;
    }
    let l = UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// One command per line: `reload-keys` → `ok <n keys>`; `models` → `ok a,b` (served);
/// `status` → `ok {json}` (workers and hardware); `load NAME` / `unload NAME` → `ok
/// <what happened>`. Errors answer `error <message>`.
async fn serve_control(
    listener: UnixListener,
    keys: Arc<KeyTable>,
    daemon: Arc<Daemon>,
    auditor: Auditor,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let keys = keys.clone();
        let daemon = daemon.clone();
        let auditor = auditor.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(json) = line.strip_prefix("audit ") {
                    // A command-line action's record, written by this daemon's writer.
                    let reply = match serde_json::from_str::<Record>(json) {
                        Ok(r) => match auditor.record(r).await {
                            Ok(seq) => format!("ok {seq}"),
                            Err(e) => format!("error {e}"),
                        },
                        Err(e) => format!("error not a record: {e}"),
                    };
                    if w.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                        break;
                    }
                    continue;
                }
                let mut words = line.split_whitespace();
                let reply = match (words.next().unwrap_or(""), words.next()) {
                    ("reload-policy", None) => {
                        match reload_policy(&daemon.launcher.dir, &daemon.gateway, &auditor).await {
                            Ok(v) => format!("ok {v}"),
                            Err(e) => format!("error {}", format!("{e:#}").replace('\n', " | ")),
                        }
                    }
                    ("checkpoint", None) => match auditor.checkpoint().await {
                        Ok(note) => format!("ok {}", serde_json::Value::String(note)),
                        Err(e) => format!("error {e}"),
                    },
                    ("reload-keys", None) => match keys.reload().await {
                        Ok(n) => format!("ok {n}"),
                        Err(e) => format!("error {e}"),
                    },
                    ("models", None) => format!(
                        "ok {}",
                        daemon
                            .gateway
                            .models()
                            .iter()
                            .map(|m| m.name.as_str())
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                    ("status", None) => format!("ok {}", daemon.gateway.status()),
                    ("load", Some(name)) => match daemon.load(name).await {
                        Ok(m) => format!("ok {m}"),
                        Err(e) => format!("error {e:#}"),
                    },
                    ("unload", Some(name)) => match daemon.unload(name).await {
                        Ok(m) => format!("ok {m}"),
                        Err(e) => format!("error {e:#}"),
                    },
                    _ => format!("error unknown command {line:?}"),
                };
                if w.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// How workers are started: the settings every worker shares.
struct Launcher {
    dir: PathBuf,
    sockets: PathBuf,
    exe: PathBuf,
    threads: usize,
    run_as: Option<(u32, u32, String)>,
    workers: config::WorkersSection,
    devices: std::collections::BTreeMap<String, String>,
    instances: std::collections::BTreeMap<String, u32>,
    store: Store,
    /// Devices pinned from the console or `appliance model pin` (the key store's
    /// `model_devices`), re-read before every load; `[devices]` takes precedence.
    pins: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

/// The supervisor's name for instance `i` of `n` of a model: the model's own name when
/// it runs once, else `name#i`.
fn instance_name(model: &str, i: u32, n: u32) -> String {
    if n <= 1 {
        model.to_string()
    } else {
        format!("{model}#{i}")
    }
}

impl Launcher {
    fn count(&self, model: &str) -> u32 {
        self.instances.get(model).copied().unwrap_or(1).clamp(1, 64)
    }

    /// One placement request per instance of a model.
    fn needs_all(&self, model: &str, path: &Path) -> Result<Vec<Needs>> {
        let n = self.count(model);
        let one = self.needs(model, path)?;
        Ok((0..n)
            .map(|i| Needs {
                model: instance_name(model, i, n),
                ..one.clone()
            })
            .collect())
    }

    fn needs(&self, name: &str, path: &Path) -> Result<Needs> {
        let pin = self
            .pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned();
        let pinned = match (self.devices.get(name), pin) {
            (Some(d), _) => Some(
                d.parse::<Device>()
                    .map_err(|e| anyhow::anyhow!("[devices] {name}: {e}"))?,
            ),
            (None, Some(d)) => Some(
                d.parse::<Device>()
                    .map_err(|e| anyhow::anyhow!("the device {name} is pinned to: {e}"))?,
            ),
            (None, None) => None,
        };
        Ok(estimate(name, path, &self.workers, pinned))
    }

    /// Lets the unprivileged worker read a registry model file.
    fn grant(&self, path: &Path) -> Result<()> {
        let Some((_, gid, _)) = &self.run_as else {
            return Ok(());
        };
        if !path.starts_with(self.dir.join("models")) {
            return Ok(());
        }
        use std::os::unix::fs::PermissionsExt;
        for d in [self.dir.join("models"), self.dir.join("models/sha256")] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711))?;
        }
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(*gid)))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o440))?;
        Ok(())
    }

    fn spec(&self, name: &str, path: &Path, device: Device) -> Result<WorkerSpec> {
        let w = &self.workers;
        let socket = self.sockets.join(format!("worker-{name}.sock"));
        if socket.as_os_str().len() > 100 {
            bail!(
                "the socket path {} is too long for a Unix socket; use a shorter data directory",
                socket.display()
            );
        }
        let mut extra: Vec<std::ffi::OsString> = vec![
            "--max-batch".into(),
            w.max_batch.to_string().into(),
            "--grace".into(),
            w.grace_secs.to_string().into(),
            "--max-open-files".into(),
            w.max_open_files.to_string().into(),
            "--device".into(),
            device.to_string().into(),
        ];
        if self.threads > 0 {
            extra.extend(["--threads".into(), self.threads.to_string().into()]);
        }
        if let Some((uid, gid, _)) = &self.run_as {
            extra.extend(["--run-as".into(), format!("{uid}:{gid}").into()]);
        }
        if w.max_context > 0 {
            extra.extend(["--max-context".into(), w.max_context.to_string().into()]);
        }
        Ok(WorkerSpec {
            name: name.to_string(),
            model: path.to_path_buf(),
            socket,
            program: self.exe.clone(),
            extra_args: extra,
            grace: Duration::from_secs(w.grace_secs + 5),
            ready_timeout: Duration::from_secs(w.ready_timeout_secs),
            memory_limit: None,
        })
    }
}

/// The running daemon's model set: what `load` and `unload` change.
struct Daemon {
    launcher: Launcher,
    supervisor: Supervisor,
    gateway: Arc<Gateway>,
    /// One load or unload at a time.
    changes: tokio::sync::Mutex<()>,
    drain_timeout: Duration,
}

impl Daemon {
    /// Spawns a placed model's workers (one per instance) and routes to them.
    fn start_model(&self, name: &str, path: &Path, placements: &[Placement]) -> Result<()> {
        self.launcher.grant(path)?;
        let n = self.launcher.count(name);
        let mut instances = Vec::new();
        for i in 0..n {
            let iname = instance_name(name, i, n);
            let p = placements
                .iter()
                .find(|p| p.model == iname)
                .with_context(|| format!("no placement for {iname}"))?;
            let mut spec = self.launcher.spec(&iname, path, p.device)?;
            if p.device == Device::Cpu && p.bytes > 0 {
                spec.memory_limit = Some(p.bytes + p.bytes / 4 + (256 << 20));
            }
            let worker = self.supervisor.add(spec).map_err(|e| anyhow::anyhow!(e))?;
            log::info!(
                "placement: {iname} on {} ({:.2} GiB estimated)",
                p.device,
                p.bytes as f64 / (1u64 << 30) as f64
            );
            instances.push(Instance::new(worker, p.device.to_string(), p.bytes));
        }
        self.gateway
            .add_model(Arc::new(ModelRoute::new(name.to_string(), instances)));
        Ok(())
    }

    /// Loads a registry model while serving: placed against what is free now (models
    /// already loaded count with their full estimate), then waits until it is ready.
    async fn load(&self, name: &str) -> Result<String> {
        let _one = self.changes.lock().await;
        if self.gateway.model(name).is_some() {
            bail!("model {name} is already loaded");
        }
        let m = self
            .launcher
            .store
            .model(name)
            .await?
            .with_context(|| format!("no model named {name:?} in the registry"))?;
        let path = appliance_registry::Store::new(&self.launcher.dir).path_of(&m.sha256);
        let mut inv = appliance_supervisor::inventory::read(&self.launcher.dir);
        // Loaded models will grow to their estimate; what they use now is already gone
        // from the available memory, so reserve the rest.
        for r in self.gateway.models() {
            for inst in &r.instances {
                let rss = inst.worker.status().pid.map(rss_bytes).unwrap_or(0);
                let rest = inst.estimate.saturating_sub(rss);
                if inst.device == "cpu" {
                    inv.memory_available = inv.memory_available.saturating_sub(rest);
                } else if let Ok(Device::Cuda(i)) = inst.device.parse::<Device>() {
                    if let Some(g) = inv.gpus.iter_mut().find(|g| g.index == i) {
                        g.memory_used = g.memory_used.saturating_add(rest);
                    }
                }
            }
        }
        *self.launcher.pins.lock().unwrap_or_else(|e| e.into_inner()) =
            self.launcher.store.model_devices().await?;
        let needs = self.launcher.needs_all(name, &path)?;
        let placed = appliance_supervisor::placement::place(&needs, &inv, cfg!(feature = "cuda"))
            .map_err(|e| anyhow::anyhow!(e))?;
        self.start_model(name, &path, &placed)?;
        let timeout = Duration::from_secs(self.launcher.workers.ready_timeout_secs);
        let mut ready = true;
        let mut failed = None;
        if let Some(r) = self.gateway.model(name) {
            for inst in &r.instances {
                ready &= inst.worker.wait_ready(timeout).await;
                let st = inst.worker.status();
                if st.gave_up {
                    failed = st
                        .last_error
                        .or(Some("the model file cannot be used".into()));
                }
            }
        }
        let where_: Vec<String> = placed.iter().map(|p| p.device.to_string()).collect();
        let bytes: u64 = placed.iter().map(|p| p.bytes).sum();
        Ok(format!(
            "loaded {name} on {} ({:.2} GiB estimated){}",
            where_.join(", "),
            bytes as f64 / (1u64 << 30) as f64,
            match (&failed, ready) {
                (Some(why), _) => format!("; it failed and will not be restarted: {why}"),
                (None, true) => String::new(),
                (None, false) => "; not ready yet, see appliance status".into(),
            }
        ))
    }

    /// Stops routing to a model, lets its requests in flight finish (up to the drain
    /// timeout), then stops its worker.
    async fn unload(&self, name: &str) -> Result<String> {
        let _one = self.changes.lock().await;
        let route = self
            .gateway
            .remove_model(name)
            .with_context(|| format!("model {name} is not loaded"))?;
        let t0 = std::time::Instant::now();
        while route.in_flight.load(std::sync::atomic::Ordering::Acquire) > 0
            && t0.elapsed() < self.drain_timeout
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for inst in &route.instances {
            self.supervisor.remove(&inst.worker.name).await;
        }
        log::info!("unloaded {name}");
        Ok(format!("unloaded {name}"))
    }
}

/// The admin API's handle on the daemon's model set.
struct AdminLink(Arc<Daemon>);

/// What the web console asks of the daemon.
struct ConsoleOps {
    dir: PathBuf,
    gateway: Arc<Gateway>,
    auditor: Auditor,
    admin: Arc<AdminLink>,
    live_cert: Arc<tls::LiveCert>,
    cert_in_data_dir: bool,
    /// `[devices]` of appliance.toml: pins the console may not change.
    pinned_in_config: std::collections::BTreeMap<String, String>,
    /// Wakes the shutdown path for a restart.
    restart: Arc<tokio::sync::Notify>,
}

impl appliance_console::Ops for ConsoleOps {
    fn reload_policy(&self) -> appliance_console::OpsFuture<Result<String, String>> {
        let (dir, gateway, auditor) =
            (self.dir.clone(), self.gateway.clone(), self.auditor.clone());
        Box::pin(async move {
            reload_policy(&dir, &gateway, &auditor)
                .await
                .map_err(|e| format!("{e:#}"))
        })
    }

    fn verify_audit(&self) -> appliance_console::OpsFuture<Result<String, String>> {
        let dir = self.dir.clone();
        Box::pin(async move {
            let key = crate::audit::public_key(&dir).map_err(|e| format!("{e:#}"))?;
            match crate::audit::verify_report(&dir, &key, vec![]).await {
                Ok(r) => r,
                Err(e) => Err(format!("{e:#}")),
            }
        })
    }

    fn export_audit(
        &self,
        since: Option<String>,
        until: Option<String>,
    ) -> appliance_console::OpsFuture<Result<Vec<u8>, String>> {
        let dir = self.dir.clone();
        Box::pin(async move {
            let out = dir.join("run").join(format!(
                "console-export-{}.jsonl",
                appliance_gateway::keys::hex(
                    &appliance_audit::merkle::sha256_of(
                        format!("{:?}", std::time::SystemTime::now()).as_bytes()
                    )[..8]
                )
            ));
            let result = crate::audit::export_to(&dir, since, until, &out, false).await;
            let bytes = result.and_then(|_| Ok(std::fs::read(&out)?));
            let _ = std::fs::remove_file(&out);
            bytes.map_err(|e| format!("{e:#}"))
        })
    }

    fn audit_public_key(&self) -> String {
        crate::audit::public_key(&self.dir)
            .map(|k| k.to_string())
            .unwrap_or_else(|e| format!("unavailable: {e:#}"))
    }

    fn import_model(
        &self,
        path: PathBuf,
        name: Option<String>,
        progress: Arc<appliance_console::Progress>,
    ) -> appliance_console::OpsFuture<Result<String, String>> {
        let dir = self.dir.clone();
        Box::pin(async move {
            // Copying and hashing gigabytes: on a blocking thread, with its own runtime
            // for the store's few queries.
            let job = tokio::task::spawn_blocking(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(crate::model::import_model(
                    &dir,
                    &path,
                    name.as_deref(),
                    None,
                    false,
                    &mut |done, total| {
                        use std::sync::atomic::Ordering;
                        progress.done.store(done, Ordering::Relaxed);
                        progress.total.store(total, Ordering::Relaxed);
                    },
                ))
            });
            match job.await {
                Ok(Ok((m, warning))) => Ok(format!(
                    "{} ({}, {}, {} bytes){}{}",
                    m.name,
                    m.architecture,
                    m.quantization,
                    m.size,
                    m.signed_by
                        .as_deref()
                        .map(|s| format!(", signed by {s}"))
                        .unwrap_or_else(|| ", unsigned".into()),
                    warning.map(|w| format!("; {w}")).unwrap_or_default()
                )),
                Ok(Err(e)) => Err(format!("{e:#}")),
                Err(e) => Err(format!("the import stopped: {e}")),
            }
        })
    }

    fn replace_certificate(&self, cert_pem: String, key_pem: String) -> Result<String, String> {
        if !self.cert_in_data_dir {
            return Err("The certificate comes from --tls-cert/--tls-key or [tls] in appliance.toml; change it there and restart.".into());
        }
        let ck = tls::certified_key(
            cert_pem.as_bytes(),
            key_pem.as_bytes(),
            "the new certificate",
        )?;
        let tls_dir = self.dir.join("tls");
        let write = |name: &str, text: &str| -> Result<()> {
            let path = tls_dir.join(name);
            if path.exists() {
                std::fs::copy(&path, tls_dir.join(format!("{name}.previous")))?;
            }
            crate::backup::write_private(&path, text.as_bytes())
        };
        write("key.pem", &key_pem)
            .and_then(|()| write("cert.pem", &cert_pem))
            .map_err(|e| format!("writing the certificate: {e:#}"))?;
        // The site's own from now on: never regenerated.
        let _ = std::fs::remove_file(tls_dir.join("generated-for.txt"));
        self.live_cert.replace(ck);
        Ok("The new certificate is in use for new connections (API and console); the previous one is kept as tls/cert.pem.previous.".into())
    }

    fn backup(&self, passphrase: String) -> appliance_console::OpsFuture<Result<Vec<u8>, String>> {
        let dir = self.dir.clone();
        Box::pin(async move {
            crate::backup::create_bytes(&dir, &passphrase)
                .await
                .map_err(|e| format!("{e:#}"))
        })
    }

    fn remove_model(&self, name: String) -> appliance_console::OpsFuture<Result<String, String>> {
        let dir = self.dir.clone();
        Box::pin(async move {
            crate::model::remove_model(&dir, &name)
                .await
                .map(|()| format!("Model {name} removed."))
                .map_err(|e| format!("{e:#}"))
        })
    }

    fn stage_restore(
        &self,
        backup: Vec<u8>,
        passphrase: String,
    ) -> appliance_console::OpsFuture<Result<String, String>> {
        let dir = self.dir.clone();
        Box::pin(async move {
            let (files, summary) = crate::backup::open_verified(&backup, &passphrase)
                .await
                .map_err(|e| format!("refused: {e:#}"))?;
            let current = std::fs::read(dir.join("audit/public.key")).ok();
            if current.is_some() && files.get("audit/public.key") != current.as_ref() {
                return Err("refused: its audit key is not this appliance's (restore another appliance's backup with appliance backup restore --new-appliance)".into());
            }
            crate::backup::stage(&dir, &files).map_err(|e| format!("{e:#}"))?;
            Ok(summary)
        })
    }

    fn restart(&self) {
        self.restart.notify_one();
    }

    fn pin_model(
        &self,
        name: String,
        device: Option<String>,
    ) -> appliance_console::OpsFuture<Result<String, String>> {
        let (dir, configured) = (self.dir.clone(), self.pinned_in_config.get(&name).cloned());
        let loaded = self.gateway.model(&name).is_some();
        Box::pin(async move {
            if let Some(d) = configured {
                return Err(format!(
                    "{name} is pinned to {d} by [devices] in appliance.toml; change it there"
                ));
            }
            crate::model::pin_model(&dir, &name, device.as_deref())
                .await
                .map(|m| {
                    if loaded {
                        format!("{m}; it moves there when it is next loaded (unload, then load).")
                    } else {
                        format!("{m}.")
                    }
                })
                .map_err(|e| format!("{e:#}"))
        })
    }

    fn model_action(
        &self,
        model: String,
        load: bool,
    ) -> appliance_console::OpsFuture<Result<String, String>> {
        use appliance_gateway::admin::AdminOps;
        let f = if load {
            self.admin.load(model)
        } else {
            self.admin.unload(model)
        };
        Box::pin(async move {
            use appliance_gateway::admin::AdminError;
            f.await.map_err(|e| match e {
                AdminError::NotFound(m) | AdminError::Conflict(m) | AdminError::Failed(m) => m,
            })
        })
    }
}

fn admin_error(e: anyhow::Error) -> appliance_gateway::admin::AdminError {
    use appliance_gateway::admin::AdminError;
    let m = format!("{e:#}");
    if m.contains("no model named") {
        AdminError::NotFound(m)
    } else if m.contains("already loaded") || m.contains("is not loaded") {
        AdminError::Conflict(m)
    } else {
        AdminError::Failed(m)
    }
}

impl appliance_gateway::admin::AdminOps for AdminLink {
    fn load(&self, model: String) -> appliance_gateway::admin::AdminFuture {
        let d = self.0.clone();
        Box::pin(async move { d.load(&model).await.map_err(admin_error) })
    }

    fn unload(&self, model: String) -> appliance_gateway::admin::AdminFuture {
        let d = self.0.clone();
        Box::pin(async move { d.unload(&model).await.map_err(admin_error) })
    }
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// Reads the site's policy again; a valid one is put in force (and recorded), an invalid
/// one is refused (and recorded) and the running one stays.
async fn reload_policy(dir: &Path, gateway: &Gateway, auditor: &Auditor) -> Result<String> {
    match crate::policy::load_site(dir) {
        Ok(state) => {
            let version = state.policy.version.clone();
            auditor
                .record(crate::policy::load_record(Some(&state), None))
                .await
                .context("the audit log cannot be written; the policy was not changed")?;
            gateway.set_policy(state);
            Ok(version)
        }
        Err(e) => {
            let _ = auditor
                .record(crate::policy::load_record(None, Some(&format!("{e:#}"))))
                .await;
            Err(e)
        }
    }
}

/// A listener on `addr` when one is configured; `what` names it in the error.
async fn listen_on(addr: Option<SocketAddr>, what: &str) -> Result<Option<TcpListener>> {
    let Some(addr) = addr else { return Ok(None) };
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} ({what})"))?;
    Ok(Some(l))
}

/// The models the running daemon serves; `None` when no daemon answers.
pub async fn daemon_models(dir: &Path) -> Option<Vec<String>> {
    let line = ask_daemon(dir, "models").await?;
    let names = line.strip_prefix("ok").map(str::trim_start)?;
    Some(
        names
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    )
}

/// The models served here: the running daemon's, else those `serve` would start without
/// `--model` flags (appliance.toml's `[models]`, else the registry's, read from `store`).
pub async fn served_models(dir: &Path, store: Option<&Store>) -> Result<Vec<String>> {
    if let Some(names) = daemon_models(dir).await {
        return Ok(names);
    }
    if dir.join("appliance.toml").exists() {
        let file = config::load(dir)?;
        if !file.models.is_empty() {
            return Ok(file.models.keys().cloned().collect());
        }
    }
    Ok(match store {
        Some(store) => store.models().await?.into_iter().map(|m| m.name).collect(),
        None => vec![],
    })
}

/// Takes the data directory's daemon lock (`DIR/run/serve.lock`) if no one holds it:
/// the daemon for its lifetime, a command that writes the audit log for a moment.
pub fn try_lock(dir: &Path) -> Result<Option<std::fs::File>> {
    let run_dir = dir.join("run");
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let path = run_dir.join("serve.lock");
    let lock =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(lock.try_lock().is_ok().then_some(lock))
}

/// Sends one command to a running daemon's control socket; its answer line, or None
/// when no daemon answers.
pub async fn ask_daemon(dir: &Path, command: &str) -> Option<String> {
    ask_daemon_within(dir, command, Duration::from_secs(5)).await
}

/// As [`ask_daemon`], waiting up to `limit` for the answer.
pub async fn ask_daemon_within(dir: &Path, command: &str, limit: Duration) -> Option<String> {
    let path = DataDir::control_socket(dir);
    if !path.exists() {
        return None;
    }
    let ask = async {
        let s = tokio::net::UnixStream::connect(&path).await?;
        let (r, mut w) = s.into_split();
        w.write_all(format!("{command}\n").as_bytes()).await?;
        let mut line = String::new();
        BufReader::new(r).read_line(&mut line).await?;
        Ok::<_, std::io::Error>(line.trim_end().to_string())
    };
    match tokio::time::timeout(limit, ask).await {
        Ok(Ok(l)) if !l.is_empty() => Some(l),
        // No daemon listening (a stale socket): nothing to ask.
        Ok(_) => None,
        Err(_) => {
            eprintln!("warning: the running daemon did not answer {command:?} within {limit:?}");
            None
        }
    }
}

/// Tells a running daemon (if any) to reload its keys; waits for its answer.
pub async fn notify_keys_changed(dir: &Path) {
    if let Some(l) = ask_daemon(dir, "reload-keys").await {
        if !l.starts_with("ok") {
            eprintln!("warning: the running daemon could not reload its keys: {l}");
        }
    }
}

/// `appliance status`: asks the running daemon.
pub fn status(data: DataDir, json: bool) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dir = data.prepare()?;
    let line = rt
        .block_on(ask_daemon(&dir, "status"))
        .with_context(|| format!("no appliance daemon is running on {}", dir.display()))?;
    let v: serde_json::Value = serde_json::from_str(line.strip_prefix("ok ").unwrap_or(&line))
        .with_context(|| format!("unexpected answer from the daemon: {line}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let gib = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0) / (1u64 << 30) as f64;
    let inv = &v["inventory"];
    println!(
        "host: {} ({} cores / {} threads), memory {:.1} of {:.1} GiB available, disk {:.1} of {:.1} GiB free, load {}",
        inv["cpu_model"].as_str().unwrap_or("?"),
        inv["cpu_cores"],
        inv["cpu_threads"],
        gib(&inv["memory_available"]),
        gib(&inv["memory_total"]),
        gib(&inv["disk_available"]),
        gib(&inv["disk_total"]),
        inv["load_average"]
    );
    for g in inv["gpus"].as_array().into_iter().flatten() {
        println!(
            "gpu {}: {} memory {:.1}/{:.1} GiB used, {}% busy, {} °C, {} W",
            g["index"],
            g["name"].as_str().unwrap_or("?"),
            gib(&g["memory_used"]),
            gib(&g["memory_total"]),
            g["utilization_percent"],
            g["temperature_celsius"],
            g["power_watts"]
        );
    }
    if let Some(note) = inv["gpu_note"].as_str() {
        println!("gpus: none ({note})");
    }
    println!(
        "{:<20}  {:<12}  {:<8}  {:>9}  {:>8}  {:>9}  LAST ERROR",
        "MODEL", "STATE", "DEVICE", "ESTIMATE", "RESTARTS", "IN FLIGHT"
    );
    for w in v["workers"].as_array().into_iter().flatten() {
        println!(
            "{:<20}  {:<12}  {:<8}  {:>7.2}Gi  {:>8}  {:>9}  {}",
            w["model"].as_str().unwrap_or("?"),
            w["state"].as_str().unwrap_or("?"),
            w["device"].as_str().unwrap_or("?"),
            gib(&w["estimate_bytes"]),
            w["restarts"].as_u64().unwrap_or(0),
            w["in_flight"].as_u64().unwrap_or(0),
            w["last_error"].as_str().unwrap_or("-")
        );
    }
    Ok(())
}
