"""Skip-interval K/V, the attention-matched sampler, and the all-in-one long-video node."""

from __future__ import annotations

import itertools
import os
import uuid
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import InputImpl, Types, io, ui

from ..i2vedit.errors import I2VEditError
from ..i2vedit.hosts.comfy.video import VideoFiles, video_source
from ..i2vedit.io.frames import fit_size
from ..i2vedit.lora.file import check_lora_name
from ..i2vedit.method.controller import PRESETS, MatchConfig
from ..i2vedit.method.inversion import MEMORY_MODES
from ..i2vedit.method.skip_interval import SkipInterval
from ..i2vedit.run.pipeline import (
    MAX_CHUNK,
    MAX_LORA_STEPS,
    MAX_STEPS,
    EditSettings,
    edit_frames,
    prepare_clips,
    training_hw,
    video_clip_ranges,
)
from ..i2vedit.run.stages import denoise_time_ids, edit_clip
from ..i2vedit.seeds import Purpose, generator
from ..i2vedit.svd import LATENT_SCALE
from .common import (
    CATEGORY,
    MEMORY_TOOLTIP,
    SEED_TOOLTIP,
    EditedClip,
    EditState,
    Inversions,
    KVCache,
    MotionLoRA,
    StepProgress,
    check_frames,
    check_inversion,
    check_kv,
    checkpoint_inputs,
    host_of,
)
from .lora_nodes import check_lora, check_lora_not_applied

PRESET_NAMES = [*PRESETS, "off"]
PRESET_TOOLTIP = (
    "Attention matching strength (β stages, τ thresholds): local (0.5/0.8) for local edits such as "
    "recolouring or adding an object, style (0.8/0.9) for global style changes, shape (0.4/0.5) for edits "
    "that change shapes; off = plain denoising from the inversion."
)
FPS_TOOLTIP = "The clip's frame rate (SVD's fps conditioning is this minus one)."


def train_res_inversion_runs(
    clips: int, lora_steps: int, size: tuple[int, int], train_size: tuple[int, int], skip_interval: bool
) -> bool:
    """Whether ``edit_video`` inverts the first clip again at training size (stage ``invert_train_res``).

    It does when later clips train their LoRA on the first clip's K/V and training runs at another size.
    """
    return clips > 1 and skip_interval and lora_steps > 0 and tuple(train_size) != tuple(size)


def clip_step_counts(
    clips: int, steps: int, edits: int, lora_steps: int, train_res_inversion: bool
) -> list[int]:
    """Model steps the all-in-one node runs per clip, from scratch: the progress bar's shares.

    Each clip: inversion (``steps``), LoRA training (``lora_steps``), one denoising per edit (``steps``
    each). The first clip's inversion at training size (``steps``) runs while clip 1 is being prepared,
    so it counts for clip 1.
    """
    counts = [steps + lora_steps + edits * steps for _ in range(clips)]
    if train_res_inversion and clips > 1:
        counts[1] += steps
    return counts


class VideoProgress(StepProgress):
    """The all-in-one node's bar: one tick per model step, ending at exactly 100%.

    Steps that do not run (clips restored from the reuse folder, training resumed from a checkpoint)
    are credited when the next clip starts and at the end; the bar never goes past its total.
    """

    def __init__(self, clip_steps: list[int], preview_model=None) -> None:
        super().__init__(sum(clip_steps), preview_model)
        self.starts = list(itertools.accumulate(clip_steps, initial=0))  # steps before each clip

    def stage(self, event: dict) -> None:
        """``edit_video``'s stage report: on reaching a later clip, credit the earlier clips in full."""
        self._raise_to(self.starts[min(int(event.get("clip", 0)), len(self.starts) - 1)])  # never lowers

    def finish(self) -> None:
        self._raise_to(self.total)

    def _raise_to(self, value: int) -> None:
        if value > self.done:
            self.done = value
            self.bar.update_absolute(min(value, self.total), self.total)


class SkipIntervalKVCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SkipIntervalKVCache",
            display_name="Skip-Interval KV Cache (I2VEdit)",
            category=f"{CATEGORY}/long video",
            description="The first clip's temporal keys and values, which every later clip attends to, so a long "
            "video keeps its look across clips. Holds nothing heavy: in recompute mode the K/V are re-made "
            "step by step from the first clip's trajectories.",
            inputs=[
                Inversions.Input("first_clip_inversion", tooltip="The FIRST clip's inversion."),
                EditedClip.Input(
                    "first_clip_edit",
                    optional=True,
                    tooltip="The FIRST clip's Attention Match Sampler output; needed to denoise "
                    "later clips (inverting and training them need only the inversion).",
                ),
            ],
            outputs=[
                KVCache.Output(
                    display_name="skip_interval_kv",
                    tooltip="For later clips' inversion, LoRA training and Attention Match Sampler.",
                )
            ],
        )

    @classmethod
    def execute(cls, first_clip_inversion, first_clip_edit=None) -> io.NodeOutput:
        first_clip_inversion = check_inversion(first_clip_inversion)
        if first_clip_inversion.inversion.skip_kv is not None:
            raise I2VEditError("this inversion is of a later clip; connect the first clip's inversion.")
        kv = SkipInterval(on=True, edits=1)
        kv.first_inversion(first_clip_inversion.host, first_clip_inversion.inversion)
        if first_clip_edit is not None:
            if not isinstance(first_clip_edit, EditState):
                raise I2VEditError("first_clip_edit must come from 'Attention Match Sampler'.")
            if first_clip_edit.clip.inversion is not first_clip_inversion.inversion:
                raise I2VEditError(
                    "first_clip_edit was denoised from another inversion than first_clip_inversion."
                )
            kv.first_edit(0, first_clip_edit.clip, first_clip_edit.result)
        return io.NodeOutput(kv)


class AttentionMatchSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttentionMatchSampler",
            display_name="Attention Match Sampler (I2VEdit)",
            category=f"{CATEGORY}/sampling",
            description="Denoises a clip from its inversion under the edited first frame, matching the source's "
            "attention where the edit did not change things (spatial difference maps) and injecting its "
            "temporal attention in stages, so the result keeps the source's motion and unedited areas.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The SVD MODEL: the one that made the inversion, or its copy with "
                    "the motion LoRA from Train Motion LoRA (then leave 'lora' empty).",
                ),
                Inversions.Input("inversion", tooltip="This clip's inversion."),
                io.Combo.Input("preset", options=PRESET_NAMES, default="local", tooltip=PRESET_TOOLTIP),
                io.Float.Input(
                    "min_cfg",
                    default=1.0,
                    min=0.0,
                    max=20.0,
                    step=0.05,
                    tooltip="CFG of the first frame; it ramps linearly to max_cfg at the last frame.",
                ),
                io.Float.Input(
                    "max_cfg",
                    default=2.0,
                    min=0.0,
                    max=20.0,
                    step=0.05,
                    tooltip="CFG of the last frame. The paper uses 1 → 2.",
                ),
                io.Float.Input("fps", default=8.0, min=1.0, max=120.0, step=0.5, tooltip=FPS_TOOLTIP),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, tooltip=SEED_TOOLTIP),
                io.Image.Input(
                    "edited_first_frame",
                    optional=True,
                    tooltip="The edited first frame at the clip's size (first clip).",
                ),
                EditedClip.Input(
                    "previous_clip",
                    optional=True,
                    tooltip="For later clips: the previous clip's result; this clip continues from "
                    "its last frame (used instead of edited_first_frame).",
                ),
                MotionLoRA.Input(
                    "lora", optional=True, tooltip="This clip's motion LoRA, applied to 'model' here."
                ),
                KVCache.Input(
                    "skip_interval_kv",
                    optional=True,
                    tooltip="For later clips: the first clip's K/V (with its edit connected).",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="The edited clip."),
                io.Mask.Output(
                    display_name="difference_mask",
                    tooltip="Where matching treated the clip as edited (1) or kept the source (0).",
                ),
                io.Latent.Output(display_name="latent", tooltip="The edited clip's latents."),
                EditedClip.Output(
                    display_name="edited_clip",
                    tooltip="For the next clip's previous_clip and for Skip-Interval KV Cache.",
                ),
            ],
        )

    @classmethod
    def execute(cls, model, inversion, preset: str, min_cfg: float, max_cfg: float, fps: float, seed: int,
                edited_first_frame=None, previous_clip=None, lora=None,
                skip_interval_kv=None) -> io.NodeOutput:  # fmt: skip
        inversion = check_inversion(inversion)
        base, inv, clip_index = inversion.host, inversion.inversion, inversion.clip_index
        # the inversion's own host when it is the same MODEL: its LoRA branch then shares one clone with the replays
        host = base if model is base.patcher else host_of(model, base.clip_vision, base.vae)
        height, width = inv.latent_hw[0] * 8, inv.latent_hw[1] * 8
        prev, edited = None, None
        if previous_clip is not None:
            if not isinstance(previous_clip, EditState):
                raise I2VEditError("previous_clip must come from another 'Attention Match Sampler'.")
            prev = (previous_clip.result.latents[-1:], previous_clip.last_frame)
            if tuple(prev[1].shape[1:3]) != (height, width):
                raise I2VEditError(
                    "previous_clip has another size than this clip; use one size for all clips."
                )
        elif edited_first_frame is None:
            raise I2VEditError("connect edited_first_frame (first clip) or previous_clip (later clips).")
        else:
            edited = check_frames(edited_first_frame, "edited_first_frame")[:1]
            if tuple(edited.shape[1:3]) != (height, width):
                raise I2VEditError(
                    f"the edited first frame is {edited.shape[1]}×{edited.shape[2]}, the clip {height}×{width}; "
                    "pass both through 'Fit Frames (I2VEdit)'."
                )
        if lora is not None:
            weights = check_lora(lora)
            if weights.model_fingerprint not in (None, inv.fingerprint):
                raise I2VEditError(
                    f"this motion LoRA was trained on another model ({weights.model_fingerprint}) than the one that "
                    f"inverted the clip ({inv.fingerprint}); train it on this SVD checkpoint."
                )
            if weights.clip_index not in (None, clip_index):
                raise I2VEditError(
                    f"this motion LoRA was trained on clip {weights.clip_index}, the inversion is of clip "
                    f"{clip_index}; each clip needs its own LoRA."
                )
            check_lora_not_applied(host.patcher, base.patcher, weights)
            host = host.with_lora(weights)
        kv_state = check_kv(skip_interval_kv, need_edit=True)
        kv = kv_state.edit[0] if kv_state is not None else None
        config = None if preset == "off" else MatchConfig.preset(preset)
        mode = "cache" if inv.captures is not None else "recompute"
        progress = StepProgress(inv.steps, model)
        edit = edit_clip(base, host, inv, edited, prev, denoise_time_ids(fps), generator(seed, clip_index, Purpose.CONDITION, 0),
                         config, (min_cfg, max_cfg), mode, kv, capture_kv=mode == "cache" and kv is None,
                         callback=progress.step)  # fmt: skip
        frames, masks, result = edit.frames, edit.masks, edit.result
        state = EditState(edit.clip, result, frames[-1:])
        return io.NodeOutput(frames, masks, {"samples": result.latents / LATENT_SCALE}, state)


class EditVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="I2VEditVideo",
            display_name="I2VEdit Video (all-in-one)",
            category=CATEGORY,
            is_output_node=True,  # its run report shows on the node; prepare_only runs need no other output
            description="Propagates an edited first frame through a whole video: fits the size, cuts clips, and "
            "for each clip perturbs flat areas, inverts, trains a motion LoRA and denoises with attention "
            "matching, continuing from the previous clip and attending to the first; then stitches and "
            "restores the size. Set resume_name to keep each clip so an interrupted run resumes.",
            inputs=[
                *checkpoint_inputs("SVD from Image Only Checkpoint Loader (svd or svd_xt)."),
                io.Float.Input(
                    "fps",
                    default=8.0,
                    min=0.01,
                    max=1000.0,
                    step=0.01,
                    tooltip="The frames' frame rate (a video carries its own).",
                ),
                io.Image.Input(
                    "edited_first_frame",
                    tooltip="The edited first frame; a batch of several gives one video per edit "
                    "(they share the inversions and LoRAs), one after another in the output.",
                ),
                io.Image.Input(
                    "frames",
                    optional=True,
                    tooltip="The source video's frames (VideoHelperSuite); or connect video instead.",
                ),
                io.Video.Input(
                    "video",
                    optional=True,
                    tooltip="The source video (LoadVideo), with its exact frame rate and audio; or connect "
                    "frames instead.",
                ),
                io.Int.Input(
                    "clip_length",
                    default=14,
                    min=2,
                    max=MAX_CHUNK,
                    tooltip="Frames per clip: 14 for svd, up to 25 for svd_xt.",
                ),
                io.Int.Input(
                    "steps", default=25, min=2, max=MAX_STEPS, tooltip="Inversion and denoising steps."
                ),
                io.Combo.Input("preset", options=PRESET_NAMES, default="local", tooltip=PRESET_TOOLTIP),
                io.Int.Input(
                    "lora_steps",
                    default=250,
                    min=0,
                    max=MAX_LORA_STEPS,
                    tooltip="Motion LoRA steps per clip; 0 = no LoRA (faster, weaker motion).",
                ),
                io.Int.Input("lora_rank", default=32, min=1, max=512, tooltip="Motion LoRA rank."),
                io.Combo.Input(
                    "memory_mode", options=list(MEMORY_MODES), default="recompute", tooltip=MEMORY_TOOLTIP
                ),
                io.Int.Input(
                    "max_side",
                    default=1024,
                    min=64,
                    max=4096,
                    step=64,
                    tooltip="Longest side of the generation size (a multiple of 64).",
                ),
                io.Combo.Input(
                    "resize_mode",
                    options=["pad", "stretch"],
                    default="pad",
                    tooltip="pad keeps the aspect ratio; stretch fills the frame.",
                ),
                io.Float.Input(
                    "max_cfg",
                    default=2.0,
                    min=0.0,
                    max=20.0,
                    step=0.05,
                    tooltip="CFG ramps from 1 at the first frame to this at the last.",
                ),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, tooltip=SEED_TOOLTIP),
                io.String.Input(
                    "resume_name",
                    default="",
                    optional=True,
                    tooltip="If set, every finished clip is kept in output/i2vedit_runs/<name>; "
                    "running again resumes at the first unfinished clip, and other edits of "
                    "the same video reuse its inversions and LoRAs.",
                ),
                io.Combo.Input(
                    "region_lock",
                    options=list(REGION_LOCKS),
                    default="off",
                    optional=True,
                    tooltip="Keep everything outside a region exactly as in the source. off: the paper's method; "
                    "auto: where the edited first frame differs, carried along the video's motion; mask: "
                    "the region_mask input (white = may change).",
                ),
                io.Boolean.Input(
                    "colour_anchor",
                    default=False,
                    optional=True,
                    tooltip="Hold each later clip's colours to the frame it continues from, so long videos "
                    "do not drift clip after clip.",
                ),
                io.Boolean.Input(
                    "image_outputs",
                    default=True,
                    optional=True,
                    tooltip="Also return the edited frames and masks as IMAGE/MASK batches (the whole video "
                    "in memory). Off for long videos: those outputs hold the first frame only, and the video "
                    "output (a file, written clip by clip) carries the whole edit.",
                ),
                io.Boolean.Input(
                    "prepare_only",
                    default=False,
                    optional=True,
                    tooltip="Only prepare clips (inversion, motion LoRA) into the run folder of resume_name, each "
                    "instance claiming the next free clip, so several ComfyUI instances (or GPUs) share the "
                    "work; then run this node with it off to denoise, using every prepared clip.",
                ),
                io.Mask.Input(
                    "region_mask",
                    optional=True,
                    tooltip="Where the edit may act (region_lock = mask): one mask, or one per frame, at the "
                    "frames' size (Auto Region Mask makes one).",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="The edited video(s), at the source's size."),
                io.Mask.Output(display_name="difference_mask", tooltip="Difference masks, frame by frame."),
                io.Float.Output(
                    display_name="fps", tooltip="The frame rate, for CreateVideo or Video Combine."
                ),
                io.Video.Output(
                    display_name="video",
                    tooltip="The edited video(s) with the source's audio, for SaveVideo.",
                ),
                io.Mask.Output(
                    display_name="region_mask",
                    tooltip="The region lock's masks, frame by frame (all ones when the lock is off).",
                ),
            ],
        )

    @classmethod
    def execute(cls, model, clip_vision, vae, fps: float, edited_first_frame, clip_length: int, steps: int,
                preset: str, lora_steps: int, lora_rank: int, memory_mode: str, max_side: int, resize_mode: str,
                max_cfg: float, seed: int, resume_name: str = "", frames=None, video=None,
                region_lock: str = "off", colour_anchor: bool = False, image_outputs: bool = True,
                prepare_only: bool = False, region_mask=None) -> io.NodeOutput:  # fmt: skip
        source, rate, audio = video_source(frames, fps, video, check=check_frames)
        region = region_choice(region_lock, region_mask)
        host = host_of(model, clip_vision, vae)
        edits = check_frames(edited_first_frame, "edited_first_frame")
        settings = EditSettings(
            chunk=clip_length, steps=steps, match=None if preset == "off" else MatchConfig.preset(preset),
            cfg=(1.0, max_cfg), mode=memory_mode, lora_steps=lora_steps, lora_rank=lora_rank, seed=seed,
            colour_anchor=colour_anchor,
        ).validate()  # fmt: skip
        reuse = None
        if resume_name.strip():
            name = check_lora_name(resume_name, "run name").removesuffix(".safetensors")
            reuse = os.path.join(folder_paths.get_output_directory(), "i2vedit_runs", name)
        n = source.count
        clips = len(video_clip_ranges(n, settings))
        size = fit_size(source.height, source.width, max_side)
        train_res = train_res_inversion_runs(
            clips, lora_steps, size, training_hw(*size, settings), settings.skip_interval
        )
        progress = VideoProgress(clip_step_counts(clips, steps, edits.shape[0], lora_steps, train_res), model)
        if prepare_only:
            return cls._prepare_only(host, source, rate, settings, reuse, size, resize_mode, progress, video)
        folder = Path(folder_paths.get_temp_directory()) / "i2vedit"
        folder.mkdir(parents=True, exist_ok=True)
        files = VideoFiles(
            folder, f"edit_{uuid.uuid4().hex[:12]}", edits.shape[0], rate, audio, image_outputs
        )
        try:
            result = edit_frames(host, source, float(rate), [edits[i : i + 1] for i in range(edits.shape[0])], settings,
                                 size=size, resize_mode=resize_mode, reuse_dir=reuse, step_callback=progress.step,
                                 progress=progress.stage, region=region, sink=files)  # fmt: skip
        except BaseException:
            files.discard()
            raise
        progress.finish()
        seconds = ", ".join(f"{k} {v:.1f} s" for k, v in result.report["seconds"].items())
        text = f"{result.report['clips']} clips of {n} frames at {size[1]}×{size[0]}: {seconds}"
        edited, masks, regions = files.outputs()
        return io.NodeOutput(edited, masks, float(rate), files.finish(), regions, ui=ui.PreviewText(text))

    @classmethod
    def _prepare_only(cls, host, source, rate, settings, reuse, size, resize_mode, progress, video) -> io.NodeOutput:  # fmt: skip
        if reuse is None:
            raise I2VEditError(
                "prepare_only needs a run folder to prepare the clips into: set resume_name (the same name on every "
                "instance, and on the run that denoises)."
            )
        done = prepare_clips(host, source, float(rate), settings, reuse, step_callback=progress.step,
                             progress=progress.stage, size=size, resize_mode=resize_mode)  # fmt: skip
        progress.finish()
        first = source.read(0, 1)
        text = f"prepared clips {done['prepared_here']} of {done['clips']} into {reuse}"
        out = (
            video if video is not None else InputImpl.VideoFromComponents(Types.VideoComponents(first, rate))
        )
        return io.NodeOutput(first, torch.zeros(first.shape[:3]), float(rate), out, torch.ones(first.shape[:3]),
                             ui=ui.PreviewText(text))  # fmt: skip


REGION_LOCKS = ("off", "auto", "mask")


def region_choice(region_lock: str, region_mask: torch.Tensor | None) -> torch.Tensor | str | None:
    """The all-in-one node's region lock as ``edit_frames`` takes it; a mask that would be ignored is refused."""
    if region_lock == "mask":
        if region_mask is None:
            raise I2VEditError(
                "region_lock is 'mask' but no region_mask is connected: connect one, or pick auto."
            )
        return region_mask
    if region_mask is not None:
        raise I2VEditError(
            f"a region_mask is connected but region_lock is '{region_lock}': set region_lock to 'mask' to use it, "
            "or disconnect it."
        )
    return None if region_lock == "off" else "auto"
