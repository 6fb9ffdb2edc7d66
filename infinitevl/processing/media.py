"""Reading media: images (path, bytes or PIL) and video files through PyAV, sampled at a chosen rate.

Everything is decoded completely before it is handed on, so a file that fails to decode raises `MediaError` before
any model state is touched. No torchvision, no OpenCV.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class MediaError(ValueError):
    """An image or video that cannot be read; the message names the file and the reason."""


def load_image(source: str | Path | bytes | Image.Image, max_pixels: int | None = None) -> Image.Image:
    """An RGB PIL image from a path, raw bytes or a PIL image (fully decoded)."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    name = "image bytes" if isinstance(source, bytes) else str(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
        with fp, Image.open(fp) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise MediaError(f"{name}: {im.width}x{im.height} exceeds the limit of {max_pixels} pixels")
            im.load()  # decode now: a truncated file fails here, not later
            return im.convert("RGB")
    except MediaError:
        raise
    except FileNotFoundError as err:
        raise MediaError(f"{name}: no such file") from err
    except IsADirectoryError as err:
        raise MediaError(f"{name}: is a folder, not an image file") from err
    except UnidentifiedImageError as err:
        raise MediaError(f"{name}: {_not_an_image(source)}") from err
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise MediaError(f"{name}: cannot decode image ({err})") from err


def _not_an_image(source) -> str:
    empty = len(source) == 0 if isinstance(source, bytes) else Path(source).stat().st_size == 0
    kinds = "JPEG, PNG, WebP, BMP, GIF or TIFF"
    return "the file is empty, not an image" if empty else f"not an image file (expected {kinds})"


def _video_problem(path: Path, err: Exception) -> str:
    """What went wrong with a video file, in words (PyAV's errors carry an errno and the path)."""
    import av

    if path.is_file() and path.stat().st_size == 0:
        return "the file is empty, not a video"
    if isinstance(err, av.error.InvalidDataError):
        return "not a video file that can be decoded (e.g. MP4, WebM, AVI, MKV)"
    reason = getattr(err, "strerror", None) or str(err)
    return f"cannot decode video ({reason})"


def probe_video(path: str | Path) -> None:
    """Check that `path` is a video whose first frame decodes: a cheap look before any model is loaded."""
    import av

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: {'is a folder, not a video file' if path.is_dir() else 'no such file'}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream (an audio file?)")
            if next(container.decode(container.streams.video[0]), None) is None:
                raise MediaError(f"{path}: no decodable frames")
    except MediaError:
        raise
    except Exception as err:
        raise MediaError(f"{path}: {_video_problem(path, err)}") from err


@dataclass
class VideoFrames:
    frames: list[Image.Image]  # RGB
    timestamps: list[float]  # seconds from the start of the file
    fps: float  # the sampling rate actually used
    source: str


def read_video(
    path: str | Path,
    fps: float = 2.0,
    max_frames: int | None = None,
    start: float = 0.0,
    end: float | None = None,
    max_duration: float | None = None,
) -> VideoFrames:
    """Decode `path` and keep one frame every 1/fps seconds (the first frame at or after each target time)."""
    import av

    path = Path(path)
    if fps <= 0:
        raise MediaError(f"{path}: sampling fps must be > 0 (got {fps})")
    if not path.exists():
        raise MediaError(f"{path}: no such file")
    frames, stamps = [], []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            declared = _declared_duration(container, stream)
            if max_duration is not None and declared is not None and declared - start > max_duration:
                raise MediaError(f"{path}: {declared:.1f} s of video exceeds the limit of {max_duration:.1f} s")
            next_time = start
            last_time = None
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else (last_time or 0.0)
                last_time = t
                if end is not None and t > end:
                    break
                if t + 1e-6 >= next_time:
                    frames.append(frame.to_image().convert("RGB"))
                    stamps.append(t)
                    next_time = start + len(frames) / fps
                    if max_frames is not None and len(frames) >= max_frames:
                        break
    except MediaError:
        raise
    except Exception as err:  # PyAV raises its own error hierarchy (InvalidDataError, ...)
        raise MediaError(f"{path}: {_video_problem(path, err)}") from err
    if not frames:
        raise MediaError(f"{path}: no decodable frames")
    complete = max_frames is not None and len(frames) >= max_frames or end is not None
    if not complete and declared is not None and last_time is not None and last_time < 0.9 * declared - 1.0:
        raise MediaError(f"{path}: decoding stopped at {last_time:.1f} s of {declared:.1f} s; the file is truncated")
    return VideoFrames(frames, stamps, fps, str(path))


def _declared_duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1e6
    return None


def frames_from_folder(folder: str | Path, fps: float) -> Iterator[tuple[Image.Image, float]]:
    """Images of a folder in name order, as a live source at `fps` frames per second: (frame, timestamp)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MediaError(f"{folder}: no image files")
    for i, file in enumerate(files):
        yield load_image(file), i / fps


def iter_video(path: str | Path, fps: float, max_frames: int | None = None) -> Iterator[tuple[Image.Image, float]]:
    """A video file as a live source: (frame, timestamp) pairs sampled at `fps`, decoded lazily."""
    import av

    path = Path(path)
    if not path.exists():
        raise MediaError(f"{path}: no such file")
    count, next_time = 0, 0.0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                t = float(frame.time or 0.0)
                if t + 1e-6 >= next_time:
                    yield frame.to_image().convert("RGB"), t
                    count += 1
                    next_time = count / fps
                    if max_frames is not None and count >= max_frames:
                        return
    except MediaError:
        raise
    except Exception as err:
        raise MediaError(f"{path}: {_video_problem(path, err)}") from err
