"""Frame sampling, clip splitting and stitching, and resize/pad plans with an exact inverse.

Frames use the ComfyUI IMAGE layout throughout: a float32 tensor (F, H, W, C) with values in
[0, 1] and C = 3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import I2VEditError

ResizeMode = Literal["stretch", "pad"]


def check_time_range(
    start_t: float, end_t: float, sample_fps: float, native_fps: float | None = None
) -> None:
    """Refuse a time range or sample rate that is not a finite number in range (``-1``: the end / own rate)."""
    for name, value, hint in (
        ("start time", start_t, "seconds from the start, 0 or more"),
        ("end time", end_t, "seconds from the start, or -1 for the end of the video"),
        ("sample fps", sample_fps, "frames per second above 0, or -1 for the video's own rate"),
    ):
        try:
            finite = math.isfinite(value)
        except TypeError:
            finite = False
        if not finite:
            raise I2VEditError(f"{name} {value} is not a finite number; give {hint}.")
    if start_t < 0:
        raise I2VEditError(f"start time {start_t:g} s is negative; use a start time of 0 s or later.")
    if end_t != -1 and end_t <= 0:
        raise I2VEditError(
            f"end time {end_t:g} s is not after 0 s; give a later end time, or -1 for the whole video."
        )
    if end_t != -1 and start_t >= end_t:
        raise I2VEditError(
            f"start time {start_t:g} s is not before end time {end_t:g} s; give a start time before the end time."
        )
    if sample_fps != -1 and sample_fps <= 0:
        raise I2VEditError(
            f"sample fps {sample_fps:g} is not positive; use a positive sample fps, or -1 for the "
            + (f"native {native_fps:g} fps." if native_fps is not None else "video's own rate.")
        )


def sample_frame_indices(
    num_frames: int,
    native_fps: float,
    start_t: float = 0.0,
    end_t: float = -1.0,
    sample_fps: float = -1.0,
) -> list[int]:
    """Indices of the frames to read for a time range and sample rate (the I2VEdit authors' rule).

    ``end_t = -1`` means the end of the video and ``sample_fps = -1`` means the native frame rate.
    """
    if num_frames < 1:
        raise I2VEditError(f"the video has {num_frames} frames; give a video with at least one frame.")
    if not math.isfinite(native_fps) or native_fps <= 0:
        raise I2VEditError(
            f"the video reports a frame rate of {native_fps} fps; re-encode it with a fixed frame rate "
            "(e.g. ffmpeg -i in.mp4 -r 30 out.mp4)."
        )
    check_time_range(start_t, end_t, sample_fps, native_fps)
    if sample_fps > native_fps * (1 + 1e-6):
        raise I2VEditError(
            f"sample fps {sample_fps:g} is above the frame rate of the video ({native_fps:g} fps), so frames would be "
            f"repeated; use a sample fps of at most {native_fps:g}, or -1 for the video's own rate."
        )
    duration = num_frames / native_fps
    end_t = duration if end_t == -1 else min(duration, end_t)
    if start_t >= end_t:
        raise I2VEditError(
            f"start time {start_t:g} s is not before end time {end_t:g} s (the video lasts {duration:g} s); "
            "use a start time before the end time."
        )
    sample_fps = native_fps if sample_fps == -1 else sample_fps

    count = int((end_t - start_t) * sample_fps)
    if count == 0:
        span = end_t - start_t
        raise I2VEditError(
            f"the range {start_t:g}–{end_t:g} s ({span:g} s) at {sample_fps:g} fps gives no frames; "
            f"use a range of at least {1 / sample_fps:g} s or a sample fps of at least {1 / span:g}."
        )
    indices = np.linspace(int(start_t * native_fps), int(end_t * native_fps), count, endpoint=False).astype(
        int
    )
    return np.minimum(indices, num_frames - 1).tolist()


def clip_ranges(num_frames: int, length: int, overlap: int = 1) -> list[tuple[int, int]]:
    """Half-open ``[start, end)`` clips of at most ``length`` frames covering the video.

    Each clip after the first starts ``overlap`` frames before the previous clip's end, so
    consecutive clips share ``overlap`` frames; the last clip may be shorter.
    """
    if num_frames < 1:
        raise I2VEditError(f"the video has {num_frames} frames; give a video with at least one frame.")
    if length < 2:
        raise I2VEditError(f"clip length {length} is too short; use a clip length of at least 2 frames.")
    if overlap < 0:
        raise I2VEditError(f"clip overlap {overlap} is negative; use an overlap of 0 or more frames.")
    if overlap >= length:
        raise I2VEditError(
            f"clip overlap {overlap} is not smaller than the clip length {length}; "
            f"use an overlap of at most {length - 1} frames or a longer clip."
        )
    ranges = [(0, min(length, num_frames))]
    while ranges[-1][1] < num_frames:
        start = ranges[-1][1] - overlap
        ranges.append((start, min(start + length, num_frames)))
    return ranges


def stitch_clips(clips: Sequence[Tensor], overlap: int) -> Tensor:
    """Join clips made with :func:`clip_ranges` back into one video, dropping the repeated overlap frames."""
    if len(clips) == 0:
        raise I2VEditError("no clips to stitch; give at least one clip.")
    if overlap < 0:
        raise I2VEditError(f"clip overlap {overlap} is negative; use the overlap the clips were split with.")
    frame_shape = tuple(clips[0].shape[1:])
    parts = [clips[0]]
    for i, clip in enumerate(clips[1:], start=1):
        if tuple(clip.shape[1:]) != frame_shape:
            raise I2VEditError(
                f"clip {i} has frames of shape {tuple(clip.shape[1:])} but clip 0 has {frame_shape}; "
                "resize all clips to one frame size before stitching."
            )
        if clip.shape[0] <= overlap:
            raise I2VEditError(
                f"clip {i} has {clip.shape[0]} frames, no more than the overlap of {overlap}, so it adds "
                "nothing; split with clip_ranges and stitch with the same overlap."
            )
        parts.append(clip[overlap:])
    return torch.cat(parts, dim=0)


def _nearest_multiple(x: int, multiple: int) -> int:
    return max(multiple, math.floor(x / multiple + 0.5) * multiple)


def _check_multiple(multiple: int) -> None:
    if multiple < 1:
        raise I2VEditError(f"size multiple {multiple} is not positive; use a positive multiple such as 64.")


def valid_size(h: int, w: int, multiple: int = 64) -> tuple[int, int]:
    """The nearest size whose sides are multiples of ``multiple`` (each side at least ``multiple``)."""
    _check_multiple(multiple)
    return _nearest_multiple(h, multiple), _nearest_multiple(w, multiple)


def check_size(h: int, w: int, multiple: int = 64) -> None:
    """Raise if ``h``×``w`` is not a usable generation size, naming the nearest sizes that are."""
    _check_multiple(multiple)
    if h < 1 or w < 1:
        raise I2VEditError(f"size {h}×{w} is empty; use a size of at least {multiple}×{multiple}.")
    if h % multiple == 0 and w % multiple == 0:
        return
    down = (max(multiple, h // multiple * multiple), max(multiple, w // multiple * multiple))
    up = (-(-h // multiple) * multiple, -(-w // multiple) * multiple)
    candidates: list[tuple[int, int]] = []
    for size in (valid_size(h, w, multiple), down, up):
        if size not in candidates:
            candidates.append(size)
    names = [f"{ch}×{cw}" for ch, cw in candidates]
    choice = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    raise I2VEditError(f"{h}×{w} is not a multiple of {multiple}; use {choice}.")


def fit_size(h: int, w: int, max_side: int = 1024, multiple: int = 64) -> tuple[int, int]:
    """A generation size with the source's aspect ratio, long side the largest multiple within ``max_side``.

    Small sources are scaled up and large ones down; each side is a multiple of ``multiple``.
    """
    _check_multiple(multiple)
    if h < 1 or w < 1:
        raise I2VEditError(f"source size {h}×{w} is empty; give frames with at least one pixel.")
    if max_side < multiple:
        raise I2VEditError(
            f"max side {max_side} is smaller than the size multiple {multiple}; "
            f"use a max side of at least {multiple}."
        )
    long_side = max_side // multiple * multiple
    short_side = min(long_side, _nearest_multiple(round(long_side * min(h, w) / max(h, w)), multiple))
    return (long_side, short_side) if h >= w else (short_side, long_side)


def to_bchw(frames: Tensor) -> Tensor:
    """IMAGE (F, H, W, C) -> (F, C, H, W), as a view."""
    if frames.ndim != 4:
        raise I2VEditError(
            f"expected frames of shape (F, H, W, C), got shape {tuple(frames.shape)}; give a batch of images."
        )
    return frames.permute(0, 3, 1, 2)


def from_bchw(x: Tensor) -> Tensor:
    """(F, C, H, W) -> IMAGE (F, H, W, C), as a view."""
    if x.ndim != 4:
        raise I2VEditError(
            f"expected a tensor of shape (F, C, H, W), got shape {tuple(x.shape)}; give a 4-D batch."
        )
    return x.permute(0, 2, 3, 1)


def to_signed(x: Tensor) -> Tensor:
    """Map values from [0, 1] to [-1, 1]."""
    return x * 2.0 - 1.0


def from_signed(x: Tensor) -> Tensor:
    """Map values from [-1, 1] to [0, 1], clamping anything outside."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


def stack_frames(frames: Sequence[Tensor]) -> Tensor:
    """Stack single images, each (H, W, C) or (1, H, W, C), into one IMAGE batch (F, H, W, C)."""
    if len(frames) == 0:
        raise I2VEditError("no frames to stack; give at least one image.")
    images: list[Tensor] = []
    for i, frame in enumerate(frames):
        if frame.ndim == 4 and frame.shape[0] == 1:
            frame = frame[0]
        if frame.ndim != 3:
            raise I2VEditError(
                f"frame {i} has shape {tuple(frame.shape)}; give images of shape (H, W, C) or (1, H, W, C)."
            )
        if images and frame.shape != images[0].shape:
            raise I2VEditError(
                f"frame {i} is {tuple(frame.shape)} (H, W, C) but frame 0 is {tuple(images[0].shape)}; "
                "resize all frames to one size before stacking."
            )
        images.append(frame)
    return torch.stack(images, dim=0)


def resize_frames(frames: Tensor, h: int, w: int) -> Tensor:
    """Bilinear antialiased resize of an IMAGE batch; returns the input unchanged when the size matches."""
    if frames.shape[1] == h and frames.shape[2] == w:
        return frames
    x = to_bchw(frames.float())
    x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return from_bchw(x).clamp(0.0, 1.0).to(frames.dtype).contiguous()


@dataclass(frozen=True)
class ResizePlan:
    """How frames of size src go to a generation size dst, and back again.

    The source occupies the content box ``(top, left, content_h, content_w)`` of the destination;
    in "pad" mode the rest is filled with ``fill``, in "stretch" mode the box is the whole frame.
    """

    src_h: int
    src_w: int
    dst_h: int
    dst_w: int
    mode: ResizeMode
    top: int
    left: int
    content_h: int
    content_w: int
    fill: float = 0.0

    def _check_frames(self, frames: Tensor, h: int, w: int, what: str) -> None:
        if frames.ndim != 4:
            raise I2VEditError(
                f"expected frames of shape (F, H, W, C), got shape {tuple(frames.shape)}; "
                "give a batch of images."
            )
        if frames.shape[1] != h or frames.shape[2] != w:
            raise I2VEditError(
                f"{what} expects frames of {h}×{w} but got {frames.shape[1]}×{frames.shape[2]}; "
                f"give frames of {h}×{w} or make a new plan for this size."
            )

    def apply(self, frames: Tensor) -> Tensor:
        """Resize (and pad) source frames (F, src_h, src_w, C) to (F, dst_h, dst_w, C)."""
        self._check_frames(frames, self.src_h, self.src_w, "ResizePlan.apply")
        content = resize_frames(frames, self.content_h, self.content_w)
        if self.content_h == self.dst_h and self.content_w == self.dst_w:
            return content
        out = frames.new_full((frames.shape[0], self.dst_h, self.dst_w, frames.shape[3]), self.fill)
        out[:, self.top : self.top + self.content_h, self.left : self.left + self.content_w] = content
        return out

    def invert(self, frames: Tensor) -> Tensor:
        """Undo :meth:`apply`: crop the content box of (F, dst_h, dst_w, C), resize it to the source size."""
        self._check_frames(frames, self.dst_h, self.dst_w, "ResizePlan.invert")
        content = frames[:, self.top : self.top + self.content_h, self.left : self.left + self.content_w]
        return resize_frames(content, self.src_h, self.src_w)

    def pad_mask(self) -> Tensor:
        """A (dst_h, dst_w) bool tensor that is True on padding and False on content."""
        mask = torch.ones(self.dst_h, self.dst_w, dtype=torch.bool)
        mask[self.top : self.top + self.content_h, self.left : self.left + self.content_w] = False
        return mask


def make_resize_plan(
    src_h: int,
    src_w: int,
    dst_h: int,
    dst_w: int,
    mode: ResizeMode = "pad",
    fill: float = 0.0,
    allow_upscale: bool = True,
) -> ResizePlan:
    """Plan how to bring src_h×src_w frames to the generation size dst_h×dst_w (a multiple of 64).

    "pad" keeps the aspect ratio, scaling the source to fit inside dst and centring it;
    with ``allow_upscale=False`` a source that already fits is only padded. "stretch" fills dst.
    """
    if src_h < 1 or src_w < 1:
        raise I2VEditError(f"source size {src_h}×{src_w} is empty; give frames with at least one pixel.")
    check_size(dst_h, dst_w)
    if mode == "stretch":
        return ResizePlan(src_h, src_w, dst_h, dst_w, mode, 0, 0, dst_h, dst_w, fill)
    if mode != "pad":
        raise I2VEditError(f"resize mode {mode!r} is unknown; use 'pad' or 'stretch'.")
    scale = min(dst_h / src_h, dst_w / src_w)
    if not allow_upscale:
        scale = min(scale, 1.0)
    content_h = min(dst_h, max(1, round(src_h * scale)))
    content_w = min(dst_w, max(1, round(src_w * scale)))
    top = (dst_h - content_h) // 2
    left = (dst_w - content_w) // 2
    return ResizePlan(src_h, src_w, dst_h, dst_w, mode, top, left, content_h, content_w, fill)


def nonfinite_frames(frames: torch.Tensor) -> list[int]:
    """Indices of the frames holding NaN or ±inf (one reduction per frame, no full-size temporary)."""
    if not frames.is_floating_point():
        return []
    sums = frames.float().sum(dim=tuple(range(1, frames.ndim)))
    suspects = (~torch.isfinite(sums)).nonzero().flatten().tolist()  # a finite frame can overflow the sum
    return [i for i in suspects if not bool(torch.isfinite(frames[i]).all())]


class FrameSource(Protocol):
    """Frames read a range at a time, so that a run holds one clip of a long video, not all of it."""

    count: int
    height: int
    width: int

    def read(self, start: int, end: int) -> Tensor:
        """Frames ``start`` to ``end`` (exclusive) as an IMAGE (end − start, H, W, 3)."""
        ...


class TensorSource:
    """An IMAGE batch already in memory as a ``FrameSource``."""

    def __init__(self, frames: Tensor) -> None:
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
            raise I2VEditError(f"frames must be an IMAGE batch (N, H, W, 3), got {tuple(frames.shape)}.")
        self.frames = frames
        self.count, self.height, self.width = (int(n) for n in frames.shape[:3])

    def read(self, start: int, end: int) -> Tensor:
        return self.frames[start:end]


class ResizedSource:
    """Another source's frames through a ``ResizePlan`` (to the generation size), a range at a time."""

    def __init__(self, source: FrameSource, plan: ResizePlan) -> None:
        self.source, self.plan = source, plan
        self.count, self.height, self.width = source.count, plan.dst_h, plan.dst_w

    def read(self, start: int, end: int) -> Tensor:
        return self.plan.apply(self.source.read(start, end))


def as_source(frames: Tensor | FrameSource) -> FrameSource:
    return TensorSource(frames) if isinstance(frames, Tensor) else frames
