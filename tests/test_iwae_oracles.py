"""Checks of the exact K-sample (IWAE) bound oracles: ``pyro_oracle.exact_iwae_bound`` /
``exact_iwae_value_and_grads`` and their NumPyro twins (``numpyro_oracle``).

E[L_K] with L_K = sum_n s_P logmeanexp_k f_{n,k} (DESIGN.md, "Conventions shared by both
packages"), computed exactly by enumerating the K copies of one element's latents."""
import itertools
import math

import numpy as np
import pytest

import specs

import torch  # noqa: E402
import pyro  # noqa: E402
import numpyro  # noqa: E402,F401

import pyro_oracle  # noqa: E402
import numpyro_oracle  # noqa: E402  (enables jax float64)


@pytest.fixture(autouse=True)
def float64_torch():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
    pyro.clear_param_store()


def _spec(name):
    return (specs.SPECS.get(name) or specs.IWAE_SPECS[name])()


def _assert_grads_close(g1, g2, atol, what):
    assert set(g1) == set(g2), f"{what}: param names differ: {sorted(g1)} vs {sorted(g2)}"
    for k in g1:
        np.testing.assert_allclose(np.asarray(g1[k]), np.asarray(g2[k]), rtol=0, atol=atol,
                                   err_msg=f"{what}: gradient of {k!r}")


def _lse(a, axis=None):
    m = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def _log_normal(x, m, s):
    return -0.5 * ((x - m) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)


# ------------------------------------------------------------------------------------------
# (1) K = 1 is the ELBO (value and gradients)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["scalar", "sbn", "nested", "two_layer", "masked", "mixed",
                                  "global_after_local_discrete", "categorical", "scaled",
                                  "outside_obs"])
def test_pyro_k1_equals_exact_elbo(name):
    spec = _spec(name)
    v0, g0 = pyro_oracle.exact_value_and_grads(spec)
    v1, g1 = pyro_oracle.exact_iwae_value_and_grads(spec, 1)
    assert abs(v0 - v1) <= 1e-10, (v0, v1)
    _assert_grads_close(g0, g1, 1e-10, name)


@pytest.mark.parametrize("name", ["scaled", "outside_obs"])
def test_numpyro_k1_equals_exact_elbo(name):
    spec = _spec(name)
    v0, g0 = numpyro_oracle.exact_value_and_grads(spec)
    v1, g1 = numpyro_oracle.exact_iwae_value_and_grads(spec, num_samples=1)
    assert abs(v0 - v1) <= 1e-10, (v0, v1)
    _assert_grads_close(g0, g1, 1e-10, name)


# ------------------------------------------------------------------------------------------
# (2) Pyro and NumPyro agree for K = 2, 3
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, K", [(n, K) for n in ["scalar", "sbn", "two_layer", "subsample",
                                                      "masked"] for K in (2, 3)]
                         + [("outside_obs", 2)])
def test_pyro_and_numpyro_iwae_oracles_agree(name, K):
    spec = _spec(name)
    v1, g1 = pyro_oracle.exact_iwae_value_and_grads(spec, K)
    v2, g2 = numpyro_oracle.exact_iwae_value_and_grads(spec, num_samples=K)
    assert abs(v1 - v2) <= 1e-6, (v1, v2)
    _assert_grads_close(g1, g2, 1e-6, f"{name}, K={K}")
    # not vacuous: the K-sample bound differs from the ELBO, and its gradients too
    v0, g0 = pyro_oracle.exact_value_and_grads(spec)
    assert v1 - v0 > 1e-3, (v0, v1)
    assert max(np.abs(g1[k] - g0[k]).max() for k in g0) > 1e-4


# ------------------------------------------------------------------------------------------
# (3) independent brute force in plain numpy
# ------------------------------------------------------------------------------------------

SCALAR_INIT = dict(q_logit=-0.5, p_logit=-0.4, p_mu=0.5)


def _scalar_f(b, q_logit, p_logit, p_mu, x=1.3):
    """log p(b) + log N(x; mu (2b - 1) + 0.2, 1) - log q(b) of the `scalar` spec, by hand."""
    lp = b * p_logit - np.logaddexp(0, p_logit)
    lq = b * q_logit - np.logaddexp(0, q_logit)
    return lp + _log_normal(x, p_mu * (2 * b - 1) + 0.2, 1.0) - lq


def _scalar_bound(K, q_logit, p_logit, p_mu):
    total = 0.0
    for bs in itertools.product([0.0, 1.0], repeat=K):
        bs = np.array(bs)
        logq = np.sum(bs * q_logit - np.logaddexp(0, q_logit))
        f = _scalar_f(bs, q_logit, p_logit, p_mu)
        total += np.exp(logq) * (_lse(f) - np.log(K))
    return total


@pytest.mark.parametrize("K", [1, 2, 3])
def test_scalar_matches_numpy_brute_force(K):
    spec = specs.SPECS["scalar"]()
    expected = _scalar_bound(K, **SCALAR_INIT)
    v1, g1 = pyro_oracle.exact_iwae_value_and_grads(spec, K)
    v2, g2 = numpyro_oracle.exact_iwae_value_and_grads(spec, num_samples=K)
    assert abs(v1 - expected) <= 1e-10, (v1, expected)
    assert abs(v2 - expected) <= 1e-10, (v2, expected)
    # gradients by central differences of the brute force (truncation ~h^2 * 1e-1)
    h = 1e-5
    for k, x0 in SCALAR_INIT.items():
        up = dict(SCALAR_INIT, **{k: x0 + h})
        dn = dict(SCALAR_INIT, **{k: x0 - h})
        fd = (_scalar_bound(K, **up) - _scalar_bound(K, **dn)) / (2 * h)
        assert abs(float(g1[k]) - fd) <= 1e-8, (k, float(g1[k]), fd)
        assert abs(float(g2[k]) - fd) <= 1e-8, (k, float(g2[k]), fd)


@pytest.mark.parametrize("K", [2, 3])
def test_masked_matches_joint_brute_force(K):
    # The oracle enumerates one element's K copies (all elements at once); here every
    # element of every copy is enumerated jointly: 2^(4K) configurations.
    x = np.array([0.5, -1.0, 1.5, 0.3])
    m = np.array([True, True, False, True])
    a = np.array([0.4, -0.9, 1.2, -0.1])
    p, mu = -0.3, 0.9
    total = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=4 * K):
        b = np.array(bits).reshape(K, 4)
        lq = b * a - np.logaddexp(0, a)                                   # (K, 4), unmasked
        f = (b * p - np.logaddexp(0, p)) + _log_normal(x, mu * b, 1.0) - lq
        f = np.where(m, f, 0.0)                                           # masked terms removed
        total += np.exp(lq.sum()) * np.sum(_lse(f, axis=0) - np.log(K))  # sum over elements n
    v1, _ = pyro_oracle.exact_iwae_value_and_grads(specs.SPECS["masked"](), K)
    v2, _ = numpyro_oracle.exact_iwae_value_and_grads(specs.SPECS["masked"](), num_samples=K)
    assert abs(v1 - total) <= 1e-10, (v1, total)
    assert abs(v2 - total) <= 1e-10, (v2, total)


@pytest.mark.parametrize("K", [2, 3])
def test_outside_site_added_once(K):
    # y lies outside the data plate (the plates common to the latent sites): log N(y; m, 1) is
    # added once to the bound, not once per element nor inside the log-mean-exp weights.
    with_y = pyro_oracle.exact_iwae_value_and_grads(specs.outside_obs(True), K)[0]
    without = pyro_oracle.exact_iwae_value_and_grads(specs.outside_obs(False), K)[0]
    assert abs(with_y - without - _log_normal(0.35, -0.4, 1.0)) <= 1e-12


# ------------------------------------------------------------------------------------------
# (4) L_1 <= L_2 <= L_3 <= log p(x)
# ------------------------------------------------------------------------------------------

def test_scalar_monotone_up_to_log_evidence():
    spec = specs.SPECS["scalar"]()
    L = [pyro_oracle.exact_iwae_value_and_grads(spec, K)[0] for K in (1, 2, 3, 6)]
    L += [numpyro_oracle.exact_iwae_value_and_grads(spec, num_samples=3)[0]]
    # log p(x) by enumerating the model (not using the oracle)
    p, mu, x = SCALAR_INIT["p_logit"], SCALAR_INIT["p_mu"], 1.3
    b = np.array([0.0, 1.0])
    log_px = _lse(b * p - np.logaddexp(0, p) + _log_normal(x, mu * (2 * b - 1) + 0.2, 1.0))
    assert L[0] < L[1] - 1e-3 < L[2] - 2e-3 and L[2] < L[3] < log_px, (L, log_px)
    assert abs(L[4] - L[2]) <= 1e-10
    # and with the guide equal to the posterior, L_K = log p(x) for every K
    post_logit = p + _log_normal(x, mu + 0.2, 1.0) - _log_normal(x, -mu + 0.2, 1.0)
    pyro.clear_param_store()
    pyro_oracle.init_params(spec)
    with torch.no_grad():
        pyro.param("q_logit").copy_(torch.tensor(post_logit))
    for K in (1, 2, 3):
        v, _ = pyro_oracle.exact_iwae_value_and_grads(spec, K, init=False)
        assert abs(v - log_px) <= 1e-12, (K, v, log_px)


# ------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------

def test_iwae_oracles_refuse_undefined_or_too_big():
    # an observed site outside the plate common to the latents that depends on the latents
    def guide(x):
        a = pyro.param("qa", torch.tensor([0.3, -0.2]))
        with pyro.plate("data", 2, dim=-1):
            pyro.sample("b", pyro.distributions.Bernoulli(logits=a))

    def model(x):
        with pyro.plate("data", 2, dim=-1):
            b = pyro.sample("b", pyro.distributions.Bernoulli(logits=torch.zeros(2)))
        pyro.sample("y", pyro.distributions.Normal(b.sum(-1, keepdim=True), 1.0), obs=x)

    with pytest.raises(NotImplementedError, match="outside"):
        pyro_oracle.exact_iwae_bound(model, guide, torch.tensor(0.5), num_samples=2)
    # K = 1 too (L_1 is the ELBO there, but this oracle's outside term must be constant; the
    # ELBO oracle handles the model)
    with pytest.raises(NotImplementedError, match="outside"):
        pyro_oracle.exact_iwae_bound(model, guide, torch.tensor(0.5), num_samples=1)

    import numpyro
    import numpyro.distributions as ndist
    import jax.numpy as jnp

    def nguide(x):
        a = numpyro.param("qa", jnp.array([0.3, -0.2]))
        with numpyro.plate("data", 2, dim=-1):
            numpyro.sample("b", ndist.Bernoulli(logits=a))

    def nmodel(x):
        with numpyro.plate("data", 2, dim=-1):
            b = numpyro.sample("b", ndist.Bernoulli(logits=jnp.zeros(2)))
        numpyro.sample("y", ndist.Normal(b.sum(-1, keepdims=True), 1.0), obs=x)

    with pytest.raises(NotImplementedError, match="outside"):
        numpyro_oracle.exact_iwae_bound({"qa": jnp.array([0.3, -0.2])}, nmodel, nguide,
                                        jnp.array(0.5), num_samples=2)

    # subsampled plates (use spec.full())
    sub = specs.subsample(2)
    model, guide, args = sub.bind(specs.pyro_backend())
    with pytest.raises(NotImplementedError, match="subsample"):
        pyro_oracle.exact_iwae_bound(model, guide, *args, num_samples=2)
    model, guide, args = sub.bind(specs.numpyro_backend())
    idx = {"data": jnp.array([0, 2])}  # the subsample, without an rng
    model = numpyro.handlers.substitute(model, data=idx)
    guide = numpyro.handlers.substitute(guide, data=idx)
    with pytest.raises(NotImplementedError, match="subsample"):
        numpyro_oracle.exact_iwae_bound(numpyro_oracle.init_params(sub), model, guide, *args,
                                        num_samples=2)
    # too many configurations: 2 layers x 2 bits per element, K = 4 -> 2^16
    with pytest.raises(NotImplementedError, match="configurations"):
        pyro_oracle.exact_iwae_value_and_grads(specs.SPECS["two_layer"](), 4)


# ------------------------------------------------------------------------------------------
# continuous sites: product quadrature over the K copies (K = 2 only, one scalar Normal)
# ------------------------------------------------------------------------------------------

def test_mixed_k2_quadrature_converged_and_frameworks_agree():
    spec = specs.SPECS["mixed"]()
    v30, g30 = pyro_oracle.exact_iwae_value_and_grads(spec, 2, num_nodes=30)
    v40, g40 = pyro_oracle.exact_iwae_value_and_grads(spec, 2, num_nodes=40)
    assert abs(v30 - v40) <= 1e-10, (v30, v40)
    _assert_grads_close(g30, g40, 1e-9, "mixed K=2: 30 vs 40 nodes")
    v2, g2 = numpyro_oracle.exact_iwae_value_and_grads(spec, num_samples=2, num_nodes=30)
    assert abs(v2 - v30) <= 1e-10
    _assert_grads_close(g30, g2, 1e-10, "mixed K=2 Pyro vs NumPyro")
    v1 = pyro_oracle.exact_iwae_value_and_grads(spec, 1)[0]
    assert v40 - v1 > 1e-2
