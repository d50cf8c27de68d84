"""Attention control inside a real ComfyUI (COMFYUI_PATH): patch counts, untouched MODEL, cross-host agreement."""

from __future__ import annotations

import pytest
import torch
from conftest import align_groupnorm_eps, sharpen_self_attention

from i2vedit.method.controller import CONTROLLER_KEY, AttentionController, MatchConfig
from i2vedit.method.inversion import invert
from i2vedit.method.matching import MatchedClip, matched_denoise
from i2vedit.method.skip_interval import EditKV, SourceKV
from i2vedit.svd import SVDCond, TimeIds

pytestmark = pytest.mark.usefixtures("comfy")
F, h, w = 4, 8, 16


@pytest.fixture(scope="module")
def hosts(comfy):
    from fixtures.tiny_comfy import build_tiny_comfy_host

    from i2vedit.hosts.diffusers.tiny import build_tiny_diffusers_host

    comfy_host = sharpen_self_attention(build_tiny_comfy_host(seed=0))
    diffusers_host = align_groupnorm_eps(sharpen_self_attention(build_tiny_diffusers_host(seed=0)))
    return comfy_host, diffusers_host


def _cond(seed):
    g = torch.Generator().manual_seed(seed)
    return SVDCond(
        torch.randn(1, 1, 64, generator=g), torch.randn(1, 4, h, w, generator=g), TimeIds(6, 127, 0.02)
    )


class CountingController(AttentionController):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __call__(self, q, k, v, call):
        self.calls.append((call.index, call.temporal, tuple(call.chunks), tuple(q.shape)))
        return super().__call__(q, k, v, call)


def test_each_model_call_fires_16_spatial_and_16_temporal_self_attention_patches(hosts):
    comfy_host, _ = hosts
    ctrl = CountingController()
    x = torch.randn(F, 4, h, w)
    cond = _cond(1)
    comfy_host.denoise(x, 2.0, [cond.unconditional(), cond], {CONTROLLER_KEY: ctrl})
    spatial = [c for c in ctrl.calls if not c[1]]
    temporal = [c for c in ctrl.calls if c[1]]
    assert sorted(c[0] for c in spatial) == list(range(16)) and sorted(c[0] for c in temporal) == list(
        range(16)
    )
    # spatial rows are chunks·frames, temporal rows chunks·h·w (told apart by the tag, not by shape)
    assert all(c[3][0] == 2 * F for c in spatial) and all(c[3][1] == F for c in temporal)
    assert all(sorted(c[2]) == ["cond", "uncond"] for c in ctrl.calls)  # ComfyUI's order, read from the call


def test_the_users_model_is_never_patched(hosts):
    comfy_host, _ = hosts
    ctrl = AttentionController({"spatial"})
    ctrl.begin_step(0, 1)
    comfy_host.denoise(torch.randn(F, 4, h, w), 2.0, [_cond(1)], {CONTROLLER_KEY: ctrl})
    assert len(ctrl.take().spatial) == 16
    user = comfy_host.patcher
    assert "patches_replace" not in user.model_options.get("transformer_options", {})
    assert not user.object_patches
    controlled = comfy_host.controlled_patcher
    assert len(controlled.model_options["transformer_options"]["patches_replace"]["attn1"]) == 16
    assert len(controlled.object_patches) == 16


def test_both_hosts_give_the_same_matched_output_on_identical_weights(hosts):
    comfy_host, diffusers_host = hosts
    assert comfy_host.fingerprint() == diffusers_host.fingerprint()
    z = torch.randn(F, 4, h, w, generator=torch.Generator().manual_seed(3))
    z2 = torch.randn(3, 4, h, w, generator=torch.Generator().manual_seed(4))
    src, edit, src2, edit2 = (_cond(s) for s in (1, 2, 3, 4))
    out = {}
    for name, host in (("comfy", comfy_host), ("diffusers", diffusers_host)):
        inv1 = invert(host, z, src, steps=3)
        clip1 = MatchedClip(host, inv1, edit, config=MatchConfig.preset("shape"))
        res1 = clip1.run()
        inv2 = invert(host, z2, src2, steps=3, skip_kv=SourceKV(host, inv1))
        res2 = matched_denoise(host, inv2, edit2, skip_kv=EditKV(clip1, res1))
        out[name] = (res1, res2)
    for a, b in zip(out["comfy"], out["diffusers"]):
        scale = float(b.latents.abs().max())
        assert (a.latents - b.latents).abs().max() < 1e-4 * scale
        torch.testing.assert_close(a.masks, b.masks, atol=1e-4, rtol=0)
