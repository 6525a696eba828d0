"""
Variance properties: plate-local learning signals, DisARM <= ARM (Rao-Blackwell),
and both far below TraceGraph_ELBO.
"""

import numpy as np
import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.infer import TraceGraph_ELBO

import specs
from pyro_oracle import init_params
from pyro_binary_grads import ARM_ELBO, DisARM_ELBO

D = 4


def local_sbn(N, global_latent=False):
    """
    An SBN-like model with per-element guide logits ``a[n]``, so the gradient
    of element n's logits is ``a.grad[n]``. Element 0 is the same for every N.
    With ``global_latent``, the guide draws a global Normal after the local
    Bernoullis (localisation is then invalid and the signal is summed).
    """
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(N, 2 * D, generator=g) < 0.5).double()
    x[0] = torch.tensor([1.0, 0.0] * D)
    a0 = torch.linspace(-1.5, 1.5, D).expand(N, D).clone()
    W0 = torch.rand(D, 2 * D, generator=torch.Generator().manual_seed(1)) - 0.5

    def model():
        W = pyro.param("W", W0)
        data = pyro.plate("data", N, dim=-1)
        with data:
            b = pyro.sample("b", dist.Bernoulli(logits=torch.zeros(D)).to_event(1))
        loc = b @ W
        if global_latent:  # outside the plate, as in the guide
            z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0))
            loc = loc + z[..., None]
        with data:
            pyro.sample("x", dist.Bernoulli(logits=loc).to_event(1), obs=x)

    def guide():
        a = pyro.param("a", a0)
        with pyro.plate("data", N, dim=-1):
            b = pyro.sample("b", dist.Bernoulli(logits=a).to_event(1))
        if global_latent:
            pyro.sample("z", dist.Normal(b.sum((-1, -2), keepdim=True)[..., 0] / N, 1.0))

    return model, guide


def logit_grad(elbo, model, guide):
    loss = elbo.differentiable_loss(model, guide)
    (grad,) = torch.autograd.grad(loss, [pyro.param("a").unconstrained()])
    return grad


@pytest.mark.parametrize("Elbo", [ARM_ELBO, DisARM_ELBO])
@pytest.mark.parametrize("global_latent", [False, True])
def test_element_gradient_depends_only_on_its_own_noise(Elbo, global_latent):
    """Fix element 0's noise, redraw the others': element 0's logit gradient is
    unchanged (plate-local signal) unless a global latent follows the locals."""
    N = 6
    model, guide = local_sbn(N, global_latent)
    elbo = Elbo()
    if global_latent:
        with pytest.warns(RuntimeWarning, match="summed"):
            elbo.differentiable_loss(model, guide)
    grads = []
    for seed in range(4):
        u = torch.rand(N, D, generator=torch.Generator().manual_seed(seed))
        u[0] = torch.tensor([0.1, 0.4, 0.6, 0.9])
        elbo._noise = {"b": u.reshape(1, N, D)}
        pyro.set_rng_seed(seed)  # the continuous site's noise also changes
        grads.append(logit_grad(elbo, model, guide)[0])
    first = grads[0]
    assert first.abs().max() > 0
    changed = max((g - first).abs().max().item() for g in grads[1:])
    if global_latent:
        assert changed > 1e-6
    else:
        assert changed < 1e-12


def _element0_variance(N, num_calls=400, num_particles=50):
    """Variance of element 0's logit gradient (of means over vectorized
    particles: the ratio between two batch sizes is that of single draws)."""
    model, guide = local_sbn(N)
    pyro.clear_param_store()
    elbo = DisARM_ELBO(num_particles, vectorize_particles=True)
    draws = torch.stack([logit_grad(elbo, model, guide)[0] for _ in range(num_calls)])
    return num_particles * draws.var(0).sum().item()


def test_element_variance_does_not_grow_with_batch_size():
    v5, v50 = _element0_variance(5), _element0_variance(50)
    ratio = v50 / v5
    print(f"DisARM var of element 0's logit gradient: batch 5 {v5:.4g}, batch 50 "
          f"{v50:.4g}, ratio {ratio:.3f}")
    assert ratio < 1.5


def _guide_grad_variance(elbo, spec, num_calls, seed=0):
    """Total variance of the guide-parameter gradient over calls, each a mean
    of ``elbo``'s vectorized particles (same ratio as per-draw variances)."""
    model, guide, args = spec.bind(specs.pyro_backend())
    pyro.set_rng_seed(seed)
    store = pyro.get_param_store()
    names = sorted(k for k in store.keys() if k.startswith("q_"))
    params = [store[k].unconstrained() for k in names]
    rows = []
    for _ in range(num_calls):
        for p in params:
            p.grad = None
        elbo.loss_and_grads(model, guide, *args)  # TraceGraph_ELBO has no differentiable_loss
        rows.append(torch.cat([p.grad.flatten() for p in params]))
    return torch.stack(rows).var(0).sum().item()


@pytest.mark.parametrize("spec_name", ["sbn", "two_layer", "nested"])
def test_variance_ordering(spec_name):
    spec = specs.SPECS[spec_name]()
    init_params(spec)
    P, calls = 100, 200
    var = {
        # the same seed gives DisARM and ARM the same noise
        "DisARM": _guide_grad_variance(DisARM_ELBO(P, vectorize_particles=True), spec, calls),
        "ARM": _guide_grad_variance(ARM_ELBO(P, vectorize_particles=True), spec, calls),
        "TraceGraph": _guide_grad_variance(
            TraceGraph_ELBO(P, vectorize_particles=True, max_plate_nesting=2), spec, calls
        ),
    }
    print(
        f"{spec_name}: guide-gradient variance DisARM {var['DisARM']:.4g}, ARM "
        f"{var['ARM']:.4g}, TraceGraph_ELBO {var['TraceGraph']:.4g}; ARM/DisARM "
        f"{var['ARM'] / var['DisARM']:.2f}, TraceGraph/DisARM "
        f"{var['TraceGraph'] / var['DisARM']:.1f}"
    )
    assert var["DisARM"] <= var["ARM"] < var["TraceGraph"]
