//! The engine actor: one thread owns the model and runs the continuous-batching loop.
//!
//! Callers [`Engine::submit`] a request and get a [`RequestHandle`] whose channel streams
//! [`Event`]s. Between two forward steps the loop admits new requests, drops sequences
//! whose caller went away (their KV cache is freed at once), and builds the next ragged
//! batch: one token for every decoding sequence plus a bounded prefill chunk, so a long
//! prompt never stalls the streams already running.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::Device;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc as tmpsc;

use crate::error::{EngineError, Result};
use crate::gguf::{meta_str, GgufFile};
use crate::model::{BatchItem, KvCache, Model};
use crate::sampling::{Sampler, SamplingParams, REPETITION_WINDOW};
use crate::template::{ChatMessage, ChatTemplate};
use crate::tokenizer::{TokenId, Tokenizer, Utf8Stream};

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (needs the `cuda` feature).
    Cuda(usize),
}

/// Engine settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineConfig {
    pub device: DeviceSpec,
    /// Cap on the context served (defaults to the model's own, at most 32768).
    pub max_context: Option<usize>,
    /// Sequences decoded together at most; more requests wait in a queue.
    pub max_batch: usize,
    /// Largest prefill chunk of one prompt per step.
    pub prefill_chunk: usize,
    /// Tokens per step (decode tokens plus prefill chunks).
    pub step_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            device: DeviceSpec::Cpu,
            max_context: None,
            max_batch: 32,
            prefill_chunk: 256,
            step_tokens: 512,
        }
    }
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Prompt {
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Raw text, tokenized as is (with BOS when the model wants one).
    Text(String),
    /// Token ids, used as is.
    Tokens(Vec<TokenId>),
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub params: SamplingParams,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-generation token or a stop sequence.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
}

/// Events streamed back for one request, in order: tokens, then exactly one of
/// `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One generated token and the text it completes (may be empty while a multi-byte
    /// character or a possible stop sequence is pending).
    Token {
        id: TokenId,
        text: String,
        /// Log-probability of the token under the unmodified distribution.
        logprob: f32,
    },
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

/// The caller's side of a running request. Dropping it cancels the request.
#[derive(Debug)]
pub struct RequestHandle {
    pub prompt_tokens: usize,
    pub events: tmpsc::UnboundedReceiver<Event>,
}

/// Static facts about the loaded model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub architecture: String,
    pub quantization: String,
    pub context: usize,
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_embd: usize,
    pub weight_bytes: usize,
    pub kv_bytes_per_token: usize,
    pub chat_template_from_file: bool,
}

struct Job {
    prompt: Vec<TokenId>,
    params: SamplingParams,
    events: tmpsc::UnboundedSender<Event>,
    seed: u64,
}

enum Command {
    Generate(Job),
}

/// A handle on the engine thread. Cheap to clone; the thread stops when the last handle
/// is dropped and no request is running.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Command>,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    info: Arc<ModelInfo>,
    seed_counter: Arc<AtomicU64>,
    stats: Arc<Stats>,
}

/// Live counters the scheduler publishes after every step.
#[derive(Debug, Default)]
pub struct Stats {
    /// Sequences holding a KV cache (prefilling or decoding).
    pub active: AtomicU64,
    /// Requests waiting for a batch slot.
    pub queued: AtomicU64,
    /// Tokens generated since start.
    pub generated: AtomicU64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("info", &self.info).finish()
    }
}

fn make_device(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(i) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(EngineError::InvalidRequest(
                    "CUDA device requested but this build has no CUDA support (build with --features cuda)".into(),
                ));
            }
            Ok(Device::new_cuda(i)?)
        }
    }
}

impl Engine {
    /// Loads a GGUF model and starts the engine thread.
    pub fn load(path: &Path, config: EngineConfig) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let tokenizer = Tokenizer::from_gguf_metadata(file.metadata())?;
        let tok_text = |id: Option<TokenId>| {
            id.and_then(|i| tokenizer.token_text(i))
                .unwrap_or("")
                .to_string()
        };
        let template = ChatTemplate::new(
            meta_str(file.metadata(), "tokenizer.chat_template"),
            &tok_text(tokenizer.bos),
            &tok_text(tokenizer.eos),
        )?;
        let device = make_device(config.device)?;
        let max_ctx = Some(config.max_context.unwrap_or(32768));
        let model = Model::load(&file, &device, max_ctx)?;
        let info = ModelInfo {
            name: file.config.name.clone().unwrap_or_else(|| {
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            }),
            architecture: file.config.architecture_name.clone(),
            quantization: file.quantization(),
            context: model.context,
            vocab_size: tokenizer.vocab_size(),
            n_layer: file.config.n_layer,
            n_embd: file.config.n_embd,
            weight_bytes: model.weight_bytes,
            kv_bytes_per_token: model.kv_bytes_per_token(),
            chat_template_from_file: !template.is_fallback,
        };
        drop(file);
        let tokenizer = Arc::new(tokenizer);
        let (tx, rx) = mpsc::channel();
        let tk = tokenizer.clone();
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || Scheduler::new(model, tk, config, rx, st).run())
            .map_err(|e| EngineError::InvalidRequest(format!("cannot start engine thread: {e}")))?;
        let seed0 = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Ok(Self {
            tx,
            tokenizer,
            template: Arc::new(template),
            info: Arc::new(info),
            seed_counter: Arc::new(AtomicU64::new(seed0)),
            stats,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Live counters: active and queued sequences, tokens generated.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Turns a prompt into the token ids the model will see.
    pub fn tokenize_prompt(&self, prompt: &Prompt) -> Result<Vec<TokenId>> {
        let ids = match prompt {
            Prompt::Tokens(t) => {
                if let Some(bad) = t.iter().find(|&&t| t as usize >= self.info.vocab_size) {
                    return Err(EngineError::InvalidRequest(format!(
                        "token id {bad} is outside the vocabulary of {}",
                        self.info.vocab_size
                    )));
                }
                t.clone()
            }
            Prompt::Text(s) => self.tokenizer.encode(s, true, false),
            Prompt::Chat(msgs) => {
                if msgs.is_empty() {
                    return Err(EngineError::InvalidRequest(
                        "messages must not be empty".into(),
                    ));
                }
                let text = self.template.render(msgs, true)?;
                let mut ids = self.tokenizer.encode(&text, true, true);
                // A template that writes the BOS text itself must not get a second BOS.
                if self.tokenizer.add_bos
                    && ids.len() >= 2
                    && ids[0] == ids[1]
                    && Some(ids[0]) == self.tokenizer.bos
                {
                    ids.remove(0);
                }
                ids
            }
        };
        if ids.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        Ok(ids)
    }

    /// Queues a request. Errors (bad parameters, prompt too long) come back at once.
    pub fn submit(&self, req: GenerateRequest) -> Result<RequestHandle> {
        req.params.validate(self.info.vocab_size)?;
        let prompt = self.tokenize_prompt(&req.prompt)?;
        let ctx = self.info.context;
        let max = req.params.max_tokens.unwrap_or(0);
        if prompt.len() >= ctx || prompt.len() + max > ctx {
            return Err(EngineError::ContextOverflow {
                prompt: prompt.len(),
                max_tokens: max,
                context: ctx,
            });
        }
        let (etx, erx) = tmpsc::unbounded_channel();
        let prompt_tokens = prompt.len();
        let seed = self.seed_counter.fetch_add(0x9E37_79B9, Ordering::Relaxed);
        self.tx
            .send(Command::Generate(Job {
                prompt,
                params: req.params,
                events: etx,
                seed,
            }))
            .map_err(|_| EngineError::Stopped)?;
        Ok(RequestHandle {
            prompt_tokens,
            events: erx,
        })
    }

    /// Runs a request to completion on the calling thread (blocking) and returns the text,
    /// the generated ids and the finish reason.
    pub fn generate_blocking(&self, req: GenerateRequest) -> Result<Completion> {
        let mut h = self.submit(req)?;
        let mut out = Completion {
            text: String::new(),
            tokens: Vec::new(),
            logprobs: Vec::new(),
            finish_reason: FinishReason::Length,
            prompt_tokens: h.prompt_tokens,
        };
        while let Some(ev) = h.events.blocking_recv() {
            match ev {
                Event::Token { id, text, logprob } => {
                    out.tokens.push(id);
                    out.logprobs.push(logprob);
                    out.text.push_str(&text);
                }
                Event::Done { finish_reason, .. } => {
                    out.finish_reason = finish_reason;
                    return Ok(out);
                }
                Event::Error(e) => return Err(EngineError::InvalidRequest(e)),
            }
        }
        Err(EngineError::Stopped)
    }
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub tokens: Vec<TokenId>,
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
}

struct Seq {
    job: Job,
    cache: KvCache,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// The token to feed next while decoding.
    next_input: Option<TokenId>,
    sampler: Sampler,
    generated: Vec<TokenId>,
    utf8: Utf8Stream,
    /// Decoded text not yet sent because it may be the start of a stop sequence.
    held: String,
    done: bool,
}

impl Seq {
    fn recent(&self) -> Vec<TokenId> {
        let mut all: Vec<TokenId> = Vec::with_capacity(REPETITION_WINDOW);
        let g = self.generated.len();
        if g < REPETITION_WINDOW {
            let p = &self.job.prompt;
            all.extend_from_slice(&p[p.len().saturating_sub(REPETITION_WINDOW - g)..]);
        }
        all.extend_from_slice(&self.generated[g.saturating_sub(REPETITION_WINDOW)..]);
        all
    }

    fn finish(&mut self, reason: FinishReason) {
        if self.done {
            return;
        }
        self.done = true;
        let _ = self.job.events.send(Event::Done {
            finish_reason: reason,
            prompt_tokens: self.job.prompt.len(),
            completion_tokens: self.generated.len(),
        });
    }
}

struct Scheduler {
    model: Model,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
    rx: mpsc::Receiver<Command>,
    waiting: VecDeque<Job>,
    active: Vec<Seq>,
    stats: Arc<Stats>,
}

impl Scheduler {
    fn new(
        model: Model,
        tokenizer: Arc<Tokenizer>,
        config: EngineConfig,
        rx: mpsc::Receiver<Command>,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            stats,
            model,
            tokenizer,
            config,
            rx,
            waiting: VecDeque::new(),
            active: Vec::new(),
        }
    }

    fn run(mut self) {
        let mut disconnected = false;
        loop {
            self.stats
                .active
                .store(self.active.len() as u64, Ordering::Relaxed);
            self.stats
                .queued
                .store(self.waiting.len() as u64, Ordering::Relaxed);
            if self.active.is_empty() && self.waiting.is_empty() {
                if disconnected {
                    return;
                }
                match self.rx.recv() {
                    Ok(Command::Generate(j)) => self.waiting.push_back(j),
                    Err(_) => return,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(Command::Generate(j)) => self.waiting.push_back(j),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            self.admit();
            // Cancelled: the caller dropped its handle. Freed before the next step.
            self.active.retain(|s| !s.job.events.is_closed() && !s.done);
            if self.active.is_empty() {
                continue;
            }
            if let Err(e) = self.step() {
                log::error!("engine step failed: {e}");
                for s in &mut self.active {
                    let _ = s.job.events.send(Event::Error(e.to_string()));
                    s.done = true;
                }
            }
            self.active.retain(|s| !s.done);
        }
    }

    fn admit(&mut self) {
        while self.active.len() < self.config.max_batch.max(1) {
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            if job.events.is_closed() {
                continue;
            }
            let cache = match self.model.new_cache() {
                Ok(c) => c,
                Err(e) => {
                    let _ = job.events.send(Event::Error(e.to_string()));
                    continue;
                }
            };
            let sampler = Sampler::new(job.params.clone(), job.seed);
            self.active.push(Seq {
                job,
                cache,
                prefilled: 0,
                next_input: None,
                sampler,
                generated: Vec::new(),
                utf8: Utf8Stream::new(),
                held: String::new(),
                done: false,
            });
        }
    }

    fn step(&mut self) -> Result<()> {
        let mut budget = self.config.step_tokens.max(1);
        // (index in active, tokens to feed, wants logits, prompt rows)
        let mut plan: Vec<(usize, Vec<TokenId>, bool, bool)> = Vec::new();
        for (i, s) in self.active.iter().enumerate() {
            if let Some(t) = s.next_input {
                plan.push((i, vec![t], true, false));
                budget = budget.saturating_sub(1);
            }
        }
        for (i, s) in self.active.iter().enumerate() {
            if s.next_input.is_some() || budget == 0 {
                continue;
            }
            let left = s.job.prompt.len() - s.prefilled;
            let n = left.min(self.config.prefill_chunk.max(1)).min(budget);
            if n == 0 {
                continue;
            }
            budget -= n;
            let chunk = s.job.prompt[s.prefilled..s.prefilled + n].to_vec();
            plan.push((i, chunk, n == left, s.job.prompt.len() >= 2));
        }
        if plan.is_empty() {
            return Ok(());
        }
        let logits = {
            let mut by_index: Vec<Option<&mut Seq>> = self.active.iter_mut().map(Some).collect();
            let mut items: Vec<BatchItem<'_>> = Vec::with_capacity(plan.len());
            for (i, toks, want, prompt_rows) in &plan {
                let s = by_index[*i].take().expect("each sequence once per step");
                items.push(BatchItem {
                    tokens: toks,
                    cache: &mut s.cache,
                    want_logits: *want,
                    prompt_rows: *prompt_rows,
                });
            }
            self.model.forward(&mut items)?
        };
        for ((i, toks, _, _), logits) in plan.into_iter().zip(logits) {
            let tokenizer = self.tokenizer.clone();
            let context = self.model.context;
            let s = &mut self.active[i];
            if s.next_input.is_none() {
                s.prefilled += toks.len();
            }
            let Some(mut logits) = logits else { continue };
            let recent = s.recent();
            // The chosen token's log-probability under the model's own distribution
            // (before biases and penalties): the row kept aside only when the sampler is
            // about to change it.
            let lse = crate::kernels::log_sum_exp(&logits);
            let raw = s.sampler.changes_logits().then(|| logits.clone());
            let t = s.sampler.sample(&mut logits, &recent);
            let logprob = raw
                .as_deref()
                .unwrap_or(&logits)
                .get(t as usize)
                .map(|l| l - lse)
                .unwrap_or(f32::NEG_INFINITY);
            s.sampler.accept(t);
            s.generated.push(t);
            self.stats.generated.fetch_add(1, Ordering::Relaxed);
            let params = s.sampler.params().clone();
            if !params.ignore_eos && tokenizer.is_eog(t) {
                // The end-of-generation token carries whatever text was still held back.
                let rest = std::mem::take(&mut s.held) + &s.utf8.finish();
                let _ = s.job.events.send(Event::Token {
                    id: t,
                    text: rest,
                    logprob,
                });
                s.finish(FinishReason::Stop);
                continue;
            }
            let piece = s.utf8.push(&tokenizer.token_bytes(t, false));
            s.held.push_str(&piece);
            let (mut emit, stopped) = split_on_stop(&mut s.held, &params.stop);
            let at_limit = params.max_tokens.is_some_and(|m| s.generated.len() >= m)
                || s.cache.len() + 1 >= context;
            if at_limit && !stopped {
                emit.push_str(&std::mem::take(&mut s.held));
                emit.push_str(&s.utf8.finish());
            }
            let _ = s.job.events.send(Event::Token {
                id: t,
                text: emit,
                logprob,
            });
            if stopped {
                s.finish(FinishReason::Stop);
            } else if at_limit {
                s.finish(FinishReason::Length);
            } else {
                s.next_input = Some(t);
            }
        }
        Ok(())
    }
}

/// Given the text held back so far, returns what can be sent now and whether a stop
/// sequence was found (the stop text and anything after it are dropped). Text that could
/// still turn into a stop sequence stays in `held`.
pub fn split_on_stop(held: &mut String, stops: &[String]) -> (String, bool) {
    if stops.is_empty() {
        return (std::mem::take(held), false);
    }
    // Earliest complete stop sequence.
    let first = stops.iter().filter_map(|s| held.find(s.as_str())).min();
    if let Some(pos) = first {
        let out = held[..pos].to_string();
        held.clear();
        return (out, true);
    }
    // Longest suffix of `held` that is a proper prefix of some stop sequence.
    let mut keep = 0;
    for s in stops {
        let max = s.len().min(held.len());
        for k in (1..=max).rev() {
            if held.is_char_boundary(held.len() - k) && s.starts_with(&held[held.len() - k..]) {
                keep = keep.max(k);
                break;
            }
        }
    }
    let cut = held.len() - keep;
    let out = held[..cut].to_string();
    held.drain(..cut);
    (out, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_spanning_pieces() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        let mut held = String::new();
        let mut sent = String::new();
        let mut stopped = false;
        for piece in ["Hello E", "N", "D and more"] {
            held.push_str(piece);
            let (out, s) = split_on_stop(&mut held, &stops);
            sent.push_str(&out);
            if s {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        assert_eq!(sent, "Hello ");
    }

    #[test]
    fn false_start_of_a_stop_is_released() {
        let stops = vec!["END".to_string()];
        let mut held = String::new();
        held.push_str("EN");
        let (out, s) = split_on_stop(&mut held, &stops);
        assert_eq!((out.as_str(), s), ("", false));
        held.push('X');
        let (out, s) = split_on_stop(&mut held, &stops);
        assert_eq!((out.as_str(), s), ("ENX", false));
    }
}
