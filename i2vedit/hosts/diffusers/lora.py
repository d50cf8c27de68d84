"""Motion LoRA for the diffusers host: one branch on the host's own UNet (``lora.branch.LoRABranch``).

A host attaches at most one branch, on first use (``DiffusersSVDHost.attach_branch``): forward hooks on the target
linears of its UNet, so no copy of the UNet is ever made and its module tree and state dict stay
as they are. The base host switches the branch off for its calls (exactly the base model); a LoRA
host loads its weights into it (only when another user ran since) and switches it on; a trainer
resets it to the seeded initial LoRA (``lora.peft_init``, peft's draws) and trains it. The branch
is fp32 whatever the UNet's dtype.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import checkpoint

from ...errors import I2VEditError
from ...lora.file import LoRAPair
from ...lora.peft_init import init_lora_pairs
from ...svd import SVDCond

if TYPE_CHECKING:
    from .host import DiffusersSVDHost


def checkpoint_transformers(unet: torch.nn.Module, on: bool) -> None:
    """Checkpoint each spatio-temporal transformer of ``unet`` in training (``on``), or stop doing so.

    diffusers' gradient checkpointing of the SVD UNet covers its resnets only: the transformers, whose
    temporal blocks hold every motion-LoRA layer, would keep all their activations (at 512×896, 14
    frames, most of a training step's memory).
    """
    for module in unet.modules():
        if type(module).__name__ != "TransformerSpatioTemporalModel":
            continue
        module.__dict__.pop("forward", None)  # back to the class's forward
        if on:
            module.forward = functools.partial(_checkpointed, module, module.forward)


def _checkpointed(module: torch.nn.Module, forward: Any, *args: Any, **kwargs: Any) -> Any:
    if module.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


class DiffusersLoRATrainer:
    """Trains a motion LoRA in ``host``'s branch (``host.LoRATrainable``).

    Building a trainer resets the branch to the initial LoRA of ``init_seed``. A LoRA host of the
    same host that runs a model call meanwhile takes the branch over; the trainer's next step then
    refuses to continue rather than train on another LoRA's values. Base-model calls in between
    (skip-interval K/V replays) switch the branch off for their call only.
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
        self.rank, self.target_set, self.p = rank, target_set, dropout
        self.autocast_dtype = autocast_dtype
        self._host = host
        self._branch = host.attach_branch(rank, target_set)
        self._branch.load(init_lora_pairs(self._branch.shapes, rank, init_seed))
        self._branch.owner = self
        unet = host.unet
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        elif unet.is_gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        checkpoint_transformers(unet, gradient_checkpointing)
        for _, p in self._branch.named_trainable():
            p.requires_grad_(True)

    @property
    def host(self) -> DiffusersSVDHost:
        """A host of the LoRA as trained so far (live; no dropout)."""
        return self._host.training_host(self)

    def fingerprint(self) -> str:
        return self._host.fingerprint()

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return self._branch.named_trainable()

    def set_dropout(self, active: bool) -> None:
        """Called before each step and after the last: also drops the previous step's controller."""
        self._host.release_call_options()
        self._branch.dropout = self.p if active else 0.0
        self._host.unet.train(active)  # diffusers checkpoints only in training mode

    def train_denoise(
        self, x: torch.Tensor, sigma: float, cond: SVDCond, transformer_options: dict[str, Any]
    ) -> torch.Tensor:
        if self._branch.owner is not self or self._host.lora_branch is not self._branch:
            raise I2VEditError(
                "another LoRA of this model ran while this LoRA was training, in the one UNet they share; "
                "train one LoRA at a time (or load the LoRA trained so far and resume)."
            )
        self._branch.on = True
        dev = self._host.device
        use_autocast = self.autocast_dtype is not None
        autocast = torch.autocast(dev.type, self.autocast_dtype) if use_autocast else nullcontext()
        with torch.enable_grad(), autocast:
            return self._host.run_unet(x, sigma, [cond], transformer_options)[0].float()

    def export(self) -> dict[str, LoRAPair]:
        return self._branch.export()

    def load(self, modules: dict[str, LoRAPair]) -> None:
        self._branch.load(modules)
        self._branch.owner = self


__all__ = ["DiffusersLoRATrainer"]
