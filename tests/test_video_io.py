import math
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from i2vedit.errors import I2VEditError, VideoReadError
from i2vedit.io import video as video_io
from i2vedit.io.video import VideoInfo, iter_video_frames, probe_video, read_video, write_video

F, H, W, FPS = 12, 64, 96, 10.0


def moving_gradient(f: int = F, h: int = H, w: int = W) -> torch.Tensor:
    """Smooth RGB content that moves from frame to frame."""
    y = torch.linspace(0, 1, h).view(1, h, 1)
    x = torch.linspace(0, 1, w).view(1, 1, w)
    t = torch.arange(f, dtype=torch.float32).view(f, 1, 1) / f
    r = (0.5 + 0.4 * torch.sin(2 * math.pi * (x + t))).expand(f, h, w)
    g = (0.15 + 0.7 * ((y + t) % 1.0)).expand(f, h, w)
    b = (0.3 + 0.4 * x * y).expand(f, h, w)
    return torch.stack([r, g, b], dim=-1).contiguous()


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    frames = moving_gradient()
    write_video(path, frames, FPS)
    return path, frames


@pytest.fixture(scope="module")
def decoded(video):
    path, _ = video
    frames, _ = read_video(path)
    return frames


def patch_capture(monkeypatch, frame_count=None, decodable=True):
    """Make OpenCV report a different frame count, or decode nothing."""
    original = cv2.VideoCapture

    # A wrapper, not a subclass: subclassing cv2.VideoCapture crashes the interpreter at garbage collection.
    class FakeCapture:
        def __init__(self, *args):
            self._cap = original(*args)

        def isOpened(self):
            return self._cap.isOpened()

        def get(self, prop):
            if prop == cv2.CAP_PROP_FRAME_COUNT and frame_count is not None:
                return frame_count
            return self._cap.get(prop)

        def read(self):
            return self._cap.read() if decodable else (False, None)

        def grab(self):
            return self._cap.grab() if decodable else False

        def release(self):
            self._cap.release()

    monkeypatch.setattr(video_io.cv2, "VideoCapture", FakeCapture)


def test_write_then_read_round_trip(video, decoded):
    path, frames = video
    out, fps = read_video(path)
    assert out.shape == (F, H, W, 3)
    assert out.dtype == torch.float32
    assert fps == FPS
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert (out - frames).abs().mean() < 0.03
    # channels come back in RGB order, not BGR
    for c in range(3):
        assert (out[..., c] - frames[..., c]).abs().mean() < 0.03


def test_probe_video(video):
    path, _ = video
    info = probe_video(path)
    assert info == VideoInfo(str(path), F, FPS, H, W)


def test_read_with_sample_fps_picks_expected_frames(video, decoded):
    path, _ = video
    out, fps = read_video(path, sample_fps=5.0)
    assert fps == 5.0
    assert out.shape[0] == 6
    assert torch.equal(out, decoded[0::2])


def test_read_time_range(video, decoded):
    path, _ = video
    out, fps = read_video(path, start_t=0.2, end_t=0.8)
    assert fps == FPS
    assert out.shape[0] == 6
    assert torch.equal(out, decoded[2:8])


def test_read_above_native_fps_is_refused_with_the_videos_rate(video):
    path, _ = video
    # It used to repeat every frame (20 fps from a 10 fps video: each frame twice), silently.
    with pytest.raises(I2VEditError, match=r"sample fps 20 is above the frame rate .*\(10 fps\).*at most 10"):
        read_video(path, sample_fps=20.0)
    out, fps = read_video(path, sample_fps=FPS)  # the video's own rate is fine
    assert (out.shape[0], fps) == (F, FPS)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"start_t": math.nan}, "start time nan is not a finite number"),
        ({"end_t": math.nan}, "end time nan is not a finite number"),
        ({"end_t": math.inf}, "end time inf is not a finite number"),
        ({"sample_fps": math.inf}, "sample fps inf is not a finite number"),
        ({"sample_fps": math.nan}, "sample fps nan is not a finite number"),
        ({"start_t": -0.5}, "start time -0.5 s is negative"),
        ({"start_t": 0.6, "end_t": 0.3}, "start time 0.6 s is not before end time 0.3 s"),
        ({"start_t": 0.5, "end_t": 0.5}, "start time 0.5 s is not before end time 0.5 s"),
        ({"sample_fps": 0.0}, "sample fps 0 is not positive"),
    ],
)
def test_read_refuses_times_and_rates_that_are_not_finite_or_in_range(video, kwargs, fragment):
    path, _ = video
    with pytest.raises(I2VEditError, match=re.escape(fragment)):
        read_video(path, **kwargs)


def test_read_max_frames_keeps_first_sampled_frames(video, decoded):
    path, _ = video
    out, _ = read_video(path, sample_fps=5.0, max_frames=4)
    assert torch.equal(out, decoded[0:8:2])
    with pytest.raises(I2VEditError, match="at least 1"):
        read_video(path, max_frames=0)


def test_read_with_size_resizes_each_frame(video, decoded):
    path, _ = video
    out, _ = read_video(path, size=(32, 48))
    assert out.shape == (F, 32, 48, 3)
    halved = torch.nn.functional.avg_pool2d(decoded.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    assert (out - halved).abs().max() < 2 / 255


def test_memory_cap_raises_before_decoding(video, monkeypatch):
    path, _ = video

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded despite the memory cap")

    monkeypatch.setattr(video_io, "iter_video_frames", must_not_decode)
    with pytest.raises(VideoReadError) as info:
        read_video(path, max_bytes=1000)
    message = str(info.value)
    assert "GiB" in message
    assert "sample fps" in message and "max frames" in message
    assert f"{F} frames of {H}×{W}" in message


def test_memory_cap_counts_the_requested_size(video):
    path, _ = video
    needed_small = F * 8 * 8 * 3 * 4
    out, _ = read_video(path, size=(8, 8), max_bytes=needed_small)
    assert out.shape == (F, 8, 8, 3)
    with pytest.raises(VideoReadError, match="12 frames of 16×16"):
        read_video(path, size=(16, 16), max_bytes=needed_small)


def test_missing_file(tmp_path):
    with pytest.raises(VideoReadError, match=r"no video at .*check the path"):
        probe_video(tmp_path / "nope.mp4")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(VideoReadError, match="empty"):
        read_video(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoReadError, match=r"not a readable video; convert it to mp4 \(H.264\)"):
        read_video(path)


def test_directory_is_not_a_video(tmp_path):
    with pytest.raises(VideoReadError, match="not a file"):
        probe_video(tmp_path)


def test_errors_are_value_errors(tmp_path):
    with pytest.raises(ValueError):
        probe_video(tmp_path / "nope.mp4")


def test_unknown_frame_count_is_counted_by_decoding(video, monkeypatch):
    path, _ = video
    patch_capture(monkeypatch, frame_count=0)
    assert probe_video(path).num_frames == F
    patch_capture(monkeypatch, frame_count=-1)
    out, _ = read_video(path)
    assert out.shape[0] == F


def test_overreported_frame_count_returns_frames_that_exist(video, decoded, monkeypatch):
    path, _ = video
    patch_capture(monkeypatch, frame_count=F + 5)
    out, _ = read_video(path)
    assert torch.equal(out, decoded)


def test_no_decodable_frames(video, monkeypatch):
    path, _ = video
    patch_capture(monkeypatch, frame_count=0, decodable=False)
    with pytest.raises(VideoReadError, match="no frames"):
        probe_video(path)


def test_nothing_decoded_in_read(video, monkeypatch):
    path, _ = video
    patch_capture(monkeypatch, decodable=False)
    with pytest.raises(VideoReadError, match="no frames could be decoded"):
        read_video(path)


def test_iter_video_frames_yields_uint8_rgb(video, decoded):
    path, _ = video
    got = list(iter_video_frames(path, [1, 1, 5, 20]))
    assert len(got) == 3  # index 20 lies past the end of the video
    assert all(f.dtype == np.uint8 and f.shape == (H, W, 3) for f in got)
    assert np.array_equal(got[0], got[1])
    assert torch.equal(torch.from_numpy(got[2]).float() / 255, decoded[5])
    with pytest.raises(I2VEditError, match="non-decreasing"):
        list(iter_video_frames(path, [3, 1]))


def test_write_into_missing_folder_fails_clearly(tmp_path):
    with pytest.raises(I2VEditError, match="does not exist; create it first"):
        write_video(tmp_path / "missing" / "out.mp4", moving_gradient(2), FPS)
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    ("frames", "fps", "name", "fragment"),
    [
        (torch.zeros(2, H, W, 3), 0.0, "out.mp4", "not positive"),
        (torch.zeros(2, H, W, 3), -5.0, "out.mp4", "not positive"),
        (torch.zeros(2, H, W, 4), FPS, "out.mp4", r"\(F, H, W, 3\)"),
        (torch.zeros(H, W, 3), FPS, "out.mp4", r"\(F, H, W, 3\)"),
        (torch.zeros(0, H, W, 3), FPS, "out.mp4", "F >= 1"),
        (torch.zeros(2, H, W, 3), FPS, "out.avi", "ending in .mp4"),
    ],
)
def test_write_rejects_bad_input(tmp_path, frames, fps, name, fragment):
    with pytest.raises(I2VEditError, match=fragment):
        write_video(tmp_path / name, frames, fps)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc refuses new files on Linux only")
def test_write_into_unwritable_folder_fails_clearly():
    # /proc refuses new files even to root, where a chmod-ed folder would not.
    with pytest.raises(
        I2VEditError, match=r"cannot write to folder /proc .*choose a folder you can write to"
    ):
        write_video("/proc/i2vedit-out.mp4", moving_gradient(2), FPS)


def test_writer_that_cannot_open_fails_clearly_and_cleans_up(tmp_path, monkeypatch):
    class ClosedWriter:
        def __init__(self, *args):
            pass

        def isOpened(self):
            return False

        def release(self):
            pass

    monkeypatch.setattr(video_io.cv2, "VideoWriter", ClosedWriter)
    with pytest.raises(I2VEditError, match="could not open an mp4v writer"):
        write_video(tmp_path / "out.mp4", moving_gradient(2), FPS)
    assert os.listdir(tmp_path) == []


def test_write_replaces_existing_file_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "out.mp4"
    write_video(path, moving_gradient(6), FPS)
    write_video(path, moving_gradient(3), 5.0)
    assert os.listdir(tmp_path) == ["out.mp4"]
    info = probe_video(path)
    assert (info.num_frames, info.fps) == (3, 5.0)


def test_write_clamps_out_of_range_values(tmp_path):
    path = tmp_path / "out.mp4"
    frames = torch.full((2, H, W, 3), 0.5)
    frames[:, :, : W // 2] = -1.0
    frames[:, :, W // 2 :] = 2.0
    write_video(path, frames, FPS)
    out, _ = read_video(path)
    assert out[:, 8:-8, 8 : W // 2 - 8].max() < 0.05
    assert out[:, 8:-8, W // 2 + 8 : -8].min() > 0.95


_FULL_DISK = """
import resource, signal, sys
import torch
from i2vedit.errors import I2VEditError
from i2vedit.io.video import write_video

limit = int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
frames = torch.rand(8, 64, 64, 3, generator=torch.Generator().manual_seed(1))
try:
    write_video(sys.argv[1], frames, 8.0)
except I2VEditError as e:
    print("ERROR", e)
else:
    print("OK")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE as a stand-in for a full disk")
def test_a_full_disk_while_writing_fails_loudly_and_keeps_the_previous_video(tmp_path):
    path = tmp_path / "edited.mp4"
    write_video(path, moving_gradient(4), FPS)
    before = path.read_bytes()
    limit = 8_000  # the new video (8 random 64×64 frames) needs more than three times this
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(path), str(limit)],
        cwd=root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ERROR could not write video"), run.stdout  # OpenCV itself says nothing
    assert "of 8 frames" in run.stdout and "free disk space" in run.stdout
    assert "previous file there is unchanged" in run.stdout
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["edited.mp4"]
    assert probe_video(path).num_frames == 4
