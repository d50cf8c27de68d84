"""Host-free maths of attention matching: chunked vs reference vs a per-query loop, schedules, controller."""

from __future__ import annotations

import math

import pytest
import torch

from i2vedit.errors import I2VEditError
from i2vedit.method.attention import (
    apply_probs,
    attention_probs,
    explicit_attention,
    frame_thresholds,
    sdpa_attention,
    spatial_match,
    spatial_match_reference,
)
from i2vedit.method.controller import (
    STAGE2_LAYERS,
    AttentionController,
    AttnCall,
    MatchConfig,
    StepCapture,
    chunk_kinds,
    paired_step,
    temporal_injection_layers,
)
from i2vedit.svd import POSITIONS


def _qkv(frames, tokens, heads, d, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(frames, tokens, heads * d, generator=g) * s for s in (scale, scale, 1.0)]


def _straddling_inputs(frames=3, tokens=48, heads=2, d=8):
    """Source and edit Q/K whose per-query difference spans both sides of τ = 0.35."""
    q_s, k_s, _ = _qkv(frames, tokens, heads, d, 0)
    q_e, _k_e, v_e = _qkv(frames, tokens, heads, d, 1)
    # the edit's queries move away from the source's by an amount that grows with the token index
    amount = torch.linspace(0.0, 1.0, tokens).view(1, tokens, 1)
    q_e = q_s * (1 - amount) + q_e * amount
    return q_e, k_s.clone(), v_e, q_s, k_s


def _loop_reference(q_e, k_e, v_e, q_s, k_s, heads, tau):
    """The formula of method.md §4.2 written one frame and one query at a time."""
    frames, tokens, inner = q_e.shape
    d = inner // heads
    out = torch.zeros_like(v_e)
    diff = torch.zeros(frames, tokens)
    for f in range(frames):
        for i in range(tokens):
            ps, pe = [], []
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                pe.append(torch.softmax(k_e[f, :, sl] @ q_e[f, i, sl] / math.sqrt(d), 0))
                ps.append(torch.softmax(k_s[f, :, sl] @ q_s[f, i, sl] / math.sqrt(d), 0))
            dist = sum((a - b).abs().sum() for a, b in zip(ps, pe)) / heads
            dist = min(max(float(dist), 0.0), 2.0) / 2
            m = 1.0 if dist >= float(tau[f]) else dist
            diff[f, i] = dist
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                out[f, i, sl] = ((1 - m) * ps[h] + m * pe[h]) @ v_e[f, :, sl]
    return out, diff


def test_reference_equals_the_formula_query_by_query_and_difference_straddles_tau():
    q_e, k_e, v_e, q_s, k_s = _straddling_inputs()
    tau = frame_thresholds(3, (0.35, 0.35))
    out, diff, weight = spatial_match_reference(q_e, k_e, v_e, q_s, k_s, 2, tau)
    loop_out, loop_diff = _loop_reference(q_e, k_e, v_e, q_s, k_s, 2, tau)
    torch.testing.assert_close(diff, loop_diff, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, loop_out, atol=1e-5, rtol=1e-5)
    below = (diff > 0.01) & (diff < 0.35)
    assert below.sum() > 10 and (diff >= 0.35).sum() > 10, "test input must straddle τ"
    assert torch.equal(weight[below], diff[below]) and bool((weight[diff >= 0.35] == 1).all())


@pytest.mark.parametrize("chunk", [1, 7, 48, 100, 1024])
def test_chunked_matching_equals_fp32_reference(chunk):
    q_e, k_e, v_e, q_s, k_s = _straddling_inputs()
    tau = frame_thresholds(3, (0.2, 0.5))
    ref = spatial_match_reference(q_e, k_e, v_e, q_s, k_s, 2, tau)
    got = spatial_match(q_e, k_e, v_e, q_s, k_s, 2, tau, query_chunk=chunk)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_chunked_matching_in_half_precision_stays_close_to_the_reference():
    q_e, k_e, v_e, q_s, k_s = _straddling_inputs()
    tau = frame_thresholds(3, (0.35, 0.35))
    ref, _, _ = spatial_match_reference(q_e, k_e, v_e, q_s, k_s, 2, tau)
    half = [t.to(torch.bfloat16) for t in (q_e, k_e, v_e, q_s, k_s)]
    got, _, _ = spatial_match(*half, 2, tau, query_chunk=16)
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_matching_a_source_against_itself_is_plain_attention():
    q, k, v = _qkv(4, 32, 2, 8, 3)
    tau = frame_thresholds(4, (0.35, 0.35))
    out, diff, weight = spatial_match(q, k, v, q, k, 2, tau, query_chunk=10)
    assert float(diff.max()) < 1e-6 and float(weight.max()) < 1e-6
    torch.testing.assert_close(out, sdpa_attention(q, k, v, 2), atol=1e-5, rtol=1e-5)


def test_tau_zero_hands_everything_to_the_edit_and_tau_one_is_soft_everywhere():
    q_e, k_e, v_e, q_s, k_s = _straddling_inputs()
    zero = frame_thresholds(3, (0.0, 0.0))
    out, _, weight = spatial_match(q_e, k_e, v_e, q_s, k_s, 2, zero)
    assert bool((weight == 1).all())
    torch.testing.assert_close(out, explicit_attention(q_e, k_e, v_e, 2), atol=1e-5, rtol=1e-5)
    one = frame_thresholds(3, (1.0, 1.0))
    _, diff, weight = spatial_match(q_e, k_e, v_e, q_s, k_s, 2, one)
    assert torch.equal(weight, diff)


def test_frame_thresholds_ramp_linearly_over_frames():
    assert torch.allclose(frame_thresholds(4, (0.2, 0.6)), torch.tensor([0.2, 0.3, 0.4, 0.5]))
    assert torch.equal(frame_thresholds(3, (0.35, 0.35)), torch.full((3,), 0.35))


def test_stage_layer_sets_follow_the_paper_and_the_authors_code():
    by_name = {(p.level, p.pos): p.index for p in POSITIONS}
    paper = {by_name[k] for k in [("down", 4), ("down", 5), ("mid", 0), ("up", 0), ("up", 1), ("up", 2)]}
    assert STAGE2_LAYERS["paper"] == paper
    assert STAGE2_LAYERS["authors"] == paper - {by_name[("up", 2)]}


@pytest.mark.parametrize(("preset", "b1", "b2"), [("local", 12, 20), ("style", 20, 22), ("shape", 10, 12)])
def test_temporal_injection_schedule_of_each_preset(preset, b1, b2):
    cfg = MatchConfig.preset(preset)
    everything = frozenset(range(16))
    got = [temporal_injection_layers(k, 25, cfg) for k in range(25)]
    assert all(g == everything for g in got[:b1])
    assert all(g == STAGE2_LAYERS["paper"] for g in got[b1:b2])
    assert all(g == frozenset() for g in got[b2:])
    authors = MatchConfig.preset(preset, stage2_layers="authors")
    assert temporal_injection_layers(b1, 25, authors) == STAGE2_LAYERS["authors"]


def test_step_pairing_reads_inversion_step_n_minus_1_minus_k():
    assert [paired_step(k, 25) for k in (0, 1, 24)] == [24, 23, 0]
    assert [paired_step(k, 25, offset=1) for k in (0, 1, 24)] == [24, 24, 1]


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"beta": (0.8, 0.5)}, "larger than β2"),
        ({"beta": (-0.1, 0.5)}, "[0, 1]"),
        ({"beta": (0.5, 1.2)}, "[0, 1]"),
        ({"tau": (0.35, 1.5)}, "τ must lie in [0, 1]"),
        ({"tau": (-0.1, 0.3)}, "τ must lie in [0, 1]"),
        ({"stage2_layers": "mine"}, "stage2_layers"),
        ({"query_chunk": 0}, "query_chunk"),
    ],
)
def test_bad_match_settings_are_refused_with_a_clear_error(kw, needle):
    with pytest.raises(I2VEditError, match=None) as e:
        MatchConfig(**kw).validate()
    assert needle in str(e.value)
    with pytest.raises(I2VEditError):
        MatchConfig.preset("portrait")


# ---- the controller on synthetic calls --------------------------------------------------------------


def _temporal_call(index, chunks):
    return AttnCall(index, True, 2, chunks, sdpa_attention)


def _temporal_inputs(chunks=2, hw=6, frames=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(chunks * hw, frames, 16, generator=g) * s for s in (3.0, 3.0, 1.0)]


@pytest.mark.parametrize("order", [["uncond", "cond"], ["cond", "uncond"]])
def test_stage1_injection_gives_the_cond_chunk_the_source_probabilities_and_leaves_uncond_alone(order):
    q, k, v = _temporal_inputs()
    src_q, src_k, _ = _temporal_inputs(chunks=1, seed=5)
    src_probs = attention_probs(src_q, src_k, 2)
    ref = StepCapture(temporal={3: src_probs})
    ctrl = AttentionController(config=MatchConfig())
    ctrl.begin_step(0, 25, reference=ref)
    out = ctrl(q, k, v, _temporal_call(3, order))
    plain = sdpa_attention(q, k, v, 2)
    c = order.index("cond")
    rows = slice(c * 6, (c + 1) * 6)
    other = slice((1 - c) * 6, (2 - c) * 6)
    assert torch.equal(out[other], plain[other])
    torch.testing.assert_close(out[rows], apply_probs(src_probs, v[rows], 2), atol=0, rtol=0)
    assert not torch.allclose(out[rows], plain[rows], atol=1e-3)
    ctrl.begin_step(20, 25, reference=ref)  # stage 3 of the local preset: nothing injected
    assert torch.equal(ctrl(q, k, v, _temporal_call(3, order)), plain)


def test_stage2_injects_only_coarse_layers():
    q, k, v = _temporal_inputs(chunks=1)
    src_q, src_k, _ = _temporal_inputs(chunks=1, seed=5)
    ref = StepCapture(temporal={i: attention_probs(src_q, src_k, 2) for i in range(16)})
    ctrl = AttentionController(config=MatchConfig(), capture=set())
    ctrl.begin_step(15, 25, reference=ref)
    plain = sdpa_attention(q, k, v, 2)
    changed = {i for i in range(16) if not torch.equal(ctrl(q, k, v, _temporal_call(i, ["cond"])), plain)}
    assert changed == STAGE2_LAYERS["paper"]


def test_kv_concatenation_with_the_clips_own_kv_changes_nothing_and_other_kv_change_it():
    q, k, v = _temporal_inputs()
    call = _temporal_call(2, ["uncond", "cond"])
    own = StepCapture(kv={2: {"uncond": (k[:6], v[:6]), "cond": (k[6:], v[6:])}})
    ctrl = AttentionController()
    ctrl.begin_step(0, 25, skip_kv=own)
    torch.testing.assert_close(ctrl(q, k, v, call), sdpa_attention(q, k, v, 2), atol=1e-6, rtol=1e-5)
    k2, v2 = _temporal_inputs(seed=9)[1:]
    other = StepCapture(kv={2: {"uncond": (k2[:6, :3], v2[:6, :3]), "cond": (k2[6:, :3], v2[6:, :3])}})
    ctrl.begin_step(0, 25, skip_kv=other)
    out = ctrl(q, k, v, call)
    assert out.shape == q.shape
    assert (out - sdpa_attention(q, k, v, 2)).abs().max() > 1e-2
    # the uncond chunk attends to the uncond K/V: swapping the cached branches changes it
    swapped = StepCapture(kv={2: {"uncond": other.kv[2]["cond"], "cond": other.kv[2]["uncond"]}})
    ctrl.begin_step(0, 25, skip_kv=swapped)
    assert not torch.allclose(ctrl(q, k, v, call)[:6], out[:6])


def test_capture_records_the_cond_chunk_and_own_kv_before_concatenation():
    q, k, v = _temporal_inputs()
    call = _temporal_call(1, ["uncond", "cond"])
    extra = StepCapture(kv={1: {"uncond": (k[:6, :2], v[:6, :2]), "cond": (k[6:, :2], v[6:, :2])}})
    ctrl = AttentionController(capture={"temporal", "kv"}, store_dtype=torch.float16)
    ctrl.begin_step(0, 25, skip_kv=extra)
    ctrl(q, k, v, call)
    cap = ctrl.take()
    assert cap.kv[1]["cond"][0].dtype == torch.float16
    assert torch.equal(cap.kv[1]["cond"][0].float(), k[6:].half().float())
    kk = torch.cat([k[6:, :2], k[6:]], 1)
    expected = attention_probs(q[6:], kk, 2)
    assert cap.temporal[1].shape == (6, 2, 4, 6)
    torch.testing.assert_close(cap.temporal[1].float(), expected, atol=1e-3, rtol=0)
    assert ctrl.take().tensors() == []  # take() hands the step over once


def test_chunk_kinds_follow_the_hosts_order():
    assert chunk_kinds([1, 0], 10) == ["uncond", "cond"]
    assert chunk_kinds(None, 3) == ["cond"]
    with pytest.raises(I2VEditError, match="cannot split"):
        chunk_kinds([1, 0], 9)


def test_kv_source_of_another_resolution_is_refused():
    q, k, v = _temporal_inputs()
    bad = StepCapture(kv={0: {"uncond": (k[:3], v[:3]), "cond": (k[:3], v[:3])}})
    ctrl = AttentionController()
    ctrl.begin_step(0, 25, skip_kv=bad)
    with pytest.raises(I2VEditError, match="same resolution"):
        ctrl(q, k, v, _temporal_call(0, ["uncond", "cond"]))
