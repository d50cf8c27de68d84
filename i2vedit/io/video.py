"""Reading and writing videos with OpenCV, as ComfyUI IMAGE tensors (F, H, W, 3) float32 in [0, 1] RGB."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from ..errors import I2VEditError, VideoReadError
from .files import atomic_write
from .frames import check_time_range, sample_frame_indices

_CONVERT_HINT = "convert it to mp4 (H.264), e.g. ffmpeg -i input -c:v libx264 -pix_fmt yuv420p output.mp4"


@dataclass
class VideoInfo:
    """What a video file holds, as OpenCV reports it."""

    path: str
    num_frames: int
    fps: float
    height: int
    width: int


def _open(path: str | os.PathLike) -> cv2.VideoCapture:
    """Open a video for reading, raising a VideoReadError that says what to do when it cannot be."""
    p = Path(path)
    if not p.exists():
        raise VideoReadError(f"no video at {p}; check the path (and that the file was uploaded).")
    if not p.is_file():
        raise VideoReadError(f"{p} is not a file; give the path of a video file.")
    if p.stat().st_size == 0:
        raise VideoReadError(f"{p} is empty (0 bytes); give a video file with content or re-export it.")
    cap = cv2.VideoCapture(str(p))
    if not cap.isOpened():
        cap.release()
        raise VideoReadError(f"{p} is not a readable video; {_CONVERT_HINT}.")
    return cap


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, frame rate and frame size of a video, checking that it can be read."""
    cap = _open(path)
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        num_frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        if num_frames <= 0 or height <= 0 or width <= 0:
            # The container did not say; decode to find out.
            num_frames = 0
            ok, frame = cap.read()
            if ok:
                height, width = frame.shape[:2]
            while ok:
                num_frames += 1
                ok = cap.grab()
    finally:
        cap.release()
    if num_frames <= 0:
        raise VideoReadError(f"{path} has no frames OpenCV can decode; {_CONVERT_HINT}.")
    if not math.isfinite(fps) or fps <= 0:
        raise VideoReadError(
            f"{path} reports a frame rate of {fps} fps; re-encode it with a fixed frame rate, "
            "e.g. ffmpeg -i input -r 30 -c:v libx264 -pix_fmt yuv420p output.mp4."
        )
    return VideoInfo(str(path), num_frames, fps, height, width)


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
    cap = _open(path)
    try:
        pos = -1
        rgb = None
        for index in indices:
            while pos < index:
                pos += 1
                if pos < index:
                    if not cap.grab():
                        return
                    continue
                ok, bgr = cap.read()
                if not ok:
                    return
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                if size is not None and rgb.shape[:2] != tuple(size):
                    rgb = cv2.resize(rgb, (int(size[1]), int(size[0])), interpolation=cv2.INTER_AREA)
            assert rgb is not None  # the first index always reads a frame
            yield rgb
    finally:
        cap.release()


def read_video(
    path: str | os.PathLike,
    start_t: float = 0.0,
    end_t: float = -1.0,
    sample_fps: float = -1.0,
    max_frames: int | None = None,
    max_bytes: int = 8 * 2**30,
    size: tuple[int, int] | None = None,
) -> tuple[Tensor, float]:
    """Read a time range of a video as IMAGE frames (N, H, W, 3) and return them with their frame rate.

    ``end_t = -1`` reads to the end and ``sample_fps = -1`` keeps the native rate; ``size`` (h, w)
    resizes while reading. Raises before decoding if the frames would take more than ``max_bytes``,
    for a time or rate that is not a finite number in range, and for a sample fps above the video's
    own rate (which would only repeat frames).
    """
    _check_size(size)
    if max_frames is not None and max_frames < 1:
        raise I2VEditError(f"max frames {max_frames} is below 1; use at least 1, or None for no limit.")
    check_time_range(start_t, end_t, sample_fps)  # before opening the file
    info = probe_video(path)
    indices = sample_frame_indices(info.num_frames, info.fps, start_t, end_t, sample_fps)
    if max_frames is not None:
        indices = indices[:max_frames]
    height, width = (int(size[0]), int(size[1])) if size is not None else (info.height, info.width)

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
    return frames, float(sample_fps) if sample_fps != -1 else info.fps


def write_video(path: str | os.PathLike, frames: Tensor, fps: float) -> None:
    """Write IMAGE frames (F, H, W, 3) to an mp4 file (mp4v codec), replacing the file atomically.

    The file is read back before it replaces ``path``: a write that fails (a full disk, where OpenCV
    reports nothing) raises an ``I2VEditError`` and leaves any previous file intact.
    """
    p = Path(path)
    if p.suffix.lower() != ".mp4":
        raise I2VEditError(
            f"{p} does not end in .mp4; write_video writes mp4, so give a path ending in .mp4."
        )
    if not math.isfinite(fps) or fps <= 0:
        raise I2VEditError(f"frame rate {fps} fps is not positive; give a positive fps such as 8 or 30.")
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.shape[0] < 1:
        raise I2VEditError(
            f"frames have shape {tuple(frames.shape)}; give an IMAGE batch of shape (F, H, W, 3) with F >= 1."
        )
    height, width = int(frames.shape[1]), int(frames.shape[2])
    count = int(frames.shape[0])

    def write(tmp: Path) -> None:
        fourcc = cv2.VideoWriter_fourcc(*"mp4v")  # type: ignore[attr-defined]  # missing from cv2's stubs
        writer = cv2.VideoWriter(str(tmp), fourcc, float(fps), (width, height))
        if not writer.isOpened():
            raise I2VEditError(
                f"OpenCV could not open an mp4v writer for {p} ({width}×{height} at {fps:g} fps); "
                "check that the folder is writable and that OpenCV was built with FFMPEG."
            )
        try:
            for frame in frames:
                rgb = (
                    (frame.detach().to("cpu", torch.float32) * 255.0).round_().clamp_(0, 255).to(torch.uint8)
                )
                writer.write(cv2.cvtColor(rgb.numpy(), cv2.COLOR_RGB2BGR))
        finally:
            writer.release()
        _check_written(tmp, count, p)

    atomic_write(p, write, "video")


def _check_written(tmp: Path, expected: int, target: Path) -> None:
    """OpenCV's writer fails silently (a full disk, a file size limit): read the file back and count."""
    size = tmp.stat().st_size
    decoded = 0
    if size > 0:
        cap = cv2.VideoCapture(str(tmp))
        try:
            while cap.isOpened() and decoded <= expected and cap.grab():
                decoded += 1
        finally:
            cap.release()
    if decoded != expected:
        raise I2VEditError(
            f"could not write video {target}: OpenCV wrote {size} bytes holding {decoded} of {expected} frames "
            "(a full disk or a file size limit?); free disk space or choose another folder, then run again. "
            "Any previous file there is unchanged."
        )
