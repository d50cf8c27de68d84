"""ComfyUI's ``VIDEO`` (``comfy_api`` ``VideoInput``) to and from the core's ``Video``: frames, exact rate, audio.

A video ComfyUI holds as a file (``LoadVideo``) is read by the core's reader, with its memory cap and
exact frame rate; one made from components (``CreateVideo``) hands over its frames and audio as they are.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from comfy_api.latest import InputImpl, Types

from ...errors import I2VEditError
from ...io.video import Audio, Video, as_fraction, read_video_clip


def video_from_comfy(video: Any) -> Video:
    """The frames, frame rate and audio of a ComfyUI ``VIDEO``."""
    source = video.get_stream_source()
    if isinstance(source, str):
        return read_video_clip(source)
    parts = video.get_components()
    audio = None
    if parts.audio is not None:
        waveform = parts.audio["waveform"]
        audio = Audio(waveform[0].float().cpu(), int(parts.audio["sample_rate"]))
    return Video(parts.images, Fraction(parts.frame_rate), audio)


def video_to_comfy(video: Video) -> Any:
    """A ComfyUI ``VIDEO`` of ``video``; its audio downmixed to stereo, the most ComfyUI's writer takes."""
    audio = None
    if video.audio is not None:
        stereo = video.audio.downmixed(2)
        audio = {"waveform": stereo.samples.unsqueeze(0), "sample_rate": stereo.sample_rate}
    return InputImpl.VideoFromComponents(
        Types.VideoComponents(images=video.frames, frame_rate=video.fps, audio=audio)
    )


def edit_source(frames: Any, fps: float, video: Any) -> Video:
    """The video to edit, from exactly one of an IMAGE batch (at ``fps``) and a ComfyUI ``VIDEO``."""
    if (frames is None) == (video is None):
        given = "both" if frames is not None else "neither"
        raise I2VEditError(
            f"{given} of frames and video are connected; connect exactly one: a VIDEO (LoadVideo), whose frame "
            "rate and audio are used, or an IMAGE batch of frames (VideoHelperSuite) with its fps."
        )
    if video is not None:
        return video_from_comfy(video)
    return Video(frames, as_fraction(fps))
