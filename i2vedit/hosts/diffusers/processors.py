"""The diffusers host's attention processors: the 16 spatial and 16 temporal self-attention layers hand
their q, k, v to the call's attention controller (``transformer_options``), or compute diffusers'
own attention without one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import UNetSpatioTemporalConditionModel

from ...errors import I2VEditError
from ...lora.branch import LoRABranch
from ...method.attention import sdpa_attention
from ...method.controller import CONTROLLER_KEY, AttnCall, chunk_kinds
from ...svd import POSITIONS


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
    The options box travels with the UNet, so every host of that UNet finds it there.
    """
    box = getattr(unet, "_i2v_call_options", None)
    if box is None:
        box = _CallOptions()
        for pos in POSITIONS:
            for name, temporal in ((pos.diffusers_spatial, False), (pos.diffusers_temporal, True)):
                unet.get_submodule(name).set_processor(ControlledSelfAttention(box, pos.index, temporal))
        unet._i2v_call_options = box
    return box


def branch_hook(branch: LoRABranch, name: str) -> Callable[..., torch.Tensor]:
    """A forward hook for target linear ``name`` that adds the motion-LoRA ``branch`` to its output."""

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return branch.add(name, inputs[0], output)

    return hook
