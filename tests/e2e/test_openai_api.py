"""End-to-end tests of the appliance's OpenAI-compatible HTTPS API.

A Rust harness starts the server and runs pytest with this environment:

- APPLIANCE_BASE_URL  e.g. https://127.0.0.1:PORT/v1
- APPLIANCE_CACERT    PEM file of the server's self-signed certificate
- APPLIANCE_MODEL     id of the served model
- APPLIANCE_BIN       path of the `appliance` binary (used for `key ...`)
- APPLIANCE_DATA_DIR  the running server's data directory
- APPLIANCE_TENANT    name of an existing tenant

The model is tiny and runs on CPU, so every generation asks for few tokens.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

_ENV_NAMES = (
    "APPLIANCE_BASE_URL",
    "APPLIANCE_CACERT",
    "APPLIANCE_MODEL",
    "APPLIANCE_BIN",
    "APPLIANCE_DATA_DIR",
    "APPLIANCE_TENANT",
)
_ENV = {name: os.environ.get(name, "") for name in _ENV_NAMES}

BASE_URL = _ENV["APPLIANCE_BASE_URL"].rstrip("/")
CACERT = _ENV["APPLIANCE_CACERT"]
MODEL = _ENV["APPLIANCE_MODEL"]
BIN = _ENV["APPLIANCE_BIN"]
DATA_DIR = _ENV["APPLIANCE_DATA_DIR"]
TENANT = _ENV["APPLIANCE_TENANT"]
# Server root (where /healthz, /readyz and /metrics live): BASE_URL minus /v1.
ROOT_URL = BASE_URL[: -len("/v1")] if BASE_URL.endswith("/v1") else BASE_URL

KEY_RE = re.compile(r"^sk-appl-([0-9a-f]{16})_([0-9a-f]{64})$")
TIMEOUT_S = 60.0

HELLO = [{"role": "user", "content": "Say hello."}]
COLORS = [{"role": "user", "content": "Name three colors."}]
SEA = [{"role": "user", "content": "Write one sentence about the sea."}]
COUNT = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]
COMPLETION_PROMPT = "The capital of France is"


@pytest.fixture(scope="module", autouse=True)
def _require_env():
    missing = [name for name, value in _ENV.items() if not value]
    if missing:
        pytest.fail(
            "these tests run under the Rust harness; missing environment: "
            + ", ".join(missing)
        )


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def cli(*args: str) -> str:
    """Run the appliance binary; return its stdout, stripped."""
    try:
        proc = subprocess.run(
            [BIN, *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.CalledProcessError as e:
        raise AssertionError(
            f"`appliance {' '.join(args)}` exited {e.returncode}: {e.stderr}"
        ) from e
    return proc.stdout.strip()


def create_key(*extra: str) -> str:
    """`key create` for the test tenant; checks that only the secret is printed."""
    out = cli("key", "create", "--data-dir", DATA_DIR, "--tenant", TENANT, *extra)
    assert "\n" not in out, f"key create printed more than one line: {out!r}"
    assert KEY_RE.match(out), f"unexpected key format: {out!r}"
    return out


def key_id(secret: str) -> str:
    m = KEY_RE.match(secret)
    assert m, f"unexpected key format: {secret!r}"
    return m.group(1)


def list_keys() -> list[dict]:
    out = cli("key", "list", "--data-dir", DATA_DIR, "--json")
    keys = json.loads(out)
    assert isinstance(keys, list)
    return keys


def key_entry(kid: str) -> dict:
    matches = [k for k in list_keys() if k.get("id") == kid]
    assert len(matches) == 1, f"key {kid} listed {len(matches)} times"
    return matches[0]


def ssl_ctx() -> ssl.SSLContext:
    """A fresh context trusting only the appliance's certificate (one per client,
    since HTTP clients set ALPN protocols on the context they are given)."""
    return ssl.create_default_context(cafile=CACERT)


def make_client(api_key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=BASE_URL,
        api_key=api_key,
        max_retries=0,
        timeout=TIMEOUT_S,
        http_client=openai.DefaultHttpxClient(verify=ssl_ctx(), trust_env=False),
    )


def raw_client(http2: bool = False) -> httpx.Client:
    return httpx.Client(
        verify=ssl_ctx(), http2=http2, timeout=TIMEOUT_S, trust_env=False
    )


def auth(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def assert_error_body(text: str, *secrets: str) -> dict:
    """Check the OpenAI error shape and that no secret leaks into it."""
    for secret in secrets:
        assert secret not in text, "the API key appears in an error body"
        m = KEY_RE.match(secret)
        if m:
            assert m.group(2) not in text, "the key's secret appears in an error body"
    data = json.loads(text)
    assert isinstance(data, dict), text
    err = data.get("error")
    assert isinstance(err, dict), text
    for field in ("message", "type", "param", "code"):
        assert field in err, f"error lacks {field!r}: {text}"
    assert isinstance(err["message"], str) and err["message"], text
    assert isinstance(err["type"], str) and err["type"], text
    return err


def assert_sdk_error(exc: openai.APIStatusError, *secrets: str) -> dict:
    return assert_error_body(exc.response.text, *secrets)


def assert_raw_error(resp: httpx.Response, status: int, *secrets: str) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers.get("content-type", "").startswith("application/json")
    return assert_error_body(resp.text, *secrets)


def chat(client: openai.OpenAI, messages=HELLO, max_tokens: int = 12, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, **kw
    )


def collect_chat_stream(stream) -> tuple[str, str | None, list]:
    """Concatenated delta text, last finish_reason, and the usage chunks."""
    parts: list[str] = []
    finish = None
    usage_chunks = []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        assert chunk.model == MODEL
        if chunk.usage is not None:
            usage_chunks.append(chunk)
        for choice in chunk.choices:
            assert choice.index == 0
            if choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason is not None:
                finish = choice.finish_reason
    return "".join(parts), finish, usage_chunks


def collect_completion_stream(stream) -> tuple[str, str | None, list]:
    parts: list[str] = []
    finish = None
    usage_chunks = []
    for chunk in stream:
        assert chunk.object == "text_completion"
        if chunk.usage is not None:
            usage_chunks.append(chunk)
        for choice in chunk.choices:
            parts.append(choice.text or "")
            if choice.finish_reason is not None:
                finish = choice.finish_reason
    return "".join(parts), finish, usage_chunks


def parse_sse(body: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    return [
        line[len("data:") :].strip()
        for line in body.splitlines()
        if line.startswith("data:")
    ]


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def main_key() -> str:
    return create_key()


@pytest.fixture(scope="module")
def client(main_key):
    with make_client(main_key) as c:
        yield c


@pytest.fixture(scope="module")
def http():
    with raw_client() as c:
        yield c


# --------------------------------------------------------------------------
# Health, TLS, metrics
# --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_endpoints_need_no_auth(http, path):
    r = http.get(ROOT_URL + path)
    assert r.status_code == 200, r.text


def test_tls_certificate_is_required():
    # Without trusting the appliance's certificate the handshake must fail:
    # the API is served over HTTPS with the given self-signed certificate.
    with httpx.Client(timeout=TIMEOUT_S, trust_env=False) as c:
        with pytest.raises(httpx.ConnectError):
            c.get(ROOT_URL + "/healthz")


def test_metrics_prometheus(client, http, main_key):
    # Make sure at least one request and some tokens were counted.
    resp = chat(client, max_tokens=2)
    assert resp.usage.completion_tokens >= 1

    r = http.get(ROOT_URL + "/metrics")
    assert r.status_code == 200
    assert r.headers.get("content-type", "").startswith("text/plain")
    text = r.text
    key_secret = KEY_RE.match(main_key).group(2)
    assert key_secret not in text

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families, "no metric families parsed"
    for name in families:
        assert name.startswith("appliance_"), name

    def family(name: str):
        # The parser drops a counter's `_total` suffix from the family name.
        base = name[: -len("_total")] if name.endswith("_total") else name
        fam = families.get(name) or families.get(base)
        assert fam is not None, f"metric {name} missing; have {sorted(families)}"
        return fam

    def sample_sum(name: str) -> float:
        fam = family(name)
        return sum(s.value for s in fam.samples if s.name == name)

    assert family("appliance_http_requests_total").type == "counter"
    assert sample_sum("appliance_http_requests_total") > 0
    assert family("appliance_tokens_total").type == "counter"
    assert sample_sum("appliance_tokens_total") > 0
    assert family("appliance_worker_state").type == "gauge"
    assert family("appliance_worker_restarts_total").type == "counter"
    duration = family("appliance_request_duration_seconds")
    assert duration.type == "histogram"
    names = {s.name for s in duration.samples}
    assert "appliance_request_duration_seconds_bucket" in names
    assert sum(
        s.value
        for s in duration.samples
        if s.name == "appliance_request_duration_seconds_count"
    ) > 0


# --------------------------------------------------------------------------
# SDK: models, chat, completions
# --------------------------------------------------------------------------


def test_models_list_contains_model(client):
    page = client.models.list()
    ids = [m.id for m in page.data]
    assert MODEL in ids


def test_models_list_raw_shape(http, main_key):
    r = http.get(BASE_URL + "/models", headers=auth(main_key))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list"
    assert isinstance(body["data"], list) and body["data"]
    for m in body["data"]:
        assert isinstance(m["id"], str)
        assert m["object"] == "model"
    assert MODEL in [m["id"] for m in body["data"]]


def test_chat_non_stream(client):
    resp = chat(client, COLORS, max_tokens=12)
    assert resp.object == "chat.completion"
    assert resp.model == MODEL
    assert isinstance(resp.id, str) and resp.id
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = resp.usage
    assert u.prompt_tokens > 0
    assert 1 <= u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    if choice.finish_reason == "length":
        assert u.completion_tokens == 12


def test_chat_greedy_is_deterministic(client):
    a = chat(client, COLORS, max_tokens=12)
    b = chat(client, COLORS, max_tokens=12)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens == b.usage.completion_tokens


def test_chat_stream_matches_non_stream(client):
    ref = chat(client, COLORS, max_tokens=12)
    stream = chat(
        client,
        COLORS,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage_chunks = collect_chat_stream(stream)
    assert text == ref.choices[0].message.content
    assert finish == ref.choices[0].finish_reason
    assert len(usage_chunks) == 1, "expected exactly one usage chunk"
    last = usage_chunks[0]
    assert last.choices == []
    assert last.usage.completion_tokens == ref.usage.completion_tokens
    assert last.usage.prompt_tokens == ref.usage.prompt_tokens
    assert last.usage.total_tokens == ref.usage.total_tokens


def test_chat_stream_without_usage_option(client):
    stream = chat(client, HELLO, max_tokens=6, stream=True)
    chunks = list(stream)
    assert chunks
    for chunk in chunks:
        assert chunk.usage is None
        assert len(chunk.choices) == 1
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_max_tokens_one_is_length(client):
    resp = chat(client, COLORS, max_tokens=1)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 1


def test_chat_max_completion_tokens(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=COLORS, max_completion_tokens=1, temperature=0
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 1


def _stop_word(text: str) -> tuple[str, int]:
    """A stop sequence that occurs in `text` after its start, and where."""
    words = text.split()
    assert len(words) >= 2, f"need a longer greedy answer to test stop: {text!r}"
    for word in words[1:]:
        idx = text.find(word)
        if idx > 0:
            return word, idx
    raise AssertionError(f"no usable stop word in {text!r}")


def test_chat_stop_sequence(client):
    full = chat(client, SEA, max_tokens=16).choices[0].message.content
    stop, idx = _stop_word(full)
    expected = full[:idx]

    resp = chat(client, SEA, max_tokens=16, stop=stop)
    assert resp.choices[0].message.content == expected
    assert resp.choices[0].finish_reason == "stop"

    # List form, with a sequence that never occurs.
    resp = chat(client, SEA, max_tokens=16, stop=["#%never%#", stop])
    assert resp.choices[0].message.content == expected
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens <= 16

    # Streaming: the stop sequence must not leak out through the deltas.
    text, finish, _ = collect_chat_stream(
        chat(client, SEA, max_tokens=16, stop=[stop], stream=True)
    )
    assert text == expected
    assert finish == "stop"


def test_chat_sampling_parameters_accepted(client):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=6,
        temperature=0.8,
        top_p=0.9,
        seed=1234,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"0": -100},
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    choice = resp.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= resp.usage.completion_tokens <= 6
    assert isinstance(choice.message.content, str)


def test_completions_non_stream(client):
    resp = client.completions.create(
        model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=8, temperature=0
    )
    assert resp.object == "text_completion"
    assert resp.model == MODEL
    assert len(resp.choices) == 1
    assert isinstance(resp.choices[0].text, str) and resp.choices[0].text
    assert resp.choices[0].finish_reason in ("stop", "length")
    u = resp.usage
    assert u.prompt_tokens > 0
    assert 1 <= u.completion_tokens <= 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_completions_stream_matches_non_stream(client):
    ref = client.completions.create(
        model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=8, temperature=0
    )
    stream = client.completions.create(
        model=MODEL,
        prompt=COMPLETION_PROMPT,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage_chunks = collect_completion_stream(stream)
    assert text == ref.choices[0].text
    assert finish == ref.choices[0].finish_reason
    assert len(usage_chunks) == 1
    assert usage_chunks[0].choices == []
    assert usage_chunks[0].usage.completion_tokens == ref.usage.completion_tokens


def test_completions_max_tokens_one_is_length(client):
    resp = client.completions.create(
        model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=1, temperature=0
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 1


# --------------------------------------------------------------------------
# SDK: errors
# --------------------------------------------------------------------------


def test_unknown_model_is_not_found(client, main_key):
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(
            model="no-such-model", messages=HELLO, max_tokens=1
        )
    err = assert_sdk_error(ei.value, main_key)
    assert err["code"] == "model_not_found"


def test_empty_messages_is_bad_request(client, main_key):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=1)
    assert_sdk_error(ei.value, main_key)


def test_n_greater_than_one_is_refused(client, main_key):
    with pytest.raises(openai.BadRequestError) as ei:
        chat(client, HELLO, max_tokens=1, n=2)
    err = assert_sdk_error(ei.value, main_key)
    assert err["param"] == "n"


def test_wrong_parameter_type_is_bad_request(client, main_key):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=1,
            extra_body={"temperature": "hot"},
        )
    assert_sdk_error(ei.value, main_key)


@pytest.mark.parametrize("max_tokens", [0, -1, 10_000_000])
def test_max_tokens_out_of_range(client, main_key, max_tokens):
    with pytest.raises(openai.BadRequestError) as ei:
        chat(client, HELLO, max_tokens=max_tokens)
    assert_sdk_error(ei.value, main_key)


def test_more_than_four_stop_sequences(client, main_key):
    with pytest.raises(openai.BadRequestError) as ei:
        chat(client, HELLO, max_tokens=1, stop=["a", "b", "c", "d", "e"])
    assert_sdk_error(ei.value, main_key)


@pytest.mark.parametrize(
    "bad_key",
    [
        "not-a-key",
        "sk-appl-0123456789abcdef_" + "0" * 64,
    ],
)
def test_bad_key_is_unauthenticated(bad_key):
    with make_client(bad_key) as c:
        with pytest.raises(openai.AuthenticationError) as ei:
            chat(c, HELLO, max_tokens=1)
        assert_sdk_error(ei.value, bad_key)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()


def test_wrong_secret_for_existing_id(main_key):
    kid = key_id(main_key)
    forged = f"sk-appl-{kid}_" + "f" * 64
    assert forged != main_key
    with make_client(forged) as c:
        with pytest.raises(openai.AuthenticationError) as ei:
            c.models.list()
        assert_sdk_error(ei.value, forged, main_key)


def test_expired_key():
    t_before = time.time()
    secret = create_key("--expires-in", "2s")
    t_after = time.time()
    kid = key_id(secret)

    entry = key_entry(kid)
    assert entry["tenant"] == TENANT
    assert entry["status"] == "active"
    assert isinstance(entry["expires_at"], (int, float))
    # About two seconds from creation (allowing for whole-second rounding).
    assert t_before + 1 <= entry["expires_at"] <= t_after + 3

    with make_client(secret) as c:
        assert MODEL in [m.id for m in c.models.list().data]
        time.sleep(max(0.0, t_after + 3.2 - time.time()))
        with pytest.raises(openai.AuthenticationError) as ei:
            chat(c, HELLO, max_tokens=1)
        assert_sdk_error(ei.value, secret)

    assert key_entry(kid)["status"] == "expired"


def test_revoked_key_is_refused_immediately():
    secret = create_key()
    kid = key_id(secret)
    with make_client(secret) as c:
        assert MODEL in [m.id for m in c.models.list().data]
        cli("key", "revoke", "--data-dir", DATA_DIR, kid)
        with pytest.raises(openai.AuthenticationError) as ei:
            chat(c, HELLO, max_tokens=1)
        assert_sdk_error(ei.value, secret)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
    assert key_entry(kid)["status"] == "revoked"


def test_model_allow_list_denies_other_models():
    secret = create_key("--models", "some-other-model")
    with make_client(secret) as c:
        with pytest.raises(openai.PermissionDeniedError) as ei:
            chat(c, HELLO, max_tokens=1)
        assert_sdk_error(ei.value, secret)
        with pytest.raises(openai.PermissionDeniedError):
            c.completions.create(model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=1)
        assert c.models.list().data == []


def test_model_allow_list_permits_listed_model():
    secret = create_key("--models", f"{MODEL},some-other-model")
    with make_client(secret) as c:
        ids = [m.id for m in c.models.list().data]
        assert MODEL in ids
        assert "some-other-model" not in ids  # allowed but not served
        resp = chat(c, HELLO, max_tokens=1)
        assert resp.usage.completion_tokens == 1


def test_rate_limit_rpm():
    secret = create_key("--rpm", "1")
    with make_client(secret) as c:
        first = chat(c, HELLO, max_tokens=1)
        assert first.usage.completion_tokens == 1
        with pytest.raises(openai.RateLimitError) as ei:
            chat(c, HELLO, max_tokens=1)
    e = ei.value
    assert_sdk_error(e, secret)
    retry_after = e.response.headers.get("retry-after")
    assert retry_after is not None, "429 without Retry-After"
    assert 1 <= int(retry_after) <= 60
    assert any(h.lower().startswith("x-ratelimit-") for h in e.response.headers), dict(
        e.response.headers
    )


def test_max_concurrency():
    secret = create_key("--max-concurrency", "1")
    with make_client(secret) as c:
        # A long generation, held open after its first chunk. (It is closed
        # early, so the larger max_tokens costs nothing once the server
        # cancels on disconnect.)
        held = chat(c, COUNT, max_tokens=64, stream=True)
        try:
            first = next(held)
            assert first.object == "chat.completion.chunk"
            with pytest.raises(openai.RateLimitError) as ei:
                chat(c, HELLO, max_tokens=1)
            assert_sdk_error(ei.value, secret)
            retry_after = ei.value.response.headers.get("retry-after")
            assert retry_after is not None, "429 without Retry-After"
            assert int(retry_after) >= 0
        finally:
            held.close()

        # The slot is released once the server notices the disconnect.
        deadline = time.monotonic() + 15
        while True:
            try:
                resp = chat(c, HELLO, max_tokens=1)
                break
            except openai.RateLimitError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)
        assert resp.usage.completion_tokens == 1


def test_key_rotation_with_grace():
    old = create_key()
    kid = key_id(old)
    new = cli("key", "rotate", "--data-dir", DATA_DIR, kid, "--grace", "1h")
    assert KEY_RE.match(new), f"unexpected key format: {new!r}"
    assert new != old
    with make_client(new) as c:
        assert MODEL in [m.id for m in c.models.list().data]
        assert chat(c, HELLO, max_tokens=1).usage.completion_tokens == 1
    with make_client(old) as c:
        assert MODEL in [m.id for m in c.models.list().data]
        assert chat(c, HELLO, max_tokens=1).usage.completion_tokens == 1


def test_key_list_json(main_key):
    out = cli("key", "list", "--data-dir", DATA_DIR, "--json")
    assert KEY_RE.match(main_key).group(2) not in out, "key list leaks a secret"
    keys = json.loads(out)
    entry = [k for k in keys if k.get("id") == key_id(main_key)]
    assert len(entry) == 1
    assert entry[0]["tenant"] == TENANT
    assert entry[0]["status"] == "active"
    assert entry[0]["expires_at"] is None
    for k in keys:
        assert k["status"] in ("active", "expired", "revoked")


# --------------------------------------------------------------------------
# Raw HTTP
# --------------------------------------------------------------------------


def test_malformed_json(http, main_key):
    r = http.post(
        BASE_URL + "/chat/completions",
        headers={**auth(main_key), "Content-Type": "application/json"},
        content=b'{"model": "' + MODEL.encode() + b'", "messages": [',
    )
    assert_raw_error(r, 400, main_key)


def test_messages_wrong_type(http, main_key):
    r = http.post(
        BASE_URL + "/chat/completions",
        headers=auth(main_key),
        json={"model": MODEL, "messages": "x", "max_tokens": 1},
    )
    assert_raw_error(r, 400, main_key)


def test_missing_authorization(http):
    r = http.post(
        BASE_URL + "/chat/completions",
        json={"model": MODEL, "messages": HELLO, "max_tokens": 1},
    )
    assert_raw_error(r, 401)
    r = http.get(BASE_URL + "/models")
    assert_raw_error(r, 401)


def test_non_bearer_authorization(http, main_key):
    r = http.get(BASE_URL + "/models", headers={"Authorization": f"Basic {main_key}"})
    assert_raw_error(r, 401, main_key)


def test_body_too_large(http, main_key):
    payload = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "a" * (2 * 1024 * 1024)}],
        "max_tokens": 1,
    }
    r = http.post(
        BASE_URL + "/chat/completions",
        headers={**auth(main_key), "Content-Type": "application/json"},
        content=json.dumps(payload).encode(),
    )
    assert_raw_error(r, 413, main_key)


def test_unknown_path(http, main_key):
    r = http.get(BASE_URL + "/no-such-endpoint", headers=auth(main_key))
    assert_raw_error(r, 404, main_key)


def test_raw_sse_stream(http, main_key):
    payload = {
        "model": MODEL,
        "messages": HELLO,
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    with http.stream(
        "POST", BASE_URL + "/chat/completions", headers=auth(main_key), json=payload
    ) as r:
        assert r.status_code == 200
        assert r.headers.get("content-type", "").startswith("text/event-stream")
        body = r.read().decode()
    events = parse_sse(body)
    assert events and events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == MODEL


def test_http2(main_key):
    with raw_client(http2=True) as c:
        r = c.get(BASE_URL + "/models", headers=auth(main_key))
        assert r.status_code == 200, r.text
        assert r.http_version == "HTTP/2"
        assert MODEL in [m["id"] for m in r.json()["data"]]

        payload = {
            "model": MODEL,
            "messages": HELLO,
            "max_tokens": 4,
            "temperature": 0,
            "stream": True,
        }
        with c.stream(
            "POST", BASE_URL + "/chat/completions", headers=auth(main_key), json=payload
        ) as r:
            assert r.status_code == 200
            assert r.http_version == "HTTP/2"
            body = r.read().decode()
        assert parse_sse(body)[-1] == "[DONE]"


# --------------------------------------------------------------------------
# curl
# --------------------------------------------------------------------------


def test_curl_http2_stream(main_key):
    payload = {
        "model": MODEL,
        "messages": HELLO,
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    proc = subprocess.run(
        [
            "curl",
            "-sS",
            "-N",
            "--noproxy",
            "*",
            "--max-time",
            "60",
            "--cacert",
            CACERT,
            "--http2",
            "-H",
            f"Authorization: Bearer {main_key}",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(payload),
            BASE_URL + "/chat/completions",
            "-w",
            "\n%{http_version}",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    lines = out.rstrip().splitlines()
    assert lines[-1] == "2", f"http_version line: {lines[-1]!r}"
    assert "data: [DONE]" in out
    chunks = [json.loads(e) for e in parse_sse(out) if e != "[DONE]"]
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
