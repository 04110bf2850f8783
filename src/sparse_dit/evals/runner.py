"""`sparse-dit eval`: the same prompts and seeds generated dense and with each method, scored and timed.

Dense is the baseline: the original attention, timed through the same hooks (every step kept dense) so
attention time is measured the same way for every method. Every sparse method is paired, at its measured
density per (step, site, head), with two yardsticks: `random` blocks, the control it must beat, and `oracle`,
the blocks of highest exact attention mass, the best a mass-based selector can reach. Finished items are
skipped when the command is run again on the same output folder.

Items can be split over processes or GPUs (`sparse-dit eval --num-processes N`, `evals.data_parallel`): the dense
baselines first, then the (method, prompt, seed) items with their controls, each process taking every N-th; the
main process then writes `results.json` exactly as one process would have (`merge_records`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..errors import ConfigError
from ..pattern_file import PatternFile
from ..patterns import resolve_config
from ..plugin import (
    AttentionStats,
    disable_sparse_attention,
    enable_sparse_attention,
    model_signature,
    sparse_attention_config,
    sparse_attention_stats,
)
from ..plugin.api import runtime_of
from . import metrics
from .video import side_by_side, write_video

DEFAULT_PROMPTS = ("a red circle moving left", "a green square moving up", "a blue triangle moving right")
BASELINE = "dense"
CONTROLS = ("random", "oracle")  # the yardsticks every method is paired with, by default
# What a control takes from the method it is paired with, beside its measured densities (a pattern file): its
# policy, so that both run under the same policy.
PAIRED_POLICY = ("block_size", "dense_steps", "dense_layers", "min_seq_len")


@dataclass
class EvalSettings:
    """What to evaluate and where to write it."""

    out: Path
    methods: list[str]
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    seeds: int = 1
    call_kwargs: dict[str, Any] = field(default_factory=dict)  # num_frames, height, width, num_inference_steps, ...
    reps: int = 1
    warmup: int = 1
    controls: list[str] = field(default_factory=lambda: list(CONTROLS))


def density_pattern(control: str, table: list, options: dict[str, Any]) -> PatternFile:
    """A pattern file for `control` that holds a method's measured densities.

    Args:
        table: [[step, site, [density of head 0, head 1, ...]], ...], as an evaluation record keeps it.
        options: the control's config options.
    Returns:
        One "{site}/density" tensor (steps, H) per site, one step bucket per measured step, NaN where a site did
        not run at a step (Wan 2.2's experts take turns).
    """
    steps = sorted({int(s) for s, _, _ in table})
    rows = {site: {} for _, site, _ in table}
    for step, site, heads in table:
        rows[site][int(step)] = heads
    tensors = {}
    for site, by_step in rows.items():
        heads = len(next(iter(by_step.values())))
        tensor = torch.full((len(steps), heads), float("nan"))
        for i, step in enumerate(steps):
            if step in by_step:
                tensor[i] = torch.tensor(by_step[step], dtype=torch.float32)
        tensors[f"{site}/density"] = tensor
    return PatternFile(method=control, options=options, tensors=tensors, step_buckets=tuple(steps) or (0,))


def _frames(output: Any) -> torch.Tensor:
    """The first video of a pipeline output as (T, C, H, W) float in [0, 1]."""
    video = output.frames if hasattr(output, "frames") else output.images
    video = torch.as_tensor(video[0]).float().cpu()
    if video.dim() == 3:  # an image pipeline
        video = video[None]
    if video.shape[-1] in (1, 3) and video.shape[1] not in (1, 3):
        video = video.permute(0, 3, 1, 2)
    return video


def validate_settings(settings: EvalSettings) -> tuple[dict[str, Any], list[str]]:
    """Check every name and option before anything is generated (see `Evaluation.validate`)."""
    if not settings.prompts:
        raise ConfigError("no prompts to evaluate: the prompts file is empty; give one prompt per line")
    methods = [m for m in dict.fromkeys(settings.methods) if m not in (BASELINE, "random")]
    controls = list(dict.fromkeys(settings.controls))
    if not methods and "random" in settings.methods:
        raise ConfigError("random is a control, run at the density of each method it is paired with; name a method "
                          "to evaluate (e.g. --methods dense,window), or evaluate random itself as oracle's control "
                          "with --methods oracle")
    # Unknown names and bad options fail now, not after the dense baselines.
    configs = {name: resolve_config(name, **settings.configs.get(name, {})) for name in methods}
    unused = sorted(set(settings.configs) - {*methods, *controls})
    if unused:
        raise ConfigError(f"--config sets options of {unused}, which this evaluation does not run; "
                          f"it runs {', '.join([*methods, *controls]) or 'no method'}")
    for control in controls:
        resolve_config(control, **settings.configs.get(control, {}))
        clash = sorted(set(settings.configs.get(control, {})) & set(PAIRED_POLICY))
        if clash:
            raise ConfigError(f"--config {control}.{clash[0]} clashes with the control's pairing: {control} takes "
                              f"its densities and {', '.join(PAIRED_POLICY)} from the method it is paired with; set "
                              "them on that method")
    return configs, controls


Identity = tuple[str, str, int, str | None]


def identity(record: dict) -> Identity:
    """What names a record's item: (method, prompt, seed, paired_with)."""
    return record["method"], record["prompt"], record["seed"], record.get("paired_with")


def run_order(settings: EvalSettings, methods: list[str], controls: list[str]) -> list[Identity]:
    """The items of an evaluation in the order one process runs them: per (prompt, seed) the dense baseline, then
    each method followed by its controls."""
    order: list[Identity] = []
    for prompt in settings.prompts:
        for seed in range(settings.seeds):
            order.append((BASELINE, prompt, seed, None))
            for name in methods:
                order.append((name, prompt, seed, None))
                order.extend((control, prompt, seed, name) for control in controls if control != name)
    return order


def merge_records(initial: list[dict], created: list[dict], order: list[Identity]) -> list[dict]:
    """The records one process would leave in `results.json`, from what several made.

    One process keeps the records it found (`initial`) in place, drops those of items it evaluated again (their
    settings changed) and appends the new ones in its run order. Here `created` holds the new records of every
    process, in any order.
    """
    rank = {item: i for i, item in enumerate(order)}
    unknown = [identity(r) for r in created if identity(r) not in rank]
    if unknown:
        raise ConfigError(f"records of items this evaluation does not run: {unknown[:3]}")
    replaced = {identity(r) for r in created}
    return [r for r in initial if identity(r) not in replaced] + sorted(created, key=lambda r: rank[identity(r)])


class Evaluation:
    """Runs the items of one evaluation and keeps `results.json` up to date after each.

    Args:
        pipe: the pipeline the methods run on.
        settings: what to evaluate.
        reference: the pipeline whose dense output every video is scored against, and on which the controls
            run; default `pipe`. A distilled model is scored this way against the original it was distilled
            from, next to `random` and `oracle` on the original at the same density.
    """

    def __init__(self, pipe: Any, settings: EvalSettings, reference: Any = None) -> None:
        self.pipe, self.settings = pipe, settings
        self.reference = pipe if reference is None else reference
        self.out = Path(settings.out)
        (self.out / "videos").mkdir(parents=True, exist_ok=True)
        self.results_path = self.out / "results.json"
        self.records: list[dict] = json.loads(self.results_path.read_text()) if self.results_path.exists() else []
        self._warm: set[str] = set()
        self._model = {"evaluated": model_signature(pipe).components,
                       "reference": None if reference is None else model_signature(reference).components}
        self.stale = 0  # finished items whose settings changed since they were written, evaluated again
        self.created: list[dict] = []  # the records this run added
        self._part: Path | None = None  # where a process of a data-parallel run keeps its records (`run(state)`)

    # -- bookkeeping -------------------------------------------------------------------------------
    def item_key(self, method: str, prompt: str, seed: int, paired_with: str | None, config: dict, base: str = "") -> str:
        """A hash of everything that defines one item: the model, the pipeline call, prompt, seed, the method's
        config (a control's: its own and the paired method's), and the key of the dense video it is scored against."""
        data = {"model": self._model, "call": self.settings.call_kwargs, "method": method, "prompt": prompt, "seed": seed,
                "paired_with": paired_with, "config": config, "base": base}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _find(self, method: str, prompt: str, seed: int, paired_with: str | None = None, key: str | None = None) -> dict | None:
        """The finished record of an item with this key; a record of the item made under other settings is dropped."""
        for r in self.records:
            if (r["method"], r["prompt"], r["seed"], r.get("paired_with")) == (method, prompt, seed, paired_with):
                if r.get("key") == key:
                    return r
                self.records.remove(r)
                self.stale += 1
                return None
        return None

    def _add(self, record: dict) -> dict:
        self.records.append(record)
        self.created.append(record)
        self._save()
        return record

    def _save(self) -> None:
        if self._part is not None:  # a data-parallel process: its own records, merged at the end
            self._part.write_text(json.dumps(self.created, indent=1, default=float))
        else:
            self.results_path.write_text(json.dumps(self.records, indent=1, default=float))

    def _video_path(self, name: str, prompt_idx: int, seed: int) -> Path:
        return self.out / "videos" / f"{name}_p{prompt_idx}_s{seed}"

    # -- generation --------------------------------------------------------------------------------
    def _generate(self, pipe: Any, prompt: str, seed: int) -> torch.Tensor:
        kwargs = {**self.settings.call_kwargs, "prompt": prompt, "generator": torch.Generator().manual_seed(seed)}
        kwargs.setdefault("output_type", "pt")
        with torch.inference_mode():
            return _frames(pipe(**kwargs))

    def _timed(self, pipe: Any, key: str, prompt: str, seed: int) -> tuple[torch.Tensor, float, AttentionStats, float]:
        """Generate with the hooks in place: warm-up once per key, then the median of `reps` runs.

        Returns the video, the median end-to-end seconds, the last run's stats and the median attention seconds.
        """
        runtime = runtime_of(pipe)
        runtime.engine.synchronize = True
        key = f"{'reference' if pipe is not self.pipe else 'evaluated'}:{key}"
        if key not in self._warm:
            for _ in range(self.settings.warmup):
                self._generate(pipe, prompt, seed)
            self._warm.add(key)
        times, attention = [], []
        for _ in range(self.settings.reps):
            start = time.perf_counter()
            video = self._generate(pipe, prompt, seed)
            times.append(time.perf_counter() - start)
            attention.append(sparse_attention_stats(pipe).seconds)
        return video, statistics.median(times), sparse_attention_stats(pipe), statistics.median(attention)

    def _run(self, name: str, spec, prompt: str, seed: int, pipe: Any = None) -> tuple[torch.Tensor, dict]:
        pipe = self.pipe if pipe is None else pipe
        enable_sparse_attention(pipe, spec)
        try:
            config = sparse_attention_config(pipe)
            video, total_s, stats, attention_s = self._timed(pipe, name, prompt, seed)
        finally:
            disable_sparse_attention(pipe)
        steps = sorted({s for s, _ in stats.entries if s is not None})
        layers = sorted({l for _, l in stats.entries})
        density_map = [[stats.entries[(s, l)].density if (s, l) in stats.entries else None for l in layers] for s in steps]
        table = [[s, e.site, e.head_densities] for (s, _), e in stats.entries.items() if s is not None and e.site is not None]
        record = {
            # None where no call ran a plan (all under min_seq_len, kept layers, warm-up steps): no density to report.
            "density": stats.density(sparse_only=True),
            "sparse_calls": sum(e.sparse_calls for e in stats.entries.values()),
            "density_all_steps": stats.density(),
            "attention_s": attention_s,
            "attention_calls": stats.calls,
            "attention_ms_per_call": 1e3 * attention_s / max(stats.calls, 1),
            # The selection work (scoring, pooling, clustering, mass) as a share of the sparse calls' time.
            "plan_share": stats.plan_share,
            "total_s": total_s,
            "density_map": density_map,
            "density_table": table,
            "config": config.to_dict(),
        }
        return video, record

    # -- the evaluation ----------------------------------------------------------------------------
    def dense(self, prompt_idx: int, prompt: str, seed: int) -> tuple[torch.Tensor, dict]:
        """The dense baseline video (T, C, H, W) and record of (prompt, seed): reused if already done."""
        path = self._video_path(BASELINE, prompt_idx, seed).with_suffix(".safetensors")
        config = resolve_config("dense", dense_steps=1.0)
        key = self.item_key(BASELINE, prompt, seed, None, config.to_dict())
        record = self._find(BASELINE, prompt, seed, key=key)
        if record is not None and path.exists():
            return load_file(path)["video"], record
        # Every step dense: the model's own attention, timed by the same hooks as the sparse runs.
        video, record = self._run(BASELINE, config, prompt, seed, self.reference)
        record.pop("density_table")
        record.pop("config")
        record.update(method=BASELINE, paired_with=None, prompt=prompt, seed=seed, key=key, density=1.0, speedup=1.0,
                      attention_speedup=1.0,
                      **metrics.reference_scores(video, video), **metrics.vbench_scores(video))
        save_file({"video": video.contiguous()}, path)
        return video, self._add(record)

    def method(self, name: str, spec, prompt_idx: int, prompt: str, seed: int, dense_video: torch.Tensor,
               dense_record: dict, paired_with: str | None = None, pipe: Any = None) -> tuple[torch.Tensor, dict]:
        """Generate with `spec` (a config or a pattern file) on `pipe` (default: the evaluated pipeline), score
        it against the dense video and write the side-by-side gif."""
        pipe = self.pipe if pipe is None else pipe
        video, record = self._run(name if paired_with is None else f"{name}~{paired_with}", spec, prompt, seed, pipe)
        tag = name if paired_with is None else f"{name}-{paired_with}"
        base = self._video_path(tag, prompt_idx, seed)
        write_video(side_by_side(dense_video, video), base.with_suffix(".gif"))
        ran_sparse = record["sparse_calls"] > 0  # else the times differ by noise alone: no speed-up to quote
        record.update(
            method=name, paired_with=paired_with, prompt=prompt, seed=seed,
            speedup=dense_record["total_s"] / record["total_s"] if ran_sparse else None,
            attention_speedup=dense_record["attention_s"] / max(record["attention_s"], 1e-12) if ran_sparse else None,
            video=str(base.with_suffix(".gif").relative_to(self.out)),
            on_reference=pipe is not self.pipe,
            **metrics.reference_scores(video, dense_video), **metrics.vbench_scores(video),
        )
        return video, record

    def _control(self, control: str, name: str, config, record: dict, prompt_idx: int, prompt: str, seed: int,
                 dense_video: torch.Tensor, dense_record: dict) -> dict:
        """`control` at the density `name` measured per (step, site, head), under the same policy."""
        options = {**{key: getattr(config, key) for key in PAIRED_POLICY},
                   **({"seed": seed} if control == "random" else {}), **self.settings.configs.get(control, {})}
        pattern = density_pattern(control, record["density_table"], options)
        _, paired = self.method(control, pattern, prompt_idx, prompt, seed, dense_video, dense_record, paired_with=name,
                                pipe=self.reference)
        paired.pop("density_table")
        return paired

    def validate(self) -> tuple[dict[str, Any], list[str]]:
        """Check every name and option before anything is generated.

        Returns the configs of the methods to run ({name: config}, in order) and the controls to pair them with.

        Raises ConfigError (UnknownMethodError for an unknown name) with what to pass instead.
        """
        return validate_settings(self.settings)

    def run(self, state: Any = None) -> list[dict]:
        """Evaluate every (prompt, seed) with every method and its controls at the method's measured density.

        Args:
            state: accelerate's `PartialState` of a data-parallel run (`evals.data_parallel`): this process
                evaluates its share and the main process writes `results.json` as one process would. None (or a
                single process): everything here.
        Returns:
            The records of `results.json`.
        """
        configs, controls = self.validate()
        if state is not None and state.num_processes > 1:
            return self._run_shared(state, configs, controls)
        items = [(i, p, s) for i, p in enumerate(self.settings.prompts) for s in range(self.settings.seeds)]
        bar = tqdm(total=len(items) * (1 + sum(1 + sum(c != m for c in controls) for m in configs)), desc="eval", unit="video")
        for i, prompt, seed in items:
            dense_video, dense_record = self.dense(i, prompt, seed)
            bar.update(1)
            for name, config in configs.items():
                self._method_item(name, config, controls, i, prompt, seed, dense_video, dense_record, bar)
        bar.close()
        self._report_stale()
        return self.records

    def _method_item(self, name: str, config, controls: list[str], i: int, prompt: str, seed: int,
                     dense_video: torch.Tensor, dense_record: dict, bar: tqdm) -> None:
        """One (method, prompt, seed) item and its controls, each skipped if already finished."""
        key = self.item_key(name, prompt, seed, None, config.to_dict(), dense_record["key"])
        record = self._find(name, prompt, seed, key=key)
        if record is None:
            record = self._add({**self.method(name, config, i, prompt, seed, dense_video, dense_record)[1], "key": key})
        bar.update(1)
        for control in controls:
            if control == name:
                continue
            control_key = self.item_key(control, prompt, seed, name, self.settings.configs.get(control, {}), key)
            if self._find(control, prompt, seed, paired_with=name, key=control_key) is None:
                paired = self._control(control, name, config, record, i, prompt, seed, dense_video, dense_record)
                self._add({**paired, "key": control_key})
            bar.update(1)

    def _report_stale(self) -> None:
        if self.stale:
            tqdm.write(f"{self.stale} finished items were made under other settings (steps, sizes, model or options) "
                       "and were evaluated again")

    def _run_shared(self, state: Any, configs: dict[str, Any], controls: list[str]) -> list[dict]:
        """This process's share of a data-parallel run: every `num_processes`-th dense baseline, then (once all are
        written) every `num_processes`-th (method, prompt, seed) item with its controls. Each process keeps its new
        records in `.parallel/part-<rank>.json` of the output folder; the main process merges them."""
        rank, count = state.process_index, state.num_processes
        parts = self.out / ".parallel"
        parts.mkdir(exist_ok=True)
        # Records an interrupted run left in its parts count as finished, as they would in one process's file.
        for leftover in sorted(parts.glob("part-*.json")):
            self._take(json.loads(leftover.read_text()))
        initial = list(self.records)
        state.wait_for_everyone()  # all have read the leftovers before any part is started afresh
        self._part = parts / f"part-{rank}.json"
        self._part.write_text("[]")
        state.wait_for_everyone()
        items = [(i, p, s) for i, p in enumerate(self.settings.prompts) for s in range(self.settings.seeds)]
        units = [(i, p, s, name) for i, p, s in items for name in configs]
        bar = tqdm(total=len(items[rank::count]) + len(units[rank::count]), desc=f"eval (process {rank}/{count})",
                   unit="item", disable=not state.is_main_process)
        for i, prompt, seed in items[rank::count]:
            self.dense(i, prompt, seed)
            bar.update(1)
        state.wait_for_everyone()
        self._absorb(parts, rank, count)  # every baseline, whichever process made it
        for i, prompt, seed, name in units[rank::count]:
            dense_video, dense_record = self.dense(i, prompt, seed)  # found: written above
            self._method_item(name, configs[name], controls, i, prompt, seed, dense_video, dense_record, _Quiet())
            bar.update(1)
        bar.close()
        state.wait_for_everyone()
        if state.is_main_process:
            created = [r for k in range(count) for r in json.loads((parts / f"part-{k}.json").read_text())]
            self.records = merge_records(initial, created, run_order(self.settings, list(configs), controls))
            self._part = None
            self._save()
            shutil.rmtree(parts)
            replaced = {identity(r) for r in created}
            self.stale = sum(identity(r) in replaced for r in initial)
            self._report_stale()
        state.wait_for_everyone()
        self.records = json.loads(self.results_path.read_text())
        return self.records

    def _absorb(self, parts: Path, rank: int, count: int) -> None:
        """Take the records the other processes wrote so far."""
        for k in range(count):
            if k != rank:
                self._take(json.loads((parts / f"part-{k}.json").read_text()))

    def _take(self, records: list[dict]) -> None:
        """Add records made elsewhere, each in place of an older record of its item."""
        for record in records:
            self.records = [r for r in self.records if identity(r) != identity(record)] + [record]


class _Quiet:
    def update(self, n: int = 1) -> None:
        pass
