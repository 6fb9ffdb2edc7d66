"""Turning chats, images, videos and live frames into model inputs, as the stock Qwen2.5-VL processor does.

Images are resized to multiples of 28 within [min_pixels, max_pixels] by transformers' PIL image processor and
flattened to the patch layout the vision tower reads (one row per 14x14 patch, channel-major, two temporal slots).
Videos are frame pairs: the two temporal slots of a row come from consecutive sampled frames. A live frame is a
one-step video (the frame fills both slots), 256 tokens at 448x448. Placeholders `<|image_pad|>` / `<|video_pad|>`
in the rendered chat are expanded to one token per merged 28x28 patch.

Control tokens (`<|im_start|>`, `<|im_end|>`, the vision markers) come only from the chat template: text that users
or media supply is tokenized as plain text (`tokenize_text`), so typing `<|im_end|>` cannot end a turn or forge one.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..config import InfiniteVLConfig
from .media import MediaError, VideoFrames, load_image, read_video
from .tokenizer import load_tokenizer

# qwen-vl-utils' video budget, per frame and in total
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 24576 * 28 * 28
# Stands in for client text while the chat template renders (a private-use character: no tokenizer merges it with
# its neighbours, and the client's text itself never goes through the template).
_HOLE = "\ue000"
_HOLES = re.compile(f"{_HOLE}(\\d+){_HOLE}")


@dataclass
class VisionInput:
    """One image or video, ready for the vision tower."""

    kind: str  # "image" or "video"
    pixel_values: torch.Tensor  # [n_patches, 3 * 2 * 14 * 14]
    grid_thw: torch.Tensor  # [1, 3]
    second_per_grid: float | None = None  # videos: seconds between temporal grid steps
    timestamps: list[float] = field(default_factory=list)  # videos: time of the first frame of each grid step
    live: bool = False  # live frames: temporal positions come from `timestamps` (see `model.rope`), in any mode

    @property
    def num_tokens(self) -> int:
        t, h, w = (int(x) for x in self.grid_thw[0])
        return t * h * w // 4


@dataclass
class Prompt:
    """Token ids with placeholders expanded, and the vision inputs in order."""

    input_ids: torch.Tensor  # [1, T]
    images: list[VisionInput] = field(default_factory=list)
    videos: list[VisionInput] = field(default_factory=list)

    def model_inputs(self) -> dict:
        out: dict = {"input_ids": self.input_ids}
        if self.images:
            out["pixel_values"] = torch.cat([v.pixel_values for v in self.images])
            out["image_grid_thw"] = torch.cat([v.grid_thw for v in self.images])
        if self.videos:
            out["pixel_values_videos"] = torch.cat([v.pixel_values for v in self.videos])
            out["video_grid_thw"] = torch.cat([v.grid_thw for v in self.videos])
            out["second_per_grid_ts"] = torch.tensor([v.second_per_grid or 1.0 for v in self.videos])
            if any(v.live for v in self.videos):
                out["video_timestamps"] = [v.timestamps if v.live else None for v in self.videos]
        return out


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Qwen2-VL's rule (transformers' own function): sides multiples of `factor`, area within [min_pixels,
    max_pixels], aspect kept; an aspect ratio over 200 is a `MediaError`."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as qwen2_vl_smart_resize

    if min(height, width) < 1 or max(height, width) / min(height, width) > 200:
        raise MediaError(f"aspect ratio of {width}x{height} exceeds 200 (the vision tower's limit)")
    return qwen2_vl_smart_resize(height, width, factor, min_pixels, max_pixels)


@dataclass
class ChatTurns:
    """The chat template's markup around turns, as token ids, for conversations built a turn at a time (streaming
    sessions): read off the template by rendering a system, user, assistant, user conversation, so a session writes
    exactly what a chat request or a training sample of the same turns holds."""

    template: str | None
    system_open: list[int]  # before the system prompt's text
    system_to_user: list[int]  # after it: closes the system turn and opens the first user turn
    user_open: list[int]  # the conversation's start without a system prompt, through the user turn's opening
    question_end: list[int]  # after a user text: closes the turn and opens the assistant's (the generation prompt)
    answer_end: list[int]  # after an answer: closes the assistant turn and opens the next user turn

    @classmethod
    def of(cls, processor: Processor) -> ChatTurns:
        roles = ("system", "user", "assistant", "user")
        spans = processor.chat_spans([{"role": r, "content": ""} for r in roles], add_generation_prompt=True)
        bounds = [ids for owner, ids in spans if owner == -1]
        alone = [ids for owner, ids in processor.chat_spans([{"role": "user", "content": ""}]) if owner == -1]
        if len(bounds) != 5 or len(alone) != 2:
            raise ValueError("the chat template does not render one span of markup between messages")
        return cls(processor.tokenizer.chat_template, bounds[0], bounds[1], alone[0], bounds[4], bounds[3])

    def opening(self, processor: Processor, system_prompt: str | None) -> list[int]:
        """A conversation's start with an open user turn: after the system prompt when there is one."""
        if not system_prompt:
            return list(self.user_open)
        return self.system_open + processor.tokenize_text(system_prompt) + self.system_to_user


class Processor:
    def __init__(
        self,
        tokenizer,
        config: InfiniteVLConfig,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
        image_mean=None,
        image_std=None,
    ):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.tokenizer = tokenizer
        self.config = config
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        v = config.vision
        self.factor = v.patch_size * v.spatial_merge_size
        kwargs = {
            "patch_size": v.patch_size,
            "merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
        }
        if image_mean is not None:
            kwargs.update(image_mean=image_mean, image_std=image_std)
        self._image_processor = Qwen2VLImageProcessorPil(**kwargs)
        self.frame_cache: dict | None = None  # set to {} to keep encoded stream frames by path (training)
        self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        self.video_token = tokenizer.convert_ids_to_tokens(config.video_token_id)
        self._plain = _plain_text_tokenizer(tokenizer)

    @classmethod
    def from_pretrained(cls, folder: str | Path, config: InfiniteVLConfig | None = None) -> Processor:
        folder = Path(folder)
        config = config or InfiniteVLConfig.from_file(folder)
        pre = {}
        if (folder / "preprocessor_config.json").exists():
            pre = json.loads((folder / "preprocessor_config.json").read_text())
        size = pre.get("size") or {}
        return cls(
            load_tokenizer(folder),
            config,
            min_pixels=pre.get("min_pixels", size.get("shortest_edge", 56 * 56)),
            max_pixels=pre.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280)),
            image_mean=pre.get("image_mean"),
            image_std=pre.get("image_std"),
        )

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.tokenizer.save_pretrained(str(folder))
        (folder / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "min_pixels": self.min_pixels,
                    "max_pixels": self.max_pixels,
                    "patch_size": self.config.vision.patch_size,
                    "temporal_patch_size": self.config.vision.temporal_patch_size,
                    "merge_size": self.config.vision.spatial_merge_size,
                    "image_mean": list(self._image_processor.image_mean),
                    "image_std": list(self._image_processor.image_std),
                    "image_processor_type": "Qwen2VLImageProcessor",
                    "processor_class": "Qwen2_5_VLProcessor",
                },
                indent=2,
            )
            + "\n"
        )

    # -- vision ---------------------------------------------------------------------------------------------------
    def _patches(self, image: Image.Image, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch rows [N, 1176] (the frame in both temporal slots) and grid [1, 3] for an image resized exactly."""
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        out = self._image_processor(images=[image], do_resize=False, return_tensors="pt")
        return out["pixel_values"].float(), out["image_grid_thw"]

    def encode_image(self, image, min_pixels: int | None = None, max_pixels: int | None = None) -> VisionInput:
        image = load_image(image)
        h, w = smart_resize(
            image.height, image.width, self.factor, min_pixels or self.min_pixels, max_pixels or self.max_pixels
        )
        pixels, grid = self._patches(image, h, w)
        return VisionInput("image", pixels, grid)

    def frame_size(self, image: Image.Image, max_pixels: int) -> tuple[int, int]:
        return smart_resize(image.height, image.width, self.factor, min(VIDEO_MIN_PIXELS, max_pixels), max_pixels)

    def encode_frame(self, frame, timestamp: float = 0.0, size: tuple[int, int] | None = None) -> VisionInput:
        """One live frame as a one-step video (both temporal slots hold it). `size` (h, w) fixes the resolution,
        e.g. (448, 448) for 256 tokens per frame."""
        frame = load_image(frame)
        h, w = size or self.frame_size(frame, VIDEO_MAX_PIXELS)
        if h % self.factor or w % self.factor:
            raise MediaError(f"frame size {h}x{w} is not a multiple of {self.factor}")
        pixels, grid = self._patches(frame, h, w)
        return VisionInput("video", pixels, grid, second_per_grid=None, timestamps=[timestamp], live=True)

    def encode_frames(
        self,
        frames: Sequence[Image.Image],
        fps: float,
        timestamps: Sequence[float] | None = None,
        max_pixels: int | None = None,
    ) -> VisionInput:
        """A video from sampled frames: consecutive pairs share a row (an odd last frame is repeated)."""
        frames = [load_image(f) for f in frames]
        if not frames:
            raise MediaError("a video needs at least one frame")
        tps = self.config.vision.temporal_patch_size
        if max_pixels is None:
            per_frame = VIDEO_TOTAL_PIXELS / len(frames) * tps
            max_pixels = max(min(VIDEO_MAX_PIXELS, per_frame), int(VIDEO_MIN_PIXELS * 1.05))
        h, w = self.frame_size(frames[0], int(max_pixels))
        if len(frames) % tps:
            frames = frames + [frames[-1]] * (tps - len(frames) % tps)
        stamps = list(timestamps) if timestamps is not None else [i / fps for i in range(len(frames))]
        stamps += [stamps[-1]] * (len(frames) - len(stamps))
        rows = [self._patches(f, h, w)[0] for f in frames]
        steps = [self._step(rows[s : s + tps]) for s in range(0, len(frames), tps)]
        grid = torch.tensor([[len(frames) // tps, h // 14, w // 14]])
        return VisionInput("video", torch.cat(steps), grid, second_per_grid=tps / fps, timestamps=stamps[::tps])

    def _step(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        """One temporal step from the patch rows of `temporal_patch_size` frames: slot j from frame j."""
        tps = self.config.vision.temporal_patch_size
        rows = [r.view(-1, 3, tps, 14 * 14) for r in rows]
        slots = [rows[j][:, :, j] for j in range(tps)]
        return torch.stack(slots, dim=2).reshape(rows[0].shape[0], -1)

    def live_frame(self, frame, size: tuple[int, int] | None = None) -> Image.Image:
        """A live frame decoded and resized to its final (h, w): what `encode_frame_pair` takes, and what a session
        holds while it waits for the second frame of a pair."""
        frame = load_image(frame)
        h, w = size or self.frame_size(frame, VIDEO_MAX_PIXELS)
        if h % self.factor or w % self.factor:
            raise MediaError(f"frame size {h}x{w} is not a multiple of {self.factor}")
        return frame if frame.size == (w, h) else frame.resize((w, h), Image.Resampling.BICUBIC)

    def encode_frame_pair(self, frames: Sequence[Image.Image], timestamp: float) -> VisionInput:
        """Live frames (from `live_frame`, all one size) as one temporal step, paired exactly as `encode_frames`
        pairs a video's frames (slot j from frame j; one frame fills both slots, as a video's odd last frame)."""
        tps = self.config.vision.temporal_patch_size
        frames = list(frames) + [frames[-1]] * (tps - len(frames))
        w, h = frames[0].size
        if any(f.size != (w, h) for f in frames):
            raise MediaError(f"the frames of a pair differ in size: {[f.size for f in frames]}")
        step = self._step([self._patches(f, h, w)[0] for f in frames])
        grid = torch.tensor([[1, h // 14, w // 14]])
        return VisionInput("video", step, grid, second_per_grid=None, timestamps=[timestamp], live=True)

    def encode_stream(
        self,
        frames: Sequence,
        interval: float = 1.0,
        size: tuple[int, int] | None = None,
        timestamps: Sequence[float] | None = None,
    ) -> VisionInput:
        """Live frames as one video block: one frame per temporal step (the frame fills both slots), exactly what a
        session builds from `append_frame` calls `interval` seconds apart (vision features and positions alike:
        both place frames by their timestamps, `model.rope.live_frame_offsets`)."""
        if not frames:
            raise MediaError("a stream needs at least one frame")
        rows = []
        for f in frames:
            key = (str(f), size) if isinstance(f, (str, Path)) and self.frame_cache is not None else None
            if key is not None and key in self.frame_cache:
                rows.append(self.frame_cache[key])
                continue
            image = load_image(f)
            h, w = size or self.frame_size(image, VIDEO_MAX_PIXELS)
            rows.append(self._patches(image, h, w)[0])
            if key is not None:
                self.frame_cache[key] = rows[-1]
        h, w = size or self.frame_size(load_image(frames[0]), VIDEO_MAX_PIXELS)
        stamps = list(timestamps) if timestamps is not None else [i * interval for i in range(len(frames))]
        grid = torch.tensor([[len(frames), h // 14, w // 14]])
        return VisionInput("video", torch.cat(rows), grid, second_per_grid=interval, timestamps=stamps, live=True)

    def encode_video(
        self,
        video: str | Path | VideoFrames,
        fps: float = 2.0,
        max_frames: int = 768,
        max_pixels: int | None = None,
        max_duration: float | None = None,
    ) -> VisionInput:
        if not isinstance(video, VideoFrames):
            video = read_video(video, fps=fps, max_frames=max_frames, max_duration=max_duration)
        return self.encode_frames(video.frames, video.fps, video.timestamps, max_pixels)

    # -- text -------------------------------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat as text with one placeholder per image / video (the tokenizer's chat template). For display:
        `prompt` does not tokenize this string (the text in it would be read as markup)."""
        return self.tokenizer.apply_chat_template(
            _normalized(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def tokenize(self, markup: str) -> list[int]:
        """Token ids of template markup: `<|im_start|>` and the other special tokens in it become control tokens.
        Never use it for text a user or a file supplied (see `tokenize_text`)."""
        return self.tokenizer(markup, add_special_tokens=False).input_ids

    def tokenize_text(self, text: str) -> list[int]:
        """Token ids of plain text: special-token strings in it are ordinary characters, never control tokens."""
        if self._plain is None:
            return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
        return self._plain.encode(text, add_special_tokens=False).ids

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The rendered chat as token ids, with one placeholder per image / video: the template's own markup is
        tokenized with its control tokens, every message text as plain text."""
        return [i for _, ids in self.chat_spans(messages, add_generation_prompt) for i in ids]

    def chat_spans(self, messages: list[dict], add_generation_prompt: bool = True) -> list[tuple[int, list[int]]]:
        """The chat rendered by the tokenizer's chat template (the one place turns are rendered), as (message index,
        token ids) spans in order: a message's content (its text and vision placeholders) under its index, the
        template's markup between and around messages under -1 (one span at each boundary, possibly empty)."""
        texts: list[str] = []
        owners: list[int] = []  # per hole: the message it belongs to; begin and end marks are empty texts

        def hole(text: str, owner: int) -> str:
            texts.append(text)
            owners.append(owner)
            return f"{_HOLE}{len(texts) - 1}{_HOLE}"

        holed = []
        for i, m in enumerate(_normalized(messages)):
            content = m["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            parts = [{**c, "text": hole(c["text"], i)} if c.get("type") == "text" else c for c in content]
            begin, end = {"type": "text", "text": hole("", i)}, {"type": "text", "text": hole("", i)}
            holed.append({**m, "content": [begin, *parts, end]})
        rendered = self.tokenizer.apply_chat_template(
            holed, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        spans: list[tuple[int, list[int]]] = []
        inside: int | None = None  # the message whose content is being read
        seen = [0] * len(holed)  # holes read per message: its first is the begin mark, its last the end mark
        marks = {i: owners.count(i) for i in range(len(holed))}
        for k, piece in enumerate(_HOLES.split(rendered)):
            if k % 2 == 0:
                if inside is not None:
                    spans.append((inside, self.tokenize(piece) if piece else []))
                else:
                    spans.append((-1, self.tokenize(piece) if piece else []))
                continue
            h = int(piece)
            owner = owners[h]
            seen[owner] += 1
            if seen[owner] == 1:
                inside = owner
            elif seen[owner] == marks[owner]:
                inside = None
            elif texts[h]:
                spans.append((owner, self.tokenize_text(texts[h])))
        return [(owner, ids) for owner, ids in spans if ids or owner == -1]

    @property
    def turns(self) -> ChatTurns:
        """The markup between turns as this checkpoint's chat template writes it (sessions build on it)."""
        if getattr(self, "_turns", None) is None or self._turns.template != self.tokenizer.chat_template:
            self._turns = ChatTurns.of(self)
        return self._turns

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def expand(self, ids: list[int], images: Sequence[VisionInput], videos: Sequence[VisionInput]) -> list[int]:
        """Replace each single image/video placeholder by as many as the item has tokens."""
        c = self.config
        n_img = sum(1 for i in ids if i == c.image_token_id)
        n_vid = sum(1 for i in ids if i == c.video_token_id)
        if n_img != len(images) or n_vid != len(videos):
            raise ValueError(
                f"the text has {n_img} image and {n_vid} video placeholders but {len(images)} images "
                f"and {len(videos)} videos were given"
            )
        out, it_img, it_vid = [], iter(images), iter(videos)
        for i in ids:
            if i == c.image_token_id:
                out.extend([i] * next(it_img).num_tokens)
            elif i == c.video_token_id:
                out.extend([i] * next(it_vid).num_tokens)
            else:
                out.append(i)
        return out

    def prompt(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        video_fps: float = 2.0,
        video_max_frames: int = 768,
    ) -> Prompt:
        """Render, tokenize and expand a chat whose content items may carry images and videos:
        {"type": "image", "image": path | bytes | PIL}, {"type": "video", "video": path | [frames]}."""
        images, videos = [], []
        for m in messages:
            if isinstance(m["content"], str):
                continue
            for item in m["content"]:
                if item.get("type") == "image":
                    images.append(
                        item["image"] if isinstance(item["image"], VisionInput) else self.encode_image(item["image"])
                    )
                elif item.get("type") == "video":
                    v = item["video"]
                    if isinstance(v, VisionInput):
                        videos.append(v)
                    elif isinstance(v, (list, tuple)):
                        videos.append(self.encode_frames(v, item.get("fps", video_fps)))
                    else:
                        videos.append(
                            self.encode_video(v, item.get("fps", video_fps), item.get("max_frames", video_max_frames))
                        )
        ids = self.expand(self.chat_ids(messages, add_generation_prompt), images, videos)
        return Prompt(torch.tensor([ids]), images, videos)


def _normalized(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = [
                c if c.get("type") in ("image", "video", "text") else {"type": "text", "text": str(c)} for c in content
            ]
        out.append({"role": m["role"], "content": content})
    return out


def _plain_text_tokenizer(tokenizer):
    """A private copy of a fast tokenizer's backend that reads special-token strings as text (a copy, because the
    switch is a property of the backend object, shared with every thread that tokenizes markup)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_special_tokens"):
        return None
    plain = copy.deepcopy(backend)
    plain.encode_special_tokens = True
    return plain
