"""
Guide sites with outcomes of probability 0, in both packages: a masked class
(``logits.masked_fill(~mask, -inf)``, the usual way to forbid an action or a
label) and Bernoulli units forced off or on by logits of ``-inf`` / ``+inf``.

Pyro's ``Trace_ELBO`` accepts masked categorical guides (validation on and
off); NumPyro's SVI accepts all of them under ``jit`` (its validation refuses
infinite logits only eagerly). Before ``certain_logits`` the estimators'
arithmetic made NaN of them (``-inf * 0``): every loss was NaN, and several
gradients were NaN or 0 (RLOO's categorical gradient was exactly 0).

Each program (``*_spec(reduced=False)``) has an equivalent one without the
certain outcomes (``reduced=True``: the guide draws only the free units or
classes; the model puts the certain values back, and the certain units'
prior terms are an observed site), with the same ELBO and gradient.

1. Unbiased estimators: the mean of many single-step gradients is within
   5 SE of the exact gradient of the reduced program (enumeration), with
   power against a 10% bias; every loss is finite.
2. Biased estimators (straight-through family): the same expectation as on
   the reduced program (two-sample: the difference of independent batch
   means is within 5 SE of 0, with power against a 10% difference).
3. Logits that give no distribution (NaN, ``+inf`` in a categorical row, a
   row of ``-inf`` only) still raise, naming the site (Pyro with validation
   on and off; NumPyro outside ``jit``).
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import numpyro  # noqa: E402
import pyro  # noqa: E402

import specs  # noqa: E402
import stats  # noqa: E402
import numpyro_binary_grads as nbg  # noqa: E402
import pyro_binary_grads as pbg  # noqa: E402

INF = np.inf


@pytest.fixture(autouse=True)
def _fresh_pyro():
    """As tests/pyro/conftest.py: an empty param store, a fixed seed, float64."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)
    pyro.clear_param_store()

E2 = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])  # 2 free units into 4
E3 = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # 2 free classes into 3


def bernoulli_spec(reduced=False):
    """4 units per data point; unit 2 forced off (-inf), unit 3 forced on (+inf)."""
    N = 2
    x = (np.random.default_rng(7).random((N, 3)) < 0.5).astype(np.float64)
    W = np.random.default_rng(8).uniform(-1.0, 1.0, (4, 3))

    def guide(B, x):
        q = B.param("q_a", np.array([[0.4, -0.3], [-0.2, 0.5]]))
        logits = q if reduced else B.matmul(q, B.asarray(E2)) + B.asarray(np.array([0, 0, -INF, INF]))
        with B.plate("data", N, dim=-1):
            B.sample("b", B.dist.Bernoulli(logits=logits).to_event(1))

    def model(B, x):
        p = B.param("p_prior", np.array([0.2, -0.5, 0.1, 0.3]))
        w = B.param("p_W", W)
        with B.plate("data", N, dim=-1):
            if reduced:
                free = B.take(p, B.asarray(np.array([0, 1])))
                b = B.sample("b", B.dist.Bernoulli(logits=free).to_event(1))
                B.sample("b_certain", B.dist.Bernoulli(logits=B.take(p, B.asarray(np.array([2, 3]))))
                         .to_event(1), obs=B.asarray(np.tile([0.0, 1.0], (N, 1))))
                b = B.matmul(b, B.asarray(E2)) + B.asarray(np.array([0.0, 0.0, 0.0, 1.0]))
            else:
                b = B.sample("b", B.dist.Bernoulli(logits=p).to_event(1))
            B.sample("x", B.dist.Bernoulli(logits=B.matmul(b, w)).to_event(1), obs=x)

    return specs.Spec(f"certain_bernoulli{'_reduced' * reduced}", model, guide, (x,))


def categorical_spec(kind, reduced=False):
    """3 classes, class 2 masked (-inf) in the guide; ``onehot``: in the model
    prior too (the reduced program is then 2-class one-hot throughout),
    ``categorical``: integer values, an unmasked 3-class model prior."""
    N = 2
    y = np.array([0.8, -0.4])
    onehot = kind == "onehot"

    def guide(B, y):
        q = B.param("q_a", np.array([[0.4, -0.3], [-0.6, 0.2]]))
        logits = q if reduced else B.matmul(q, B.asarray(E3)) + B.asarray(np.array([0, 0, -INF]))
        with B.plate("data", N, dim=-1):
            B.sample("c", (B.OneHotCategorical if onehot else B.dist.Categorical)(logits=logits))

    def model(B, y):
        mu = B.param("p_mu", np.array([-1.0, 0.0, 1.0]))
        with B.plate("data", N, dim=-1):
            if onehot:
                p = B.param("p_logits", np.array([0.1, -0.2]))
                logits = p if reduced else B.matmul(p, B.asarray(E3)) + B.asarray(np.array([0, 0, -INF]))
                c = B.sample("c", B.OneHotCategorical(logits=logits))
                v = B.matmul(c, B.asarray(E3)) if reduced else c
            else:
                p = B.param("p_logits", np.array([0.1, 0.0, -0.1]))
                v = B.one_hot(B.sample("c", B.dist.Categorical(logits=p)), 3)
            B.sample("y", B.dist.Normal(B.sum(v * mu, -1), 1.0), obs=y)

    return specs.Spec(f"certain_{kind}{'_reduced' * reduced}", model, guide, (y,))


def make_spec(kind, reduced=False):
    return bernoulli_spec(reduced) if kind == "bernoulli" else categorical_spec(kind, reduced)


# (kind, estimator label): unbiased against the exact ELBO gradient, or against
# the K-sample bound's (VIMCO, LocalDisARM_IWAE)
UNBIASED = {
    "bernoulli": ["ARM_ELBO", "DisARM_ELBO", "RLOO_ELBO", "REBAR_ELBO", "VIMCO", "LocalDisARM_IWAE"],
    "categorical": ["DisARM_ELBO", "RLOO_ELBO", "VIMCO"],
    "onehot": ["DisARM_ELBO", "RLOO_ELBO", "REBAR_ELBO", "VIMCO"],
}
BIASED = {
    "bernoulli": ["ST_ELBO", "GumbelSoftmaxST_ELBO", "ReinMax_ELBO"],
    "onehot": ["ST_ELBO", "GumbelSoftmaxST_ELBO", "ReinMax_ELBO", "ReinMaxRao_ELBO",
               "ReinMaxCV_ELBO", "GumbelRao_ELBO"],
}


def _make(package, label, temperature=None, **kw):
    cls = getattr(package, label)
    if temperature is not None:
        kw["temperature"] = temperature
    if label == "VIMCO":
        return cls(num_samples=2, **kw)
    if label == "LocalDisARM_IWAE":
        return cls(num_pairs=2, **kw)  # the 2-sample bound, as VIMCO's
    if label == "REBAR_ELBO":
        return cls(**{"temperature": 0.5, **kw}, eta=1.0, adapt=False)
    return cls(**kw)


#: draws per batch (30 batches): the Bernoulli program's guide gradients are smaller
PARTICLES = {"bernoulli": 4000, "categorical": 2000, "onehot": 2000}


def _multisample(label):
    return label in ("VIMCO", "LocalDisARM_IWAE")


# ------------------------------------------------------------------------------------------
# NumPyro
# ------------------------------------------------------------------------------------------

def _numpyro_exact(kind, label):
    from numpyro_oracle import exact_iwae_value_and_grads, exact_value_and_grads, init_params
    spec = make_spec(kind, reduced=True)
    params = init_params(spec)
    if _multisample(label):
        _, g = exact_iwae_value_and_grads(spec, params, num_samples=2, loss=True)
    else:
        _, g = exact_value_and_grads(spec, params, loss=True)
    names = sorted(g)
    return names, np.concatenate([np.ravel(g[k]) for k in names]), _labels(g, names)


def _labels(grads, names):
    """One label per flat coordinate: ``name[i,j]``."""
    return [f"{k}[{','.join(map(str, i))}]" if np.ndim(grads[k]) else k
            for k in names for i in np.ndindex(np.shape(grads[k]))]


def _numpyro_draws(labels, spec, names, particles, batches, seed=0, temperature=None):
    """``[(batch means, losses finite)]`` per estimator, all in one jit."""
    from numpyro_oracle import init_params
    B = specs.numpyro_backend()
    model, guide, args = spec.bind(B)
    params = init_params(spec)
    elbos = [_make(nbg, label, temperature) for label in labels]

    def one(key):
        out, losses = [], []
        for elbo in elbos:
            loss, g = jax.value_and_grad(lambda p: elbo.loss(key, p, model, guide, *args))(params)
            out.append(jnp.concatenate([jnp.ravel(g[k]) for k in names]))
            losses.append(loss)
        return jnp.stack(out), jnp.stack(losses)

    @jax.jit
    def run(key):
        keys = jax.random.split(key, batches * particles).reshape(batches, particles, -1)
        g, losses = jax.vmap(jax.vmap(one))(keys)
        return jnp.mean(g, 1), jnp.all(jnp.isfinite(losses), (0, 1))

    key = jax.random.PRNGKey(seed)
    means, finite = run.lower(key).compile(
        compiler_options={"xla_backend_optimization_level": 0})(key)
    return [(np.asarray(means[:, i]), bool(finite[i])) for i in range(len(labels))]


@pytest.mark.parametrize("kind", sorted(UNBIASED))
def test_numpyro_unbiased(kind):
    spec = make_spec(kind)
    labels = UNBIASED[kind]
    exact = {label: _numpyro_exact(kind, label) for label in labels}
    names, _, coords = exact[labels[0]]
    with numpyro.validation_enabled(False):  # (under jit validation never sees values)
        draws = _numpyro_draws(labels, spec, names, PARTICLES[kind], 30)
    for label, (means, finite) in zip(labels, draws):
        assert finite, f"{label}: a non-finite loss"
        result = stats.check_unbiased(means, exact[label][1], names=coords)
        _assert_powerful(f"numpyro {kind} {label}", result, coords)


def _assert_powerful(label, result, coords):
    """Power on the guide coordinates (``q_``): the model's are pathwise, and
    the certain units' prior terms are constants (se 0)."""
    guide = np.array([c.startswith("q_") for c in coords])
    se = np.where(result.se > 0, result.se, np.inf)
    power = np.max((0.1 * np.abs(result.exact) / se)[guide])
    print(f"{label}: max|z| = {result.max_abs_z:.2f}, guide power {power:.1f}")
    assert power >= 8.1, f"{label}: too little power ({power:.2f})"


def _two_sample(label, ours, reduced, names):
    """The difference of independent batch means is within 5 SE of 0, and a
    10% difference from the reduced program's mean would be seen."""
    result = stats.check_unbiased(ours - reduced, np.zeros(ours.shape[1]), names=names)
    guide = np.array([c.startswith("q_") for c in names])
    se = np.where(result.se > 0, result.se, np.inf)
    power = np.max((0.1 * np.abs(reduced.mean(0)) / se)[guide])
    print(f"{label}: max|z| = {result.max_abs_z:.2f}, guide power {power:.1f}")
    assert power >= 8.1, f"{label}: too little power ({power:.2f})"


@pytest.mark.parametrize("kind", sorted(BIASED))
def test_numpyro_biased_as_on_the_reduced_program(kind):
    labels = BIASED[kind]
    names, _, coords = _numpyro_exact(kind, "DisARM_ELBO")
    n = PARTICLES[kind]
    ours = _numpyro_draws(labels, make_spec(kind), names, n, 30, seed=1)
    reduced = _numpyro_draws(labels, make_spec(kind, reduced=True), names, n, 30, seed=2)
    for label, (a, finite), (b, _) in zip(labels, ours, reduced):
        assert finite, f"{label}: a non-finite loss"
        _two_sample(f"numpyro {kind} {label}", a, b, coords)


# ------------------------------------------------------------------------------------------
# Pyro
# ------------------------------------------------------------------------------------------

def _pyro_exact(kind, label):
    from pyro_oracle import exact_iwae_value_and_grads, exact_value_and_grads
    spec = make_spec(kind, reduced=True)
    if _multisample(label):
        _, g = exact_iwae_value_and_grads(spec, num_samples=2, loss=True)
    else:
        _, g = exact_value_and_grads(spec, loss=True)
    names = sorted(g)
    return names, np.concatenate([g[k].flatten() for k in names]), _labels(g, names)


def _pyro_draws(label, spec, names, particles, calls, temperature=None):
    from pyro_oracle import init_params
    from test_unbiased import flat_grads
    init_params(spec)
    model, guide, args = spec.bind(specs.pyro_backend())
    elbo = _make(pbg, label, temperature, num_particles=particles, vectorize_particles=True)
    rows = []
    for _ in range(calls):
        loss = elbo.differentiable_loss(model, guide, *args)
        assert torch.isfinite(loss), f"{label}: loss {loss.item()}"
        rows.append(flat_grads(loss, names))
    return stats.batch_means(np.stack(rows), 30)


#: (kind, estimator, validation): validation on where torch's checks could
#: see the certain logits (each kind once, and the compiled class)
PYRO_UNBIASED = [(k, label, False) for k, labels in UNBIASED.items() for label in labels]
PYRO_UNBIASED += [(k, UNBIASED[k][0], True) for k in UNBIASED]
PYRO_UNBIASED += [("bernoulli", "JitDisARM_ELBO", v) for v in (True, False)]


@pytest.mark.parametrize("kind,label,validate", PYRO_UNBIASED)
def test_pyro_unbiased(kind, label, validate):
    names, exact, coords = _pyro_exact(kind, label)
    with pyro.validation_enabled(validate):
        if label.startswith("Jit"):
            draws = _pyro_jit_draws(label, make_spec(kind), names)
        else:
            draws = _pyro_draws(label, make_spec(kind), names, _pyro_particles(kind, label), 30)
    result = stats.check_unbiased(draws, exact, names=coords)
    _assert_powerful(f"pyro {kind} {label} validation={validate}", result, coords)


def _pyro_particles(kind, label):
    """Bernoulli: 4000 draws per batch for the multi-sample bounds (guide power
    10-12), 1500 for the others (power 18-41; 4000 gave 30-67)."""
    if kind == "bernoulli" and not _multisample(label):
        return 1500
    return PARTICLES[kind]


def _pyro_jit_draws(label, spec, names, calls=300):
    """A compiled class (its trace replayed after the first step), through
    ``loss_and_grads`` as SVI calls it."""
    from pyro_oracle import init_params
    init_params(spec)
    model, guide, args = spec.bind(specs.pyro_backend())
    elbo = getattr(pbg, label)(num_particles=100, vectorize_particles=True)
    store = pyro.get_param_store()
    rows = []
    for _ in range(calls):
        for k in names:
            store[k].unconstrained().grad = None
        loss = elbo.loss_and_grads(model, guide, *args)
        assert np.isfinite(loss), f"{label}: loss {loss}"
        rows.append(np.concatenate([store[k].unconstrained().grad.double().flatten().numpy()
                                    if store[k].unconstrained().grad is not None
                                    else np.zeros(store[k].numel()) for k in names]))
    return stats.batch_means(np.stack(rows), 30)


PYRO_BIASED = [(k, label) for k, labels in BIASED.items() for label in labels]


@pytest.mark.parametrize("kind,label", PYRO_BIASED)
def test_pyro_biased_as_on_the_reduced_program(kind, label):
    names, _, coords = _pyro_exact(kind, "DisARM_ELBO")
    pyro.set_rng_seed(1)
    ours = _pyro_draws(label, make_spec(kind), names, PARTICLES[kind], 30)
    reduced = _pyro_draws(label, make_spec(kind, reduced=True), names, PARTICLES[kind], 30)
    _two_sample(f"pyro {kind} {label}", ours, reduced, coords)


# ------------------------------------------------------------------------------------------
# relaxations at high temperatures: a masked class gets exactly no relaxed mass
# ------------------------------------------------------------------------------------------

#: REBAR temperatures at which exp(-1000 / lambda) is not 0 in float64 (lambda >= 1.35):
#: with the class masked in the model's prior too, a relaxed value with any mass
#: there made the model's log-prob NaN (0 < mass times -inf)
REBAR_HOT = [2.0, 20.0]
#: draws per batch there (30 batches): guide power 28-86 (2000 gave 57-194)
HOT_PARTICLES = 400


@pytest.mark.parametrize("temperature", REBAR_HOT)
def test_numpyro_rebar_at_high_temperature(temperature):
    names, exact, coords = _numpyro_exact("onehot", "REBAR_ELBO")
    (means, finite), = _numpyro_draws(["REBAR_ELBO"], make_spec("onehot"), names,
                                      HOT_PARTICLES, 30, temperature=temperature)
    assert finite, "a non-finite loss"
    result = stats.check_unbiased(means, exact, names=coords)
    _assert_powerful(f"numpyro REBAR temperature {temperature}", result, coords)


@pytest.mark.parametrize("temperature", REBAR_HOT)
def test_pyro_rebar_at_high_temperature(temperature):
    names, exact, coords = _pyro_exact("onehot", "REBAR_ELBO")
    draws = _pyro_draws("REBAR_ELBO", make_spec("onehot"), names, HOT_PARTICLES, 30,
                        temperature=temperature)
    result = stats.check_unbiased(draws, exact, names=coords)
    _assert_powerful(f"pyro REBAR temperature {temperature}", result, coords)


def test_pyro_relax_with_a_random_network():
    """RELAX's network sees 0, not the certain logit, at a masked class: a
    random network at a 1e9 input made the control variate ~1e8 (unbiased,
    but no signal left in its variance)."""
    from pyro_oracle import init_params
    from test_relaxed import draws_of
    names, exact, coords = _pyro_exact("onehot", "REBAR_ELBO")
    spec = make_spec("onehot")
    init_params(spec)
    elbo = pbg.RELAX_ELBO(num_particles=HOT_PARTICLES, vectorize_particles=True,
                          temperature=2.0, adapt=False, hidden_size=16)
    result = stats.check_unbiased(draws_of(elbo, spec, names, relax_std=0.1), exact,
                                  names=coords)
    _assert_powerful("pyro RELAX temperature 2.0", result, coords)


def test_numpyro_relax_with_a_random_network():
    """As the Pyro test: a fixed random network (the default architecture,
    output layer ~ N(0, 0.1^2), as tests/numpyro/test_numpyro_relaxed.py)."""
    from numpyro_oracle import init_params
    names, exact, coords = _numpyro_exact("onehot", "REBAR_ELBO")
    spec = make_spec("onehot")
    from numpyro_binary_grads.relax import ControlVariateNet
    net = ControlVariateNet(3, 16, 1)
    w = 0.1 * jax.random.normal(jax.random.PRNGKey(3), (16, 1))
    rho = dict(net.init_params(), out={"w": w, "b": jnp.full((1,), 0.05)})
    elbo = nbg.RELAX_ELBO(control_variate=(net, rho), temperature=2.0, adapt=False)
    model, guide, args = spec.bind(specs.numpyro_backend())
    guide = elbo.wrap_guide(guide)
    params = dict(init_params(spec), _bg_c_control_variate=rho)

    def one(key):
        g = jax.grad(lambda p: elbo.loss(key, p, model, guide, *args))(params)
        return jnp.concatenate([jnp.ravel(g[k]) for k in names])

    keys = jax.random.split(jax.random.PRNGKey(0), 30 * HOT_PARTICLES)
    means = jax.jit(jax.vmap(one))(keys).reshape(30, HOT_PARTICLES, -1).mean(1)
    result = stats.check_unbiased(np.asarray(means), exact, names=coords)
    _assert_powerful("numpyro RELAX temperature 2.0", result, coords)


#: straight-through estimators at temperatures where the masked class's soft
#: weight exp(-1000 / tau) was not 0: its -log q term (about 1000) leaked into
#: the free classes through the softmax Jacobian (ST_ELBO at tau = 1000: a q
#: gradient of -0.021 against the program without the class's 0.002)
ST_HOT = [("ST_ELBO", 1000.0), ("GumbelSoftmaxST_ELBO", 300.0), ("ReinMax_ELBO", 1000.0)]
#: the largest standard error of the difference allowed on a guide coordinate:
#: the leak measured above (0.023) is then more than 5 SE
ST_HOT_SE = 0.0045


def _two_sample_absolute(label, ours, reduced, names):
    result = stats.check_unbiased(ours - reduced, np.zeros(ours.shape[1]), names=names)
    guide = np.array([c.startswith("q_") for c in names])
    print(f"{label}: max|z| = {result.max_abs_z:.2f}, guide se {result.se[guide].max():.2g}")
    assert result.se[guide].max() <= ST_HOT_SE, f"{label}: too little power"


@pytest.mark.parametrize("label,temperature", ST_HOT)
def test_numpyro_straight_through_at_high_temperature(label, temperature):
    names, _, coords = _numpyro_exact("onehot", "DisARM_ELBO")
    n = PARTICLES["onehot"]
    (a, finite), = _numpyro_draws([label], make_spec("onehot"), names, n, 30, seed=1,
                                  temperature=temperature)
    (b, _), = _numpyro_draws([label], make_spec("onehot", reduced=True), names, n, 30, seed=2,
                             temperature=temperature)
    assert finite, "a non-finite loss"
    _two_sample_absolute(f"numpyro {label} temperature {temperature}", a, b, coords)


@pytest.mark.parametrize("label,temperature", ST_HOT)
def test_pyro_straight_through_at_high_temperature(label, temperature):
    names, _, coords = _pyro_exact("onehot", "DisARM_ELBO")
    n = PARTICLES["onehot"]
    pyro.set_rng_seed(1)
    a = _pyro_draws(label, make_spec("onehot"), names, n, 30, temperature=temperature)
    b = _pyro_draws(label, make_spec("onehot", reduced=True), names, n, 30,
                    temperature=temperature)
    _two_sample_absolute(f"pyro {label} temperature {temperature}", a, b, coords)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_relaxed_mass_of_a_masked_class_is_exactly_zero(dtype):
    """At every temperature up to 1e5 and the most extreme Gumbel draw, in both
    packages: the relaxations see the masked class's logit at ``CERTAIN_FAR``."""
    from numpyro_binary_grads.structure import certain_logits as np_certain
    from pyro_binary_grads.structure import certain_logits as pt_certain
    a = np.array([[0.3, -INF, -0.2], [5.0, 2.0, -INF]], dtype=dtype)
    g = -np.log(-np.log(_extreme_uniforms(dtype)))  # the smallest and largest Gumbel
    for alpha in (np.asarray(np_certain(jnp.asarray(a), "onehot")),
                  pt_certain(torch.tensor(a), "onehot").numpy()):
        assert alpha.dtype == np.dtype(dtype) and np.all(np.isfinite(alpha))
        for tau in (0.5, 20.0, 1000.0, 1e5):
            z = (alpha + g[[1, 0, 1]]) / tau  # the masked class at its largest Gumbel
            y = np.asarray(jax.nn.softmax(jnp.asarray(z), -1))
            assert np.all(y[np.isinf(a)] == 0.0), (tau, y)
    for alpha in (np.asarray(np_certain(jnp.asarray([-INF, INF], dtype=dtype), "bernoulli")),
                  pt_certain(torch.tensor([-INF, INF], dtype=getattr(torch, dtype)),
                             "bernoulli").numpy()):
        logistic = np.log(_extreme_uniforms(dtype)) - np.log1p(-_extreme_uniforms(dtype))
        for tau in (0.5, 20.0, 1000.0, 1e5):
            with np.errstate(over="ignore"):  # exp(1e9 / tau): inf, the sigmoid 0
                lo = 1 / (1 + np.exp(-(alpha[0] - logistic[0]) / tau))
                hi = 1 / (1 + np.exp(-(alpha[1] - logistic[1]) / tau))
            assert lo == 0.0 and hi == 1.0, (tau, lo, hi)


# ------------------------------------------------------------------------------------------
# logits that give no distribution still raise
# ------------------------------------------------------------------------------------------

BAD = {
    "bernoulli NaN": ("bernoulli", [0.3, np.nan, 0.2]),
    "categorical +inf": ("categorical", [[0.3, INF, 0.0]]),
    "categorical row of -inf": ("categorical", [[0.3, 0.1, 0.0], [-INF, -INF, -INF]]),
    "one-hot row of -inf": ("onehot", [[-INF, -INF, -INF]]),
}


def _bad_program(B, kind, logits):
    logits = np.asarray(logits, dtype=np.float64)

    def guide():
        a = B.asarray(logits)
        with B.plate("data", logits.shape[0], dim=-1):
            if kind == "bernoulli":
                B.sample("z", B.dist.Bernoulli(logits=a))
            else:
                B.sample("z", (B.OneHotCategorical if kind == "onehot" else B.dist.Categorical)(
                    logits=a))

    def model():
        with B.plate("data", logits.shape[0], dim=-1):
            if kind == "bernoulli":
                B.sample("z", B.dist.Bernoulli(logits=B.zeros(logits.shape)))
            elif kind == "onehot":
                B.sample("z", B.OneHotCategorical(logits=B.zeros(logits.shape)))
            else:
                B.sample("z", B.dist.Categorical(logits=B.zeros(logits.shape)))

    return model, guide


@pytest.mark.parametrize("validate", [True, False], ids=["validation", "no-validation"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_pyro_logits_without_a_distribution_raise(case, validate):
    kind, logits = BAD[case]
    model, guide = _bad_program(specs.pyro_backend(), kind, logits)
    with pyro.validation_enabled(validate):
        with pytest.raises(ValueError, match="Guide site 'z' has NaN or infinite logits"):
            pbg.RLOO_ELBO().differentiable_loss(model, guide)


@pytest.mark.parametrize("case", sorted(BAD))
def test_numpyro_logits_without_a_distribution_raise(case):
    kind, logits = BAD[case]
    model, guide = _bad_program(specs.numpyro_backend(), kind, logits)
    with numpyro.validation_enabled(False):
        with pytest.raises(ValueError, match="Guide site 'z' has NaN or infinite logits"):
            nbg.RLOO_ELBO().loss(jax.random.PRNGKey(0), {}, model, guide)


def test_numpyro_accepts_them_with_validation_on_too():
    """NumPyro's validation refuses infinite logits where it sees values (eagerly);
    our evaluations run with validation off (as documented), as SVI's jitted
    step does, so the result is the same with validation on."""
    B = specs.numpyro_backend()
    model, guide, args = make_spec("onehot").bind(B)
    from numpyro_oracle import init_params
    params = init_params(make_spec("onehot"))
    values = []
    for validate in (True, False):
        with numpyro.validation_enabled(validate):
            values.append(float(nbg.DisARM_ELBO().loss(jax.random.PRNGKey(3), params, model,
                                                       guide, *args)))
    assert np.isfinite(values[0]) and values[0] == values[1]


# ------------------------------------------------------------------------------------------
# probs of exactly 0 or 1: never drawn, as the frameworks' samplers never draw them
# ------------------------------------------------------------------------------------------

def _extreme_uniforms(dtype):
    """The smallest and the largest uniform either package's noise can hold."""
    info = np.finfo(dtype)
    return np.array([info.tiny, 1.0 - info.epsneg], dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pyro_probs_of_zero_or_one_are_never_drawn(dtype):
    """torch's ``probs_to_logits`` clamps a probability of 0 to ``eps``: a
    logit of -15.9 in float32, drawn with probability 1.2e-7 by a logistic or
    Gumbel draw (a model with -inf there then gives NaN), though Pyro's
    sampler never draws it. At the most extreme uniforms the estimators'
    draws keep to the support."""
    from pyro_binary_grads.estimators import bernoulli_value
    from pyro_binary_grads.noise import categorical_value
    from pyro_binary_grads.structure import site_logits
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    lo, hi = torch.as_tensor(_extreme_uniforms(dtype))
    b = pyro.distributions.Bernoulli(probs=torch.tensor([0.0, 1.0], dtype=tdtype))
    alpha = site_logits(b)
    for u in (lo, hi):
        assert bernoulli_value(u.expand(2), alpha).tolist() == [0.0, 1.0]
    for cls in (pyro.distributions.Categorical, pyro.distributions.OneHotCategorical):
        c = cls(probs=torch.tensor([0.0, 0.5, 0.5], dtype=tdtype))
        alpha = site_logits(c)
        u = torch.stack([hi, lo, lo])  # the largest Gumbel for the class of probability 0
        assert categorical_value(u, alpha, one_hot=False).item() != 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpyro_probs_of_zero_or_one_are_never_drawn(dtype):
    """As above: NumPyro's ``BernoulliProbs.logits`` clamps too (its
    categorical logits are ``log(probs)``, -inf at 0)."""
    from numpyro_binary_grads.estimators import bernoulli_value
    from numpyro_binary_grads.noise import _categorical_value
    from numpyro_binary_grads.structure import site_logits
    lo, hi = jnp.asarray(_extreme_uniforms(dtype))
    b = numpyro.distributions.Bernoulli(probs=jnp.array([0.0, 1.0], dtype=dtype))
    alpha = site_logits(b, "bernoulli", (2,))
    for u in (lo, hi):
        assert bernoulli_value(jnp.broadcast_to(u, (2,)), alpha).tolist() == [0.0, 1.0]
    c = numpyro.distributions.Categorical(probs=jnp.array([0.0, 0.5, 0.5], dtype=dtype))
    alpha = site_logits(c, "categorical", ())
    assert int(_categorical_value(jnp.stack([hi, lo, lo]), alpha, False)) != 0


# ------------------------------------------------------------------------------------------
# the diagnostics' exact ELBO: configurations of probability 0 count 0, not NaN
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bernoulli", "categorical", "onehot"])
def test_exact_elbo_equals_the_reduced_programs(kind):
    """``exact_elbo`` of each program equals the reduced program's (value and
    gradient, both packages), which has no outcomes of probability 0."""
    from numpyro_oracle import init_params
    from pyro_oracle import init_params as pyro_init
    from numpyro_binary_grads.diagnostics import exact_elbo as numpyro_exact_elbo
    from pyro_binary_grads.diagnostics import exact_elbo as pyro_exact_elbo
    spec, reduced = make_spec(kind), make_spec(kind, reduced=True)
    B = specs.numpyro_backend()
    params = init_params(reduced)
    got = [jax.jit(jax.value_and_grad(
        lambda p, s=s: numpyro_exact_elbo(p, *s.bind(B)[:2], *s.bind(B)[2])))(params)
        for s in (spec, reduced)]
    assert np.isfinite(float(got[0][0]))
    np.testing.assert_allclose(float(got[0][0]), float(got[1][0]), rtol=1e-12)
    for k in params:
        np.testing.assert_allclose(got[0][1][k], got[1][1][k], rtol=1e-10, atol=1e-12)
    torch_got = []
    for s in (spec, reduced):
        pyro.clear_param_store()
        pyro_init(s)
        model, guide, args = s.bind(specs.pyro_backend())
        value = pyro_exact_elbo(model, guide, *args)
        store = pyro.get_param_store()
        grads = torch.autograd.grad(value, [store[k].unconstrained() for k in sorted(store)],
                                    allow_unused=True)
        torch_got.append((value.item(), grads))
    assert np.isfinite(torch_got[0][0])
    np.testing.assert_allclose(torch_got[0][0], torch_got[1][0], rtol=1e-12)
    np.testing.assert_allclose(torch_got[0][0], float(got[1][0]), rtol=1e-10)
    for a, b in zip(torch_got[0][1], torch_got[1][1]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)


def test_float16_logits_stay_finite():
    """float16 (largest value 65504) puts certain logits at 4094, not 1e9
    (which overflowed to -inf and then raised, or gave NaN under jit)."""
    from numpyro_binary_grads.structure import certain_logits as np_certain
    from pyro_binary_grads.structure import certain_logits as pt_certain
    a = np.array([[0.5, 0.0, -INF]], dtype=np.float16)
    for kind in ("onehot", "bernoulli"):
        for alpha in (np.asarray(np_certain(jnp.asarray(a), kind)),
                      pt_certain(torch.tensor(a), kind).numpy()):
            assert alpha.dtype == np.float16 and np.all(np.isfinite(alpha)), alpha

    def guide():
        q = pyro.param("q", torch.zeros(3, dtype=torch.float16))
        pyro.sample("c", pbg.OneHotCategorical(logits=q + torch.tensor(a[0])))

    def model():
        c = pyro.sample("c", pbg.OneHotCategorical(logits=torch.zeros(3, dtype=torch.float16)))
        pyro.sample("y", pyro.distributions.Normal((c * torch.arange(3.0).half()).sum(),
                                                   torch.tensor(1.0).half()),
                    obs=torch.tensor(0.5).half())

    for cls in (pbg.DisARM_ELBO, pbg.RLOO_ELBO, pbg.ST_ELBO):
        pyro.clear_param_store()
        assert torch.isfinite(cls().differentiable_loss(model, guide)), cls.__name__
