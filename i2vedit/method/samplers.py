"""EDM Euler samplers in k-diffusion's shape, for inversion (ascending σ) and denoising.

``sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None)`` with ``model(x, σ·s_in,
**extra_args)`` returning the x0 estimate, exactly as ``comfy.samplers.KSAMPLER`` calls sampler
functions, so both run there unchanged. Before every model call the sampler writes the step index,
the phase and the step count into ``extra_args["model_options"]["transformer_options"]``
(``i2v_step``, ``i2v_phase``, ``i2v_steps``): that dict reaches every attention patch in ComfyUI and
the diffusers host's processors alike, which is how attention hooks know where they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import trange

from ..errors import I2VEditError

PHASE_INVERT = "invert"
PHASE_DENOISE = "denoise"
PHASE_TRAIN = "train"  # LoRA training steps, which read skip-interval K/V by σ

STEP_KEY = "i2v_step"
PHASE_KEY = "i2v_phase"
STEPS_KEY = "i2v_steps"


def announce_step(extra_args: dict[str, Any], step: int, phase: str, steps: int) -> None:
    """Publish the current step to the attention hooks through ``transformer_options``."""
    model_options = extra_args.setdefault("model_options", {})
    opts = model_options.setdefault("transformer_options", {})
    opts[STEP_KEY] = step
    opts[PHASE_KEY] = phase
    opts[STEPS_KEY] = steps


class StepModel:
    """A k-diffusion model made of a per-step function: ``fn(step, x)`` returns x0 for the step the
    sampler announced in ``transformer_options``. The method's inversion and matched denoising drive
    the samplers through it, so the samplers' Euler steps are the only ones in the codebase."""

    def __init__(self, fn: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, model_options: dict | None = None, **_: Any):
        return self.fn(int((model_options or {})["transformer_options"][STEP_KEY]), x)


def _check_sigmas(sigmas: torch.Tensor, ascending: bool) -> None:
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise I2VEditError("sigmas must be a 1-D list of at least two values.")
    diffs = sigmas[1:] - sigmas[:-1]
    if ascending and not bool((diffs > 0).all()):
        raise I2VEditError(
            "inversion needs ascending sigmas (from about 5e-4 up to 700); flip a denoising schedule "
            "and replace its final 0, as i2vedit.method.schedules.inversion_sigmas does."
        )
    if not ascending and not bool((diffs < 0).all()):
        raise I2VEditError("denoising needs strictly descending sigmas ending near or at 0.")
    if bool((sigmas[:-1] <= 0).any()):
        raise I2VEditError("every sigma the model is evaluated at must be positive.")


@torch.no_grad()
def sample_euler_inversion(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """Euler EDM inversion: integrate the probability-flow ODE upward over ascending ``sigmas``.

    ``x`` is the clean latent, taken to live at ``sigmas[0]`` (the extrapolated σ ≈ 5e-4). Each
    step evaluates the denoiser at the lower end of its interval, as the paper's inversion does.
    Returns the latent at ``sigmas[-1]`` (σ_max scale, not normalised).
    """
    extra_args = {} if extra_args is None else extra_args
    _check_sigmas(sigmas, ascending=True)
    steps = len(sigmas) - 1
    s_in = x.new_ones([x.shape[0]])
    for i in trange(steps, disable=disable, desc="EDM inversion"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        announce_step(extra_args, i, PHASE_INVERT, steps)
        denoised = model(x, sigma * s_in, **extra_args)
        d = (x - denoised) / sigma
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised,
                      "steps": steps, "phase": PHASE_INVERT})  # fmt: skip
        x = x + d * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_euler_denoise(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    hold: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Plain Euler EDM denoising over descending ``sigmas`` (no churn), announcing each step.

    ``hold(i, x)`` replaces the latent before step i and, with i = steps, the result (a region lock).
    """
    extra_args = {} if extra_args is None else extra_args
    _check_sigmas(sigmas, ascending=False)
    steps = len(sigmas) - 1
    s_in = x.new_ones([x.shape[0]])
    for i in trange(steps, disable=disable, desc="EDM denoising"):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if hold is not None:
            x = hold(i, x)
        announce_step(extra_args, i, PHASE_DENOISE, steps)
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised,
                      "steps": steps, "phase": PHASE_DENOISE})  # fmt: skip
        if sigma_next == 0:
            x = denoised
        else:
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
    return hold(steps, x) if hold is not None else x
