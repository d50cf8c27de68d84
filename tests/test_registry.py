"""Ready for the Comfy registry: pyproject's fields, the icon, what ``.comfyignore`` publishes, the action.

The rules are the registry's (docs.comfy.org, "Registry → pyproject.toml" and "Publishing Nodes"):
``[project] name`` without "ComfyUI", a semantic ``version``, classifiers from its list (operating
systems, GPU accelerators), ``[tool.comfy]`` with ``PublisherId``, ``DisplayName``, an ``Icon`` URL
(SVG, PNG, JPG or GIF, square, at most 400×400) and ``requires-comfyui``; ``comfy node publish``
packs the files git tracks less those ``.comfyignore`` matches (gitignore syntax).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The registry's documented classifiers (specifications page); others are not used to filter nodes.
REGISTRY_OS = {
    "Operating System :: OS Independent",
    "Operating System :: Microsoft :: Windows",
    "Operating System :: POSIX :: Linux",
    "Operating System :: MacOS",
}
REGISTRY_GPU = {
    "Environment :: GPU :: NVIDIA CUDA",
    "Environment :: GPU :: AMD ROCm",
    "Environment :: GPU :: Intel Arc",
    "Environment :: NPU :: Huawei Ascend",
    "Environment :: GPU :: Apple Metal",
}
CI_COMFY_VERSION = re.compile(r"comfyui-(\d+\.\d+\.\d+)-[0-9a-f]+\.tar\.gz")
# Published: what ComfyUI loads and what a user reads; not published: what only developers run.
PUBLISHED = ["__init__.py", "nodes/__init__.py", "i2vedit/__init__.py", "i2vedit/method/edm.py",
             "requirements.txt", "pyproject.toml", "LICENSE", "README.md", "example_workflows/README.md"]  # fmt: skip
NOT_PUBLISHED_DIRS = ["tests/", ".ci/", ".github/", "i2vedit/tools/"]


def pyproject() -> dict[str, Any]:
    if sys.version_info < (3, 11):
        pytest.skip("reading pyproject.toml needs tomllib (Python 3.11+)")
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def test_project_fields_follow_the_registry_rules() -> None:
    project = pyproject()["project"]
    name = project["name"]
    assert len(name) < 100 and "comfyui" not in name.lower()
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name), name
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), project["version"]
    assert project["description"] and project["license"] == {"file": "LICENSE"}
    assert (ROOT / "LICENSE").is_file()
    assert project["urls"]["Repository"].startswith("https://github.com/")
    classifiers = set(project["classifiers"])
    assert classifiers & REGISTRY_OS and classifiers & REGISTRY_GPU, classifiers
    assert classifiers <= REGISTRY_OS | REGISTRY_GPU, classifiers - REGISTRY_OS - REGISTRY_GPU


def test_tool_comfy_fields() -> None:
    data = pyproject()
    comfy = data["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    # the Icon is this repository's file, as GitHub serves it raw from main
    repo = data["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repo}/main/"
    assert comfy["Icon"].startswith(prefix), comfy["Icon"]
    icon = ROOT / comfy["Icon"].removeprefix(prefix)
    assert icon.suffix in (".svg", ".png", ".jpg", ".gif") and icon.is_file(), icon
    svg = ET.parse(icon).getroot()
    width, height = int(svg.get("width", "0")), int(svg.get("height", "0"))
    assert width == height and 0 < width <= 400, (width, height)
    assert isinstance(comfy.get("includes", []), list)


def test_requires_comfyui_admits_the_comfyui_ci_tests() -> None:
    spec = pyproject()["tool"]["comfy"]["requires-comfyui"]
    match = re.fullmatch(r">=(\d+\.\d+\.\d+)", spec)
    assert match, f"requires-comfyui = {spec!r}: expected '>=X.Y.Z' (the oldest ComfyUI tested)"
    tested = CI_COMFY_VERSION.search((ROOT / ".ci" / "run").read_text(encoding="utf-8"))
    assert tested, "no ComfyUI tarball named comfyui-X.Y.Z-<commit>.tar.gz in .ci/run"
    assert version_tuple(match[1]) == version_tuple(tested[1]), (spec, tested[1])
    path = os.environ.get("COMFYUI_PATH")
    version_file = Path(path or "", "comfyui_version.py")
    if path and version_file.is_file():  # the ComfyUI of this run, when there is one
        found = re.search(r'__version__ = "([\d.]+)"', version_file.read_text(encoding="utf-8"))
        assert found and version_tuple(found[1]) >= version_tuple(match[1]), (spec, found)


def tracked_files(*args: str) -> set[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", *args], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(out.stdout.splitlines())


def test_comfyignore_keeps_tests_ci_and_tools_out_of_the_published_node() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the registry publishes the files git tracks)")
    tracked = tracked_files()
    ignored = tracked_files("--ignored", "--exclude-from=.comfyignore")
    published = tracked - ignored
    for folder in NOT_PUBLISHED_DIRS:
        inside = {f for f in tracked if f.startswith(folder)}
        assert inside and inside <= ignored, f"{folder}: published {sorted(inside - ignored)[:5]}"
    for name in PUBLISHED:
        assert name in published, f"{name} must be published"
    workflows = {f for f in published if f.startswith("example_workflows/")}
    assert {Path(f).suffix for f in workflows} == {".json", ".jpg", ".md"}, workflows


def test_publish_action_follows_the_registry_docs() -> None:
    text = (ROOT / ".github" / "workflows" / "publish_action.yml").read_text(encoding="utf-8")
    assert "uses: Comfy-Org/publish-node-action@" in text
    assert "personal_access_token: ${{ secrets.REGISTRY_ACCESS_TOKEN }}" in text
    assert re.search(r"branches:\s*\n\s*- main", text) and '- "pyproject.toml"' in text
