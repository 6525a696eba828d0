"""
Check of the hand-written REBAR reference step (``benchmarks/rebar_reference_jax.py``):
on the same uniforms, its gradients of every network parameter (the estimator)
and of the unconstrained temperature and eta (the variance gradient) equal those
of ``numpyro_binary_grads.REBAR_ELBO(adapt=True)`` on the same linear one-layer
SBN written as a NumPyro program (data plate scaled ``N / B``, the example's
gradient scale ``1 / N``): two independent implementations of the estimator of
``examples/sbn.py --preset rebar --estimator rebar``.
"""

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.infer.util import transform_fn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

import rebar_reference_jax as ref  # noqa: E402
from numpyro_binary_grads import REBAR_ELBO  # noqa: E402

B, D, H, N = 5, 12, 4, 1000.0


def _program(P0, mean):
    # every param declared in the model and in the guide, as examples/sbn.py's bk.params()
    # does: the plugin's variance objective is over the guide's params, all five tensors
    def model(x):
        P = {k: numpyro.param(k, v) for k, v in P0.items()}
        with numpyro.plate("data", B), handlers.scale(scale=N / B):
            b = numpyro.sample("b1", dist.Bernoulli(logits=P["prior_logits"]).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=(2 * b - 1) @ P["dec0_W"] + P["dec0_b"])
                           .to_event(1), obs=x)

    def guide(x):
        P = {k: numpyro.param(k, v) for k, v in P0.items()}
        with numpyro.plate("data", B), handlers.scale(scale=N / B):
            numpyro.sample("b1", dist.Bernoulli(logits=(x - mean) @ P["enc0_W"] + P["enc0_b"])
                           .to_event(1))

    return model, guide


@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_reference_step_matches_plugin_on_the_same_noise(scale):
    """``scale`` 20: saturated logits (a trained model's regime: sigmoid(alpha)
    within float32 rounding of 0 or 1), uniforms over all of (0, 1) as the
    samplers draw them (``minval = tiny``), and a small temperature.

    Run in float32 whatever the process's ``jax_enable_x64`` (other test
    modules turn it on globally): the examples train in float32, and the
    saturated regime is defined by float32 rounding."""
    with jax.enable_x64(False):
        _compare_on_the_same_noise(scale)


def _compare_on_the_same_noise(scale):
    compared = 0
    for seed in range(3):
        keys = jax.random.split(jax.random.PRNGKey(seed), 8)
        P = {"prior_logits": scale * 0.5 * jax.random.normal(keys[0], (H,)),
             "dec0_W": scale * jax.random.normal(keys[1], (H, D)),
             "dec0_b": scale * 0.3 * jax.random.normal(keys[2], (D,)),
             "enc0_W": scale * 0.5 * jax.random.normal(keys[3], (D, H)),
             "enc0_b": scale * 0.5 * jax.random.normal(keys[4], (H,))}
        x = (jax.random.uniform(keys[5], (B, D)) < 0.4).astype(jnp.float32)
        mean = jnp.full((D,), 0.4)
        if scale == 1.0:
            u = jax.random.uniform(keys[6], (B, H), minval=1e-6, maxval=1 - 1e-6)
            lam, eta = 0.3 + 0.2 * seed, 0.8 + 0.3 * seed
        else:
            u = jax.random.uniform(keys[6], (B, H), minval=jnp.finfo(jnp.float32).tiny)
            lam, eta = 0.05 + 0.05 * seed, 1.03
        psi = {"rho": jnp.log(jnp.float32(lam - ref.TEMPERATURE_MIN)),
               "kappa": jnp.float32(np.log(eta / (2 - eta)))}
        g_ref, dpsi_ref, loss_ref = jax.jit(ref.step_grads)(P, psi, u, x, mean, N)

        model, guide = _program(P, mean)
        elbo = REBAR_ELBO(temperature=lam, eta=eta)
        wrapped = elbo.wrap_guide(guide)
        elbo._noise = {"b1": u}
        constrained = {**P, "_bg_b1_temperature": jnp.float32(lam), "_bg_b1_eta": jnp.float32(eta)}
        # the plugin's adapted params as SVI holds them: unconstrained, NumPyro's transforms
        transforms = {"_bg_b1_temperature": dist.biject_to(
            dist.constraints.greater_than(ref.TEMPERATURE_MIN)),
            "_bg_b1_eta": dist.biject_to(dist.constraints.interval(0.0, 2.0))}
        unconstrained = {**P, **{k: transforms[k].inv(constrained[k]) for k in transforms}}
        loss, grads = jax.jit(jax.value_and_grad(
            lambda p: elbo.loss(keys[7], transform_fn(transforms, p), model, wrapped, x)))(
            unconstrained)
        np.testing.assert_allclose(float(loss) / N, float(loss_ref), rtol=1e-5)
        _assert_finite(grads, g_ref, dpsi_ref)
        for k in P:
            assert float(jnp.max(jnp.abs(g_ref[k]))) > 1e-3  # nonzero gradients are compared
            np.testing.assert_allclose(np.asarray(grads[k]) / N, np.asarray(g_ref[k]),
                                       rtol=2e-3, atol=2e-4 * float(jnp.max(jnp.abs(g_ref[k]))))
        for mine, theirs in (("rho", "_bg_b1_temperature"), ("kappa", "_bg_b1_eta")):
            assert abs(float(dpsi_ref[mine])) > 1e-6
            np.testing.assert_allclose(float(grads[theirs]) / N, float(dpsi_ref[mine]), rtol=2e-3)
            compared += 1
    assert compared == 6


def _assert_finite(*trees):
    """``assert_allclose`` counts inf == inf as a match: the compared gradients are
    finite first."""
    for tree in trees:
        for leaf in jax.tree.leaves(tree):
            assert np.all(np.isfinite(np.asarray(leaf)))


def _exact_grads(P, x, mean):
    """The exact gradient of the per-example ELBO (the batch mean), by enumerating b."""
    bs = jnp.asarray(np.array(np.meshgrid(*[[0.0, 1.0]] * H, indexing="ij")).reshape(H, -1).T,
                     jnp.float32)

    def elbo(P_):
        a = (x - mean) @ P_["enc0_W"] + P_["enc0_b"]
        f = jax.vmap(lambda b: ref.log_joint(P_, x, jnp.broadcast_to(b, a.shape), a))(bs)
        logq = jax.vmap(lambda b: ref.log_bern(jnp.broadcast_to(b, a.shape), a))(bs)
        return jnp.mean(jnp.sum(jnp.exp(logq) * f, 0))

    return jax.grad(lambda p: -elbo(p))(P)


def test_reference_estimators_are_unbiased():
    """Both setups' gradients (the plugin's and the authors', with a random baseline
    and etas away from 1) average to the enumerated gradient: 5 standard errors,
    with coordinates of every tensor whose exact value is 10 standard errors from 0
    (power)."""
    keys = jax.random.split(jax.random.PRNGKey(11), 8)
    P = {"prior_logits": 0.5 * jax.random.normal(keys[0], (H,)),
         "dec0_W": jax.random.normal(keys[1], (H, D)),
         "dec0_b": 0.3 * jax.random.normal(keys[2], (D,)),
         "enc0_W": 0.5 * jax.random.normal(keys[3], (D, H)),
         "enc0_b": 0.5 * jax.random.normal(keys[4], (H,))}
    x = (jax.random.uniform(keys[5], (B, D)) < 0.4).astype(jnp.float32)
    mean = jnp.full((D,), 0.4)
    exact = _exact_grads(P, x, mean)
    psi_authors = ref.authors_psi(keys[6], D, hidden=6)
    psi_authors["rho"] = jnp.log(jnp.float32(0.3))
    psi_authors["kappa"] = {k: jnp.float32(0.4 * i - 0.8) for i, k in enumerate(ref.PARAM_NAMES)}
    psi_plugin = {"rho": jnp.log(jnp.float32(0.3)), "kappa": jnp.float32(0.5)}
    n = 40_000
    us = jax.random.uniform(keys[7], (n, B, H), minval=1e-6, maxval=1 - 1e-6)
    for fn, psi in ((ref.step_grads, psi_plugin), (ref.authors_step_grads, psi_authors)):
        g = jax.jit(jax.vmap(lambda u: fn(P, psi, u, x, mean, N)[0]))(us)
        for k in P:
            m, se = np.asarray(jnp.mean(g[k], 0)), np.asarray(jnp.std(g[k], 0)) / math.sqrt(n)
            z = np.abs(m - np.asarray(exact[k])) / np.maximum(se, 1e-12)
            assert z.max() < 5.0, (fn.__name__, k, z.max())
            strong = int(np.sum(np.abs(np.asarray(exact[k])) > 10 * se))
            # power: on every tensor, the encoder's included (where a REBAR bias would
            # show), some coordinates are 10 standard errors from 0
            assert strong >= (5 if k == "enc0_W" else 1), (fn.__name__, k, strong)


def test_reference_variance_gradients_are_derivatives_of_the_mean_square():
    """Both setups' psi-gradients (temperature, eta(s), the authors' baseline weights)
    equal central differences of their mean-square objective at fixed noise (float64)."""
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.PRNGKey(3), 8)
        P = {"prior_logits": 0.5 * jax.random.normal(keys[0], (H,)),
             "dec0_W": jax.random.normal(keys[1], (H, D)),
             "dec0_b": 0.3 * jax.random.normal(keys[2], (D,)),
             "enc0_W": 0.5 * jax.random.normal(keys[3], (D, H)),
             "enc0_b": 0.5 * jax.random.normal(keys[4], (H,))}
        x = (jax.random.uniform(keys[5], (B, D)) < 0.4).astype(jnp.float64)
        mean = jnp.full((D,), 0.4)
        u = jax.random.uniform(keys[6], (B, H), minval=1e-6, maxval=1 - 1e-6)
        psi_a = ref.authors_psi(keys[7], D, hidden=6)
        psi_a["rho"] = jnp.log(jnp.asarray(0.4))
        psi_a["kappa"] = {k: jnp.asarray(0.3 * i - 0.6) for i, k in enumerate(ref.PARAM_NAMES)}
        cases = [
            (ref.variance, ref.step_grads,
             {"rho": jnp.log(jnp.asarray(0.4 - ref.TEMPERATURE_MIN)), "kappa": jnp.asarray(0.3)},
             [("rho",), ("kappa",)]),
            (ref.authors_variance, ref.authors_step_grads, psi_a,
             [("rho",), ("kappa", "enc0_W"), ("kappa", "enc0_b"), ("baseline", "W0"),
              ("baseline", "W1")]),
        ]
        h = 1e-5
        for var_fn, step_fn, psi, probes in cases:
            dpsi = step_fn(P, psi, u, x, mean, N)[1]
            for path in probes:
                def poke(d, path=path):
                    new = jax.tree.map(lambda v: v, psi)
                    node = new
                    for k in path[:-1]:
                        node = node[k]
                    leaf = node[path[-1]]
                    node[path[-1]] = leaf + d if leaf.ndim == 0 else leaf.at[(0,) * leaf.ndim].add(d)
                    return float(var_fn(P, new, u, x, mean, N)[0])

                fd = (poke(h) - poke(-h)) / (2 * h)
                got = dpsi
                for k in path:
                    got = got[k]
                got = float(got if got.ndim == 0 else got[(0,) * got.ndim])
                assert abs(fd) > 1e-8, (var_fn.__name__, path)
                assert abs(got - fd) <= 1e-5 * abs(fd) + 1e-10, (var_fn.__name__, path, got, fd)


def test_reference_step_matches_the_example_program():
    """The reference's ``log_joint`` and encoder are ``examples/sbn.py --preset rebar
    --model linear1 --estimator rebar`` itself (its model, guide, initial parameters,
    first minibatch and trainer's objective, NumPyro backend): one step's gradients
    of every parameter and of the adapted temperature and eta are equal on the same
    uniforms (the tests above use a small program of their own). In float32, as
    the example trains."""
    with jax.enable_x64(False):
        _compare_with_the_example_program()


def _compare_with_the_example_program():
    import sbn
    from data import load_mnist

    args = sbn.parse_args(["--preset", "rebar", "--model", "linear1", "--estimator", "rebar",
                           "--backend", "numpyro", "--threads", "0"])
    train = load_mnist(args.data, args.binarize, "train")
    args.num_data = len(train)
    bk, model, guide, trainer = sbn.build(args, train)
    idx, x = next(iter(train.batches(args.batch_size, np.random.default_rng(1000), 1)))
    num_data = float(len(train))
    P = {k: v for k, v in trainer.snapshot().items() if not k.startswith("_bg_")}
    assert sorted(P) == sorted(ref.PARAM_NAMES)
    mean = jnp.asarray(train.mean().astype(np.float32))
    u = jax.random.uniform(jax.random.PRNGKey(5), (len(x), P["enc0_b"].shape[-1]),
                           minval=jnp.finfo(jnp.float32).tiny)
    lam, eta = 0.5, 1.0  # the example's initial values
    psi = {"rho": jnp.log(jnp.float32(lam - ref.TEMPERATURE_MIN)),
           "kappa": jnp.float32(np.log(eta / (2 - eta)))}
    g_ref, dpsi_ref, loss_ref = jax.jit(ref.step_grads)(P, psi, u, jnp.asarray(x), mean,
                                                         num_data)
    elbo = trainer.svi.loss
    elbo._noise = {"b1": u}
    transforms = {"_bg_b1_temperature": dist.biject_to(
        dist.constraints.greater_than(ref.TEMPERATURE_MIN)),
        "_bg_b1_eta": dist.biject_to(dist.constraints.interval(0.0, 2.0))}
    unconstrained = {**P, "_bg_b1_temperature": transforms["_bg_b1_temperature"].inv(lam),
                     "_bg_b1_eta": transforms["_bg_b1_eta"].inv(eta)}
    loss, grads = jax.value_and_grad(lambda p: elbo.loss(
        jax.random.PRNGKey(0), transform_fn(transforms, p), model, trainer.guide,
        jnp.asarray(x), jnp.asarray(idx), num_data))(unconstrained)
    np.testing.assert_allclose(float(loss) / num_data, float(loss_ref), rtol=1e-5)
    assert u.dtype == jnp.float32 and P["enc0_W"].dtype == jnp.float32
    _assert_finite(grads, g_ref, dpsi_ref)
    for k in P:
        np.testing.assert_allclose(np.asarray(grads[k]) / num_data, np.asarray(g_ref[k]),
                                   rtol=2e-3, atol=2e-4 * float(jnp.max(jnp.abs(g_ref[k]))))
    for mine, theirs in (("rho", "_bg_b1_temperature"), ("kappa", "_bg_b1_eta")):
        assert abs(float(dpsi_ref[mine])) > 1e-6
        np.testing.assert_allclose(float(grads[theirs]) / num_data, float(dpsi_ref[mine]),
                                   rtol=2e-3)
