"""The memory and compute plan of a whole edit at full size, on the ``meta`` device.

``plan_edit`` builds SVD's real UNet, VAE and ViT-H image encoder on ``meta`` (shapes only: no
weights, nothing computed or allocated), then runs one call of each kind the pipeline makes through
the real code: the encode, an inversion step (``replay_source`` without capture is exactly that
call), a LoRA training step (``lora.train.step_gradients`` and the AdamW step, gradient
checkpointing on), a matched denoising step of each temporal-injection stage (``MatchedClip.denoised``,
recompute mode, source replay included), the edit's conditioning and one VAE decode chunk; for the
first clip and for a later clip (skip-interval K/V, which replays the first clip's calls). Each call
runs under ``FlopCounterMode`` (FLOPs), ``run.memtrack.track_allocations`` (peak bytes beyond what
existed before the call) and a UNet forward hook (passes, batch rows); counts (steps, LoRA steps,
clips) multiply them. Weights are added per stage: all three models stay on the device, as the
pipeline keeps them. A run that stores its weights in fp16 / bf16 (``store_weights``, ``weights_dtype``)
is measured on fp32 weights, as its layers compute, and counts its weights at their stored bytes; not
counted then: the fp32 copy of the layer computing now (at most 0.12 GB at full size) and, in LoRA
training, the fp32 copies of the layers outside checkpointed blocks kept for the backward (0.23 GB).

On ``meta``, torch's attention would take its math path and materialise every score; a GPU runs a
fused kernel, so ``scaled_dot_product_attention`` on meta tensors is sized as the fused
(memory-efficient) kernel here. The VAE decode is measured on one chunk through the VAE itself
(``host.vae_decode`` ends by copying to the CPU, which meta tensors cannot do), plus the decoded
frames it gathers. Not counted: CUDA's allocator rounding and fragmentation, cuBLAS/cuDNN
workspaces, the CUDA context (≈0.5 GB), host RAM.

``check_budget`` refuses, with the stage and what to change, a plan that does not fit a budget.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLTemporalDecoder, ModelMixin, UNetSpatioTemporalConditionModel
from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from ...errors import I2VEditError
from ...lora.file import LoRAWeights
from ...lora.peft_init import init_lora_pairs
from ...lora.targets import target_shapes, to_comfy_name
from ...lora.train import TrainConfig, step_gradients, training_size
from ...method.controller import MatchConfig
from ...method.inversion import Inversion, replay_source
from ...method.matching import MatchedClip, MatchedResult
from ...method.schedules import inversion_sigmas
from ...method.skip_interval import EditKV, SourceKV
from ...run.memtrack import AllocationTracker, track_allocations
from ...run.stages import edit_conditioning, encode_source
from ...svd import LATENT_SCALE, TimeIds
from .host import DiffusersSVDHost, store_weights
from .single_file import SVD_CLIP_CONFIG, SVD_VAE_CONFIG

GB = 10**9
META = torch.device("meta")
MODEL_FRAMES = {"svd": 14, "svd_xt": 25}  # the two SVD checkpoints: one architecture, trained frame counts
ADVICE = {
    "encode": "a smaller --size or fewer frames per clip (--chunk)",
    "invert": "a smaller --size or fewer frames per clip (--chunk)",
    "train_encode": "a smaller training size",
    "invert_train_res": "a smaller training size",
    "lora": "a smaller training size or fewer frames per clip (--chunk), or --lora-steps 0",
    "condition": "a smaller --size",
    "denoise": "a smaller --size or fewer frames per clip (--chunk)",
    "decode": "a smaller decode chunk",
}


@dataclass(frozen=True)
class Cost:
    """One call on meta: FLOPs, the most bytes it had alive beyond what existed before it, UNet passes."""

    flops: int
    peak_bytes: int
    unet_calls: int
    unet_rows: int  # videos through the UNet, summed over its calls (CFG: 2 per call)
    kept_bytes: int = 0  # of its allocations, still alive after it (e.g. AdamW state)

    def as_dict(self) -> dict[str, int]:
        return {"flops": self.flops, "peak_bytes": self.peak_bytes, "unet_calls": self.unet_calls,
                "unet_rows": self.unet_rows, "kept_bytes": self.kept_bytes}  # fmt: skip


@dataclass(frozen=True)
class StagePart:
    """A stage's call of one kind, made ``calls`` times in a run (e.g. a later clip's inversion step)."""

    stage: str
    what: str
    calls: int
    cost: Cost
    all_models_bytes: int  # UNet, VAE, image encoder (and LoRA branch) on the device
    unet_bytes: int  # the UNet (and LoRA branch) alone
    extra_bytes: int = 0  # held on the device from before the call (e.g. AdamW's moments)

    def peak_bytes(self, offload_aux: bool = False) -> int:
        """Peak with weights; ``offload_aux``: the VAE and image encoder off the device in UNet stages."""
        models = self.unet_bytes if offload_aux and self.cost.unet_calls else self.all_models_bytes
        return models + self.extra_bytes + self.cost.peak_bytes

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "what": self.what, "calls": self.calls, **self.cost.as_dict(),
                "peak_with_weights_bytes": self.peak_bytes(),
                "peak_with_weights_offloaded_bytes": self.peak_bytes(True),
                "flops_total": self.calls * self.cost.flops}  # fmt: skip


@dataclass
class EditPlan:
    """A whole run's parts, the settings it was made for, and what stays between steps and clips."""

    settings: dict[str, Any]
    weights_bytes: dict[str, int]
    parts: list[StagePart] = field(default_factory=list)
    kept_bytes: dict[str, int] = field(default_factory=dict)
    plain_step: Cost | None = None  # a CFG step without matching, for the ratio (not a call of the run)

    def matched_over_plain_step_flops(self) -> dict[str, float]:
        """Each matched step's FLOPs over a plain CFG step's (two UNet rows) at the same size."""
        if self.plain_step is None or not self.plain_step.flops:
            return {}
        return {p.what: p.cost.flops / self.plain_step.flops for p in self.parts if p.stage == "denoise"}

    def stages(self, offload_aux: bool | None = None) -> dict[str, dict[str, Any]]:
        """Per stage: its worst peak (weights included), FLOPs and UNet passes over the whole run.
        ``offload_aux`` None: as the planned run keeps the VAE and image encoder (``low_memory``)."""
        if offload_aux is None:
            offload_aux = bool(self.settings.get("low_memory"))
        out: dict[str, dict[str, Any]] = {}
        for p in self.parts:
            s = out.setdefault(p.stage, {"peak_bytes": 0, "flops": 0, "unet_calls": 0, "unet_rows": 0})
            s["peak_bytes"] = max(s["peak_bytes"], p.peak_bytes(offload_aux))
            s["flops"] += p.calls * p.cost.flops
            s["unet_calls"] += p.calls * p.cost.unet_calls
            s["unet_rows"] += p.calls * p.cost.unet_rows
        return out

    def as_dict(self) -> dict[str, Any]:
        stages = self.stages()
        return {
            "settings": self.settings, "weights_bytes": self.weights_bytes, "stages": stages,
            "peak_bytes": max(s["peak_bytes"] for s in stages.values()),
            "peak_bytes_offloaded": max(s["peak_bytes"] for s in self.stages(True).values()),
            "flops": sum(s["flops"] for s in stages.values()),
            "unet_rows": sum(s["unet_rows"] for s in stages.values()),
            "kept_bytes": self.kept_bytes, "parts": [p.as_dict() for p in self.parts],
            "plain_cfg_step": self.plain_step.as_dict() if self.plain_step else None,
            "matched_over_plain_step_flops": self.matched_over_plain_step_flops(),
        }  # fmt: skip


_SDPA = F.scaled_dot_product_attention


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """``scaled_dot_product_attention`` that sizes a plain call on meta tensors as a GPU's fused kernel
    (output and log-sum-exp), where meta would take the math path and materialise every score."""
    if not (
        q.is_meta and q.ndim == 4 and attn_mask is None and dropout_p == 0.0 and not is_causal and not kw
    ):
        return _SDPA(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kw)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, grad, scale=scale)[0]


@contextmanager
def _fused_attention_on_meta() -> Iterator[None]:
    """Every caller of ``F.scaled_dot_product_attention`` (ours, diffusers', transformers') gets
    ``_fused_sdpa`` inside the block; a module attribute, so a checkpointed backward's recompute sees it
    too (torch function modes do not reach it). Other tensors than meta ones go through unchanged."""
    F.scaled_dot_product_attention = _fused_sdpa  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA


def _build(make: Callable[[], torch.nn.Module], dtype: torch.dtype) -> torch.nn.Module:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(META):
            return make().to(META)  # a few parameters ignore the device context (torch.Tensor([...]))
    finally:
        torch.set_default_dtype(default)


def meta_host(
    dtype: torch.dtype = torch.float16,
    aux_dtype: torch.dtype = torch.float32,
    unet_config: dict[str, Any] | None = None,
    vae_config: dict[str, Any] | None = None,
    clip_config: dict[str, Any] | None = None,
) -> DiffusersSVDHost:
    """SVD on ``meta``: UNet in ``dtype``, VAE and image encoder in ``aux_dtype``. The configs (as the
    models' ``config.json`` hold them) default to the full-size SVD's, which svd and svd_xt share."""
    unet = _build(lambda: UNetSpatioTemporalConditionModel.from_config(unet_config or {}), dtype)
    vae = _build(lambda: AutoencoderKLTemporalDecoder.from_config(vae_config or SVD_VAE_CONFIG), aux_dtype)
    clip = _build(
        lambda: CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(clip_config or SVD_CLIP_CONFIG)),
        aux_dtype,
    )
    return DiffusersSVDHost(unet, vae, clip, dtype=dtype)


def model_meta_host(
    model: str | Path, dtype: torch.dtype = torch.float32, aux_dtype: torch.dtype = torch.float32
) -> DiffusersSVDHost:
    """The SVD at ``model`` on ``meta``, its weights never read: a diffusers folder's ``config.json``
    files, or (a single-file checkpoint, whose layout is SVD's) the full-size SVD's configs."""
    p = Path(model)
    if p.is_file():
        return meta_host(dtype, aux_dtype)
    unet, vae, clip = (json.loads((p / sub / "config.json").read_text(encoding="utf-8"))
                       for sub in ("unet", "vae", "image_encoder"))  # fmt: skip
    return meta_host(dtype, aux_dtype, unet, vae, clip)


def weights_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def stored_weights_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """``weights_bytes`` of ``module`` (fp32) once ``store_weights`` stores it in ``dtype``: worked out on a new
    meta build of its class and config, so ``module`` keeps its fp32 weights for the plan's calls."""
    if dtype == torch.float32:
        return weights_bytes(module)
    config = module.config
    if isinstance(module, ModelMixin):
        copy = _build(lambda: type(module).from_config(config), torch.float32)
    else:
        copy = _build(lambda: type(module)(config), torch.float32)
    return weights_bytes(store_weights(copy, dtype))


@contextmanager
def counting(count_flops: bool = True) -> Iterator[tuple[FlopCounterMode, AllocationTracker]]:
    """What the block computes (FLOPs; 0 unless ``count_flops``) and allocates (``AllocationTracker``),
    attention on meta sized as the fused kernel: the measurement of every call of a plan."""
    flops = FlopCounterMode(display=False)
    # FlopCounterMode's counting alone: its module tracker holds module outputs (for its backward
    # hooks) and would inflate the peak bytes, so it is not entered; FLOPs go to "Global".
    counter = _FlopCounterMode(flops) if count_flops else nullcontext()
    with _fused_attention_on_meta(), counter, track_allocations() as mem:
        yield flops, mem


class Meter:
    """Measures calls on a host's models: FLOPs, peak bytes and UNet passes (see ``Cost``)."""

    def __init__(self, host: DiffusersSVDHost, count_flops: bool = True) -> None:
        self.host, self.count_flops = host, count_flops
        self.calls = self.rows = 0
        self.hook = host.unet.register_forward_pre_hook(self._count)

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.hook.remove()

    def _count(self, _module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self.calls += 1
        self.rows += int(args[0].shape[0])

    @contextmanager
    def measure(self, out: list[Cost]) -> Iterator[None]:
        """Measure the block; its ``Cost`` is appended to ``out``."""
        calls, rows = self.calls, self.rows
        with counting(self.count_flops) as (flops, mem):
            yield
        out.append(Cost(flops.get_total_flops(), mem.peak_bytes, self.calls - calls, self.rows - rows,
                        mem.live_bytes))  # fmt: skip

    def cost(self, fn: Callable[[], Any]) -> Cost:
        """``fn()`` measured; what it returns is dropped before its kept bytes are read."""
        out: list[Cost] = []
        with self.measure(out):
            fn()
        return out[0]


def _pixels(frames: int, hw: tuple[int, int]) -> torch.Tensor:
    return torch.empty(frames, *hw, 3, device=META)


def _inversion(host: DiffusersSVDHost, frames: int, latent_hw: tuple[int, int], steps: int, cond, skip=None):
    trajectory = torch.empty(steps + 1, frames, 4, *latent_hw, device=META)
    return Inversion(trajectory, inversion_sigmas(steps), cond, host.fingerprint(), skip_kv=skip)


def plan_edit(
    height: int = 576,
    width: int = 1024,
    frames: int = 14,
    steps: int = 25,
    lora_steps: int = 250,
    clips: int = 2,
    edits: int = 1,
    train_hw: tuple[int, int] | None = None,
    match: MatchConfig | None = MatchConfig(),  # noqa: B008  (frozen dataclass)
    decode_chunk: int = 8,
    lora_rank: int = 32,
    skip_interval: bool = True,
    dtype: torch.dtype = torch.float16,
    aux_dtype: torch.dtype = torch.float32,
    host: DiffusersSVDHost | None = None,
    count_flops: bool = True,
    max_bytes: float | None = None,
    low_memory: bool = False,
    weights_dtype: torch.dtype = torch.float32,
) -> EditPlan:
    """The plan of ``edit_video`` (recompute mode, CFG, LoRA training with gradient checkpointing) for
    ``clips`` clips of ``frames`` frames at ``height``×``width``; ``host`` (its dtypes rule) defaults to
    full-size SVD on meta in ``dtype`` (UNet) and ``aux_dtype`` (VAE, image encoder).
    Peaks come with all three models on the device (as the pipeline keeps them) and, as a design to
    size, with the VAE and image encoder off it while the UNet stages run (``offload_aux``).
    ``count_flops=False``: peaks only (FLOPs 0, about a quarter faster); ``max_bytes``: ``check_budget``
    after each call, so a run that does not fit is refused at its first stage over the budget.
    ``low_memory``: the run of ``DiffusersSVDHost.low_memory`` (one conditioning per UNet call, the VAE
    and image encoder off the device while the UNet runs). ``weights_dtype``: the run stores the weights of
    ``host``'s fp32 models in this dtype (``store_weights``): they count at their stored bytes."""
    host = host or meta_host(dtype, aux_dtype)
    if host.device != META:
        raise I2VEditError("a plan runs on a host whose models are on the meta device (meta_host).")
    was_low = host.offload_aux
    host.low_memory(low_memory)
    try:
        with Meter(host, count_flops) as meter:
            dtype, aux_dtype = host.dtype, next(host.vae.parameters()).dtype
            train_hw = train_hw or training_size(height, width)
            if train_hw[0] * train_hw[1] > height * width:
                train_hw = (height, width)
            hw, lhw, train_lhw = (
                (height, width),
                (height // 8, width // 8),
                (train_hw[0] // 8, train_hw[1] // 8),
            )
            later = clips - 1
            skip = skip_interval and later > 0
            g = torch.Generator().manual_seed(0)
            if weights_dtype != torch.float32 and (dtype != torch.float32 or aux_dtype != torch.float32):
                raise I2VEditError("stored weights compute in float32: plan them on a float32 meta host.")
            weights = {name: stored_weights_bytes(getattr(host, name), weights_dtype)
                       for name in ("unet", "vae", "image_encoder")}  # fmt: skip
            shapes = target_shapes(host.unet, "temporal", "diffusers")
            lora_bytes = sum((o + i) * lora_rank * 4 for o, i in shapes.values()) if lora_steps > 0 else 0
            if lora_bytes:
                weights["lora_branch"] = lora_bytes  # fp32, attached to the UNet from the first training on
            base = sum(weights.values())
            plan = EditPlan({"height": height, "width": width, "frames": frames, "steps": steps, "lora_steps": lora_steps,
                             "clips": clips, "edits": edits, "train_size": list(train_hw), "matching": match is not None,
                             "decode_chunk": decode_chunk, "lora_rank": lora_rank, "skip_interval": skip,
                             "dtype": str(dtype).removeprefix("torch."), "vae_clip_dtype": str(aux_dtype).removeprefix("torch."),
                             "memory_mode": "recompute", "gradient_checkpointing": True, "low_memory": low_memory,
                             **({"weights_dtype": str(weights_dtype).removeprefix("torch.")}
                                if weights_dtype != torch.float32 else {})},
                            weights)  # fmt: skip

            unet_only = weights["unet"] + weights.get("lora_branch", 0)

            def add(stage: str, what: str, calls: int, cost: Cost, extra: int = 0) -> None:
                if calls > 0:
                    plan.parts.append(StagePart(stage, what, calls, cost, base, unet_only, extra))
                    if max_bytes is not None:
                        check_budget(plan, max_bytes)

            # --- encode and invert: the first clip, then a later clip (with the first clip's K/V) ---------
            conds = []
            enc = meter.cost(lambda: conds.append(encode_source(host, _pixels(frames, hw), g)[1]))
            add(
                "encode",
                "VAE encode of a clip's frames + its first frame, CLIP of the first frame",
                clips,
                enc,
            )
            cond = conds[0]
            inv0 = _inversion(host, frames, lhw, steps, cond)
            source_kv = SourceKV(host, inv0) if skip else None
            inv1 = _inversion(host, frames, lhw, steps, cond, source_kv)
            add(
                "invert",
                "inversion step, first clip",
                steps,
                meter.cost(lambda: replay_source(host, inv0, 0, set())),
            )
            if later:
                what = "inversion step, later clip (replays the first clip's step for its K/V)"
                add("invert", what, later * steps, meter.cost(lambda: replay_source(host, inv1, 0, set())))

            # --- LoRA training at the training size -------------------------------------------------------
            if lora_steps > 0:
                small = train_hw != hw
                if small:
                    add("train_encode", "VAE encode + CLIP at the training size", clips,
                        meter.cost(lambda: conds.append(encode_source(host, _pixels(frames, train_hw), g)[1])))  # fmt: skip
                train_kv = None
                if skip:
                    train_inv = _inversion(host, frames, train_lhw, steps, conds[-1]) if small else inv0
                    train_kv = SourceKV(host, train_inv)
                    if small:
                        add("invert_train_res", "the first clip's encode at the training size (for later clips' K/V)", 1,
                            meter.cost(lambda: encode_source(host, _pixels(frames, train_hw), g)))  # fmt: skip
                        add("invert_train_res", "its inversion step at the training size", steps,
                            meter.cost(lambda: replay_source(host, train_inv, 0, set())))  # fmt: skip
                latents = torch.zeros(frames, 4, *train_lhw)
                first, embed = (
                    latents[:1] / LATENT_SCALE,
                    torch.zeros(1, 1, host.image_encoder.config.projection_dim),
                )
                for label, kv, n in (
                    ("first clip", None, 1),
                    ("later clip (first clip's K/V replayed)", train_kv, later),
                ):
                    if n == 0:
                        continue
                    trainer = host.lora_trainer(lora_rank, gradient_checkpointing=True)
                    config = TrainConfig(rank=lora_rank, steps=lora_steps)
                    optimizer = torch.optim.AdamW([p for _, p in trainer.named_trainable()], lr=config.lr)

                    def train_step(trainer=trainer, optimizer=optimizer, config=config, kv=kv) -> None:
                        step_gradients(trainer, optimizer, latents, first, embed, config, kv, 0, META)
                        optimizer.step()

                    # the first step: later steps also hold the previous gradients and AdamW's moments (3 × the LoRA)
                    add("lora", f"training step (forward + backward, checkpointing, AdamW), {label}", n * lora_steps,
                        meter.cost(train_step), 3 * lora_bytes)  # fmt: skip
                    trainer.set_dropout(False)
                    host.release_call_options()
                # the LoRA, its gradients and AdamW's two moments, all fp32 (``extra`` above: all but the LoRA)
                plan.kept_bytes["lora_training_state_on_device"] = 4 * lora_bytes

            # --- each edit: conditioning, matched denoising by temporal stage, decode ---------------------
            lora_host: DiffusersSVDHost = host
            if lora_steps > 0:
                names = {n: to_comfy_name(n) for n in shapes}
                pairs = init_lora_pairs({names[n]: s for n, s in shapes.items()}, lora_rank, 0)
                lora_host = host.with_lora(LoRAWeights(pairs, target_set="temporal"))
            ids = TimeIds(6.0, 127.0, 0.02)
            edited = _pixels(1, hw)
            prev = (torch.empty(1, 4, *lhw, device=META), edited)
            add("condition", "edited first frame: VAE encode + CLIP", edits,
                meter.cost(lambda: edit_conditioning(host, edited, ids, g)))  # fmt: skip
            if later:
                add("condition", "later clip: CLIP of the previous clip's last frame", edits * later,
                    meter.cost(lambda: edit_conditioning(host, None, ids, g, prev)))  # fmt: skip
            clip0 = MatchedClip(lora_host, inv0, cond, match, (1.0, 2.0), "recompute", host)
            trajectory = torch.empty(steps + 1, frames, 4, *lhw, device=META)
            edit_kv = EditKV(clip0, MatchedResult(trajectory[-1], trajectory, None)) if skip else None
            clip1 = MatchedClip(lora_host, inv1, cond, match, (1.0, 2.0), "recompute", host, edit_kv)
            x = torch.empty(frames, 4, *lhw, device=META)
            for label, clip, n in (("first clip", clip0, 1), ("later clip", clip1, later)):
                if n:  # step 0: temporal injection in every layer, the most work (later stages differ by < 0.01 %)
                    add(
                        "denoise",
                        f"matched step, {label}",
                        edits * n * steps,
                        meter.cost(functools.partial(clip.denoised, 0, x)),
                    )
            if count_flops:
                uncond = cond.unconditional()
                plain_cfg = functools.partial(lora_host.denoise, x, float(clip0.sigmas[0]), [uncond, cond])
                plan.plain_step = meter.cost(plain_cfg)
            z = torch.empty(min(decode_chunk, frames), 4, *lhw, device=META, dtype=aux_dtype)
            decoded = (
                frames * 3 * height * width * 4
            )  # the float32 frames vae_decode gathers before its CPU copy
            for n_chunk, count in _chunks(frames, decode_chunk):
                zc = z[:n_chunk]
                add("decode", f"VAE decode of {n_chunk} frames", edits * clips * count,
                    meter.cost(functools.partial(host.vae.decode, zc, num_frames=n_chunk)), decoded)  # fmt: skip

            # --- what stays between steps and between clips (recompute mode: latents only, CPU RAM) -------
            plan.kept_bytes["source_trajectory_per_clip_cpu"] = inv0.stored_bytes()
            plan.kept_bytes["edit_trajectory_per_clip_and_edit_cpu"] = MatchedResult(
                x, trajectory, None
            ).stored_bytes()
            if skip:
                kept = source_kv.stored_bytes() if source_kv else 0
                kept += edits * (edit_kv.stored_bytes() if edit_kv else 0)
                if lora_steps > 0 and train_hw != hw:
                    kept += _inversion(host, frames, train_lhw, steps, conds[-1]).stored_bytes()
                plan.kept_bytes["first_clip_kept_for_later_clips_cpu"] = kept
            plan.kept_bytes["lora_file_per_clip_cpu"] = lora_bytes if lora_steps > 0 else 0
            return plan
    finally:
        host.low_memory(was_low)


def _chunks(frames: int, chunk: int) -> list[tuple[int, int]]:
    """(chunk length, how many) of ``vae_decode``'s chunks of a clip."""
    full, rest = divmod(frames, chunk)
    return [(n, c) for n, c in ((chunk, full), (rest, 1 if rest else 0)) if c]


def check_budget(plan: EditPlan, max_bytes: float) -> None:
    """Raise, naming the first stage that does not fit and what to change, unless every stage fits."""
    s = plan.settings
    for name, stage in plan.stages().items():
        if stage["peak_bytes"] > max_bytes:
            raise I2VEditError(
                f"the {name} stage needs about {stage['peak_bytes'] / GB:.3g} GB of GPU memory at "
                f"{s['height']}×{s['width']}, {s['frames']} frames per clip (training at "
                f"{s['train_size'][0]}×{s['train_size'][1]}, UNet {s['dtype']}"
                f"{', weights stored in ' + s['weights_dtype'] if 'weights_dtype' in s else ''}), over --max-vram "
                f"{max_bytes / GB:g} GB; use {ADVICE.get(name, 'a smaller --size')}"
                f"{'' if s.get('low_memory') else ', or --low-memory'}"
                f"{'' if 'weights_dtype' in s or s['dtype'] != 'float32' else ', or --weights-dtype fp16'}. "
                "Nothing was computed."
            )
