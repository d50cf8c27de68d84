"""Colour anchoring across clips: a later clip's latents held to the frame it continues from.

Each clip after the first starts on the frame the previous clip ended on (the overlap frame), so both
clips' versions of that frame show the same source frame and should have the same colours. Chaining
lets them drift apart clip after clip. ``anchor_colours`` maps every latent channel of a clip by the
one affine map (scale, shift) that gives its overlap frame the per-channel mean and standard deviation
of the previous clip's version, inside the edited region. The previous clip was anchored the same
way, so every clip is held to the first edited clip through the chain.
"""

from __future__ import annotations

import torch

from ..errors import I2VEditError

MIN_STD = 1e-6  # a flat channel (or a region of one cell) is shifted, never scaled by 1/0


def _stats(frame: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted per-channel mean and standard deviation of (channels, h, w) under (1, h, w) weights."""
    total = weight.sum()
    mean = (frame * weight).sum((1, 2)) / total
    var = (((frame - mean[:, None, None]) ** 2) * weight).sum((1, 2)) / total
    return mean, var.sqrt()


def anchor_colours(
    latents: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``latents`` (frames, C, h, w) mapped per channel so that frame 0 matches ``reference`` (C, h, w).

    ``mask`` (frames, 1, h, w) in [0, 1] weighs the statistics (frame 0's) and blends the mapped latents
    in (1 = mapped); None = the whole frame. A clip whose overlap frame already has the reference's
    statistics comes back unchanged, bit for bit.
    """
    if latents.ndim != 4 or tuple(reference.shape) != tuple(latents.shape[1:]):
        raise I2VEditError(
            f"cannot anchor latents {tuple(latents.shape)} to a reference frame {tuple(reference.shape)}."
        )
    x = latents.float()
    weight = torch.ones_like(x[:1, :1]) if mask is None else mask.float().to(x.device)
    if float(weight[0].sum()) == 0:
        return latents
    mean, std = _stats(x[0], weight[0])
    ref_mean, ref_std = _stats(reference.float().to(x.device), weight[0])
    if torch.equal(mean, ref_mean) and torch.equal(std, ref_std):
        return latents
    scale = torch.where(std > MIN_STD, ref_std / std.clamp_min(MIN_STD), torch.ones_like(std))
    mapped = (x - mean[:, None, None]) * scale[:, None, None] + ref_mean[:, None, None]
    out = mapped if mask is None else x + weight * (mapped - x)
    return out.to(latents.dtype)
