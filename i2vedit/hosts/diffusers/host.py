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

from ...errors import I2VEditError
from ...host import COND, FINGERPRINT_KEYS, CFGDenoiser, SamplerFn, SVDCond, sigma_scalar, weights_fingerprint
from ...method import edm
from ...method.attention import sdpa_attention
from ...method.controller import CONTROLLER_KEY, AttnCall, chunk_kinds
from ...svd import POSITIONS
from . import tiny


class _CallOptions:
    """The ``transformer_options`` of the current UNet call, shared by the UNet's 32 processors."""

    def __init__(self) -> None:
        self.options: dict[str, Any] = {}


class ControlledSelfAttention:
    """A diffusers attention processor for one of the 32 self-attention layers.

    Without a controller in the call's ``transformer_options`` it computes exactly what diffusers'
    ``AttnProcessor2_0`` does; with one it hands q, k, v (after the projections) to it.
    """

    def __init__(self, box: _CallOptions, index: int, temporal: bool) -> None:
        self.box, self.index, self.temporal = box, index, temporal

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise I2VEditError("the I2VEdit processor serves self-attention without masks only.")
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        opts = self.box.options
        ctrl = opts.get(CONTROLLER_KEY)
        if ctrl is None:
            out = sdpa_attention(q, k, v, attn.heads)
        else:
            kinds = chunk_kinds(opts.get("cond_or_uncond"), q.shape[0])
            out = ctrl(q, k, v, AttnCall(self.index, self.temporal, attn.heads, kinds, sdpa_attention))
        out = attn.to_out[1](attn.to_out[0](out.to(q.dtype)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def install_attention_control(unet: UNetSpatioTemporalConditionModel) -> _CallOptions:
    """Give the UNet's 16 spatial and 16 temporal self-attention layers controllable processors (once).

    The processors compute what diffusers' default does unless a call's options hold a controller.
    The options box travels with the UNet (a deep copy gets its own), so hosts find it there.
    """
    box = getattr(unet, "_i2v_call_options", None)
    if box is None:
        box = _CallOptions()
        for pos in POSITIONS:
            for name, temporal in ((pos.diffusers_spatial, False), (pos.diffusers_temporal, True)):
                unet.get_submodule(name).set_processor(ControlledSelfAttention(box, pos.index, temporal))
        unet._i2v_call_options = box
    return box


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
        install_attention_control(self.unet)

    @property
    def transformer_options(self) -> dict[str, Any]:
        """What the attention processors read during a call: step, phase, controller, CFG chunk order."""
        return install_attention_control(self.unet).options

    def release_call_options(self) -> None:
        """Forget the last call's ``transformer_options`` (its attention controller and what it holds)."""
        install_attention_control(self.unet).options = {}

    def lora_trainer(self, rank: int = 32, target_set: str = "temporal", dropout: float = 0.1, **kw: Any):
        """A trainable LoRA'd private copy of this UNet (``lora_train.LoRATrainable``)."""
        from .lora import DiffusersLoRATrainer

        return DiffusersLoRATrainer(self, rank, target_set, dropout, **kw)

    def with_lora(self, weights, strength: float = 1.0) -> DiffusersSVDHost:
        """This host's model with a motion LoRA applied (this host is not changed)."""
        from .lora import diffusers_lora_host

        return diffusers_lora_host(self, weights, strength)

    def fingerprint(self) -> str:
        params = dict(self.unet.named_parameters())
        return weights_fingerprint([params[k] for k in FINGERPRINT_KEYS])

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
        return self.denoise_with_grad(x, sigma, conds, transformer_options)

    def denoise_with_grad(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        conds: Sequence[SVDCond],
        transformer_options: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """``denoise`` without switching gradients off, for training."""
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
        opts = dict(transformer_options or {})
        opts["cond_or_uncond"] = [0 if c.kind == COND else 1 for c in conds]
        opts["sigmas"] = torch.tensor([s])
        box = install_attention_control(self.unet)
        box.options = opts
        timestep = edm.c_noise(torch.tensor(s, dtype=torch.float32)).to(dev)
        try:
            v = self.unet(
                sample.to(self.dtype),
                timestep,
                encoder_hidden_states=context.to(self.dtype),
                added_time_ids=ids.to(self.dtype),
                return_dict=False,
            )[0]
        finally:
            # The controller holds the step's source capture and K/V: let them go after the call. With
            # gradients on, a checkpointed backward re-runs the attention and needs them; the trainer
            # clears them at its next step (``release_call_options``).
            if not torch.is_grad_enabled():
                box.options = {}
        return edm.denoised_from_v(x32.unsqueeze(0), v.float(), s).contiguous()

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
            # one memory layout whatever made the latent: the conv kernels (and so the bits) depend on it
            z = latents[start : start + chunk].to(self.device, vae_dtype).contiguous()
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


def sharpen_self_attention(host: DiffusersSVDHost, factor: float = 3.0) -> DiffusersSVDHost:
    """Scale the 32 self-attention layers' Q/K projections so a random-weight model's maps are peaked.

    Random initialisation gives nearly uniform attention, on which matching has nothing to do; the
    demo and benchmarks of random tiny models use this to make it work.
    """
    with torch.no_grad():
        for pos in POSITIONS:
            for name in (pos.diffusers_spatial, pos.diffusers_temporal):
                for proj in ("to_q", "to_k"):
                    host.unet.get_submodule(f"{name}.{proj}").weight.mul_(factor)
    return host


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
