"""A headless ComfyUI server for tests: the pack installed in ``custom_nodes/`` and driven over HTTP.

``ComfyServer`` builds a throw-away ComfyUI base directory whose ``custom_nodes/`` holds a symlink
to this project (loaded by ComfyUI's own loader, as ComfyUI Manager installs it) and the test-only
nodes of ``tests/comfy_test_nodes`` (``I2VEditTest_*``), starts ``main.py --cpu`` from
``COMFYUI_PATH`` with this interpreter, and talks to it with ``urllib`` (no websocket: results are
polled from ``/history``). The server is always stopped, and its process group killed, on exit.

Use the ``comfy_server`` fixture (session-scoped; skips without ``COMFYUI_PATH``)::

    def test_x(comfy_server):
        entry = comfy_server.run({"1": {"class_type": "I2VEditTest_MovingSquare", "inputs": {...}}, ...})
        files = comfy_server.output_files(entry)
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_NODES = Path(__file__).resolve().parent / "comfy_test_nodes"
# Folder names in custom_nodes/; the pack's python_module in /object_info is custom_nodes.<PACK_DIR_NAME>.
PACK_DIR_NAME = "i2vedit"
TEST_NODES_DIR_NAME = "i2vedit_test_nodes"
MODEL_FOLDERS = ("checkpoints", "clip_vision", "vae", "loras", "diffusion_models")


class ComfyServerError(RuntimeError):
    """The server failed to start, answer, or finish a prompt; the message ends with its log tail."""


class PromptRejected(ComfyServerError):
    """``POST /prompt`` answered HTTP 400: the graph failed validation."""

    def __init__(self, message: str, error: Any, node_errors: dict[str, Any]) -> None:
        super().__init__(message)
        self.error, self.node_errors = error, node_errors


class PromptFailed(ComfyServerError):
    """A queued prompt finished with status ``error`` (an exception in a node, or an interrupt)."""

    def __init__(self, message: str, entry: dict[str, Any]) -> None:
        super().__init__(message)
        self.entry = entry


def _die_with_parent() -> None:  # pragma: no cover  (runs in the child between fork and exec)
    """Linux: SIGKILL the server if the test process dies without cleaning up (e.g. killed by a CI timeout)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_messages(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A history entry's status messages by event name (``execution_success``, ``execution_error``, ...)."""
    return {event: data for event, data in entry.get("status", {}).get("messages", [])}


class ComfyServer:
    """One ComfyUI server process on a free local port; a context manager (``with ComfyServer() as s``)."""

    def __init__(
        self,
        comfy_path: str | os.PathLike[str] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        extra_args: tuple[str, ...] = (),
        startup_timeout: float = 120.0,
    ) -> None:
        path = comfy_path or os.environ.get("COMFYUI_PATH")
        if not path:
            raise ComfyServerError("no ComfyUI: pass comfy_path or set COMFYUI_PATH to a ComfyUI checkout.")
        self.comfy_path = Path(path).resolve()
        if not (self.comfy_path / "main.py").is_file():
            raise ComfyServerError(f"{self.comfy_path} does not look like a ComfyUI checkout (no main.py).")
        self._own_base = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="i2vedit_comfy_")).resolve()
        self.extra_args, self.startup_timeout = tuple(extra_args), startup_timeout
        self.port = 0
        self.client_id = uuid.uuid4().hex
        self.process: subprocess.Popen[bytes] | None = None

    # ---- paths ---------------------------------------------------------------------------------

    @property
    def custom_nodes_dir(self) -> Path:
        return self.base_dir / "custom_nodes"

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- lifecycle -----------------------------------------------------------------------------

    def _prepare(self) -> None:
        self.custom_nodes_dir.mkdir(parents=True, exist_ok=True)
        for name, target in ((PACK_DIR_NAME, ROOT), (TEST_NODES_DIR_NAME, TEST_NODES)):
            link = self.custom_nodes_dir / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        for sub in MODEL_FOLDERS:
            (self.models_dir / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(exist_ok=True)

    def start(self) -> ComfyServer:
        if self.process is not None:
            return self
        self._prepare()
        self.port = free_port()
        cmd = [
            sys.executable,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base_dir),
            "--disable-auto-launch",
            "--disable-api-nodes",  # the paid-API nodes: slow to import, need the network
            "--database-url",
            "sqlite:///:memory:",  # the default would create user/comfyui.db inside the checkout
            *self.extra_args,
        ]
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the pack must load through custom_nodes/, never from sys.path
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave no __pycache__ in the ComfyUI checkout or the project
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
        env["HF_HUB_OFFLINE"] = "1"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                cmd,
                cwd=self.comfy_path,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so stop() reaches any children too
                preexec_fn=_die_with_parent,
            )
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ComfyServerError(
                    f"ComfyUI exited with code {self.process.returncode} while starting.\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError, ValueError):
                self.get("/system_stats", timeout=2.0)
                return
            time.sleep(0.25)
        raise ComfyServerError(
            f"ComfyUI did not answer /system_stats within {self.startup_timeout:.0f} s.\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (SIGTERM to its process group, then SIGKILL); safe to call twice."""
        proc, self.process = self.process, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
        if proc.poll() is None:
            raise ComfyServerError(f"ComfyUI (pid {proc.pid}) did not stop.")
        if self._own_base and not os.environ.get("I2VEDIT_KEEP_COMFY_BASE"):
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # ---- the log -------------------------------------------------------------------------------

    def log(self) -> str:
        """Everything the server wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        return f"---- ComfyUI log tail ({self.log_path}) ----\n{self.log()[-chars:]}"

    # ---- HTTP ----------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str, timeout: float = 30.0) -> Any:
        status, payload = self._request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyServerError(f"GET {path} answered HTTP {status}: {payload}")
        return payload

    def post(self, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        return self._request("POST", path, {} if body is None else body, timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        """``/object_info`` (all node classes), or one class's entry."""
        if node_class is None:
            return self.get("/object_info")
        return self.get(f"/object_info/{node_class}")[node_class]

    def queue(self, prompt: dict[str, Any]) -> str:
        """Queue an API-format prompt; its prompt_id. Raises ``PromptRejected`` on validation errors."""
        status, payload = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status == 400:
            err, node_errors = payload.get("error"), payload.get("node_errors", {})
            raise PromptRejected(
                f"prompt rejected: {json.dumps(err)}; node_errors: {json.dumps(node_errors)}",
                err,
                node_errors,
            )
        if status != 200 or "prompt_id" not in payload:
            raise ComfyServerError(f"POST /prompt answered HTTP {status}: {payload}\n{self.log_tail()}")
        return payload["prompt_id"]

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The prompt's ``/history`` entry once it has finished (success, error or interrupt), else None."""
        entry = self.get(f"/history/{prompt_id}").get(prompt_id)
        if entry is None or entry.get("status", {}).get("status_str") not in ("success", "error"):
            return None
        return entry

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.1) -> dict[str, Any]:
        """Poll ``/history`` until the prompt has finished; its entry (``status``, ``outputs``, ...)."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                return entry
            if not self.running:
                raise ComfyServerError(f"ComfyUI died while running {prompt_id}.\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ComfyServerError(
                    f"prompt {prompt_id} not finished after {timeout:.0f} s.\n{self.log_tail()}"
                )
            time.sleep(poll)

    def run(self, prompt: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        """Queue, wait and require ``success``; the history entry. Raises ``PromptFailed`` otherwise."""
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"]["status_str"] != "success":
            msgs = status_messages(entry)
            err = msgs.get("execution_error") or msgs.get("execution_interrupted") or entry["status"]
            detail = json.dumps(err, indent=1)[-3000:]
            raise PromptFailed(f"prompt failed: {detail}\n{self.log_tail()}", entry)
        return entry

    def running_prompt_ids(self) -> list[str]:
        return [item[1] for item in self.get("/queue").get("queue_running", [])]

    def interrupt(self, prompt_id: str | None = None) -> None:
        """``POST /interrupt``: stop the running prompt (only if it is ``prompt_id``, when given)."""
        status, payload = self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        if status != 200:
            raise ComfyServerError(f"POST /interrupt answered HTTP {status}: {payload}")

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """``POST /free``: unload models and drop the executor's cached node outputs."""
        self.post("/free", {"unload_models": unload_models, "free_memory": free_memory})

    def output_files(self, entry: dict[str, Any]) -> list[Path]:
        """Files a finished prompt's output nodes saved (``type: output``) under ``output_dir``."""
        files = []
        for node_out in entry.get("outputs", {}).values():
            for items in node_out.values():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and item.get("type") == "output" and "filename" in item:
                        files.append(self.output_dir / item.get("subfolder", "") / item["filename"])
        return files


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    """One headless ComfyUI with the pack and the ``I2VEditTest_*`` nodes for the whole session.

    Skips without ``COMFYUI_PATH``. Node outputs are cached between prompts, as in ComfyUI; call
    ``comfy_server.free()`` for a cold start. The base directory stays under pytest's temp folder.
    """
    if not os.environ.get("COMFYUI_PATH"):
        from conftest import COMFY_SKIP  # lazy: conftest may import this module

        pytest.skip(COMFY_SKIP)
    server = ComfyServer(base_dir=tmp_path_factory.mktemp("comfy_base", numbered=True))
    try:
        server.start()
    except ComfyServerError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        server.stop()
