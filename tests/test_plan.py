"""The meta-device plan (``hosts.diffusers.plan``): its per-call measurement against counts worked out by
hand, and the UNet passes of a whole plan against the method's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from i2vedit.hosts.diffusers import tiny
from i2vedit.hosts.diffusers.plan import counting, meta_host, plan_edit
from i2vedit.run.memtrack import track_allocations

META = torch.device("meta")
HALF = torch.float16
B, N, C, C_OUT, HEADS = 2, 96, 32, 48, 2  # N a multiple of 32: no padding of the log-sum-exp
D = C // HEADS
SEED_OFFSET = 16  # the fused kernel's dropout seed and offset: two int64 scalars


def _x(*shape: int) -> torch.Tensor:
    """An input: made before a measured block (what exists before it is never counted)."""
    return torch.empty(*shape, device=META, dtype=HALF)


def test_a_linear_costs_2bncc_flops_and_its_output():
    linear, x = torch.nn.Linear(C, C_OUT, device=META, dtype=HALF), _x(B, N, C)
    with counting() as (flops, mem):
        out = linear(x)
    assert flops.get_total_flops() == 2 * B * N * C * C_OUT
    assert mem.peak_bytes == mem.live_bytes == out.numel() * 2 == B * N * C_OUT * 2


def test_a_convolution_costs_2_flops_per_multiply_add_and_its_output():
    conv, x = torch.nn.Conv2d(C, C_OUT, 3, padding=1, device=META, dtype=HALF), _x(B, C, 8, 8)
    with counting() as (flops, mem):
        conv(x)
    assert flops.get_total_flops() == 2 * B * C_OUT * 8 * 8 * C * 3 * 3
    assert mem.peak_bytes == B * C_OUT * 8 * 8 * 2 and mem.live_bytes == 0  # the output was dropped


def test_attention_on_meta_is_sized_as_the_fused_kernel():
    q = _x(B, HEADS, N, D)
    with counting() as (flops, mem):
        F.scaled_dot_product_attention(q, q, q)
    assert flops.get_total_flops() == 4 * B * HEADS * N * N * D  # Q·Kᵀ and P·V
    assert mem.peak_bytes == B * HEADS * N * D * 2 + SEED_OFFSET  # the output, no score
    qg = q.clone().requires_grad_()
    with counting() as (_, mem):
        out = F.scaled_dot_product_attention(qg, qg, qg)
    # for the backward the kernel keeps its fp32 log-sum-exp (one per query) with the output
    assert mem.live_bytes == B * HEADS * N * D * 2 + B * HEADS * N * 4 + SEED_OFFSET
    del out
    with track_allocations() as math_path:  # without the swap, meta takes the math path
        F.scaled_dot_product_attention(q, q, q)
    assert math_path.peak_bytes >= B * HEADS * N * N * 2


def test_a_spatial_attention_layer_by_hand():
    layer = Attention(query_dim=C, heads=HEADS, dim_head=D, bias=False, out_bias=True).to(META, HALF).eval()
    x, one = _x(B, N, C), B * N * C * 2  # bytes of a (B, N, C) fp16 tensor
    with torch.no_grad(), counting() as (flops, mem):
        out = layer(x)
    # Q, K, V and out projections (C×C each) and the attention over N tokens (H·d = C)
    assert flops.get_total_flops() == 4 * 2 * B * N * C * C + 4 * B * N * N * C
    # at the out projection: Q, K, V, the attention output (heads merged as a view) and its result
    assert mem.peak_bytes == 5 * one
    assert mem.live_bytes == out.numel() * 2 == one


@pytest.fixture(scope="module")
def tiny_meta_host():
    configs = tiny.tiny_unet_config(), tiny.tiny_vae_config(), tiny.tiny_clip_config()
    return meta_host(torch.float32, torch.float32, *configs)


def test_the_plan_of_the_tiny_model_passes_the_unet_as_the_method_does(tiny_meta_host):
    steps, lora_steps, clips, edits = 3, 2, 2, 2
    plan = plan_edit(64, 64, 3, steps, lora_steps, clips, edits, host=tiny_meta_host)
    assert plan.settings["train_size"] == [64, 64] and plan.settings["skip_interval"]
    # per call: (UNet calls, rows); later clips replay the first clip's calls for its K/V
    expected = {
        "inversion step, first clip": (steps, 1, 1),
        "inversion step, later clip (replays the first clip's step for its K/V)": (steps, 2, 2),
        "training step (forward + backward, checkpointing, AdamW), first clip": (lora_steps, 1, 1),
        "training step (forward + backward, checkpointing, AdamW), later clip (first clip's K/V replayed)": (
            lora_steps, 2, 2),
        # source replay (1 row) + the edit with CFG (2 rows)
        "matched step, first clip": (edits * steps, 2, 3),
        # the first clip's source replay (1: its attention and the K/V this clip's source replay attends
        # to), the first clip's matched call replayed for the edited K/V (2), this clip's source replay
        # (1) and its own edit with CFG (2)
        "matched step, later clip": (edits * steps, 4, 6),
    }  # fmt: skip
    got = {p.what: (p.calls, p.cost.unet_calls, p.cost.unet_rows) for p in plan.parts if p.cost.unet_calls}
    assert got == expected
    assert plan.plain_step is not None and (plan.plain_step.unet_calls, plan.plain_step.unet_rows) == (1, 2)
    ratios = plan.matched_over_plain_step_flops()
    assert (
        1.0 < ratios["matched step, first clip"] < ratios["matched step, later clip"]
    )  # tiny: LoRA rows weigh more
    stages = plan.stages()
    assert stages["invert"]["unet_rows"] == steps * 1 + (clips - 1) * steps * 2
    assert stages["lora"]["unet_rows"] == lora_steps * 1 + (clips - 1) * lora_steps * 2
    assert stages["denoise"]["unet_rows"] == edits * (steps * 3 + (clips - 1) * steps * 6)
    assert all(stages[s]["unet_rows"] == 0 for s in ("encode", "condition", "decode"))
    assert all(s["flops"] > 0 and s["peak_bytes"] > sum(plan.weights_bytes.values()) for s in stages.values())


def _cast_params(module: torch.nn.Module) -> int:
    """Parameters layerwise casting stores in a reduced dtype, counted by hand: the weights and biases of
    Linear, Conv and Embedding layers whose names do not say norm, pos_embed or patch_embed."""
    layers = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)
    return sum(
        p.numel()
        for name, m in module.named_modules()
        if isinstance(m, layers) and not any(k in name for k in ("norm", "pos_embed", "patch_embed"))
        for p in m.parameters(recurse=False)
    )


def test_weights_stored_in_fp16_plan_two_bytes_less_per_stored_parameter(tiny_meta_host):
    kw = {"match": None, "host": tiny_meta_host, "count_flops": False}
    full = plan_edit(64, 64, 2, 2, 1, 1, **kw)
    half = plan_edit(64, 64, 2, 2, 1, 1, weights_dtype=torch.float16, **kw)
    cast = {n: _cast_params(getattr(tiny_meta_host, n)) for n in ("unet", "vae", "image_encoder")}
    assert {n: full.weights_bytes[n] - half.weights_bytes[n] for n in cast} == {
        n: 2 * c for n, c in cast.items()
    }
    assert half.weights_bytes["lora_branch"] == full.weights_bytes["lora_branch"]  # the LoRA stays fp32
    # the calls are measured as they compute (fp32) either way: each stage's peak is less by the weights'
    # difference, the UNet's alone where --low-memory keeps the VAE and image encoder off the device
    for offload in (False, True):
        for name, stage in half.stages(offload).items():
            unet_only = offload and stage["unet_calls"] > 0
            saved = 2 * (cast["unet"] if unet_only else sum(cast.values()))
            assert full.stages(offload)[name]["peak_bytes"] - stage["peak_bytes"] == saved, (name, offload)
    assert half.settings["weights_dtype"] == "float16" and "weights_dtype" not in full.settings
    assert all(p.dtype == torch.float32 for p in tiny_meta_host.unet.parameters())  # the host is unchanged
