import pytest
import torch

import pyro


@pytest.fixture(autouse=True)
def _fresh_pyro():
    """Every test starts with an empty param store, a fixed seed, float64."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)
    pyro.clear_param_store()


def pytest_configure(config):
    # The test models are tiny: intra-op threads only add overhead (8x slower
    # on a loaded 2-core machine).
    torch.set_num_threads(1)
