"""
Bad and edge inputs of numpyro_binary_grads (issue 17): never a NaN, a silent
zero gradient or an internal crash.

1. ``Bernoulli(probs=p)`` guide sites with ``p`` exactly 0 or 1 (the common
   ``probs=sigmoid(h)`` saturating): every class gives Trace_ELBO's finite
   loss and a guide gradient of exactly 0, float32 and float64.
2. Constructor arguments: a bad ``num_particles``, ``vectorize``,
   ``vectorize_particles``, count, ``temperature``, ``eta`` or ``adapt``
   raises ``ValueError`` at construction naming the class and the argument.
3. REBAR's temperature: below ``TEMPERATURE_MIN`` refused; the adapted one is
   constrained above it; at the edges of the accepted range (``TEMPERATURE_MIN``
   and ``1e4``) the estimator is unbiased against the exact gradient (5 SE,
   power >= 8.1), float32 and float64.
4. REBAR/RELAX reuse on a second wrapped guide; ``rng_key=None``.
5. A model/guide plate-size or shape mismatch names the site.
6. NaN logits under jit: ``SVI.stable_update`` keeps the state (documented in
   docs/troubleshooting.rst).
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.distributions import biject_to  # noqa: E402
from numpyro.handlers import seed, trace  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO  # noqa: E402

import specs  # noqa: E402
import stats  # noqa: E402
import numpyro_binary_grads as nbg  # noqa: E402
from numpyro_binary_grads.relaxed import TEMPERATURE_MIN  # noqa: E402
from test_numpyro_unbiased import exact_flat, gradient_draws  # noqa: E402

KEY = jax.random.PRNGKey(0)

# every class, constructed with its defaults (RELAX and adapting REBAR need a
# wrapped guide: built by _guide_for)
ALL = [
    nbg.ARM_ELBO, nbg.DisARM_ELBO, nbg.RLOO_ELBO, nbg.VIMCO, nbg.LocalDisARM_IWAE,
    nbg.REBAR_ELBO, nbg.RELAX_ELBO, nbg.ST_ELBO, nbg.GumbelSoftmaxST_ELBO,
    nbg.GumbelRao_ELBO, nbg.ReinMax_ELBO, nbg.ReinMaxRao_ELBO, nbg.ReinMaxCV_ELBO,
]
# the classes that handle Bernoulli sites
BERNOULLI = [
    nbg.ARM_ELBO, nbg.DisARM_ELBO, nbg.RLOO_ELBO, nbg.VIMCO, nbg.LocalDisARM_IWAE,
    nbg.REBAR_ELBO, nbg.RELAX_ELBO, nbg.ST_ELBO, nbg.GumbelSoftmaxST_ELBO, nbg.ReinMax_ELBO,
]


def _guide_for(elbo, guide):
    return elbo.wrap_guide(guide) if hasattr(elbo, "wrap_guide") else guide


def _params(elbo, guide, params, *args):
    """``params`` plus what the wrapper declares (REBAR, RELAX)."""
    if not hasattr(elbo, "wrap_guide"):
        return params
    tr = trace(seed(numpyro.handlers.substitute(elbo.wrap_guide(guide), data=params),
                    0)).get_trace(*args)
    return {**{n: s["value"] for n, s in tr.items() if s["type"] == "param"}, **params}


# ---------------------------------------------------------------------------
# 1. probs exactly 0 or 1
# ---------------------------------------------------------------------------


def _probs_model(x):
    with numpyro.plate("data", 2, dim=-1):
        b = numpyro.sample("b", dist.Bernoulli(probs=0.5))
        mu = numpyro.param("p_mu", jnp.asarray(0.7, x.dtype))
        numpyro.sample("x", dist.Normal(mu * b, 1.0), obs=x)


def _probs_guide(x):
    h = numpyro.param("q_h", jnp.zeros(2, x.dtype))
    with numpyro.plate("data", 2, dim=-1):
        numpyro.sample("b", dist.Bernoulli(probs=jax.nn.sigmoid(h)))


# h saturating sigmoid to exactly 1 and 0 in the dtype
SATURATED = {jnp.float32: (30.0, -120.0), jnp.float64: (40.0, -800.0)}


@pytest.mark.parametrize("cls,dtype", [(c, jnp.float32) for c in BERNOULLI] + [
    (nbg.DisARM_ELBO, jnp.float64), (nbg.REBAR_ELBO, jnp.float64)],
    ids=lambda x: getattr(x, "__name__", None))
def test_probs_exactly_zero_or_one(cls, dtype):
    hi, lo = SATURATED[dtype]
    x = jnp.asarray([0.4, -0.3], dtype)
    params = {"q_h": jnp.asarray([hi, lo], dtype), "p_mu": jnp.asarray(0.7, dtype)}
    p = jax.nn.sigmoid(params["q_h"])
    assert float(p[0]) == 1.0 and float(p[1]) == 0.0  # the case of the issue
    elbo = cls()
    guide = _guide_for(elbo, _probs_guide)
    full = _params(elbo, _probs_guide, params, x)
    fn = jax.jit(jax.value_and_grad(lambda p: elbo.loss(KEY, p, _probs_model, guide, x)))
    loss, grads = fn(full)
    ref_loss, ref_grads = jax.value_and_grad(
        lambda p: Trace_ELBO().loss(KEY, p, _probs_model, _probs_guide, x))(params)
    assert np.isfinite(float(loss)) and np.isfinite(float(ref_loss))
    # b is deterministic: every estimator's value is Trace_ELBO's
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(grads["q_h"]), np.zeros(2))
    np.testing.assert_allclose(np.asarray(grads["p_mu"]), np.asarray(ref_grads["p_mu"]),
                               rtol=1e-5)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------------------
# 2. constructor arguments
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 2.5, "2", None, True])
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_bad_num_particles(cls, value):
    with pytest.raises(ValueError, match=f"{cls.__name__} needs .*num_particles"):
        cls(num_particles=value)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_bad_vectorize_flags(cls):
    with pytest.raises(ValueError, match=f"{cls.__name__} needs vectorize=True or False.*'yes'"):
        cls(vectorize="yes")
    with pytest.raises(ValueError, match=f"{cls.__name__} needs vectorize_particles=.*'vmap'"):
        cls(vectorize_particles="vmap")


def test_integral_float_num_particles_is_accepted():
    assert nbg.DisARM_ELBO(num_particles=2.0).num_particles == 2


@pytest.mark.parametrize("cls,arg,value", [
    (nbg.RLOO_ELBO, "num_samples", 1),
    (nbg.RLOO_ELBO, "num_samples", "4"),
    (nbg.VIMCO, "num_samples", "4"),
    (nbg.VIMCO, "num_samples", 0),
    (nbg.LocalDisARM_IWAE, "num_pairs", 0),
    (nbg.LocalDisARM_IWAE, "num_pairs", "2"),
    (nbg.RELAX_ELBO, "hidden_size", 0),
    (nbg.REBAR_ELBO, "adapt", "no"),
    (nbg.RELAX_ELBO, "adapt", "no"),
])
def test_bad_counts_and_flags(cls, arg, value):
    with pytest.raises(ValueError, match=f"{cls.__name__} needs .*{arg}"):
        cls(**{arg: value})


@pytest.mark.parametrize("kwargs", [
    dict(temperature=1e-8, adapt=False),  # the silent exactly-zero gradient of the issue
    dict(temperature=0.0),
    dict(temperature=-1.0, adapt=False),
    dict(temperature=float("nan"), adapt=False),
    dict(temperature=float("inf"), adapt=False),
    dict(temperature="0.5"),
    dict(eta=float("nan"), adapt=False),
    dict(eta=float("inf"), adapt=False),
    dict(eta=2.0),
    dict(eta=float("nan")),
])
@pytest.mark.parametrize("cls", [nbg.REBAR_ELBO, nbg.RELAX_ELBO], ids=lambda c: c.__name__)
def test_degenerate_rebar_settings_are_refused(cls, kwargs):
    arg = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{cls.__name__} needs .*{arg}"):
        cls(**kwargs)


def test_temperature_message_gives_the_bound():
    with pytest.raises(ValueError, match=r"temperature in \[0.01, inf\].*exactly 0"):
        nbg.REBAR_ELBO(temperature=1e-8, adapt=False)


# ---------------------------------------------------------------------------
# 3. the temperature's range
# ---------------------------------------------------------------------------


def test_adapted_temperature_stays_above_the_bound():
    """The declared param's constraint maps every unconstrained value (as
    SVI's optimizer moves it) to a temperature >= TEMPERATURE_MIN."""
    spec = specs.SPECS["scalar"]()
    model, guide, args = spec.bind(specs.numpyro_backend())
    elbo = nbg.REBAR_ELBO()
    tr = trace(seed(elbo.wrap_guide(guide), 0)).get_trace(*args)
    site = tr["_bg_b_temperature"]
    transform = biject_to(site["kwargs"]["constraint"])
    lam = np.asarray(transform(jnp.array([-1e4, -50.0, 0.0, 50.0])))
    assert np.all(lam >= TEMPERATURE_MIN) and np.all(np.isfinite(lam))
    assert lam[0] == TEMPERATURE_MIN
    np.testing.assert_allclose(float(site["value"]), 0.5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
def test_rebar_unbiased_at_the_edges_of_the_temperature_range(dtype):
    """
    REBAR (adapt=False, eta=1) on the one-site spec at the smallest accepted
    temperature and at 1e4 (large temperatures are not bounded: the
    relaxation tends to a constant): the mean of 750,000 single-step
    gradients is within 5 SE of the exact gradient, with power >= 8.1 on the
    guide logit. The variance at TEMPERATURE_MIN is printed (about 0.06 /
    temperature: the reason for the bound).
    """
    spec = specs.SPECS["scalar"]()
    names, exact = exact_flat(spec)
    guide = np.array([n.startswith("q_") for n in names])
    elbos = [nbg.REBAR_ELBO(temperature=t, eta=1.0, adapt=False) for t in (TEMPERATURE_MIN, 1e4)]
    runs = gradient_draws(elbos, spec, names, 25000, 30, dtype=dtype)
    for t, (draws, var) in zip((TEMPERATURE_MIN, 1e4), runs):
        result = stats.check_unbiased(draws, exact, names=names)
        power = float(np.max(0.1 * np.abs(result.exact[guide]) / result.se[guide]))
        print(f"REBAR temperature {t:g} ({np.dtype(dtype).name}): max|z| = "
              f"{result.max_abs_z:.2f}, guide power {power:.1f}, guide variance "
              f"{float(var[guide][0]):.3g}")
        assert power >= 8.1


# ---------------------------------------------------------------------------
# 4. reuse and keys
# ---------------------------------------------------------------------------


def _one_site(site, x):
    def model():
        b = numpyro.sample(site, dist.Bernoulli(logits=0.2))
        numpyro.sample("x", dist.Normal(b, 1.0), obs=x)

    def guide():
        q = numpyro.param(f"q_{site}", 0.3)
        numpyro.sample(site, dist.Bernoulli(logits=q))

    return model, guide


def test_one_elbo_wraps_two_guides():
    """One REBAR instance trained on two programs (different site names) in
    turn: each wrapped guide declares its own sites' params (RELAX_ELBO's
    wrapper is the same code)."""
    elbo = nbg.REBAR_ELBO()
    for site, x in (("b", 0.5), ("c", -0.3)):
        model, guide = _one_site(site, x)
        svi = SVI(model, elbo.wrap_guide(guide), optax.adam(1e-2), elbo)
        state = svi.init(KEY)
        assert f"_bg_{site}_temperature" in svi.get_params(state)
        state, loss = jax.jit(svi.update)(state)
        assert np.isfinite(float(loss))


@pytest.mark.parametrize("cls", [nbg.DisARM_ELBO, nbg.REBAR_ELBO, nbg.ReinMax_ELBO,
                                 nbg.VIMCO], ids=lambda c: c.__name__)
def test_rng_key_none(cls):
    model, guide = _one_site("b", 0.5)
    elbo = cls(adapt=False) if cls is nbg.REBAR_ELBO else cls()
    with pytest.raises(TypeError, match=f"{cls.__name__} .*needs an rng_key, got None"):
        elbo.loss(None, {"q_b": jnp.asarray(0.3)}, model, guide)


def test_iwae_bound_rng_key_none():
    model, guide = _one_site("b", 0.5)
    with pytest.raises(TypeError, match="iwae_bound needs an rng_key"):
        nbg.iwae_bound(None, {"q_b": jnp.asarray(0.3)}, model, guide, num_samples=4)


# ---------------------------------------------------------------------------
# 5. model/guide mismatch
# ---------------------------------------------------------------------------


def _mismatch_guide():
    h = numpyro.param("q_h", jnp.zeros(3))
    with numpyro.plate("d", 3):
        numpyro.sample("b", dist.Bernoulli(logits=h))


def _mismatch_model():
    with numpyro.plate("d", 4):
        b = numpyro.sample("b", dist.Bernoulli(0.5))
        numpyro.sample("x", dist.Normal(b, 1.0), obs=jnp.zeros(4))


def _arithmetic_model():
    """The model's own arithmetic fails first (a (4, 2) weight on a (3,) value)."""
    b = numpyro.sample("b", dist.Bernoulli(0.5).expand([4]).to_event(1))
    numpyro.sample("x", dist.Normal(b @ jnp.ones((4, 2)), 1.0).to_event(1), obs=jnp.zeros(2))


def _event_guide():
    h = numpyro.param("q_h", jnp.zeros(3))
    numpyro.sample("b", dist.Bernoulli(logits=h).to_event(1))


@pytest.mark.parametrize("cls", [nbg.DisARM_ELBO, nbg.RLOO_ELBO, nbg.VIMCO, nbg.ST_ELBO],
                         ids=lambda c: c.__name__)
def test_plate_size_mismatch_names_the_site(cls):
    with pytest.raises(ValueError, match="at site 'b': its plate 'd' has size 4 .* in the "
                                         "model and size 3 .* in the guide"):
        cls().loss(KEY, {"q_h": jnp.zeros(3)}, _mismatch_model, _mismatch_guide)


def test_shape_mismatch_in_the_models_arithmetic_names_the_site():
    with pytest.raises(ValueError, match=r"shapes disagree at site 'b': \(4,\) \(model\) vs "
                                         r"\(3,\) \(guide\)"):
        nbg.DisARM_ELBO().loss(KEY, {"q_h": jnp.zeros(3)}, _arithmetic_model, _event_guide)


# ---------------------------------------------------------------------------
# 6. NaN logits under jit
# ---------------------------------------------------------------------------


def test_stable_update_skips_a_nan_step():
    """Under jit a NaN logit cannot raise; SVI.stable_update (as
    docs/troubleshooting.rst says) keeps the previous state."""

    def model():
        b = numpyro.sample("b", dist.Bernoulli(logits=0.0))
        numpyro.sample("x", dist.Normal(b, 1.0), obs=0.5)

    def guide(scale):
        q = numpyro.param("q", 0.3)
        numpyro.sample("b", dist.Bernoulli(logits=q * scale))

    svi = SVI(lambda scale: model(), guide, optax.adam(0.1), nbg.DisARM_ELBO())
    state = svi.init(KEY, 1.0)
    before = svi.get_params(state)["q"]
    update = jax.jit(svi.stable_update)
    new, loss = update(state, jnp.asarray(jnp.nan))
    assert np.isnan(float(loss))
    assert float(svi.get_params(new)["q"]) == float(before)
    new, loss = update(state, jnp.asarray(1.0))
    assert np.isfinite(float(loss)) and float(svi.get_params(new)["q"]) != float(before)
