"""`sparse-dit attention`: how local a pipeline's attention is, trained against untrained, with maps."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..search import AttentionSample, capture_attention
from .locality import window_mass
from .attention_maps import attention_map, labelled_grid


@dataclass
class LocalityRow:
    """Window mass of one layer, averaged over batch, heads, sampled rows and sampled steps."""

    layer: int
    trained: float
    untrained: float | None
    uniform: float
    per_head: list[float]  # trained, per head


def untrained_copy(pipe: Any, seed: int = 0) -> Any:
    """The same pipeline with its transformer re-initialised from its config: the structure-free baseline."""
    with torch.random.fork_rng():  # seeded init without touching the caller's random state
        torch.manual_seed(seed)
        transformer = type(pipe.transformer).from_config(pipe.transformer.config).eval()
    twin = type(pipe)(**{**pipe.components, "transformer": transformer})
    twin.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return twin


def _per_layer(samples: list[AttentionSample], window: tuple[int, int, int]) -> dict[int, tuple[torch.Tensor, float]]:
    by_layer: dict[int, list[tuple[torch.Tensor, float]]] = {}
    for sample in samples:
        by_layer.setdefault(sample.layer, []).append(window_mass(sample, window))
    return {
        layer: (torch.stack([m.mean(dim=0) for m, _ in items]).mean(dim=0), sum(u for _, u in items) / len(items))
        for layer, items in sorted(by_layer.items())
    }


def locality(trained: list[AttentionSample], untrained: list[AttentionSample] | None,
             window: tuple[int, int, int]) -> list[LocalityRow]:
    """Per-layer window mass of the trained samples, beside the untrained ones' and the uniform share."""
    ours = _per_layer(trained, window)
    theirs = _per_layer(untrained, window) if untrained else {}
    return [
        LocalityRow(layer, float(heads.mean()), float(theirs[layer][0].mean()) if layer in theirs else None, uniform,
                    [float(x) for x in heads])
        for layer, (heads, uniform) in ours.items()
    ]


def most_local_heads(rows: list[LocalityRow], count: int) -> list[tuple[int, int]]:
    """(layer, head) of the `count` heads with the largest window mass, one per layer first."""
    ranked = sorted(((mass, r.layer, h) for r in rows for h, mass in enumerate(r.per_head)), reverse=True)
    picked: list[tuple[int, int]] = []
    for _, layer, head in ranked:
        if layer not in {l for l, _ in picked}:
            picked.append((layer, head))
    for _, layer, head in ranked:
        if (layer, head) not in picked:
            picked.append((layer, head))
    return picked[:count]


def write_locality_report(pipe: Any, out: Path, call: dict[str, Any], *, steps: list[int], window: tuple[int, int, int],
                          rows: int = 64, heads: int = 4, compare_untrained: bool = True, seed: int = 0) -> list[LocalityRow]:
    """Capture `pipe` (and an untrained twin), write locality.json/.md and attention_maps.png to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    trained = capture_attention(pipe, steps=steps, rows=rows, seed=seed, **call)
    untrained = None
    if compare_untrained:
        untrained = capture_attention(untrained_copy(pipe, seed), steps=steps, rows=rows, seed=seed,
                                      **{**call, "generator": torch.Generator().manual_seed(seed)})
    table = locality(trained, untrained, window)
    first_step = min(steps)
    panels = []
    for layer, head in most_local_heads(table, heads):
        row = []
        for name, samples in (("trained", trained), ("untrained", untrained or [])):
            sample = next((s for s in samples if s.layer == layer and s.step == first_step), None)
            if sample is not None:
                pick = len(sample.rows) // 2
                row.append((f"{name}: layer {layer} head {head}, step {first_step}", attention_map(sample, head, pick)))
        panels.append(row)
    labelled_grid(panels).save(out / "attention_maps.png")
    (out / "locality.json").write_text(json.dumps(
        {"window": list(window), "steps": steps, "rows": rows, "grid": list(trained[0].ctx.grid),
         "layers": [r.__dict__ for r in table]}, indent=1))
    lines = [f"Attention mass inside a {window[0]}x{window[1]}x{window[2]} token window (frames x rows x columns) "
             f"around each query, at steps {steps}, {rows} sampled query rows per call.", "",
             "| layer | trained | untrained | uniform | trained / uniform |", "|---|---|---|---|---|"]
    for r in table:
        untrained_text = f"{r.untrained:.3f}" if r.untrained is not None else "-"
        lines.append(f"| {r.layer} | {r.trained:.3f} | {untrained_text} | {r.uniform:.3f} | {r.trained / r.uniform:.1f}x |")
    (out / "locality.md").write_text("\n".join(lines) + "\n")
    return table
