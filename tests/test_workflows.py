"""The example workflows in ``example_workflows/``: UI format, consistent links, pictures, agreement with the nodes.

Without ComfyUI: every JSON parses, is the UI format the editor saves (version 0.4), its link table
agrees with the nodes' input and output slots, each has a same-name ``.jpg`` (the screenshot the
browser tier, ``tests/test_workflows_browser.py``, takes) made from its current JSON, and every
node type is a known core node or one of the pack's (read from ``nodes/*.py``, nothing imported).

With ComfyUI (``COMFYUI_PATH``): every pack node's sockets and ``widgets_values`` agree with its
registered V3 schema (in-process), every node agrees with the headless server's ``/object_info``
(core nodes included), and the server lists the workflows as the pack's templates.

``widgets_values`` follows the frontend (comfyui-frontend-package 1.27): one value per widget input
(INT, FLOAT, STRING, BOOLEAN, COMBO) in schema order, required then optional, plus the UI-only
values the frontend adds: ``control_after_generate`` after an INT named ``seed``/``noise_seed``
(unless the schema sets ``control_after_generate`` explicitly) or any input that asks for it, and
the upload button's value after a combo with ``image_upload``/``video_upload``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = ROOT / "example_workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
EXPECTED = {
    "i2vedit_single_clip_every_stage",
    "i2vedit_long_video_all_in_one",
    "i2vedit_reuse_lora_and_inversion",
    "i2vedit_region_lock_auto",
    "i2vedit_prepare_clips_parallel",
}
CORE_TYPES = {
    "ImageOnlyCheckpointLoader",
    "LoadVideo",
    "GetVideoComponents",
    "LoadImage",
    "CreateVideo",
    "SaveVideo",
    "LoraLoaderModelOnly",
}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # drawn by the editor, never sent to the server
TOP_KEYS = {
    "id",
    "revision",
    "last_node_id",
    "last_link_id",
    "nodes",
    "links",
    "groups",
    "config",
    "extra",
    "version",
}
NODE_KEYS = {
    "id",
    "type",
    "pos",
    "size",
    "flags",
    "order",
    "mode",
    "inputs",
    "outputs",
    "properties",
    "widgets_values",
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")
UPLOAD_KEYS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
# Combos whose options are the files in a folder: a fresh server has none, so only the value's form is checked.
FILE_COMBOS = {
    ("ImageOnlyCheckpointLoader", "ckpt_name"): ".safetensors",
    ("LoraLoaderModelOnly", "lora_name"): ".safetensors",
    ("LoadImage", "image"): ".png",
    ("LoadVideo", "file"): ".mp4",
    ("I2VEditLoadInversion", "name"): ".safetensors",
    ("I2VEditLoadMotionLoRA", "name"): ".safetensors",
}
# Widgets that deliberately differ from the node's default (file names, output prefixes).
NOT_DEFAULT = {*FILE_COMBOS, ("SaveVideo", "filename_prefix")}
# widgets some workflows set on purpose (the region lock's, the parallel preparation's); the rest keep defaults
WORKFLOW_CHOICES = {
    ("I2VEditVideo", "region_lock"): "mask",
    ("I2VEditVideo", "colour_anchor"): True,
    ("I2VEditVideo", "resume_name"): "shared_run",
    ("I2VEditVideo", "prepare_only"): True,
}
LORA_FILE = "motion_lora_clip000.safetensors"
INVERSION_FILE = "i2vedit_clip000.safetensors"

Spec = tuple[str, str, dict[str, Any]]  # (input name, type, options)
# How to redo the pictures after changing a workflow (the browser tier writes them).
THUMBNAIL_COMMAND = "I2VEDIT_WRITE_THUMBNAILS=1 COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/test_workflows_browser.py"


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def thumbnail_comment(workflow_json: bytes) -> bytes:
    """What a workflow's ``.jpg`` carries as its JPEG comment: the sha256 of the JSON it shows."""
    return b"i2vedit-workflow-sha256:" + hashlib.sha256(workflow_json).hexdigest().encode()


def pack_node_ids() -> set[str]:
    """The pack's node ids, read from its sources without importing anything."""
    ids: set[str] = set()
    for path in (ROOT / "nodes").glob("*.py"):
        ids.update(re.findall(r'node_id\s*=\s*"([^"]+)"', path.read_text(encoding="utf-8")))
    return ids


def by_id(wf: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {n["id"]: n for n in wf["nodes"]}


def edges(wf: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    """Links as (from type, output name, to type, input name)."""
    nodes = by_id(wf)
    return {
        (nodes[a]["type"], nodes[a]["outputs"][sa]["name"], nodes[b]["type"], nodes[b]["inputs"][sb]["name"])
        for _, a, sa, b, sb, _t in wf["links"]
    }


def nodes_of(wf: dict[str, Any], node_type: str) -> list[dict[str, Any]]:
    return [n for n in wf["nodes"] if n["type"] == node_type]


def widget(node: dict[str, Any], index: int = 0) -> Any:
    return node["widgets_values"][index]


@pytest.fixture(params=WORKFLOWS, ids=lambda p: p.stem)
def workflow(request: pytest.FixtureRequest) -> tuple[Path, dict[str, Any]]:
    return request.param, load(request.param)


# ---- without ComfyUI ---------------------------------------------------------------------------


def test_the_five_workflows_are_there() -> None:
    assert {p.stem for p in WORKFLOWS} == EXPECTED
    assert (WORKFLOW_DIR / "README.md").is_file()


def test_ui_format(workflow: tuple[Path, dict[str, Any]]) -> None:
    _, wf = workflow
    assert set(wf) >= TOP_KEYS and wf["version"] == 0.4
    assert isinstance(wf["id"], str) and wf["revision"] == 0
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)) and wf["last_node_id"] >= max(ids)
    link_ids = [lk[0] for lk in wf["links"]]
    assert len(link_ids) == len(set(link_ids)) and wf["last_link_id"] >= max(link_ids)
    assert sorted(n["order"] for n in wf["nodes"]) == list(range(len(ids)))
    for node in wf["nodes"]:
        assert set(node) >= NODE_KEYS, node["id"]
        assert (
            len(node["pos"]) == 2 and len(node["size"]) == 2 and node["size"][0] > 0 and node["size"][1] > 0
        )
        assert node["mode"] == 0 and isinstance(node["widgets_values"], list)
        if node["type"] not in FRONTEND_ONLY:
            assert node["properties"]["Node name for S&R"] == node["type"]
        for entry in node["inputs"]:
            assert {"name", "type", "link"} <= set(entry), (node["type"], entry)
            if "widget" in entry:
                assert entry["widget"] == {"name": entry["name"]}
        for slot, entry in enumerate(node["outputs"]):
            assert {"name", "type", "links"} <= set(entry) and entry.get("slot_index", slot) == slot
    for group in wf["groups"]:
        assert group["title"] and len(group["bounding"]) == 4


def test_links_agree_with_the_slots(workflow: tuple[Path, dict[str, Any]]) -> None:
    _, wf = workflow
    nodes = by_id(wf)
    table = {}
    for link in wf["links"]:
        assert len(link) == 6, link
        lid, a, sa, b, sb, kind = link
        table[lid] = link
        out, inp = nodes[a]["outputs"][sa], nodes[b]["inputs"][sb]
        assert lid in out["links"] and inp["link"] == lid, link
        assert out["type"] == kind == inp["type"], (link, out["type"], inp["type"])
        assert nodes[a]["order"] < nodes[b]["order"], link  # executes after what it reads
    for node in wf["nodes"]:  # and nothing in the slots that the table lacks
        for slot, out in enumerate(node["outputs"]):
            for lid in out["links"] or []:
                assert table[lid][1:3] == [node["id"], slot], (node["type"], lid)
        for slot, inp in enumerate(node["inputs"]):
            if inp["link"] is not None:
                assert table[inp["link"]][3:5] == [node["id"], slot], (node["type"], inp["name"])


def test_every_node_type_is_core_or_the_packs(workflow: tuple[Path, dict[str, Any]]) -> None:
    _, wf = workflow
    known = CORE_TYPES | FRONTEND_ONLY | pack_node_ids()
    assert {n["type"] for n in wf["nodes"]} <= known


def test_nodes_and_groups_do_not_overlap(workflow: tuple[Path, dict[str, Any]]) -> None:
    _, wf = workflow
    title = 30

    def hit(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    boxes = [
        (
            n["type"],
            (n["pos"][0], n["pos"][1] - title, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]),
        )
        for n in wf["nodes"]
    ]
    for i, (ta, a) in enumerate(boxes):
        for tb, b in boxes[i + 1 :]:
            assert not hit(a, b), (ta, tb)
    groups = [(g["title"], (g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
                            g["bounding"][1] + g["bounding"][3])) for g in wf["groups"]]  # fmt: skip
    for i, (ta, a) in enumerate(groups):
        for tb, b in groups[i + 1 :]:
            assert not hit(a, b), (ta, tb)


def test_jpg_next_to_it_shows_this_workflow(workflow: tuple[Path, dict[str, Any]]) -> None:
    """The template browser shows ``<name>.jpg``; it must be a screenshot of the current JSON."""
    from PIL import Image

    path, _ = workflow
    jpg = path.with_suffix(".jpg")
    assert jpg.is_file(), f"{jpg.name} missing: {THUMBNAIL_COMMAND}"
    with Image.open(jpg) as im:
        assert im.format == "JPEG" and im.width >= 1600 and im.height >= 480, (jpg.name, im.size)
        comment = im.info.get("comment")
    assert comment == thumbnail_comment(path.read_bytes()), (
        f"{jpg.name} shows an older {path.name}: {THUMBNAIL_COMMAND}"
    )
    assert not list(WORKFLOW_DIR.glob("*.png")), (
        "the pictures are .jpg now (the template browser loads only those)"
    )


def test_every_stage_workflow_wires_the_stages() -> None:
    wf = load(WORKFLOW_DIR / "i2vedit_single_clip_every_stage.json")
    expected = {
        ("ImageOnlyCheckpointLoader", "MODEL", "EDMInvertSVD", "model"),
        ("ImageOnlyCheckpointLoader", "CLIP_VISION", "EDMInvertSVD", "clip_vision"),
        ("ImageOnlyCheckpointLoader", "VAE", "EDMInvertSVD", "vae"),
        ("ImageOnlyCheckpointLoader", "MODEL", "AttentionMatchSampler", "model"),
        ("LoadVideo", "VIDEO", "GetVideoComponents", "video"),
        ("GetVideoComponents", "images", "I2VEditSampleFrames", "frames"),
        ("GetVideoComponents", "fps", "I2VEditSampleFrames", "fps"),
        ("I2VEditSampleFrames", "frames", "I2VEditFitFrames", "frames"),
        ("LoadImage", "IMAGE", "I2VEditFitFrames", "edited_first_frame"),
        ("I2VEditFitFrames", "frames", "I2VEditSelectClip", "frames"),
        ("I2VEditSelectClip", "clip", "SARPPerturb", "frames"),
        ("SARPPerturb", "frames", "EDMInvertSVD", "frames"),
        ("EDMInvertSVD", "inversion", "I2VEditInversionCheck", "inversion"),
        ("EDMInvertSVD", "inversion", "TrainMotionLoRA", "inversion"),
        ("EDMInvertSVD", "inversion", "I2VEditSaveInversion", "inversion"),
        ("TrainMotionLoRA", "lora", "I2VEditSaveMotionLoRA", "lora"),
        ("EDMInvertSVD", "inversion", "AttentionMatchSampler", "inversion"),
        ("I2VEditFitFrames", "edited_first_frame", "AttentionMatchSampler", "edited_first_frame"),
        ("TrainMotionLoRA", "lora", "AttentionMatchSampler", "lora"),
        ("AttentionMatchSampler", "frames", "I2VEditMaskPreview", "frames"),
        ("AttentionMatchSampler", "difference_mask", "I2VEditMaskPreview", "mask"),
        ("AttentionMatchSampler", "frames", "I2VEditRestoreFrames", "frames"),
        ("I2VEditFitFrames", "resize", "I2VEditRestoreFrames", "resize"),
        ("I2VEditRestoreFrames", "frames", "CreateVideo", "images"),
        ("CreateVideo", "VIDEO", "SaveVideo", "video"),
    }
    assert expected <= edges(wf), expected - edges(wf)
    assert widget(nodes_of(wf, "I2VEditSelectClip")[0], 2) == 0  # index: clip 0
    assert widget(nodes_of(wf, "ImageOnlyCheckpointLoader")[0]) == "svd_xt.safetensors"


def test_long_video_workflow_uses_the_all_in_one_node() -> None:
    wf = load(WORKFLOW_DIR / "i2vedit_long_video_all_in_one.json")
    expected = {
        ("ImageOnlyCheckpointLoader", "MODEL", "I2VEditVideo", "model"),
        ("ImageOnlyCheckpointLoader", "CLIP_VISION", "I2VEditVideo", "clip_vision"),
        ("ImageOnlyCheckpointLoader", "VAE", "I2VEditVideo", "vae"),
        ("LoadVideo", "VIDEO", "I2VEditVideo", "video"),
        ("LoadImage", "IMAGE", "I2VEditVideo", "edited_first_frame"),
        ("I2VEditVideo", "video", "SaveVideo", "video"),
        ("I2VEditVideo", "frames", "I2VEditMaskPreview", "frames"),
        ("I2VEditVideo", "difference_mask", "I2VEditMaskPreview", "mask"),
    }
    assert expected <= edges(wf), expected - edges(wf)
    (note,) = nodes_of(wf, "Note")
    assert "VideoHelperSuite" in widget(note)


def test_region_lock_workflow_feeds_the_automatic_mask_to_the_all_in_one_node() -> None:
    wf = load(WORKFLOW_DIR / "i2vedit_region_lock_auto.json")
    expected = {
        ("LoadVideo", "VIDEO", "GetVideoComponents", "video"),
        ("GetVideoComponents", "images", "I2VEditAutoRegionMask", "frames"),
        ("LoadImage", "IMAGE", "I2VEditAutoRegionMask", "edited_first_frame"),
        ("I2VEditAutoRegionMask", "region_mask", "I2VEditVideo", "region_mask"),
        ("LoadVideo", "VIDEO", "I2VEditVideo", "video"),
        ("LoadImage", "IMAGE", "I2VEditVideo", "edited_first_frame"),
        ("I2VEditVideo", "video", "SaveVideo", "video"),
        ("I2VEditVideo", "region_mask", "I2VEditMaskPreview", "mask"),
    }
    assert expected <= edges(wf), expected - edges(wf)
    (edit,) = nodes_of(wf, "I2VEditVideo")
    assert edit["widgets_values"][-4:-2] == ["mask", True]  # region_lock, colour_anchor


def test_reuse_workflow_loads_what_the_every_stage_workflow_saves() -> None:
    first = load(WORKFLOW_DIR / "i2vedit_single_clip_every_stage.json")
    wf = load(WORKFLOW_DIR / "i2vedit_reuse_lora_and_inversion.json")
    assert widget(nodes_of(first, "I2VEditSaveMotionLoRA")[0]) + ".safetensors" == LORA_FILE
    assert widget(nodes_of(first, "I2VEditSaveInversion")[0]) + ".safetensors" == INVERSION_FILE
    assert widget(nodes_of(wf, "I2VEditLoadMotionLoRA")[0]) == LORA_FILE
    assert widget(nodes_of(wf, "I2VEditLoadInversion")[0]) == INVERSION_FILE
    assert widget(nodes_of(wf, "LoraLoaderModelOnly")[0]) == "i2vedit/" + LORA_FILE
    got = edges(wf)
    assert ("I2VEditLoadMotionLoRA", "lora", "AttentionMatchSampler", "lora") in got
    assert ("I2VEditLoadInversion", "inversion", "AttentionMatchSampler", "inversion") in got
    assert ("ImageOnlyCheckpointLoader", "MODEL", "LoraLoaderModelOnly", "model") in got
    assert ("LoraLoaderModelOnly", "MODEL", "AttentionMatchSampler", "model") in got
    assert len(nodes_of(wf, "AttentionMatchSampler")) == 2
    nodes = by_id(wf)
    (stock,) = [
        nodes[b] for _, a, _sa, b, _sb, _t in wf["links"] if nodes[a]["type"] == "LoraLoaderModelOnly"
    ]
    assert stock["type"] == "AttentionMatchSampler"
    assert next(i for i in stock["inputs"] if i["name"] == "lora")["link"] is None  # the LoRA is in the MODEL
    groups = {g["title"] for g in wf["groups"]}
    assert len(groups) >= 3


def test_seeds_stay_fixed_so_requeueing_reuses_the_cache() -> None:
    """'randomize' after each run would change the seeds, so every queue would redo inversion and training."""
    controls = [
        v for p in WORKFLOWS for n in load(p)["nodes"] for v in n["widgets_values"] if v in CONTROL_VALUES
    ]
    assert controls and set(controls) == {"fixed"}


# ---- with ComfyUI ------------------------------------------------------------------------------


def frontend_widgets(inputs: list[tuple[str, str, dict[str, Any], bool]]) -> list[Spec]:
    """The widgets the frontend makes from a node's inputs (name, type, options, optional), in order."""
    out: list[Spec] = []
    for name, kind, opts, _optional in inputs:
        if kind not in WIDGET_TYPES:
            continue
        out.append((name, kind, opts))
        if opts.get("control_after_generate", kind == "INT" and name in SEED_NAMES):
            out.append(("control_after_generate", "CONTROL", {}))
        if any(opts.get(k) for k in UPLOAD_KEYS):
            out.append(("upload", "UPLOAD", {}))
    return out


def check_node(node: dict[str, Any], inputs: list[tuple[str, str, dict[str, Any], bool]],
               outputs: list[tuple[str, str]], strict_files: bool) -> None:  # fmt: skip
    """One workflow node against a node definition: sockets, linked widgets, outputs, widget values."""
    where = f"{node['type']} (node {node['id']})"
    sockets = [(n, k, opt) for n, k, _o, opt in inputs if k not in WIDGET_TYPES]
    got = [(e["name"], e["type"], e.get("shape") == 7) for e in node["inputs"] if "widget" not in e]
    assert got == sockets, f"{where}: sockets {got} != {sockets}"
    widgets = frontend_widgets(inputs)
    kinds = {n: k for n, k, _ in widgets}
    linked = [e for e in node["inputs"] if "widget" in e]
    for e in linked:
        assert kinds.get(e["name"]) == e["type"], f"{where}: linked widget {e['name']}"
    # as the frontend saves them: sockets first, then the linked widgets in widget order
    assert node["inputs"][len(sockets) :] == linked, f"{where}: linked widgets before sockets"
    names = [n for n, _k, _o in widgets]
    assert [e["name"] for e in linked] == sorted((e["name"] for e in linked), key=names.index), where
    assert [(o["name"], o["type"]) for o in node["outputs"]] == outputs, f"{where}: outputs"
    values = node["widgets_values"]
    assert len(values) == len(widgets), f"{where}: {len(values)} widget values for {[w[0] for w in widgets]}"
    for (name, kind, opts), value in zip(widgets, values):
        what = f"{where}.{name} = {value!r}"
        if kind == "CONTROL":
            assert value in CONTROL_VALUES, what
        elif kind == "UPLOAD":
            assert value == "image", what
        elif kind == "INT":
            assert isinstance(value, int) and not isinstance(value, bool), what
        elif kind == "FLOAT":
            assert isinstance(value, (int, float)) and not isinstance(value, bool), what
        elif kind == "STRING":
            assert isinstance(value, str), what
        elif kind == "BOOLEAN":
            assert isinstance(value, bool), what
        if kind in ("INT", "FLOAT"):
            assert opts.get("min", value) <= value <= opts.get("max", value), f"{what} out of range"
        if kind == "COMBO":
            file_suffix = FILE_COMBOS.get((node["type"], name))
            if file_suffix and not strict_files:
                assert isinstance(value, str) and value.endswith(file_suffix), what
            else:
                assert value in opts.get("options", []), f"{what} not among {opts.get('options')}"
        chosen = WORKFLOW_CHOICES.get((node["type"], name))
        if chosen is not None and value == chosen:
            continue
        if kind not in ("CONTROL", "UPLOAD") and (node["type"], name) not in NOT_DEFAULT:
            assert value == opts.get("default"), f"{what}: not the default {opts.get('default')!r}"


def info_inputs(entry: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], bool]]:
    """An ``/object_info`` entry's inputs as (name, type, options, optional), combo lists normalised."""
    out = []
    order = entry.get("input_order", {})
    for section in ("required", "optional"):
        specs = entry["input"].get(section, {})
        for name in order.get(section, list(specs)):
            spec = specs[name]
            opts = dict(spec[1]) if len(spec) > 1 else {}
            kind = spec[0]
            if isinstance(kind, list):  # V1 combo: the options are the type
                kind, opts["options"] = "COMBO", kind
            out.append((name, kind, opts, section == "optional"))
    return out


@contextlib.contextmanager
def placeholder_files(folder_files: dict[str, list[str]]) -> Iterator[None]:
    """Empty files in registered model folders for the duration (so file combos list them)."""
    import folder_paths

    made = []
    try:
        for folder, names in folder_files.items():
            base = folder_paths.get_folder_paths(folder)[0]
            os.makedirs(base, exist_ok=True)
            for name in names:
                path = os.path.join(base, name)
                if not os.path.exists(path):
                    open(path, "wb").close()
                    made.append(path)
        yield
    finally:
        for path in made:
            os.remove(path)


def test_pack_nodes_match_their_v3_schemas(pack) -> None:
    classes = {cls.define_schema().node_id: cls for cls in pack.NODES}
    assert set(classes) == pack_node_ids()  # the source scan sees exactly the registered nodes
    common = importlib.import_module(pack.__name__ + ".common")
    files = {common.INVERSION_FOLDER: [INVERSION_FILE], common.LORA_FOLDER: [LORA_FILE]}
    checked = set()
    with placeholder_files(files):  # the files the reuse workflow loads, as the every-stage one saves them
        for path in WORKFLOWS:
            for node in load(path)["nodes"]:
                if node["type"] not in classes:
                    continue
                schema = classes[node["type"]].define_schema()
                inputs = [(i.id, str(i.get_io_type()), i.as_dict(), bool(i.optional)) for i in schema.inputs]
                outputs = [
                    (o.display_name or str(o.get_io_type()), str(o.get_io_type())) for o in schema.outputs
                ]
                check_node(node, inputs, outputs, strict_files=True)
                checked.add(node["type"])
    assert len(checked) >= 15


def test_every_node_matches_the_servers_object_info(comfy_server) -> None:
    info = comfy_server.object_info()
    for path in WORKFLOWS:
        for node in load(path)["nodes"]:
            if node["type"] in FRONTEND_ONLY:
                assert node["type"] not in info  # a frontend node: nothing to execute
                continue
            assert node["type"] in info, f"{path.stem}: ComfyUI has no node {node['type']}"
            entry = info[node["type"]]
            if node["type"] in CORE_TYPES:
                assert not entry["python_module"].startswith("custom_nodes"), node["type"]
            else:
                assert entry["python_module"] == "custom_nodes.i2vedit", node["type"]
            outputs = list(zip(entry["output_name"], entry["output"]))
            check_node(node, info_inputs(entry), outputs, strict_files=False)


def test_server_lists_and_serves_the_workflows_as_the_packs_templates(comfy_server) -> None:
    listed = comfy_server.get("/workflow_templates")
    assert set(listed.get("i2vedit", [])) == EXPECTED, listed
    assert comfy_server.get("/api/workflow_templates") == listed
    for path in WORKFLOWS:
        assert comfy_server.get(f"/api/workflow_templates/i2vedit/{path.name}") == load(path)
        # the template browser's picture of it: <name>.jpg beside it, served as a file
        jpg = f"{comfy_server.url}/api/workflow_templates/i2vedit/{path.stem}.jpg"
        with urllib.request.urlopen(jpg, timeout=30) as resp:
            assert resp.read() == path.with_suffix(".jpg").read_bytes()


def test_prepare_clips_workflow_prepares_into_a_shared_run_folder() -> None:
    wf = load(WORKFLOW_DIR / "i2vedit_prepare_clips_parallel.json")
    expected = {
        ("LoadVideo", "VIDEO", "I2VEditVideo", "video"),
        ("LoadImage", "IMAGE", "I2VEditVideo", "edited_first_frame"),
    }
    assert expected <= edges(wf), expected - edges(wf)
    (edit,) = nodes_of(wf, "I2VEditVideo")
    assert edit["widgets_values"][-5] == "shared_run" and edit["widgets_values"][-1] is True  # prepare_only
