"""Motion LoRA training (coarse motion extraction, method.md §5), host-free.

A host adapter (``LoRATrainable``) holds the LoRA on the host's model and answers: the
trainable tensors by name, D(x; σ, cond) *with* gradients, and export/import of the LoRA as
``lora.file.LoRAPair`` by ComfyUI module name. This module owns everything else: the cosine-
interpolated log-SNR σ sampler, the EDM x0 objective with weight (1 + σ²)/σ², conditioning on the
clip's source first frame with fresh 0.02 latent noise, AdamW, per-step seeding (so a resumed run
equals an uninterrupted one), checkpoints, the non-finite guard and interruption between steps.

Every random draw of step ``s`` comes from seeds derived from (the clip's training seed, ``s``): σ and
the noises from ``Purpose.TRAIN_STEP``, LoRA dropout from ``Purpose.TRAIN_DROPOUT`` (``seeds``), so
step ``s`` does the same thing whether or not the run was resumed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import I2VEditError, LoRAError
from ..host import LoRATrainable
from ..io.files import save_safetensors_atomic
from ..method import edm
from ..method.controller import CONTROLLER_KEY, AttentionController
from ..method.skip_interval import SourceKV
from ..seeds import Purpose, derived_seed, generator
from ..svd import SVDCond, TimeIds
from .file import LoRAWeights, load_lora, save_lora
from .targets import check_target_set

log = logging.getLogger("i2vedit")

TRAIN_TIME_IDS = TimeIds(6.0, 127.0, 0.02)


class LoRATrainingError(LoRAError):
    """Training stopped on a bad step; ``weights`` holds the last good LoRA, ``checkpoint`` its file."""

    def __init__(self, message: str, weights: LoRAWeights, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.weights, self.step, self.checkpoint = weights, step, checkpoint


@dataclass(frozen=True)
class TrainConfig:
    """The authors' training settings (method.md §5.5) unless changed."""

    rank: int = 32
    steps: int = 250
    lr: float = 5e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    dropout: float = 0.1
    seed: int = 0
    target_set: str = "temporal"
    checkpoint_every: int = 50
    cond_noise: float = 0.02
    time_ids: TimeIds = TRAIN_TIME_IDS

    def validate(self) -> TrainConfig:
        if self.rank < 1:
            raise I2VEditError(f"LoRA rank must be at least 1, got {self.rank}.")
        if self.steps < 1:
            raise I2VEditError(f"training needs at least 1 step, got {self.steps}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise I2VEditError(f"learning rate must be a positive number, got {self.lr}.")
        if not 0.0 <= self.dropout < 1.0:
            raise I2VEditError(f"LoRA dropout must lie in [0, 1), got {self.dropout}.")
        if self.checkpoint_every < 1:
            raise I2VEditError(f"checkpoint_every must be at least 1 step, got {self.checkpoint_every}.")
        check_target_set(self.target_set)
        return self


def training_sigma(u: torch.Tensor) -> torch.Tensor:
    """The cosine-interpolated log-SNR σ sampler of method.md §5.4: u = 0 → 700, u = 1 → 0.002."""
    sigma_data, image_d = 0.5, 64
    lam_lo = -2 * math.log(0.002 / sigma_data)
    lam_hi = -2 * math.log(700 / sigma_data)
    u = u.double()

    def logsnr(d: int) -> torch.Tensor:
        shift = 2 * math.log(d / image_d)
        t_a = math.atan(math.exp(-(lam_hi - shift) / 2))
        t_b = math.atan(math.exp(-(lam_lo - shift) / 2))
        return -2 * torch.log(torch.tan(t_a + u * (t_b - t_a))) + shift

    lo, hi = logsnr(32), logsnr(64)
    return (sigma_data * torch.exp(-(lo + u * (hi - lo)) / 2)).float()


@dataclass
class StepDraws:
    sigma: float
    noise: torch.Tensor
    cond_noise: torch.Tensor


def draw_step(seed: int, step: int, latent_shape: tuple[int, ...]) -> StepDraws:
    """σ, the latent noise and the conditioning noise of training step ``step`` (CPU generator)."""
    g = generator(seed, 0, Purpose.TRAIN_STEP, step)  # ``seed`` is already the clip's
    u = torch.rand(1, generator=g)
    noise = torch.randn(latent_shape, generator=g)
    cond_noise = torch.randn((1, *latent_shape[1:]), generator=g)
    return StepDraws(float(training_sigma(u)[0]), noise, cond_noise)


def training_size(height: int, width: int, area: int = 512 * 896, multiple: int = 64) -> tuple[int, int]:
    """A training resolution with about ``area`` pixels, the clip's aspect, sides a multiple of 64."""
    if height < 1 or width < 1:
        raise I2VEditError(f"clip size must be positive, got {height}×{width}.")
    scale = math.sqrt(area / (height * width))
    h = max(multiple, round(height * scale / multiple) * multiple)
    w = max(multiple, round(width * scale / multiple) * multiple)
    return int(h), int(w)


def objective(
    trainer: LoRATrainable,
    latents: torch.Tensor,
    first_latent: torch.Tensor,
    clip_embed: torch.Tensor,
    draws: StepDraws,
    config: TrainConfig,
    skip_kv: SourceKV | None = None,
) -> torch.Tensor:
    """λ(σ)·mean((D(z0 + σn; σ) − z0)²) for one draw, conditioned on the source first frame."""
    cond = SVDCond(clip_embed, first_latent + config.cond_noise * draws.cond_noise, config.time_ids)
    opts: dict[str, Any] = {}
    if skip_kv is not None:
        ctrl = AttentionController()
        ctrl.begin_step(0, 1, skip_kv=skip_kv.for_sigma(draws.sigma))
        opts[CONTROLLER_KEY] = ctrl
    x = latents + draws.sigma * draws.noise
    denoised = trainer.train_denoise(x, draws.sigma, cond, opts)
    return edm.edm_loss_weight(draws.sigma) * ((denoised - latents.to(denoised.device)) ** 2).mean()


def evaluate_objective(
    trainer: LoRATrainable,
    latents: torch.Tensor,
    first_latent: torch.Tensor,
    clip_embed: torch.Tensor,
    config: TrainConfig,
    draws: list[StepDraws],
    skip_kv: SourceKV | None = None,
) -> float:
    """Mean objective over fixed draws, without dropout or gradients: a curve that can fall."""
    trainer.set_dropout(False)
    with torch.no_grad():
        vals = [
            float(objective(trainer, latents, first_latent, clip_embed, d, config, skip_kv)) for d in draws
        ]
    return sum(vals) / len(vals)


@dataclass
class TrainResult:
    weights: LoRAWeights
    steps_done: int
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False
    checkpoint: Path | None = None


def _optimizer(trainer: LoRATrainable, config: TrainConfig) -> torch.optim.AdamW:
    params = [p for _, p in trainer.named_trainable()]
    return torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, eps=1e-8, weight_decay=config.weight_decay
    )


def _optim_path(lora_path: Path) -> Path:
    return lora_path.with_name(lora_path.name.replace(".safetensors", ".optim.safetensors"))


def save_checkpoint(
    path: Path, trainer: LoRATrainable, optimizer: torch.optim.Optimizer, meta: LoRAWeights
) -> Path:
    """The LoRA (a loadable file) and, beside it, the AdamW state needed to resume exactly."""
    weights = replace(meta, modules=trainer.export())
    state: dict[str, torch.Tensor] = {}
    for name, p in trainer.named_trainable():
        s = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in s:
                state[f"{name}.{key}"] = s[key].detach().to("cpu", torch.float32).contiguous()
        if "step" in s:
            state[f"{name}.step"] = torch.as_tensor(s["step"], dtype=torch.float32).reshape(1).cpu()
    save_safetensors_atomic(_optim_path(path), state, {"steps": str(meta.steps)})
    return save_lora(path, weights)


def load_checkpoint(path: Path, trainer: LoRATrainable, optimizer: torch.optim.Optimizer) -> int:
    """Restore LoRA and AdamW state from a checkpoint; returns the number of steps it had done."""
    weights = load_lora(path)
    if weights.steps is None:
        raise LoRAError(f"{path} records no step count; it is not a training checkpoint of this pack.")
    ours = {n for n, _ in trainer.named_trainable()}
    trained = {f"{m}.lora_down" for m in weights.modules} | {f"{m}.lora_up" for m in weights.modules}
    if trained != ours:
        missing = sorted(ours - trained)[:3]
        raise LoRAError(
            f"checkpoint {path} was trained on other layers than this run (e.g. missing {missing}); resume "
            "with the same target set and rank, or start over."
        )
    trainer.load(weights.modules)
    try:
        state = load_file(str(_optim_path(path)))
    except (OSError, SafetensorError) as e:
        raise LoRAError(
            f"the optimiser state beside {path} cannot be read ({e}); without it a resumed run would not "
            "equal an uninterrupted one. Start over, or load the LoRA file as a finished LoRA."
        ) from e
    for name, p in trainer.named_trainable():
        if f"{name}.exp_avg" in state:
            optimizer.state[p] = {
                "step": state[f"{name}.step"].reshape(()).clone(),
                "exp_avg": state[f"{name}.exp_avg"].to(p.device, p.dtype),
                "exp_avg_sq": state[f"{name}.exp_avg_sq"].to(p.device, p.dtype),
            }
    return int(weights.steps)


def _checkpoint_path(folder: Path, steps: int) -> Path:
    return folder / f"checkpoint-{steps:05d}.safetensors"


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint with the most steps in ``folder`` (as ``train_motion_lora`` names them), if any."""
    found = sorted(Path(folder).glob("checkpoint-[0-9][0-9][0-9][0-9][0-9].safetensors"))
    return found[-1] if found else None


def _fork_rng(device: torch.device):
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite; a ``meta`` tensor (a memory plan) holds no values to check."""
    return t.is_meta or bool(torch.isfinite(t).all())


def step_gradients(
    trainer: LoRATrainable,
    optimizer: torch.optim.Optimizer,
    latents: torch.Tensor,
    first_latent: torch.Tensor,
    clip_embed: torch.Tensor,
    config: TrainConfig,
    skip_kv: SourceKV | None,
    step: int,
    device: torch.device,
) -> tuple[torch.Tensor, StepDraws, str | None]:
    """Training step ``step``'s loss and gradients from its seeded draws; why, when either is not finite."""
    draws = draw_step(config.seed, step, tuple(latents.shape))
    trainer.set_dropout(config.dropout > 0)
    with _fork_rng(device):
        torch.manual_seed(derived_seed(config.seed, 0, Purpose.TRAIN_DROPOUT, step))
        loss = objective(trainer, latents, first_latent, clip_embed, draws, config, skip_kv)
        if not _finite(loss):
            return loss, draws, f"the loss became {float(loss.detach())}"
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for name, p in trainer.named_trainable():
            if p.grad is not None and not _finite(p.grad):
                return loss, draws, f"the gradient of {name} is not finite"
    return loss, draws, None


def train_motion_lora(
    trainer: LoRATrainable,
    latents: torch.Tensor,
    first_latent: torch.Tensor,
    clip_embed: torch.Tensor,
    config: TrainConfig = TrainConfig(),
    skip_kv: SourceKV | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    metadata: LoRAWeights | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: torch.device | str = "cpu",
) -> TrainResult:
    """Fit a motion LoRA to one clip.

    ``latents`` (frames, 4, h, w) are the clip's cached VAE latents in the scaled space;
    ``first_latent`` (1, 4, h, w) the raw (unscaled) VAE latent of its source first frame and
    ``clip_embed`` (1, 1, D) that frame's CLIP embedding. ``skip_kv`` is the first clip's
    ``SourceKV`` (at this resolution) for later clips. Checkpoints go to ``checkpoint_dir`` every
    ``config.checkpoint_every`` steps; ``resume_from`` continues from one. ``should_stop`` is polled
    between steps: when it says so, the LoRA trained so far is returned (``interrupted``). A non-
    finite loss or gradient raises ``LoRATrainingError`` holding the last good LoRA.
    """
    config = config.validate()
    device = torch.device(device)
    if latents.ndim != 4 or latents.shape[1] != 4:
        raise I2VEditError(f"latents must be (frames, 4, h, w), got {tuple(latents.shape)}.")
    if skip_kv is not None:
        skip_kv.check_fits(latents.shape[-2:], trainer.fingerprint())
    meta = replace(
        metadata or LoRAWeights({}),
        modules={},
        target_set=config.target_set,
        frames=latents.shape[0],
        seed=config.seed,
    )
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None and not ckpt_dir.is_dir():
        raise I2VEditError(f"checkpoint folder {ckpt_dir} does not exist; create it or choose another.")
    optimizer = _optimizer(trainer, config)
    start = 0
    if resume_from is not None:
        start = load_checkpoint(Path(resume_from), trainer, optimizer)
        if start > config.steps:
            raise I2VEditError(f"checkpoint has {start} steps, more than the {config.steps} asked for.")
    latents, first_latent = latents.float(), first_latent.float()
    losses: list[float] = []
    last_ckpt: Path | None = Path(resume_from) if resume_from is not None else None
    done = start  # steps whose update is in the LoRA and the optimiser

    def checkpoint(steps: int) -> Path:
        assert ckpt_dir is not None
        return save_checkpoint(
            _checkpoint_path(ckpt_dir, steps), trainer, optimizer, replace(meta, steps=steps)
        )

    def keep_progress() -> Path | None:
        """On an interruption: the steps done since the start as a checkpoint, to resume from."""
        if ckpt_dir is None or done == start:
            return last_ckpt
        path = _checkpoint_path(ckpt_dir, done)
        return path if path.is_file() else checkpoint(done)

    try:
        for step in range(start, config.steps):
            if should_stop is not None and should_stop():
                last_ckpt = keep_progress()
                weights = replace(meta, modules=trainer.export(), steps=step)
                return TrainResult(weights, step, losses, interrupted=True, checkpoint=last_ckpt)
            loss, draws, bad = step_gradients(trainer, optimizer, latents, first_latent, clip_embed, config, skip_kv,
                                          step, device)  # fmt: skip
            if bad is not None:
                optimizer.zero_grad(set_to_none=True)
                good = replace(meta, modules=trainer.export(), steps=step)
                raise LoRATrainingError(
                    f"motion LoRA training stopped at step {step + 1} of {config.steps}: {bad} (σ = {draws.sigma:.4g}). "
                    "The LoRA of the last good step is kept"
                    + (f" and the last checkpoint is {last_ckpt}" if last_ckpt else "")
                    + ". Try a lower learning rate, or fp32 instead of fp16 autocast.",
                    good,
                    step,
                    last_ckpt,
                )
            optimizer.step()
            done = step + 1
            losses.append(float(loss.detach()))
            if callback is not None:
                callback({"step": done, "steps": config.steps, "loss": losses[-1], "sigma": draws.sigma})
            if ckpt_dir is not None and (done % config.checkpoint_every == 0 or done == config.steps):
                last_ckpt = checkpoint(done)
    except (KeyboardInterrupt, I2VEditError, RuntimeError) as e:
        # Interrupted (Ctrl-C, a callback that stops the run, an error of the model call): keep the
        # steps done so far as a checkpoint, so the same run resumes there instead of at step 0.
        if not isinstance(e, LoRATrainingError):
            try:
                keep_progress()
            except Exception as save_error:  # the first error is the one to report
                log.warning("could not keep the LoRA checkpoint at step %d: %s", done, save_error)
        raise
    trainer.set_dropout(False)
    weights = replace(meta, modules=trainer.export(), steps=config.steps)
    return TrainResult(weights, config.steps, losses, interrupted=False, checkpoint=last_ckpt)
