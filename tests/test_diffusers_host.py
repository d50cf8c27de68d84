"""The diffusers host on a tiny random-weight SVD of the real diffusers architectures."""

import copy

import pytest
import torch

from i2vedit.errors import I2VEditError
from i2vedit.host import CFGDenoiser, SVDHost, cfg_ramp
from i2vedit.hosts.diffusers.tiny import build_tiny_diffusers_host
from i2vedit.method import samplers, schedules
from i2vedit.svd import LATENT_SCALE, SVDCond, TimeIds

F, H, W = 5, 64, 96


def moving_pattern(frames: int = F) -> torch.Tensor:
    t = torch.linspace(0, 1, frames)[:, None, None]
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    return torch.stack([0.5 + 0.4 * torch.sin(6 * xx + 3 * t + c) * torch.cos(4 * yy) for c in range(3)], -1)


@pytest.fixture(scope="module")
def setup(tiny_diffusers_host):
    h = tiny_diffusers_host
    frames = moving_pattern()
    z0 = h.vae_encode(frames) * LATENT_SCALE
    cond = SVDCond(h.encode_clip(frames[:1]), h.vae_encode(frames[:1]), TimeIds(8, 127, 0.02))
    return h, z0, cond


def round_trip(host, z0, cond, steps):
    x_t = host.sample(
        samplers.sample_euler_inversion, z0, schedules.inversion_sigmas(steps), cond, disable=True
    )
    back = host.sample(
        samplers.sample_euler_denoise, x_t, schedules.denoise_sigmas(steps), cond, disable=True
    )
    return x_t, back


def test_builds_are_seeded(tiny_diffusers_host):
    same = build_tiny_diffusers_host(seed=0).unet.state_dict()
    other = build_tiny_diffusers_host(seed=1).unet.state_dict()
    ref = tiny_diffusers_host.unet.state_dict()
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert not all(torch.equal(ref[k], other[k]) for k in ref)
    assert isinstance(tiny_diffusers_host, SVDHost)


def test_batched_denoise_equals_separate_calls(setup):
    h, z0, cond = setup
    x = z0 + 3.0 * torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    both = h.denoise(x, 3.0, [cond.unconditional(), cond])
    torch.testing.assert_close(both[0], h.denoise(x, 3.0, [cond.unconditional()])[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[1], h.denoise(x, 3.0, [cond])[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(both[0], both[1])  # conditioning matters


def options_seen(h):
    """The ``transformer_options`` the UNet's processors see in each call (the host clears them after)."""
    seen = []
    handle = h.unet.register_forward_pre_hook(lambda module, args: seen.append(dict(h.transformer_options)))
    return seen, handle


def test_per_frame_cfg(setup):
    h, z0, cond = setup
    x = z0 * 5
    scales = cfg_ramp(F, 1.0, 2.0)
    out = CFGDenoiser(h, cond, cond.unconditional(), scales)(x, torch.full((F,), 5.0))
    seen, handle = options_seen(h)
    try:
        u, c = h.denoise(x, 5.0, [cond.unconditional(), cond])
    finally:
        handle.remove()
    torch.testing.assert_close(out, u + scales.view(-1, 1, 1, 1) * (c - u), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0], c[0], rtol=1e-5, atol=1e-6)  # scale 1 on the first frame
    assert seen[-1]["cond_or_uncond"] == [1, 0] and h.transformer_options == {}


def test_zero_output_unet_is_the_exact_preconditioned_denoiser(setup):
    h, z0, cond = setup
    zero = copy.copy(h)
    zero.unet = copy.deepcopy(h.unet)
    with torch.no_grad():
        zero.unet.conv_out.weight.zero_()
        zero.unet.conv_out.bias.zero_()
    for sigma in (0.002, 1.0, 700.0):
        torch.testing.assert_close(
            zero.denoise(z0, sigma, [cond])[0], z0 / (sigma**2 + 1), rtol=1e-6, atol=1e-7
        )
    # Round trip against the closed-form Euler recursion for D = x/(σ²+1).
    steps = 25
    inv, den = schedules.inversion_sigmas(steps), schedules.denoise_sigmas(steps)
    factor = 1.0
    for i in range(steps):
        s, s_next = inv[i].item(), inv[i + 1].item()
        factor *= 1 + (s_next - s) * s / (s**2 + 1)
    x_t, back = round_trip(zero, z0, cond, steps)
    torch.testing.assert_close(x_t, z0 * factor, rtol=1e-4, atol=1e-4)
    for i in range(steps):
        s, s_next = den[i].item(), den[i + 1].item()
        factor *= 1 + (s_next - s) * s / (s**2 + 1) if s_next > 0 else 1 / (s**2 + 1)
    torch.testing.assert_close(back, z0 * factor, rtol=1e-4, atol=1e-5)


def test_inversion_round_trip_error_falls_with_steps(setup):
    h, z0, cond = setup
    errors = {}
    for steps in (10, 25, 50):
        x_t, back = round_trip(h, z0, cond, steps)
        errors[steps] = ((back - z0).norm() / z0.norm()).item()
        assert torch.isfinite(x_t).all()
        assert 0.2 < x_t.std().item() / 700 < 2.0  # noise-like at σ_max
    assert errors[10] > errors[25] > errors[50], errors


def test_sampler_steps_reach_the_host(setup):
    h, z0, cond = setup
    seen, handle = options_seen(h)
    try:
        h.sample(samplers.sample_euler_inversion, z0, schedules.inversion_sigmas(3), cond, disable=True)
    finally:
        handle.remove()
    opts = seen[-1]
    assert (opts["i2v_phase"], opts["i2v_step"], opts["i2v_steps"]) == ("invert", 2, 3)
    assert opts["cond_or_uncond"] == [0]


def test_vae_and_clip(tiny_diffusers_host):
    h = tiny_diffusers_host
    frames = moving_pattern(3)
    mode = h.vae_encode(frames)
    assert mode.shape == (3, 4, H // 8, W // 8)
    torch.testing.assert_close(h.vae_encode(frames), mode)
    a = h.vae_encode(frames, sample=True, generator=torch.Generator().manual_seed(0))
    b = h.vae_encode(frames, sample=True, generator=torch.Generator().manual_seed(0))
    c = h.vae_encode(frames, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    decoded = h.vae_decode(mode, chunk=2)
    assert decoded.shape == (3, H, W, 3) and decoded.min() >= 0 and decoded.max() <= 1
    assert h.encode_clip(frames).shape == (3, 1, 64)


def test_conditioning_that_does_not_fit_is_rejected(setup):
    h, z0, cond = setup
    wrong_size = SVDCond(cond.clip_embed, torch.zeros(1, 4, 4, 4))
    with pytest.raises(I2VEditError, match="does not fit"):
        h.denoise(z0, 1.0, [wrong_size])
    wrong_frames = SVDCond(cond.clip_embed, torch.zeros(3, 4, H // 8, W // 8))
    with pytest.raises(I2VEditError, match="frames"):
        h.denoise(z0, 1.0, [wrong_frames])
    with pytest.raises(I2VEditError, match="CFG scales"):
        CFGDenoiser(h, cond, cond.unconditional(), cfg_ramp(F + 1))(z0, torch.ones(F))


def test_the_attention_controller_is_let_go_after_a_call_and_after_a_failing_call(setup):
    """The host used to keep the last call's controller (and the capture and K/V it holds) alive."""
    import gc
    import weakref

    from i2vedit.method.controller import AttentionController
    from i2vedit.method.inversion import step_options

    h, z0, cond = setup
    ctrl = AttentionController({"kv"})
    ctrl.begin_step(0, 1)
    h.denoise(z0, 1.0, [cond], step_options(ctrl, 0, 1, "invert"))
    assert ctrl.take().kv, "the controller must have been called"
    ref = weakref.ref(ctrl)
    del ctrl
    gc.collect()
    assert ref() is None

    class Failing(AttentionController):
        def __call__(self, *args, **kw):
            raise RuntimeError("boom")

    bad = Failing(set())
    bad.begin_step(0, 1)
    with pytest.raises(RuntimeError, match="boom"):
        h.denoise(z0, 1.0, [cond], step_options(bad, 0, 1, "invert"))
    ref = weakref.ref(bad)
    del bad
    gc.collect()
    assert ref() is None


def test_low_memory_runs_one_conditioning_per_unet_call_with_the_same_matched_result():
    """``low_memory``: a matched CFG step's rows one after the other (the VAE and CLIP offload moves
    modules between devices, which only a GPU run shows: ``bench gpu --low-memory``)."""
    from i2vedit.method.inversion import invert
    from i2vedit.method.matching import MatchedClip, matched_denoise
    from i2vedit.method.skip_interval import EditKV, SourceKV

    host = build_tiny_diffusers_host(seed=0)
    frames = moving_pattern()
    z = host.vae_encode(frames) * LATENT_SCALE
    cond = SVDCond(host.encode_clip(frames[:1]), host.vae_encode(frames[:1]), TimeIds(8, 127, 0.02))
    edit = SVDCond(host.encode_clip(frames[-1:]), host.vae_encode(frames[-1:]), TimeIds(6, 127, 0.02))

    def two_clips():
        inv1 = invert(host, z, cond, steps=3)
        clip1 = MatchedClip(host, inv1, edit)
        res1 = clip1.run()
        inv2 = invert(host, z[:3], cond, steps=3, skip_kv=SourceKV(host, inv1))
        return res1.latents, matched_denoise(host, inv2, edit, skip_kv=EditKV(clip1, res1)).latents

    batched = two_clips()
    rows: list[int] = []
    hook = host.unet.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    host.low_memory()
    try:
        one_by_one = two_clips()
        assert rows and set(rows) == {1}
    finally:
        hook.remove()
        host.low_memory(False)
    assert host.rows_per_call is None and not host.offload_aux
    for a, b in zip(one_by_one, batched):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_vae_encoder_in_chunks_gives_the_same_latents_and_the_same_sample(tiny_diffusers_host):
    host = copy.copy(tiny_diffusers_host)  # the same modules; the chunk setting on the copy only
    frames = moving_pattern()
    whole = host.vae_encode(frames), host.vae_encode(frames, True, torch.Generator().manual_seed(3))
    host.encode_chunk = 2
    chunked = host.vae_encode(frames), host.vae_encode(frames, True, torch.Generator().manual_seed(3))
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.equal(whole[0], whole[1])  # the sample is not the mode
