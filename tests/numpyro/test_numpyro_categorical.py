"""
The straight-through family for OneHotCategorical guide sites
(numpyro_binary_grads.categorical), mirroring tests/pyro/test_categorical.py.

1. Each estimator equals its defining formula (ESTIMATORS.md section 7),
   evaluated by hand in numpy on a tiny model for fixed noise (1e-10, float64),
   under jit, vmapped over noise draws.
2. Known limits: ST at tau = 1 is unbiased for f linear in D; ReinMax tends to
   its tau -> infinity limit; Gumbel-Rao with K = 1 is ST-Gumbel-softmax for
   the same noise, and E[GR] = E[ST-GS] (statistically, common noise).
3. The bias of each against the exact gradient is printed (not asserted).
4. Gradient variance of ReinMax-Rao and ReinMax-CV against ReinMax (ratio
   printed; see the tests for what is asserted).
5. Pyro and NumPyro give the same gradients for the same model, sample and
   noise (1e-10).

Statistical checks: ``jax.grad`` of ``elbo.loss`` vmapped over keys, one jit.
"""

import jax

jax.config.update("jax_enable_x64", True)

import contextlib  # noqa: E402
import functools  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import numpyro  # noqa: E402

import specs  # noqa: E402
import stats  # noqa: E402
from numpyro_oracle import exact_value_and_grads, init_params  # noqa: E402
import numpyro_binary_grads as npg  # noqa: E402
from numpyro_binary_grads import (  # noqa: E402
    GumbelRao_ELBO,
    GumbelSoftmaxST_ELBO,
    OneHotCategorical,
    ReinMax_ELBO,
    ReinMaxCV_ELBO,
    ReinMaxRao_ELBO,
    RLOO_ELBO,
    ST_ELBO,
)

B = specs.numpyro_backend()
FAST_COMPILE = {"xla_backend_optimization_level": 0}

K = 4
A0 = np.array([[0.5, -0.3, 1.0, -1.2], [-0.4, 0.8, 0.1, 0.3]])
P0 = np.array([0.2, -0.1, 0.0, 0.3])
W0 = np.array([1.0, -1.0, 0.5, 2.0])
Y = np.array([0.3, 1.2])


def fast_jit(fn, *args):
    """``jax.jit(fn)`` compiled with XLA's backend optimisations off, run on ``args``."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


# ---------------------------------------------------------------------------
# the tiny model: two plate elements, one OneHotCategorical site each
#   f(D) = sum_n [D_n . log_softmax(p) + log N(y_n; D_n . w, 1) - D_n . log_softmax(a_n)]
# written against a backend B, so the same spec builds a Pyro and a NumPyro model
# ---------------------------------------------------------------------------


def _framework(B):
    """(OneHotCategorical, factor) of the backend's framework."""
    if B.name == "pyro":
        import pyro
        import pyro_binary_grads
        return pyro_binary_grads.OneHotCategorical, pyro.factor
    return OneHotCategorical, numpyro.factor


def tiny(linear=False, n=2, a0=A0):
    """``linear=True`` replaces the Gaussian likelihood by the factor D . w."""

    def guide(B, y):
        onehot, _ = _framework(B)
        a = B.param("q_a", a0)
        with B.plate("data", n, dim=-1):
            B.sample("z", onehot(logits=a))

    def model(B, y):
        onehot, factor = _framework(B)
        p = B.param("p_logits", P0)
        w = B.param("p_w", W0)
        with B.plate("data", n, dim=-1):
            z = B.sample("z", onehot(logits=p))
            if linear:
                factor("lin", B.sum(z * w, -1))
            else:
                B.sample("y", B.dist.Normal(B.sum(z * w, -1), 1.0), obs=y)

    y = np.resize(Y, n)
    return specs.Spec("tiny_onehot", model, guide, (y,), doc="one-hot site in a plate")


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def J(p):
    return np.diag(p) - np.outer(p, p)


def cond_gumbel(a, k, v):
    """ESTIMATORS.md section 5 (z~ ~ (a + G | argmax = k))."""
    E = -np.log(v)
    zk = np.log(np.exp(a).sum()) - np.log(E[k])
    zt = -np.log(E * np.exp(-a) + np.exp(-zk))
    zt[k] = zk
    return zt


def hand_gradient(matrix, u, linear=False):
    """
    The loss gradient (-ELBO) w.r.t. the guide logits ``a`` for fixed
    uniforms ``u`` (2, K): ``-(M_n^T g_D[n] - (D_n - pi_n))`` with
    ``M_n = matrix(n, alpha_n, G_n, D_n)`` the estimator's Jacobian.
    Returns (gradient, D).
    """
    G = -np.log(-np.log(u))
    grads, Ds = [], []
    for n in range(A0.shape[0]):
        a = A0[n]
        D = np.eye(K)[np.argmax(a + G[n])]
        pi = softmax(a)
        if linear:
            gD = log_softmax(P0) + W0 - log_softmax(a)
        else:
            gD = log_softmax(P0) + (Y[n] - D @ W0) * W0 - log_softmax(a)
        M = matrix(n, a, G[n], D)
        grads.append(-(M.T @ gD - (D - pi)))
        Ds.append(D)
    return np.array(grads), np.array(Ds)


def elbo_gradients(runs, spec):
    """For each ``(elbo, u, v)`` of ``runs``: (loss, d loss / d q_a, d loss / d p_w)
    of one step per row of the injected noise ``u`` (R, 2, K) (and extra noise
    ``v`` (R, num, 2, K) or None), vmapped over the rows; all runs under one jit."""
    model, guide, args = spec.bind(B)
    params = init_params(spec)
    key = jax.random.PRNGKey(0)

    def one(elbo, u, v):
        elbo._noise = {"z": u}
        elbo._extra_noise = None if v is None else {"z": v}
        try:
            loss, g = jax.value_and_grad(
                lambda p: elbo.loss(key, p, model, guide, *args))(params)
        finally:
            elbo._noise = elbo._extra_noise = None
        return loss, g["q_a"], g["p_w"]

    def everything(noise):
        return [jax.vmap(functools.partial(one, elbo))(u, v)
                for (elbo, _, _), (u, v) in zip(runs, noise)]

    noise = [(jnp.asarray(u), None if v is None else jnp.asarray(v)) for _, u, v in runs]
    out = fast_jit(everything, noise)
    return [tuple(np.asarray(x) for x in o) for o in out]


def draw_noise(rng, num_extra, rows=3):
    u = rng.uniform(size=(rows, 2, K))
    v = rng.uniform(size=(rows, num_extra, 2, K))
    return u, v


# ---------------------------------------------------------------------------
# 1. each estimator equals its formula
# ---------------------------------------------------------------------------


def st_matrix(tau):
    return lambda n, a, G, D: J(softmax(a / tau)) / tau


def stgs_matrix(lam):
    return lambda n, a, G, D: J(softmax((a + G) / lam)) / lam


def gr_matrix(lam, v):
    def matrix(n, a, G, D):
        k = int(np.argmax(D))
        zs = [a + G] + [cond_gumbel(a, k, v[j, n]) for j in range(v.shape[0])]
        return np.mean([J(softmax(z / lam)) for z in zs], 0) / lam
    return matrix


def reinmax_matrix(tau):
    def matrix(n, a, G, D):
        half = 0.5 * (softmax(a / tau) + D)
        return 2 * J(half) - 0.5 * J(softmax(a))
    return matrix


def jbar_gr(a, D, tau, v, n):
    theta = np.log(0.5 * (softmax(a) + D))
    k = int(np.argmax(D))
    zs = [cond_gumbel(theta, k, v[j, n]) for j in range(v.shape[0])]
    return np.mean([J(softmax(z / tau)) for z in zs], 0) / tau, theta


def rao_matrix(tau, v):
    def matrix(n, a, G, D):
        jbar, _ = jbar_gr(a, D, tau, v, n)
        return 2 * jbar - 0.5 * J(softmax(a))
    return matrix


def cv_matrix(tau, eta, v):
    """ReinMax-CV as the authors' code (reinmax_jacobians.py, reinmax_cv): the
    Gumbel-softmax term at theta_D + S, S = softmax((a + G) / tau) the forward
    soft sample, temperature 1 inside, divided by tau. v: K conditional draws."""
    def matrix(n, a, G, D):
        jbar, theta = jbar_gr(a, D, tau, v, n)
        S = softmax((a + G) / tau)
        jgs = J(softmax(theta + S)) / tau
        return reinmax_matrix(1.0)(n, a, G, D) + eta * (jbar - jgs)
    return matrix


def cv_fresh_matrix(tau, eta, v):
    """Our form (form="fresh"): v: K conditional draws, then the uniforms of
    the unconditional G'."""
    def matrix(n, a, G, D):
        jbar, theta = jbar_gr(a, D, tau, v[:-1], n)
        Gp = -np.log(-np.log(v[-1, n]))
        jgs = J(softmax((theta + Gp) / tau)) / tau
        return reinmax_matrix(1.0)(n, a, G, D) + eta * (jbar - jgs)
    return matrix


CASES = [
    # (label, class name, kwargs, number of extra uniform draws, matrix factory(v))
    ("ST tau=1", "ST_ELBO", {}, 0, lambda v: st_matrix(1.0)),
    ("ST tau=2.5", "ST_ELBO", dict(temperature=2.5), 0, lambda v: st_matrix(2.5)),
    ("ST-GS lam=0.5", "GumbelSoftmaxST_ELBO", dict(temperature=0.5), 0,
     lambda v: stgs_matrix(0.5)),
    ("GR lam=0.5 K=5", "GumbelRao_ELBO", dict(temperature=0.5, num_samples=5), 4,
     lambda v: gr_matrix(0.5, v)),
    ("GR lam=1 K=2", "GumbelRao_ELBO", dict(num_samples=2), 1, lambda v: gr_matrix(1.0, v)),
    ("ReinMax tau=1", "ReinMax_ELBO", {}, 0, lambda v: reinmax_matrix(1.0)),
    ("ReinMax tau=3", "ReinMax_ELBO", dict(temperature=3.0), 0, lambda v: reinmax_matrix(3.0)),
    ("ReinMax-Rao tau=1 K=3", "ReinMaxRao_ELBO", dict(num_samples=3), 3,
     lambda v: rao_matrix(1.0, v)),
    ("ReinMax-Rao tau=0.5 K=4", "ReinMaxRao_ELBO", dict(temperature=0.5, num_samples=4), 4,
     lambda v: rao_matrix(0.5, v)),
    ("ReinMax-CV tau=1 eta=1.5 K=3", "ReinMaxCV_ELBO", dict(eta=1.5, num_samples=3), 3,
     lambda v: cv_matrix(1.0, 1.5, v)),
    ("ReinMax-CV tau=1.3 eta=0.7 K=2", "ReinMaxCV_ELBO",
     dict(temperature=1.3, eta=0.7, num_samples=2), 2, lambda v: cv_matrix(1.3, 0.7, v)),
    ("ReinMax-CV fresh tau=0.5 eta=0.7 K=2", "ReinMaxCV_ELBO",
     dict(temperature=0.5, eta=0.7, num_samples=2, form="fresh"), 3,
     lambda v: cv_fresh_matrix(0.5, 0.7, v)),
]


@functools.lru_cache(maxsize=None)
def formula_runs():
    """{(label, vectorize): (u, v, (losses, d q_a, d p_w))} of every case, three
    noise draws each, both values of ``vectorize``: one jit for all."""
    rng = np.random.default_rng(11)
    keys, runs = [], []
    for label, cls, kw, num_extra, _ in CASES:
        u, v = draw_noise(rng, num_extra)
        for vectorize in (True, False):
            keys.append((label, vectorize))
            runs.append((getattr(npg, cls)(vectorize=vectorize, **kw), u,
                         v if num_extra else None))
    out = elbo_gradients(runs, tiny())
    return {k: (u, v, o) for k, (_, u, v), o in zip(keys, runs, out)}


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("label,cls,kw,num_extra,matrix", CASES, ids=[c[0] for c in CASES])
def test_equals_formula(label, cls, kw, num_extra, matrix, vectorize):
    u, v, (losses, gas, gws) = formula_runs()[label, vectorize]
    for r in range(u.shape[0]):
        expected, D = hand_gradient(matrix(None if v is None else v[r]), u[r])
        np.testing.assert_allclose(gas[r], expected, rtol=0, atol=1e-10, err_msg=label)
        # model parameters: pathwise at the hard sample, -sum_n (y_n - D_n.w) D_n
        np.testing.assert_allclose(gws[r], -((Y - D @ W0)[:, None] * D).sum(0), atol=1e-10)
        # the value is the single-sample ELBO at the hard sample
        f = (D @ log_softmax(P0) - 0.5 * (Y - D @ W0) ** 2 - 0.5 * np.log(2 * np.pi)
             - (D * log_softmax(A0)).sum(-1)).sum()
        assert abs(losses[r] + f) < 1e-10


def test_categorical_site_error_points_to_one_hot():
    spec = specs.SPECS["categorical"]()
    params = init_params(spec)
    model, guide, args = spec.bind(B)
    key = jax.random.PRNGKey(0)
    for cls in (ST_ELBO, GumbelSoftmaxST_ELBO, GumbelRao_ELBO, ReinMax_ELBO,
                ReinMaxRao_ELBO, ReinMaxCV_ELBO):
        with pytest.raises(NotImplementedError, match="OneHotCategorical") as info:
            jax.jit(lambda p: cls().loss(key, p, model, guide, *args))(params)
        assert "'c1'" in str(info.value) and "Categorical (integer-valued)" in str(info.value)
        assert "RLOO_ELBO" in str(info.value)


@pytest.mark.parametrize(
    "name,tau", [("ST_ELBO", 1.0), ("ST_ELBO", 2.0), ("GumbelSoftmaxST_ELBO", 0.5),
                 ("ReinMax_ELBO", 1.0), ("ReinMax_ELBO", 2.0)],
)
def test_bernoulli_two_class_forms(name, tau):
    """Bernoulli sites as two classes equal the Bernoulli formulas of
    ESTIMATORS.md section 7 (as the Pyro test), times df/db, plus the explicit
    -log q term."""
    import numpyro.distributions as dist

    w = jnp.array([0.9, -0.5, 0.7])

    def model():
        b = numpyro.sample("b", dist.Bernoulli(logits=jnp.zeros(3)).to_event(1))
        numpyro.factor("f", ((b * w).sum() - 0.6) ** 2)

    def guide():
        a = numpyro.param("a", jnp.array([0.4, -0.8, 1.1]))
        numpyro.sample("b", dist.Bernoulli(logits=a).to_event(1))

    u = jnp.array([0.3, 0.7, 0.2])
    elbo = getattr(npg, name)(temperature=tau)
    elbo._noise = {"b": u}
    params = {"a": jnp.array([0.4, -0.8, 1.1])}
    grad = jax.grad(lambda p: elbo.loss(jax.random.PRNGKey(0), p, model, guide))(params)["a"]
    a, sig = params["a"], jax.nn.sigmoid
    b = (jnp.log(u) - jnp.log1p(-u) < a).astype(a.dtype)
    g_b = 2 * ((b * w).sum() - 0.6) * w - a
    if name == "ST_ELBO":
        slope = sig(a / tau) * sig(-a / tau) / tau
    elif name == "GumbelSoftmaxST_ELBO":
        z = a + jnp.log(u) - jnp.log1p(-u)
        slope = sig(z / tau) * sig(-z / tau) / tau
    else:
        m, p = 0.5 * (sig(a / tau) + b), sig(a)
        slope = 2 * m * (1 - m) - 0.5 * p * (1 - p)
    expected = -(slope * g_b) + (b - sig(a))
    assert jnp.abs(grad - expected).max() < 1e-10


def test_bernoulli_refused_where_no_two_class_form_is_defined():
    spec = specs.SPECS["scalar"]()
    params = init_params(spec)
    model, guide, args = spec.bind(B)
    with pytest.raises(NotImplementedError, match="handles OneHotCategorical"):
        GumbelRao_ELBO().loss(jax.random.PRNGKey(0), params, model, guide, *args)


def test_argument_errors():
    with pytest.raises(ValueError, match="temperature >= 1"):
        ReinMax_ELBO(temperature=0.5)
    with pytest.raises(ValueError, match=r"finite temperature in \(0"):
        GumbelSoftmaxST_ELBO(temperature=0.0)
    # string and other non-numeric arguments name the argument (issue 17)
    with pytest.raises(ValueError, match="ST_ELBO needs a number for temperature, got '1.0'"):
        ST_ELBO(temperature="1.0")
    with pytest.raises(ValueError, match="GumbelRao_ELBO needs an integer num_samples"):
        GumbelRao_ELBO(num_samples="10")
    with pytest.raises(ValueError, match="ReinMaxCV_ELBO needs a number for eta"):
        ReinMaxCV_ELBO(eta=None)
    with pytest.raises(ValueError, match="num_samples >= 1"):
        GumbelRao_ELBO(num_samples=0)
    with pytest.raises(ValueError, match="num_samples >= 1"):
        ReinMaxCV_ELBO(num_samples=0)
    with pytest.raises(ValueError, match="finite eta"):
        ReinMaxCV_ELBO(eta=float("nan"))
    with pytest.raises(ValueError, match="form must be one of"):
        ReinMaxCV_ELBO(form="author")
    assert (ReinMaxCV_ELBO().form, ReinMaxCV_ELBO().num_samples) == ("authors", 100)
    with pytest.raises(TypeError):
        ST_ELBO(1, True, 2.0)  # estimator arguments are keyword-only
    elbo = ReinMaxCV_ELBO(2, False, temperature=0.5, eta=0.3, num_samples=4, vectorize=False)
    assert (elbo.num_particles, elbo.vectorize_particles, elbo.vectorize) == (2, False, False)
    assert (elbo.temperature, elbo.eta, elbo.num_samples) == (0.5, 0.3, 4)
    assert issubclass(ReinMaxCV_ELBO, numpyro.infer.elbo.ELBO) and elbo.can_infer_discrete


def test_extra_noise_shape_error():
    spec = tiny()
    model, guide, args = spec.bind(B)
    elbo = GumbelRao_ELBO(num_samples=3)
    elbo._extra_noise = {"z": jnp.full((1, 2, K), 0.5)}
    with pytest.raises(ValueError, match="Extra noise for site 'z'"):
        jax.eval_shape(lambda p: elbo.loss(jax.random.PRNGKey(0), p, model, guide, *args),
                       init_params(spec))


# ---------------------------------------------------------------------------
# 2. known limits
# ---------------------------------------------------------------------------


def test_reinmax_large_temperature_limit():
    """tau -> inf: softmax(alpha/tau) -> uniform, so the estimate tends to
    2 J((1/K + D)/2) g_D - 1/2 J(pi) g_D (ESTIMATORS.md section 7, Limits)."""
    rng = np.random.default_rng(2)
    spec = tiny()

    def limit(n, a, G, D):
        return 2 * J(0.5 * (np.full(K, 1.0 / K) + D)) - 0.5 * J(softmax(a))

    u, _ = draw_noise(rng, 0)
    taus = (1e2, 1e4, 1e6)
    out = elbo_gradients([(ReinMax_ELBO(temperature=tau), u, None) for tau in taus], spec)
    errors = [[np.abs(ga[r] - hand_gradient(limit, u[r])[0]).max() for r in range(len(u))]
              for _, ga, _ in out]
    errors = np.array(errors)  # (tau, draw)
    print(f"ReinMax distance to the tau -> inf limit at tau = 1e2, 1e4, 1e6: "
          f"{errors.max(1)}")
    assert np.all(errors[2] < 1e-5)
    assert np.all(errors[0] > errors[1]) and np.all(errors[1] > errors[2])


def test_gumbel_rao_one_sample_is_st_gumbel_softmax():
    rng = np.random.default_rng(3)
    spec = tiny()
    for lam in (0.3, 1.0):
        u, _ = draw_noise(rng, 0)
        a, b = elbo_gradients([(GumbelRao_ELBO(temperature=lam, num_samples=1), u, None),
                               (GumbelSoftmaxST_ELBO(temperature=lam), u, None)], spec)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-12)
        np.testing.assert_allclose(a[2], b[2], rtol=0, atol=1e-12)


def flat(g, names):
    return jnp.concatenate([jnp.ravel(g[k]) for k in names])


def gradient_draws(elbos, spec, particles, batches, *, noise_from_key=False, seed=0):
    """For each ELBO (all on the same keys): ``(batches, dim)`` batch means of
    ``particles`` single-step loss gradients (flattened over the sorted param
    names), ``jax.grad`` vmapped over keys under one jit. With
    ``noise_from_key`` the sample's uniforms are drawn from the key and
    injected (``elbo._noise``), so that all ELBOs share the sample's noise."""
    model, guide, args = spec.bind(B)
    params = init_params(spec)
    names = sorted(params)

    def one(key):
        out = []
        for elbo in elbos:
            if noise_from_key:
                elbo._noise = {"z": jax.random.uniform(
                    jax.random.fold_in(key, 7), (2, K), minval=1e-300)}
            try:
                g = jax.grad(lambda p: elbo.loss(key, p, model, guide, *args))(params)
            finally:
                elbo._noise = None
            out.append(flat(g, names))
        return jnp.stack(out)

    def run(key):
        keys = jax.random.split(key, batches * particles).reshape(batches, particles, -1)
        return jnp.mean(jax.vmap(jax.vmap(one))(keys), 1)

    means = np.asarray(fast_jit(run, jax.random.PRNGKey(seed)))
    return names, [means[:, i] for i in range(len(elbos))]


def test_gumbel_rao_mean_equals_st_gumbel_softmax_mean():
    """E[GR] = E[ST-GS] (Rao-Blackwellisation; ESTIMATORS.md 11.2): the mean
    of GR - ST-GS on common noise u is zero."""
    lam = 0.5
    _, (gr, gs) = gradient_draws(
        [GumbelRao_ELBO(temperature=lam, num_samples=8), GumbelSoftmaxST_ELBO(temperature=lam)],
        tiny(), 1000, 30, noise_from_key=True)
    diffs = gr - gs
    result = stats.check_unbiased(diffs, np.zeros(diffs.shape[1]))
    print(f"E[GR - ST-GS] = 0: max|z| = {result.max_abs_z:.2f}")


# ---------------------------------------------------------------------------
# 3. bias against the exact gradient (printed) and ST's exactness for linear f
# ---------------------------------------------------------------------------


def exact_flat(spec):
    _, grads = exact_value_and_grads(spec, loss=True)
    names = sorted(grads)
    return names, np.concatenate([np.ravel(grads[k]) for k in names])


def test_st_is_unbiased_for_linear_f():
    """At tau = 1, ST's estimate J(pi) g_D is exact when f is linear in D."""
    spec = tiny(linear=True)
    names, exact = exact_flat(spec)
    got, (rows,) = gradient_draws([ST_ELBO()], spec, 2000, 30)
    assert got == names
    result = stats.check_unbiased(rows, exact)
    print(f"ST, f linear in D: max|z| = {result.max_abs_z:.2f}")


BIASED = [
    ("RLOO n=3 (unbiased)", lambda: RLOO_ELBO(num_samples=3)),
    ("ST tau=1", lambda: ST_ELBO()),
    ("ST-GS lam=0.5", lambda: GumbelSoftmaxST_ELBO(temperature=0.5)),
    ("GR lam=0.5 K=10", lambda: GumbelRao_ELBO(temperature=0.5, num_samples=10)),
    ("ReinMax tau=1", lambda: ReinMax_ELBO()),
    ("ReinMax tau=2", lambda: ReinMax_ELBO(temperature=2.0)),
    ("ReinMax-Rao tau=1 K=10", lambda: ReinMaxRao_ELBO()),
    ("ReinMax-CV tau=1 eta=1.5 K=100", lambda: ReinMaxCV_ELBO(eta=1.5)),
    ("ReinMax-CV fresh eta=1 K=10", lambda: ReinMaxCV_ELBO(num_samples=10, form="fresh")),
]


def test_print_bias():
    spec = tiny()
    names, exact = exact_flat(spec)
    sizes = {k: np.size(v) for k, v in init_params(spec).items()}
    guide = np.array([n.startswith("q_") for n in names for _ in range(sizes[n])])
    got, runs = gradient_draws([make() for _, make in BIASED], spec, 1000, 30)
    assert got == names
    print(f"\nexact guide gradient: {np.round(exact[guide], 4)}")
    for (label, _), rows in zip(BIASED, runs):
        mean = rows.mean(0)
        se = rows.std(0, ddof=1) / np.sqrt(len(rows))
        z = (mean - exact)[guide] / se[guide]
        rel = np.linalg.norm((mean - exact)[guide]) / np.linalg.norm(exact[guide])
        print(f"{label:30s} mean {np.round(mean[guide], 4)}  max|z| = {np.abs(z).max():7.1f}"
              f"  |bias|/|exact| = {rel:.3f}")
        if label.startswith("RLOO"):
            stats.check_unbiased(rows, exact)


# ---------------------------------------------------------------------------
# 4. gradient variance of ReinMax-Rao / ReinMax-CV against ReinMax
# ---------------------------------------------------------------------------
#
# ReinMax's estimate is a deterministic function of the sample D; ReinMax-Rao
# and ReinMax-CV replace or correct its Jacobian with Monte Carlo averages at
# theta_D. They are not Rao-Blackwellisations of ReinMax (their conditional
# means given D differ from ReinMax's), so no ordering holds in general. The
# ratios are measured on many independent plate elements (each element's
# logits gradient is one independent draw), in blocks for a standard error.

A8 = np.array([1.5, -0.3, -2.0, 0.6, -1.1, -1.4, 0.4, 0.8])
W8 = np.array([-2.2, -1.2, -1.8, 0.6, -2.6, 3.3, -3.2, 0.4])


def per_element_gradients(elbos, a0, w, n, seed=0):
    """For each ELBO (same key): (n, classes) loss gradients of n independent
    plate elements sharing the logits a0 (each row one independent draw)."""
    k = a0.size

    def guide(y, w):
        a = numpyro.param("q_a", jnp.zeros((n, k)))
        with numpyro.plate("data", n, dim=-1):
            numpyro.sample("z", OneHotCategorical(logits=a))

    def model(y, w):
        with numpyro.plate("data", n, dim=-1):
            z = numpyro.sample("z", OneHotCategorical(logits=jnp.zeros(k)))
            numpyro.sample("y", numpyro.distributions.Normal(z @ w, 1.0), obs=y)

    def run(key, params, y, w):
        return jnp.stack([
            jax.grad(lambda p: e.loss(key, p, model, guide, y, w))(params)["q_a"]
            for e in elbos])

    # arrays as arguments, not constants (XLA would constant-fold the model)
    params = {"q_a": jnp.broadcast_to(jnp.asarray(a0), (n, k))}
    return np.asarray(fast_jit(run, jax.random.PRNGKey(seed), params,
                               jnp.full((n,), 0.3), jnp.asarray(w)))


VARIANTS = [
    ("ReinMax tau=1", lambda: ReinMax_ELBO()),
    ("ReinMax tau=2 (biased)", lambda: ReinMax_ELBO(temperature=2.0)),
    ("ReinMax-Rao K=10", lambda: ReinMaxRao_ELBO(num_samples=10)),
    ("ReinMax-CV eta=1.5 K=10", lambda: ReinMaxCV_ELBO(num_samples=10, eta=1.5)),
    ("ReinMax-CV eta=1 K=10", lambda: ReinMaxCV_ELBO(num_samples=10)),
    ("ReinMax-CV fresh eta=1 K=10", lambda: ReinMaxCV_ELBO(num_samples=10, form="fresh")),
]


@functools.lru_cache(maxsize=None)
def variant_gradients(classes, n=120000):
    """{label: (n, classes) per-element gradients} of every ReinMax variant on
    the 8-class (``classes=8``) or the 4-class model, in one compiled call."""
    a0, w = (A8, W8) if classes == 8 else (A0[0], W0)
    g = per_element_gradients([make() for _, make in VARIANTS], a0, w, n)
    return {label: g[i] for i, (label, _) in enumerate(VARIANTS)}


def variance_ratio(classes, label, blocks=10):
    """Total variance (summed over classes) of ``label`` over ReinMax's, per
    block of n / blocks elements: (mean ratio, its standard error)."""
    grads = variant_gradients(classes)
    v = [grads[k].reshape(blocks, -1, classes).var(1, ddof=1).sum(-1)
         for k in (label, "ReinMax tau=1")]
    r = v[0] / v[1]
    return r.mean(), r.std(ddof=1) / np.sqrt(blocks)


def test_reinmax_rao_variance():
    """Asserted on an 8-class model where it holds (Pyro: ratio 0.85 +- 0.01);
    on the 4-class tiny model the ratio is printed (about 1)."""
    ratio, se = variance_ratio(8, "ReinMax-Rao K=10")
    print(f"\nVar(ReinMax-Rao tau=1 K=10) / Var(ReinMax), 8 classes: {ratio:.3f} +- {se:.3f}")
    small, small_se = variance_ratio(4, "ReinMax-Rao K=10")
    print(f"Var(ReinMax-Rao tau=1 K=10) / Var(ReinMax), 4 classes: {small:.3f} +- {small_se:.3f}")
    assert ratio + 3 * se < 1


def exact_element_gradient(a0, w, y=0.3):
    """The exact loss gradient of one plate element of
    :func:`per_element_gradients`' model, by enumeration of its classes."""

    def loss(a):
        logq = jax.nn.log_softmax(a)
        h = numpyro.distributions.Normal(jnp.asarray(w), 1.0).log_prob(y) - np.log(a0.size)
        return -(jnp.exp(logq) * (h - logq)).sum()

    return np.asarray(jax.grad(loss)(jnp.asarray(a0)))


def bias_variance_mse(g, exact, blocks=10):
    """Per block of rows of ``g`` (n, classes): squared bias (corrected for the
    block mean's own variance), total variance and MSE = E|g - exact|^2, as
    (mean over blocks, standard error); and the max |z| of the mean against
    ``exact``."""
    n, k = g.shape
    gb = g.reshape(blocks, n // blocks, k)
    var = gb.var(1, ddof=1).sum(-1)
    bias2 = ((gb.mean(1) - exact) ** 2).sum(-1) - var / (n // blocks)  # unbiased
    mse = ((gb - exact) ** 2).sum(-1).mean(-1)
    z = (g.mean(0) - exact) / (g.std(0, ddof=1) / np.sqrt(n))
    se = lambda t: t.std(ddof=1) / np.sqrt(blocks)  # noqa: E731
    return {"bias2": (bias2.mean(), se(bias2)), "var": (var.mean(), se(var)),
            "mse": (mse.mean(), se(mse)), "max_z": np.abs(z).max()}


@pytest.mark.parametrize("classes", [8, 4], ids=["8 classes", "4 classes"])
def test_reinmax_variants_bias_variance_mse(classes):
    """
    ReinMax (tau = 1) is second-order accurate (Liu et al. 2023), so exact when
    f is quadratic in D, as here (Gaussian likelihood of D . w): its mean is
    asserted to equal the enumerated gradient (5 SE), and ReinMax at tau = 2 must
    fail that check. ReinMax-Rao and ReinMax-CV are compared to ReinMax by MSE to
    the exact gradient, printed with standard errors, not asserted (DESIGN.md,
    "Variance orderings": comparisons of biased estimators are reported). 120,000
    draws: power >= 5 against a 10% bias on both models.
    """
    a0, w = (A8, W8) if classes == 8 else (A0[0], W0)
    exact = exact_element_gradient(a0, w)
    print(f"\n{classes} classes, exact gradient {np.round(exact, 4)}")
    print(f"{'estimator':26s}{'|bias|^2':>20s}{'variance':>20s}{'MSE':>20s}{'MSE/ReinMax':>13s}"
          f"{'max|z|':>8s}")
    out, grads = {}, variant_gradients(classes)
    for label, g in grads.items():
        out[label] = r = bias_variance_mse(g, exact)
        cells = "".join(f"{r[k][0]:11.2e} +- {r[k][1]:.0e}" for k in ("bias2", "var", "mse"))
        print(f"{label:26s}{cells}{r['mse'][0] / out['ReinMax tau=1']['mse'][0]:13.3f}"
              f"{r['max_z']:8.1f}")
    result = stats.check_unbiased(grads["ReinMax tau=1"], exact)
    print(f"ReinMax tau=1 against the exact gradient: max|z| = {result.max_abs_z:.2f}, "
          f"power {result.power:.1f}")
    assert out["ReinMax tau=2 (biased)"]["max_z"] > 5


# ---------------------------------------------------------------------------
# 5. Pyro and NumPyro agree for the same model, sample and noise
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _pyro_float64():
    import torch
    import pyro
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    try:
        yield
    finally:
        pyro.clear_param_store()
        torch.set_default_dtype(dtype)


def pyro_gradients(cls, kw, spec, u, v=None):
    """(loss, d loss / d q_a, d loss / d p_w) of the Pyro class of the same
    name, one step per row of the injected noise."""
    import torch
    import pyro
    import pyro_binary_grads
    from pyro_oracle import init_params as pyro_init_params

    out = []
    with _pyro_float64():
        for r in range(u.shape[0]):
            pyro_init_params(spec)
            model, guide, args = spec.bind(specs.pyro_backend())
            elbo = getattr(pyro_binary_grads, cls)(**kw)
            elbo._noise = {"z": torch.as_tensor(u[r])}
            if v is not None:
                elbo._extra_noise = {"z": torch.as_tensor(v[r])}
            loss = elbo.differentiable_loss(model, guide, *args)
            store = pyro.get_param_store()
            ga, gw = torch.autograd.grad(
                loss, [store["q_a"].unconstrained(), store["p_w"].unconstrained()])
            out.append((loss.item(), ga.numpy(), gw.numpy()))
    return tuple(np.array(x) for x in zip(*out))


@pytest.mark.parametrize("label,cls,kw,num_extra,matrix", CASES, ids=[c[0] for c in CASES])
def test_pyro_and_numpyro_agree(label, cls, kw, num_extra, matrix):
    u, v, ours = formula_runs()[label, True]
    theirs = pyro_gradients(cls, kw, tiny(), u, v)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10, err_msg=label)


# ---------------------------------------------------------------------------
# 6. particles and SVI under jit
# ---------------------------------------------------------------------------


def test_particles_and_svi_under_jit():
    """vmap and lax.map over particles give the same numbers (the extra noise
    comes from each particle's key); SVI steps run under jit (one jit)."""
    spec = tiny()
    model, guide, args = spec.bind(B)
    params = init_params(spec)
    svi = numpyro.infer.SVI(model, guide, numpyro.optim.Adam(0.05), GumbelRao_ELBO())

    def run(key):
        def grads(elbo):
            return jax.grad(lambda p: elbo.loss(key, p, model, guide, *args))(params)

        state = svi.init(key, *args)
        _, losses = jax.lax.scan(lambda s, _: svi.update(s, *args), state, None, length=20)
        return (grads(ReinMaxCV_ELBO(3, True, num_samples=4)),
                grads(ReinMaxCV_ELBO(3, False, num_samples=4)), losses)

    a, b, losses = fast_jit(run, jax.random.PRNGKey(3))
    for k in params:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-12)
    assert np.all(np.isfinite(np.asarray(losses)))


# ---------------------------------------------------------------------------
# 7. one-class sites (issue 17): a constant, gradient zero
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("one_hot", [True, False], ids=["OneHotCategorical", "Categorical"])
def test_disarm_one_class_site_is_a_constant(one_hot):
    """A one-class (OneHot)Categorical site has one value: DisARM_ELBO's loss
    is the ELBO at it and its gradient is exactly zero (no crash), under jit."""
    from numpyro_binary_grads import DisARM_ELBO

    def site(logits):
        d = (OneHotCategorical(logits=logits) if one_hot
             else numpyro.distributions.Categorical(logits=logits))
        return numpyro.sample("z", d.to_event(1))

    def guide():
        site(numpyro.param("a", jnp.zeros((3, 1))))

    def model():
        z = site(jnp.zeros((3, 1))).astype(jnp.float32)
        numpyro.factor("f", jnp.sum((z * z).reshape(z.shape[: z.ndim - (2 if one_hot else 1)]
                                                    + (-1,)), -1))

    def loss(p):
        return DisARM_ELBO().loss(jax.random.PRNGKey(0), p, model, guide)

    params = {"a": jnp.zeros((3, 1))}
    value, grad = jax.jit(jax.value_and_grad(loss))(params)
    assert float(value) == (-3.0 if one_hot else 0.0)
    assert np.all(np.asarray(grad["a"]) == 0)
