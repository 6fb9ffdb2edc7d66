"""Checkpoint files: round trips, sharding, both spellings, and errors that name what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FIXTURE, model_args
from safetensors.torch import load_file, save_file

from infinitevl.checkpoint import CheckpointError, to_disk_name
from infinitevl.config import InfiniteVLConfig
from infinitevl.model import InfiniteVLForConditionalGeneration as Model


def logits(model, inputs):
    with torch.no_grad():
        return model(**model_args(inputs)).logits


@pytest.fixture
def fixture_copy(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, folder, ignore=shutil.ignore_patterns("alt_keys"))
    return folder


def test_save_reload_is_identical_in_official_format(fixture_model, fixture_inputs, tmp_path):
    out = fixture_model.save_pretrained(tmp_path / "saved")
    written = load_file(str(out / "model.safetensors"))
    original = load_file(str(FIXTURE / "model.safetensors"))
    assert set(written) == set(original)  # legacy spelling, no lm_head: the official key set
    reloaded = Model.from_pretrained(out)
    for case in ("multi", "text"):
        assert torch.equal(logits(reloaded, fixture_inputs[case]), logits(fixture_model, fixture_inputs[case]))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "infinite_vl" and "vision_config" in cfg and "text_config" not in cfg


def test_sharded_save_and_bf16_storage(fixture_model, fixture_inputs, tmp_path):
    out = fixture_model.save_pretrained(tmp_path / "sharded", max_shard_size="300KB", dtype=torch.bfloat16)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    # the fixture's weights are exactly representable in bf16: storing them so loses nothing
    reloaded = Model.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(logits(reloaded, fixture_inputs["image"]), logits(fixture_model, fixture_inputs["image"]))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_nested_text_config_reads_the_same(fixture_copy):
    flat = InfiniteVLConfig.from_file(FIXTURE)
    shutil.copy(FIXTURE / "config.save_pretrained.json", fixture_copy / "config.json")
    nested = InfiniteVLConfig.from_file(fixture_copy)
    assert nested.text == flat.text and nested.vision.depth == flat.vision.depth
    assert nested.image_token_id == flat.image_token_id
    Model.from_pretrained(fixture_copy)  # and the weights still load strictly


def test_missing_unexpected_and_misshaped_tensors_are_named(fixture_copy):
    path = fixture_copy / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.3.self_attn.A_log"]
    tensors["model.layers.1.self_attn.extra.weight"] = torch.zeros(2)
    tensors["visual.merger.mlp.2.bias"] = torch.zeros(7)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError) as err:
        Model.from_pretrained(fixture_copy)
    msg = str(err.value)
    assert "missing: model.layers.3.self_attn.A_log" in msg
    assert "unexpected: model.layers.1.self_attn.extra.weight" in msg
    assert "model.visual.merger.mlp.2.bias (file (7,), model (64,))" in msg


def test_truncated_file_and_missing_shard(fixture_copy, fixture_model, tmp_path):
    path = fixture_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        Model.from_pretrained(fixture_copy)
    out = fixture_model.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard files that are missing: {victim.name}"):
        Model.from_pretrained(out)


def test_both_spellings_in_one_file_is_refused(fixture_copy):
    path = fixture_copy / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.language_model.norm.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="spelled twice"):
        Model.from_pretrained(fixture_copy)


def test_unresolvable_hub_id_is_a_clear_error():
    with pytest.raises(CheckpointError, match="could not be resolved on the hub"):
        Model.from_pretrained("hustvl/InfiniteVL")


def test_config_keeps_unknown_keys_and_round_trips(tmp_path):
    raw = json.loads((FIXTURE / "config.json").read_text())
    raw["some_future_field"] = {"a": 1}
    cfg = InfiniteVLConfig.from_dict(raw)
    again = InfiniteVLConfig.from_dict(json.loads(cfg.to_json()))
    assert again.extra["some_future_field"] == {"a": 1}
    assert again.text == cfg.text and again.vision == cfg.vision
    for key in ("attn_implementation", "auto_map", "architectures", "use_cache", "max_window_layers"):
        assert json.loads(cfg.to_json())[key] == raw[key]


def test_config_validation_names_the_problem():
    raw = json.loads((FIXTURE / "config.json").read_text())
    with pytest.raises(ValueError, match="num_linear_key_value_heads 3 must divide num_linear_heads 4"):
        InfiniteVLConfig.from_dict({**raw, "num_linear_key_value_heads": 3})
    with pytest.raises(ValueError, match="layer_types has 2 entries"):
        InfiniteVLConfig.from_dict({**raw, "layer_types": ["linear_attention", "sliding_attention"]})
    with pytest.raises(ValueError, match="unknown layer types"):
        InfiniteVLConfig.from_dict({**raw, "layer_types": ["mamba"] * 8})


def test_disk_names_are_the_legacy_spelling():
    assert to_disk_name("model.visual.blocks.0.attn.qkv.weight") == "visual.blocks.0.attn.qkv.weight"
    assert to_disk_name("model.language_model.layers.2.self_attn.A_log") == "model.layers.2.self_attn.A_log"
