//! `appliance worker`: hosts one engine and serves it over a Unix socket with the
//! protocol in `appliance_api::worker`.
//!
//! A caller that closes its connection cancels its generation: the handle is dropped and
//! the engine frees the sequence before its next step. SIGTERM/SIGINT stop accepting,
//! let running generations finish (up to a grace period) and exit 0.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use appliance_api::worker::{
    ErrorCode, Op, Request, Response, WireFinish, WireModelInfo, WireParams, WirePrompt,
    PROTOCOL_VERSION,
};
use appliance_engine::{
    ChatMessage, Engine, EngineConfig, EngineError, Event, FinishReason, GenerateRequest, Prompt,
    SamplingParams,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

#[derive(clap::Args)]
pub struct WorkerArgs {
    /// The GGUF model file.
    #[arg(long)]
    pub model: PathBuf,
    /// Where to listen (created 0600; a stale file is replaced).
    #[arg(long)]
    pub socket: PathBuf,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Cap on the context served.
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Seconds running generations get to finish on SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub grace: u64,
    /// Started as root: become UID:GID (no supplementary groups) before reading anything.
    #[arg(long, value_parser = parse_uid_gid)]
    pub run_as: Option<(u32, u32)>,
    /// The device: cpu, or cuda:N (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: appliance_supervisor::placement::Device,
    /// Most open files (RLIMIT_NOFILE).
    #[arg(long, default_value_t = 1024)]
    pub max_open_files: u64,
}

fn parse_uid_gid(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s.split_once(':').ok_or("expected UID:GID")?;
    Ok((
        u.parse().map_err(|_| "bad uid")?,
        g.parse().map_err(|_| "bad gid")?,
    ))
}

/// Least privilege, before the model file is opened: close inherited descriptors, no
/// core dumps (a core would hold prompts and weights), a cap on open files, the
/// unprivileged user with no supplementary groups, and no way back (no_new_privs).
fn lock_down(a: &WorkerArgs) -> Result<()> {
    use nix::sys::resource::{setrlimit, Resource};
    // Descriptors beyond stdio that the parent let through.
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|&fd| fd > 2)
                .collect()
        })
        .unwrap_or_default();
    for fd in fds {
        // The directory iterator's own descriptor is gone by now; others are inherited.
        let _ = nix::unistd::close(fd);
    }
    setrlimit(Resource::RLIMIT_CORE, 0, 0).context("RLIMIT_CORE")?;
    setrlimit(Resource::RLIMIT_NOFILE, a.max_open_files, a.max_open_files)
        .context("RLIMIT_NOFILE")?;
    if let Some((uid, gid)) = a.run_as {
        use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
        setgroups(&[Gid::from_raw(gid)]).context("setgroups")?;
        setgid(Gid::from_raw(gid)).context("setgid")?;
        setuid(Uid::from_raw(uid)).context("setuid")?;
        if nix::unistd::geteuid().is_root() || setuid(Uid::from_raw(0)).is_ok() {
            anyhow::bail!("could not drop root privileges");
        }
    }
    nix::sys::prctl::set_no_new_privs().context("no_new_privs")?;
    Ok(())
}

pub fn to_params(p: WireParams) -> SamplingParams {
    SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k,
        min_p: p.min_p,
        frequency_penalty: p.frequency_penalty,
        presence_penalty: p.presence_penalty,
        repetition_penalty: p.repetition_penalty,
        seed: p.seed,
        max_tokens: p.max_tokens,
        stop: p.stop,
        logit_bias: p.logit_bias,
        ignore_eos: p.ignore_eos,
    }
}

fn to_prompt(p: WirePrompt) -> Prompt {
    match p {
        WirePrompt::Chat(m) => Prompt::Chat(
            m.into_iter()
                .map(|m| ChatMessage::new(m.role, m.content))
                .collect(),
        ),
        WirePrompt::Text(t) => Prompt::Text(t),
        WirePrompt::Tokens(t) => Prompt::Tokens(t),
    }
}

fn error_response(e: &EngineError) -> Response {
    let code = match e {
        EngineError::ContextOverflow { .. } => ErrorCode::ContextOverflow,
        EngineError::InvalidRequest(_) | EngineError::Template(_) | EngineError::Tokenizer(_) => {
            ErrorCode::InvalidRequest
        }
        _ => ErrorCode::Internal,
    };
    Response::Error {
        code,
        message: e.to_string(),
    }
}

/// Under a supervisor, asks the kernel to end this worker when the supervisor dies, so a
/// crashed daemon leaves no orphan holding memory and the socket.
fn die_with_supervisor() -> Result<()> {
    let Ok(pid) = std::env::var(appliance_supervisor::PARENT_PID_ENV) else {
        return Ok(());
    };
    let pid: i32 = pid
        .parse()
        .context("bad supervisor pid in the environment")?;
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
    // The supervisor may have died before the line above: then we are someone else's.
    if nix::unistd::getppid().as_raw() != pid {
        anyhow::bail!("the supervisor (pid {pid}) is gone");
    }
    Ok(())
}

pub fn run(a: WorkerArgs) -> Result<()> {
    lock_down(&a)?;
    // After dropping privileges: the kernel clears the parent-death signal when the
    // credentials change.
    die_with_supervisor()?;
    crate::set_threads(a.threads);
    let config = EngineConfig {
        device: match a.device {
            appliance_supervisor::placement::Device::Cpu => appliance_engine::DeviceSpec::Cpu,
            appliance_supervisor::placement::Device::Cuda(i) => {
                appliance_engine::DeviceSpec::Cuda(i as usize)
            }
        },
        max_batch: a.max_batch,
        max_context: a.max_context,
        ..Default::default()
    };
    let engine = match Engine::load(&a.model, config) {
        Ok(engine) => engine,
        Err(e) if unusable(&e) => {
            // Starting again would fail the same way: say why where the supervisor looks
            // and exit with the status that makes it stop restarting.
            let path = a.model.display().to_string();
            let reason = match e.to_string() {
                m if m.contains(&path) => m,
                m => format!("loading {path}: {m}"),
            };
            let _ = std::fs::write(appliance_supervisor::error_file(&a.socket), &reason);
            log::error!("{reason}");
            log::logger().flush();
            std::process::exit(appliance_supervisor::EXIT_UNUSABLE_MODEL);
        }
        Err(e) => return Err(e).with_context(|| format!("loading {}", a.model.display())),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(serve(engine, &a.socket, Duration::from_secs(a.grace)))
}

/// A load failure that is the file's own: the same file will fail the same way. (An I/O
/// error or a device that is short of memory may pass; those are retried.)
fn unusable(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::BadGguf { .. }
            | EngineError::UnsupportedArchitecture(_)
            | EngineError::UnsupportedTensorType { .. }
            | EngineError::MissingMetadata { .. }
            | EngineError::MissingTensor(_)
            | EngineError::Tokenizer(_)
            | EngineError::Template(_)
    )
}

async fn serve(engine: Engine, socket: &Path, grace: Duration) -> Result<()> {
    if socket.exists() {
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale socket {}", socket.display()))?;
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    }
    let info = engine.info();
    log::info!(
        "worker ready: model {} ({}, {}), socket {}",
        info.name,
        info.architecture,
        info.quantization,
        socket.display()
    );
    let active = Arc::new(AtomicUsize::new(0));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let (stream, _) = conn?;
                let engine = engine.clone();
                let active = active.clone();
                tokio::spawn(async move {
                    active.fetch_add(1, Ordering::SeqCst);
                    if let Err(e) = handle(stream, engine).await {
                        log::debug!("connection ended: {e}");
                    }
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(socket);
    log::info!(
        "worker draining: {} connection(s)",
        active.load(Ordering::SeqCst)
    );
    let deadline = tokio::time::Instant::now() + grace;
    while active.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    log::info!("worker stopped");
    Ok(())
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

async fn handle(stream: UnixStream, engine: Engine) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let mut queued: VecDeque<String> = VecDeque::new();
    loop {
        let line = match queued.pop_front() {
            Some(l) => l,
            None => match lines.next_line().await? {
                Some(l) => l,
                None => return Ok(()),
            },
        };
        if line.trim().is_empty() {
            continue;
        }
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                // Distinguish a version we do not speak from a malformed line.
                let v = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("v").and_then(|v| v.as_u64()));
                let resp = match v {
                    Some(v) if v != PROTOCOL_VERSION as u64 => Response::Error {
                        code: ErrorCode::UnsupportedVersion,
                        message: format!("protocol version {v} is not supported (this worker speaks {PROTOCOL_VERSION})"),
                    },
                    _ => Response::Error {
                        code: ErrorCode::BadRequest,
                        message: format!("bad request line: {e}"),
                    },
                };
                send(&mut w, &resp).await?;
                continue;
            }
        };
        if req.v != PROTOCOL_VERSION {
            send(
                &mut w,
                &Response::Error {
                    code: ErrorCode::UnsupportedVersion,
                    message: format!("protocol version {} is not supported (this worker speaks {PROTOCOL_VERSION})", req.v),
                },
            )
            .await?;
            continue;
        }
        match req.op {
            Op::Hello => {
                let i = engine.info();
                send(
                    &mut w,
                    &Response::Hello {
                        protocol: PROTOCOL_VERSION,
                        model: WireModelInfo {
                            name: i.name.clone(),
                            architecture: i.architecture.clone(),
                            quantization: i.quantization.clone(),
                            context: i.context,
                            vocab_size: i.vocab_size,
                        },
                    },
                )
                .await?
            }
            Op::Health => {
                let st = engine.stats();
                send(
                    &mut w,
                    &Response::Health {
                        ok: true,
                        active: st.active.load(Ordering::Relaxed),
                        queued: st.queued.load(Ordering::Relaxed),
                    },
                )
                .await?
            }
            Op::Tokenize {
                text,
                add_special,
                parse_special,
            } => {
                let ids = engine.tokenizer().encode(&text, add_special, parse_special);
                send(&mut w, &Response::Tokens { ids }).await?
            }
            Op::Generate { prompt, params, .. } => {
                let submitted = engine.submit(GenerateRequest {
                    prompt: to_prompt(prompt),
                    params: to_params(params),
                });
                let mut h = match submitted {
                    Ok(h) => h,
                    Err(e) => {
                        send(&mut w, &error_response(&e)).await?;
                        continue;
                    }
                };
                send(
                    &mut w,
                    &Response::Started {
                        prompt_tokens: h.prompt_tokens,
                    },
                )
                .await?;
                loop {
                    tokio::select! {
                        ev = h.events.recv() => {
                            let resp = match ev {
                                Some(Event::Token { id, text, logprob }) => Response::Token { id, text, logprob },
                                Some(Event::Done { finish_reason, prompt_tokens, completion_tokens }) => Response::Done {
                                    finish_reason: match finish_reason {
                                        FinishReason::Stop => WireFinish::Stop,
                                        FinishReason::Length => WireFinish::Length,
                                    },
                                    prompt_tokens,
                                    completion_tokens,
                                },
                                Some(Event::Error(message)) => Response::Error { code: ErrorCode::Internal, message },
                                None => Response::Error { code: ErrorCode::Internal, message: "the engine stopped".into() },
                            };
                            let last = !matches!(resp, Response::Token { .. });
                            // A failed write means the caller left: returning drops the
                            // handle, which cancels the sequence.
                            send(&mut w, &resp).await?;
                            if last { break; }
                        }
                        next = lines.next_line() => {
                            match next? {
                                Some(l) => queued.push_back(l),
                                // The caller closed its side: cancel.
                                None => return Ok(()),
                            }
                        }
                    }
                }
            }
        }
    }
}
