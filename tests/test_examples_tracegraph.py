"""
The examples' NumPyro ``--estimator tracegraph`` baseline
(``examples/common.py``, ``ScaleOnceTraceGraph_ELBO``): NumPyro's own
``TraceGraph_ELBO`` is N/B times too large on a subsampled program's discrete
gradient; the examples' wrapper is unbiased (5 SE against enumeration, with
power), and NumPyro's own fails the same check.
"""

import itertools
import math
import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro import handlers  # noqa: E402
from numpyro.infer import TraceGraph_ELBO  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import common  # noqa: E402

N, n = 12, 3
X = jnp.array([3.0, 3.0, 3.0])
Q = -1.0  # the guide logit: exact gradient -10.8, power 43 at 100,000 draws


def model(x, idx, num_data):  # the examples' signature; every site in the data plate
    with handlers.scale(scale=num_data / idx.shape[0]), numpyro.plate("data", idx.shape[0]):
        b = numpyro.sample("b", dist.Bernoulli(logits=0.2 * jnp.ones(idx.shape[0])))
        numpyro.sample("x", dist.Normal(1.5 * b, 1.0), obs=x)


def guide(x, idx, num_data):
    q = numpyro.param("q", jnp.array(Q))
    with handlers.scale(scale=num_data / idx.shape[0]), numpyro.plate("data", idx.shape[0]):
        numpyro.sample("b", dist.Bernoulli(logits=q * jnp.ones(idx.shape[0])))


def _exact(q):
    total = 0.0
    for bs in itertools.product([0.0, 1.0], repeat=n):
        b = jnp.array(bs)
        lq = b * q - jax.nn.softplus(q)
        lp = b * 0.2 - jax.nn.softplus(0.2) + dist.Normal(1.5 * b, 1.0).log_prob(X)
        total = total + jnp.exp(lq.sum()) * (N / n) * jnp.sum(lp - lq)
    return -total


def _z(elbo, draws=100_000):
    params = {"q": jnp.array(Q)}
    args = (X, jnp.arange(n), float(N))
    g = jax.jit(jax.vmap(lambda k: jax.grad(
        lambda P: elbo.loss(k, P, model, guide, *args))(params)["q"]))(
        jax.random.split(jax.random.PRNGKey(0), draws))
    exact = float(jax.grad(_exact)(Q))
    se = float(np.std(g)) / math.sqrt(draws)
    assert 0.1 * abs(exact) / se >= 8.1  # power against a 10% bias
    return (float(np.mean(g)) - exact) / se


def test_examples_tracegraph_baseline_is_unbiased_numpyros_is_not():
    ours = common.make_elbo("numpyro", "tracegraph")
    assert isinstance(ours, TraceGraph_ELBO)
    z = _z(ours)
    print("examples' TraceGraph z:", z, "NumPyro's:", _z(TraceGraph_ELBO()))
    assert abs(z) < 5
    assert abs(_z(TraceGraph_ELBO())) > 5  # N/B = 4 times too large
