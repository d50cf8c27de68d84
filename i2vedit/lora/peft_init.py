"""The initial motion LoRA both hosts start training from, drawn exactly as peft draws it.

peft walks the diffusers UNet's ``named_modules()`` (down blocks, up blocks, then the mid block:
diffusers registers ``up_blocks`` before ``mid_block``); per target layer it builds
``nn.Linear(in, r)`` and ``nn.Linear(r, out)``, each Kaiming-initialised, then redraws A from
N(0, 1/r²) and zeroes B. ``init_lora_pairs`` replays those draws, so a ComfyUI trainer and a
diffusers trainer (also one reusing a branch another LoRA used) start from the same LoRA.
"""

from __future__ import annotations

import re

import torch

from ..errors import LoRAError
from .file import LoRAPair
from .targets import BLOCK_LINEARS, to_diffusers_name

_DIFFUSERS_GROUP_ORDER = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
_DIFFUSERS_TARGET = re.compile(
    r"^(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?attentions\.(\d+)\.temporal_transformer_blocks\.(\d+)\.(.+)$"
)


def peft_init_order(names: list[str]) -> list[str]:
    """ComfyUI target names in the order peft initialises them on the diffusers UNet."""

    def key(name: str) -> tuple[int, int, int, int, int]:
        m = _DIFFUSERS_TARGET.match(to_diffusers_name(name))
        if m is None:
            raise LoRAError(f"{name!r} is not a temporal-block linear of the SVD UNet.")
        group, block, attn, tblock, tail = m.groups()
        # BLOCK_LINEARS["temporal"] lists a block's linears in module-registration order.
        return (
            _DIFFUSERS_GROUP_ORDER[group],
            int(block or 0),
            int(attn),
            int(tblock),
            BLOCK_LINEARS["temporal"].index(tail),
        )

    return sorted(names, key=key)


def init_lora_pairs(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, LoRAPair]:
    """The initial LoRA (down ~ N(0, 1/rank²), up = 0, alpha = rank) peft draws for ``seed``.

    ``shapes`` maps ComfyUI module names to (out, in). Draws on the CPU generator under
    ``fork_rng``, so the caller's random state is untouched.
    """
    out: dict[str, LoRAPair] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in peft_init_order(list(shapes)):
            out_f, in_f = shapes[name]
            lora_a = torch.nn.Linear(in_f, rank, bias=False)  # as peft builds them: Kaiming draws first
            torch.nn.Linear(rank, out_f, bias=False)
            torch.nn.init.normal_(lora_a.weight, std=1 / rank)
            out[name] = LoRAPair(lora_a.weight.detach().clone(), torch.zeros(out_f, rank), float(rank))
    return out
