"""
numpyro_binary_grads with NumPyro's SVI: update under jit, run (progress
bar), optax and numpyro.optim optimizers, num_particles, jax.vmap over keys,
mutable state; the value of the loss; the OneHotCategorical distribution.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.infer import SVI  # noqa: E402
from numpyro.primitives import mutable  # noqa: E402

import numpyro_binary_grads  # noqa: E402
import specs  # noqa: E402
import stats  # noqa: E402
from numpyro_oracle import exact_value_and_grads, init_params  # noqa: E402
from numpyro_binary_grads import ARM_ELBO, DisARM_ELBO, OneHotCategorical  # noqa: E402

B = specs.numpyro_backend()


def test_public_names():
    assert set(numpyro_binary_grads.__all__) == {
        "ARM_ELBO", "DisARM_ELBO", "LocalDisARM_IWAE", "OneHotCategorical", "RLOO_ELBO",
        "VIMCO", "iwae_bound", "compare_estimators",
        # categorical (straight-through family)
        "GumbelRao_ELBO", "GumbelSoftmaxST_ELBO", "ReinMaxCV_ELBO", "ReinMaxRao_ELBO",
        "ReinMax_ELBO", "ST_ELBO",
        # relaxation control variates
        "REBAR_ELBO", "RELAX_ELBO",
    }
    for cls in (ARM_ELBO, DisARM_ELBO):
        assert cls.can_infer_discrete
        assert issubclass(cls, numpyro.infer.elbo.ELBO)
        elbo = cls(2, False, vectorize=False)
        assert (elbo.num_particles, elbo.vectorize_particles, elbo.vectorize) == (2, False, False)
        with pytest.raises(TypeError):
            cls(1, True, False)  # vectorize is keyword-only


@pytest.mark.parametrize("optim", ["optax", "numpyro"])
def test_svi_update_under_jit_learns(optim):
    spec = specs.SPECS["two_layer"]()
    model, guide, args = spec.bind(B)
    opt = optax.adam(0.05) if optim == "optax" else numpyro.optim.Adam(0.05)
    svi = SVI(model, guide, opt, DisARM_ELBO())
    state = svi.init(jax.random.PRNGKey(0), *args)
    start = exact_value_and_grads(spec, loss=True)[0]

    @jax.jit
    def steps(state):
        return jax.lax.scan(lambda s, _: svi.update(s, *args), state, None, length=300)

    state, losses = steps(state)
    assert np.all(np.isfinite(np.asarray(losses)))
    params = svi.get_params(state)
    end = exact_value_and_grads(spec, params, loss=True)[0]
    assert end < start - 0.3, (start, end)


@pytest.mark.parametrize("vectorize_particles", [True, False])
def test_svi_run_with_progress_bar_and_particles(vectorize_particles):
    spec = specs.SPECS["mixed"]()
    model, guide, args = spec.bind(B)
    elbo = ARM_ELBO(num_particles=4, vectorize_particles=vectorize_particles)
    svi = SVI(model, guide, optax.adam(0.02), elbo)
    result = svi.run(jax.random.PRNGKey(1), 50, *args, progress_bar=True)
    assert result.losses.shape == (50,)
    assert np.all(np.isfinite(np.asarray(result.losses)))


def test_vmap_over_keys_of_svi_update():
    spec = specs.SPECS["sbn"]()
    model, guide, args = spec.bind(B)
    svi = SVI(model, guide, optax.adam(0.01), DisARM_ELBO())
    keys = jax.random.split(jax.random.PRNGKey(3), 8)
    states = jax.vmap(lambda k: svi.init(k, *args))(keys)
    states, losses = jax.jit(jax.vmap(lambda s: svi.update(s, *args)))(states)
    assert losses.shape == (8,)
    assert len(np.unique(np.asarray(losses))) > 1  # different keys, different draws


def test_loss_value_is_the_elbo_estimate():
    """The mean of the returned loss over keys is the exact -ELBO (within 5 SE)."""
    spec = specs.SPECS["two_layer"]()
    model, guide, args = spec.bind(B)
    params = init_params(spec)
    exact = exact_value_and_grads(spec, loss=True)[0]
    elbo = DisARM_ELBO()
    losses = jax.jit(jax.vmap(lambda k: elbo.loss(k, params, model, guide, *args)))(
        jax.random.split(jax.random.PRNGKey(4), 30 * 2000))
    draws = np.asarray(losses).reshape(30, -1).mean(1)[:, None]
    stats.check_unbiased(draws, np.array([exact]))


@pytest.mark.parametrize("make", [
    DisARM_ELBO,
    lambda: numpyro_binary_grads.REBAR_ELBO(adapt=False),
    # adapted: the state comes back from inside the variance gradient's pullback
    numpyro_binary_grads.REBAR_ELBO,
    lambda: numpyro_binary_grads.RELAX_ELBO(hidden_size=4),
], ids=["disarm", "rebar_fixed", "rebar_adapted", "relax_adapted"])
def test_mutable_state_is_returned(make):
    def model(x):
        state = mutable("count", {"n": jnp.zeros(())})
        state["n"] = state["n"] + 1.0
        with numpyro.plate("data", 3, dim=-1):
            b = numpyro.sample("b", dist.Bernoulli(logits=jnp.zeros(3)))
            numpyro.sample("x", dist.Normal(b, 1.0), obs=x)

    def guide(x):
        q = numpyro.param("q", jnp.zeros(3))
        with numpyro.plate("data", 3, dim=-1):
            numpyro.sample("b", dist.Bernoulli(logits=q))

    x = jnp.array([0.5, -0.2, 1.0])
    elbo = make()
    wrap = getattr(elbo, "wrap_guide", None)
    guide = guide if wrap is None else wrap(guide)
    svi = SVI(model, guide, optax.adam(0.01), elbo)
    state = svi.init(jax.random.PRNGKey(0), x)
    params = svi.get_params(state)
    assert any(k.startswith("_bg_") for k in params) == getattr(elbo, "adapts", False)
    out = elbo.loss_with_mutable_state(jax.random.PRNGKey(0), params, model, guide, x)
    assert set(out["mutable_state"]) == {"count"}
    assert float(out["mutable_state"]["count"]["n"]) == 1.0
    update = jax.jit(svi.update)
    before = float(state.mutable_state["count"]["n"])
    for _ in range(3):
        state, loss = update(state, x)
    assert np.isfinite(float(loss))
    assert float(state.mutable_state["count"]["n"]) == before + 3.0
    # the adapted params moved (their gradient reached the optimizer)
    for k, v in svi.get_params(state).items():
        if k.startswith("_bg_"):
            moved = [not np.allclose(np.asarray(a), np.asarray(b))
                     for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(params[k]))]
            assert any(moved), k


def test_probs_parameterization_matches_logits():
    """Bernoulli(probs=sigmoid(a)) and Bernoulli(logits=a) give the same draws."""
    def model(x):
        with numpyro.plate("data", 3, dim=-1):
            b = numpyro.sample("b", dist.Bernoulli(logits=jnp.zeros(3)))
            numpyro.sample("x", dist.Normal(b, 1.0), obs=x)

    def guide(x, probs):
        q = numpyro.param("q", jnp.zeros(3))
        fn = dist.Bernoulli(probs=jax.nn.sigmoid(q)) if probs else dist.Bernoulli(logits=q)
        with numpyro.plate("data", 3, dim=-1):
            numpyro.sample("b", fn)

    x = jnp.array([0.5, -0.2, 1.0])
    params = {"q": jnp.array([0.3, -1.2, 0.8])}
    out = [jax.value_and_grad(lambda p: DisARM_ELBO().loss(
        jax.random.PRNGKey(2), p, lambda x, _: model(x), guide, x, probs))(params)
        for probs in (False, True)]
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-12)
    np.testing.assert_allclose(out[0][1]["q"], out[1][1]["q"], rtol=1e-9, atol=1e-12)


def test_one_hot_categorical():
    logits = jnp.array([[0.0, 1.0, -1.0], [0.5, 0.5, 2.0]])
    d = OneHotCategorical(logits=logits)
    assert d.batch_shape == (2,) and d.event_shape == (3,)
    v = d.sample(jax.random.PRNGKey(0), (20000,))
    assert v.shape == (20000, 2, 3)
    assert bool(jnp.all(d.support(v)))
    np.testing.assert_allclose(v.mean(0), jax.nn.softmax(logits, -1), atol=0.015)
    np.testing.assert_allclose(d.log_prob(v[:5]),
                               jnp.sum(v[:5] * jax.nn.log_softmax(logits, -1), -1))
    # smooth in the value (valid at relaxed values)
    relaxed = jnp.array([0.2, 0.5, 0.3])
    np.testing.assert_allclose(jax.grad(lambda v: d.log_prob(v)[0])(relaxed),
                               jax.nn.log_softmax(logits[0]))
    p = OneHotCategorical(probs=jax.nn.softmax(logits, -1))
    np.testing.assert_allclose(p.logits, d.logits, atol=1e-12)
    assert d.enumerate_support().shape == (3, 2, 3)
    with pytest.raises(ValueError):
        OneHotCategorical()
