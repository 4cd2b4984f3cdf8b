//! The appliance binary: the command line, the daemon (`serve`), the worker process,
//! tenant and key administration, and the benchmark.
//!
//! Only this crate reads the environment, configuration files and signals, parses flags
//! and installs the logger.

mod admin;
mod audit;
mod backup;
mod bench;
mod chat;
mod config;
mod logger;
mod model;
mod policy;
mod provision;
mod sdnotify;
mod serve;
mod worker;

use std::path::PathBuf;

/// mimalloc rather than glibc's malloc: the gateway allocates and frees many small and
/// mid-sized buffers across threads per request, where glibc's arenas spent about a
/// seventh of the daemon's time (docs/BENCHMARKS.md, the proxy benchmark). Built with
/// `no_thp`, and `main` turns transparent huge pages off for the process (and the
/// workers it starts): with them, mimalloc's arenas held whole 2 MiB pages and a
/// worker's resident memory was 40 MiB above what it uses, for no measurable speed.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "appliance",
    version,
    about = "Sovereign AI appliance: local inference, policy and audit"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the appliance: supervised model workers behind the HTTPS API.
    Serve(serve::ServeArgs),
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(admin::TenantCmd),
    /// Manage API keys.
    #[command(subcommand)]
    Key(admin::KeyCmd),
    /// The running daemon's workers (state, device, restarts) and the hardware.
    Status {
        #[command(flatten)]
        data: serve::DataDir,
        #[arg(long)]
        json: bool,
    },
    /// The model registry: import (with signature checks), list, inspect, remove, sign.
    #[command(subcommand)]
    Model(model::ModelCmd),
    /// The sovereignty policy: check a policy file, explain a decision.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// The audit log: verify it, export it with proofs, check an export, sign a checkpoint.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Encrypted backups of the appliance's state (not its models): create, verify, restore.
    #[command(subcommand)]
    Backup(backup::BackupCmd),
    /// The site seed (hostname, network, NTP, time zone, certificate, trusted signers):
    /// check and apply it, and write each boot's settings (used by the image's first boot).
    #[command(subcommand)]
    Provision(provision::ProvisionCmd),
    /// Chat with a local model in the terminal (one-shot with --prompt).
    Chat(chat::ChatArgs),
    /// Host one model and serve it over a Unix socket (started by the supervisor).
    Worker(worker::WorkerArgs),
    /// Measure prefill, decode and batched decode, side by side with llama.cpp.
    Bench(bench::BenchArgs),
    /// Print the token ids of a text (JSON), as the engine tokenizes it.
    Tokenize {
        #[arg(long)]
        model: PathBuf,
        /// Parse special-token text such as <|im_start|>.
        #[arg(long)]
        special: bool,
        text: String,
    },
    #[command(hide = true)]
    BenchRun(bench::BenchRunArgs),
}

/// Sets the compute thread count for candle's kernels before any thread pool starts.
pub(crate) fn set_threads(threads: Option<usize>) {
    if let Some(n) = threads {
        // Read by rayon's global pool and by candle at first use; nothing has started yet.
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    }
}

fn main() {
    // Inherited by child processes; an error (an old kernel) leaves the default.
    let _ = nix::sys::prctl::set_thp_disable(true);
    logger::init();
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Serve(a) => serve::run(a),
        Command::Tenant(c) => admin::tenant(c),
        Command::Key(c) => admin::key(c),
        Command::Model(c) => model::run(c),
        Command::Audit(c) => audit::run(c),
        Command::Backup(c) => backup::run(c),
        Command::Policy(c) => policy::run(c),
        Command::Provision(c) => provision::run(c),
        Command::Status { data, json } => serve::status(data, json),
        Command::Chat(a) => chat::run(a),
        Command::Worker(a) => worker::run(a),
        Command::Bench(a) => bench::run(a),
        Command::BenchRun(a) => bench::run_child(a),
        Command::Tokenize {
            model,
            special,
            text,
        } => (|| {
            let file = appliance_engine::gguf::GgufFile::open(&model)?;
            let tok = appliance_engine::Tokenizer::from_gguf_metadata(file.metadata())?;
            println!(
                "{}",
                serde_json::to_string(&tok.encode(&text, true, special))?
            );
            Ok(())
        })(),
    };
    log::logger().flush();
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
