"""
The estimators on an accelerator: the noise, indices and masks the site
mechanism creates must follow the device and dtype of each site's logits.

Per package: one exact-gradient case (DisARM's mean over many draws against the
enumerated ELBO gradient, 5-SE rule with power, ``tests/stats.py``) computed
entirely on the GPU, and one step of the SBN of ``examples/distributed_sbn.py``
on the GPU equal to the same step on the CPU (same noise). And every class,
on a float32 program while the default dtype is float64 (Pyro: torch's
default; NumPyro: ``jax_enable_x64``): the loss and every gradient stay
float32 and on the device (a tensor created with the default dtype or device
would promote or move them).

The project has no skipped tests: without a CUDA device (Pyro) or a JAX GPU
device (NumPyro) these tests run on the CPU (the exact gradient and the dtypes
still checked; the CPU-vs-device comparison then compares the CPU with
itself); ``BINARY_GRADS_TEST_DEVICE`` (``cuda:1``, ``gpu``) forces a device.
"""

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import stats

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FORCED = os.environ.get("BINARY_GRADS_TEST_DEVICE")
X = np.array([1.3, -0.4, 0.2])  # three observations, one Bernoulli latent each
PHI0, PRIOR0, W0 = np.array([0.4, -1.1, 0.0]), np.array([-0.5, 0.3, 1.2]), 0.25
DRAWS, PARTICLES = 30, 4000


def _torch_device():
    import torch

    if FORCED:
        return torch.device(FORCED)
    # without CUDA the same checks run on the CPU: the exact-gradient test still
    # holds there, and the device-following code runs (trivially) on one device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _jax_device():
    import jax

    if FORCED:
        return jax.devices(FORCED)[0]
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:  # no JAX GPU: the same checks on the CPU
        return jax.devices("cpu")[0]


def _exact_elbo(xp, log_sigmoid, phi, prior, w, x):
    """sum_i E_q[log p(x_i, z_i) - log q(z_i)], enumerated over z_i in {0, 1}."""
    total = 0.0
    for z in (0.0, 1.0):
        lq = log_sigmoid(phi) if z else log_sigmoid(-phi)
        lp = log_sigmoid(prior) if z else log_sigmoid(-prior)
        mu = 2 * z - 1 + w
        ll = -0.5 * (x - mu) ** 2 - 0.5 * math.log(2 * math.pi)
        total = total + (xp.exp(lq) * (lp + ll - lq)).sum()
    return total


def _sbn_args():
    return argparse.Namespace(model="linear1", act="leaky_relu", pm1=False)


def _sbn_params(D=6, H=3):
    sys.path.insert(0, str(EXAMPLES))
    import common

    rng = np.random.default_rng(0)
    P = {"prior_logits": np.zeros(H)}
    common.mlp_init(rng, (H, D), "dec", P)
    common.mlp_init(rng, (D, H), "enc", P)
    x = (np.random.default_rng(1).random((8, D)) < 0.5).astype(np.float64)
    return P, x


# ---------------------------------------------------------------------------
# Pyro


def test_pyro_exact_gradient_on_gpu():
    import pyro
    import pyro.distributions as dist
    import torch
    import torch.nn.functional as F
    from pyro_binary_grads import DisARM_ELBO

    dev = _torch_device()
    t = lambda a: torch.tensor(a, dtype=torch.float64, device=dev)  # noqa: E731
    x = t(X)

    def model():
        prior, w = pyro.param("prior", t(PRIOR0)), pyro.param("w", t(W0))
        with pyro.plate("i", 3):
            z = pyro.sample("z", dist.Bernoulli(logits=prior))
            pyro.sample("x", dist.Normal(2 * z - 1 + w, 1.0), obs=x)

    def guide():
        phi = pyro.param("phi", t(PHI0))
        with pyro.plate("i", 3):
            pyro.sample("z", dist.Bernoulli(logits=phi))

    pyro.clear_param_store()
    names = ("phi", "prior", "w")
    p = {k: t(v).requires_grad_() for k, v in zip(names, (PHI0, PRIOR0, W0))}
    exact = torch.autograd.grad(-_exact_elbo(torch, F.logsigmoid, p["phi"], p["prior"],
                                             p["w"], x), [p[k] for k in names])
    exact = np.concatenate([g.cpu().numpy().reshape(-1) for g in exact])
    elbo = DisARM_ELBO(num_particles=PARTICLES, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(0)
    draws = []
    for _ in range(DRAWS):
        elbo.loss_and_grads(model, guide)
        store = pyro.get_param_store()
        ps = [store._params[k] for k in names]
        assert all(q.device.type == dev.type and q.grad.device.type == dev.type for q in ps)
        draws.append(np.concatenate([q.grad.cpu().numpy().reshape(-1) for q in ps]))
        for q in ps:
            q.grad = None
    res = stats.check_unbiased(np.array(draws), exact)
    stats.assert_powerful(res)


def test_pyro_sbn_step_on_gpu_equals_cpu():
    import pyro
    import torch

    sys.path.insert(0, str(EXAMPLES))
    import distributed_sbn as ds
    import sbn
    from pyro_binary_grads import DisARM_ELBO

    dev = _torch_device()
    P, x = _sbn_params()
    u = torch.rand(1, len(x), 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = []
    for device in ("cpu", dev):
        pyro.set_rng_seed(0)
        bk = ds.ModuleBackend(P, device, torch.float64)
        model, guide = sbn.model_and_guide(bk, _sbn_args(), x.mean(0))
        elbo = DisARM_ELBO(max_plate_nesting=1)
        elbo._noise = {"b1": u.to(device)}
        trainer = ds.DDPTrainer(bk, ds.ELBOLoss(bk.module, model, guide, elbo), 1, len(x),
                                lr=0.01, betas=(0.9, 0.999))
        loss = trainer.step(bk.asarray(x), bk.asarray(np.arange(len(x))), float(len(x)))
        params = trainer.snapshot()
        assert all(v.device.type == torch.device(device).type for v in params.values())
        out.append((loss, {k: v.cpu().numpy() for k, v in params.items()}))
    (l_cpu, p_cpu), (l_dev, p_dev) = out
    assert l_dev == pytest.approx(l_cpu, rel=1e-10)
    for k in p_cpu:
        np.testing.assert_allclose(p_dev[k], p_cpu[k], rtol=1e-9, atol=1e-12, err_msg=k)
    assert not np.allclose(p_cpu["enc0_W"], P["enc0_W"])


# ---------------------------------------------------------------------------
# NumPyro


def test_numpyro_exact_gradient_on_gpu():
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro_binary_grads import DisARM_ELBO

    dev = _jax_device()
    with jax.default_device(dev):
        x = jnp.asarray(X, jnp.float32)

        def model():
            prior = numpyro.param("prior", jnp.asarray(PRIOR0, jnp.float32))
            w = numpyro.param("w", jnp.asarray(W0, jnp.float32))
            with numpyro.plate("i", 3):
                z = numpyro.sample("z", dist.Bernoulli(logits=prior))
                numpyro.sample("x", dist.Normal(2 * z - 1 + w, 1.0), obs=x)

        def guide():
            phi = numpyro.param("phi", jnp.asarray(PHI0, jnp.float32))
            with numpyro.plate("i", 3):
                numpyro.sample("z", dist.Bernoulli(logits=phi))

        params = {"phi": jnp.asarray(PHI0, jnp.float32),
                  "prior": jnp.asarray(PRIOR0, jnp.float32), "w": jnp.asarray(W0, jnp.float32)}
        exact = jax.grad(lambda p: -_exact_elbo(jnp, jax.nn.log_sigmoid, p["phi"], p["prior"],
                                                p["w"], x))(params)
        elbo = DisARM_ELBO(num_particles=PARTICLES)
        grad = jax.jit(jax.grad(lambda p, k: elbo.loss(k, p, model, guide)))
        draws = []
        for key in jax.random.split(jax.random.PRNGKey(0), DRAWS):
            g = grad(params, key)
            assert all(dev in v.devices() for v in g.values())
            draws.append(np.concatenate([np.asarray(g[k], np.float64).reshape(-1)
                                         for k in ("phi", "prior", "w")]))
    exact = np.concatenate([np.asarray(exact[k], np.float64).reshape(-1)
                            for k in ("phi", "prior", "w")])
    # float32: allow the rounding of a sum of PARTICLES terms besides the 5 SE
    res = stats.check_unbiased(np.array(draws), exact, rtol_floor=1e-5)
    stats.assert_powerful(res)


def test_numpyro_sbn_step_on_gpu_equals_cpu():
    import jax

    sys.path.insert(0, str(EXAMPLES))
    import common
    import sbn
    from numpyro_binary_grads import DisARM_ELBO

    dev = _jax_device()
    P, x = _sbn_params()
    x = x.astype(np.float32)
    idx = np.arange(len(x))
    out = []
    for device in (jax.devices("cpu")[0], dev):
        with jax.default_device(device):
            bk = common.NumPyroBackend(P)
            model, guide = sbn.model_and_guide(bk, _sbn_args(), x.mean(0))
            trainer = common.NumPyroTrainer(bk, model, guide, DisARM_ELBO(),
                                            (x, idx, float(len(x))), seed=0, lr=0.01)
            xs, ids = jax.device_put(x, device), jax.device_put(idx, device)
            loss = trainer.step(xs, ids, float(len(x)))
            params = trainer.snapshot()
            assert all(device in v.devices() for v in params.values())
            out.append((loss, {k: np.asarray(v) for k, v in params.items()}))
    (l_cpu, p_cpu), (l_dev, p_dev) = out
    assert l_dev == pytest.approx(l_cpu, rel=1e-4)
    for k in p_cpu:
        np.testing.assert_allclose(p_dev[k], p_cpu[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert not np.allclose(p_cpu["enc0_W"], P["enc0_W"])


# ---------------------------------------------------------------------------
# every class: what the mechanism creates follows the logits' device and dtype
#
# A tensor created with the default dtype (or device) instead of the logits'
# promotes the loss: with float64 as the default (Pyro: torch's default dtype;
# NumPyro: jax_enable_x64) and a float32 program, the loss and every gradient
# must stay float32, and on the program's device.

PYRO_BERNOULLI = ["ARM_ELBO", "DisARM_ELBO", "RLOO_ELBO", "VIMCO", "LocalDisARM_IWAE",
                  "REBAR_ELBO", "RELAX_ELBO", "ST_ELBO", "GumbelSoftmaxST_ELBO", "ReinMax_ELBO"]
ONE_HOT = ["DisARM_ELBO", "RLOO_ELBO", "VIMCO", "REBAR_ELBO", "RELAX_ELBO", "ST_ELBO",
           "GumbelSoftmaxST_ELBO", "GumbelRao_ELBO", "ReinMax_ELBO", "ReinMaxRao_ELBO",
           "ReinMaxCV_ELBO"]
CASES = [(c, False) for c in PYRO_BERNOULLI] + [(c, True) for c in ONE_HOT]
CASE_IDS = [f"{c}-{'one-hot' if h else 'bernoulli'}" for c, h in CASES]


def _site_logits(xp, prior, one_hot):
    return xp.stack([prior, -prior], -1) if one_hot else prior


@pytest.mark.parametrize("name,one_hot", CASES, ids=CASE_IDS)
def test_pyro_created_tensors_follow_the_logits(name, one_hot):
    import pyro
    import pyro.distributions as dist
    import torch

    import pyro_binary_grads

    dev = _torch_device()
    t = lambda a: torch.tensor(a, dtype=torch.float32, device=dev)  # noqa: E731

    def site(logits):
        if one_hot:
            return pyro.sample("z", dist.OneHotCategorical(logits=logits))[..., 0]
        return pyro.sample("z", dist.Bernoulli(logits=logits))

    def model():
        prior, w = pyro.param("prior", t(PRIOR0)), pyro.param("w", t(W0))
        with pyro.plate("i", 3):
            z = site(_site_logits(torch, prior, one_hot))
            pyro.sample("x", dist.Normal(2 * z - 1 + w, 1.0), obs=t(X))

    def guide():
        phi = pyro.param("phi", t(PHI0))
        with pyro.plate("i", 3):
            site(_site_logits(torch, phi, one_hot))

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        elbo = getattr(pyro_binary_grads, name)()
        if hasattr(elbo, "wrap_guide"):
            guide = elbo.wrap_guide(guide)
        loss = elbo.loss_and_grads(model, guide)
        store = pyro.get_param_store()
        params = {k: store._params[k] for k in store.keys()}
    finally:
        torch.set_default_dtype(default)
    assert math.isfinite(loss)
    assert {"phi", "prior", "w"} <= set(params)
    for k, p in params.items():
        assert p.dtype == torch.float32 and p.device.type == dev.type, (k, p.dtype, p.device)
        assert p.grad is not None, k
        assert p.grad.dtype == torch.float32 and p.grad.device.type == dev.type, k
        assert torch.all(torch.isfinite(p.grad)), k
    if name.startswith("RE"):  # the adapted temperature and eta were created like the logits
        assert any(k.startswith("_bg_z_") for k in params)


@pytest.mark.parametrize("name,one_hot", CASES, ids=CASE_IDS)
def test_numpyro_created_tensors_follow_the_logits(name, one_hot):
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.handlers import seed, trace
    from numpyro.infer import Trace_ELBO

    import numpyro_binary_grads

    dev = _jax_device()
    f32 = lambda a: jax.device_put(np.asarray(a, np.float32), dev)  # noqa: E731

    def site(logits):
        if one_hot:
            return numpyro.sample("z", numpyro_binary_grads.OneHotCategorical(logits=logits))[..., 0]
        return numpyro.sample("z", dist.Bernoulli(logits=logits))

    def model():
        prior, w = numpyro.param("prior", f32(PRIOR0)), numpyro.param("w", f32(W0))
        with numpyro.plate("i", 3):
            z = site(_site_logits(jnp, prior, one_hot))
            # (NumPyro's Normal(loc, 1.0) is float64 under x64 whatever loc is)
            numpyro.factor("x", -0.5 * (f32(X) - (2 * z - 1 + w)) ** 2)

    def guide():
        phi = numpyro.param("phi", f32(PHI0))
        with numpyro.plate("i", 3):
            site(_site_logits(jnp, phi, one_hot))

    with jax.enable_x64(True):
        elbo = getattr(numpyro_binary_grads, name)()
        if hasattr(elbo, "wrap_guide"):
            guide = elbo.wrap_guide(guide)
        tr = trace(seed(guide, 0)).get_trace()
        params = {k: s["value"] for k, s in tr.items() if s["type"] == "param"}
        params.update(prior=f32(PRIOR0), w=f32(W0))
        loss, grads = jax.jit(jax.value_and_grad(
            lambda p: elbo.loss(jax.random.PRNGKey(0), p, model, guide)))(params)
        reference = Trace_ELBO().loss(jax.random.PRNGKey(0), params, model, guide)
    assert reference.dtype == jnp.float32  # the program itself stays float32
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    assert {"phi", "prior", "w"} <= set(grads)
    for k, g in jax.tree_util.tree_leaves_with_path(grads):
        assert g.dtype == jnp.float32 and dev in g.devices(), (k, g.dtype)
        assert np.all(np.isfinite(np.asarray(g))), k
