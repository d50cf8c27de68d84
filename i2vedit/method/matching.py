"""Matched denoising of one clip (method.md §4).

``matched_denoise`` starts from a clip's inversion and denoises it under the edited first frame's
conditioning with per-frame CFG, while the attention controller blends each spatial layer's cond
chunk towards the source's attention and injects the source's temporal probabilities in stages.
In ``recompute`` mode the source attention of each step is replayed from the inversion's trajectory
just before the edit call; in ``cache`` mode it is read from the inversion's captures. Both give
the same result.
Clips after the first also attend to the first clip's K/V (``skip_interval``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import I2VEditError
from ..host import CFGDenoiser, SVDHost, cfg_ramp, check_cfg
from ..svd import SVDCond
from .controller import (
    AttentionController,
    CaptureKind,
    MaskAccumulator,
    MatchConfig,
    StepCapture,
    paired_step,
)
from .inversion import (
    Inversion,
    MemoryMode,
    StepCallback,
    check_mode,
    require_finite,
    source_capture,
    step_options,
)
from .region import RegionLock
from .samplers import PHASE_DENOISE, StepModel, sample_euler_denoise
from .skip_interval import EditKV

DEFAULT_MATCH = MatchConfig()


@dataclass
class MatchedResult:
    """A matched denoising: final latents, the trajectory, difference masks, and (cache) K/V."""

    latents: torch.Tensor  # (frames, 4, h, w), scaled space
    trajectory: torch.Tensor  # (steps + 1, frames, 4, h, w): the latent each step evaluated, then the result
    masks: torch.Tensor | None  # (frames, h, w) mean blend weight M: 1 = treated as edited
    kv_captures: list[StepCapture] | None = None

    def frame_masks(self, height: int, width: int) -> torch.Tensor:
        """The difference masks at frame size, (frames, height, width) in [0, 1], like a ComfyUI MASK."""
        if self.masks is None:
            raise I2VEditError(
                "this denoising ran without attention matching, so it has no difference masks."
            )
        up = torch.nn.functional.interpolate(self.masks[:, None], size=(height, width), mode="bilinear")
        return up[:, 0].clamp(0, 1)

    def stored_bytes(self) -> int:
        total = self.trajectory.numel() * self.trajectory.element_size()
        if self.kv_captures:
            total += sum(c.nbytes() for c in self.kv_captures)
        return total


def as_cfg(cfg: torch.Tensor | tuple[float, float] | None, frames: int) -> torch.Tensor | None:
    """Per-frame CFG scales from a (min, max) ramp, explicit scales, or None (no CFG)."""
    if cfg is None:
        return None
    if isinstance(cfg, tuple):
        return cfg_ramp(frames, *cfg)
    check_cfg(cfg, frames)
    return cfg.float()


class MatchedClip:
    """Everything one clip's matched denoising needs, validated before any model call.

    ``host`` runs the edit branch (with the clip's motion LoRA, if any); ``source_host`` replays the
    source branch and must be the model the inversion used (default: ``host``). ``lock`` holds the
    latent on the inversion's trajectory (at each step's σ) outside its mask.
    """

    def __init__(
        self,
        host: SVDHost,
        inversion: Inversion,
        cond: SVDCond,
        config: MatchConfig | None = DEFAULT_MATCH,
        cfg: torch.Tensor | tuple[float, float] | None = (1.0, 2.0),
        mode: MemoryMode = "recompute",
        source_host: SVDHost | None = None,
        skip_kv: EditKV | None = None,
        store_dtype: torch.dtype | None = None,
        lock: RegionLock | None = None,
    ) -> None:
        check_mode(mode)
        self.config = config.validate() if config is not None else None
        self.host, self.inversion, self.cond = host, inversion, cond
        self.source_host = source_host if source_host is not None else host
        self.mode, self.skip_kv, self.store_dtype, self.lock = mode, skip_kv, store_dtype, lock
        frames, hw = inversion.frames, inversion.latent_hw
        if lock is not None and (lock.mask.shape[0] != frames or tuple(lock.mask.shape[2:]) != hw):
            raise I2VEditError(
                f"the region mask {tuple(lock.mask.shape)} (latent size) does not fit this clip's {frames} frames "
                f"of latent size {hw}."
            )
        try:
            cond.check(inversion.x_T)
        except I2VEditError as e:
            raise I2VEditError(f"the edited first frame does not fit the inversion: {e}") from None
        inversion.check_model(self.source_host.fingerprint(), "the inversion")
        if self.host is not self.source_host and self.host.fingerprint() != inversion.fingerprint:
            raise I2VEditError(
                "the edit model and the source model must share base weights (one SVD checkpoint)."
            )
        if self.config is not None and mode == "cache" and inversion.captures is None:
            raise I2VEditError(
                "cache mode needs an inversion made in cache mode (it holds the attention of every step); "
                "invert with mode='cache' or use mode='recompute'."
            )
        if (inversion.skip_kv is None) != (skip_kv is None):
            raise I2VEditError(
                "a clip inverted with skip-interval K/V must be denoised with them, and only such a clip: "
                "pass the first clip's EditKV for clips after the first, none for the first."
            )
        self.cfg = as_cfg(cfg, frames)
        if skip_kv is not None:
            skip_kv.check_fits(hw, inversion.fingerprint)
            if skip_kv.cfg_branches != (1 if self.cfg is None else 2):
                raise I2VEditError(
                    "the first clip was denoised with a different CFG setting (with or without CFG) than "
                    "this clip; its K/V cannot line up with this clip's branches."
                )
        self.uncond = cond.unconditional() if self.cfg is not None else None
        self.model = CFGDenoiser(host, cond, self.uncond, self.cfg)  # the edit branch's denoiser
        self.sigmas = inversion.denoise_sigmas()

    @property
    def steps(self) -> int:
        return self.inversion.steps

    def reference(self, step: int) -> StepCapture | None:
        """The source attention denoising step ``step`` matches against."""
        if self.config is None:
            return None
        j = paired_step(step, self.steps, self.config.pair_offset)
        return source_capture(self.source_host, self.inversion, j, self.store_dtype)

    def denoised(
        self,
        step: int,
        x: torch.Tensor,
        capture_kv: bool = False,
        masks: MaskAccumulator | None = None,
        reference: StepCapture | None = None,
    ) -> tuple[torch.Tensor, StepCapture]:
        """x0 of denoising step ``step`` at latent ``x``, and what the call captured.

        ``reference``: the step's source attention when the caller has it already (else ``self.reference``).
        """
        capture: set[CaptureKind] = {"kv"} if capture_kv else set()
        ctrl = AttentionController(
            capture, self.config, store_dtype=self.store_dtype,
            store_device="cpu" if self.mode == "cache" else None, masks=masks,
        )  # fmt: skip
        # the first clip's K/V first: its replay of the first clip's source step holds the K/V this clip's
        # source replay takes next, which costs less memory than holding this clip's source attention
        # through the first clip's edit call
        kv = (
            self.skip_kv.at(PHASE_DENOISE, step, self.inversion.skip_kv) if self.skip_kv is not None else None
        )
        if reference is None:
            reference = self.reference(step)
        ctrl.begin_step(step, self.steps, reference=reference, skip_kv=kv)
        opts = step_options(ctrl, step, self.steps, PHASE_DENOISE)
        out = self.model(x, self.sigmas[step], model_options={"transformer_options": opts})
        return out, ctrl.take()

    def run(self, capture_kv: bool = False, callback: StepCallback | None = None) -> MatchedResult:
        """Denoise the whole clip. ``capture_kv`` keeps every step's K/V (first clip, cache mode)."""
        inv = self.inversion
        masks = MaskAccumulator(inv.frames, inv.latent_hw) if self.config is not None else None
        keep_kv = capture_kv and self.mode == "cache"
        trajectory, kv_caps = [], []

        def step(k: int, x: torch.Tensor) -> torch.Tensor:
            denoised, cap = self.denoised(k, x, keep_kv, masks)
            require_finite(denoised, f"denoising step {k + 1} of {self.steps}")
            trajectory.append(x)
            if keep_kv:
                kv_caps.append(cap)
            return denoised

        def hold(k: int, x: torch.Tensor) -> torch.Tensor:
            assert self.lock is not None
            return self.lock.hold(x, inv.trajectory[self.steps - k])

        x = sample_euler_denoise(StepModel(step), inv.x_T.clone(), self.sigmas, None, callback, True,
                                 hold if self.lock is not None else None)  # fmt: skip
        trajectory.append(x)
        return MatchedResult(
            x,
            torch.stack(trajectory),
            masks.mean() if masks is not None else None,
            kv_caps if keep_kv else None,
        )


def matched_denoise(
    host: SVDHost,
    inversion: Inversion,
    cond: SVDCond,
    config: MatchConfig | None = DEFAULT_MATCH,
    cfg: torch.Tensor | tuple[float, float] | None = (1.0, 2.0),
    mode: MemoryMode = "recompute",
    source_host: SVDHost | None = None,
    skip_kv: EditKV | None = None,
    capture_kv: bool = False,
    store_dtype: torch.dtype | None = None,
    callback: StepCallback | None = None,
    lock: RegionLock | None = None,
) -> MatchedResult:
    """Denoise one clip from its inversion under ``cond`` (the edited first frame's conditioning).

    ``config`` None turns matching off (plain denoising from the inversion). ``skip_kv`` is the
    first clip's ``EditKV`` for later clips. See ``MatchedClip`` for the arguments.
    """
    clip = MatchedClip(host, inversion, cond, config, cfg, mode, source_host, skip_kv, store_dtype, lock)
    return clip.run(capture_kv, callback)
