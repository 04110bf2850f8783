"""`report.md` and a self-contained `report.html`: per-method tables, the Pareto plot (speed-up against
PSNR), density heat maps per (step, layer), and the side-by-side videos, all inline."""

from __future__ import annotations

import base64
import html
import math
from collections import defaultdict
from pathlib import Path

SCORES = ("density", "psnr", "ssim", "lpips", "temporal_flickering", "motion_smoothness", "subject_consistency",
          "background_consistency", "dynamic_degree", "imaging_quality", "attention_s", "plan_share", "total_s", "attention_speedup",
          "speedup")
HEADERS = ("density", "PSNR dB", "SSIM", "LPIPS", "flicker", "smooth", "subject", "backgr.", "dynamic", "imaging",
           "attn s", "plan %", "total s", "attn x", "speed-up")
PLOT_COLOUR = "#d62728"  # method markers in the Pareto plot; the browser test looks for this colour
CONTROL_COLOUR = "#7f7f7f"
TABLE_HEAD_COLOUR = "#1f4e79"  # table header background; the browser test looks for it too


def label(record: dict) -> str:
    """How a record's method is named in reports: controls (`random`, `oracle`) carry the method they pair with."""
    return f"{record['method']} ~ {record['paired_with']}" if record.get("paired_with") else record["method"]


def summarize(records: list[dict]) -> list[dict]:
    """Mean of every score per method label, in the order methods first appear (controls right after theirs)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[label(r)].append(r)
    # Each method, then its controls: random ~ M (what M must beat) before oracle ~ M (what M can at best reach).
    order = sorted(groups, key=lambda k: (k != "dense", k.split(" ~ ")[-1], " ~ " in k, not k.startswith("random")))
    rows = []
    for name in order:
        row = {"method": name, "n": len(groups[name]), "control": " ~ " in name}
        for key in SCORES:
            values = [r[key] for r in groups[name] if r.get(key) is not None]
            row[key] = sum(values) / len(values) if values else None
        rows.append(row)
    return rows


def _fmt(value, key: str) -> str:
    if value is None:
        return "absent" if key == "lpips" else "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    if key in ("speedup", "attention_speedup"):
        return f"{value:.2f}x"
    if key == "plan_share":
        return f"{100 * value:.1f}%"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def markdown(records: list[dict], title: str) -> str:
    """The report as Markdown."""
    lines = [f"# {title}", "", f"{len(records)} videos. Quality is measured against the dense video of the same prompt "
             "and seed; VBench-style columns are proxies computed without hub weights; times are medians after warm-up, "
             "dense and sparse in the same run. `random ~ M` is the control: random blocks at M's density; `oracle ~ M` "
             "keeps the blocks of highest exact attention mass at M's density, the best a mass-based selector can do "
             "(its time is not a speed: it computes full attention to plan). `plan %` is the share of the sparse calls' "
             "attention time spent choosing what to compute (scoring, pooling, clustering, exact mass); a static "
             "method's cached plan costs next to nothing.", ""]
    lines.append("| method | n | " + " | ".join(HEADERS) + " |")
    lines.append("|---" * (len(HEADERS) + 2) + "|")
    for row in summarize(records):
        lines.append(f"| {row['method']} | {row['n']} | " + " | ".join(_fmt(row[k], k) for k in SCORES) + " |")
    idle = sorted({label(r) for r in records if r["method"] != "dense" and r.get("sparse_calls") == 0},
                  key=lambda name: (" ~ " in name, name))
    if idle:
        lines += ["", f"Nothing ran sparse for {', '.join(idle)}: every attention call stayed dense (sequences shorter "
                  "than min_seq_len, kept layers or warm-up steps), so no density or speed-up is shown."]
    if all(r.get("lpips") is None for r in records):
        lines += ["", "LPIPS is absent: its backbone weights cannot be obtained offline on this machine."]
    return "\n".join(lines) + "\n"


def _pareto_svg(rows: list[dict], width: int = 520, height: int = 340) -> str:
    points = [(r["speedup"], r["psnr"], r["method"], r["control"]) for r in rows if r["method"] != "dense" and r["speedup"]]
    finite = [p for _, p, _, _ in points if p is not None and math.isfinite(p)]
    y_lo, y_hi = (min(finite) - 2, max(finite) + 2) if finite else (0, 50)
    x_hi = max([s for s, *_ in points] + [1.5]) * 1.35  # room for the labels right of the markers
    pad = 50

    def sx(x):
        return pad + (x / x_hi) * (width - 2 * pad)

    def sy(y):
        y = y_hi if y is None or not math.isfinite(y) else y
        return height - pad - (y - y_lo) / (y_hi - y_lo) * (height - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="Pareto plot">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{sx(1)}" y1="{pad}" x2="{sx(1)}" y2="{height - pad}" stroke="#bbb" stroke-dasharray="4"/>',
             f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle" font-size="13">end-to-end speed-up vs dense (x)</text>',
             f'<text x="14" y="{height / 2}" text-anchor="middle" font-size="13" transform="rotate(-90 14 {height / 2})">PSNR vs dense (dB)</text>']
    for tick in range(0, int(x_hi) + 1):
        parts.append(f'<text x="{sx(tick)}" y="{height - pad + 16}" text-anchor="middle" font-size="11">{tick}</text>')
    for tick in (y_lo, (y_lo + y_hi) / 2, y_hi):
        parts.append(f'<text x="{pad - 6}" y="{sy(tick) + 4}" text-anchor="end" font-size="11">{tick:.0f}</text>')
    for speed, quality, name, control in points:
        colour = CONTROL_COLOUR if control else PLOT_COLOUR
        parts.append(f'<circle cx="{sx(speed):.1f}" cy="{sy(quality):.1f}" r="7" fill="{colour}"/>')
        parts.append(f'<text x="{sx(speed) + 10:.1f}" y="{sy(quality) - 8:.1f}" font-size="12">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _heatmap_svg(density_map: list[list[float | None]], cell: int = 18) -> str:
    """Density per (step, layer) as a grid of cells, white (0) to dark blue (1), the value on hover."""
    steps, layers = len(density_map), len(density_map[0]) if density_map else 0
    left, top = 56, 34
    width, height = max(240, left + layers * cell + 10), top + steps * cell + 6
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
             f'<text x="{left}" y="12" font-size="11">layer 0 … {layers - 1} →</text>',
             f'<text x="{left}" y="26" font-size="10" fill="#555">white = 0, dark blue = 1 (dense)</text>']
    for s, row in enumerate(density_map):
        y = top + s * cell
        parts.append(f'<text x="{left - 6}" y="{y + cell - 5}" font-size="10" text-anchor="end">step {s}</text>')
        for l, d in enumerate(row):
            shade = 255 if d is None else int(255 * (1 - d))
            tip = "–" if d is None else f"{d:.3f}"
            parts.append(f'<rect x="{left + l * cell}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
                         f'fill="rgb({shade},{shade},{max(shade, 110)})"><title>step {s}, layer {l}: {tip}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def _mean_maps(records: list[dict]) -> dict[str, list[list[float | None]]]:
    """Per method label, the (step, layer) density map averaged over its prompts and seeds."""
    maps: dict[str, list] = {}
    for r in records:
        if r["method"] == "dense" or not r.get("density_map"):
            continue
        maps.setdefault(label(r), []).append(r["density_map"])
    mean = lambda values: None if any(v is None for v in values) else sum(values) / len(values)  # noqa: E731
    return {name: [[mean([m[s][l] for m in group]) for l in range(len(group[0][0]))] for s in range(len(group[0]))]
            for name, group in maps.items() if all(len(m) == len(group[0]) for m in group)}


def html_report(records: list[dict], title: str, out_dir: Path) -> str:
    """The report as one self-contained HTML page (plots as inline SVG, videos as inline GIF)."""
    rows = summarize(records)
    head = "".join(f"<th>{h}</th>" for h in ("method", "n", *HEADERS))
    body = "".join(
        f"<tr class='{'control' if r['control'] else ''}'><td>{html.escape(r['method'])}</td><td>{r['n']}</td>"
        + "".join(f"<td>{_fmt(r[k], k)}</td>" for k in SCORES) + "</tr>"
        for r in rows
    )
    maps = [f"<figure><figcaption>{html.escape(name)}</figcaption>{_heatmap_svg(m)}</figure>" for name, m in _mean_maps(records).items()]
    videos = []
    for r in records:
        if r["method"] == "dense":
            continue
        caption = f"{html.escape(label(r))} — “{html.escape(r['prompt'])}”, seed {r['seed']}"
        path = out_dir / r["video"]
        if path.exists():
            data = base64.b64encode(path.read_bytes()).decode()
            videos.append(f"<figure><figcaption>{caption} — dense | sparse | 4x difference, PSNR {_fmt(r['psnr'], 'psnr')} dB</figcaption>"
                          f"<img alt='side by side' src='data:image/gif;base64,{data}'></figure>")
    lpips_note = "<p>LPIPS is absent: its backbone weights cannot be obtained offline.</p>" if all(
        r.get("lpips") is None for r in records) else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body {{ font-family: sans-serif; margin: 24px; }} table {{ border-collapse: collapse; }}
th {{ background: {TABLE_HEAD_COLOUR}; color: white; padding: 6px 8px; }} td {{ border: 1px solid #999; padding: 4px 8px; text-align: right; }}
td:first-child {{ text-align: left; }} tr.control td {{ color: #555; font-style: italic; }} figure {{ display: inline-block; margin: 8px; }}
img {{ image-rendering: pixelated; width: 480px; }}
</style></head><body><h1>{html.escape(title)}</h1>
<p>{len(records)} videos. Quality against the dense video of the same prompt and seed; VBench-style columns are proxies
computed without hub weights; times are medians after warm-up, dense and sparse in the same run.
<i>random ~ M</i> is the control: random blocks at M's measured density per (step, layer, head);
<i>oracle ~ M</i> keeps the blocks of highest exact attention mass at that density, the best a mass-based selector
can do (it computes full attention to plan, so its time is not a speed).</p>
<table id="results"><tr>{head}</tr>{body}</table>{lpips_note}
<h2>Speed-up against quality</h2>{_pareto_svg(rows)}
<h2>Attention density per (step, layer), mean over prompts and seeds</h2>{''.join(maps)}
<h2>Videos</h2>{''.join(videos)}
</body></html>"""


def write_reports(records: list[dict], out_dir: Path, title: str) -> tuple[Path, Path]:
    """Write report.md and report.html next to results.json."""
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(markdown(records, title))
    page.write_text(html_report(records, title, out_dir))
    return md, page
