"""Import layout of ``i2vedit``, read with ``ast`` (nothing is imported): the core stays host-free, no cycles.

Every import counts, also one inside a function; only imports under ``if TYPE_CHECKING:`` do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = "i2vedit"
PACK = "<pack>"  # the pack's root package, which ComfyUI names after the custom_nodes folder
ABOVE_PACK = "<above the pack root>"

COMFYUI = ("comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server")
DIFFUSERS = ("diffusers", "transformers", "peft")
NOT_CORE = ("i2vedit.hosts", "i2vedit.tools", "i2vedit.cli", "i2vedit.__main__")

PROTOCOL_ADVICE = (
    "Move the code that needs it into a host (i2vedit/hosts/comfy or i2vedit/hosts/diffusers), or reach "
    "it through the SVDHost protocol in i2vedit/host.py: the caller passes a host in, and the host's "
    "method imports what it needs lazily, so the core never names a host or a model library."
)


class Import:
    """One import resolved to a module: ``i2vedit.…``, ``<pack>.…`` (above ``i2vedit``), or external."""

    def __init__(self, line: int, target: str, lazy: bool) -> None:
        self.line, self.target, self.lazy = line, target, lazy

    def __repr__(self) -> str:
        return f"Import({self.line}, {self.target!r}, lazy={self.lazy})"


class Module:
    """One ``.py`` file of the package: its path (relative to the root) and what it imports."""

    def __init__(self, path: str, is_package: bool, imports: list[Import]) -> None:
        self.path, self.is_package, self.imports = path, is_package, imports


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def is_internal(name: str) -> bool:
    return under(name, PACKAGE)


def is_core(name: str) -> bool:
    return is_internal(name) and not any(under(name, p) for p in NOT_CORE)


def top_level(name: str) -> str:
    return name.split(".")[0]


def module_exists(name: str, root: Path) -> bool:
    """Whether the dotted name (inside the pack) is a ``.py`` file or a package folder under ``root``."""
    parts = name.split(".")
    if parts[0] == PACK:
        parts = parts[1:]
    if not parts or parts[0].startswith("<"):
        return False
    base = root.joinpath(*parts)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def absolute_base(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The module ``from <level dots><module> import …`` names, seen from module ``importer``."""
    if level == 0:
        return module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    if level - 1 > len(package):
        return ABOVE_PACK
    parts = package[: len(package) - (level - 1)] + (module.split(".") if module else [])
    if level - 1 == len(package) and parts[:1] != [PACKAGE]:
        parts = [PACK, *parts]  # climbed above i2vedit into the pack root (the nodes package, ...)
    return ".".join(parts)


def resolve(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, root: Path) -> list[str]:
    """The modules one import statement loads: ``from X import name`` is ``X.name`` when that is a module."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = absolute_base(node.module, node.level, importer, is_package)
    if not (is_internal(base) or base.startswith(PACK)):
        return [base]
    targets: list[str] = []
    for alias in node.names:
        name = f"{base}.{alias.name}"
        target = name if alias.name != "*" and module_exists(name, root) else base
        if target not in targets:
            targets.append(target)
    return targets


def is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return (
        isinstance(test, ast.Attribute)
        and test.attr == "TYPE_CHECKING"
        and isinstance(test.value, ast.Name)
        and test.value.id in ("typing", "typing_extensions")
    )


def import_nodes(nodes, lazy: bool = False):
    """Yield ``(import statement, lazy)``, skipping ``if TYPE_CHECKING:`` bodies (their ``else`` counts)."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, lazy
        elif isinstance(node, ast.If) and is_type_checking(node.test):
            yield from import_nodes(node.orelse, lazy)
        else:
            inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from import_nodes(ast.iter_child_nodes(node), inner)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def parse_module(source: str, path: Path, root: Path) -> tuple[str, Module]:
    name = module_name(path, root)
    is_package = path.name == "__init__.py"
    imports = [
        Import(node.lineno, target, lazy)
        for node, lazy in import_nodes(ast.parse(source, filename=str(path)).body)
        for target in resolve(node, name, is_package, root)
        if target != "__future__"
    ]
    return name, Module(path.relative_to(root).as_posix(), is_package, imports)


def scan(root: Path) -> dict[str, Module]:
    """Every module under ``root/i2vedit``, by dotted name."""
    return dict(
        parse_module(path.read_text(encoding="utf-8"), path, root)
        for path in sorted((root / PACKAGE).rglob("*.py"))
    )


def boundary_offenders(modules: dict[str, Module]) -> dict[str, list[str]]:
    """Broken layout rules, each with its ``path:line imports X`` lines."""
    rules = {
        "core": (
            "Core modules (i2vedit outside hosts/, tools/, cli.py and __main__.py) must stay host-free: no "
            f"ComfyUI ({', '.join(COMFYUI)}), no {', '.join(DIFFUSERS)}, no i2vedit.hosts, i2vedit.tools "
            "or i2vedit.cli, and nothing above i2vedit (the nodes package). " + PROTOCOL_ADVICE
        ),
        "comfy": (
            f"The ComfyUI host (i2vedit.hosts.comfy) must not import {', '.join(DIFFUSERS)}, nor "
            "i2vedit.hosts.diffusers at module level (ComfyUI must load without diffusers). Move what both "
            "hosts share into the core (i2vedit.svd, i2vedit.host, ...), or import the diffusers host "
            "inside the one function that needs it."
        ),
        "diffusers": (
            "The diffusers host (i2vedit.hosts.diffusers) must never import ComfyUI "
            f"({', '.join(COMFYUI)}) nor i2vedit.hosts.comfy, not even inside a function: it runs without "
            "ComfyUI. Move what both hosts share into the core (i2vedit.svd, i2vedit.host, ...)."
        ),
    }
    found: dict[str, list[str]] = {rule: [] for rule in rules}
    for name, module in sorted(modules.items()):
        for imp in module.imports:
            target, top = imp.target, top_level(imp.target)
            internal = is_internal(target)
            if is_core(name):
                broken = (
                    target.startswith("<")
                    or (internal and not is_core(target))
                    or (not internal and top in COMFYUI + DIFFUSERS)
                )
                rule = "core"
            elif under(name, "i2vedit.hosts.comfy"):
                broken = (not internal and top in DIFFUSERS) or (
                    under(target, "i2vedit.hosts.diffusers") and not imp.lazy
                )
                rule = "comfy"
            elif under(name, "i2vedit.hosts.diffusers"):
                broken = (not internal and top in COMFYUI) or under(target, "i2vedit.hosts.comfy")
                rule = "diffusers"
            else:
                continue
            if broken:
                found[rule].append(f"{module.path}:{imp.line} imports {target}")
    return {rules[rule]: lines for rule, lines in found.items() if lines}


def import_edges(modules: dict[str, Module]) -> dict[str, dict[str, list[str]]]:
    """``importer -> imported -> ["path:line", ...]`` among modules of the package.

    Importing ``a.b.c`` also runs the packages ``a`` and ``a.b``; such an edge is kept only to a package
    whose ``__init__`` imports something (an empty one cannot close a cycle), and not to the importer's own
    packages, which are already loaded when it runs.
    """
    edges: dict[str, dict[str, list[str]]] = {name: {} for name in modules}
    for name, module in modules.items():
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        for imp in module.imports:
            if imp.target not in modules:
                continue
            parts = imp.target.split(".")
            parents = {".".join(parts[:i]) for i in range(1, len(parts))}
            for target in {imp.target} | {p for p in parents - own if p in modules and modules[p].imports}:
                if target != name:
                    edges[name].setdefault(target, []).append(f"{module.path}:{imp.line}")
    return edges


def strongly_connected(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one node, iteratively, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, {})))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def cycle_reports(modules: dict[str, Module]) -> list[str]:
    edges = import_edges(modules)
    reports = []
    for component in strongly_connected(edges):
        lines = [
            f"  {where} imports {target}"
            for name in component
            for target, places in sorted(edges[name].items())
            if target in component
            for where in places
        ]
        reports.append(f"import cycle among {', '.join(component)}:\n" + "\n".join(lines))
    return reports


def test_core_and_hosts_keep_their_boundaries():
    """The core imports no host, tool, command line, node or model library; the two hosts keep apart."""
    offenders = boundary_offenders(scan(ROOT))
    assert not offenders, "\n\n".join(
        rule + "\n" + "\n".join(f"  {line}" for line in lines) for rule, lines in offenders.items()
    )


def test_no_import_cycles():
    """No two modules of ``i2vedit`` import each other, directly or round a loop (lazy imports count)."""
    reports = cycle_reports(scan(ROOT))
    assert not reports, (
        "\n\n".join(reports) + "\n\nBreak each cycle: move what both sides need into a module lower down "
        "that imports neither, or let the lower side receive the other as an argument (as the method "
        "receives an SVDHost, i2vedit/host.py) instead of importing it; a lazy import does not break a cycle."
    )


def test_parser_sees_the_imports():
    """The scan finds the package's imports (an empty graph would let the two tests above pass vacuously)."""
    modules = scan(ROOT)
    assert len(modules) > 5, f"found only {sorted(modules)} under {ROOT / PACKAGE}"
    edges = import_edges(modules)
    assert any(edges.values()), "no import between i2vedit modules found: the parser or resolver is broken"
    inversion = modules.get("i2vedit.method.inversion")
    if inversion is not None:
        targets = {imp.target for imp in inversion.imports}
        assert "torch" in targets, targets
        assert targets & set(modules), f"no relative import of i2vedit.method.inversion resolved: {targets}"


def test_resolver_on_a_small_tree(tmp_path):
    """Relative imports, ``from pkg import module``, lazy and TYPE_CHECKING imports, the rules and cycles."""
    files = {
        "i2vedit/__init__.py": "",
        "i2vedit/host.py": "import torch\n",
        "i2vedit/method/__init__.py": "",
        "i2vedit/method/a.py": (
            "import typing\n"
            "from typing import TYPE_CHECKING\n"
            "from torch.nn import functional\n"
            "from ..host import SVDHost\n"
            "from . import b, missing\n"
            "from .. import method\n"
            "from ...nodes import common\n"
            "if TYPE_CHECKING:\n"
            "    from ..hosts.comfy import host\n"
            "elif typing.TYPE_CHECKING:\n"
            "    import diffusers\n"
            "else:\n"
            "    import peft\n"
            "def f():\n"
            "    import comfy.model_patcher\n"
        ),
        "i2vedit/method/b.py": "from .a import x\n",
        "i2vedit/hosts/__init__.py": "",
        "i2vedit/hosts/comfy/__init__.py": "",
        "i2vedit/hosts/comfy/host.py": (
            "from ..diffusers import tiny\ndef f():\n    from ..diffusers.host import g\n"
        ),
        "i2vedit/hosts/diffusers/__init__.py": "",
        "i2vedit/hosts/diffusers/host.py": "def f():\n    import comfy\n",
        "i2vedit/hosts/diffusers/tiny.py": "from ...method.a import f\n",
        "nodes/__init__.py": "",
        "nodes/common.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    modules = scan(tmp_path)

    a = modules["i2vedit.method.a"]
    assert [(i.line, i.target, i.lazy) for i in a.imports] == [
        (1, "typing", False),
        (2, "typing", False),
        (3, "torch.nn", False),
        (4, "i2vedit.host", False),
        (5, "i2vedit.method.b", False),
        (5, "i2vedit.method", False),
        (6, "i2vedit.method", False),
        (7, "<pack>.nodes.common", False),
        (13, "peft", False),
        (15, "comfy.model_patcher", True),
    ]
    assert absolute_base(None, 4, "i2vedit.method.a", False) == ABOVE_PACK
    assert absolute_base("x", 1, "i2vedit.method", True) == "i2vedit.method.x"

    offenders = list(boundary_offenders(modules).values())
    assert offenders == [
        [
            "i2vedit/method/a.py:7 imports <pack>.nodes.common",
            "i2vedit/method/a.py:13 imports peft",
            "i2vedit/method/a.py:15 imports comfy.model_patcher",
        ],
        ["i2vedit/hosts/comfy/host.py:1 imports i2vedit.hosts.diffusers.tiny"],
        ["i2vedit/hosts/diffusers/host.py:2 imports comfy"],
    ]
    assert strongly_connected(import_edges(modules)) == [["i2vedit.method.a", "i2vedit.method.b"]]
    assert strongly_connected({"x": {"y": []}, "y": {"z": []}, "z": {"x": []}, "w": {"x": []}}) == [
        ["x", "y", "z"]
    ]
