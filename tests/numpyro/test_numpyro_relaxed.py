"""
numpyro_binary_grads.REBAR_ELBO and RELAX_ELBO (numpyro_binary_grads.relaxed),
mirroring tests/pyro/test_relaxed.py.

1. Unbiased against the exact gradient (tests/numpyro/numpyro_oracle.py) for
   fixed temperature and eta (``adapt=False``; eta = 0 and a bad temperature
   included), Bernoulli and one-hot sites, one and two layers, a
   reparameterized site upstream; RELAX with a fixed random network (the
   default one and a user's), through ``param_map`` as SVI passes it (which
   adds the variance term to the loss; missing values raise). The mean of many single-step
   gradients (``jax.grad`` of ``elbo.loss`` vmapped over keys, one jit per
   structure for all its estimators) is within 5 standard errors of the
   exact gradient in every coordinate, from 30 batch means; every case checks
   its power on the guide coordinates (``max_i 0.1 |g_i| / se_i >= 8.1``).
2. The variance gradient: training only the ``_bg_*`` params with stock SVI
   from bad starting values lowers the guide gradient's variance (ratio
   printed); the adapted params' gradient is the finite-difference
   derivative of the mean squared guide gradient (same key), and the
   variance term leaves the value and the other params' gradients unchanged.
3. Errors: integer Categorical sites, a missing ``wrap_guide``.
4. SVI with the wrapped guide under jit.
"""

import jax

jax.config.update("jax_enable_x64", True)

import functools  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro.infer import SVI  # noqa: E402

import specs  # noqa: E402
import stats  # noqa: E402
from numpyro_oracle import init_params  # noqa: E402
from numpyro_binary_grads import REBAR_ELBO, RELAX_ELBO  # noqa: E402
from numpyro_binary_grads.elbo import SiteELBO  # noqa: E402
from numpyro_binary_grads.relax import ControlVariateNet  # noqa: E402
from test_numpyro_unbiased import exact_flat, gradient_draws  # noqa: E402

B = specs.numpyro_backend()
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def fast_jit(fn, *args):
    """``jax.jit(fn)`` compiled with XLA's backend optimisations off, run on ``args``."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


class Wrapped:
    """``spec`` with its guide wrapped by ``elbo`` (declaring its adapted params)."""

    def __init__(self, spec, elbo):
        self.spec, self.elbo = spec, elbo

    def bind(self, B):
        model, guide, args = self.spec.bind(B)
        return model, self.elbo.wrap_guide(guide), args


def random_net(spec_name, site, hidden=16, seed=3):
    """A fixed random control variate: the default architecture (``hidden``
    units), output layer ~ N(0, 0.1^2) (as tests/pyro/test_relaxed.py)."""
    event = {"sbn": 2, "onehot_plate": 3}[spec_name]
    net = ControlVariateNet(event, hidden, 1)
    params = net.init_params()
    w = 0.1 * jax.random.normal(jax.random.PRNGKey(seed), (hidden, 1))
    return net, dict(params, out={"w": w, "b": jnp.full((1,), 0.05)})


def relax_in_param_map(spec_name, site, user_net=False):
    """RELAX whose random network comes through ``param_map`` (the SVI path:
    the loss then carries the variance term for the network); with
    ``user_net`` the network is also the user's (constructor argument)."""
    net, params = random_net(spec_name, site)
    if user_net:
        elbo = RELAX_ELBO(control_variate=(net, params), temperature=0.5, adapt=False)
    else:
        elbo = RELAX_ELBO(temperature=0.5, adapt=False, hidden_size=16)
    extra = {f"_bg_{site}_control_variate": params}
    return elbo, extra


# spec -> (particles per batch, [(label, make)]): all of a spec's estimators
# run in one jit on the same keys; make() -> (elbo, extra params or None)
CASES = {
    "scalar": (2000, [
        ("rebar 0.5 1.0", lambda: (REBAR_ELBO(temperature=0.5, eta=1.0, adapt=False), None)),
        ("rebar 0.5 0.0", lambda: (REBAR_ELBO(temperature=0.5, eta=0.0, adapt=False), None)),
    ]),
    "sbn": (3000, [
        ("rebar 0.5 1.0", lambda: (REBAR_ELBO(temperature=0.5, eta=1.0, adapt=False), None)),
        # a bad temperature: still unbiased
        ("rebar 5.0 1.5", lambda: (REBAR_ELBO(temperature=5.0, eta=1.5, adapt=False), None)),
        ("relax random net (param_map)", lambda: relax_in_param_map("sbn", "b")),
    ]),
    "two_layer": (2000, [
        ("rebar 0.3 0.7", lambda: (REBAR_ELBO(temperature=0.3, eta=0.7, adapt=False), None)),
    ]),
    "mixed": (2000, [
        ("rebar 0.5 1.0", lambda: (REBAR_ELBO(temperature=0.5, eta=1.0, adapt=False), None)),
    ]),
    "onehot_plate": (2000, [
        ("rebar 0.5 1.0", lambda: (REBAR_ELBO(temperature=0.5, eta=1.0, adapt=False), None)),
        ("relax random user net", lambda: relax_in_param_map("onehot_plate", "z", True)),
    ]),
    "onehot_two_layer": (2000, [
        ("rebar 0.5 1.0", lambda: (REBAR_ELBO(temperature=0.5, eta=1.0, adapt=False), None)),
    ]),
}
PARAMS = [(s, label) for s, (_, ests) in CASES.items() for label, _ in ests]


def guide_mask(spec, names):
    params = init_params(spec)
    return np.concatenate([np.full(np.size(params[k]), k.startswith("q_")) for k in names])


@functools.lru_cache(maxsize=None)
def draws_of(spec_name):
    """{label: (batch means, per-draw variance)} of the spec's estimators.
    RELAX needs its wrapped guide: every estimator of a spec runs with the
    guide wrapped by the spec's RELAX (or REBAR) estimator; the estimators
    with ``adapt=False`` ignore the declared params."""
    particles, ests = CASES[spec_name]
    spec = specs.SPECS[spec_name]()
    names, _ = exact_flat(spec)
    made = [make() for _, make in ests]
    elbos = [e for e, _ in made]
    params = dict(init_params(spec))
    for _, extra in made:
        params.update(extra or {})
    wrapper = next((e for e in elbos if isinstance(e, RELAX_ELBO)), elbos[0])
    runs = gradient_draws(elbos, Wrapped(spec, wrapper), names, particles, 30, params=params)
    return {label: run for (label, _), run in zip(ests, runs)}


def check(draws, exact_grad, guide, label):
    result = stats.check_unbiased(draws, exact_grad)
    se = np.where(result.se[guide] > 0, result.se[guide], np.inf)
    power = float(np.max(0.1 * np.abs(result.exact[guide]) / se))
    guide_z = float(np.max(np.abs(result.z[guide])))
    print(f"{label}: max|z| = {result.max_abs_z:.2f} (guide coordinates {guide_z:.2f}), "
          f"guide power = {power:.1f}")
    assert power >= 8.1, f"too little power against a 10% bias: {power:.2f}"
    return result


@pytest.mark.parametrize("spec_name,label", PARAMS)
def test_unbiased(spec_name, label):
    spec = specs.SPECS[spec_name]()
    names, exact_grad = exact_flat(spec)
    draws, _ = draws_of(spec_name)[label]
    check(draws, exact_grad, guide_mask(spec, names), f"{label} {spec_name}")


def test_check_detects_a_10_percent_bias():
    """Documented fixed-seed case: REBAR's sbn draws scaled by 1.1 fail."""
    spec = specs.SPECS["sbn"]()
    names, exact_grad = exact_flat(spec)
    draws, _ = draws_of("sbn")["rebar 0.5 1.0"]
    check(draws, exact_grad, guide_mask(spec, names), "rebar 0.5 1.0 sbn")
    with pytest.raises(AssertionError, match="biased"):
        stats.check_unbiased(1.1 * draws, exact_grad)


# ---------------------------------------------------------------------------
# the variance gradient
# ---------------------------------------------------------------------------


def test_adapting_lowers_the_variance():
    """
    REBAR from a bad start (temperature 5, eta 0.3), its ``_bg_*`` params
    trained by stock SVI (optax: Adam on them, the model and guide params
    frozen) for 200 steps on the variance gradient: the summed per-coordinate
    variance of the guide gradient (same keys before and after; the
    estimator with ``adapt=False`` at the start and at the trained values)
    goes down.
    """
    spec = specs.SPECS["sbn"]()
    model, guide, args = spec.bind(B)
    elbo = REBAR_ELBO(temperature=5.0, eta=0.3, num_particles=2)
    frozen = {k: "psi" if k.startswith("_bg_") else "frozen" for k in
              list(init_params(spec)) + ["_bg_b_temperature", "_bg_b_eta"]}
    optim = optax.multi_transform({"psi": optax.adam(0.05), "frozen": optax.set_to_zero()},
                                  frozen)
    svi = SVI(model, elbo.wrap_guide(guide), optim, elbo)

    def train(key):
        state = svi.init(key, *args)
        state, losses = jax.lax.scan(lambda s, _: svi.update(s, *args), state, None, length=200)
        return svi.get_params(state), losses

    params, losses = fast_jit(train, jax.random.PRNGKey(0))
    assert np.all(np.isfinite(np.asarray(losses)))
    for k, v in init_params(spec).items():  # frozen
        np.testing.assert_array_equal(params[k], v)
    lam, eta = float(params["_bg_b_temperature"]), float(params["_bg_b_eta"])
    names, _ = exact_flat(spec)
    guide = guide_mask(spec, names)
    (_, before), (_, after) = gradient_draws(
        [REBAR_ELBO(temperature=5.0, eta=0.3, adapt=False),
         REBAR_ELBO(temperature=lam, eta=eta, adapt=False)], spec, names, 500, 30)
    ratio = float(np.sum(after[guide]) / np.sum(before[guide]))
    print(f"REBAR: variance after / before adapting = {ratio:.3f} "
          f"(temperature 5.0 -> {lam:.3f}, eta 0.3 -> {eta:.3f})")
    assert ratio < 1


def test_variance_gradient_is_the_derivative_of_the_mean_square():
    """
    RELAX (temperature, eta and a random network adapted) on the sbn spec at
    one key: the loss's gradient w.r.t. the adapted params is
    d/dpsi mean(g_phi^2), with g_phi the gradient of the loss without the
    variance term w.r.t. the guide params (central differences, 1e-6
    relative); value, guide and model gradients equal those of the same
    estimator with ``adapt=False`` (1e-12).
    """
    spec = specs.SPECS["sbn"]()
    model, guide, args = spec.bind(B)
    adapted = RELAX_ELBO(temperature=0.7, eta=0.6, hidden_size=8)
    fixed = RELAX_ELBO(temperature=0.7, eta=0.6, hidden_size=8, adapt=False)
    wrapped, wrapped_fixed = adapted.wrap_guide(guide), fixed.wrap_guide(guide)
    base = init_params(spec)
    net = random_net("sbn", "b", hidden=8)[1]  # a nonzero output layer: every param matters
    psi = {"_bg_b_temperature": jnp.asarray(0.7), "_bg_b_eta": jnp.asarray(0.6),
           "_bg_b_control_variate": net}
    phi_names = [k for k in base if k.startswith("q_")]
    key = jax.random.PRNGKey(5)
    h = 1e-5
    # (param, leaf path in the network or None): temperature, eta, two network weights
    probes = [("_bg_b_temperature", None), ("_bg_b_eta", None),
              ("_bg_b_control_variate", ("out", "w")),
              ("_bg_b_control_variate", ("hidden", "w"))]

    def poke(params, k, path, d):
        params = dict(params)
        if path is None:
            params[k] = params[k] + d
        else:
            leaf = params[k][path[0]][path[1]]
            params[k] = {**params[k], path[0]: {**params[k][path[0]], path[1]:
                                                leaf.at[(0,) * leaf.ndim].add(d)}}
        return params

    def leaf(tree, k, path):
        return tree[k] if path is None else tree[k][path[0]][path[1]][(0,) * 2]

    def run(base, psi):
        full = {**base, **psi}
        loss, grads = jax.value_and_grad(
            lambda p: adapted.loss(key, p, model, wrapped, *args))(full)
        fixed_params = {**base, "_bg_b_control_variate": net}
        loss0, grads0 = jax.value_and_grad(
            lambda p: fixed.loss(key, {**fixed_params, **p}, model, wrapped_fixed, *args))(base)

        def mean_square(params):
            # the loss without its variance term (REBAR_ELBO's base class)
            def plain(phi):
                return SiteELBO.loss(adapted, key, {**params, **phi}, model, wrapped, *args)

            g = jax.grad(plain)({k: params[k] for k in phi_names})
            return sum(jnp.sum(x * x) for x in g.values()) / sum(x.size for x in g.values())

        poked = [poke(full, k, path, d) for k, path in probes for d in (h, -h)]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *poked)
        ms = jax.vmap(mean_square)(stacked).reshape(-1, 2)
        got = jnp.stack([leaf(grads, k, path) for k, path in probes])
        return loss, grads, loss0, grads0, got, (ms[:, 0] - ms[:, 1]) / (2 * h)

    loss, grads, loss0, grads0, got, fd = fast_jit(run, base, psi)
    assert abs(float(loss - loss0)) < 1e-12
    for k in base:
        np.testing.assert_allclose(grads[k], grads0[k], rtol=0, atol=1e-12)
    got = np.asarray(got)
    print(f"d mean(g_phi^2) / d psi = {np.round(got, 6)}, finite differences {np.round(fd, 6)}")
    assert np.all(np.abs(got) > 1e-6)
    np.testing.assert_allclose(got, np.asarray(fd), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def test_integer_categorical_site_points_to_one_hot():
    def model():
        numpyro.sample("c", dist.Categorical(logits=jnp.zeros(3)))

    def guide():
        numpyro.sample("c", dist.Categorical(logits=numpyro.param("a", jnp.zeros(3))))

    for elbo in (REBAR_ELBO(adapt=False), RELAX_ELBO()):
        with pytest.raises(NotImplementedError, match="'c'.*OneHotCategorical"):
            elbo.loss(jax.random.PRNGKey(0), {}, model, elbo.wrap_guide(guide))


def test_adapting_without_the_wrapper_raises():
    spec = specs.SPECS["scalar"]()
    model, guide, args = spec.bind(B)
    params = init_params(spec)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=r"guide = elbo\.wrap_guide\(guide\)"):
        REBAR_ELBO().loss(key, params, model, guide, *args)
    with pytest.raises(ValueError, match=r"guide = elbo\.wrap_guide\(guide\)"):
        RELAX_ELBO(adapt=False).loss(key, params, model, guide, *args)
    with pytest.raises(ValueError, match="eta"):
        REBAR_ELBO(eta=2.5)
    with pytest.raises(ValueError, match="temperature"):
        RELAX_ELBO(temperature=0.0)
    with pytest.raises(ValueError, match="no network for guide site 'b'"):
        elbo = RELAX_ELBO(control_variate={"other": random_net("sbn", "other")})
        elbo.loss(key, params, model, elbo.wrap_guide(guide), *args)


def test_default_network_first_built_under_a_trace():
    """RELAX's default network is first built inside a trace (``jit``,
    ``eval_shape``): its cached initial params stay concrete arrays."""
    spec = specs.SPECS["scalar"]()
    model, guide, args = spec.bind(B)
    elbo = RELAX_ELBO(hidden_size=4)
    wrapped = elbo.wrap_guide(guide)
    params = init_params(spec)
    for _ in range(2):  # the network is built, then the missing adapted values raise
        with pytest.raises(ValueError, match="lack it"):
            jax.eval_shape(
                lambda p: elbo.loss(jax.random.PRNGKey(0), p, model, wrapped, *args), params)
    net, init = elbo._nets["b"]
    assert all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
               for x in jax.tree.leaves(init))
    assert init["hidden"]["w"].shape == (1, 4) and float(jnp.abs(init["out"]["w"]).sum()) == 0
    bound = 1.0  # 1 / sqrt(d), d = 1 for a scalar site
    assert 0 < float(jnp.max(jnp.abs(init["hidden"]["w"]))) <= bound


# ---------------------------------------------------------------------------
# SVI
# ---------------------------------------------------------------------------


def test_svi_trains_the_adapted_parameters_under_jit():
    """``SVI(model, elbo.wrap_guide(guide), optax.adam(...), elbo)`` for REBAR
    and RELAX: 10 jitted updates (one jit) change every ``_bg_*`` param,
    RELAX's output layer included, with finite losses."""
    spec = specs.SPECS["sbn"]()
    model, guide, args = spec.bind(B)
    svis = []
    for elbo in (REBAR_ELBO(), RELAX_ELBO(hidden_size=8)):
        svis.append(SVI(model, elbo.wrap_guide(guide), optax.adam(0.01), elbo))

    def run(key):
        out = []
        for svi in svis:
            state = svi.init(key, *args)
            first = svi.get_params(state)
            state, losses = jax.lax.scan(lambda s, _: svi.update(s, *args), state, None,
                                         length=10)
            out.append((first, svi.get_params(state), losses))
        return out

    for (first, last, losses), svi in zip(fast_jit(run, jax.random.PRNGKey(1)), svis):
        name = type(svi.loss).__name__
        assert np.all(np.isfinite(np.asarray(losses))), name
        adapted = {k for k in first if k.startswith("_bg_")}
        expected = {"_bg_b_temperature", "_bg_b_eta"}
        if name == "RELAX_ELBO":
            expected.add("_bg_b_control_variate")
            assert float(jnp.sum(jnp.abs(last["_bg_b_control_variate"]["out"]["w"]))) > 0
        assert adapted == expected, name
        for k in adapted:
            moved = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)),
                                                 first[k], last[k]))
            assert max(float(m) for m in moved) > 1e-4, (name, k)
