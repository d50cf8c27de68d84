"""Region lock: the automatic mask along the flow, the latent held on the source trajectory, the composite.

Model tests run on the tiny diffusers SVD always and on ComfyUI's where one is found.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from i2vedit.errors import I2VEditError
from i2vedit.io.synthetic import demo_video, moving_square
from i2vedit.method.inversion import invert
from i2vedit.method.matching import matched_denoise
from i2vedit.method.region import (
    RegionLock,
    auto_region,
    check_region,
    composite,
    feather,
)
from i2vedit.svd import SVDCond, TimeIds


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_the_automatic_mask_follows_the_moving_square_on_every_frame():
    video, square = moving_square(10, (128, 192))
    edited = demo_video(10, (128, 192))[1]
    masks = auto_region(video, edited, dilate=0)
    assert masks.shape == (10, 128, 192)
    ious = [_iou(masks[t] > 0.5, square[t]) for t in range(10)]
    assert min(ious) >= 0.8, ious
    # the square moves ~15 px a frame: a mask that stayed where it was would miss by the last frame
    assert _iou(masks[0] > 0.5, square[-1]) < 0.1


def test_dilation_grows_the_mask_and_nothing_outside_the_edit_is_marked_on_a_static_background():
    video, _ = moving_square(8, (128, 192))
    edited = video[:1].clone()
    edited[0, 100:120, 10:30] = torch.tensor([1.0, 0.0, 0.0])  # a patch of static background, off the path
    masks = auto_region(video, edited, dilate=0)
    patch = torch.zeros(128, 192, dtype=torch.bool)
    patch[100:120, 10:30] = True
    for t in range(8):
        assert torch.equal(masks[t] > 0.5, patch), t
    grown = auto_region(video, edited, dilate=4)
    assert bool((grown >= masks).all()) and float(grown.sum()) > float(masks.sum())
    assert float(grown[:, :90].sum()) == 0  # still nothing near the moving square


def test_an_edited_frame_equal_to_the_source_has_no_region_to_lock():
    video, _ = moving_square(4, (64, 96))
    with pytest.raises(I2VEditError, match="differs from the source's nowhere"):
        auto_region(video, video[:1])


def test_masks_of_another_size_are_resized_with_a_warning_and_bad_masks_are_refused(caplog):
    mask = torch.zeros(32, 48)
    mask[8:24, 8:40] = 1
    with caplog.at_level(logging.WARNING, logger="i2vedit"):
        out = check_region(mask, 5, 64, 96)
    assert out.shape == (1, 64, 96) and "resizing it" in caplog.text  # one mask serves every frame
    with pytest.raises(I2VEditError, match="3 frames and the video 5"):
        check_region(torch.ones(3, 64, 96), 5, 64, 96)
    with pytest.raises(I2VEditError, match="empty"):
        check_region(torch.zeros(64, 96), 5, 64, 96)
    with pytest.raises(I2VEditError, match=r"values in \[0, 1\]"):
        check_region(torch.full((64, 96), 2.0), 5, 64, 96)


def test_the_composite_is_the_source_exactly_outside_the_mask_and_the_edit_deep_inside():
    g = torch.Generator().manual_seed(0)
    source, edited = torch.rand(2, 3, 64, 96, 3, generator=g)
    region = torch.zeros(3, 64, 96)
    region[:, 16:48, 24:72] = 1
    out = composite(source, edited, region, 6)
    assert torch.equal(out[region == 0], source[region == 0])
    assert torch.equal(out[:, 24:40, 32:64], edited[:, 24:40, 32:64])  # beyond the feather
    soft = feather(region, 6)
    assert 0 < float(soft[0, 16, 40]) < 1  # the ramp at the mask's edge


@pytest.fixture(scope="module", params=["diffusers", "comfyui"])
def host(request):
    if request.param == "diffusers":
        from i2vedit.hosts.diffusers.tiny import build_tiny_diffusers_host

        return build_tiny_diffusers_host(seed=0)
    request.getfixturevalue("comfy")
    from fixtures.tiny_comfy import build_tiny_comfy_host

    return build_tiny_comfy_host(seed=0)


def _cond(seed: int, hw: tuple[int, int]) -> SVDCond:
    g = torch.Generator().manual_seed(seed)
    return SVDCond(
        torch.randn(1, 1, 64, generator=g), torch.randn(1, 4, *hw, generator=g), TimeIds(6, 127, 0.02)
    )


def test_the_latent_follows_the_source_trajectory_outside_the_mask_at_every_step(host):
    frames, hw, steps = 4, (8, 16), 4
    z = torch.randn(frames, 4, *hw, generator=torch.Generator().manual_seed(3))
    inv = invert(host, z, _cond(1, hw), steps=steps)
    region = torch.zeros(frames, 64, 128)
    region[:, 16:56, 32:96] = 1
    lock = RegionLock(region, radius=8)
    outside = (lock.mask == 0).expand(frames, 4, *hw)
    inside = (lock.mask == 1).expand(frames, 4, *hw)
    assert bool(outside.any()) and bool(inside.any())
    locked = matched_denoise(host, inv, _cond(2, hw), lock=lock)
    free = matched_denoise(host, inv, _cond(2, hw))
    for k in range(steps + 1):
        assert torch.equal(locked.trajectory[k][outside], inv.trajectory[steps - k][outside]), k
    assert torch.equal(locked.latents[outside], inv.trajectory[0][outside])
    # inside, the edit acts: the locked run leaves the source there as the free run does
    assert not torch.allclose(locked.latents[inside], inv.trajectory[0][inside], atol=1e-3)
    assert not torch.allclose(free.latents[outside], inv.trajectory[0][outside], atol=1e-3)


def test_a_lock_of_another_size_than_the_clip_is_refused_before_any_model_call(host):
    frames, hw = 4, (8, 16)
    z = torch.randn(frames, 4, *hw, generator=torch.Generator().manual_seed(3))
    inv = invert(host, z, _cond(1, hw), steps=2)
    with pytest.raises(I2VEditError, match="does not fit this clip"):
        matched_denoise(host, inv, _cond(2, hw), lock=RegionLock(torch.ones(frames, 64, 64)))


def test_the_latent_mask_is_zero_wherever_its_eight_by_eight_pixels_are():
    region = torch.zeros(2, 64, 64)
    region[:, 20:44, 20:44] = 1
    lock = RegionLock(region, radius=8)
    cells = F.max_pool2d(region[:, None], 8)
    assert bool((lock.mask[cells == 0] == 0).all())
    assert float(lock.mask.max()) > 0.5


PIPE = dict(chunk=4, steps=2, lora_steps=0)


@pytest.fixture(scope="module")
def square_video():
    video, square = moving_square(6, (64, 96))
    edited = demo_video(6, (64, 96))[1]
    return video, edited, square


def test_an_edit_with_a_user_mask_is_the_source_exactly_outside_it_after_compositing(square_video, tmp_path):
    from i2vedit.hosts.diffusers.tiny import build_tiny_diffusers_host
    from i2vedit.run.pipeline import EditSettings, edit_frames

    video, edited, _ = square_video
    host = build_tiny_diffusers_host(seed=0)
    settings = EditSettings(**PIPE)
    region = torch.zeros(64, 96)
    region[8:48, 8:72] = 1
    locked = edit_frames(
        host, video, 8.0, [edited], settings, size=(64, 128), region=region, reuse_dir=tmp_path
    )
    free = edit_frames(host, video, 8.0, [edited], settings, size=(64, 128), reuse_dir=tmp_path)
    out, plain = locked.videos[0], free.videos[0]
    outside = (region == 0).expand(6, 64, 96)
    assert torch.equal(out[outside], video[outside])
    assert not torch.allclose(plain[outside], video[outside], atol=1e-3)  # without the lock it changes
    assert not torch.allclose(out[:, 20:36, 30:60], video[:, 20:36, 30:60], atol=1e-3)  # the edit acts inside
    assert locked.report["edit_keys"] != free.report["edit_keys"]  # the stored unlocked edit was not reused
    assert torch.equal(locked.regions[0], region.expand(6, 64, 96))


def test_an_automatic_lock_and_a_full_mask(square_video, caplog):
    from i2vedit.hosts.diffusers.tiny import build_tiny_diffusers_host
    from i2vedit.run.pipeline import EditSettings, edit_video

    video, edited, square = square_video
    frames, ed = F.pad(video, (0, 0, 0, 32)), F.pad(edited, (0, 0, 0, 32))  # 64×128, a valid size
    host = build_tiny_diffusers_host(seed=0)
    settings = EditSettings(**PIPE)
    auto = edit_video(host, frames, 8.0, [ed], settings, region="auto")
    region = auto.regions[0]
    assert (
        _iou(region[-1, :, :96] > 0.5, F.max_pool2d(square[-1][None, None].float(), 17, 1, 8)[0, 0] > 0) > 0.5
    )
    outside = (region == 0)[..., None].expand_as(frames)
    assert torch.equal(auto.videos[0][outside], frames[outside])
    with caplog.at_level(logging.INFO, logger="i2vedit"):
        full = edit_video(host, frames, 8.0, [ed], settings, region=torch.ones(64, 128))
    free = edit_video(host, frames, 8.0, [ed], settings)
    assert "covers every pixel" in caplog.text and full.regions is None
    assert torch.equal(full.videos[0], free.videos[0])


def test_an_empty_mask_is_refused_before_any_model_call(square_video):
    from i2vedit.hosts.diffusers.tiny import build_tiny_diffusers_host
    from i2vedit.run.pipeline import EditSettings, edit_frames

    video, edited, _ = square_video
    host = build_tiny_diffusers_host(seed=0)
    calls = []
    host.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(I2VEditError, match="empty"):
        edit_frames(host, video, 8.0, [edited], EditSettings(**PIPE), region=torch.zeros(6, 64, 96))
    assert calls == []
