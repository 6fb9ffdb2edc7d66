"""Media named in requests: data URLs, files confined to the media root, and remote URLs only when enabled.

What this module guarantees: nothing outside the media root is opened (paths with `..` are refused and symlinks are
resolved before the containment check, so a link pointing out of the root is refused too); nothing remote is
fetched unless the server enables it, and then only from public addresses (unless allowed), within a byte and a
time limit, without following redirects; every image or video is decoded completely, within the pixel, duration and
frame limits, before anything reaches the model. Failures raise `APIError` with the status to answer: 400 for bad
input, 403 for a forbidden path or host. It does not guard against a file being swapped for a symlink between the
check and the open (the media root should not be writable by clients). Error messages name the client's own input
(`messages[0].content[1]`, the path it gave), never a server path, a temporary file or an object's address.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import re
import socket
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image

from ..processing.media import MediaError, VideoFrames, load_image, read_video
from .config import ServerConfig
from .errors import APIError

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect could lead to an address the public-host check never saw: answer with the 3xx instead."""

    def redirect_request(self, *args, **kwargs):
        return None


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)


class MediaLoader:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.root = config.media_root  # already resolved

    # -- public --------------------------------------------------------------------------------------------------
    def image(self, url: str, where: str = "image") -> Image.Image:
        """An RGB image from a data URL, a file under the media root or (if enabled) a remote URL."""
        with _param(where):
            return self.image_from(self.source(url, "image", where), where)

    def image_from(self, source: bytes | Path, where: str = "image") -> Image.Image:
        try:
            return load_image(source, max_pixels=self.config.max_image_pixels)
        except MediaError as err:
            raise APIError(400, f"{where}: {_client_text(err, source)}", code="invalid_image", param=where) from err
        except Exception as err:  # PIL's DecompressionBombError and friends
            raise APIError(
                400, f"{where}: cannot decode image ({_client_text(err, source)})", code="invalid_image", param=where
            ) from err

    def video(self, url: str, fps: float | None = None, where: str = "video") -> VideoFrames:
        """Frames sampled from a video URL within the duration and frame limits."""
        with _param(where):
            return self.video_from(self.source(url, "video", where), fps, where)

    def video_from(self, source: bytes | Path, fps: float | None = None, where: str = "video") -> VideoFrames:
        if isinstance(source, Path):
            return self._read_video(source, fps, where)
        with tempfile.NamedTemporaryFile(prefix="infinitevl-video-") as tmp:
            tmp.write(source)
            tmp.flush()
            try:
                return self._read_video(Path(tmp.name), fps, where)
            except APIError as err:  # the temporary file's name means nothing to the client
                err.message = err.message.replace(tmp.name, "the video data")
                raise

    def source(self, url: str, kind: str, where: str) -> bytes | Path:
        """The raw bytes (data and remote URLs) or the confined path (local files) that `url` names."""
        url = url.strip()
        if url[:5].lower() == "data:":
            return self._data_url(url, kind, where)
        scheme = url.split(":", 1)[0].lower() if _SCHEME.match(url) else ""
        if scheme in ("http", "https"):
            return self._remote(url, where)
        if scheme in ("", "file"):
            return self._local(url, where)
        raise APIError(
            400, f"{where}: unsupported URL scheme {scheme[:32]!r} (use data:, file: or a path)", code="bad_url"
        )

    # -- sources ---------------------------------------------------------------------------------------------------
    def _data_url(self, url: str, kind: str, where: str) -> bytes:
        header, comma, payload = url[5:].partition(",")
        if not comma:
            raise APIError(400, f"{where}: malformed data URL (no comma before the data)", code="invalid_data_url")
        if not header.endswith(";base64"):
            raise APIError(
                400, f"{where}: data URLs must be base64 (data:{kind}/...;base64,...)", code="invalid_data_url"
            )
        try:
            data = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
        except (binascii.Error, ValueError) as err:
            raise APIError(400, f"{where}: bad base64 in the data URL ({err})", code="invalid_base64") from err
        if not data:
            raise APIError(400, f"{where}: the data URL is empty", code="invalid_data_url")
        return data

    def _local(self, url: str, where: str) -> Path:
        if url.lower().startswith("file:"):
            parts = urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                raise APIError(400, f"{where}: file URLs may not name a host ({parts.netloc!r})", code="bad_url")
            raw = unquote(parts.path)
        else:
            raw = url
        if self.root is None:
            raise APIError(
                400,
                f"{where}: local files are disabled on this server; send the media as a base64 data URL, or start "
                "the server with --media-root DIR to allow files under DIR",
                code="local_media_disabled",
            )
        if not raw or "\x00" in raw:
            raise APIError(400, f"{where}: empty or invalid path", code="bad_url")
        path = Path(raw)
        if ".." in path.parts:
            raise APIError(
                403,
                f"{where}: the path {raw!r} contains '..'; paths must stay inside the media root",
                code="media_path_forbidden",
            )
        resolved = (path if path.is_absolute() else self.root / path).resolve()  # follows every symlink
        if not resolved.is_relative_to(self.root):
            raise APIError(403, f"{where}: the path {raw!r} leads outside the media root", code="media_path_forbidden")
        if not resolved.is_file():
            raise APIError(400, f"{where}: no such file under the media root: {raw!r}", code="media_not_found")
        return resolved

    def _remote(self, url: str, where: str) -> bytes:
        c = self.config
        if not c.allow_remote_media:
            raise APIError(
                400,
                f"{where}: remote URLs are disabled on this server; send the media as a base64 data URL "
                "(or start the server with --allow-remote-media)",
                code="remote_media_disabled",
            )
        host = urlsplit(url).hostname
        if not host:
            raise APIError(400, f"{where}: the URL has no host", code="bad_url")
        if not c.remote_allow_private:
            self._check_public(host, where)
        deadline = time.monotonic() + c.remote_timeout
        slow = APIError(
            400, f"{where}: fetching {url} took longer than {c.remote_timeout:g} s", code="remote_media_timeout"
        )
        data = bytearray()
        try:
            with _NO_REDIRECTS.open(url, timeout=c.remote_timeout) as response:
                if int(response.headers.get("Content-Length") or 0) > c.remote_max_bytes:
                    raise _too_large(where, c.remote_max_bytes)
                while chunk := response.read1(64 * 1024):  # what has arrived, not a full buffer
                    data += chunk
                    if len(data) > c.remote_max_bytes:
                        raise _too_large(where, c.remote_max_bytes)
                    if time.monotonic() > deadline:
                        raise slow
        except urllib.error.HTTPError as err:  # includes redirects, which are not followed
            raise APIError(400, f"{where}: fetching {url} gave HTTP {err.code}", code="remote_media_failed") from err
        except TimeoutError as err:
            raise slow from err
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise APIError(400, f"{where}: cannot fetch {url} ({err})", code="remote_media_failed") from err
        return bytes(data)

    @staticmethod
    def _check_public(host: str, where: str) -> None:
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError as err:
            raise APIError(400, f"{where}: cannot resolve {host!r} ({err})", code="remote_media_failed") from err
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            if not address.is_global:
                raise APIError(
                    403, f"{where}: {host!r} resolves to a non-public address ({address})", code="remote_host_forbidden"
                )

    # -- video ---------------------------------------------------------------------------------------------------
    def _read_video(self, path: Path, fps: float | None, where: str) -> VideoFrames:
        """Probe first (size, duration), then decode at a rate that fits the frame limit."""
        import av

        c = self.config
        fps = fps or c.video_fps
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise MediaError("no video stream")
                stream = container.streams.video[0]
                width, height = stream.codec_context.width, stream.codec_context.height
                duration = None
                if stream.duration is not None and stream.time_base is not None:
                    duration = float(stream.duration * stream.time_base)
                elif container.duration is not None:
                    duration = container.duration / 1e6
        except Exception as err:
            raise APIError(
                400, f"{where}: cannot decode video ({_client_text(err, path)})", code="invalid_video", param=where
            ) from err
        if width * height > c.max_image_pixels:
            raise APIError(
                400,
                f"{where}: {width}x{height} frames exceed the limit of {c.max_image_pixels} pixels",
                code="invalid_video",
            )
        if duration is not None and duration > c.max_video_seconds:
            raise APIError(
                400,
                f"{where}: {duration:.1f} s of video exceeds the limit of {c.max_video_seconds:g} s",
                code="video_too_long",
            )
        if duration:
            fps = min(fps, c.max_video_frames / duration)  # sample fewer frames rather than cut the video short
        try:
            return read_video(path, fps=fps, max_frames=c.max_video_frames, max_duration=c.max_video_seconds)
        except MediaError as err:
            raise APIError(400, f"{where}: {_client_text(err, path)}", code="invalid_video", param=where) from err


def _too_large(where: str, limit: int) -> APIError:
    return APIError(400, f"{where}: the remote file exceeds the limit of {limit} bytes", code="remote_media_too_large")


@contextlib.contextmanager
def _param(where: str):
    """Every media error names the part of the request it is about in `param`."""
    try:
        yield
    except APIError as err:
        err.param = err.param or where
        raise


_OBJECT_REPR = re.compile(r"\s*<[^<>]*(?: at 0x[0-9a-fA-F]+| name=[^<>]*)>")


def _client_text(err: Exception, source) -> str:
    """An error's text without what the client did not give: media errors start with the file name (a temporary
    or server-side path), and PIL and PyAV quote object reprs and paths."""
    text = str(err)
    name = "image bytes" if isinstance(source, bytes) else str(source)
    if text.startswith(name + ": "):
        text = text[len(name) + 2 :]
    if isinstance(source, Path):
        text = text.replace(str(source), "the file")
    return _OBJECT_REPR.sub("", text)
