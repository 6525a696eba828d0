"""
Checks of the hand-written categorical-VAE reference step
(``benchmarks/cvae_reference_jax.py``):

* its written-out backward passes (``jax.custom_vjp``) of ReinMax and of
  ReinMax-CV (authors' form) give, on the same noise, the gradient that the
  plugin's surrogates (``numpyro_binary_grads.categorical``) give: two
  independent implementations of ``docs/estimators/reinmax_cv.rst``;
* the PyTorch reference's backward pass (``benchmarks/cvae_reference_torch.py``,
  the authors' loop) gives, on the same noise, the JAX reference's gradient
  (float64 both, to 1e-10), with the analytic KL's upstream gradient added
  through :math:`J(\\pi)`;
* its ``--kl sample`` gradient is, in expectation, the ``--kl analytic``
  gradient :math:`J(\\pi)\\log\\pi` (ReinMax at :math:`\\tau = 1` is exact for
  integrands linear in :math:`D`, Liu et al. 2023: :math:`\\mathbb E[J(\\pi_{1/2})]
  = \\tfrac34 J(\\pi)`, so :math:`\\mathbb E[2J(\\pi_{1/2}) - \\tfrac12 J(\\pi)] = J(\\pi)`,
  and the score term :math:`D - \\pi` has mean 0), tested at 5 standard errors
  with the exact coordinates far above the standard error (power), and the
  analytic gradient equals ``jax.grad`` of the closed form.
"""

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.lax import stop_gradient
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

import cvae_reference_jax as ref  # noqa: E402
from numpyro_binary_grads import categorical as cat  # noqa: E402


def _noise(key, shape, K):
    alpha = 1.5 * jax.random.normal(key, shape)
    G, D, v = ref.sample_noise(jax.random.fold_in(key, 1), alpha, K)
    c = jax.random.normal(jax.random.fold_in(key, 2), shape)
    M = jax.random.normal(jax.random.fold_in(key, 3), (shape[-1], shape[-1]))
    return alpha, G, D, v, c, M


def _f(z, c, M):
    """A nonlinear integrand of the sample (so g depends on z)."""
    return jnp.sum(jnp.tanh(z @ M) * c) + jnp.sum(z * c) ** 2 / 10


def test_backward_matches_plugin_surrogates():
    shape, K, tau, eta = (3, 2, 5), 7, 1.3, 1.5
    for seed in range(3):
        alpha, G, D, v, c, M = _noise(jax.random.PRNGKey(seed), shape, K)
        u = jnp.exp(-jnp.exp(-G))  # the uniforms of G, for the plugin's functions

        def ours(a, est, t):
            A, B, W = ref.backward_terms(est, a, D, G, v, t, eta)
            return _f(ref.st_sample(a, D, A, B, W), c, M)

        def plugin_reinmax(a):
            s = cat.reinmax_surrogate(a, D, tau)
            return _f(D + s - stop_gradient(s), c, M)

        def plugin_cv(a):
            tD = cat.theta_D(a, D)
            gr = cat.gumbel_rao_surrogate(a, cat.conditional_gumbel(tD, D, v), tau)
            S = jax.nn.softmax((stop_gradient(a) + cat.gumbel(u)) / tau, -1)
            s = cat.reinmax_surrogate(a, D, 1.0) + eta * (gr - cat.authors_gs_surrogate(a, tD, S, tau))
            return _f(D + s - stop_gradient(s), c, M)

        for mine, theirs in ((jax.grad(lambda a: ours(a, "reinmax", tau))(alpha),
                              jax.grad(plugin_reinmax)(alpha)),
                             (jax.grad(lambda a: ours(a, "reinmax_cv", tau))(alpha),
                              jax.grad(plugin_cv)(alpha))):
            assert float(jnp.max(jnp.abs(theirs))) > 1e-2  # a nonzero gradient is compared
            np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=2e-4, atol=2e-5)
        # the value is the hard sample
        A, B, W = ref.backward_terms("reinmax_cv", alpha, D, G, v, tau, eta)
        np.testing.assert_array_equal(np.asarray(ref.st_sample(alpha, D, A, B, W)), np.asarray(D))


def test_torch_reference_backward_matches_the_jax_reference():
    import torch
    import cvae_reference_torch as tref

    previous = jax.config.read("jax_enable_x64")  # process-global: restored below
    jax.config.update("jax_enable_x64", True)
    try:
        shape, K, eta = (3, 2, 5), 7, 1.5
        for seed, (est, tau) in enumerate((("reinmax", 1.3), ("reinmax_cv", 1.3),
                                           ("reinmax_cv", 1.0))):
            key = jax.random.PRNGKey(seed)
            alpha = 1.5 * jax.random.normal(key, shape, jnp.float64)
            G, D, v = ref.sample_noise(jax.random.fold_in(key, 1), alpha, K)
            c = jax.random.normal(jax.random.fold_in(key, 2), shape, jnp.float64)
            M = jax.random.normal(jax.random.fold_in(key, 3), (shape[-1],) * 2, jnp.float64)
            A, B, W = ref.backward_terms(est, alpha, D, G, v, tau, eta)
            z, vjp = jax.vjp(lambda a: ref.st_sample(a, D, A, B, W), alpha)
            g = jax.grad(lambda z: _f(z, c, M))(z)
            g_pi = jax.random.normal(jax.random.fold_in(key, 4), shape, jnp.float64)
            pi = jax.nn.softmax(alpha, -1)
            want = vjp(g)[0] + ref.jvp_softmax(pi, g_pi)
            t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
            S = jax.nn.softmax((alpha + G) / tau, -1)
            got = tref.estimate(t(alpha), t(D), t(S), t(g), t(g_pi),
                                {"estimator": est, "tau": tau, "eta": eta, "K": K},
                                E=t(-jnp.log(v)))
            assert float(jnp.max(jnp.abs(want))) > 1e-2
            np.testing.assert_allclose(got.numpy(), np.asarray(want), rtol=1e-10, atol=1e-12)
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_sample_kl_gradient_is_analytic_in_expectation():
    L, C, N = 3, 4, 10_000
    alpha = jnp.array([[2.0, -1.0, 0.5, -0.3], [0.0, 1.2, -2.0, 0.4], [-0.7, -0.7, 1.5, 0.1]])

    def kl_sample(a, key):
        G, D, v = ref.sample_noise(key, a, 1)
        A, B, W = ref.backward_terms("reinmax", a, D, G, v, 1.0, 0.0)
        z = ref.st_sample(a, D, A, B, W)
        return jnp.sum(z * (jax.nn.log_softmax(a, -1) + math.log(C)))

    def kl_closed(a):
        lp = jax.nn.log_softmax(a, -1)
        return jnp.sum(jnp.exp(lp) * (lp + math.log(C)))

    pi = jax.nn.softmax(alpha, -1)
    exact = ref.jvp_softmax(pi, jnp.log(pi))  # J(pi) log pi
    np.testing.assert_allclose(np.asarray(jax.grad(kl_closed)(alpha)), np.asarray(exact),
                               rtol=1e-5, atol=1e-6)
    keys = jax.random.split(jax.random.PRNGKey(0), N)
    g = np.asarray(jax.jit(jax.vmap(jax.grad(kl_sample), (None, 0)))(alpha, keys), np.float64)
    mean, se = g.mean(0), g.std(0, ddof=1) / math.sqrt(N)
    z = (mean - np.asarray(exact)) / se
    assert np.max(np.abs(z)) < 5, z
    # power: every exact coordinate is > 20 SE from 0, so a gradient off by a
    # quarter of it fails (measured at N = 40,000: halving ReinMax's weights
    # gives max |z| = 62, J(pi_half) alone 241; a missing pathwise term, mean 0, fails)
    assert np.all(np.abs(np.asarray(exact)) > 20 * se), (np.asarray(exact), se)


def test_plugin_analytic_kl_program_matches_the_reference():
    """``examples/categorical_vae.py --kl analytic`` (latent sites masked, the
    KL a factor) under ``ReinMaxCV_ELBO`` has, in expectation, the encoder
    gradient of the hand-written reference's analytic-KL objective (two
    implementations of the same biased estimator: their means are compared,
    difference of two independent means at 5 SE over the output layer). Power:
    the same comparison with the plugin at ``eta = 0`` (ReinMax at tau 1
    instead of ReinMax-CV) fails (measured max |z| 16 at 3,000 draws; the
    one-sample-KL program differs too, max |z| 4.4, the bias of differentiating
    log pi through ReinMax-CV)."""
    import common
    import categorical_vae as cv
    from data import load_mnist
    from numpyro_binary_grads import ReinMaxCV_ELBO

    L, C, B, K, N, tau, eta = 3, 4, 4, 10, 3000, 1.3, 1.5
    rng = np.random.default_rng(0)
    P = {}
    common.mlp_init(rng, (784, 16, 16, L * C), "enc", P)
    common.mlp_init(rng, (L * C, 16, 16, 784), "dec", P)
    P = {k: jnp.asarray(v, jnp.float32) for k, v in P.items()}
    x = jnp.asarray(load_mnist(ROOT.parent / "shared" / "data" / "mnist.npz", "dynamic",
                               "test").probs[:B], jnp.float32)
    args = type("Args", (), {"L": L, "C": C})()
    bk = common.get_backend("numpyro", P)
    model, guide = cv.make_model_and_guide(bk, args, "analytic")
    keys = jax.random.split(jax.random.PRNGKey(1), N)
    cfg = dict(L=L, C=C, estimator="reinmax_cv", tau=tau, eta=eta, K=K, kl="analytic")

    def moments(loss):
        g = jax.jit(jax.vmap(jax.grad(loss), (None, 0)))(P, keys)
        g = np.concatenate([np.asarray(g[k], np.float64).reshape(N, -1)
                            for k in ("enc2_b", "enc2_W")], 1)
        return g.mean(0), g.std(0, ddof=1) / math.sqrt(N)

    def plugin(e):
        elbo = ReinMaxCV_ELBO(temperature=tau, eta=e, num_samples=K)
        return moments(lambda p, k: elbo.loss(k, p, model, guide, x, jnp.arange(B), B) / B)

    m0, s0 = moments(lambda p, k: -ref.objective(p, k, x, cfg))
    live = s0 > 0  # output-layer weights of dead ReLU units have zero gradient
    for e, agree in ((eta, True), (0.0, False)):
        m, s = plugin(e)
        z = np.abs(m - m0)[live] / np.sqrt(s**2 + s0**2)[live]
        print(f"plugin eta={e} vs reference eta={eta}: max|z| = {z.max():.2f}")
        assert (z.max() < 5) == agree, z.max()
