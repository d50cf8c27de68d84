"""Region lock: where the edit may act, and everything outside it kept as the source was.

A region is a MASK-layout tensor (frames, H, W) in [0, 1] at the generation size, 1 where the edit may
act. Matched denoising holds the latent outside it on the source's own inversion trajectory
(``RegionLock.hold``, at a latent-size mask feathered inwards), and the decoded frames are composited
back onto the source pixels (``composite``, feathered inwards too), so that outside the mask the
output is the source exactly. ``auto_region`` draws the mask from where the edited first frame differs
from the source and carries it through the video along the source's optical flow.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import I2VEditError

log = logging.getLogger("i2vedit")

LATENT_FACTOR = 8  # pixels per latent cell (SVD's VAE)
DEFAULT_FEATHER = 8  # pixels
DEFAULT_THRESHOLD = 0.1  # of the largest per-pixel channel difference, [0, 1] units
DEFAULT_DILATE = 8  # pixels
# grey levels (of 255) a pixel may change by between frames and still count as static: a flat area has
# no flow of its own, and the flow field would drag its mask along with a neighbouring moving object
STATIC_LEVEL = 1


def _box_blur(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Two box passes of half the radius each (a smooth ramp), edge-replicated, (frames, H, W)."""
    x = mask[:, None].float()
    for r in (radius - radius // 2, radius // 2):
        if r > 0:
            x = F.avg_pool2d(F.pad(x, (r, r, r, r), mode="replicate"), 2 * r + 1, stride=1)
    return x[:, 0]


def feather(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """The mask faded inwards over about ``radius`` pixels: exactly 0 wherever ``mask`` is 0."""
    if radius <= 0:
        return mask.float()
    return mask.float() * _box_blur(mask, radius)


def check_region(region: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """A MASK of 1 or ``frames`` masks at (height, width) (``region_frames`` takes a range of frames).

    Another size is resized, with a logged warning; another count, an empty mask, or values outside
    [0, 1] are refused before any compute.
    """
    if region.ndim == 2:
        region = region[None]
    if region.ndim != 3:
        raise I2VEditError(
            f"a region mask must be (frames, height, width) or (height, width), got {tuple(region.shape)}."
        )
    if region.shape[0] not in (1, frames):
        raise I2VEditError(
            f"the region mask has {region.shape[0]} frames and the video {frames}: give one mask for all "
            "frames or one per frame."
        )
    region = region.float()
    if not bool(torch.isfinite(region).all()) or float(region.min()) < 0 or float(region.max()) > 1:
        raise I2VEditError("a region mask holds values in [0, 1] (1 = the edit may act there).")
    if tuple(region.shape[1:]) != (height, width):
        log.warning(
            "the region mask is %dx%d, the video %dx%d: resizing it to the video's size",
            region.shape[1], region.shape[2], height, width,
        )  # fmt: skip
        region = F.interpolate(region[:, None], size=(height, width), mode="bilinear", align_corners=False)
        region = region[:, 0].clamp(0, 1)
    if float(region.max()) == 0:
        raise I2VEditError(
            "the region mask is empty, so the edit may act nowhere: paint where the edit should act (white), "
            "or leave the region lock off."
        )
    return region


def region_frames(region: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Frames ``start`` to ``end`` of a checked region (one mask for all frames, or one per frame)."""
    if region.shape[0] == 1:
        return region.expand(end - start, *region.shape[1:])
    return region[start:end]


def composite(source: torch.Tensor, edited: torch.Tensor, region: torch.Tensor, radius: int) -> torch.Tensor:
    """IMAGE frames: the edit inside the feathered region, the source's own pixels (exactly) outside."""
    if source.shape != edited.shape or tuple(region.shape) != tuple(source.shape[:3]):
        raise I2VEditError(
            f"cannot composite frames {tuple(edited.shape)} onto {tuple(source.shape)} with a mask "
            f"{tuple(region.shape)}."
        )
    m = feather(region, radius)[..., None].to(source.dtype)
    return source + m * (edited - source)


class RegionLock:
    """The latent-size mask matched denoising holds the source trajectory outside of."""

    def __init__(self, region: torch.Tensor, radius: int = DEFAULT_FEATHER) -> None:
        h, w = region.shape[1:]
        if h % LATENT_FACTOR or w % LATENT_FACTOR:
            raise I2VEditError(f"a region mask at the generation size is a multiple of 8, got {h}x{w}.")
        soft = F.avg_pool2d(feather(region, radius)[:, None], LATENT_FACTOR)  # 0 where all 64 pixels are 0
        self.mask = feather(soft[:, 0], max(1, radius // LATENT_FACTOR))[:, None]  # (frames, 1, h/8, w/8)

    def hold(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``x`` inside the mask, ``source`` (the inversion's latent at the same σ) exactly outside."""
        if source.shape != x.shape or self.mask.shape[0] != x.shape[0] or self.mask.shape[2:] != x.shape[2:]:
            raise I2VEditError(
                f"the region mask {tuple(self.mask.shape)} does not fit the latents {tuple(x.shape)}."
            )
        m = self.mask.to(x.device, x.dtype)
        return source.to(x.device, x.dtype) + m * (x - source.to(x.device, x.dtype))


def _gray(frame: torch.Tensor) -> np.ndarray:
    rgb = (frame.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(mask, kernel)


def edit_difference(source: torch.Tensor, edited: torch.Tensor, threshold: float) -> np.ndarray:
    """uint8 (H, W): 1 where some channel of the edited frame differs from the source's by more than
    ``threshold``, with specks smaller than 3×3 removed (compression noise, not an edit)."""
    diff = (edited[..., :3].float() - source[..., :3].float()).abs().amax(-1)
    mask = (diff > threshold).to(torch.uint8).cpu().numpy()
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))


class RegionTracker:
    """``auto_region`` frame after frame: the first frame's difference, carried along the flow as frames come.

    ``advance`` takes the frames after those it has seen (the first call starts with frame 0) and returns
    their masks, so a long video is tracked clip by clip in the memory of one clip.
    """

    def __init__(
        self,
        source_first: torch.Tensor,
        edited_first: torch.Tensor,
        threshold: float = DEFAULT_THRESHOLD,
        dilate: int = DEFAULT_DILATE,
    ) -> None:
        if tuple(edited_first.shape[-3:-1]) != tuple(source_first.shape[-3:-1]):
            raise I2VEditError(
                f"the edited frame {tuple(edited_first.shape)} and the video's {tuple(source_first.shape)} must be "
                "IMAGE tensors of one size."
            )
        if not 0 < threshold < 1:
            raise I2VEditError(f"the difference threshold lies in (0, 1), got {threshold}.")
        self.core = edit_difference(
            source_first.reshape(source_first.shape[-3:]),
            edited_first.reshape(edited_first.shape[-3:]),
            threshold,
        )
        if not self.core.any():
            raise I2VEditError(
                f"the edited first frame differs from the source's nowhere by more than {threshold:g}: there is no "
                "edit to lock a region around; lower the threshold or check that the edited frame is the edit."
            )
        h, w = self.core.shape
        self._grid = np.stack(np.meshgrid(np.arange(w), np.arange(h)), -1).astype(np.float32)
        self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)  # type: ignore[attr-defined]
        self._prev: np.ndarray | None = None
        self.dilate = dilate

    def advance(self, frames: torch.Tensor) -> torch.Tensor:
        """The masks (F, H, W) of ``frames`` (F, H, W, 3), the frames that follow those seen so far."""
        out = []
        for frame in frames:
            cur = _gray(frame)
            if self._prev is not None:
                flow = self._dis.calc(cur, self._prev, None)  # cur(p) ≈ prev(p + flow(p))
                maps = self._grid + flow
                warped = cv2.remap(self.core.astype(np.float32), maps[..., 0], maps[..., 1], cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)  # fmt: skip
                static = cv2.absdiff(cv2.blur(cur, (3, 3)), cv2.blur(self._prev, (3, 3))) <= STATIC_LEVEL
                self.core = np.where(static, self.core, (warped >= 0.5).astype(np.uint8))
            out.append(_dilate(self.core, self.dilate))
            self._prev = cur
        return torch.from_numpy(np.stack(out)).float()


def auto_region(
    frames: torch.Tensor,
    edited_first: torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    dilate: int = DEFAULT_DILATE,
) -> torch.Tensor:
    """A MASK (frames, H, W) of where the edit acts: the first frame's difference, carried along the flow.

    ``frames`` (N, H, W, 3) IMAGE and ``edited_first`` (1, H, W, 3) at the same size. Frame t's mask is
    frame t−1's warped by the backward DIS optical flow of the source (t → t−1), so it follows the
    object that moves, except where the source pixel did not change (``STATIC_LEVEL``), which keeps
    its mask; each frame's mask is then dilated by ``dilate`` pixels.
    """
    if frames.ndim != 4:
        raise I2VEditError(f"the video must be an IMAGE batch (N, H, W, 3), got {tuple(frames.shape)}.")
    return RegionTracker(frames[0], edited_first, threshold, dilate).advance(frames)
