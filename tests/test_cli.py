"""The command line: the demo end to end, and clear errors for missing or wrong arguments."""

from __future__ import annotations

import json

import pytest
import torch

from i2vedit.cli import build_parser, main
from i2vedit.video_io import write_video


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
    assert "cannot read the image" in capsys.readouterr().err
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
