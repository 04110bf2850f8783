"""The Triton kernels built for the CPU interpreter in this pytest process. Import this module before anything
imports triton: @triton.jit reads TRITON_INTERPRET when a function is decorated.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib
import importlib.util
import sys

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreted_kernels():
    """sparse_dit.kernels.triton with every jit function, triton's own included, built for the interpreter.

    @triton.jit decides at decoration time, and anything importing torch._dynamo imports triton: in a shared
    pytest process triton's @jit library functions (tl.max, tl.argmin, ...) and even the kernel package may
    already exist in compiled mode. Rebuild them now that TRITON_INTERPRET is set.
    """
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(sys.modules["triton.language.standard"].max, InterpretedFunction):
        for name in ("triton.language.math", "triton.language.standard", "triton.language.random", "triton.language"):
            importlib.reload(sys.modules[name])
    module = importlib.import_module("sparse_dit.kernels.triton")
    if not module.is_interpreted():
        for name in [n for n in sys.modules if n.startswith("sparse_dit.kernels.triton")]:
            del sys.modules[name]
        module = importlib.import_module("sparse_dit.kernels.triton")
    assert module.is_interpreted()
    return module
