//! The daemon's configuration: `DIR/appliance.toml` (every setting has a default), then
//! `APPLIANCE_*` environment variables, then command-line flags (clap reads both), in
//! that order of precedence. Only this module reads the file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The file's schema. Unknown keys are errors (a typo must not be silently ignored).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub api: ApiSection,
    pub tls: TlsSection,
    pub limits: LimitsSection,
    pub workers: WorkersSection,
    /// Model name → GGUF path (relative paths are relative to the data directory).
    pub models: BTreeMap<String, PathBuf>,
    /// Model name → pinned device ("cpu", "cuda:0"); unpinned models are placed by memory.
    pub devices: BTreeMap<String, String>,
    /// Model name → worker processes serving it (default 1); requests go to the ready
    /// one with the fewest in flight.
    pub instances: BTreeMap<String, u32>,
    pub audit: AuditSection,
}

/// The audit log (`DIR/audit/`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSection {
    /// A signed checkpoint is written this often (seconds) while the log grows, and
    /// always at shutdown.
    pub checkpoint_interval_secs: u64,
    /// Records older than this many days lose their text (their hashes stay); 0 keeps
    /// everything. Checked hourly; each pruning is itself recorded.
    pub retention_days: u32,
    /// How long a commit waits for `audit.db` to catch up with the journal (when it
    /// must reuse a journal file), and SQLite for a lock held by another process,
    /// before the request is refused (milliseconds).
    pub lock_timeout_ms: u64,
    /// Size of each of the two journal files (KiB, 16 to 1048576): how much the log can
    /// take while its store (`audit.db`) cannot be written before requests are refused.
    pub journal_kib: u64,
}

impl Default for AuditSection {
    fn default() -> Self {
        AuditSection {
            checkpoint_interval_secs: 10,
            retention_days: 0,
            lock_timeout_ms: 2000,
            journal_kib: 4096,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSection {
    pub listen: SocketAddr,
    /// A plain-HTTP listener that only redirects to HTTPS; off when absent.
    pub redirect_listen: Option<SocketAddr>,
    /// The web console's HTTPS listener (same certificate as the API); off when absent.
    pub console_listen: Option<SocketAddr>,
}

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection {
            listen: "0.0.0.0:8443".parse().expect("valid default address"),
            redirect_listen: None,
            console_listen: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// The site's own certificate chain (PEM); with `key`. Absent: self-signed.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    pub max_body_bytes: usize,
    pub max_messages: usize,
    pub max_tokens_cap: usize,
    pub queue_per_model: usize,
    pub header_timeout_secs: u64,
    pub body_timeout_secs: u64,
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    pub idle_timeout_secs: u64,
    pub stall_timeout_secs: u64,
    pub drain_timeout_secs: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        let g = appliance_gateway::GatewayConfig::default();
        LimitsSection {
            max_body_bytes: g.max_body_bytes,
            max_messages: g.max_messages,
            max_tokens_cap: g.max_tokens_cap,
            queue_per_model: g.queue_per_model,
            header_timeout_secs: g.header_timeout.as_secs(),
            body_timeout_secs: g.body_timeout.as_secs(),
            max_connections: g.max_connections,
            max_connections_per_address: g.max_connections_per_address,
            idle_timeout_secs: g.idle_timeout.as_secs(),
            stall_timeout_secs: g.stall_timeout.as_secs(),
            drain_timeout_secs: g.drain_timeout.as_secs(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkersSection {
    /// Compute threads per worker; 0 = all cores.
    pub threads: usize,
    pub max_batch: usize,
    /// Cap on the context served; 0 = the model's own.
    pub max_context: usize,
    /// Seconds between SIGTERM and SIGKILL when a worker is stopped.
    pub grace_secs: u64,
    /// Seconds a starting worker gets to load its model.
    pub ready_timeout_secs: u64,
    /// First restart delay after a failure; doubles per failure in a row.
    pub restart_backoff_initial_ms: u64,
    pub restart_backoff_max_secs: u64,
    /// Failures in a row after which a worker is reported failed (crash loop).
    pub crash_loop_after: u32,
    /// Liveness: a health check every interval; `health_misses` unanswered → restart.
    pub health_interval_ms: u64,
    pub health_timeout_ms: u64,
    pub health_misses: u32,
    /// When the daemon runs as root, workers run as this user (default: the
    /// `appliance-worker` user if it exists).
    pub user: Option<String>,
    /// RLIMIT_NOFILE of each worker.
    pub max_open_files: u64,
    /// A cgroup v2 memory limit per worker (placement's estimate + 25%), where the host
    /// delegates the memory controller to the daemon.
    pub memory_limit: bool,
}

impl Default for WorkersSection {
    fn default() -> Self {
        WorkersSection {
            threads: 0,
            max_batch: 8,
            max_context: 0,
            grace_secs: 30,
            ready_timeout_secs: 300,
            restart_backoff_initial_ms: 1000,
            restart_backoff_max_secs: 300,
            crash_loop_after: 5,
            health_interval_ms: 2000,
            health_timeout_ms: 2000,
            health_misses: 2,
            user: None,
            max_open_files: 1024,
            memory_limit: true,
        }
    }
}

/// The commented file written on first start, so an operator sees every setting.
pub const DEFAULT_FILE: &str = r#"# Appliance configuration. Every setting has a default; uncomment to change.
# Environment variables (APPLIANCE_API_LISTEN, ...) and command-line flags override it.

[api]
# listen = "0.0.0.0:8443"          # HTTPS API (OpenAI-compatible)
# redirect_listen = "0.0.0.0:8080" # plain HTTP that only redirects to HTTPS; off by default
# console_listen = "0.0.0.0:9443"  # the web console (HTTPS, same certificate); off by default

[tls]
# The site's own certificate chain and key (PEM). Without them a self-signed
# certificate for this host's names is generated into tls/ under the data directory.
# cert = "/etc/appliance/site-chain.pem"
# key = "/etc/appliance/site-key.pem"

[limits]
# max_body_bytes = 1048576     # larger request bodies get 413
# max_messages = 256           # chat messages per request
# max_tokens_cap = 4096        # largest max_tokens; also the default for chat
# queue_per_model = 64         # requests admitted per model at once; 503 above
# header_timeout_secs = 10
# body_timeout_secs = 30
# max_connections = 4096
# max_connections_per_address = 512
# idle_timeout_secs = 120      # connections with no traffic and no request in progress
# stall_timeout_secs = 60      # a stream whose client reads nothing this long is ended
# drain_timeout_secs = 30      # in-flight requests get this long on shutdown

[workers]
# threads = 0                  # compute threads per worker; 0 = all cores
# max_batch = 8                # sequences decoded together (KV cache is sized for
#                              # max_batch x context when placing the model)
# max_context = 0              # 0 = the model's own context length
# grace_secs = 30              # SIGTERM -> SIGKILL when stopping a worker
# ready_timeout_secs = 300
# restart_backoff_initial_ms = 1000   # doubles per failure in a row...
# restart_backoff_max_secs = 300      # ...up to this; reset after 2 healthy minutes
# crash_loop_after = 5                # failures in a row reported as a crash loop
# health_interval_ms = 2000           # liveness: a hung or stopped worker is killed
# health_timeout_ms = 2000            #   and restarted within
# health_misses = 2                   #   interval + misses * (interval + timeout)
# user = "appliance-worker"           # workers' user when the daemon runs as root
# max_open_files = 1024               # per worker; core dumps are always off
# memory_limit = true                 # cgroup v2 memory.max per worker, where delegated

[models]
# name = "path/to/model.gguf"  # relative paths are relative to the data directory

[devices]
# name = "cuda:0"              # pin a model to a device; others go where memory is free

[instances]
# name = 2                     # worker processes for a model (throughput); default 1
"#;

/// Reads `DIR/appliance.toml`, writing the commented default first if there is none.
pub fn load(data_dir: &Path) -> Result<FileConfig> {
    let path = data_dir.join("appliance.toml");
    if !path.exists() {
        std::fs::write(&path, DEFAULT_FILE)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Parses the file; errors carry line and column.
pub fn parse(text: &str) -> Result<FileConfig, String> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let (line, col) = e
            .span()
            .map(|s| {
                let before = &text[..s.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
                (line, col)
            })
            .unwrap_or((0, 0));
        format!("line {line}, column {col}: {}", e.message())
    })
}

/// A model's public name: 1 to 64 of letters, digits and `._:-`.
pub fn valid_name(kind: &str, s: &str) -> Result<()> {
    if s.is_empty()
        || s.len() > 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
    {
        let shown: String = s.chars().take(64).collect();
        let more = if shown.len() < s.len() { "…" } else { "" };
        bail!("{kind} name {shown:?}{more} must be 1 to 64 letters, digits, '.', '_', ':' or '-'");
    }
    Ok(())
}

/// Parses `NAME=PATH`, or `NAME` alone (a registry model: the path is left empty).
pub fn parse_model_arg(s: &str) -> Result<(String, PathBuf), String> {
    let Some((name, path)) = s.split_once('=') else {
        valid_name("model", s).map_err(|e| e.to_string())?;
        return Ok((s.to_string(), PathBuf::new()));
    };
    valid_name("model", name).map_err(|e| e.to_string())?;
    if path.is_empty() {
        return Err(format!("model {name}: empty path"));
    }
    Ok((name.to_string(), PathBuf::from(path)))
}

/// Parses a duration like `90s`, `15m`, `2h`, `7d` (or a bare number of seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (use e.g. 90s, 15m, 2h, 7d)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    if secs == 0 {
        return Err(format!("{s:?}: the duration must be positive"));
    }
    if secs > 3650 * 86400 {
        return Err(format!("{s:?}: at most 10 years"));
    }
    Ok(Duration::from_secs(secs))
}

impl WorkersSection {
    pub fn backoff(&self) -> appliance_supervisor::Backoff {
        appliance_supervisor::Backoff {
            base: Duration::from_millis(self.restart_backoff_initial_ms.max(1)),
            max: Duration::from_secs(self.restart_backoff_max_secs.max(1)),
            crash_loop_after: self.crash_loop_after.max(1),
            ..Default::default()
        }
    }

    pub fn liveness(&self) -> appliance_supervisor::Liveness {
        appliance_supervisor::Liveness {
            interval: Duration::from_millis(self.health_interval_ms.max(100)),
            timeout: Duration::from_millis(self.health_timeout_ms.max(100)),
            misses: self.health_misses.max(1),
        }
    }
}

impl FileConfig {
    pub fn gateway(&self) -> appliance_gateway::GatewayConfig {
        let l = &self.limits;
        appliance_gateway::GatewayConfig {
            max_body_bytes: l.max_body_bytes,
            max_messages: l.max_messages,
            max_tokens_cap: l.max_tokens_cap,
            queue_per_model: l.queue_per_model,
            header_timeout: Duration::from_secs(l.header_timeout_secs),
            body_timeout: Duration::from_secs(l.body_timeout_secs),
            max_connections: l.max_connections,
            max_connections_per_address: l.max_connections_per_address,
            idle_timeout: Duration::from_secs(l.idle_timeout_secs),
            stall_timeout: Duration::from_secs(l.stall_timeout_secs),
            drain_timeout: Duration::from_secs(l.drain_timeout_secs),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_file_parses_to_the_defaults() {
        let c = parse(DEFAULT_FILE).unwrap();
        assert_eq!(c.api.listen.port(), 8443);
        assert_eq!(c.limits.max_body_bytes, 1 << 20);
        assert!(c.models.is_empty());
    }

    #[test]
    fn errors_name_line_and_column() {
        let e = parse("[api]\nlisten = \"0.0.0.0:1\"\n[limits]\nmax_bodybytes = 3\n").unwrap_err();
        assert!(e.starts_with("line 4, column 1"), "{e}");
        let e = parse("[api]\nlisten = 5\n").unwrap_err();
        assert!(e.starts_with("line 2"), "{e}");
        let c = parse("[models]\nsmol = \"m.gguf\"\n").unwrap();
        assert_eq!(c.models["smol"], PathBuf::from("m.gguf"));
    }

    #[test]
    fn durations_and_model_args() {
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86400));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("m").is_err());
        assert_eq!(
            parse_model_arg("smol=/a/b.gguf").unwrap(),
            ("smol".into(), PathBuf::from("/a/b.gguf"))
        );
        assert_eq!(
            parse_model_arg("registered").unwrap(),
            ("registered".into(), PathBuf::new())
        );
        assert!(parse_model_arg("smol=").is_err());
        assert!(parse_model_arg("bad name=/x").is_err());
    }
}
