"""Any length in flat memory: a video read clip by clip, outputs written clip by clip, same result."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from i2vedit.errors import VideoReadError
from i2vedit.hosts.diffusers.tiny import build_tiny_diffusers_host
from i2vedit.io.frames import TensorSource
from i2vedit.io.synthetic import demo_video
from i2vedit.io.video import VideoSource, VideoWriter, read_video_clip, write_video
from i2vedit.run.pipeline import EditSettings, edit_frames


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    frames, edited = demo_video(10, (64, 96))
    path = tmp_path_factory.mktemp("video") / "square.mp4"
    write_video(path, frames, 8)
    return path, edited


def test_a_video_source_reads_the_frames_read_video_clip_reads_in_any_order(clip_file):
    path, _ = clip_file
    whole = read_video_clip(path).frames
    source = VideoSource(path)
    assert (source.count, source.height, source.width) == (10, 64, 96)
    for start, end in [(0, 4), (3, 7), (6, 10), (2, 5), (9, 10)]:  # forward, overlapping, then back again
        assert torch.equal(source.read(start, end), whole[start:end]), (start, end)
    assert len(source._held) == 1  # only the last read is held


def test_a_video_that_ends_early_is_said_when_the_missing_frame_is_asked_for(clip_file, monkeypatch):
    path, _ = clip_file
    source = VideoSource(path)
    source.count = 12  # the container promised more frames than it holds
    with pytest.raises(VideoReadError, match="ended after 10 of its 12"):
        source.read(8, 12)


def test_a_video_written_clip_by_clip_equals_one_written_at_once(clip_file, tmp_path):
    frames, _ = demo_video(10, (64, 96))
    write_video(tmp_path / "once.mp4", frames, 8)
    with VideoWriter(tmp_path / "parts.mp4", 8) as writer:
        for start in (0, 4, 7):
            writer.append(frames[start : {0: 4, 4: 7, 7: 10}[start]])
    decoded = []
    for name in ("once.mp4", "parts.mp4"):
        with av.open(str(tmp_path / name)) as container:
            decoded.append(np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]))
    assert decoded[0].shape == (10, 64, 96, 3) and np.array_equal(decoded[0], decoded[1])


def test_a_failed_clip_by_clip_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError), VideoWriter(tmp_path / "cut.mp4", 8) as writer:
        writer.append(torch.rand(2, 64, 64, 3))
        raise RuntimeError("the edit stopped")
    assert list(tmp_path.iterdir()) == []


class Recording:
    """A frame source that records the ranges asked of it."""

    def __init__(self, inner) -> None:
        self.inner, self.reads = inner, []
        self.count, self.height, self.width = inner.count, inner.height, inner.width

    def read(self, start: int, end: int) -> torch.Tensor:
        self.reads.append((start, end))
        return self.inner.read(start, end)


def test_an_edit_read_and_written_clip_by_clip_equals_the_whole_video_in_memory(clip_file, tmp_path):
    """Bit for bit, region lock included; no read is longer than a clip."""
    path, edited = clip_file
    host = build_tiny_diffusers_host(seed=0)
    settings = EditSettings(chunk=4, steps=2, lora_steps=1, lora_rank=4)
    whole = read_video_clip(path).frames
    in_memory = edit_frames(host, whole, 8.0, [edited], settings, size=(64, 128), region="auto")
    source = Recording(VideoSource(path))
    got: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    streamed = edit_frames(host, source, 8.0, [edited], settings, size=(64, 128), region="auto",
                           reuse_dir=tmp_path / "reuse", sink=lambda e, start, v, m, r: got.append((start, v, m, r)))  # fmt: skip
    assert streamed.videos == [] and [start for start, *_ in got] == [0, 4, 7]
    assert torch.equal(torch.cat([v for _, v, _, _ in got]), in_memory.videos[0])
    assert torch.equal(torch.cat([m for _, _, m, _ in got]), in_memory.masks[0])
    assert in_memory.regions is not None
    assert torch.equal(torch.cat([r for *_, r in got if r is not None]), in_memory.regions[0])
    assert max(end - start for start, end in source.reads) <= settings.chunk


def test_a_tensor_source_is_the_tensor():
    frames = torch.rand(5, 8, 8, 3)
    source = TensorSource(frames)
    assert torch.equal(source.read(1, 4), frames[1:4]) and source.count == 5
