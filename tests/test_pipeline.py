"""The whole edit over the tiny diffusers SVD: clips, chaining, stitching, reuse and resume."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from i2vedit.errors import I2VEditError
from i2vedit.hosts.diffusers_host import build_tiny_diffusers_host
from i2vedit.pipeline import EditSettings, edit_frames, edit_video

SETTINGS = EditSettings(chunk=4, steps=3, lora_steps=2, lora_rank=4)


@pytest.fixture(scope="module")
def host():
    return build_tiny_diffusers_host(seed=0)


@pytest.fixture(scope="module")
def video():
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(7, 64, 128, 3, generator=g)
    return frames, [frames[:1].flip(-1), (frames[:1] * 0.5).clamp(0, 1)]


@pytest.fixture(scope="module")
def full_run(host, video, tmp_path_factory):
    frames, edits = video
    reuse = tmp_path_factory.mktemp("reuse")
    return edit_video(host, frames, 8.0, edits, SETTINGS, reuse_dir=reuse), reuse


def test_a_two_clip_edit_keeps_the_frame_count_and_stitches_the_overlap_once(full_run):
    result, reuse = full_run
    assert result.report["clip_ranges"] == [(0, 4), (3, 7)]
    from safetensors.torch import load_file

    for e, video in enumerate(result.videos):
        assert video.shape == (7, 64, 128, 3) and result.masks[e].shape == (7, 64, 128)
        clip0 = load_file(str(reuse / "clip_000" / f"edit_{e:02d}.safetensors"))["frames"]
        clip1 = load_file(str(reuse / "clip_001" / f"edit_{e:02d}.safetensors"))["frames"]
        assert torch.equal(video[:4], clip0) and torch.equal(video[4:], clip1[1:])
    assert not torch.equal(result.videos[0], result.videos[1])


def test_edits_of_one_source_share_each_clips_inversion_and_lora(full_run):
    calls = full_run[0].report["calls"]
    assert calls["invert"] == 2 and calls["lora"] == 2 and calls["denoise"] == 4 and calls["decode"] == 4


def test_resume_at_the_second_clip_equals_an_uninterrupted_run(host, video, full_run, tmp_path):
    frames, edits = video
    result, reuse = full_run
    shutil.copy(reuse / "manifest.json", tmp_path / "manifest.json")
    shutil.copytree(reuse / "clip_000", tmp_path / "clip_000")
    resumed = edit_video(host, frames, 8.0, edits, SETTINGS, reuse_dir=tmp_path)
    assert resumed.report["calls"].get("invert") == 1 and resumed.report["calls"].get("lora") == 1
    for a, b in zip(resumed.videos, result.videos):
        assert (a - b).abs().max() < 1e-5


def test_the_same_seed_gives_the_same_video(host, video, full_run):
    frames, edits = video
    again = edit_video(host, frames, 8.0, edits[:1], SETTINGS)
    assert (again.videos[0] - full_run[0].videos[0]).abs().max() < 1e-5


def test_a_reuse_folder_of_another_video_or_model_is_refused(host, video, full_run):
    frames, edits = video
    _, reuse = full_run
    with pytest.raises(I2VEditError, match="another video"):
        edit_video(host, frames.flip(0), 8.0, edits, SETTINGS, reuse_dir=reuse)
    other = build_tiny_diffusers_host(seed=3)
    with pytest.raises(I2VEditError, match="another model"):
        edit_video(other, frames, 8.0, edits, SETTINGS, reuse_dir=reuse)


def test_a_source_shorter_than_one_clip_runs_one_short_clip(host, video):
    frames, edits = video
    out = edit_video(
        host, frames[:3], 8.0, edits[:1], EditSettings(chunk=14, steps=2, lora_steps=1, lora_rank=4)
    )
    assert out.report["clip_ranges"] == [(0, 3)] and out.videos[0].shape == (3, 64, 128, 3)


def test_frames_of_any_size_are_fitted_and_an_edit_of_another_size_is_resized_with_a_warning(host, caplog):
    g = torch.Generator().manual_seed(1)
    frames = torch.rand(3, 50, 90, 3, generator=g)
    edited = torch.rand(1, 40, 40, 3, generator=g)
    settings = EditSettings(chunk=4, steps=2, lora_steps=0, match=None)
    with caplog.at_level(logging.WARNING, logger="i2vedit"):
        out = edit_frames(host, frames, 8.0, [edited], settings, size=(64, 128))
    assert out.videos[0].shape == (3, 50, 90, 3) and out.masks[0].shape == (3, 50, 90)
    assert any("resizing it" in r.getMessage() for r in caplog.records)


def test_bad_inputs_are_refused_before_any_model_call(host, video):
    frames, edits = video
    with pytest.raises(I2VEditError, match="edited frame 0"):
        edit_video(host, frames, 8.0, [edits[0][:, :32]], SETTINGS)
    with pytest.raises(I2VEditError, match="at least one edited"):
        edit_video(host, frames, 8.0, [], SETTINGS)
    with pytest.raises(I2VEditError, match="multiple of 64"):
        edit_video(host, frames[:, :60], 8.0, [edits[0][:, :60]], SETTINGS)
    with pytest.raises(I2VEditError, match="overlap"):
        edit_video(host, frames, 8.0, edits, EditSettings(chunk=4, overlap=4))


def test_cache_mode_resumes_from_a_reuse_folder_and_equals_recompute(host, video, full_run, tmp_path):
    frames, edits = video
    result, reuse = full_run
    shutil.copy(reuse / "manifest.json", tmp_path / "manifest.json")
    shutil.copytree(reuse / "clip_000", tmp_path / "clip_000")
    cached = EditSettings(**{**SETTINGS.__dict__, "mode": "cache"})
    resumed = edit_video(host, frames, 8.0, edits, cached, reuse_dir=tmp_path)
    for a, b in zip(resumed.videos, result.videos):
        assert (a - b).abs().max() < 1e-5
