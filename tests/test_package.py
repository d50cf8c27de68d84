"""Packaging rules: the pack must work from ComfyUI's custom_nodes, where its root is not on sys.path."""

import ast
import subprocess
import sys
import textwrap

from conftest import ROOT


def test_pack_code_imports_itself_relatively():
    offenders = []
    for folder in ("i2vedit", "nodes"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.ImportFrom)
                    and node.level == 0
                    and (node.module or "").split(".")[0] in ("i2vedit", "nodes")
                ):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                if isinstance(node, ast.Import) and any(
                    a.name.split(".")[0] == "i2vedit" for a in node.names
                ):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"use relative imports inside the pack: {offenders}"


def test_core_imports_without_any_model_library(tmp_path):
    """Every core module of ``i2vedit`` imports with neither ComfyUI nor diffusers loaded, and the entry point is light."""
    script = textwrap.dedent(
        """
        import importlib.util, sys
        sys.path.insert(0, sys.argv[1])
        import pathlib
        core = pathlib.Path(sys.argv[1], "i2vedit")
        for path in sorted(core.rglob("*.py")):
            rel = path.relative_to(core).with_suffix("").parts
            if rel[0] in ("hosts", "tools", "cli", "__main__"):
                continue  # the model libraries' adapters and the command line may import them
            importlib.import_module(".".join(("i2vedit", *rel[: -1 if rel[-1] == "__init__" else None])))
        spec = importlib.util.spec_from_file_location("pack", sys.argv[1] + "/__init__.py")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        heavy = [m for m in ("comfy", "diffusers", "transformers", "peft") if m in sys.modules]
        print("HEAVY", heavy)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(ROOT)], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout
