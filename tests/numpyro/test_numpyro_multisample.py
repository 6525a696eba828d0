"""
numpyro_binary_grads: VIMCO, LocalDisARM_IWAE and iwae_bound against the
exact K-sample bound, and RLOO_ELBO against the exact ELBO
(tests/numpyro/numpyro_oracle.py: enumeration of the K copies' joint
configurations, Gauss-Hermite for continuous sites). Mirrors
tests/pyro/test_multisample.py and the RLOO tests of tests/pyro/test_unbiased.py.

For every (estimator, structure) the mean of many single-step gradients
(``jax.grad`` of ``elbo.loss`` vmapped over keys, one jit per structure for
all its estimators) is within 5 standard errors of the exact gradient in
every coordinate, from 30 batch means; every case checks its power on the
guide coordinates (``max_i 0.1 |g_i| / se_i >= 8.1``).
"""

import jax

jax.config.update("jax_enable_x64", True)

import functools  # noqa: E402
import itertools  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402

import specs  # noqa: E402
import stats  # noqa: E402
from numpyro_oracle import (  # noqa: E402
    exact_iwae_bound,
    exact_iwae_value_and_grads,
    exact_value_and_grads,
    init_params,
)
from numpyro_binary_grads import (  # noqa: E402
    VIMCO,
    LocalDisARM_IWAE,
    OneHotCategorical,
    RLOO_ELBO,
    iwae_bound,
)
from test_numpyro_unbiased import gradient_draws  # noqa: E402

B = specs.numpyro_backend()
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def jit(fn):
    """``jax.jit`` with XLA's backend optimisations off (they cost more
    compile time than they save in these tests)."""
    return jax.jit(fn, compiler_options=FAST_COMPILE)
ALL_SPECS = {**specs.SPECS, **specs.IWAE_SPECS}


def make(name, K):
    """The estimator; ``K`` is its K-sample bound's K (pairs for LocalDisARM,
    samples for RLOO, whose objective is the ELBO)."""
    if name == "vimco":
        return VIMCO(num_samples=K)
    if name == "local_disarm":
        return LocalDisARM_IWAE(num_pairs=K)
    return RLOO_ELBO(num_samples=K)


@functools.lru_cache(maxsize=None)
def exact(spec_name, name, K):
    """(names, exact flat gradient of the loss, guide-coordinate mask)."""
    spec = ALL_SPECS[spec_name]()
    if name == "rloo":
        _, grads = exact_value_and_grads(spec, loss=True)
    else:
        _, grads = exact_iwae_value_and_grads(spec, num_samples=K, loss=True)
    names = sorted(grads)
    flat = np.concatenate([np.ravel(grads[k]) for k in names])
    guide = np.concatenate([np.full(np.size(grads[k]), k.startswith("q_")) for k in names])
    return names, flat, guide


# spec -> (particles per batch, [(estimator, K), ...]): all of a spec's
# estimators run in one jit on the same keys
CASES = {
    "scalar": (2000, [("vimco", 2), ("local_disarm", 2), ("rloo", 3)]),
    "sbn": (6000, [("vimco", 3), ("local_disarm", 3), ("rloo", 3)]),
    "two_layer": (2000, [("vimco", 2), ("rloo", 3)]),
    "subsample": (4000, [("vimco", 2), ("local_disarm", 2), ("rloo", 3)]),
    "masked": (8000, [("local_disarm", 2)]),
    "mixed": (2000, [("vimco", 2), ("rloo", 3)]),
    "categorical": (2000, [("vimco", 2), ("rloo", 3)]),
    "categorical_plate": (2000, [("vimco", 3), ("rloo", 3)]),
    "outside_obs": (4000, [("vimco", 2), ("local_disarm", 2)]),
}
PARAMS = [(s, n, K) for s, (_, ests) in CASES.items() for n, K in ests]


@functools.lru_cache(maxsize=None)
def draws_of(spec_name):
    particles, ests = CASES[spec_name]
    spec = ALL_SPECS[spec_name]()
    names = exact(spec_name, *ests[0])[0]
    runs = gradient_draws([make(n, K) for n, K in ests], spec, names, particles, 30)
    return {est: run for est, run in zip(ests, runs)}


def check(draws, exact_grad, guide, label):
    result = stats.check_unbiased(draws, exact_grad)
    se = np.where(result.se[guide] > 0, result.se[guide], np.inf)
    power = float(np.max(0.1 * np.abs(result.exact[guide]) / se))
    print(f"{label}: max|z| = {result.max_abs_z:.2f}, guide power = {power:.1f}")
    assert power >= 8.1, f"too little power against a 10% bias: {power:.2f}"
    return result


@pytest.mark.parametrize("spec_name,name,K", PARAMS)
def test_unbiased(spec_name, name, K):
    names, exact_grad, guide = exact(spec_name, name, K)
    draws, _ = draws_of(spec_name)[name, K]
    check(draws, exact_grad, guide, f"{name} K={K} {spec_name}")


def test_check_detects_a_10_percent_bias():
    """Documented fixed-seed case: VIMCO's sbn draws scaled by 1.1 fail."""
    _, exact_grad, guide = exact("sbn", "vimco", 3)
    draws, _ = draws_of("sbn")["vimco", 3]
    check(draws, exact_grad, guide, "vimco sbn")
    with pytest.raises(AssertionError):
        stats.check_unbiased(1.1 * draws, exact_grad)


def test_rloo_one_hot_categorical_sites():
    """OneHotCategorical sites in a data plate, against the exact gradient."""
    y = jnp.array([0.8, -0.4])

    def guide():
        a = numpyro.param("a", jnp.array([[0.4, -0.3, 0.1], [-0.6, 0.2, 0.5]]))
        with numpyro.plate("data", 2, dim=-1):
            numpyro.sample("c", OneHotCategorical(logits=a))

    def model():
        p = numpyro.param("p", jnp.array([0.1, 0.0, -0.1]))
        mu = numpyro.param("mu", jnp.array([-1.0, 0.0, 1.0]))
        with numpyro.plate("data", 2, dim=-1):
            c = numpyro.sample("c", OneHotCategorical(logits=p))
            numpyro.sample("y", dist.Normal(jnp.sum(c * mu, -1), 1.0), obs=y)

    spec = specs.Spec("onehot", lambda B: model(), lambda B: guide(), ())
    params = {"a": jnp.array([[0.4, -0.3, 0.1], [-0.6, 0.2, 0.5]]),
              "p": jnp.array([0.1, 0.0, -0.1]), "mu": jnp.array([-1.0, 0.0, 1.0])}
    names = sorted(params)
    from numpyro_oracle import exact_elbo

    g = jax.grad(lambda p: -exact_elbo(p, model, guide))(params)
    exact_grad = np.concatenate([np.ravel(g[k]) for k in names])
    guide_mask = np.array([True] * 6 + [False] * 6)
    [(draws, _)] = gradient_draws([RLOO_ELBO(num_samples=3)], spec, names, 2000, 30,
                                  params=params)
    check(draws, exact_grad, guide_mask, "rloo one-hot")


@pytest.mark.parametrize("name", ["vimco", "local_disarm"])
def test_value_is_the_k_sample_bound(name):
    spec = specs.SPECS["sbn"]()
    params = init_params(spec)
    model, guide, args = spec.bind(B)
    exact_value = float(exact_iwae_bound(params, model, guide, *args, num_samples=2))
    elbo = make(name, 2)
    keys = jax.random.split(jax.random.PRNGKey(1), 12000)
    values = -np.asarray(jit(jax.vmap(
        lambda k: elbo.loss(k, params, model, guide, *args)))(keys))
    means = stats.batch_means(values, 30)[:, 0]
    se = means.std(ddof=1) / np.sqrt(len(means))
    print(f"{name}: value {means.mean():.4f} +- {se:.4f}, exact {exact_value:.4f}")
    assert abs(means.mean() - exact_value) < 5 * se


def test_vmap_and_lax_map_over_evaluations_agree():
    """``vectorize=False`` runs the same evaluations with the same keys."""
    spec = specs.SPECS["mixed"]()
    model, guide, args = spec.bind(B)
    params = init_params(spec)
    out = []
    for vectorize in (True, False):
        elbo = VIMCO(num_particles=2, num_samples=3, vectorize=vectorize)
        fn = jit(jax.value_and_grad(
            lambda p: elbo.loss(jax.random.PRNGKey(3), p, model, guide, *args)))
        out.append(fn(params))
    assert abs(float(out[0][0] - out[1][0])) < 1e-10
    for k in params:
        np.testing.assert_allclose(out[0][1][k], out[1][1][k], rtol=0, atol=1e-10)


def test_samples_have_independent_continuous_draws_and_pairs_share_them():
    """VIMCO's samples draw the continuous site z independently; the two
    members of a LocalDisARM pair share it (same noise draw, z upstream)."""
    spec = specs.SPECS["mixed"]()
    model, guide, args = spec.bind(B)
    params = init_params(spec)
    from numpyro_binary_grads import sites

    for cls, kw, shared in ((VIMCO, {"num_samples": 4}, False),
                            (LocalDisARM_IWAE, {"num_pairs": 2}, True)):
        elbo = cls(**kw)
        structure = sites.discover(jax.random.PRNGKey(0), params, model, guide, args, {},
                                   supports=elbo.supports)
        elbo._structure = structure
        plan = elbo.plan(structure.num_sites)
        run = functools.partial(sites._traces, key=jax.random.PRNGKey(0), params=params,
                                model=model, guide=guide, args=args, kwargs={}, noise=None,
                                owner="t", plan=plan, supports=elbo.supports)
        z = jax.vmap(lambda e: run(e)[0]["z"]["value"])(jnp.arange(plan.num_evaluations))
        z = np.asarray(z)
        if shared:
            assert z[0] == z[1] and z[2] == z[3] and z[0] != z[2]
        else:
            assert len(set(z.tolist())) == len(z)


# ---------------------------------------------------------------------------
# iwae_bound
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 3])
def test_iwae_bound_mean_is_exact(K):
    spec = specs.SPECS["two_layer"]()
    params = init_params(spec)
    model, guide, args = spec.bind(B)
    exact_value = float(exact_iwae_bound(params, model, guide, *args, num_samples=K))
    keys = jax.random.split(jax.random.PRNGKey(K), 3000)
    values = np.asarray(jit(jax.vmap(lambda k: iwae_bound(
        k, params, model, guide, *args, num_samples=K, chunk_size=2)))(keys))
    se = values.std(ddof=1) / np.sqrt(len(values))
    print(f"iwae_bound K={K}: mean {values.mean():.4f} +- {se:.4f}, exact {exact_value:.4f}")
    assert abs(values.mean() - exact_value) < 5 * se
    # eager call: compiles itself once, same number as the traced one
    one = iwae_bound(keys[0], params, model, guide, *args, num_samples=K, chunk_size=2)
    assert abs(float(one) - values[0]) < 1e-10


def test_iwae_bound_outside_terms_added_once():
    spec = specs.IWAE_SPECS["outside_obs"]()
    params = init_params(spec)
    model, guide, args = spec.bind(B)
    exact_value = float(exact_iwae_bound(params, model, guide, *args, num_samples=3))
    keys = jax.random.split(jax.random.PRNGKey(5), 3000)
    values = np.asarray(jit(jax.vmap(lambda k: iwae_bound(
        k, params, model, guide, *args, num_samples=3, chunk_size=3)))(keys))
    se = values.std(ddof=1) / np.sqrt(len(values))
    assert abs(values.mean() - exact_value) < 5 * se


def test_iwae_bound_approaches_log_likelihood():
    """On the SBN spec, log p(x) by enumeration; the 2000-sample bound is
    within 0.01 nats of it and above the ELBO."""
    spec = specs.SPECS["sbn"]()
    params = init_params(spec)
    model, guide, args = spec.bind(B)
    x = np.asarray(args[0])
    p0, W, c = (np.asarray(params[k]) for k in ("p_prior", "p_W", "p_c"))

    def softplus(a):
        return np.logaddexp(0.0, a)

    log_px = 0.0
    for n in range(x.shape[0]):
        terms = []
        for bits in itertools.product([0.0, 1.0], repeat=p0.shape[0]):
            b = np.array(bits)
            a = b @ W + c
            terms.append((b * p0 - softplus(p0)).sum() + (x[n] * a - softplus(a)).sum())
        log_px += np.logaddexp.reduce(terms)
    bound = float(iwae_bound(jax.random.PRNGKey(0), params, model, guide, *args,
                             num_samples=2000, chunk_size=500))
    elbo = float(exact_iwae_bound(params, model, guide, *args, num_samples=1))
    assert elbo < bound < log_px + 0.01
    assert abs(bound - log_px) < 0.01


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def _loss(elbo, spec_name, jit=False):
    spec = ALL_SPECS[spec_name]()
    model, guide, args = spec.bind(B)
    fn = lambda p: elbo.loss(jax.random.PRNGKey(0), p, model, guide, *args)  # noqa: E731
    return (jax.jit(fn) if jit else fn)(init_params(spec))


@pytest.mark.parametrize("jit", [False, True])
def test_local_disarm_refuses_multi_layer_guides(jit):
    with pytest.raises(NotImplementedError,
                       match=r"one stochastic layer.*\['b1', 'b2'\].*VIMCO"):
        _loss(LocalDisARM_IWAE(num_pairs=2), "two_layer", jit)


def test_local_disarm_refuses_categorical_sites():
    with pytest.raises(NotImplementedError, match="'c'.*Categorical"):
        _loss(LocalDisARM_IWAE(num_pairs=2), "categorical_plate")


def test_too_few_samples_are_refused():
    with pytest.raises(ValueError, match="num_samples >= 2"):
        VIMCO(num_samples=1)
    with pytest.raises(ValueError, match="num_samples >= 2"):
        RLOO_ELBO(num_samples=1)
    with pytest.raises(ValueError, match="num_pairs >= 1"):
        LocalDisARM_IWAE(num_pairs=0)


def test_keyword_only_and_defaults():
    for cls, arg, default in ((VIMCO, "num_samples", 2), (RLOO_ELBO, "num_samples", 2),
                              (LocalDisARM_IWAE, "num_pairs", 1)):
        elbo = cls(3, False)
        assert (elbo.num_particles, elbo.vectorize_particles, getattr(elbo, arg)) == (
            3, False, default)
        assert cls.can_infer_discrete
        with pytest.raises(TypeError):
            cls(1, True, 4)


def _outside_model(x):
    with numpyro.plate("data", 3, dim=-1):
        b = numpyro.sample("b", dist.Bernoulli(logits=jnp.zeros(())))
        numpyro.sample("x", dist.Bernoulli(logits=b), obs=x)
    numpyro.sample("s", dist.Normal(jnp.sum(b, -1, keepdims=True), 1.0), obs=jnp.ones(1))


def _outside_guide(x):
    a = numpyro.param("a", jnp.zeros(3))
    with numpyro.plate("data", 3, dim=-1):
        numpyro.sample("b", dist.Bernoulli(logits=a))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("cls", ["vimco", "local_disarm", "iwae_bound"])
def test_site_outside_common_plates_depending_on_samples_is_refused(cls, jit):
    x = jnp.array([1.0, 0.0, 1.0])
    params = {"a": jnp.zeros(3)}
    if cls == "iwae_bound":
        def fn(p):
            return iwae_bound(jax.random.PRNGKey(0), p, _outside_model, _outside_guide, x,
                              num_samples=3)
    else:
        elbo = make(cls, 3)

        def fn(p):
            return elbo.loss(jax.random.PRNGKey(0), p, _outside_model, _outside_guide, x)
    with pytest.raises(ValueError, match="'s'.*outside the plates.*depends on the samples"):
        (jax.jit(fn) if jit else fn)(params)


def test_subsampled_plate_not_common_to_the_latent_sites_is_refused():
    def model(x):
        z = numpyro.sample("z", dist.Bernoulli(logits=0.0))
        with numpyro.plate("data", 4, subsample_size=2, dim=-1):
            numpyro.sample("x", dist.Normal(z, 1.0), obs=jnp.zeros(2))

    def guide(x):
        numpyro.sample("z", dist.Bernoulli(logits=numpyro.param("a", 0.1)))

    with pytest.raises(NotImplementedError, match="'x' is in the subsampled plate 'data'"):
        VIMCO().loss(jax.random.PRNGKey(0), {"a": 0.1}, model, guide, None)


# ---------------------------------------------------------------------------
# variance: LocalDisARM with P pairs vs VIMCO with 2P samples (printed)
# ---------------------------------------------------------------------------


def test_local_disarm_vs_vimco_variance():
    """LocalDisARM with P pairs vs VIMCO with K = 2P samples, the same budget
    (different objectives, L_P vs L_2P: printed, not asserted; DESIGN.md)."""
    spec = specs.SPECS["sbn"]()
    names = exact("sbn", "vimco", 3)[0]
    q = np.concatenate([np.full(np.size(init_params(spec)[k]), k.startswith("q_"))
                        for k in names])
    runs = gradient_draws([LocalDisARM_IWAE(num_pairs=2), VIMCO(num_samples=4)], spec,
                          names, 1000, 30, seed=11)
    var = {label: float(np.sum(v[q])) for label, (_, v) in
           zip(("LocalDisARM P=2", "VIMCO K=4"), runs)}
    ratio = var["VIMCO K=4"] / var["LocalDisARM P=2"]
    print(f"guide-gradient variance: {var}; VIMCO/LocalDisARM = {ratio:.2f}")
    assert np.isfinite(ratio) and ratio > 0
