"""The nodes inside a real ComfyUI (COMFYUI_PATH), called in-process on the tiny SVD.

The strongest check: a graph of single-stage nodes (select clip → SARP → invert → train → match,
chained over two clips with skip-interval K/V) gives exactly the all-in-one pipeline's video.
"""

from __future__ import annotations

import pytest
import torch
from conftest import sharpen_self_attention

from i2vedit.cli import demo_video
from i2vedit.control import MatchConfig
from i2vedit.pipeline import EditSettings, edit_video
from i2vedit.stages import SEED_SARP, derived_seed, psnr

pytestmark = pytest.mark.usefixtures("comfy")

SEED, STEPS, LORA_STEPS, RANK, FPS = 7, 3, 2, 4, 8.0


@pytest.fixture(scope="module")
def tiny(comfy):
    from i2vedit.hosts.comfy_host import build_tiny_comfy_host

    return sharpen_self_attention(build_tiny_comfy_host(seed=0, with_vae=True))


@pytest.fixture(scope="module")
def video():
    frames, _ = demo_video(7, (64, 64))
    edited = frames[:1].clone()
    edited[..., 16:40, 16:40, :] = torch.tensor([0.9, 0.2, 0.1])
    return frames, edited


def run(pack, node_id: str, **kw):
    cls = next(n for n in pack.NODES if n.define_schema().node_id == node_id)
    return cls.execute(**kw).result


def node_graph(pack, tiny, frames, edited, chunk: int):
    """Both clips through the single-stage nodes, wired as the 'every stage' workflow wires them."""
    m, cv, vae = tiny.patcher, tiny.clip_vision, tiny.vae
    count = run(pack, "I2VEditSelectClip", frames=frames, clip_length=chunk, overlap=1, index=0)[1]
    kv, prev, video, masks = None, None, None, None
    for i in range(count):
        clip = run(pack, "I2VEditSelectClip", frames=frames, clip_length=chunk, overlap=1, index=i)[0]
        sarp_seed = derived_seed(SEED, i, SEED_SARP)
        perturbed = run(pack, "SARPPerturb", frames=clip, noise_scale=0.005, threshold=0.001, seed=sarp_seed)[
            0
        ]
        inv = run(pack, "EDMInvertSVD", model=m, clip_vision=cv, vae=vae, frames=perturbed, steps=STEPS,
                  memory_mode="recompute", seed=SEED, clip_index=i, skip_interval_kv=kv)[0]  # fmt: skip
        if i == 0:
            first_inv = inv
            kv_source = run(pack, "SkipIntervalKVCache", first_clip_inversion=inv)[0]
        lora = run(pack, "TrainMotionLoRA", inversion=inv, steps=LORA_STEPS, rank=RANK, learning_rate=5e-4,
                   target_set="temporal", dropout=0.1, gradient_checkpointing=False, seed=SEED,
                   skip_interval_kv=kv_source if i > 0 else None)[0]  # fmt: skip
        out, mask, _, prev = run(pack, "AttentionMatchSampler", model=m, inversion=inv, preset="local",
                                 min_cfg=1.0, max_cfg=2.0, fps=FPS, seed=SEED, edited_first_frame=edited,
                                 previous_clip=prev if i > 0 else None, lora=lora, skip_interval_kv=kv)  # fmt: skip
        if i == 0:
            kv = run(pack, "SkipIntervalKVCache", first_clip_inversion=first_inv, first_clip_edit=prev)[0]
            video, masks = out, mask
        else:
            video, masks = run(pack, "I2VEditStitchClips", first=video, second=out, overlap=1,
                               first_mask=masks, second_mask=mask)  # fmt: skip
    return video, masks, count


def test_single_stage_nodes_equal_the_pipeline_over_two_clips(pack, tiny, video):
    frames, edited = video
    chunk = 4
    settings = EditSettings(chunk=chunk, steps=STEPS, match=MatchConfig.preset("local"), lora_steps=LORA_STEPS,
                            lora_rank=RANK, seed=SEED, train_size=(64, 64))  # fmt: skip
    ref = edit_video(tiny, frames, FPS, [edited], settings)
    got, masks, count = node_graph(pack, tiny, frames, edited, chunk)
    assert count == ref.report["clips"] == 2
    assert got.shape == ref.videos[0].shape == frames.shape
    torch.testing.assert_close(got, ref.videos[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(masks, ref.masks[0], atol=1e-5, rtol=0)
    assert (got - frames).abs().mean() > 1e-3  # an edit really happened


def test_all_in_one_node_equals_the_pipeline_and_restores_size(pack, tiny, video):
    frames, edited = video
    wide = torch.nn.functional.interpolate(frames.movedim(-1, 1), size=(64, 96)).movedim(1, -1)
    out, mask, fps = run(pack, "I2VEditVideo", model=tiny.patcher, clip_vision=tiny.clip_vision, vae=tiny.vae,
                         frames=wide[:4], fps=FPS, edited_first_frame=edited, clip_length=4, steps=2,
                         preset="local", lora_steps=1, lora_rank=RANK, memory_mode="recompute", max_side=64,
                         resize_mode="pad", max_cfg=2.0, seed=SEED)  # fmt: skip
    assert out.shape == (4, 64, 96, 3) and mask.shape == (4, 64, 96) and fps == FPS


def test_inversion_check_reports_psnr_of_a_plain_euler_reconstruction(pack, tiny, video):
    import comfy.k_diffusion.sampling as kd

    from i2vedit.hosts.base import LATENT_SCALE

    frames, _ = video
    clip = frames[:4]
    state = run(pack, "EDMInvertSVD", model=tiny.patcher, clip_vision=tiny.clip_vision, vae=tiny.vae, frames=clip,
                steps=STEPS, memory_mode="recompute", seed=SEED, clip_index=0)[0]  # fmt: skip
    recon, value = run(pack, "I2VEditInversionCheck", inversion=state, source_frames=clip)
    inv = state.inversion
    # ComfyUI's own Euler sampler from x_T over the same σ, under the source conditioning, no CFG
    latents = tiny.sample(kd.sample_euler, inv.x_T, inv.denoise_sigmas(), inv.cond)
    expected = tiny.vae_decode(latents / LATENT_SCALE)
    torch.testing.assert_close(recon, expected, atol=1e-4, rtol=0)
    assert value == pytest.approx(psnr(expected, clip), abs=1e-3)


def test_fit_restore_round_trip_and_resized_edit(pack, video, caplog):
    _, edited = video
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 50), torch.linspace(0, 1, 90), indexing="ij")
    wide = torch.stack([yy, xx, yy * xx], -1).expand(3, 50, 90, 3).contiguous()  # smooth: resizing keeps it
    small_edit = edited[:, :40, :40]
    fitted, fitted_edit, plan = run(pack, "I2VEditFitFrames", frames=wide, edited_first_frame=small_edit,
                                    max_side=128, width=0, height=0, mode="pad")  # fmt: skip
    assert fitted.shape[1] % 64 == 0 and fitted.shape[2] % 64 == 0 and fitted_edit.shape == fitted[:1].shape
    assert "resizing it to the video's size" in caplog.text
    restored, mask = run(pack, "I2VEditRestoreFrames", frames=fitted, resize=plan)
    assert restored.shape == wide.shape and mask.shape == wide.shape[:3]
    assert (restored - wide).abs().max() < 0.02


def test_sample_frames_and_select_clip(pack):
    frames = torch.arange(30.0).view(30, 1, 1, 1).expand(30, 64, 64, 3) / 30
    out, fps, count = run(pack, "I2VEditSampleFrames", frames=frames, fps=30.0, start_seconds=0.5,
                          end_seconds=-1.0, sample_fps=10.0)  # fmt: skip
    assert fps == 10.0 and count == 5 and out.shape[0] == 5
    assert torch.allclose(out[:, 0, 0, 0] * 30, torch.tensor([15.0, 18, 21, 24, 27]))
    with pytest.raises(ValueError, match="clip 9 does not exist"):
        run(pack, "I2VEditSelectClip", frames=frames, clip_length=14, overlap=1, index=9)


def test_bad_inputs_are_refused_before_any_model_call(pack, tiny, video):
    from i2vedit.hosts.comfy_host import build_tiny_comfy_host

    frames, edited = video
    clip = frames[:4]
    state = run(pack, "EDMInvertSVD", model=tiny.patcher, clip_vision=tiny.clip_vision, vae=tiny.vae, frames=clip,
                steps=2, memory_mode="recompute", seed=0, clip_index=0)[0]  # fmt: skip
    kw = dict(model=tiny.patcher, inversion=state, preset="local", min_cfg=1.0, max_cfg=2.0, fps=FPS, seed=0)
    with pytest.raises(ValueError, match="pass both through 'Fit Frames"):
        run(pack, "AttentionMatchSampler", edited_first_frame=edited[:, :, :32], **kw)
    with pytest.raises(ValueError, match=r"edited_first_frame.*or previous_clip"):
        run(pack, "AttentionMatchSampler", **kw)
    other = build_tiny_comfy_host(seed=1, with_vae=False)
    with pytest.raises(ValueError, match="share base weights"):
        run(pack, "AttentionMatchSampler", **dict(kw, model=other.patcher), edited_first_frame=edited)
    with pytest.raises(ValueError, match="not a bare file name"):
        run(pack, "TrainMotionLoRA", inversion=state, steps=100000, rank=4, learning_rate=5e-4,
            target_set="temporal", dropout=0.1, gradient_checkpointing=False, seed=0, save_name="../evil")  # fmt: skip
    with pytest.raises(ValueError, match=r"multiples? of 64"):
        run(pack, "EDMInvertSVD", model=tiny.patcher, clip_vision=tiny.clip_vision, vae=tiny.vae,
            frames=clip[:, :50], steps=2, memory_mode="recompute", seed=0, clip_index=0)  # fmt: skip
    with pytest.raises(ValueError, match=r"not Stable Video Diffusion|expected a ComfyUI MODEL"):
        run(pack, "EDMInvertSVD", model=tiny.clip_vision, clip_vision=tiny.clip_vision, vae=tiny.vae,
            frames=clip, steps=2, memory_mode="recompute", seed=0, clip_index=0)  # fmt: skip


def test_lora_of_another_clip_or_model_is_refused(pack, tiny, video):
    frames, edited = video
    clip = frames[:4]
    inv0 = run(pack, "EDMInvertSVD", model=tiny.patcher, clip_vision=tiny.clip_vision, vae=tiny.vae, frames=clip,
               steps=2, memory_mode="recompute", seed=0, clip_index=0)[0]  # fmt: skip
    inv1 = run(pack, "EDMInvertSVD", model=tiny.patcher, clip_vision=tiny.clip_vision, vae=tiny.vae, frames=clip,
               steps=2, memory_mode="recompute", seed=0, clip_index=1)[0]  # fmt: skip
    lora = run(pack, "TrainMotionLoRA", inversion=inv0, steps=1, rank=4, learning_rate=5e-4, target_set="temporal",
               dropout=0.1, gradient_checkpointing=False, seed=0)[0]  # fmt: skip
    kw = dict(
        model=tiny.patcher,
        preset="local",
        min_cfg=1.0,
        max_cfg=2.0,
        fps=FPS,
        seed=0,
        edited_first_frame=edited,
    )
    with pytest.raises(ValueError, match="trained on clip 0, the inversion is of clip 1"):
        run(pack, "AttentionMatchSampler", inversion=inv1, lora=lora, **kw)
    foreign = type(lora)(**{**lora.__dict__, "model_fingerprint": "0123456789abcdef"})
    with pytest.raises(ValueError, match="trained on another model"):
        run(pack, "AttentionMatchSampler", inversion=inv0, lora=foreign, **kw)


def test_every_input_has_a_tooltip_and_every_node_one_category_root(pack):
    ids = set()
    for cls in pack.NODES:
        schema = cls.define_schema()
        ids.add(schema.node_id)
        assert schema.category.split("/")[0] == "I2VEdit" and schema.description
        for item in [*schema.inputs, *schema.outputs]:
            assert item.tooltip, f"{schema.node_id}.{item.id} has no tooltip"
    assert {
        "SARPPerturb",
        "EDMInvertSVD",
        "TrainMotionLoRA",
        "SkipIntervalKVCache",
        "AttentionMatchSampler",
    } <= ids
