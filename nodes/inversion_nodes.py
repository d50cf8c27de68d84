"""EDM inversion, the reconstruction check, and saving/loading inversions."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io, ui

from ..i2vedit.errors import I2VEditError
from ..i2vedit.io.frames import check_size
from ..i2vedit.method.inversion import MEMORY_MODES, invert
from ..i2vedit.run.pipeline import EditSettings
from ..i2vedit.run.stages import (
    encode_source,
    load_inversion,
    psnr,
    reconstruct,
    save_inversion,
)
from ..i2vedit.seeds import Purpose, generator
from ..i2vedit.svd import LATENT_SCALE
from .common import (
    CATEGORY,
    CLIP_INDEX_TOOLTIP,
    INVERSION_FOLDER,
    MEMORY_TOOLTIP,
    SEED_TOOLTIP,
    Inversions,
    InversionState,
    KVCache,
    StepProgress,
    check_frames,
    check_inversion,
    check_kv,
    checkpoint_inputs,
    host_of,
    target_path,
)

KV_IN_TOOLTIP = (
    "For clips after the first: the first clip's K/V from Skip-Interval KV Cache, so this clip attends to "
    "the first clip (long-video consistency). Leave empty for the first clip."
)


class EDMInvertSVD(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EDMInvertSVD",
            display_name="EDM Invert SVD (I2VEdit)",
            category=f"{CATEGORY}/inversion",
            description="Runs SVD's EDM sampler backwards from the clean source clip to noise (Euler, σ 0.002 → 700), "
            "conditioned on the source's first frame, and keeps the trajectory for attention matching.",
            inputs=[
                *checkpoint_inputs("SVD from Image Only Checkpoint Loader (svd or svd_xt), without LoRA."),
                io.Image.Input(
                    "frames",
                    tooltip="The clip's frames after SARP Perturb, at a size that is a multiple "
                    "of 64 (Fit Frames).",
                ),
                io.Int.Input(
                    "steps",
                    default=25,
                    min=2,
                    max=1000,
                    tooltip="Inversion steps; denoising uses the same σ. The paper uses 25.",
                ),
                io.Combo.Input(
                    "memory_mode", options=list(MEMORY_MODES), default="recompute", tooltip=MEMORY_TOOLTIP
                ),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, tooltip=SEED_TOOLTIP),
                io.Int.Input("clip_index", default=0, min=0, max=100000, tooltip=CLIP_INDEX_TOOLTIP),
                KVCache.Input("skip_interval_kv", optional=True, tooltip=KV_IN_TOOLTIP),
            ],
            outputs=[
                Inversions.Output(
                    display_name="inversion",
                    tooltip="The clip's inversion (trajectory and "
                    "conditioning) for training, matching and the reconstruction check.",
                ),
                io.Latent.Output(display_name="noise", tooltip="x_T, the inverted noise (a LATENT)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip_vision, vae, frames, steps: int, memory_mode: str, seed: int, clip_index: int,
                skip_interval_kv=None) -> io.NodeOutput:  # fmt: skip
        host = host_of(model, clip_vision, vae)
        frames = check_frames(frames)
        check_size(*frames.shape[1:3])
        if frames.shape[0] < 2:
            raise I2VEditError("a clip needs at least 2 frames.")
        kv_state = check_kv(skip_interval_kv)
        kv = kv_state.source if kv_state is not None else None
        progress = StepProgress(steps, model)
        latents, cond = encode_source(host, frames, generator(seed, clip_index, Purpose.ENCODE),
                                      EditSettings.inversion_fps_id)  # fmt: skip
        capture_kv = memory_mode == "cache" and kv is None
        inv = invert(host, latents, cond, steps, memory_mode, capture_kv=capture_kv, skip_kv=kv,
                     callback=progress.step)  # fmt: skip
        state = InversionState(inv, host, clip_index)
        return io.NodeOutput(state, {"samples": inv.x_T / LATENT_SCALE})


class InversionCheck(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="I2VEditInversionCheck",
            display_name="Inversion Check (I2VEdit)",
            category=f"{CATEGORY}/inversion",
            description="Denoises the inversion back under the source's own first frame (no CFG, no matching) and "
            "reports the PSNR against the source, so you can trust the inversion before editing. Real SVD "
            "weights give well above 25 dB; low values mean more steps or a smaller size.",
            inputs=[
                Inversions.Input("inversion", tooltip="From EDM Invert SVD."),
                io.Image.Input(
                    "source_frames", tooltip="The clip's frames to compare with (before or after SARP)."
                ),
            ],
            outputs=[
                io.Image.Output(display_name="reconstruction", tooltip="The decoded reconstruction."),
                io.Float.Output(
                    display_name="psnr", tooltip="PSNR in dB of the reconstruction against the source."
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, inversion, source_frames) -> io.NodeOutput:
        state = check_inversion(inversion)
        src = check_frames(source_frames, "source_frames")
        inv = state.inversion
        if src.shape[0] != inv.frames or (src.shape[1] // 8, src.shape[2] // 8) != inv.latent_hw:
            raise I2VEditError(
                f"source_frames are {src.shape[0]} frames of {src.shape[1]}×{src.shape[2]}, the inversion is "
                f"{inv.frames} frames of {inv.latent_hw[0] * 8}×{inv.latent_hw[1] * 8}; give the clip that was inverted."
            )
        progress = StepProgress(inv.steps, state.host.patcher)
        latents = reconstruct(state.host, inv, callback=progress.step)
        frames = state.host.vae_decode(latents / LATENT_SCALE)
        value = psnr(frames, src)
        text = f"reconstruction PSNR {value:.2f} dB over {inv.frames} frames ({inv.steps} steps)"
        return io.NodeOutput(frames, value, ui=ui.PreviewText(text))


class SaveInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="I2VEditSaveInversion",
            display_name="Save Inversion (I2VEdit)",
            category=f"{CATEGORY}/inversion",
            description="Saves an inversion (trajectory and conditioning, a few MB) to models/i2vedit_inversions, "
            "so later edits of the same clip skip the inversion.",
            inputs=[
                Inversions.Input("inversion", tooltip="From EDM Invert SVD."),
                io.String.Input(
                    "name",
                    default="i2vedit_clip000",
                    tooltip="File name (no folders); .safetensors is added.",
                ),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace a file of the same name."),
            ],
            outputs=[Inversions.Output(display_name="inversion", tooltip="The same inversion, passed on.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, inversion, name: str, overwrite: bool) -> io.NodeOutput:
        state = check_inversion(inversion)
        path = target_path(INVERSION_FOLDER, name, overwrite)
        save_inversion(path, state.inversion, {"clip_index": str(state.clip_index)})
        return io.NodeOutput(state, ui=ui.PreviewText(f"saved {path}"))


class LoadInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="I2VEditLoadInversion",
            display_name="Load Inversion (I2VEdit)",
            category=f"{CATEGORY}/inversion",
            description="Loads a saved inversion for the same clip and SVD model (checked). A saved inversion "
            "holds no attention cache, so matching recomputes the source's attention.",
            inputs=[
                *checkpoint_inputs("The SVD the inversion was made with (checked by its weights)."),
                io.Combo.Input(
                    "name",
                    options=folder_paths.get_filename_list(INVERSION_FOLDER),
                    tooltip="A file in models/i2vedit_inversions.",
                ),
                KVCache.Input(
                    "skip_interval_kv",
                    optional=True,
                    tooltip="Needed when the inversion was made with skip-interval K/V (a later clip).",
                ),
            ],
            outputs=[Inversions.Output(display_name="inversion", tooltip="The loaded inversion.")],
        )

    @classmethod
    def execute(cls, model, clip_vision, vae, name: str, skip_interval_kv=None) -> io.NodeOutput:
        host = host_of(model, clip_vision, vae)
        path = folder_paths.get_full_path(INVERSION_FOLDER, name)
        if path is None:
            raise I2VEditError(f"no inversion named {name!r} in models/i2vedit_inversions.")
        inv, meta = load_inversion(path)
        if inv.fingerprint != host.fingerprint():
            raise I2VEditError(
                f"{name} was inverted with another model ({inv.fingerprint}) than this MODEL ({host.fingerprint()}); "
                "load it with the same SVD checkpoint, or invert again."
            )
        kv_state = check_kv(skip_interval_kv)
        if meta.get("skip_interval") == "1":
            if kv_state is None:
                raise I2VEditError(
                    f"{name} is a later clip inverted with the first clip's K/V; connect the same skip_interval_kv."
                )
            inv.skip_kv = kv_state.source
        return io.NodeOutput(InversionState(inv, host, int(meta.get("clip_index", "0"))))
