"""Motion LoRA training, saving and loading (files in models/loras/i2vedit, loadable by stock loaders)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..i2vedit.errors import I2VEditError
from ..i2vedit.hosts.comfy.lora import PREFIX, comfy_lora_model
from ..i2vedit.lora.file import LoRAWeights, load_lora, save_lora
from ..i2vedit.lora.targets import TARGET_SETS
from ..i2vedit.lora.train import LoRATrainingError, TrainConfig
from ..i2vedit.run.stages import train_clip_lora, training_inputs
from ..i2vedit.seeds import train_seed
from .common import (
    CATEGORY,
    LORA_FOLDER,
    SEED_TOOLTIP,
    Inversions,
    KVCache,
    MotionLoRA,
    StepProgress,
    check_inversion,
    check_kv,
    fit_name,
    folder,
    name_limit,
    stop_run,
    target_path,
)

log = logging.getLogger("i2vedit")

# Attachment on Train Motion LoRA's MODEL output: says where its motion LoRA came from (for messages).
TRAINED_LORA_MARK = "i2vedit_trained_motion_lora"
NOWHERE = "nowhere (both the LoRA folder and the temp folder refused it)"


def _rescue(weights: LoRAWeights, stem: str, why: str) -> str:
    """Save a LoRA that would otherwise be lost (interrupt, failed step or save): LoRA folder, else temp.

    The name is ``<stem>_<why>_step<N>_<time>.safetensors``, the stem shortened to fit the file system.
    Never raises: whatever goes wrong in one folder, the next is tried.
    """
    tail = f"_{why}_step{weights.steps or 0}_{time.strftime('%Y%m%d-%H%M%S')}.safetensors"
    for where in (lambda: folder(LORA_FOLDER), tempfile.gettempdir):
        base = "?"
        try:
            base = where()
            return str(save_lora(os.path.join(base, fit_name(stem, tail, name_limit(base))), weights))
        except Exception as e:  # any failure here: try the next folder, the LoRA must not be lost
            log.warning("could not keep the LoRA in %s: %s: %s", base, type(e).__name__, e)
    return NOWHERE


def _lora_tensors(patch: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(up, down) of a ComfyUI LoRA weight patch; None for any other kind of patch."""
    adapter = patch[1]
    weights = getattr(adapter, "weights", None)  # comfy.weight_adapter.LoRAAdapter
    if weights is None and isinstance(adapter, tuple) and len(adapter) == 2 and adapter[0] == "lora":
        weights = adapter[1]  # the tuple form of older ComfyUI versions
    if (
        isinstance(weights, tuple)
        and len(weights) >= 2
        and all(isinstance(t, torch.Tensor) for t in weights[:2])
    ):
        return weights[0], weights[1]
    return None


def _equal(t: torch.Tensor, ref: torch.Tensor) -> bool:
    return tuple(t.shape) == tuple(ref.shape) and torch.equal(
        t.detach().to("cpu", torch.float32), ref.detach().to("cpu", torch.float32)
    )


def check_lora_not_applied(model: Any, base: Any, weights: LoRAWeights) -> None:
    """Refuse to apply ``weights`` to a MODEL that already carries a LoRA on its layers.

    ``model`` is the MODEL connected next to the ``lora`` input, ``base`` the one the inversion was
    made with. Train Motion LoRA's MODEL output and stock LoraLoaderModelOnly both leave ComfyUI
    weight patches on the target layers (``diffusion_model.<layer>.weight``): patches (or weight
    wrappers) that ``base`` does not have mean a LoRA was applied since, and a patch holding exactly
    these tensors means this very LoRA is there already (even when ``base`` carries it too).
    """
    same = added = 0
    for name, pair in weights.modules.items():
        key = f"{PREFIX}{name}.weight"
        patches, own = model.patches.get(key, []), base.patches.get(key, [])
        wrappers, own_wrappers = (
            model.weight_wrapper_patches.get(key, []),
            base.weight_wrapper_patches.get(key, []),
        )
        if any(all(p is not q for q in own) for p in patches) or any(
            all(w is not q for q in own_wrappers) for w in wrappers
        ):
            added += 1
        for patch in patches:
            pair_in = _lora_tensors(patch)
            if pair_in is not None and _equal(pair_in[0], pair.up) and _equal(pair_in[1], pair.down):
                same += 1
                break
    if not (same or added):
        return
    mark = model.get_attachment(TRAINED_LORA_MARK) if hasattr(model, "get_attachment") else None
    source = (
        f"it is the MODEL output of 'Train Motion LoRA' (clip {mark['clip_index']})"
        if isinstance(mark, dict)
        else "for example through LoraLoaderModelOnly"
    )
    fix = "Connect the base MODEL (the one the inversion was made with) to 'model', or disconnect 'lora'."
    if same:
        raise I2VEditError(
            f"the MODEL already carries this motion LoRA ({source}); connected to 'lora' as well it would be "
            f"applied twice. {fix}"
        )
    raise I2VEditError(
        f"the MODEL already carries a LoRA on {added} of the {len(weights.modules)} layers this motion LoRA "
        f"changes ({source}); with 'lora' as well, two motion LoRAs would be stacked. {fix}"
    )


def check_lora(lora) -> LoRAWeights:
    if not isinstance(lora, LoRAWeights):
        raise I2VEditError("connect a motion LoRA from 'Train Motion LoRA' or 'Load Motion LoRA (I2VEdit)'.")
    return lora


class TrainMotionLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TrainMotionLoRA",
            display_name="Train Motion LoRA (I2VEdit)",
            category=f"{CATEGORY}/lora",
            description="Fits a LoRA on SVD's temporal layers to this clip's motion (EDM loss, the authors' "
            "settings), so the edited video moves like the source. Trains at the inversion's resolution. "
            "An interrupt or a failed step keeps the LoRA trained so far in models/loras/i2vedit.",
            inputs=[
                Inversions.Input(
                    "inversion", tooltip="The clip's inversion (its clean latents and first frame)."
                ),
                io.Int.Input(
                    "steps", default=250, min=1, max=100000, tooltip="Training steps; the paper uses 250."
                ),
                io.Int.Input("rank", default=32, min=1, max=512, tooltip="LoRA rank; the paper uses 32."),
                io.Float.Input(
                    "learning_rate",
                    default=5e-4,
                    min=1e-7,
                    max=1.0,
                    step=1e-5,
                    tooltip="AdamW learning rate; the paper uses 5e-4.",
                ),
                io.Combo.Input(
                    "target_set",
                    options=list(TARGET_SETS),
                    default="temporal",
                    tooltip="temporal (the authors'): temporal attention and feed-forward layers; "
                    "temporal_attention: attention projections only (fewer parameters).",
                ),
                io.Float.Input(
                    "dropout",
                    default=0.1,
                    min=0.0,
                    max=0.9,
                    step=0.01,
                    tooltip="Dropout on the LoRA branch during training; the paper uses 0.1.",
                ),
                io.Boolean.Input(
                    "gradient_checkpointing",
                    default=True,
                    tooltip="Recompute activations in the backward pass: much less VRAM, ~15% slower.",
                ),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, tooltip=SEED_TOOLTIP),
                KVCache.Input(
                    "skip_interval_kv",
                    optional=True,
                    tooltip="For clips after the first: the first clip's K/V, as in inversion.",
                ),
                io.String.Input(
                    "save_name",
                    default="",
                    optional=True,
                    tooltip="If set, also save the LoRA as models/loras/i2vedit/<name>.safetensors "
                    "(checked before training starts).",
                ),
            ],
            outputs=[
                MotionLoRA.Output(
                    display_name="lora", tooltip="The motion LoRA, for Attention Match Sampler."
                ),
                io.Model.Output(display_name="model", tooltip="The MODEL with the LoRA applied (a copy)."),
            ],
        )

    @classmethod
    def execute(cls, inversion, steps: int, rank: int, learning_rate: float, target_set: str, dropout: float,
                gradient_checkpointing: bool, seed: int, skip_interval_kv=None,
                save_name: str = "") -> io.NodeOutput:  # fmt: skip
        inversion = check_inversion(inversion)
        kv_state = check_kv(skip_interval_kv)
        kv = kv_state.source if kv_state is not None else None
        inv, host, clip_index = inversion.inversion, inversion.host, inversion.clip_index
        save_path = target_path(LORA_FOLDER, save_name, False, "save_name") if save_name.strip() else None
        config = TrainConfig(rank=rank, steps=steps, lr=learning_rate, dropout=dropout, target_set=target_set,
                             seed=train_seed(seed, clip_index)).validate()  # fmt: skip
        progress = StepProgress(steps)
        stem = (
            os.path.splitext(os.path.basename(save_path))[0]
            if save_path
            else f"motion_lora_clip{clip_index:03d}"
        )
        with tempfile.TemporaryDirectory(prefix="i2vedit-train-") as ckpt:
            try:
                result = train_clip_lora(
                    host, *training_inputs(inv), config,
                    clip_index, kv, checkpoint_dir=ckpt, should_stop=progress.should_stop, callback=progress.soft_step,
                    gradient_checkpointing=gradient_checkpointing,
                )  # fmt: skip
            except LoRATrainingError as e:
                where = _rescue(e.weights, stem, "failed")
                raise I2VEditError(f"{e} The LoRA of the last good step is saved as {where}.") from e
        if result.interrupted:
            if result.steps_done > 0:  # an untrained LoRA is not worth a file
                where = _rescue(result.weights, stem, "interrupted")
                log.warning("training interrupted at step %d; the LoRA so far is saved as %s",
                            result.steps_done, where)  # fmt: skip
            stop_run()
        weights = result.weights
        text = f"trained {steps} steps; loss {result.losses[0]:.4f} → {result.losses[-1]:.4f}"
        if save_path is not None:
            try:
                text += f"; saved {save_lora(save_path, weights)}"
            except Exception as e:  # any failure (OSError, PermissionError, ...): keep the trained LoRA
                where = _rescue(weights, stem, "unsaved")
                what = str(e) if isinstance(e, I2VEditError) else f"{type(e).__name__}: {e}"
                kept = (
                    f"It is kept as {where} instead (Load Motion LoRA lists the files in models/loras/i2vedit)."
                    if where != NOWHERE
                    else "Keeping it elsewhere failed too (see the log); free disk space and train again."
                )
                raise I2VEditError(f"could not save the trained LoRA as {save_path} ({what}). {kept}") from e
        model = comfy_lora_model(host.patcher, weights)
        model.set_attachments(TRAINED_LORA_MARK, {"clip_index": clip_index, "steps": result.steps_done})
        return io.NodeOutput(weights, model, ui=ui.PreviewText(text))


class SaveMotionLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="I2VEditSaveMotionLoRA",
            display_name="Save Motion LoRA (I2VEdit)",
            category=f"{CATEGORY}/lora",
            description="Saves a motion LoRA to models/loras/i2vedit (safetensors with ComfyUI LoRA keys and "
            "metadata); stock 'LoraLoaderModelOnly' lists it as i2vedit/<name>.",
            inputs=[
                MotionLoRA.Input("lora", tooltip="From Train Motion LoRA."),
                io.String.Input("name", default="motion_lora_clip000", tooltip="File name (no folders)."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace a file of the same name."),
            ],
            outputs=[MotionLoRA.Output(display_name="lora", tooltip="The same LoRA, passed on.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora, name: str, overwrite: bool) -> io.NodeOutput:
        weights = check_lora(lora)
        path = save_lora(target_path(LORA_FOLDER, name, overwrite, "name"), weights)
        return io.NodeOutput(weights, ui=ui.PreviewText(f"saved {path}"))


class LoadMotionLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="I2VEditLoadMotionLoRA",
            display_name="Load Motion LoRA (I2VEdit)",
            category=f"{CATEGORY}/lora",
            description="Loads a saved motion LoRA (safetensors only; checked against the model when used).",
            inputs=[
                io.Combo.Input(
                    "name",
                    options=folder_paths.get_filename_list(LORA_FOLDER),
                    tooltip="A file in models/loras/i2vedit.",
                ),
            ],
            outputs=[MotionLoRA.Output(display_name="lora", tooltip="The motion LoRA.")],
        )

    @classmethod
    def execute(cls, name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path(LORA_FOLDER, name)
        if path is None:
            raise I2VEditError(f"no motion LoRA named {name!r} in models/loras/i2vedit.")
        return io.NodeOutput(load_lora(path))
