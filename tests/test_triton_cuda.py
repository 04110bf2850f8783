"""The Triton kernels on CUDA against the torch reference: every kernel variant, fp16 and bf16, awkward shapes.

Skipped without CUDA (CPU CI collects it and moves on). What the interpreter test (test_triton_kernels.py)
cannot see: the compiled kernels on tensor cores, with the GPU's own rounding (P cast to fp16/bf16 before
P.V), at head dims 64 and 128, for sequences that are not a multiple of the block, batch > 1, plans from the
real planners with a text prefix or suffix, and density 1.0 against dense SDPA up to S = 16384.

Tolerances: the output must be within a per-dtype atol = rtol of the fp32 reference, or no further from it
than twice what SDPA itself makes in the same dtype under the same mask (the bound FlashAttention's tests
use); the LSE within 1e-3, -inf for skipped heads.

The cases run in a worker subprocess, as tests/test_triton_aot.py compiles: test_triton_kernels.py sets
TRITON_INTERPRET=1 and rebuilds triton.language for the interpreter when pytest collects it, and no kernel
can be compiled in that process afterwards. The worker spreads the cases over a few processes sharing the
GPU, since compiling some 35 kernel specialisations (2-3 s each) is most of the run.

Worker alone: `python tests/test_triton_cuda.py < cases.json` prints one JSON line of results. With
SPARSE_DIT_TEST_DEVICE=cpu it runs them on CPU under the interpreter (for small S only: a smoke test of
this file without a GPU).
"""

import json
import os
import subprocess
import sys
import time
import traceback
import zlib

import pytest
import torch

pytest.importorskip("triton")

DEVICE = os.environ.get("SPARSE_DIT_TEST_DEVICE", "cuda")
TOL = {"fp16": 4e-3, "bf16": 2.5e-2}  # atol = rtol against the fp32 reference
QUANT_TOL = {"fp16": 1e-2, "bf16": 2.5e-2}  # both sides round Q and K alike; only accumulation differs
LSE_TOL = 1e-3
S = 1000  # not a multiple of 64 or 128: a ragged last block
TEXT_GRID, TEXT_LEN = (8, 16, 16), 77  # 2048 video tokens and a T5-like text length: S = 2125, density 0.26-0.51


def _cases() -> list[dict]:
    """Every case as plain data (it travels to the worker as JSON)."""
    cases = []
    for block in (64, 128):  # both fixed-block kernels, token order and head modes, per-head layouts
        for d, dt in ((64, "fp16"), (64, "bf16"), (128, "fp16"), (128, "bf16")):
            cases.append(dict(kind="fixed", block=block, d=d, dt=dt, b=2, h=3, s=S))
    for block, d, dt in ((96, 64, "fp16"), (256, 128, "bf16")):  # other fixed sizes run as variable blocks
        cases.append(dict(kind="fixed", block=block, d=d, dt=dt, b=2, h=3, s=S))
    for d, dt in ((64, "fp16"), (64, "bf16"), (128, "fp16"), (128, "bf16")):  # SVG2-style clusters
        cases.append(dict(kind="variable", d=d, dt=dt, b=2, h=2, s=S))
    for quant, variant, d, dt in (("int8", "fixed-64", 64, "fp16"), ("int8", "fixed-64", 128, "bf16"),
                                  ("int8", "fixed-128", 64, "bf16"), ("int8", "fixed-128", 128, "fp16"),
                                  ("int8", "variable", 64, "fp16"), ("int8", "variable", 128, "bf16"),
                                  ("int4", "fixed-64", 64, "bf16")):
        cases.append(dict(kind="quant", quant=quant, variant=variant, d=d, dt=dt, b=2, h=2, s=S))
    for s, block, d, dt, b, h in ((S, 64, 64, "fp16", 2, 3), (S, 128, 128, "bf16", 2, 3),
                                  (4096 + 50, 128, 64, "bf16", 2, 4), (4096 + 50, 64, 128, "fp16", 2, 4),
                                  (16384, 128, 128, "bf16", 1, 4)):  # density 1.0 against dense SDPA
        cases.append(dict(kind="full", block=block, d=d, dt=dt, b=b, h=h, s=s))
    for method, position, block, d, dt in (("window", "prefix", 64, 64, "bf16"), ("window", "suffix", 128, 128, "fp16"),
                                           ("random", "prefix", 128, 128, "bf16"), ("random", "suffix", 64, 64, "fp16")):
        cases.append(dict(kind="planner", method=method, position=position, block=block, d=d, dt=dt, b=2, h=2,
                          grid=TEXT_GRID, text_len=TEXT_LEN))
    cases.append(dict(kind="gqa", block=128, d=64, dt="bf16", b=2, h=4, kv_heads=2, s=S))
    cases.append(dict(kind="strided", block=128, d=64, dt="fp16", b=2, h=3, s=S))
    cases.append(dict(kind="large", variant="fixed-128", d=128, dt="bf16", b=1, h=4, s=8192 + 37))
    cases.append(dict(kind="large", variant="variable", d=64, dt="fp16", b=1, h=4, s=8192 + 37))
    cases.append(dict(kind="refuse", s=256))
    for d, dt, block in ((64, "bf16", 64), (128, "fp16", 128)):
        cases.append(dict(kind="pool", d=d, dt=dt, block=block, b=2, h=3, s=S))
        cases.append(dict(kind="mass", d=d, dt=dt, block=block, b=2, h=2, s=S))
        cases.append(dict(kind="kmeans", d=d, dt=dt))
    for case in cases:
        case["id"] = case_id(case)
    return cases


def case_id(case: dict) -> str:
    skip = {"id", "kind", "b", "h", "grid", "text_len"}
    named = {"d": "d", "block": "block", "s": "s", "kv_heads": "kv"}
    return "-".join([case["kind"]] + [f"{named[k]}{v}" if k in named else str(v) for k, v in case.items() if k not in skip])


CASES = _cases()
assert len({c["id"] for c in CASES}) == len(CASES)

if DEVICE == "cuda" and not torch.cuda.is_available() and __name__ not in ("__main__", "__mp_main__"):
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.fixture(scope="module")
def results() -> dict:
    """{case id: result} from one worker subprocess that runs every case on the GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    timeout = float(os.environ.get("SPARSE_DIT_CUDA_TIMEOUT", 600))
    start = time.perf_counter()
    try:  # on a timeout the worker is killed, and its processes with it (`_die_with_parent`)
        proc = subprocess.run([sys.executable, __file__], input=json.dumps(CASES), capture_output=True, text=True,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        log = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        pytest.fail(f"the worker ran past {timeout:.0f} s (SPARSE_DIT_CUDA_TIMEOUT); cases it finished:\n{log[-6000:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.splitlines()[-1])
    found["wall_s"] = time.perf_counter() - start
    return found


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_kernel_matches_reference(results, case):
    r = results["cases"][case["id"]]
    assert r["error"] is None, r["error"]
    assert not r["failures"], "; ".join(r["failures"])


def test_print_results_table(results, capsys):
    rows = [f"{results['device']}, {results['procs']} worker processes, {results['wall_s']:.1f} s",
            f"{'case':<48} {'max err':>9} {'tol':>9} {'sdpa err':>9} {'lse err':>9} {'s':>6}  result"]
    for cid, r in results["cases"].items():
        numbers = " ".join(f"{r[key]:>9.2e}" if r.get(key) is not None else f"{'-':>9}"
                           for key in ("max_err", "tol", "base_err", "lse_err"))
        verdict = "ERROR" if r["error"] else ("FAIL: " + "; ".join(r["failures"]) if r["failures"] else "ok")
        rows.append(f"{cid:<48} {numbers} {r['seconds']:>6.1f}  {verdict}")
    with capsys.disabled():
        print("\n" + "\n".join(rows))


# ---------------------------------------------------------------------------------------------------------
# The worker: run as a script with the cases as JSON on stdin; prints {"cases": {id: result}, ...} as one line.


class Checker:
    """Collects the numbers and failed checks of one case instead of stopping at the first."""

    def __init__(self, result: dict):
        self.result = result

    def fail(self, message: str) -> None:
        self.result["failures"].append(message)

    def close(self, name, got, expected, tol, base=None, record="max_err"):
        """got within atol = rtol = tol of expected (infinities equal), or no further than 2x the baseline's error."""
        got, expected = got.float(), expected.float()
        if got.shape != expected.shape:
            return self.fail(f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}")
        same_inf = (got == expected) | ~(got.isinf() | expected.isinf())
        finite = expected.isfinite() & got.isfinite()
        err = float((got - expected).abs()[finite].max()) if bool(finite.any()) else 0.0
        within = bool(((got - expected).abs() <= tol + tol * expected.abs())[finite].all())
        base_err = None
        if base is not None:
            base_err = float((base.float() - expected).abs()[finite].max())
            within = within or err <= 2 * base_err + 1e-5
        if record:
            self.result[record] = max(err, self.result.get(record) or 0.0)
            if record == "max_err":
                self.result["tol"] = tol
                if base_err is not None:
                    self.result["base_err"] = max(base_err, self.result.get("base_err") or 0.0)
        if not bool(same_inf.all()):
            self.fail(f"{name}: infinities differ at {int((~same_inf).sum())} entries")
        if bool(got.isnan().any()):
            self.fail(f"{name}: {int(got.isnan().sum())} NaNs")
        if not within:
            extra = "" if base_err is None else f" (SDPA in the same dtype: {base_err:.2e})"
            self.fail(f"{name}: max abs error {err:.2e} > tol {tol:.0e}{extra}")

    def equal(self, name, got, expected):
        if not torch.equal(got, expected):
            self.fail(f"{name}: not bitwise equal (max diff {float((got.float() - expected.float()).abs().max()):.2e})")


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the parent process dies, so that a killed test or worker leaves nothing on the GPU."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_case(case: dict) -> dict:
    result = dict(id=case["id"], error=None, failures=[], seconds=0.0)
    start = time.perf_counter()
    try:
        _check_case(case, Checker(result))
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    except Exception:
        result["error"] = traceback.format_exc()[-3000:]
    result["seconds"] = time.perf_counter() - start
    return result


def _check_case(case: dict, check: Checker) -> None:
    import torch.nn.functional as F

    from sparse_dit import kernels
    from sparse_dit.errors import ConfigError
    from sparse_dit.kernels import triton as tk
    from sparse_dit.kernels.reference import reference_attention
    from sparse_dit.plan import HEAD_DENSE, HEAD_SKIP, HEAD_SPARSE, AttentionPlan

    dev = torch.device(DEVICE)
    assert tk.is_interpreted() == (DEVICE == "cpu"), "the kernels are not built for this device"
    gen = torch.Generator().manual_seed(zlib.crc32(case["id"].encode()))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(case.get("dt"))
    kind, b, h, s, d = case["kind"], case.get("b", 1), case.get("h", 1), case.get("s"), case.get("d")

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(dev, dt)

    def layout(pb, ph, nq, nk, p):
        keep = torch.rand(pb, ph, nq, nk, generator=gen) < p
        if nq == nk:
            keep |= torch.eye(nq, dtype=torch.bool)  # a query block never ends with no key block
        keep[..., 0] = True
        return keep.to(dev)

    def order(pb, ph, n):
        return torch.stack([torch.randperm(n, generator=gen) for _ in range(pb * ph)]).view(pb, ph, n).to(dev)

    def bounds(pb, ph, n, seq, min_first=1):
        """(pb, ph, n + 1) cluster boundaries: a first cluster of at least `min_first` tokens, then random cuts
        (duplicates make zero-length clusters)."""
        cuts = torch.randint(min_first, seq + 1, (pb, ph, n - 1), generator=gen).sort(dim=-1).values
        return torch.cat([torch.zeros(pb, ph, 1, dtype=torch.long), cuts, torch.full((pb, ph, 1), seq)], dim=-1).to(dev)

    def heads_first(*xs):
        return [x.transpose(1, 2) for x in xs]

    def against_reference(q, k, v, plan, tol, baseline=True, lse=True):
        """Triton (with LSE) against the fp32 reference; twice, bitwise equal; and `kernels.run` dispatches to it."""
        out, out_lse = tk.triton_attention(q, k, v, plan, return_lse=True)
        expected, expected_lse = reference_attention(q.float(), k.float(), v.float(), plan, return_lse=True)
        if out.dtype != q.dtype or out.shape != q.shape:
            check.fail(f"output {out.dtype} {tuple(out.shape)}, expected {q.dtype} {tuple(q.shape)}")
        base = reference_attention(q, k, v, plan) if baseline and plan.quant == "none" else None
        check.close("out", out, expected, tol, base)
        if lse:
            check.close("lse", out_lse, expected_lse, LSE_TOL, record="lse_err")
        check.equal("second call", tk.triton_attention(q, k, v, plan), out)
        auto_is_triton(q, k, v, plan, out)
        return out

    def auto_is_triton(q, k, v, plan, out):
        """On CUDA `kernels.run` picks the Triton kernel by itself (on CPU it picks the CPU paths)."""
        if DEVICE == "cuda":
            check.equal("kernels.run(auto)", kernels.run(q, k, v, plan), out)

    if kind == "fixed":
        q, k, v = (randn(b, s, h, d) for _ in range(3))
        n = -(-s // case["block"])
        modes = torch.tensor([[HEAD_DENSE, HEAD_SPARSE, HEAD_SKIP], [HEAD_SPARSE, HEAD_SPARSE, HEAD_DENSE]],
                             dtype=torch.int8, device=dev)
        plan = AttentionPlan(seq_len=s, layout=layout(b, h, n, n, 0.3), block_size=case["block"], order=order(b, h, s),
                             head_mode=modes[:b, :h])
        against_reference(q, k, v, plan, TOL[case["dt"]])
    elif kind == "variable":
        q, k, v = (randn(b, s, h, d) for _ in range(3))
        # A first query cluster of >= 150 tokens spans three 64-row tiles; key clusters are shared over the batch.
        plan = AttentionPlan(seq_len=s, layout=layout(b, h, 7, 9, 0.4), q_bounds=bounds(b, h, 7, s, min_first=150),
                             k_bounds=bounds(1, h, 9, s), order=order(b, h, s))
        against_reference(q, k, v, plan, TOL[case["dt"]])
    elif kind == "quant":
        q, k, v = (randn(b, s, h, d) for _ in range(3))
        if case["variant"] == "variable":
            cuts = bounds(1, 1, 6, s, min_first=10)
            plan = AttentionPlan(seq_len=s, layout=layout(b, h, 6, 6, 0.5), q_bounds=cuts, k_bounds=cuts, quant=case["quant"])
        else:
            block = int(case["variant"].split("-")[1])
            n = -(-s // block)
            plan = AttentionPlan(seq_len=s, layout=layout(1, h, n, n, 0.4), block_size=block, quant=case["quant"])
        out = against_reference(q, k, v, plan, QUANT_TOL[case["dt"]])
        exact = reference_attention(q.float(), k.float(), v.float(), AttentionPlan(
            seq_len=s, layout=plan.layout, block_size=plan.block_size, q_bounds=plan.q_bounds, k_bounds=plan.k_bounds))
        quantized = reference_attention(q.float(), k.float(), v.float(), plan)
        far, near = float((out.float() - exact).abs().max()), float((out.float() - quantized).abs().max())
        if (case["dt"] == "fp16" or case["quant"] == "int4") and not far > 3 * near:
            check.fail(f"not quantized? error vs exact {far:.2e}, vs quantized reference {near:.2e}")
    elif kind == "full":
        q, k, v = (randn(b, s, h, d) for _ in range(3))
        plan = AttentionPlan.full(s, case["block"], device=dev)
        out = tk.triton_attention(q, k, v, plan)
        dense = F.scaled_dot_product_attention(*heads_first(q.float(), k.float(), v.float())).transpose(1, 2)
        base = F.scaled_dot_product_attention(*heads_first(q, k, v)).transpose(1, 2)
        check.close("out vs dense SDPA", out, dense, TOL[case["dt"]], base)
        auto_is_triton(q, k, v, plan, out)
    elif kind == "planner":
        from sparse_dit.patterns import PlanContext, build_planner, resolve_config
        from sparse_dit.state import SiteState

        ctx = PlanContext(grid=tuple(case["grid"]), text_len=case["text_len"], text_position=case["position"], batch=b,
                          heads=h, device=dev)
        s = ctx.seq_len
        q, k, v = (randn(b, s, h, d) for _ in range(3))
        plan = build_planner(resolve_config(case["method"], block_size=case["block"])).plan(q, k, ctx, SiteState())
        plan.check_rows()
        if not 0 < plan.density < 1:
            check.fail(f"plan density {plan.density:.3f}: not a sparse plan")
        out = kernels.run(q, k, v, plan, backend="triton")
        expected = kernels.run(q.float(), k.float(), v.float(), plan, backend="reference")
        base = kernels.run(q, k, v, plan, backend="reference")
        check.close("out", out, expected, TOL[case["dt"]], base)
        text = ctx.text_token_mask()  # text queries attend every key: their rows are dense attention's
        dense = F.scaled_dot_product_attention(*heads_first(q.float(), k.float(), v.float())).transpose(1, 2)
        check.close("text rows vs dense", out[:, text], dense[:, text], TOL[case["dt"]], base[:, text], record=None)
        auto_is_triton(q, k, v, plan, out)
    elif kind == "gqa":
        q = randn(b, s, h, d)
        k, v = (randn(b, s, case["kv_heads"], d) for _ in range(2))
        n = -(-s // case["block"])
        plan = AttentionPlan(seq_len=s, layout=layout(1, h, n, n, 0.3), block_size=case["block"])
        out = kernels.run(q, k, v, plan, backend="triton")
        expected = kernels.run(q.float(), k.float(), v.float(), plan, backend="reference")
        check.close("out", out, expected, TOL[case["dt"]], kernels.run(q, k, v, plan, backend="reference"))
    elif kind == "strided":
        # q, k, v sliced from one fused (B, S, 3, H, D) projection: strided views, not contiguous tensors.
        q, k, v = randn(b, s, 3, h, d).unbind(dim=2)
        n = -(-s // case["block"])
        plan = AttentionPlan(seq_len=s, layout=layout(1, h, n, n, 0.5), block_size=case["block"])
        against_reference(q, k, v, plan, TOL[case["dt"]])
    elif kind == "large":
        q, k, v = (randn(b, s, h, d) for _ in range(3))
        if case["variant"] == "variable":
            plan = AttentionPlan(seq_len=s, layout=layout(b, h, 40, 40, 0.2), q_bounds=bounds(b, h, 40, s),
                                 k_bounds=bounds(b, h, 40, s))
        else:
            n = -(-s // 128)
            plan = AttentionPlan(seq_len=s, layout=layout(b, h, n, n, 0.2), block_size=128)
        against_reference(q, k, v, plan, TOL[case["dt"]])
    elif kind == "refuse":  # what the GPU path does not take goes elsewhere, loudly when forced
        plan = AttentionPlan.full(s, 64, device=dev)
        for q, why in ((torch.randn(1, s, 2, 64, device=dev), "fp32"),
                       (torch.randn(1, s, 2, 96, device=dev, dtype=torch.float16), "head dim 96"),
                       (torch.randn(1, s, 2, 64, device=dev, dtype=torch.float16, requires_grad=True), "gradient")):
            if DEVICE == "cuda" and tk.supports(plan, q, None, False):
                check.fail(f"supports() takes {why}")
            if DEVICE == "cuda":
                try:
                    kernels.run(q, q, q, plan, backend="triton")
                    check.fail(f"backend 'triton' ran {why}")
                except ConfigError:
                    pass
        if not tk.supports(plan, torch.randn(1, s, 2, 64, device=dev, dtype=torch.bfloat16), None, True):
            check.fail("supports() refuses bf16, head dim 64")
    elif kind == "pool":
        x = randn(b, s, h, d)
        block = case["block"]
        pooled = tk.block_mean_pool(x, block)
        xf = x.float().transpose(1, 2)
        expected = torch.stack([xf[:, :, i:i + block].mean(dim=2) for i in range(0, s, block)], dim=2)
        check.close("pooled", pooled, expected, 1e-4)
    elif kind == "mass":
        block, scale = case["block"], 0.2
        q, k = randn(b, s, h, d), randn(b, s, h, d)
        scores = (q.float().transpose(1, 2) @ k.float().transpose(1, 2).mT) * scale
        lse = torch.logsumexp(scores, dim=-1)
        lse[-1, 0] = float("-inf")  # a skipped head carries no mass
        mass = tk.block_attention_mass(q, k, lse, block, scale=scale)
        probs = torch.exp(scores - lse[..., None]).nan_to_num(posinf=0.0)
        n = -(-s // block)
        padded = F.pad(probs, (0, n * block - s, 0, n * block - s))
        expected = padded.view(b, h, n, block, n, block).sum(dim=(3, 5))
        check.close("mass", mass, expected, TOL[case["dt"]])
    elif kind == "kmeans":
        x, centroids = randn(3, 1000, d), randn(3, 70, d)  # 70 centroids: two ragged steps
        assign = tk.kmeans_assign(x, centroids)
        dist = torch.cdist(x.double(), centroids.double())
        chosen = dist.gather(2, assign.long()[..., None]).squeeze(-1)
        check.close("distance to the chosen centroid", chosen, dist.min(dim=-1).values, 1e-2)
        agree = float((assign.long() == dist.argmin(dim=-1)).float().mean())
        if assign.dtype != torch.int32 or agree <= 0.98:
            check.fail(f"assignment {assign.dtype}, agrees with argmin on {agree:.3f}")
    else:
        raise ValueError(f"unknown case kind {kind!r}")


def _worker() -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # inherited by the spawned processes before they import triton
    _die_with_parent()
    cases = json.load(sys.stdin)
    procs = int(os.environ.get("SPARSE_DIT_CUDA_PROCS", min(12, os.cpu_count() or 1, len(cases))))
    # Slowest (largest) cases first so that no process is left with a long one at the end.
    todo = sorted(cases, key=lambda c: -(c.get("s") or 0) * c.get("b", 1) * c.get("h", 1))
    done = {}
    # spawn: CUDA cannot be used in a forked child.
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent) as pool:
        futures = {pool.submit(_run_case, case): case["id"] for case in todo}
        for future in as_completed(futures):
            try:
                r = future.result()
            except Exception as exc:  # its process died (a crash takes the pool's other pending cases with it)
                r = dict(id=futures[future], error=f"{type(exc).__name__}: {exc}", failures=[], seconds=0.0)
            done[r["id"]] = r
            verdict = "error" if r["error"] else ("FAIL" if r["failures"] else "ok")
            print(f"[{len(done)}/{len(cases)}] {r['id']}: {verdict} in {r['seconds']:.1f} s", file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (TRITON_INTERPRET=1)"
    print(json.dumps({"device": name, "procs": procs, "cases": {c["id"]: done[c["id"]] for c in cases}}))


if __name__ == "__main__":
    _worker()
