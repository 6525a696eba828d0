"""
Observed discrete sites the way Pyro scores them (``fn.log_prob``, which
``Trace_ELBO`` sums), the mirror of ``tests/numpyro/test_numpyro_observations.py``:

1. An observation smaller than the site's batch shape (a plate-expanded site,
   a scalar ``obs`` inside plates, ``.expand(...).to_event(1)`` with a scalar
   ``obs``) is scored as Pyro scores it.
2. A masked one-hot class (logit ``-inf``, observed 0) gives Pyro's finite
   log-prob, not NaN. A Bernoulli unit forced off by a ``-inf`` logit gives
   Pyro's own NaN (torch's ``Bernoulli.log_prob`` is NaN there, and so is
   ``Trace_ELBO``'s loss): the same NaN here, not an internal error (the
   broadcasting check once crashed computing a NaN tolerance).
"""

import numpy as np
import pytest
import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer import Trace_ELBO

import stats
from pyro_oracle import exact_elbo
from pyro_binary_grads import DisARM_ELBO, JitDisARM_ELBO, RLOO_ELBO
from pyro_binary_grads.structure import site_log_prob

X3 = torch.tensor([1.0, 0.0, 1.0])
INF = float("inf")


def _stack(*logits):
    """Class logits, broadcast (over the estimators' evaluation dims too)."""
    return torch.stack(torch.broadcast_tensors(*map(torch.as_tensor, logits)), -1)


def broadcast_model(x):
    w = pyro.param("w", torch.tensor(0.5))
    b = pyro.sample("b", dist.Bernoulli(logits=torch.tensor(0.3)))
    with pyro.plate("M", 2, dim=-2), pyro.plate("N", 3, dim=-1):
        pyro.sample("x", dist.Bernoulli(logits=w + b), obs=x)  # obs (3,), batch (2, 3)
        pyro.sample("o", dist.OneHotCategorical(logits=_stack(w, b, 0.0)),
                    obs=torch.tensor([0.0, 1.0, 0.0]))
        pyro.sample("z", dist.Bernoulli(logits=w - b), obs=torch.tensor(1.0))  # scalar obs
    logit = (w * b).unsqueeze(-1)
    pyro.sample("e", dist.Bernoulli(logits=logit).expand(logit.shape[:-1] + (3,)).to_event(1),
                obs=torch.tensor(1.0))


def masked_model(x):
    """Class 2 of the one-hot site is masked out (logit -inf)."""
    w = pyro.param("w", torch.tensor(0.5))
    b = pyro.sample("b", dist.Bernoulli(logits=torch.tensor(0.3)))
    pyro.sample("x", dist.Bernoulli(logits=w + 2.0 * b - 1.0), obs=x[0])
    pyro.sample("c", dist.OneHotCategorical(logits=_stack(w * b, 0.0, -INF)),
                obs=torch.tensor([1.0, 0.0, 0.0]))


def unmasked_model(x):
    """The same ELBO without the masked class (its probability is 0)."""
    w = pyro.param("w", torch.tensor(0.5))
    b = pyro.sample("b", dist.Bernoulli(logits=torch.tensor(0.3)))
    pyro.sample("x", dist.Bernoulli(logits=w + 2.0 * b - 1.0), obs=x[0])
    pyro.sample("c", dist.OneHotCategorical(logits=_stack(w * b, 0.0)),
                obs=torch.tensor([1.0, 0.0]))


def guide(x):
    a = pyro.param("a", torch.tensor(0.2))
    pyro.sample("b", dist.Bernoulli(logits=a))


@pytest.mark.parametrize("validate", [True, False], ids=["validation on", "validation off"])
@pytest.mark.parametrize("model", [broadcast_model, masked_model])
def test_site_log_prob_is_pyros(model, validate):
    pyro.clear_param_store()
    with pyro.validation_enabled(validate):
        for b in (0.0, 1.0):
            tr = poutine.trace(poutine.condition(model, data={"b": torch.tensor(b)})).get_trace(X3)
            for name, site in tr.nodes.items():
                if site["type"] == "sample" and site["is_observed"]:
                    ours = site_log_prob(site)
                    theirs = site["fn"].log_prob(site["value"])
                    assert ours.shape == theirs.shape, name
                    assert torch.isfinite(ours).all(), name
                    torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-6, atol=1e-6,
                                               msg=name)


@pytest.mark.parametrize("cls", [DisARM_ELBO, RLOO_ELBO])
@pytest.mark.parametrize("case", ["broadcast", "masked"])
def test_unbiased_with_such_observations(cls, case):
    """The mean of 30 x 40,000 single-step gradients is within 5 SE of the exact
    one; every loss is finite."""
    model = broadcast_model if case == "broadcast" else masked_model
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    exact_model = model if case == "broadcast" else unmasked_model
    value = exact_elbo(exact_model, guide, X3)
    store = pyro.get_param_store()
    names = sorted(store.keys())
    params = [store[n].unconstrained() for n in names]
    exact = np.array([float(g) for g in torch.autograd.grad(-value, params)])
    elbo = cls(num_particles=40000, vectorize_particles=True)
    rows = []
    for _ in range(30):  # 30 means of 40,000 draws each
        loss = elbo.differentiable_loss(model, guide, X3)
        assert torch.isfinite(loss)
        rows.append([float(g) for g in torch.autograd.grad(loss, params)])
    result = stats.check_unbiased(np.array(rows), exact, names=names)
    stats.assert_powerful(result)


@pytest.mark.parametrize("validate", [True, False], ids=["validation on", "validation off"])
@pytest.mark.parametrize("cls", [DisARM_ELBO, RLOO_ELBO, JitDisARM_ELBO])
def test_a_unit_forced_off_gives_pyros_nan_not_an_error(cls, validate):
    def model(x):
        with pyro.plate("N", 2):
            b = pyro.sample("b", dist.Bernoulli(0.4))
            logits = torch.where(torch.tensor([True, False]), 2.0 * b - 1.0, -INF)
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=x)

    def guide(x):
        a = pyro.param("a", torch.zeros(2))
        with pyro.plate("N", 2):
            pyro.sample("b", dist.Bernoulli(logits=a))

    x = torch.tensor([1.0, 0.0])
    with pyro.validation_enabled(validate):
        pyro.clear_param_store()
        with pytest.warns(UserWarning, match="Encountered NaN"):
            theirs = Trace_ELBO().loss(model, guide, x)
        pyro.clear_param_store()
        elbo = cls()
        with pytest.warns(UserWarning, match="Encountered NaN"):
            for _ in range(3):  # eager, tracing, replay for the compiled class
                ours = elbo.loss_and_grads(model, guide, x)
    assert np.isnan(theirs) and np.isnan(ours)
