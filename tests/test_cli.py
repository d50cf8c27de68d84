"""The command line: the demo end to end, and clear errors for missing, wrong or hostile arguments."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from i2vedit import cli
from i2vedit.cli import build_parser, main, output_names
from i2vedit.errors import ModelFileError
from i2vedit.io.video import write_video
from i2vedit.run import pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_runs_every_stage_and_writes_its_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    for name in ("source.mp4", "edited.mp4", "comparison.png", *report["loras"]):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert report["clips"] >= 2 and len(report["loras"]) == report["clips"]
    assert set(report["seconds_per_stage"]) >= {"sarp", "invert", "lora", "denoise", "decode"}
    assert report["stage_calls"]["invert"] == report["clips"]
    assert json.loads(capsys.readouterr().out)["frames"] == report["frames"]


@pytest.mark.parametrize("missing", ["--video", "--first-frame", "--model", "--out"])
def test_edit_names_a_missing_argument(missing, capsys):
    args = {"--video": "v.mp4", "--first-frame": "f.png", "--model": "m", "--out": "o"}
    argv = ["edit"] + [x for k, v in args.items() if k != missing for x in (k, v)]
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2 and missing in capsys.readouterr().err


def _video(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path, torch.rand(3, 64, 64, 3), 8.0)
    return path


def test_edit_fails_clearly_before_computing(tmp_path, capsys):
    video = _video(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    base = [
        "edit",
        "--video",
        str(video),
        "--first-frame",
        str(tmp_path / "missing.png"),
        "--model",
        str(tmp_path),
    ]
    assert main([*base, "--out", str(blocker / "out")]) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "o")]) == 2
    assert "no image at" in capsys.readouterr().err
    frame = tmp_path / "f.png"
    import cv2

    cv2.imwrite(str(frame), (torch.rand(64, 64, 3) * 255).byte().numpy())
    base[4] = str(frame)
    assert main([*base, "--out", str(tmp_path / "o")]) == 2
    assert "not a diffusers SVD folder" in capsys.readouterr().err
    single = tmp_path / "svd.safetensors"
    single.write_bytes(b"\0" * 16)
    base[6] = str(single)
    assert main([*base, "--out", str(tmp_path / "o")]) == 2
    assert "single file" in capsys.readouterr().err
    base[2] = str(tmp_path / "nope.mp4")
    assert main([*base, "--out", str(tmp_path / "o")]) == 2
    assert "no video at" in capsys.readouterr().err


# --- hostile input (issue 11) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_host():
    from i2vedit.hosts.diffusers.tiny import build_tiny_diffusers_host

    return build_tiny_diffusers_host(seed=0)


@pytest.fixture(scope="module")
def svd_folder(tmp_path_factory):
    """A diffusers SVD folder (unet/, vae/, image_encoder/) of the tiny random-weight SVD, as the Hub lays it out."""
    from i2vedit.hosts.diffusers.tiny import write_tiny_svd_folder

    return write_tiny_svd_folder(tmp_path_factory.mktemp("svd"))


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the command line gets as far as loading the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(cli, "load_diffusers_host", refuse)


def _png(path: Path, rgb=(0.2, 0.5, 0.8), size=(64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.empty((*size, 3), np.uint8)
    img[...] = [int(255 * c) for c in reversed(rgb)]  # BGR
    assert cv2.imwrite(str(path), img)
    return path


def _edit(tmp_path, model, *extra, video=None, frames=None, out="o") -> list[str]:
    if video is None:
        video = tmp_path / "v.mp4"
        if not video.exists():
            write_video(video, torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(0)), 8.0)
    frames = frames or [str(_png(tmp_path / "f.png"))]
    return ["edit", "--video", str(video), "--first-frame", *map(str, frames), "--model", str(model),
            "--out", str(tmp_path / out), *extra]  # fmt: skip


FAST = ["--chunk", "2", "--steps", "2", "--lora-steps", "0", "--no-matching", "--size", "64", "64"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_output_names_are_distinct_whatever_the_first_frames_are_called():
    assert output_names(["a/edit.png", "b/edit.png", "c/edit.jpg"]) == [
        "edit.mp4",
        "edit_2.mp4",
        "edit_3.mp4",
    ]
    # a repeat never takes the name another input gives naturally
    assert output_names(["a/edit.png", "b/edit.png", "edit_2.png"]) == [
        "edit.mp4",
        "edit_3.mp4",
        "edit_2.mp4",
    ]
    assert output_names(["Edit.png", "edit.png"]) == ["Edit.mp4", "edit_2.mp4"]  # macOS / Windows ignore case
    long = output_names(["a/" + "é" * 200 + ".png", "b/" + "é" * 200 + ".png"])
    assert len(set(long)) == 2 and all(len(n.encode()) <= 255 for n in long)


def test_two_first_frames_with_the_same_name_give_two_videos_mapped_in_the_report(tmp_path, svd_folder):
    red, blue = (
        _png(tmp_path / "a" / "edit.png", (0.9, 0.1, 0.1)),
        _png(tmp_path / "b" / "edit.png", (0.1, 0.1, 0.9)),
    )
    video = tmp_path / "v2.mp4"
    write_video(video, torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0)), 8.0)
    assert main(_edit(tmp_path, svd_folder, *FAST, video=video, frames=[red, blue])) == 0
    out = tmp_path / "o"
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"] == [
        {"first_frame": str(red), "video": "edit.mp4", "masks": "edit_masks.mp4", "contact_sheet": "edit_masks.png"},
        {"first_frame": str(blue), "video": "edit_2.mp4", "masks": "edit_2_masks.mp4",
         "contact_sheet": "edit_2_masks.png"},
    ]  # fmt: skip
    first = [cv2.VideoCapture(str(out / n)).read()[1].astype(float) for n in ("edit.mp4", "edit_2.mp4")]
    assert np.abs(first[0] - first[1]).mean() > 1.0  # two different edits, not one written twice


def test_sample_fps_above_the_source_rate_is_refused(tmp_path, svd_folder, capsys, no_model_load):
    assert main(_edit(tmp_path, svd_folder, "--sample-fps", "24")) == 2
    err = _one_line_error(capsys)
    assert "sample fps 24 is above the frame rate" in err and "(8 fps)" in err and "at most 8" in err


def _truncated(path: Path, ext: str) -> Path:
    ok, data = cv2.imencode(ext, (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    assert ok
    path.write_bytes(data.tobytes()[: len(data) // 2])
    return path


def _zero_png(path: Path) -> Path:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: _truncated(d / "cut.jpg", ".jpg"), "is truncated or damaged"),
        (lambda d: _truncated(d / "cut.png", ".png"), "is truncated or damaged"),
        (lambda d: _zero_png(d / "zero.png"), "is 0×0 pixels"),
        (
            lambda d: (d / "notes.png").write_text("not an image") and d / "notes.png",
            "it is not an image file",
        ),
        (lambda d: (d / "empty.png").write_bytes(b"") or d / "empty.png", "is empty (0 bytes)"),
        (lambda d: (d / "dir.png").mkdir() or d / "dir.png", "is a folder; give a PNG or JPEG file"),
        (lambda d: d / ("x" * 296 + ".png"), "a name in it is 300 characters"),
    ],
    ids=["truncated-jpeg", "truncated-png", "zero-size", "not-an-image", "empty", "folder", "300-char-name"],
)
def test_first_frames_that_do_not_decode_completely_are_refused(
    tmp_path, svd_folder, capsys, no_model_load, make, fragment
):
    bad = make(tmp_path)
    assert main(_edit(tmp_path, svd_folder, frames=[bad])) == 2
    assert fragment in _one_line_error(capsys)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--start", "nan"], "argument --start: 'nan' is not a finite number"),
        (["--end", "nan"], "argument --end: 'nan' is not a finite number"),
        (["--sample-fps", "inf"], "argument --sample-fps: 'inf' is not a finite number"),
        (["--start", "-1"], "start time -1 s is negative"),
        (["--start", "0.3", "--end", "0.2"], "start time 0.3 s is not before end time 0.2 s"),
        (["--start", "5"], "start time 5 s is not before end time 0.375 s"),
    ],
)
def test_times_and_rates_that_are_not_finite_or_in_range_are_refused(
    tmp_path, svd_folder, capsys, no_model_load, args, fragment
):
    assert main(_edit(tmp_path, svd_folder, *args)) == 2
    assert fragment in _one_line_error(capsys)


def _damaged(svd_folder: Path, tmp_path: Path, damage) -> Path:
    folder = tmp_path / "svd"
    shutil.copytree(svd_folder, folder)
    damage(folder)
    return folder


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _other_unet(folder: Path) -> None:
    from diffusers import UNet2DConditionModel

    shutil.rmtree(folder / "unet")
    UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=8,
    ).save_pretrained(folder / "unet", safe_serialization=True)  # fmt: skip


def _config_not_matching_weights(folder: Path) -> None:
    config = folder / "unet" / "config.json"
    cfg = json.loads(config.read_text())
    cfg["block_out_channels"] = [2 * c for c in cfg["block_out_channels"]]
    config.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        (lambda f: _cut_in_half(f / "unet" / "diffusion_pytorch_model.safetensors"),
         ["the UNet weights", "cannot be read", "download it again"]),
        (lambda f: (f / "unet" / "config.json").write_text("{garbage"),
         ["unet/config.json is not a readable JSON config", "download it again"]),
        (_other_unet, ["holds a UNet2DConditionModel, not SVD's UNetSpatioTemporalConditionModel",
                       "Point --model at an SVD folder"]),
        (_config_not_matching_weights, ["could not load the UNet", "expected shape", "download it again"]),
        (lambda f: (f / "vae" / "diffusion_pytorch_model.safetensors").unlink(),
         ["diffusion_pytorch_model.safetensors is missing", "download it again"]),
    ],
    ids=["truncated-unet", "garbage-config", "other-model-in-unet", "config-not-matching-weights", "no-vae-weights"],
)  # fmt: skip
def test_a_damaged_or_foreign_diffusers_folder_is_named(tmp_path, svd_folder, capsys, damage, fragments):
    folder = _damaged(svd_folder, tmp_path, damage)
    with pytest.raises(ModelFileError) as e:
        cli.load_diffusers_host(folder)
    assert all(f in str(e.value) for f in fragments), str(e.value)
    assert main(_edit(tmp_path, folder)) == 2
    err = _one_line_error(capsys)
    assert all(f in err for f in fragments), err


def test_a_single_file_with_a_tensor_of_the_wrong_rank_is_named(tmp_path, tiny_host, capsys):
    from fixtures.sgm_writer import write_single_file
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    good = write_single_file(tiny_host, tmp_path / "good.safetensors")
    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    sd = load_file(str(good))
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4)  # a 4-D convolution weight, now 1-D
    bad = tmp_path / "svd.safetensors"
    save_file(sd, str(bad), metadata=meta)
    fragments = [f"{bad} holds tensors of shapes no SVD checkpoint has", "damaged"]
    with pytest.raises(ModelFileError) as e:  # it was an IndexError traceback
        cli.load_diffusers_host(bad)
    assert all(f in str(e.value) for f in fragments), str(e.value)
    assert main(_edit(tmp_path, bad)) == 2
    err = _one_line_error(capsys)
    assert all(f in err for f in fragments), err


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--size", "8192", "8192"], "--size 8192 8192 is outside what SVD can generate"),
        (["--size", "100", "100"], "each side must be a multiple of 64 from 64 to 2048"),
        (["--size", "2048", "2048", "--chunk", "25"], "a clip of 25 frames at 2048×2048 is 105 M pixels"),
    ],
)
def test_generation_sizes_svd_cannot_use_are_refused_before_reading_the_video(
    tmp_path, svd_folder, capsys, no_model_load, monkeypatch, args, fragment
):
    def no_reading(*a, **kw):
        raise AssertionError("the video was read before the size was checked")

    monkeypatch.setattr("i2vedit.io.video.VideoSource", no_reading)
    assert main(_edit(tmp_path, svd_folder, *args)) == 2
    err = _one_line_error(capsys)
    assert fragment in err and "576 1024" in err


def test_absurd_step_counts_are_refused_before_the_model_loads(tmp_path, svd_folder, capsys, no_model_load):
    assert main(_edit(tmp_path, svd_folder, "--steps", "100000000")) == 2
    _one_line_error(capsys)


def test_a_folder_given_as_the_video_is_named(tmp_path, svd_folder, capsys, no_model_load):
    folder = tmp_path / "clip.mp4"
    folder.mkdir()
    assert main(_edit(tmp_path, svd_folder, video=folder)) == 2
    err = _one_line_error(capsys)
    assert f"the video {folder} is a folder; give a video file" in err and "no video at" not in err


def test_a_run_over_max_vram_is_refused_naming_the_stage_before_the_model_loads(
    tmp_path, svd_folder, capsys, no_model_load
):
    from i2vedit.hosts.diffusers.plan import GB, model_meta_host, plan_edit

    # the tiny model's weights alone are over 1 MB: the first stage, the encode, does not fit
    assert main(_edit(tmp_path, svd_folder, *FAST, "--max-vram", "0.001")) == 2
    err = _one_line_error(capsys)
    assert "the encode stage needs about" in err and "over --max-vram 0.001 GB" in err, err
    assert "Nothing was computed" in err and not list((tmp_path / "o").iterdir())
    # FAST on the 3-frame video: 2 clips of 2 frames at 64×64; a budget just under the plan's worst stage
    # refuses that stage, so the command line plans what it will run (clips, frames, steps, no LoRA)
    stages = plan_edit(64, 64, 2, 2, 0, 2, match=None, host=model_meta_host(svd_folder)).stages()
    worst = max(stages, key=lambda s: stages[s]["peak_bytes"])
    budget = (stages[worst]["peak_bytes"] - 1) / GB
    assert main(_edit(tmp_path, svd_folder, *FAST, "--max-vram", f"{budget!r}")) == 2
    assert f"the {worst} stage needs about" in _one_line_error(capsys)
    with pytest.raises(AssertionError, match="the model was loaded"):  # a budget it fits goes on to load
        main(_edit(tmp_path, svd_folder, *FAST, "--max-vram", f"{(stages[worst]['peak_bytes'] + 1) / GB!r}"))


@pytest.mark.parametrize("which", ["--video", "--model", "--out"])
def test_a_name_longer_than_the_filesystem_allows_is_named(
    tmp_path, svd_folder, capsys, no_model_load, which
):
    argv = _edit(tmp_path, svd_folder)
    argv[argv.index(which) + 1] = str(tmp_path / ("y" * 300))
    assert main(argv) == 2
    err = _one_line_error(capsys)
    expected = "cannot write to the output folder" if which == "--out" else "a name in it is 300 characters"
    assert expected in err, err


def test_ctrl_c_keeps_finished_clips_and_the_same_command_resumes(tmp_path, svd_folder, capsys, monkeypatch):
    real = pipeline.edit_frames

    def ctrl_c_at_the_second_clip(*args, progress=None, **kw):
        def hook(info):
            if info["clip"] == 1:
                raise KeyboardInterrupt

        return real(*args, progress=hook, **kw)

    monkeypatch.setattr(pipeline, "edit_frames", ctrl_c_at_the_second_clip)
    argv = _edit(tmp_path, svd_folder, *FAST)  # 3 frames, clips of 2: two clips
    assert main(argv) == 130
    reuse = tmp_path / "o" / "reuse"
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the model loader's own progress lines
    assert last == (
        f"interrupted; finished clips are kept in the reuse folder {reuse}, run the same command again to resume"
    )
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "reuse"
    ]  # no video, no report, no temp file
    monkeypatch.setattr(pipeline, "edit_frames", real)
    assert main(argv) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["clips"] == 2 and report["calls"]["invert"] == 1  # clip 1 came from the reuse folder


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--max-cfg", "nan"], "argument --max-cfg: 'nan' is not a finite number"),
        (["--max-cfg", "inf"], "argument --max-cfg: 'inf' is not a finite number"),
        (["--max-cfg", "0.5"], "argument --max-cfg: 0.5 is out of range; give a number from 1 to 50"),
        (["--chunk", "1"], "argument --chunk: 1 is out of range; give a whole number from 2 to 64"),
        (["--chunk", "100000"], "argument --chunk: 100000 is out of range"),
        (["--max-cfg", "1e9"], "argument --max-cfg: 1e+09 is out of range"),
        (["--seed", "-1"], "argument --seed: -1 is out of range"),
        (["--steps", "1"], "argument --steps: 1 is out of range; give a whole number at least 2"),
        (["--lora-steps", "-5"], "argument --lora-steps: -5 is out of range"),
    ],
)
def test_numbers_that_are_not_finite_or_in_range_are_refused_by_the_parser(tmp_path, capsys, args, fragment):
    assert main(_edit(tmp_path, tmp_path / "no-model", *args)) == 2
    err = _one_line_error(capsys)
    assert fragment in err and "--help" in err


def test_the_command_line_imports_where_there_is_no_resource_module():
    script = (
        "import sys; sys.modules['resource'] = None\n"  # as on Windows
        "import i2vedit.cli as cli\n"
        "print(cli.peak_memory_bytes())\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "None"


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmRSS from /proc (Linux)")
def test_peak_memory_is_in_bytes():
    status = Path("/proc/self/status").read_text()
    rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
    peak = cli.peak_memory_bytes()
    assert 0.5 * rss < peak < 2**40


def test_bench_without_the_developer_tools_says_so(tmp_path):
    """A registry install leaves ``i2vedit/tools`` out (``.comfyignore``): ``bench`` then says why it cannot run."""
    shutil.copytree(
        ROOT / "i2vedit", tmp_path / "i2vedit", ignore=shutil.ignore_patterns("tools", "__pycache__")
    )
    assert "i2vedit/tools/" in (ROOT / ".comfyignore").read_text().split()
    out = subprocess.run(
        [sys.executable, "-m", "i2vedit", "bench", "attention"], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "developer tools (i2vedit/tools)" in out.stderr and "git checkout" in out.stderr


# --- real video (issue 14) -----------------------------------------------------------------------


def test_edit_writes_h264_with_the_sources_audio_for_the_range(tmp_path, svd_folder):
    import av
    from fixtures.real_clips import BUNNY, real_clip

    from i2vedit.io.video import read_audio

    source = real_clip(BUNNY)
    assert main(_edit(tmp_path, svd_folder, *FAST, "--start", "1", "--end", "1.12", video=source)) == 0
    out = tmp_path / "o" / "f.mp4"
    with av.open(str(out)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.name, video.codec_context.pix_fmt, video.average_rate) == (
            "h264",
            "yuv420p",
            25,
        )
        assert (audio.codec_context.name, audio.sample_rate, audio.channels) == ("aac", 48000, 6)
        assert video.frames == 3 and (video.codec_context.height, video.codec_context.width) == (720, 1280)
        samples = np.concatenate([f.to_ndarray() for f in container.decode(audio)], axis=1)
    expected = read_audio(source, 1.0, 3 / 25)  # the source's sound from 1 s, for the three frames
    assert expected is not None
    assert abs(samples.shape[1] - expected.samples.shape[1]) <= 48000 / 25  # the same duration within a frame
    n = min(samples.shape[1], expected.samples.shape[1])
    assert (
        np.abs(samples[:, :n] - expected.samples[:, :n].numpy()).mean() < 0.2 * expected.samples.abs().mean()
    )


def test_demo_takes_a_few_small_frames_of_a_real_video_and_its_audio():
    from fractions import Fraction

    from fixtures.real_clips import BUNNY, CARPHONE, real_clip

    clip, edited = cli.demo_clip(real_clip(BUNNY))
    assert clip.frames.shape == (10, 128, 192, 3) and clip.fps == 8  # 10 frames of 25 fps sampled at 8
    assert clip.audio is not None and abs(clip.audio.seconds - 10 / 8) < 1 / 8
    assert torch.equal(edited[0], clip.frames[0, ..., [2, 1, 0]])
    slow, _ = cli.demo_clip(real_clip(CARPHONE))
    assert slow.fps == 8 and slow.audio is None
    with pytest.raises(cli.I2VEditError, match="no video at"):
        cli.demo_clip("/nonexistent.mp4")
    assert cli.demo_clip(None)[0].fps == Fraction(8)


def test_demo_video_flag_reaches_the_demo(monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr(cli, "run_demo", lambda out, progress, video: seen.update(video=video) or {})
    assert main(["demo", "--video", "clip.mp4", "--out", str(tmp_path)]) == 0
    assert seen == {"video": "clip.mp4"}


def test_edit_with_a_region_mask_writes_the_masks_video_and_contact_sheet(tmp_path, svd_folder):
    import av

    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    args = _edit(tmp_path, svd_folder, *FAST, "--region-lock", str(tmp_path / "mask.png"), "--colour-anchor")
    assert main(args) == 0
    out = tmp_path / "o"
    report = json.loads((out / "report.json").read_text())
    assert report["region_lock"] == str(tmp_path / "mask.png")
    assert (
        report["outputs"][0]["masks"] == "f_masks.mp4"
        and report["outputs"][0]["contact_sheet"] == "f_masks.png"
    )
    with av.open(str(out / "f_masks.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape == (64, 128, 3)  # difference masks | region mask
    region = frames[0][:, 64:, 0].astype(float) / 255
    assert region[32, 32] > 0.9 and region[4, 4] < 0.1
    sheet = cv2.imread(str(out / "f_masks.png"))
    assert sheet.shape == (4 * 64, 3 * 64, 3)  # source, edited, difference masks, region: 3 frames each


def test_an_empty_region_mask_is_refused_before_the_model_loads(tmp_path, svd_folder, capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "load_diffusers_host", no_load)
    cv2.imwrite(str(tmp_path / "mask.png"), np.zeros((64, 64), np.uint8))
    assert main(_edit(tmp_path, svd_folder, *FAST, "--region-lock", str(tmp_path / "mask.png"))) != 0
    assert "region mask is empty" in _one_line_error(capsys)


# --- weights stored in fp16 / bf16 (issue 13) -----------------------------------------------------


def _loaded_hosts(monkeypatch) -> list:
    """The hosts the command line loads, kept for the test to look at."""
    hosts: list = []
    load = cli.load_diffusers_host

    def keep(*args, **kwargs):
        hosts.append(load(*args, **kwargs))
        return hosts[-1]

    monkeypatch.setattr(cli, "load_diffusers_host", keep)
    return hosts


def _frames(path: Path) -> np.ndarray:
    cap, frames = cv2.VideoCapture(str(path)), []
    while (got := cap.read())[0]:
        frames.append(got[1].astype(float))
    return np.stack(frames)


def test_weights_dtype_bf16_stores_the_unet_in_bf16_and_edits_close_to_fp32(
    tmp_path, svd_folder, monkeypatch
):
    from i2vedit.hosts.diffusers.plan import weights_bytes

    hosts = _loaded_hosts(monkeypatch)
    train = [*FAST[:4], "--lora-steps", "1", *FAST[6:]]  # one LoRA step: a backward through stored layers
    assert main(_edit(tmp_path, svd_folder, *train, out="fp32")) == 0
    assert main(_edit(tmp_path, svd_folder, *train, "--weights-dtype", "bf16", out="bf16")) == 0
    fp32, bf16 = hosts
    # the CPU's default (auto) stores nothing: fp32 models without a casting hook, as before the flag
    assert fp32.weights_dtype == torch.float32 and not any(
        hasattr(m, "_diffusers_hook") for m in fp32.unet.modules()
    )
    assert {p.dtype for p in fp32.unet.parameters()} == {torch.float32}
    stored = sum(p.numel() for p in bf16.unet.parameters() if p.dtype == torch.bfloat16)
    assert {p.dtype for p in bf16.unet.parameters()} == {
        torch.bfloat16,
        torch.float32,
    } and bf16.weights_dtype == torch.bfloat16
    assert (
        weights_bytes(bf16.unet) == weights_bytes(fp32.unet) - 2 * stored
    )  # half the bytes of what is stored
    assert stored > 0.9 * sum(p.numel() for p in fp32.unet.parameters())
    reports = [json.loads((tmp_path / n / "report.json").read_text()) for n in ("fp32", "bf16")]
    assert [r["dtypes"]["weights"] for r in reports] == ["fp32", "bf16"]
    a, b = (_frames(tmp_path / n / "f.mp4") for n in ("fp32", "bf16"))
    # measured: the decoded videos of the random tiny model differ by a mean of 3.0 grey levels (of 255), at
    # most 22 (bf16 keeps 8 significant bits of each weight); a broken cast would give noise (mean ~60)
    assert np.isfinite(b).all() and a.shape == b.shape and np.abs(a - b).mean() < 6.0


def test_max_vram_plans_the_stored_weights(tmp_path, svd_folder, capsys, no_model_load):
    from i2vedit.hosts.diffusers.plan import GB, model_meta_host, plan_edit

    host = model_meta_host(svd_folder)
    full, half = (plan_edit(64, 64, 2, 2, 0, 2, match=None, host=host, count_flops=False, weights_dtype=w).stages()
                  for w in (torch.float32, torch.float16))  # fmt: skip
    assert max(s["peak_bytes"] for s in half.values()) < min(s["peak_bytes"] for s in full.values())
    budget = f"{max(s['peak_bytes'] for s in half.values()) / GB!r}"  # fits fp16 weights, not fp32 ones
    assert main(_edit(tmp_path, svd_folder, *FAST, "--max-vram", budget)) == 2
    assert "or --weights-dtype fp16" in _one_line_error(capsys)
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(_edit(tmp_path, svd_folder, *FAST, "--max-vram", budget, "--weights-dtype", "fp16"))
