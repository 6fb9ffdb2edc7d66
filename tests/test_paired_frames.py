"""Paired live frames (`StreamSession(pair_frames=True)`): two frames per temporal step, placed exactly as a video
file's pairs; a held first frame answered around, flushed before other input, and kept by snapshots."""

from __future__ import annotations

import pytest
import torch
from conftest import MEDIA, tiny_model
from PIL import Image, ImageOps

import infinitevl.engine.session as session_module
from infinitevl.defaults import tiny_tokenizer
from infinitevl.engine.generation import SamplingParams
from infinitevl.engine.session import StreamSession
from infinitevl.processing.media import MediaError
from infinitevl.processing.processor import Processor

PHOTOS = MEDIA / "mllm_demo" / "mllm_demo_data"
REAL = {name: getattr(session_module, name) for name in ("prefill", "prefill_steps")}
FPS = 1.0  # a video file sampled at 1 frame/s has 2 s per pair: its pairs sit where live pairs' timestamps put them


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def processor(model):
    return Processor(tiny_tokenizer(model.config), model.config, max_pixels=224 * 224)


@pytest.fixture(scope="module")
def frames():
    photos = [Image.open(PHOTOS / f"{i}.jpg").convert("RGB").resize((336, 336)) for i in (1, 2, 3)]
    return photos + [ImageOps.mirror(p) for p in photos[:2]]  # 5 frames: the last one is left without a partner


def frame_size(processor, frames) -> tuple[int, int]:
    """The frame size the engine's own video path picks for these frames."""
    _, gh, gw = (int(x) for x in processor.encode_frames(frames, FPS).grid_thw[0])
    return gh * 14, gw * 14


def recorded(monkeypatch, model):
    """Record the token ids and positions of every prefill a session makes (positions from the engine's own
    `position_plan` where the session leaves them to it)."""
    calls = []

    def spy(name):
        def run(model_, state, ids, *, position_ids=None, next_position=None, **kwargs):
            pos = position_ids
            if pos is None:
                plan = model.position_plan(
                    ids,
                    None,
                    kwargs.get("image_grid_thw"),
                    kwargs.get("video_grid_thw"),
                    kwargs.get("second_per_grid_ts"),
                    start=state.next_position,
                )
                pos = plan.take(ids.shape[1])
            calls.append((ids[0].clone(), pos[:, 0].clone()))
            return REAL[name](model_, state, ids, position_ids=position_ids, next_position=next_position, **kwargs)

        return run

    for name in REAL:
        monkeypatch.setattr(session_module, name, spy(name))
    return calls


def states_equal(a, b) -> bool:
    ta, tb = (s.state.layers for s in (a, b))
    return all(
        torch.equal(x, y) for la, lb in zip(ta, tb) for x, y in zip(la.tensors().values(), lb.tensors().values())
    ) and torch.equal(a.state.next_position, b.state.next_position)


def test_live_pairs_are_a_video_files_pairs(model, processor, frames, monkeypatch):
    size = frame_size(processor, frames)
    video_calls = recorded(monkeypatch, model)
    video = StreamSession(model, processor, frame_size=size)
    video.append_video(frames, fps=FPS)
    video.append_text("What happened?")
    live_calls = recorded(monkeypatch, model)
    live = StreamSession(model, processor, frame_size=size, pair_frames=True)
    added = [live.append_frame(f, i / FPS) for i, f in enumerate(frames)]
    assert added[0::2][:2] == [0, 0] and all(n > 0 for n in added[1::2])  # first frames are held
    assert live.stats.pending_frames == 1 and live.stats.frames == 4
    live.append_text("What happened?")  # the fifth frame goes in alone, as the video file repeats its odd last one
    assert live.stats.pending_frames == 0 and live.stats.frames == 5
    assert len(live_calls) > len(video_calls)  # the live frames really went in step by step
    ids_v, pos_v = (torch.cat(x, dim=-1) for x in zip(*video_calls))
    ids_l, pos_l = (torch.cat(x, dim=-1) for x in zip(*live_calls))
    assert torch.equal(ids_l, ids_v)
    assert torch.equal(pos_l, pos_v)
    n_video = int((ids_v == model.config.video_token_id).sum())
    assert n_video == len(frames[::2]) * (size[0] // 28) * (size[1] // 28)  # one step per pair, not per frame
    assert torch.equal(live.state.next_position, video.state.next_position)
    for la, lb in zip(live.state.layers, video.state.layers):  # the tower ran per pair vs per file: same features
        for x, y in zip(la.tensors().values(), lb.tensors().values()):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_a_question_between_the_frames_of_a_pair_answers_from_what_is_complete(model, processor, frames):
    size = frame_size(processor, frames)
    sampling = SamplingParams(max_new_tokens=6)
    live = StreamSession(model, processor, frame_size=size, pair_frames=True)
    for i, f in enumerate(frames[:3]):
        live.append_frame(f, i / FPS)
    complete = StreamSession(model, processor, frame_size=size, pair_frames=True)
    for i, f in enumerate(frames[:2]):
        complete.append_frame(f, i / FPS)
    assert states_equal(live, complete)  # the held frame is not in the state
    assert live.stats.as_dict()["pending_frames"] == 1 and complete.stats.pending_frames == 0
    assert live.ask("What is shown?", sampling) == complete.ask("What is shown?", sampling)
    assert live.stats.pending_frames == 1  # still held after the question: the next frame completes the pair
    live.append_frame(frames[3], 3 / FPS)
    assert live.stats.pending_frames == 0 and live.stats.frames == 4


def test_a_held_frame_survives_save_and_restore(model, processor, frames, tmp_path):
    size = frame_size(processor, frames)
    straight = StreamSession(model, processor, frame_size=size, pair_frames=True)
    saved = StreamSession(model, processor, frame_size=size, pair_frames=True)
    for i, f in enumerate(frames[:3]):
        straight.append_frame(f, i / FPS)
        saved.append_frame(f, i / FPS)
    path = saved.save(tmp_path / "held.safetensors")
    restored = StreamSession.restore(path, model, processor, frame_size=size)  # the setting comes from the file
    assert restored.pair_frames and restored.stats.pending_frames == 1
    for s in (straight, restored):
        s.append_frame(frames[3], 3 / FPS)
        s.append_text("and then")
    assert states_equal(straight, restored)
    assert restored.stats.frames == straight.stats.frames == 4


def test_bad_frames_leave_a_held_frame_and_the_state_alone(model, processor, frames, tmp_path):
    size = frame_size(processor, frames)
    live = StreamSession(model, processor, frame_size=size, pair_frames=True)
    live.append_frame(frames[0], 5.0)
    held, meta = live.held, live.metadata()
    with pytest.raises(MediaError, match="earlier than the previous one"):
        live.append_frame(frames[1], 4.0)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(MediaError):
        live.append_frame(broken, 6.0)
    assert live.held is held and live.metadata() == meta and live.stats.frames == 0


def test_unpaired_sessions_are_unchanged(model, processor, frames):
    """The default still puts every frame in both slots of its own step."""
    size = frame_size(processor, frames)
    live = StreamSession(model, processor, frame_size=size)
    n = live.append_frame(frames[0], 0.0)
    assert n == 1 + (size[0] // 28) * (size[1] // 28) and live.held is None and live.stats.frames == 1
