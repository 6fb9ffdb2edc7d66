"""The server on Ray Serve (a local cluster, two CPU replicas of the bundled model, one shared state directory):
requests for a session reach one replica; the `openai` client, the web page's requests and lm-eval work through Ray's
proxy unchanged; and when one replica's process is killed with SIGKILL in the middle of an append, every session
answers through the same URL with exactly its acknowledged appends (token counts, and answers equal to in-process
reference sessions fed the same appends)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from conftest import ROOT
from test_serving import DATA
from test_serving_eval import documented_eval_commands
from test_serving_sessions import frame_item, jpeg

from infinitevl.cli.main import build_parser
from infinitevl.engine.generation import SamplingParams
from infinitevl.engine.runtime import InfiniteVL
from infinitevl.processing.media import iter_video, load_image

pytestmark = pytest.mark.serial

QUESTION = {"question": "What did you see?", "max_tokens": 8}
SIZE = 56


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`infinitevl serve --ray --replicas 2` (a local Ray cluster): (URL, state directory)."""
    state_dir = tmp_path_factory.mktemp("ray") / "state"
    port = free_port()
    exe = Path(sys.executable).with_name("infinitevl")
    cmd = [str(exe), "serve", "--ray", "--replicas", "2", "--port", str(port), "--state-dir", str(state_dir),
           "--media-root", str(DATA)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not any(f"at {url}" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines[-50:])
            time.sleep(0.2)
        yield url, state_dir
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        with contextlib.suppress(ProcessLookupError):  # Ray's agents can outlive their cluster by minutes
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def engine() -> InfiniteVL:
    return InfiniteVL.load()


def replica(response: httpx.Response) -> str:
    return response.headers["x-replica"]


def scaling_doc_config() -> dict:
    text = (ROOT / "docs" / "scaling.md").read_text()
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, flags=re.S)[1])


def test_the_documented_config_file_and_serve_run_arguments_build_the_deployment(tmp_path):
    from infinitevl.serving.ray_deploy import build

    config = scaling_doc_config()
    app = config["applications"][0]
    assert app["import_path"] == "infinitevl.serving.ray_deploy:build"
    deployment = build({**app["args"], "state_dir": str(tmp_path)})._bound_deployment
    assert deployment.num_replicas == app["args"]["replicas"]
    # `serve run infinitevl.serving.ray_deploy:build key=value ...` passes strings
    args = {"state_dir": str(tmp_path), "replicas": "3", "max_batch": "4", "allowed_origins": "a.example,b.example"}
    deployment = build(args)._bound_deployment
    assert deployment.num_replicas == 3
    server = deployment.init_args[1]
    assert server["max_batch"] == 4 and server["allowed_origins"] == ("a.example", "b.example")
    with pytest.raises(ValueError, match="max_batch: not a int"):
        build({"state_dir": str(tmp_path), "max_batch": "many"})
    with pytest.raises(ValueError, match="unknown settings max_bach"):
        build({"state_dir": str(tmp_path), "max_bach": 4})
    with pytest.raises(ValueError, match="state_dir is required"):
        build({"replicas": 2})
    text = (ROOT / "docs" / "scaling.md").read_text()
    commands = [c for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for c in block.splitlines()]
    assert len([c for c in commands if c.startswith("infinitevl serve --ray")]) == 2
    for command in commands:
        if command.startswith("infinitevl serve"):  # every option documented exists
            assert build_parser().parse_args(shlex.split(command)[1:]).ray
    scaled = build({"state_dir": str(tmp_path), "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8})
    auto = scaled._bound_deployment._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 4, 8)


def test_the_openai_client_through_the_ray_proxy(cluster, engine):
    url, _ = cluster
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Say something."}]
    reply = client.chat.completions.create(model="infinitevl", messages=messages, max_tokens=8)
    expected = engine.generate(messages, SamplingParams(max_new_tokens=8)).text
    assert reply.choices[0].message.content == expected
    stream = client.chat.completions.create(model="infinitevl", messages=messages, max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    assert [m.id for m in client.models.list()] == ["infinitevl"]


def test_the_web_pages_requests_through_the_ray_proxy(cluster):
    """What the page (infinitevl/serving/web) asks for, in its order: the page, a session, raw frame uploads, a
    streamed question, a snapshot and its restore, the session list and the health line."""
    url, _ = cluster
    photos = [jpeg(f) for f, _ in iter_video(DATA / "3.mp4", fps=2.0, max_frames=2)]
    with httpx.Client(base_url=url, timeout=120) as http:
        page = http.get("/")
        assert page.status_code == 200 and "<script" in page.text
        assets = re.findall(r'(?:src|href)="(/[^"]+)"', page.text)
        assert len(assets) >= 2
        for asset in assets:
            assert http.get(asset).status_code == 200, asset
        sid = http.post("/v1/sessions", json={"frame_size": SIZE}).json()["id"]
        served_by = set()
        for i, photo in enumerate(photos):
            r = http.post(f"/v1/sessions/{sid}/upload?timestamp={i * 0.5:.3f}", content=photo,
                          headers={"Content-Type": "image/jpeg"})  # fmt: skip
            assert r.status_code == 200 and r.json()["session"]["frames"] == i + 1, r.text
            served_by.add(replica(r))
        snap = http.post(f"/v1/sessions/{sid}/snapshot").json()["id"]
        with http.stream("POST", f"/v1/sessions/{sid}/ask", json={**QUESTION, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            served_by.add(replica(r))
        assert r.status_code == 200 and lines[-1] == "data: [DONE]"
        assert http.post(f"/v1/sessions/{sid}/restore", json={"snapshot_id": snap}).json()["frames"] == 2
        assert sid in [s["id"] for s in http.get("/v1/sessions").json()["data"]]
        assert http.get("/health").json()["status"] == "ok"
        assert len(served_by) == 1  # one replica served every request for the session


def test_lm_eval_through_the_ray_proxy(cluster, tmp_path):
    url, _ = cluster
    command = documented_eval_commands()[0]  # the multiple-choice task: log-likelihoods through /v1/completions
    args = shlex.split(command.replace("http://127.0.0.1:8000", url))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    exe = Path(sys.executable).with_name("lm_eval")
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(exe), *args, "--output_path", str(out)], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(out.rglob("results_*.json"))


def test_the_benchmarks_measurements_through_the_ray_proxy(cluster):
    """bench/ray.py's measurements (its full run starts its own cluster: `infinitevl bench --only ray`)."""
    from infinitevl.bench import ray as bench

    url, _ = cluster
    frames = [jpeg(f) for f, _ in iter_video(DATA / "1.mp4", fps=2.0, max_frames=2)]
    t = bench.throughput(url, 2, frames, SIZE)
    assert t["tokens"] > 0 and t["frames_per_s"] > 0 and t["replicas_used"] >= 1
    sid = httpx.post(f"{url}/v1/sessions", json={"frame_size": SIZE}).json()["id"]
    cost = bench.request_cost(url, sid, 3)
    assert {k: v["repeats"] for k, v in cost.items()} == {"health": 3, "session_info": 3}


def test_every_replicas_metrics_through_rays_metrics_endpoint(cluster):
    """The proxy's /metrics answers for one replica; Ray's own metrics endpoint (what Prometheus scrapes on each
    node) has every replica's series, tagged with the replica."""
    url, _ = cluster
    replicas = set()
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(40):  # the replicas' names, from requests that land on each
            replicas.add(http.get("/health", headers={"x-session-id": f"probe-{i}"}).headers["x-replica"])
        assert "infinitevl_queue_depth" in http.get("/metrics").text
    assert len(replicas) == 2
    port = int(next(Path("/tmp/ray/session_latest").glob("metrics_export_port_*")).read_text().strip())
    deadline = time.monotonic() + 90
    while True:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        lines = [line for line in text.splitlines() if "infinitevl_queue_depth" in line and "replica=" in line]
        if all(any(r in line for line in lines) for r in replicas) or time.monotonic() > deadline:
            break
        time.sleep(2)
    for r in replicas:
        assert any(r in line for line in lines), (r, lines)


def retrying(call, seconds: float = 90.0) -> httpx.Response:
    """A client that retries while the cluster replaces a dead replica (connection errors and 5xx)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            r = call()
            if r.status_code < 500:
                return r
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            return r
        time.sleep(0.5)


def test_sigkill_of_a_replica_mid_append_keeps_every_acknowledged_append(cluster, engine):
    url, _ = cluster
    photos = [(jpeg(f), t) for f, t in iter_video(DATA / "1.mp4", fps=2.0, max_frames=3)]
    texts = {}  # session -> the appends it acknowledged, in order
    with httpx.Client(base_url=url, timeout=120) as http:
        owners: dict[str, str] = {}
        for i in range(6):  # sessions until both replicas hold some
            sid = http.post("/v1/sessions", json={"frame_size": SIZE}).json()["id"]
            r = http.post(f"/v1/sessions/{sid}/text", json={"text": f"Session number {i}."})
            assert r.status_code == 200, r.text
            owners[sid], texts[sid] = replica(r), [("text", f"Session number {i}.")]
            if len(set(owners.values())) == 2 and i >= 3:
                break
        assert len(set(owners.values())) == 2, owners
        for sid in owners:
            for photo, t in photos:
                r = http.post(f"/v1/sessions/{sid}/frames", json={"frames": [frame_item(photo, t)]})
                assert r.status_code == 200 and replica(r) == owners[sid], r.text
                texts[sid].append(("frame", photo, t))
            r = http.post(f"/v1/sessions/{sid}/ask", json=QUESTION)
            assert r.status_code == 200 and replica(r) == owners[sid]
        acked = {sid: http.get(f"/v1/sessions/{sid}").json() for sid in owners}

        victim_sid = next(iter(owners))
        victim = owners[victim_sid]
        pid = int(victim.rsplit(":", 1)[1])
        health = {"x-session-id": victim_sid}  # routed like the session's requests: to the victim
        chunks = http.get("/health", headers=health).json()["prefill_chunks"]
        long = {"video_url": {"url": "1.mp4"}, "fps": 8.0, "timestamp_offset": 20.0}
        outcome: list = []

        def append() -> None:
            try:
                outcome.append(httpx.post(f"{url}/v1/sessions/{victim_sid}/frames", json=long, timeout=120))
            except httpx.HTTPError as err:
                outcome.append(err)

        thread = threading.Thread(target=append)
        thread.start()
        while http.get("/health", headers=health).json()["prefill_chunks"] < chunks + 4:  # some frames are in
            assert thread.is_alive(), outcome
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        thread.join(120)
        assert isinstance(outcome[0], httpx.HTTPError) or outcome[0].status_code >= 500, "the append finished"

        for sid, before in acked.items():
            back = retrying(lambda sid=sid: http.get(f"/v1/sessions/{sid}"))
            assert back.status_code == 200, back.text
            assert {k: back.json()[k] for k in ("tokens", "frames", "status")} == {
                k: before[k] for k in ("tokens", "frames", "status")
            }, sid
            answer = retrying(lambda sid=sid: http.post(f"/v1/sessions/{sid}/ask", json=QUESTION))
            ref = engine.session(frame_size=(SIZE, SIZE))
            for item in texts[sid]:
                if item[0] == "text":
                    ref.append_text(item[1])
                else:
                    ref.append_frame(load_image(item[1]), item[2])
            expected = ref.ask(QUESTION["question"], SamplingParams(max_new_tokens=8))
            assert answer.json()["choices"][0]["message"]["content"] == expected, sid
            assert answer.headers["x-replica"] != victim  # the killed replica is gone
        short = {**long, "fps": 1.0}  # the lost frames were never recorded: their timestamps are accepted again
        r = retrying(lambda: http.post(f"/v1/sessions/{victim_sid}/frames", json=short))
        assert r.status_code == 200, r.text
