"""The whole edit over the tiny diffusers SVD: clips, chaining, stitching, reuse and resume."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from conftest import unet_count

from i2vedit.errors import I2VEditError
from i2vedit.hosts.diffusers.tiny import build_tiny_diffusers_host
from i2vedit.method.controller import MatchConfig
from i2vedit.run.pipeline import EditSettings, edit_frames, edit_video

SETTINGS = EditSettings(chunk=4, steps=3, lora_steps=2, lora_rank=4)


def stored_edit(reuse, clip: int, key: str):
    """The reuse folder's file of one clip of the edit whose first-clip key is ``key``."""
    from safetensors import safe_open

    found = []
    for path in sorted((reuse / f"clip_{clip:03d}").glob("edit_*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("edit_key") == key:
                found.append(path)
    assert len(found) == 1, found
    return found[0]


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
        key = result.report["edit_keys"][e]
        clip0 = load_file(str(stored_edit(reuse, 0, key)))["frames"]
        clip1 = load_file(str(stored_edit(reuse, 1, key)))["frames"]
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
        assert torch.equal(a, b)  # bit for bit: the inversion's float64 σ come back as saved


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


ONE = EditSettings(chunk=4, steps=2, lora_steps=2, lora_rank=4)


@pytest.fixture(scope="module")
def fresh_runs(host, video):
    """Each edited frame alone, with no reuse folder: what any reuse must give back bit for bit."""
    frames, edits = video
    return [edit_video(host, frames, 8.0, [e], ONE) for e in edits]


def test_another_edited_frame_in_the_same_folder_is_edited_anew_and_both_edits_stay(
    host, video, fresh_runs, tmp_path
):
    """Edits were stored by position: a second run with another edited frame got the first run's video."""
    frames, (a, b) = video
    run_a = edit_video(host, frames, 8.0, [a], ONE, reuse_dir=tmp_path)
    assert torch.equal(run_a.videos[0], fresh_runs[0].videos[0])
    run_b = edit_video(host, frames, 8.0, [b], ONE, reuse_dir=tmp_path)
    assert torch.equal(run_b.videos[0], fresh_runs[1].videos[0])
    assert not torch.equal(run_b.videos[0], run_a.videos[0])
    calls = run_b.report["calls"]
    assert "invert" not in calls and "lora" not in calls and calls["denoise"] == 2
    again = edit_video(host, frames, 8.0, [a], ONE, reuse_dir=tmp_path)
    assert "denoise" not in again.report["calls"] and "invert" not in again.report["calls"]
    assert torch.equal(again.videos[0], run_a.videos[0])
    # another preset (matching settings) is another edit too
    style = EditSettings(**{**ONE.__dict__, "match": MatchConfig.preset("style")})
    styled = edit_video(host, frames, 8.0, [a], style, reuse_dir=tmp_path)
    assert styled.report["calls"]["denoise"] == 2 and "lora" not in styled.report["calls"]
    assert torch.equal(styled.videos[0], edit_video(host, frames, 8.0, [a], style).videos[0])


def test_a_damaged_stored_edit_is_recomputed_with_a_warning_and_nothing_else_is(
    host, video, fresh_runs, tmp_path
):
    frames, (a, _) = video
    first = edit_video(host, frames, 8.0, [a], ONE, reuse_dir=tmp_path)
    damaged = stored_edit(tmp_path, 1, first.report["edit_keys"][0])
    damaged.write_bytes(damaged.read_bytes()[:100])
    again = edit_video(host, frames, 8.0, [a], ONE, reuse_dir=tmp_path)
    assert again.report["calls"]["denoise"] == 1 and "lora" not in again.report["calls"]
    assert any("damaged" in w and damaged.name in w for w in again.report["warnings"])
    assert torch.equal(again.videos[0], fresh_runs[0].videos[0])


def test_files_swapped_between_clip_folders_are_refused(host, video, tmp_path):
    frames, (a, _) = video
    edit_video(host, frames, 8.0, [a], ONE, reuse_dir=tmp_path)
    inv0, inv1 = (
        tmp_path / "clip_000" / "inversion.safetensors",
        tmp_path / "clip_001" / "inversion.safetensors",
    )
    data0 = inv0.read_bytes()
    inv0.write_bytes(inv1.read_bytes())
    inv1.write_bytes(data0)
    with pytest.raises(I2VEditError, match=r"made for clip 1 .*changed by hand"):
        edit_video(host, frames, 8.0, [a], ONE, reuse_dir=tmp_path)
    inv1.write_bytes(inv0.read_bytes())
    inv0.write_bytes(data0)
    lora0, lora1 = tmp_path / "clip_000" / "lora.safetensors", tmp_path / "clip_001" / "lora.safetensors"
    lora0.write_bytes(lora1.read_bytes())
    with pytest.raises(I2VEditError, match=r"made for clip 1 .*Delete that file"):
        edit_video(host, frames, 8.0, [a], ONE, reuse_dir=tmp_path)
    assert not (tmp_path / ".lock").exists(), "a refused run gives the folder back"


def test_a_folder_in_use_is_refused_and_a_stale_lock_is_taken_over(host, video, tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys

    frames, (a, _) = video
    tiny = EditSettings(chunk=4, steps=2, lora_steps=0, match=None)
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    with pytest.raises(I2VEditError, match=r"in use by another run .*process"):
        edit_video(host, frames, 8.0, [a], tiny, reuse_dir=tmp_path)
    assert lock.exists(), "another run's lock is left alone"
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock.write_text(json.dumps({"pid": int(ended.stdout), "host": socket.gethostname(), "started": "then"}))
    out = edit_video(host, frames, 8.0, [a], tiny, reuse_dir=tmp_path)
    assert any("has ended" in w for w in out.report["warnings"])
    assert not lock.exists()


def test_ctrl_c_during_lora_training_resumes_mid_training_and_equals_an_uninterrupted_run(
    host, video, fresh_runs, tmp_path
):
    frames, (a, _) = video
    settings = EditSettings(**{**ONE.__dict__, "lora_steps": 4})
    whole = edit_video(host, frames, 8.0, [a], settings)

    def interrupt(info):
        if info["stage"] == "lora" and info["clip"] == 1 and info["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        edit_video(host, frames, 8.0, [a], settings, reuse_dir=tmp_path, step_callback=interrupt)
    assert (tmp_path / "clip_001" / "lora_checkpoints" / "checkpoint-00003.safetensors").is_file()
    assert not (tmp_path / ".lock").exists()
    steps = []
    resumed = edit_video(host, frames, 8.0, [a], settings, reuse_dir=tmp_path,
                         step_callback=lambda i: steps.append((i["clip"], i["stage"], i.get("step"))))  # fmt: skip
    assert [s for s in steps if s[1] == "lora"] == [(1, "lora", 4)]
    assert torch.equal(resumed.videos[0], whole.videos[0])
    assert not (tmp_path / "clip_001" / "lora_checkpoints").exists()


def test_a_model_that_gives_nan_stops_the_run_and_stores_nothing(video, tmp_path):
    frames, (a, _) = video
    broken = build_tiny_diffusers_host(seed=0)
    with torch.no_grad():
        broken.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(I2VEditError, match="non-finite"):
        edit_video(broken, frames, 8.0, [a], ONE, reuse_dir=tmp_path)
    assert not list(tmp_path.glob("clip_*/*.safetensors"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"cfg": (1.0, float("nan"))}, "CFG"),
        ({"cfg": (1.0, float("inf"))}, "CFG"),
        ({"cfg": (1.0, 1e6)}, "CFG"),
        ({"steps": 100_000_000}, "denoising steps"),
        ({"lora_steps": 10**9}, "LoRA steps"),
        ({"chunk": 10_000}, "clip length"),
        ({"seed": -1}, "seed"),
        ({"sarp_noise": float("nan")}, "SARP"),
        ({"lora_lr": float("inf")}, "learning rate"),
    ],
)
def test_settings_that_are_not_finite_or_out_of_range_are_refused(change, message):
    with pytest.raises(I2VEditError, match=message):
        EditSettings(**{**ONE.__dict__, **change}).validate()


def test_frames_or_edits_with_nan_are_refused_before_any_model_call(host, video):
    frames, (a, _) = video
    bad = frames.clone()
    bad[2, 3, 4, 0] = float("nan")
    with pytest.raises(I2VEditError, match="NaN"):
        edit_video(host, bad, 8.0, [a], ONE)
    with pytest.raises(I2VEditError, match="edited frame 0 holds NaN"):
        edit_video(host, frames, 8.0, [a * float("nan")], ONE)
    with pytest.raises(I2VEditError, match="frame rate"):
        edit_video(host, frames, float("nan"), [a], ONE)


def test_a_two_clip_edit_runs_on_the_one_unet_it_was_given(video):
    """No copy of the UNet at any step of a 2-clip edit (inversion, LoRA training, matched denoising).

    Was: every LoRA host and trainer deep-copied the UNet (three or four alive), then one shared copy.
    """
    frames, edits = video
    host = build_tiny_diffusers_host(seed=0)

    counts: dict[str, int] = {}

    def count(info: dict) -> None:
        key = f"{info['clip']}:{info['stage']}"
        counts[key] = max(counts.get(key, 0), unet_count())

    before = unet_count()
    result = edit_video(host, frames, 8.0, edits[:1], SETTINGS, step_callback=count)
    assert result.report["clips"] == 2
    assert {"0:invert", "0:lora", "0:denoise", "1:invert", "1:lora", "1:denoise"} <= set(counts)
    assert set(counts.values()) == {before}, counts
