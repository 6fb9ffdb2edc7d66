"""Requests within the validated ranges that used to stop the server, freeze other clients or be silently misread,
each against a live server over a real socket: extreme sampling values, one request's failure inside the batched
step, stop strings, huge bodies, admission order, clients that do not read, DNS rebinding and cross-site pages,
parameters that are not honoured, and the smaller points (process memory in /metrics, logprob bytes of partial
characters, a video clock past its limit). Also the incremental detokenizer and the stop matcher against plain
references."""

from __future__ import annotations

import ctypes
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_serving import DATA, varied_model

from infinitevl.engine.runtime import InfiniteVL
from infinitevl.serving import BackgroundServer, ServerConfig, create_app, sampling
from infinitevl.serving.limits import MAX_JSON_ITEMS
from infinitevl.serving.sampling import StopMatcher, TextStream
from infinitevl.serving.schemas import MAX_STOP_CHARS, MAX_STOPS

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 8}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return varied_model(tmp_path_factory.mktemp("limits") / "tiny")


@pytest.fixture(scope="module")
def engine(model_dir) -> InfiniteVL:
    return InfiniteVL.load(model_dir)


def start(model_dir: Path, **overrides) -> BackgroundServer:
    config = ServerConfig(**{"model_name": "tiny", "media_root": DATA, "max_batch": 4, **overrides})
    return BackgroundServer(create_app(InfiniteVL.load(model_dir), config)).start()


@pytest.fixture(scope="module")
def server(model_dir):
    srv = start(model_dir)
    yield srv
    srv.stop()


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def no_eos(engine) -> dict[str, int]:
    return {str(t): -100 for t in engine.model.config.eos_token_ids}


def settled(http: httpx.Client) -> dict:
    """/health once no answer is active (an answer is sent just before the worker retires its row)."""
    deadline = time.monotonic() + 30
    while (health := http.get("/health").json())["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return health


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


# -- 1. sampling at its extremes never kills the worker; a dead worker shows in /health ---------------------------


EXTREMES = [
    {"temperature": 1e-300},
    {"temperature": 1e-40},
    {"temperature": 0.7, "top_p": 1e-300},
    {"temperature": 1.0, "repetition_penalty": 1e-300},
    {"temperature": 1.0, "repetition_penalty": 100},
    {"temperature": 2.0, "top_p": 1.0, "presence_penalty": -2, "frequency_penalty": 2},
    {"temperature": 1.0, "min_p": 1.0},
    {"temperature": 1.0, "top_k": 1, "logit_bias": {"5": 100, "6": -100}},
]


@pytest.mark.parametrize("extra", EXTREMES, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_sampling_extremes_answer_and_the_next_request_too(http, engine, extra):
    greedy = http.post("/v1/chat/completions", json={**CHAT, "logit_bias": no_eos(engine)}).json()
    body = {**CHAT, "seed": 3, "logit_bias": no_eos(engine), **extra}
    if "logit_bias" in extra:
        body["logit_bias"] = {**no_eos(engine), **extra["logit_bias"]}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()["choices"][0]
    assert r.json()["usage"]["completion_tokens"] == 8 and answer["finish_reason"] == "length"
    if extra.get("temperature", 1) < 1e-5 or extra.get("min_p") == 1.0 or extra.get("top_p", 1) < 1e-6:
        assert answer["message"]["content"] == greedy["choices"][0]["message"]["content"]  # only the top token
    again = http.post("/v1/chat/completions", json={**CHAT, "logit_bias": no_eos(engine)}).json()
    assert again["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]
    assert http.get("/health").json()["status"] == "ok"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the killed worker's
def test_health_reports_a_dead_worker_and_requests_fail_fast(model_dir):
    srv = start(model_dir)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
            worker = srv.app.state.ctx.scheduler._thread
            # an exception no request can be blamed for ends the worker thread (delivered when it next wakes)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(SystemExit))
            r = http.post("/v1/chat/completions", json=CHAT)  # wakes it up; it dies: this request is failed, not hung
            worker.join(10)
            assert not worker.is_alive()
            assert r.status_code == 503 and r.json()["error"]["code"] == "worker_dead", r.text
            health = http.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "dead"
            r = http.post("/v1/chat/completions", json=CHAT)
            assert error_of(r, 503)["code"] == "worker_dead"
            assert error_of(http.post("/v1/sessions", json={"frame_size": 56}), 503)["code"] == "worker_dead"
    finally:
        srv.stop()


# -- 2. one request's failure inside the batched step is its own ---------------------------------------------------


def test_a_request_failing_in_the_batched_step_does_not_end_another(http, engine, monkeypatch):
    adjust = sampling._adjust

    def faulty(logits, how, counts):  # the second token of the request with presence_penalty 1.5 raises
        if how.presence_penalty == 1.5 and counts:
            raise RuntimeError("injected failure")
        return adjust(logits, how, counts)

    monkeypatch.setattr(sampling, "_adjust", faulty)
    long = {**CHAT, "max_tokens": 60, "stream": True, "logit_bias": no_eos(engine)}
    pieces, finish, errors = [], [], []

    def stream() -> None:
        with (
            httpx.Client(base_url=http.base_url, timeout=60) as c,
            c.stream("POST", "/v1/chat/completions", json=long) as r,
        ):
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        errors.append(event)
                    elif event["choices"]:
                        pieces.append(event["choices"][0]["delta"].get("content") or "")
                        finish.append(event["choices"][0]["finish_reason"])

    reader = threading.Thread(target=stream)
    reader.start()
    while not pieces and reader.is_alive():
        time.sleep(0.01)
    bad = http.post(
        "/v1/chat/completions",
        json={**CHAT, "presence_penalty": 1.5, "logit_bias": no_eos(engine)},
        headers={"X-Request-Id": "req-the-bad-one"},
    )
    reader.join(60)
    error = error_of(bad, 500)
    assert "req-the-bad-one" in error["message"]
    assert not errors and finish[-1] == "length"
    alone = http.post("/v1/chat/completions", json={**long, "stream": False}).json()
    assert "".join(pieces) == alone["choices"][0]["message"]["content"]
    assert settled(http)["active"] == 0


# -- 3. stop strings: bounded, and matched in linear time -----------------------------------------------------------


def test_stop_strings_are_bounded_and_cut_where_they_begin(http, engine):
    body = {**CHAT, "max_tokens": 24, "logit_bias": no_eos(engine)}
    full = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = http.post("/v1/chat/completions", json={**body, "stop": ["never-said", stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["message"]["content"] == full[: full.index(stop)]
    long = ["x" * MAX_STOP_CHARS + str(i) for i in range(MAX_STOPS)]
    assert (
        f"{MAX_STOP_CHARS} characters"
        in error_of(http.post("/v1/chat/completions", json={**body, "stop": long}), 400)["message"]
    )
    fine = [s[:MAX_STOP_CHARS] for s in long]
    assert (
        http.post("/v1/chat/completions", json={**body, "stop": fine}).json()["choices"][0]["message"]["content"]
        == full
    )


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abc", max_size=40),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=5), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_stop_matcher_finds_what_find_finds(text, stops, cuts):
    matcher = StopMatcher(tuple(stops))
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    found = None
    for a, b in zip(bounds, bounds[1:]):
        hit = matcher.feed(text[a:b])
        seen = text[:b]
        expected = min((seen.find(s) for s in stops if s in seen), default=None)
        if found is None:
            if hit is not None:
                found = hit
                assert hit == expected
            else:
                assert expected is None
                # what is held back is exactly the longest tail that begins some stop
                tail = max((k for s in stops for k in range(1, len(s)) if seen.endswith(s[:k])), default=0)
                assert matcher.held() == tail
        if found is not None:
            break


# -- 4. bodies bounded before they are parsed deeply ----------------------------------------------------------------


def test_bodies_with_too_many_parts_prompts_or_items_are_400(http, server):
    config = server.app.state.ctx.config
    parts = [{"type": "text", "text": "a"}] * (config.max_content_parts + 1)
    r = http.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": parts}]})
    error = error_of(r, 400)
    assert error["code"] == "too_many" and error["param"] == "messages" and "content parts" in error["message"]
    prompts = {"model": "tiny", "prompt": ["hi"] * (config.max_queue + 1), "max_tokens": 1}
    error = error_of(http.post("/v1/completions", json=prompts), 400)  # it can never fit the queue: not a 429
    assert error["param"] == "prompt" and str(config.max_queue) in error["message"]
    ids = {"model": "tiny", "prompt": [5] * (config.max_request_tokens + 1), "max_tokens": 1}
    assert error_of(http.post("/v1/completions", json=ids), 400)["code"] == "context_length_exceeded"
    items = b'{"model": "tiny", "prompt": "hi", "junk": [' + b"0," * MAX_JSON_ITEMS + b"0]}"
    r = http.post("/v1/completions", content=items, headers={"Content-Type": "application/json"})
    assert "JSON items" in error_of(r, 400)["message"]
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


# -- 5. admission in order ------------------------------------------------------------------------------------------


@pytest.mark.serial
def test_a_request_for_many_rows_is_not_starved_by_later_small_ones(model_dir, engine):
    srv = start(model_dir, max_batch=2)
    stop = threading.Event()
    body = {**CHAT, "max_tokens": 6, "logit_bias": no_eos(engine)}

    def loop() -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            while not stop.is_set():
                assert c.post("/v1/chat/completions", json=body).status_code == 200

    loopers = [threading.Thread(target=loop) for _ in range(6)]  # more than the rows: the queue is never empty
    try:
        for t in loopers:
            t.start()
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            while c.get("/health").json()["queued"] < 3:
                time.sleep(0.01)
            r = c.post("/v1/chat/completions", json={**body, "n": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
    finally:
        stop.set()
        for t in loopers:
            t.join(60)
        srv.stop()


# -- 6. clients that do not read, and connections that never finish a request ---------------------------------------


@pytest.mark.serial
def test_a_client_that_does_not_read_is_paused_then_dropped(model_dir, engine):
    srv = start(model_dir, max_batch=1, stream_stall_timeout=1.0, max_request_tokens=20000, send_buffer_bytes=16384)
    silent = socket.socket()
    try:
        body = json.dumps({**CHAT, "max_tokens": 19000, "stream": True, "logit_bias": no_eos(engine)}).encode()
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        silent.connect(("127.0.0.1", srv.port))
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        silent.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)  # and never reads
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            while http.get("/health").json()["decoded_tokens"] == 0:
                time.sleep(0.01)
            r = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5})  # the only row was the silent one's
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
            health = settled(http)
            assert health["active"] == 0 and health["decoded_tokens"] < 19000, health
    finally:
        silent.close()
        srv.stop()


@pytest.mark.serial
def test_slow_headers_and_bodies_are_cut_off(model_dir):
    srv = start(model_dir, header_timeout=1.0, body_timeout=1.0)
    try:
        slow = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and no more
        assert slow.recv(1024) == b""  # closed by the server
        slow = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        slow.sendall(head + b"Content-Length: 100\r\n\r\n" + b'{"model": ')
        reply = slow.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408") and b"body_timeout" in reply, reply
    finally:
        srv.stop()


# -- 7. a server without a key answers only loopback names, and no other site ---------------------------------------


def test_dns_rebinding_and_cross_site_requests_are_refused(http, model_dir):
    for name in ("attacker.example", "127.0.0.1.attacker.example:8000", "127.attacker.example"):
        assert error_of(http.get("/v1/models", headers={"Host": name}), 403)["code"] == "host_not_allowed"
    assert http.get("/v1/models", headers={"Host": "127.0.0.2:8000"}).status_code == 200
    assert http.get("/v1/models", headers={"Host": "localhost:8000"}).status_code == 200
    assert http.get("/v1/models", headers={"Host": "[::1]:8000"}).status_code == 200
    page = {"Origin": "http://attacker.example"}
    assert error_of(http.post("/v1/sessions", json={}, headers=page), 403)["code"] == "cross_site"
    raw = json.dumps(CHAT).encode()
    r = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "text/plain"})  # a no-cors fetch's
    assert error_of(r, 415)["code"] == "bad_content_type"
    own = {"Origin": str(http.base_url).rstrip("/")}
    assert http.post("/v1/chat/completions", json=CHAT, headers=own).status_code == 200
    exposed = start(model_dir, allowed_hosts=("*",), allowed_origins=("http://app.example",))
    keyed = start(model_dir, api_key="sekret")
    try:
        r = httpx.get(exposed.url + "/v1/models", headers={"Host": "box.lan", "Origin": "http://app.example"})
        assert r.status_code == 200
        r = httpx.get(keyed.url + "/v1/models", headers={"Host": "box.lan", "Authorization": "Bearer sekret"})
        assert r.status_code == 200
    finally:
        exposed.stop()
        keyed.stop()


# -- 8. what is not honoured is refused by name; min_p, min_tokens, ignore_eos and ask logprobs work -----------------


@pytest.mark.parametrize(
    "route,extra",
    [("/v1/chat/completions", {name: value}) for name, value in [
        ("guided_json", {"type": "object"}), ("guided_regex", "a+"), ("guided_choice", ["a", "b"]),
        ("include_stop_str_in_output", True), ("audio", {"voice": "x"}), ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}), ("parallel_tool_calls", False), ("foo_bar", 1)]]
    + [("/v1/completions", {"response_format": {"type": "json_object"}})]
    + [("/v1/sessions/{sid}/ask", {name: value}) for name, value in [
        ("response_format", {"type": "json_object"}), ("tools", [{"type": "function"}])]],
)  # fmt: skip
def test_parameters_not_honoured_are_refused_by_name(http, route, extra):
    sid = http.post("/v1/sessions", json={"frame_size": 56}).json()["id"]
    body = {"question": "what?"} if "ask" in route else CHAT if "chat" in route else {"model": "tiny", "prompt": "hi"}
    error = error_of(http.post(route.format(sid=sid), json={**body, **extra}), 400)
    assert error["param"] == next(iter(extra)) and next(iter(extra)) in error["message"]


def test_min_tokens_ignore_eos_min_p_and_ask_logprobs(http, engine):
    eos = engine.model.config.eos_token_ids
    likely_eos = {str(t): 100 for t in eos}  # the end-of-turn token almost surely next
    r = http.post("/v1/chat/completions", json={**CHAT, "logit_bias": likely_eos, "min_tokens": 5}).json()
    assert r["usage"]["completion_tokens"] == 5 and r["choices"][0]["finish_reason"] == "stop"
    r = http.post("/v1/chat/completions", json={**CHAT, "logit_bias": likely_eos, "ignore_eos": True}).json()
    assert r["usage"]["completion_tokens"] == 8 and r["choices"][0]["finish_reason"] == "length"
    greedy = http.post("/v1/chat/completions", json={**CHAT, "logit_bias": no_eos(engine)}).json()
    for seed in range(3):
        sampled = {**CHAT, "logit_bias": no_eos(engine), "temperature": 1.5, "seed": seed, "min_p": 1.0}
        assert http.post("/v1/chat/completions", json=sampled).json()["choices"] == greedy["choices"]
    error = error_of(http.post("/v1/chat/completions", json={**CHAT, "min_tokens": 9}), 400)
    assert error["param"] == "min_tokens"
    sid = http.post("/v1/sessions", json={"frame_size": 56}).json()["id"]
    ask = {"question": "what?", "max_tokens": 4, "logprobs": True, "top_logprobs": 2, "logit_bias": no_eos(engine)}
    r = http.post(f"/v1/sessions/{sid}/ask", json=ask).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] == 4
    assert all(len(c["top_logprobs"]) == 2 and c["logprob"] <= c["top_logprobs"][0]["logprob"] + 1e-6 for c in content)


# -- 10. smaller points ---------------------------------------------------------------------------------------------


def test_metrics_show_process_memory_and_the_onednn_cache_bound(http, server):
    text = http.get("/metrics").text
    rss = next(line for line in text.splitlines() if line.startswith("process_resident_memory_bytes "))
    assert float(rss.split()[1]) > 0
    line = next(line for line in text.splitlines() if line.startswith("infinitevl_onednn_primitive_cache_capacity "))
    import os

    assert float(line.split()[1]) == float(os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]) > 0


def test_logprob_bytes_of_a_partial_character_are_the_tokens_own(http, engine):
    tok = engine.processor.tokenizer
    ids = engine.processor.tokenize_text("é")  # two byte-level tokens, each half of the character
    assert len(ids) == 2 and engine.processor.decode(ids[:1]) == "\ufffd"
    body = {**CHAT, "max_tokens": 2, "logprobs": True, "logit_bias": {str(ids[0]): 100}}
    content = http.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    assert content[0]["bytes"] == list("é".encode())[:1]
    assert tok.convert_ids_to_tokens(ids[0]) != "\ufffd"


def test_a_video_chunk_cannot_push_the_clock_past_its_limit(http):
    from infinitevl.serving.session_schemas import MAX_TIMESTAMP

    sid = http.post("/v1/sessions", json={"frame_size": 56}).json()["id"]
    chunk = {"video_url": {"url": "3.mp4"}, "fps": 1.0}
    error = error_of(http.post(f"/v1/sessions/{sid}/frames", json={**chunk, "timestamp_offset": MAX_TIMESTAMP}), 400)
    assert error["param"] == "timestamp_offset"
    assert http.get(f"/v1/sessions/{sid}").json()["frames"] == 0
    r = http.post(f"/v1/sessions/{sid}/frames", json={**chunk, "timestamp_offset": MAX_TIMESTAMP - 1000})
    assert r.status_code == 200, r.text
    frame = {"frames": [{"image_url": {"url": "1.jpg"}, "timestamp": MAX_TIMESTAMP}]}
    assert http.post(f"/v1/sessions/{sid}/frames", json=frame).status_code == 200  # later frames still fit


# -- incremental detokenization (issue 23) --------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["héllo 世界 🎉 naïve ✓ 𝔘", "plain words only", "日本語のテキスト"])
def test_streamed_text_pieces_concatenate_to_the_full_decode(engine, text):
    processor = engine.processor
    ids = processor.tokenize_text(text)
    for end in range(1, len(ids) + 1):  # every prefix, including those ending inside a character
        stream = TextStream(processor.decode, processor.tokenizer.backend_tokenizer)
        pieces = [stream.push(t) for t in ids[:end]]
        assert "".join(pieces) + stream.rest() == processor.decode(ids[:end])
        assert all("\ufffd" not in p for p in pieces)
    plain = TextStream(processor.decode)  # without a tokenizers backend: decoded again each time
    assert "".join(plain.push(t) for t in ids) + plain.rest() == processor.decode(ids)


def test_streamed_chunks_with_multibyte_characters_equal_the_whole_answer(http, engine):
    ids = engine.processor.tokenize_text("世界🎉")
    bias = {**no_eos(engine), **{str(t): 30 for t in ids}}
    body = {**CHAT, "max_tokens": 12, "logit_bias": bias}
    whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    assert "".join(pieces) == whole and len(pieces) > 2  # bytes of split characters, in any order, come out alike
