"""Smooth-area random perturbation (SARP, paper §4.2 "Smooth Area Random Perturbation").

Exactly flat regions make EDM-inverted latents non-Gaussian and hard to edit. SARP finds pixels
whose whole 3×3 neighbourhood is flat (per-channel Sobel on [-1, 1] frames, L1 magnitude averaged
over channels, zero padding, threshold 0.001) and adds a little Gaussian noise there (scale 0.005 in
[-1, 1] units), clamped. It only touches the inversion input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import I2VEditError
from ..io.frames import from_signed, to_bchw, to_signed

THRESHOLD = 0.001
NOISE_SCALE = 0.005

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def _check_image(frames: torch.Tensor) -> None:
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
        raise I2VEditError(
            f"SARP expects frames in ComfyUI IMAGE layout (frames, height, width, channels), got shape "
            f"{tuple(frames.shape)}; pass an IMAGE batch or unsqueeze a single image to (1, H, W, C)."
        )


def smooth_mask(frames: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """Boolean (F, H, W) mask of pixels in flat areas of ``frames`` (IMAGE layout, values in [0, 1])."""
    _check_image(frames)
    x = to_signed(to_bchw(frames.to(torch.float32)))  # (F, C, H, W) in [-1, 1]
    c = x.shape[1]
    kx = _SOBEL_X.to(x.device)
    weight = torch.stack([kx, kx.t()]).unsqueeze(1).repeat(c, 1, 1, 1)  # per channel: gx, gy
    grads = F.conv2d(x, weight, padding=1, groups=c)  # (F, 2C, H, W), channel order c0x c0y c1x ...
    magnitude = grads.abs().view(x.shape[0], c, 2, *x.shape[2:]).sum(dim=2).mean(dim=1)
    return magnitude <= threshold


def sarp(
    frames: torch.Tensor,
    seed: int = 0,
    noise_scale: float = NOISE_SCALE,
    threshold: float = THRESHOLD,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Perturb the flat areas of ``frames``; returns (perturbed frames, mask).

    ``frames`` is (F, H, W, C) in [0, 1]. Noise is N(0, 1)·``noise_scale`` in [-1, 1] units, drawn
    independently per frame, pixel and channel from a CPU generator seeded with ``seed`` (or the
    ``generator`` given), so results are the same on every device. The mask is (F, H, W) bool.
    """
    _check_image(frames)
    if noise_scale < 0:
        raise I2VEditError(f"SARP noise scale must be >= 0, got {noise_scale}; the paper uses 0.005.")
    if threshold < 0:
        raise I2VEditError(f"SARP threshold must be >= 0, got {threshold}; the paper uses 0.001.")
    mask = smooth_mask(frames, threshold)
    if generator is None:
        generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(frames.shape, generator=generator, dtype=torch.float32).to(frames.device)
    signed = to_signed(frames.to(torch.float32))
    perturbed = torch.where(mask.unsqueeze(-1), (signed + noise_scale * noise).clamp(-1.0, 1.0), signed)
    out = from_signed(perturbed).to(frames.dtype)
    # Pixels outside the mask come back bit-identical rather than through the [-1, 1] round trip.
    out = torch.where(mask.unsqueeze(-1), out, frames)
    return out, mask
