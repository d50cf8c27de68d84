"""The host protocol: the few questions the method asks of a model library.

A host evaluates SVD's EDM denoiser D(x; σ, cond), runs k-diffusion-shaped sampler functions over
it, encodes the CLIP image embedding and VAE latents, and decodes latents in frame chunks.
Everything else (SARP, schedules, inversion, matching, chaining) is host-free.

Conventions shared by every host:
- images are ComfyUI IMAGE tensors (frames, H, W, 3) in [0, 1];
- sampling latents are (frames, 4, h, w) in the *scaled* space (raw VAE latent × 0.18215), one
  video per tensor, frames on the batch axis, as in ComfyUI's LATENT;
- VAE methods take and return *raw* (unscaled) latents, as both libraries' VAEs do;
- the conditioning latent (``SVDCond.concat_latent``) is raw, as SVD was trained.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch

from .errors import I2VEditError

LATENT_SCALE = 0.18215
COND, UNCOND = "cond", "uncond"

SamplerFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class TimeIds:
    """SVD's micro-conditioning, as the values its embedding sees.

    ``fps_id`` is diffusers' convention (frames per second minus one; ComfyUI's ``fps`` field is
    this plus one). The paper's code uses 8 for inversion, 6 for training and output_fps − 1 for
    denoising; SVD's default is 6.
    """

    fps_id: float = 6.0
    motion_bucket_id: float = 127.0
    noise_aug: float = 0.02

    def as_list(self) -> list[float]:
        return [float(self.fps_id), float(self.motion_bucket_id), float(self.noise_aug)]


@dataclass(frozen=True)
class SVDCond:
    """Conditioning of one CFG branch.

    ``clip_embed`` is (1, 1, D), the CLIP image embedding used as a one-token context;
    ``concat_latent`` is (1 or F, 4, h, w) raw VAE latents concatenated to the input channels of
    every frame (one latent is repeated over all frames).
    """

    clip_embed: torch.Tensor
    concat_latent: torch.Tensor
    time_ids: TimeIds = TimeIds()
    kind: str = COND

    def unconditional(self) -> SVDCond:
        """The branch SVD's CFG uses as negative: zero embedding and zero latent, same ids."""
        return replace(
            self,
            clip_embed=torch.zeros_like(self.clip_embed),
            concat_latent=torch.zeros_like(self.concat_latent),
            kind=UNCOND,
        )

    def check(self, x: torch.Tensor) -> None:
        """Raise a clear error if this conditioning cannot go with latents ``x``."""
        if self.clip_embed.ndim != 3 or self.clip_embed.shape[:2] != (1, 1):
            raise I2VEditError(
                f"clip_embed must be (1, 1, D), got {tuple(self.clip_embed.shape)}; encode one image."
            )
        lat = self.concat_latent
        if lat.ndim != 4 or lat.shape[1] != x.shape[1] or lat.shape[2:] != x.shape[2:]:
            raise I2VEditError(
                f"conditioning latent {tuple(lat.shape)} does not fit the video latents "
                f"{tuple(x.shape)}; encode the first frame at the video's resolution."
            )
        if lat.shape[0] not in (1, x.shape[0]):
            raise I2VEditError(
                f"conditioning latent has {lat.shape[0]} frames but the video has {x.shape[0]}; "
                "give one latent (repeated over frames) or one per frame."
            )


def cfg_ramp(frames: int, min_scale: float = 1.0, max_scale: float = 2.0) -> torch.Tensor:
    """Per-frame CFG scale rising linearly from the first to the last frame (the paper's 1 → 2)."""
    return torch.linspace(min_scale, max_scale, frames, dtype=torch.float32)


@runtime_checkable
class SVDHost(Protocol):
    """What the method needs from a model library (see the module docstring for conventions)."""

    name: str

    @property
    def device(self) -> torch.device: ...

    def denoise(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        conds: Sequence[SVDCond],
        transformer_options: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """D(x; σ, c) for each conditioning in one batched call: (len(conds), F, 4, h, w), float32."""
        ...

    def sample(
        self,
        sampler: SamplerFn,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        cond: SVDCond,
        uncond: SVDCond | None = None,
        cfg: torch.Tensor | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        disable: bool | None = None,
        transformer_options: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Run a k-diffusion-shaped ``sampler`` from ``x`` over ``sigmas`` with per-frame CFG ``cfg``.

        Without ``uncond`` (or with ``cfg`` None) the model is called once per step on ``cond``
        alone, as inversion does. Returns latents in the scaled space, float32.
        """
        ...

    def encode_clip(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings (N, 1, D) of IMAGE tensors."""
        ...

    def vae_encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Raw VAE latents (N, 4, H/8, W/8): the posterior mode, or a seeded sample."""
        ...

    def vae_decode(self, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """IMAGE frames from raw latents, decoding ``chunk`` frames at a time (temporal decoder)."""
        ...

    def fingerprint(self) -> str:
        """Identifies the base SVD weights (``weights_fingerprint``); equal across hosts for equal weights."""
        ...


def check_cfg(cfg: torch.Tensor, frames: int) -> None:
    """Raise a clear error unless ``cfg`` holds one scale per frame."""
    if cfg.ndim != 1 or cfg.shape[0] != frames:
        raise I2VEditError(f"got {tuple(cfg.shape)} CFG scales for {frames} frames; give one per frame.")


def combine_cfg(uncond: torch.Tensor, cond: torch.Tensor, cfg: torch.Tensor) -> torch.Tensor:
    """uncond + w_f·(cond − uncond) with one scale per frame (frames on dim 0)."""
    w = cfg.to(cond.device, cond.dtype).reshape(-1, *([1] * (cond.ndim - 1)))
    return uncond + w * (cond - uncond)


class CFGDenoiser:
    """A k-diffusion model (x, σ, **extra) → x0 over a host, with SVD's per-frame CFG."""

    def __init__(
        self,
        host: SVDHost,
        cond: SVDCond,
        uncond: SVDCond | None = None,
        cfg: torch.Tensor | None = None,
    ) -> None:
        self.host, self.cond, self.uncond, self.cfg = host, cond, uncond, cfg

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, model_options: dict | None = None, **_: Any):
        opts = (model_options or {}).get("transformer_options")
        if self.uncond is None or self.cfg is None:
            return self.host.denoise(x, sigma, [self.cond], transformer_options=opts)[0]
        check_cfg(self.cfg, x.shape[0])
        out = self.host.denoise(x, sigma, [self.uncond, self.cond], transformer_options=opts)
        return combine_cfg(out[0], out[1], self.cfg)


def sigma_scalar(sigma: torch.Tensor | float) -> float:
    """The one σ of a call; k-diffusion passes σ·s_in, one copy per frame."""
    if isinstance(sigma, torch.Tensor):
        flat = sigma.reshape(-1)
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            raise I2VEditError("all frames of one video must share one sigma per model call.")
        return float(flat[0])
    return float(sigma)


FINGERPRINT_KEYS = ("conv_in.weight", "time_embedding.linear_1.weight", "conv_out.weight")
"""diffusers names of the UNet tensors a fingerprint reads: none of them is a motion-LoRA target."""


def weights_fingerprint(tensors: Sequence[torch.Tensor]) -> str:
    """A short id of a UNet from the ``FINGERPRINT_KEYS`` tensors: their shapes and rounded sums.

    Sums are rounded to 4 significant digits so an fp16 and an fp32 copy of one checkpoint agree.
    """
    parts = []
    for t in tensors:
        t64 = t.detach().to("cpu", torch.float64)
        parts.append(f"{'x'.join(map(str, t.shape))}:{float(t64.sum()):.4g}:{float(t64.abs().sum()):.4g}")
    return "svd-" + hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]
