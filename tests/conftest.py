import os

import pytest
import torch
from hypothesis import settings

# pytest-xdist runs two workers on two cores: one thread each, or they oversubscribe the machine.
torch.set_num_threads(1)

# The suite draws the same Hypothesis examples on every run, so a failure reproduces and cannot come and go
# between CI runs; HYPOTHESIS_PROFILE=explore draws new ones (run it when changing a method or a kernel).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Tolerances per dtype against an fp32 computation of the same masked attention.
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
