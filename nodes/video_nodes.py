"""Frame sampling, resize/pad and its undo, clip selection, stitching and the difference-mask preview."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io, ui

from ..i2vedit.errors import I2VEditError
from ..i2vedit.io.frames import (
    clip_ranges,
    fit_size,
    make_resize_plan,
    resize_frames,
    sample_frame_indices,
    stitch_clips,
)
from ..i2vedit.method.region import DEFAULT_DILATE, DEFAULT_THRESHOLD, auto_region
from .common import CATEGORY, ResizeInfo, check_frames, check_resize

log = logging.getLogger("i2vedit")

CLIP_LENGTH_TOOLTIP = "Frames per clip: 14 for svd.safetensors, up to 25 for svd_xt. The paper uses 14."
OVERLAP_TOOLTIP = (
    "Frames shared by neighbouring clips; the next clip starts from the previous one's last frame."
)


class SampleFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="I2VEditSampleFrames",
            display_name="Sample Frames (I2VEdit)",
            category=f"{CATEGORY}/video",
            description="Picks a time range of a video's frames at a chosen frame rate, as the I2VEdit authors "
            "sample their sources. Works on the IMAGE batch of core GetVideoComponents or VideoHelperSuite.",
            inputs=[
                io.Image.Input("frames", tooltip="All frames of the source video (an IMAGE batch)."),
                io.Float.Input(
                    "fps",
                    default=30.0,
                    min=0.01,
                    max=1000.0,
                    step=0.01,
                    tooltip="The source video's frame rate (GetVideoComponents' fps output).",
                ),
                io.Float.Input(
                    "start_seconds",
                    default=0.0,
                    min=0.0,
                    max=1e6,
                    step=0.01,
                    tooltip="Where the range starts, in seconds.",
                ),
                io.Float.Input(
                    "end_seconds",
                    default=-1.0,
                    min=-1.0,
                    max=1e6,
                    step=0.01,
                    tooltip="Where the range ends, in seconds; -1 = the end of the video.",
                ),
                io.Float.Input(
                    "sample_fps",
                    default=-1.0,
                    min=-1.0,
                    max=1000.0,
                    step=0.01,
                    tooltip="Frames per second to keep; -1 = the video's own rate. "
                    "SVD was trained at low rates; 7–10 fps keeps clips long in time.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="The sampled frames."),
                io.Float.Output(display_name="fps", tooltip="Their frame rate."),
                io.Int.Output(display_name="frame_count", tooltip="How many frames were kept."),
            ],
        )

    @classmethod
    def execute(
        cls, frames, fps: float, start_seconds: float, end_seconds: float, sample_fps: float
    ) -> io.NodeOutput:
        frames = check_frames(frames)
        idx = sample_frame_indices(frames.shape[0], fps, start_seconds, end_seconds, sample_fps)
        out_fps = fps if sample_fps == -1 else sample_fps
        return io.NodeOutput(frames[idx], float(out_fps), len(idx))


class FitFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="I2VEditFitFrames",
            display_name="Fit Frames (I2VEdit)",
            category=f"{CATEGORY}/video",
            description="Brings frames (and the edited first frame) to a size SVD can generate (multiples of 64), "
            "padding to keep the aspect ratio or stretching. 'Restore Frames' undoes it on the result.",
            inputs=[
                io.Image.Input("frames", tooltip="Source frames of any size."),
                io.Image.Input(
                    "edited_first_frame",
                    optional=True,
                    tooltip="The edited first frame. If its size differs from the frames', it is "
                    "resized to theirs first (a warning is logged).",
                ),
                io.Int.Input(
                    "max_side",
                    default=1024,
                    min=64,
                    max=4096,
                    step=64,
                    tooltip="Longest side of the generation size when width/height are 0. SVD was "
                    "trained at 1024×576.",
                ),
                io.Int.Input(
                    "width",
                    default=0,
                    min=0,
                    max=4096,
                    step=64,
                    tooltip="Generation width (a multiple of 64); 0 = from max_side and the aspect.",
                ),
                io.Int.Input(
                    "height",
                    default=0,
                    min=0,
                    max=4096,
                    step=64,
                    tooltip="Generation height (a multiple of 64); 0 = from max_side and the aspect.",
                ),
                io.Combo.Input(
                    "mode",
                    options=["pad", "stretch"],
                    default="pad",
                    tooltip="pad: keep the aspect ratio and fill the rest (SARP perturbs the flat "
                    "bars); stretch: fill the frame.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="Frames at the generation size."),
                io.Image.Output(
                    display_name="edited_first_frame",
                    tooltip="The edited first frame at the generation size (the first fitted "
                    "frame when none was given).",
                ),
                ResizeInfo.Output(
                    display_name="resize", tooltip="How to undo this: connect to Restore Frames."
                ),
            ],
        )

    @classmethod
    def execute(
        cls, frames, max_side: int, width: int, height: int, mode: str, edited_first_frame=None
    ) -> io.NodeOutput:
        frames = check_frames(frames)
        _, h, w, _ = frames.shape
        if (width == 0) != (height == 0):
            raise I2VEditError("set both width and height, or leave both at 0 to fit within max_side.")
        size = (height, width) if width else fit_size(h, w, max_side)
        plan = make_resize_plan(h, w, *size, mode=mode)
        fitted = plan.apply(frames)
        edited = fitted[:1]
        if edited_first_frame is not None:
            img = check_frames(edited_first_frame, "edited_first_frame")[:1]
            if tuple(img.shape[1:3]) != (h, w):
                log.warning("the edited first frame is %dx%d, the video %dx%d: resizing it to the video's size",
                            img.shape[1], img.shape[2], h, w)  # fmt: skip
                img = resize_frames(img, h, w)
            edited = plan.apply(img)
        return io.NodeOutput(fitted, edited, plan)


class RestoreFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="I2VEditRestoreFrames",
            display_name="Restore Frames (I2VEdit)",
            category=f"{CATEGORY}/video",
            description="Undoes 'Fit Frames': crops the padding and resizes back to the source's size.",
            inputs=[
                io.Image.Input("frames", tooltip="Frames at the generation size (the edit result)."),
                ResizeInfo.Input("resize", tooltip="The resize output of Fit Frames."),
                io.Mask.Input(
                    "mask", optional=True, tooltip="Masks at the generation size to restore as well."
                ),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="Frames at the source's size."),
                io.Mask.Output(
                    display_name="mask", tooltip="The masks at the source's size (zeros if none)."
                ),
            ],
        )

    @classmethod
    def execute(cls, frames, resize, mask=None) -> io.NodeOutput:
        plan = check_resize(resize)
        out = plan.invert(check_frames(frames))
        if mask is None:
            restored = torch.zeros(out.shape[:3])
        else:
            restored = plan.invert(mask.reshape(-1, *mask.shape[-2:]).unsqueeze(-1))[..., 0]
        return io.NodeOutput(out, restored)


class SelectClip(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="I2VEditSelectClip",
            display_name="Select Clip (I2VEdit)",
            category=f"{CATEGORY}/video",
            description="Cuts a long video into clips that overlap by one frame, and returns clip number 'index'.",
            inputs=[
                io.Image.Input("frames", tooltip="All frames at the generation size."),
                io.Int.Input("clip_length", default=14, min=2, max=64, tooltip=CLIP_LENGTH_TOOLTIP),
                io.Int.Input("overlap", default=1, min=0, max=63, tooltip=OVERLAP_TOOLTIP),
                io.Int.Input("index", default=0, min=0, max=100000, tooltip="Which clip (0 = the first)."),
            ],
            outputs=[
                io.Image.Output(display_name="clip", tooltip="The clip's frames."),
                io.Int.Output(display_name="clip_count", tooltip="How many clips the video has."),
                io.Int.Output(
                    display_name="first_frame", tooltip="Index of the clip's first frame in the video."
                ),
            ],
        )

    @classmethod
    def execute(cls, frames, clip_length: int, overlap: int, index: int) -> io.NodeOutput:
        frames = check_frames(frames)
        n = frames.shape[0]
        ranges = clip_ranges(n, min(clip_length, n), overlap)
        if index >= len(ranges):
            raise I2VEditError(
                f"clip {index} does not exist: {n} frames in clips of {clip_length} overlapping by {overlap} "
                f"make {len(ranges)} clips (0–{len(ranges) - 1})."
            )
        a, b = ranges[index]
        return io.NodeOutput(frames[a:b], len(ranges), a)


class StitchClips(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="I2VEditStitchClips",
            display_name="Stitch Clips (I2VEdit)",
            category=f"{CATEGORY}/video",
            description="Joins two consecutive edited clips, keeping each overlap frame once. Chain it for more clips.",
            inputs=[
                io.Image.Input("first", tooltip="The earlier frames (a clip, or clips stitched so far)."),
                io.Image.Input("second", tooltip="The next clip."),
                io.Int.Input("overlap", default=1, min=0, max=63, tooltip=OVERLAP_TOOLTIP),
                io.Mask.Input("first_mask", optional=True, tooltip="Masks of the earlier frames."),
                io.Mask.Input("second_mask", optional=True, tooltip="Masks of the next clip."),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="The joined frames."),
                io.Mask.Output(
                    display_name="mask", tooltip="The joined masks (zeros where none were given)."
                ),
            ],
        )

    @classmethod
    def execute(cls, first, second, overlap: int, first_mask=None, second_mask=None) -> io.NodeOutput:
        first, second = check_frames(first, "first"), check_frames(second, "second")
        if first.shape[1:] != second.shape[1:]:
            raise I2VEditError(
                f"the clips differ in size ({first.shape[1]}×{first.shape[2]} and {second.shape[1]}×"
                f"{second.shape[2]}); stitch clips of one video at one size."
            )
        frames = stitch_clips([first, second], overlap)
        masks = [
            m if m is not None else torch.zeros(f.shape[:3])
            for m, f in ((first_mask, first), (second_mask, second))
        ]
        masks = [m.reshape(f.shape[:3]) for m, f in zip(masks, (first, second))]
        return io.NodeOutput(frames, stitch_clips(masks, overlap))


class MaskPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="I2VEditMaskPreview",
            display_name="Difference Mask Preview (I2VEdit)",
            category=f"{CATEGORY}/preview",
            description="Shows where attention matching treated the video as edited (red) and where it kept the "
            "source's attention (unchanged).",
            inputs=[
                io.Image.Input("frames", tooltip="Frames to draw on (source or result)."),
                io.Mask.Input("mask", tooltip="Difference masks from Attention Match Sampler (1 = edited)."),
                io.Float.Input(
                    "opacity", default=0.6, min=0.0, max=1.0, step=0.05, tooltip="Strength of the overlay."
                ),
            ],
            outputs=[io.Image.Output(display_name="overlay", tooltip="The frames with the masks overlaid.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, frames, mask, opacity: float) -> io.NodeOutput:
        frames = check_frames(frames)
        m = mask.reshape(-1, *mask.shape[-2:]).float()
        if m.shape[1:] != frames.shape[1:3]:
            m = torch.nn.functional.interpolate(m[:, None], size=frames.shape[1:3], mode="bilinear")[:, 0]
        if m.shape[0] not in (1, frames.shape[0]):
            raise I2VEditError(f"{m.shape[0]} masks for {frames.shape[0]} frames; give one mask per frame.")
        red = torch.tensor([1.0, 0.0, 0.0])
        a = (opacity * m.clamp(0, 1)).unsqueeze(-1)
        overlay = frames * (1 - a) + red * a
        return io.NodeOutput(overlay, ui=ui.PreviewImage(overlay, cls=cls))


class AutoRegionMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="I2VEditAutoRegionMask",
            display_name="Auto Region Mask (I2VEdit)",
            category=f"{CATEGORY}/video",
            description="Where the edited first frame differs from the source's first frame, carried to every "
            "later frame along the source video's optical flow, so the region follows the object that moves. "
            "Feed it to the all-in-one node's region_mask (region_lock = mask) to keep everything else exactly "
            "as in the source.",
            inputs=[
                io.Image.Input("frames", tooltip="The source video's frames."),
                io.Image.Input("edited_first_frame", tooltip="The edited first frame, at the frames' size."),
                io.Float.Input(
                    "threshold",
                    default=DEFAULT_THRESHOLD,
                    min=0.01,
                    max=0.99,
                    step=0.01,
                    tooltip="How much a pixel must change (largest channel, 0–1) to count as edited.",
                ),
                io.Int.Input(
                    "dilate",
                    default=DEFAULT_DILATE,
                    min=0,
                    max=256,
                    tooltip="Pixels the region grows by on every frame, a margin for the edit's reach.",
                ),
            ],
            outputs=[
                io.Mask.Output(display_name="region_mask", tooltip="One mask per frame (1 = may change).")
            ],
        )

    @classmethod
    def execute(cls, frames, edited_first_frame, threshold: float, dilate: int) -> io.NodeOutput:
        frames = check_frames(frames)
        edited = check_frames(edited_first_frame, "edited_first_frame")[:1]
        mask = auto_region(frames, edited, threshold, dilate)
        return io.NodeOutput(mask, ui=ui.PreviewMask(mask, cls=cls))
