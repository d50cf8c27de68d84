"""The example workflows in the real ComfyUI frontend, in a headless Chromium (the browser tier).

A headless ComfyUI server of its own (``tests/comfy_server.py``, the pack in ``custom_nodes/``)
serves its frontend (``comfyui-frontend-package``, 1.27.10 with ComfyUI 0.3.64) to Debian's
Chromium, driven by Python ``playwright`` through ``executable_path`` (never ``playwright install``:
no downloaded browser). Each workflow in ``example_workflows/`` is loaded the way *Workflow → Open*
loads a JSON file (``app.loadGraphData(json, true, true, name)`` in the page), and then:

- every node type it uses is registered in the frontend (``LiteGraph.registered_node_types``, the
  test the frontend's missing-nodes dialog makes) and no dialog opened (missing nodes or models);
- the page logged no console error and threw no page error, except the stock frontend's own noise
  on a fresh, offline profile (``FRONTEND_NOISE``, matched by exact text);
- the graph has as many nodes and links as the file, each link joining the same slots, and the
  widget values the file gives;
- no two nodes' bounding boxes (title bar included, as the frontend measures them) overlap.

The same run screenshots each loaded workflow (focus mode, view fitted to the graph) as a JPEG: the
template browser shows ``example_workflows/<name>.jpg`` as the workflow's picture, and the READMEs
show them. The screenshots go to pytest's temporary folder, so a test run leaves the checkout
clean; with ``I2VEDIT_WRITE_THUMBNAILS=1`` they replace the ``.jpg`` files next to the workflows.
Each ``.jpg`` carries the sha256 of the JSON it shows in its JPEG comment, and
``tests/test_workflows.py`` (no browser needed) fails when a workflow changed after its picture.
Regenerate them with ``THUMBNAIL_COMMAND`` (``tests/test_workflows.py``).

The tier needs ``COMFYUI_PATH`` (like every ComfyUI test), the ``playwright`` package and a Chromium
(``/usr/bin/chromium`` or ``I2VEDIT_CHROMIUM``); it skips saying which is missing. CI fails on such
a skip (``.ci/run``).
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from comfy_server import ComfyServer, ComfyServerError
from conftest import COMFY_SKIP
from test_workflows import WORKFLOW_DIR, WORKFLOWS, thumbnail_comment

CHROMIUM = os.environ.get("I2VEDIT_CHROMIUM", "/usr/bin/chromium")
# The launch flags of the issue: headless, no sandbox (CI runs as root), nothing that reaches the network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1920, "height": 1080}
JPEG_QUALITY = 85
SHOT_MARGIN = 24  # graph units around the nodes and groups in a screenshot
WRITE_THUMBNAILS = os.environ.get("I2VEDIT_WRITE_THUMBNAILS") == "1"
BROWSER_SKIP = "browser tier: needs"  # every skip reason of this tier starts so (.ci/run greps for it)

# The user's settings the server starts with (user/default/comfy.settings.json): a user who has seen
# the first-start template dialog (it would cover the graph), and a canvas without the minimap, the
# statistics overlay and the zoom buttons, so the screenshots show only the graph, drawn in full
# detail at any zoom (no low-quality rendering of small text).
SETTINGS = {
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Graph.CanvasMenu": False,
}

# What the stock frontend 1.27.10 logs on a fresh profile of an offline server, with or without this
# pack: (kind, exact text, where). Anything else is an error of the test.
FRONTEND_NOISE = {
    # Chromium's own request for /favicon.ico, which ComfyUI does not serve (the page names its icon).
    (
        "error",
        "Failed to load resource: the server responded with a status of 404 (Not Found)",
        "/favicon.ico",
    ),
    # Optional files a fresh server lacks, which the frontend asks for at every start and on every
    # workflow load: the user's stylesheet, the user's saved workflows and subgraphs (folders not
    # made until something is saved), and the template browser's saved state. Chromium logs each 404
    # as this console error; its location is the URL, matched below by its path.
    (
        "error",
        "Failed to load resource: the server responded with a status of 404 (Not Found)",
        "/user.css",
    ),
    (
        "error",
        "Failed to load resource: the server responded with a status of 404 (Not Found)",
        "/api/userdata/user.css",
    ),
    (
        "error",
        "Failed to load resource: the server responded with a status of 404 (Not Found)",
        "/api/userdata",  # ?dir=workflows... and ?dir=subgraphs/...
    ),
    (
        "error",
        "Failed to load resource: the server responded with a status of 404 (Not Found)",
        "/api/userdata/comfy.templates.json",
    ),
    # The frontend's settings registration (GraphView's CORE_SETTINGS loop → addSetting → onChange
    # of Comfy.Canvas.NavigationMode) sets Comfy.Canvas.LeftMouseClickBehavior before that setting
    # is registered, and reads `.id` of the missing definition: thrown at every start of a user
    # who never changed the navigation mode, before any workflow or node pack is involved.
    ("pageerror", "Cannot read properties of undefined (reading 'id')", "addSetting"),
}


def _skip_reason() -> str | None:
    if not os.environ.get("COMFYUI_PATH"):
        return COMFY_SKIP
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return f"{BROWSER_SKIP} the playwright package (pip install -r requirements-dev.txt)"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return (
            f"{BROWSER_SKIP} Chromium at {CHROMIUM} (apt-get install chromium, or set I2VEDIT_CHROMIUM "
            "to a Chromium or Chrome binary)"
        )
    return None


@dataclass
class Frontend:
    """A page of the ComfyUI frontend and what it logged: console messages and page errors."""

    page: Any
    server: ComfyServer
    chromium_version: str
    frontend_version: str
    log: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, text, where)

    def errors_since(self, start: int) -> list[tuple[str, str, str]]:
        """Console errors and page errors logged after entry ``start``, the stock noise left out."""
        out = []
        for kind, text, where in self.log[start:]:
            if kind not in ("error", "pageerror"):
                continue
            if not any(
                k == kind and t == text and _where_matches(kind, w, where) for k, t, w in FRONTEND_NOISE
            ):
                out.append((kind, text, where))
        return out


def _where_matches(kind: str, expected: str, where: str) -> bool:
    """A console error's URL path equals ``expected``; a page error's stack names ``expected``."""
    if kind == "pageerror":
        return expected in where
    return urlsplit(where).path == expected


def _write_inputs(server: ComfyServer, workflows: list[Path]) -> None:
    """The files the workflows name, so every file combo lists its value and every preview loads.

    Models are empty files (the frontend only lists them); the input image is the demo's edited
    first frame and the input video its source video (H.264, which Chromium plays), both real.
    """
    import av
    import numpy as np
    from PIL import Image

    from i2vedit.io.synthetic import demo_video

    frames, edited = demo_video(frames=16, size=(256, 384))
    folders = {
        "ImageOnlyCheckpointLoader": server.models_dir / "checkpoints",
        "LoraLoaderModelOnly": server.models_dir / "loras",
        "I2VEditLoadMotionLoRA": server.models_dir / "loras" / "i2vedit",
        "I2VEditLoadInversion": server.models_dir / "i2vedit_inversions",
    }
    for path in workflows:
        for node in json.loads(path.read_text(encoding="utf-8"))["nodes"]:
            value = (node.get("widgets_values") or [None])[0]
            if node["type"] in folders:
                target = folders[node["type"]] / value
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
            elif node["type"] == "LoadImage":
                rgb = (edited[0].numpy() * 255).round().astype(np.uint8)
                Image.fromarray(rgb).save(server.input_dir / value)
            elif node["type"] == "LoadVideo":
                with av.open(str(server.input_dir / value), "w") as container:
                    stream = container.add_stream("libx264", rate=8)
                    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
                    for frame in frames:
                        rgb = (frame.numpy() * 255).round().astype(np.uint8)
                        for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                            container.mux(packet)
                    for packet in stream.encode():
                        container.mux(packet)


@pytest.fixture(scope="module")
def frontend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Frontend]:
    """The ComfyUI frontend open in headless Chromium, served by a fresh ComfyUI with the pack."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    server = ComfyServer(base_dir=tmp_path_factory.mktemp("browser_comfy_base"))
    try:
        server.start()
    except ComfyServerError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        # read per request, so in place before the page asks
        settings = server.base_dir / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps(SETTINGS))
        _write_inputs(server, WORKFLOWS)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport=VIEWPORT)
                log: list[tuple[str, str, str]] = []
                page.on("console", lambda m: log.append((m.type, m.text, m.location.get("url", ""))))
                page.on("pageerror", lambda e: log.append(("pageerror", e.message, e.stack or "")))
                page.goto(server.url)
                page.wait_for_function(
                    "() => window.app?.graph && window.app.canvas && window.LiteGraph"
                    " && window.app.extensionManager?.command",
                    timeout=120_000,
                )
                page.wait_for_load_state("networkidle")
                prefix = "ComfyUI Front-end version: "
                frontend_version = next((t[len(prefix) :] for _k, t, _w in log if t.startswith(prefix)), "?")
                front = Frontend(page, server, browser.version, frontend_version, log)
                assert not front.errors_since(0), (
                    f"the frontend's start logged errors: {front.errors_since(0)}"
                )
                yield front
            finally:
                browser.close()
    finally:
        server.stop()


LOAD_AND_MEASURE = """
async ([wf, name]) => {
  const LG = window.LiteGraph;
  const missing = wf.nodes.map(n => n.type).filter(t => !(t in LG.registered_node_types));
  await window.app.loadGraphData(wf, true, true, name);
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const saved = window.app.graph.serialize();
  const boxes = window.app.graph.nodes.map(n => {
    const b = n.boundingRect;  // [x, y, w, h], title bar included
    return {id: n.id, type: n.type, box: [b[0], b[1], b[2], b[3]]};
  });
  const dialogs = [...document.querySelectorAll('.p-dialog')]
    .filter(d => d.offsetParent !== null).map(d => d.innerText.slice(0, 300));
  return {missing, saved, boxes, dialogs};
}
"""

GRAPH_BOUNDS = """
() => {
  const rects = [...window.app.graph.nodes, ...window.app.graph.groups].map(item => item.boundingRect);
  const x0 = Math.min(...rects.map(r => r[0])), y0 = Math.min(...rects.map(r => r[1]));
  const x1 = Math.max(...rects.map(r => r[0] + r[2])), y1 = Math.max(...rects.map(r => r[1] + r[3]));
  return [x0, y0, x1 - x0, y1 - y0];
}
"""

# Focus mode's one button, "Show Menu" (top right), over the graph.
HIDDEN_IN_SCREENSHOTS = 'button[aria-label="Show Menu"] { visibility: hidden !important; }'

# Focus mode (no menus or side bars), nothing selected, and the graph's bounds centred to fill the page.
SCREENSHOT_VIEW = """
async ([bounds, margin]) => {
  if (!document.body.classList.contains('i2vedit-focus')) {
    await window.app.extensionManager.command.execute('Workspace.ToggleFocusMode');
    document.body.classList.add('i2vedit-focus');
  }
  window.app.canvas.deselectAll?.();
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const [x, y, w, h] = bounds;
  const ds = window.app.canvas.ds, el = window.app.canvas.canvas;
  const cw = el.clientWidth, ch = el.clientHeight;
  const scale = Math.min(cw / (w + 2 * margin), ch / (h + 2 * margin));
  ds.scale = scale;
  ds.offset = [-x + (cw / scale - w) / 2, -y + (ch / scale - h) / 2];
  window.app.graph.setDirtyCanvas(true, true);
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
}
"""


def _overlaps(boxes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    hits = []
    for i, a in enumerate(boxes):
        ax, ay, aw, ah = a["box"]
        for b in boxes[i + 1 :]:
            bx, by, bw, bh = b["box"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                hits.append((f"{a['type']} #{a['id']}", f"{b['type']} #{b['id']}"))
    return hits


def screenshot(page: Any) -> bytes:
    """The loaded graph alone, filling a page as wide as ``VIEWPORT`` whose height fits the graph."""
    x, y, w, h = page.evaluate(GRAPH_BOUNDS)
    width = VIEWPORT["width"]
    height = round(width * (h + 2 * SHOT_MARGIN) / (w + 2 * SHOT_MARGIN))
    page.set_viewport_size({"width": width, "height": min(max(height, 480), VIEWPORT["height"])})
    try:
        page.evaluate(SCREENSHOT_VIEW, [[x, y, w, h], SHOT_MARGIN])
        page.wait_for_timeout(300)  # the DOM widgets (previews, notes) follow the canvas a frame later
        return page.screenshot(type="png", style=HIDDEN_IN_SCREENSHOTS)
    finally:
        page.set_viewport_size(VIEWPORT)


def named_links(wf: dict[str, Any]) -> set[tuple[int, str, int, str, str]]:
    """Links as (from node, output name, to node, input name, type).

    Slot numbers are not compared: the frontend gives every widget an input slot, so a linked
    widget's slot number in the loaded graph counts the unlinked widgets before it too.
    """
    nodes = {n["id"]: n for n in wf["nodes"]}
    return {
        (a, nodes[a]["outputs"][sa]["name"], b, nodes[b]["inputs"][sb]["name"], kind)
        for _, a, sa, b, sb, kind in wf["links"]
    }


def save_thumbnail(png: bytes, workflow_json: bytes, out: Path) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im.convert("RGB").save(
            out, "JPEG", quality=JPEG_QUALITY, optimize=True, comment=thumbnail_comment(workflow_json)
        )


@pytest.mark.comfy
@pytest.mark.browser
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_opens_cleanly_in_the_frontend(
    frontend: Frontend, path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    raw = path.read_bytes()
    wf = json.loads(raw)
    start = len(frontend.log)
    got = frontend.page.evaluate(LOAD_AND_MEASURE, [wf, path.stem])
    frontend.page.wait_for_load_state("networkidle")
    time.sleep(0.5)  # image and video previews decode after their requests finish

    assert not got["missing"], f"{path.name}: node types the frontend does not know: {got['missing']}"
    assert not got["dialogs"], f"{path.name}: loading opened a dialog: {got['dialogs']}"
    saved = got["saved"]
    assert len(saved["nodes"]) == len(wf["nodes"]), f"{path.name}: node count changed by loading"
    assert {n["id"]: n["type"] for n in saved["nodes"]} == {n["id"]: n["type"] for n in wf["nodes"]}
    assert len(saved["links"]) == len(wf["links"]), f"{path.name}: link count changed by loading"
    assert named_links(saved) == named_links(wf), f"{path.name}: links changed by loading"
    values = {n["id"]: n.get("widgets_values") for n in saved["nodes"]}
    for node in wf["nodes"]:
        assert values[node["id"]] == node["widgets_values"], f"{path.name}: {node['type']} widgets changed"
    assert not _overlaps(got["boxes"]), f"{path.name}: overlapping nodes {_overlaps(got['boxes'])}"

    png = screenshot(frontend.page)
    out_dir = WORKFLOW_DIR if WRITE_THUMBNAILS else tmp_path_factory.mktemp("thumbnails")
    out = out_dir / f"{path.stem}.jpg"
    save_thumbnail(png, raw, out)
    errors = frontend.errors_since(start)
    assert not errors, f"{path.name}: the page logged errors while loading it: {errors}"
    print(
        f"{path.name}: {len(wf['nodes'])} nodes, {len(wf['links'])} links; Chromium {frontend.chromium_version},"
        f" frontend {frontend.frontend_version}; screenshot {out}"
    )


@pytest.mark.comfy
@pytest.mark.browser
def test_an_unknown_node_type_is_seen(frontend: Frontend) -> None:
    """The checks can fail: a workflow with a node type nobody registers shows as missing, with a dialog."""
    wf = json.loads(WORKFLOWS[0].read_text(encoding="utf-8"))
    wf["nodes"][0]["type"] = "I2VEditNoSuchNode"
    got = frontend.page.evaluate(LOAD_AND_MEASURE, [wf, "unknown_node"])
    frontend.page.keyboard.press("Escape")  # close the dialog
    assert got["missing"] == ["I2VEditNoSuchNode"]
    assert any("I2VEditNoSuchNode" in text for text in got["dialogs"]), got["dialogs"]
