"""ComfyUI's sampling objects for the host's model calls, made once and run call after call.

A ``GuiderSession`` is one ``CFGGuider`` over one MODEL clone with its CONDITIONING, one
``DirectSampler`` and the zero latent ``CFGGuider.sample`` takes as noise and start latent. The host
keeps one per (MODEL clone, conditioning set) in ``GuiderSessions``, so a clip's inversion and its
matched denoising build them once; a LoRA trainer keeps one for its run and hands it each step's
conditioning. Per call only the latent, σ and the call's ``transformer_options`` change, as in
ComfyUI's own ``TrainSampler``, whose one guider serves a whole training run. Each call still runs
ComfyUI's whole ``CFGGuider.sample`` (model loading, hooks, wrappers, conditioning processing), so
other MODELs ComfyUI loads between calls and the user's patches behave as in a KSampler.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import torch

from ...host import SamplerFn
from ...svd import SVDCond
from .patches import to_conditioning


class DirectSampler(comfy.samplers.Sampler):
    """Runs the current call's k-diffusion sampler function from its start latent (unlike KSAMPLER's
    noise scaling), with the call's ``transformer_options`` added to the model options ComfyUI made
    for that sampling run. One per session; ``load`` sets a call, ``release`` forgets it."""

    def __init__(self) -> None:
        self.fn: SamplerFn | None = None
        self.x: torch.Tensor | None = None
        self.callback: Callable | None = None
        self.disable: bool | None = None
        self.transformer_options: dict[str, Any] | None = None

    def load(
        self,
        fn: SamplerFn,
        x: torch.Tensor,
        callback: Callable | None,
        disable: bool | None,
        transformer_options: dict[str, Any] | None,
    ) -> None:
        self.fn, self.x, self.callback, self.disable = fn, x, callback, disable
        self.transformer_options = transformer_options

    def release(self) -> None:
        """Drop the call's latent and options (its controller may hold captured attention)."""
        self.fn = self.x = self.callback = self.transformer_options = None

    def sample(
        self,
        model_wrap,
        sigmas,
        extra_args,
        callback,
        noise,
        latent_image=None,
        denoise_mask=None,
        disable_pbar=False,
    ):
        if self.fn is None or self.x is None:
            raise RuntimeError("DirectSampler.sample ran without a call loaded; use GuiderSession.run.")
        extra_args["denoise_mask"] = denoise_mask
        if self.transformer_options:  # a copy, as ComfyUI copies the guider's own options for each run
            options = comfy.patcher_extension.copy_nested_dicts(self.transformer_options)
            extra_args["model_options"].setdefault("transformer_options", {}).update(options)
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image, model_k.noise = latent_image, noise
        x = self.x.to(noise.device, noise.dtype)
        disable = disable_pbar if self.disable is None else self.disable
        return self.fn(model_k, x, sigmas, extra_args=extra_args, callback=self.callback, disable=disable)


class GuiderSession:
    """ComfyUI's ``CFGGuider`` over ``patcher`` with ``conds`` (by name), a ``DirectSampler`` and a zero
    latent, made once; ``run`` and ``model_call`` use them for one call each.

    ``model_options`` is added to a copy of the patcher's model options made now (the patcher's
    later changes are not seen: a new clone gets a new session).
    """

    def __init__(
        self,
        patcher: comfy.model_patcher.ModelPatcher,
        conds: Mapping[str, SVDCond],
        model_options: dict[str, Any] | None = None,
        cfg: float = 1.0,
    ) -> None:
        self.patcher = patcher
        self.guider = comfy.samplers.CFGGuider(patcher)
        self.guider.model_options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
        if model_options:
            self.guider.model_options.update(model_options)
        self.guider.set_cfg(cfg)
        self.sampler = DirectSampler()
        self.conds: dict[str, SVDCond] = {}
        self.zeros: torch.Tensor | None = None
        self.set_conds(conds)

    def holds(self, conds: Mapping[str, SVDCond]) -> bool:
        """Whether the guider holds exactly these conditioning objects under these names."""
        return list(self.conds) == list(conds) and all(self.conds[k] is c for k, c in conds.items())

    def set_conds(self, conds: Mapping[str, SVDCond]) -> None:
        """The guider's CONDITIONING from now on: ``conds`` by name (ComfyUI's ``positive`` is CFG's cond)."""
        if self.holds(conds):
            return
        self.guider.original_conds = {}
        self.guider.inner_set_conds({k: to_conditioning(c) for k, c in conds.items()})
        self.conds = dict(conds)

    def run(
        self,
        fn: SamplerFn,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        callback: Callable | None = None,
        disable: bool | None = None,
        transformer_options: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """``CFGGuider.sample`` running sampler function ``fn`` from ``x`` over ``sigmas``: its result in
        the sampling space (``x``'s), float32 on the CPU."""
        out = self._sample(fn, x, sigmas, callback, disable, transformer_options)
        return self.patcher.model.process_latent_in(out).float().cpu()

    def model_call(
        self,
        x: torch.Tensor,
        sigma: float,
        transformer_options: dict[str, Any] | None = None,
        prepare: Callable[[torch.nn.Module], None] | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> list[torch.Tensor]:
        """D(x; σ, c) for each conditioning in name order, from one ``calc_cond_batch`` inside
        ``CFGGuider.sample`` (the model's own dtype and device; gradients when grad mode is on).

        ``prepare`` sees ComfyUI's loaded model first; ``autocast_dtype`` runs the call under autocast on its device.
        """
        keys = list(self.conds)
        outs: list[torch.Tensor] = []

        def one_call(model_k, x_in, sigmas, extra_args=None, callback=None, disable=None):
            guider = model_k.inner_model
            if prepare is not None:
                prepare(guider.inner_model)
            dev = x_in.device
            autocast = (
                torch.autocast(dev.type, autocast_dtype)
                if autocast_dtype is not None
                else contextlib.nullcontext()
            )
            model, batch = guider.inner_model, [guider.conds[k] for k in keys]
            with autocast:
                sigma_in = x_in.new_full([x_in.shape[0]], sigma)
                outs.extend(
                    comfy.samplers.calc_cond_batch(model, batch, x_in, sigma_in, extra_args["model_options"])
                )
            return x_in.detach()

        self._sample(one_call, x, torch.tensor([sigma, 0.0]), None, True, transformer_options)
        return outs

    def _sample(self, fn, x, sigmas, callback, disable, transformer_options) -> torch.Tensor:
        if self.zeros is None or self.zeros.shape != x.shape:
            self.zeros = torch.zeros(x.shape, dtype=torch.float32)
        self.sampler.load(fn, x.float(), callback, disable, transformer_options)
        try:
            return self.guider.sample(
                self.zeros, self.zeros, self.sampler, sigmas.float(), disable_pbar=bool(disable)
            )
        finally:
            self.sampler.release()


class GuiderSessions:
    """A host's sessions, one per (MODEL clone, conditioning objects); the ``size`` last used are kept.

    Sessions hold their conditioning objects, so a look-up compares identities that cannot be reused.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.sessions: list[GuiderSession] = []

    def get(self, patcher: comfy.model_patcher.ModelPatcher, conds: Mapping[str, SVDCond]) -> GuiderSession:
        """The session of ``patcher`` with ``conds``, made on first use."""
        for i, session in enumerate(self.sessions):
            if session.patcher is patcher and session.holds(conds):
                self.sessions.append(self.sessions.pop(i))  # most recently used last
                return session
        session = GuiderSession(patcher, conds)
        self.sessions.append(session)
        while len(self.sessions) > self.size:
            self.sessions.pop(0)
        return session

    def clear(self) -> None:
        self.sessions.clear()
