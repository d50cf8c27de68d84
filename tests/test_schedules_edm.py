"""σ schedules and SVD's EDM preconditioning, against the paper's numbers and diffusers' scheduler."""

import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from i2vedit.errors import I2VEditError
from i2vedit.method import edm, schedules

# method.md §3.2: the 25 Karras sigmas of SVD's scheduler (σ 0.002–700, ρ 7), as published.
PAPER_SIGMAS = [
    "700",
    "545.7",
    "421.6",
    "322.5",
    "244.0",
    "182.5",
    "134.9",
    "98.27",
    "70.54",
    "49.81",
    "34.54",
    "23.47",
    "15.59",
    "10.10",
    "6.354",
    "3.870",
    "2.269",
    "1.273",
    "0.6781",
    "0.3394",
    "0.1574",
    "0.0664",
    "0.0248",
    "0.00788",
    "0.002",
]


def _significant_digits(text: str) -> int:
    digits = text.replace(".", "").lstrip("0")
    return max(len(digits), 1)


def _svd_scheduler(steps: int) -> EulerDiscreteScheduler:
    sched = EulerDiscreteScheduler(
        sigma_min=0.002,
        sigma_max=700.0,
        prediction_type="v_prediction",
        use_karras_sigmas=True,
        timestep_type="continuous",
        timestep_spacing="leading",
    )
    sched.set_timesteps(steps)
    return sched


def test_karras_25_matches_paper_to_4_significant_digits():
    sig = schedules.denoise_sigmas(25)
    assert len(sig) == 26 and sig[-1] == 0
    for ours, paper in zip(sig[:-1].tolist(), PAPER_SIGMAS):
        # Compare at the precision the paper prints (4 significant digits, fewer for a few entries).
        digits = _significant_digits(paper)
        assert float(f"{ours:.{digits}g}") == pytest.approx(float(paper), rel=1e-9), (ours, paper)


@pytest.mark.parametrize("steps", [4, 25, 40])
def test_karras_equals_diffusers_svd_scheduler(steps):
    ref = _svd_scheduler(steps).sigmas.double()
    ours = schedules.denoise_sigmas(steps)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)


def test_inversion_schedule_extrapolates_final_sigma():
    inv = schedules.inversion_sigmas(25)
    den = schedules.denoise_sigmas(25)
    assert len(inv) == 26
    assert bool((inv[1:] > inv[:-1]).all())
    assert float(f"{inv[0].item():.3g}") == 5.07e-4
    assert inv[0].item() == pytest.approx(den[24].item() ** 2 / den[23].item(), rel=1e-12)
    torch.testing.assert_close(inv[1:], den[:-1].flip(0), rtol=0, atol=0)
    assert 0.25 * math.log(inv[0].item()) == pytest.approx(-1.897, abs=5e-4)


def test_step_pairing_and_sigma_to_step():
    assert [schedules.paired_inversion_step(k, 25) for k in (0, 12, 24)] == [24, 12, 0]
    with pytest.raises(I2VEditError):
        schedules.paired_inversion_step(25, 25)
    inv = schedules.inversion_sigmas(25)
    # A σ just above an inversion evaluation point maps to that step; the map is monotone.
    for i in range(25):
        assert schedules.sigma_to_inversion_step(inv[i].item() * 1.0001, 25) == i
    steps = [schedules.sigma_to_inversion_step(s, 25) for s in torch.logspace(-3.5, 3, 200).tolist()]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 24


def test_bad_schedule_arguments():
    with pytest.raises(I2VEditError, match="at least 2"):
        schedules.karras_sigmas(1)
    with pytest.raises(I2VEditError, match="sigma_min"):
        schedules.karras_sigmas(10, sigma_min=5.0, sigma_max=1.0)


def test_preconditioning_matches_diffusers_v_prediction():
    sched = _svd_scheduler(25)
    torch.testing.assert_close(edm.c_noise(sched.sigmas[:-1]), sched.timesteps, rtol=1e-5, atol=1e-6)
    assert float(sched.init_noise_sigma) == pytest.approx(math.sqrt(700**2 + 1), rel=1e-6)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    for sigma in (0.002, 0.7, 80.0, 700.0):
        # diffusers' v-prediction formulas, written out (scale_model_input and pred_original_sample).
        ref_x0 = v * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        torch.testing.assert_close(edm.denoised_from_v(x, v, sigma), ref_x0, rtol=1e-5, atol=1e-6)
        assert edm.c_in(sigma).item() == pytest.approx(1 / math.sqrt(sigma**2 + 1), rel=1e-6)
    s = torch.tensor([0.01, 1.0, 30.0])
    torch.testing.assert_close(edm.c_out(s) ** 2, s**2 * edm.c_skip(s))  # EDM identity, σ_data = 1
    torch.testing.assert_close(edm.edm_loss_weight(s), (s**2 + 1) / s**2)


def test_noise_round_trip():
    n = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(edm.xt_to_noise(edm.noise_to_xt(n, 700.0), 700.0), n)
    assert edm.noise_to_xt(torch.ones(1), 700.0).item() == pytest.approx(700.0007, rel=1e-7)
