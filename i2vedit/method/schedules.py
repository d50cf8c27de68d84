"""σ schedules for SVD's EDM sampling and for its inversion (paper §4.2, method.md §3.2)."""

from __future__ import annotations

import torch

from ..errors import I2VEditError

SIGMA_MIN = 0.002
SIGMA_MAX = 700.0
RHO = 7.0


def karras_sigmas(
    steps: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    append_zero: bool = True,
) -> torch.Tensor:
    """Karras et al. (2022) σ list, descending from σ_max to σ_min (float64), plus a final 0."""
    if steps < 2:
        raise I2VEditError(f"steps must be at least 2, got {steps}; SVD editing normally uses 25.")
    if not 0 < sigma_min < sigma_max:
        raise I2VEditError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}.")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    if append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas


def denoise_sigmas(steps: int = 25, **kw: float) -> torch.Tensor:
    """Descending schedule for denoising: σ_0 … σ_{n-1}, then 0 (n + 1 values)."""
    return karras_sigmas(steps, append_zero=True, **kw)


def inversion_sigmas(steps: int = 25, **kw: float) -> torch.Tensor:
    """Ascending schedule for EDM inversion (n + 1 values).

    The final 0 of the denoising schedule is replaced by the extrapolated σ_n = σ_{n-1}²/σ_{n-2}
    (≈ 5.07e-4 for 25 steps), where the clean latent is taken to live; then the list is reversed.
    """
    sig = karras_sigmas(steps, append_zero=False, **kw)
    extrapolated = sig[-1] ** 2 / sig[-2]
    return torch.cat([sig, extrapolated.reshape(1)]).flip(0)


def paired_inversion_step(denoise_step: int, steps: int) -> int:
    """Inversion iteration that covers denoising step k's interval in reverse: n - 1 - k."""
    if not 0 <= denoise_step < steps:
        raise I2VEditError(f"denoising step {denoise_step} is outside 0..{steps - 1}.")
    return steps - 1 - denoise_step


def sigma_to_inversion_step(sigma: float, steps: int = 25, **kw: float) -> int:
    """Inversion iteration whose evaluation σ lies just below ``sigma`` (method.md §6).

    Used to pick clip 1's cached K/V for a LoRA training σ: with the descending list including the
    final 0, k = clamp(n - searchsorted(ascending list, σ), 0, n - 1), and the iteration is n - 1 - k.
    """
    asc = denoise_sigmas(steps, **kw).flip(0)
    k = steps - int(torch.searchsorted(asc, torch.tensor(float(sigma), dtype=asc.dtype)))
    k = min(max(k, 0), steps - 1)
    return steps - 1 - k
