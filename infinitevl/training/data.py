"""Training data: ShareGPT-style multimodal conversations (JSON / JSONL) and plain text files, as token samples.

A conversation record is {"messages": [{"role", "content"}...], "images": [...], "videos": [...]} with `<image>` /
`<video>` placeholders in the text, paths relative to the data file (LLaMA-Factory's format; the
{"conversations": [{"from", "value"}]} spelling is read too). A video is a file, or live frames
{"frames": [image paths], "interval": seconds} encoded one frame per temporal step as a streaming session does. Each sample is rendered by the checkpoint's chat
template (`Processor.chat_spans`, as chat requests and sessions are), with labels on the assistant turns only (their
text and the end-of-turn token after it). A plain text file gives one
sample per line (article), cut into pieces of at most `max_length` tokens, every token a label.

Truncation to `max_length` never cuts a vision block: a block that would straddle the limit is dropped with
everything after it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..processing.processor import Processor, VisionInput

IGNORE = -100
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "observation": "user",
    "function_call": "assistant",
}
DEFAULT_SYSTEM = "You are a helpful assistant."


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    images: list[VisionInput] = field(default_factory=list)
    videos: list[VisionInput] = field(default_factory=list)
    position_ids: torch.Tensor | None = None  # [3, T], filled by `TokenDataset`

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataOptions:
    max_length: int = 2048
    image_max_pixels: int = 512 * 512
    image_min_pixels: int = 56 * 56
    video_fps: float = 2.0
    video_max_frames: int = 16
    answer_only: bool = True  # labels on assistant turns only (False: on every token)


def read_records(path: str | Path) -> tuple[str, list]:
    """('chat', [records]) for .json / .jsonl, ('text', [lines]) for anything else."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no data file at {path}")
    if path.suffix == ".jsonl":
        records = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{i}: not valid JSON ({err})") from err
        return "chat", records
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a list of conversations")
        return "chat", records
    return "text", [line for line in path.read_text().splitlines() if line.strip()]


def messages_of(record: dict) -> list[dict]:
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if "conversations" in record:
        return [{"role": ROLES.get(m["from"], m["from"]), "content": m["value"]} for m in record["conversations"]]
    raise ValueError(f"a conversation record needs 'messages' or 'conversations', got keys {sorted(record)}")


def chat_sample(record: dict, processor: Processor, options: DataOptions, root: Path) -> Sample:
    """Render one conversation with labels on the assistant turns."""
    c = processor.config
    images = [_path(root, p) for p in record.get("images", [])]
    videos = [v if isinstance(v, dict) else _path(root, v) for v in record.get("videos", [])]
    messages = messages_of(record)
    if messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]
    n_img = sum(m["content"].count("<image>") for m in messages)
    n_vid = sum(m["content"].count("<video>") for m in messages)
    if n_img != len(images) or n_vid != len(videos):
        raise ValueError(
            f"record has {n_img} <image> / {n_vid} <video> placeholders but lists {len(images)} images "
            f"and {len(videos)} videos"
        )
    enc_images, enc_videos = [], []
    it_img, it_vid = iter(images), iter(videos)
    rendered = []  # the messages with their placeholders as the chat template's image / video items
    for m in messages:
        content: list[dict] = []
        for part in re.split(r"(<image>|<video>)", m["content"]):
            if part == "<image>":
                enc_images.append(
                    processor.encode_image(
                        next(it_img), min_pixels=options.image_min_pixels, max_pixels=options.image_max_pixels
                    )
                )
                content.append({"type": "image"})
            elif part == "<video>":
                enc_videos.append(_encode_video(next(it_vid), processor, options, root))
                content.append({"type": "video"})
            elif part:
                content.append({"type": "text", "text": part})
        rendered.append({"role": ROLES.get(m["role"], m["role"]), "content": content})
    # turns as the checkpoint's chat template renders them (as a chat request or a session would); learned: a
    # learned message's content and the markup after it through the end-of-turn token
    end_of_turn = processor.tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    learning_markup = False
    for owner, span in processor.chat_spans(rendered, add_generation_prompt=False):
        if owner >= 0:
            learn = rendered[owner]["role"] == "assistant" or not options.answer_only
            ids += span
            labels += span if learn else [IGNORE] * len(span)
            learning_markup = learn
            continue
        for t in span:
            ids.append(t)
            labels.append(t if learning_markup else IGNORE)
            if t == end_of_turn:
                learning_markup = False
        learning_markup = False
    ids, labels = _expand_vision(ids, labels, enc_images, enc_videos, c)
    return truncate(Sample(ids, labels, enc_images, enc_videos), options.max_length, c)


def _expand_vision(ids, labels, images, videos, config) -> tuple[list[int], list[int]]:
    """Each image / video placeholder repeated for its item's tokens, with its label."""
    out_ids, out_labels = [], []
    it_img, it_vid = iter(images), iter(videos)
    for t, label in zip(ids, labels):
        n = 1
        if t == config.image_token_id:
            n = next(it_img).num_tokens
        elif t == config.video_token_id:
            n = next(it_vid).num_tokens
        out_ids += [t] * n
        out_labels += [label] * n
    return out_ids, out_labels


def _path(root: Path, p: str) -> Path:
    return Path(p) if Path(p).is_absolute() else root / p


def _encode_video(video, processor: Processor, options: DataOptions, root: Path) -> VisionInput:
    """A video file, or {"frames": [paths], "interval": seconds}: live frames, one per temporal step, as a
    streaming session sees them (optional "size": [h, w])."""
    if isinstance(video, dict):
        frames = [_path(root, f) for f in video["frames"]]
        size = tuple(video["size"]) if "size" in video else None
        return processor.encode_stream(frames, float(video.get("interval", 1.0)), size)
    return processor.encode_video(video, fps=options.video_fps, max_frames=options.video_max_frames)


def truncate(sample: Sample, max_length: int, config) -> Sample:
    if len(sample) <= max_length:
        return sample
    cut = max_length
    kept_img = kept_vid = 0
    i = 0
    ids = sample.input_ids
    while i < len(ids):
        if (
            ids[i] == config.vision_start_token_id
            and i + 1 < len(ids)
            and ids[i + 1] in (config.image_token_id, config.video_token_id)
        ):
            kind = ids[i + 1]
            j = i + 1
            while j < len(ids) and ids[j] == kind:
                j += 1
            end = j + 1  # include vision_end
            if end > max_length:
                cut = i  # the block would be cut: drop it and everything after
                break
            kept_img += kind == config.image_token_id
            kept_vid += kind == config.video_token_id
            i = end
        else:
            i += 1
            if i >= max_length:
                break
    return Sample(ids[:cut], sample.labels[:cut], sample.images[:kept_img], sample.videos[:kept_vid])


def text_samples(lines: list[str], processor: Processor, max_length: int) -> list[Sample]:
    out = []
    for line in lines:
        ids = processor.tokenize(line)
        for s in range(0, len(ids), max_length):
            piece = ids[s : s + max_length]
            if len(piece) > 1:
                out.append(Sample(piece, list(piece)))
    return out


class TokenDataset(torch.utils.data.Dataset):
    """Samples with their multimodal RoPE positions; chat records are encoded lazily (images on first use)."""

    def __init__(
        self,
        path: str | Path,
        processor: Processor,
        options: DataOptions,
        model_config,
        media_root: str | Path | None = None,
        indices: list[int] | None = None,
    ):
        self.path = Path(path)
        self.processor = processor
        self.options = options
        self.config = model_config
        self.root = Path(media_root) if media_root else self.path.parent
        self.kind, records = read_records(self.path)
        self.items = records if self.kind == "chat" else text_samples(records, processor, options.max_length)
        if indices is not None:
            self.items = [self.items[i] for i in indices]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        item = self.items[index]
        sample = (
            chat_sample(item, self.processor, self.options, self.root)
            if self.kind == "chat"
            else Sample(list(item.input_ids), list(item.labels))
        )
        from ..model.rope import config_args, rope_index

        pos, _ = rope_index(
            torch.tensor([sample.input_ids]),
            **config_args(self.config),
            image_grid_thw=torch.cat([v.grid_thw for v in sample.images]) if sample.images else None,
            video_grid_thw=torch.cat([v.grid_thw for v in sample.videos]) if sample.videos else None,
            second_per_grid_ts=[v.second_per_grid or 1.0 for v in sample.videos] or None,
            video_timestamps=[v.timestamps if v.live else None for v in sample.videos] or None,
        )
        sample.position_ids = pos[:, 0]
        return sample
