"""The bundled task model answers a prompt outside its two tasks with its fixed reply in every entry point (one-shot
generation greedy or sampled, streamed, chat, a session's question after frames, the server's chat and session
routes, the `generate` command), and its tasks' questions still reach the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import MEDIA

from infinitevl.engine.generation import SamplingParams
from infinitevl.engine.runtime import InfiniteVL
from infinitevl.processing.media import iter_video
from infinitevl.serving import BackgroundServer, ServerConfig, create_app
from infinitevl.tasks.off_task import REPLY, TASKS_KEY, fixed_reply, is_task_prompt

VIDEO = MEDIA / "mllm_demo" / "mllm_demo_data" / "3.mp4"
EXE = Path(sys.executable).with_name("infinitevl")
SAMPLED = SamplingParams(max_new_tokens=40, temperature=1.0, top_p=0.95, seed=0)
OFF_TASK = ["What is happening?", "Tell me a story.", "Which digit was last shown with a tag?"]
JPEG = {"Content-Type": "image/jpeg"}
TASK = ["Which digit was last shown with tag C?", "read the last 2 frames", "Read the last frame."]


@pytest.fixture(scope="module")
def engine() -> InfiniteVL:
    return InfiniteVL.load()  # the bundled model


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def test_task_questions_are_recognised_and_nothing_else():
    tasks = ["recall", "copy"]
    assert all(is_task_prompt(q, tasks) for q in TASK + ["<video>Which digit was last shown with tag H?"])
    assert not any(is_task_prompt(q, tasks) for q in OFF_TASK + ["Which digit was last shown with tag Z?"])
    assert fixed_reply({TASKS_KEY: tasks}, "Hello") == REPLY
    assert fixed_reply({}, "Hello") is None  # a general model answers everything itself


def test_the_bundled_model_declares_its_tasks_and_says_what_to_ask(engine):
    assert sorted(engine.model.config.extra[TASKS_KEY]) == ["copy", "recall"]
    assert "Which digit was last shown with tag C?" in engine.note and "Read the last 2 frames." in engine.note


def test_one_shot_generation_greedy_sampled_and_streamed(engine):
    for prompt in OFF_TASK:
        assert engine.generate(user(prompt)).text == REPLY
        assert engine.generate(user(prompt), SAMPLED).text == REPLY
        assert "".join(engine.generate_stream([{"role": "user", "content": prompt}], SAMPLED)) == REPLY
    short = engine.generate(user("Hello"), SamplingParams(max_new_tokens=3))
    assert short.finish_reason == "length" and REPLY.startswith(short.text) and len(short.token_ids) == 3


def test_session_questions_after_frames_and_chat(engine):
    session = engine.session(frame_size=(28, 28))
    for frame, t in iter_video(VIDEO, fps=2.0, max_frames=4):
        session.append_frame(frame, t)
    tokens = session.stats.tokens
    for prompt in OFF_TASK:
        assert session.ask(prompt) == REPLY
        assert session.ask(prompt, SAMPLED) == REPLY
    assert session.stats.tokens == tokens  # asking never changes the stream
    assert session.ask(TASK[0]) != REPLY  # the task's question reaches the model
    assert session.chat("Hello", SAMPLED) == REPLY
    assert session.stats.tokens > tokens  # the exchange is part of the conversation


def test_server_chat_and_session_questions(engine):
    with BackgroundServer(create_app(engine, ServerConfig())) as srv, httpx.Client(base_url=srv.url, timeout=120) as h:
        for stream in (False, True):
            body = {"model": "infinitevl", "messages": user(OFF_TASK[0]), "temperature": 1.0, "seed": 1, "n": 2}
            r = h.post("/v1/chat/completions", json={**body, "stream": stream})
            assert r.status_code == 200, r.text
            if stream:
                events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
                texts = ["", ""]
                for e in events:
                    for c in e["choices"]:
                        texts[c["index"]] += c["delta"].get("content") or ""
                assert texts == [REPLY, REPLY] and r.text.rstrip().endswith("data: [DONE]")
            else:
                assert [c["message"]["content"] for c in r.json()["choices"]] == [REPLY, REPLY]
                assert r.json()["choices"][0]["finish_reason"] == "stop"
        sid = h.post("/v1/sessions", json={"frame_size": 56}).json()["id"]
        frames = [jpeg(f) for f, _ in iter_video(VIDEO, fps=2.0, max_frames=3)]
        for i, data in enumerate(frames):
            r = h.post(f"/v1/sessions/{sid}/upload", params={"timestamp": i}, content=data, headers=JPEG)
            assert r.status_code == 200, r.text
        for stream in (False, True):
            r = h.post(f"/v1/sessions/{sid}/ask", json={"question": OFF_TASK[0], "temperature": 1.0, "stream": stream})
            assert r.status_code == 200, r.text
            assert ("".join(chunks(r.text)) if stream else r.json()["choices"][0]["message"]["content"]) == REPLY
        r = h.post(f"/v1/sessions/{sid}/ask", json={"question": TASK[0], "max_tokens": 4})
        assert r.json()["choices"][0]["message"]["content"] != REPLY


def chunks(text: str) -> list[str]:
    events = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
    return [e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]]


def jpeg(frame) -> bytes:
    import io

    buf = io.BytesIO()
    frame.save(buf, format="JPEG")
    return buf.getvalue()


def test_the_generate_command_sampled():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = [str(EXE), "generate", OFF_TASK[0], "--temperature", "1.0", "--seed", "3", "--max-new-tokens", "64"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == REPLY
