"""The OpenAI-compatible endpoints over a real socket: the official `openai` client and raw HTTP against a server
running in a background thread, answers checked against the engine used directly, batching measured."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from conftest import MEDIA, ROOT, randomize

from infinitevl.cli.main import build_parser
from infinitevl.defaults import make_untrained_model
from infinitevl.engine.generation import SamplingParams
from infinitevl.engine.runtime import InfiniteVL
from infinitevl.model import InfiniteVLForConditionalGeneration
from infinitevl.serving import BackgroundServer, ServerConfig, create_app

pytestmark = pytest.mark.serial  # timings: run alone, not beside other tests

DATA = MEDIA / "mllm_demo" / "mllm_demo_data"
RUNNING = re.compile(r"Uvicorn running on (http://[0-9.]+:[0-9]+)")


def serve_process(args: list[str], timeout: float = 90) -> tuple[subprocess.Popen, str, list[str]]:
    """`infinitevl serve --port 0 ARGS` in its own process: the process, its URL and its stderr lines (a list that
    keeps growing while it runs)."""
    cmd = [str(Path(sys.executable).with_name("infinitevl")), "serve", "--port", "0", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    deadline = time.monotonic() + timeout
    while not (url := next((m[1] for m in map(RUNNING.search, lines) if m), None)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the server did not start:\n" + "".join(lines))
        time.sleep(0.05)
    return proc, url, lines


def varied_model(folder: Path) -> Path:
    """The untrained stand-in with larger random weights: the stand-in's own small initialisation gives nearly the
    same greedy answer (mostly empty special tokens) to every prompt, which would make equality checks weak."""
    make_untrained_model(folder)
    randomize(InfiniteVLForConditionalGeneration.from_pretrained(folder), seed=0).save_pretrained(folder)
    return folder


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return varied_model(tmp_path_factory.mktemp("serving") / "tiny")


@pytest.fixture(scope="module")
def engine(model_dir) -> InfiniteVL:
    """The reference: the same model used in-process."""
    return InfiniteVL.load(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    config = ServerConfig(model_name="tiny", media_root=DATA, max_batch=8)
    with BackgroundServer(create_app(InfiniteVL.load(model_dir), config)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def no_eos(engine) -> dict[str, int]:
    """A logit bias that forbids the end-of-turn token, so that every answer runs to max_tokens."""
    return {str(i): -100 for i in engine.model.config.eos_token_ids}


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def ask_photo(question: str, url: str) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def test_models_health_and_openapi(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = health(server)
    assert h["status"] == "ok" and h["model_kind"] == "untrained" and "untrained" in h["note"] and h["max_batch"] == 8
    schema = httpx.get(server.url + "/openapi.json").json()
    for path in (
        "/v1/chat/completions",
        "/v1/sessions",
        "/v1/sessions/{session_id}/ask",
        "/v1/sessions/{session_id}/snapshot",
        "/v1/sessions/{session_id}/restore",
    ):
        assert path in schema["paths"], path
    assert "FramesRequest" in schema["components"]["schemas"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_chat_with_an_image_matches_the_engine(client, engine):
    photo = DATA / "1.jpg"
    reply = client.chat.completions.create(
        model="tiny", messages=ask_photo("Who are they?", data_url(photo, "image/jpeg")), max_tokens=12
    )
    ref = engine.generate(
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": str(photo)}, {"type": "text", "text": "Who are they?"}],
            }
        ],
        SamplingParams(max_new_tokens=12),
    )
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.choices[0].message.content == ref.text
    assert reply.choices[0].finish_reason == ref.finish_reason
    assert reply.usage.prompt_tokens == ref.prompt_tokens > 100  # the image's tokens are counted
    assert reply.usage.completion_tokens == len(ref.token_ids) > 0
    assert reply.usage.total_tokens == ref.prompt_tokens + len(ref.token_ids)


def test_streaming_equals_non_streaming(client, server, engine):
    messages = ask_photo("What is in the picture?", "file://" + str(DATA / "2.jpg"))  # under the media root
    kwargs = dict(model="tiny", messages=messages, max_tokens=16, temperature=0.9, top_p=0.95, seed=3)
    whole = client.chat.completions.create(**kwargs)
    pieces, finishes, usage = [], [], None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
        usage = chunk.usage or usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finishes.append(choice.finish_reason)
    assert "".join(pieces) == whole.choices[0].message.content
    assert len([p for p in pieces if p]) > 1  # it did stream
    assert [f for f in finishes if f] == [whole.choices[0].finish_reason]
    assert usage.completion_tokens == whole.usage.completion_tokens and usage.prompt_tokens == whole.usage.prompt_tokens
    # raw HTTP: server-sent events, the last one [DONE]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "stream": True}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_with_a_video_matches_the_engine(client, engine):
    video = DATA / "2.avi"
    content = [
        {"type": "video_url", "video_url": {"url": data_url(video, "video/x-msvideo")}},
        {"type": "text", "text": "What happens?"},
    ]
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=8)
    ref = engine.generate(
        [
            {
                "role": "user",
                "content": [{"type": "video", "video": str(video)}, {"type": "text", "text": "What happens?"}],
            }
        ],
        SamplingParams(max_new_tokens=8),
    )
    assert reply.choices[0].message.content == ref.text
    assert reply.usage.prompt_tokens == ref.prompt_tokens > 500


def test_eight_concurrent_clients_are_batched_and_beat_sequential(client, server, no_eos):
    prompts = [f"Tell me about picture number {i}, please." for i in range(8)]

    def ask(prompt: str) -> tuple[str, int]:
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=48, logit_bias=no_eos
        )
        return r.choices[0].message.content, r.usage.completion_tokens

    steps0 = health(server)["decode_steps"]
    t0 = time.perf_counter()
    sequential = [ask(p) for p in prompts]
    t_sequential = time.perf_counter() - t0
    steps1 = health(server)["decode_steps"]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(ask, prompts))
    t_concurrent = time.perf_counter() - t0
    steps2 = health(server)["decode_steps"]
    print(
        f"\n8 requests x 48 tokens: sequential {t_sequential:.2f} s in {steps1 - steps0} decode steps, "
        f"concurrent {t_concurrent:.2f} s in {steps2 - steps1} steps ({t_sequential / t_concurrent:.1f}x)"
    )
    assert concurrent == sequential  # batching changes nothing in the answers (greedy)
    assert all(n == 48 for _, n in sequential) and len(set(sequential)) == 8
    assert steps1 - steps0 == 8 * 47  # one stream per step
    assert steps2 - steps1 <= (steps1 - steps0) / 4  # eight streams share the steps (the time is printed, not judged)


def test_remote_urls_need_to_be_enabled(client):
    with pytest.raises(openai.BadRequestError, match="remote URLs are disabled"):
        client.chat.completions.create(model="tiny", messages=ask_photo("Who?", "https://example.com/a.jpg"))


def test_stop_strings_cut_the_answer(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Say something."}], max_tokens=40)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    i = next(i for i in range(2, len(full) - 1) if full[i : i + 2].isascii() and full[i : i + 2].isprintable())
    stop = full[i : i + 2]
    cut = client.chat.completions.create(**kwargs, stop=[stop, "never appears"])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < 40
    streamed = client.chat.completions.create(**kwargs, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.index(stop)]


def test_a_client_that_disconnects_stops_its_generation(server, no_eos):
    before = health(server)
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Go on forever."}],
        "max_tokens": 20000,
        "stream": True,
        "logit_bias": no_eos,
    }
    with (
        httpx.Client(base_url=server.url, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        received = 0
        for line in r.iter_lines():
            received += line.startswith("data: ")
            if received == 3:
                break  # leaving both blocks closes the connection mid-answer
    deadline = time.monotonic() + 10
    while (now := health(server))["active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert now["active"] == 0 and now["queued"] == 0
    assert now["cancelled"] == before["cancelled"] + 1
    assert now["decoded_tokens"] - before["decoded_tokens"] < 2000  # stopped long before 20000 tokens
    # a client waiting for a whole (non-streamed) answer that gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=httpx.Timeout(30, read=0.3)
        )
    deadline = time.monotonic() + 10
    while (now := health(server))["active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert now["active"] == 0 and now["cancelled"] == before["cancelled"] + 2
    assert now["decoded_tokens"] - before["decoded_tokens"] < 4000


def test_the_serve_command(model_dir, tmp_path):
    """`infinitevl serve` in a subprocess: says the model is untrained, serves with a key, and saves its sessions
    when interrupted, for the next server to find."""
    state_dir = tmp_path / "state"
    args = ["--model", str(model_dir), "--api-key", "k1", "--state-dir", str(state_dir), "--log-level", "info"]
    proc, url, lines = serve_process(args, timeout=60)
    try:
        assert any("untrained" in line for line in lines)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0)
        reply = client.chat.completions.create(
            model="infinitevl", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert reply.usage.completion_tokens == 4
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer k1"}) as http:
            sid = http.post("/v1/sessions", json={}).json()["id"]
            tokens = http.post(f"/v1/sessions/{sid}/text", json={"text": "A quiet street."}).json()["session"]["tokens"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    assert (state_dir / "sessions" / f"{sid}.safetensors").exists()
    config = ServerConfig(model_name="tiny", state_dir=state_dir)
    with BackgroundServer(create_app(InfiniteVL.load(model_dir), config)) as srv:
        assert httpx.get(f"{srv.url}/v1/sessions/{sid}").json()["tokens"] == tokens


def readme_serving_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "serving.md").read_text()
    section = text.split("\n## Serving\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def test_the_readme_serving_examples_work(model_dir, tmp_path):
    """docs/serving.md's Serving section as written: its command's options exist, its curl and openai examples run."""
    (_, start), (_, calls), (_, python) = readme_serving_blocks()
    args = build_parser().parse_args(shlex.split(start)[1:])
    config = ServerConfig(model_name="infinitevl", api_key=args.api_key, state_dir=tmp_path, media_root=MEDIA)
    with BackgroundServer(create_app(InfiniteVL.load(model_dir), config)) as srv:
        script = calls.replace("http://127.0.0.1:8000", srv.url)
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        assert '"error"' not in out and out.count('"object":"chat.completion"') == 1
        assert out.count("data: [DONE]") == 1 and '"frames_appended":7' in out and '"deleted":true' in out
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(python.replace("http://127.0.0.1:8000", srv.url), {"__name__": "__readme__"})
        usage = re.search(r" (stop|length) (\d+)\n", printed.getvalue())  # the answer, its finish reason, usage
        assert usage and int(usage[2]) > 100
