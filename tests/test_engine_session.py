"""State objects, snapshots, branches, sampling and sessions fed with the real media files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import MEDIA, tiny_model

from infinitevl.config import InfiniteVLConfig
from infinitevl.defaults import tiny_tokenizer
from infinitevl.engine.generation import Sampler, SamplingParams, TokenGenerator, decode_step, prefill
from infinitevl.engine.session import StreamSession
from infinitevl.processing.media import MediaError
from infinitevl.processing.processor import Processor
from infinitevl.state import InfiniteVLState, StateError

VIDEOS = MEDIA / "mllm_demo" / "mllm_demo_data"


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=7)


@pytest.fixture(scope="module")
def processor(model):
    return Processor(tiny_tokenizer(model.config), model.config, max_pixels=224 * 224)


def snapshot(state: InfiniteVLState) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.tensors().items()}


def assert_identical(state: InfiniteVLState, before: dict[str, torch.Tensor]) -> None:
    now = state.tensors()
    assert now.keys() == before.keys()
    for k in now:
        assert torch.equal(now[k], before[k]), k


def test_4b_state_size_matches_the_specification():
    state = InfiniteVLState.allocate(InfiniteVLConfig(), dtype=torch.bfloat16, device="meta")
    memory = sum(t.nbytes for t in state.tensors().values() if t.dtype == torch.float32)
    assert round(memory / 1e6, 1) == 56.6  # 27 x [16, 128, 256] fp32
    kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in state.layers if hasattr(layer, "keys"))
    assert round(kv / 1e6, 1) == 75.5  # 9 x 2 x [2, 8191, 128] bf16
    assert 133e6 < state.nbytes < 135e6


def test_state_size_is_fixed_and_clone_is_independent(model):
    state = model.new_state()
    size = state.nbytes
    prefill(model, state, torch.randint(0, 370, (1, 300)), chunk_size=64)
    assert state.nbytes == size
    branch = state.clone()
    before = snapshot(state)
    decode_step(model, branch, torch.tensor([5]))
    assert_identical(state, before)


def test_save_load_and_continue_equals_never_stopping(model, tmp_path):
    g = torch.Generator().manual_seed(1)
    first, second = torch.randint(0, 370, (1, 77), generator=g), torch.randint(0, 370, (1, 40), generator=g)
    straight = model.new_state()
    prefill(model, straight, first)
    expected = prefill(model, straight, second, return_all_logits=True)
    stopped = model.new_state()
    prefill(model, stopped, first)
    path = stopped.save(tmp_path / "s.safetensors")
    resumed = InfiniteVLState.load(path, model.config)
    got = prefill(model, resumed, second, return_all_logits=True)
    assert torch.equal(got, expected)


def test_loading_into_a_different_model_is_refused(model, tmp_path):
    path = model.new_state().save(tmp_path / "s.safetensors")
    other = tiny_model(seed=1, sliding_window=12).config
    with pytest.raises(StateError, match="different model configuration .*sliding_window"):
        InfiniteVLState.load(path, other)
    # states hold rotated keys and a running RoPE index: a model that numbers positions differently is refused
    for change, name in (
        (lambda c: setattr(c.text, "rope_theta", c.text.rope_theta * 2), "rope_theta"),
        (lambda c: setattr(c.text, "mrope_section", list(reversed(c.text.mrope_section))), "mrope_section"),
        (lambda c: setattr(c, "rope_index_mode", "transformers"), "rope_index_mode"),
    ):
        other = copy.deepcopy(model.config)
        change(other)
        with pytest.raises(StateError, match=f"different model configuration .*{name}"):
            InfiniteVLState.load(path, other)
    (tmp_path / "bad.safetensors").write_bytes(b"not a state")
    with pytest.raises(StateError, match="not a readable state snapshot"):
        InfiniteVLState.load(tmp_path / "bad.safetensors")


def test_sampling_controls():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    assert Sampler(SamplingParams(temperature=0))(logits).item() == 1
    assert Sampler(SamplingParams(temperature=1.0, top_k=1, seed=0))(logits).item() == 1
    draws = {Sampler(SamplingParams(temperature=1.0, top_k=2, seed=s))(logits).item() for s in range(40)}
    assert draws == {1, 2}
    draws = {Sampler(SamplingParams(temperature=1.0, top_p=0.3, seed=s))(logits).item() for s in range(40)}
    assert draws == {1}
    # the penalty divides positive logits of tokens already seen: 3.0 / 1.5 = 2.0 < 2.9
    assert Sampler(SamplingParams(repetition_penalty=1.5))(logits, [[1]]).item() == 2
    same = [Sampler(SamplingParams(temperature=1.0, seed=3))(logits.repeat(8, 1)).tolist() for _ in range(2)]
    assert same[0] == same[1]
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0).validate()


def test_stop_tokens_strings_and_length(model, processor):
    state = model.new_state()
    logits = prefill(model, state, torch.randint(0, 370, (1, 20)))
    free = list(TokenGenerator(model, state.clone(), logits, SamplingParams(max_new_tokens=12)))
    assert len(free) == 12
    gen = TokenGenerator(model, state.clone(), logits, SamplingParams(max_new_tokens=12, stop_token_ids=(free[3],)))
    assert list(gen) == free[: free.index(free[3])] and gen.finish_reason == "stop"
    text = processor.decode(free)
    assert len(text) >= 4
    stop = text[len(text) // 2 :][:2]  # a stop string cuts the text before it
    gen = TokenGenerator(
        model,
        state.clone(),
        logits,
        SamplingParams(max_new_tokens=12, stop_strings=(stop,)),
        decode_text=processor.decode,
    )
    kept = processor.decode(list(gen))
    assert stop not in kept and text.startswith(kept) and gen.finish_reason == "stop"


def test_session_ask_leaves_the_stream_bit_identical(model, processor):
    session = StreamSession(model, processor, frame_size=(56, 84))
    session.append_text("A red ball is on the table.")
    session.append_image(VIDEOS / "1.jpg")
    before = snapshot(session.state)
    answer = session.ask("What is on the table?", SamplingParams(max_new_tokens=5))
    assert isinstance(answer, str)
    assert_identical(session.state, before)


@pytest.mark.parametrize("name", ["1.mp4", "2.avi"])
def test_real_videos_decode_through_the_session(model, processor, name):
    session = StreamSession(model, processor, frame_size=(56, 56))
    n = session.append_video(VIDEOS / name, fps=1.0, max_frames=4)
    assert n > 0 and session.stats.videos == 1
    from infinitevl.processing.media import iter_video

    for frame, t in iter_video(VIDEOS / name, fps=2.0, max_frames=3):
        session.append_frame(frame, t)
    assert session.stats.frames == 3
    assert session.stats.state_bytes == model.new_state().nbytes


@pytest.mark.parametrize("name", ["3.mp4", "2.avi"])
def test_truncated_video_is_an_error_and_changes_nothing(model, processor, name, tmp_path):
    session = StreamSession(model, processor, frame_size=(56, 56))
    session.append_text("before")
    broken = tmp_path / name
    data = (VIDEOS / name).read_bytes()
    broken.write_bytes(data[: len(data) * 6 // 10])
    before, stats = snapshot(session.state), dict(session.stats.as_dict())
    with pytest.raises(MediaError, match=name):
        session.append_video(broken, fps=1.0)
    assert_identical(session.state, before)
    assert session.stats.as_dict() == stats


def test_bad_frames_change_nothing(model, processor, tmp_path):
    session = StreamSession(model, processor, frame_size=(56, 56))
    session.append_frame(VIDEOS / "1.jpg", 0.0)
    before, segment = snapshot(session.state), session.segment
    bad = tmp_path / "bad.jpg"
    bad.write_bytes((VIDEOS / "2.jpg").read_bytes()[:3000])
    with pytest.raises(MediaError, match="bad.jpg"):
        session.append_frame(bad, 1.0)
    with pytest.raises(MediaError, match="earlier than the previous"):
        session.append_frame(VIDEOS / "2.jpg", -1.0)
    assert_identical(session.state, before)
    assert session.segment == segment


def test_frame_timestamps_set_the_temporal_positions(model, processor):
    session = StreamSession(model, processor, frame_size=(56, 56))
    tps = model.config.vision.tokens_per_second
    session.append_frame(VIDEOS / "1.jpg", 10.0)
    first = session.segment
    session.append_frame(VIDEOS / "2.jpg", 13.5)
    assert session.segment.start == first.start
    assert session.segment.last_t - first.last_t == int(3.5 * tps)


def test_session_snapshot_restore_continues_identically(model, processor, tmp_path):
    a = StreamSession(model, processor, frame_size=(56, 56))
    a.append_frame(VIDEOS / "1.jpg", 0.0)
    path = a.save(tmp_path / "session.safetensors")
    b = StreamSession.restore(path, model, processor, frame_size=(56, 56))
    for s in (a, b):
        s.append_frame(VIDEOS / "3.jpg", 0.5)
    params = SamplingParams(max_new_tokens=6)
    assert a.ask("What changed?", params) == b.ask("What changed?", params)
    assert_identical(b.state, snapshot(a.state))


def test_chat_turns_are_committed(model, processor):
    session = StreamSession(model, processor)
    n0 = session.stats.tokens
    session.chat("Hello", SamplingParams(max_new_tokens=4))
    n1 = session.stats.tokens
    session.chat("And again?", SamplingParams(max_new_tokens=4), images=[VIDEOS / "2.jpg"])
    assert n0 < n1 < session.stats.tokens and session.stats.images == 1


def record_positions(model) -> tuple[list[torch.Tensor], object]:
    """Every position_ids the decoder is given, in order (a forward pre-hook on the text model)."""
    seen: list[torch.Tensor] = []

    def hook(module, args):
        seen.append(args[1][:, 0].clone())  # [3, T] of row 0

    return seen, model.language_model.register_forward_pre_hook(hook)


@pytest.mark.parametrize("interval", [0.25, 0.5, 2 / 3, 1.0, 1.5])
def test_live_frames_and_training_streams_get_the_same_positions(model, processor, interval, tmp_path):
    """A session fed frames `interval` seconds apart, and a training sample written as {"frames", "interval"} of
    the same frames (the data pipeline's own path), give identical token ids and positions."""
    from infinitevl.training.data import DataOptions, TokenDataset

    frames = [VIDEOS / f"{i % 3 + 1}.jpg" for i in range(5)]
    question = "Which frame came last?"
    seen, handle = record_positions(model)
    try:
        session = StreamSession(model, processor, frame_size=(56, 56))  # default system prompt, as the data has
        for i, f in enumerate(frames):
            session.append_frame(f, i * interval)
        session.append_text(question)
    finally:
        handle.remove()
    session_positions = torch.cat(seen, dim=1)
    record = {
        "messages": [{"role": "user", "content": "<video>" + question}, {"role": "assistant", "content": "3"}],
        "videos": [{"frames": [str(f) for f in frames], "interval": interval, "size": [56, 56]}],
    }
    data = tmp_path / "stream.json"
    data.write_text(json.dumps([record]))
    sample = TokenDataset(data, processor, DataOptions(max_length=4096), model.config)[0]
    n = session_positions.shape[1]
    ids = processor.tokenize(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    )  # what the session fed first
    assert sample.input_ids[: len(ids)] == ids
    assert torch.equal(sample.position_ids[:, :n], session_positions)
    video = torch.tensor(sample.input_ids[:n]) == model.config.video_token_id
    t = session_positions[0, video].unique()
    assert t.numel() == len({int(i * interval * 2 + 1e-9) for i in range(5)}) > 1  # fractional intervals too
