"""Draw ComfyUI UI-format workflow JSON as a PNG, in the look of ComfyUI's dark theme.

Usage::

    python -m i2vedit.tools.render_png workflows/*.json                 # writes workflows/<name>.png
    python -m i2vedit.tools.render_png a.json --out-dir pngs --scale 0.75
    python -m i2vedit.tools.render_png a.json --object-info object_info.json

Draws groups (tinted rectangles with titles), nodes (title bar, input and output slots with their
names, one ``name  value`` row per widget), links as bezier curves coloured by type, and Note nodes
with their text. Each PNG also carries the workflow JSON in a ``workflow`` text chunk, as ComfyUI's
own PNGs do, so dropping the PNG on the ComfyUI canvas loads the graph.

UI-format JSON stores widget values by position only. Widget names (and node titles) come from
``--object-info`` (a saved ``GET /object_info`` answer) when given, otherwise from the pack's own
``nodes/*.py`` schemas (read with ``ast``, nothing is imported) and a small table of the core nodes
the example workflows use; widgets of other nodes are drawn without names. Needs only Pillow.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

Color = tuple[int, int, int]
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

# LiteGraph's geometry (graph units) and ComfyUI's dark palette.
TITLE_H, SLOT_H, WIDGET_H, WIDGET_GAP = 30, 20, 20, 4
BACKGROUND, GRID = "#202020", "#262626"
NODE_TITLE_BG, NODE_BG, NODE_OUTLINE = "#333333", "#353535", "#111111"
TITLE_TEXT, SLOT_TEXT = "#c8c8c8", "#aaaaaa"
WIDGET_BG, WIDGET_OUTLINE, WIDGET_TEXT, WIDGET_LABEL = "#222222", "#666666", "#dddddd", "#999999"
DEFAULT_LINK = "#99aa99"
LINK_COLORS = {  # ComfyUI's type colours, plus distinct ones for the video and I2VEdit types
    "MODEL": "#b39ddb",
    "CLIP": "#ffd500",
    "CLIP_VISION": "#a8dadc",
    "VAE": "#ff6e6e",
    "IMAGE": "#64b5f6",
    "MASK": "#81c784",
    "LATENT": "#ff9cf9",
    "CONDITIONING": "#ffa931",
    "VIDEO": "#f4a261",
    "AUDIO": "#e9c46a",
    "FLOAT": "#aaee88",
    "INT": "#aaee88",
    "STRING": "#77cccc",
    "I2V_INVERSION": "#e76f51",
    "I2V_LORA": "#ffd166",
    "I2V_KV": "#06d6a0",
    "I2V_EDIT": "#ef476f",
    "I2V_RESIZE": "#c77dff",
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds a control widget after these INT inputs
UPLOAD_KEYS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")

# Core nodes the example workflows use: title and widget names (including UI-only ones).
CORE_NODES: dict[str, tuple[str, list[str]]] = {
    "ImageOnlyCheckpointLoader": ("Image Only Checkpoint Loader (img2vid model)", ["ckpt_name"]),
    "LoadVideo": ("Load Video", ["file", "upload"]),
    "GetVideoComponents": ("Get Video Components", []),
    "LoadImage": ("Load Image", ["image", "upload"]),
    "CreateVideo": ("Create Video", ["fps"]),
    "SaveVideo": ("Save Video", ["filename_prefix", "format", "codec"]),
    "LoraLoaderModelOnly": ("LoraLoaderModelOnly", ["lora_name", "strength_model"]),
    "Note": ("Note", ["text"]),
    "MarkdownNote": ("Note", ["text"]),
}
NOTE_TYPES = {"Note", "MarkdownNote"}


@dataclass
class NodeDef:
    """What the renderer needs to know of a node type: its title and widget names in order."""

    title: str
    widgets: list[str] = field(default_factory=list)


def rgb(color: str) -> Color:
    """``#rgb`` or ``#rrggbb`` as an RGB tuple."""
    h = color.lstrip("#")
    if len(h) == 3:
        h = "".join(c * 2 for c in h)
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def mix(a: Color, b: Color, t: float) -> Color:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))  # type: ignore[return-value]


# ---- node definitions ---------------------------------------------------------------------------


def defs_from_object_info(info: dict[str, Any]) -> dict[str, NodeDef]:
    """Node definitions from a ``GET /object_info`` answer, with the widgets the frontend adds."""
    defs: dict[str, NodeDef] = {}
    for node_type, entry in info.items():
        specs = {**entry["input"].get("required", {}), **entry["input"].get("optional", {})}
        order = entry.get("input_order", {})
        names = list(order.get("required", [])) + list(order.get("optional", [])) or list(specs)
        widgets: list[str] = []
        for name in names:
            spec = specs[name]
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            if kind not in WIDGET_TYPES:
                continue
            opts = spec[1] if len(spec) > 1 else {}
            widgets.append(name)
            if opts.get("control_after_generate", kind == "INT" and name in SEED_NAMES):
                widgets.append("control_after_generate")
            if any(opts.get(k) for k in UPLOAD_KEYS):
                widgets.append("upload")
        defs[node_type] = NodeDef(entry.get("display_name") or node_type, widgets)
    return defs


def _const(node: ast.AST | None) -> Any:
    return node.value if isinstance(node, ast.Constant) else None


def defs_from_pack_sources(nodes_dir: Path) -> dict[str, NodeDef]:
    """Node definitions read from V3 ``io.Schema(...)`` calls in a pack's sources (not imported)."""
    defs: dict[str, NodeDef] = {}
    for path in sorted(nodes_dir.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)):
                continue
            if call.func.attr != "Schema":
                continue
            kw = {k.arg: k.value for k in call.keywords}
            node_id = _const(kw.get("node_id"))
            if not isinstance(node_id, str):
                continue
            widgets: list[str] = []
            inputs = kw.get("inputs")
            for item in inputs.elts if isinstance(inputs, ast.List) else []:
                widgets.extend(_widget_names(item))
            defs[node_id] = NodeDef(_const(kw.get("display_name")) or node_id, widgets)
    return defs


def _widget_names(item: ast.AST) -> list[str]:
    """The widget names of one ``io.<Type>.Input("name", ...)`` call (none for socket inputs)."""
    if not (isinstance(item, ast.Call) and isinstance(item.func, ast.Attribute) and item.args):
        return []
    owner = item.func.value
    kind = owner.attr if isinstance(owner, ast.Attribute) else ""
    name = _const(item.args[0])
    if item.func.attr != "Input" or kind.upper() not in WIDGET_TYPES or not isinstance(name, str):
        return []
    kw = {k.arg: k.value for k in item.keywords}
    names = [name]
    control = _const(kw["control_after_generate"]) if "control_after_generate" in kw else None
    if control is None:
        control = kind == "Int" and name in SEED_NAMES
    if control:
        names.append("control_after_generate")
    if "upload" in kw:
        names.append("upload")
    return names


def load_defs(object_info: Path | None = None) -> dict[str, NodeDef]:
    defs = {k: NodeDef(title, list(widgets)) for k, (title, widgets) in CORE_NODES.items()}
    pack_nodes = Path(__file__).resolve().parents[2] / "nodes"
    if pack_nodes.is_dir():
        defs.update(defs_from_pack_sources(pack_nodes))
    if object_info is not None:
        defs.update(defs_from_object_info(json.loads(object_info.read_text(encoding="utf-8"))))
    return defs


# ---- drawing ------------------------------------------------------------------------------------

_FONT_FILES = ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "Arial.ttf", "arial.ttf")
_BOLD_FILES = (
    "DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "Arial Bold.ttf",
    "arialbd.ttf",
)


def load_font(size: int, bold: bool = False) -> Font:
    """A TrueType font (DejaVu Sans where installed), else Pillow's built-in one."""
    for name in _BOLD_FILES if bold else _FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.1f}" if value.is_integer() else f"{value:g}"
    if value is None:
        return "—"
    return str(value)


class Renderer:
    """Draws one workflow onto an image; coordinates are graph units times ``scale``."""

    def __init__(self, workflow: dict[str, Any], defs: dict[str, NodeDef], scale: float = 1.0) -> None:
        self.wf, self.defs = workflow, defs
        self.nodes = {n["id"]: n for n in workflow.get("nodes", [])}
        self.ss = 2  # supersampling, for smooth curves and text
        self.k = scale * self.ss
        x0, y0, x1, y1 = self.bounds()
        self.origin = (x0, y0)
        size = (max(1, round((x1 - x0) * self.k)), max(1, round((y1 - y0) * self.k)))
        self.out_size = (max(1, round(size[0] / self.ss)), max(1, round(size[1] / self.ss)))
        self.img = Image.new("RGB", size, rgb(BACKGROUND))
        self.draw = ImageDraw.Draw(self.img, "RGBA")
        self.fonts: dict[tuple[int, bool], Font] = {}

    # geometry
    def bounds(self, margin: float = 40) -> tuple[float, float, float, float]:
        boxes = [
            (n["pos"][0], n["pos"][1] - TITLE_H, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in self.nodes.values()
        ]
        for g in self.wf.get("groups", []):
            x, y, w, h = g["bounding"]
            boxes.append((x, y, x + w, y + h))
        if not boxes:
            return 0, 0, 400, 300
        return (
            min(b[0] for b in boxes) - margin,
            min(b[1] for b in boxes) - margin,
            max(b[2] for b in boxes) + margin,
            max(b[3] for b in boxes) + margin,
        )

    def p(self, x: float, y: float) -> tuple[float, float]:
        return (x - self.origin[0]) * self.k, (y - self.origin[1]) * self.k

    def box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return (*self.p(x0, y0), *self.p(x1, y1))

    def font(self, size: float, bold: bool = False) -> Font:
        px = max(6, round(size * self.k))
        if (px, bold) not in self.fonts:
            self.fonts[(px, bold)] = load_font(px, bold)
        return self.fonts[(px, bold)]

    def text(self, x: float, y: float, s: str, fill: str, size: float = 12, bold: bool = False,
             anchor: str = "lm") -> None:  # fmt: skip
        self.draw.text(self.p(x, y), s, fill=fill, font=self.font(size, bold), anchor=anchor)

    def text_width(self, s: str, size: float = 12, bold: bool = False) -> float:
        return self.draw.textlength(s, font=self.font(size, bold)) / self.k

    def fit(self, s: str, width: float, size: float = 12, bold: bool = False) -> str:
        """``s`` shortened with an ellipsis to fit ``width`` graph units."""
        if self.text_width(s, size, bold) <= width:
            return s
        while s and self.text_width(s + "…", size, bold) > width:
            s = s[:-1]
        return s + "…"

    # slots
    def node_def(self, node: dict[str, Any]) -> NodeDef:
        return self.defs.get(node["type"]) or NodeDef(node["type"])

    def widget_names(self, node: dict[str, Any]) -> list[str]:
        names = list(self.node_def(node).widgets)
        n = len(node.get("widgets_values") or [])
        return names[:n] + [""] * (n - len(names))

    def widget_top(self, node: dict[str, Any]) -> float:
        socket_inputs = [i for i in node.get("inputs", []) if "widget" not in i]
        rows = max(len(socket_inputs), len(node.get("outputs", [])))
        return node["pos"][1] + rows * SLOT_H + 6

    def input_pos(self, node: dict[str, Any], slot: int) -> tuple[float, float]:
        x, y = node["pos"]
        inputs = node.get("inputs", [])
        entry = inputs[slot]
        if "widget" in entry:  # a widget turned into a socket: its dot sits on the widget's row
            names = self.widget_names(node)
            name = entry["widget"].get("name", entry["name"])
            row = names.index(name) if name in names else 0
            return x, self.widget_top(node) + row * (WIDGET_H + WIDGET_GAP) + WIDGET_H / 2
        row = sum(1 for i in inputs[:slot] if "widget" not in i)
        return x + 10, y + (row + 0.7) * SLOT_H

    def output_pos(self, node: dict[str, Any], slot: int) -> tuple[float, float]:
        x, y = node["pos"]
        return x + node["size"][0] - 10, y + (slot + 0.7) * SLOT_H

    # drawing passes
    def render(self) -> Image.Image:
        self.draw_grid()
        for g in self.wf.get("groups", []):
            self.draw_group(g)
        for link in self.wf.get("links", []):
            self.draw_link(link)
        for node in sorted(self.nodes.values(), key=lambda n: n.get("order", 0)):
            if node["type"] in NOTE_TYPES:
                self.draw_note(node)
            else:
                self.draw_node(node)
        return self.img.resize(self.out_size, Image.Resampling.LANCZOS)

    def draw_grid(self, step: float = 100) -> None:
        x0, y0 = self.origin
        w, h = self.img.size
        start_x = math.floor(x0 / step) * step
        start_y = math.floor(y0 / step) * step
        x = start_x
        while self.p(x, 0)[0] < w:
            self.draw.line([self.p(x, y0), (self.p(x, y0)[0], h)], fill=rgb(GRID), width=1)
            x += step
        y = start_y
        while self.p(0, y)[1] < h:
            self.draw.line([(0, self.p(x0, y)[1]), (w, self.p(x0, y)[1])], fill=rgb(GRID), width=1)
            y += step

    def draw_group(self, g: dict[str, Any]) -> None:
        x, y, w, h = g["bounding"]
        color = rgb(g.get("color") or "#3f789e")
        self.draw.rounded_rectangle(self.box(x, y, x + w, y + h), radius=6 * self.k, fill=(*color, 64),
                                    outline=(*color, 200), width=max(1, round(1.5 * self.k)))  # fmt: skip
        size = g.get("font_size", 24)
        title = self.fit(g.get("title", ""), w - 20, size * 0.8, bold=True)
        self.text(x + 10, y + size * 0.7, title, fill="#e8e8e8", size=size * 0.8, bold=True)

    def draw_link(self, link: Sequence[Any]) -> None:
        _, src, src_slot, dst, dst_slot, kind = link[:6]
        if src not in self.nodes or dst not in self.nodes:
            return
        a = self.output_pos(self.nodes[src], src_slot)
        b = self.input_pos(self.nodes[dst], dst_slot)
        dist = math.dist(a, b) * 0.25
        c1, c2 = (a[0] + dist, a[1]), (b[0] - dist, b[1])
        pts = []
        for i in range(65):
            t = i / 64
            u = 1 - t
            px = u**3 * a[0] + 3 * u * u * t * c1[0] + 3 * u * t * t * c2[0] + t**3 * b[0]
            py = u**3 * a[1] + 3 * u * u * t * c1[1] + 3 * u * t * t * c2[1] + t**3 * b[1]
            pts.append(self.p(px, py))
        color = rgb(LINK_COLORS.get(str(kind), DEFAULT_LINK))
        self.draw.line(pts, fill=(0, 0, 0, 140), width=max(1, round(5 * self.k)), joint="curve")
        self.draw.line(pts, fill=color, width=max(1, round(3 * self.k)), joint="curve")

    def slot_dot(self, x: float, y: float, kind: str, connected: bool, hollow: bool = False) -> None:
        r = 5 * self.k
        cx, cy = self.p(x, y)
        color = rgb(LINK_COLORS.get(kind, DEFAULT_LINK))
        if not connected:
            color = mix(color, rgb(NODE_BG), 0.45)
        if hollow:
            self.draw.ellipse(
                (cx - r, cy - r, cx + r, cy + r), outline=color, width=max(1, round(2 * self.k))
            )
        else:
            self.draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)

    def frame(self, node: dict[str, Any], title_bg: str, body_bg: str) -> None:
        x, y = node["pos"]
        w, h = node["size"]
        radius = 8 * self.k
        self.draw.rounded_rectangle(self.box(x + 3, y - TITLE_H + 4, x + w + 3, y + h + 4), radius=radius,
                                    fill=(0, 0, 0, 90))  # fmt: skip
        self.draw.rounded_rectangle(self.box(x, y - TITLE_H, x + w, y + h), radius=radius, fill=rgb(body_bg),
                                    outline=rgb(NODE_OUTLINE), width=max(1, round(self.k)))  # fmt: skip
        self.draw.rounded_rectangle(self.box(x, y - TITLE_H, x + w, y), radius=radius, fill=rgb(title_bg),
                                    corners=(True, True, False, False))  # fmt: skip
        dot = self.p(x + 15, y - TITLE_H / 2)
        r = 5 * self.k
        self.draw.ellipse((dot[0] - r, dot[1] - r, dot[0] + r, dot[1] + r), fill=rgb(WIDGET_LABEL))
        title = node.get("title") or self.node_def(node).title
        self.text(x + 28, y - TITLE_H / 2, self.fit(title, w - 36, 14), TITLE_TEXT, 14)

    def draw_node(self, node: dict[str, Any]) -> None:
        x, y = node["pos"]
        w, _ = node["size"]
        self.frame(node, node.get("color", NODE_TITLE_BG), node.get("bgcolor", NODE_BG))
        half = w / 2 - 16
        row = 0
        for entry in node.get("inputs", []):
            if "widget" in entry:
                continue
            cy = y + (row + 0.7) * SLOT_H
            self.slot_dot(
                x + 10, cy, entry.get("type", ""), entry.get("link") is not None, entry.get("shape") == 7
            )
            label = entry.get("label") or entry["name"]
            self.text(x + 20, cy, self.fit(label, half, 12), SLOT_TEXT, 12)
            row += 1
        for slot, entry in enumerate(node.get("outputs", [])):
            cy = y + (slot + 0.7) * SLOT_H
            self.slot_dot(x + w - 10, cy, entry.get("type", ""), bool(entry.get("links")))
            label = entry.get("label") or entry["name"]
            self.text(x + w - 20, cy, self.fit(label, half, 12), SLOT_TEXT, 12, anchor="rm")
        linked = {i.get("widget", {}).get("name"): i for i in node.get("inputs", []) if "widget" in i}
        top = self.widget_top(node)
        values = node.get("widgets_values") or []
        for i, (name, value) in enumerate(zip(self.widget_names(node), values)):
            self.draw_widget(node, top + i * (WIDGET_H + WIDGET_GAP), name, value, linked.get(name))
        self.draw_preview_area(node, top + len(values) * (WIDGET_H + WIDGET_GAP))

    def draw_preview_area(self, node: dict[str, Any], top: float) -> None:
        """A faint frame where ComfyUI shows a node's image, video or text preview."""
        x, y = node["pos"]
        w, h = node["size"]
        if y + h - top < 60:
            return
        self.draw.rounded_rectangle(self.box(x + 15, top + 4, x + w - 15, y + h - 12), radius=6 * self.k,
                                    outline=rgb("#4a4a4a"), width=max(1, round(self.k)))  # fmt: skip
        self.text(x + w / 2, (top + y + h) / 2, "preview", "#5a5a5a", 13, anchor="mm")

    def draw_widget(self, node: dict[str, Any], top: float, name: str, value: Any,
                    link: dict[str, Any] | None) -> None:  # fmt: skip
        x, w = node["pos"][0], node["size"][0]
        x0, x1, cy = x + 15, x + w - 15, top + WIDGET_H / 2
        self.draw.rounded_rectangle(self.box(x0, top, x1, top + WIDGET_H), radius=WIDGET_H / 2 * self.k,
                                    fill=rgb(WIDGET_BG), outline=rgb(WIDGET_OUTLINE),
                                    width=max(1, round(self.k)))  # fmt: skip
        if link is not None:
            self.slot_dot(x, cy, link.get("type", ""), link.get("link") is not None)
        if name == "upload":
            self.text((x0 + x1) / 2, cy, "choose file to upload", WIDGET_LABEL, 12, anchor="mm")
            return
        label = "control after generate" if name == "control_after_generate" else name
        shown = format_value(value) if link is None else "(input)"
        if name:
            label_w = min(self.text_width(label, 12) + 4, (x1 - x0) * 0.55)
            self.text(x0 + 12, cy, self.fit(label, label_w, 12), WIDGET_LABEL, 12)
            self.text(x1 - 12, cy, self.fit(shown, x1 - x0 - label_w - 30, 12), WIDGET_TEXT, 12, anchor="rm")
        else:
            self.text((x0 + x1) / 2, cy, self.fit(shown, x1 - x0 - 24, 12), WIDGET_TEXT, 12, anchor="mm")

    def draw_note(self, node: dict[str, Any]) -> None:
        x, y = node["pos"]
        w, h = node["size"]
        self.frame(node, node.get("color", "#432"), node.get("bgcolor", "#653"))
        text = str((node.get("widgets_values") or [""])[0])
        size, line_h = 13, 18
        chars = max(10, int((w - 24) / (self.text_width("abcdefghij", size) / 10)))
        lines: list[str] = []
        for para in text.split("\n"):
            lines.extend(textwrap.wrap(para, chars) or [""])
        for i, line in enumerate(lines):
            if (i + 1) * line_h > h - 8:
                break
            self.text(x + 12, y + 12 + i * line_h, line, "#e0e0e0", size)


def render_file(path: Path, out_dir: Path | None, defs: dict[str, NodeDef], scale: float) -> Path:
    """Render ``path`` to ``<out_dir or its folder>/<stem>.png`` with the workflow embedded."""
    raw = path.read_text(encoding="utf-8")
    workflow = json.loads(raw)
    image = Renderer(workflow, defs, scale).render()
    meta = PngInfo()
    meta.add_text("workflow", json.dumps(workflow, ensure_ascii=False))
    out = (out_dir or path.parent) / f"{path.stem}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, pnginfo=meta, optimize=True)
    return out


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflows", nargs="+", type=Path, help="UI-format workflow JSON files")
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="where the PNGs go (default: next to each JSON)"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="pixels per graph unit (default 1)")
    parser.add_argument(
        "--object-info", type=Path, default=None, help="a saved /object_info answer for widget names"
    )
    args = parser.parse_args(None if argv is None else list(argv))
    defs = load_defs(args.object_info)
    for path in args.workflows:
        print(render_file(path, args.out_dir, defs, args.scale))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
