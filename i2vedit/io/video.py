"""Reading and writing videos with PyAV, as ComfyUI IMAGE tensors (F, H, W, 3) float32 in [0, 1] RGB.

Frame rates are exact fractions (30000/1001 stays 30000/1001). Videos are written as H.264 yuv420p
mp4 (what browsers and phones play), odd sizes padded to even, with the source's audio carried over
as AAC. OpenCV only resizes frames as they are read.

A variable-frame-rate video is read at its average rate, frame after frame, with a logged warning:
its frames keep their order but not their timing.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, NoReturn

import av
import cv2
import numpy as np
import torch
from torch import Tensor

from ..errors import I2VEditError, VideoReadError
from .files import atomic_file
from .frames import check_time_range, sample_frame_indices

log = logging.getLogger("i2vedit")

_CONVERT_HINT = "convert it to mp4 (H.264), e.g. ffmpeg -i input -c:v libx264 -pix_fmt yuv420p output.mp4"
MAX_FPS_DENOMINATOR = 1001  # a float frame rate is read as the nearest fraction with at most this denominator
CRF = 18  # libx264's quality: visually lossless for most content, a few MB per minute at 576×1024
# frames libx264 plans its rate over; its default 40 holds that many raw frames per video being written,
# so the memory of a short output grows with its length (tens of MB at 480p), 10 stops that early
LOOKAHEAD = 10


@dataclass(frozen=True)
class Audio:
    """Decoded audio: ``samples`` (channels, count) float32 in [-1, 1] at ``sample_rate``, and the
    channel layout's name (``"stereo"``, ``"5.1"``; ``""``: the default for the channel count)."""

    samples: Tensor
    sample_rate: int
    layout: str = ""

    @property
    def seconds(self) -> float:
        return self.samples.shape[1] / self.sample_rate

    def repeated(self, times: int) -> Audio:
        """This audio played ``times`` times in a row (one copy per edited video of a batch)."""
        return Audio(self.samples.repeat(1, times), self.sample_rate, self.layout)


@dataclass
class VideoInfo:
    """What a video file holds: frames, exact frame rate and size, whether the rate varies, and audio."""

    path: str
    num_frames: int
    fps: Fraction
    height: int
    width: int
    variable_rate: bool = False
    has_audio: bool = False


@dataclass
class Video:
    """Frames read from a video (IMAGE, (N, H, W, 3)), their exact frame rate and the audio that goes with them."""

    frames: Tensor
    fps: Fraction
    audio: Audio | None = None


def as_fraction(fps: float | Fraction) -> Fraction:
    """A frame rate as an exact fraction: a float becomes the nearest fraction with a denominator of at most
    1001, so ``30000 / 1001`` as a float comes back as 30000/1001."""
    if isinstance(fps, Fraction):
        return fps
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not math.isfinite(fps) or fps <= 0:
        raise I2VEditError(f"frame rate {fps} fps is not positive; give a positive fps such as 8 or 30.")
    return Fraction(fps).limit_denominator(MAX_FPS_DENOMINATOR)


def _check_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise VideoReadError(f"no video at {p}; check the path (and that the file was uploaded).")
    if not p.is_file():
        raise VideoReadError(f"{p} is not a file; give the path of a video file.")
    if p.stat().st_size == 0:
        raise VideoReadError(f"{p} is empty (0 bytes); give a video file with content or re-export it.")
    return p


@contextlib.contextmanager
def _open(path: str | os.PathLike) -> Iterator[Any]:
    """An input container for a video, raising a VideoReadError that says what to do when it cannot be opened."""
    p = _check_path(path)
    try:
        container = av.open(str(p), mode="r")
    except (av.FFmpegError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise VideoReadError(f"{p} is not a readable video ({reason}); {_CONVERT_HINT}.") from None
    try:
        yield container
    finally:
        container.close()


def _video_stream(container: Any, path: str | os.PathLike) -> Any:
    if not container.streams.video:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "nothing"
        raise VideoReadError(
            f"{path} has no video stream (it holds {kinds}); give a video file, or {_CONVERT_HINT}."
        )
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _is_variable(timestamps: list[int]) -> bool:
    """Whether frame timestamps (in stream ticks) are unevenly spaced beyond a tick of rounding."""
    if len(timestamps) < 3:
        return False
    steps = np.diff(np.sort(np.asarray(timestamps, dtype=np.int64)))
    return bool(steps.max() - steps.min() > max(1.0, 0.01 * float(np.median(steps))))


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, exact frame rate and frame size of a video, checking that it can be read.

    Frames are counted from the container's packets (nothing is decoded); a variable frame rate is
    reported with a logged warning and read at the average rate.
    """
    with _open(path) as container:
        stream = _video_stream(container, path)
        timestamps: list[int] = []
        try:
            for packet in container.demux(stream):
                if packet.size:
                    ts = packet.pts if packet.pts is not None else packet.dts
                    timestamps.append(len(timestamps) if ts is None else int(ts))
        except av.FFmpegError as e:
            raise VideoReadError(f"{path} is damaged: reading it failed ({e}); {_CONVERT_HINT}.") from None
        rate = stream.average_rate or stream.guessed_rate
        height, width = int(stream.codec_context.height), int(stream.codec_context.width)
        has_audio = bool(container.streams.audio)
    if not timestamps or height <= 0 or width <= 0:
        raise VideoReadError(f"{path} has no video frames PyAV can read; {_CONVERT_HINT}.")
    if not rate or rate <= 0:
        raise VideoReadError(
            f"{path} reports no frame rate; re-encode it with a fixed frame rate, "
            "e.g. ffmpeg -i input -r 30 -c:v libx264 -pix_fmt yuv420p output.mp4."
        )
    variable = _is_variable(timestamps)
    if variable:
        log.warning(
            "%s has a variable frame rate: reading its %d frames in order at the average %.4g fps (their timing "
            "is not kept); for exact timing re-encode it at a fixed rate, e.g. ffmpeg -i input -r 30 output.mp4",
            path, len(timestamps), float(rate),
        )  # fmt: skip
    return VideoInfo(str(path), len(timestamps), Fraction(rate), height, width, variable, has_audio)


def _check_size(size: tuple[int, int] | None) -> None:
    if size is not None and (len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1):
        raise I2VEditError(
            f"size {size} is not a (height, width) pair of positive integers; give e.g. (576, 1024)."
        )


def iter_video_frames(
    path: str | os.PathLike, indices: Sequence[int], size: tuple[int, int] | None = None
) -> Iterator[np.ndarray]:
    """Decode the frames at ``indices`` (non-decreasing, repeats allowed) one by one as uint8 (H, W, 3) RGB.

    ``size`` (h, w) resizes each frame with INTER_AREA as it is read. Stops early, without error,
    if the video ends before an index is reached.
    """
    _check_size(size)
    if any(b < a for a, b in itertools.pairwise(indices)) or (len(indices) and indices[0] < 0):
        raise I2VEditError("frame indices must be non-negative and non-decreasing; sort them before reading.")
    if not len(indices):
        return
    with _open(path) as container:
        stream = _video_stream(container, path)
        wanted = iter(indices)
        index = next(wanted)
        try:
            for pos, frame in enumerate(container.decode(stream)):
                if pos < index:
                    continue
                rgb = frame.to_ndarray(format="rgb24")
                if size is not None and rgb.shape[:2] != tuple(size):
                    rgb = cv2.resize(rgb, (int(size[1]), int(size[0])), interpolation=cv2.INTER_AREA)
                while index == pos:
                    yield rgb
                    index = next(wanted, -1)
                if index < 0:
                    return
        except av.FFmpegError as e:
            log.warning("%s: decoding stopped at a damaged frame (%s); keeping the frames before it", path, e)


def _start_seconds(stream: Any) -> float:
    """Seconds at which a stream starts (0 when the container does not say)."""
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def _layout_name(stream: Any) -> str:
    """The stream's channel layout, or the usual one for its channel count where the file names none
    (``"2 channels"`` becomes ``"stereo"``)."""
    name = str(stream.layout.name)
    return av.AudioLayout(f"{stream.layout.nb_channels}c").name if name.endswith("channels") else name


def read_audio(path: str | os.PathLike, start: float, seconds: float) -> Audio | None:
    """The audio that plays from ``start`` for ``seconds`` (times on the video's clock), or None.

    None when the file has no audio stream or its audio cannot be decoded (then with a logged
    warning: the audio is dropped, the video is still read). Silence fills any part of the range
    the audio does not cover at its start.
    """
    with _open(path) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        video_start = _start_seconds(container.streams.video[0]) if container.streams.video else 0.0
        rate = int(stream.sample_rate or 0)
        try:
            if rate <= 0:
                raise ValueError("it reports no sample rate")
            begin = video_start + start  # on the audio stream's clock
            if begin > 1.0:
                container.seek(int((begin - 1.0) / stream.time_base), stream=stream, backward=True)
            layout = _layout_name(stream)
            resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
            wanted = round(seconds * rate)
            chunks: list[np.ndarray] = []
            have, first = 0, None
            for frame in container.decode(stream):
                for planar in resampler.resample(frame):
                    data = planar.to_ndarray()
                    if first is None:
                        pts, time_base = planar.pts, planar.time_base
                        t = (
                            _start_seconds(stream)
                            if pts is None or time_base is None
                            else float(pts * time_base)
                        )
                        first = round((t - begin) * rate)  # sample offset of the data in the range
                        if first > 0:  # the audio starts after the range does: silence first
                            chunks.append(np.zeros((data.shape[0], first), np.float32))
                            have = first
                        else:
                            data = data[:, -first:]
                    chunks.append(data)
                    have += data.shape[1]
                if have >= wanted:
                    break
        except (av.FFmpegError, ValueError) as e:
            log.warning("%s: its audio cannot be decoded (%s); the edited video will have no sound", path, e)
            return None
    if not chunks:
        return None
    samples = torch.from_numpy(np.concatenate(chunks, axis=1)[:, :wanted].astype(np.float32, copy=False))
    return Audio(samples, rate, layout) if samples.shape[1] else None


def read_video_clip(
    path: str | os.PathLike,
    start_t: float = 0.0,
    end_t: float = -1.0,
    sample_fps: float = -1.0,
    max_frames: int | None = None,
    max_bytes: int = 8 * 2**30,
    size: tuple[int, int] | None = None,
    audio: bool = True,
) -> Video:
    """Read a time range of a video as IMAGE frames (N, H, W, 3) with their exact frame rate and audio.

    ``end_t = -1`` reads to the end and ``sample_fps = -1`` keeps the native rate; ``size`` (h, w)
    resizes while reading. Raises before decoding if the frames would take more than ``max_bytes``,
    for a time or rate that is not a finite number in range, and for a sample fps above the video's
    own rate (which would only repeat frames). The audio starts at the first frame read and lasts as
    long as the frames do (N / fps): a time range trims it; a sample fps keeps the range's duration,
    so the range's audio is kept as it is.
    """
    if max_frames is not None and max_frames < 1:
        raise I2VEditError(f"max frames {max_frames} is below 1; use at least 1, or None for no limit.")
    info, indices, (height, width), fps = _sampled(path, start_t, end_t, sample_fps, size)
    if max_frames is not None:
        indices = indices[:max_frames]

    needed = len(indices) * height * width * 3 * 4
    if needed > max_bytes:
        raise VideoReadError(
            f"reading {len(indices)} frames of {height}×{width} from {path} "
            f"would need {needed / 2**30:.3g} GiB, "
            f"over the {max_bytes / 2**30:.3g} GiB cap; read less: a shorter time range (start/end time), "
            "a lower sample fps, a max frames limit, or a smaller size."
        )

    frames = torch.empty((len(indices), height, width, 3), dtype=torch.float32)
    count = 0
    for rgb in iter_video_frames(path, indices, size):
        frames[count] = torch.from_numpy(rgb).float().div_(255.0)
        count += 1
    if count == 0:
        raise VideoReadError(
            f"no frames could be decoded from {path}; the file may be damaged; {_CONVERT_HINT}."
        )
    if count < len(indices):
        frames = frames[:count].clone()
    return Video(frames, fps, _range_audio(path, info, indices[0], count, fps) if audio else None)


def _sampled(
    path: str | os.PathLike, start_t: float, end_t: float, sample_fps: float, size: tuple[int, int] | None
) -> tuple[VideoInfo, list[int], tuple[int, int], Fraction]:
    """A time range at a sample rate: the video's info, the frame indices it keeps, their size, their rate."""
    _check_size(size)
    check_time_range(start_t, end_t, sample_fps)  # before opening the file
    info = probe_video(path)
    indices = sample_frame_indices(info.num_frames, float(info.fps), start_t, end_t, sample_fps)
    hw = (int(size[0]), int(size[1])) if size is not None else (info.height, info.width)
    return info, indices, hw, info.fps if sample_fps == -1 else as_fraction(sample_fps)


def _range_audio(
    path: str | os.PathLike, info: VideoInfo, first: int, count: int, fps: Fraction
) -> Audio | None:
    """The audio of ``count`` frames at ``fps`` from source frame ``first``, if the video has any."""
    return read_audio(path, float(first / info.fps), float(count / fps)) if info.has_audio else None


class VideoSource:
    """The sampled frames of a video file, decoded clip by clip as they are asked for (a ``FrameSource``).

    Only the frames of the last ``read`` are held, so a video of any length takes the memory of one clip.
    Reads go forward (a read before the held frames decodes again from the start). The time range,
    sample fps, size and audio are ``read_video_clip``'s; the frame count comes from the container, and
    a video that ends before it raises ``VideoReadError`` when the missing frame is asked for.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        start_t: float = 0.0,
        end_t: float = -1.0,
        sample_fps: float = -1.0,
        size: tuple[int, int] | None = None,
        audio: bool = True,
    ) -> None:
        self.path, self.size = path, size
        info, self.indices, (self.height, self.width), self.fps = _sampled(
            path, start_t, end_t, sample_fps, size
        )
        self.count = len(self.indices)
        self.audio = _range_audio(path, info, self.indices[0], self.count, self.fps) if audio else None
        self._decoder: Iterator[np.ndarray] | None = None
        self._next = 0  # the sampled position the decoder yields next
        self._held: list[Tensor] = []  # frames next − len … next − 1

    def read(self, start: int, end: int) -> Tensor:
        """Frames ``start`` to ``end`` (exclusive) of the sampled ones, as an IMAGE (end − start, H, W, 3)."""
        if not 0 <= start < end <= self.count:
            raise I2VEditError(
                f"frames {start}..{end} are not within the video's {self.count} sampled frames."
            )
        first = self._next - len(self._held)  # the held frames run up to the one decoded last
        if self._decoder is None or start < first:
            self._decoder, self._next, self._held, first = (
                iter_video_frames(self.path, self.indices, self.size),
                0,
                [],
                0,
            )
        self._held = self._held[start - first :]
        while self._next < end:
            rgb = next(self._decoder, None)
            if rgb is None:
                raise VideoReadError(
                    f"{self.path} ended after {self._next} of its {self.count} sampled frames (a damaged or cut "
                    f"file?); {_CONVERT_HINT}."
                )
            if self._next >= start:
                self._held.append(torch.from_numpy(rgb).float().div_(255.0))
            self._next += 1
        return torch.stack(self._held[: end - start])


def read_video(
    path: str | os.PathLike,
    start_t: float = 0.0,
    end_t: float = -1.0,
    sample_fps: float = -1.0,
    max_frames: int | None = None,
    max_bytes: int = 8 * 2**30,
    size: tuple[int, int] | None = None,
) -> tuple[Tensor, Fraction]:
    """``read_video_clip`` without the audio: the frames and their exact frame rate."""
    clip = read_video_clip(path, start_t, end_t, sample_fps, max_frames, max_bytes, size, audio=False)
    return clip.frames, clip.fps


def _to_even_rgb24(frame: Tensor, height: int, width: int) -> np.ndarray:
    """One IMAGE frame as uint8 RGB, its last row and column repeated up to the even ``height`` × ``width``."""
    rgb = (frame.detach().to("cpu", torch.float32) * 255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()
    pad = ((0, height - rgb.shape[0]), (0, width - rgb.shape[1]), (0, 0))
    return np.ascontiguousarray(np.pad(rgb, pad, mode="edge") if any(p[1] for p in pad) else rgb)


def _audio_stream(container: Any, audio: Audio | None, target: Path) -> Any:
    """An AAC stream for ``audio``, or None (with a logged warning) when AAC cannot carry it."""
    if audio is None:
        return None
    layout = audio.layout or av.AudioLayout(f"{audio.samples.shape[0]}c").name
    try:
        trial = av.CodecContext.create("aac", "w")  # opened apart: a stream that fails stays in the container
        trial.sample_rate, trial.layout, trial.format = audio.sample_rate, layout, "fltp"
        trial.open()
    except (av.FFmpegError, ValueError) as e:
        log.warning(
            "%s: the source's audio (%d channels, %d Hz) cannot be encoded as AAC (%s); writing the video without "
            "sound", target, audio.samples.shape[0], audio.sample_rate, e,
        )  # fmt: skip
        return None
    stream = container.add_stream("aac", rate=audio.sample_rate)
    stream.layout = layout
    return stream


def _audio_frame(audio: Audio, start: int, stop: int, layout: str) -> Any:
    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(audio.samples[:, start:stop].numpy()), "fltp", layout
    )
    frame.sample_rate = audio.sample_rate
    frame.pts = start
    frame.time_base = Fraction(1, audio.sample_rate)
    return frame


class VideoWriter:
    """An H.264 yuv420p mp4 written clip by clip at exactly ``fps``, with ``audio`` as AAC (``write_video``).

    ``append`` encodes IMAGE frames (F, H, W, 3) as they come, the audio of their duration interleaved,
    so a long video never has to be held whole; ``close`` (the end of a ``with`` block) reads the file
    back and moves it onto ``path`` atomically. Odd sizes are padded to even with the last row or column
    (yuv420p needs even sizes). Audio past the video's end is cut; audio AAC cannot carry is dropped with
    a logged warning, never failing the write. A write that fails (a full disk) raises an
    ``I2VEditError`` and leaves any previous file intact; so does an exception inside the block.
    """

    def __init__(self, path: str | os.PathLike, fps: float | Fraction, audio: Audio | None = None) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() != ".mp4":
            raise I2VEditError(
                f"{self.path} does not end in .mp4; write_video writes mp4, so give a path ending in .mp4."
            )
        self.rate, self.audio = as_fraction(fps), audio
        self.count = 0
        self._file: contextlib.AbstractContextManager[Path] | None = None
        self._container: Any = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        if error is None:
            self.close()
        else:  # the block failed: drop the file quietly and let its error through
            self.discard()

    def _open(self, height: int, width: int) -> None:
        self._file = atomic_file(self.path, "video")
        self._tmp = self._file.__enter__()
        try:
            self._container = av.open(str(self._tmp), mode="w", options={"movflags": "+faststart"})
            stream = self._container.add_stream("h264", rate=self.rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            if stream.codec_context.name == "libx264":
                # one encoder thread: the same frames give the same file, whatever the machine's load (a
                # frame-threaded libx264 once wrote one frame of a test video differently); encoding stays
                # far faster than the edit
                stream.options = {"crf": str(CRF), "rc-lookahead": str(LOOKAHEAD), "threads": "1"}
            self._video, self._size = stream, (height, width)
            self._sound = _audio_stream(self._container, self.audio, self.path)
        except BaseException as e:
            self._fail(e)

    def append(self, frames: Tensor) -> None:
        """Encode IMAGE frames (F, H, W, 3) of the size of the first ones after those appended so far."""
        if frames.ndim != 4 or frames.shape[3] != 3 or frames.shape[0] < 1:
            raise I2VEditError(
                f"frames have shape {tuple(frames.shape)}; give an IMAGE batch of shape (F, H, W, 3) with F >= 1."
            )
        size = (
            int(frames.shape[1]) + int(frames.shape[1]) % 2,
            int(frames.shape[2]) + int(frames.shape[2]) % 2,
        )
        if self._container is None:
            self._open(*size)
        elif size != self._size:
            raise I2VEditError(
                f"frames of {size} after frames of {self._size}: one video has one frame size."
            )
        try:
            for image in frames:
                self._encode(image)
        except BaseException as e:
            self._fail(e)

    def _encode(self, image: Tensor) -> None:
        i, (height, width) = self.count, self._size
        frame = av.VideoFrame.from_ndarray(_to_even_rgb24(image, height, width), format="rgb24")
        frame.pts = i
        self._container.mux(self._video.encode(frame.reformat(format="yuv420p")))
        audio, sound = self.audio, self._sound
        if sound is not None and audio is not None:  # the audio of this frame's duration, interleaved
            per_frame = audio.sample_rate / self.rate
            start, stop = round(i * per_frame), min(round((i + 1) * per_frame), audio.samples.shape[1])
            if stop > start:
                self._container.mux(sound.encode(_audio_frame(audio, start, stop, sound.layout.name)))
        self.count += 1

    def close(self) -> None:
        """Flush the encoders, check the file holds every frame, and move it onto ``path``."""
        if self._container is None:
            raise I2VEditError(f"no frames were given for {self.path}; a video needs at least one frame.")
        try:
            self._container.mux(self._video.encode(None))
            if self._sound is not None:
                self._container.mux(self._sound.encode(None))
            self._container.close()
            self._container = None
            _check_written(self._tmp, self.count, self.path)
        except BaseException as e:
            self._fail(e)
        assert self._file is not None
        self._file.__exit__(None, None, None)
        self._file = None

    def _close_container(self) -> None:
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.close()
            self._container = None

    def _fail(self, error: BaseException) -> NoReturn:
        """Drop the temp file (the previous file at ``path`` stays) and raise ``error`` as ``atomic_file``
        words a failed write."""
        self._close_container()
        file, self._file = self._file, None
        if file is not None:
            file.__exit__(type(error), error, error.__traceback__)
        raise error

    def discard(self) -> None:
        """Drop what was written; a previous file at ``path`` stays as it was."""
        self._close_container()
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(BaseException):
                file.__exit__(I2VEditError, I2VEditError("discarded"), None)


def write_video(
    path: str | os.PathLike, frames: Tensor, fps: float | Fraction, audio: Audio | None = None
) -> None:
    """Write IMAGE frames (F, H, W, 3) to an H.264 yuv420p mp4 at exactly ``fps``, with ``audio`` as AAC
    (``VideoWriter``, all frames at once)."""
    with VideoWriter(path, fps, audio) as writer:
        writer.append(frames)


def _check_written(tmp: Path, expected: int, target: Path) -> None:
    """Read the file back and count its frames: a write cut short (a full disk, a file size limit) is refused."""
    size = tmp.stat().st_size
    decoded = 0
    if size > 0:
        with contextlib.suppress(av.FFmpegError, VideoReadError), _open(tmp) as container:
            for _ in container.decode(video=0):
                decoded += 1
    if decoded != expected:
        raise I2VEditError(
            f"could not write video {target}: {size} bytes were written holding {decoded} of {expected} frames "
            "(a full disk or a file size limit?); free disk space or choose another folder, then run again. "
            "Any previous file there is unchanged."
        )
