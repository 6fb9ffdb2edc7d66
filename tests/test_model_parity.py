"""Parity with the official model code, read from the official-tiny fixture (nothing expected is typed in)."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, FIXTURE, model_args

from infinitevl.model import InfiniteVLForConditionalGeneration

# The fixture's README: evaluating the official code in fp64 moves its fp32 logits by up to 3.1e-4; 1e-3 leaves
# margin for an independent fp32 implementation. Vision embeddings are a short computation: 1e-4.
LOGIT_TOL = 1e-3
EMBED_TOL = 1e-4


@pytest.fixture(scope="module", params=["legacy", "alt_keys"])
def model(request):
    folder = FIXTURE if request.param == "legacy" else FIXTURE / "alt_keys"
    return InfiniteVLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)


@pytest.mark.parametrize("case", CASES)
def test_full_forward_logits_and_positions(model, case, fixture_inputs, fixture_expected):
    expected = fixture_expected[case]
    with torch.no_grad():
        out = model(**model_args(fixture_inputs[case]))
    err = (out.logits - expected["logits_full"]).abs().max().item()
    assert err < LOGIT_TOL, f"{case}: max |logit diff| {err:.2e}"
    assert torch.equal(out.position_ids, expected["position_ids"])


@pytest.mark.parametrize("case", ["image", "video", "multi"])
def test_vision_embeddings(model, case, fixture_inputs, fixture_expected):
    args = fixture_inputs[case]
    with torch.no_grad():
        if "pixel_values" in args:
            got = model.get_image_features(args["pixel_values"], args["image_grid_thw"])
            assert (got - fixture_expected[case]["image_embeds"]).abs().max() < EMBED_TOL
        if "pixel_values_videos" in args:
            got = model.get_video_features(args["pixel_values_videos"], args["video_grid_thw"])
            assert (got - fixture_expected[case]["video_embeds"]).abs().max() < EMBED_TOL


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_is_exact(model, case, fixture_inputs, fixture_expected):
    args = model_args(fixture_inputs[case])
    expected = fixture_expected[case]["generated_ids"]
    got = model.generate(max_new_tokens=expected.shape[1], **args)
    assert torch.equal(got, expected)


def test_hidden_states_follow_the_official_convention(model, fixture_inputs, fixture_expected):
    # index 0 = embeddings, 1..L-1 = layer outputs, last = after the final norm
    with torch.no_grad():
        out = model(**model_args(fixture_inputs["text"]), output_hidden_states=True)
    hs = torch.stack(out.hidden_states)
    assert hs.shape == fixture_expected["text"]["hidden_states"].shape
    assert (hs - fixture_expected["text"]["hidden_states"]).abs().max() < LOGIT_TOL


def test_left_padding_leaves_every_row_unchanged(model, fixture_inputs):
    """A batch of the text case (shortened) and the image case, left-padded to a common length."""
    text = model_args(fixture_inputs["text"])
    image = model_args(fixture_inputs["image"])
    short = text["input_ids"][:, :45]
    L = image["input_ids"].shape[1]
    ids = torch.cat([torch.cat([torch.full((1, L - 45), 7), short], 1), image["input_ids"]])
    mask = torch.cat(
        [
            torch.cat([torch.zeros(1, L - 45, dtype=torch.long), torch.ones(1, 45, dtype=torch.long)], 1),
            image["attention_mask"],
        ]
    )
    with torch.no_grad():
        batched = model(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=image["pixel_values"],
            image_grid_thw=image["image_grid_thw"],
        ).logits
        alone_text = model(input_ids=short).logits
        alone_image = model(**image).logits
    assert (batched[0, L - 45 :] - alone_text[0]).abs().max() < 1e-4
    assert (batched[1] - alone_image[0]).abs().max() < 1e-4


def test_vision_feature_count_must_match_placeholders(model, fixture_inputs):
    from infinitevl.model.rope import VisionGridError

    args = dict(model_args(fixture_inputs["image"]))
    args["pixel_values"] = args["pixel_values"][:80]  # 20 merged tokens for 24 placeholders
    args["image_grid_thw"] = torch.tensor([[1, 8, 10]])
    with pytest.raises(VisionGridError, match="24 image placeholder tokens but the image inputs give 20"):
        model(**args)
