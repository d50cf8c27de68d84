"""Motion LoRA for the diffusers host, through peft on ONE working copy of the UNet per host.

A host makes at most one LoRA'd working copy of its UNet (fp32, peft adapter "default" on the
target linears; ``lora_copy``), and every trainer and every LoRA host of that host shares it: a
trainer resets the adapter to its initial LoRA, a LoRA host loads its weights into the adapter
before each of its model calls (only when another user of the copy ran since). So a whole
multi-clip edit holds the user's UNet plus one copy, never a copy per clip.

The adapter starts as peft draws it (A ~ N(0, 1/r²), B = 0, scale 1 as the authors have it;
``lora.peft_init.init_lora_pairs`` replays peft's draws for a reused copy). The authors' dropout acts on
the LoRA branch *output*, where peft's acts on its input, so peft's is left at 0 and a forward hook
on each ``lora_B`` applies dropout to its output instead (exactly ``W x + dropout(B A x)``).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig, inject_adapter_in_model

from ...errors import I2VEditError, LoRAError
from ...lora.file import LoRAPair, validate_rank
from ...lora.peft_init import init_lora_pairs
from ...lora.targets import target_shapes, to_comfy_name, to_diffusers_name
from ...svd import SVDCond

if TYPE_CHECKING:
    from .host import DiffusersSVDHost

ADAPTER = "default"


def _weights_state(unet: torch.nn.Module) -> tuple[tuple[int, int], ...]:
    """Where each parameter lives and how often it was changed in place: any edit of the weights shows."""
    return tuple((p.data_ptr(), p._version) for p in unet.parameters())


class LoRACopy:
    """A host's one LoRA'd fp32 working copy of its UNet, shared by its trainers and LoRA hosts."""

    def __init__(self, base: DiffusersSVDHost, rank: int, target_set: str) -> None:
        shapes = target_shapes(base.unet, target_set, "diffusers")
        validate_rank(rank, shapes)
        self.rank, self.target_set = rank, target_set
        self.shapes = {to_comfy_name(n): s for n, s in shapes.items()}
        self.base_state = _weights_state(base.unet)
        unet = copy.deepcopy(base.unet).float().requires_grad_(False)
        config = LoraConfig(
            r=rank,
            lora_alpha=rank,
            lora_dropout=0.0,
            target_modules=sorted(shapes),
            init_lora_weights="gaussian",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            inject_adapter_in_model(config, unet)
        modules = dict(unet.named_modules())
        self.layers = {to_comfy_name(n): modules[n] for n in sorted(shapes)}
        self.dropout_p, self.dropout_on = 0.0, False
        for layer in self.layers.values():
            layer.lora_B[ADAPTER].register_forward_hook(self._branch_dropout)
        self.host = base.with_unet(unet)
        self.owner: object | None = None  # whose LoRA the adapter holds now

    def _branch_dropout(self, module, inputs, output):
        if self.dropout_on and self.dropout_p > 0:
            return torch.nn.functional.dropout(output, self.dropout_p, training=True)
        return output

    def fits(self, base: DiffusersSVDHost, rank: int, target_set: str) -> bool:
        """True when this copy serves ``rank``/``target_set`` and ``base``'s weights are unchanged since."""
        return (rank, target_set) == (self.rank, self.target_set) and _weights_state(
            base.unet
        ) == self.base_state

    def load(self, modules: dict[str, LoRAPair], strength: float = 1.0) -> None:
        """Set the adapter to ``modules`` (every target layer; the file's alpha/rank folded into up)."""
        unknown = sorted(set(modules) - set(self.layers))
        missing = sorted(set(self.layers) - set(modules))
        if unknown or missing:
            raise LoRAError(
                f"this LoRA does not fit the model's {self.target_set!r} layers: "
                + (f"unknown {unknown[:3]} " if unknown else "")
                + (f"missing {missing[:3]}" if missing else "")
            )
        with torch.no_grad():
            for name, pair in modules.items():
                layer = self.layers[name]
                layer.lora_A[ADAPTER].weight.copy_(pair.down)
                layer.lora_B[ADAPTER].weight.copy_(pair.up * (strength * pair.alpha / pair.rank))


def lora_copy(host: DiffusersSVDHost, rank: int, target_set: str) -> LoRACopy:
    """``host``'s LoRA'd working copy for ``rank``/``target_set``, made on first use.

    A copy of another rank or target set, or one made before ``host``'s weights were changed in
    place, is dropped before the new one is made, so at most one exists per host.
    """
    current = host.lora_working_copy
    if current is not None and current.fits(host, rank, target_set):
        return current
    host.lora_working_copy = None  # let the old copy go before the new one is built
    del current
    made = LoRACopy(host, rank, target_set)
    host.lora_working_copy = made
    return made


class DiffusersLoRATrainer:
    """Trains a motion LoRA in ``host``'s working copy (``host.LoRATrainable``).

    Building a trainer resets the copy's adapter to the initial LoRA of ``init_seed``. A LoRA host
    of the same base that runs a model call meanwhile takes the copy over; the trainer's next step
    then refuses to continue rather than train on another LoRA's values.
    """

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
        validate_rank(rank, target_shapes(host.unet, target_set, "diffusers"))
        self.rank, self.target_set, self.p = rank, target_set, dropout
        self.autocast_dtype = autocast_dtype
        self._copy = lora_copy(host, rank, target_set)
        self._copy.load(init_lora_pairs(self._copy.shapes, rank, init_seed))
        self._copy.owner = self
        self._copy.dropout_p = dropout
        unet = self._copy.host.unet
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        elif unet.is_gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        self._named = []
        for name, layer in sorted(self._copy.layers.items()):
            self._named.append((f"{name}.lora_down", layer.lora_A[ADAPTER].weight))
            self._named.append((f"{name}.lora_up", layer.lora_B[ADAPTER].weight))
        for _, p in self._named:
            p.requires_grad_(True)

    @property
    def host(self) -> DiffusersSVDHost:
        """A host over the working copy (the LoRA as trained so far)."""
        return self._copy.host

    @property
    def unet(self):
        return self._copy.host.unet

    def fingerprint(self) -> str:
        return self._copy.host.fingerprint()

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return self._named

    def set_dropout(self, active: bool) -> None:
        """Called before each step and after the last: also drops the previous step's controller."""
        self._copy.host.release_call_options()
        self._copy.dropout_p, self._copy.dropout_on = self.p, active
        self.unet.train(active)  # diffusers checkpoints only in training mode

    def train_denoise(
        self, x: torch.Tensor, sigma: float, cond: SVDCond, transformer_options: dict[str, Any]
    ) -> torch.Tensor:
        if self._copy.owner is not self:
            raise I2VEditError(
                "another LoRA of this model ran while this LoRA was training, in the one working copy they "
                "share; train one LoRA at a time (or load the LoRA trained so far and resume)."
            )
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
            for name, layer in sorted(self._copy.layers.items())
        }

    def load(self, modules: dict[str, LoRAPair], strength: float = 1.0) -> None:
        self._copy.load(modules, strength)
        self._copy.owner = self


__all__ = [
    "DiffusersLoRATrainer",
    "LoRACopy",
    "lora_copy",
    "to_diffusers_name",
]
