"""Motion LoRA files: safetensors with ComfyUI LoRA keys, written atomically, read without pickle.

A file holds, for every trained linear (a ComfyUI/SGM module name relative to the UNet, see
``lora.targets``):

- ``diffusion_model.<module>.lora_up.weight``: (out_features, rank)
- ``diffusion_model.<module>.lora_down.weight``: (rank, in_features)
- ``diffusion_model.<module>.alpha``: scalar; ComfyUI scales the LoRA by alpha / rank

so ComfyUI's own LoRA loaders apply it as is. The authors' LoRA has no alpha (scale 1), which is
alpha = rank. The safetensors metadata (all strings) records how the LoRA was made, under keys
starting with ``i2vedit.``: format and version, rank, alpha, target set, training steps, clip
index, frames, resolution ``HxW``, seed and an optional model fingerprint.

Loading uses safetensors only: a pickle (``torch.save``) file is refused without being unpickled.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..errors import LoRAError, LoRAFileError
from ..io.files import atomic_write, looks_pickled
from .targets import (
    BLOCK_LINEARS,
    DEFAULT_TARGET_SET,
    TARGET_SETS,
    check_naming,
    check_target_set,
    is_target,
    select_targets,
    target_shapes,
    to_comfy_name,
)

FORMAT_TAG = "i2vedit.motion_lora"
FORMAT_VERSION = 1
KEY_PREFIX = "diffusion_model."
UP_SUFFIX = ".lora_up.weight"
DOWN_SUFFIX = ".lora_down.weight"
ALPHA_SUFFIX = ".alpha"
SUFFIX = ".safetensors"

_META = "i2vedit."  # prefix of this pack's metadata keys
_M_FORMAT, _M_VERSION = _META + "format", _META + "format_version"
_M_RANK, _M_ALPHA, _M_TARGETS = _META + "rank", _META + "alpha", _META + "targets"
_INT_FIELDS = {name: _META + name for name in ("steps", "clip_index", "frames", "seed")}
_M_RESOLUTION, _M_FINGERPRINT = _META + "resolution", _META + "model_fingerprint"

_MAX_LISTED = 5  # how many offending names an error message lists


class LoRAPair(NamedTuple):
    """The LoRA of one linear: y = W x + (alpha / rank) · up(down(x))."""

    down: Tensor  # (rank, in_features)
    up: Tensor  # (out_features, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoRAWeights:
    """A motion LoRA in memory: its tensors by ComfyUI module name, and how it was made.

    ``modules`` maps ComfyUI/SGM module names relative to the UNet (e.g.
    ``input_blocks.1.1.time_stack.0.attn1.to_q``) to their ``LoRAPair``. ``target_set`` is the
    ``lora.targets`` set the LoRA was trained on (inferred from the names when None). The other
    fields are optional records; ``extra_metadata`` carries any further string metadata.
    """

    modules: dict[str, LoRAPair]
    target_set: str | None = None
    steps: int | None = None
    clip_index: int | None = None
    frames: int | None = None
    resolution: tuple[int, int] | None = None  # (height, width) trained at
    seed: int | None = None
    model_fingerprint: str | None = None
    extra_metadata: dict[str, str] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The rank shared by all modules."""
        ranks = sorted({p.rank for p in self.modules.values()})
        if len(ranks) != 1:
            raise LoRAError(
                "a motion LoRA has one rank for all its layers, but "
                + ("this one has no layers" if not ranks else f"this one mixes ranks {ranks}")
                + "; train or save it again."
            )
        return ranks[0]

    @property
    def alpha(self) -> float:
        """The alpha shared by all modules."""
        alphas = sorted({float(p.alpha) for p in self.modules.values()})
        if len(alphas) != 1:
            raise LoRAError(
                "a motion LoRA has one alpha for all its layers, but "
                + (
                    "this one has no layers"
                    if not alphas
                    else f"this one mixes alphas {alphas[:_MAX_LISTED]}"
                )
                + "; train or save it again."
            )
        return alphas[0]

    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{module: (out_features, in_features)}`` of the layers the LoRA applies to."""
        return {n: (int(p.up.shape[0]), int(p.down.shape[1])) for n, p in self.modules.items()}

    def num_params(self) -> int:
        return sum(p.down.numel() + p.up.numel() for p in self.modules.values())

    def resolved_target_set(self) -> str | None:
        """``target_set``, or when it is None the smallest target set that holds every module."""
        return self.target_set if self.target_set is not None else infer_target_set(self.modules)

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata this LoRA is saved with (all values strings)."""
        meta = dict(self.extra_metadata)
        clash = sorted(k for k in meta if k.startswith(_META))
        if clash:
            raise LoRAError(
                f"extra metadata keys {clash[:_MAX_LISTED]} use the reserved prefix {_META!r}; "
                "rename them or set the matching LoRAWeights field instead."
            )
        target_set = self.resolved_target_set()
        meta[_M_FORMAT] = FORMAT_TAG
        meta[_M_VERSION] = str(FORMAT_VERSION)
        meta[_M_RANK] = str(self.rank)
        meta[_M_ALPHA] = repr(float(self.alpha))
        if target_set is not None:
            meta[_M_TARGETS] = target_set
        for attr, key in _INT_FIELDS.items():
            value = getattr(self, attr)
            if value is not None:
                meta[key] = str(int(value))
        if self.resolution is not None:
            h, w = self.resolution
            meta[_M_RESOLUTION] = f"{int(h)}x{int(w)}"
        if self.model_fingerprint is not None:
            meta[_M_FINGERPRINT] = str(self.model_fingerprint)
        return meta

    def state_dict(self) -> dict[str, Tensor]:
        """The file's tensors by key (alpha as a float32 scalar); shares memory with ``modules``."""
        out: dict[str, Tensor] = {}
        for name, pair in self.modules.items():
            out[KEY_PREFIX + name + UP_SUFFIX] = pair.up
            out[KEY_PREFIX + name + DOWN_SUFFIX] = pair.down
            out[KEY_PREFIX + name + ALPHA_SUFFIX] = torch.tensor(float(pair.alpha), dtype=torch.float32)
        return out


def infer_target_set(module_names: Iterable[str]) -> str | None:
    """The smallest target set whose rules hold every (ComfyUI-named) module, or None if none does."""
    names = list(module_names)
    if not names:
        return None
    for ts in sorted(TARGET_SETS, key=lambda t: len(BLOCK_LINEARS[t])):
        if all(is_target(n, ts, "comfy") for n in names):
            return ts
    return None


def _listed(items: Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


# ------------------------------------------------------------------------------------------ checks


def check_lora_name(name: str, what: str = "LoRA name") -> str:
    """Check a bare LoRA file name (no folder) and return it ending in ``.safetensors``.

    Refuses empty names, path separators, ``.``/``..``, control characters and characters or names
    that Windows cannot store, so a name typed into a node cannot point outside the LoRA folder.
    """
    if not isinstance(name, str) or not name.strip():
        raise LoRAFileError(f"the {what} is empty; give a file name such as 'clip0_motion'.")
    bad = sorted({c for c in name if c in '/\\<>:"|?*' or ord(c) < 32})
    if bad or name.strip() in (".", ".."):
        raise LoRAFileError(
            f"{what} {name!r} is not a bare file name"
            + (f" (it contains {' '.join(map(repr, bad))})" if bad else "")
            + "; give a name without folders or the characters / \\ < > : \" | ? *, e.g. 'clip0_motion'."
        )
    if name != name.strip() or name.endswith("."):
        raise LoRAFileError(f"{what} {name!r} starts or ends with a space or ends with a dot; remove them.")
    stem = name.split(".")[0].upper()
    if stem in {"CON", "PRN", "AUX", "NUL"} or re.fullmatch(r"(COM|LPT)[1-9]", stem):
        raise LoRAFileError(f"{what} {name!r} is reserved on Windows; choose another name.")
    return name if name.lower().endswith(SUFFIX) else name + SUFFIX


def _resolve(path: str | os.PathLike, allowed_dirs: Iterable[str | os.PathLike] | None, action: str) -> Path:
    """``path`` with symlinks and ``..`` resolved, refused when it lies outside ``allowed_dirs``."""
    resolved = Path(path).expanduser().resolve()
    if allowed_dirs is not None:
        if isinstance(allowed_dirs, (str, os.PathLike)):
            allowed_dirs = [allowed_dirs]
        roots = [Path(d).expanduser().resolve() for d in allowed_dirs]
        if not any(resolved.is_relative_to(r) for r in roots):
            where = ", ".join(str(r) for r in roots) if roots else "none are configured"
            raise LoRAFileError(
                f"cannot {action} LoRA {path}: it resolves to {resolved}, outside the allowed folders "
                f"({where}); {action} LoRAs inside one of them, e.g. by giving a bare file name."
            )
    return resolved


def _pair_problems(modules: Mapping[str, LoRAPair]) -> list[str]:
    """What is wrong with the tensors of each module (shapes, dtypes, ranks, alpha, non-finite)."""
    problems: list[str] = []
    for name, pair in modules.items():
        down, up, alpha = pair
        if not isinstance(down, Tensor) or not isinstance(up, Tensor):
            problems.append(f"{name}: down and up must be tensors")
            continue
        if down.ndim != 2 or up.ndim != 2:
            problems.append(
                f"{name}: down {tuple(down.shape)} and up {tuple(up.shape)} must both be 2-D "
                "(down rank×in, up out×rank)"
            )
            continue
        if not down.is_floating_point() or not up.is_floating_point():
            problems.append(f"{name}: tensors are {down.dtype}/{up.dtype}, not floating point")
            continue
        if up.shape[1] != down.shape[0]:
            problems.append(
                f"{name}: up {tuple(up.shape)} has rank {up.shape[1]} but down {tuple(down.shape)} "
                f"has rank {down.shape[0]}"
            )
            continue
        if down.shape[0] < 1:
            problems.append(f"{name}: rank 0")
            continue
        try:
            a = float(alpha)
        except (TypeError, ValueError):
            problems.append(f"{name}: alpha {alpha!r} is not a number")
            continue
        if not math.isfinite(a) or a <= 0:
            problems.append(f"{name}: alpha {a} is not a positive number")
            continue
        if not (bool(torch.isfinite(down).all()) and bool(torch.isfinite(up).all())):
            problems.append(f"{name}: contains NaN or infinite values (training diverged?)")
    return problems


def _check_weights(weights: LoRAWeights) -> None:
    """Validate ``weights`` for saving: well-formed tensors, one rank and alpha, names of one target set."""
    if not weights.modules:
        raise LoRAError("the LoRA has no layers; train it first (or check the target set).")
    problems = _pair_problems(weights.modules)
    if problems:
        raise LoRAError(
            f"{len(problems)} LoRA layers are malformed: {_listed(problems)}; "
            "retrain, or rebuild the LoRAWeights from the trained tensors."
        )
    _ = weights.rank, weights.alpha  # one rank, one alpha
    if weights.target_set is not None:
        ts = check_target_set(weights.target_set)
        outside = sorted(n for n in weights.modules if not is_target(n, ts, "comfy"))
        if outside:
            raise LoRAError(
                f"{len(outside)} LoRA layers are not in target set {ts!r}: {_listed(outside)}; "
                "module names must be ComfyUI names relative to the UNet "
                "(e.g. 'input_blocks.1.1.time_stack.0.attn1.to_q') of that set."
            )
    elif infer_target_set(weights.modules) is None:
        outside = sorted(n for n in weights.modules if not is_target(n, "temporal", "comfy"))
        raise LoRAError(
            f"{len(outside)} LoRA layers are not motion-LoRA targets: {_listed(outside)}; module names "
            "must be ComfyUI names of temporal-block linears relative to the UNet "
            "(e.g. 'input_blocks.1.1.time_stack.0.attn1.to_q')."
        )


def validate_rank(rank: int, module_shapes: Mapping[str, tuple[int, int]]) -> int:
    """Return ``rank`` if it is a usable LoRA rank for layers ``{name: (out, in)}``, else raise.

    A rank must be a positive integer no larger than the smallest side of the smallest target layer
    (a larger rank adds parameters but cannot add expressiveness).
    """
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise LoRAError(f"LoRA rank {rank!r} is not an integer; give a whole number such as 32.")
    if rank < 1:
        raise LoRAError(f"LoRA rank {rank} is below 1; use a positive rank (the authors use 32).")
    if not module_shapes:
        raise LoRAError("there are no target layers to size the LoRA rank against; check the target set.")
    name, (out_f, in_f) = min(module_shapes.items(), key=lambda kv: min(kv[1]))
    limit = min(int(out_f), int(in_f))
    if rank > limit:
        raise LoRAError(
            f"LoRA rank {rank} is larger than the smallest target layer allows ({name}: "
            f"{out_f}×{in_f}, at most rank {limit}); choose a rank ≤ {limit} (the authors use 32)."
        )
    return rank


def fitting_target_set(weights: LoRAWeights, unet: torch.nn.Module, naming: str = "comfy") -> str:
    """The target set ``weights`` was trained on (the default when unrecorded), once checked to fit ``unet``."""
    target_set = weights.resolved_target_set() or DEFAULT_TARGET_SET
    check_lora_fits(weights, target_shapes(unet, target_set, naming), target_set, naming)
    return target_set


def check_lora_fits(
    weights: LoRAWeights,
    module_shapes: Mapping[str, tuple[int, int]],
    target_set: str | None = None,
    naming: str = "comfy",
) -> None:
    """Raise a ``LoRAError`` naming the layers of ``weights`` that do not fit the model.

    ``module_shapes`` is ``{module: (out_features, in_features)}`` of the model's linears (at least
    its LoRA targets, e.g. from ``lora.targets.target_shapes``), in ``naming``. Checks: every LoRA
    layer exists in the model with the LoRA's shape, the rank fits each layer, and, when
    ``target_set`` is given, that the LoRA was trained on that set and covers all of its layers.
    """
    if check_naming(naming) == "diffusers":
        module_shapes = {to_comfy_name(n): s for n, s in module_shapes.items()}
    problems: list[str] = []
    expected = check_target_set(target_set) if target_set is not None else None
    actual = weights.resolved_target_set()
    if expected is not None and actual is not None and actual != expected:
        problems.append(
            f"it was trained on target set {actual!r} but {expected!r} is expected; "
            f"retrain with targets {expected!r} or use targets {actual!r}"
        )

    unknown = sorted(n for n in weights.modules if n not in module_shapes)
    if unknown:
        problems.append(
            f"{len(unknown)} of its {len(weights.modules)} layers do not exist in this model: "
            f"{_listed(unknown)} (a LoRA for another model?)"
        )
    mismatched, too_big = [], []
    for name, (out_f, in_f) in sorted(weights.shapes().items()):
        if name not in module_shapes:
            continue
        m_out, m_in = (int(x) for x in module_shapes[name])
        if (out_f, in_f) != (m_out, m_in):
            mismatched.append(f"{name} (LoRA {out_f}×{in_f}, model {m_out}×{m_in})")
        elif weights.modules[name].rank > min(m_out, m_in):
            too_big.append(f"{name} (rank {weights.modules[name].rank} > {min(m_out, m_in)})")
    if mismatched:
        problems.append(
            f"{len(mismatched)} layers have other shapes than in this model: {_listed(mismatched)} "
            "(a LoRA for another model?)"
        )
    if too_big:
        problems.append(f"{len(too_big)} layers have a rank larger than the layer: {_listed(too_big)}")
    if expected is not None:
        same_set = actual is None or actual == expected  # else already reported above
        outside = sorted(n for n in weights.modules if not is_target(n, expected, "comfy"))
        if outside and same_set:
            problems.append(f"{len(outside)} layers are not in target set {expected!r}: {_listed(outside)}")
        missing = sorted(set(select_targets(module_shapes, expected, "comfy")) - set(weights.modules))
        if missing and same_set:
            problems.append(f"it lacks {len(missing)} of the model's {expected!r} layers: {_listed(missing)}")
    if problems:
        raise LoRAError(
            "the motion LoRA does not fit this model: "
            + "; ".join(problems)
            + ". Use a LoRA trained on this SVD model with these settings, or train one."
        )


# ------------------------------------------------------------------------------------------- save


def save_lora(
    path: str | os.PathLike,
    weights: LoRAWeights,
    allowed_dirs: Iterable[str | os.PathLike] | None = None,
) -> Path:
    """Write ``weights`` to the safetensors file ``path`` atomically and return the resolved path.

    The file is written to a temporary file in the same folder and moved into place with
    ``os.replace``, so a failure leaves any previous file intact and no partial file behind; the
    in-memory ``weights`` are never modified. With ``allowed_dirs`` a path outside those folders
    (after resolving symlinks and ``..``) is refused.
    """
    p = _resolve(path, allowed_dirs, "save")
    if p.suffix.lower() != SUFFIX:
        raise LoRAFileError(f"{path} does not end in {SUFFIX}; motion LoRAs are saved as {SUFFIX} files.")
    _check_weights(weights)
    # Private CPU copies: safetensors needs contiguous tensors that share no memory with each other.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.state_dict().items()}
    metadata = weights.metadata()
    atomic_write(p, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), "LoRA", error=LoRAFileError)
    return p


# ------------------------------------------------------------------------------------------- load

_FOREIGN_HINTS = (
    (re.compile(r"^lora_unet_|^lora_te"), "a kohya-style LoRA"),
    (re.compile(r"\.lora_[AB]\.|\.lora\.(up|down)\.|lora_linear_layer"), "a peft/diffusers-style LoRA"),
    (re.compile(r"\.diff(_b)?$"), "a full-weight difference (ComfyUI training output)"),
    (re.compile(r"^(model\.)?diffusion_model\.[^.]+.*\.(weight|bias)$"), "a model checkpoint"),
    (re.compile(r"^(down_blocks|mid_block|up_blocks|conv_in|time_embedding)\."), "a diffusers model"),
)


def _foreign_hint(keys: list[str]) -> str:
    for pattern, what in _FOREIGN_HINTS:
        if any(pattern.search(k) for k in keys):
            return f" It looks like {what}, not a motion LoRA saved by this pack."
    return ""


def _sniff(p: Path) -> None:
    """Refuse pickle / zip (torch.save) files by their first bytes, before any parser sees them."""
    if looks_pickled(p):
        raise LoRAFileError(
            f"{p} is a PyTorch pickle file (torch.save), not safetensors; it was not opened, because "
            "unpickling can run arbitrary code. Give a .safetensors motion LoRA saved by this pack."
        )


def _parse_int(meta: Mapping[str, str], key: str, p: Path) -> int | None:
    if key not in meta:
        return None
    try:
        return int(meta[key])
    except ValueError:
        raise LoRAFileError(
            f"{p}: metadata {key!r} is {meta[key]!r}, not an integer; the file was edited or damaged. "
            "Save the LoRA again."
        ) from None


def _parse_metadata(meta: Mapping[str, str], p: Path) -> dict[str, Any]:
    """LoRAWeights fields from the file metadata, refusing unknown formats and malformed values."""
    fields: dict[str, Any] = {"extra_metadata": {k: v for k, v in meta.items() if not k.startswith(_META)}}
    if _M_FORMAT in meta and meta[_M_FORMAT] != FORMAT_TAG:
        raise LoRAFileError(
            f"{p} is tagged {meta[_M_FORMAT]!r}, not an I2VEdit motion LoRA ({FORMAT_TAG!r}); "
            "give a motion LoRA saved by this pack."
        )
    version = _parse_int(meta, _M_VERSION, p)
    if version is not None and version > FORMAT_VERSION:
        raise LoRAFileError(
            f"{p} has motion-LoRA format version {version}, newer than this pack reads ({FORMAT_VERSION}); "
            "update the I2VEdit node pack."
        )
    if _M_TARGETS in meta:
        if meta[_M_TARGETS] not in TARGET_SETS:
            raise LoRAFileError(
                f"{p} was trained on target set {meta[_M_TARGETS]!r}, which this pack does not know "
                f"({', '.join(TARGET_SETS)}); update the I2VEdit node pack or train the LoRA again."
            )
        fields["target_set"] = meta[_M_TARGETS]
    for attr, key in _INT_FIELDS.items():
        fields[attr] = _parse_int(meta, key, p)
    if _M_RESOLUTION in meta:
        m = re.fullmatch(r"(\d+)x(\d+)", meta[_M_RESOLUTION])
        if m is None:
            raise LoRAFileError(
                f"{p}: metadata {_M_RESOLUTION!r} is {meta[_M_RESOLUTION]!r}, not HxW (e.g. '512x896'); "
                "the file was edited or damaged. Save the LoRA again."
            )
        fields["resolution"] = (int(m.group(1)), int(m.group(2)))
    fields["model_fingerprint"] = meta.get(_M_FINGERPRINT)
    return fields


def _group_keys(keys: list[str], p: Path) -> dict[str, dict[str, str]]:
    """``{module: {"up"|"down"|"alpha": key}}``, refusing keys of any other kind and unpaired layers."""
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    bad: list[str] = []
    for key in keys:
        rest = key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else None
        for suffix, slot in ((UP_SUFFIX, "up"), (DOWN_SUFFIX, "down"), (ALPHA_SUFFIX, "alpha")):
            if rest is not None and rest.endswith(suffix) and len(rest) > len(suffix):
                groups[rest[: -len(suffix)]][slot] = key
                break
        else:
            bad.append(key)
    if bad:
        raise LoRAFileError(
            f"{len(bad)} of the {len(keys)} keys in {p} are not motion-LoRA keys "
            f"({KEY_PREFIX}<module>{UP_SUFFIX} / {DOWN_SUFFIX} / {ALPHA_SUFFIX}): {_listed(sorted(bad))}."
            + _foreign_hint(bad)
            + " Give a motion LoRA saved by this pack."
        )
    if not groups:
        raise LoRAFileError(f"{p} holds no LoRA weights; give a motion LoRA saved by this pack.")
    unpaired = sorted(
        f"{m} (no {'up' if 'up' not in g else 'down'})"
        for m, g in groups.items()
        if "up" not in g or "down" not in g
    )
    if unpaired:
        raise LoRAFileError(
            f"{len(unpaired)} layers in {p} lack their up or down matrix: {_listed(unpaired)}; "
            "the file is incomplete. Save the LoRA again."
        )
    not_targets = sorted(m for m in groups if not is_target(m, "temporal", "comfy"))
    if not_targets:
        raise LoRAFileError(
            f"{len(not_targets)} layers in {p} are not temporal-block layers of the SVD UNet: "
            f"{_listed(not_targets)}; it is not a motion LoRA (a LoRA for another model or other layers?). "
            "Give a motion LoRA saved by this pack."
        )
    return groups


def load_lora(
    path: str | os.PathLike, allowed_dirs: Iterable[str | os.PathLike] | None = None
) -> LoRAWeights:
    """Read a motion LoRA file (safetensors only; never unpickles) into CPU tensors.

    Raises ``LoRAFileError`` saying what is wrong for a missing, unreadable, truncated or pickle
    file, keys of another kind, unpaired or mismatched up/down matrices, metadata that contradicts
    the tensors, or (with ``allowed_dirs``) a path outside those folders.
    """
    p = _resolve(path, allowed_dirs, "load")
    if not p.exists():
        raise LoRAFileError(f"no LoRA file at {path}; check the path (and that training saved it).")
    if not p.is_file():
        raise LoRAFileError(f"{path} is not a file; give the path of a {SUFFIX} motion LoRA.")
    try:
        _sniff(p)
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            keys = sorted(f.keys())
            groups = _group_keys(keys, p)
            tensors = {k: f.get_tensor(k) for k in keys}
    except SafetensorError as e:
        raise LoRAFileError(
            f"{p} is not a readable safetensors file ({e}); it may be truncated or damaged (an "
            "interrupted save, copy or download?) or not a LoRA at all. Save or copy it again."
        ) from e
    except OSError as e:
        raise LoRAFileError(f"cannot read {p} ({e}); check that the file is readable.") from e

    fields = _parse_metadata(meta, p)
    modules: dict[str, LoRAPair] = {}
    for name, g in sorted(groups.items()):
        down, up = tensors[g["down"]], tensors[g["up"]]
        alpha = float(down.shape[0]) if down.ndim == 2 else 1.0  # no alpha: scale 1, as in ComfyUI
        if "alpha" in g:
            a = tensors[g["alpha"]]
            if a.numel() != 1:
                raise LoRAFileError(
                    f"{p}: alpha of {name} has shape {tuple(a.shape)}, not a single number; "
                    "the file is damaged. Save the LoRA again."
                )
            alpha = float(a.reshape(()).item())
        modules[name] = LoRAPair(down, up, alpha)
    problems = _pair_problems(modules)
    if problems:
        raise LoRAFileError(
            f"{len(problems)} layers in {p} are malformed: {_listed(problems)}; save or train the LoRA again."
        )
    weights = LoRAWeights(modules, **fields)
    try:
        rank, alpha = weights.rank, weights.alpha
    except LoRAError as e:
        raise LoRAFileError(f"{p}: {e}") from None

    meta_rank = _parse_int(meta, _M_RANK, p)
    if meta_rank is not None and meta_rank != rank:
        raise LoRAFileError(
            f"{p}: metadata says rank {meta_rank} but the tensors have rank {rank}; the file was edited "
            "or damaged. Save the LoRA again."
        )
    if _M_ALPHA in meta:
        try:
            meta_alpha = float(meta[_M_ALPHA])
        except ValueError:
            meta_alpha = math.nan
        # The tensors hold alpha in float32; the metadata keeps the exact value.
        if float(torch.tensor(meta_alpha, dtype=torch.float32)) != alpha:
            raise LoRAFileError(
                f"{p}: metadata says alpha {meta[_M_ALPHA]!r} but the tensors have alpha {alpha}; the "
                "file was edited or damaged. Save the LoRA again."
            )
        weights.modules = {n: pr._replace(alpha=meta_alpha) for n, pr in modules.items()}
    if weights.target_set is not None:
        outside = sorted(n for n in modules if not is_target(n, weights.target_set, "comfy"))
        if outside:
            raise LoRAFileError(
                f"{p} says it was trained on target set {weights.target_set!r}, but {len(outside)} of its "
                f"layers are outside it: {_listed(outside)}; the file was edited or damaged. Save it again."
            )
    return weights
