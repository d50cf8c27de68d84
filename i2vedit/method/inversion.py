"""EDM inversion of one clip, keeping what attention matching and skip-interval K/V need.

``invert`` integrates the probability-flow ODE upward with ``samplers.sample_euler_inversion``, over
a model that runs the host one call per step under an ``AttentionController``, which sees every step.
What it keeps depends on the memory mode:

- ``recompute`` (default): only the latent trajectory (the latent each step evaluated, plus x_T),
  a few MB per clip. A step's source attention is re-created on demand by ``replay_source``: the
  same model on the same latent, σ and conditioning, so it is exact up to kernel non-determinism.
- ``cache``: additionally every step's spatial Q/K and temporal probabilities (and temporal K/V when
  asked) in RAM, in ``store_dtype``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..errors import I2VEditError
from ..host import SVDHost
from ..svd import SVDCond
from . import schedules
from .controller import CONTROLLER_KEY, AttentionController, CaptureKind, StepCapture
from .samplers import PHASE_INVERT, PHASE_KEY, STEP_KEY, STEPS_KEY, StepModel, sample_euler_inversion

if TYPE_CHECKING:
    from .skip_interval import SourceKV

MemoryMode = Literal["recompute", "cache"]
MEMORY_MODES = ("recompute", "cache")
MATCH_CAPTURE: frozenset[CaptureKind] = frozenset({"spatial", "temporal"})

StepCallback = Callable[[dict[str, Any]], None]


def check_mode(mode: str) -> None:
    if mode not in MEMORY_MODES:
        raise I2VEditError(f"memory mode must be one of {MEMORY_MODES}, got {mode!r}.")


def step_options(controller: AttentionController, step: int, steps: int, phase: str) -> dict[str, Any]:
    """The ``transformer_options`` of one driven model call."""
    return {CONTROLLER_KEY: controller, STEP_KEY: step, PHASE_KEY: phase, STEPS_KEY: steps}


@dataclass
class Inversion:
    """One clip's inversion: its trajectory, conditioning and (cache mode) attention captures.

    ``trajectory[i]`` is the latent inversion step i evaluated (``trajectory[0]`` the clean latent),
    ``trajectory[-1]`` is x_T at σ_max (not normalised); ``sigmas`` are the ascending σ of those
    latents. ``skip_kv`` is the skip-interval K/V the inversion concatenated (clips after the
    first), kept so a replay sees the same inputs.
    """

    trajectory: torch.Tensor  # (steps + 1, frames, 4, h, w) float32, CPU
    sigmas: torch.Tensor  # (steps + 1,) ascending
    cond: SVDCond
    fingerprint: str
    captures: list[StepCapture] | None = None
    skip_kv: SourceKV | None = None  # the first clip's, for later clips

    @property
    def steps(self) -> int:
        return self.trajectory.shape[0] - 1

    @property
    def frames(self) -> int:
        return self.trajectory.shape[1]

    @property
    def latent_hw(self) -> tuple[int, int]:
        return int(self.trajectory.shape[3]), int(self.trajectory.shape[4])

    @property
    def x_T(self) -> torch.Tensor:
        return self.trajectory[-1]

    def denoise_sigmas(self) -> torch.Tensor:
        """The descending schedule a matched denoising runs: the same σ, ending at 0."""
        out = self.sigmas.flip(0).clone()
        out[-1] = 0.0
        return out

    def stored_bytes(self) -> int:
        """Bytes this object holds: trajectory plus any cached captures."""
        total = self.trajectory.numel() * self.trajectory.element_size()
        if self.captures:
            total += sum(c.nbytes() for c in self.captures)
        return total

    def check_model(self, fingerprint: str, what: str) -> None:
        """Raise before any sampling if this inversion was made with another model."""
        if self.fingerprint != fingerprint:
            raise I2VEditError(
                f"{what} was made with another model ({self.fingerprint}) than this one ({fingerprint}); "
                "invert again with this model."
            )


def require_finite(t: torch.Tensor, where: str) -> None:
    """Stop a run whose model output went NaN/inf, before anything of it is kept or stored."""
    if not bool(torch.isfinite(t).all()):
        raise I2VEditError(
            f"{where} gave non-finite values (NaN or inf), so this clip was stopped and nothing of it was "
            "stored. Check the model file (a damaged or wrongly converted checkpoint), the inputs, and the "
            "precision: fp16 can overflow, use bf16 or fp32."
        )


def invert(
    host: SVDHost,
    latents: torch.Tensor,
    cond: SVDCond,
    steps: int = 25,
    mode: MemoryMode = "recompute",
    capture_kv: bool = False,
    skip_kv: SourceKV | None = None,
    store_dtype: torch.dtype | None = None,
    callback: StepCallback | None = None,
) -> Inversion:
    """Invert clean ``latents`` (frames, 4, h, w; scaled space) with source conditioning ``cond``.

    ``capture_kv`` keeps the temporal K/V of every step (cache mode; the first clip's skip-interval
    source); ``skip_kv`` is the first clip's K/V source when this is a later clip.
    """
    check_mode(mode)
    if steps < 1:
        raise I2VEditError(f"inversion needs at least 1 step, got {steps}.")
    cond.check(latents)
    fingerprint = host.fingerprint()
    if skip_kv is not None:
        skip_kv.check_fits(latents.shape[-2:], fingerprint)
    sigmas = schedules.inversion_sigmas(steps)
    capture: set[CaptureKind] = set()
    if mode == "cache":
        capture |= MATCH_CAPTURE
        if capture_kv:
            capture.add("kv")
    ctrl = AttentionController(capture, store_dtype=store_dtype, store_device="cpu")
    trajectory, captures = [], []

    def step(i: int, x: torch.Tensor) -> torch.Tensor:
        kv = skip_kv.at(PHASE_INVERT, i) if skip_kv is not None else None
        ctrl.begin_step(i, steps, skip_kv=kv)
        denoised = host.denoise(x, sigmas[i], [cond], step_options(ctrl, i, steps, PHASE_INVERT))[0]
        require_finite(denoised, f"inversion step {i + 1} of {steps}")
        trajectory.append(x)
        if mode == "cache":
            captures.append(ctrl.take())
        return denoised

    x_T = sample_euler_inversion(
        StepModel(step), latents.to(torch.float32).cpu(), sigmas, None, callback, True
    )
    trajectory.append(x_T)
    return Inversion(
        torch.stack(trajectory),
        sigmas,
        cond,
        fingerprint,
        captures if mode == "cache" else None,
        skip_kv,
    )


def replay_source(
    host: SVDHost,
    inversion: Inversion,
    step: int,
    capture: set[CaptureKind] | frozenset[CaptureKind] = MATCH_CAPTURE,
    store_dtype: torch.dtype | None = None,
) -> StepCapture:
    """Re-create inversion step ``step``'s attention by running that model call again."""
    if not 0 <= step < inversion.steps:
        raise I2VEditError(f"inversion step {step} is outside 0..{inversion.steps - 1}.")
    ctrl = AttentionController(capture, store_dtype=store_dtype)
    kv = inversion.skip_kv.at(PHASE_INVERT, step) if inversion.skip_kv is not None else None
    ctrl.begin_step(step, inversion.steps, skip_kv=kv)
    opts = step_options(ctrl, step, inversion.steps, PHASE_INVERT)
    host.denoise(inversion.trajectory[step], inversion.sigmas[step], [inversion.cond], opts)
    return ctrl.take()


def source_capture(
    host: SVDHost, inversion: Inversion, step: int, store_dtype: torch.dtype | None = None
) -> StepCapture:
    """Inversion step ``step``'s spatial Q/K and temporal probabilities: cached, else replayed."""
    if inversion.captures is not None:
        return inversion.captures[step]
    return replay_source(host, inversion, step, MATCH_CAPTURE, store_dtype)
