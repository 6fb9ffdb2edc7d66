"""Processing: resizing rules, patch layout (checked against transformers' processor), videos read with PyAV."""

from __future__ import annotations

import pytest
import torch
from conftest import MEDIA
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from infinitevl.config import tiny_config
from infinitevl.defaults import tiny_tokenizer
from infinitevl.processing.media import MediaError, load_image, read_video
from infinitevl.processing.processor import Processor, smart_resize

DATA = MEDIA / "mllm_demo" / "mllm_demo_data"


@pytest.fixture(scope="module")
def processor():
    config = tiny_config()
    return Processor(tiny_tokenizer(config), config, min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)


@pytest.mark.parametrize("name", ["1.jpg", "2.jpg", "3.jpg"])
def test_images_match_transformers_processor(processor, name):
    image = load_image(DATA / name)
    ours = processor.encode_image(image)
    ref = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)(images=[image], return_tensors="pt")
    assert torch.equal(ours.grid_thw, ref["image_grid_thw"])
    torch.testing.assert_close(ours.pixel_values, ref["pixel_values"].float())
    t, h, w = ours.grid_thw[0].tolist()
    assert (h * 14) % 28 == 0 and (w * 14) % 28 == 0
    assert 4 * 28 * 28 <= h * w * 14 * 14 <= 64 * 28 * 28
    assert ours.num_tokens == h * w // 4


@pytest.mark.parametrize("size", [(100, 10), (13, 13), (150, 1), (300, 27), (5, 90), (640, 11)])
def test_small_and_thin_images_are_sized_as_transformers_sizes_them(processor, size):
    """Crops of a real photo with a side under 14 px: the grid transformers' own processor gives."""
    image = load_image(DATA / "1.jpg").crop((0, 0, *size))
    ours = processor.encode_image(image)
    ref = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)(images=[image], return_tensors="pt")
    assert ours.grid_thw.tolist() == ref["image_grid_thw"].tolist()
    torch.testing.assert_close(ours.pixel_values, ref["pixel_values"].float())


def test_smart_resize_bounds_and_aspect():
    for hw in [(10, 2000), (3000, 4000), (37, 41), (448, 448)]:
        h, w = smart_resize(*hw, min_pixels=56 * 56, max_pixels=448 * 448)
        assert h % 28 == 0 and w % 28 == 0 and 56 * 56 <= h * w <= 448 * 448
    assert smart_resize(448, 448, max_pixels=448 * 448) == (448, 448)  # 256 tokens per 448x448 frame
    with pytest.raises(MediaError, match="aspect ratio"):
        smart_resize(1, 1000)


def test_video_rows_pair_consecutive_frames(processor):
    a, b = load_image(DATA / "1.jpg"), load_image(DATA / "3.jpg").resize((300, 168))
    video = processor.encode_frames([a, b], fps=2.0)
    single_a = processor.encode_frames([a, a], fps=2.0)
    single_b = processor.encode_frames([b, b], fps=2.0)
    rows = video.pixel_values.view(-1, 3, 2, 196)
    assert torch.equal(rows[:, :, 0], single_a.pixel_values.view(-1, 3, 2, 196)[:, :, 0])
    assert torch.equal(rows[:, :, 1], single_b.pixel_values.view(-1, 3, 2, 196)[:, :, 1])
    assert video.second_per_grid == 1.0 and video.grid_thw[0, 0] == 1
    # a still image is the same frame twice, like a live frame at that size
    image = processor.encode_image(a)
    _, h, w = image.grid_thw[0].tolist()
    frame = processor.encode_frame(a, size=(h * 14, w * 14))
    assert torch.equal(image.pixel_values, frame.pixel_values)
    assert torch.equal(frame.pixel_values.view(-1, 3, 2, 196)[:, :, 0], frame.pixel_values.view(-1, 3, 2, 196)[:, :, 1])


@pytest.mark.parametrize("name", ["1.mp4", "3.mp4", "2.avi"])
def test_videos_are_sampled_at_the_requested_rate(name):
    video = read_video(DATA / name, fps=2.0, max_frames=10)
    assert len(video.frames) == 10
    gaps = [b - a for a, b in zip(video.timestamps, video.timestamps[1:])]
    assert all(0.45 <= g <= 0.55 for g in gaps), gaps
    assert video.frames[0].mode == "RGB"
    full = read_video(DATA / name, fps=1.0)
    assert abs(len(full.frames) - full.timestamps[-1] - 1) <= 1  # one per second over the whole file


def test_encode_video_file_gives_grid_and_seconds(processor):
    v = processor.encode_video(DATA / "2.avi", fps=2.0, max_frames=5)
    assert v.grid_thw[0, 0].item() == 3  # 5 frames, padded to 6, in pairs
    assert v.second_per_grid == 1.0
    assert v.pixel_values.shape[0] == v.grid_thw.prod().item()


def test_chat_prompt_expands_placeholders(processor):
    prompt = processor.prompt(
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": DATA / "2.jpg"}, {"type": "text", "text": "Who is he?"}],
            }
        ]
    )
    ids = prompt.input_ids[0].tolist()
    c = processor.config
    assert ids.count(c.image_token_id) == prompt.images[0].num_tokens
    assert ids[ids.index(c.image_token_id) - 1] == c.vision_start_token_id
    text = processor.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert text.endswith("Who is he?<|im_end|>\n<|im_start|>assistant\n")
    inputs = prompt.model_inputs()
    assert inputs["pixel_values"].shape[0] == inputs["image_grid_thw"].prod().item()


def test_unreadable_media_is_named(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(MediaError, match="x.jpg: not an image file"):
        load_image(tmp_path / "x.jpg")
    with pytest.raises(MediaError, match="no such file"):
        read_video(tmp_path / "none.mp4")
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    with pytest.raises(MediaError, match="exceeds the limit"):
        load_image(tmp_path / "tiny.png", max_pixels=8)
