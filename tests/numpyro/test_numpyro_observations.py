"""
Observed discrete sites the way NumPyro scores them (``fn.log_prob``, which
``Trace_ELBO`` sums):

1. An observation smaller than the site's batch shape (a plate-expanded site,
   a scalar ``obs`` inside plates, ``.expand(...).to_event(1)`` with a scalar
   ``obs``) counts once per element of the batch. The site mechanism once
   scored it once (DisARM's gradient 0.189 against the exact 0.378) or
   crashed (``to_event``).
2. Infinite logits where the observation is certain (a unit forced off by
   ``-inf`` and observed 0, ``+inf`` observed 1, a masked one-hot class) give
   NumPyro's finite log-prob, not NaN (with validation off: NumPyro's
   validation refuses infinite logits).
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.handlers import mask, seed, substitute, trace  # noqa: E402

import stats  # noqa: E402
import numpyro_binary_grads as nbg  # noqa: E402
from numpyro_binary_grads.distributions import OneHotCategorical  # noqa: E402
from numpyro_binary_grads.structure import site_log_prob  # noqa: E402
from numpyro_oracle import exact_elbo  # noqa: E402

X3 = jnp.array([1.0, 0.0, 1.0])
INF = jnp.inf


def _broadcast_model(x, w=None):
    w = numpyro.param("w", 0.5)
    b = numpyro.sample("b", dist.Bernoulli(logits=0.3))
    with numpyro.plate("M", 2, dim=-2), numpyro.plate("N", 3, dim=-1):
        numpyro.sample("x", dist.Bernoulli(logits=w + b), obs=x)  # obs (3,), batch (2, 3)
        numpyro.sample("o", OneHotCategorical(logits=jnp.array([w, b, 0.0])),
                       obs=jnp.array([0.0, 1.0, 0.0]))
        numpyro.sample("y", dist.Categorical(logits=jnp.array([0.0, w, b])),
                       obs=jnp.array([0, 1, 2]))
        numpyro.sample("z", dist.Bernoulli(logits=w - b), obs=1.0)  # scalar obs
    numpyro.sample("e", dist.Bernoulli(logits=w * b).expand([3]).to_event(1), obs=1.0)


def _guide(x, w=None):
    a = numpyro.param("a", 0.2)
    numpyro.sample("b", dist.Bernoulli(logits=a))


def _forced_model(x, w=None):
    """Unit 1 is forced off (logit -inf, observed 0), unit 2 forced on (+inf,
    observed 1); the one-hot site's class 2 is masked out (-inf)."""
    w = numpyro.param("w", 0.5)
    b = numpyro.sample("b", dist.Bernoulli(logits=0.3))
    logits = jnp.stack([w + 2.0 * b - 1.0, -INF, INF])
    numpyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)
    numpyro.sample("c", OneHotCategorical(logits=jnp.array([w * b, 0.0, -INF])),
                   obs=jnp.array([1.0, 0.0, 0.0]))


def _unforced_model(x, w=None):
    """The same ELBO without the certain terms (their log-prob is 0)."""
    w = numpyro.param("w", 0.5)
    b = numpyro.sample("b", dist.Bernoulli(logits=0.3))
    numpyro.sample("x", dist.Bernoulli(logits=w + 2.0 * b - 1.0), obs=x[0])
    numpyro.sample("c", dist.Categorical(logits=jnp.array([w * b, 0.0])), obs=0)


X_FORCED = jnp.array([1.0, 0.0, 1.0])
PARAMS = {"w": jnp.array(0.5), "a": jnp.array(0.2)}


@pytest.mark.parametrize("model", [_broadcast_model, _forced_model])
def test_site_log_prob_is_numpyros(model):
    """Every observed site's log-prob array equals ``fn.log_prob`` (shape and
    values), so the sum is ``Trace_ELBO``'s."""
    x = X3 if model is _broadcast_model else X_FORCED
    with numpyro.validation_enabled(model is _broadcast_model):
        _compare_site_log_probs(model, x)


def _compare_site_log_probs(model, x):
    for b in (0.0, 1.0):
        tr = trace(substitute(seed(model, 0), data={"b": b})).get_trace(x)
        for name, site in tr.items():
            if site["type"] == "sample" and site["is_observed"]:
                ours = site_log_prob(site)
                theirs = site["fn"].log_prob(site["value"])
                assert jnp.shape(ours) == jnp.shape(theirs), name
                assert np.all(np.isfinite(np.asarray(ours))), name
                np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12, err_msg=name)


CLASSES = [nbg.DisARM_ELBO(), nbg.RLOO_ELBO(), nbg.VIMCO(num_samples=2)]


@pytest.mark.parametrize("elbo", CLASSES, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("case", ["broadcast", "forced"])
def test_unbiased_with_such_observations(elbo, case):
    """The mean of 60,000 single-step gradients is within 5 SE of the exact one
    (VIMCO: its 2-sample bound's); the loss is finite at every step."""
    if case == "broadcast":
        model, x = _broadcast_model, X3
        exact_model = model
    else:
        model, x = _forced_model, X_FORCED
        exact_model = _unforced_model
    if isinstance(elbo, nbg.VIMCO):
        from numpyro_oracle import exact_iwae_bound
        exact = jax.jit(jax.grad(lambda p: -exact_iwae_bound(p, exact_model, _guide, x,
                                                             num_samples=2)))(PARAMS)
    else:
        exact = jax.grad(lambda p: -exact_elbo(p, exact_model, _guide, x))(PARAMS)
    names = sorted(PARAMS)

    @jax.jit
    def draws(keys):
        def one(k):
            loss, g = jax.value_and_grad(lambda p: elbo.loss(k, p, model, _guide, x))(PARAMS)
            return loss, jnp.stack([g[n] for n in names])
        return jax.vmap(one)(keys)

    with numpyro.validation_enabled(case == "broadcast"):
        losses, grads = draws(jax.random.split(jax.random.PRNGKey(1), 60000))
    assert np.all(np.isfinite(np.asarray(losses)))
    result = stats.check_unbiased(stats.batch_means(np.asarray(grads), 30),
                                  np.array([exact[n] for n in names]), names=names)
    stats.assert_powerful(result)


def test_bernoulli_log_prob_limits_at_infinite_logits():
    """0 where the value is certain, -inf at any other value (relaxed values
    too, as REBAR's model evaluations use), NaN kept for NaN logits; gradient 0
    at the infinite logits and ``v - sigmoid(a)`` elsewhere (``-1/2`` at ``a = 0``)."""
    from numpyro_binary_grads.structure import _bernoulli_log_prob
    a = jnp.array([-INF, -INF, INF, INF, INF, jnp.nan, 0.0, 0.0])
    v = jnp.array([0.0, 0.3, 1.0, 0.7, 0.0, 1.0, 1.0, 0.0])
    lp = np.asarray(_bernoulli_log_prob(a, v))
    np.testing.assert_array_equal(lp[:5], [0.0, -np.inf, 0.0, -np.inf, -np.inf])
    assert np.isnan(lp[5])
    np.testing.assert_allclose(lp[6:], [-np.log(2.0)] * 2)
    g = np.asarray(jax.grad(lambda a: jnp.sum(_bernoulli_log_prob(a, v)[jnp.array([0, 2, 6, 7])]))(a))
    np.testing.assert_array_equal(g[[0, 2]], [0.0, 0.0])
    np.testing.assert_allclose(g[[6, 7]], [0.5, -0.5])
