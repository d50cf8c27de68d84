"""Colour anchoring across clips: an injected drift is removed, no drift changes nothing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from i2vedit.errors import I2VEditError
from i2vedit.hosts.diffusers.tiny import build_tiny_diffusers_host
from i2vedit.method.colour import anchor_colours
from i2vedit.run import stages
from i2vedit.run.pipeline import EditSettings, edit_video


def _clip(seed: int = 0) -> torch.Tensor:
    return torch.randn(5, 4, 8, 12, generator=torch.Generator().manual_seed(seed))


def _channel_stats(frame: torch.Tensor) -> torch.Tensor:
    return torch.stack([frame.mean((1, 2)), frame.std((1, 2), unbiased=False)])


def test_a_per_channel_colour_drift_is_removed():
    clip = _clip()
    scale = torch.tensor([1.3, 0.8, 1.0, 1.1])[None, :, None, None]
    shift = torch.tensor([0.4, -0.2, 0.1, 0.0])[None, :, None, None]
    drifted = clip * scale + shift
    anchored = anchor_colours(drifted, clip[0])
    assert float((drifted - clip).abs().max()) > 0.3
    assert float((anchored - clip).abs().max()) < 1e-5


def test_without_drift_the_clip_is_unchanged_bit_for_bit():
    clip = _clip()
    assert torch.equal(anchor_colours(clip, clip[0].clone()), clip)


def test_inside_a_mask_only_the_masked_statistics_are_held_and_outside_nothing_moves():
    clip = _clip()
    mask = torch.zeros(5, 1, 8, 12)
    mask[:, :, 2:6, 3:9] = 1
    drifted = clip + 0.5 * mask  # the drift sits inside the region
    anchored = anchor_colours(drifted, clip[0], mask)
    inside, outside = mask.expand_as(clip) == 1, mask.expand_as(clip) == 0
    assert torch.equal(anchored[outside], drifted[outside])
    assert float((anchored[inside] - clip[inside]).abs().max()) < 1e-5


def test_a_reference_of_another_shape_is_refused():
    with pytest.raises(I2VEditError, match="cannot anchor"):
        anchor_colours(_clip(), torch.zeros(4, 8, 8))


def _edit_latents(reuse, clip: int) -> torch.Tensor:
    (path,) = sorted((reuse / f"clip_{clip:03d}").glob("edit_*.safetensors"))
    return load_file(str(path))["latents"]


@pytest.fixture(scope="module", params=["diffusers", "comfyui"])
def host(request):
    if request.param == "diffusers":
        return build_tiny_diffusers_host(seed=0)
    request.getfixturevalue("comfy")
    from fixtures.tiny_comfy import build_tiny_comfy_host

    return build_tiny_comfy_host(seed=0, with_vae=True)


@pytest.mark.parametrize("anchor", [False, True])
def test_a_drift_injected_into_the_chained_latent_is_held_to_the_previous_clip(
    host, anchor, monkeypatch, tmp_path
):
    real = stages.edit_conditioning

    def drifting(host, edited, ids, g, prev=None):
        cond = real(host, edited, ids, g, prev)
        if prev is not None:  # the chained latent of a later clip, shifted in colour on purpose
            shift = torch.tensor([3.0, -3.0, 2.0, 0.0])[None, :, None, None]
            return dataclasses.replace(cond, concat_latent=cond.concat_latent + shift)
        return cond

    monkeypatch.setattr(stages, "edit_conditioning", drifting)
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(7, 64, 128, 3, generator=g)
    settings = EditSettings(chunk=4, steps=2, lora_steps=0, colour_anchor=anchor)
    edit_video(host, frames, 8.0, [frames[:1].flip(-1)], settings, reuse_dir=tmp_path)
    last_of_first, first_of_second = _edit_latents(tmp_path, 0)[-1], _edit_latents(tmp_path, 1)[0]
    gap = float((_channel_stats(first_of_second) - _channel_stats(last_of_first)).abs().max())
    if anchor:
        assert gap < 1e-4
    else:
        assert gap > 0.05  # the drift shows without anchoring
