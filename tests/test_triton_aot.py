"""Ahead-of-time compilation of every GPU configuration of the Triton kernels for sm_80 and sm_90, no GPU needed.

`triton.compile` with a `GPUTarget` runs the whole pipeline down to a cubin with the ptxas shipped in the
triton wheel. That catches what the interpreter forgives (layouts, register pressure, shared memory) and
proves that the products run on tensor cores. Each configuration is compiled with the launch options the
dispatcher uses (`block_sparse.launch_config`, the helpers' constants), and cuobjdump from the same wheel
reports registers, stack (where spills go) and the SASS.

The compiles run in a subprocess with TRITON_INTERPRET removed from its environment: the interpreter test
sets it in this process, and a kernel module imported under it cannot be compiled.
"""

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("triton")

# Max shared memory per block (bytes) and the tensor-core instructions expected per target.
ARCHS = {80: 163 * 1024, 90: 227 * 1024}
FLOAT_MMA = {80: "HMMA", 90: "HGMMA"}
INT8_MMA = {80: "IMMA", 90: "IGMMA"}
# block_sparse.GPU_HEAD_DIMS and GPU_DTYPES, what the GPU path takes; the worker checks they agree.
HEAD_DIMS = (64, 128)
DTYPES = ("fp16", "bf16")
ATTENTION_KINDS = ("fixed-64", "fixed-128", "variable")


def configs() -> list[tuple]:
    """(kernel, variant, head dim, dtype, quant) for every configuration a GPU run can launch."""
    attention = [("attention", kind, d, dt, quant)
                 for kind, d, dt, quant in itertools.product(ATTENTION_KINDS, HEAD_DIMS, DTYPES, ("none", "int8"))]
    mass = [("mass", f"block-{bs}", d, dt, "none") for bs, d, dt in itertools.product((64, 128), HEAD_DIMS, DTYPES)]
    small = [(name, "", d, dt, "none") for name, d, dt in itertools.product(("pool", "kmeans"), HEAD_DIMS, DTYPES)]
    return attention + mass + small


def config_id(config: tuple) -> str:
    kernel, variant, d, dt, quant = config
    return "-".join(part for part in (kernel, variant, f"d{d}", dt, quant) if part and part != "none")


CONFIGS = configs()


@pytest.fixture(scope="module")
def compiled() -> dict:
    """{(config id, arch): result} from one worker subprocess that compiles everything."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], input=json.dumps(CONFIGS), capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    return {(r["id"], r["arch"]): r for r in results}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_compiles_without_spills_on_tensor_cores(compiled, config, arch):
    r = compiled[(config_id(config), arch)]
    assert r["error"] is None, r["error"]
    assert r["stack"] == 0 and r["local"] == 0, f"{r['stack']} bytes of stack: registers spill"
    assert r["shared"] <= ARCHS[arch], f"{r['shared']} bytes of shared memory > {ARCHS[arch]} on sm_{arch}"
    kernel, _, _, _, quant = config
    if kernel != "pool":  # the only kernel without a matrix product
        assert FLOAT_MMA[arch] in r["mma"], f"no {FLOAT_MMA[arch]} in the SASS: {r['mma']}"
    if quant == "int8":
        assert INT8_MMA[arch] in r["mma"], f"no {INT8_MMA[arch]} in the SASS: {r['mma']}"


def test_print_resource_table(compiled, capsys):
    rows = [f"{'config':<40} {'arch':>5} {'regs':>5} {'stack':>6} {'shared':>7}  mma"]
    for (cid, arch), r in sorted(compiled.items()):
        mma = " ".join(r["mma"])
        rows.append(f"{cid:<40} {'sm_' + str(arch):>5} {r['regs']:>5} {r['stack']:>6} {r['shared']:>7}  {mma}")
    with capsys.disabled():
        print("\n" + "\n".join(rows))


# ---------------------------------------------------------------------------------------------------------
# The worker: run as a script with the configurations as JSON on stdin; prints the results as one JSON line.


def _signature(fn, pointers: dict, floats: tuple, constexprs: dict) -> tuple[dict, dict]:
    """Triton signature of `fn` (pointers as given, floats fp32, other arguments i32) and the divisibility
    hints the JIT would find at run time: 16-byte aligned pointers and strides that are multiples of 16."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = pointers.get(name, "fp32" if name in floats else "i32")
    aligned = [i for i, n in enumerate(fn.arg_names) if signature[n].startswith("*") or n.startswith("stride")]
    return signature, {(i,): [["tt.divisibility", 16]] for i in aligned}


def _kernel_spec(config: tuple):
    """(jit function, pointer types, float args, constexprs, launch options) as the launchers use them."""
    import torch

    from sparse_dit.kernels.triton import block_sparse, helpers
    from sparse_dit.plan import AttentionPlan

    kernel, variant, d, dt, quant = config
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dt]
    if kernel == "attention":
        if variant == "variable":
            bounds = torch.tensor([0, 100, 1024]).view(1, 1, 3)
            layout = torch.ones(1, 1, 2, 2, dtype=torch.bool)
            plan = AttentionPlan(1024, layout, q_bounds=bounds, k_bounds=bounds, quant=quant)
        else:
            block = int(variant.split("-")[1])
            layout = torch.ones(1, 1, 1024 // block, 1024 // block, dtype=torch.bool)
            plan = AttentionPlan(1024, layout, block_size=block, quant=quant)
        cfg = block_sparse.launch_config(plan, d, torch_dtype)
        qk = "*i8" if quant == "int8" else f"*{dt}"
        pointers = dict(Q=qk, K=qk, V=f"*{dt}", Out=f"*{dt}", Lse="*fp32", QScale="*fp32", KScale="*fp32",
                        RowPtr="*i32", Cols="*i32", Tiles="*i32", KBounds="*i32")
        options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return block_sparse._block_sparse_fwd, pointers, ("scale_log2",), cfg.constexprs(), options
    if kernel == "mass":
        block = int(variant.split("-")[1])
        pointers = dict(Q=f"*{dt}", K=f"*{dt}", Lse="*fp32", Out="*fp32")
        constexprs = dict(BLOCK_SIZE=block, HEAD_DIM=d, UPCAST=False)
        options = dict(num_warps=helpers.mass_num_warps(block))
        return helpers._block_attention_mass, pointers, ("scale_log2",), constexprs, options
    if kernel == "pool":
        constexprs = dict(CHUNK=helpers.POOL_CHUNK, HEAD_DIM=d)
        return helpers._block_mean_pool, dict(X=f"*{dt}", Out="*fp32"), (), constexprs, {}
    constexprs = dict(BLOCK=helpers.KMEANS_BLOCK, HEAD_DIM=d, UPCAST=False)
    return helpers._kmeans_assign, dict(X=f"*{dt}", C=f"*{dt}", Out="*i32"), (), constexprs, {}


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _compile(job: tuple) -> dict:
    """Compile one configuration for one architecture and read its resources from the cubin."""
    config, arch = job
    import triton
    from triton.backends.compiler import GPUTarget

    result = dict(id=config_id(config), arch=arch, error=None, regs=-1, stack=-1, local=-1, shared=-1, mma=[])
    try:
        fn, pointers, floats, constexprs, options = _kernel_spec(config)
        signature, attrs = _signature(fn, pointers, floats, constexprs)
        target = GPUTarget("cuda", arch, 32)
        opts = triton.compiler.make_backend(target).parse_options(options)
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(src, target=target, options=opts.__dict__)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            dump = subprocess.run([_tool("cuobjdump"), "-res-usage", "-sass", f.name], capture_output=True, text=True,
                                  check=True).stdout
        found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", dump)
        result.update(regs=int(found[1]), stack=int(found[2]), local=int(found[3]), shared=kernel.metadata.shared,
                      mma=sorted(set(re.findall(r"\b([HI]G?MMA)\.", dump))))
    except Exception as e:  # reported per configuration by the test
        result["error"] = f"{type(e).__name__}: {e}"[-2000:]
    return result


def _worker() -> None:
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from sparse_dit.kernels.triton import block_sparse

    names = {torch.float16: "fp16", torch.bfloat16: "bf16"}
    gpu_dtypes = tuple(names.get(t, str(t)) for t in block_sparse.GPU_DTYPES)
    assert gpu_dtypes == DTYPES and block_sparse.GPU_HEAD_DIMS == HEAD_DIMS, "cover every GPU head dim and dtype"
    assert not block_sparse.is_interpreted()
    jobs = [(tuple(c), arch) for c in json.load(sys.stdin) for arch in ARCHS]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        results = list(pool.map(_compile, jobs))
    print(json.dumps(results))


if __name__ == "__main__":
    _worker()
