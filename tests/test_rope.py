"""Multimodal RoPE positions: the official fixture, transformers' Qwen2.5-VL get_rope_index, streaming offsets."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from conftest import CASES, FIXTURE, model_args
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from infinitevl.config import InfiniteVLConfig
from infinitevl.model.rope import VisionGridError, rope_index

CONFIG = InfiniteVLConfig.from_file(FIXTURE)


def ours(inputs, mode="official", start=None):
    c = CONFIG
    return rope_index(
        inputs["input_ids"],
        image_token_id=c.image_token_id,
        video_token_id=c.video_token_id,
        spatial_merge_size=c.vision.spatial_merge_size,
        tokens_per_second=c.vision.tokens_per_second,
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=inputs.get("second_per_grid_ts"),
        attention_mask=inputs.get("attention_mask"),
        start=start,
        mode=mode,
    )


def transformers_positions(inputs):
    """transformers' own get_rope_index, fed the token types it needs (text 0, image 1, video 2)."""
    ids = inputs["input_ids"]
    types = (ids == CONFIG.image_token_id).int() + 2 * (ids == CONFIG.video_token_id).int()
    fake = SimpleNamespace(
        config=SimpleNamespace(
            vision_config=SimpleNamespace(
                spatial_merge_size=CONFIG.vision.spatial_merge_size, tokens_per_second=CONFIG.vision.tokens_per_second
            )
        ),
        get_vision_position_ids=partial(Qwen2_5_VLModel.get_vision_position_ids, None),
    )
    if inputs.get("image_grid_thw") is None and inputs.get("video_grid_thw") is None:
        T = ids.shape[1]
        return torch.arange(T).view(1, 1, T).expand(3, ids.shape[0], T)
    pos, _ = Qwen2_5_VLModel.get_rope_index(
        fake,
        ids,
        types,
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=inputs.get("second_per_grid_ts"),
        attention_mask=inputs.get("attention_mask"),
    )
    return pos


@pytest.mark.parametrize("case", CASES)
def test_official_positions_match_fixture(case, fixture_inputs, fixture_expected):
    pos, nxt = ours(model_args(fixture_inputs[case]))
    assert torch.equal(pos, fixture_expected[case]["position_ids"])
    L = fixture_inputs[case]["input_ids"].shape[1]
    assert torch.equal(nxt - L, fixture_expected[case]["rope_deltas"].view(-1))


@pytest.mark.parametrize("case", CASES)
def test_transformers_mode_matches_transformers(case, fixture_inputs):
    args = model_args(fixture_inputs[case])
    pos, _ = ours(args, mode="transformers")
    assert torch.equal(pos, transformers_positions(args))


@pytest.mark.parametrize("case", ["text", "image", "video"])
def test_both_conventions_agree_where_the_references_agree(case, fixture_inputs, fixture_expected):
    args = model_args(fixture_inputs[case])
    assert torch.equal(transformers_positions(args), fixture_expected[case]["position_ids"])
    assert torch.equal(ours(args, "official")[0], ours(args, "transformers")[0])


def test_fractional_seconds_per_grid_is_where_they_differ(fixture_inputs, fixture_expected):
    # multi: 0.5 s per grid. The released code truncates it to 0, so both video frames share t; transformers >= 5
    # keeps 0.5 * 2 tokens/s = 1 step per frame.
    args = model_args(fixture_inputs["multi"])
    official, _ = ours(args, "official")
    hf = transformers_positions(args)
    assert torch.equal(official, fixture_expected["multi"]["position_ids"])
    assert not torch.equal(official, hf)
    video = args["input_ids"][0] == CONFIG.video_token_id
    assert official[0, 0, video].unique().numel() == 1
    assert hf[0, 0, video].unique().numel() == 2


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["official", "transformers"])
def test_left_padding_does_not_move_positions(case, mode, fixture_inputs):
    args = model_args(fixture_inputs[case])
    pos, nxt = ours(args, mode)
    pad = 5
    padded = dict(args)
    padded["input_ids"] = torch.cat([torch.zeros(1, pad, dtype=torch.long), args["input_ids"]], 1)
    padded["attention_mask"] = torch.cat([torch.zeros(1, pad, dtype=torch.long), args["attention_mask"]], 1)
    pos_p, nxt_p = ours(padded, mode)
    assert torch.equal(pos_p[:, :, pad:], pos) and torch.equal(nxt_p, nxt)
    if mode == "transformers" and case != "text":
        assert torch.equal(pos_p[:, :, pad:], transformers_positions(padded)[:, :, pad:])


@pytest.mark.parametrize("case", CASES)
def test_stream_continues_across_pieces(case, fixture_inputs):
    """Positions of a whole input equal those of its pieces when each piece starts at the previous next index
    (pieces cut between vision blocks)."""
    args = model_args(fixture_inputs[case])
    ids = args["input_ids"]
    full, nxt = ours(args)
    cut = 5  # inside the leading text of every case
    first = {"input_ids": ids[:, :cut]}
    rest = {k: v for k, v in args.items() if k not in ("input_ids", "attention_mask")}
    rest["input_ids"] = ids[:, cut:]
    p1, n1 = ours(first)
    p2, n2 = ours(rest, start=n1)
    assert torch.equal(torch.cat([p1, p2], 2), full) and torch.equal(n2, nxt)


def test_grid_mismatch_names_both_numbers(fixture_inputs):
    args = dict(model_args(fixture_inputs["image"]))
    args["image_grid_thw"] = torch.tensor([[1, 8, 10]])  # 20 merged tokens; the prompt has 24
    with pytest.raises(VisionGridError, match=r"24 image placeholder tokens in a row .*grids cover 20"):
        ours(args)
    args["image_grid_thw"] = torch.tensor([[1, 8, 14]])  # 28 merged tokens; the prompt has 24
    with pytest.raises(VisionGridError, match=r"prompt has 24 image placeholder tokens where its grid .* needs 28"):
        ours(args)
    args["image_grid_thw"] = torch.tensor([[1, 8, 12], [1, 2, 2]])
    with pytest.raises(VisionGridError, match="2 image grids were given but the input has placeholders for 1"):
        ours(args)


def test_position_plan_in_slices_equals_the_whole(fixture_inputs):
    """Positions handed out a slice at a time (how prefill numbers an input of any length) equal the whole
    input's, with left padding and cuts inside vision blocks."""
    from infinitevl.model.rope import PositionPlan

    c = CONFIG
    for case in CASES:
        args = model_args(fixture_inputs[case])
        for pad in (0, 3):
            padded = dict(args)
            padded["input_ids"] = torch.cat([torch.zeros(1, pad, dtype=torch.long), args["input_ids"]], 1)
            padded["attention_mask"] = torch.cat([torch.zeros(1, pad, dtype=torch.long), args["attention_mask"]], 1)
            whole, nxt = ours(padded)
            for size in (1, 5, 17):
                plan = PositionPlan(
                    padded["input_ids"],
                    image_token_id=c.image_token_id,
                    video_token_id=c.video_token_id,
                    spatial_merge_size=c.vision.spatial_merge_size,
                    tokens_per_second=c.vision.tokens_per_second,
                    image_grid_thw=padded.get("image_grid_thw"),
                    video_grid_thw=padded.get("video_grid_thw"),
                    second_per_grid_ts=padded.get("second_per_grid_ts"),
                    attention_mask=padded["attention_mask"],
                )
                T = padded["input_ids"].shape[1]
                pieces = torch.cat([plan.take(size) for _ in range(0, T, size)], dim=2)
                assert torch.equal(pieces, whole) and torch.equal(plan.next_position, nxt)


def fp64_reference(position: int, head_dim: int, theta: float) -> torch.Tensor:
    """cos of position * inv_freq with Python floats (fp64), from the fp32 inverse frequencies the model uses."""
    import math

    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return torch.tensor([math.cos(position * float(f)) for f in inv.tolist()], dtype=torch.float64)


@pytest.mark.parametrize("position", [10**6, 2**24, 2**24 + 1, 2**30])
def test_rope_angles_stay_exact_on_long_streams(position):
    from infinitevl.model.rope import rope_cos_sin

    hd, theta = 128, 1e6  # InfiniteVL-4B
    pos = torch.full((3, 1, 1), position, dtype=torch.long)
    cos, _ = rope_cos_sin(pos, hd, theta, [16, 24, 24], torch.float32)
    expected = fp64_reference(position, hd, theta)
    assert (cos[0, 0, : hd // 2].double() - expected).abs().max() < 1e-6
    # neighbouring positions stay distinguishable
    nxt, _ = rope_cos_sin(pos + 1, hd, theta, [16, 24, 24], torch.float32)
    assert not torch.equal(cos, nxt)
