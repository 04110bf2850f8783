"""Sparse attention under diffusers' context parallelism (Ulysses and ring), on CPU.

The distributed cases run once per session in two gloo processes started by `two_processes` (this file is also
the worker: `python test_context_parallel.py RANK STORE OUT`), each with a hard timeout; every case compares a
tiny Wan transformer (or pipeline) split over the two processes with the same model on one process running the
same method. The single-process tests check the pieces: shards of a plan against the reference, the LSE gather
kernel, the merge, per-head context, and the refusals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TOL = 2e-5  # fp32 round-off: Ulysses computes the same sums per head, ring in another order (measured <= 1e-6)
TIMEOUT = 150  # seconds for the whole two-process run
# Every method whose plan is determined by q, k and the call's place (site, step, global head index).
METHODS = ("window", "random", "dense", "oracle", "gna", "clear", "svg2", "adaspa", "xattention", "vmoba")
OPTIONS = {"min_seq_len": 0, "dense_steps": 0, "block_size": 8}
METHOD_OPTIONS = {"window": {"window": (1, 3, 3)}, "random": {"density": 0.3}, "oracle": {"density": 0.3},
                  "svg2": {"num_q_centroids": 6, "num_k_centroids": 8}}


# --------------------------------------------------------------------------------------------------------------
# The worker: every distributed case, in one pair of processes.
# --------------------------------------------------------------------------------------------------------------


def _wan(heads: int = 4):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def _inputs(height: int, width: int, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(batch, 4, 3, height, width, generator=g),
                encoder_hidden_states=torch.randn(batch, 12, 16, generator=g),
                timestep=torch.full((batch,), 500, dtype=torch.long), return_dict=False)


def _enable_parallelism(model, **config) -> None:
    from unittest import mock

    from diffusers.models._modeling_parallel import ContextParallelConfig

    # diffusers 0.42.1 places each rank on an accelerator (rank % device_count()); a CPU-only machine has none.
    with mock.patch("torch.accelerator.device_count", return_value=1):
        model.enable_parallelism(config=ContextParallelConfig(**config))


def _gloo_gather_anything():
    """diffusers 0.42.1 gathers shards of different lengths (`ulysses_anything`, `ring_anything`) with one
    `dist.all_gather`, which gloo refuses; this gathers them padded to the longest and cuts the padding off."""
    from unittest import mock

    import torch.distributed as dist
    from diffusers.hooks import context_parallel
    from diffusers.models._modeling_parallel import gather_size_by_comm

    def gather(tensor, dim, group):
        sizes = gather_size_by_comm(tensor.shape[dim], group)
        pad = [0, 0] * (tensor.dim() - dim - 1) + [0, max(sizes) - tensor.shape[dim]]
        padded = torch.nn.functional.pad(tensor, pad).contiguous()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part.narrow(dim, 0, n) for part, n in zip(parts, sizes)], dim=dim)

    return mock.patch.object(context_parallel, "_all_gather_anything", gather)


def _stats(model) -> list[dict]:
    from sparse_dit.plugin import sparse_attention_stats

    return [{k: r[k] for k in ("step", "layer", "calls", "sparse_calls", "head_densities")}
            for r in sparse_attention_stats(model).as_records()]


def _same_stats(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["step"] == y["step"] and x["layer"] == y["layer"] and x["calls"] == y["calls"]
        and x["sparse_calls"] == y["sparse_calls"] and len(x["head_densities"]) == len(y["head_densities"])
        and all(abs(p - q) < 1e-12 for p, q in zip(x["head_densities"], y["head_densities"])) for x, y in zip(a, b))


def _density_pattern(heads: int):
    """A `random` pattern file with another density per head: the heads' values are read by global index."""
    from sparse_dit.pattern_file import PatternFile

    values = torch.tensor([[0.15 + 0.1 * h for h in range(heads)]])
    return PatternFile("random", options=dict(OPTIONS), tensors={f"transformer.blocks.{i}.attn1/density": values for i in range(2)})


def _transformer_case(mode: str, method, *, heads: int = 4, size: tuple[int, int] = (8, 12), uneven: bool = False,
                      sparse_first: bool = False, options: dict | None = None) -> dict:
    from sparse_dit.plugin import enable_sparse_attention

    options = {**OPTIONS, **METHOD_OPTIONS.get(method, {}), **(options or {})} if isinstance(method, str) else {}
    inputs = _inputs(*size)
    single = _wan(heads)
    enable_sparse_attention(single, method, **options)
    with torch.no_grad():
        expected = single(**inputs)[0]
    split = _wan(heads)
    config = {f"{mode}_degree": 2, **({f"{mode}_anything": True} if uneven else {})}
    if sparse_first:
        enable_sparse_attention(split, method, **options)
        _enable_parallelism(split, **config)
    else:
        _enable_parallelism(split, **config)
        enable_sparse_attention(split, method, **options)
    with torch.no_grad():
        got = split(**inputs)[0]
    return {"error": float((got - expected).abs().max()), "stats": _same_stats(_stats(single), _stats(split)),
            "density": _stats(split)[0]["head_densities"]}


def _pipeline_case(mode: str, method: str) -> dict:
    """The tiny Wan 2.1 pipeline: 3 steps, CFG (cond and uncond calls), the first step dense."""
    from tiny_models import make_pipeline

    options = {**OPTIONS, **METHOD_OPTIONS.get(method, {}), "dense_steps": 1}
    pipe, kwargs = make_pipeline("wan")
    pipe.enable_sparse_attention(method, **options)
    expected = pipe(**kwargs).frames
    expected_stats = _stats(pipe)
    pipe, kwargs = make_pipeline("wan")
    _enable_parallelism(pipe.transformer, **{f"{mode}_degree": 2})
    pipe.enable_sparse_attention(method, **options)
    got = pipe(**kwargs).frames
    return {"error": float((got - expected).abs().max()), "stats": _same_stats(expected_stats, _stats(pipe)),
            "calls": [r["calls"] for r in _stats(pipe)], "sparse_calls": [r["sparse_calls"] for r in _stats(pipe)]}


def _refused(fn) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the case reports what was raised
        return f"{type(exc).__name__}: {exc}"
    return "not refused"


def _refusals() -> dict:
    from dataclasses import dataclass
    from typing import ClassVar

    from sparse_dit.patterns import WindowConfig, WindowPlanner, register_method
    from sparse_dit.plugin import enable_sparse_attention

    @dataclass(frozen=True)
    class PooledConfig(WindowConfig):
        method: ClassVar[str] = "cp_test_pooled"

    @register_method
    class PooledPlanner(WindowPlanner):  # stands for a method that pools its mask over heads
        name = "cp_test_pooled"
        config_cls = PooledConfig
        needs_all_heads = True

    def ulysses_then_pooled():
        model = _wan()
        _enable_parallelism(model, ulysses_degree=2)
        enable_sparse_attention(model, "cp_test_pooled", **OPTIONS)

    def pooled_then_ulysses():
        model = _wan()
        enable_sparse_attention(model, "cp_test_pooled", **OPTIONS)
        _enable_parallelism(model, ulysses_degree=2)
        with torch.no_grad():
            model(**_inputs(8, 12))

    def ring_with_flex():
        model = _wan()
        _enable_parallelism(model, ring_degree=2)
        enable_sparse_attention(model, "window", backend="flex", **OPTIONS)

    def flex_then_ring():
        model = _wan()
        enable_sparse_attention(model, "window", backend="flex", **OPTIONS)
        _enable_parallelism(model, ring_degree=2)
        with torch.no_grad():
            model(**_inputs(8, 12))

    found = {name: _refused(fn) for name, fn in (("ulysses_then_pooled", ulysses_then_pooled),
                                                 ("pooled_then_ulysses", pooled_then_ulysses),
                                                 ("ring_with_flex", ring_with_flex), ("flex_then_ring", flex_then_ring))}
    # A method that plans from all heads is fine under ring, where every process holds all heads.
    found["pooled_under_ring"] = _transformer_case("ring", "cp_test_pooled", options={"window": (1, 3, 3)})
    return found


def _worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    results: dict = {}
    for mode in ("ulysses", "ring"):
        for method in METHODS:
            results[f"{mode}/{method}"] = _transformer_case(mode, method, sparse_first=mode == "ring")
        # Per-head densities from a pattern file, read by global head index.
        results[f"{mode}/random_pattern"] = _transformer_case(mode, _density_pattern(4))
        with _gloo_gather_anything():
            # 45 tokens (23 + 22 per process) in blocks of 8; under Ulysses also 3 heads (2 + 1 per process).
            for method in ("window", "random", "oracle"):
                results[f"{mode}/uneven/{method}"] = _transformer_case(mode, method, heads=3, size=(6, 10), uneven=True)
        results[f"{mode}/gather_backend"] = _transformer_case(mode, "window", options={"backend": "gather"})
        for method in ("window", "random"):
            results[f"{mode}/pipeline/{method}"] = _pipeline_case(mode, method)
    results["refusals"] = _refusals()
    Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------
# The distributed run and its cases.
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> list[dict]:
    """Runs the worker in two gloo processes (file store, no port); returns each process's results."""
    tmp = tmp_path_factory.mktemp("cp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                                 os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(tmp / "store"), str(tmp / f"rank{rank}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=max(1.0, TIMEOUT - (time.perf_counter() - started)))[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the two-process run took more than {TIMEOUT} s")
    finally:
        for proc in procs:  # a process whose peer died waits in a collective: end it
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"process {rank} failed:\n{log[-4000:]}"
    return [json.loads((tmp / f"rank{rank}.json").read_text()) for rank in range(2)]


CASES = [f"{mode}/{case}" for mode in ("ulysses", "ring")
         for case in (*METHODS, "random_pattern", "uneven/window", "uneven/random", "uneven/oracle", "gather_backend")]


@pytest.mark.parametrize("case", CASES)
def test_split_transformer_equals_one_process(two_processes, case):
    for rank, results in enumerate(two_processes):
        found = results[case]
        assert found["error"] <= TOL, f"process {rank}: {case} differs from one process by {found['error']:.3g}"
        assert found["stats"], f"process {rank}: {case} stats differ from one process's"


def test_stats_hold_every_head(two_processes):
    # Ulysses: each process plans 2 of the 4 heads; the stats gather them, in head order.
    for results in two_processes:
        densities = results["ulysses/random_pattern"]["density"]
        assert len(densities) == 4 and densities == sorted(densities) and len(set(densities)) == 4
        assert len(results["ulysses/uneven/window"]["density"]) == 3


@pytest.mark.parametrize("case", ["ulysses/pipeline/window", "ulysses/pipeline/random", "ring/pipeline/window",
                                  "ring/pipeline/random"])
def test_split_pipeline_equals_one_process(two_processes, case):
    for results in two_processes:
        found = results[case]
        assert found["error"] <= TOL
        assert found["stats"]
        # 3 steps x (cond + uncond): step 0 dense, steps 1 and 2 sparse, on each of the 2 layers.
        assert found["calls"] == [2] * 6 and found["sparse_calls"] == [0, 0, 2, 2, 2, 2]


def test_refusals_between_processes(two_processes):
    for results in two_processes:
        found = results["refusals"]
        for case in ("ulysses_then_pooled", "pooled_then_ulysses"):
            assert found[case].startswith("ConfigError") and "all heads at once" in found[case], found[case]
            assert "ring_degree=2" in found[case]
        for case in ("ring_with_flex", "flex_then_ring"):
            assert found[case].startswith("ConfigError") and "log-sum-exp" in found[case], found[case]
            assert "'gather'" in found[case] and "'reference'" in found[case]
        assert found["pooled_under_ring"]["error"] <= TOL


# --------------------------------------------------------------------------------------------------------------
# Single-process pieces.
# --------------------------------------------------------------------------------------------------------------


def _plan(seq_len: int, block: int, heads: int, *, seed: int, order: bool = False, head_mode: bool = False,
          variable: bool = False, batch: int = 1):
    from sparse_dit.plan import HEAD_DENSE, HEAD_SKIP, HEAD_SPARSE, AttentionPlan

    g = torch.Generator().manual_seed(seed)
    if variable:
        n = 5
        cuts = torch.sort(torch.randperm(seq_len - 1, generator=g)[: n - 1] + 1).values
        bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([seq_len])]).view(1, 1, -1)
        layout = torch.rand(batch, heads, n, n, generator=g) < 0.4
        layout |= torch.eye(n, dtype=torch.bool)
        return AttentionPlan(seq_len=seq_len, layout=layout, q_bounds=bounds, k_bounds=bounds.clone())
    n = -(-seq_len // block)
    layout = (torch.rand(batch, heads, n, n, generator=g) < 0.35) | torch.eye(n, dtype=torch.bool)
    fields = {}
    if order:
        fields["order"] = torch.stack([torch.randperm(seq_len, generator=g) for _ in range(heads)]).view(1, heads, seq_len)
    if head_mode:
        fields["head_mode"] = torch.tensor([[HEAD_SPARSE, HEAD_DENSE, HEAD_SKIP][h % 3] for h in range(heads)], dtype=torch.int8).view(1, heads)
    return AttentionPlan(seq_len=seq_len, layout=layout, block_size=block, **fields)


def _qkv(batch: int, seq_len: int, heads: int, dim: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq_len, heads, dim, generator=g) for _ in range(3)]


def _shards(seq_len: int, parts: int) -> list[tuple[int, int]]:
    edges = [seq_len * i // parts for i in range(parts + 1)]
    return [(lo, hi - lo) for lo, hi in zip(edges[:-1], edges[1:])]


@pytest.mark.parametrize("backend", ["reference", "gather", "auto"])
@pytest.mark.parametrize("kind", ["fixed", "order", "head_mode", "variable"])
@pytest.mark.parametrize("seq_len,parts", [(45, 2), (61, 3), (64, 2)])
def test_key_shards_merge_to_the_plan(kind, backend, seq_len, parts):
    from sparse_dit.kernels.lse import merge, shard_attention
    from sparse_dit.kernels.reference import reference_attention

    heads, batch = 3, 2
    plan = _plan(seq_len, 8, heads, seed=seq_len + parts, order=kind == "order", head_mode=kind == "head_mode",
                 variable=kind == "variable", batch=batch)
    q, k, v = _qkv(batch, seq_len, heads)
    expected, expected_lse = reference_attention(q, k, v, plan, return_lse=True)
    for q_start, q_len in _shards(seq_len, parts):
        found = [shard_attention(plan, q[:, q_start : q_start + q_len], k[:, lo : lo + n], v[:, lo : lo + n], q_start,
                                 lo, backend=backend) for lo, n in _shards(seq_len, parts)]
        out, lse = merge([f for f in found if f is not None])
        torch.testing.assert_close(out, expected[:, q_start : q_start + q_len], atol=2e-6, rtol=0)
        kept = torch.isfinite(expected_lse[..., q_start : q_start + q_len])
        torch.testing.assert_close(lse[kept], expected_lse[..., q_start : q_start + q_len][kept], atol=2e-6, rtol=0)


def test_a_shard_without_kept_blocks_is_skipped():
    from sparse_dit.kernels.lse import shard_attention
    from sparse_dit.plan import AttentionPlan

    n = 6  # a block-diagonal plan: the queries of the first half keep no key of the second
    plan = AttentionPlan(seq_len=48, layout=torch.eye(n, dtype=torch.bool)[None, None], block_size=8)
    q, k, v = _qkv(1, 48, 2)
    for backend in ("reference", "gather"):
        assert shard_attention(plan, q[:, :24], k[:, 24:], v[:, 24:], 0, 24, backend=backend) is None
        assert shard_attention(plan, q[:, :24], k[:, :24], v[:, :24], 0, 0, backend=backend) is not None


def test_padding_is_never_a_kept_key():
    from sparse_dit.kernels.lse import shard_plan

    for seed in range(20):
        plan = _plan(45, 8, 2, seed=seed, order=seed % 2 == 1)
        for (q_start, q_len), (k_start, k_len) in [((0, 23), (23, 22)), ((23, 22), (0, 23)), ((0, 23), (0, 23))]:
            found = shard_plan(plan, q_start, q_len, k_start, k_len)
            assert found is not None  # every query keeps its own block, which holds shard keys
            sub = found[0]
            assert sub.seq_len == 23
            assert int(sub.k_bounds[..., -2].max()) == k_len  # the keys end where the padding block starts
            assert not sub.layout[..., -1].any()  # the padding key block is kept by no query block


def test_gather_lse_equals_reference():
    from sparse_dit.kernels.lse import gather_attention_lse
    from sparse_dit.kernels.reference import reference_attention

    for kind in ("fixed", "order", "head_mode"):
        plan = _plan(53, 8, 3, seed=7, order=kind == "order", head_mode=kind == "head_mode", batch=2)
        for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 2e-2)):
            q, k, v = (x.to(dtype) for x in _qkv(2, 53, 3))
            out, lse = gather_attention_lse(q, k, v, plan)
            expected, expected_lse = reference_attention(q.float(), k.float(), v.float(), plan, return_lse=True)
            assert out.dtype == dtype
            torch.testing.assert_close(out.float(), expected, atol=tol, rtol=0)
            torch.testing.assert_close(lse, expected_lse, atol=tol, rtol=0)


def test_merge_keeps_queries_without_keys_finite():
    from sparse_dit.kernels.lse import merge

    out = torch.ones(1, 2, 1, 4)
    empty = (torch.zeros(1, 2, 1, 4), torch.full((1, 1, 2), float("-inf")))
    full = (out, torch.zeros(1, 1, 2))
    for parts in ([empty, full], [full, empty], [empty, empty]):
        merged, lse = merge(parts)
        assert torch.isfinite(merged).all()
    assert torch.equal(merge([empty, full])[0], out) and torch.equal(merge([empty, empty])[0], torch.zeros_like(out))


def test_head_offset_plans_the_global_heads():
    from sparse_dit import SparseAttention
    from sparse_dit.errors import ShapeError
    from sparse_dit.plan import PlanContext
    from sparse_dit.state import SiteState

    attn = SparseAttention(_density_pattern(4), min_seq_len=0)
    full = PlanContext(grid=(3, 4, 6), heads=4, site="transformer.blocks.0.attn1", step=0)
    whole = attn.planner.plan(None, None, full, SiteState()).layout
    for offset in (0, 2):
        part = PlanContext(grid=(3, 4, 6), heads=2, site="transformer.blocks.0.attn1", step=0, head_offset=offset, total_heads=4)
        assert part.all_heads == 4 and part.head_slice == slice(offset, offset + 2)
        assert torch.equal(attn.planner.plan(None, None, part, SiteState()).layout, whole[:, offset : offset + 2])
        assert attn.pattern.head_values(part, "density") == attn.pattern.head_values(full, "density")[offset : offset + 2]
    with pytest.raises(ShapeError, match="not among the model's 4 heads"):
        PlanContext(grid=(3, 4, 6), heads=2, head_offset=3, total_heads=4)


def _fake_parallel(model, **degrees) -> None:
    """The config `enable_parallelism` records on a model, without processes: enough for the checks made at enable."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    model._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(**degrees))


def test_model_without_cp_plan_is_refused():
    from tiny_models import make_transformer_case

    from sparse_dit.errors import UnsupportedModelError
    from sparse_dit.plugin import enable_sparse_attention

    model = make_transformer_case("cogvideox").model
    _fake_parallel(model, ulysses_degree=2)
    with pytest.raises(UnsupportedModelError, match="has no `_cp_plan`.*WanTransformer3DModel"):
        enable_sparse_attention(model, "window")
    assert getattr(model, "_diffusers_hook", None) is None  # nothing was hooked


def test_joint_text_model_is_refused():
    from tiny_models import make_transformer_case

    from sparse_dit.errors import UnsupportedModelError
    from sparse_dit.plugin import enable_sparse_attention

    model = make_transformer_case("flux").model
    _fake_parallel(model, ring_degree=2)
    with pytest.raises(UnsupportedModelError, match="joins text tokens"):
        enable_sparse_attention(model, "window")


def test_ring_and_ulysses_together_are_refused():
    from sparse_dit.errors import ConfigError
    from sparse_dit.plugin import enable_sparse_attention

    model = _wan()
    _fake_parallel(model, ring_degree=2, ulysses_degree=2)
    with pytest.raises(ConfigError, match="not both.*ulysses_degree=4"):
        enable_sparse_attention(model, "window")


def test_ring_backends_name_those_with_an_lse():
    from sparse_dit.plugin.parallel import ring_backends

    able = ring_backends("cpu")
    assert {"auto", "gather", "reference"} <= set(able) and "flex" not in able


def test_backend_takes_part_in_context_parallelism():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from sparse_dit.plugin import enable_sparse_attention

    model = _wan()
    enable_sparse_attention(model, "window")
    assert "sparse_dit" in _AttentionBackendRegistry._supports_context_parallel


def test_example_runs_under_torchrun():
    """examples/wan_context_parallel.py on the demo model: two processes, checked against one."""
    import re
    import signal

    example = Path(__file__).resolve().parents[1] / "examples" / "wan_context_parallel.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(example),
               "--pipeline", "demo", "--check", "--frames", "4", "--size", "32", "32", "--steps", "3"]
    proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output = proc.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the two processes it started
        proc.communicate()
        pytest.fail(f"the example took more than {TIMEOUT} s")
    assert proc.returncode == 0, output[-4000:]
    assert "window under Ulysses over 2 processes" in output and "of all 2 heads" in output
    assert float(re.search(r"largest difference from one process: (\S+)", output).group(1)) <= TOL


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
