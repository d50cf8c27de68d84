"""The diffusers host: SVD as UNetSpatioTemporalConditionModel + AutoencoderKLTemporalDecoder + CLIP.

It runs the command line and lets CI exercise the whole method on a real model library.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLTemporalDecoder, ModelMixin, UNetSpatioTemporalConditionModel
from diffusers.hooks import apply_layerwise_casting
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch.utils.hooks import RemovableHandle
from transformers import CLIPVisionModelWithProjection

from ...errors import I2VEditError
from ...host import FINGERPRINT_KEYS, CFGDenoiser, SamplerFn, sigma_scalar, weights_fingerprint
from ...lora.branch import LoRABranch
from ...lora.file import LoRAWeights, fitting_target_set
from ...lora.targets import target_shapes, to_comfy_name
from ...method import edm
from ...svd import COND, SVDCond
from .lora import DiffusersLoRATrainer
from .processors import branch_hook, install_attention_control

LOW_MEMORY_ENCODE_CHUNK = 4  # frames per VAE encoder call in low-memory mode (≈1 GB each at 576×1024, fp16)

# OpenAI CLIP's pixel normalisation, which SVD's image encoder was trained with
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

M = TypeVar("M", bound=torch.nn.Module)


def store_weights(module: M, dtype: torch.dtype) -> M:
    """``module`` with its weights stored in ``dtype`` (fp16 / bf16: half the bytes of fp32) and computed in
    fp32: diffusers' layerwise casting gives each Linear, Conv and Embedding layer fp32 weights for its own
    forward and stores them back after it, so a call computes in fp32 on weights rounded to ``dtype``.
    Norm layers, layers named like ``norm`` / ``pos_embed`` / ``patch_embed`` and loose parameters (SVD's
    blend factors, CLIP's class embedding) keep fp32. fp32: ``module`` unchanged. Apply once, to fp32
    weights, before moving the module to the GPU (the fp32 copy then never reaches it)."""
    if dtype == torch.float32:
        return module
    if isinstance(module, ModelMixin):  # the UNet and VAE, with their classes' skip patterns (none for SVD)
        module.enable_layerwise_casting(storage_dtype=dtype, compute_dtype=torch.float32)
    else:  # the transformers image encoder: diffusers' default skip patterns
        apply_layerwise_casting(module, dtype, torch.float32)
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.conv._ConvNd) and layer.weight.dtype == dtype:
            layer._conv_forward = functools.partial(_conv_on_view, layer._conv_forward)  # type: ignore[method-assign]
    return module


def with_stored_weights(host: DiffusersSVDHost, dtype: torch.dtype) -> DiffusersSVDHost:
    """A host of ``host``'s fp32 models with their weights stored in ``dtype`` (``store_weights``, in place);
    fp32: ``host`` itself."""
    if dtype == torch.float32:
        return host
    unet, vae, clip = (store_weights(m, dtype) for m in (host.unet, host.vae, host.image_encoder))
    return DiffusersSVDHost(unet, vae, clip, dtype=host.dtype, clip_mean=host.clip_mean.flatten().tolist(),
                            clip_std=host.clip_std.flatten().tolist(), weights_dtype=dtype)  # fmt: skip


def _conv_on_view(conv_forward: Callable[..., torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """A stored convolution's forward on a view of its weight. Layerwise casting swaps a layer's weight in
    place (``param.data``) to fp32 for the forward and back after it; a convolution's autograd node saves
    the parameter itself, so its backward (LoRA training) would find the stored dtype again ("expected
    scalar type Float but found Half"; a checkpointed block's recompute fails its metadata check). The
    node saves the view instead, which keeps the fp32 copy until the backward, as a Linear's transposed
    weight does."""
    return conv_forward(x, weight.view_as(weight), bias)


class DiffusersSVDHost:
    """SVD through diffusers modules; see ``i2vedit.host`` for the protocol's conventions."""

    name = "diffusers"
    lora_branch: LoRABranch | None = None  # the motion-LoRA branch on the UNet (``attach_branch``)
    lora_hooks: Sequence[RemovableHandle] = ()  # its forward hooks on the target linears
    rows_per_call: int | None = None  # conditionings per UNet call (None: all of a denoise in one call)
    offload_aux: bool = False  # VAE and image encoder kept on the CPU, on the device only while they run
    encode_chunk: int | None = None  # frames per VAE encoder call (None: all at once)

    def __init__(
        self,
        unet: UNetSpatioTemporalConditionModel,
        vae: AutoencoderKLTemporalDecoder,
        image_encoder: CLIPVisionModelWithProjection,
        dtype: torch.dtype = torch.float32,
        clip_mean: Sequence[float] = CLIP_MEAN,
        clip_std: Sequence[float] = CLIP_STD,
        weights_dtype: torch.dtype = torch.float32,
    ) -> None:
        """``dtype``: what the UNet takes and computes in; ``weights_dtype``: how the three models' weights
        were stored by ``store_weights`` (fp32: as built), recorded for the run's report and reuse folder."""
        if not isinstance(unet, UNetSpatioTemporalConditionModel):
            raise I2VEditError(
                f"the diffusers host needs a UNetSpatioTemporalConditionModel (SVD), got {type(unet).__name__}."
            )
        # an inference host: no weight of the three models takes gradients (only a LoRA branch trains)
        self.unet, self.vae, self.image_encoder = (
            m.eval().requires_grad_(False) for m in (unet, vae, image_encoder)
        )
        if weights_dtype != torch.float32 and dtype != torch.float32:
            raise I2VEditError(
                f"weights stored in {weights_dtype} compute in float32 (store_weights), not {dtype}."
            )
        self.dtype, self.weights_dtype = dtype, weights_dtype
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

    def training_host(self, trainer: DiffusersLoRATrainer) -> DiffusersSVDHost:
        """This host's model with ``trainer``'s LoRA as trained so far (live, no dropout)."""
        return DiffusersTrainingHost(self, trainer)

    def lora_trainer(
        self, rank: int = 32, target_set: str = "temporal", dropout: float = 0.1, **kw: Any
    ) -> DiffusersLoRATrainer:
        """A trainable motion LoRA in this host's LoRA branch on its UNet (``host.LoRATrainable``)."""
        return DiffusersLoRATrainer(self, rank, target_set, dropout, **kw)

    def with_lora(self, weights: LoRAWeights, strength: float = 1.0) -> DiffusersSVDHost:
        """This host's model with a motion LoRA applied (this host is not changed)."""
        return DiffusersLoRAHost(self, weights, strength)

    def fingerprint(self) -> str:
        params = dict(self.unet.named_parameters())
        return weights_fingerprint([params[k] for k in FINGERPRINT_KEYS])

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def low_memory(self, on: bool = True) -> None:
        """Trade a little speed for memory: one conditioning per UNet call (a CFG step's rows one after
        the other: same FLOPs, half the activations), the VAE encoder a few frames at a time, and the
        VAE and image encoder off the device while the UNet runs. Results are unchanged up to the
        kernels' batch-size rounding."""
        owner = self.owner()
        owner.rows_per_call, owner.offload_aux = (1, True) if on else (None, False)
        owner.encode_chunk = LOW_MEMORY_ENCODE_CHUNK if on else None
        if owner.device.type != "meta":  # shapes only (a plan): nothing to move
            for module in (owner.vae, owner.image_encoder):
                module.to("cpu" if on else owner.device)

    def owner(self) -> DiffusersSVDHost:
        """The host whose models these are and whose memory settings rule (a LoRA view: its base)."""
        return self

    @contextmanager
    def _resident(self, module: torch.nn.Module) -> Iterator[None]:
        """``module`` on the UNet's device while it runs (``offload_aux``: back to the CPU afterwards)."""
        if not self.owner().offload_aux or self.device.type == "meta":
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")

    @torch.no_grad()
    def denoise(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        conds: Sequence[SVDCond],
        transformer_options: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        self._switch_branch()
        n = self.owner().rows_per_call or len(conds)
        if len(conds) <= n:
            return self.run_unet(x, sigma, conds, transformer_options)
        parts = [
            self.run_unet(x, sigma, conds[i : i + n], transformer_options) for i in range(0, len(conds), n)
        ]
        return torch.cat(parts)

    def attach_branch(self, rank: int, target_set: str) -> LoRABranch:
        """This host's LoRA branch for ``rank`` / ``target_set``: forward hooks on its UNet's target linears,
        made on first use; a branch of another rank or target set is detached first (one per UNet)."""
        if self.lora_branch is not None and self.lora_branch.fits(rank, target_set):
            return self.lora_branch
        for handle in self.lora_hooks:
            handle.remove()
        self.lora_branch, self.lora_hooks = None, []
        shapes = target_shapes(self.unet, target_set, "diffusers")
        names = {n: to_comfy_name(n) for n in shapes}
        branch = LoRABranch({names[n]: s for n, s in shapes.items()}, rank, target_set, self.device)
        modules = dict(self.unet.named_modules())
        self.lora_hooks = [modules[n].register_forward_hook(branch_hook(branch, names[n])) for n in shapes]
        self.lora_branch = branch
        return branch

    def _switch_branch(self) -> None:
        """The base model's calls run without any motion LoRA."""
        if self.lora_branch is not None:
            self.lora_branch.on = False

    def run_unet(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        conds: Sequence[SVDCond],
        transformer_options: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """D(x; σ, c) for each conditioning, with the LoRA branch as it is switched now (gradients as they are)."""
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

    def _input_dtype(self, module: torch.nn.Module) -> torch.dtype:
        """The dtype ``module`` (the VAE or image encoder) computes in: fp32 for stored weights, else its weights'."""
        if self.weights_dtype != torch.float32:
            return torch.float32
        return next(module.parameters()).dtype

    @torch.no_grad()
    def encode_clip(self, images: torch.Tensor) -> torch.Tensor:
        px = self._pixels(images)
        size = self.image_encoder.config.image_size
        px = F.interpolate(px, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(
            0, 1
        )
        px = (px - self.clip_mean.to(px.device)) / self.clip_std.to(px.device)
        enc_dtype = self._input_dtype(self.image_encoder)
        with self._resident(self.image_encoder):
            embeds = self.image_encoder(pixel_values=px.to(enc_dtype)).image_embeds
        return embeds.float().unsqueeze(1)

    @torch.no_grad()
    def vae_encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        px = (self._pixels(images) * 2.0 - 1.0).to(self._input_dtype(self.vae))
        n = self.owner().encode_chunk or px.shape[0]
        with self._resident(self.vae):
            dists = [self.vae.encode(px[i : i + n]).latent_dist for i in range(0, px.shape[0], n)]
        # one distribution over every frame, so that a sample draws its noise as one tensor
        dist = (
            dists[0]
            if len(dists) == 1
            else DiagonalGaussianDistribution(torch.cat([d.parameters for d in dists]))
        )
        return (dist.sample(generator=generator) if sample else dist.mode()).float()

    @torch.no_grad()
    def vae_decode(self, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        if chunk < 1:
            raise I2VEditError(f"decode chunk must be at least 1 frame, got {chunk}.")
        vae_dtype = self._input_dtype(self.vae)
        frames = []
        with self._resident(self.vae):
            for start in range(0, latents.shape[0], chunk):
                # one memory layout whatever made the latent: the conv kernels (and so the bits) depend on it
                z = latents[start : start + chunk].to(self.device, vae_dtype).contiguous()
                frames.append(self.vae.decode(z, num_frames=z.shape[0]).sample.float())
        out = torch.cat(frames)
        return ((out + 1.0) * 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()


class _OnBase(DiffusersSVDHost):
    """A view of ``base``'s model with some LoRA switched on: ``base``'s UNet, VAE and image encoder."""

    def __init__(self, base: DiffusersSVDHost) -> None:
        self.base = base
        self.unet, self.vae, self.image_encoder = base.unet, base.vae, base.image_encoder
        self.dtype, self.weights_dtype = base.dtype, base.weights_dtype
        self.clip_mean, self.clip_std = base.clip_mean, base.clip_std

    def owner(self) -> DiffusersSVDHost:
        return self.base

    def lora_trainer(
        self, rank: int = 32, target_set: str = "temporal", dropout: float = 0.1, **kw: Any
    ) -> DiffusersLoRATrainer:
        return self.base.lora_trainer(rank, target_set, dropout, **kw)

    def with_lora(self, weights: LoRAWeights, strength: float = 1.0) -> DiffusersSVDHost:
        return self.base.with_lora(weights, strength)


class DiffusersLoRAHost(_OnBase):
    """``base``'s model with a motion LoRA: ``base``'s own UNet with the branch switched on.

    Before each model call it loads its LoRA into the branch, unless the branch holds it already.
    """

    def __init__(self, base: DiffusersSVDHost, weights: LoRAWeights, strength: float = 1.0) -> None:
        super().__init__(base)
        self.target_set = fitting_target_set(weights, base.unet, "diffusers")
        self.weights, self.strength, self.rank = weights, strength, weights.rank

    def _switch_branch(self) -> None:
        branch = self.base.attach_branch(self.rank, self.target_set)
        if branch.owner is not self:
            self.unet.train(False)  # a trainer may have left it in training mode
        branch.take(self, self.weights.modules, self.strength)


class DiffusersTrainingHost(_OnBase):
    """``base``'s model with the LoRA a trainer holds now, live (``DiffusersLoRATrainer.host``)."""

    def __init__(self, base: DiffusersSVDHost, trainer: DiffusersLoRATrainer) -> None:
        super().__init__(base)
        self.trainer = trainer

    def _switch_branch(self) -> None:
        branch = self.base.lora_branch
        if branch is None or branch.owner is not self.trainer:
            raise I2VEditError(
                "another LoRA of this model ran since this training; load the trained LoRA instead."
            )
        branch.dropout = 0.0
        branch.on = True
