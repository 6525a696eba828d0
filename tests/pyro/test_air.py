"""
A short run of the small AIR of ``examples/air.py`` (Pyro's AIR: Bernoulli
``z_pres`` in a sequential LSTM guide, ``.view(n, -1)``) with the default
constructors of DisARM_ELBO, RLOO_ELBO(num_samples=2) and VIMCO(num_samples=2).
"""

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

import pyro
from pyro.infer import SVI
from pyro.optim import Adam

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import air  # noqa: E402  (examples/air.py)


@pytest.fixture(scope="module")
def data():
    x, _ = air.multi_digit_data(16, seed=1)
    return x.to(torch.get_default_dtype())


@pytest.mark.parametrize("name", ["disarm", "rloo", "vimco"])
def test_air_trains_unchanged(name, data):
    torch.set_default_dtype(torch.float32)
    pyro.clear_param_store()
    net = air.AIR()
    elbo = air.ESTIMATORS[name]()
    svi = SVI(net.model, net.guide, Adam({"lr": 1e-3}), elbo)
    z_pres_head = net.predict.weight[0].detach().clone()  # feeds only z_pres's logits
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        losses = [svi.step(data[:8].float()) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    msgs = [str(w.message) for w in record if "does not broadcast" in str(w.message)]
    assert len(msgs) == 1, msgs
    # the discrete sites got a learning signal: the z_pres head moved
    assert (net.predict.weight[0].detach() - z_pres_head).abs().max() > 1e-5
    assert list(elbo._structure.discrete) == ["z_pres_0", "z_pres_1"]
