"""
More structures against the exact oracle: ``probs`` parameterization,
``subsample=idx``, a given (larger) ``max_plate_nesting``, and the
``elbo(model, guide)`` module.
"""

import numpy as np
import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.infer import SVI
from pyro.optim import Adam

from pyro_oracle import exact_elbo
from pyro_binary_grads import ARM_ELBO, DisARM_ELBO

X = torch.tensor([0.9, -0.4, 1.7, 0.2, -1.1])


def make(probs=False, subsample=None, extra_dim=False, select=None):
    """A data plate of 5 with per-element guide logits; optionally the guide
    uses ``probs``, the plate is subsampled with fixed indices, or an outer
    plate of size 1 adds a plate dim. ``select=idx`` gives the model of just
    those elements, not subsampled (no scale)."""

    def plate():
        if select is not None:
            return pyro.plate("data", len(select), dim=-1), select
        return pyro.plate("data", 5, subsample=subsample, dim=-1), None

    def guide():
        a = pyro.param("a", torch.tensor([0.5, -1.0, 0.3, 1.5, -0.2]))
        p, sel = plate()
        with p as idx:
            idx = idx if sel is None else sel
            fn = (
                dist.Bernoulli(probs=torch.sigmoid(a[idx]))
                if probs
                else dist.Bernoulli(logits=a[idx])
            )
            pyro.sample("b", fn)

    def model():
        p = pyro.param("p", torch.tensor(0.3))
        mu = pyro.param("mu", torch.tensor(0.8))
        p_, sel = plate()
        with p_ as idx:
            idx = idx if sel is None else sel
            b = pyro.sample("b", dist.Bernoulli(logits=p))
            pyro.sample("x", dist.Normal(mu * b - 0.2, 0.8), obs=X[idx])

    if extra_dim:
        outer = pyro.plate("outer", 1, dim=-2)
        return outer(model), outer(guide)
    return model, guide


def exact_grads(model, guide):
    pyro.clear_param_store()
    loss = -exact_elbo(model, guide)
    params = [pyro.param(k).unconstrained() for k in ("a", "p", "mu")]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).numpy()


def check(elbo, model, guide, calls=30):
    exact = exact_grads(model, guide)
    pyro.clear_param_store()
    rows = []
    for _ in range(calls):
        loss = elbo.differentiable_loss(model, guide)
        params = [pyro.param(k).unconstrained() for k in ("a", "p", "mu")]
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    draws = torch.stack(rows).numpy()
    mean, se = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(calls)
    safe = np.where(se > 0, se, np.inf)  # elements outside a subsample: exactly 0
    z = (mean - exact) / safe
    power = np.max(0.1 * np.abs(exact[:5]) / safe[:5])
    print(f"max|z| = {np.abs(z).max():.2f}, guide power = {power:.1f}")
    assert np.all(np.abs(mean - exact) <= 5 * se + 1e-9 * (1 + np.abs(exact))), z
    assert power >= 8.1


@pytest.mark.parametrize("Elbo", [ARM_ELBO, DisARM_ELBO])
def test_probs_parameterization(Elbo):
    model, guide = make(probs=True)
    check(Elbo(2000, vectorize_particles=True), model, guide)


@pytest.mark.parametrize("Elbo", [ARM_ELBO, DisARM_ELBO])
def test_subsample_indices(Elbo):
    """``plate(..., subsample=idx)``: the gradient of the scaled (5/2)
    objective on those elements, exactly as Trace_ELBO defines it."""
    model, guide = make(subsample=torch.tensor([3, 1]))
    check(Elbo(2000, vectorize_particles=True), model, guide)


@pytest.mark.parametrize("max_plate_nesting", [2, 3])
def test_given_max_plate_nesting(max_plate_nesting):
    model, guide = make(extra_dim=True)
    elbo = DisARM_ELBO(2000, max_plate_nesting, vectorize_particles=True)
    check(elbo, model, guide)


def test_guessed_max_plate_nesting_and_vectorized_particles():
    model, guide = make(extra_dim=True)
    elbo = DisARM_ELBO(2000, vectorize_particles=True)
    check(elbo, model, guide)
    assert elbo._user_plate_nesting == 2


def test_elbo_module_and_svi():
    model, guide = make()
    elbo = DisARM_ELBO()
    module = elbo(model, guide)
    assert isinstance(module, torch.nn.Module)
    loss = module()
    loss.backward()
    assert pyro.param("a").unconstrained().grad is not None
    svi = SVI(model, guide, Adam({"lr": 0.05}), DisARM_ELBO(10, vectorize_particles=True))
    losses = [svi.step() for _ in range(300)]
    # training improves the ELBO towards its optimum on this easy model
    assert np.mean(losses[-50:]) < np.mean(losses[:50])


def test_loss_is_the_elbo_estimate():
    """``loss`` averages f over the 1 + T evaluations (all marginally q):
    its mean is the exact negative ELBO."""
    model, guide = make()
    exact = -exact_elbo(model, guide).item()
    elbo = DisARM_ELBO(1000, vectorize_particles=True)
    values = np.array([elbo.loss(model, guide) for _ in range(30)])
    se = values.std(ddof=1) / np.sqrt(len(values))
    assert abs(values.mean() - exact) < 5 * se
