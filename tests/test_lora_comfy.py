"""Motion LoRA training and loading on the ComfyUI host (COMFYUI_PATH); skipped with the reason when there is none.

The tiny SVD of ComfyUI's classes carries exactly the weights of the tiny diffusers SVD, so the
ComfyUI trainer is checked against the diffusers trainer and ComfyUI's stock LoRA loader as well
as against itself.
"""

import importlib.util
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import align_groupnorm_eps

from i2vedit.errors import LoRAError
from i2vedit.lora.file import LoRAPair, LoRAWeights, load_lora, save_lora
from i2vedit.lora.train import (
    LoRATrainingError,
    TrainConfig,
    draw_step,
    evaluate_objective,
    objective,
    train_motion_lora,
)
from i2vedit.method.controller import CONTROLLER_KEY, AttentionController
from i2vedit.svd import LATENT_SCALE, SVDCond, TimeIds

pytestmark = pytest.mark.usefixtures("comfy")
F, H, W = 4, 8, 16
RANK = 8
SIGMAS = (30.0, 2.0, 0.1)


def smooth_clip():
    """A small clip with smooth content and motion: scaled latents, raw first frame, CLIP embedding."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    latents = torch.stack(
        [
            torch.stack([torch.sin(3 * xx + 0.5 * t + c) + 0.5 * torch.cos(2 * yy + c) for c in range(4)])
            for t in range(F)
        ]
    )
    embed = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(3))
    return latents, latents[:1] / LATENT_SCALE, embed


def random_lora(trainer, seed: int = 5, scale: float = 0.1) -> dict[str, LoRAPair]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: LoRAPair(
            torch.randn(p.down.shape, generator=g) * scale,
            torch.randn(p.up.shape, generator=g) * scale,
            float(RANK),
        )
        for n, p in trainer.export().items()
    }


def base_state(host) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer of the user's model."""
    model = host.patcher.model
    with torch.inference_mode(False):
        out = {f"p:{n}": p.detach().clone() for n, p in model.named_parameters()}
        out.update({f"b:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return out


def assert_same_state(host, before: dict[str, torch.Tensor]) -> None:
    after = base_state(host)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]


def patcher_state(patcher):
    return (
        dict(patcher.weight_wrapper_patches),
        dict(patcher.object_patches),
        {k: list(v) for k, v in patcher.patches.items()},
        sorted(patcher.model_options.get("transformer_options", {})),
    )


def comfy_nodes():
    """ComfyUI's own ``nodes`` module (never this pack's ``nodes`` package)."""
    path = (Path(os.environ["COMFYUI_PATH"]) / "nodes.py").resolve()
    mod = sys.modules.get("nodes")
    if mod is None:
        import nodes as mod  # the comfy fixture put ComfyUI first on sys.path
    if Path(getattr(mod, "__file__", "") or "").resolve() == path:
        return mod
    spec = importlib.util.spec_from_file_location("_comfyui_nodes", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def comfy_host(comfy):
    from fixtures.tiny_comfy import build_tiny_comfy_host

    return build_tiny_comfy_host(seed=0)


@pytest.fixture(scope="module")
def cond():
    g = torch.Generator().manual_seed(1)
    return SVDCond(
        torch.randn(1, 1, 64, generator=g), torch.randn(1, 4, H, W, generator=g), TimeIds(6, 127, 0.02)
    )


@pytest.fixture(scope="module")
def x_in():
    return torch.randn(F, 4, H, W, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def trained(comfy_host, cond, x_in):
    """40 AdamW steps (rank 8, lr 1e-2, dropout 0.1) on the smooth clip, with everything around it recorded."""
    from i2vedit.hosts.comfy.lora import ComfyLoRATrainer

    state, pstate = base_state(comfy_host), patcher_state(comfy_host.patcher)
    user_out = comfy_host.denoise(x_in * 2, 2.0, [cond])
    latents, first, embed = smooth_clip()
    config = TrainConfig(rank=RANK, steps=40, lr=1e-2, dropout=0.1, seed=0, checkpoint_every=1000)
    trainer = ComfyLoRATrainer(comfy_host, rank=RANK, dropout=0.1)
    draws = [draw_step(123, s, tuple(latents.shape)) for s in range(8)]
    before = evaluate_objective(trainer, latents, first, embed, config, draws)
    start = time.perf_counter()
    result = train_motion_lora(trainer, latents, first, embed, config)
    per_step = (time.perf_counter() - start) / config.steps
    after = evaluate_objective(trainer, latents, first, embed, config, draws)
    print(f"\nobjective {before:.4f} -> {after:.4f} in {config.steps} steps, {per_step:.3f} s/step")
    return SimpleNamespace(
        trainer=trainer,
        result=result,
        before=before,
        after=after,
        state=state,
        pstate=pstate,
        user_out=user_out,
        per_step=per_step,
    )


def test_initial_lora_and_names_equal_the_diffusers_trainers(comfy_host, tiny_diffusers_host):
    from i2vedit.hosts.comfy.lora import ComfyLoRATrainer
    from i2vedit.hosts.diffusers.lora import DiffusersLoRATrainer

    exports = {}
    for target_set, seed in (("temporal", 0), ("temporal_attention", 7)):
        ours = ComfyLoRATrainer(comfy_host, rank=4, target_set=target_set, init_seed=seed)
        ref = DiffusersLoRATrainer(tiny_diffusers_host, rank=4, target_set=target_set, init_seed=seed)
        assert [n for n, _ in ours.named_trainable()] == [n for n, _ in ref.named_trainable()]
        a, b = ours.export(), ref.export()
        exports[target_set] = a
        assert list(a) == sorted(a) == list(b)
        assert len(a) == {"temporal": 192, "temporal_attention": 128}[target_set]
        for name in a:
            assert torch.equal(a[name].down, b[name].down) and torch.equal(a[name].up, b[name].up), name
            assert a[name].alpha == 4.0 and not a[name].up.any()
            assert abs(float(a[name].down.std()) - 1 / 4) < 0.1
    other = ComfyLoRATrainer(comfy_host, rank=4, init_seed=1).export()
    assert not any(torch.equal(other[n].down, p.down) for n, p in exports["temporal"].items())


def test_training_leaves_the_users_model_and_patcher_untouched(trained, comfy_host, cond, x_in):
    assert_same_state(comfy_host, trained.state)
    assert comfy_host.patcher.weight_wrapper_patches == {}
    assert patcher_state(comfy_host.patcher) == trained.pstate
    trainer = trained.trainer  # the LoRA lives on its clone, as forward patches of the target linears
    assert trainer.patcher.weight_wrapper_patches == {} and trainer.patcher.patches == {}
    assert all(
        f"diffusion_model.{n}.forward" in trainer.patcher.object_patches for n in trainer.branch.shapes
    )
    # The user's MODEL, run after the LoRA'd clone was loaded, computes exactly what it did before.
    assert torch.equal(comfy_host.denoise(x_in * 2, 2.0, [cond]), trained.user_out)
    assert all(p.requires_grad for p in comfy_host.patcher.model.parameters())  # flags back once detached
    lora_out = trained.trainer.host.denoise(x_in * 2, 2.0, [cond])
    assert (lora_out - trained.user_out).abs().max() > 1e-3


def test_training_lowers_the_objective(trained):
    r = trained.result
    assert r.steps_done == 40 and not r.interrupted and len(r.losses) == 40
    assert all(math.isfinite(v) for v in r.losses)
    assert trained.after < 0.9 * trained.before, (trained.before, trained.after)
    assert r.weights.rank == RANK and r.weights.target_set == "temporal" and r.weights.frames == F


def test_training_denoiser_equals_the_inference_host(trained, cond, x_in):
    trainer = trained.trainer
    trainer.set_dropout(False)
    for sigma in SIGMAS:
        with torch.no_grad():
            ours = trainer.train_denoise(x_in * max(sigma, 1.0), sigma, cond, {})
        ref = trainer.host.denoise(x_in * max(sigma, 1.0), sigma, [cond])[0]
        torch.testing.assert_close(ours.cpu(), ref, rtol=1e-5, atol=1e-5)


def test_saved_lora_loads_through_loraloadermodelonly(trained, comfy_host, cond, x_in, tmp_path, caplog):
    import folder_paths

    from i2vedit.hosts.comfy.host import ComfySVDHost
    from i2vedit.hosts.comfy.lora import comfy_lora_model

    path = save_lora(tmp_path / "motion.safetensors", trained.result.weights)
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    try:
        with caplog.at_level("WARNING"):
            (model,) = (
                comfy_nodes().LoraLoaderModelOnly().load_lora_model_only(comfy_host.patcher, path.name, 1.0)
            )
    finally:
        folder_paths.folder_names_and_paths["loras"][0].remove(str(tmp_path))
    unloaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert unloaded == []
    modules = trained.result.weights.modules
    assert {k for k in model.patches} == {f"diffusion_model.{m}.weight" for m in modules}
    assert all(len(v) == 1 for v in model.patches.values())

    stock = ComfySVDHost(model)
    ours = comfy_lora_model(comfy_host.patcher, load_lora(path))
    trained.trainer.set_dropout(False)
    for sigma in SIGMAS:
        x = x_in * max(sigma, 1.0)
        live = trained.trainer.host.denoise(x, sigma, [cond])
        torch.testing.assert_close(stock.denoise(x, sigma, [cond]), live, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ComfySVDHost(ours).denoise(x, sigma, [cond]), live, rtol=1e-5, atol=1e-5)
    assert comfy_host.patcher.patches == {}


def test_same_file_gives_the_same_output_in_the_diffusers_host(
    trained, comfy_host, tiny_diffusers_host, cond, x_in
):

    weights = trained.result.weights
    ours = comfy_host.with_lora(weights)
    ref = align_groupnorm_eps(tiny_diffusers_host).with_lora(weights)
    for sigma in SIGMAS:
        x = x_in * max(sigma, 1.0)
        a, b = ours.denoise(x, sigma, [cond]), ref.denoise(x, sigma, [cond])
        assert (a - b).abs().max() <= 1e-4 * b.abs().max(), float((a - b).abs().max())
    half = comfy_host.with_lora(weights, strength=0.5).denoise(x, sigma, [cond])
    ref_half = align_groupnorm_eps(tiny_diffusers_host).with_lora(weights, 0.5).denoise(x, sigma, [cond])
    assert (half - ref_half).abs().max() <= 1e-4 * ref_half.abs().max()
    assert (half - a).abs().max() > 1e-4


def test_branch_dropout_is_the_authors_and_off_means_none(comfy_host, tiny_diffusers_host, cond, x_in):
    from i2vedit.hosts.comfy.lora import ComfyLoRATrainer
    from i2vedit.hosts.diffusers.lora import DiffusersLoRATrainer

    ours = ComfyLoRATrainer(comfy_host, rank=RANK, dropout=0.3)
    plain = ComfyLoRATrainer(comfy_host, rank=RANK, dropout=0.0)
    ref = DiffusersLoRATrainer(align_groupnorm_eps(tiny_diffusers_host), rank=RANK, dropout=0.3)
    lora = random_lora(ours)
    for t in (ours, plain, ref):
        t.load(lora)
    x = x_in * 2
    ours.set_dropout(False)
    off = ours.train_denoise(x, 2.0, cond, {})
    assert torch.equal(off, plain.train_denoise(x, 2.0, cond, {}))
    ours.set_dropout(True)
    ref.set_dropout(True)
    torch.manual_seed(11)
    on = ours.train_denoise(x, 2.0, cond, {})
    torch.manual_seed(11)
    on_ref = ref.train_denoise(x, 2.0, cond, {})
    # Same masks as the diffusers trainer's dropout on lora_B's output: the same function.
    assert (on - on_ref).abs().max() <= 1e-5 * on_ref.abs().max()
    assert (on - off).abs().max() > 1e-2
    torch.manual_seed(12)
    assert (ours.train_denoise(x, 2.0, cond, {}) - on).abs().max() > 1e-2


def test_training_inside_inference_mode(comfy_host):
    """As in a node: the MODEL was loaded under inference mode, the training node switches it off."""
    from fixtures.tiny_comfy import build_tiny_comfy_host

    from i2vedit.hosts.comfy.lora import ComfyLoRATrainer

    latents, first, embed = smooth_clip()
    config = TrainConfig(rank=RANK, steps=3, lr=1e-2, dropout=0.1, seed=0)
    with torch.inference_mode():
        host = build_tiny_comfy_host(seed=0)
        clip = [t.clone() for t in (latents, first, embed)]
        assert all(p.is_inference() for p in host.patcher.model.parameters()) and clip[0].is_inference()
        state = base_state(host)
        trainer = ComfyLoRATrainer(host, rank=RANK, dropout=0.1)
        with torch.inference_mode(False):
            result = train_motion_lora(trainer, *clip, config)
        exported = trainer.export()
    assert_same_state(host, state)
    assert host.patcher.weight_wrapper_patches == {}
    assert all(math.isfinite(v) for v in result.losses) and len(result.losses) == 3
    assert any(p.up.any() for p in exported.values())
    # The same three steps on a MODEL made outside inference mode give the same LoRA.
    normal = train_motion_lora(
        ComfyLoRATrainer(comfy_host, rank=RANK, dropout=0.1), latents, first, embed, config
    )
    for name, pair in normal.weights.modules.items():
        torch.testing.assert_close(result.weights.modules[name].up, pair.up, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(result.weights.modules[name].down, pair.down, rtol=1e-5, atol=1e-7)


class _FixedKV:
    def __init__(self, capture) -> None:
        self.capture = capture

    def for_sigma(self, sigma):
        return self.capture


def test_gradient_checkpointing_gives_the_same_gradients(comfy_host, monkeypatch):
    from i2vedit.hosts.comfy.lora import ComfyLoRATrainer

    latents, first, embed = smooth_clip()
    config = TrainConfig(rank=RANK, steps=1, dropout=0.1)
    draws = draw_step(0, 0, tuple(latents.shape))
    # Skip-interval K/V differ per layer: the recomputation in backward must see the right layer.
    capture = AttentionController(capture={"kv"})
    capture.begin_step(0, 1)
    plain = ComfyLoRATrainer(comfy_host, rank=RANK, dropout=0.1)
    cond = SVDCond(embed, first, config.time_ids)
    plain.host.denoise(latents + draws.sigma * draws.noise, draws.sigma, [cond], {CONTROLLER_KEY: capture})
    kv = _FixedKV(capture.take())
    assert len(kv.capture.kv) == 16

    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    ckpt = ComfyLoRATrainer(comfy_host, rank=RANK, dropout=0.1, gradient_checkpointing=True)
    lora = random_lora(plain)
    losses, grads = [], []
    for trainer in (plain, ckpt):
        trainer.load(lora)
        trainer.set_dropout(True)
        torch.manual_seed(3)
        loss = objective(trainer, latents, first, embed, draws, config, kv)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: p.grad.clone() for n, p in trainer.named_trainable()})
    assert calls, "gradient checkpointing was not used"
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for name, g in grads[0].items():
        # One context token: cross-attention's softmax is 1 whatever q and k, so to_q/to_k get no gradient.
        assert (g.abs().max() > 0) != (".attn2.to_q." in name or ".attn2.to_k." in name), name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-5)
    plain.set_dropout(False)
    with torch.no_grad():
        without_kv = objective(plain, latents, first, embed, draws, config)
        with_kv = objective(plain, latents, first, embed, draws, config, kv)
    assert abs(float(without_kv) - float(with_kv)) > 1e-4  # the K/V did reach the attention


def test_divergence_raises_with_the_last_good_lora_and_a_loadable_checkpoint(comfy_host, tmp_path):
    from i2vedit.hosts.comfy.lora import ComfyLoRATrainer

    latents, first, embed = smooth_clip()
    # An absurd learning rate: one AdamW step makes U·D overflow float32 in the next forward.
    config = TrainConfig(rank=RANK, steps=4, lr=1e30, dropout=0.1, checkpoint_every=1)
    trainer = ComfyLoRATrainer(comfy_host, rank=RANK, dropout=0.1)
    with pytest.raises(LoRATrainingError) as info:
        train_motion_lora(trainer, latents, first, embed, config, checkpoint_dir=tmp_path)
    err = info.value
    assert err.step >= 1 and err.checkpoint is not None and err.checkpoint.is_file()
    assert all(
        bool(torch.isfinite(p.down).all() and torch.isfinite(p.up).all())
        for p in err.weights.modules.values()
    )
    saved = load_lora(err.checkpoint)
    assert saved.steps == err.step
    for name, pair in err.weights.modules.items():
        assert torch.equal(saved.modules[name].up, pair.up) and torch.equal(
            saved.modules[name].down, pair.down
        )
    trainer.load(saved.modules)  # the kept LoRA loads back

    # Bad data after resuming: the error keeps the resumed checkpoint's LoRA and names that file.
    good = TrainConfig(rank=RANK, steps=2, lr=1e-2, dropout=0.1, checkpoint_every=1)
    fresh = ComfyLoRATrainer(comfy_host, rank=RANK, dropout=0.1)
    (tmp_path / "ok").mkdir()
    done = train_motion_lora(fresh, latents, first, embed, good, checkpoint_dir=tmp_path / "ok")
    bad = latents.clone()
    bad[1, 0, 0, 0] = float("nan")
    resumed = ComfyLoRATrainer(comfy_host, rank=RANK, dropout=0.1)
    with pytest.raises(LoRATrainingError) as info:
        train_motion_lora(
            resumed, bad, first, embed, TrainConfig(rank=RANK, steps=4, lr=1e-2), resume_from=done.checkpoint
        )
    assert info.value.step == 2 and info.value.checkpoint == done.checkpoint
    for name, pair in info.value.weights.modules.items():
        assert torch.equal(pair.up, done.weights.modules[name].up)


def test_comfy_lora_model_names_the_keys_comfyui_did_not_load(trained, comfy_host, monkeypatch):
    import comfy.lora

    from i2vedit.hosts.comfy.lora import comfy_lora_model

    dropped = "input_blocks.1.1.time_stack.0.attn1.to_q"
    real = comfy.lora.model_lora_keys_unet

    def keymap_without_one_layer(model, key_map={}):  # noqa: B006  (ComfyUI's signature)
        out = real(model, dict(key_map))
        return {k: v for k, v in out.items() if v != f"diffusion_model.{dropped}.weight"}

    monkeypatch.setattr(comfy.lora, "model_lora_keys_unet", keymap_without_one_layer)
    with pytest.raises(LoRAError, match="did not load") as info:
        comfy_lora_model(comfy_host.patcher, trained.result.weights)
    assert f"diffusion_model.{dropped}.lora_up.weight" in str(info.value)


def test_comfy_lora_model_refuses_a_lora_that_does_not_fit(trained, comfy_host):
    from i2vedit.hosts.comfy.lora import comfy_lora_model

    name, pair = next(iter(trained.result.weights.modules.items()))
    wrong = dict(trained.result.weights.modules)
    wrong[name] = LoRAPair(torch.zeros(RANK, pair.down.shape[1] + 1), pair.up, pair.alpha)
    with pytest.raises(LoRAError):
        comfy_lora_model(comfy_host.patcher, LoRAWeights(wrong, target_set="temporal"))


def test_the_lora_branch_is_the_stock_loaders_lora_and_switched_off_exactly_the_base_model(
    trained, comfy_host, cond, x_in
):
    """One MODEL clone for the base model and every LoRA: the branch on gives what ComfyUI's stock loader
    gives for the same file; off (the base model's calls on the same clone) exactly what it gave before."""
    from i2vedit.hosts.comfy.host import ComfySVDHost
    from i2vedit.hosts.comfy.lora import comfy_lora_model

    weights = trained.result.weights
    host = ComfySVDHost(comfy_host.patcher, comfy_host.clip_vision, comfy_host.vae)

    def controlled(h, x, sigma):  # through the controlled clone, where the branch lives
        return h.denoise(x, sigma, [cond], {CONTROLLER_KEY: AttentionController(set())})

    before = [controlled(host, x_in * max(s, 1.0), s) for s in SIGMAS]
    lora_host = host.with_lora(weights)
    stock = ComfySVDHost(comfy_lora_model(comfy_host.patcher, weights))
    for sigma, plain in zip(SIGMAS, before):
        x = x_in * max(sigma, 1.0)
        ours = lora_host.denoise(x, sigma, [cond])
        ref = stock.denoise(x, sigma, [cond])
        assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max(), float((ours - ref).abs().max())
        assert (ours - plain).abs().max() > 1e-4, "the LoRA must change the model"
        assert torch.equal(controlled(host, x, sigma), plain)  # branch off on the same clone
        assert lora_host.controlled_patcher is host.controlled_patcher
    half = host.with_lora(weights, strength=0.5).denoise(x, sigma, [cond])
    assert (half - ours).abs().max() > 1e-5 and (half - plain).abs().max() > 1e-5
    assert comfy_host.patcher.patches == {} and comfy_host.patcher.object_patches == {}


def _storages(module: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def test_training_runs_the_one_unet_without_weight_wrappers(comfy_host):
    """No weight adapter or wrapper while the trainer's clone is loaded, the target linears compute with
    the base weights themselves, and every model the trainer reaches holds the one UNet's parameters."""
    import comfy.model_management

    from i2vedit.hosts.comfy.lora import ComfyLoRATrainer

    unet = comfy_host.patcher.model.diffusion_model
    base, count = _storages(unet), len(list(unet.parameters()))
    trainer = ComfyLoRATrainer(comfy_host, rank=RANK, dropout=0.1, gradient_checkpointing=True)
    targets = dict(unet.named_modules())
    linears = []

    def on_forward(module, args):
        linears.append(
            (
                list(getattr(module, "weight_function", [])) + list(getattr(module, "bias_function", [])),
                module.weight.untyped_storage().data_ptr() in base,
                torch.is_grad_enabled(),
            )
        )

    loaded = []

    def after_step(_):
        loaded.append(
            (
                any(m.model is trainer.patcher for m in comfy.model_management.current_loaded_models),
                [
                    n
                    for n, m in unet.named_modules()
                    if getattr(m, "weight_function", None) or getattr(m, "bias_function", None)
                ],
            )
        )

    hooks = [targets[n].register_forward_pre_hook(on_forward) for n in trainer.branch.shapes]
    try:
        latents, first, embed = smooth_clip()
        config = TrainConfig(rank=RANK, steps=2, lr=1e-2, dropout=0.1, seed=0, checkpoint_every=1000)
        train_motion_lora(trainer, latents, first, embed, config, callback=after_step)
    finally:
        for h in hooks:
            h.remove()
    # two steps, each a forward and the checkpointed recomputation in backward
    assert len(linears) == 2 * 2 * len(trainer.branch.shapes) == 2 * 2 * 192
    assert all(wrappers == [] and is_base and grad for wrappers, is_base, grad in linears)
    assert loaded == [(True, []), (True, [])]
    assert trainer.patcher.weight_wrapper_patches == {} and trainer.patcher.patches == {}
    for patcher in (trainer.patcher, trainer.host.patcher, trainer.host.controlled_patcher):
        assert patcher.model is comfy_host.patcher.model
    assert _storages(unet) == base and len(list(unet.parameters())) == count
    lora = _storages(torch.nn.ParameterList([p for _, p in trainer.named_trainable()]))
    assert len(lora) == 2 * 192 and not lora & base


def test_the_trainers_clone_with_the_branch_off_is_the_base_model(comfy_host, cond, x_in):
    """The trainer's host runs its one clone with the branch on; off, the same clone (checkpointing
    patches included) computes exactly what the user's MODEL computes."""
    from i2vedit.hosts.comfy.host import ComfySVDHost
    from i2vedit.hosts.comfy.lora import ComfyLoRATrainer

    latents, first, embed = smooth_clip()
    trainer = ComfyLoRATrainer(comfy_host, rank=RANK, dropout=0.1, gradient_checkpointing=True)
    config = TrainConfig(rank=RANK, steps=2, lr=1e-2, dropout=0.1, seed=0, checkpoint_every=1000)
    train_motion_lora(trainer, latents, first, embed, config)
    on_clone = ComfySVDHost(trainer.patcher, comfy_host.clip_vision, comfy_host.vae)
    for sigma in SIGMAS:
        x = x_in * max(sigma, 1.0)
        lora = trainer.host.denoise(x, sigma, [cond])
        assert trainer.branch.on and trainer.branch.dropout == 0.0
        assert torch.equal(on_clone.denoise(x, sigma, [cond]), lora)  # one clone: the same model
        base = comfy_host.denoise(x, sigma, [cond])
        assert (lora - base).abs().max() > 1e-4, "the LoRA must change the model"
        trainer.branch.on = False
        assert torch.equal(on_clone.denoise(x, sigma, [cond]), base)


def test_a_few_training_steps_give_the_diffusers_trainers_lora(comfy_host, tiny_diffusers_host, cond, x_in):
    """Both hosts train the same LoRA from one seed (same initial LoRA, draws and dropout masks): the same
    losses, the same LoRA'd model, the same weights up to AdamW's amplification of rounding noise."""
    from i2vedit.hosts.comfy.lora import ComfyLoRATrainer
    from i2vedit.hosts.diffusers.lora import DiffusersLoRATrainer

    latents, first, embed = smooth_clip()
    config = TrainConfig(rank=RANK, steps=3, lr=1e-2, dropout=0.1, seed=0, checkpoint_every=1000)
    ours_trainer = ComfyLoRATrainer(comfy_host, rank=RANK, dropout=0.1)
    ref_trainer = DiffusersLoRATrainer(align_groupnorm_eps(tiny_diffusers_host), rank=RANK, dropout=0.1)
    ours, ref = (train_motion_lora(t, latents, first, embed, config) for t in (ours_trainer, ref_trainer))
    assert ours.losses == pytest.approx(ref.losses, rel=1e-4)
    # AdamW moves an element by about lr a step whatever the size of its gradient, so an element whose
    # gradient is rounding noise (cross-attention's to_q / to_k, one context token) or changes sign
    # between steps can move differently on the two hosts (2.7 % of lr · steps here, as with ComfyUI's
    # weight wrappers before).
    worst = max(
        float((a - b).abs().max())
        for n, p in ref.weights.modules.items()
        for a, b in ((ours.weights.modules[n].down, p.down), (ours.weights.modules[n].up, p.up))
    )
    assert worst <= 0.05 * config.lr * config.steps, worst
    base = comfy_host.denoise(x_in * 2, 2.0, [cond])
    a = ours_trainer.host.denoise(x_in * 2, 2.0, [cond])
    b = ref_trainer.host.denoise(x_in * 2, 2.0, [cond])
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    assert (a - base).abs().max() > 100 * (a - b).abs().max(), "the LoRA must change the model"
