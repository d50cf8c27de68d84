"""ComfyUI's ``VIDEO`` (``comfy_api`` ``VideoInput``) to and from the core's videos: frames, exact rate, audio.

A video ComfyUI holds as a file (``LoadVideo``) is read by the core's reader, clip by clip (``VideoSource``)
with its exact frame rate; one made from components (``CreateVideo``) hands over its frames and audio as
they are. An edited video goes back as a file (``VideoFiles``), written clip by clip.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from comfy_api.latest import InputImpl

from ...errors import I2VEditError
from ...io.frames import FrameSource, TensorSource
from ...io.video import Audio, VideoSource, VideoWriter, as_fraction


def video_source(
    frames: Any, fps: float, video: Any, check: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
) -> tuple[FrameSource, Fraction, Audio | None]:
    """The video to edit as a ``FrameSource`` with its rate and audio, from exactly one of an IMAGE batch
    (at ``fps``) and a ComfyUI ``VIDEO``: a file is read clip by clip, never whole; a video made from
    components (``CreateVideo``) hands over its frames and audio as they are. ``check`` sees (and may
    mend) the frames held in memory, the IMAGE batch or the components' images."""
    if (frames is None) == (video is None):
        given = "both" if frames is not None else "neither"
        raise I2VEditError(
            f"{given} of frames and video are connected; connect exactly one: a VIDEO (LoadVideo), whose frame "
            "rate and audio are used, or an IMAGE batch of frames (VideoHelperSuite) with its fps."
        )
    if video is None:
        return TensorSource(check(frames)), as_fraction(fps), None
    stream = video.get_stream_source()
    if isinstance(stream, str):
        source = VideoSource(stream)
        return source, source.fps, source.audio
    parts = video.get_components()
    audio = None
    if parts.audio is not None:
        audio = Audio(parts.audio["waveform"][0].float().cpu(), int(parts.audio["sample_rate"]))
    return TensorSource(check(parts.images)), Fraction(parts.frame_rate), audio


class VideoFiles:
    """A ``ClipSink`` that writes each edit's video (with the source's audio) to a file clip by clip, and
    keeps the frames, difference masks and region masks for IMAGE/MASK outputs (all of them, or, with
    ``keep_frames`` off, each edit's first frame only, so that a long video never sits in memory)."""

    def __init__(
        self, folder: Path, stem: str, edits: int, fps: Fraction, audio: Audio | None, keep_frames: bool
    ) -> None:
        self.folder, self.stem, self.fps, self.audio, self.keep = folder, stem, fps, audio, keep_frames
        self.writers = [VideoWriter(folder / f"{stem}_{e}.mp4", fps, audio) for e in range(edits)]
        self.kept: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = [
            [] for _ in range(edits)
        ]

    def __call__(
        self, e: int, start: int, frames: torch.Tensor, masks: torch.Tensor, region: torch.Tensor | None
    ) -> None:
        self.writers[e].append(frames)
        if self.keep or start == 0:
            n = frames.shape[0] if self.keep else 1
            self.kept[e].append((frames[:n], masks[:n], region[:n] if region is not None else None))

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kept frames, difference masks and region masks of every edit, one edit after another."""
        parts = [p for edit in self.kept for p in edit]
        frames, masks = torch.cat([f for f, _, _ in parts]), torch.cat([m for _, m, _ in parts])
        regions = torch.cat([r if r is not None else torch.ones_like(m) for _, m, r in parts])
        return frames, masks, regions

    def finish(self) -> Any:
        """Close the files; a ComfyUI ``VIDEO`` of the file (several edits: joined one after another, clip by
        clip, the audio repeated for each)."""
        for writer in self.writers:
            writer.close()
        if len(self.writers) == 1:
            return InputImpl.VideoFromFile(str(self.writers[0].path))
        audio = None if self.audio is None else self.audio.repeated(len(self.writers))
        joined = self.folder / f"{self.stem}.mp4"
        with VideoWriter(joined, self.fps, audio) as out:
            for writer in self.writers:
                part = VideoSource(writer.path, audio=False)
                for start in range(0, part.count, JOIN_FRAMES):
                    out.append(part.read(start, min(part.count, start + JOIN_FRAMES)))
        return InputImpl.VideoFromFile(str(joined))

    def discard(self) -> None:
        for writer in self.writers:
            writer.discard()


JOIN_FRAMES = 16  # frames decoded at a time when several edits' videos are joined
