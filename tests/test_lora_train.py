"""Motion LoRA training: host-free parts, and the diffusers host (a LoRA branch on its one UNet)."""

from __future__ import annotations

import pytest
import torch
from conftest import unet_count

from i2vedit.errors import I2VEditError, LoRAError
from i2vedit.hosts.diffusers.lora import DiffusersLoRATrainer
from i2vedit.hosts.diffusers.tiny import build_tiny_diffusers_host
from i2vedit.lora.file import load_lora, save_lora
from i2vedit.lora.train import (
    LoRATrainingError,
    TrainConfig,
    draw_step,
    evaluate_objective,
    train_motion_lora,
    training_sigma,
    training_size,
)

F, H, W = 4, 8, 16


def clip_latents():
    """A smooth moving pattern: something a temporal LoRA can fit."""
    yy, xx = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    frames = [
        torch.stack([torch.sin(xx / 3 + f * 0.8 + c) * torch.cos(yy / 4 - c) for c in range(4)])
        for f in range(F)
    ]
    z = torch.stack(frames)
    return z, z[:1] / 0.18215, torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def host():
    return build_tiny_diffusers_host(seed=0)


def test_training_sigma_follows_the_cosine_interpolated_sampler():
    u = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    got = training_sigma(u)
    expected = torch.tensor([700.0, 5.9, 2.03, 0.71, 0.25, 0.087, 0.002])  # method.md §5.4 quantiles
    assert torch.allclose(got, expected, rtol=0.03)
    assert bool((got[1:] < got[:-1]).all())


def test_step_draws_are_seeded_per_step():
    a, b = draw_step(3, 5, (F, 4, H, W)), draw_step(3, 5, (F, 4, H, W))
    assert a.sigma == b.sigma and torch.equal(a.noise, b.noise) and torch.equal(a.cond_noise, b.cond_noise)
    c = draw_step(3, 6, (F, 4, H, W))
    assert not torch.equal(a.noise, c.noise)
    assert a.cond_noise.shape == (1, 4, H, W)


@pytest.mark.parametrize(
    ("size", "expected"), [((576, 1024), (512, 896)), ((1024, 576), (896, 512)), ((512, 512), (704, 704))]
)
def test_training_size_keeps_the_aspect_near_512x896_pixels(size, expected):
    assert training_size(*size) == expected


@pytest.mark.parametrize(
    ("kw", "needle"),
    [({"rank": 0}, "rank"), ({"steps": 0}, "at least 1 step"), ({"dropout": 1.0}, "dropout"),
     ({"lr": 0.0}, "learning rate"), ({"target_set": "spatial"}, "spatial")],
)  # fmt: skip
def test_bad_training_settings_are_refused(kw, needle):
    with pytest.raises(I2VEditError) as e:
        TrainConfig(**kw).validate()
    assert needle in str(e.value)


def test_a_rank_larger_than_a_layer_is_refused(host):
    with pytest.raises(I2VEditError, match="rank"):
        DiffusersLoRATrainer(host, rank=10_000)


def _cfg(**kw):
    base = {"rank": 8, "steps": 4, "lr": 1e-2, "checkpoint_every": 2}
    return TrainConfig(**{**base, **kw})


def test_the_objective_falls_and_the_base_model_is_untouched(host):
    before = {k: v.clone() for k, v in host.unet.state_dict().items()}
    z, first, emb = clip_latents()
    trainer = DiffusersLoRATrainer(host, rank=8)
    cfg = _cfg(steps=40)
    draws = [draw_step(123, i, tuple(z.shape)) for i in range(8)]
    start = evaluate_objective(trainer, z, first, emb, cfg, draws)
    result = train_motion_lora(trainer, z, first, emb, cfg)
    end = evaluate_objective(trainer, z, first, emb, cfg, draws)
    print(f"\nobjective before {start:.4f} after {end:.4f}")
    assert end < 0.93 * start
    assert result.steps_done == 40 and len(result.weights.modules) == 192
    after = host.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_save_then_load_gives_the_same_model_output(host, tmp_path):
    z, first, emb = clip_latents()
    trainer = DiffusersLoRATrainer(host, rank=8)
    result = train_motion_lora(trainer, z, first, emb, _cfg(steps=3))
    path = save_lora(tmp_path / "clip0.safetensors", result.weights)
    loaded = load_lora(path)
    assert loaded.steps == 3 and loaded.rank == 8 and loaded.target_set == "temporal"
    fresh = host.with_lora(loaded)
    trainer.set_dropout(False)
    cond = trainer_cond(first, emb)
    x = torch.randn(F, 4, H, W, generator=torch.Generator().manual_seed(2))
    live = trainer.host.denoise(x, 1.5, [cond])
    assert (fresh.denoise(x, 1.5, [cond]) - live).abs().max() < 1e-6
    assert (host.denoise(x, 1.5, [cond]) - live).abs().max() > 1e-4, "the LoRA must change the model"


def test_gradient_checkpointing_trains_the_same_lora(host):
    z, first, emb = clip_latents()
    runs = [
        train_motion_lora(DiffusersLoRATrainer(host, rank=8, gradient_checkpointing=on), z, first, emb,
                          _cfg(steps=3, dropout=0.1)).weights  # dropout: the recompute draws the same masks
        for on in (False, True)
    ]  # fmt: skip
    plain, checkpointed = (w.modules for w in runs)
    assert set(plain) == set(checkpointed)
    assert all(torch.equal(plain[k][i], checkpointed[k][i]) for k in plain for i in (0, 1))
    assert any(not torch.equal(plain[k][1], torch.zeros_like(plain[k][1])) for k in plain), "it trained"


def trainer_cond(first, emb):
    from i2vedit.lora.train import TRAIN_TIME_IDS
    from i2vedit.svd import SVDCond

    return SVDCond(emb, first, TRAIN_TIME_IDS)


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(host, tmp_path):
    z, first, emb = clip_latents()
    full = train_motion_lora(
        DiffusersLoRATrainer(host, rank=8), z, first, emb, _cfg(), checkpoint_dir=tmp_path
    )
    ckpt = tmp_path / "checkpoint-00002.safetensors"
    assert ckpt.is_file() and (tmp_path / "checkpoint-00004.safetensors").is_file()
    resumed = train_motion_lora(DiffusersLoRATrainer(host, rank=8), z, first, emb, _cfg(), resume_from=ckpt)
    assert resumed.steps_done == 4 and len(resumed.losses) == 2
    assert resumed.losses == full.losses[2:]
    for name, pair in full.weights.modules.items():
        other = resumed.weights.modules[name]
        assert torch.equal(pair.down, other.down) and torch.equal(pair.up, other.up)


def test_an_interrupt_between_steps_returns_the_lora_trained_so_far(host):
    z, first, emb = clip_latents()
    seen = []
    result = train_motion_lora(
        DiffusersLoRATrainer(host, rank=8), z, first, emb, _cfg(steps=10),
        callback=lambda info: seen.append(info["step"]), should_stop=lambda: len(seen) >= 2,
    )  # fmt: skip
    assert result.interrupted and result.steps_done == 2 and result.weights.steps == 2
    two = train_motion_lora(DiffusersLoRATrainer(host, rank=8), z, first, emb, _cfg(steps=2))
    name = next(iter(two.weights.modules))
    assert torch.equal(two.weights.modules[name].down, result.weights.modules[name].down)


def test_a_forced_nan_stops_training_and_the_last_good_checkpoint_survives(host, tmp_path):
    z, first, emb = clip_latents()
    good = train_motion_lora(
        DiffusersLoRATrainer(host, rank=8),
        z,
        first,
        emb,
        _cfg(steps=2, checkpoint_every=1),
        checkpoint_dir=tmp_path,
    )
    ckpt = tmp_path / "checkpoint-00002.safetensors"
    poisoned = z.clone()
    poisoned[1, 0, 2, 3] = float("nan")
    with pytest.raises(LoRATrainingError) as e:
        train_motion_lora(
            DiffusersLoRATrainer(host, rank=8), poisoned, first, emb, _cfg(steps=5, checkpoint_every=1),
            checkpoint_dir=tmp_path, resume_from=ckpt,
        )  # fmt: skip
    err = e.value
    assert "step 3 of 5" in str(err) and "lower learning rate" in str(err)
    assert err.checkpoint == ckpt and err.step == 2
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.safetensors") if "optim" not in p.name) == [
        "checkpoint-00001.safetensors", "checkpoint-00002.safetensors"
    ]  # fmt: skip
    survived = load_lora(ckpt)
    for name, pair in good.weights.modules.items():
        assert torch.equal(survived.modules[name].up, pair.up)
        assert torch.equal(err.weights.modules[name].up, pair.up)
        assert bool(torch.isfinite(err.weights.modules[name].down).all())


def test_a_lora_from_another_model_or_target_set_is_refused_with_the_keys(host, tmp_path):
    z, first, emb = clip_latents()
    attn_only = train_motion_lora(
        DiffusersLoRATrainer(host, rank=4, target_set="temporal_attention"), z, first, emb,
        _cfg(rank=4, steps=1, target_set="temporal_attention"),
    )  # fmt: skip
    assert len(attn_only.weights.modules) == 128
    loaded = load_lora(save_lora(tmp_path / "attn.safetensors", attn_only.weights))
    assert loaded.target_set == "temporal_attention"
    assert host.with_lora(loaded) is not None  # fits its own target set
    wide = build_tiny_diffusers_host(seed=0)
    from diffusers import UNetSpatioTemporalConditionModel

    from i2vedit.hosts.diffusers.host import DiffusersSVDHost
    from i2vedit.hosts.diffusers.tiny import tiny_unet_config

    cfg = tiny_unet_config()
    cfg["block_out_channels"] = tuple(2 * c for c in cfg["block_out_channels"])
    other = DiffusersSVDHost(UNetSpatioTemporalConditionModel(**cfg), wide.vae, wide.image_encoder)
    with pytest.raises(LoRAError) as e:
        other.with_lora(loaded)
    assert "time_stack" in str(e.value)


def test_a_kv_source_of_another_model_is_refused_before_the_first_step(host):
    """The check compared the K/V source's fingerprint with itself, so any model's K/V were accepted."""
    from i2vedit.method.inversion import invert
    from i2vedit.method.skip_interval import SourceKV
    from i2vedit.svd import SVDCond, TimeIds

    z, first, emb = clip_latents()
    other = build_tiny_diffusers_host(seed=7)
    source = SourceKV(other, invert(other, z, SVDCond(emb, first, TimeIds(7, 127, 0.02)), steps=2))
    trainer = DiffusersLoRATrainer(host, rank=4)
    calls = []
    original = trainer.train_denoise
    trainer.train_denoise = lambda *a, **k: calls.append(1) or original(*a, **k)
    with pytest.raises(I2VEditError, match="another model"):
        train_motion_lora(trainer, z, first, emb, _cfg(steps=2), skip_kv=source)
    assert calls == []


def test_trainers_and_lora_hosts_of_one_host_share_its_one_unet():
    """No UNet copy at all: the base model, every trainer and every LoRA host run the user's UNet, the LoRA a
    branch switched per call; with the branch off the base model is exactly what it was before any LoRA."""
    base = build_tiny_diffusers_host(seed=0)

    before = unet_count()
    z, first, emb = clip_latents()
    cond = trainer_cond(first, emb)
    x = torch.randn(F, 4, H, W, generator=torch.Generator().manual_seed(2))
    plain = base.denoise(x, 1.5, [cond])
    state = {k: v.clone() for k, v in base.unet.state_dict().items()}
    w1 = train_motion_lora(
        DiffusersLoRATrainer(base, rank=4, init_seed=1), z, first, emb, _cfg(steps=2)
    ).weights
    w2 = train_motion_lora(
        DiffusersLoRATrainer(base, rank=4, init_seed=2), z, first, emb, _cfg(steps=2)
    ).weights
    h1, h2 = base.with_lora(w1), base.with_lora(w2)
    outs = [h.denoise(x, 1.5, [cond]) for h in (h1, h2, h1, h2)]
    assert unet_count() == before
    assert torch.equal(base.denoise(x, 1.5, [cond]), plain), "branch off: exactly the base model"
    after = base.unet.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
    assert (outs[0] - outs[1]).abs().max() > 1e-5, "two LoRAs must give two models"
    # each equals the same LoRA on a host of its own
    alone = build_tiny_diffusers_host(seed=0)
    assert torch.equal(alone.with_lora(w1).denoise(x, 1.5, [cond]), outs[0])
    # a trainer on a used branch starts from the same LoRA as on a fresh one
    reused = DiffusersLoRATrainer(base, rank=4, init_seed=5).export()
    fresh = DiffusersLoRATrainer(build_tiny_diffusers_host(seed=0), rank=4, init_seed=5).export()
    assert all(
        torch.equal(reused[n].down, fresh[n].down) and torch.equal(reused[n].up, fresh[n].up) for n in fresh
    )
    # a LoRA host that runs while a trainer trains takes the branch over: the trainer refuses to go on
    trainer = DiffusersLoRATrainer(base, rank=4)
    h1.denoise(x, 1.5, [cond])
    with pytest.raises(I2VEditError, match="ran while this LoRA was training"):
        train_motion_lora(trainer, z, first, emb, _cfg(steps=1))


def test_a_lora_host_follows_in_place_changes_of_the_base_weights():
    base = build_tiny_diffusers_host(seed=0)
    z, first, emb = clip_latents()
    w = train_motion_lora(DiffusersLoRATrainer(base, rank=4), z, first, emb, _cfg(steps=1)).weights
    cond = trainer_cond(first, emb)
    x = torch.randn(F, 4, H, W, generator=torch.Generator().manual_seed(2))
    before = base.with_lora(w).denoise(x, 1.5, [cond])
    with torch.no_grad():
        base.unet.conv_in.weight.mul_(1.5)
    after = base.with_lora(w).denoise(x, 1.5, [cond])
    assert (after - before).abs().max() > 1e-4


def test_the_initial_lora_is_the_one_peft_draws():
    """``init_lora_pairs`` replays peft's own initialisation (the authors' trainer is peft's), layer for layer."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    from i2vedit.lora.peft_init import init_lora_pairs
    from i2vedit.lora.targets import target_shapes, to_comfy_name

    unet = copy.deepcopy(build_tiny_diffusers_host(seed=0).unet)
    shapes = target_shapes(unet, "temporal", "diffusers")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=sorted(shapes), init_lora_weights="gaussian")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        inject_adapter_in_model(config, unet)
    modules = dict(unet.named_modules())
    ours = init_lora_pairs({to_comfy_name(n): s for n, s in shapes.items()}, 4, seed=7)
    assert len(ours) == len(shapes) > 0
    for name in shapes:
        layer, pair = modules[name], ours[to_comfy_name(name)]
        assert torch.equal(layer.lora_A["default"].weight, pair.down)
        assert torch.equal(layer.lora_B["default"].weight, pair.up)


def test_a_lora_of_another_rank_is_refused_not_broadcast():
    """Rank-1 matrices copied into a rank-4 branch broadcast silently (a repeated LoRA); now a clear error."""
    from i2vedit.lora.file import LoRAPair

    trainer = DiffusersLoRATrainer(build_tiny_diffusers_host(seed=0), rank=4)
    rank1 = {n: LoRAPair(p.down[:1].clone(), p.up[:, :1].clone(), 1.0) for n, p in trainer.export().items()}
    before = trainer.export()
    with pytest.raises(LoRAError, match=r"has down \(1, \d+\) / up \(\d+, 1\).*rank or model differ"):
        trainer.load(rank1)
    after = trainer.export()
    assert all(
        torch.equal(after[n].down, before[n].down) and torch.equal(after[n].up, before[n].up) for n in before
    )
