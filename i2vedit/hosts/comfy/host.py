"""The ComfyUI host: the user's SVD MODEL (a ModelPatcher), CLIP_VISION and VAE.

Sampling goes through ComfyUI's own ``CFGGuider`` → ``Sampler`` path, so the model is loaded and
patched the way ComfyUI does it, every ``transformer_options`` patch and wrapper on the MODEL
applies, and ``cond_or_uncond`` is ComfyUI's. The guider, its conditioning and the sampler of a
(MODEL clone, conditioning set) are made once and serve every call with them (``session``). Import
this module only inside ComfyUI (or with a ComfyUI checkout on ``sys.path``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import comfy.clip_vision
import comfy.ldm.modules.attention
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import torch

from ...errors import I2VEditError
from ...host import FINGERPRINT_KEYS, SamplerFn, check_cfg, combine_cfg, sigma_scalar, weights_fingerprint
from ...lora.branch import LoRABranch
from ...lora.file import LoRAWeights, fitting_target_set
from ...lora.targets import target_shapes
from ...method.controller import CONTROLLER_KEY
from ...svd import COND, SVDCond, diffusers_to_comfy_key
from .lora import ComfyLoRATrainer
from .patches import check_svd_model, with_attention_control, with_lora_branch
from .session import GuiderSession, GuiderSessions


class ComfySVDHost:
    """SVD through ComfyUI's ModelPatcher; see ``i2vedit.host`` for the protocol's conventions."""

    name = "comfyui"

    def __init__(
        self,
        model: Any,
        clip_vision: comfy.clip_vision.ClipVisionModel | None = None,
        vae: comfy.sd.VAE | None = None,
    ) -> None:
        self.patcher = check_svd_model(model)
        self.clip_vision, self.vae = clip_vision, vae
        self._controlled: comfy.model_patcher.ModelPatcher | None = None
        self.lora_branch: LoRABranch | None = None
        self.sessions = GuiderSessions()  # this host's and its LoRA hosts' model calls

    @property
    def controlled_patcher(self) -> comfy.model_patcher.ModelPatcher:
        """The MODEL clone with attention control and the LoRA branch, if any, made once per branch (the
        user's MODEL is never patched)."""
        if self._controlled is None:
            controlled = with_attention_control(self.patcher)
            if self.lora_branch is not None:
                controlled = with_lora_branch(controlled, self.lora_branch)
            self._controlled = controlled
        return self._controlled

    def attach_branch(self, rank: int, target_set: str) -> LoRABranch:
        """This host's LoRA branch for ``rank`` / ``target_set`` (one per host), made on first use.

        Its forward patches live on the controlled clone, which is made again for a new branch: the
        base model and every LoRA host of this host then run one MODEL clone, so ComfyUI never
        re-patches weights or switches models between their calls.
        """
        if self.lora_branch is not None and self.lora_branch.fits(rank, target_set):
            return self.lora_branch
        shapes = target_shapes(self.patcher.model.diffusion_model, target_set, "comfy")
        self.lora_branch = LoRABranch(shapes, rank, target_set, self.patcher.load_device)
        self._controlled = None
        self.sessions.clear()  # they may run the replaced clone
        return self.lora_branch

    def _switch_branch(self) -> None:
        """The base model's calls run without any motion LoRA."""
        if self.lora_branch is not None:
            self.lora_branch.on = False

    def _patcher(self, controlled: bool) -> comfy.model_patcher.ModelPatcher:
        return self.controlled_patcher if controlled else self.patcher

    def lora_trainer(self, rank: int = 32, target_set: str = "temporal", dropout: float = 0.1, **kw: Any):
        """A trainable motion LoRA: a branch on a clone of this MODEL (``host.LoRATrainable``)."""
        return ComfyLoRATrainer(self, rank, target_set, dropout, **kw)

    def training_host(self, trainer: ComfyLoRATrainer) -> ComfySVDHost:
        """This host's MODEL with ``trainer``'s LoRA as trained so far (live, no dropout)."""
        return ComfyTrainingHost(self, trainer)

    def with_lora(self, weights: LoRAWeights, strength: float = 1.0) -> ComfySVDHost:
        """This host's MODEL with a motion LoRA: the branch switched on for its calls (``ComfyLoRAHost``).

        ``comfy_lora_model`` gives the same model through ComfyUI's stock loader, as a MODEL for other nodes.
        """
        return ComfyLoRAHost(self, weights, strength)

    def fingerprint(self) -> str:
        unet = self.patcher.model.diffusion_model
        params = dict(unet.named_parameters())
        return weights_fingerprint([params[diffusers_to_comfy_key(k)] for k in FINGERPRINT_KEYS])

    @property
    def device(self) -> torch.device:
        return self.patcher.load_device

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
        controlled = CONTROLLER_KEY in (transformer_options or {})
        self._switch_branch()
        session = self.sessions.get(self._patcher(controlled), {f"c{i}": conds[i] for i in order})
        outs = session.model_call(x, s, transformer_options)
        by_index = dict(zip(order, (o.float().cpu() for o in outs)))
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
        """A whole sampling run: one session, its own (the per-frame CFG function holds ``cfg``)."""
        cond.check(x)
        controlled = CONTROLLER_KEY in (transformer_options or {})
        self._switch_branch()
        patcher = self._patcher(controlled)
        if uncond is None or cfg is None:
            session = GuiderSession(patcher, {"positive": cond})
        else:
            check_cfg(cfg, x.shape[0])
            scales = cfg.float()

            def per_frame_cfg(args: dict[str, torch.Tensor]) -> torch.Tensor:
                return combine_cfg(args["uncond"], args["cond"], scales)

            session = GuiderSession(
                patcher,
                {"positive": cond, "negative": uncond},
                {"sampler_cfg_function": per_frame_cfg},
                float(scales.max()),
            )
        return session.run(sampler, x, sigmas, callback, disable, transformer_options)

    def _need(self, what: str, obj: Any) -> Any:
        if obj is None:
            raise I2VEditError(
                f"this step needs the {what}; connect the {what} output of ImageOnlyCheckpointLoader."
            )
        return obj

    @torch.no_grad()
    def encode_clip(self, images: torch.Tensor) -> torch.Tensor:
        clip = self._need("CLIP_VISION", self.clip_vision)
        return clip.encode_image(images[..., :3].contiguous()).image_embeds.float().unsqueeze(1).cpu()

    @torch.no_grad()
    def vae_encode(
        self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        vae = self._need("VAE", self.vae)
        rgb = images[..., :3].contiguous()  # one memory layout, as in vae_decode
        if not sample:
            return vae.encode(rgb).float().cpu()
        # ComfyUI's VAE returns the posterior mode; a seeded sample needs the moments themselves.
        comfy.model_management.load_models_gpu([vae.patcher])
        engine = vae.first_stage_model
        px = vae.process_input(rgb.movedim(-1, 1)).to(vae.device, vae.vae_dtype)
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
        # one memory layout whatever made the latent: the conv kernels (and so the last bits) depend on it
        parts = [
            vae.decode(latents[i : i + chunk].contiguous()).float().cpu()
            for i in range(0, latents.shape[0], chunk)
        ]
        return torch.cat(parts).clamp(0, 1)


class _OnBase(ComfySVDHost):
    """A view of ``base``'s MODEL with some LoRA switched on: ``base``'s patcher, CLIP_VISION and VAE."""

    def __init__(self, base: ComfySVDHost) -> None:
        self.base = base
        self.patcher, self.clip_vision, self.vae = base.patcher, base.clip_vision, base.vae

    def lora_trainer(self, rank: int = 32, target_set: str = "temporal", dropout: float = 0.1, **kw: Any):
        return self.base.lora_trainer(rank, target_set, dropout, **kw)

    def training_host(self, trainer: ComfyLoRATrainer) -> ComfySVDHost:
        return self.base.training_host(trainer)

    def with_lora(self, weights: LoRAWeights, strength: float = 1.0) -> ComfySVDHost:
        return self.base.with_lora(weights, strength)


class ComfyLoRAHost(_OnBase):
    """``base``'s MODEL with a motion LoRA: ``base``'s controlled clone with its LoRA branch switched on.

    Before each model call it loads its LoRA into the branch, unless the branch holds it already.
    """

    def __init__(self, base: ComfySVDHost, weights: LoRAWeights, strength: float = 1.0) -> None:
        super().__init__(base)
        self.target_set = fitting_target_set(weights, base.patcher.model.diffusion_model)
        self.weights, self.strength, self.rank = weights, strength, weights.rank
        self.sessions = base.sessions  # one clone, one set of sessions: the branch is switched per call

    @property
    def controlled_patcher(self) -> comfy.model_patcher.ModelPatcher:
        self.base.attach_branch(self.rank, self.target_set)
        return self.base.controlled_patcher

    def _patcher(self, controlled: bool) -> comfy.model_patcher.ModelPatcher:
        # always the clone the branch lives on (``_switch_branch`` attached it); without a controller its
        # patches compute ComfyUI's attention
        return self.base.controlled_patcher

    def _switch_branch(self) -> None:
        self.base.attach_branch(self.rank, self.target_set).take(self, self.weights.modules, self.strength)


class ComfyTrainingHost(_OnBase):
    """``base``'s MODEL with the LoRA a trainer holds now (``ComfyLoRATrainer.host``): every call runs the
    trainer's clone with its branch on and no dropout."""

    def __init__(self, base: ComfySVDHost, trainer: ComfyLoRATrainer) -> None:
        super().__init__(base)
        self.trainer = trainer
        self.sessions = GuiderSessions()

    @property
    def controlled_patcher(self) -> comfy.model_patcher.ModelPatcher:
        return self.trainer.patcher

    def _patcher(self, controlled: bool) -> comfy.model_patcher.ModelPatcher:
        return self.trainer.patcher

    def _switch_branch(self) -> None:
        self.trainer.branch.on, self.trainer.branch.dropout = True, 0.0
