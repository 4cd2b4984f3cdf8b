//! `POST /v1/chat/completions` and `POST /v1/completions`: parse, validate into a
//! [`Generation`], admit (key, model, limits, queue), run on the model's worker, answer
//! whole or as server-sent events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance_api::openai::{
    AssistantMessage, ChatChoice, ChatChunk, ChatCompletion, ChatCompletionRequest, ChunkChoice,
    Completion, CompletionChoice, CompletionRequest, Delta, MessageContent, PromptSpec, StopSpec,
    Usage,
};
use appliance_api::worker::{
    ErrorCode, Op, Response as WorkerResponse, WireFinish, WireMessage, WireParams, WirePrompt,
};
use appliance_supervisor::client::{ClientError, WorkerConn};
use bytes::Bytes;
use http::{Request, StatusCode};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

use appliance_audit::Ticket;

use crate::auth::KeyEntry;
use crate::error::ApiError;
use crate::limits::Permit;
use crate::server::{
    error_response, json_response, sse_response, unix_now, Gateway, GatewayConfig, InFlight,
    PolicyNote, Reply, ReqCtx, Slot,
};

/// Parses a JSON body, naming the offending field on a type error.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Every body is an object: serde would also take a struct's fields as an array
    // (`["model", [...]]`), which no OpenAI client sends and OpenAI refuses.
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') | None => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "The request body must be a JSON object".to_string(),
                None,
            ))
        }
    }
    // The plain parse first (tracking the path costs as much again); the tracking one
    // only for the error message of a body that fails.
    if let Ok(v) = serde_json::from_slice(body) {
        return Ok(v);
    }
    let fail = |inner: serde_json::Error, path: String| {
        let at = |field: &str| match path.as_str() {
            "" | "." => field.to_string(),
            p => format!("{p}.{field}"),
        };
        let text = inner.to_string();
        if let Some(field) = text
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            let param = at(field);
            return ApiError::invalid(format!("'{param}' is required"), Some(&param));
        }
        if text.starts_with("data did not match any variant of untagged enum") {
            let what = if path.ends_with("content") {
                "a string or an array of content parts"
            } else if path == "stop" {
                "a string or an array of strings"
            } else {
                "one of the accepted forms (docs/API.md)"
            };
            return ApiError::invalid(format!("'{path}' must be {what}"), Some(&path));
        }
        if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid(format!("The request body is not valid JSON: {inner}"), None)
        } else if path == "." || path.is_empty() {
            ApiError::invalid(format!("Invalid request: {inner}"), None)
        } else {
            ApiError::invalid(format!("Invalid value for '{path}': {inner}"), Some(&path))
        }
    };
    let de = &mut serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, T>(&mut *de) {
        // Then what follows the value is why the plain parse refused it.
        Ok(v) => de.end().map(|()| v).map_err(|e| fail(e, String::new())),
        Err(e) => {
            let path = e.path().to_string();
            Err(fail(e.into_inner(), path))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Text,
}

/// A validated generation request.
#[derive(Debug, Clone)]
pub(crate) struct Generation {
    pub kind: Kind,
    pub model: String,
    pub prompt: WirePrompt,
    pub params: WireParams,
    pub stream: bool,
    pub include_usage: bool,
    /// Tokens after which the gateway ends the generation itself (finish "length") when
    /// the client set no `max_tokens`.
    pub soft_cap: Option<usize>,
}

fn check_range(v: Option<f32>, lo: f32, hi: f32, name: &str) -> Result<(), ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) || x.is_nan() => Err(ApiError::invalid(
            format!("'{name}' must be between {lo} and {hi}, got {x}"),
            Some(name),
        )),
        _ => Ok(()),
    }
}

struct Common<'a> {
    temperature: Option<f32>,
    top_p: Option<f32>,
    n: Option<i64>,
    stop: Option<StopSpec>,
    max_tokens: Option<(i64, &'a str)>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    seed: Option<i64>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    ignore_eos: Option<bool>,
    default_max_tokens: Option<usize>,
}

/// Sampling parameters shared by both endpoints; returns the params and the soft cap.
fn params(c: Common<'_>, cfg: &GatewayConfig) -> Result<(WireParams, Option<usize>), ApiError> {
    check_range(c.temperature, 0.0, 2.0, "temperature")?;
    check_range(c.top_p, 0.0, 1.0, "top_p")?;
    if c.top_p == Some(0.0) {
        return Err(ApiError::invalid(
            "'top_p' must be greater than 0",
            Some("top_p"),
        ));
    }
    check_range(c.presence_penalty, -2.0, 2.0, "presence_penalty")?;
    check_range(c.frequency_penalty, -2.0, 2.0, "frequency_penalty")?;
    check_range(c.min_p, 0.0, 1.0, "min_p")?;
    check_range(c.repetition_penalty, 0.01, 10.0, "repetition_penalty")?;
    if let Some(n) = c.n {
        if n != 1 {
            return Err(ApiError::invalid(
                format!("'n' must be 1: this appliance returns one choice per request (got {n}); send several requests instead"),
                Some("n"),
            ));
        }
    }
    let top_k = match c.top_k {
        Some(k) if !(0..=100_000).contains(&k) => {
            return Err(ApiError::invalid(
                "'top_k' must be between 0 and 100000",
                Some("top_k"),
            ))
        }
        Some(k) => k as usize,
        None => 0,
    };
    let (max_tokens, soft_cap) = match c.max_tokens {
        Some((m, name)) => {
            if m < 1 || m as u64 > cfg.max_tokens_cap as u64 {
                return Err(ApiError::invalid(
                    format!(
                        "'{name}' must be between 1 and {} on this appliance, got {m}",
                        cfg.max_tokens_cap
                    ),
                    Some(name),
                ));
            }
            (Some(m as usize), None)
        }
        None => match c.default_max_tokens {
            Some(d) => (Some(d.min(cfg.max_tokens_cap)), None),
            None => (None, Some(cfg.max_tokens_cap)),
        },
    };
    let stop = match c.stop {
        None => vec![],
        Some(StopSpec::One(s)) => vec![s],
        Some(StopSpec::Many(v)) => v,
    };
    if stop.len() > 4 {
        return Err(ApiError::invalid(
            "'stop' may hold at most 4 sequences",
            Some("stop"),
        ));
    }
    if stop.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::invalid(
            "each 'stop' sequence must be 1 to 256 bytes long",
            Some("stop"),
        ));
    }
    let mut logit_bias = Vec::new();
    if let Some(bias) = c.logit_bias {
        if bias.len() > 1024 {
            return Err(ApiError::invalid(
                "'logit_bias' may hold at most 1024 entries",
                Some("logit_bias"),
            ));
        }
        for (k, v) in bias {
            let id: u32 = k.parse().map_err(|_| {
                ApiError::invalid(
                    format!("'logit_bias' keys must be token ids, got {k:?}"),
                    Some("logit_bias"),
                )
            })?;
            if !(-100.0..=100.0).contains(&v) {
                return Err(ApiError::invalid(
                    "'logit_bias' values must be between -100 and 100",
                    Some("logit_bias"),
                ));
            }
            logit_bias.push((id, v));
        }
    }
    Ok((
        WireParams {
            // OpenAI's default temperature is 1.
            temperature: c.temperature.unwrap_or(1.0),
            top_p: c.top_p.unwrap_or(1.0),
            top_k,
            min_p: c.min_p.unwrap_or(0.0),
            frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
            presence_penalty: c.presence_penalty.unwrap_or(0.0),
            repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
            seed: c.seed.map(|s| s as u64),
            max_tokens,
            stop,
            logit_bias,
            ignore_eos: c.ignore_eos.unwrap_or(false),
        },
        soft_cap,
    ))
}

/// `stream_options` is only for a stream (as OpenAI has it).
fn options_need_stream(stream: Option<bool>, options: bool) -> Result<(), ApiError> {
    if options && stream != Some(true) {
        return Err(ApiError::invalid(
            "'stream_options' is only allowed with 'stream': true",
            Some("stream_options"),
        ));
    }
    Ok(())
}

/// A field that asks for something (not absent, null, an empty list or "none").
fn asks_for(v: &Option<serde_json::Value>) -> bool {
    v.as_ref().is_some_and(|v| {
        !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()) && v.as_str() != Some("none")
    })
}

pub(crate) fn validate_chat(
    r: ChatCompletionRequest,
    cfg: &GatewayConfig,
) -> Result<Generation, ApiError> {
    if r.messages.is_empty() {
        return Err(ApiError::invalid(
            "'messages' must not be empty",
            Some("messages"),
        ));
    }
    if r.messages.len() > cfg.max_messages {
        return Err(ApiError::invalid(
            format!("'messages' may hold at most {} messages", cfg.max_messages),
            Some("messages"),
        ));
    }
    if asks_for(&r.tools) {
        return Err(ApiError::invalid(
            "tool calling is not supported by this appliance's models",
            Some("tools"),
        ));
    }
    if let Some(param) = [
        ("functions", &r.functions),
        ("function_call", &r.function_call),
    ]
    .into_iter()
    .find_map(|(name, v)| asks_for(v).then_some(name))
    {
        return Err(ApiError::invalid(
            "function calling is not supported by this appliance's models",
            Some(param),
        ));
    }
    // Without tools only "none" and "auto" mean anything (no call is made either way).
    if r.tool_choice
        .as_ref()
        .is_some_and(|c| !c.is_null() && !matches!(c.as_str(), Some("none") | Some("auto")))
    {
        return Err(ApiError::invalid(
            "'tool_choice' asks for a tool call, and tool calling is not supported by this appliance's models",
            Some("tool_choice"),
        ));
    }
    let audio = r.audio.as_ref().is_some_and(|a| !a.is_null());
    let other_output = r.modalities.iter().flatten().any(|k| k != "text");
    if audio || other_output {
        let param = if audio { "audio" } else { "modalities" };
        return Err(ApiError::invalid(
            "only text output is supported ('modalities': [\"text\"])",
            Some(param),
        ));
    }
    options_need_stream(r.stream, r.stream_options.is_some())?;
    if let Some(f) = &r.response_format {
        if f.kind != "text" {
            return Err(ApiError::invalid(
                format!("response_format '{}' is not supported; only 'text'", f.kind),
                Some("response_format"),
            ));
        }
    }
    if r.logprobs == Some(true) || r.top_logprobs.is_some_and(|n| n > 0) {
        return Err(ApiError::invalid(
            "logprobs are not supported",
            Some("logprobs"),
        ));
    }
    let mut messages = Vec::with_capacity(r.messages.len());
    for (i, m) in r.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::invalid(
                    format!("messages[{i}]: role '{other}' is not supported (system, developer, user, assistant)"),
                    Some(&format!("messages[{i}].role")),
                ))
            }
        };
        let content = match m.content {
            // Only an assistant turn may go without content (as OpenAI's API has it).
            None if role == "assistant" => String::new(),
            None => {
                return Err(ApiError::invalid(
                    format!(
                        "messages[{i}]: a {} message needs content (a string or text parts)",
                        m.role
                    ),
                    Some(&format!("messages[{i}].content")),
                ))
            }
            Some(MessageContent::Text(t)) => t,
            Some(MessageContent::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => s.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                format!("messages[{i}]: content part '{kind}' is not supported; only text parts"),
                                Some(&format!("messages[{i}].content")),
                            ))
                        }
                    }
                }
                s
            }
        };
        messages.push(WireMessage {
            role: role.to_string(),
            content,
        });
    }
    let max = match (r.max_completion_tokens, r.max_tokens) {
        (Some(m), _) => Some((m, "max_completion_tokens")),
        (None, Some(m)) => Some((m, "max_tokens")),
        (None, None) => None,
    };
    let (params, soft_cap) = params(
        Common {
            temperature: r.temperature,
            top_p: r.top_p,
            n: r.n,
            stop: r.stop,
            max_tokens: max,
            presence_penalty: r.presence_penalty,
            frequency_penalty: r.frequency_penalty,
            logit_bias: r.logit_bias,
            seed: r.seed,
            top_k: r.top_k,
            min_p: r.min_p,
            repetition_penalty: r.repetition_penalty,
            ignore_eos: r.ignore_eos,
            default_max_tokens: None,
        },
        cfg,
    )?;
    let stream = r.stream.unwrap_or(false);
    Ok(Generation {
        kind: Kind::Chat,
        model: r.model,
        prompt: WirePrompt::Chat(messages),
        params,
        stream,
        include_usage: stream
            && r.stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        soft_cap,
    })
}

pub(crate) fn validate_completion(
    r: CompletionRequest,
    cfg: &GatewayConfig,
) -> Result<Generation, ApiError> {
    let batch = || {
        ApiError::invalid(
            "batched prompts are not supported; send one prompt per request",
            Some("prompt"),
        )
    };
    let empty = match &r.prompt {
        PromptSpec::Texts(v) => v.is_empty(),
        PromptSpec::Tokens(v) => v.is_empty(),
        PromptSpec::TokenLists(v) => v.is_empty() || v.iter().all(|t| t.is_empty()),
        PromptSpec::Text(_) => false,
    };
    if empty {
        return Err(ApiError::invalid(
            "prompt is an empty list: give a string, a list of one string or token ids",
            Some("prompt"),
        ));
    }
    let prompt = match r.prompt {
        PromptSpec::Text(t) => WirePrompt::Text(t),
        PromptSpec::Texts(mut v) if v.len() == 1 => WirePrompt::Text(v.remove(0)),
        PromptSpec::Tokens(t) => WirePrompt::Tokens(t),
        PromptSpec::TokenLists(mut v) if v.len() == 1 => WirePrompt::Tokens(v.remove(0)),
        _ => return Err(batch()),
    };
    if matches!(&prompt, WirePrompt::Text(t) if t.is_empty())
        || matches!(&prompt, WirePrompt::Tokens(t) if t.is_empty())
    {
        return Err(ApiError::invalid(
            "'prompt' must not be empty",
            Some("prompt"),
        ));
    }
    if r.echo == Some(true) {
        return Err(ApiError::invalid("'echo' is not supported", Some("echo")));
    }
    if r.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            "'suffix' is not supported",
            Some("suffix"),
        ));
    }
    if r.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::invalid("'best_of' must be 1", Some("best_of")));
    }
    if r.logprobs.is_some() {
        return Err(ApiError::invalid(
            "logprobs are not supported",
            Some("logprobs"),
        ));
    }
    options_need_stream(r.stream, r.stream_options.is_some())?;
    let (params, soft_cap) = params(
        Common {
            temperature: r.temperature,
            top_p: r.top_p,
            n: r.n,
            stop: r.stop,
            max_tokens: r.max_tokens.map(|m| (m, "max_tokens")),
            presence_penalty: r.presence_penalty,
            frequency_penalty: r.frequency_penalty,
            logit_bias: r.logit_bias,
            seed: r.seed,
            top_k: r.top_k,
            min_p: r.min_p,
            repetition_penalty: r.repetition_penalty,
            ignore_eos: r.ignore_eos,
            // OpenAI's completions endpoint defaults to 16 tokens.
            default_max_tokens: Some(16),
        },
        cfg,
    )?;
    let stream = r.stream.unwrap_or(false);
    Ok(Generation {
        kind: Kind::Text,
        model: r.model,
        prompt,
        params,
        stream,
        include_usage: stream
            && r.stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        soft_cap,
    })
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat(
    gw: &Arc<Gateway>,
    req: Request<Incoming>,
    ctx: &mut ReqCtx,
) -> Result<Reply, ApiError> {
    generate(
        gw,
        req,
        ctx,
        |r: ChatCompletionRequest| (r.model.clone(), r),
        validate_chat,
    )
    .await
}

/// `POST /v1/completions`.
pub(crate) async fn completions(
    gw: &Arc<Gateway>,
    req: Request<Incoming>,
    ctx: &mut ReqCtx,
) -> Result<Reply, ApiError> {
    generate(
        gw,
        req,
        ctx,
        |r: CompletionRequest| (r.model.clone(), r),
        validate_completion,
    )
    .await
}

/// A client-given name made safe for a log line: letters, digits and `._:/-`, at most
/// 64 characters.
pub(crate) fn loggable(name: &str) -> String {
    let clean: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._:/-".contains(*c))
        .take(64)
        .collect();
    if clean.is_empty() {
        "?".into()
    } else {
        clean
    }
}

/// The stages common to both endpoints: drain check and key (on the headers alone; the
/// body is then read and dropped), body, parse, validate, run.
async fn generate<T: DeserializeOwned>(
    gw: &Arc<Gateway>,
    req: Request<Incoming>,
    ctx: &mut ReqCtx,
    model_of: impl FnOnce(T) -> (String, T),
    validate: impl FnOnce(T, &GatewayConfig) -> Result<Generation, ApiError>,
) -> Result<Reply, ApiError> {
    let (parts, body) = req.into_parts();
    let admitted = if gw.is_draining() {
        Err(ApiError::Draining)
    } else {
        gw.authenticate(&parts.headers, ctx)
    };
    let admitted = admitted.and_then(|k| {
        if k.admin {
            Err(ApiError::WrongScope(
                "Admin keys are for the admin API; use an inference key.",
            ))
        } else {
            Ok(k)
        }
    });
    let key = match admitted {
        Ok(k) => k,
        Err(e) => {
            let _ = gw.read_body(ctx, &parts.headers, body, false).await;
            return Err(e);
        }
    };
    let body = gw.read_body(ctx, &parts.headers, body, true).await?;
    let (model, r) = model_of(parse_json(&body)?);
    ctx.model = Some(loggable(&model));
    let mut g = validate(r, &gw.cfg)?;
    match apply_policy(gw, &key, &g, ctx)? {
        Route::Local(m) => g.model = m,
        Route::Upstream(plan) => {
            return crate::proxy::run_upstream(gw, key, g, ctx, plan).await;
        }
    }
    ctx.model = Some(loggable(&g.model));
    run(gw, key, g, ctx, None).await
}

fn worker_error(code: ErrorCode, message: String, kind: Kind) -> ApiError {
    match code {
        ErrorCode::ContextOverflow => ApiError::Invalid {
            message,
            param: Some(match kind {
                Kind::Chat => "messages".into(),
                Kind::Text => "prompt".into(),
            }),
            code: Some("context_length_exceeded"),
        },
        ErrorCode::InvalidRequest => ApiError::invalid(message, None),
        ErrorCode::BadRequest | ErrorCode::UnsupportedVersion | ErrorCode::Internal => {
            ApiError::Worker(message)
        }
    }
}

fn client_error(e: ClientError) -> ApiError {
    ApiError::Worker(e.to_string())
}

fn finish_str(f: WireFinish) -> &'static str {
    match f {
        WireFinish::Stop => "stop",
        WireFinish::Length => "length",
    }
}

/// Admits and runs a validated generation.
/// The texts of a prompt the policy classifies: each message's content, or the prompt.
/// Token ids carry no text to classify (and stay on the appliance).
pub fn parts_of(p: &WirePrompt) -> Vec<&str> {
    match p {
        WirePrompt::Chat(m) => m.iter().map(|m| m.content.as_str()).collect(),
        WirePrompt::Text(t) => vec![t.as_str()],
        WirePrompt::Tokens(_) => vec![],
    }
}

/// The model and the policy's parts of a chat or completions request body, as the
/// gateway sees them (for `appliance policy explain` and content HMACs).
pub fn request_parts(body: &[u8], cfg: &GatewayConfig) -> Result<(String, Vec<String>), String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let g = if v.get("messages").is_some() {
        validate_chat(parse_json(body).map_err(|e| e.body().error.message)?, cfg)
    } else {
        validate_completion(parse_json(body).map_err(|e| e.body().error.message)?, cfg)
    }
    .map_err(|e| e.body().error.message)?;
    let parts = parts_of(&g.prompt)
        .into_iter()
        .map(str::to_string)
        .collect();
    Ok((g.model, parts))
}

/// What `policy` would do with a request body from `tenant`, sending nothing: the
/// detections (class, detector, message index, byte span), the rule, the action, the
/// allowed destinations, the upstreams it would try in order (with their health when
/// `live`, the running gateway, is given), the local model, and the redactions.
/// Without `live`, a requested name counts as a local model when a local destination
/// of the policy names it.
pub fn explain(
    policy: &appliance_policy::Policy,
    tenant: &str,
    body: &[u8],
    cfg: &GatewayConfig,
    live: Option<&Gateway>,
    served: Option<&[String]>,
) -> Result<serde_json::Value, String> {
    let (model, parts) = request_parts(body, cfg)?;
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let found = policy.classify(&refs);
    let d = policy.decide(tenant, &found);
    // Whether a local model of that name runs here: the live daemon knows; otherwise the
    // models the caller says are served, else any the policy names as local.
    let is_served = |m: &str| match (live, served) {
        (Some(gw), _) => gw.model(m).is_some(),
        (None, Some(names)) => names.iter().any(|n| n == m),
        (None, None) => policy
            .destinations
            .values()
            .any(|x| x.kind == appliance_policy::Kind::Local && x.model.as_deref() == Some(m)),
    };
    let named_local = is_served(&model);
    let upstream = upstream_chain(policy, &d, &model, named_local, refs.is_empty());
    let route = policy.route_local(&d, &model);
    let missing = route.clone().filter(|m| !is_served(m));
    let route = route.filter(|m| is_served(m));
    let detections: Vec<serde_json::Value> = found
        .iter()
        .map(|f| {
            serde_json::json!({
                "class": f.class, "detector": f.detector, "part": f.part,
                "start": f.start, "end": f.end,
            })
        })
        .collect();
    let mut tried = vec![];
    let mut chosen = None;
    if let Some((chain, _)) = &upstream {
        let mut chain = chain.clone();
        if let Some(gw) = live {
            gw.upstreams.rank(&mut chain);
        }
        for (dest, tier) in &chain {
            let health = live.map(|gw| gw.upstreams.health(dest));
            let open = health.as_ref().is_some_and(|h| h.circuit == "open");
            if chosen.is_none() && !open {
                chosen = Some(dest.name.clone());
            }
            tried.push(serde_json::json!({
                "destination": dest.name,
                "kind": match dest.kind {
                    appliance_policy::Kind::OnPrem => "on_prem",
                    _ => "external",
                },
                "model": dest.model,
                "jurisdiction": dest.jurisdiction,
                "provider": dest.provider,
                "tier": tier,
                "price_in_per_1k": dest.price_in_per_1k,
                "price_out_per_1k": dest.price_out_per_1k,
                "health": health,
            }));
        }
    }
    let redactions: Vec<serde_json::Value> = if d.action == appliance_policy::Action::Redact {
        let (_, r) = appliance_policy::redact::redact(&refs, &found);
        r.placeholders()
            .into_iter()
            .map(|p| serde_json::Value::from(p.to_string()))
            .collect()
    } else {
        vec![]
    };
    let fallback = upstream.as_ref().and_then(|(_, f)| f.clone());
    let outcome = match (&d.action, &chosen, &upstream, &route) {
        (appliance_policy::Action::Deny, ..) => "refused: 403 policy_denied".to_string(),
        (_, Some(c), _, _) => format!(
            "sent to the upstream {c} (first allowed in the rule's order{}){}",
            if live.is_some() {
                ", its circuit closed, ranked by load, latency and price among equals"
            } else {
                ""
            },
            match &fallback {
                Some(f) => format!("; if every upstream fails, the local model {f}"),
                None => String::new(),
            }
        ),
        (_, None, Some(_), _) => match &fallback {
            Some(f) => {
                format!("every allowed upstream's circuit is open: served by the local model {f}")
            }
            None => {
                "refused: 503 no_allowed_destination (every allowed upstream's circuit is open)"
                    .into()
            }
        },
        (_, None, None, Some(m)) => format!("served by the local model {m}"),
        // As the daemon decides (`route`): an alias, a model that runs here or one the
        // policy names is refused by the policy; any other is unknown.
        (_, None, None, None) => match missing {
            Some(m) => format!("refused: 404 model_not_found (no local model {m} is served here)"),
            None if policy.aliases.contains_key(&model) => {
                "refused: 503 no_allowed_destination (none this request may go to is available)"
                    .to_string()
            }
            None if named_local
                || policy
                    .destinations
                    .values()
                    .any(|x| x.model.as_deref() == Some(model.as_str())) =>
            {
                "refused: 403 policy_denied (the rule does not allow this model)".to_string()
            }
            None => format!("refused: 404 model_not_found (no model {model} is served here)"),
        },
    };
    Ok(serde_json::json!({
        "policy": policy.name,
        "policy_version": d.version,
        "tenant": tenant,
        "requested_model": model,
        "detections": detections,
        "classes": d.classes,
        "rule": d.rule,
        "action": d.action.as_str(),
        "allowed_destinations": if d.local_only { vec!["(any local model)".to_string()] } else { d.destinations.clone() },
        "upstreams": tried,
        "chosen": chosen.or_else(|| if upstream.is_some() { fallback.clone() } else { route.clone() }),
        "local_model": if upstream.is_some() { fallback } else { route },
        "redactions": redactions,
        "outcome": outcome,
    }))
}

/// The content evidence of a request under an HMAC policy: HMAC-SHA-256 over its parts
/// joined by newlines, as `hmac-sha256:<hex>`.
pub fn content_hmac(key: &ring::hmac::Key, parts: &[&str]) -> String {
    let tag = ring::hmac::sign(key, parts.join("\n").as_bytes());
    format!("hmac-sha256:{}", crate::keys::hex(tag.as_ref()))
}

/// The upstream destinations (with their tiers) a decision sends a request for `model`
/// to, and the local model to fall back to: when the client named an alias or an
/// upstream's model (not one of the appliance's own) and the rule prefers upstreams
/// before any local destination. Token-id prompts carry no text the policy could
/// classify: they stay on the appliance.
#[allow(clippy::type_complexity)]
fn upstream_chain(
    policy: &appliance_policy::Policy,
    decision: &appliance_policy::Decision,
    model: &str,
    named_local: bool,
    tokens: bool,
) -> Option<(Vec<(appliance_policy::Destination, usize)>, Option<String>)> {
    if decision.local_only
        || named_local
        || tokens
        || decision.action == appliance_policy::Action::Deny
    {
        return None;
    }
    let dests: Vec<(&appliance_policy::Destination, usize)> = decision
        .destinations
        .iter()
        .zip(&decision.tiers)
        .filter_map(|(n, t)| policy.destinations.get(n).map(|d| (d, *t)))
        .collect();
    let via_alias = policy.aliases.contains_key(model);
    let chain: Vec<(appliance_policy::Destination, usize)> = dests
        .iter()
        .take_while(|(d, _)| d.kind != appliance_policy::Kind::Local)
        .filter(|(d, _)| via_alias || d.model.as_deref() == Some(model))
        .map(|(d, t)| ((*d).clone(), *t))
        .collect();
    if chain.is_empty() {
        return None;
    }
    let fallback = dests
        .iter()
        .find(|(d, _)| d.kind == appliance_policy::Kind::Local)
        .and_then(|(d, _)| d.model.clone());
    Some((chain, fallback))
}

/// Where the policy sends a request.
pub(crate) enum Route {
    /// One of the appliance's own models.
    Local(String),
    /// Upstream destinations in order of preference, then a local model to fall back to
    /// if they all fail before answering.
    Upstream(crate::proxy::Plan),
}

fn apply_policy(
    gw: &Gateway,
    key: &KeyEntry,
    g: &Generation,
    ctx: &mut ReqCtx,
) -> Result<Route, ApiError> {
    let state = gw.policy();
    let policy = &state.policy;
    let parts = parts_of(&g.prompt);
    let started = Instant::now();
    let found = policy.classify(&parts);
    // Fail closed: classification past its budget counts as failed, and such a request
    // may only stay on the appliance.
    let over_budget = started.elapsed() > Duration::from_millis(policy.classify_budget_ms);
    let decision = policy.decide(&key.tenant, &found);
    ctx.policy = Some(PolicyNote {
        decision: if over_budget {
            format!(
                "{}: {} (classification over its budget: local only)",
                decision.action.as_str(),
                decision.rule
            )
        } else {
            format!("{}: {}", decision.action.as_str(), decision.rule)
        },
        classes: decision.classes.clone(),
        version: decision.version.clone(),
        content: state.content.of(&ctx.id, &parts).map_err(|e| {
            log::error!("audit content could not be sealed: {e}");
            ApiError::AuditUnavailable
        })?,
    });
    let classes = if decision.classes.is_empty() {
        "no sensitive data".to_string()
    } else {
        decision.classes.join(", ")
    };
    if decision.action == appliance_policy::Action::Deny {
        return Err(ApiError::PolicyDenied(format!(
            "The policy does not allow this request ({classes}; rule \"{}\").",
            decision.rule
        )));
    }
    if over_budget {
        log::warn!(
            "{}: classification took longer than {} ms: local destinations only",
            ctx.id,
            policy.classify_budget_ms
        );
        let local = if decision.local_only {
            Some(g.model.clone())
        } else {
            decision
                .destinations
                .iter()
                .filter_map(|n| policy.destinations.get(n))
                .find(|d| d.kind == appliance_policy::Kind::Local)
                .and_then(|d| d.model.clone())
        };
        return match local {
            Some(m) => Ok(Route::Local(m)),
            None => Err(ApiError::PolicyDenied(format!(
                "The request could not be classified within its time budget, so it may only stay on this appliance, and rule \"{}\" allows no local model.",
                decision.rule
            ))),
        };
    }
    // A client naming an alias or an upstream's model goes where the rule prefers, when
    // that is an upstream. Token-id prompts carry no text the policy could classify:
    // they stay on the appliance.
    let named_local = gw.model(&g.model).is_some();
    let tokens = matches!(g.prompt, WirePrompt::Tokens(_));
    if let Some((chain, fallback)) =
        upstream_chain(policy, &decision, &g.model, named_local, tokens)
    {
        return Ok(Route::Upstream(crate::proxy::Plan {
            chain,
            fallback,
            redact: decision.action == appliance_policy::Action::Redact,
            found,
        }));
    }
    if let Some(m) = policy.route_local(&decision, &g.model) {
        return Ok(Route::Local(m));
    }
    let allowed = decision.destinations.join(", ");
    if policy.aliases.contains_key(&g.model) {
        return Err(ApiError::NoDestination(format!(
            "No destination this request may go to is available ({classes}; rule \"{}\" allows: {allowed}).",
            decision.rule
        )));
    }
    if gw.model(&g.model).is_some() {
        return Err(ApiError::PolicyDenied(format!(
            "The policy does not allow this request on the model '{}' ({classes}; rule \"{}\" allows: {allowed}).",
            g.model, decision.rule
        )));
    }
    if policy
        .destinations
        .values()
        .any(|d| d.model.as_deref() == Some(g.model.as_str()))
    {
        return Err(ApiError::PolicyDenied(format!(
            "The policy does not allow this request on the model '{}' ({classes}; rule \"{}\" allows: {allowed}).",
            g.model, decision.rule
        )));
    }
    Err(ApiError::ModelNotFound(g.model.clone()))
}

/// The admission checks of a local generation: model, key, readiness, queue, limits.
fn admit_local(
    gw: &Arc<Gateway>,
    key: &KeyEntry,
    g: &Generation,
) -> Result<(Arc<crate::server::ModelRoute>, Slot, Permit), ApiError> {
    let route = gw
        .model(&g.model)
        .ok_or_else(|| ApiError::ModelNotFound(g.model.clone()))?;
    if !key.may_use(&g.model) {
        return Err(ApiError::ModelNotAllowed(g.model.clone()));
    }
    if !route.is_ready() {
        if route.gave_up() {
            return Err(ApiError::ModelFailed(g.model.clone()));
        }
        return Err(ApiError::NotReady(g.model.clone()));
    }
    let slot = route
        .try_slot(gw.cfg.queue_per_model, &[])
        .ok_or_else(|| ApiError::Overloaded {
            model: g.model.clone(),
            retry_after: Duration::from_secs(2),
        })?;
    // Limits last: a request refused for another reason costs the key nothing.
    let (permit, _rate) = key
        .limiter
        .admit(&key.limits, Instant::now())
        .map_err(|(d, info)| ApiError::RateLimited(d, info))?;
    Ok((route, slot, permit))
}

/// Runs a generation on a local model. `ticket`: the intent already recorded when the
/// request comes back from upstreams that all failed.
pub(crate) async fn run(
    gw: &Arc<Gateway>,
    key: Arc<KeyEntry>,
    g: Generation,
    ctx: &mut ReqCtx,
    ticket: Option<Ticket>,
) -> Result<Reply, ApiError> {
    let (route, mut slot, permit) = match admit_local(gw, &key, &g) {
        Ok(x) => x,
        Err(e) => {
            return match ticket {
                Some(t) => refuse_after_intent(gw, ctx, t, e).await,
                None => Err(e),
            }
        }
    };
    let in_flight = gw.enter();
    // Fail closed: no worker is called before the request's intent is durable.
    ctx.destination = Some(format!("local/{}", slot.instance().device));
    let ticket = match ticket {
        Some(t) => t,
        None => gw
            .audit
            .intent(gw.audit_record(ctx, 0, None, None))
            .await
            .map_err(|_| ApiError::AuditUnavailable)?,
    };
    let mut hard_stop = gw.hard_stop.subscribe();
    // An instance that died a moment ago may still look ready: until the worker has
    // accepted the request (nothing generated yet), a broken connection means trying
    // another instance.
    let mut tried = vec![];
    let (conn, prompt_tokens) = loop {
        let socket = slot.instance().worker.socket.clone();
        let attempt = async {
            // (retryable, error)
            let mut conn = WorkerConn::connect(&socket)
                .await
                .map_err(|_| (true, ApiError::NotReady(g.model.clone())))?;
            conn.send(Op::Generate {
                request_id: Some(ctx.id.clone()),
                prompt: g.prompt.clone(),
                params: g.params.clone(),
            })
            .await
            .map_err(|e| (true, client_error(e)))?;
            match tokio::time::timeout(Duration::from_secs(60), conn.recv()).await {
                Err(_) => Err((false, ApiError::Worker("no answer within 60 s".into()))),
                Ok(Err(e)) => Err((true, client_error(e))),
                Ok(Ok(WorkerResponse::Started { prompt_tokens })) => Ok((conn, prompt_tokens)),
                Ok(Ok(WorkerResponse::Error { code, message })) => {
                    Err((false, worker_error(code, message, g.kind)))
                }
                Ok(Ok(other)) => Err((
                    false,
                    ApiError::Worker(format!("unexpected answer {other:?}")),
                )),
            }
        };
        let result = tokio::select! {
            r = attempt => r,
            _ = hard_stop.wait_for(|s| *s) => Err((false, ApiError::Draining)),
        };
        match result {
            Ok(started) => break started,
            Err((true, e)) => {
                tried.push(slot.index());
                match route.try_slot(gw.cfg.queue_per_model, &tried) {
                    Some(s) => {
                        slot = s;
                        ctx.destination = Some(format!("local/{}", slot.instance().device));
                    }
                    None => return refuse_after_intent(gw, ctx, ticket, e).await,
                }
            }
            Err((false, e)) => return refuse_after_intent(gw, ctx, ticket, e).await,
        }
    };
    let mut run = Run {
        gw: gw.clone(),
        key,
        model: g.model.clone(),
        kind: g.kind,
        id: run_id(&ctx.id, g.kind),
        created: unix_now() as u64,
        prompt_tokens,
        soft_cap: g.soft_cap,
        conn,
        ctx: ctx.clone(),
        count: 0,
        settled: false,
        ticket: Some(ticket),
        hard_stop,
        _guards: (permit, slot, in_flight),
    };
    if !g.stream {
        let (text, completion_tokens, finish) = match run.collect().await {
            Ok(x) => x,
            Err(e) => {
                let count = run.count;
                let e = match run
                    .conclude(e.status().as_u16(), count, Some(e.code()))
                    .await
                {
                    Ok(()) => e,
                    Err(()) => ApiError::AuditUnavailable,
                };
                return Ok(Reply::Settled(error_response(&e, &ctx.id)));
            }
        };
        let resp = whole_response(
            g.kind,
            &ctx.id,
            &g.model,
            text,
            finish,
            (prompt_tokens, completion_tokens),
        );
        // The record is durable before the answer leaves.
        if run.conclude(200, completion_tokens, None).await.is_err() {
            return Ok(Reply::Settled(error_response(
                &ApiError::AuditUnavailable,
                &ctx.id,
            )));
        }
        return Ok(Reply::Settled(resp));
    }
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let resp = sse_response(rx, &ctx.id);
    let include_usage = g.include_usage;
    tokio::spawn(run.stream(tx, include_usage));
    Ok(Reply::Settled(resp))
}

/// Ends a request whose intent is recorded but that never reached generation: its
/// record first, then its answer (503 if the record cannot be written).
pub(crate) async fn refuse_after_intent(
    gw: &Arc<Gateway>,
    ctx: &ReqCtx,
    ticket: Ticket,
    e: ApiError,
) -> Result<Reply, ApiError> {
    let e = match gw
        .record_outcome(ctx, ticket, e.status().as_u16(), Some(e.code()), None)
        .await
    {
        Ok(()) => e,
        Err(()) => ApiError::AuditUnavailable,
    };
    gw.finish(ctx, e.status().as_u16(), None);
    Ok(Reply::Settled(error_response(&e, &ctx.id)))
}

pub(crate) fn run_id(req_id: &str, kind: Kind) -> String {
    let tail = req_id.strip_prefix("req_").unwrap_or(req_id);
    match kind {
        Kind::Chat => format!("chatcmpl-{tail}"),
        Kind::Text => format!("cmpl-{tail}"),
    }
}

/// One generation running on a worker connection. It owns the request's guards (key
/// permit, model slot, drain count) and records the request exactly once: when it ends,
/// or, if its client goes away first (hyper drops the handler or the stream), on drop.
struct Run {
    gw: Arc<Gateway>,
    key: Arc<KeyEntry>,
    model: String,
    kind: Kind,
    id: String,
    created: u64,
    prompt_tokens: usize,
    soft_cap: Option<usize>,
    conn: WorkerConn,
    ctx: ReqCtx,
    /// Tokens received so far.
    count: usize,
    settled: bool,
    /// The request's audit intent, until its record is written.
    ticket: Option<Ticket>,
    hard_stop: tokio::sync::watch::Receiver<bool>,
    _guards: (Permit, Slot, InFlight),
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.settled {
            log::debug!("{}: client went away; cancelling", self.id);
            self.settle(499, self.count);
        }
        if let Some(t) = self.ticket.take() {
            let usage = Some((self.prompt_tokens, self.count));
            t.finish_later(self.gw.audit_record(
                &self.ctx,
                499,
                Some("client_closed".into()),
                usage,
            ));
        }
    }
}

enum Step {
    Token(String),
    Done(&'static str, usize),
}

impl Run {
    /// Charges the key's token budget and writes the access log and metrics, once.
    fn settle(&mut self, status: u16, completion: usize) {
        if self.settled {
            return;
        }
        self.settled = true;
        self.key.limiter.charge_tokens(
            &self.key.limits,
            self.prompt_tokens + completion,
            Instant::now(),
        );
        self.gw
            .finish(&self.ctx, status, Some((self.prompt_tokens, completion)));
    }

    /// Writes the request's audit record, then settles it. `Err` when the record could
    /// not be written: the client must then get 503 instead of the outcome (which is what
    /// the record written later says).
    async fn conclude(
        &mut self,
        status: u16,
        completion: usize,
        error: Option<String>,
    ) -> Result<(), ()> {
        let usage = Some((self.prompt_tokens, completion));
        let result = match self.ticket.take() {
            Some(t) => {
                self.gw
                    .record_outcome(&self.ctx, t, status, error, usage)
                    .await
            }
            None => Ok(()),
        };
        self.settle(if result.is_ok() { status } else { 503 }, completion);
        result
    }

    /// The next piece of the generation.
    async fn next(&mut self) -> Result<Step, ApiError> {
        if self.soft_cap.is_some_and(|cap| self.count >= cap) {
            // The worker keeps going until the connection closes: dropping `conn` cancels it.
            return Ok(Step::Done("length", self.count));
        }
        let msg = tokio::select! {
            m = self.conn.recv() => m.map_err(client_error)?,
            _ = self.hard_stop.wait_for(|s| *s) => return Err(ApiError::Draining),
        };
        match msg {
            WorkerResponse::Token { text, .. } => {
                if self.count == 0 {
                    self.gw
                        .metrics
                        .first_token(&self.model, self.ctx.start.elapsed());
                }
                self.count += 1;
                Ok(Step::Token(text))
            }
            WorkerResponse::Done {
                finish_reason,
                completion_tokens,
                ..
            } => Ok(Step::Done(finish_str(finish_reason), completion_tokens)),
            WorkerResponse::Error { code, message } => Err(worker_error(code, message, self.kind)),
            other => Err(ApiError::Worker(format!("unexpected answer {other:?}"))),
        }
    }

    /// Runs the generation to its end (non-streamed answer).
    async fn collect(&mut self) -> Result<(String, usize, &'static str), ApiError> {
        let mut text = String::new();
        loop {
            match self.next().await? {
                Step::Token(t) => text.push_str(&t),
                Step::Done(finish, n) => return Ok((text, n, finish)),
            }
        }
    }

    fn chunk(&self, delta: Delta, finish: Option<&'static str>, include_usage: bool) -> Bytes {
        chunk_frame(
            self.kind,
            &self.id,
            self.created,
            &self.model,
            delta,
            finish,
            include_usage,
        )
    }

    fn usage_chunk(&self, usage: Usage) -> Bytes {
        usage_frame(self.kind, &self.id, self.created, &self.model, usage)
    }

    /// Sends one event; false when the client is gone, stalled past the stall timeout,
    /// or the drain deadline passed.
    async fn push(&mut self, tx: &mpsc::Sender<Bytes>, frame: Bytes) -> bool {
        let stall = self.gw.cfg.stall_timeout;
        tokio::select! {
            r = tx.send_timeout(frame, stall) => r.is_ok(),
            _ = self.hard_stop.wait_for(|s| *s) => false,
        }
    }

    /// Streams the generation as server-sent events into `tx`. Ends at once (closing
    /// the worker connection, which cancels the generation) when the client goes away.
    async fn stream(mut self, tx: mpsc::Sender<Bytes>, include_usage: bool) {
        if self.kind == Kind::Chat {
            let first = self.chunk(
                Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                None,
                include_usage,
            );
            if !self.push(&tx, first).await {
                return;
            }
        }
        loop {
            let step = tokio::select! {
                s = self.next() => s,
                _ = tx.closed() => return,
            };
            let frame = match step {
                Ok(Step::Token(t)) if t.is_empty() => continue,
                Ok(Step::Token(t)) => self.chunk(
                    Delta {
                        role: None,
                        content: Some(t),
                    },
                    None,
                    include_usage,
                ),
                Ok(Step::Done(finish, n)) => {
                    if self.conclude(200, n, None).await.is_err() {
                        // The text has gone out, but not the end: say why it stops.
                        let _ = self
                            .push(&tx, sse(&ApiError::AuditUnavailable.body()))
                            .await;
                        return;
                    }
                    let mut frames =
                        vec![self.chunk(Delta::default(), Some(finish), include_usage)];
                    if include_usage {
                        frames.push(self.usage_chunk(Usage::new(self.prompt_tokens, n)));
                    }
                    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
                    for f in frames {
                        if !self.push(&tx, f).await {
                            break;
                        }
                    }
                    return;
                }
                Err(e) => {
                    log::warn!(
                        "{}: stream ended by an error: {}",
                        self.id,
                        e.body().error.message
                    );
                    let count = self.count;
                    let e = match self
                        .conclude(e.status().as_u16(), count, Some(e.code()))
                        .await
                    {
                        Ok(()) => e,
                        Err(()) => ApiError::AuditUnavailable,
                    };
                    // The status line has gone out: the error travels as an event.
                    let _ = tx.try_send(sse(&e.body()));
                    return;
                }
            };
            if !self.push(&tx, frame).await {
                // Client gone or stalled: Drop records it (499) and the connection closes.
                return;
            }
        }
    }
}

/// A whole (not streamed) chat or text completion answer.
pub(crate) fn whole_response(
    kind: Kind,
    req_id: &str,
    model: &str,
    text: String,
    finish: &'static str,
    usage: (usize, usize),
) -> http::Response<crate::server::Body> {
    let id = run_id(req_id, kind);
    let created = unix_now() as u64;
    let usage = Usage::new(usage.0, usage.1);
    match kind {
        Kind::Chat => json_response(
            StatusCode::OK,
            &ChatCompletion {
                id,
                object: "chat.completion",
                created,
                model: model.to_string(),
                choices: vec![ChatChoice {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant",
                        content: text,
                    },
                    logprobs: None,
                    finish_reason: finish,
                }],
                usage,
                system_fingerprint: None,
            },
            req_id,
        ),
        Kind::Text => json_response(
            StatusCode::OK,
            &Completion {
                id,
                object: "text_completion",
                created,
                model: model.to_string(),
                choices: vec![CompletionChoice {
                    text,
                    index: 0,
                    logprobs: None,
                    finish_reason: Some(finish),
                }],
                usage: Some(Some(usage)),
                system_fingerprint: None,
            },
            req_id,
        ),
    }
}

/// One streamed event of a chat or text completion.
pub(crate) fn chunk_frame(
    kind: Kind,
    id: &str,
    created: u64,
    model: &str,
    delta: Delta,
    finish: Option<&'static str>,
    include_usage: bool,
) -> Bytes {
    let usage = include_usage.then_some(None);
    match kind {
        Kind::Chat => sse(&ChatChunk {
            id: id.to_string(),
            object: "chat.completion.chunk",
            created,
            model: model.to_string(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason: finish,
            }],
            usage,
            system_fingerprint: None,
        }),
        Kind::Text => sse(&Completion {
            id: id.to_string(),
            object: "text_completion",
            created,
            model: model.to_string(),
            choices: vec![CompletionChoice {
                text: delta.content.unwrap_or_default(),
                index: 0,
                logprobs: None,
                finish_reason: finish,
            }],
            usage,
            system_fingerprint: None,
        }),
    }
}

/// The usage event that ends a stream whose client asked for it.
pub(crate) fn usage_frame(kind: Kind, id: &str, created: u64, model: &str, usage: Usage) -> Bytes {
    match kind {
        Kind::Chat => sse(&ChatChunk {
            id: id.to_string(),
            object: "chat.completion.chunk",
            created,
            model: model.to_string(),
            choices: vec![],
            usage: Some(Some(usage)),
            system_fingerprint: None,
        }),
        Kind::Text => sse(&Completion {
            id: id.to_string(),
            object: "text_completion",
            created,
            model: model.to_string(),
            choices: vec![],
            usage: Some(Some(usage)),
            system_fingerprint: None,
        }),
    }
}

pub(crate) fn sse<T: Serialize>(v: &T) -> Bytes {
    let mut b = Vec::with_capacity(256);
    b.extend_from_slice(b"data: ");
    let _ = serde_json::to_writer(&mut b, v);
    b.extend_from_slice(b"\n\n");
    b.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<Generation, ApiError> {
        let r: ChatCompletionRequest = parse_json(body.as_bytes())?;
        validate_chat(r, &GatewayConfig::default())
    }

    fn param_of(e: ApiError) -> Option<String> {
        e.body().error.param
    }

    #[test]
    fn chat_validation_names_the_parameter() {
        let ok = chat(r#"{"model":"m","messages":[{"role":"developer","content":"be brief"},{"role":"user","content":"hi"}],"max_tokens":5,"stop":"x","seed":-1}"#).unwrap();
        assert_eq!(ok.params.max_tokens, Some(5));
        assert_eq!(ok.params.stop, vec!["x".to_string()]);
        assert_eq!(ok.params.temperature, 1.0);
        assert!(matches!(&ok.prompt, WirePrompt::Chat(m) if m[0].role == "system"));
        for (body, param) in [
            (r#"{"model":"m","messages":[]}"#, "messages"),
            (r#"{"model":"m","messages":"x"}"#, "messages"),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":"hot"}"#,
                "temperature",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":3}"#,
                "temperature",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"n":2}"#,
                "n",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":0}"#,
                "max_tokens",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":100000000}"#,
                "max_tokens",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stop":["a","b","c","d","e"]}"#,
                "stop",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"logit_bias":{"x":1}}"#,
                "logit_bias",
            ),
            (
                r#"{"model":"m","messages":[{"role":"tool","content":"hi"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function"}]}"#,
                "tools",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":null}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"model":"m","messages":[{"role":"assistant"},{"role":"system"}]}"#,
                "messages[1].content",
            ),
            (r#"{"messages":[{"role":"user","content":"hi"}]}"#, "model"),
            (
                r#"{"model":"m","messages":[{"content":"hi"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":5}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"functions":[{"name":"f"}]}"#,
                "functions",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"function_call":{"name":"f"}}"#,
                "function_call",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"tool_choice":"required"}"#,
                "tool_choice",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"modalities":["text","audio"]}"#,
                "modalities",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"audio":{"voice":"alloy"}}"#,
                "audio",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true}}"#,
                "stream_options",
            ),
        ] {
            let e = chat(body).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(param_of(e).as_deref(), Some(param), "{body}");
        }
        let e = chat("{not json").unwrap_err();
        assert!(e.body().error.message.contains("not valid JSON"));
        // Anything after the request's object makes the body invalid JSON too.
        let e =
            chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]} {}"#).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(
            e.body()
                .error
                .message
                .contains("not valid JSON: trailing characters"),
            "{}",
            e.body().error.message
        );
        // Unknown fields are ignored; so are the no-op forms of refused features.
        assert!(chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"metadata":{"a":"b"},"store":false}"#).is_ok());
        assert!(chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[],"tool_choice":"auto","functions":null,"function_call":"none","modalities":["text"]}"#).is_ok());
        let e = chat(r#"{"model":"m"}"#).unwrap_err();
        assert_eq!(e.body().error.message, "'messages' is required");
    }

    #[test]
    fn defaults_and_caps() {
        let g = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert!(g.stream && g.include_usage);
        assert_eq!(g.params.max_tokens, None);
        assert_eq!(g.soft_cap, Some(GatewayConfig::default().max_tokens_cap));
        for body in [&br#"["m",[["user","Hi"]]]"#[..], b" [1,2]", b"\"m\"", b"7"] {
            let e = parse_json::<ChatCompletionRequest>(body).unwrap_err();
            assert_eq!(
                e.body().error.message,
                "The request body must be a JSON object"
            );
        }
        for body in [
            &br#"{"model":"m","prompt":[]}"#[..],
            br#"{"model":"m","prompt":[[]]}"#,
        ] {
            let c: CompletionRequest = parse_json(body).unwrap();
            let e = validate_completion(c, &GatewayConfig::default()).unwrap_err();
            assert!(
                e.body().error.message.contains("empty list"),
                "{:?}",
                e.body()
            );
            assert_eq!(e.body().error.param.as_deref(), Some("prompt"));
        }
        let c: CompletionRequest = parse_json(br#"{"model":"m","prompt":["once"]}"#).unwrap();
        let c = validate_completion(c, &GatewayConfig::default()).unwrap();
        assert_eq!(c.params.max_tokens, Some(16));
        assert!(matches!(c.prompt, WirePrompt::Text(ref t) if t == "once"));
        let c: CompletionRequest = parse_json(br#"{"model":"m","prompt":["a","b"]}"#).unwrap();
        assert!(validate_completion(c, &GatewayConfig::default()).is_err());
        // logprobs: 0 still asks for the chosen tokens' logprobs; refused like any.
        for (body, param) in [
            (
                &br#"{"model":"m","prompt":"a","logprobs":0}"#[..],
                "logprobs",
            ),
            (
                br#"{"model":"m","prompt":"a","stream_options":{"include_usage":true}}"#,
                "stream_options",
            ),
        ] {
            let c: CompletionRequest = parse_json(body).unwrap();
            let e = validate_completion(c, &GatewayConfig::default()).unwrap_err();
            assert_eq!(e.body().error.param.as_deref(), Some(param));
        }
    }
}
