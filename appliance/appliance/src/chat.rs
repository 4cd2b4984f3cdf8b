//! `appliance chat`: a person talks to a local model in the terminal.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use appliance_engine::{
    ChatMessage, Engine, EngineConfig, Event, GenerateRequest, Prompt, SamplingParams,
};

#[derive(clap::Args)]
pub struct ChatArgs {
    /// The GGUF model file.
    #[arg(long)]
    pub model: PathBuf,
    /// Ask one question, print only the answer and exit.
    #[arg(long)]
    pub prompt: Option<String>,
    /// A system message to start the conversation with.
    #[arg(long)]
    pub system: Option<String>,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.1)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

fn params(a: &ChatArgs, room: usize) -> SamplingParams {
    SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
        max_tokens: Some(a.max_tokens.min(room.max(1))),
        ..Default::default()
    }
}

/// Streams one answer to `out`, returning its text.
fn answer(
    engine: &Engine,
    msgs: &[ChatMessage],
    a: &ChatArgs,
    out: &mut dyn Write,
) -> Result<String> {
    let prompt = Prompt::Chat(msgs.to_vec());
    let n = engine.tokenize_prompt(&prompt)?.len();
    let room = engine.info().context.saturating_sub(n);
    if room == 0 {
        anyhow::bail!(
            "the conversation no longer fits the model's context of {} tokens",
            engine.info().context
        );
    }
    let mut h = engine.submit(GenerateRequest {
        prompt,
        params: params(a, room),
    })?;
    let mut text = String::new();
    while let Some(ev) = h.events.blocking_recv() {
        match ev {
            Event::Token { text: t, .. } => {
                out.write_all(t.as_bytes())?;
                out.flush()?;
                text.push_str(&t);
            }
            Event::Done { .. } => break,
            Event::Error(e) => anyhow::bail!(e),
        }
    }
    Ok(text)
}

pub fn run(a: ChatArgs) -> Result<()> {
    crate::set_threads(a.threads);
    let engine = Engine::load(&a.model, EngineConfig::default())
        .with_context(|| format!("loading {}", a.model.display()))?;
    let mut msgs = Vec::new();
    if let Some(s) = &a.system {
        msgs.push(ChatMessage::new("system", s.clone()));
    }
    let stdout = std::io::stdout();
    if let Some(p) = &a.prompt {
        msgs.push(ChatMessage::new("user", p.clone()));
        let mut out = stdout.lock();
        let text = answer(&engine, &msgs, &a, &mut out)?;
        if !text.ends_with('\n') {
            writeln!(out)?;
        }
        return Ok(());
    }
    let info = engine.info();
    eprintln!(
        "{} ({}, {}, context {}). Type a message; an empty line or Ctrl-D quits, /reset starts over.",
        info.name, info.architecture, info.quantization, info.context
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let Some(line) = lines.next() else { break };
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            break;
        }
        if line == "/reset" {
            msgs.retain(|m: &ChatMessage| m.role == "system");
            continue;
        }
        msgs.push(ChatMessage::new("user", line));
        let mut out = stdout.lock();
        match answer(&engine, &msgs, &a, &mut out) {
            Ok(text) => {
                writeln!(out)?;
                msgs.push(ChatMessage::new("assistant", text.trim().to_string()));
            }
            Err(e) => {
                msgs.pop();
                eprintln!("error: {e:#}");
            }
        }
    }
    Ok(())
}
