"""The reuse folder: per-clip inversions, LoRAs and edits of one video and model, kept between runs.

Inversions and LoRAs are shared by every edit of the video (their settings are in the manifest);
each stored edit is keyed by a digest of everything that shapes it (``edit_key`` / ``chain_key``),
so edits of one source coexist. Every file records its clip and frame range, checked on load; a
file that cannot be read is recomputed (with a warning), one of another clip is refused. One run
at a time: a lock file keeps a second run out. ``ReuseStore.get`` is the one load-or-compute path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..errors import I2VEditError
from ..io.files import writable_folder, write_text_atomic

log = logging.getLogger("i2vedit")

T = TypeVar("T")
Span = tuple[int, int]
MANIFEST = "manifest.json"
LOCK = ".lock"
CLAIM = ".claim"
# a claim on another machine counts as abandoned when its file has not been touched for this long (the
# worker holding it touches it at least every CLAIM_HEARTBEAT seconds while it works)
CLAIM_STALE_SECONDS = 600.0
CLAIM_HEARTBEAT = 30.0


def _alive(holder: Mapping[str, Any]) -> bool:
    """Whether the process a lock or claim file names (on this machine) still runs."""
    pid = int(holder.get("pid", -1))
    return pid > 0 and _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        import psutil  # in every ComfyUI install; optional on the command line

        return bool(psutil.pid_exists(pid))
    except ImportError:
        pass
    if os.name == "nt":
        return True  # cannot tell without psutil: treat the lock as held
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ReuseFolder:
    """A locked reuse folder with its manifest (see the module docstring).

    ``worker=True`` joins a folder other processes use too (clip-parallel preparation): no folder lock,
    the manifest must match (it is written by whoever came first), and clips are claimed one by one
    (``claim``), so that no two processes compute the same clip.
    """

    def __init__(self, path: str | Path, identity: dict[str, Any], worker: bool = False) -> None:
        self.path = writable_folder(path, "reuse folder")
        self.identity = identity
        self.warnings: list[str] = []
        self._lock: Path | None = None if worker else self._acquire()
        self._beats: dict[int, float] = {}
        try:
            self._check_manifest()
        except BaseException:
            self.release()
            raise

    def _acquire(self) -> Path:
        lock = self.path / LOCK

        def ended(holder: dict[str, Any] | None) -> bool:
            return holder is not None and holder.get("host") == socket.gethostname() and not _alive(holder)

        if self._mark(lock, ended, "which has ended; taking the folder over"):
            return lock
        holder = self._lock_holder(lock)
        who = (
            f"process {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"
            if holder is not None
            else "a run whose lock file cannot be read"
        )
        raise I2VEditError(
            f"the reuse folder {self.path} is in use by another run ({who}); wait for it to finish or "
            f"give another reuse folder. If no other run is using it, delete {lock}."
        )

    def _mark(self, path: Path, gone: Callable[[dict[str, Any] | None], bool], taking_over: str) -> bool:
        """Create ``path`` holding this process's pid, host and start time, unless it exists; one left by a
        holder that ``gone`` says is gone is replaced, with a warning. Whether this process holds it now."""
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._lock_holder(path)
                if not gone(holder):
                    return False
                who = holder or {}
                self.warn(f"{path} was left by process {who.get('pid')} on {who.get('host')}, {taking_over}.")
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)  # fmt: skip
            return True
        return False

    @staticmethod
    def _lock_holder(lock: Path) -> dict[str, Any] | None:
        try:
            holder = json.loads(lock.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def release(self) -> None:
        """Give the folder back to other runs (idempotent)."""
        if self._lock is not None:
            self._lock.unlink(missing_ok=True)
            self._lock = None

    def __enter__(self) -> ReuseFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _check_manifest(self) -> None:
        manifest = self.path / MANIFEST
        if not manifest.exists():
            write_text_atomic(manifest, json.dumps(self.identity, indent=1))
            return
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            raise I2VEditError(f"{manifest} is unreadable ({e}); delete the folder or choose another.") from e
        for key in ("format", "video", "model", "settings"):
            theirs, ours = old.get(key), self.identity.get(key)
            if theirs != ours:
                if isinstance(theirs, dict) and isinstance(ours, dict):  # name the settings that differ
                    names = sorted(k for k in {*theirs, *ours} if theirs.get(k) != ours.get(k))
                    theirs = {k: theirs.get(k) for k in names}
                    ours = {k: ours.get(k) for k in names}
                raise I2VEditError(
                    f"the reuse folder {self.path} belongs to another {key} ({theirs!r}, this run has "
                    f"{ours!r}); its inversions and LoRAs cannot be reused. Choose another folder, or start "
                    "every worker of one run with the same command."
                )

    def claim(self, i: int) -> bool:
        """Take clip ``i`` for this process; False while another live process holds it. A claim whose
        process has ended (this machine) or that has not been touched for ``CLAIM_STALE_SECONDS`` (another
        machine) is taken over, with a warning."""
        path = self.clip_dir(i) / CLAIM
        holder = self._lock_holder(path) or {}
        mine = holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()
        if mine or self._mark(
            path, lambda h: self._abandoned(path, h or {}), "which stopped; taking it over"
        ):
            self._beats[i] = time.monotonic()
            return True
        return False

    @staticmethod
    def _abandoned(path: Path, holder: Mapping[str, Any]) -> bool:
        if holder.get("host") == socket.gethostname():
            return not _alive(holder)
        try:
            return time.time() - path.stat().st_mtime > CLAIM_STALE_SECONDS
        except OSError:
            return True

    def heartbeat(self, i: int) -> None:
        """Touch this process's claim of clip ``i`` (at most every ``CLAIM_HEARTBEAT`` seconds)."""
        now = time.monotonic()
        if now - self._beats.get(i, 0.0) >= CLAIM_HEARTBEAT:
            self._beats[i] = now
            with contextlib.suppress(OSError):
                os.utime(self.file(i, CLAIM))

    def release_claim(self, i: int) -> None:
        self.file(i, CLAIM).unlink(missing_ok=True)
        self._beats.pop(i, None)

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)

    def clip_dir(self, i: int) -> Path:
        d = self.path / f"clip_{i:03d}"
        d.mkdir(exist_ok=True)
        return d

    def file(self, i: int, name: str) -> Path:
        return self.path / f"clip_{i:03d}" / name

    def has(self, i: int, name: str) -> bool:
        return self.file(i, name).is_file()

    @staticmethod
    def clip_meta(i: int, span: tuple[int, int]) -> dict[str, str]:
        return {"pipeline.clip": str(i), "pipeline.frames": f"{span[0]},{span[1]}"}

    def check_clip(self, path: Path, meta: Mapping[str, str], i: int, span: Span) -> None:
        """Refuse a stored file made for another clip or frame range (a folder changed by hand)."""
        want = self.clip_meta(i, span)
        got = {k: meta.get(k) for k in want}
        if got != want:
            raise I2VEditError(
                f"{path} was made for clip {got['pipeline.clip']} (frames {got['pipeline.frames']}), but it "
                f"lies in the folder of clip {i} (frames {span[0]},{span[1]}): the reuse folder was changed "
                "by hand. Delete that file (it is recomputed) or the whole folder."
            )

    def load(
        self, i: int, name: str, span: Span, read: Callable[[Path], tuple[T, Mapping[str, str]]]
    ) -> T | None:
        """Clip ``i``'s stored ``name`` read by ``read``; None when absent or unreadable (a warning: it is
        recomputed). A file made for another clip or frame range is refused."""
        if not self.has(i, name):
            return None
        path = self.file(i, name)
        try:
            value, meta = read(path)
        except I2VEditError as e:
            self.warn(f"{path} cannot be used ({e}); recomputing it.")
            return None
        self.check_clip(path, meta, i, span)
        return value


class ReuseStore:
    """Load-or-compute of each per-clip artefact, through a reuse folder when there is one."""

    def __init__(self, folder: ReuseFolder | None) -> None:
        self.folder = folder

    def get(
        self,
        i: int,
        span: Span,
        name: str,
        read: Callable[[Path], tuple[T, Mapping[str, str]]],
        make: Callable[[], T],
        write: Callable[[Path, T, dict[str, str]], object],
    ) -> tuple[T, bool]:
        """The stored artefact if it can be used, else ``make()`` (stored by ``write``); and whether it was stored."""
        folder = self.folder
        value = folder.load(i, name, span, read) if folder is not None else None
        if value is not None:
            return value, True
        value = make()
        if folder is not None:
            write(folder.clip_dir(i) / name, value, folder.clip_meta(i, span))
        return value, False

    @property
    def warnings(self) -> list[str]:
        return self.folder.warnings if self.folder is not None else []


def edit_key(edited: torch.Tensor, identity: Mapping[str, Any]) -> str:
    """A digest of everything that shapes an edit's first clip beyond the folder's own identity: the edited
    frame and the edit's settings (``EditSettings.edit_identity``)."""
    h = hashlib.sha256(repr(tuple(edited.shape)).encode())
    h.update(edited.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(json.dumps(identity, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def chain_key(key: str, prev: tuple[torch.Tensor, torch.Tensor] | None) -> str:
    """The key of one clip of an edit: the edit's key and, after clip 0, what the clip continues from."""
    if prev is None:
        return key
    h = hashlib.sha256(key.encode())
    for t in prev:
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:20]
