"""Motion LoRA for the diffusers host, through peft on a private copy of the UNet.

The user's UNet is deep-copied once; peft wraps the copy's target linears (LoRA A ~ N(0, 1/r²),
B = 0, scale 1 as the authors have it). The authors' dropout acts on the LoRA branch *output*,
where peft's acts on its input, so peft's is left at 0 and a forward hook on each ``lora_B`` applies
dropout to its output instead (exactly ``W x + dropout(B A x)``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model

from ..errors import LoRAError
from ..lora_file import LoRAPair, LoRAWeights, check_lora_fits, validate_rank
from ..lora_targets import target_shapes, to_comfy_name, to_diffusers_name
from .base import SVDCond
from .diffusers_host import DiffusersSVDHost

ADAPTER = "default"


class DiffusersLoRATrainer:
    """A LoRA'd private copy of a diffusers SVD host's UNet (``lora_train.LoRATrainable``)."""

    def __init__(
        self,
        host: DiffusersSVDHost,
        rank: int = 32,
        target_set: str = "temporal",
        dropout: float = 0.1,
        gradient_checkpointing: bool = False,
        autocast_dtype: torch.dtype | None = None,
        init_seed: int = 0,
    ) -> None:
        shapes = target_shapes(host.unet, target_set, "diffusers")
        validate_rank(rank, shapes)
        self.rank, self.target_set, self.p = rank, target_set, dropout
        self.autocast_dtype = autocast_dtype
        unet = copy.deepcopy(host.unet).float().requires_grad_(False)
        config = LoraConfig(
            r=rank,
            lora_alpha=rank,
            lora_dropout=0.0,
            target_modules=sorted(shapes),
            init_lora_weights="gaussian",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            inject_adapter_in_model(config, unet)
        modules = dict(unet.named_modules())
        self._layers = {to_comfy_name(n): modules[n] for n in sorted(shapes)}
        self._dropout_on = False
        for layer in self._layers.values():
            layer.lora_B[ADAPTER].register_forward_hook(self._branch_dropout)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.host = DiffusersSVDHost(unet, host.vae, host.image_encoder, dtype=torch.float32)
        self.host.clip_mean, self.host.clip_std = host.clip_mean, host.clip_std
        self._named = []
        for name, layer in sorted(self._layers.items()):
            self._named.append((f"{name}.lora_down", layer.lora_A[ADAPTER].weight))
            self._named.append((f"{name}.lora_up", layer.lora_B[ADAPTER].weight))
        for _, p in self._named:
            p.requires_grad_(True)

    def _branch_dropout(self, module, inputs, output):
        if self._dropout_on and self.p > 0:
            return torch.nn.functional.dropout(output, self.p, training=True)
        return output

    @property
    def unet(self):
        return self.host.unet

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return self._named

    def set_dropout(self, active: bool) -> None:
        self._dropout_on = active
        self.unet.train(active)  # diffusers checkpoints only in training mode

    def train_denoise(
        self, x: torch.Tensor, sigma: float, cond: SVDCond, transformer_options: dict[str, Any]
    ) -> torch.Tensor:
        dev = self.host.device
        use_autocast = self.autocast_dtype is not None and dev.type == "cuda"
        with torch.enable_grad(), torch.autocast(dev.type, self.autocast_dtype, enabled=use_autocast):
            return self.host.denoise_with_grad(x, sigma, [cond], transformer_options)[0].float()

    def export(self) -> dict[str, LoRAPair]:
        return {
            name: LoRAPair(
                layer.lora_A[ADAPTER].weight.detach().to("cpu", torch.float32, copy=True),
                layer.lora_B[ADAPTER].weight.detach().to("cpu", torch.float32, copy=True),
                float(self.rank),
            )
            for name, layer in sorted(self._layers.items())
        }

    def load(self, modules: dict[str, LoRAPair], strength: float = 1.0) -> None:
        unknown = sorted(set(modules) - set(self._layers))
        missing = sorted(set(self._layers) - set(modules))
        if unknown or missing:
            raise LoRAError(
                f"this LoRA does not fit the model's {self.target_set!r} layers: "
                + (f"unknown {unknown[:3]} " if unknown else "")
                + (f"missing {missing[:3]}" if missing else "")
            )
        with torch.no_grad():
            for name, pair in modules.items():
                layer = self._layers[name]
                scale = strength * pair.alpha / pair.rank  # file scale folded into up
                layer.lora_A[ADAPTER].weight.copy_(pair.down)
                layer.lora_B[ADAPTER].weight.copy_(pair.up * scale)


def diffusers_lora_host(
    host: DiffusersSVDHost, weights: LoRAWeights, strength: float = 1.0
) -> DiffusersSVDHost:
    """A diffusers host running ``host``'s UNet with a saved motion LoRA (``host`` is not changed)."""
    target_set = weights.resolved_target_set() or "temporal"
    shapes = {to_comfy_name(n): s for n, s in target_shapes(host.unet, target_set, "diffusers").items()}
    check_lora_fits(weights, shapes, target_set)
    trainer = DiffusersLoRATrainer(host, weights.rank, target_set, dropout=0.0)
    trainer.load(weights.modules, strength)
    trainer.set_dropout(False)
    return trainer.host


__all__ = ["DiffusersLoRATrainer", "diffusers_lora_host", "to_diffusers_name"]
