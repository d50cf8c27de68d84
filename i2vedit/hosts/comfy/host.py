"""The ComfyUI host: the user's SVD MODEL (a ModelPatcher), CLIP_VISION and VAE.

Sampling goes through ComfyUI's own ``CFGGuider`` → ``Sampler`` path, so the model is loaded and
patched the way ComfyUI does it, every ``transformer_options`` patch and wrapper on the MODEL
applies, and ``cond_or_uncond`` is ComfyUI's. Import this module only inside ComfyUI (or with a
ComfyUI checkout on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import comfy.clip_vision
import comfy.ldm.modules.attention
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.samplers
import comfy.sd
import comfy.supported_models
import torch

from ...errors import I2VEditError, NotSVDModelError
from ...host import (
    COND,
    FINGERPRINT_KEYS,
    SamplerFn,
    SVDCond,
    check_cfg,
    combine_cfg,
    sigma_scalar,
    weights_fingerprint,
)
from ...method.controller import CONTROLLER_KEY, TEMPORAL_KEY, AttnCall, chunk_kinds
from ...svd import POSITIONS, AttentionPosition, diffusers_to_comfy_key
from ..diffusers import tiny


def check_svd_model(model: Any) -> comfy.model_patcher.ModelPatcher:
    """Raise a clear error unless ``model`` is a ComfyUI MODEL holding Stable Video Diffusion img2vid."""
    inner = getattr(model, "model", None)
    if not isinstance(model, comfy.model_patcher.ModelPatcher) or inner is None:
        raise NotSVDModelError(
            f"expected a ComfyUI MODEL, got {type(model).__name__}; load SVD with ImageOnlyCheckpointLoader."
        )
    is_sv3d = isinstance(inner, (comfy.model_base.SV3D_u, comfy.model_base.SV3D_p))
    if not isinstance(inner, comfy.model_base.SVD_img2vid) or is_sv3d:
        raise NotSVDModelError(
            f"this MODEL is {type(inner).__name__}, not Stable Video Diffusion img2vid; load "
            "svd.safetensors or svd_xt.safetensors with ImageOnlyCheckpointLoader (Image Only Checkpoint Loader)."
        )
    return model


def to_conditioning(cond: SVDCond) -> list[list[Any]]:
    """An ``SVDCond`` as ComfyUI CONDITIONING (ComfyUI's ``fps`` is the embedding's id plus one)."""
    ids = cond.time_ids
    return [
        [
            cond.clip_embed,
            {
                "concat_latent_image": cond.concat_latent,
                "fps": ids.fps_id + 1,
                "motion_bucket_id": ids.motion_bucket_id,
                "augmentation_level": ids.noise_aug,
            },
        ]
    ]


class _DirectSampler(comfy.samplers.Sampler):
    """Runs a k-diffusion sampler function from a given start latent, unlike KSAMPLER's noise scaling."""

    def __init__(
        self, fn: SamplerFn, x: torch.Tensor, callback: Callable | None, disable: bool | None
    ) -> None:
        self.fn, self.x, self.callback, self.disable = fn, x, callback, disable

    def sample(
        self,
        model_wrap,
        sigmas,
        extra_args,
        callback,
        noise,
        latent_image=None,
        denoise_mask=None,
        disable_pbar=False,
    ):
        extra_args["denoise_mask"] = denoise_mask
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image, model_k.noise = latent_image, noise
        x = self.x.to(noise.device, noise.dtype)
        disable = disable_pbar if self.disable is None else self.disable
        return self.fn(model_k, x, sigmas, extra_args=extra_args, callback=self.callback, disable=disable)


def _attn1_replace(pos: AttentionPosition) -> Callable:
    """The attn1 replace patch of one transformer position: hands the call to the step's controller."""

    def patch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        heads = extra["n_heads"]

        def attend(q_, k_, v_, h_):
            fn = comfy.ldm.modules.attention.optimized_attention  # read at call time: users may swap it
            return fn(q_, k_, v_, h_, attn_precision=extra.get("attn_precision"), transformer_options=extra)

        ctrl = extra.get(CONTROLLER_KEY)
        if ctrl is None:
            return attend(q, k, v, heads)
        kinds = chunk_kinds(extra.get("cond_or_uncond"), q.shape[0])
        return ctrl(q, k, v, AttnCall(pos.index, bool(extra.get(TEMPORAL_KEY)), heads, kinds, attend))

    return patch


def _tag_temporal(forward: Callable) -> Callable:
    """Wraps a temporal block's ``forward`` so the patches it fires know they are temporal."""

    def tagged(x, context=None, transformer_options={}, **kw):  # noqa: B006  (ComfyUI's own signature)
        opts = dict(transformer_options)
        opts[TEMPORAL_KEY] = True
        return forward(x, context=context, transformer_options=opts, **kw)

    return tagged


def with_attention_control(model: comfy.model_patcher.ModelPatcher) -> comfy.model_patcher.ModelPatcher:
    """A clone of an SVD MODEL whose 32 self-attention layers consult ``transformer_options``' controller.

    Spatial and temporal blocks fire the same attn1 replace patch (one per transformer position);
    temporal calls are told apart by an object patch on each ``time_stack.0.forward``, never by
    shapes. Without a controller the patches compute ComfyUI's own attention. ``model`` is untouched.
    """
    m = model.clone()
    for pos in POSITIONS:
        m.set_model_attn1_replace(_attn1_replace(pos), *pos.comfy_patch_key)
        name = f"diffusion_model.{pos.comfy_prefix}.time_stack.0.forward"
        m.add_object_patch(name, _tag_temporal(m.get_model_object(name)))
    return m


class ComfySVDHost:
    """SVD through ComfyUI's ModelPatcher; see ``i2vedit.hosts.base`` for the protocol's conventions."""

    name = "comfyui"

    def __init__(self, model: Any, clip_vision: Any = None, vae: Any = None) -> None:
        self.patcher = check_svd_model(model)
        self.clip_vision, self.vae = clip_vision, vae
        self._controlled: comfy.model_patcher.ModelPatcher | None = None

    @property
    def controlled_patcher(self) -> comfy.model_patcher.ModelPatcher:
        """The MODEL clone with attention control, made once (the user's MODEL is never patched)."""
        if self._controlled is None:
            self._controlled = with_attention_control(self.patcher)
        return self._controlled

    def lora_trainer(self, rank: int = 32, target_set: str = "temporal", dropout: float = 0.1, **kw: Any):
        """A trainable LoRA'd clone of this MODEL (``lora_train.LoRATrainable``)."""
        from .lora import ComfyLoRATrainer

        return ComfyLoRATrainer(self, rank, target_set, dropout, **kw)

    def with_lora(self, weights, strength: float = 1.0) -> ComfySVDHost:
        """This host's MODEL with a motion LoRA applied through ComfyUI's stock loader (a clone)."""
        from .lora import comfy_lora_host

        return comfy_lora_host(self, weights, strength)

    def fingerprint(self) -> str:
        unet = self.patcher.model.diffusion_model
        params = dict(unet.named_parameters())
        return weights_fingerprint([params[diffusers_to_comfy_key(k)] for k in FINGERPRINT_KEYS])

    @property
    def device(self) -> torch.device:
        return self.patcher.load_device

    def _guider(
        self, conds: dict[str, SVDCond], model_options: dict | None = None, controlled: bool = False
    ) -> comfy.samplers.CFGGuider:
        patcher = self.controlled_patcher if controlled else self.patcher
        guider = comfy.samplers.CFGGuider(patcher)
        guider.model_options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
        if model_options:
            guider.model_options.update(model_options)
        guider.inner_set_conds({k: to_conditioning(c) for k, c in conds.items()})
        return guider

    def _run(
        self, guider, fn: SamplerFn, x: torch.Tensor, sigmas: torch.Tensor, callback, disable, opts
    ) -> torch.Tensor:
        if opts:
            guider.model_options.setdefault("transformer_options", {}).update(opts)
        zeros = torch.zeros_like(x, dtype=torch.float32, device="cpu")
        sampler = _DirectSampler(fn, x.float(), callback, disable)
        out = guider.sample(zeros, zeros, sampler, sigmas.float(), disable_pbar=bool(disable))
        return self.patcher.model.process_latent_in(out).float().cpu()

    @torch.no_grad()
    def denoise(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        conds: Sequence[SVDCond],
        transformer_options: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        for c in conds:
            c.check(x)
        s = sigma_scalar(sigma)
        order = sorted(range(len(conds)), key=lambda i: conds[i].kind != COND)  # ComfyUI's chunk 0 is cond
        keys = [f"c{i}" for i in order]
        controlled = CONTROLLER_KEY in (transformer_options or {})
        guider = self._guider({f"c{i}": conds[i] for i in order}, controlled=controlled)
        results: list[torch.Tensor] = []

        def one_call(model_k, x_in, sigmas, extra_args=None, callback=None, disable=None):
            g = model_k.inner_model
            s_in = x_in.new_full([x_in.shape[0]], s)
            outs = comfy.samplers.calc_cond_batch(
                g.inner_model, [g.conds[k] for k in keys], x_in, s_in, extra_args["model_options"]
            )
            results.extend(o.float().cpu() for o in outs)
            return x_in

        self._run(guider, one_call, x, torch.tensor([s, 0.0]), None, True, transformer_options)
        by_index = dict(zip(order, results))
        return torch.stack([by_index[i] for i in range(len(conds))])

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
        cond.check(x)
        controlled = CONTROLLER_KEY in (transformer_options or {})
        if uncond is None or cfg is None:
            guider = self._guider({"positive": cond}, controlled=controlled)
            guider.set_cfg(1.0)
        else:
            check_cfg(cfg, x.shape[0])
            scales = cfg.float()

            def per_frame_cfg(args: dict[str, torch.Tensor]) -> torch.Tensor:
                return combine_cfg(args["uncond"], args["cond"], scales)

            guider = self._guider(
                {"positive": cond, "negative": uncond}, {"sampler_cfg_function": per_frame_cfg}, controlled
            )
            guider.set_cfg(float(scales.max()))
        return self._run(guider, sampler, x, sigmas, callback, disable, transformer_options)

    def _need(self, what: str, obj: Any) -> Any:
        if obj is None:
            raise I2VEditError(
                f"this step needs the {what}; connect the {what} output of ImageOnlyCheckpointLoader."
            )
        return obj

    @torch.no_grad()
    def encode_clip(self, images: torch.Tensor) -> torch.Tensor:
        clip = self._need("CLIP_VISION", self.clip_vision)
        return clip.encode_image(images[..., :3]).image_embeds.float().unsqueeze(1).cpu()

    @torch.no_grad()
    def vae_encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        vae = self._need("VAE", self.vae)
        if not sample:
            return vae.encode(images[..., :3]).float().cpu()
        # ComfyUI's VAE returns the posterior mode; a seeded sample needs the moments themselves.
        comfy.model_management.load_models_gpu([vae.patcher])
        engine = vae.first_stage_model
        px = vae.process_input(images[..., :3].movedim(-1, 1)).to(vae.device, vae.vae_dtype)
        moments = engine.encoder(px)
        if getattr(engine, "quant_conv", None) is not None:
            moments = engine.quant_conv(moments)
        mean, logvar = moments.float().cpu().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return mean + std * torch.randn(mean.shape, generator=generator)

    @torch.no_grad()
    def vae_decode(self, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        vae = self._need("VAE", self.vae)
        if chunk < 1:
            raise I2VEditError(f"decode chunk must be at least 1 frame, got {chunk}.")
        parts = [vae.decode(latents[i : i + chunk]).float().cpu() for i in range(0, latents.shape[0], chunk)]
        return torch.cat(parts).clamp(0, 1)


# ---- tiny random-weight models of the real ComfyUI architectures ---------------------------------


def unet_config(model_channels: int = 320, context_dim: int = 1024) -> dict[str, Any]:
    """The SVD UNet config ComfyUI detects from an SVD checkpoint, at a chosen width."""
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "use_spatial_transformer": True,
        "legacy": False,
        "num_classes": "sequential",
        "adm_in_channels": 768,
        "in_channels": 8,
        "out_channels": 4,
        "model_channels": model_channels,
        "num_res_blocks": [2, 2, 2, 2],
        "channel_mult": list(tiny.CHANNEL_MULT),
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": True,
        "context_dim": context_dim,
        "extra_ff_mix_layer": True,
        "use_spatial_context": True,
        "merge_strategy": "learned_with_images",
        "merge_factor": 0.0,
        "video_kernel_size": [3, 1, 1],
        "use_temporal_resblock": True,
        "use_temporal_attention": True,
        "disable_temporal_crossattention": False,
    }


def build_svd_patcher(
    model_channels: int = 320,
    context_dim: int = 1024,
    head_dim: int = 64,
    device: str | torch.device | None = None,
) -> comfy.model_patcher.ModelPatcher:
    """An SVD MODEL of ComfyUI's own classes with uninitialised weights (``device="meta"`` for structure)."""
    mc = comfy.supported_models.SVD_img2vid(unet_config(model_channels, context_dim))
    mc.unet_config["num_head_channels"] = head_dim
    mc.set_inference_dtype(torch.float32, None)
    load = comfy.model_management.get_torch_device()
    model = mc.get_model({}, device=device if device is not None else load)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=load, offload_device=comfy.model_management.unet_offload_device()
    )


def _init_like(sd: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith("bias") or "mix_factor" in k:
            out[k] = torch.zeros(v.shape)
        elif v.ndim == 1:
            out[k] = torch.ones(v.shape)
        else:
            out[k] = torch.randn(v.shape, generator=generator) * 0.02
    return out


def build_svd_vae(seed: int = 0) -> comfy.sd.VAE:
    """ComfyUI's SVD VAE (temporal decoder; ComfyUI fixes its width) with seeded random weights."""
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    enc = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
           "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}  # fmt: skip
    dec = dict(enc, video_kernel_size=[3, 1, 1], alpha=0.0)
    with torch.device("meta"):
        engine = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": enc},
            decoder_config={"target": "comfy.ldm.modules.temporal_ae.VideoDecoder", "params": dec},
        )
    sd = _init_like(engine.state_dict(), torch.Generator().manual_seed(seed))
    return comfy.sd.VAE(sd=sd)


def build_tiny_comfy_host(seed: int = 0, with_vae: bool = False) -> ComfySVDHost:
    """The tiny SVD in ComfyUI's classes, with exactly the weights of ``build_tiny_diffusers_host(seed)``.

    The UNet weights go through the key map and the CLIP weights load by their transformers names,
    so both hosts hold identical models. ComfyUI fixes the SVD VAE's width, so its VAE (optional)
    is full-width with its own seeded random weights.
    """
    from ...svd import diffusers_to_comfy
    from ..diffusers.host import build_tiny_diffusers_host

    ref = build_tiny_diffusers_host(seed)
    patcher = build_svd_patcher(tiny.MODEL_CHANNELS, tiny.CONTEXT_DIM, tiny.HEAD_DIM)
    missing, unexpected = patcher.model.diffusion_model.load_state_dict(
        diffusers_to_comfy(ref.unet.state_dict()), strict=False
    )
    if missing or unexpected:
        raise RuntimeError(
            f"tiny UNet weights did not map: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    clip_cfg = ref.image_encoder.config
    cfg = {
        "hidden_act": clip_cfg.hidden_act, "hidden_size": clip_cfg.hidden_size, "image_size": clip_cfg.image_size,
        "intermediate_size": clip_cfg.intermediate_size, "layer_norm_eps": clip_cfg.layer_norm_eps,
        "model_type": "clip_vision_model", "num_attention_heads": clip_cfg.num_attention_heads,
        "num_channels": 3, "num_hidden_layers": clip_cfg.num_hidden_layers, "patch_size": clip_cfg.patch_size,
        "projection_dim": clip_cfg.projection_dim,
    }  # fmt: skip
    fd, path = tempfile.mkstemp(suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(cfg, f)
        clip = comfy.clip_vision.ClipVisionModel(path)
    finally:
        os.unlink(path)
    missing, unexpected = clip.load_sd(ref.image_encoder.state_dict())
    if missing:
        raise RuntimeError(f"tiny CLIP weights did not map: missing {missing[:3]}")
    return ComfySVDHost(patcher, clip, build_svd_vae(seed) if with_vae else None)
