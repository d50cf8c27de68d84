"""Motion LoRA for the ComfyUI host: a ``LoRABranch`` on a clone of the user's MODEL, trained in place.

Training (``ComfyLoRATrainer``, a ``host.LoRATrainable``):

- **Where the LoRA lives.** The trainer holds its LoRA as a ``lora.branch.LoRABranch`` (down (r, in),
  up (out, r), fp32, scale 1 as the authors have it) and runs one MODEL clone: the host's attention
  control plus ``with_lora_branch``'s forward patches on the target linears, the same patches the
  host's inference uses. A target linear gives ``W x + dropout(B A x)``: W is the one UNet's weight,
  never copied, merged or wrapped, so the user's patcher and its patches stay as they were.
- **Dropout** acts on the branch output (the authors' ``y = W x + dropout(B A x)``), drawn by the
  branch itself only in training steps with dropout on (``set_dropout``), with the same masks as the
  diffusers trainer's.
- **Initialisation.** A ~ N(0, 1/r²), B = 0, drawn from ``torch.manual_seed(init_seed)`` in exactly
  the order and shapes peft uses (``lora.peft_init``, also ``DiffusersLoRATrainer``'s start), so both
  hosts start from the identical LoRA for one seed.
- **Inference** (``host``): the same clone with the branch on and no dropout, i.e. the function
  being trained; switched off, the clone is the base model.
- **Inference tensors.** ComfyUI runs nodes under ``torch.inference_mode()``, so a MODEL loaded by a
  loader node holds inference tensors, which autograd refuses to save for backward. Before each
  forward (after ComfyUI has loaded the model for it) every parameter or buffer of the model that is
  an inference tensor is replaced by an equal ordinary copy (a new Parameter with the same
  ``requires_grad``; bit-identical values; ``p.data = p.clone()`` is not enough, the Parameter
  itself would still lack a version counter): each tensor is copied once, not per step. Base
  parameters stop requiring grad while the training clone is loaded, so no gradient is computed
  for them; their flags come back when ComfyUI detaches the clone, because the flag picks
  PyTorch's kernels (the user's MODEL would otherwise differ in the last bits). Conditioning tensors
  made under inference mode are copied the same way. Run the training loop itself under
  ``torch.inference_mode(False)`` inside a node: ``train_denoise`` switches inference mode off for
  its own forward, but the loss and its ``backward`` happen in the caller.
- **Model path.** ``train_denoise`` runs ComfyUI's ``CFGGuider`` with a one-call sampler that calls
  ``comfy.samplers.calc_cond_batch`` with gradients, like ``ComfySVDHost.denoise`` (one
  ``GuiderSession`` per trainer; each step hands it its conditioning), so ComfyUI loads the model
  and passes ``transformer_options`` (with our attention controller) to the attention patches. On
  a half-precision MODEL the clone computes in fp32 (``set_model_compute_dtype``); ``autocast_dtype``
  runs the calls under autocast.
- **Gradient checkpointing** wraps the UNet's highest non-container submodules (as ComfyUI's
  ``TrainLoraNode`` does) in non-reentrant ``torch.utils.checkpoint`` while gradients are on,
  through object patches on the clone. ``transformer_options`` is mutated while the UNet runs
  (``block``, ``block_index``), so the recomputation in backward gets a copy of the dict as it was
  on entry.

A saved LoRA as a MODEL for other nodes (``comfy_lora_model``) goes through ComfyUI's stock
``comfy.sd.load_lora_for_models``, the code path of ``LoraLoaderModelOnly``, and refuses a file of
which ComfyUI left any key unloaded. Import this module only inside ComfyUI.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import comfy.model_patcher
import comfy.patcher_extension
import comfy.sd
import torch
import torch.utils.checkpoint

from ...errors import LoRAError
from ...host import sigma_scalar
from ...lora.branch import LoRABranch
from ...lora.file import LoRAPair, LoRAWeights, fitting_target_set
from ...lora.peft_init import init_lora_pairs
from ...lora.targets import target_shapes
from ...svd import SVDCond
from .patches import check_svd_model, with_attention_control, with_lora_branch
from .session import GuiderSession

if TYPE_CHECKING:
    from .host import ComfySVDHost

PREFIX = "diffusion_model."
_COND = "positive"


def replace_inference_tensors(model: torch.nn.Module) -> int:
    """Replace every parameter and buffer of ``model`` that is an inference tensor by an equal ordinary one.

    Returns how many were replaced. Tied parameters stay tied. Values are bit-identical.
    """
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        tables: tuple[dict[str, Any], ...] = (
            module._parameters,
            module._buffers,
        )  # Parameter or Tensor values
        for table in tables:
            for name, t in list(table.items()):
                if t is None or not t.is_inference():
                    continue
                if id(t) not in done:
                    copy = t.detach().clone()
                    if isinstance(t, torch.nn.Parameter):
                        copy = torch.nn.Parameter(copy, requires_grad=t.requires_grad)
                    done[id(t)] = copy
                table[name] = done[id(t)]
    return len(done)


def _plain_input(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t.is_inference() else t


def _highest_children(module: torch.nn.Module, prefix: str = "") -> Iterator[str]:
    """Names of the highest submodules that are not containers (ComfyUI TrainLoraNode's choice)."""
    containers = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, containers):
            yield from _highest_children(child, full + ".")
        else:
            yield full


def _checkpointed(forward: Callable) -> Callable:
    """``forward`` under non-reentrant activation checkpointing while gradients are on, with dict
    arguments snapshotted (without gradients it is ``forward`` itself).

    The first run gets the live arguments (their mutations behave as without checkpointing); the
    recomputation in backward gets fresh copies of the dicts as they were on entry.
    """

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        snap_args = [dict(a) if isinstance(a, dict) else None for a in args]
        snap_kwargs = {k: dict(v) for k, v in kwargs.items() if isinstance(v, dict)}
        first = [True]

        def fn(*a: Any, **kw: Any) -> Any:
            if first[0]:
                first[0] = False
                return forward(*a, **kw)
            a = tuple(dict(s) if s is not None else x for s, x in zip(snap_args, a))
            kw = {k: dict(snap_kwargs[k]) if k in snap_kwargs else v for k, v in kw.items()}
            return forward(*a, **kw)

        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)

    return run


class _GradFlags:
    """Base parameters whose ``requires_grad`` training switched off, to switch back on detach."""

    def __init__(self) -> None:
        self.off: list[torch.nn.Parameter] = []

    def switch_off(self, model: torch.nn.Module) -> None:
        for p in model.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                self.off.append(p)

    def restore(self, *_: Any) -> None:
        for p in self.off:
            p.requires_grad_(True)
        self.off = []


class ComfyLoRATrainer:
    """A motion LoRA trained as a branch on a clone of a ComfyUI SVD host's MODEL (``host.LoRATrainable``);
    see the module doc."""

    def __init__(
        self,
        host: ComfySVDHost,
        rank: int = 32,
        target_set: str = "temporal",
        dropout: float = 0.1,
        gradient_checkpointing: bool = False,
        autocast_dtype: torch.dtype | None = None,
        init_seed: int = 0,
    ) -> None:
        if not 0.0 <= dropout < 1.0:
            raise LoRAError(f"LoRA dropout must lie in [0, 1), got {dropout}.")
        base = check_svd_model(host.patcher)
        shapes = target_shapes(base.model.diffusion_model, target_set, "comfy")
        self.branch = LoRABranch(shapes, rank, target_set, base.load_device)
        self.rank, self.target_set, self.p = rank, target_set, float(dropout)
        self.autocast_dtype = autocast_dtype
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self._dropout_on = False
        with torch.inference_mode(False):
            self.load(init_lora_pairs(shapes, rank, init_seed))
        for _, param in self.branch.named_trainable():
            param.requires_grad_(True)
        self.branch.on = True  # the branch is this trainer's alone: switched off only by hand

        # The one clone: attention control, the LoRA branch, checkpointing, fp32 compute.
        patcher = with_lora_branch(with_attention_control(base), self.branch)
        if self.gradient_checkpointing:
            for name in _highest_children(base.model.diffusion_model):
                key = f"{PREFIX}{name}.forward"
                patcher.add_object_patch(key, _checkpointed(patcher.get_model_object(key)))
        if base.model_dtype() != torch.float32:
            patcher.set_model_compute_dtype(torch.float32)  # the base model's gradients in fp32 too
        self._grad_flags = _GradFlags()
        patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_DETACH, self._grad_flags.restore)
        weakref.finalize(patcher, self._grad_flags.restore)
        self.patcher = patcher
        self.session: GuiderSession | None = None  # the training run's guider and sampler
        self._base = host
        self._host: ComfySVDHost | None = None

    # ---- LoRATrainable ---------------------------------------------------------------------------

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return self.branch.named_trainable()

    def set_dropout(self, active: bool) -> None:
        self._dropout_on = bool(active)

    def fingerprint(self) -> str:
        return self._base.fingerprint()

    def train_denoise(
        self, x: torch.Tensor, sigma: float, cond: SVDCond, transformer_options: dict[str, Any]
    ) -> torch.Tensor:
        """D(x; σ, cond) through ComfyUI's model path with gradients into the LoRA, (F, 4, h, w) fp32."""
        cond.check(x)
        s = sigma_scalar(sigma)
        want_grad = torch.is_grad_enabled() or torch.is_inference_mode_enabled()
        self.branch.on, self.branch.dropout = True, (self.p if self._dropout_on else 0.0)
        with torch.inference_mode(False), torch.set_grad_enabled(want_grad):
            cond = replace(
                cond, clip_embed=_plain_input(cond.clip_embed), concat_latent=_plain_input(cond.concat_latent)
            )
            if self.session is None:
                self.session = GuiderSession(self.patcher, {_COND: cond})
            else:
                self.session.set_conds({_COND: cond})  # a training step's conditioning is its own
            outs = self.session.model_call(
                _plain_input(x).float(), s, transformer_options, self._make_trainable, self.autocast_dtype
            )
            return outs[0].float()

    def export(self) -> dict[str, LoRAPair]:
        with torch.inference_mode(False):
            return self.branch.export()

    def load(self, modules: dict[str, LoRAPair]) -> None:
        with torch.inference_mode(False):
            self.branch.load(modules)

    # ---- inference -------------------------------------------------------------------------------

    @property
    def host(self) -> ComfySVDHost:
        """A host of the LoRA as trained so far: this trainer's clone, branch on, never dropout (live)."""
        if self._host is None:
            self._host = self._base.training_host(self)
        return self._host

    # ---- internals -------------------------------------------------------------------------------

    def _make_trainable(self, model: torch.nn.Module) -> None:
        """Inference tensors → equal ordinary tensors, base weights without grad (see the module doc)."""
        replace_inference_tensors(model)
        self._grad_flags.switch_off(model)


# ---- loading a saved LoRA through ComfyUI's stock path ------------------------------------------


class _KeyLog(logging.Handler):
    """Collects the keys ComfyUI's LoRA loader reports as not loaded."""

    _patterns = (re.compile(r"^lora key not loaded: (.+)$"), re.compile(r"^NOT LOADED (.+)$"))

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record of someone else's
            return
        for pat in self._patterns:
            m = pat.match(msg)
            if m:
                self.keys.append(m.group(1))


@contextmanager
def _capture_unloaded() -> Iterator[_KeyLog]:
    handler = _KeyLog()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def comfy_lora_model(
    model: Any, weights: LoRAWeights, strength: float = 1.0
) -> comfy.model_patcher.ModelPatcher:
    """A clone of ComfyUI MODEL ``model`` with the motion LoRA applied the way ``LoraLoaderModelOnly`` does.

    Goes through ``comfy.sd.load_lora_for_models(model, None, state_dict, strength, 0)``. Raises
    ``LoRAError`` when the LoRA does not fit the model, or when ComfyUI leaves any of its keys
    unloaded (from ComfyUI's own warnings, and by checking a patch was added for every layer).
    """
    patcher = check_svd_model(model)
    fitting_target_set(weights, patcher.model.diffusion_model)
    state_dict = weights.state_dict()
    with _capture_unloaded() as log:
        new_model, _ = comfy.sd.load_lora_for_models(model, None, state_dict, strength, 0)
    unloaded = set(log.keys)
    for name in weights.modules:
        key = f"{PREFIX}{name}.weight"
        if len(new_model.patches.get(key, [])) != len(patcher.patches.get(key, [])) + 1:
            unloaded.update(f"{PREFIX}{name}{sfx}" for sfx in (".lora_up.weight", ".lora_down.weight"))
    if unloaded:
        shown = sorted(unloaded)
        raise LoRAError(
            f"ComfyUI did not load {len(shown)} keys of this motion LoRA: {', '.join(shown[:5])}"
            + (f" (and {len(shown) - 5} more)" if len(shown) > 5 else "")
            + "; is the MODEL Stable Video Diffusion img2vid, and is the ComfyUI version current?"
        )
    return new_model


__all__ = ["ComfyLoRATrainer", "comfy_lora_model", "replace_inference_tensors"]
