"""Euler EDM inversion and denoising on an analytic denoiser whose probability-flow ODE is known.

For data x0 ~ N(μ, s²) under x = x0 + σ·n, the exact denoiser is D(x; σ) = μ + s²/(s²+σ²)·(x − μ)
and the ODE dx/dσ = (x − D)/σ has the solution x(σ) = μ + (x(σ₀) − μ)·√(s²+σ²)/√(s²+σ₀²).
"""

import math

import pytest
import torch

from i2vedit.errors import I2VEditError
from i2vedit.method import samplers, schedules

MU, S = 0.3, 0.8


def gaussian_denoiser(x, sigma, **_):
    s2 = sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2
    return MU + S**2 / (S**2 + s2) * (x - MU)


def exact(x0, sigma_from, sigma_to):
    return MU + (x0 - MU) * math.sqrt(S**2 + sigma_to**2) / math.sqrt(S**2 + sigma_from**2)


def _x0():
    return torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("steps", [25, 100])
def test_inversion_follows_exact_ode(steps):
    x0 = _x0()
    sig = schedules.inversion_sigmas(steps)
    x_t = samplers.sample_euler_inversion(gaussian_denoiser, x0, sig, disable=True)
    ref = exact(x0, sig[0].item(), sig[-1].item())
    rel = ((x_t - ref).norm() / ref.norm()).item()
    assert rel < (0.35 if steps == 25 else 0.1)


def test_round_trip_error_falls_with_steps():
    x0 = _x0()
    errors = []
    for steps in (10, 25, 100, 400):
        x_t = samplers.sample_euler_inversion(
            gaussian_denoiser, x0, schedules.inversion_sigmas(steps), disable=True
        )
        back = samplers.sample_euler_denoise(
            gaussian_denoiser, x_t, schedules.denoise_sigmas(steps), disable=True
        )
        errors.append(((back - x0).norm() / x0.norm()).item())
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == len(errors), errors
    assert errors[-1] < 0.03 and errors[1] < 0.35, errors


def test_denoising_from_exact_state_returns_the_data():
    x0 = _x0()
    sig = schedules.denoise_sigmas(200)
    x_t = exact(x0, 0.0, sig[0].item())  # exact ODE state at σ_max for clean start x0
    out = samplers.sample_euler_denoise(gaussian_denoiser, x_t, sig, disable=True)
    assert ((out - x0).norm() / x0.norm()).item() < 0.04


def test_steps_and_phase_are_announced_to_hooks():
    seen = []

    def model(x, sigma, model_options=None, **_):
        opts = model_options["transformer_options"]
        seen.append((opts["i2v_phase"], opts["i2v_step"], opts["i2v_steps"], float(sigma[0])))
        return x * 0.5

    x = torch.ones(2, 4, 2, 2)
    inv = schedules.inversion_sigmas(5)
    samplers.sample_euler_inversion(model, x, inv, extra_args={"model_options": {}}, disable=True)
    samplers.sample_euler_denoise(model, x, schedules.denoise_sigmas(5), disable=True)
    assert [s[:3] for s in seen] == [("invert", i, 5) for i in range(5)] + [
        ("denoise", i, 5) for i in range(5)
    ]
    assert [s[3] for s in seen[:5]] == pytest.approx(
        inv[:-1].tolist(), rel=1e-6
    )  # lower end of each interval


def test_callback_sees_every_step():
    got = []
    samplers.sample_euler_denoise(
        gaussian_denoiser,
        torch.ones(1, 1, 1, 1),
        schedules.denoise_sigmas(4),
        callback=lambda d: got.append(d["i"]),
        disable=True,
    )
    assert got == [0, 1, 2, 3]


def test_wrong_direction_is_rejected():
    with pytest.raises(I2VEditError, match="ascending"):
        samplers.sample_euler_inversion(gaussian_denoiser, _x0(), schedules.denoise_sigmas(5), disable=True)
    with pytest.raises(I2VEditError, match="descending"):
        samplers.sample_euler_denoise(gaussian_denoiser, _x0(), schedules.inversion_sigmas(5), disable=True)
