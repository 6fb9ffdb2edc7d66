"""Hundreds of malformed requests (hypothesis) to every route of a live server: valid bodies with one field replaced by
anything JSON can hold (huge and non-finite numbers, special-token strings, deep nesting), fields removed or added,
raw bytes, wrong content types, odd query strings and path parameters. None may get a 5xx, every error has the
OpenAI shape, and the server is healthy and answers correctly afterwards. Then every sampling parameter at its
extremes (vanishing and maximal temperature, top_p, min_p, penalties, logit biases, n, min_tokens, ignore_eos),
beside another client's greedy stream that must keep giving exactly its own answer."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serving import DATA, varied_model

from infinitevl.engine.runtime import InfiniteVL
from infinitevl.serving import BackgroundServer, ServerConfig, create_app

VALID = {
    ("POST", "/v1/chat/completions"): {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
    },
    ("POST", "/v1/completions"): {"model": "tiny", "prompt": "hi", "max_tokens": 2, "logprobs": 1, "echo": True},
    ("POST", "/v1/sessions"): {"frame_size": 56, "system_prompt": "You watch."},
    ("POST", "/v1/sessions/{session_id}/frames"): {"frames": [{"image_url": {"url": "1.jpg"}, "timestamp": 1.0}]},
    ("POST", "/v1/sessions/{session_id}/text"): {"text": "a remark"},
    ("POST", "/v1/sessions/{session_id}/ask"): {"question": "what?", "max_tokens": 2},
    ("POST", "/v1/sessions/{session_id}/restore"): {"snapshot_id": "snap_0123456789abcdef"},
    ("POST", "/v1/sessions/{session_id}/snapshot"): {},
    ("POST", "/v1/sessions/{session_id}/upload"): {},
    ("GET", "/v1/sessions/{session_id}"): None,
    ("DELETE", "/v1/sessions/{session_id}"): None,
    ("GET", "/v1/sessions"): None,
    ("GET", "/v1/models"): None,
    ("GET", "/v1/models/{model_id}"): None,
    ("GET", "/health"): None,
    ("HEAD", "/health"): None,
    ("GET", "/version"): None,
    ("GET", "/metrics"): None,
    ("GET", "/openapi.json"): None,
}
SPECIAL = ["<|im_end|>", "<|im_start|>system\n", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "\x00", "\ud800"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**64, -(2**63) - 1, 10**400, -1, 0, 2**31]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e300, -1e300, 1e-300]),
    st.text(max_size=40),
    st.sampled_from(SPECIAL),
    st.sampled_from(["data:image/png;base64,AAAA", "data:video/mp4;base64,", "../../etc/passwd", "file:///etc/passwd",
                     "http://127.0.0.1:1/x.jpg", "1.jpg", "3.mp4", "sess_" + "0" * 24]),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def paths(body) -> list[tuple]:
    """Every key path into a JSON body."""
    out: list[tuple] = []
    if isinstance(body, dict):
        for k, v in body.items():
            out += [(k,), *[(k, *p) for p in paths(v)]]
    elif isinstance(body, list):
        for i, v in enumerate(body):
            out += [(i,), *[(i, *p) for p in paths(v)]]
    return out


@st.composite
def requests(draw, session_id: str):
    (method, template), valid = draw(st.sampled_from(sorted(VALID.items(), key=str)))
    path = template.replace("{model_id}", draw(st.sampled_from(["tiny", "gpt-4o", "", "%00", "a/b"])))
    sid = draw(st.sampled_from([session_id, session_id, "sess_nope", "sess_" + "f" * 24, "%2e%2e", "x" * 300]))
    path = path.replace("{session_id}", sid)
    if draw(st.booleans()):
        path += "?" + "&".join(
            f"{k}={draw(st.sampled_from(['inf', 'nan', '-1', '1e999', '1e300', '0.5', 'x', '']))}"
            for k in draw(st.lists(st.sampled_from(["timestamp", "fps", "timestamp_offset", "junk"]), max_size=3))
        )
    headers = {"Content-Type": draw(st.sampled_from(["application/json", "image/jpeg", "video/mp4", "text/plain", ""]))}
    kind = draw(st.sampled_from(["mutate", "mutate", "mutate", "delete", "add", "value", "bytes"]))
    body = json.loads(json.dumps(valid)) if valid is not None else {}
    if kind == "bytes":
        content = draw(st.binary(max_size=300))
    else:
        if kind == "value":
            body = draw(values)
        elif kind in ("mutate", "delete") and paths(body):
            where = draw(st.sampled_from(paths(body)))
            parent = body
            for key in where[:-1]:
                parent = parent[key]
            if kind == "delete":
                del parent[where[-1]]
            else:
                parent[where[-1]] = draw(values)
        elif isinstance(body, dict):
            body[draw(st.sampled_from(["n", "seed", "stream", "logprobs", "top_logprobs", "stop", "logit_bias",
                                       "response_format", "max_tokens", "prompt", "video_url", "fps"]))] = draw(values)  # fmt: skip
        content = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    return method, path, headers, content


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir: Path = varied_model(tmp_path_factory.mktemp("fuzz") / "tiny")
    config = ServerConfig(
        model_name="tiny",
        media_root=DATA,
        state_dir=tmp_path_factory.mktemp("state"),
        max_body_bytes=64 * 1024,
        max_request_tokens=256,
        default_max_tokens=4,
        max_sessions=6,
        max_video_frames=4,
    )
    with BackgroundServer(create_app(InfiniteVL.load(model_dir), config)) as srv:
        yield srv


def test_malformed_requests_never_get_a_5xx(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        session_id = http.post("/v1/sessions", json={"frame_size": 56}).json()["id"]
        seen: dict[int, int] = {}

        @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(requests(session_id))
        def check(request):
            method, path, headers, content = request
            r = http.request(method, path, headers=headers, content=content if method != "GET" else None)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, (method, path, content[:300], r.text[:500])
            if r.status_code >= 400 and method != "HEAD":
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text

        check()
        # the draws reached both answers and several kinds of refusal (which kinds varies from run to run)
        assert any(s < 300 for s in seen) and len([s for s in seen if s >= 400]) >= 2, seen
        assert sum(n for s, n in seen.items() if s >= 400) > 100, seen
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["queued"] == 0 and health["active"] == 0
        r = http.post("/v1/chat/completions", json=VALID[("POST", "/v1/chat/completions")])
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


EXTREME_SAMPLING = st.fixed_dictionaries(
    {},
    optional={
        "temperature": st.sampled_from([0, 1e-300, 1e-40, 1e-6, 1e-5, 0.3, 2]),
        "top_p": st.sampled_from([1e-300, 1e-40, 1e-8, 0.5, 1]),
        "top_k": st.sampled_from([0, 1, 2, 10**9]),
        "min_p": st.sampled_from([0, 1e-300, 0.5, 1]),
        "repetition_penalty": st.sampled_from([1e-300, 1e-10, 0.5, 1, 100]),
        "presence_penalty": st.sampled_from([-2, 0, 2]),
        "frequency_penalty": st.sampled_from([-2, 0, 2]),
        "logit_bias": st.dictionaries(st.sampled_from(["0", "5", "380", "381", "383"]), st.sampled_from([-100, 100])),
        "n": st.integers(1, 3),
        "seed": st.sampled_from([0, 2**64 - 1, -(2**63)]),
        "min_tokens": st.integers(0, 3),
        "ignore_eos": st.booleans(),
        "stream": st.booleans(),
    },
)


def test_sampling_at_its_extremes_beside_a_healthy_stream(server):
    """Every accepted sampling value answers 200 with tokens, while another client's greedy stream, running the
    whole time, keeps giving exactly the answer it gives alone."""
    import threading

    healthy = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "a story"}],
        "max_tokens": 24,
        "logit_bias": {"380": -100, "381": -100},  # no end of turn: all 24 tokens
        "stream": True,
    }

    def streamed(http: httpx.Client) -> str:
        with http.stream("POST", "/v1/chat/completions", json=healthy) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert not [e for e in events if "error" in e], events
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])

    with httpx.Client(base_url=server.url, timeout=60) as http:
        alone = http.post("/v1/chat/completions", json={**healthy, "stream": False}).json()["choices"][0]
        assert alone["finish_reason"] == "length"
        answers, stop = [], threading.Event()

        def keep_streaming() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as own:
                while not stop.is_set():
                    answers.append(streamed(own))

        reader = threading.Thread(target=keep_streaming)
        reader.start()
        try:

            @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(EXTREME_SAMPLING)
            def check(extra):
                body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
                r = http.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, (extra, r.text[:300])
                if not extra.get("stream"):
                    assert len(r.json()["choices"]) == extra.get("n", 1)
                    assert r.json()["usage"]["completion_tokens"] >= min(extra.get("min_tokens", 0), 4)
                else:
                    assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text[-300:]

            check()
        finally:
            stop.set()
            reader.join(120)
        assert answers and all(a == alone["message"]["content"] for a in answers), (alone, answers)
        assert http.get("/health").json()["status"] == "ok"
