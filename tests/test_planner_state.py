"""Per-site planner state, the re-plan schedule, the bounded plan cache and methods registered by users."""

import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import sparse_dit
from sparse_dit import AttentionPlan, PlanContext, Planner, SiteState, SparseAttention, SparseAttentionConfig
from sparse_dit.cli import main
from sparse_dit.errors import ConfigError
from sparse_dit.patterns import base
from sparse_dit.plugin.api import runtime_of
from sparse_dit.state import PlanCache

from tiny_models import make_pipeline, make_wan22_pipeline

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_method.py"


@dataclass(frozen=True)
class RecorderConfig(SparseAttentionConfig):
    method: ClassVar[str] = "recorder"


class RecorderPlanner(Planner):
    """Plans dense and logs every planning call with what its state had seen before."""

    name = "recorder"
    config_cls = RecorderConfig
    log: ClassVar[list[dict]] = []

    def plan(self, q, k, ctx: PlanContext, state: SiteState) -> AttentionPlan:
        state.extra["plans"] = state.extra.get("plans", 0) + 1
        self.log.append(dict(site=ctx.site, branch=ctx.branch, rows=ctx.row_branches(), step=ctx.step,
                             timestep=ctx.timestep, layer=ctx.layer, plans=state.extra["plans"]))
        return AttentionPlan.full(ctx.seq_len, self.config.block_size, device=ctx.device)


@pytest.fixture
def recorder():
    """The recorder, registered from outside the package for one test."""
    sparse_dit.register_method(RecorderPlanner)
    RecorderPlanner.log.clear()
    yield RecorderPlanner.log
    base._REGISTRY.pop("recorder", None)


def options(**extra):
    return dict(block_size=8, min_seq_len=0, dense_steps=0, **extra)


def test_wan22_experts_are_distinct_sites_and_cfg_branches_distinct_states(recorder):
    pipe, kwargs = make_wan22_pipeline()
    pipe.enable_sparse_attention("recorder", **options())
    pipe(**kwargs)
    sites = {(entry["step"], entry["site"].split(".")[0]) for entry in recorder}
    # Steps 0-1 on the high-noise expert, step 2 on the low-noise one; both report layer 0, 1, ...
    assert sites == {(0, "transformer"), (1, "transformer"), (2, "transformer_2")}
    layers = {expert: {e["layer"] for e in recorder if e["site"].startswith(expert + ".")} for expert in ("transformer", "transformer_2")}
    assert layers["transformer"] == layers["transformer_2"] == {0, 1}
    assert len({e["site"] for e in recorder}) == 4
    assert {e["branch"] for e in recorder} == {"cond", "uncond"}
    # Each (site, branch) has its own state: the cond and uncond branches count their own plans.
    first = "transformer.blocks.0.attn1"
    assert [(e["step"], e["branch"], e["plans"]) for e in recorder if e["site"] == first] == [
        (0, "cond", 1), (0, "uncond", 1), (1, "cond", 2), (1, "uncond", 2)]
    assert [e["plans"] for e in recorder if e["site"] == "transformer_2.blocks.0.attn1"] == [1, 1]
    timesteps = [e["timestep"] for e in recorder if e["site"] == first and e["branch"] == "cond"]
    assert timesteps[0] > timesteps[1] > 0
    # The state lives for one pipeline call: gone at its end, and a second call starts afresh.
    assert len(runtime_of(pipe).engine.states) == 0
    recorder.clear()
    pipe(**kwargs)
    assert recorder[0]["plans"] == 1


def test_batched_cfg_reports_its_row_layout(recorder):
    pipe, kwargs = make_pipeline("cogvideox")
    pipe.enable_sparse_attention("recorder", **options())
    pipe(**kwargs)
    assert {(e["branch"], e["rows"]) for e in recorder} == {("cond_uncond", ("uncond", "cond"))}


def test_the_replan_schedule_is_honoured_in_a_pipeline(recorder):
    pipe, kwargs = make_pipeline("wan")
    pipe.enable_sparse_attention("recorder", **options(replan_every=2))
    pipe(**{**kwargs, "num_inference_steps": 5})
    planned = sorted({e["step"] for e in recorder})
    assert planned == [0, 2, 4]
    stats = pipe.sparse_attention_stats()
    assert {s for s, _ in stats.entries} == {0, 1, 2, 3, 4}  # the steps between re-plans still ran sparse
    assert all(e.sparse_calls == e.calls for e in stats.entries.values())


@pytest.mark.parametrize("schedule, expected", [
    (dict(replan_every=3), [0, 3, 6]),
    (dict(replan_steps=(0, 2, 5)), [0, 2, 5]),
    (dict(replan_steps=(4,), dense_steps=1), [1, 4]),  # the first sparse step plans: nothing to reuse yet
])
def test_the_replan_schedule_in_the_functional_object(recorder, schedule, expected):
    attn = SparseAttention("recorder", **{**options(), **schedule})
    q = torch.randn(1, 32, 2, 8)
    for step in range(8):
        attn(q, q, q, grid=(1, 4, 8), layer=0, step=step, num_steps=8)
    assert [e["step"] for e in recorder] == expected
    # A call the kept plan does not fit (another length) plans at once, whatever the schedule says.
    attn(torch.randn(1, 40, 2, 8), *(torch.randn(1, 40, 2, 8),) * 2, grid=(1, 5, 8), layer=0, step=8, num_steps=9)
    assert recorder[-1]["step"] == 8
    attn.reset()
    assert len(attn.states) == 0


def test_stats_time_the_planning_apart(recorder, monkeypatch):
    """The stats split each sparse call's time into planning and the rest; a reused plan costs no planning."""
    plan = RecorderPlanner.plan

    def slow_plan(self, *args):
        time.sleep(0.02)  # the selection work of a dynamic method, made long enough to time
        return plan(self, *args)

    monkeypatch.setattr(RecorderPlanner, "plan", slow_plan)
    attn = SparseAttention("recorder", **{**options(replan_every=2), "dense_steps": 1})
    q = torch.randn(1, 32, 2, 8)
    for step in range(5):
        attn(q, q, q, grid=(1, 4, 8), layer=0, step=step, num_steps=5)
    entries = {step: attn.stats[(step, 0)] for step in range(5)}
    assert entries[0].sparse_seconds == entries[0].plan_seconds == 0  # the dense warm-up step
    for step in (1, 3):  # planned
        assert 0.02 <= entries[step].plan_seconds <= entries[step].sparse_seconds == entries[step].seconds
    for step in (2, 4):  # reused
        assert entries[step].plan_seconds < 0.01 and entries[step].sparse_seconds == entries[step].seconds
    sparse = sum(e.sparse_seconds for e in entries.values())
    assert attn.stats.plan_share == pytest.approx(sum(e.plan_seconds for e in entries.values()) / sparse)
    assert 0 < attn.stats.plan_share < 1


def test_static_plans_are_reused_and_the_cache_is_bounded():
    attn = SparseAttention("window", window=(1, 3, 3), block_size=8, min_seq_len=0, dense_steps=0)
    attn.plans.capacity = 3
    q = torch.randn(1, 64, 2, 8)
    plans = [attn.plan(q, q, PlanContext(grid=(1, 8, 8), heads=2, layer=layer, site=f"l{layer}")) for layer in range(4)]
    assert all(p is plans[0] for p in plans)  # one token layout, one plan, whatever the layer
    for width in range(2, 8):
        attn.plan(q, q, PlanContext(grid=(1, width, 64 // width) if 64 % width == 0 else (1, 1, 64), heads=2))
    assert len(attn.plans) <= 3
    cache = PlanCache(capacity=2)
    cache.put("a", plans[0]), cache.put("b", plans[0]), cache.get("a"), cache.put("c", plans[0])
    assert cache.get("b") is None and cache.get("a") is plans[0]


def test_register_method_refuses_incomplete_and_clashing_methods():
    class NoPlan(Planner):
        name, config_cls = "noplan", RecorderConfig

    class WrongConfig(RecorderPlanner):
        name = "other"

    class Clash(RecorderPlanner):
        name = "window"

        @dataclass(frozen=True)
        class config_cls(SparseAttentionConfig):
            method: ClassVar[str] = "window"

    class OldSignature(Planner):
        name, config_cls = "recorder", RecorderConfig

        def plan(self, q, k, ctx):
            raise AssertionError

    for cls, match in ((NoPlan, "config_cls"), (WrongConfig, "whose `method` is 'other'"),
                       (Clash, "already registered"), (OldSignature, r"\(self, q, k, ctx, state\)")):
        with pytest.raises(ConfigError, match=match):
            sparse_dit.register_method(cls)
    with pytest.raises(ConfigError, match="Planner subclasses"):
        sparse_dit.register_method(object)
    assert "recorder" not in sparse_dit.list_methods()


@pytest.fixture
def band():
    """examples/custom_method.py, imported as a user would."""
    spec = importlib.util.spec_from_file_location("custom_method", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["custom_method"] = module
    spec.loader.exec_module(module)
    yield module
    base._REGISTRY.pop("band", None)
    sys.modules.pop("custom_method", None)


def test_a_user_method_runs_through_a_pipeline(band):
    pipe, kwargs = make_pipeline("wan")
    reference = pipe(**kwargs).frames
    pipe.enable_sparse_attention("band", width=0, sinks=1, **options())
    sparse = pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}).frames
    stats = pipe.sparse_attention_stats()
    pipe.disable_sparse_attention()
    assert 0 < stats.density(sparse_only=True) < 1 and torch.isfinite(sparse).all()
    assert sparse.shape == reference.shape


def test_a_user_method_runs_through_sparse_dit_eval(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n")
    try:
        code = main(["--import", str(EXAMPLE), "eval", "--methods", "dense,band", "--controls", "random",
                     "--config", "band.min_seq_len=0", "--config", "band.block_size=16", "--config", "band.dense_steps=1",
                     "--num-frames", "4", "--height", "32", "--width", "32", "--steps", "2", "--seeds", "1",
                     "--warmup", "0", "--prompts", str(prompts), "--out", str(tmp_path / "out")])
    finally:
        base._REGISTRY.pop("band", None)
        sys.modules.pop("custom_method", None)
    assert code == 0
    records = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {(r["method"], r.get("paired_with")) for r in records} == {("dense", None), ("band", None), ("random", "band")}
    band_density = next(r["density"] for r in records if r["method"] == "band")
    assert 0 < band_density < 1
