"""SARP: which pixels it touches, how much, and that it is seeded."""

import numpy as np
import pytest
import torch

from i2vedit.errors import I2VEditError
from i2vedit.method.sarp import NOISE_SCALE, sarp, smooth_mask


def reference_mask(frames: torch.Tensor, threshold: float = 0.001) -> np.ndarray:
    """Plain loop over pixels: per-channel 3×3 Sobel with zero padding, |gx|+|gy| averaged over channels."""
    x = frames.double().numpy() * 2.0 - 1.0
    f, h, w, c = x.shape
    padded = np.zeros((f, h + 2, w + 2, c))
    padded[:, 1:-1, 1:-1] = x
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    out = np.zeros((f, h, w), dtype=bool)
    for i in range(h):
        for j in range(w):
            win = padded[:, i : i + 3, j : j + 3, :]
            gx = (win * kx[None, :, :, None]).sum(axis=(1, 2))
            gy = (win * kx.T[None, :, :, None]).sum(axis=(1, 2))
            out[:, i, j] = (np.abs(gx) + np.abs(gy)).mean(axis=-1) <= threshold
    return out


def textured_with_flat_patches(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (2, 20, 24, 3), generator=g).float() / 255.0  # 8-bit noise texture
    frames[0, 3:12, 4:15] = torch.tensor([0.2, 0.6, 0.4])  # flat patch
    frames[1, :, 16:] = 1.0  # flat band touching the border
    frames[1, 10:, :8] = 0.5  # mid-grey: flat even against the zero padding
    return frames


def test_mask_equals_plain_reference():
    frames = textured_with_flat_patches()
    # A non-constant neighbourhood whose Sobel response is zero: a vertical line through a flat area.
    frames[0, 14:19, 10] = 0.9
    np.testing.assert_array_equal(smooth_mask(frames).numpy(), reference_mask(frames))


def test_only_exactly_flat_neighbourhoods_on_8bit_texture():
    frames = textured_with_flat_patches()
    mask = smooth_mask(frames)
    x = frames * 2 - 1
    padded = torch.nn.functional.pad(x.permute(0, 3, 1, 2), (1, 1, 1, 1)).permute(0, 2, 3, 1)
    windows = padded.unfold(1, 3, 1).unfold(2, 3, 1)  # (F, H, W, C, 3, 3)
    constant = (windows == windows[..., 1:2, 1:2]).flatten(-3).all(-1)
    assert torch.equal(mask, constant)
    # The patch interior is found, its rim is not; white at the border is not flat (zero padding), grey is.
    assert mask[0, 4:11, 5:14].all() and not mask[0, 3, 4:15].any()
    assert mask[1, 1:-1, 17:-1].all() and not mask[1, 0, 17:].any() and not mask[1, :, -1].any()
    assert mask[1, 11:, 1:7].all() and mask[1, -1, 1:7].all()


def test_perturbation_stays_in_mask_and_scale():
    frames = textured_with_flat_patches()
    out, mask = sarp(frames, seed=3)
    diff = (out - frames) * 2.0  # in [-1, 1] units
    assert torch.equal(out[~mask], frames[~mask])  # untouched pixels are bit-identical
    touched = diff[mask & (frames < 0.99).all(-1)]  # away from the clamp
    assert touched.numel() > 300
    assert touched.std().item() == pytest.approx(NOISE_SCALE, rel=0.15)
    assert touched.abs().max().item() <= 6 * NOISE_SCALE
    assert out.min() >= 0 and out.max() <= 1  # clamped (the white band)
    white = out[1][mask[1] & (frames[1] == 1.0).all(-1)]
    assert (white <= 1.0).all() and (white < 1.0).any()


def test_seeded_and_repeatable():
    frames = textured_with_flat_patches()
    a, _ = sarp(frames, seed=7)
    b, _ = sarp(frames, seed=7)
    c, _ = sarp(frames, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_no_flat_area_means_no_change():
    frames = torch.randint(0, 256, (1, 16, 16, 3), generator=torch.Generator().manual_seed(1)).float() / 255
    out, mask = sarp(frames, seed=0)
    assert not mask.any() and torch.equal(out, frames)


def test_bad_input():
    with pytest.raises(I2VEditError, match="IMAGE layout"):
        sarp(torch.rand(3, 16, 16))
    with pytest.raises(I2VEditError, match="noise scale"):
        sarp(torch.rand(1, 8, 8, 3), noise_scale=-1)
