"""The host protocol: the few questions the method asks of a model library, and what it builds on them.

A host evaluates SVD's EDM denoiser D(x; σ, cond), encodes the CLIP image embedding and VAE
latents, decodes latents in frame chunks, trains a motion LoRA on its UNet (``LoRATrainable``)
and attaches a trained one. Everything else (SARP, schedules,
inversion, matching, chaining, the training loop) is host-free.

Conventions shared by every host (the data types are in ``svd``):
- images are ComfyUI IMAGE tensors (frames, H, W, 3) in [0, 1];
- sampling latents are (frames, 4, h, w) in the *scaled* space (raw VAE latent × ``LATENT_SCALE``),
  one video per tensor, frames on the batch axis, as in ComfyUI's LATENT;
- VAE methods take and return *raw* (unscaled) latents, as both libraries' VAEs do;
- the conditioning latent (``SVDCond.concat_latent``) is raw, as SVD was trained.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from .errors import I2VEditError
from .svd import SVDCond

if TYPE_CHECKING:
    from .lora.file import LoRAPair, LoRAWeights

SamplerFn = Callable[..., torch.Tensor]


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

    def lora_trainer(
        self,
        rank: int = 32,
        target_set: str = "temporal",
        dropout: float = 0.1,
        *,
        gradient_checkpointing: bool = False,
        init_seed: int = 0,
        autocast_dtype: torch.dtype | None = None,
    ) -> LoRATrainable:
        """A trainable motion LoRA on this host's UNet, starting from the seeded initial LoRA; its model
        calls run under autocast in ``autocast_dtype`` when given (the LoRA stays fp32)."""
        ...

    def with_lora(self, weights: LoRAWeights, strength: float = 1.0) -> SVDHost:
        """This host's model with a trained motion LoRA attached (this host is not changed)."""
        ...


class LoRATrainable(Protocol):
    """What the host-free training loop (``lora.train``) needs from a host's trainable LoRA."""

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The LoRA tensors in a fixed order, named ``<comfy module>.lora_down`` / ``.lora_up``."""
        ...

    def train_denoise(
        self, x: torch.Tensor, sigma: float, cond: SVDCond, transformer_options: dict[str, Any]
    ) -> torch.Tensor:
        """D(x; σ, cond) with gradients into the LoRA, (frames, 4, h, w) float32."""
        ...

    def set_dropout(self, active: bool) -> None: ...

    def fingerprint(self) -> str:
        """The base model's ``SVDHost.fingerprint`` (the LoRA does not change it)."""
        ...

    def export(self) -> dict[str, LoRAPair]:
        """Detached CPU float32 copies of the LoRA by ComfyUI module name (alpha = rank: scale 1)."""
        ...

    def load(self, modules: dict[str, LoRAPair]) -> None:
        """Set the LoRA from ``modules`` (every trained module, shapes as trained)."""
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
    Weights on the ``meta`` device (a memory plan: shapes, no values) give an id of their shapes.
    """
    if any(t.is_meta for t in tensors):
        return "svd-meta-" + "|".join("x".join(map(str, t.shape)) for t in tensors)
    parts = []
    for t in tensors:
        t64 = t.detach().to("cpu", torch.float64)
        parts.append(f"{'x'.join(map(str, t.shape))}:{float(t64.sum()):.4g}:{float(t64.abs().sum()):.4g}")
    return "svd-" + hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]
