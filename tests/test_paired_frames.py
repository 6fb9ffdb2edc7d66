"""Paired live frames (`StreamSession(pair_frames=True)`): two frames per temporal step, placed exactly as a video
file's pairs; a held first frame answered around, flushed before other input, and kept by snapshots. Several
temporal steps per prefill (`frames_per_step`): the same tokens and positions as one step at a time, the tower run
once per prefill."""

from __future__ import annotations

import json

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
    assert n == 1 + (size[0] // 28) * (size[1] // 28) and live.held == () and live.stats.frames == 1


def live_run(model, processor, size, frames, times, monkeypatch, **options):
    """A live session fed `frames` at `times` and closed by text: (its session, the prefills it made, the tower calls
    it made)."""
    calls = recorded(monkeypatch, model)
    towers = []
    visual = model.model.visual
    hook = visual.register_forward_hook(lambda m, args, out: towers.append(args[0].shape[0]))
    try:
        live = StreamSession(model, processor, frame_size=size, **options)
        for f, t in zip(frames, times):
            live.append_frame(f, t)
        live.append_text("What happened?")
    finally:
        hook.remove()
    return live, calls, towers


@pytest.mark.parametrize(
    "paired, per_step, times",
    [
        (True, 4, [0.0, 1.0, 2.0, 3.0, 4.0]),  # two pairs per prefill, the odd fifth frame alone at the end
        (False, 3, [0.0, 0.2, 0.2, 3.7, 9.0]),  # irregular times: equal stamps, a gap, a pause
        (True, 6, [0.0, 0.5, 0.5, 2.0, 7.5]),  # every frame held until the text comes
    ],
)
def test_several_steps_per_prefill_are_the_same_tokens_and_positions(
    model, processor, frames, monkeypatch, paired, per_step, times
):
    size = frame_size(processor, frames)
    one, one_calls, one_towers = live_run(model, processor, size, frames, times, monkeypatch, pair_frames=paired)
    many, calls, towers = live_run(
        model, processor, size, frames, times, monkeypatch, pair_frames=paired, frames_per_step=per_step
    )
    ids_1, pos_1 = (torch.cat(x, dim=-1) for x in zip(*one_calls))
    ids_n, pos_n = (torch.cat(x, dim=-1) for x in zip(*calls))
    assert torch.equal(ids_n, ids_1)
    assert torch.equal(pos_n, pos_1)
    steps = -(-len(frames) // per_step)  # prefills of frames, the last one made by the text's flush
    assert len(calls) == steps + 2 and len(one_calls) == -(-len(frames) // (1 + paired)) + 2  # + opening, text
    assert len(towers) == steps and sum(towers) == sum(one_towers)  # one tower pass per prefill, same patches
    assert many.stats.frames == one.stats.frames == len(frames) and many.stats.pending_frames == 0
    assert torch.equal(many.state.next_position, one.state.next_position)
    for la, lb in zip(many.state.layers, one.state.layers):
        for x, y in zip(la.tensors().values(), lb.tensors().values()):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_held_frames_of_a_step_are_answered_around_and_kept_by_snapshots(model, processor, frames, tmp_path):
    size = frame_size(processor, frames)
    sampling = SamplingParams(max_new_tokens=6)
    live = StreamSession(model, processor, frame_size=size, pair_frames=True, frames_per_step=4)
    added = [live.append_frame(f, float(i)) for i, f in enumerate(frames)]
    assert added[:3] == [0, 0, 0] and added[3] > 0 and added[4] == 0
    assert live.stats.frames == 4 and live.stats.pending_frames == 1
    for i, f in enumerate(frames[:3]):
        live.append_frame(f, 5.0 + i)  # the held fifth frame and these three fill the second step
    assert live.stats.frames == 8 and live.stats.pending_frames == 0
    live.append_frame(frames[3], 8.0)
    assert live.stats.frames == 8 and live.stats.pending_frames == 1
    live.append_frame(frames[0], 9.0)
    live.append_frame(frames[1], 10.0)
    assert live.stats.pending_frames == 3
    complete = StreamSession(model, processor, frame_size=size, pair_frames=True, frames_per_step=4)
    for i, f in enumerate(frames):
        complete.append_frame(f, float(i))
    for i, f in enumerate(frames[:3]):
        complete.append_frame(f, 5.0 + i)
    assert complete.stats.pending_frames == 0
    assert states_equal(live, complete)  # the held frames are not in the state
    assert live.ask("What is shown?", sampling) == complete.ask("What is shown?", sampling)
    assert live.stats.pending_frames == 3
    path = live.save(tmp_path / "held3.safetensors")
    restored = StreamSession.restore(path, model, processor, frame_size=size)  # settings come from the file
    assert restored.pair_frames and restored.frames_per_step == 4 and restored.stats.pending_frames == 3
    assert [h.timestamp for h in restored.held] == [8.0, 9.0, 10.0]
    for s in (live, restored):
        s.append_frame(frames[2], 11.0)
        s.append_text("and then")
    assert states_equal(live, restored) and restored.stats.frames == live.stats.frames == 12


def test_files_with_one_held_frame_still_restore(model, processor, frames, tmp_path):
    """Snapshots written before frames_per_step keep their held frame under `held_frame`."""
    size = frame_size(processor, frames)
    live = StreamSession(model, processor, frame_size=size, pair_frames=True)
    live.append_frame(frames[0], 0.0)
    meta = live.metadata()
    old = {k: v for k, v in meta.items() if k != "held_frames"}
    old["held_frame"] = json.dumps(json.loads(meta["held_frames"])[0])
    path = live.state.save(tmp_path / "old.safetensors", extra=old)
    restored = StreamSession.restore(path, model, processor, frame_size=size)
    assert restored.stats.pending_frames == 1 and restored.held[0].timestamp == 0.0
    assert restored.held[0].image.tobytes() == live.held[0].image.tobytes()


@pytest.mark.parametrize(
    "paired, per_step, message",
    [
        (True, 3, "an even number"),
        (False, 0, r"in \[1, 32\]"),
        (False, 33, r"in \[1, 32\]"),
        (False, 2.5, "a whole number"),
    ],
)
def test_bad_frames_per_step_is_refused_by_name(model, processor, paired, per_step, message):
    with pytest.raises(ValueError, match=f"frames_per_step must be.*{message}"):
        StreamSession(model, processor, frame_size=(224, 224), pair_frames=paired, frames_per_step=per_step)
