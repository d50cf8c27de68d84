"""The diffusers host: SVD as UNetSpatioTemporalConditionModel + AutoencoderKLTemporalDecoder + CLIP.

It runs the command line and lets CI exercise the whole method on a real model library.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from .. import edm
from ..errors import I2VEditError
from . import tiny
from .base import COND, CFGDenoiser, SamplerFn, SVDCond, sigma_scalar


class DiffusersSVDHost:
    """SVD through diffusers modules; see ``i2vedit.hosts.base`` for the protocol's conventions."""

    name = "diffusers"

    def __init__(
        self,
        unet: UNetSpatioTemporalConditionModel,
        vae: AutoencoderKLTemporalDecoder,
        image_encoder: CLIPVisionModelWithProjection,
        dtype: torch.dtype = torch.float32,
        clip_mean: Sequence[float] = tiny.CLIP_MEAN,
        clip_std: Sequence[float] = tiny.CLIP_STD,
    ) -> None:
        if not isinstance(unet, UNetSpatioTemporalConditionModel):
            raise I2VEditError(
                f"the diffusers host needs a UNetSpatioTemporalConditionModel (SVD), got {type(unet).__name__}."
            )
        self.unet, self.vae, self.image_encoder = unet.eval(), vae.eval(), image_encoder.eval()
        self.dtype = dtype
        self.clip_mean = torch.tensor(clip_mean).view(1, 3, 1, 1)
        self.clip_std = torch.tensor(clip_std).view(1, 3, 1, 1)
        # What the attention processors read: the step, phase and CFG chunk order of the call.
        self.transformer_options: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def denoise(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        conds: Sequence[SVDCond],
        transformer_options: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        if x.ndim != 4:
            raise I2VEditError(f"latents must be (frames, 4, h, w), got {tuple(x.shape)}.")
        for c in conds:
            c.check(x)
        s = sigma_scalar(sigma)
        dev, frames = self.device, x.shape[0]
        x32 = x.to(dev, torch.float32)
        scaled = x32 * edm.c_in(s)
        sample = torch.stack(
            [
                torch.cat([scaled, c.concat_latent.to(dev, torch.float32).expand(frames, -1, -1, -1)], 1)
                for c in conds
            ]
        )
        context = torch.cat([c.clip_embed.to(dev) for c in conds])
        ids = torch.tensor([c.time_ids.as_list() for c in conds], device=dev)
        self.transformer_options = dict(transformer_options or {})
        self.transformer_options["cond_or_uncond"] = [0 if c.kind == COND else 1 for c in conds]
        self.transformer_options["sigmas"] = torch.tensor([s])
        timestep = edm.c_noise(torch.tensor(s, dtype=torch.float32)).to(dev)
        v = self.unet(
            sample.to(self.dtype),
            timestep,
            encoder_hidden_states=context.to(self.dtype),
            added_time_ids=ids.to(self.dtype),
            return_dict=False,
        )[0]
        return edm.denoised_from_v(x32.unsqueeze(0), v.float(), s)

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
        model = CFGDenoiser(self, cond, uncond, cfg)
        extra_args = {"model_options": {"transformer_options": dict(transformer_options or {})}}
        extra_args["model_options"]["transformer_options"]["sample_sigmas"] = sigmas
        out = sampler(
            model, x.to(self.device, torch.float32), sigmas.to(self.device), extra_args, callback, disable
        )
        return out.float()

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise I2VEditError(f"expected IMAGE frames (N, H, W, 3), got {tuple(images.shape)}.")
        return images.to(self.device, torch.float32).permute(0, 3, 1, 2)

    @torch.no_grad()
    def encode_clip(self, images: torch.Tensor) -> torch.Tensor:
        px = self._pixels(images)
        size = self.image_encoder.config.image_size
        px = F.interpolate(px, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(
            0, 1
        )
        px = (px - self.clip_mean.to(px.device)) / self.clip_std.to(px.device)
        enc_dtype = next(self.image_encoder.parameters()).dtype
        embeds = self.image_encoder(pixel_values=px.to(enc_dtype)).image_embeds
        return embeds.float().unsqueeze(1)

    @torch.no_grad()
    def vae_encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        px = self._pixels(images) * 2.0 - 1.0
        dist = self.vae.encode(px.to(next(self.vae.parameters()).dtype)).latent_dist
        return (dist.sample(generator=generator) if sample else dist.mode()).float()

    @torch.no_grad()
    def vae_decode(self, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        if chunk < 1:
            raise I2VEditError(f"decode chunk must be at least 1 frame, got {chunk}.")
        vae_dtype = next(self.vae.parameters()).dtype
        frames = []
        for start in range(0, latents.shape[0], chunk):
            z = latents[start : start + chunk].to(self.device, vae_dtype)
            frames.append(self.vae.decode(z, num_frames=z.shape[0]).sample.float())
        out = torch.cat(frames)
        return ((out + 1.0) * 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def tiny_unet_config() -> dict[str, Any]:
    return {
        "sample_size": 8,
        "block_out_channels": tiny.block_channels(),
        "num_attention_heads": tiny.heads(),
        "cross_attention_dim": tiny.CONTEXT_DIM,
        "layers_per_block": 2,
        "num_frames": 25,
    }


def build_tiny_diffusers_host(seed: int = 0, dtype: torch.dtype = torch.float32) -> DiffusersSVDHost:
    """A tiny random-weight SVD of the real diffusers architectures, the same for the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNetSpatioTemporalConditionModel(**tiny_unet_config())
        vae = AutoencoderKLTemporalDecoder(
            block_out_channels=tiny.VAE_CHANNELS,
            down_block_types=("DownEncoderBlock2D",) * len(tiny.VAE_CHANNELS),
            layers_per_block=1,
            latent_channels=4,
        )
        clip = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=tiny.CLIP_HIDDEN,
                intermediate_size=2 * tiny.CLIP_HIDDEN,
                num_hidden_layers=tiny.CLIP_LAYERS,
                num_attention_heads=tiny.CLIP_HEADS,
                image_size=tiny.CLIP_IMAGE_SIZE,
                patch_size=tiny.CLIP_PATCH,
                projection_dim=tiny.CONTEXT_DIM,
            )
        )
    if dtype != torch.float32:
        unet = unet.to(dtype)
    return DiffusersSVDHost(unet, vae, clip, dtype=dtype)
