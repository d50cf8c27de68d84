"""Skip-interval K/V (method.md §6): every clip after the first also attends, in each temporal
self-attention layer, to the first clip's keys and values of the same step.

- ``SourceKV`` serves them for a later clip's inversion (and LoRA training, by σ) from the first
  clip's source inversion; ``EditKV`` for its denoising from the first clip's matched denoising.
  Both are exact, whether cached or recomputed by replaying the model call that made them.
- ``SkipInterval`` holds one run's providers: the first clip's source K/V, its training K/V (the
  first clip inverted again at training resolution, when that differs) and each edit's edit K/V.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import I2VEditError
from ..host import SVDHost
from . import schedules
from .controller import CaptureKind, StepCapture, paired_step
from .inversion import MATCH_CAPTURE, Inversion, replay_source
from .samplers import PHASE_DENOISE, PHASE_INVERT, PHASE_TRAIN

if TYPE_CHECKING:
    from .matching import MatchedClip, MatchedResult


class KVProvider:
    """The first clip's temporal K/V for a later clip, by phase and step."""

    latent_hw: tuple[int, int]
    fingerprint: str

    def at(self, phase: str, step: int) -> StepCapture:
        raise NotImplementedError

    def check_fits(self, latent_hw: Sequence[int], fingerprint: str) -> None:
        """Raise before any sampling if this source cannot serve a clip of this size and model."""
        hw = (int(latent_hw[0]), int(latent_hw[1]))
        if hw != self.latent_hw:
            raise I2VEditError(
                f"the skip-interval K/V come from a clip at latent {self.latent_hw[0]}×{self.latent_hw[1]}, "
                f"this clip is {hw[0]}×{hw[1]}; every clip of a video must share one resolution."
            )
        if fingerprint != self.fingerprint:
            raise I2VEditError(
                f"the skip-interval K/V were made with another model ({self.fingerprint}) than this one "
                f"({fingerprint}); run the first clip with this model."
            )


class SourceKV(KVProvider):
    """K/V of the first clip's *source* inversion: for later clips' inversion and LoRA training."""

    def __init__(self, host: SVDHost, inversion: Inversion, store_dtype: torch.dtype | None = None) -> None:
        if inversion.skip_kv is not None:
            raise I2VEditError("the skip-interval K/V source must be the first clip's own inversion.")
        self.host, self.inversion, self.store_dtype = host, inversion, store_dtype
        self.latent_hw, self.fingerprint = inversion.latent_hw, inversion.fingerprint
        caps = inversion.captures
        self.cached = caps is not None and all(c.kv for c in caps)
        self._held: tuple[int, StepCapture] | None = None

    def at(self, phase: str, step: int) -> StepCapture:
        if phase not in (PHASE_INVERT, PHASE_TRAIN):
            raise I2VEditError(f"the source K/V serve inversion and training, not {phase!r}.")
        held, self._held = self._held, None
        if held is not None and held[0] == step:
            return held[1]
        if self.inversion.captures is not None and self.cached:
            return self.inversion.captures[step]
        return replay_source(self.host, self.inversion, step, {"kv"}, self.store_dtype)

    def replay_holding_kv(self, step: int, capture: frozenset[CaptureKind]) -> StepCapture:
        """Replay step ``step`` capturing ``capture`` and the K/V, which the next ``at`` of that step
        returns instead of replaying the same call again (one use)."""
        out = replay_source(self.host, self.inversion, step, capture | {"kv"}, self.store_dtype)
        self._held = (step, StepCapture(kv=out.kv))
        out.kv = {}  # held here alone: freed when taken
        return out

    def for_sigma(self, sigma: float) -> StepCapture:
        """K/V for a LoRA training step at noise level ``sigma``: the inversion step just below it."""
        return self.at(PHASE_TRAIN, schedules.sigma_to_inversion_step(sigma, self.inversion.steps))

    def stored_bytes(self) -> int:
        return self.inversion.stored_bytes()


class EditKV(KVProvider):
    """K/V of the first clip's *edited* denoising, for later clips' denoising (same step).

    With the first clip's K/V captured (cache mode, ``capture_kv=True``) they are read back; else
    the first clip's matched call of that step is replayed from its trajectory.
    """

    def __init__(self, clip: MatchedClip, result: MatchedResult) -> None:
        if clip.skip_kv is not None:
            raise I2VEditError("the skip-interval K/V source must be the first clip's own denoising.")
        self.clip, self.result = clip, result
        inv = clip.inversion
        self.latent_hw, self.fingerprint = inv.latent_hw, inv.fingerprint
        self.cfg_branches = 1 if clip.cfg is None else 2

    def at(self, phase: str, step: int, source: SourceKV | None = None) -> StepCapture:
        """The K/V of denoising step ``step``. ``source``: the later clip's own ``SourceKV``, which then
        serves its next source replay from this call's replay of the first clip's source step."""
        if phase != PHASE_DENOISE:
            raise I2VEditError(f"the edited K/V serve denoising, not {phase!r}.")
        if self.result.kv_captures is not None:
            return self.result.kv_captures[step]
        reference = self._replay_first_source(step, source)
        return self.clip.denoised(step, self.result.trajectory[step], capture_kv=True, reference=reference)[1]

    def _replay_first_source(self, step: int, source: SourceKV | None) -> StepCapture | None:
        """For a later clip's denoising step ``step`` in recompute mode: one replay of the first clip's
        source step that gives both the attention its edit call matches against and the K/V ``source``
        (the later clip's own ``SourceKV``) serves its source replay next. None where they differ."""
        clip = self.clip
        if (
            clip.config is None
            or source is None
            or source.inversion is not clip.inversion
            or source.host is not clip.source_host
            or clip.inversion.captures is not None
            or source.store_dtype != clip.store_dtype
        ):
            return None
        return source.replay_holding_kv(paired_step(step, clip.steps, clip.config.pair_offset), MATCH_CAPTURE)

    def stored_bytes(self) -> int:
        return self.result.stored_bytes()


class SkipInterval:
    """One run's skip-interval K/V, by clip: none for the first clip, the first clip's for the others.

    ``on`` False switches skip-interval off (every getter returns None). ``capture`` (cache mode)
    keeps the first clip's K/V of every step from the calls that make them instead of replaying
    those calls later.
    """

    def __init__(self, on: bool, edits: int, capture: bool = False) -> None:
        self.on, self.capture = on, capture
        self.source: SourceKV | None = None
        self.train: SourceKV | None = None
        self.edit: list[EditKV | None] = [None] * edits

    def capture_kv(self, clip: int) -> bool:
        """Whether the clip's inversion and denoising keep their K/V of every step."""
        return self.on and self.capture and clip == 0

    def for_inversion(self, clip: int) -> SourceKV | None:
        return self.source if self.on and clip > 0 else None

    def for_training(
        self, clip: int, host: SVDHost, at_train_res: Callable[[], Inversion] | None
    ) -> SourceKV | None:
        """The K/V a later clip's LoRA training attends to; ``at_train_res`` makes the first clip's
        inversion at training resolution (once, on first use), None when training runs at full size."""
        if not self.on or clip == 0:
            return None
        if self.train is None:
            self.train = self.source if at_train_res is None else SourceKV(host, at_train_res())
        return self.train

    def for_denoising(self, clip: int, edit: int) -> EditKV | None:
        return self.edit[edit] if self.on and clip > 0 else None

    def first_inversion(self, host: SVDHost, inversion: Inversion) -> None:
        if self.on:
            self.source = SourceKV(host, inversion)

    def first_edit(self, edit: int, clip: MatchedClip, result: MatchedResult) -> EditKV | None:
        if self.on:
            self.edit[edit] = EditKV(clip, result)
        return self.edit[edit]
