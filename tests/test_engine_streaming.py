"""The engine's central promise: any split of a stream gives the result of one full pass, in constant memory."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, model_args, randomize, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infinitevl.engine.generation import decode_step, prefill

TOL = 1e-3  # fp32, logits of magnitude ~15; the official code differs from its own full pass by up to 2e-4


@pytest.mark.parametrize("case", CASES)
def test_cached_path_reproduces_the_official_cache(case, fixture_model, fixture_inputs, fixture_expected):
    args = model_args(fixture_inputs[case])
    P = int(fixture_inputs[case]["prefill_len"])
    ids = args.pop("input_ids")
    args.pop("attention_mask")
    state = fixture_model.new_state()
    rows = [prefill(fixture_model, state, ids[:, :P], **args)]
    for t in range(P, ids.shape[1]):
        rows.append(decode_step(fixture_model, state, ids[:, t]))
    got = torch.stack(rows, 1)
    assert (got - fixture_expected[case]["logits_cached"]).abs().max() < TOL
    assert (got - fixture_expected[case]["logits_full"][:, P - 1 :]).abs().max() < TOL


def run_split(model, inputs: dict, cuts: list[int], chunk: int, n_decode: int) -> torch.Tensor:
    """Logits of every position, fed as: prefill calls ending at `cuts` (in chunks of `chunk`), then the last
    `n_decode` tokens one at a time. Embeddings and positions come from the whole input, so cuts may fall inside
    a vision block."""
    ids = inputs["input_ids"]
    T = ids.shape[1]
    vision = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        embeds = model.embed(
            ids,
            vision.get("pixel_values"),
            vision.get("image_grid_thw"),
            vision.get("pixel_values_videos"),
            vision.get("video_grid_thw"),
        )
    positions, next_position = model.rope_index(
        ids, None, vision.get("image_grid_thw"), vision.get("video_grid_thw"), vision.get("second_per_grid_ts")
    )
    state = model.new_state()
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < T - n_decode)), T - n_decode]
    out = []
    for s, e in zip(bounds, bounds[1:]):
        if e > s:
            nxt = positions[:, :, :e].amax(dim=(0, 2)) + 1 if e < T else next_position
            out.append(
                prefill(
                    model,
                    state,
                    ids[:, s:e],
                    inputs_embeds=embeds[:, s:e],
                    position_ids=positions[:, :, s:e],
                    next_position=nxt,
                    chunk_size=chunk,
                    return_all_logits=True,
                )
            )
    state.next_position.copy_(positions[:, :, : T - n_decode].amax(dim=(0, 2)) + 1)
    for t in range(T - n_decode, T):
        out.append(decode_step(model, state, ids[:, t]).unsqueeze(1))
    return torch.cat(out, 1)


def full_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


SPLITS = st.fixed_dictionaries(
    {
        "cuts": st.lists(st.integers(1, 200), max_size=4),
        "chunk": st.integers(1, 40),
        "n_decode": st.integers(1, 12),
    }
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(split=SPLITS, case=st.sampled_from(CASES))
def test_fixture_model_any_split_equals_full_pass(split, case, fixture_model, fixture_inputs):
    inputs = {k: v for k, v in model_args(fixture_inputs[case]).items() if k != "attention_mask"}
    got = run_split(fixture_model, inputs, **split)
    assert (got - full_logits(fixture_model, inputs)).abs().max() < TOL


def multimodal_input(model, seed: int, text: int = 30):
    """Text, an image (4x6 merged tokens), text, a 4-frame video (2 x 2x3 tokens), text: far longer than a window
    of 8."""
    c = model.config
    g = torch.Generator().manual_seed(seed)

    def words(n):
        return torch.randint(0, 370, (n,), generator=g).tolist()

    ids = (
        words(text)
        + [c.vision_start_token_id]
        + [c.image_token_id] * 24
        + [c.vision_end_token_id]
        + words(text)
        + [c.vision_start_token_id]
        + [c.video_token_id] * 12
        + [c.vision_end_token_id]
        + words(text)
    )
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": torch.randn(96, 1176, generator=g),
        "image_grid_thw": torch.tensor([[1, 8, 12]]),
        "pixel_values_videos": torch.randn(48, 1176, generator=g),
        "video_grid_thw": torch.tensor([[2, 4, 6]]),
        "second_per_grid_ts": torch.tensor([1.0]),
    }


@pytest.fixture(scope="module")
def random_models():
    return [
        tiny_model(seed=s, **kw)
        for s, kw in [
            (11, {"sliding_window": 8}),
            (12, {"sliding_window": 5, "num_linear_key_value_heads": 2}),
            (13, {"num_hidden_layers": 5, "sliding_window": 16}),
        ]
    ]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(split=SPLITS, which=st.integers(0, 2), seed=st.integers(0, 3))
def test_random_models_any_split_equals_full_pass(split, which, seed, random_models):
    model = random_models[which]
    inputs = multimodal_input(model, seed)
    assert inputs["input_ids"].shape[1] > 4 * model.config.text.sliding_window
    got = run_split(model, inputs, **split)
    assert (got - full_logits(model, inputs)).abs().max() < TOL


def test_batched_left_padded_prefill_and_decode_equal_single_streams():
    model = randomize(tiny_model(seed=5, sliding_window=6), seed=5)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 370, (1, 30), generator=g), torch.randint(0, 370, (1, 19), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 11, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    state = model.new_state(2)
    first = prefill(model, state, ids, mask, chunk_size=7)
    nxt = torch.randint(0, 370, (2, 6), generator=g)
    steps = [first] + [decode_step(model, state, nxt[:, i]) for i in range(6)]
    for row, seq in enumerate((a, b)):
        alone = full_logits(model, {"input_ids": torch.cat([seq, nxt[row : row + 1]], 1)})
        L = seq.shape[1]
        for i, logits in enumerate(steps):
            assert (logits[row] - alone[0, L - 1 + i]).abs().max() < TOL


def test_first_token_of_a_fresh_stream_can_be_a_decode_step():
    model = tiny_model(seed=8)
    ids = torch.randint(0, 370, (1, 30), generator=torch.Generator().manual_seed(1))
    state = model.new_state()
    steps = torch.stack([decode_step(model, state, ids[:, t]) for t in range(ids.shape[1])], 1)
    assert (steps - full_logits(model, {"input_ids": ids})).abs().max() < TOL


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk=st.integers(1, 60), which=st.integers(0, 2), seed=st.integers(0, 3))
def test_prefill_embeds_per_chunk_and_equals_the_full_pass(chunk, which, seed, random_models):
    """prefill itself (not given embeddings or positions) with images and a video, chunks cutting through the
    vision blocks: the vision tower runs per block (a video per group of frames) as the chunks reach it."""
    model = random_models[which]
    inputs = multimodal_input(model, seed)
    ids = inputs.pop("input_ids")
    state = model.new_state()
    got = prefill(model, state, ids, chunk_size=chunk, return_all_logits=True, **inputs)
    full = model(input_ids=ids, **inputs)
    assert (got - full.logits).abs().max() < TOL
    assert torch.equal(state.next_position, full.next_position)


def test_vision_tower_runs_per_block_and_per_group_of_frames():
    model = tiny_model(seed=4)
    inputs = multimodal_input(model, 0)  # an image of 24 tokens, then a video of 2 steps x 6 tokens
    grids = []
    handle = model.model.visual.register_forward_hook(
        lambda m, args, kwargs, out: grids.append(kwargs["grid_thw"].tolist()), with_kwargs=True
    )
    try:
        ids = inputs.pop("input_ids")
        prefill(model, model.new_state(), ids, chunk_size=6, **inputs)
    finally:
        handle.remove()
    assert grids == [[[1, 8, 12]], [[1, 4, 6]], [[1, 4, 6]]]  # the image, then each 6-token frame on its own


def test_batched_prefill_with_images_in_every_row_equals_single_streams():
    """Two left-padded rows with their own images: features are taken in row-major order, as a full pass does."""
    model = tiny_model(seed=6, sliding_window=8)
    c = model.config
    g = torch.Generator().manual_seed(2)
    words = lambda n: torch.randint(0, 370, (n,), generator=g).tolist()  # noqa: E731
    a = words(9) + [c.vision_start_token_id] + [c.image_token_id] * 24 + [c.vision_end_token_id] + words(7)
    b = words(4) + [c.vision_start_token_id] + [c.image_token_id] * 4 + [c.vision_end_token_id] + words(3)
    pix_a, pix_b = torch.randn(96, 1176, generator=g), torch.randn(16, 1176, generator=g)
    grid_a, grid_b = torch.tensor([[1, 8, 12]]), torch.tensor([[1, 4, 4]])
    pad = len(a) - len(b)
    ids = torch.tensor([a, [0] * pad + b])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    state = model.new_state(2)
    got = prefill(
        model,
        state,
        ids,
        mask,
        chunk_size=5,
        pixel_values=torch.cat([pix_a, pix_b]),
        image_grid_thw=torch.cat([grid_a, grid_b]),
    )
    for row, (seq, pix, grid) in enumerate(((a, pix_a, grid_a), (b, pix_b, grid_b))):
        alone = model(input_ids=torch.tensor([seq]), pixel_values=pix, image_grid_thw=grid).logits[0, -1]
        assert (got[row] - alone).abs().max() < TOL
