"""A motion LoRA as a switchable branch beside the target linears of the one UNet: no copy, no merge.

While the branch is on, a target linear gives ``W x + dropout(B A x)`` (``B`` holds the file's
alpha / rank and the strength; dropout acts on the branch output as the authors have it, only while
training); while it is off, exactly ``W x``. A host calls ``add`` from each target linear's forward
(a forward hook on the diffusers UNet, an object patch on ComfyUI's controlled clone) and
switches the branch per model call, so the base model and every LoRA share one model (on diffusers
a training run too; a ComfyUI trainer holds a branch of its own on a MODEL clone of its own, over
the same weights); ``owner`` says whose LoRA the branch holds now.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..errors import LoRAError
from .file import LoRAPair, validate_rank


class LoRABranch:
    """Down / up matrices per target layer (ComfyUI module names), an on switch and the training dropout."""

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        rank: int,
        target_set: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        validate_rank(rank, shapes)
        self.rank, self.target_set, self.shapes = rank, target_set, dict(shapes)
        with torch.inference_mode(False):  # ordinary tensors, also when made inside a ComfyUI node
            self.down = {
                n: torch.nn.Parameter(torch.zeros(rank, i, device=device, dtype=dtype), requires_grad=False)
                for n, (_, i) in sorted(shapes.items())
            }
            self.up = {
                n: torch.nn.Parameter(torch.zeros(o, rank, device=device, dtype=dtype), requires_grad=False)
                for n, (o, _) in sorted(shapes.items())
            }
        self.on = False
        self.dropout = 0.0  # the branch-output dropout of the training step running now (0: none)
        self.owner: object | None = None  # whose LoRA the branch holds now

    def fits(self, rank: int, target_set: str) -> bool:
        return (self.rank, self.target_set) == (rank, target_set)

    def take(self, owner: object, modules: Mapping[str, LoRAPair], strength: float = 1.0) -> None:
        """Switch the branch on for ``owner``'s inference calls, loading its LoRA when another owner ran since."""
        if self.owner is not owner:
            self.load(modules, strength)
            self.owner = owner
        self.dropout = 0.0
        self.on = True

    def add(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The output of target linear ``name`` for input ``x``, given its plain output ``out``."""
        if not self.on:
            return out
        down: torch.Tensor = self.down[name]
        up: torch.Tensor = self.up[name]
        if not torch.is_grad_enabled():  # on CPU a weight's requires_grad picks the kernel: one for inference
            down, up = down.detach(), up.detach()
        if down.device != x.device:  # the host offloaded its model (ComfyUI low-VRAM modes)
            down, up = down.to(x.device), up.to(x.device)
        branch = F.linear(F.linear(x.to(down.dtype), down), up)
        if self.dropout > 0:
            branch = F.dropout(branch, self.dropout, training=True)
        return out + branch.to(out.dtype)

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The LoRA tensors in a fixed order, named ``<comfy module>.lora_down`` / ``.lora_up``."""
        out = []
        for name in sorted(self.shapes):
            out += [(f"{name}.lora_down", self.down[name]), (f"{name}.lora_up", self.up[name])]
        return out

    def load(self, modules: Mapping[str, LoRAPair], strength: float = 1.0) -> None:
        """Set the branch to ``modules`` (every target layer; the file's alpha / rank folded into up)."""
        fitted = fitted_pairs(modules, self.shapes, self.rank, self.target_set, strength)
        with torch.no_grad():
            for name, (down, up) in fitted.items():
                self.down[name].copy_(down)
                self.up[name].copy_(up)

    def export(self) -> dict[str, LoRAPair]:
        """Detached CPU float32 copies by module name (alpha = rank: scale 1)."""
        return exported_pairs({name: (self.down[name], self.up[name]) for name in self.shapes}, self.rank)


def fitted_pairs(
    modules: Mapping[str, LoRAPair],
    shapes: Mapping[str, tuple[int, int]],
    rank: int,
    target_set: str,
    strength: float = 1.0,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``modules`` as (down, up) to copy into LoRA layers ``{name: (out, in)}`` of ``rank``, the file's
    alpha / rank and ``strength`` folded into up; a clear error for missing, unknown or mis-shaped layers."""
    unknown = sorted(set(modules) - set(shapes))
    missing = sorted(set(shapes) - set(modules))
    if unknown or missing:
        raise LoRAError(
            f"this LoRA does not fit the model's {target_set!r} layers: "
            + (f"unknown {unknown[:3]} " if unknown else "")
            + (f"missing {missing[:3]}" if missing else "")
        )
    out = {}
    for name, pair in modules.items():
        out_f, in_f = shapes[name]
        if tuple(pair.down.shape) != (rank, in_f) or tuple(pair.up.shape) != (out_f, rank):
            raise LoRAError(
                f"LoRA layer {name} has down {tuple(pair.down.shape)} / up {tuple(pair.up.shape)}, but "
                f"this one has {(rank, in_f)} / {(out_f, rank)} (rank or model differ)."
            )
        out[name] = (pair.down, pair.up * (strength * pair.alpha / pair.rank))
    return out


def exported_pairs(layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]], rank: int) -> dict[str, LoRAPair]:
    """Detached CPU float32 copies of ``{name: (down, up)}``, names sorted, alpha = rank (scale 1)."""
    return {
        name: LoRAPair(
            down.detach().to("cpu", torch.float32, copy=True),
            up.detach().to("cpu", torch.float32, copy=True),
            float(rank),
        )
        for name, (down, up) in sorted(layers.items())
    }
