//! `appliance bench`: prefill, decode and batched-decode throughput of the engine, run
//! side by side with llama.cpp (llama-cpp-python) on the same file, prompt and threads.
//!
//! Each measurement runs in a child process (`bench-run`) so the thread count is set
//! before any pool starts and the peak RSS is the engine's alone.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use appliance_engine::{Engine, EngineConfig, Event, GenerateRequest, Prompt, SamplingParams};
use serde::{Deserialize, Serialize};

/// A fixed English text; its first N tokens are the benchmark prompt.
const PROMPT_TEXT: &str = "The appliance runs open-weight language models on the institution's own hardware. \
Every request is classified, routed only where policy allows, and recorded in a tamper-evident audit log. \
Hospitals use it to draft discharge letters, banks to summarise customer correspondence, and regional \
consortia to give member organisations a shared, sovereign service. Administrators manage workers, models, \
tenants, keys, policy and upstreams from a web console; auditors verify the log offline. The system is \
designed to keep working when the network to the outside world is cut, to refuse what it cannot do safely, \
and to explain every decision it takes. Models are imported from signed bundles, checked against their \
digests, and placed on the GPU or CPU that has room for them. Throughput matters: a small box must serve a \
whole department, so the engine batches many conversations into each step and streams tokens as they come.";

#[derive(clap::Args)]
pub struct BenchArgs {
    /// The GGUF model file.
    #[arg(long)]
    pub model: PathBuf,
    /// Thread counts for the single-stream runs.
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Concurrent stream counts for the batched runs (at the largest thread count).
    #[arg(long, default_value = "1,4,8,16", value_delimiter = ',')]
    pub streams: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Tokens each stream generates in the batched runs.
    #[arg(long, default_value_t = 64)]
    pub stream_tokens: usize,
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Python interpreter that has llama-cpp-python installed.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Skip the llama.cpp side.
    #[arg(long)]
    pub no_llama_cpp: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct BenchRunArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt_ids: PathBuf,
    #[arg(long)]
    threads: usize,
    #[arg(long)]
    mode: String,
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    #[arg(long, default_value = "1,4,8,16")]
    streams: String,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Single {
    prefill_tps: f64,
    decode_tps: f64,
    peak_rss_bytes: u64,
    #[serde(default)]
    engine: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StreamPoint {
    streams: usize,
    aggregate_tps: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Streams {
    streams: Vec<StreamPoint>,
    peak_rss_bytes: u64,
    #[serde(default)]
    engine: String,
}

fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(n),
        ignore_eos: true,
        ..Default::default()
    }
}

/// The benchmark child: measures one mode in this process and prints one JSON line.
pub fn run_child(a: BenchRunArgs) -> Result<()> {
    crate::set_threads(Some(a.threads));
    let ids: Vec<u32> = serde_json::from_str(&std::fs::read_to_string(&a.prompt_ids)?)?;
    let engine = Engine::load(
        &a.model,
        EngineConfig {
            max_batch: 64,
            ..Default::default()
        },
    )?;
    // Warm-up.
    engine.generate_blocking(GenerateRequest {
        prompt: Prompt::Tokens(ids[..8.min(ids.len())].to_vec()),
        params: greedy(4),
    })?;
    let out = match a.mode.as_str() {
        "single" => {
            let (mut pre, mut dec) = (Vec::new(), Vec::new());
            for _ in 0..a.repeats.max(1) {
                let t0 = Instant::now();
                let mut h = engine.submit(GenerateRequest {
                    prompt: Prompt::Tokens(ids.clone()),
                    params: greedy(a.gen_tokens),
                })?;
                let (mut first, mut n) = (None, 0usize);
                while let Some(ev) = h.events.blocking_recv() {
                    match ev {
                        Event::Token { .. } => {
                            n += 1;
                            if first.is_none() {
                                first = Some(Instant::now());
                            }
                        }
                        Event::Done { .. } => break,
                        Event::Error(e) => bail!(e),
                    }
                }
                let t2 = Instant::now();
                let t1 = first.context("no token generated")?;
                pre.push(ids.len() as f64 / (t1 - t0).as_secs_f64());
                dec.push((n - 1) as f64 / (t2 - t1).as_secs_f64());
            }
            serde_json::to_string(&Single {
                prefill_tps: median(pre),
                decode_tps: median(dec),
                peak_rss_bytes: peak_rss(),
                engine: "appliance".into(),
            })?
        }
        "streams" => {
            let mut points = Vec::new();
            for n in a.streams.split(',').map(|s| s.trim().parse::<usize>()) {
                let n = n?;
                let mut handles = Vec::new();
                for _ in 0..n {
                    handles.push(engine.submit(GenerateRequest {
                        prompt: Prompt::Tokens(ids.clone()),
                        params: greedy(a.gen_tokens),
                    })?);
                }
                // Every stream's token times, gathered concurrently.
                let mut times: Vec<Vec<Instant>> = vec![Vec::new(); n];
                let mut open = n;
                while open > 0 {
                    let mut progressed = false;
                    for (i, h) in handles.iter_mut().enumerate() {
                        loop {
                            match h.events.try_recv() {
                                Ok(Event::Token { .. }) => {
                                    times[i].push(Instant::now());
                                    progressed = true;
                                }
                                Ok(Event::Done { .. }) => {
                                    open -= 1;
                                    progressed = true;
                                }
                                Ok(Event::Error(e)) => bail!(e),
                                Err(_) => break,
                            }
                        }
                    }
                    if !progressed {
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                }
                // Decode phase: from the moment every stream has its first token.
                let t0 = times
                    .iter()
                    .filter_map(|t| t.first())
                    .max()
                    .copied()
                    .context("no tokens")?;
                let t1 = times
                    .iter()
                    .filter_map(|t| t.last())
                    .max()
                    .copied()
                    .context("no tokens")?;
                let after: usize = times
                    .iter()
                    .map(|t| t.iter().filter(|x| **x > t0).count())
                    .sum();
                points.push(StreamPoint {
                    streams: n,
                    aggregate_tps: after as f64 / (t1 - t0).as_secs_f64(),
                });
            }
            serde_json::to_string(&Streams {
                streams: points,
                peak_rss_bytes: peak_rss(),
                engine: "appliance".into(),
            })?
        }
        other => bail!("unknown bench mode {other}"),
    };
    println!("{out}");
    Ok(())
}

fn child_json<T: for<'de> Deserialize<'de>>(mut cmd: Command, what: &str) -> Result<T> {
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no JSON output")?;
    serde_json::from_str(line).with_context(|| format!("parsing {what} output"))
}

fn ratio(a: f64, b: Option<f64>) -> String {
    match b {
        Some(b) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

pub fn run(a: BenchArgs) -> Result<()> {
    let file = appliance_engine::gguf::GgufFile::open(&a.model)?;
    let tok = appliance_engine::Tokenizer::from_gguf_metadata(file.metadata())?;
    let mut ids = tok.encode(PROMPT_TEXT, true, false);
    while ids.len() < a.prompt_tokens {
        let more = ids.clone();
        ids.extend(more);
    }
    ids.truncate(a.prompt_tokens);
    let dir = std::env::temp_dir().join(format!("appliance-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ids_path = dir.join("prompt.json");
    std::fs::write(&ids_path, serde_json::to_string(&ids)?)?;
    let exe = std::env::current_exe()?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench/llama_cpp_bench.py");
    let streams = a
        .streams
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    // Both sides take the same flags: the engine's `bench-run` child and llama.cpp's script.
    let measure = |program: &std::ffi::OsStr,
                   first: &std::ffi::OsStr,
                   threads: usize,
                   mode: &str,
                   gen: usize| {
        let mut c = Command::new(program);
        c.arg(first)
            .arg("--model")
            .arg(&a.model)
            .arg("--prompt-ids")
            .arg(&ids_path)
            .args(["--threads", &threads.to_string(), "--mode", mode])
            .args([
                "--gen-tokens",
                &gen.to_string(),
                "--repeats",
                &a.repeats.to_string(),
            ])
            .args(["--streams", &streams]);
        c
    };
    let ours_cmd =
        |threads, mode, gen| measure(exe.as_os_str(), "bench-run".as_ref(), threads, mode, gen);
    let theirs_cmd =
        |threads, mode, gen| measure(a.python.as_ref(), script.as_os_str(), threads, mode, gen);
    let mut report = serde_json::json!({
        "model": a.model.display().to_string(),
        "prompt_tokens": ids.len(),
        "gen_tokens": a.gen_tokens,
        "stream_tokens": a.stream_tokens,
        "kernels": appliance_engine::kernels::kernel_level(),
    });
    println!(
        "model {} ({}), prompt {} tokens, decode {} tokens, streams of {} tokens; engine kernels: {}",
        a.model.display(),
        file.quantization(),
        ids.len(),
        a.gen_tokens,
        a.stream_tokens,
        appliance_engine::kernels::kernel_level()
    );
    println!(
        "{:<28} {:>12} {:>12} {:>8}",
        "measure", "appliance", "llama.cpp", "ratio"
    );
    let mut singles = Vec::new();
    for &t in &a.threads {
        let ours: Single = child_json(ours_cmd(t, "single", a.gen_tokens), "engine benchmark")?;
        let theirs: Option<Single> = if a.no_llama_cpp {
            None
        } else {
            Some(child_json(
                theirs_cmd(t, "single", a.gen_tokens),
                "llama.cpp benchmark",
            )?)
        };
        let th = theirs.as_ref();
        println!(
            "{:<28} {:>12.1} {:>12} {:>8}",
            format!("prefill tok/s, {t} thread(s)"),
            ours.prefill_tps,
            th.map(|x| format!("{:.1}", x.prefill_tps))
                .unwrap_or("-".into()),
            ratio(ours.prefill_tps, th.map(|x| x.prefill_tps))
        );
        println!(
            "{:<28} {:>12.1} {:>12} {:>8}",
            format!("decode tok/s, {t} thread(s)"),
            ours.decode_tps,
            th.map(|x| format!("{:.1}", x.decode_tps))
                .unwrap_or("-".into()),
            ratio(ours.decode_tps, th.map(|x| x.decode_tps))
        );
        println!(
            "{:<28} {:>12.1} {:>12} {:>8}",
            format!("peak RSS MiB, {t} thread(s)"),
            ours.peak_rss_bytes as f64 / 1048576.0,
            th.map(|x| format!("{:.1}", x.peak_rss_bytes as f64 / 1048576.0))
                .unwrap_or("-".into()),
            ""
        );
        singles.push(serde_json::json!({"threads": t, "appliance": ours, "llama_cpp": theirs}));
    }
    report["single"] = serde_json::Value::Array(singles);
    let tmax = a.threads.iter().copied().max().unwrap_or(1);
    let ours: Streams = child_json(
        ours_cmd(tmax, "streams", a.stream_tokens),
        "engine stream benchmark",
    )?;
    let theirs: Option<Streams> = if a.no_llama_cpp {
        None
    } else {
        Some(child_json(
            theirs_cmd(tmax, "streams", a.stream_tokens),
            "llama.cpp stream benchmark",
        )?)
    };
    let single_rate = ours
        .streams
        .iter()
        .find(|p| p.streams == 1)
        .map(|p| p.aggregate_tps);
    for p in &ours.streams {
        let th = theirs
            .as_ref()
            .and_then(|t| t.streams.iter().find(|q| q.streams == p.streams))
            .map(|q| q.aggregate_tps);
        println!(
            "{:<28} {:>12.1} {:>12} {:>8}",
            format!("{} streams tok/s, {tmax} thr", p.streams),
            p.aggregate_tps,
            th.map(|x| format!("{x:.1}")).unwrap_or("-".into()),
            ratio(p.aggregate_tps, th)
        );
    }
    if let Some(s1) = single_rate {
        let scale: Vec<String> = ours
            .streams
            .iter()
            .map(|p| format!("{}:{:.2}x", p.streams, p.aggregate_tps / s1))
            .collect();
        println!("engine scaling vs 1 stream: {}", scale.join(" "));
    }
    println!(
        "{:<28} {:>12.1} {:>12}",
        "peak RSS MiB (streams)",
        ours.peak_rss_bytes as f64 / 1048576.0,
        theirs
            .as_ref()
            .map(|x| format!("{:.1}", x.peak_rss_bytes as f64 / 1048576.0))
            .unwrap_or("-".into())
    );
    report["streams"] =
        serde_json::json!({"threads": tmax, "appliance": ours, "llama_cpp": theirs});
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
