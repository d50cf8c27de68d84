"""The fused C kernel of spatial matching (``i2vedit/method/native.py``) against the fp32 reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from i2vedit.errors import I2VEditError
from i2vedit.method import native
from i2vedit.method.attention import (
    frame_thresholds,
    sdpa_attention,
    spatial_match,
    spatial_match_reference,
    split_heads,
)

REASON = native.unavailable_reason()
needs_kernel = pytest.mark.skipif(
    REASON is not None, reason=f"the C matching kernel cannot run here: {REASON}"
)


def _inputs(frames, tokens, heads, d, seed=0):
    """Edit and source Q/K (and edit V) whose per-query difference spans both sides of τ = 0.35."""
    g = torch.Generator().manual_seed(seed)
    q_s, k_s = (torch.randn(frames, tokens, heads * d, generator=g) * 0.5 for _ in range(2))
    k_e = k_s + 0.2 * torch.randn(k_s.shape, generator=g)
    amount = torch.linspace(0, 2.5, tokens)[None, :, None]  # from queries the edit keeps to ones it changes
    q_e = q_s + amount * torch.randn(q_s.shape, generator=g)
    v_e = torch.randn(frames, tokens, heads * d, generator=g)
    return q_e, k_e, v_e, q_s, k_s


@needs_kernel
@pytest.mark.parametrize(
    ("frames", "tokens", "heads", "d"), [(3, 64, 2, 16), (2, 200, 5, 64), (1, 24, 1, 32)]
)
def test_kernel_equals_the_fp32_reference(frames, tokens, heads, d):
    q_e, k_e, v_e, q_s, k_s = _inputs(frames, tokens, heads, d)
    tau = frame_thresholds(frames, (0.2, 0.5))
    assert native.fits(q_e, k_e, heads)
    ref = spatial_match_reference(q_e, k_e, v_e, q_s, k_s, heads, tau)
    got = spatial_match(q_e, k_e, v_e, q_s, k_s, heads, tau)
    diff = ref[1]
    assert bool((diff.amin(1) < tau).all() and (diff.amax(1) > tau).all())  # both sides of each frame's τ
    torch.testing.assert_close(got[0], ref[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got[2], ref[2], atol=2e-6, rtol=1e-5)


@needs_kernel
def test_spatial_match_takes_the_kernel_on_cpu_and_torch_blocks_when_asked():
    q_e, k_e, v_e, q_s, k_s = _inputs(2, 64, 2, 16)
    tau = frame_thresholds(2, (0.35, 0.35))
    heads_split = [split_heads(t, 2) for t in (q_e, k_e, v_e, q_s, k_s)]
    out_h, d_k, w_k = native.spatial_match_native(*heads_split, tau)
    out, d_, w_ = spatial_match(q_e, k_e, v_e, q_s, k_s, 2, tau)
    assert (
        torch.equal(out, out_h.transpose(1, 2).flatten(2)) and torch.equal(d_, d_k) and torch.equal(w_, w_k)
    )
    blocks = spatial_match(q_e, k_e, v_e, q_s, k_s, 2, tau, query_chunk=16)
    assert not torch.equal(blocks[0], out)  # another order of sums: a path of its own
    torch.testing.assert_close(blocks[0], out, atol=2e-6, rtol=1e-5)


@needs_kernel
def test_kernel_gives_the_same_bits_whatever_the_thread_count():
    q_e, k_e, v_e, q_s, k_s = _inputs(3, 128, 2, 16, seed=1)
    tau = frame_thresholds(3, (0.2, 0.5))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = spatial_match(q_e, k_e, v_e, q_s, k_s, 2, tau)
        torch.set_num_threads(3)
        three = spatial_match(q_e, k_e, v_e, q_s, k_s, 2, tau)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, three))


@needs_kernel
def test_kernel_matching_a_source_against_itself_is_plain_attention():
    q, k, v, _, _ = _inputs(2, 96, 2, 16, seed=2)
    tau = frame_thresholds(2, (0.35, 0.35))
    out, diff, weight = spatial_match(q, k, v, q, k, 2, tau)
    assert float(diff.max()) < 1e-6 and float(weight.max()) < 1e-6
    torch.testing.assert_close(out, sdpa_attention(q, k, v, 2), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_kernel_takes_half_precision_inputs_and_returns_their_dtype():
    q_e, k_e, v_e, q_s, k_s = _inputs(2, 64, 2, 16, seed=3)
    tau = frame_thresholds(2, (0.35, 0.35))
    half = [t.to(torch.bfloat16) for t in (q_e, k_e, v_e, q_s, k_s)]
    ref = spatial_match_reference(*[t.float() for t in half], 2, tau)
    got = spatial_match(*half, 2, tau)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0].float(), ref[0], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got[1], ref[1], atol=2e-6, rtol=1e-5)


def test_layers_the_kernel_cannot_take_stay_on_torch():
    def fits(q: torch.Tensor, k: torch.Tensor | None = None) -> bool:
        return native.fits(q, q if k is None else k, 2)

    assert not fits(torch.zeros(2, 12, 32))  # 12 tokens: not a whole number of 8-key vectors
    assert not fits(torch.zeros(2, 16, 16))  # heads of width 8
    assert not fits(torch.zeros(2, 16, 32, device="meta"))
    assert not fits(torch.zeros(2, 16, 32), torch.zeros(2, 24, 32))  # not self-attention
    assert fits(torch.zeros(2, 16, 32))


@needs_kernel
def test_kernel_refuses_thresholds_that_are_not_one_per_frame():
    q_e, k_e, v_e, q_s, k_s = (split_heads(t, 2) for t in _inputs(3, 64, 2, 16))
    with pytest.raises(I2VEditError, match="one threshold per frame: 3, got 2"):
        native.spatial_match_native(q_e, k_e, v_e, q_s, k_s, torch.full((2,), 0.35))


def test_the_switch_turns_the_kernel_off():
    env = {**os.environ, native.ENV_SWITCH: "0"}
    code = "from i2vedit.method import native; print(native.unavailable_reason())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fmt: skip
    assert done.stdout.strip() == f"turned off ({native.ENV_SWITCH}=0)"
