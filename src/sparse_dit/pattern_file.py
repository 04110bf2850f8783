"""Pattern files: what an offline search (or an evaluation) decided per call site, saved for a given model.

One `.safetensors` file: the tensors, and in its header metadata, under the key "sparse_dit", a JSON object
with the format version, the method and its options, what model the file was made for (the class and a hash
of the config of each transformer, every self-attention site with its head count), the token grid it was
made at, its step buckets and the library version. Loading never unpickles: a pickle or `torch.save`
archive is refused before anything is parsed.

Per-site tensors are named "{site}/{name}" and end in the site's head dimension, (..., H); the loader checks
both against the model a file is applied to.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .plan import PlanContext

FORMAT = "sparse-dit pattern"
VERSION = 1
METADATA_KEY = "sparse_dit"
SUFFIX = ".safetensors"


def config_hash(config: Any) -> str:
    """A short stable hash of a model config (a diffusers FrozenDict or any mapping), private keys left out."""
    items = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    text = json.dumps(items, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelSignature:
    """What a pattern file is made for.

    Attributes:
        components: {transformer component name: (class name, config hash)}, "transformer" for a bare model.
        sites: {site id: number of query heads} of every hooked self-attention module.
    """

    components: dict[str, tuple[str, str]]
    sites: dict[str, int]

    def to_json(self) -> dict:
        return {"components": {k: list(v) for k, v in self.components.items()}, "sites": self.sites}

    @classmethod
    def from_json(cls, data: dict) -> "ModelSignature":
        return cls({k: tuple(v) for k, v in data["components"].items()}, {k: int(v) for k, v in data["sites"].items()})

    def differences(self, model: "ModelSignature") -> list[str]:
        """How `model` differs from what this signature describes, one phrase each; empty when it matches."""
        found = []
        for name in sorted(set(self.components) | set(model.components)):
            made, have = self.components.get(name), model.components.get(name)
            if made is None or have is None:
                found.append(f"component {name!r} is {'missing from the model' if have is None else 'not in the file'}")
            elif made[0] != have[0]:
                found.append(f"{name} is a {have[0]}, the file was made for a {made[0]}")
            elif made[1] != have[1]:
                found.append(f"{name}'s config differs from the one the file was made for (hash {have[1]} vs {made[1]})")
        if len(self.sites) != len(model.sites):
            found.append(f"the model has {len(model.sites)} self-attention sites, the file {len(self.sites)}")
        heads = {site: (h, model.sites[site]) for site, h in self.sites.items() if site in model.sites and model.sites[site] != h}
        if heads:
            site, (made, have) = next(iter(heads.items()))
            found.append(f"{site} has {have} heads, the file {made} ({len(heads)} sites differ)")
        return found


@dataclass
class PatternFile:
    """A method, its options and its per-site tensors, for one model.

    Attributes:
        method: the registered method that reads the file.
        options: the method's config options (JSON values), applied when the file is enabled.
        tensors: {name: tensor}; per-site tensors are named "{site}/{name}" and shaped (..., H).
        signature: the model the file was made for; None for a file that only names sites (checked anyway).
        grid: the (F, H, W) token grid the file was made at, if it matters to the method.
        step_buckets: the first denoising step of every step bucket; a per-site tensor's leading dimension
            indexes them when the method keys on steps.
        library_version: the sparse-dit version that wrote it.
    """

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    signature: ModelSignature | None = None
    grid: tuple[int, int, int] | None = None
    step_buckets: tuple[int, ...] = (0,)
    library_version: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ConfigError(f"a pattern file names its method, got {self.method!r}")
        buckets = tuple(self.step_buckets)
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 0:
            raise ConfigError(f"step_buckets must be increasing step indices >= 0, got {self.step_buckets}")
        self.step_buckets = buckets
        for name, tensor in self.tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise ConfigError(f"pattern tensor {name!r} is a {type(tensor).__name__}, not a tensor")

    @property
    def sites(self) -> set[str]:
        """Sites that have tensors."""
        return {name.rsplit("/", 1)[0] for name in self.tensors if "/" in name}

    def site_tensor(self, site: str | None, name: str) -> torch.Tensor | None:
        """The tensor `name` of `site`, or None."""
        return None if site is None else self.tensors.get(f"{site}/{name}")

    def bucket(self, step: int | None) -> int | None:
        """Index of the step bucket `step` falls in; None when the step is unknown or before the first bucket."""
        if step is None or step < self.step_buckets[0]:
            return None
        return bisect.bisect_right(self.step_buckets, step) - 1

    def head_values(self, ctx: PlanContext, name: str) -> list[float] | None:
        """Per-head values of tensor `name` (n_buckets, H) at the call's site and step bucket, or None where
        the file has no finite entry for it (NaN marks "no entry"). The file holds every head of the model; a
        call that holds some of them (Ulysses context parallelism) gets its own, by global head index."""
        tensor, bucket = self.site_tensor(ctx.site, name), self.bucket(ctx.step)
        if tensor is None or bucket is None or bucket >= tensor.shape[0] or tensor.shape[-1] != ctx.all_heads:
            return None
        values = tensor[bucket, ctx.head_slice].tolist()
        return None if any(math.isnan(v) for v in values) else values

    def check_model(self, model: ModelSignature) -> None:
        """Raise `ConfigError` naming what differs when this file does not fit `model`."""
        found = self.signature.differences(model) if self.signature is not None else []
        unknown = sorted(self.sites - set(model.sites))
        if unknown:
            found.append(f"{len(unknown)} of the file's sites are not in the model, e.g. {unknown[0]!r}")
        for name, tensor in self.tensors.items():
            site = name.rsplit("/", 1)[0] if "/" in name else None
            if site in model.sites and (tensor.dim() == 0 or tensor.shape[-1] != model.sites[site]):
                found.append(f"tensor {name!r} has shape {tuple(tensor.shape)}, but {site} has {model.sites[site]} heads")
                break
        if found:
            raise ConfigError(f"the {self.method!r} pattern file does not fit this model: " + "; ".join(found))

    def metadata(self) -> dict[str, Any]:
        """The JSON header of the file."""
        from . import __version__

        return {
            "format": FORMAT, "version": VERSION, "library_version": self.library_version or __version__,
            "method": self.method, "options": self.options,
            "model": None if self.signature is None else self.signature.to_json(),
            "grid": None if self.grid is None else list(self.grid), "step_buckets": list(self.step_buckets),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the file (adds ".safetensors" if missing) and return its path."""
        from safetensors.torch import save_file

        path = Path(path)
        path = path if path.suffix == SUFFIX else path.with_name(path.name + SUFFIX)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.tensors.items()}
        save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(self.metadata())})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PatternFile":
        """Read and check a pattern file; raise `ConfigError` saying what is wrong with it."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"pattern file {str(path)!r} does not exist or is not a file")
        head = path.open("rb").read(8)
        if head[:1] == b"\x80" or head[:2] == b"PK":
            raise ConfigError(
                f"{str(path)!r} is a pickle or torch.save archive; pattern files are safetensors and sparse-dit never "
                "unpickles. Re-save the tensors with safetensors (PatternFile.save)"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"{str(path)!r} is not a readable safetensors file ({exc}); the file may be truncated or corrupt") from exc
        if METADATA_KEY not in header:
            raise ConfigError(f"{str(path)!r} is a safetensors file but not a sparse-dit pattern file (no {METADATA_KEY!r} metadata)")
        try:
            meta = json.loads(header[METADATA_KEY])
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            if int(meta["version"]) > VERSION:
                raise ConfigError(f"{str(path)!r} is pattern format {meta['version']}, newer than this sparse-dit reads "
                                  f"({VERSION}); upgrade sparse-dit")
            return cls(
                method=meta["method"], options=dict(meta.get("options") or {}), tensors=tensors,
                signature=None if meta.get("model") is None else ModelSignature.from_json(meta["model"]),
                grid=None if meta.get("grid") is None else tuple(int(n) for n in meta["grid"]),
                step_buckets=tuple(int(s) for s in meta.get("step_buckets", (0,))),
                library_version=str(meta.get("library_version", "")),
            )
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{str(path)!r} has a malformed sparse-dit header ({exc})") from exc


def is_pattern_path(spec: Any) -> bool:
    """Whether `spec` names a pattern file rather than a method: a path object, a ".safetensors" name, or a
    string naming something on disk (so that a folder given as str and as Path gets the same answer)."""
    if isinstance(spec, os.PathLike):
        return True
    return isinstance(spec, str) and (spec.endswith(SUFFIX) or os.sep in spec or os.path.exists(spec))
