"""One clip's stages as single calls, shared by the pipeline and the ComfyUI nodes.

Seeds of every random draw come from ``seeds``, so a stage run on its own (a node) and the same
stage inside ``pipeline.edit_video`` give the same result for the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import I2VEditError
from ..host import SVDHost
from ..io.files import read_tensors, save_safetensors_atomic
from ..lora.file import LoRAWeights
from ..lora.train import TrainConfig, TrainResult, train_motion_lora
from ..method.colour import anchor_colours
from ..method.controller import MatchConfig
from ..method.inversion import Inversion, MemoryMode, StepCallback
from ..method.matching import MatchedClip, MatchedResult, matched_denoise
from ..method.region import RegionLock
from ..method.skip_interval import EditKV, SourceKV
from ..precision import autocast_region
from ..svd import LATENT_SCALE, SVDCond, TimeIds

INVERSION_FORMAT = "i2vedit.inversion/1"


def _noised(image: torch.Tensor, g: torch.Generator, scale: float = 0.01) -> torch.Tensor:
    """Pixel noise of 0.02 in SVD's [−1, 1] units (0.01 in [0, 1]) for the inversion's VAE condition."""
    return image + scale * torch.randn(image.shape, generator=g).to(image.device, image.dtype)


def denoise_time_ids(fps: float) -> TimeIds:
    """SVD's micro-conditioning for generation at a video's frame rate (fps id = fps − 1)."""
    return TimeIds(max(0.0, round(fps) - 1.0), 127.0, 0.02)


def source_latents(host: SVDHost, frames: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A clip's VAE posterior samples (seeded by ``g``) in the scaled space."""
    return host.vae_encode(frames, sample=True, generator=g).float() * LATENT_SCALE


def training_inputs(inversion: Inversion) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA training inputs at an inversion's own size: its clean latents (scaled), its first frame's raw
    latent and its CLIP embedding (``train_clip_lora``'s ``latents``, ``first_raw``, ``clip_embed``)."""
    latents = inversion.trajectory[0]
    return latents, latents[:1] / LATENT_SCALE, inversion.cond.clip_embed


def encode_source(
    host: SVDHost, perturbed: torch.Tensor, g: torch.Generator, fps_id: float = 8.0
) -> tuple[torch.Tensor, SVDCond]:
    """A clip's latents (VAE posterior samples, scaled space) and the source conditioning of inversion."""
    latents = source_latents(host, perturbed, g)
    first = perturbed[:1]
    cond = SVDCond(
        host.encode_clip(first), host.vae_encode(_noised(first, g)).float(), TimeIds(fps_id, 127.0, 0.02)
    )
    return latents, cond


def edit_conditioning(
    host: SVDHost,
    edited: torch.Tensor | None,
    ids: TimeIds,
    g: torch.Generator,
    prev: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SVDCond:
    """Clip 0: the edited frame; later clips: ``prev`` = the previous edited clip's (last latent, last frame).

    The previous clip's final latent (scaled space) feeds the VAE branch without a decode/encode
    round trip; its decoded frame feeds CLIP (method.md §1.5).
    """
    if prev is None:
        if edited is None:
            raise I2VEditError("give the edited first frame, or the previous edited clip to continue from.")
        image, latent = edited[:1, ..., :3], host.vae_encode(edited[:1, ..., :3]).float()
    else:
        image, latent = prev[1], prev[0].float() / LATENT_SCALE
    latent = latent + 0.02 * torch.randn(latent.shape, generator=g).to(latent.device)  # CPU draws, any device
    return SVDCond(host.encode_clip(image), latent, ids)


def train_clip_lora(
    host: SVDHost,
    latents: torch.Tensor,
    first_raw: torch.Tensor,
    clip_embed: torch.Tensor,
    config: TrainConfig,
    clip_index: int = 0,
    skip_kv: SourceKV | None = None,
    checkpoint_dir: str | Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    gradient_checkpointing: bool = False,
    resume_from: str | Path | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> TrainResult:
    """Train one clip's motion LoRA on ``host``'s base model (also inside ComfyUI's inference mode).

    ``resume_from``: a checkpoint of the same training (``checkpoint_dir`` of an interrupted run).
    ``autocast_dtype`` (bf16 / fp16): the model's forward and backward under autocast; the LoRA and its
    optimiser state stay fp32 (``precision``).
    """
    trainer = host.lora_trainer(
        config.rank, config.target_set, config.dropout, gradient_checkpointing=gradient_checkpointing,
        init_seed=config.seed, autocast_dtype=autocast_dtype,
    )  # fmt: skip
    h, w = latents.shape[-2] * 8, latents.shape[-1] * 8
    meta = LoRAWeights({}, clip_index=clip_index, resolution=(h, w), model_fingerprint=host.fingerprint())
    with torch.inference_mode(False):
        return train_motion_lora(
            trainer, latents, first_raw, clip_embed, config, skip_kv=skip_kv, checkpoint_dir=checkpoint_dir,
            metadata=meta, callback=callback, should_stop=should_stop, device=getattr(host, "device", "cpu"),
            resume_from=resume_from,
        )  # fmt: skip


@dataclass
class ClipEdit:
    """One clip's matched edit: the denoising (chaining, skip-interval K/V), decoded frames and masks."""

    clip: MatchedClip
    result: MatchedResult
    frames: torch.Tensor  # (frames, H, W, 3) IMAGE
    masks: torch.Tensor  # (frames, H, W) difference masks; zeros without matching


def edit_clip(
    base: SVDHost,
    host: SVDHost,
    inversion: Inversion,
    edited: torch.Tensor | None,
    prev: tuple[torch.Tensor, torch.Tensor] | None,
    ids: TimeIds,
    g: torch.Generator,
    match: MatchConfig | None,
    cfg: tuple[float, float],
    mode: MemoryMode,
    skip_kv: EditKV | None = None,
    capture_kv: bool = False,
    decode_chunk: int = 8,
    callback: StepCallback | None = None,
    stage: Callable[[str], AbstractContextManager[object]] = lambda _: nullcontext(),
    compute_dtype: torch.dtype | None = None,
    lock: RegionLock | None = None,
    colour_reference: torch.Tensor | None = None,
) -> ClipEdit:
    """Condition on the edited frame (or ``prev``, see ``edit_conditioning``), denoise with matching, decode.

    ``base`` is the model that inverted the clip (it also encodes and decodes), ``host`` the one that
    denoises (with the clip's motion LoRA). ``stage(name)`` wraps each of the three parts (timing).
    ``compute_dtype`` (bf16 / fp16): the denoising's model calls under autocast (``precision``);
    conditioning and decoding stay fp32. ``lock``: see ``MatchedClip`` (the caller composites the frames).
    ``colour_reference``: the latent (C, h, w) of the frame this clip continues from, to hold its colours
    to (``anchor_colours``, inside the lock's mask when there is one).
    """
    with stage("condition"):
        cond = edit_conditioning(base, edited, ids, g, prev)
    clip = MatchedClip(host, inversion, cond, match, cfg, mode, base, skip_kv, lock=lock)
    with stage("denoise"), autocast_region(host.device, compute_dtype):
        result = clip.run(capture_kv=capture_kv, callback=callback)
    if colour_reference is not None:
        result.latents = anchor_colours(result.latents, colour_reference, lock.mask if lock else None)
        result.trajectory[-1] = result.latents
    height, width = (8 * n for n in inversion.latent_hw)
    if result.masks is not None:
        masks = result.frame_masks(height, width)
    else:
        masks = torch.zeros(inversion.frames, height, width)
    with stage("decode"):
        frames = base.vae_decode(result.latents / LATENT_SCALE, decode_chunk)
    return ClipEdit(clip, result, frames, masks)


def reconstruct(host: SVDHost, inversion: Inversion, callback: Callable | None = None) -> torch.Tensor:
    """Denoise an inversion's x_T back under its own source conditioning, without CFG or matching.

    A good inversion gives back the source clip: compare the decoded result with the source frames.
    """
    return matched_denoise(host, inversion, inversion.cond, None, None, callback=callback).latents


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1] (inf when equal)."""
    if a.shape != b.shape:
        raise I2VEditError(f"cannot compare frames of shape {tuple(a.shape)} and {tuple(b.shape)}.")
    mse = float(torch.mean((a.float().clamp(0, 1) - b.float().clamp(0, 1)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def cond_tensors(prefix: str, cond: SVDCond) -> dict[str, torch.Tensor]:
    ids = torch.tensor(cond.time_ids.as_list(), dtype=torch.float64)  # read back as the same Python floats
    return {f"{prefix}.clip": cond.clip_embed, f"{prefix}.latent": cond.concat_latent, f"{prefix}.ids": ids}


def cond_from(prefix: str, t: dict[str, torch.Tensor], kind: str = "cond") -> SVDCond:
    ids = t[f"{prefix}.ids"].tolist()
    return SVDCond(t[f"{prefix}.clip"], t[f"{prefix}.latent"], TimeIds(*ids), kind)


def save_inversion(path: str | Path, inversion: Inversion, extra: dict[str, str] | None = None) -> Path:
    """Write an inversion's trajectory and conditioning as safetensors (captures are not saved)."""
    meta = {
        "format": INVERSION_FORMAT,
        "fingerprint": inversion.fingerprint,
        "skip_interval": "1" if inversion.skip_kv is not None else "0",
        **(extra or {}),
    }
    tensors = {
        "latents": inversion.trajectory,
        "sigmas": inversion.sigmas,
        **cond_tensors("cond", inversion.cond),
    }
    return save_safetensors_atomic(path, tensors, meta)


def load_inversion(path: str | Path) -> tuple[Inversion, dict[str, str]]:
    """Read an inversion written by ``save_inversion`` (safetensors only), with its metadata.

    An inversion of a clip after the first was made with the first clip's K/V: set its
    ``skip_kv`` again before denoising (metadata ``skip_interval`` says so).
    """
    p = Path(path)
    try:
        t, meta = read_tensors(p)
    except I2VEditError as e:
        raise I2VEditError(f"cannot read the inversion {p} ({e}); save it again.") from e
    if meta.get("format") != INVERSION_FORMAT:
        raise I2VEditError(f"{p} is not an I2VEdit inversion file (format {meta.get('format')!r}).")
    try:
        inv = Inversion(t["latents"].float(), t["sigmas"].double(), cond_from("cond", t), meta["fingerprint"])
    except KeyError as e:
        raise I2VEditError(f"the inversion {p} lacks {e}; save it again.") from None
    return inv, meta
