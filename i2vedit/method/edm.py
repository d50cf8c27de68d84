"""SVD's EDM v-prediction preconditioning (σ_data = 1) and the denoiser built on it."""

from __future__ import annotations

import math

import torch

SIGMA_DATA = 1.0


def _as_tensor(sigma: torch.Tensor | float) -> torch.Tensor:
    return sigma if isinstance(sigma, torch.Tensor) else torch.tensor(float(sigma))


def c_in(sigma: torch.Tensor | float, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    s = _as_tensor(sigma)
    return 1.0 / torch.sqrt(s**2 + sigma_data**2)


def c_skip(sigma: torch.Tensor | float, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    s = _as_tensor(sigma)
    return sigma_data**2 / (s**2 + sigma_data**2)


def c_out(sigma: torch.Tensor | float, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """Scale of the network output; negative for v-prediction."""
    s = _as_tensor(sigma)
    return -s * sigma_data / torch.sqrt(s**2 + sigma_data**2)


def c_noise(sigma: torch.Tensor | float) -> torch.Tensor:
    """The timestep the SVD UNet sees: ¼ ln σ."""
    return 0.25 * torch.log(_as_tensor(sigma))


def denoised_from_v(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x0 estimate D(x; σ) = c_skip·x + c_out·v from the UNet's v-prediction."""
    s = _as_tensor(sigma).to(x.device, torch.float32)
    return c_skip(s) * x + c_out(s) * v.to(x.dtype)


def edm_loss_weight(sigma: torch.Tensor | float, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM weighting λ(σ) = (σ² + σ_data²)/(σ·σ_data)² of the x0 MSE."""
    s = _as_tensor(sigma)
    return (s**2 + sigma_data**2) / (s * sigma_data) ** 2


def noise_to_xt(noise: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Stored inversion noise → the latent at σ_max (× √(σ_max² + 1), method.md §3.3)."""
    return noise * math.sqrt(sigma_max**2 + 1.0)


def xt_to_noise(x_t: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Latent at σ_max → unit-scale noise, the form inversions are stored and shared in."""
    return x_t / math.sqrt(sigma_max**2 + 1.0)
