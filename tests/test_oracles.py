"""Cross-checks of the exact-gradient oracles (tests/pyro/pyro_oracle.py, tests/numpyro/numpyro_oracle.py)
and sanity checks of the framework-neutral specs (tests/specs.py)."""
import numpy as np
import pytest

import specs

import torch  # noqa: E402
import pyro  # noqa: E402
import numpyro  # noqa: E402,F401

import pyro.poutine as poutine  # noqa: E402
from pyro.infer import TraceEnum_ELBO, config_enumerate  # noqa: E402

import pyro_oracle  # noqa: E402
import numpyro_oracle  # noqa: E402  (enables jax float64)

ALL = list(specs.SPECS)
QUADRATURE = [k for k in ALL if not specs.SPECS[k]().discrete]


@pytest.fixture(autouse=True)
def float64_torch():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
    pyro.clear_param_store()


def _assert_grads_close(g1, g2, atol, what):
    assert set(g1) == set(g2), f"{what}: param names differ: {sorted(g1)} vs {sorted(g2)}"
    for k in g1:
        np.testing.assert_allclose(np.asarray(g1[k]), np.asarray(g2[k]), rtol=0, atol=atol,
                                   err_msg=f"{what}: gradient of {k!r}")


# ------------------------------------------------------------------------------------------
# (i) the Pyro and NumPyro oracles agree on every spec
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_pyro_and_numpyro_oracles_agree(name):
    spec = specs.SPECS[name]()
    v1, g1 = pyro_oracle.exact_value_and_grads(spec)
    v2, g2 = numpyro_oracle.exact_value_and_grads(spec)
    assert abs(v1 - v2) <= 1e-9, (v1, v2)
    _assert_grads_close(g1, g2, 1e-9, name)
    # the spec is meaningful: guide and model params, and nonzero gradients on both sides
    assert any(k.startswith("q_") for k in g1) and any(k.startswith("p_") for k in g1), sorted(g1)
    for prefix in ("q_", "p_"):
        assert max(np.abs(g).max() for k, g in g1.items() if k.startswith(prefix)) > 1e-3


# ------------------------------------------------------------------------------------------
# (ii) the Pyro oracle agrees with Pyro's TraceEnum_ELBO (guide-side parallel enumeration)
# ------------------------------------------------------------------------------------------

# Not here: "sbn" and "two_layer" (config_enumerate cannot enumerate .to_event sites) and
# "global_after_local_discrete": TraceEnum_ELBO is WRONG there (it warns "possibly invalid
# dependency"; its ELBO is off by ~1e-2 while the two oracles, a one-configuration-at-a-time loop
# and a hand-written numpy enumeration agree to 1e-15): the plate-localisation trap of DESIGN.md.
@pytest.mark.parametrize("name", ["scalar", "nested", "masked", "scaled", "zero_logits",
                                  "categorical", "categorical_plate"])
def test_pyro_oracle_matches_trace_enum_elbo(name):
    spec = specs.SPECS[name]()
    v_exact, g_exact = pyro_oracle.exact_value_and_grads(spec, loss=True)
    pyro_oracle.init_params(spec)
    model, guide, args = spec.full().bind(specs.pyro_backend())
    store = pyro.get_param_store()
    names = list(store.keys())
    params = [store[k].unconstrained() for k in names]
    loss = TraceEnum_ELBO(max_plate_nesting=2).differentiable_loss(
        model, config_enumerate(guide, default="parallel"), *args)
    grads = torch.autograd.grad(loss, params)
    assert abs(loss.item() - v_exact) <= 1e-8, (loss.item(), v_exact)
    _assert_grads_close({k: g.numpy() for k, g in zip(names, grads)}, g_exact, 1e-8, name)


# ------------------------------------------------------------------------------------------
# (iii) Gauss-Hermite quadrature has converged at 40 nodes
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", QUADRATURE)
def test_quadrature_converged(name):
    spec = specs.SPECS[name]()
    v40, g40 = pyro_oracle.exact_value_and_grads(spec, num_nodes=40)
    v60, g60 = pyro_oracle.exact_value_and_grads(spec, num_nodes=60)
    assert abs(v40 - v60) <= 1e-8, (v40, v60)
    _assert_grads_close(g40, g60, 1e-8, f"{name}: 40 vs 60 nodes")
    # not vacuous: a 2-node rule is visibly off
    v2, _ = pyro_oracle.exact_value_and_grads(spec, num_nodes=2)
    assert abs(v2 - v60) > 1e-6, (v2, v60)


def test_quadrature_matches_closed_form():
    # E_q[log N(z; 0, 1) - log N(z; m, s)] = -KL(N(m, s) || N(0, 1)), with gradients
    pyro.clear_param_store()

    def guide():
        m = pyro.param("m", torch.tensor(0.7))
        ls = pyro.param("ls", torch.tensor(-0.4))
        pyro.sample("z", pyro.distributions.Normal(m, ls.exp()))

    def model():
        pyro.sample("z", pyro.distributions.Normal(0.0, 1.0))

    elbo = pyro_oracle.exact_elbo(model, guide)
    m, ls = pyro.param("m"), pyro.param("ls")
    s2 = (2 * ls).exp()
    kl = 0.5 * (s2 + m ** 2 - 1) - ls
    assert abs(elbo.item() + kl.item()) < 1e-12
    g = torch.autograd.grad(elbo + kl, [m.unconstrained(), ls.unconstrained()])
    assert max(abs(x.item()) for x in g) < 1e-12


# ------------------------------------------------------------------------------------------
# the vectorized Pyro oracle (configurations in an extra dim left of the plates) equals one
# configuration at a time. (Broadcast-safety of every spec is also checked by (i): NumPyro's
# oracle runs configurations under vmap, unbatched.) Small specs only, for time.
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["scalar", "sbn", "masked", "mixed", "global_after_local",
                                  "categorical", "scaled"])
def test_pyro_oracle_vectorized_equals_loop(name):
    spec = specs.SPECS[name]()
    v1, g1 = pyro_oracle.exact_value_and_grads(spec, num_nodes=10)
    v2, g2 = pyro_oracle.exact_value_and_grads(spec, num_nodes=10, vectorize=False)
    assert abs(v1 - v2) <= 1e-10
    _assert_grads_close(g1, g2, 1e-10, name)


# ------------------------------------------------------------------------------------------
# spec conventions
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_spec_guide_logits_bounded(name):
    spec = specs.SPECS[name]()
    pyro_oracle.init_params(spec)
    pyro.set_rng_seed(0)
    model, guide, args = spec.bind(specs.pyro_backend())
    tr = poutine.trace(guide).get_trace(*args)
    n = 0
    for site in tr.nodes.values():
        kind = pyro_oracle._kind(site["fn"]) if site["type"] == "sample" else None
        if kind in ("bernoulli", "categorical", "onehot"):
            logits = pyro_oracle._unwrap(site["fn"])[0].logits
            if kind != "bernoulli":  # torch normalizes categorical logits: centre them
                logits = logits - logits.mean(-1, keepdim=True)
            assert logits.abs().max().item() <= 2.0, (site["name"], logits)
            n += 1
    assert n > 0


def test_subsample_spec_full_version():
    spec = specs.subsample()
    model, guide, args = spec.bind(specs.pyro_backend())
    pyro_oracle.init_params(spec)
    tr = poutine.trace(guide).get_trace(*args)
    assert tr.nodes["b"]["value"].shape == (2,) and tr.nodes["b"]["scale"] == 2.0
    full = spec.full()
    tr = poutine.trace(full.bind(specs.pyro_backend())[1]).get_trace(*args)
    assert tr.nodes["b"]["value"].shape == (4,)


def test_masked_element_has_zero_gradient():
    g = pyro_oracle.exact_grads(specs.masked())
    assert g["q_logits"][2] == 0.0 and np.all(g["q_logits"][[0, 1, 3]] != 0.0)
    g = numpyro_oracle.exact_grads(specs.masked())
    assert g["q_logits"][2] == 0.0 and np.all(g["q_logits"][[0, 1, 3]] != 0.0)


# ------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------

def test_oracles_refuse_unsupported():
    def guide():
        pyro.sample("z", pyro.distributions.Gamma(2.0, 1.0))

    def model():
        pyro.sample("z", pyro.distributions.Gamma(2.0, 1.0))

    with pytest.raises(NotImplementedError, match="'z'"):
        pyro_oracle.exact_elbo(model, guide)

    def big_guide():
        with pyro.plate("d", 13):
            pyro.sample("b", pyro.distributions.Bernoulli(logits=torch.zeros(13)))

    with pytest.raises(NotImplementedError, match="configurations"):
        pyro_oracle.exact_elbo(big_guide, big_guide)

    import numpyro
    import numpyro.distributions as ndist

    def nguide():
        numpyro.sample("z", ndist.Gamma(2.0, 1.0))

    with pytest.raises(NotImplementedError, match="'z'"):
        numpyro_oracle.exact_elbo({}, nguide, nguide)


# ------------------------------------------------------------------------------------------
# one-hot sites: same ELBO as the equivalent Categorical model
# ------------------------------------------------------------------------------------------

def test_onehot_equals_categorical():
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist

    a0, p0, mu0, y = [0.4, -0.3, 0.1], [0.2, 0.0, -0.5], [-1.0, 0.5, 1.0], 0.7
    values = {}
    for onehot in (False, True):
        pyro.clear_param_store()

        def guide():
            a = pyro.param("a", torch.tensor(a0))
            fn = pyro.distributions.OneHotCategorical if onehot else pyro.distributions.Categorical
            pyro.sample("c", fn(logits=a))

        def model():
            p = pyro.param("p", torch.tensor(p0))
            mu = pyro.param("mu", torch.tensor(mu0))
            if onehot:
                c = pyro.sample("c", pyro.distributions.OneHotCategorical(logits=p))
                loc = (c * mu).sum(-1)
            else:
                loc = mu[pyro.sample("c", pyro.distributions.Categorical(logits=p))]
            pyro.sample("y", pyro.distributions.Normal(loc, 1.0), obs=torch.tensor(y))

        elbo = pyro_oracle.exact_elbo(model, guide)
        names = ["a", "p", "mu"]
        g = torch.autograd.grad(elbo, [pyro.param(k).unconstrained() for k in names])
        values[onehot] = np.array([elbo.item()] + [x for t in g for x in t.tolist()])
    np.testing.assert_allclose(values[True], values[False], rtol=0, atol=1e-12)

    import numpyro_binary_grads as nbg
    OneHot = getattr(nbg, "OneHotCategorical", None)
    if OneHot is None:
        return

    def nguide():
        numpyro.sample("c", OneHot(logits=numpyro.param("a", jnp.asarray(a0))))

    def nmodel():
        mu = numpyro.param("mu", jnp.asarray(mu0))
        c = numpyro.sample("c", OneHot(logits=numpyro.param("p", jnp.asarray(p0))))
        numpyro.sample("y", ndist.Normal((c * mu).sum(-1), 1.0), obs=y)

    import jax
    params = {"a": jnp.asarray(a0), "p": jnp.asarray(p0), "mu": jnp.asarray(mu0)}
    v, g = jax.jit(jax.value_and_grad(lambda q: numpyro_oracle.exact_elbo(q, nmodel, nguide)))(params)
    got = np.array([float(v)] + [x for k in ["a", "p", "mu"] for x in np.asarray(g[k]).tolist()])
    np.testing.assert_allclose(got, values[False], rtol=0, atol=1e-12)
