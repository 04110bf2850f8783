"""Load a pipeline by name: the shipped demo model, a demo model folder, or a local diffusers pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import SparseDiTError


def load_pipeline(name: str) -> tuple[Any, str]:
    """The pipeline `name` names, and a description of it for reports.

    Args:
        name: "demo" or "demo:<variant>" (the shipped demo model), a folder `sparse-dit train-demo` wrote, or a
            local diffusers pipeline folder or hub id already in the local cache. Nothing is downloaded.
    """
    from ..demo import load_demo_pipeline

    if name == "demo" or name.startswith("demo:"):
        variant = name.partition(":")[2] or "concentrated"
        return load_demo_pipeline(variant), f"the shipped demo model ({variant})"
    index = Path(name) / "model_index.json"
    if index.exists() and json.loads(index.read_text()).get("_class_name") == "ShapesVideoPipeline":
        return load_demo_pipeline(name), f"demo model from {name}"
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(name, local_files_only=True), name
    except (OSError, ValueError) as exc:
        raise SparseDiTError(
            f"no pipeline at {name!r} in a local folder or the local Hugging Face cache ({exc.__class__.__name__}); "
            "sparse-dit never downloads: fetch it first (e.g. `huggingface-cli download <id>`), or pass 'demo'"
        ) from exc
