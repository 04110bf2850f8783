"""The embedded demo: procedurally generated captioned clips, the pipeline trained on them, and its scorer."""

from __future__ import annotations

from pathlib import Path

from ..errors import SparseDiTError

# Two trained variants of one recipe. `concentrated` (the default) attends like a real video DiT: the top 20% of
# key blocks hold most of a query block's attention, so block selectors can be told apart. `diffuse`, the
# previous weights, spreads attention over thousands of keys: the hard case, where the best mass-based choice
# of blocks loses to random ones (docs/demo_model.md).
VARIANTS = {"concentrated": Path(__file__).parent / "weights", "diffuse": Path(__file__).parent / "weights_diffuse"}
WEIGHTS = VARIANTS["concentrated"]


def load_demo_pipeline(path: str | Path | None = None):
    """The shipped demo pipeline, loaded with `from_pretrained` from inside the package.

    Args:
        path: None or "concentrated" for the default weights, "diffuse" for the previous ones, or a folder
            that `sparse-dit train-demo` wrote.
    """
    from .pipeline import ShapesVideoPipeline

    if path is None or (isinstance(path, str) and path in VARIANTS):
        path = VARIANTS[path or "concentrated"]
    path = Path(path)
    if not (path / "model_index.json").exists():
        raise SparseDiTError(
            f"no trained demo model at {path}: pass one of the shipped variants ({', '.join(VARIANTS)}) or a folder "
            "that `sparse-dit train-demo --out <dir>` wrote"
        )
    return ShapesVideoPipeline.from_pretrained(path)
