"""Attention matching and skip-interval K/V on real tiny SVDs: diffusers always, ComfyUI where one is found."""

from __future__ import annotations

import pytest
import torch
from conftest import sharpen_self_attention

from i2vedit.errors import I2VEditError
from i2vedit.method import samplers
from i2vedit.method.controller import CONTROLLER_KEY, AttentionController, MatchConfig
from i2vedit.method.inversion import invert, replay_source
from i2vedit.method.matching import MatchedClip, matched_denoise
from i2vedit.method.skip_interval import EditKV, SourceKV
from i2vedit.svd import SVDCond, TimeIds

F, h, w = 4, 8, 16
STEPS = 5


@pytest.fixture(scope="module", params=["diffusers", "comfyui"])
def host(request):
    if request.param == "diffusers":
        from i2vedit.hosts.diffusers.tiny import build_tiny_diffusers_host

        return sharpen_self_attention(build_tiny_diffusers_host(seed=0))
    request.getfixturevalue("comfy")
    from fixtures.tiny_comfy import build_tiny_comfy_host

    return sharpen_self_attention(build_tiny_comfy_host(seed=0))


def _cond(seed: int, frames_latent: int = 1, hw=(h, w)) -> SVDCond:
    g = torch.Generator().manual_seed(seed)
    return SVDCond(
        torch.randn(1, 1, 64, generator=g),
        torch.randn(frames_latent, 4, *hw, generator=g),
        TimeIds(6, 127, 0.02),
    )


@pytest.fixture(scope="module")
def clip():
    g = torch.Generator().manual_seed(7)
    return torch.randn(F, 4, h, w, generator=g), _cond(1), _cond(2)  # latents, source cond, edit cond


@pytest.fixture(scope="module")
def inversions(host, clip):
    z, src, _ = clip
    return {m: invert(host, z, src, steps=STEPS, mode=m, capture_kv=True) for m in ("recompute", "cache")}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _opts(ctrl):
    return {CONTROLLER_KEY: ctrl}


def test_matching_a_source_against_itself_equals_plain_attention(host, clip):
    z, src, _ = clip
    sigma = 3.87
    capture = AttentionController({"spatial", "temporal"})
    capture.begin_step(0, STEPS)
    plain_with_capture = host.denoise(z, sigma, [src], _opts(capture))
    reference = capture.take()
    assert len(reference.spatial) == 16 and len(reference.temporal) == 16
    plain = host.denoise(z, sigma, [src])
    torch.testing.assert_close(plain_with_capture, plain, atol=0, rtol=0)
    matcher = AttentionController(config=MatchConfig())
    matcher.begin_step(0, STEPS, reference=reference)  # step 0: spatial matching and all temporal layers
    matched = host.denoise(z, sigma, [src], _opts(matcher))
    assert (matched - plain).abs().max() < 1e-5 * max(1.0, float(plain.abs().max()))
    # with CFG the cond chunk is matched and the uncond chunk computes plain attention
    matcher.begin_step(0, STEPS, reference=reference)
    both = host.denoise(z, sigma, [src.unconditional(), src], _opts(matcher))
    plain_both = host.denoise(z, sigma, [src.unconditional(), src])
    assert (both - plain_both).abs().max() < 1e-5 * max(1.0, float(plain_both.abs().max()))


def test_matching_against_another_source_changes_the_cond_branch_only(host, clip):
    z, src, edit = clip
    sigma = 3.87
    capture = AttentionController({"spatial", "temporal"})
    capture.begin_step(0, STEPS)
    host.denoise(z, sigma, [src], _opts(capture))
    matcher = AttentionController(config=MatchConfig())
    matcher.begin_step(0, STEPS, reference=capture.take())
    both = host.denoise(z, sigma, [edit.unconditional(), edit], _opts(matcher))
    plain = host.denoise(z, sigma, [edit.unconditional(), edit])
    assert torch.equal(both[0], plain[0]) or (both[0] - plain[0]).abs().max() < 1e-6
    assert _rel(both[1], plain[1]) > 1e-3


def test_the_inversion_driver_equals_the_k_diffusion_inversion_sampler(host, clip, inversions):
    z, src, _ = clip
    inv = inversions["recompute"]
    ref = host.sample(samplers.sample_euler_inversion, z, inv.sigmas, src, disable=True)
    assert _rel(inv.x_T, ref) < 1e-5
    assert torch.equal(inv.trajectory[0], z) and inv.trajectory.shape == (STEPS + 1, F, 4, h, w)
    # recompute and cache modes ran the same model calls: identical trajectories
    torch.testing.assert_close(inv.trajectory, inversions["cache"].trajectory, atol=0, rtol=0)


def test_replaying_an_inversion_step_recreates_its_capture(host, inversions):
    cached = inversions["cache"].captures[2]
    replayed = replay_source(host, inversions["recompute"], 2, {"spatial", "temporal", "kv"})
    for a, b in zip(cached.tensors(), replayed.tensors()):
        torch.testing.assert_close(a, b.cpu(), atol=1e-6, rtol=1e-5)


def test_cache_mode_equals_recompute_mode(host, clip, inversions):
    _, _, edit = clip
    rec = matched_denoise(host, inversions["recompute"], edit, mode="recompute")
    cache = matched_denoise(host, inversions["cache"], edit, mode="cache")
    torch.testing.assert_close(rec.latents, cache.latents, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rec.masks, cache.masks, atol=1e-6, rtol=1e-5)
    plain = matched_denoise(host, inversions["recompute"], edit, config=None)
    assert _rel(rec.latents, plain.latents) > 1e-3, "matching must change the edit"
    assert plain.masks is None and rec.masks.shape == (F, h, w)
    assert float(rec.masks.min()) >= 0.0 and float(rec.masks.max()) <= 1.0
    frame_masks = rec.frame_masks(8 * h, 8 * w)
    assert frame_masks.shape == (F, 8 * h, 8 * w)
    assert abs(float(frame_masks.mean()) - float(rec.masks.mean())) < 0.05


def test_denoising_the_inversion_with_the_source_frame_reconstructs_the_source(host, clip, inversions):
    z, src, edit = clip
    inv = inversions["recompute"]
    plain = matched_denoise(host, inv, src, config=None, cfg=None)
    matched = matched_denoise(host, inv, src, cfg=None)
    err_plain, err_matched = _rel(plain.latents, z), _rel(matched.latents, z)
    print(f"\n[{type(host).__name__}] reconstruction error plain {err_plain:.4f} matched {err_matched:.4f}")
    # a trivial "reconstruction" (the inversion's own x_T, denoised by nothing) is far worse
    assert err_plain < 0.5 * _rel(torch.zeros_like(z), z) + 0.5
    assert err_matched <= err_plain * 1.05 + 1e-3
    # the source frame is treated as (almost) unedited, a different first frame much more so
    edited = matched_denoise(host, inv, edit, cfg=None)
    assert float(matched.masks.mean()) < float(edited.masks.mean())


def test_skip_interval_kv_cache_equals_recompute_and_changes_the_second_clip(host, clip):
    z, src, edit = clip
    g = torch.Generator().manual_seed(11)
    z2 = torch.randn(3, 4, h, w, generator=g)  # a later clip may have another frame count
    src2, edit2 = _cond(3), _cond(4)
    results = {}
    for mode in ("recompute", "cache"):
        inv1 = invert(host, z, src, steps=3, mode=mode, capture_kv=True)
        clip1 = MatchedClip(host, inv1, edit, mode=mode)
        res1 = clip1.run(capture_kv=True)
        inv2 = invert(host, z2, src2, steps=3, mode=mode, skip_kv=SourceKV(host, inv1))
        res2 = matched_denoise(host, inv2, edit2, mode=mode, skip_kv=EditKV(clip1, res1))
        results[mode] = (inv2, res2)
    torch.testing.assert_close(
        results["recompute"][0].trajectory, results["cache"][0].trajectory, atol=1e-6, rtol=1e-5
    )
    torch.testing.assert_close(
        results["recompute"][1].latents, results["cache"][1].latents, atol=1e-6, rtol=1e-5
    )
    assert results["recompute"][1].latents.shape == z2.shape
    alone = matched_denoise(host, invert(host, z2, src2, steps=3), edit2)
    assert _rel(results["recompute"][1].latents, alone.latents) > 1e-3


def test_a_matched_step_costs_three_model_rows_and_a_later_clips_six(host, clip, monkeypatch):
    """Source replay + CFG; a later clip adds the first clip's step, whose one source replay also gives
    the K/V the later clip's source replay attends to (not replayed a second time)."""
    z, src, edit = clip
    inv1 = invert(host, z, src, steps=3)
    clip1 = MatchedClip(host, inv1, edit)
    res1 = clip1.run()
    inv2 = invert(host, z[:3], _cond(3), steps=3, skip_kv=SourceKV(host, inv1))
    clip2 = MatchedClip(host, inv2, _cond(4), skip_kv=EditKV(clip1, res1))
    rows = []
    real = host.denoise
    monkeypatch.setattr(
        host, "denoise", lambda x, s, conds, *a, **k: rows.append(len(conds)) or real(x, s, conds, *a, **k)
    )
    for k in range(3):
        rows.clear()
        clip1.denoised(k, res1.trajectory[k])
        assert sum(rows) == 3
        rows.clear()
        clip2.denoised(k, inv2.x_T)
        assert sum(rows) == 6, rows


def test_the_fused_spatial_kernel_gives_the_fp32_reference_result_over_two_chained_clips(
    host, clip, monkeypatch
):
    """The flash-and-row-statistics kernel against every map materialised, through whole matched runs."""
    from i2vedit.method import attention, controller

    z, src, edit = clip
    g = torch.Generator().manual_seed(12)
    z2 = torch.randn(3, 4, h, w, generator=g)

    def two_clips():
        inv1 = invert(host, z, src, steps=3)
        clip1 = MatchedClip(host, inv1, edit)
        res1 = clip1.run()
        inv2 = invert(host, z2, _cond(3), steps=3, skip_kv=SourceKV(host, inv1))
        return res1, matched_denoise(host, inv2, _cond(4), skip_kv=EditKV(clip1, res1))

    fused = two_clips()
    monkeypatch.setattr(
        controller,
        "spatial_match",
        lambda q_e, k_e, v_e, q_s, k_s, heads, tau, _chunk=None: attention.spatial_match_reference(
            q_e, k_e, v_e, q_s, k_s, heads, tau
        ),
    )
    reference = two_clips()
    for got, ref in zip(fused, reference):
        assert got.masks is not None and ref.masks is not None
        assert _rel(got.latents, ref.latents) < 1e-5
        torch.testing.assert_close(got.masks, ref.masks, atol=1e-5, rtol=1e-5)


def test_kv_concatenation_with_the_clips_own_kv_leaves_the_model_output_unchanged(host, clip):
    z, src, _ = clip
    sigma = 1.27
    conds = [src.unconditional(), src]
    capture = AttentionController({"kv"})
    capture.begin_step(0, 1)
    plain = host.denoise(z, sigma, conds, _opts(capture))
    own = capture.take()
    assert len(own.kv) == 16 and all(set(v) == {"cond", "uncond"} for v in own.kv.values())
    concat = AttentionController()
    concat.begin_step(0, 1, skip_kv=own)
    out = host.denoise(z, sigma, conds, _opts(concat))
    assert (out - plain).abs().max() < 1e-5 * max(1.0, float(plain.abs().max()))


# ---- bad input: clear errors before any model call ---------------------------------------------------


@pytest.fixture()
def no_model_calls(host, monkeypatch):
    calls = []
    real = host.denoise
    monkeypatch.setattr(host, "denoise", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_an_edit_frame_of_another_resolution_is_refused_before_sampling(host, inversions, no_model_calls):
    with pytest.raises(I2VEditError, match="does not fit the inversion"):
        matched_denoise(host, inversions["recompute"], _cond(5, hw=(8, 8)))
    with pytest.raises(I2VEditError, match="does not fit the inversion"):
        matched_denoise(host, inversions["recompute"], _cond(5, frames_latent=F + 1))
    assert no_model_calls == []


def test_an_inversion_from_another_model_is_refused_before_sampling(host, inversions, no_model_calls):
    from i2vedit.hosts.diffusers.tiny import build_tiny_diffusers_host

    other = build_tiny_diffusers_host(seed=1)
    with pytest.raises(I2VEditError, match="another model"):
        matched_denoise(other, inversions["recompute"], _cond(5))
    assert no_model_calls == []


def test_bad_match_settings_and_modes_are_refused_before_sampling(host, clip, inversions, no_model_calls):
    _, _, edit = clip
    with pytest.raises(I2VEditError, match="larger than β2"):
        matched_denoise(host, inversions["recompute"], edit, config=MatchConfig(beta=(0.9, 0.2)))
    with pytest.raises(I2VEditError, match="τ must lie"):
        matched_denoise(host, inversions["recompute"], edit, config=MatchConfig(tau=(0.3, 2.0)))
    with pytest.raises(I2VEditError, match="cache mode needs"):
        matched_denoise(host, inversions["recompute"], edit, mode="cache")
    with pytest.raises(I2VEditError, match="memory mode"):
        matched_denoise(host, inversions["recompute"], edit, mode="disk")
    assert no_model_calls == []


def test_a_kv_source_of_another_resolution_is_refused_before_sampling(host, clip):
    z, src, edit = clip
    small = invert(host, torch.randn(F, 4, 8, 8), _cond(1, hw=(8, 8)), steps=2, mode="cache", capture_kv=True)
    calls = []
    real = host.denoise
    host.denoise = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with pytest.raises(I2VEditError, match="one resolution"):
            invert(host, z, src, steps=2, skip_kv=SourceKV(host, small))
        clip_small = MatchedClip(host, small, _cond(2, hw=(8, 8)), mode="cache")
        res_small = clip_small.run(capture_kv=True)
        inv = invert(host, z, src, steps=2)
        n = len(calls)
        with pytest.raises(I2VEditError, match="skip-interval K/V"):
            matched_denoise(host, inv, edit, skip_kv=EditKV(clip_small, res_small))
        assert len(calls) == n
    finally:
        del host.denoise


def test_source_kv_for_lora_training_picks_the_inversion_step_just_below_sigma(host, inversions):
    from i2vedit.method.schedules import sigma_to_inversion_step

    cached, replayed = SourceKV(host, inversions["cache"]), SourceKV(host, inversions["recompute"])
    assert cached.cached and not replayed.cached
    sigma = 2.0
    step = sigma_to_inversion_step(sigma, STEPS)
    assert float(inversions["cache"].sigmas[step]) < sigma < float(inversions["cache"].sigmas[step + 1])
    got, again = cached.for_sigma(sigma), replayed.for_sigma(sigma)
    assert got is inversions["cache"].captures[step]
    for layer in range(16):
        torch.testing.assert_close(
            again.kv[layer]["cond"][0].cpu(), got.kv[layer]["cond"][0], atol=1e-6, rtol=1e-5
        )
