import logging
import math
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from fixtures.real_clips import BUNNY, CARPHONE, real_clip

from i2vedit.errors import I2VEditError, VideoReadError
from i2vedit.io import video as video_io
from i2vedit.io.video import (
    Audio,
    VideoInfo,
    iter_video_frames,
    probe_video,
    read_audio,
    read_video,
    read_video_clip,
    write_video,
)

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
    with pytest.raises(
        VideoReadError, match=r"not a readable video \(Invalid data.*\); convert it to mp4 \(H.264\)"
    ):
        read_video(path)


def test_directory_is_not_a_video(tmp_path):
    with pytest.raises(VideoReadError, match="not a file"):
        probe_video(tmp_path)


def test_errors_are_value_errors(tmp_path):
    with pytest.raises(ValueError):
        probe_video(tmp_path / "nope.mp4")


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
    assert run.stdout.startswith("ERROR could not write video"), run.stdout
    assert "File too large" in run.stdout and "free disk space" in run.stdout  # PyAV says what failed
    assert "previous file there is unchanged" in run.stdout
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["edited.mp4"]
    assert probe_video(path).num_frames == 4


# PyAV-made files for what the writer never makes: no video stream, a variable rate, PCM audio.


def _rgb_frame(value: int, pts: int, time_base: Fraction | None = None) -> av.VideoFrame:
    frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), value, np.uint8), format="rgb24")
    frame.pts = pts
    if time_base is not None:
        frame.time_base = time_base
    return frame.reformat(format="yuv420p")


def _sine(channels: int, count: int, rate: int) -> np.ndarray:
    t = np.arange(count) / rate
    return np.stack([0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) for c in range(channels)]).astype(
        np.float32
    )


def test_a_file_without_a_video_stream_is_refused(tmp_path):
    path = tmp_path / "sound.m4a"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=8000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(_sine(1, 8000, 8000), "fltp", "mono")
        frame.sample_rate, frame.pts = 8000, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with pytest.raises(VideoReadError, match=r"has no video stream \(it holds audio\); give a video file"):
        read_video(path)


def test_a_variable_frame_rate_is_read_at_its_average_rate_with_a_warning(tmp_path, caplog):
    path = tmp_path / "vfr.mp4"
    ms = Fraction(1, 1000)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("h264", rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = ms
        for i, t in enumerate([0, 100, 200, 300, 350, 400, 450, 500]):  # 10 fps, then 20 fps
            out.mux(stream.encode(_rgb_frame(30 * i, t, ms)))
        out.mux(stream.encode(None))
    with caplog.at_level(logging.WARNING, logger="i2vedit"):
        info = probe_video(path)
    assert info.variable_rate and info.num_frames == 8
    assert "variable frame rate" in caplog.text and "average" in caplog.text and "-r 30" in caplog.text
    frames, fps = read_video(path)
    assert fps == info.fps and 10 < fps < 20
    assert frames.shape[0] == 8  # every frame, in order
    assert frames[:, 8:-8, 8:-8].mean(dim=(1, 2, 3)).diff().min() > 0
    caplog.clear()
    fixed = tmp_path / "cfr.mp4"
    write_video(fixed, moving_gradient(6), Fraction(30000, 1001))
    with caplog.at_level(logging.WARNING, logger="i2vedit"):
        assert not probe_video(fixed).variable_rate
    assert caplog.text == ""


def test_a_truncated_video_gives_the_frames_it_holds(tmp_path):
    path = tmp_path / "cut.mp4"
    write_video(path, torch.rand(12, 64, 64, 3, generator=torch.Generator().manual_seed(0)), FPS)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    frames, _ = read_video(path)
    assert 1 <= frames.shape[0] < 12


def test_output_is_h264_yuv420p_with_odd_sizes_padded_to_even(tmp_path):
    path = tmp_path / "odd.mp4"
    frames = moving_gradient(4, 33, 47)
    write_video(path, frames, FPS)
    with av.open(str(path)) as container:
        (stream,) = container.streams
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert (stream.codec_context.height, stream.codec_context.width) == (34, 48)
    out, _ = read_video(path)
    assert (out[:, :33, :47] - frames).abs().mean() < 0.03
    # the padding repeats the last row and column
    assert (out[:, 33] - out[:, 32]).abs().mean() < 0.03 and (
        out[:, :, 47] - out[:, :, 46]
    ).abs().mean() < 0.03


@pytest.mark.parametrize("fps", [Fraction(30000, 1001), Fraction(24000, 1001), Fraction(25, 2), 30000 / 1001])
def test_fractional_frame_rates_round_trip_exactly(tmp_path, fps):
    path = tmp_path / "rate.mp4"
    write_video(path, moving_gradient(5), fps)
    info = probe_video(path)
    expected = Fraction(fps).limit_denominator(1001)
    assert info.fps == expected and isinstance(info.fps, Fraction)
    assert read_video(path)[1] == expected


def test_a_real_fractional_rate_clip_round_trips_exactly(tmp_path):
    clip = read_video_clip(real_clip(CARPHONE), end_t=0.5)
    assert clip.fps == Fraction(30000, 1001) and clip.audio is None
    assert clip.frames.shape == (14, 144, 176, 3)  # int(0.5 s × 29.97)
    write_video(tmp_path / "out.mp4", clip.frames, clip.fps)
    again = read_video_clip(tmp_path / "out.mp4")
    assert again.fps == Fraction(30000, 1001)
    assert (again.frames - clip.frames).abs().mean() < 0.02


def _decoded_audio(path) -> tuple[np.ndarray, int, str]:
    with av.open(str(path)) as container:
        (stream,) = container.streams.audio
        codec = stream.codec_context.name
        rate = stream.sample_rate
        samples = np.concatenate([f.to_ndarray() for f in container.decode(stream)], axis=1)
    return samples, rate, codec


@pytest.mark.parametrize(
    ("kwargs", "start", "seconds"),
    [
        ({}, 0.0, 132 / 25),
        ({"start_t": 1.0, "end_t": 3.0}, 1.0, 2.0),
        ({"start_t": 2.0, "sample_fps": 5.0}, 2.0, 3.2),
    ],
)
def test_the_sources_audio_is_carried_over_and_cut_to_the_range(tmp_path, kwargs, start, seconds):
    source = real_clip(BUNNY)
    clip = read_video_clip(source, size=(36, 64), **kwargs)
    assert clip.audio is not None and clip.audio.sample_rate == 48000 and clip.audio.layout == "5.1"
    per_frame = 48000 / float(clip.fps)
    assert abs(clip.audio.samples.shape[1] - seconds * 48000) <= per_frame
    expected = read_audio(source, start, seconds)
    assert expected is not None and torch.equal(clip.audio.samples, expected.samples)
    path = tmp_path / "with_sound.mp4"
    write_video(path, clip.frames, clip.fps, clip.audio)
    samples, rate, codec = _decoded_audio(path)
    assert (codec, rate, samples.shape[0]) == ("aac", 48000, 6)
    assert (
        abs(samples.shape[1] - clip.audio.samples.shape[1]) <= per_frame
    )  # the same duration within a frame
    n = min(samples.shape[1], clip.audio.samples.shape[1])
    original = clip.audio.samples[:, :n].numpy()
    # the same sound (AAC is lossy): the error is small next to the signal
    assert np.abs(samples[:, :n] - original).mean() < 0.2 * np.abs(original).mean()
    assert probe_video(path).num_frames == clip.frames.shape[0]


def test_audio_pcm_in_mkv_is_reencoded_to_aac(tmp_path):
    source = tmp_path / "pcm.mkv"
    with av.open(str(source), "w") as out:
        video = out.add_stream("h264", rate=8)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        sound = out.add_stream("pcm_s16le", rate=44100)
        sound.layout = "stereo"
        for i in range(8):
            out.mux(video.encode(_rgb_frame(30 * i, i)))
        out.mux(video.encode(None))
        pcm = (_sine(2, 44100, 44100) * 32767).astype(np.int16).T.reshape(1, -1).copy()
        frame = av.AudioFrame.from_ndarray(pcm, "s16", "stereo")
        frame.sample_rate, frame.pts = 44100, 0
        out.mux(sound.encode(frame))
        out.mux(sound.encode(None))
    clip = read_video_clip(source)
    assert clip.audio is not None and clip.audio.samples.shape == (2, 44100) and clip.audio.layout == "stereo"
    assert np.abs(clip.audio.samples.numpy() - _sine(2, 44100, 44100)).max() < 1e-3
    write_video(tmp_path / "out.mp4", clip.frames, clip.fps, clip.audio)
    samples, rate, codec = _decoded_audio(tmp_path / "out.mp4")
    assert (codec, rate, samples.shape[0]) == ("aac", 44100, 2) and abs(samples.shape[1] - 44100) <= 44100 / 8


@pytest.mark.parametrize(("channels", "rate"), [(2, 5000), (12, 48000)])
def test_audio_aac_cannot_carry_is_dropped_with_a_warning(tmp_path, caplog, channels, rate):
    path = tmp_path / "out.mp4"
    with caplog.at_level(logging.WARNING, logger="i2vedit"):
        write_video(path, moving_gradient(4), FPS, Audio(torch.zeros(channels, rate), rate))
    assert f"({channels} channels, {rate} Hz) cannot be encoded as AAC" in caplog.text
    assert "without sound" in caplog.text
    with av.open(str(path)) as container:
        assert [s.type for s in container.streams] == ["video"]
    assert probe_video(path).num_frames == 4


def test_audio_longer_than_the_video_is_cut(tmp_path):
    path = tmp_path / "out.mp4"
    write_video(path, moving_gradient(5), FPS, Audio(torch.from_numpy(_sine(1, 48000 * 3, 48000)), 48000))
    samples, _, _ = _decoded_audio(path)
    assert abs(samples.shape[1] - 24000) <= 4800  # 5 frames at 10 fps: 0.5 s, within a frame
