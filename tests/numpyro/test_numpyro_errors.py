"""
Named-site errors of numpyro_binary_grads, raised at trace time (outside jit
and during the first jit trace alike), and the NaN-logits behaviour.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.handlers import substitute  # noqa: E402

import specs  # noqa: E402
from numpyro_oracle import init_params  # noqa: E402
from numpyro_binary_grads import ARM_ELBO, DisARM_ELBO, OneHotCategorical  # noqa: E402

ELBOS = [ARM_ELBO, DisARM_ELBO]
KEY = jax.random.PRNGKey(0)


def _loss(elbo, model, guide, params, *args, jit=False):
    fn = lambda p: elbo.loss(KEY, p, model, guide, *args)  # noqa: E731
    if jit:
        fn = jax.jit(fn)
    return fn(params)


def _model(x):
    with numpyro.plate("data", 3, dim=-1):
        b = numpyro.sample("b", dist.Bernoulli(logits=jnp.zeros(3)))
        numpyro.sample("x", dist.Normal(b, 1.0), obs=x)


def _model_with(site_fn):
    def model(x):
        with numpyro.plate("data", 3, dim=-1):
            b = numpyro.sample("b", site_fn())
            numpyro.sample("x", dist.Normal(jnp.sum(jnp.atleast_1d(b)), 1.0), obs=x)
    return model


X = jnp.array([0.5, -0.2, 1.0])
PARAMS = {"q": jnp.array([0.3, -0.4, 0.2])}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("cls", ELBOS)
def test_poisson_guide_site(cls, jit):
    def guide(x):
        q = numpyro.param("q", jnp.ones(3))
        with numpyro.plate("data", 3, dim=-1):
            numpyro.sample("b", dist.Poisson(jnp.exp(q)))

    model = _model_with(lambda: dist.Poisson(1.0))
    with pytest.raises(NotImplementedError, match="Guide site 'b' has a Poisson.*TraceGraph_ELBO"):
        _loss(cls(), model, guide, PARAMS, X, jit=jit)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("spec_name", ["categorical", "categorical_plate"])
def test_categorical_site_is_refused_by_arm_with_alternatives(spec_name, jit):
    """ARM refuses Categorical sites and names the estimators that handle
    them (DisARM_ELBO first); DisARM_ELBO runs on the same guide (checked
    under jit only: eager dispatch is slow)."""
    spec = specs.SPECS[spec_name]()
    model, guide, args = spec.bind(specs.numpyro_backend())
    with pytest.raises(NotImplementedError,
                       match="'c1?' has a Categorical.*DisARM_ELBO.*RLOO_ELBO.*VIMCO"):
        _loss(ARM_ELBO(), model, guide, init_params(spec), *args, jit=jit)
    if jit:
        loss = _loss(DisARM_ELBO(), model, guide, init_params(spec), *args, jit=True)
        assert np.isfinite(float(loss))


def test_one_hot_categorical_site_is_refused_by_arm_with_alternatives():
    def guide(x):
        q = numpyro.param("q", jnp.zeros((3, 4)))
        with numpyro.plate("data", 3, dim=-1):
            numpyro.sample("b", OneHotCategorical(logits=q))

    model = _model_with(lambda: OneHotCategorical(logits=jnp.zeros(4)))
    with pytest.raises(NotImplementedError,
                       match="'b' has a OneHotCategorical.*DisARM_ELBO.*RLOO_ELBO"):
        _loss(ARM_ELBO(), model, guide, {"q": jnp.zeros((3, 4))}, X)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("cls", ELBOS)
def test_enumerated_guide_site(cls, jit):
    def guide(x):
        q = numpyro.param("q", jnp.zeros(3))
        with numpyro.plate("data", 3, dim=-1):
            numpyro.sample("b", dist.Bernoulli(logits=q), infer={"enumerate": "parallel"})

    with pytest.raises(ValueError, match="Guide site 'b' is marked for enumeration.*TraceEnum_ELBO"):
        _loss(cls(), _model, guide, PARAMS, X, jit=jit)


def test_enumerated_model_site():
    def model(x):
        c = numpyro.sample("c", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
        _model(x + c)

    def guide(x):
        q = numpyro.param("q", jnp.zeros(3))
        with numpyro.plate("data", 3, dim=-1):
            numpyro.sample("b", dist.Bernoulli(logits=q))

    with pytest.raises(ValueError, match="Model site 'c' is marked for enumeration"):
        _loss(DisARM_ELBO(), model, guide, PARAMS, X)


def test_model_latent_not_in_guide():
    def model(x):
        c = numpyro.sample("c", dist.Normal(0.0, 1.0))
        _model(x + c)

    def guide(x):
        q = numpyro.param("q", jnp.zeros(3))
        with numpyro.plate("data", 3, dim=-1):
            numpyro.sample("b", dist.Bernoulli(logits=q))

    with pytest.raises(ValueError, match="Model site 'c' is latent but not in the guide"):
        _loss(DisARM_ELBO(), model, guide, PARAMS, X)


@pytest.mark.parametrize("jit", [False, True])
def test_subsampled_plate_with_global_site_after_local(jit):
    def model(x):
        u = numpyro.sample("u", dist.Normal(jnp.zeros(1), 1.0))
        with numpyro.plate("data", 6, subsample_size=3, dim=-1):
            b = numpyro.sample("b", dist.Bernoulli(logits=jnp.zeros(3)))
            numpyro.sample("x", dist.Normal(b + u, 1.0), obs=x)

    def guide(x):
        q = numpyro.param("q", jnp.zeros(3))
        with numpyro.plate("data", 6, subsample_size=3, dim=-1):
            b = numpyro.sample("b", dist.Bernoulli(logits=q))
        numpyro.sample("u", dist.Normal(jnp.sum(b, -1, keepdims=True), 1.0))

    # supported, as in Pyro: b's signal is summed over the plate, with the warning
    # (the exact gradient: test_numpyro_unbiased.py::test_global_guide_site_after_a_subsampled_local_one)
    with pytest.warns(RuntimeWarning, match=r"\['u'\] outside plate 'data' run after discrete "
                                            "site 'b'"):
        loss = _loss(DisARM_ELBO(), model, guide, PARAMS, X, jit=jit)
    assert np.isfinite(float(loss))


def test_substituted_discrete_guide_site():
    def guide(x):
        q = numpyro.param("q", jnp.zeros(3))
        with numpyro.plate("data", 3, dim=-1):
            numpyro.sample("b", dist.Bernoulli(logits=q))

    guide = substitute(guide, data={"b": jnp.ones(3)})
    with pytest.raises(ValueError, match="Discrete guide site 'b' already has a value"):
        _loss(DisARM_ELBO(), _model, guide, PARAMS, X)


def _guide_q(x):
    q = numpyro.param("q", jnp.zeros(3))
    with numpyro.plate("data", 3, dim=-1):
        numpyro.sample("b", dist.Bernoulli(logits=q))


@pytest.mark.parametrize("cls", ELBOS)
def test_nan_logits_raise_outside_jit(cls):
    """(Infinite Bernoulli logits are a certain unit, accepted:
    tests/test_certain_outcomes.py, which also has the refused categorical rows.)"""
    params = {"q": jnp.array([0.3, np.nan, 0.2])}
    with pytest.raises(ValueError, match="Guide site 'b' has NaN or infinite logits"):
        _loss(cls(), _model, _guide_q, params, X)


def test_nan_logits_under_jit_give_a_nan_loss():
    """
    Under jit (or grad) values are abstract: no error can be raised, and the
    loss is NaN (documented; ``SVI.stable_update`` skips such steps).
    """
    params = {"q": jnp.array([0.3, np.nan, 0.2])}
    loss = _loss(DisARM_ELBO(), _model, _guide_q, params, X, jit=True)
    assert np.isnan(float(loss))
    g = jax.jit(jax.grad(lambda p: DisARM_ELBO().loss(KEY, p, _model, _guide_q, X)))(params)
    assert np.isnan(np.asarray(g["q"])).any()
