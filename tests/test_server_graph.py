"""Every node of the pack in API-format prompts through a real headless ComfyUI server.

One prompt wires all single-stage nodes over two clips (sample → fit → select → SARP → invert →
check/save → train/save LoRA → skip-interval K/V → attention matching → stitch → restore → mask
preview) next to the all-in-one node, on the tiny random SVD of the test nodes; a second prompt
loads what the first saved. Then: the saved LoRA through stock ``LoraLoaderModelOnly``, an
interrupt in the middle of LoRA training (the LoRA so far is rescued), and a node error that
leaves the outputs computed before it cached.

Training progress is only announced over the websocket (the pack's ProgressBar; nothing reaches
the log or HTTP), so ``ProgressWatcher`` listens there as the ComfyUI frontend does.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from comfy_server import ComfyServer, status_messages

SRC_FRAMES, SRC_FPS, SRC_W, SRC_H = 16, 16.0, 96, 64  # wider than high: Fit Frames pads to 64×64
SAMPLE_FPS, FRAMES = 8.0, 8  # Sample Frames keeps every other frame
SIZE, CLIP, STEPS, LORA_STEPS, RANK, SEED = 64, 5, 3, 2, 4, 7
LR = 1e-2  # 20× the paper's: two steps then change the tiny model's output visibly (5e-4: ≤ 1/255)
LORA, INVERSION, INTERRUPTED = "graph_motion", "graph_clip000", "interrupt_me"


def link(node: str, output: int = 0) -> list[Any]:
    return [node, output]


def base_nodes() -> dict[str, Any]:
    """The tiny SVD, the moving-square video, and its fitted first clip."""
    return {
        "svd": {"class_type": "I2VEditTest_TinySVD", "inputs": {"seed": 0, "sharpen": 3.0}},
        "src": {
            "class_type": "I2VEditTest_MovingSquare",
            "inputs": {"frames": SRC_FRAMES, "width": SRC_W, "height": SRC_H, "fps": SRC_FPS},
        },
        "sample": {
            "class_type": "I2VEditSampleFrames",
            "inputs": {
                "frames": link("src"),
                "fps": link("src", 1),
                "start_seconds": 0.0,
                "end_seconds": -1.0,
                "sample_fps": SAMPLE_FPS,
            },
        },
        "fit": {
            "class_type": "I2VEditFitFrames",
            "inputs": {
                "frames": link("sample"),
                "edited_first_frame": link("src", 2),
                "max_side": SIZE,
                "width": 0,
                "height": 0,
                "mode": "pad",
            },
        },
        "clip0": {
            "class_type": "I2VEditSelectClip",
            "inputs": {"frames": link("fit"), "clip_length": CLIP, "overlap": 1, "index": 0},
        },
    }


def invert(
    frames: list[Any], clip_index: int, seed: int = SEED, kv: list[Any] | None = None
) -> dict[str, Any]:
    inputs = {"model": link("svd"), "clip_vision": link("svd", 1), "vae": link("svd", 2), "frames": frames,
              "steps": STEPS, "memory_mode": "recompute", "seed": seed, "clip_index": clip_index}  # fmt: skip
    if kv is not None:
        inputs["skip_interval_kv"] = kv
    return {"class_type": "EDMInvertSVD", "inputs": inputs}


def sarp(frames: list[Any], seed: int) -> dict[str, Any]:
    inputs = {"frames": frames, "noise_scale": 0.005, "threshold": 0.001, "seed": seed}
    return {"class_type": "SARPPerturb", "inputs": inputs}


def train(inversion: list[Any], steps: int = LORA_STEPS, **extra: Any) -> dict[str, Any]:
    inputs = {"inversion": inversion, "steps": steps, "rank": RANK, "learning_rate": LR,
              "target_set": "temporal", "dropout": 0.1, "gradient_checkpointing": False, "seed": SEED}  # fmt: skip
    return {"class_type": "TrainMotionLoRA", "inputs": {**inputs, **extra}}


def match(model: list[Any], inversion: list[Any], **extra: Any) -> dict[str, Any]:
    inputs = {"model": model, "inversion": inversion, "preset": "local", "min_cfg": 1.0, "max_cfg": 2.0,
              "fps": SAMPLE_FPS, "seed": SEED}  # fmt: skip
    return {"class_type": "AttentionMatchSampler", "inputs": {**inputs, **extra}}


def save_image(images: list[Any], prefix: str) -> dict[str, Any]:
    return {"class_type": "SaveImage", "inputs": {"images": images, "filename_prefix": prefix}}


def load_inversion(name: str) -> dict[str, Any]:
    inputs = {"model": link("svd"), "clip_vision": link("svd", 1), "vae": link("svd", 2), "name": name}
    return {"class_type": "I2VEditLoadInversion", "inputs": inputs}


def every_node_prompt() -> dict[str, Any]:
    """15 of the pack's 18 nodes over two clips, and the all-in-one node on the same frames with the
    automatic region mask's lock.

    The other two, Load Motion LoRA and Load Inversion, need the files this prompt saves.
    """
    p = base_nodes()
    p.update({
        "clip1": {"class_type": "I2VEditSelectClip",
                  "inputs": {"frames": link("fit"), "clip_length": CLIP, "overlap": 1, "index": 1}},
        "sarp0": sarp(link("clip0"), 1),
        "sarp1": sarp(link("clip1"), 2),
        "inv0": invert(link("sarp0"), 0),
        "skip_kv": {"class_type": "SkipIntervalKVCache", "inputs": {"first_clip_inversion": link("inv0")}},
        "inv1": invert(link("sarp1"), 1, kv=link("skip_kv")),
        "check": {"class_type": "I2VEditInversionCheck",
                  "inputs": {"inversion": link("inv0"), "source_frames": link("clip0")}},
        "save_inv": {"class_type": "I2VEditSaveInversion",
                     "inputs": {"inversion": link("inv0"), "name": INVERSION, "overwrite": False}},
        "train0": train(link("save_inv"), save_name=LORA),  # through Save Inversion's pass-through output
        "save_lora": {"class_type": "I2VEditSaveMotionLoRA",
                      "inputs": {"lora": link("train0"), "name": f"{LORA}_copy", "overwrite": False}},
        "match0": match(link("svd"), link("inv0"), edited_first_frame=link("fit", 1), lora=link("save_lora")),
        "kv": {"class_type": "SkipIntervalKVCache",
               "inputs": {"first_clip_inversion": link("inv0"), "first_clip_edit": link("match0", 3)}},
        "train1": train(link("inv1"), skip_interval_kv=link("skip_kv")),
        # clip 1 on Train Motion LoRA's MODEL output (the LoRA already applied) instead of its lora input
        "match1": match(link("train1", 1), link("inv1"), previous_clip=link("match0", 3),
                        skip_interval_kv=link("kv")),
        "stitch": {"class_type": "I2VEditStitchClips",
                   "inputs": {"first": link("match0"), "second": link("match1"), "overlap": 1,
                              "first_mask": link("match0", 1), "second_mask": link("match1", 1)}},
        "restore": {"class_type": "I2VEditRestoreFrames",
                    "inputs": {"frames": link("stitch"), "resize": link("fit", 2), "mask": link("stitch", 1)}},
        "preview": {"class_type": "I2VEditMaskPreview",
                    "inputs": {"frames": link("restore"), "mask": link("restore", 1), "opacity": 0.6}},
        "save_edit": save_image(link("restore"), "graph/edit"),
        "save_clip0": save_image(link("match0"), "graph/clip0"),
        "region": {"class_type": "I2VEditAutoRegionMask",
                   "inputs": {"frames": link("sample"), "edited_first_frame": link("src", 2), "threshold": 0.1,
                              "dilate": 4}},
        "video": {"class_type": "I2VEditVideo",
                  "inputs": {"model": link("svd"), "clip_vision": link("svd", 1), "vae": link("svd", 2),
                             "frames": link("sample"), "fps": link("sample", 1),
                             "edited_first_frame": link("src", 2), "clip_length": CLIP, "steps": 2,
                             "preset": "local", "lora_steps": 1, "lora_rank": RANK, "memory_mode": "recompute",
                             "max_side": SIZE, "resize_mode": "pad", "max_cfg": 2.0, "seed": SEED,
                             "region_lock": "mask", "region_mask": link("region")}},
        "save_video": save_image(link("video"), "graph/all_in_one"),
    })  # fmt: skip
    return p


def combo_options(server: ComfyServer, node_class: str, input_name: str) -> list[str]:
    """A combo input's options as ``/object_info`` lists them (V1 ``[options, {...}]`` or V3 ``COMBO``)."""
    spec = server.object_info(node_class)["input"]["required"][input_name]
    return list(spec[0]) if isinstance(spec[0], list) else list(spec[1]["options"])


def pngs(server: ComfyServer, entry: dict[str, Any], node: str, kind: str = "output") -> list[Path]:
    items = entry["outputs"][node]["images"]
    assert {i["type"] for i in items} == {kind}
    root = server.output_dir if kind == "output" else server.base_dir / "temp"
    return [root / i["subfolder"] / i["filename"] for i in items]


def pixels(paths: list[Path]):
    import numpy as np
    from PIL import Image

    arrays = []
    for path in paths:
        with Image.open(path) as im:
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.int16))
    return np.stack(arrays)


def psnr_of(entry: dict[str, Any], node: str) -> float:
    (text,) = entry["outputs"][node]["text"]
    m = re.fullmatch(r"reconstruction PSNR (-?\d+\.\d+|inf) dB over (\d+) frames \((\d+) steps\)", text)
    assert m, text
    assert (int(m[2]), int(m[3])) == (CLIP, STEPS)
    return float(m[1])


class ProgressWatcher:
    """The server's websocket for this harness's client id (as the frontend listens); keeps JSON messages.

    ComfyUI sends ``progress`` (``value``/``max``/``node``) only over the websocket, to the client that
    queued the prompt; the harness queues with ``server.client_id``, so this connects with the same id.
    """

    def __init__(self, server: ComfyServer) -> None:
        self.url = f"ws://127.0.0.1:{server.port}/ws?clientId={server.client_id}"
        self.messages: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self._lock, self._ready, self._closing = threading.Lock(), threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="comfy-ws", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._listen())
        except BaseException as e:  # reported by progress()
            self.error = e
        finally:
            self._ready.set()

    async def _listen(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
            self._ready.set()
            while not self._closing.is_set():
                try:
                    msg = await ws.receive(timeout=0.2)
                except asyncio.TimeoutError:
                    continue
                if msg.type == aiohttp.WSMsgType.TEXT:
                    with self._lock:
                        self.messages.append(json.loads(msg.data))
                elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return  # binary messages (latent previews) are skipped

    def progress(self, prompt_id: str, node: str) -> int:
        """The highest progress value the server announced for ``node`` of ``prompt_id`` so far."""
        if self.error is not None:
            raise self.error
        with self._lock:
            values = [
                m["data"]["value"]
                for m in self.messages
                if m.get("type") == "progress"
                and m["data"].get("prompt_id") == prompt_id
                and m["data"].get("node") == node
            ]
        return max(values, default=0)

    def __enter__(self) -> ProgressWatcher:
        self._thread.start()
        assert self._ready.wait(10), "the websocket did not connect"
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def graph(comfy_server: ComfyServer) -> dict[str, Any]:
    """The every-node prompt run once (with the combo options before it), for the tests below."""
    before = {
        "lora": combo_options(comfy_server, "I2VEditLoadMotionLoRA", "name"),
        "inversion": combo_options(comfy_server, "I2VEditLoadInversion", "name"),
        "stock": combo_options(comfy_server, "LoraLoaderModelOnly", "lora_name"),
    }
    return {"entry": comfy_server.run(every_node_prompt(), timeout=300), "before": before}


def test_every_node_runs_through_the_server(comfy_server: ComfyServer, graph: dict[str, Any]) -> None:
    entry = graph["entry"]
    prompt = every_node_prompt()
    info = comfy_server.object_info()
    pack_nodes = {k for k, v in info.items() if v["python_module"] == "custom_nodes.i2vedit"}
    assert len(pack_nodes) == 18
    used = {n["class_type"] for n in prompt.values()}
    assert pack_nodes - used == {"I2VEditLoadMotionLoRA", "I2VEditLoadInversion"}  # the second prompt's
    msgs = status_messages(entry)
    assert "execution_success" in msgs and "execution_error" not in msgs
    assert not set(msgs["execution_cached"]["nodes"]) - {"svd", "src"}  # the pack's nodes really ran

    loras = comfy_server.models_dir / "loras" / "i2vedit"
    inversions = comfy_server.models_dir / "i2vedit_inversions"
    assert sorted(p.name for p in loras.iterdir()) == [f"{LORA}.safetensors", f"{LORA}_copy.safetensors"]
    assert sorted(p.name for p in inversions.iterdir()) == [f"{INVERSION}.safetensors"]
    from i2vedit.lora.file import load_lora

    for name in (LORA, f"{LORA}_copy"):
        lora = load_lora(loras / f"{name}.safetensors")
        made = (lora.steps, lora.rank, lora.clip_index, lora.resolution)
        assert made == (LORA_STEPS, RANK, 0, (SIZE, SIZE))

    # UI: the reconstruction check's PSNR, the savers' and the trainer's texts
    assert psnr_of(entry, "check") > 0
    (saved,) = entry["outputs"]["save_inv"]["text"]
    assert saved == f"saved {inversions / INVERSION}.safetensors"
    assert entry["outputs"]["save_lora"]["text"] == [f"saved {loras / LORA}_copy.safetensors"]
    (trained,) = entry["outputs"]["train0"]["text"]
    assert trained.startswith(f"trained {LORA_STEPS} steps; loss ")
    assert trained.endswith(f"; saved {loras / LORA}.safetensors")
    assert "clips of 8 frames at 64×64" in entry["outputs"]["video"]["text"][0]

    # images: restored to the source's 96×64 (Fit Frames padded it to 64×64), the mask overlay as previews
    for node, kind, count in (("save_edit", "output", FRAMES), ("save_video", "output", FRAMES),
                              ("preview", "temp", FRAMES), ("save_clip0", "output", CLIP)):  # fmt: skip
        files = pngs(comfy_server, entry, node, kind)
        assert len(files) == count and all(f.is_file() for f in files), node
        size = (SIZE, SIZE) if node == "save_clip0" else (SRC_H, SRC_W)
        assert pixels(files).shape == (count, *size, 3), node
    edit = pixels(pngs(comfy_server, entry, "save_edit"))
    overlay = pixels(pngs(comfy_server, entry, "preview", "temp"))
    assert (overlay != edit).any()  # some pixels were marked as edited (red)
    assert set(comfy_server.output_files(entry)) >= set(pngs(comfy_server, entry, "save_video"))


def test_saved_files_are_listed_and_load_in_a_second_prompt(comfy_server: ComfyServer, graph) -> None:
    # The Load nodes' options are read from the folders whenever the schema is built (each /object_info
    # and each validation; folder_paths re-lists a folder when its mtime changes), so no restart is needed.
    before = graph["before"]
    assert f"{LORA}.safetensors" not in before["lora"]
    assert f"{INVERSION}.safetensors" not in before["inversion"]
    assert f"i2vedit/{LORA}.safetensors" not in before["stock"]
    assert combo_options(comfy_server, "I2VEditLoadMotionLoRA", "name") == [
        f"{LORA}.safetensors",
        f"{LORA}_copy.safetensors",
    ]
    assert combo_options(comfy_server, "I2VEditLoadInversion", "name") == [f"{INVERSION}.safetensors"]
    assert f"i2vedit/{LORA}.safetensors" in combo_options(comfy_server, "LoraLoaderModelOnly", "lora_name")

    p = base_nodes()
    p.update({
        "load_inv": load_inversion(f"{INVERSION}.safetensors"),
        "load_lora": {"class_type": "I2VEditLoadMotionLoRA", "inputs": {"name": f"{LORA}_copy.safetensors"}},
        "check": {"class_type": "I2VEditInversionCheck",
                  "inputs": {"inversion": link("load_inv"), "source_frames": link("clip0")}},
        "match0": match(link("svd"), link("load_inv"), edited_first_frame=link("fit", 1), lora=link("load_lora")),
        "save_clip0": save_image(link("match0"), "graph/clip0_loaded"),
    })  # fmt: skip
    entry = comfy_server.run(p, timeout=120)
    assert psnr_of(entry, "check") == pytest.approx(psnr_of(graph["entry"], "check"), abs=0.01)
    # the loaded inversion and LoRA give the first prompt's clip 0 again
    first = pixels(pngs(comfy_server, graph["entry"], "save_clip0"))
    again = pixels(pngs(comfy_server, entry, "save_clip0"))
    assert abs(again - first).max() <= 1


def test_saved_lora_loads_through_stock_lora_loader(comfy_server: ComfyServer, graph) -> None:
    log_start = len(comfy_server.log())
    p = base_nodes()
    p.update({
        "load_inv": load_inversion(f"{INVERSION}.safetensors"),
        "stock_lora": {"class_type": "LoraLoaderModelOnly",
                       "inputs": {"model": link("svd"), "lora_name": f"i2vedit/{LORA}.safetensors",
                                  "strength_model": 1.0}},
        "match0": match(link("stock_lora"), link("load_inv"), edited_first_frame=link("fit", 1)),
        "save_clip0": save_image(link("match0"), "graph/clip0_stock_lora"),
        "match_bare": match(link("svd"), link("load_inv"), edited_first_frame=link("fit", 1)),
        "save_bare": save_image(link("match_bare"), "graph/clip0_bare"),
    })  # fmt: skip
    entry = comfy_server.run(p, timeout=120)
    log = comfy_server.log()[log_start:]
    assert "lora key not loaded" not in log.lower(), log
    # the stock loader applies the LoRA as the node's own lora input did (first prompt's clip 0) ...
    first = pixels(pngs(comfy_server, graph["entry"], "save_clip0"))
    assert abs(pixels(pngs(comfy_server, entry, "save_clip0")) - first).max() <= 1
    # ... and that LoRA really matters: without it the clip comes out visibly different
    assert abs(pixels(pngs(comfy_server, entry, "save_bare")) - first).max() > 4


def interrupt_prompt(steps: int) -> dict[str, Any]:
    return {
        "svd": base_nodes()["svd"],
        "load_inv": load_inversion(f"{INVERSION}.safetensors"),
        "train": train(link("load_inv"), steps=steps, save_name=INTERRUPTED, learning_rate=5e-4),
        "save": {"class_type": "I2VEditSaveMotionLoRA",
                 "inputs": {"lora": link("train"), "name": f"{INTERRUPTED}_copy", "overwrite": False}},
    }  # fmt: skip


def test_interrupt_during_training_keeps_the_lora_so_far(comfy_server: ComfyServer, graph) -> None:
    from i2vedit.lora.file import load_lora

    loras = comfy_server.models_dir / "loras" / "i2vedit"
    huge = 100_000
    with ProgressWatcher(comfy_server) as ws:
        prompt_id = comfy_server.queue(interrupt_prompt(huge))
        deadline = time.monotonic() + 60
        while ws.progress(prompt_id, "train") < 2:  # two training steps done: training is under way
            assert time.monotonic() < deadline, comfy_server.log_tail()
            assert comfy_server.history(prompt_id) is None, "training ended before the interrupt"
            time.sleep(0.05)
        assert comfy_server.running_prompt_ids() == [prompt_id]
        seen = ws.progress(prompt_id, "train")
        t0 = time.monotonic()
        comfy_server.interrupt(prompt_id)
        entry = comfy_server.wait(prompt_id, timeout=15)
        latency = time.monotonic() - t0
    assert latency < 5.0
    assert entry["status"]["status_str"] == "error"
    msgs = status_messages(entry)
    assert "execution_error" not in msgs
    assert msgs["execution_interrupted"]["node_type"] == "TrainMotionLoRA"
    assert msgs["execution_interrupted"]["node_id"] == "train"

    rescued = sorted(loras.glob(f"{INTERRUPTED}_interrupted_step*_*.safetensors"))
    assert len(rescued) == 1, sorted(p.name for p in loras.iterdir())
    steps = int(re.search(r"_step(\d+)_", rescued[0].name)[1])
    assert seen <= steps < huge
    lora = load_lora(rescued[0])
    assert (lora.steps, lora.rank, lora.clip_index) == (steps, RANK, 0)
    assert not (loras / f"{INTERRUPTED}.safetensors").exists()  # the finished-LoRA name stays free
    assert not (loras / f"{INTERRUPTED}_copy.safetensors").exists()
    assert f"training interrupted at step {steps}" in comfy_server.log()

    # the server goes on: the same training, short, runs to the end (the interrupt flag was cleared)
    assert comfy_server.running_prompt_ids() == []
    after = comfy_server.run(interrupt_prompt(1), timeout=60)
    assert "execution_success" in status_messages(after)
    assert load_lora(loras / f"{INTERRUPTED}.safetensors").steps == 1


def test_node_error_reports_the_message_and_keeps_earlier_outputs_cached(comfy_server: ComfyServer) -> None:
    def prompt(edited: list[Any]) -> dict[str, Any]:
        p = base_nodes()
        p.update({
            "sarp0": sarp(link("clip0"), 11),
            "inv0": invert(link("sarp0"), 0, seed=11),  # a seed no other test uses: computed here first
            "match0": match(link("svd"), link("inv0"), edited_first_frame=edited),
            "preview": {"class_type": "I2VEditMaskPreview",
                        "inputs": {"frames": link("match0"), "mask": link("match0", 1), "opacity": 0.5}},
        })  # fmt: skip
        return p

    entry = comfy_server.wait(comfy_server.queue(prompt(link("src", 2))), timeout=120)  # 64×96, clip 64×64
    assert entry["status"]["status_str"] == "error"
    msgs = status_messages(entry)
    err = msgs["execution_error"]
    assert (err["node_id"], err["node_type"]) == ("match0", "AttentionMatchSampler")
    assert err["exception_type"].endswith("I2VEditError")
    assert err["exception_message"].startswith(
        f"the edited first frame is {SRC_H}×{SRC_W}, the clip {SIZE}×{SIZE}; pass both through 'Fit Frames (I2VEdit)'."
    )
    assert {"inv0", "sarp0", "clip0"} <= set(err["executed"])  # computed in this prompt, before the error
    assert "inv0" not in msgs["execution_cached"]["nodes"]

    fixed = comfy_server.run(prompt(link("fit", 1)), timeout=120)  # the edited frame through Fit Frames
    cached = set(status_messages(fixed)["execution_cached"]["nodes"])
    assert cached == {"svd", "src", "sample", "fit", "clip0", "sarp0", "inv0"}
    assert len(fixed["outputs"]["preview"]["images"]) == CLIP
