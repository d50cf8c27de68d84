"""Small file helpers shared by the pipeline, training checkpoints and the command line.

Every file the project writes goes through ``atomic_write``: the content is written to a temporary
file in the target's folder, flushed to disk, and moved onto the target in one step, so a failure
(a full disk, Ctrl-C, a crash) leaves the previous file as it was and no half-written file behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import I2VEditError

# Writers that pick the format from the file name's extension (OpenCV) get it at the end of the temp name.
_VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm")
_FORMAT_SUFFIXES = frozenset((*_VIDEO_SUFFIXES, ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"))
_TEMP_STEM_CHARS = 64  # the temp name stays well under the 255-byte name limit for any target name


def writable_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``path`` if needed and prove it can be written, before any computing starts."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".i2vedit-write-test.", dir=p)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise I2VEditError(f"cannot write to the {what} {p} ({e}); choose a folder you can write to.") from e
    return p


def looks_pickled(path: str | os.PathLike) -> bool:
    """True for a pickle or zip (``torch.save``) file, judged by its first bytes, without parsing it."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        return False
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _temp_path(target: Path) -> Path:
    token = secrets.token_hex(4)
    if target.suffix.lower() in _FORMAT_SUFFIXES:
        return target.parent / f".{target.stem[:_TEMP_STEM_CHARS]}.{token}.tmp{target.suffix}"
    return target.parent / f".{target.name[:_TEMP_STEM_CHARS]}.{token}.tmp"


def _create_temp(target: Path, error: type[I2VEditError]) -> Path:
    """An empty new file next to ``target``, created with mode 0o666 so the umask gives the user's
    normal permissions (``tempfile.mkstemp`` would give 0o600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = _temp_path(target)
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise error(
                f"cannot write to folder {target.parent} ({e}); choose a folder you can write to."
            ) from e
        os.close(fd)
        return tmp
    raise error(f"cannot create a temporary file in {target.parent}; remove stale .tmp files there.")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; skipped where folders cannot be opened or synced (Windows, some filesystems)."""
    if os.name == "nt":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike, what: str = "file", *, error: type[I2VEditError] = I2VEditError
) -> Iterator[Path]:
    """``atomic_write`` as a context: the block writes the yielded temp path, which replaces ``path`` when
    the block ends without an exception (for writers that write piece by piece)."""
    target = Path(path)
    try:
        is_dir, has_folder = target.is_dir(), target.parent.is_dir()
    except OSError as e:  # e.g. a name over the filesystem's length limit
        raise error(f"cannot write {what} {target} ({e}); choose a shorter name or another folder.") from e
    if is_dir:
        raise error(f"{target} is a folder; give a file path to write the {what} to.")
    if not has_folder:
        raise error(f"folder {target.parent} does not exist; create it first or choose an existing folder.")
    tmp = _create_temp(target, error)
    try:
        mode = tmp.stat().st_mode & 0o777  # 0o666 minus the umask, as the system gave it
        yield tmp
        if tmp.stat().st_mode & 0o777 != mode:  # a writer that made its own file (safetensors: 0o600)
            os.chmod(tmp, mode)
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, I2VEditError) or not isinstance(e, Exception):
            raise  # already says what to do, or an interrupt that must stay one
        raise error(
            f"could not write {what} {target} ({type(e).__name__}: {e}); check free disk space and that the "
            "folder is writable, then try again. Any previous file there is unchanged."
        ) from e
    _fsync_folder(target.parent)


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[Path], object],
    what: str = "file",
    *,
    error: type[I2VEditError] = I2VEditError,
) -> Path:
    """Write ``path`` through ``write(tmp_path)`` so that it is replaced whole or not at all.

    ``write`` writes the content to ``tmp_path``, a new file in the same folder (named
    ``.{name}.XXXX.tmp``, or ``.{stem}.XXXX.tmp{suffix}`` for video and image suffixes, whose writers
    pick the format from the extension). The temp file is then synced to disk and moved onto
    ``path``, and the folder synced. On any failure, Ctrl-C included, the temp file is removed and
    a previous file at ``path`` is left intact; errors other than ``I2VEditError`` and interrupts
    are raised as ``error`` (an ``I2VEditError`` class) naming ``what`` could not be written and why.
    The file gets the user's normal permissions (0o666 minus the umask). Returns ``path``.
    """
    with atomic_file(path, what, error=error) as tmp:
        write(tmp)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, what: str = "file") -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see ``atomic_write``."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), what)


def save_safetensors_atomic(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write a safetensors file atomically (see ``atomic_write``): never a half-written file."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata), "safetensors file")


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A stored safetensors file's tensors and metadata; ``I2VEditError`` when it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no iterator)
    except (OSError, SafetensorError) as e:
        raise I2VEditError(f"it is damaged ({e})") from e
    return tensors, meta
