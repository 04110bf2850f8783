"""The embedded demo: procedurally generated captioned clips, the pipeline trained on them, and its scorer."""

from __future__ import annotations

from pathlib import Path

from ...errors import SparseDiTError

WEIGHTS = Path(__file__).parent / "weights"


def load_demo_pipeline(path: str | Path | None = None):
    """The shipped demo pipeline, loaded with `from_pretrained` from inside the package (or from `path`)."""
    from .pipeline import ShapesVideoPipeline

    path = Path(path) if path is not None else WEIGHTS
    if not (path / "model_index.json").exists():
        raise SparseDiTError(
            f"no trained demo model at {path}: the weights are not shipped yet; train them with "
            "`sparse-dit train-demo --out <dir>` and pass that folder"
        )
    return ShapesVideoPipeline.from_pretrained(path)
