"""The ComfyUI host makes its guider, conditioning and sampler once per (MODEL clone, conditioning set)
and a LoRA trainer once per run (COMFYUI_PATH); skipped with the reason when there is none.

ComfyUI's ``CFGGuider`` is counted by a subclass that runs the real one. The reference run makes a new
session for every model call (what the host did before it kept them) and must give the same bits.
"""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

from i2vedit.lora.file import LoRAPair, LoRAWeights
from i2vedit.lora.train import TrainConfig, train_motion_lora
from i2vedit.method.controller import CONTROLLER_KEY, AttentionController
from i2vedit.method.inversion import invert
from i2vedit.method.matching import MatchedClip
from i2vedit.svd import LATENT_SCALE, SVDCond, TimeIds

pytestmark = pytest.mark.usefixtures("comfy")
F, h, w = 4, 8, 16
STEPS, TRAIN_STEPS, RANK = 3, 3, 4


def _cond(seed: int) -> SVDCond:
    g = torch.Generator().manual_seed(seed)
    return SVDCond(
        torch.randn(1, 1, 64, generator=g), torch.randn(1, 4, h, w, generator=g), TimeIds(6, 127, 0.02)
    )


@pytest.fixture
def guiders(monkeypatch):
    """Every ``CFGGuider`` ComfyUI makes from now on, with the MODEL clone and conditioning it got first,
    and how often one sampled."""
    import comfy.samplers

    seen = SimpleNamespace(made=[], samples=0)

    class CountingGuider(comfy.samplers.CFGGuider):
        def __init__(self, model_patcher):
            super().__init__(model_patcher)
            self.first_conds = None
            seen.made.append(self)

        def inner_set_conds(self, conds):
            if self.first_conds is None:  # the objects themselves: to_conditioning passes them on
                self.first_conds = tuple(
                    (k, c[0][0], c[0][1]["concat_latent_image"]) for k, c in conds.items()
                )
            super().inner_set_conds(conds)

        def sample(self, *args, **kwargs):
            seen.samples += 1
            return super().sample(*args, **kwargs)

    monkeypatch.setattr(comfy.samplers, "CFGGuider", CountingGuider)
    return seen


def _keys(made) -> list[tuple]:
    return [(id(g.model_patcher), tuple((k, id(a), id(b)) for k, a, b in g.first_conds)) for g in made]


def _clip_and_training(host, fresh_each_call: bool):
    """A clip's inversion, its matched denoising with a motion LoRA (source replayed per step, edit with
    CFG) and a short LoRA training run; ``fresh_each_call`` makes every model call build a new session."""
    from i2vedit.hosts.comfy.session import GuiderSessions

    if fresh_each_call:

        class Fresh(GuiderSessions):
            def get(self, patcher, conds):
                self.clear()
                return super().get(patcher, conds)

        host.sessions = Fresh()
    z = torch.randn(F, 4, h, w, generator=torch.Generator().manual_seed(3))
    src, edit = _cond(1), _cond(2)
    inv = invert(host, z, src, steps=STEPS)
    trainer = host.lora_trainer(rank=RANK, dropout=0.1)
    g = torch.Generator().manual_seed(5)
    lora = {
        n: LoRAPair(
            torch.randn(p.down.shape, generator=g) * 0.1, torch.randn(p.up.shape, generator=g) * 0.1, p.alpha
        )
        for n, p in trainer.export().items()
    }
    lora_host = host.with_lora(LoRAWeights(lora, target_set="temporal"))
    matched = MatchedClip(lora_host, inv, edit, source_host=host).run()
    if fresh_each_call:
        original = trainer.train_denoise

        def train_denoise(*args, **kwargs):
            trainer.session = None
            return original(*args, **kwargs)

        trainer.train_denoise = train_denoise
    config = TrainConfig(rank=RANK, steps=TRAIN_STEPS, lr=1e-2, dropout=0.1, seed=0, checkpoint_every=1000)
    trained = train_motion_lora(trainer, z, z[:1] / LATENT_SCALE, src.clip_embed, config)
    return inv, matched, trained


def test_one_guider_per_model_clone_and_conditioning_and_the_same_bits_as_one_per_call(comfy, guiders):
    from fixtures.tiny_comfy import build_tiny_comfy_host

    inv, matched, trained = _clip_and_training(build_tiny_comfy_host(seed=0), fresh_each_call=False)
    calls = STEPS + 2 * STEPS + TRAIN_STEPS  # inversion, per step source replay + edit, training
    assert guiders.samples == calls
    keys = _keys(guiders.made)
    # inversion; the LoRA's branch makes a new clone: source replay, edit with CFG; one per training run
    assert len(guiders.made) == 4 and len(set(keys)) == len(keys)
    made_here = len(guiders.made)

    ref_inv, ref_matched, ref_trained = _clip_and_training(
        build_tiny_comfy_host(seed=0), fresh_each_call=True
    )
    assert len(guiders.made) - made_here == guiders.samples - calls == calls  # the reference: one per call
    assert torch.equal(inv.trajectory, ref_inv.trajectory)
    assert torch.equal(matched.trajectory, ref_matched.trajectory)
    assert torch.equal(matched.masks, ref_matched.masks)
    assert trained.losses == ref_trained.losses and len(trained.losses) == TRAIN_STEPS
    for name, pair in trained.weights.modules.items():
        ref = ref_trained.weights.modules[name]
        assert torch.equal(pair.down, ref.down) and torch.equal(pair.up, ref.up)


def test_a_new_conditioning_object_or_clone_gets_its_own_guider_and_none_outlives_the_host(comfy, guiders):
    from fixtures.tiny_comfy import build_tiny_comfy_host

    host = build_tiny_comfy_host(seed=0)
    x = torch.randn(F, 4, h, w, generator=torch.Generator().manual_seed(6))
    cond = _cond(1)
    twin = SVDCond(cond.clip_embed.clone(), cond.concat_latent.clone(), cond.time_ids)
    first = host.denoise(x, 2.0, [cond])
    assert torch.equal(host.denoise(x, 2.0, [cond]), first) and len(guiders.made) == 1
    assert torch.equal(host.denoise(x, 2.0, [twin]), first) and len(guiders.made) == 2  # equal, not the same
    other = host.denoise(x, 2.0, [_cond(2)])
    assert len(guiders.made) == 3 and not torch.equal(other, first)
    # a controlled call runs another clone: its own guider, then reused
    opts = {CONTROLLER_KEY: AttentionController(set())}
    host.denoise(x, 2.0, [cond], opts)
    host.denoise(x, 2.0, [cond], opts)
    assert len(guiders.made) == 4 and guiders.made[-1].model_patcher is host.controlled_patcher
    for i in range(10):  # the last few are kept, older ones let go
        host.denoise(x, 2.0, [_cond(10 + i)])
    assert len(host.sessions.sessions) == host.sessions.size
    # a new LoRA branch replaces the clone: the old clone's sessions go with it
    guiders.made.clear()
    old_clone = weakref.ref(host.controlled_patcher)
    host.attach_branch(RANK, "temporal")
    host.denoise(x, 2.0, [cond], opts)
    gc.collect()
    assert old_clone() is None
    clone = weakref.ref(host.controlled_patcher)
    guiders.made.clear()
    del host
    gc.collect()
    assert clone() is None
