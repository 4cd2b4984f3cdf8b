//! Requests the policy sends to upstream destinations: chat and text completions, whole
//! or streamed. Destinations are tried in the rule's order (equal ones by load, latency
//! and price), skipping open circuits; a connection error, timeout, 5xx, or a stream
//! that ends before its first event moves on to the next, then to the rule's local
//! model. Once the first byte has reached the client there is no fallback: a break
//! mid-stream ends the stream with an error event. Redacted requests have their
//! placeholders restored in the answer (streamed pieces included) before the client
//! sees it. One intent before anything leaves, one record at the end.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use appliance_api::openai::{Delta, Usage};
use appliance_api::worker::WirePrompt;
use appliance_audit::Ticket;
use appliance_policy::redact::Redaction;
use appliance_policy::{Destination, Detection};
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::auth::KeyEntry;
use crate::error::ApiError;
use crate::limits::Permit;
use crate::openai::{
    chunk_frame, loggable, run_id, sse, usage_frame, whole_response, Generation, Kind,
};
use crate::server::{error_response, sse_response, unix_now, Gateway, InFlight, Reply, ReqCtx};
use crate::upstream::{Answer, UpstreamError};
use appliance_store::json::push_string_bytes;

/// Where a request that may leave the appliance goes.
pub(crate) struct Plan {
    /// Upstream destinations with their preference tiers, in the rule's order.
    pub chain: Vec<(Destination, usize)>,
    /// The rule's local model, if every upstream fails before answering.
    pub fallback: Option<String>,
    pub redact: bool,
    pub found: Vec<Detection>,
}

/// The JSON sent upstream: the destination's model, the (redacted) texts, and the
/// client's sampling parameters, written straight from borrowed fields (the bytes
/// `serde_json` writes for the same object; the texts, most of the body, escaped eight
/// bytes at a time).
fn upstream_body(g: &Generation, model: &str, texts: &[Cow<'_, str>]) -> Bytes {
    let p = &g.params;
    let size: usize = texts.iter().map(|t| t.len() + 40).sum();
    let mut out = Vec::with_capacity(size + 256);
    out.extend_from_slice(b"{\"model\":");
    push_string_bytes(&mut out, model);
    out.extend_from_slice(if g.stream {
        b",\"stream\":true"
    } else {
        b",\"stream\":false"
    });
    match &g.prompt {
        WirePrompt::Chat(ms) => {
            out.extend_from_slice(b",\"messages\":[");
            for (i, (m, t)) in ms.iter().zip(texts).enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"role\":");
                push_string_bytes(&mut out, &m.role);
                out.extend_from_slice(b",\"content\":");
                push_string_bytes(&mut out, t);
                out.push(b'}');
            }
            out.push(b']');
        }
        _ => {
            out.extend_from_slice(b",\"prompt\":");
            push_string_bytes(&mut out, texts.first().map_or("", |t| t.as_ref()));
        }
    }
    if g.stream {
        out.extend_from_slice(b",\"stream_options\":{\"include_usage\":true}");
    }
    // Numbers and the stop list as serde_json writes them.
    fn field<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, name: &str, v: &T) {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
        // Serializing numbers and strings into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, v);
    }
    if let Some(n) = p.max_tokens {
        field(&mut out, "max_tokens", &n);
    }
    field(&mut out, "temperature", &f64::from(p.temperature));
    field(&mut out, "top_p", &f64::from(p.top_p));
    if p.presence_penalty != 0.0 {
        field(&mut out, "presence_penalty", &f64::from(p.presence_penalty));
    }
    if p.frequency_penalty != 0.0 {
        field(
            &mut out,
            "frequency_penalty",
            &f64::from(p.frequency_penalty),
        );
    }
    if let Some(n) = p.seed {
        field(&mut out, "seed", &n);
    }
    if !p.stop.is_empty() {
        field(&mut out, "stop", &p.stop);
    }
    out.push(b'}');
    Bytes::from(out)
}

/// What the gateway takes from an upstream's whole answer or one streamed event: the
/// text (`choices[0].message.content` of a whole chat answer, `choices[0].delta.content`
/// of a chat event, `choices[0].text` of a text completion), the finish reason, the
/// usage, and whether it is an error object.
///
/// Read in one pass without building a JSON tree; a member of another type than the
/// one expected counts as absent, and of a repeated name the last counts, as when
/// indexing a `serde_json::Value`.
#[derive(Debug, Default, PartialEq)]
struct Reading {
    text: Option<String>,
    finish: Option<&'static str>,
    usage: Option<(usize, usize)>,
    error: bool,
}

/// The lenient readers behind [`Reading`]: each takes any JSON value, keeps what it
/// expects and skips the rest.
mod lenient {
    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
    use std::fmt;

    /// A visitor's answer `$none` for each JSON type listed (which it does not expect;
    /// arrays and objects are skipped through).
    macro_rules! otherwise {
        ($none:expr; $($t:ident)*) => {
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            $(otherwise!(@$t $none);)*
        };
        (@bool $none:expr) => {
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok($none)
            }
        };
        (@i64 $none:expr) => {
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok($none)
            }
        };
        (@u64 $none:expr) => {
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok($none)
            }
        };
        (@f64 $none:expr) => {
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok($none)
            }
        };
        (@str $none:expr) => {
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok($none)
            }
        };
        (@unit $none:expr) => {
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok($none)
            }
        };
        (@seq $none:expr) => {
            fn visit_seq<S: SeqAccess<'de>>(self, mut s: S) -> Result<Self::Value, S::Error> {
                while s.next_element::<Skip>()?.is_some() {}
                Ok($none)
            }
        };
        (@map $none:expr) => {
            fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Self::Value, M::Error> {
                while m.next_entry::<Skip, Skip>()?.is_some() {}
                Ok($none)
            }
        };
    }

    /// A value read for nothing but its validity: parsed as fully as a
    /// `serde_json::Value` would be (numbers in range, escapes whole, nesting within
    /// the limit), unlike `IgnoredAny`, which only skips its syntax.
    pub struct Skip;
    impl<'de> Deserialize<'de> for Skip {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Skip;
                otherwise!(Skip; bool i64 u64 f64 str unit seq map);
            }
            d.deserialize_any(V)
        }
    }

    /// A string.
    #[derive(Default)]
    pub struct Str(pub Option<String>);
    impl<'de> Deserialize<'de> for Str {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Str;
                otherwise!(Str(None); bool i64 u64 f64 unit seq map);
                fn visit_str<E>(self, v: &str) -> Result<Str, E> {
                    Ok(Str(Some(v.to_string())))
                }
                fn visit_string<E>(self, v: String) -> Result<Str, E> {
                    Ok(Str(Some(v)))
                }
            }
            d.deserialize_any(V)
        }
    }

    /// A non-negative integer.
    #[derive(Default)]
    pub struct Count(pub Option<u64>);
    impl<'de> Deserialize<'de> for Count {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Count;
                otherwise!(Count(None); bool i64 f64 str unit seq map);
                fn visit_u64<E>(self, v: u64) -> Result<Count, E> {
                    Ok(Count(Some(v)))
                }
            }
            d.deserialize_any(V)
        }
    }

    /// Anything but `null`.
    #[derive(Default)]
    pub struct Present(pub bool);
    impl<'de> Deserialize<'de> for Present {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Present;
                otherwise!(Present(true); bool i64 u64 f64 str seq map);
                fn visit_unit<E>(self) -> Result<Present, E> {
                    Ok(Present(false))
                }
            }
            d.deserialize_any(V)
        }
    }

    /// An object with the members named (each of a lenient type, default when absent);
    /// `object`: whether the value was an object at all.
    macro_rules! object {
        ($(#[$doc:meta])* $name:ident { $($field:ident: $ty:ty = $key:literal),* $(,)? }) => {
            $(#[$doc])*
            #[derive(Default)]
            pub struct $name {
                #[allow(dead_code, reason = "read of the usage only")]
                pub object: bool,
                $(pub $field: $ty),*
            }
            impl<'de> Deserialize<'de> for $name {
                fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                    struct V;
                    impl<'de> Visitor<'de> for V {
                        type Value = $name;
                        otherwise!($name::default(); bool i64 u64 f64 str unit seq);
                        fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<$name, M::Error> {
                            let mut r = $name { object: true, ..$name::default() };
                            while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
                                match k.as_ref() {
                                    $($key => r.$field = m.next_value()?,)*
                                    _ => {
                                        m.next_value::<Skip>()?;
                                    }
                                }
                            }
                            Ok(r)
                        }
                    }
                    d.deserialize_any(V)
                }
            }
        };
    }

    object!(
        /// An answer or event.
        Top { choices: First<Choice> = "choices", usage: Usage = "usage", error: Present = "error" }
    );
    object!(
        /// One of its choices.
        Choice { message: Message = "message", delta: Message = "delta", text: Str = "text", finish_reason: Str = "finish_reason" }
    );
    object!(
        /// A choice's message or delta.
        Message { content: Str = "content" }
    );
    object!(
        /// The token counts.
        Usage { prompt_tokens: Count = "prompt_tokens", completion_tokens: Count = "completion_tokens" }
    );

    /// An array's first element.
    pub struct First<T>(pub Option<T>);
    impl<T> Default for First<T> {
        fn default() -> Self {
            First(None)
        }
    }
    impl<'de, T: Deserialize<'de>> Deserialize<'de> for First<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<T>(std::marker::PhantomData<T>);
            impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
                type Value = First<T>;
                otherwise!(First(None); bool i64 u64 f64 str unit map);
                fn visit_seq<S: SeqAccess<'de>>(self, mut s: S) -> Result<First<T>, S::Error> {
                    let first = s.next_element::<T>()?;
                    while s.next_element::<Skip>()?.is_some() {}
                    Ok(First(first))
                }
            }
            d.deserialize_any(V(std::marker::PhantomData))
        }
    }
}
impl Reading {
    /// Reads `json` (an error if it is not JSON). `event`: a streamed event, whose chat
    /// text is in `delta`, not `message`.
    fn of(json: &str, kind: Kind, event: bool) -> Result<Reading, serde_json::Error> {
        let top: lenient::Top = serde_json::from_str(json)?;
        let choice = top.choices.0.unwrap_or_default();
        let text = match kind {
            Kind::Text => choice.text,
            Kind::Chat if event => choice.delta.content,
            Kind::Chat => choice.message.content,
        };
        let n = |c: lenient::Count| c.0.unwrap_or(0) as usize;
        Ok(Reading {
            text: text.0,
            finish: choice.finish_reason.0.map(|f| match f.as_str() {
                "length" => "length",
                _ => "stop",
            }),
            usage: top
                .usage
                .object
                .then(|| (n(top.usage.prompt_tokens), n(top.usage.completion_tokens))),
            error: top.error.0,
        })
    }

    /// The text of a whole answer: an answer without one is a failed attempt.
    fn whole_text(&mut self, kind: Kind, name: &str) -> Result<String, UpstreamError> {
        self.text.take().ok_or_else(|| {
            UpstreamError::Bad(format!(
                "{name}: the answer has no {}",
                match kind {
                    Kind::Chat => "choices[0].message.content",
                    Kind::Text => "choices[0].text",
                }
            ))
        })
    }
}

/// A streamed event; one that is an error object, or not JSON, means the stream broke.
fn parse_event(data: &str, kind: Kind, name: &str) -> Result<Reading, UpstreamError> {
    let r = Reading::of(data, kind, true)
        .map_err(|_| UpstreamError::Bad(format!("{name}: an event that is not JSON")))?;
    if r.error {
        return Err(UpstreamError::Unavailable(format!(
            "{name}: an error event in the stream"
        )));
    }
    Ok(r)
}

/// Sends the request to the plan's upstreams; see the module's documentation.
pub(crate) async fn run_upstream(
    gw: &Arc<Gateway>,
    key: Arc<KeyEntry>,
    mut g: Generation,
    ctx: &mut ReqCtx,
    mut plan: Plan,
) -> Result<Reply, ApiError> {
    let (permit, _rate) = key
        .limiter
        .admit(&key.limits, Instant::now())
        .map_err(|(d, info)| ApiError::RateLimited(d, info))?;
    let in_flight = gw.enter();
    gw.upstreams.rank(&mut plan.chain);
    let first = &plan.chain[0].0;
    ctx.destination = Some(first.name.clone());
    ctx.jurisdiction = first.jurisdiction.clone();
    ctx.model = first.model.as_deref().map(loggable);
    // Fail closed: nothing leaves before the intent is durable.
    let ticket = gw
        .audit
        .intent(gw.audit_record(ctx, 0, None, None))
        .await
        .map_err(|_| ApiError::AuditUnavailable)?;
    let parts = crate::openai::parts_of(&g.prompt);
    let (texts, redaction): (Vec<Cow<str>>, _) = if plan.redact {
        let (out, r) = appliance_policy::redact::redact(&parts, &plan.found);
        (out.into_iter().map(Cow::Owned).collect(), Some(r))
    } else {
        (parts.iter().map(|p| Cow::Borrowed(*p)).collect(), None)
    };
    let path = match g.kind {
        Kind::Chat => "/chat/completions",
        Kind::Text => "/completions",
    };
    let state = gw.policy();
    let mut failures = vec![];
    for (dest, _) in &plan.chain {
        if !gw.upstreams.allow(dest) {
            log::info!(
                "{}: upstream {} skipped: its circuit is open",
                ctx.id,
                dest.name
            );
            failures.push(format!("{} (circuit open)", dest.name));
            continue;
        }
        ctx.destination = Some(dest.name.clone());
        ctx.jurisdiction = dest.jurisdiction.clone();
        ctx.model = dest.model.as_deref().map(loggable);
        let credential = dest
            .credential
            .as_ref()
            .and_then(|c| state.credentials.get(c))
            .map(String::as_str);
        let model = dest.model.clone().unwrap_or_default();
        let body = upstream_body(&g, &model, &texts);
        let attempt = async {
            let answer = gw.upstreams.post(dest, credential, path, body).await?;
            if g.stream {
                Opened::stream(answer, g.kind).await
            } else {
                let bytes = answer.bytes().await?;
                let not_json = |e: &dyn std::fmt::Display| {
                    UpstreamError::Bad(format!("{}: not JSON: {e}", dest.name))
                };
                let json = std::str::from_utf8(&bytes).map_err(|e| not_json(&e))?;
                Reading::of(json, g.kind, false)
                    .map(Opened::Whole)
                    .map_err(|e| not_json(&e))
            }
        };
        match attempt.await {
            Ok(Opened::Whole(mut v)) => {
                let text = match v.whole_text(g.kind, &dest.name) {
                    Ok(t) => t,
                    Err(e) => {
                        gw.upstreams.failure(dest);
                        log::warn!("{}: upstream {} failed: {e}", ctx.id, dest.name);
                        failures.push(dest.name.clone());
                        continue;
                    }
                };
                gw.upstreams.success(dest);
                let text = match &redaction {
                    Some(r) => r.restore(&text),
                    None => text,
                };
                let usage = v.usage.unwrap_or((0, 0));
                let finish = v.finish.unwrap_or("stop");
                if gw
                    .record_outcome(ctx, ticket, 200, None, Some(usage))
                    .await
                    .is_err()
                {
                    gw.finish(ctx, 503, Some(usage));
                    let refused = ApiError::AuditUnavailable;
                    return Ok(Reply::Settled(error_response(&refused, &ctx.id)));
                }
                key.limiter
                    .charge_tokens(&key.limits, usage.0 + usage.1, Instant::now());
                gw.finish(ctx, 200, Some(usage));
                drop((permit, in_flight));
                return Ok(Reply::Settled(whole_response(
                    g.kind, &ctx.id, &model, text, finish, usage,
                )));
            }
            Ok(Opened::Stream(answer, first)) => {
                let (tx, rx) = mpsc::channel::<Bytes>(64);
                let resp = sse_response(rx, &ctx.id);
                let relay = Relay {
                    gw: gw.clone(),
                    key,
                    ctx: ctx.clone(),
                    ticket: Some(ticket),
                    dest: dest.clone(),
                    kind: g.kind,
                    id: run_id(&ctx.id, g.kind),
                    created: unix_now() as u64,
                    model,
                    include_usage: g.include_usage,
                    usage: None,
                    pieces: 0,
                    settled: false,
                    _guards: (permit, in_flight),
                };
                tokio::spawn(relay.run(tx, answer, first, redaction));
                return Ok(Reply::Settled(resp));
            }
            Err(e) => {
                gw.upstreams.failure(dest);
                log::warn!("{}: upstream {} failed: {e}", ctx.id, dest.name);
                failures.push(dest.name.clone());
            }
        }
    }
    drop((permit, in_flight));
    ctx.jurisdiction = None;
    match plan.fallback {
        Some(m) => {
            log::info!("{}: falling back to the local model {m}", ctx.id);
            g.model = m;
            ctx.model = Some(loggable(&g.model));
            Box::pin(crate::openai::run(gw, key, g, ctx, Some(ticket))).await
        }
        None => {
            let e = ApiError::NoDestination(format!(
                "Every destination this request may go to failed ({}).",
                failures.join(", ")
            ));
            crate::openai::refuse_after_intent(gw, ctx, ticket, e).await
        }
    }
}

/// An upstream answer that has begun: whole, or a stream whose first event has come.
enum Opened {
    Whole(Reading),
    Stream(Answer, Reading),
}

impl Opened {
    /// Waits for the stream's first event: until then the request may still go
    /// elsewhere.
    async fn stream(mut answer: Answer, kind: Kind) -> Result<Opened, UpstreamError> {
        match answer.event().await? {
            Some(data) => {
                let v = parse_event(&data, kind, "upstream")?;
                Ok(Opened::Stream(answer, v))
            }
            None => Err(UpstreamError::Unavailable(
                "the stream ended before its first event".into(),
            )),
        }
    }
}

/// Relays an upstream stream to the client, re-framed under the request's own id, with
/// placeholders restored. It records the request once: before the final event when the
/// upstream finished, with the error when it broke, or 499 when the client left.
struct Relay {
    gw: Arc<Gateway>,
    key: Arc<KeyEntry>,
    ctx: ReqCtx,
    ticket: Option<Ticket>,
    dest: Destination,
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    usage: Option<(usize, usize)>,
    /// Text events relayed (the completion's size when the upstream reports no usage).
    pieces: usize,
    settled: bool,
    _guards: (Permit, InFlight),
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            let usage = self.usage.unwrap_or((0, self.pieces));
            t.finish_later(self.gw.audit_record(
                &self.ctx,
                499,
                Some("client_closed".into()),
                Some(usage),
            ));
        }
        if !self.settled {
            self.settle(499);
        }
    }
}

impl Relay {
    fn settle(&mut self, status: u16) {
        if self.settled {
            return;
        }
        self.settled = true;
        let usage = self.usage.unwrap_or((0, self.pieces));
        self.key
            .limiter
            .charge_tokens(&self.key.limits, usage.0 + usage.1, Instant::now());
        self.gw.finish(&self.ctx, status, Some(usage));
    }

    /// Writes the record, then settles; `Err` when the record could not be written.
    async fn conclude(&mut self, status: u16, error: Option<String>) -> Result<(), ()> {
        let usage = Some(self.usage.unwrap_or((0, self.pieces)));
        let result = match self.ticket.take() {
            Some(t) => {
                self.gw
                    .record_outcome(&self.ctx, t, status, error, usage)
                    .await
            }
            None => Ok(()),
        };
        self.settle(if result.is_ok() { status } else { 503 });
        result
    }

    fn frame(&self, text: Option<String>, role: bool, finish: Option<&'static str>) -> Bytes {
        chunk_frame(
            self.kind,
            &self.id,
            self.created,
            &self.model,
            Delta {
                role: role.then_some("assistant"),
                content: text,
            },
            finish,
            self.include_usage,
        )
    }

    async fn push(&self, tx: &mpsc::Sender<Bytes>, frame: Bytes) -> bool {
        tx.send_timeout(frame, self.gw.cfg.stall_timeout)
            .await
            .is_ok()
    }

    async fn run(
        mut self,
        tx: mpsc::Sender<Bytes>,
        mut answer: Answer,
        first: Reading,
        redaction: Option<Redaction>,
    ) {
        let mut restore = redaction.as_ref().map(Redaction::stream);
        let mut finish: Option<&'static str> = None;
        let mut next = Some(first);
        if self.kind == Kind::Chat
            && !self
                .push(&tx, self.frame(Some(String::new()), true, None))
                .await
        {
            return;
        }
        loop {
            let v = match next.take() {
                Some(v) => v,
                None => {
                    let got = tokio::select! {
                        e = answer.event() => e,
                        _ = tx.closed() => return,
                    };
                    match got.and_then(|e| match e {
                        Some(data) => parse_event(&data, self.kind, &self.dest.name).map(Some),
                        None => Ok(None),
                    }) {
                        Ok(Some(v)) => v,
                        // The end: complete if the upstream said how it finished.
                        Ok(None) if finish.is_some() => break,
                        Ok(None) => {
                            return self
                                .fail(&tx, "the stream ended before it finished".into())
                                .await
                        }
                        Err(e) => return self.fail(&tx, e.to_string()).await,
                    }
                }
            };
            if let Some(u) = v.usage {
                self.usage = Some(u);
            }
            if let Some(f) = v.finish {
                finish = Some(f);
            }
            let piece = v.text.unwrap_or_default();
            if piece.is_empty() {
                continue;
            }
            self.pieces += 1;
            let text = match &mut restore {
                Some(r) => r.push(&piece),
                None => piece,
            };
            if !text.is_empty() && !self.push(&tx, self.frame(Some(text), false, None)).await {
                return;
            }
        }
        self.gw.upstreams.success(&self.dest);
        if let Some(rest) = restore.as_mut().map(|r| r.finish()) {
            if !rest.is_empty() && !self.push(&tx, self.frame(Some(rest), false, None)).await {
                return;
            }
        }
        // The record is durable before the stream's end goes out.
        if self.conclude(200, None).await.is_err() {
            let _ = self
                .push(&tx, sse(&ApiError::AuditUnavailable.body()))
                .await;
            return;
        }
        let mut frames = vec![self.frame(None, false, Some(finish.unwrap_or("stop")))];
        if self.include_usage {
            let (p, c) = self.usage.unwrap_or((0, self.pieces));
            frames.push(usage_frame(
                self.kind,
                &self.id,
                self.created,
                &self.model,
                Usage::new(p, c),
            ));
        }
        frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
        for f in frames {
            if !self.push(&tx, f).await {
                break;
            }
        }
    }

    /// The upstream broke after the client had its first bytes: no fallback is possible;
    /// the stream ends with an error event (and no `[DONE]`).
    async fn fail(mut self, tx: &mpsc::Sender<Bytes>, why: String) {
        self.gw.upstreams.failure(&self.dest);
        log::warn!(
            "{}: upstream {} broke mid-stream: {why}",
            self.ctx.id,
            self.dest.name
        );
        let e = ApiError::UpstreamFailed(format!(
            "The upstream {} stopped answering mid-stream; the answer is incomplete.",
            self.dest.name
        ));
        let e = match self.conclude(e.status().as_u16(), Some(e.code())).await {
            Ok(()) => e,
            Err(()) => ApiError::AuditUnavailable,
        };
        let _ = self.push(tx, sse(&e.body())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use appliance_api::worker::{WireMessage, WireParams};

    /// What [`Reading::of`] stands for: the same parts read by indexing a JSON value.
    fn by_value(json: &str, kind: Kind, event: bool) -> Option<Reading> {
        let v: serde_json::Value = serde_json::from_str(json).ok()?;
        let c = &v["choices"][0];
        let text = match (kind, event) {
            (Kind::Text, _) => c["text"].as_str(),
            (Kind::Chat, false) => c["message"]["content"].as_str(),
            (Kind::Chat, true) => c["delta"]["content"].as_str(),
        };
        let u = v.get("usage").filter(|u| u.is_object());
        Some(Reading {
            text: text.map(str::to_string),
            finish: c["finish_reason"]
                .as_str()
                .map(|f| if f == "length" { "length" } else { "stop" }),
            usage: u.map(|u| {
                let n = |k: &str| u[k].as_u64().unwrap_or(0) as usize;
                (n("prompt_tokens"), n("completion_tokens"))
            }),
            error: v.get("error").is_some_and(|e| !e.is_null()),
        })
    }

    #[test]
    fn answers_read_as_indexing_their_json_would() {
        let cases = [
            r#"{"choices":[{"message":{"role":"assistant","content":"Hi \"there\"\n\u00e9"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#,
            r#"{"choices":[{"text":"plain","finish_reason":"length"},{"text":"second"}],"usage":{"prompt_tokens":1}}"#,
            r#"{"choices":[{"delta":{"content":"piece"},"finish_reason":null}]}"#,
            r#"{"choices":[{"delta":{"role":"assistant"}}],"usage":null}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":-1,"completion_tokens":2.5}}"#,
            r#"{"choices":{"0":{"text":"not an array"}},"usage":"many"}"#,
            r#"{"choices":[{"message":{"content":7},"text":["x"],"finish_reason":5}]}"#,
            r#"{"choices":[{"message":{"content":"first"}}],"choices":[{"message":{"content":"last"}}]}"#,
            r#"{"usage":{"prompt_tokens":4,"prompt_tokens":9},"choices":[{"text":"a","text":null}]}"#,
            r#"{"error":{"message":"overloaded"}}"#,
            r#"{"error":null,"choices":[{"text":"ok"}]}"#,
            r#"{"ch\u006fices":[{"text":"escaped name"}]}"#,
            // Refused by a `Value` where they are skipped here, as they are there.
            r#"{"choices":[{"text":"a"}],"x":1e400}"#,
            r#"{"id":"\ud800","choices":[{"text":"a"}]}"#,
            r#"{"choices":[{"text":"a"},"\udc00"]}"#,
            r#"{"choices":[{"text":"a","logprobs":{"x":[1e999]}}]}"#,
            r#"[{"choices":[]}]"#,
            r#""a string""#,
            "42",
            "null",
        ];
        for json in cases {
            for kind in [Kind::Chat, Kind::Text] {
                for event in [false, true] {
                    let got = Reading::of(json, kind, event).ok();
                    assert_eq!(
                        got,
                        by_value(json, kind, event),
                        "{json} {kind:?} event={event}"
                    );
                }
            }
        }
        let deep = format!(
            r#"{{"choices":[{{"text":"a"}}],"x":{}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        for broken in [
            "",
            "{",
            r#"{"choices":[}"#,
            "{\"a\":1} trailing",
            "nul",
            &deep,
        ] {
            assert!(Reading::of(broken, Kind::Chat, false).is_err(), "{broken}");
            assert!(by_value(broken, Kind::Chat, false).is_none(), "{broken}");
        }
    }

    fn generation(prompt: WirePrompt, stream: bool, params: WireParams) -> Generation {
        Generation {
            kind: Kind::Chat,
            model: "gpt-4o".into(),
            prompt,
            params,
            stream,
            include_usage: false,
            soft_cap: None,
        }
    }

    /// The body as `serde_json` writes the same object, field for field.
    #[derive(serde::Serialize)]
    struct Reference<'a> {
        model: &'a str,
        stream: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        messages: Option<Vec<Msg<'a>>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        prompt: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        stream_options: Option<serde_json::Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        max_tokens: Option<usize>,
        temperature: f64,
        top_p: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        presence_penalty: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        frequency_penalty: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        seed: Option<u64>,
        #[serde(skip_serializing_if = "<[String]>::is_empty")]
        stop: &'a [String],
    }

    #[derive(serde::Serialize)]
    struct Msg<'a> {
        role: &'a str,
        content: &'a str,
    }

    #[test]
    fn the_upstream_body_is_the_bytes_serde_json_writes() {
        let msg = |role: &str, content: &str| WireMessage {
            role: role.into(),
            content: content.into(),
        };
        let texts = [Cow::Borrowed("Be \"brief\".\n"), Cow::Borrowed("«x» \u{1}")];
        for (stream, chat, params) in [
            (
                true,
                true,
                WireParams {
                    temperature: 0.7,
                    top_p: 0.9,
                    max_tokens: Some(64),
                    seed: Some(1),
                    stop: vec!["\n".into(), "END".into()],
                    presence_penalty: -0.5,
                    frequency_penalty: 1.25,
                    ..WireParams::default()
                },
            ),
            (false, false, WireParams::default()),
            (
                false,
                true,
                WireParams {
                    temperature: 1.0e-7,
                    ..WireParams::default()
                },
            ),
        ] {
            let prompt = if chat {
                WirePrompt::Chat(vec![msg("system", "s"), msg("user", "u")])
            } else {
                WirePrompt::Text("t".into())
            };
            let g = generation(prompt, stream, params.clone());
            let p = &params;
            let want = serde_json::to_vec(&Reference {
                model: "up \"model\"",
                stream,
                messages: chat.then(|| {
                    vec![
                        Msg {
                            role: "system",
                            content: &texts[0],
                        },
                        Msg {
                            role: "user",
                            content: &texts[1],
                        },
                    ]
                }),
                prompt: (!chat).then_some(texts[0].as_ref()),
                stream_options: stream.then(|| serde_json::json!({"include_usage": true})),
                max_tokens: p.max_tokens,
                temperature: f64::from(p.temperature),
                top_p: f64::from(p.top_p),
                presence_penalty: (p.presence_penalty != 0.0)
                    .then(|| f64::from(p.presence_penalty)),
                frequency_penalty: (p.frequency_penalty != 0.0)
                    .then(|| f64::from(p.frequency_penalty)),
                seed: p.seed,
                stop: &p.stop,
            })
            .unwrap();
            let got = upstream_body(&g, "up \"model\"", if chat { &texts } else { &texts[..1] });
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want)
            );
        }
    }

    #[test]
    fn the_upstream_body_carries_the_given_texts_and_only_the_set_parameters() {
        let msg = |role: &str, content: &str| WireMessage {
            role: role.into(),
            content: content.into(),
        };
        let prompt = WirePrompt::Chat(vec![msg("system", "Be brief."), msg("user", "secret")]);
        let params = WireParams {
            temperature: 0.5,
            max_tokens: Some(7),
            seed: Some(3),
            stop: vec!["\n".into()],
            presence_penalty: 0.25,
            ..WireParams::default()
        };
        let g = generation(prompt, true, params);
        let texts = [
            Cow::Borrowed("Be brief."),
            Cow::Owned("«EMAIL_1» \"q\"".into()),
        ];
        let body: serde_json::Value =
            serde_json::from_slice(&upstream_body(&g, "up-model", &texts)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "model": "up-model",
                "stream": true,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "«EMAIL_1» \"q\""},
                ],
                "stream_options": {"include_usage": true},
                "max_tokens": 7,
                "temperature": 0.5,
                "top_p": 1.0,
                "presence_penalty": 0.25,
                "seed": 3,
                "stop": ["\n"],
            })
        );
        // A text prompt, whole, defaults: no optional field at all.
        let g = generation(WirePrompt::Text("x".into()), false, WireParams::default());
        let body: serde_json::Value =
            serde_json::from_slice(&upstream_body(&g, "m", &[Cow::Borrowed("hello")])).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"model": "m", "stream": false, "prompt": "hello",
                "temperature": 0.0, "top_p": 1.0})
        );
    }
}
