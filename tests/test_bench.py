"""`infinitevl bench --quick`: every section end to end at tiny sizes into a temporary folder, so the benchmark code
cannot rot. Checks that the JSON holds raw repetitions and provenance, that the plots are real PNGs and that the
report has its tables, targets, commands and working image links. The numbers themselves are not checked (they mean
nothing at these sizes); the laws the report relies on are, on made-up measurements."""

from __future__ import annotations

import json
import logging
import re

import pytest

from infinitevl.bench import SECTIONS, report, stream4b
from infinitevl.bench.prefill import predict_seconds
from infinitevl.bench.products import bf16_instructions
from infinitevl.cli.main import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NOTICES: list[str] = []  # transformers' kernel notices logged during the quick run


class _Kept(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    out = folder / "bench"
    # what transformers would print about its kernels during the run (its notices are said once per process)
    kept, log = _Kept(), logging.getLogger("transformers.integrations.hub_kernels")
    log.addHandler(kept)
    if hasattr(logging.Logger, "warning_once"):
        logging.Logger.warning_once.cache_clear()
    try:
        assert main(["bench", "--quick", "--quiet", "--out", str(out)]) == 0
    finally:
        log.removeHandler(kept)
    NOTICES[:] = kept.messages
    return out, folder / "bench.md"


def test_no_kernel_notices_in_the_output(quick_run):
    """transformers' "much slower" notice about its own PyTorch fallbacks is noise here: they are the reference."""
    assert not [m for m in NOTICES if "much slower" in m]


def _timings(node):
    """Every measurement record (a dict with times_s) anywhere in a JSON tree."""
    if isinstance(node, dict):
        if "times_s" in node:
            yield node
        for value in node.values():
            yield from _timings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _timings(value)


def test_every_section_writes_json_with_provenance_and_raw_measurements(quick_run):
    out, _ = quick_run
    for section in [s for s in SECTIONS if s != "ray"]:  # ray starts a cluster: test_serving_ray.py
        record = json.loads((out / f"{section}.json").read_text())
        several = "float32, bfloat16, int8, int4"
        expected = {"precision": several, "quality": several}.get(section, "float32")
        if section == "stream4b":  # its modes depend on the CPU
            names = {"bf16": "bfloat16", "fp32": "float32"}
            expected = ", ".join(names.get(m, m) for m in stream4b.plan_modes(record["settings"]))
        assert record["dtype"] == expected
        assert record["section"] == section and record["plan"] == "quick"
        assert record["command"].startswith("infinitevl bench") and "--quick" in record["command"]
        machine = record["machine"]
        assert machine["cores"] >= 1 and machine["ram_bytes"] > 0 and machine["torch"] and machine["date"]
        assert record["settings"] and record["result"]
        if section not in ("memory", "streaming", "quality"):
            found = list(_timings(record["result"]))
            assert found, section
            for timing in found:
                assert timing["repeats"] == len(timing["times_s"]) >= 1
                assert all(t > 0 for t in timing["times_s"])
                assert min(timing["times_s"]) <= timing["median_s"] <= max(timing["times_s"])


def test_sections_measure_both_models(quick_run):
    out, _ = quick_run
    load = lambda s: json.loads((out / f"{s}.json").read_text())["result"]  # noqa: E731
    ops = {r["op"] for r in load("ops")["results"]}
    assert ops == {"gdn_chunked", "gdn_step", "swa_prefill", "swa_decode"}
    assert all(r["check"]["output"]["max_abs_diff"] < 1e-3 for r in load("ops")["results"])
    machine = load("machine")
    assert machine["bandwidth"]["bandwidth"] > 0 and machine["matmul"]["flops"] > 0
    decode = load("decode")["configs"]["tiny"]
    ours = [p for p in decode["infinitevl"] if p["status"] == "measured"]
    assert len(ours) >= 2 and len({p["state_bytes"] for p in ours}) == 1
    assert all(p["floor_s"] > 0 and p["achieved_over_floor"] > 0 for p in ours)
    base = [p for p in decode["baseline"] if p["status"] == "measured"]
    assert [p["kv_bytes"] for p in base] == sorted(p["kv_bytes"] for p in base) and base[0]["kv_bytes"] > 0
    prefill = load("prefill")["configs"]["tiny"]
    assert all(p["tokens_per_s"] > 0 for p in prefill["infinitevl"] + prefill["baseline"] if p["status"] == "measured")
    memory = load("memory")["configs"]["tiny"]["points"]
    for who in ("infinitevl", "baseline"):
        point = memory[who][0]
        assert point["status"] == "measured", point
        assert point["peak_rss_bytes"] >= point["rss_end_bytes"] > 0 and point["state_bytes"] > 0
    real = load("real")["configs"]["tiny"]  # one context per model built by a real prefill, against a filled one
    for who in ("infinitevl", "baseline"):
        r = real[who]
        assert r["status"] == "measured", r
        assert r["tokens"] == r["context"] and r["prefill_s"] > 0  # the tokens went through the model
        assert r["real_state_bytes"] == r["filled_state_bytes"] > 0
        assert r["peak_rss_real_bytes"] >= r["rss_real_bytes"] > 0
    stream = load("streaming")
    for who in ("infinitevl", "baseline"):
        frames = stream[who]["frames"]
        n = stream[who]["n_frames"]
        assert n >= 4 and all(len(v) == n for v in frames.values())
        assert frames["tokens"] == sorted(frames["tokens"]) and frames["tokens"][0] > 0
        assert stream[who]["windows"]["first"]["fps_end_to_end"] > 0
    assert len(set(stream["infinitevl"]["frames"]["state_bytes"])) == 1  # constant-size state over the stream
    precision = load("precision")["modes"]
    assert list(precision) == ["fp32", "bf16", "int8", "int4"]
    for mode in precision.values():
        assert mode["status"] == "measured", mode
        assert mode["peak_bytes"] >= mode["peak_after_load_bytes"] > 0 and mode["prefill"]["tokens_per_s"] > 0
        assert [p["context"] for p in mode["decode"]] == [64, 1024] and all(p["floor_s"] > 0 for p in mode["decode"])
    assert precision["int4"]["weight_bytes"] < precision["bf16"]["weight_bytes"] < precision["fp32"]["weight_bytes"]
    quality = load("quality")
    assert quality["modes"]["fp32"]["agreement"]["kl_mean"] == 0
    assert set(quality["fixture"]) == set(quality["modes"]) == {*precision, "int8-products"}
    assert quality["modes"]["int8-products"]["agreement"]["kl_mean"] > 0  # the int8 products ran and differ
    assert all(m["demo"]["questions"] == 8 for m in quality["modes"].values())
    kv = stream["baseline"]["frames"]["state_bytes"]
    assert kv == sorted(kv) and kv[-1] > kv[0]
    controlled = stream["controlled"]["points"]  # the decoder per frame at two histories, timed in turn
    assert [p["context"] for p in controlled] == [
        stream["infinitevl"]["windows"][w]["tokens"] for w in ("window_full", "late")
    ]
    assert all(len(p["times_s"]) == 2 and p["median_s"] > 0 for p in controlled)


def test_streaming_splits_each_frame_into_its_parts(quick_run):
    """The vision column is the tower's time (the engine's prefill runs the tower module, not get_video_features),
    and decode + preprocess + vision + decoder is each frame's total."""
    out, _ = quick_run
    stream = json.loads((out / "streaming.json").read_text())["result"]
    for who in ("infinitevl", "baseline"):
        frames = stream[who]["frames"]
        assert all(v > 0 for v in frames["vision_s"]), who
        assert all(v > 0 for v in frames["decoder_s"]), who
        parts = zip(frames["decode_s"], frames["preprocess_s"], frames["vision_s"], frames["decoder_s"])
        assert [round(sum(p), 6) for p in parts] == pytest.approx(frames["total_s"], abs=1e-5)


def test_real_size_streaming_section(quick_run):
    """stream4b: every mode x stream measured, each part and floor measured, pairs half the tokens; the long stream's
    state constant; the product probe, the tower's agreement and the decode overhead recorded and rendered."""
    out, markdown = quick_run
    record = json.loads((out / "stream4b.json").read_text())
    settings, result = record["settings"], record["result"]
    default = {False: 1, True: 2}
    runs = {(r["mode"], r["size"], r["paired"], r["frames_per_step"]): r for r in result["runs"]}
    streams = {
        (s["size"], s["paired"], s.get("frames_per_step") or default[s["paired"]]): s for s in settings["streams"]
    }
    assert any(per_step > default[paired] for _, paired, per_step in streams)  # several temporal steps per prefill
    modes = stream4b.plan_modes(settings)
    assert result["today"] == modes[0] and any(m.endswith("+int8p") for m in modes)
    assert set(runs) == {(m, *key) for m in modes for key in streams}
    for (mode, size, paired, per_step), run in runs.items():
        assert run["frames"] == streams[(size, paired, per_step)]["frames"] and run["fps"] > 0
        assert len(run["state_bytes"]) == 1  # constant over the stream
        assert all(run["per_frame_s"][k] > 0 for k in ("decode_s", "preprocess_s", "tower_s", "prefill_s"))
        assert run["floors"]["tower"]["median_s"] > 0 and run["floors"]["prefill"]["median_s"] > 0
        assert run["floors"]["tower"]["calls"] > 0 and run["floors"]["prefill"]["calls"] > 0
        assert set(run["steps"]["frames"]) == {per_step}
        single = runs[(mode, size, False, 1)]
        if paired:
            assert run["tokens_per_frame"] * 2 == single["tokens_per_frame"]
        if per_step == default[paired]:
            # one temporal step per prefill multiplies as a single frame's does: the same products, the same floor
            assert run["floors"] == single["floors"]
        else:  # one prefill of several temporal steps: the same layers called on more rows
            assert run["floors"]["prefill"]["calls"] == single["floors"]["prefill"]["calls"]
            assert run["floors"]["prefill"]["median_s"] > 0
    assert result["cpu"]["torch_cpu_capability"] and result["kernels"]
    assert set(result["load_s"]) == set(modes) and all(s > 0 for s in result["load_s"].values())
    long = result["long"]
    assert long["frames"] == settings["long"]["frames"] and long["mode"] in modes
    assert len(long["state_bytes"]) == 1 and len(long["steps"]["state_bytes"]) == len(long["steps"]["frames"])
    assert long["first_quarter_s"] > 0 and long["last_quarter_s"] > 0
    probe = result["probe"]
    assert probe["size"] == settings["probe"]["size"]
    for part in ("tower", "prefill"):
        calls = runs[(probe["mode"], probe["size"], False, 1)]["floors"][part]["calls"]
        kinds = ("fp32", "bf16", "int8") if bf16_instructions() else ("fp32", "int8")
        assert set(probe[part]) == set(kinds)
        for kind in kinds:
            assert probe[part][kind]["calls"] == calls and probe[part][kind]["repeats"] == settings["probe"]["repeats"]
    agree = result["tower_agreement"]
    assert agree["dtype"] == ("bfloat16" if bf16_instructions() else "float32")
    for kind in ("own", "int8"):
        assert -1 <= agree[kind]["min"] <= agree[kind]["mean"] <= 1 and agree[kind]["tokens"] > 0
    assert agree["int8"]["linears"] > 0
    assert set(result["decode"]) == {m for m in modes if "int" in m}
    for d in result["decode"].values():
        step, mm = d["step"]["median_s"], d["products"]["median_s"]
        assert d["calls"] > 0 and d["overhead"] == pytest.approx((step - mm) / step)
    text = markdown.read_text()
    section = text[text.index("## Streaming at real size") :]
    assert "The long stream" in section and "| tower | " in section and "| prefill | " in section
    assert "cosine similarity per token" in section and "Decode: one step against its matrix products" in section
    rows = [line for line in text.splitlines() if line.startswith("| real-size streaming:")]
    sizes = {s for s, _, _ in streams}
    assert len(rows) == 4 * len(sizes) + 2 + len(result["decode"])
    assert all(line.endswith("|") and "| not judged (quick run) |" in line for line in rows)


def test_real_size_streaming_targets_judged(quick_run):
    """At full size the targets are judged: the best path against today's (bf16, single frames) at each size, the
    parts against their floors, the long stream and the decode overhead, each marked met or not met."""
    out, _ = quick_run
    record = json.loads((out / "stream4b.json").read_text())
    record["plan"] = "full"
    runs = record["result"]["runs"]
    sizes = sorted({r["size"] for r in runs})
    for size, gain in zip(sizes, (4.0, 2.0)):  # today's path made 4x / 2x slower than the best at each size
        today = next(
            r
            for r in runs
            if r["size"] == size and r["mode"] == record["result"]["today"] and r["frames_per_step"] == 1
        )
        best = max((r for r in runs if r["size"] == size and r is not today), key=lambda r: r["fps"])
        today["fps"] = best["fps"] / gain
    found = {t["target"]: t for t in report.targets({"stream4b": record})}
    for size, met in zip(sizes, (True, False)):
        today = record["result"]["today"]
        t = found[f"real-size streaming: {size}px end-to-end frames/s >= 3x today's path ({today}, single frames)"]
        assert t["met"] is met and t["section"] == "stream4b"
    long = record["result"]["long"]
    assert found["real-size streaming: the long stream's state bytes constant"]["met"] is (
        len(long["state_bytes"]) == 1
    )
    for mode, d in record["result"]["decode"].items():
        t = found[f"real-size streaming: {mode} decode step overhead outside the matrix products <= 10%"]
        assert t["met"] is (d["overhead"] <= 0.10)
    text = report.render({"stream4b": record})
    assert "| real-size streaming: " in text and "| met |" in text and "| **not met** |" in text


def test_plots_and_report(quick_run):
    out, markdown = quick_run
    for name in ("decode_latency", "prefill", "memory", "streaming_fps", "ops"):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    text = markdown.read_text()
    for heading in (
        "## Targets",
        "## The limit",
        "## Decode",
        "## Prefill",
        "## Memory",
        "## Streaming",
        "## Ops",
        "## Precision",
    ):
        assert heading in text
    assert "Quick run" in text and "infinitevl bench" in text and "float32" in text
    assert text.count("### Real tokens against filled contexts") == 2  # in the decode and the memory sections
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 5 and all((markdown.parent / link).exists() for link in links)
    # a quick run judges nothing: its sizes are too small for any target to mean something
    assert re.search(r"\| chunked gated delta rule .*\| not judged \(quick run\) \|", text)
    assert "not met" not in text and "| met |" not in text
    assert not re.search(r"\bnan\b|\binf\b", text, re.IGNORECASE)  # no measurement came out NaN or infinite


def test_only_one_section_keeps_the_others_in_the_report(quick_run, tmp_path, capsys):
    out, _ = quick_run
    copy = tmp_path / "bench"
    copy.mkdir()
    for f in out.glob("*.json"):
        (copy / f.name).write_text(f.read_text())
    before = json.loads((copy / "decode.json").read_text())
    assert (
        main(["bench", "--quick", "--quiet", "--out", str(copy), "--only", "ops", "--markdown", str(tmp_path / "r.md")])
        == 0
    )
    assert json.loads((copy / "decode.json").read_text()) == before  # untouched
    text = (tmp_path / "r.md").read_text()
    assert "## Decode" in text and "## Ops" in text and "## Streaming" in text
    capsys.readouterr()
    assert main(["bench", "--report-only", "--out", str(copy), "--markdown", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == text
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "again.md")  # where it says it wrote
    # a section left with nothing to measure (the quick plan has no 4b prefill) gives no plot and no dead link
    assert main(["bench", "--quick", "--quiet", "--out", str(copy), "--only", "prefill", "--configs", "4b"]) == 0
    text = (tmp_path / "bench.md").read_text()
    assert not (copy / "prefill.png").exists() and "prefill.png" not in text and "ops.png" in text
    assert "| prefill faster than the baseline, margin growing with length | not measured" in text


def test_bad_arguments_are_one_line_errors(capsys):
    assert main(["bench", "--only", "nonsense"]) == 1
    assert "unknown sections ['nonsense']" in capsys.readouterr().err


def test_prefill_extrapolation_recovers_a_quadratic():
    law = lambda n: 2e-4 * n + 3e-9 * n * n  # noqa: E731
    points = [(n, law(n)) for n in (1024, 4096, 16384)]
    assert predict_seconds(points, 65536) == pytest.approx(law(65536), rel=1e-6)
    assert predict_seconds(points[:1], 4096) == pytest.approx(law(1024) * 16)  # one point: pessimistic N^2


def test_targets_are_judged_from_measurements():
    def pts(key, times):
        return [{key: n, "status": "measured", "median_s": t} for n, t in times.items()]

    ours = pts("context", {1024: 1.0, 4096: 1.0, 16384: 1.0})
    slower = pts("context", {1024: 0.5, 4096: 1.5, 16384: 3.0})
    rows = report.ratios(ours, slower + [{"context": 65536, "status": "out_of_memory"}], "context")
    assert [r["ratio"] for r in rows] == [0.5, 1.5, 3.0]
    met, text = report.margin_verdict(rows, "context")
    assert met and "crossover at 4K" in text and "3.00x at 16K" in text
    met, text = report.margin_verdict(
        report.ratios(ours, pts("context", {1024: 2, 4096: 1.2, 16384: 1.1}), "context"), "context"
    )
    assert not met and "does not grow" in text


def test_a_worker_reports_its_own_peak_memory_not_its_parents():
    """Memory points run in subprocesses; a peak inherited from the (large) parent would hide the worker's own."""
    import subprocess
    import sys

    from infinitevl.bench.timing import peak_rss

    ballast = bytearray(1 << 30)  # 1 GiB, touched: the parent's peak is now above it
    ballast[::4096] = b"\x01" * len(ballast[::4096])
    assert peak_rss() >= 1 << 30
    code = "from infinitevl.bench.timing import peak_rss, rss; r = rss(); print(peak_rss(), r)"
    child_peak, child_rss = map(int, subprocess.check_output([sys.executable, "-c", code], text=True).split())
    del ballast
    assert child_rss <= child_peak < 512 << 20


def test_variants_rows_are_kept_from_the_previous_run_and_base_is_skipped_past_its_limit():
    """A later `variants` run keeps the Offline rows the previous record measured with the same widths and pattern
    (marked with that run's date and CPU) and times only the new lengths; past `dense_up_to` Base's quadratic layer
    is not timed and the report says so."""
    from infinitevl.bench import variants
    from infinitevl.bench.report import variants_md

    settings = dict(
        widths=dict(hidden=64, heads=4, kv_heads=2, head_dim=16),
        pattern=dict(sparse_chunk_size=8, sparse_top_k=4, sparse_local_tokens=32, sparse_dense_threshold=64),
        tokens=[128, 256],
        dense_up_to=128,
        budget_s=60,
    )
    first = variants.offline_prefill(settings, lambda msg: None)
    assert "base_s" in first[0] and "base_s" not in first[1] and first[1]["sdpa_s"] > 0
    previous = {
        "machine": {"date": "2026-01-02 03:04 UTC", "cpu": "Some CPU"},
        "settings": {"offline": settings},
        "result": {"offline_prefill": first[:1]},
    }
    second = variants.offline_prefill(settings, lambda msg: None, previous)
    assert second[0] == {**first[0], "measured_at": "2026-01-02 03:04 UTC, Some CPU"}
    assert second[1]["status"] == "measured" and "measured_at" not in second[1]
    other = {**settings, "pattern": {**settings["pattern"], "sparse_top_k": 2}}
    assert "measured_at" not in variants.offline_prefill(other, lambda msg: None, previous)[0]
    record = {
        "settings": {"offline": settings},
        "result": {"offline_prefill": second, "online_decode": []},
    }
    table = variants_md(record)
    assert "2026-01-02 03:04 UTC, Some CPU" in table and "not timed" in table and "this run" in table
