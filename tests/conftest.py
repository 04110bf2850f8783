import pytest
import torch

# pytest-xdist runs two workers on two cores: one thread each, or they oversubscribe the machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Tolerances per dtype against an fp32 computation of the same masked attention.
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
