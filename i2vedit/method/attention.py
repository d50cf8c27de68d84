"""Self-attention maths of fine-grained attention matching (method.md §4, §6), host-free.

Tensors arrive the way both model libraries hand them to an attention hook: ``q``, ``k``, ``v`` of
shape (rows, tokens, heads·d) after the projections, before the output projection. Spatial layers
have rows = chunks·frames and tokens = h·w; temporal layers have rows = chunks·h·w and tokens =
frames. A *chunk* is one CFG branch batched into the call (cond or uncond).

Spatial matching comes three times: ``spatial_match`` in query chunks whose peak memory is bounded by
the chunk; on x86-64 CPUs the same maths fused in C (``native.py``, which ``spatial_match`` calls
where it can run); and ``spatial_match_reference``, a plain fp32 materialisation of every map, kept
as the yardstick both fast paths are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from einops import rearrange

from ..errors import I2VEditError
from ..precision import outside_autocast
from . import native

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""A host's own attention kernel: (q, k, v, heads) → out, all (rows, tokens, heads·d)."""

DEFAULT_QUERY_CHUNK = 1024
CPU_BLOCK_ELEMENTS = 1 << 18  # fp32 elements of one CPU matching map block (1 MiB: fastest on 2-core CPUs)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(rows, tokens, heads·d) → (rows, heads, tokens, d)."""
    if x.shape[-1] % heads:
        raise I2VEditError(f"attention width {x.shape[-1]} is not divisible by {heads} heads.")
    return rearrange(x, "rows tokens (heads d) -> rows heads tokens d", heads=heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(rows, heads, tokens, d) → (rows, tokens, heads·d)."""
    return rearrange(x, "rows heads tokens d -> rows tokens (heads d)")


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q kᵀ/√d) in fp32 (also inside an autocast region): (rows, heads, queries, keys)."""
    qh, kh = split_heads(q, heads).float(), split_heads(k, heads).float()
    scale = 1.0 / math.sqrt(qh.shape[-1])
    with outside_autocast(q.device):
        return torch.softmax(qh @ kh.transpose(-1, -2) * scale, dim=-1)


def apply_probs(probs: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """probs (rows, heads, queries, keys) applied to values (rows, keys, heads·d) in fp32, returned in v's dtype."""
    vh = split_heads(v, heads)
    with outside_autocast(v.device):
        return merge_heads((probs.float() @ vh.float()).to(v.dtype))


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain attention with the probabilities materialised in fp32."""
    return apply_probs(attention_probs(q, k, heads), v, heads)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """torch's fused attention kernel, for callers that have no host kernel at hand."""
    out = torch.nn.functional.scaled_dot_product_attention(
        split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    )
    return merge_heads(out)


def frame_thresholds(frames: int, tau: tuple[float, float]) -> torch.Tensor:
    """τ_f = τ0 + (τ1 − τ0)·f/F for each frame f (the authors' ramp; constant when τ0 = τ1)."""
    t0, t1 = tau
    return torch.tensor([t0 + (t1 - t0) * f / frames for f in range(frames)], dtype=torch.float32)


def blend_weight(diff: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """M = 1 where the difference reaches τ, the difference itself below it (soft, not 0)."""
    return torch.where(diff >= tau, torch.ones_like(diff), diff)


def _check_spatial(q_e, k_e, v_e, q_s, k_s) -> None:
    if q_s.shape != q_e.shape or k_s.shape != k_e.shape:
        raise I2VEditError(
            f"source attention {tuple(q_s.shape)} does not fit the edit's {tuple(q_e.shape)}: the inversion "
            "must come from the same resolution and frame count."
        )
    if k_e.shape != v_e.shape:
        raise I2VEditError("keys and values of a self-attention layer must have one shape.")


def spatial_match_reference(
    q_e: torch.Tensor,
    k_e: torch.Tensor,
    v_e: torch.Tensor,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    heads: int,
    tau: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spatial attention matching with every map materialised in fp32 (the yardstick).

    Inputs are one CFG chunk: (frames, tokens, heads·d); ``tau`` holds one threshold per frame.
    Returns (out in v's dtype, difference D (frames, tokens), blend weight M (frames, tokens)).
    """
    _check_spatial(q_e, k_e, v_e, q_s, k_s)
    p_e = attention_probs(q_e, k_e, heads)
    p_s = attention_probs(q_s, k_s, heads)
    diff = (p_s - p_e).abs().sum(-1).mean(1).clamp(0, 2) / 2
    weight = blend_weight(diff, tau.to(diff.device).view(-1, 1))
    m = weight[:, None, :, None]
    blended = (1 - m) * p_s + m * p_e
    return apply_probs(blended, v_e, heads), diff, weight


def default_query_chunk(device: torch.device, heads: int, tokens: int) -> int:
    """Query rows per matching block: a block of a few MB on CPU (it stays in cache), large elsewhere.

    A CPU pass over a block the cache cannot hold costs several times more, while an accelerator
    (and the meta device, which stands in for one in accounting) wants few, large kernel launches.
    """
    if device.type != "cpu":
        return DEFAULT_QUERY_CHUNK
    return max(1, CPU_BLOCK_ELEMENTS // (heads * tokens))


def spatial_match(
    q_e: torch.Tensor,
    k_e: torch.Tensor,
    v_e: torch.Tensor,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    heads: int,
    tau: torch.Tensor,
    query_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``spatial_match_reference`` in blocks of at most ``query_chunk`` query rows of one layer.

    The maps of a block are (frames_in_block, heads, queries_in_block, tokens) with frames_in_block ·
    queries_in_block ≤ max(query_chunk, tokens), so peak memory is bounded by the chunk, never by
    the frame count; None picks ``default_query_chunk``. One score matmul per map and one matmul
    with the values per block (the blended map), everything else in place; only a block (and one
    frame block's keys and values) is upcast at a time. The scores are fp32 whatever the model's
    dtype, as the authors compute them, also inside an autocast region.

    With ``query_chunk`` None, a CPU layer that ``native.fits`` goes to the fused C kernel
    (``native.py``) where it runs: the same maths, every map kept in the cache.
    """
    _check_spatial(q_e, k_e, v_e, q_s, k_s)
    frames, tokens, _ = q_e.shape
    if query_chunk is None and native.fits(q_e, k_e, heads) and native.kernel() is not None:
        out_h, d_, w_ = native.spatial_match_native(
            split_heads(q_e, heads), split_heads(k_e, heads), split_heads(v_e, heads),
            split_heads(q_s, heads), split_heads(k_s, heads), tau,
        )  # fmt: skip
        return merge_heads(out_h), d_, w_
    if query_chunk is None:
        query_chunk = default_query_chunk(q_e.device, heads, tokens)
    if query_chunk < 1:
        raise I2VEditError(f"query_chunk must be at least 1, got {query_chunk}.")
    qe, ke, ve = split_heads(q_e, heads), split_heads(k_e, heads), split_heads(v_e, heads)
    qs, ks = split_heads(q_s, heads), split_heads(k_s, heads)
    scale = 1.0 / math.sqrt(qe.shape[-1])
    tau = tau.to(q_e.device, torch.float32)
    out = torch.empty_like(ve)
    diff = torch.empty(frames, tokens, device=q_e.device, dtype=torch.float32)
    weight = torch.empty_like(diff)
    frame_block = max(1, query_chunk // tokens)
    query_block = min(tokens, query_chunk)
    with outside_autocast(q_e.device):
        for f0 in range(0, frames, frame_block):
            f1 = min(frames, f0 + frame_block)
            ke_t, ks_t = ke[f0:f1].float().transpose(-1, -2), ks[f0:f1].float().transpose(-1, -2)
            v_edit = ve[f0:f1].float()
            for a in range(0, tokens, query_block):
                b = min(tokens, a + query_block)
                p_e = torch.softmax((qe[f0:f1, :, a:b].float() * scale) @ ke_t, dim=-1)
                p_s = torch.softmax((qs[f0:f1, :, a:b].float() * scale) @ ks_t, dim=-1)
                # ½·Σ|P^e − P^s| = 1 − Σ min(P^e, P^s) for two distributions: one pass, nothing written
                d = torch.minimum(p_e, p_s).sum(-1).mean(1).neg_().add_(1).clamp_(0, 1)
                w = blend_weight(d, tau[f0:f1, None])
                p_s.lerp_(p_e, w[:, None, :, None])  # (1 − M)·P^s + M·P^e
                out[f0:f1, :, a:b] = p_s @ v_edit
                diff[f0:f1, a:b], weight[f0:f1, a:b] = d, w
                del p_e, p_s
    return merge_heads(out), diff, weight


def concat_kv(
    k: torch.Tensor, v: torch.Tensor, k_extra: torch.Tensor, v_extra: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Skip-interval K/V: prepend another clip's keys/values on the frame (token) axis of one chunk."""
    if k_extra.shape[0] != k.shape[0] or k_extra.shape[2] != k.shape[2]:
        raise I2VEditError(
            f"skip-interval K/V {tuple(k_extra.shape)} does not fit this clip's {tuple(k.shape)}: the first "
            "clip must have the same resolution (and model) as this one."
        )
    return torch.cat([k_extra.to(k.dtype), k], 1), torch.cat([v_extra.to(v.dtype), v], 1)
