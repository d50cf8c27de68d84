"""What the ComfyUI host attaches to a user's SVD MODEL, through ComfyUI's own hooks.

- ``with_attention_control``: an attn1 replace patch on each of the 16 transformer positions (they
  fire for the spatial and the temporal block alike) plus an object patch that tags temporal calls;
- ``with_lora_branch``: forward patches that add a motion-LoRA branch to the target linears;
- ``check_svd_model`` / ``to_conditioning``: the MODEL check and ``SVDCond`` as CONDITIONING.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import comfy.ldm.modules.attention
import comfy.model_base
import comfy.model_patcher
import torch

from ...errors import NotSVDModelError
from ...lora.branch import LoRABranch
from ...method.controller import CONTROLLER_KEY, TEMPORAL_KEY, AttnCall, chunk_kinds
from ...svd import POSITIONS, AttentionPosition, SVDCond


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


def with_lora_branch(
    model: comfy.model_patcher.ModelPatcher, branch: LoRABranch
) -> comfy.model_patcher.ModelPatcher:
    """A clone of ``model`` whose motion-LoRA target linears add ``branch`` to their output (object patches
    on their ``forward``). The host switches the branch per call; switched off, the linears are untouched."""
    m = model.clone()
    for name in branch.shapes:
        key = f"diffusion_model.{name}.forward"
        m.add_object_patch(key, _branch_forward(branch, name, m.get_model_object(key)))
    return m


def _branch_forward(branch: LoRABranch, name: str, forward: Callable) -> Callable:
    def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return branch.add(name, x, forward(x, *args, **kwargs))

    return run
