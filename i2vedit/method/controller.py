"""The attention controller both hosts call from their 16 spatial and 16 temporal self-attention layers.

A host hands every self-attention call to the controller it finds in ``transformer_options`` under
``CONTROLLER_KEY``, together with an ``AttnCall`` saying which layer it is, whether it is the
temporal one, how many heads it has, which CFG branch each batched chunk belongs to (from the
host's own ``cond_or_uncond``, never assumed) and the host's own attention kernel. The controller
then does, per call (method.md §4, §6):

- **skip-interval K/V**: in temporal layers, prepends the first clip's keys/values of the same step;
- **capture**: spatial Q/K and temporal probabilities of the cond chunk, and every chunk's own
  temporal K/V, into a ``StepCapture`` (one step; the driver decides what to keep);
- **matching** (cond chunk only): spatial difference-map blending against the source's Q/K, and
  staged replacement of the temporal probabilities by the source's.

Everything else runs through the host's kernel, so a controller that does nothing changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from ..errors import I2VEditError
from ..svd import COND, POSITIONS, UNCOND
from .attention import (
    AttendFn,
    apply_probs,
    attention_probs,
    concat_kv,
    frame_thresholds,
    spatial_match,
)
from .schedules import paired_inversion_step

CONTROLLER_KEY = "i2v_controller"
TEMPORAL_KEY = "i2v_temporal"

CaptureKind = Literal["spatial", "temporal", "kv"]
LayerSet = Literal["paper", "authors"]

PRESETS: dict[str, tuple[float, float]] = {
    "local": (0.5, 0.8),  # local object edits: a necklace, hair colour
    "style": (0.8, 0.9),  # global edits without big shape change
    "shape": (0.4, 0.5),  # global edits with significant shape change
}


def _paper_stage2() -> frozenset[int]:
    return frozenset(p.index for p in POSITIONS if p.downscale >= 4)


def _authors_stage2() -> frozenset[int]:
    return frozenset(p.index for p in POSITIONS if p.downscale >= 4 and not (p.level == "up" and p.pos > 1))


STAGE2_LAYERS: dict[str, frozenset[int]] = {"paper": _paper_stage2(), "authors": _authors_stage2()}


@dataclass(frozen=True)
class MatchConfig:
    """Fine-grained attention matching settings; defaults are the paper's local-edit values.

    ``beta`` splits the denoising steps into three stages of temporal injection (all layers, then
    only layers at 1/4 latent resolution or coarser, then none); ``tau`` is the spatial difference
    threshold at the first and the last frame (linear in between); ``stage2_layers`` "paper" uses the
    paper's downscale rule, "authors" the released code's set, which leaves out
    ``up_blocks.1.attentions.2``. ``query_chunk`` bounds the query rows of one matching block (None:
    ``attention.default_query_chunk``, by device). ``pair_offset`` shifts which inversion step a
    denoising step reads (0: step k reads inversion step n−1−k, as the paper does).
    """

    beta: tuple[float, float] = PRESETS["local"]
    tau: tuple[float, float] = (0.35, 0.35)
    spatial: bool = True
    temporal: bool = True
    stage2_layers: LayerSet = "paper"
    query_chunk: int | None = None
    pair_offset: int = 0

    @classmethod
    def preset(cls, name: str, **overrides) -> MatchConfig:
        """The paper's stage split for an edit category: "local", "style" or "shape"."""
        if name not in PRESETS:
            raise I2VEditError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return replace(cls(beta=PRESETS[name]), **overrides)

    def validate(self) -> MatchConfig:
        b1, b2 = self.beta
        if not (0.0 <= b1 <= 1.0 and 0.0 <= b2 <= 1.0):
            raise I2VEditError(f"β1 and β2 must lie in [0, 1], got {b1} and {b2}.")
        if b1 > b2:
            raise I2VEditError(
                f"β1 = {b1} is larger than β2 = {b2}; stage 1 (all layers) must end before stage 2 "
                "(coarse layers only) does. Swap them."
            )
        for t in self.tau:
            if not 0.0 <= t <= 1.0:
                raise I2VEditError(f"τ must lie in [0, 1] (a fraction of total variation), got {t}.")
        if self.stage2_layers not in STAGE2_LAYERS:
            raise I2VEditError(
                f"stage2_layers must be one of {sorted(STAGE2_LAYERS)}, got {self.stage2_layers!r}."
            )
        if self.query_chunk is not None and self.query_chunk < 1:
            raise I2VEditError(f"query_chunk must be at least 1, got {self.query_chunk}.")
        return self


def temporal_injection_layers(step: int, steps: int, config: MatchConfig) -> frozenset[int]:
    """Positions whose cond-chunk temporal probabilities are replaced by the source's at ``step``."""
    if not config.temporal:
        return frozenset()
    b1, b2 = int(config.beta[0] * steps), int(config.beta[1] * steps)
    if step < b1:
        return frozenset(range(len(POSITIONS)))
    if step < b2:
        return STAGE2_LAYERS[config.stage2_layers]
    return frozenset()


def paired_step(step: int, steps: int, offset: int = 0) -> int:
    """The inversion step denoising step ``step`` reads: n−1−k (+ offset), kept inside the schedule."""
    return min(max(paired_inversion_step(step, steps) + offset, 0), steps - 1)


@dataclass
class StepCapture:
    """What one model call recorded, per position index.

    ``spatial``: (Q, K) of the cond chunk, each (frames, h·w, C); ``temporal``: the cond chunk's
    probabilities (h·w, heads, frames, keys); ``kv``: every chunk's own temporal (K, V), each
    (h·w, frames, C), by chunk kind ("cond"/"uncond"), before any skip-interval concatenation.
    """

    spatial: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    temporal: dict[int, torch.Tensor] = field(default_factory=dict)
    kv: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        out = [t for pair in self.spatial.values() for t in pair]
        out += list(self.temporal.values())
        out += [t for by_kind in self.kv.values() for pair in by_kind.values() for t in pair]
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclass
class AttnCall:
    """One self-attention call as a host reports it."""

    index: int  # position 0..15 (svd.POSITIONS)
    temporal: bool
    heads: int
    chunks: list[str]  # kind of each batched chunk, in row order
    attend: AttendFn  # the host's own attention kernel


def chunk_kinds(cond_or_uncond: list[int] | None, rows: int) -> list[str]:
    """Kinds of the batched chunks from a host's ``cond_or_uncond`` (0 = cond, 1 = uncond)."""
    kinds = [COND] if cond_or_uncond is None else [COND if c == 0 else UNCOND for c in cond_or_uncond]
    if not kinds or rows % len(kinds):
        raise I2VEditError(f"cannot split {rows} attention rows into {len(kinds)} CFG chunks.")
    return kinds


class MaskAccumulator:
    """Mean blend weight M over layers and steps, at latent resolution: what was treated as edited."""

    def __init__(self, frames: int, latent_hw: tuple[int, int]) -> None:
        self.h, self.w = latent_hw
        self.sum = torch.zeros(frames, self.h, self.w)
        self.count = 0

    def add(self, weight: torch.Tensor, downscale: int) -> None:
        h, w = -(-self.h // downscale), -(-self.w // downscale)  # SVD's stride-2 convs round up
        if h * w != weight.shape[1]:
            raise I2VEditError(
                f"a layer of {weight.shape[1]} tokens does not tile a {self.h}×{self.w} latent."
            )
        grid = weight.float().cpu().view(1, -1, h, w)
        self.sum += torch.nn.functional.interpolate(grid, size=(self.h, self.w), mode="nearest")[0]
        self.count += 1

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


class AttentionController:
    """Skip-interval K/V, capture and matching for one model call at a time (see the module docstring).

    The driver sets the step's inputs with ``begin_step`` before each model call and takes what was
    captured with ``take`` after it.
    """

    def __init__(
        self,
        capture: set[CaptureKind] | frozenset[CaptureKind] = frozenset(),
        config: MatchConfig | None = None,
        store_dtype: torch.dtype | None = None,
        store_device: torch.device | str | None = None,
        masks: MaskAccumulator | None = None,
    ) -> None:
        unknown = set(capture) - {"spatial", "temporal", "kv"}
        if unknown:
            raise I2VEditError(f"unknown capture kinds {sorted(unknown)}.")
        self.capture_kinds = frozenset(capture)
        self.config = config.validate() if config is not None else MatchConfig()
        self.store_dtype, self.store_device = store_dtype, store_device
        self.masks = masks
        self.step, self.steps = 0, 1
        self.reference: StepCapture | None = None
        self.skip_kv: StepCapture | None = None
        self.captured = StepCapture()
        self._inject: frozenset[int] = frozenset()

    def begin_step(
        self,
        step: int,
        steps: int,
        reference: StepCapture | None = None,
        skip_kv: StepCapture | None = None,
    ) -> None:
        """Set the step, the source attention to match against (None: no matching), and clip 1's K/V."""
        self.step, self.steps, self.reference, self.skip_kv = step, steps, reference, skip_kv
        self.captured = StepCapture()
        self._inject = temporal_injection_layers(step, steps, self.config) if reference else frozenset()

    def take(self) -> StepCapture:
        out, self.captured = self.captured, StepCapture()
        return out

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` kept past its layer: the tensor itself when it is all of its storage and stays where and
        what it is (the hosts never write a layer's q, k, v or our probabilities after the call), else a copy
        (a chunk of a batched call would otherwise hold the whole batch)."""
        device, dtype = torch.device(self.store_device or t.device), self.store_dtype or t.dtype
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if whole and t.device == device and t.dtype == dtype:
            return t.detach()
        return t.detach().to(device=device, dtype=dtype, copy=True)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> torch.Tensor:
        rows = q.shape[0] // len(call.chunks)
        parts = [slice(i * rows, (i + 1) * rows) for i in range(len(call.chunks))]
        if call.temporal:
            k, v = self._temporal_kv(k, v, call, parts)
        special = [self._special(call, kind) for kind in call.chunks]
        if "spatial" in self.capture_kinds and not call.temporal:
            for kind, sl in zip(call.chunks, parts):
                if kind == COND:
                    self.captured.spatial[call.index] = (self._store(q[sl]), self._store(k[sl]))
        if "temporal" in self.capture_kinds and call.temporal:
            for kind, sl in zip(call.chunks, parts):
                if kind == COND:
                    probs = attention_probs(q[sl], k[sl], call.heads)
                    self.captured.temporal[call.index] = self._store(probs)
        if not any(special):
            return call.attend(q, k, v, call.heads)
        outs = []
        for is_special, sl in zip(special, parts):
            if not is_special:
                outs.append(call.attend(q[sl], k[sl], v[sl], call.heads))
            elif call.temporal:
                outs.append(self._inject_temporal(q[sl], v[sl], call))
            else:
                outs.append(self._match_spatial(q[sl], k[sl], v[sl], call))
        return torch.cat(outs)

    def _special(self, call: AttnCall, kind: str) -> bool:
        if kind != COND or self.reference is None:
            return False
        if call.temporal:
            return call.index in self._inject
        return self.config.spatial

    def _temporal_kv(self, k, v, call: AttnCall, parts: list[slice]):
        if "kv" in self.capture_kinds:
            entry = self.captured.kv.setdefault(call.index, {})
            for kind, sl in zip(call.chunks, parts):
                entry[kind] = (self._store(k[sl]), self._store(v[sl]))
        if self.skip_kv is None:
            return k, v
        by_kind = self.skip_kv.kv.get(call.index)
        if by_kind is None:
            raise I2VEditError(f"the skip-interval K/V source holds nothing for layer {call.index}.")
        ks, vs = [], []
        for kind, sl in zip(call.chunks, parts):
            if kind not in by_kind:
                raise I2VEditError(
                    f"the skip-interval K/V source has no {kind} branch; the first clip must be run with the "
                    "same CFG setting as this one."
                )
            kk, vv = concat_kv(k[sl], v[sl], *(t.to(k.device) for t in by_kind[kind]))
            ks.append(kk)
            vs.append(vv)
        return torch.cat(ks), torch.cat(vs)

    def _inject_temporal(self, q, v, call: AttnCall) -> torch.Tensor:
        src = self.reference.temporal.get(call.index) if self.reference else None
        if src is None:
            raise I2VEditError(f"the source capture holds no temporal probabilities for layer {call.index}.")
        if src.shape[0] != q.shape[0] or src.shape[2] != q.shape[1] or src.shape[3] != v.shape[1]:
            raise I2VEditError(
                f"source temporal attention {tuple(src.shape)} does not fit this clip (rows {q.shape[0]}, "
                f"frames {q.shape[1]}, keys {v.shape[1]}): resolution, frame count or skip-interval differ."
            )
        return apply_probs(src.to(v.device), v, call.heads)

    def _match_spatial(self, q, k, v, call: AttnCall) -> torch.Tensor:
        src = self.reference.spatial.get(call.index) if self.reference else None
        if src is None:
            raise I2VEditError(f"the source capture holds no spatial Q/K for layer {call.index}.")
        q_s, k_s = (t.to(q.device) for t in src)
        tau = frame_thresholds(q.shape[0], self.config.tau)
        out, _, weight = spatial_match(q, k, v, q_s, k_s, call.heads, tau, self.config.query_chunk)
        if self.masks is not None:
            self.masks.add(weight, POSITIONS[call.index].downscale)
        return out
