"""`infinitevl miniature --v2` end to end at the quick budget: v1's hybrid, Base, Online and Offline trained from one
teacher with the same steps, compared on held-out streams, the page's block written."""

from __future__ import annotations

import json

import torch

from infinitevl.config import FULL, LINEAR, SINK, SLIDING, SPARSE
from infinitevl.tasks import miniature_v2
from infinitevl.tasks.miniature import Budget


def test_v2_miniature_trains_four_models_with_one_budget_and_reports_their_memory(tmp_path):
    page = tmp_path / "variants.md"
    page.write_text("before\n<!-- miniature-v2:start -->\nold\n<!-- miniature-v2:end -->\nafter\n")
    report = miniature_v2.run(tmp_path / "run", Budget.quick(), readme=page, tasks=("recall",))

    root = tmp_path / "run"
    layers = {
        key: json.loads((root / folder / "final" / "config.json").read_text())  # the official, flat format
        for key, folder in (("v1", "hybrid-swa-last"), ("base", "v2-base"), ("online", "v2-online"))
    }
    assert layers["v1"]["layer_types"] == [LINEAR, LINEAR, LINEAR, SLIDING]
    assert layers["base"]["layer_types"] == [LINEAR, LINEAR, LINEAR, FULL]
    assert layers["online"]["layer_types"] == [LINEAR, LINEAR, LINEAR, SINK]
    assert layers["online"]["num_sink_tokens"] == miniature_v2.ONLINE["num_sink_tokens"]
    offline = json.loads((root / "v2-offline" / "final" / "config.json").read_text())
    assert offline["layer_types"] == [LINEAR, LINEAR, LINEAR, SPARSE]
    assert {k: offline[k] for k in miniature_v2.OFFLINE} == miniature_v2.OFFLINE
    # the same long-sequence fine-tuning steps for all four, Online and Offline started from Base's sft
    steps = {p.parent.parent.name: json.loads(p.read_text())["steps"] for p in root.glob("*/sft-long/DONE")}
    assert steps == {n: Budget.quick().sft_long for n in ("hybrid-swa-last", "v2-base", "v2-online", "v2-offline")}
    from safetensors.torch import load_file

    sft = load_file(root / "v2-base" / "sft" / "final" / "model.safetensors")
    for name in ("online", "offline"):  # the variant starts from Base's weights, byte for byte
        start = load_file(root / f"v2-{name}" / "start" / "model.safetensors")
        assert start.keys() == sft.keys() and all(torch.equal(start[k], sft[k]) for k in sft)

    s = report.summary
    names = list(miniature_v2.NAMES.values())
    assert list(s) == names
    lengths = Budget.quick().eval_lengths
    state = {n: [s[n]["state_bytes"][L] for L in lengths] for n in names}
    v1, base, online, off = (state[miniature_v2.NAMES[k]] for k in ("v1", "base", "online", "offline"))
    assert len(set(v1)) == 1 and len(set(online)) == 1  # fixed-size: the same bytes at every length
    assert online[0] > v1[0]  # the sinks' keys and values on top of the same window
    assert base[0] < base[-1] and off[0] < off[-1]  # every key kept: grows with the stream
    assert off[-1] > base[-1]  # plus the chunks' mean keys and the positions

    text = page.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    block = text.split("<!-- miniature-v2:start -->")[1]
    assert all(n in block for n in names) and "miniature/miniature-v2.png" in block
    assert (tmp_path / "miniature" / "miniature-v2.png").stat().st_size > 0
    assert (tmp_path / "miniature" / "results-v2.md").read_text().startswith("# The miniature, v2 variants")
