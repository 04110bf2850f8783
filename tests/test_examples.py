"""Every example that needs no hub runs, at a small size; the hub one at least parses its arguments."""

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_dit.patterns import base

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name, kwargs, expected", [
    ("one_line", dict(num_frames=4, size=32, steps=3), "disable restores the dense model exactly: True"),
    ("functional_custom_model", {}, "1 plan made and reused"),
    ("custom_method", {}, "band: density"),
])
def test_example_runs(name, kwargs, expected, capsys):
    try:
        runpy.run_path(str(EXAMPLES / f"{name}.py"))["main"](**kwargs)
    finally:
        base._REGISTRY.pop("band", None)
    assert expected in capsys.readouterr().out


def test_hub_example_parses_its_arguments():
    result = subprocess.run([sys.executable, str(EXAMPLES / "wan_hub.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--method" in result.stdout
