"""Motion LoRA for the ComfyUI host: ComfyUI weight-adapter LoRAs on a clone of the user's MODEL.

Training (``ComfyLoRATrainer``, a ``host.LoRATrainable``):

- **Where the LoRA lives.** Each target linear gets a ``comfy.weight_adapter`` train adapter
  (``LoraDiff``: ``lora_up`` (out, r), ``lora_down`` (r, in), alpha = r, so scale 1 as the authors
  have it), attached with ``ModelPatcher.add_weight_wrapper`` to a *clone* of the user's MODEL.
  ComfyUI applies it inside ``comfy.ops.cast_bias_weight`` on every forward (``W + U D`` on a copy
  of W), so gradients reach U and D while W, the user's patcher and its patches stay as they were.
- **Initialisation.** D ~ N(0, 1/r²), U = 0, drawn from ``torch.manual_seed(init_seed)`` in exactly
  the order and shapes peft uses (``lora.peft_init``, also ``DiffusersLoRATrainer``'s start; peft walks the diffusers UNet's
  modules: down blocks, up blocks, then the mid block; per layer it builds ``nn.Linear(in, r)`` and
  ``nn.Linear(r, out)``, each Kaiming-initialised, then redraws A from the normal). Both hosts
  therefore start from the identical LoRA for one seed.
- **Dropout on the branch output.** The authors compute ``y = W x + dropout(U D x)``. A weight
  wrapper only sees weights, so while dropout is active an object patch on each target linear's
  ``forward`` (in the training clone only) adds the exact correction
  ``y = f(x) + (dropout(U D x) − U D x)``, where ``f`` is the linear's own forward that already
  holds ``W + U D`` through the wrapper: ``W x + b + U D x + dropout(U D x) − U D x`` is the
  authors' output (up to float rounding), and the gradients are those of the authors' expression.
  ``torch.nn.functional.dropout`` on the same-shaped branch output draws the same masks as the
  diffusers trainer's hook. With dropout off the patch returns ``f(x)`` untouched: no correction is
  computed at all. Inference (``host``) uses a clone without these patches.
- **Inference tensors.** ComfyUI runs nodes under ``torch.inference_mode()``, so a MODEL loaded by a
  loader node holds inference tensors, which autograd refuses to save for backward. Before each
  forward (after ComfyUI has loaded the model for it) every parameter or buffer of the model that is
  an inference tensor is replaced by an equal ordinary copy (a new Parameter with the same
  ``requires_grad``; bit-identical values; ``p.data = p.clone()`` is not enough, the Parameter
  itself would still lack a version counter). This is §4.3's "swap once": each tensor is copied
  once, not per step, and every value stays as it was. Base parameters stop requiring grad while
  the training clone is loaded, so no gradient is computed for or stored on them (ComfyUI's
  ``TrainLoraNode`` switches them off for good); their flags come back when ComfyUI detaches the
  clone to load another MODEL on the same weights, because the flag picks PyTorch's kernels (the
  user's MODEL would otherwise differ in the last bits). Conditioning tensors made under inference
  mode are copied the same way. Run the training loop itself under ``torch.inference_mode(False)`` inside a
  node: ``train_denoise`` switches inference mode off for its own forward, but the loss and its
  ``backward`` happen in the caller.
- **Model path.** ``train_denoise`` runs ComfyUI's ``CFGGuider`` with a one-call sampler that calls
  ``comfy.samplers.calc_cond_batch`` with gradients, like ``ComfySVDHost.denoise``: ComfyUI loads
  the model, encodes SVD's conditioning and passes ``transformer_options`` (with our attention
  controller for skip-interval K/V) to the attention patches; the clone always carries
  ``with_attention_control``'s patches.
- **Gradient checkpointing** wraps the UNet's highest non-container submodules (as ComfyUI's
  ``TrainLoraNode`` does) in non-reentrant ``torch.utils.checkpoint``, through object patches on the
  training clone. ``transformer_options`` is mutated while the UNet runs (``block``,
  ``block_index``), so the recomputation in backward gets a copy of the dict as it was on entry.

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
import comfy.samplers
import comfy.sd
import comfy.weight_adapter
import comfy.weight_adapter.lora
import torch
import torch.utils.checkpoint

from ...errors import LoRAError
from ...host import sigma_scalar
from ...lora.branch import exported_pairs, fitted_pairs
from ...lora.file import LoRAPair, LoRAWeights, fitting_target_set, validate_rank
from ...lora.peft_init import init_lora_pairs
from ...lora.targets import target_shapes
from ...svd import SVDCond
from .patches import DirectSampler, check_svd_model, to_conditioning, with_attention_control

if TYPE_CHECKING:
    from .host import ComfySVDHost

PREFIX = "diffusion_model."
_COND = "positive"


def _make_train_adapter(pair: LoRAPair, device: torch.device) -> comfy.weight_adapter.lora.LoraDiff:
    """A ComfyUI ``LoraDiff`` train adapter holding ``pair`` (fp32, on ``device``)."""
    cls = comfy.weight_adapter.adapter_maps["LoRA"]
    weights = (pair.up.float(), pair.down.float(), float(pair.alpha), None, None, None)
    return cls(set(), weights).to_train().to(device)


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
    """``forward`` under non-reentrant activation checkpointing, with dict arguments snapshotted.

    The first run gets the live arguments (their mutations behave as without checkpointing); the
    recomputation in backward gets fresh copies of the dicts as they were on entry.
    """

    def run(*args: Any, **kwargs: Any) -> Any:
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
    """A LoRA'd clone of a ComfyUI SVD host's MODEL (``host.LoRATrainable``); see the module doc."""

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
        validate_rank(rank, shapes)
        self.rank, self.target_set, self.p = rank, target_set, float(dropout)
        self._shapes = shapes
        self.autocast_dtype = autocast_dtype
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self._dropout_on = False
        device = base.load_device
        with torch.inference_mode(False):
            init = init_lora_pairs(shapes, rank, init_seed)
            with torch.random.fork_rng(devices=[]):  # LoraDiff builds nn.Linear layers: keep RNG as is
                self._adapters = {name: _make_train_adapter(init[name], device) for name in sorted(shapes)}
        self._named: list[tuple[str, torch.nn.Parameter]] = []
        for name, adapter in self._adapters.items():
            adapter.requires_grad_(False)
            for part in ("lora_down", "lora_up"):
                param = getattr(adapter, part).weight
                param.requires_grad_(True)
                self._named.append((f"{name}.{part}", param))

        # The LoRA'd MODEL for inference: the user's patches plus our weight wrappers, nothing else.
        self._plain = base.clone()
        for name, adapter in self._adapters.items():
            self._plain.add_weight_wrapper(f"{PREFIX}{name}.weight", adapter)
        # The training clone: attention control, dropout correction, checkpointing, fp32 compute.
        patcher = with_attention_control(self._plain)
        if self.p > 0:
            for name, adapter in self._adapters.items():
                key = f"{PREFIX}{name}.forward"
                patcher.add_object_patch(key, self._branch_dropout(patcher.get_model_object(key), adapter))
        if self.gradient_checkpointing:
            for name in _highest_children(base.model.diffusion_model):
                key = f"{PREFIX}{name}.forward"
                patcher.add_object_patch(key, _checkpointed(patcher.get_model_object(key)))
        if base.model_dtype() != torch.float32:
            patcher.set_model_compute_dtype(torch.float32)  # LoRA gradients in fp32, as the diffusers branch
        self._grad_flags = _GradFlags()
        patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_DETACH, self._grad_flags.restore)
        weakref.finalize(patcher, self._grad_flags.restore)
        self.patcher = patcher
        self._host: ComfySVDHost | None = None
        self._clip_vision, self._vae = host.clip_vision, host.vae
        self._host_type = type(host)  # ComfySVDHost, which imports this module

    # ---- LoRATrainable ---------------------------------------------------------------------------

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return self._named

    def set_dropout(self, active: bool) -> None:
        self._dropout_on = bool(active)

    def fingerprint(self) -> str:
        return self.host.fingerprint()

    def train_denoise(
        self, x: torch.Tensor, sigma: float, cond: SVDCond, transformer_options: dict[str, Any]
    ) -> torch.Tensor:
        """D(x; σ, cond) through ComfyUI's model path with gradients into the LoRA, (F, 4, h, w) fp32."""
        cond.check(x)
        s = sigma_scalar(sigma)
        want_grad = torch.is_grad_enabled() or torch.is_inference_mode_enabled()
        with torch.inference_mode(False), torch.set_grad_enabled(want_grad):
            cond = replace(
                cond, clip_embed=_plain_input(cond.clip_embed), concat_latent=_plain_input(cond.concat_latent)
            )
            x = _plain_input(x).float()
            guider = comfy.samplers.CFGGuider(self.patcher)
            guider.model_options = comfy.model_patcher.create_model_options_clone(self.patcher.model_options)
            if transformer_options:
                guider.model_options.setdefault("transformer_options", {}).update(transformer_options)
            guider.inner_set_conds({_COND: to_conditioning(cond)})
            guider.set_cfg(1.0)
            results: list[torch.Tensor] = []

            def one_call(model_k, x_in, sigmas, extra_args=None, callback=None, disable=None):
                g = model_k.inner_model
                self._make_trainable(g.inner_model)
                dev = x_in.device
                use_autocast = self.autocast_dtype is not None
                with torch.autocast(dev.type, self.autocast_dtype, enabled=use_autocast):
                    outs = comfy.samplers.calc_cond_batch(
                        g.inner_model, [g.conds[_COND]], x_in, x_in.new_full([x_in.shape[0]], s),
                        extra_args["model_options"],
                    )  # fmt: skip
                results.append(outs[0].float())
                return x_in.detach()

            zeros = torch.zeros_like(x, device="cpu")
            guider.sample(
                zeros,
                zeros,
                DirectSampler(one_call, x, None, True),
                torch.tensor([s, 0.0]),
                disable_pbar=True,
            )
            return results[0]

    def export(self) -> dict[str, LoRAPair]:
        with torch.inference_mode(False):
            layers = {n: (a.lora_down.weight, a.lora_up.weight) for n, a in self._adapters.items()}
            return exported_pairs(layers, self.rank)

    def load(self, modules: dict[str, LoRAPair]) -> None:
        fitted = fitted_pairs(modules, self._shapes, self.rank, self.target_set)
        with torch.inference_mode(False), torch.no_grad():
            for name, (down, up) in fitted.items():
                self._adapters[name].lora_down.weight.copy_(down)
                self._adapters[name].lora_up.weight.copy_(up)

    # ---- inference -------------------------------------------------------------------------------

    @property
    def host(self) -> ComfySVDHost:
        """A ComfySVDHost over the LoRA'd clone (live LoRA, never dropout; the user's MODEL untouched)."""
        if self._host is None:
            self._host = self._host_type(self._plain, self._clip_vision, self._vae)
        return self._host

    # ---- internals -------------------------------------------------------------------------------

    def _branch_dropout(self, forward: Callable, adapter: comfy.weight_adapter.lora.LoraDiff) -> Callable:
        trainer, scale = self, float(adapter.alpha) / adapter.rank

        def dropout_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            y = forward(x, *args, **kwargs)
            if not trainer._dropout_on:
                return y
            down = adapter.lora_down.weight.to(x.dtype)
            up = adapter.lora_up.weight.to(x.dtype)
            branch = torch.nn.functional.linear(torch.nn.functional.linear(x, down), up) * scale
            dropped = torch.nn.functional.dropout(branch, trainer.p, training=True)
            return y + (dropped - branch).to(y.dtype)

        return dropout_forward

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
