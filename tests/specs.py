"""Framework-neutral test models ("specs"), written once against a backend namespace ``B``.

The same spec builds a Pyro and a NumPyro model::

    import specs
    spec = specs.SPECS["sbn"]()                    # or specs.sbn(subsample_size=...) where relevant
    B = specs.pyro_backend()                       # or specs.numpyro_backend()
    model, guide, args = spec.bind(B)              # plain framework callables + framework arrays
    loss = pyro.infer.Trace_ELBO().loss(model, guide, *args)

A spec is an object with ``.name``, ``.args`` (tuple of numpy float64 arrays), ``.model(B, *args)``,
``.guide(B, *args)``, ``.full()`` (the same spec with every plate un-subsampled, which is what the
exact oracles use) and ``.discrete`` (True when the guide has no continuous site).

Rules every spec follows (the estimators rely on them as much as the oracles do):

* Broadcast-safe code: any number of extra batch dims may sit to the LEFT of the plate dims
  (the library's evaluation/particle dims, the Pyro oracle's configuration dim). Plates have
  explicit ``dim``s; a reduction over a plate dim keeps the dim (``keepdims=True``), so a
  global site computed from local values has batch shape ``(1,)`` in both model and guide.
* Guide logits in |logit| <= 2 at the initial parameters; at most 4096 joint discrete
  configurations (the full-data version).
* Every spec has guide params (prefix ``q_``) and model params (prefix ``p_``).
"""
from types import SimpleNamespace
import contextlib

import numpy as np


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------

def pyro_backend():
    import torch
    import pyro
    import pyro.distributions as dist
    import pyro.poutine as poutine

    def fdt():
        return torch.get_default_dtype()

    def asarray(x):
        if torch.is_tensor(x):
            return x
        x = np.asarray(x)
        if x.dtype == np.bool_:
            return torch.as_tensor(x)
        if np.issubdtype(x.dtype, np.integer):
            return torch.as_tensor(x, dtype=torch.long)
        return torch.as_tensor(x, dtype=fdt())

    def _sum(x, axis=None, keepdims=False):
        if axis is None:
            return x.sum()
        return x.sum(dim=axis, keepdim=keepdims)

    B = SimpleNamespace(
        name="pyro",
        dist=dist,
        sample=lambda name, fn, obs=None: pyro.sample(name, fn, obs=obs),
        param=lambda name, init_value: pyro.param(
            name, torch.tensor(np.asarray(init_value, dtype=np.float64), dtype=fdt())),
        plate=lambda name, size, subsample_size=None, dim=None: pyro.plate(
            name, size, subsample_size=subsample_size, dim=dim),
        scale=lambda s: poutine.scale(scale=s if np.isscalar(s) else asarray(s)),
        mask=lambda m: poutine.mask(mask=asarray(np.asarray(m, dtype=bool))),
        asarray=asarray,
        index_select=lambda x, dim, idx: x.index_select(dim, idx),
        take=lambda x, idx, axis=0: x.index_select(axis, idx),
        sigmoid=torch.sigmoid,
        softplus=torch.nn.functional.softplus,
        exp=torch.exp,
        log=torch.log,
        tanh=torch.tanh,
        sum=_sum,
        matmul=torch.matmul,
        zeros=lambda shape: torch.zeros(shape, dtype=fdt()),
        ones=lambda shape: torch.ones(shape, dtype=fdt()),
        one_hot=lambda idx, k: torch.nn.functional.one_hot(idx, k).to(fdt()),
        OneHotCategorical=dist.OneHotCategorical,
    )
    return B


def numpyro_backend():
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    import numpyro.handlers as handlers

    def asarray(x):
        if isinstance(x, jax.Array):
            return x
        x = np.asarray(x)
        if x.dtype == np.bool_ or np.issubdtype(x.dtype, np.integer):
            return jnp.asarray(x)
        return jnp.asarray(x, dtype=jnp.result_type(float))

    B = SimpleNamespace(
        name="numpyro",
        dist=dist,
        sample=lambda name, fn, obs=None: numpyro.sample(name, fn, obs=obs),
        param=lambda name, init_value: numpyro.param(
            name, asarray(np.asarray(init_value, dtype=np.float64))),
        plate=lambda name, size, subsample_size=None, dim=None: numpyro.plate(
            name, size, subsample_size=subsample_size, dim=dim),
        scale=lambda s: handlers.scale(scale=s if np.isscalar(s) else asarray(s)),
        mask=lambda m: handlers.mask(mask=jnp.asarray(np.asarray(m, dtype=bool))),
        asarray=asarray,
        index_select=lambda x, dim, idx: jnp.take(x, idx, axis=dim),
        take=lambda x, idx, axis=0: jnp.take(x, idx, axis=axis),
        sigmoid=jax.nn.sigmoid,
        softplus=jax.nn.softplus,
        exp=jnp.exp,
        log=jnp.log,
        tanh=jnp.tanh,
        sum=lambda x, axis=None, keepdims=False: jnp.sum(x, axis=axis, keepdims=keepdims),
        matmul=jnp.matmul,
        zeros=lambda shape: jnp.zeros(shape, dtype=jnp.result_type(float)),
        ones=lambda shape: jnp.ones(shape, dtype=jnp.result_type(float)),
        one_hot=lambda idx, k: jax.nn.one_hot(idx, k, dtype=jnp.result_type(float)),
        OneHotCategorical=__import__("numpyro_binary_grads").OneHotCategorical,
    )
    return B


# --------------------------------------------------------------------------------------------
# spec container
# --------------------------------------------------------------------------------------------

class Spec:
    def __init__(self, name, model, guide, args, full=None, discrete=True, doc=""):
        self.name = name
        self.model = model
        self.guide = guide
        self.args = tuple(np.asarray(a, dtype=np.float64) for a in args)
        self._full = full
        self.discrete = discrete
        self.doc = doc

    def full(self):
        """The same spec with every plate un-subsampled (what the oracles enumerate)."""
        return self._full() if self._full is not None else self

    def bind(self, B):
        """(model, guide, args) as plain callables of the framework of backend ``B``."""
        model = lambda *a: self.model(B, *a)
        guide = lambda *a: self.guide(B, *a)
        model.__name__ = f"{self.name}_model"
        guide.__name__ = f"{self.name}_guide"
        return model, guide, tuple(B.asarray(a) for a in self.args)

    def __repr__(self):
        return f"Spec({self.name!r})"


def _rng(seed):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------
# (a) scalar Bernoulli site
# --------------------------------------------------------------------------------------------

def scalar():
    x = np.array(1.3)

    def guide(B, x):
        a = B.param("q_logit", -0.5)
        B.sample("b", B.dist.Bernoulli(logits=a))

    def model(B, x):
        p = B.param("p_logit", -0.4)
        mu = B.param("p_mu", 0.5)
        b = B.sample("b", B.dist.Bernoulli(logits=p))
        B.sample("x", B.dist.Normal(mu * (2 * b - 1) + 0.2, 1.0), obs=x)

    return Spec("scalar", model, guide, (x,), doc="one scalar Bernoulli latent")


# --------------------------------------------------------------------------------------------
# (b) SBN-like: vector site with .to_event(1) inside a data plate
# --------------------------------------------------------------------------------------------

def sbn():
    N, D, H = 3, 4, 2
    r = _rng(1)
    x = (r.random((N, D)) < 0.5).astype(np.float64)
    qW = r.uniform(-0.6, 0.6, (D, H))
    qc = np.array([0.3, -0.4])
    pW = r.uniform(-0.8, 0.8, (H, D))

    def guide(B, x):
        W = B.param("q_W", qW)
        c = B.param("q_c", qc)
        with B.plate("data", N, dim=-1):
            B.sample("b", B.dist.Bernoulli(logits=B.matmul(x, W) + c).to_event(1))

    def model(B, x):
        p0 = B.param("p_prior", np.array([0.2, -0.5]))
        W = B.param("p_W", pW)
        c = B.param("p_c", np.array([0.1, -0.2, 0.3, 0.0]))
        with B.plate("data", N, dim=-1):
            b = B.sample("b", B.dist.Bernoulli(logits=p0).to_event(1))
            B.sample("x", B.dist.Bernoulli(logits=B.matmul(b, W) + c).to_event(1), obs=x)

    return Spec("sbn", model, guide, (x,), doc="3 data points x 2 latent bits, to_event(1)")


# --------------------------------------------------------------------------------------------
# (c) nested plates (plus a site in the outer plate only)
# --------------------------------------------------------------------------------------------

def nested():
    G, I = 2, 3
    r = _rng(2)
    y = r.normal(0.0, 1.0, (G, I))
    lb0 = r.uniform(-1.0, 1.0, (G, I))

    def guide(B, y):
        la = B.param("q_a", np.array([[0.5], [-0.8]]))
        lb = B.param("q_b", lb0)
        beta = B.param("q_beta", 0.6)
        with B.plate("group", G, dim=-2):
            a = B.sample("a", B.dist.Bernoulli(logits=la))
            with B.plate("item", I, dim=-1):
                B.sample("b", B.dist.Bernoulli(logits=lb + beta * (a - 0.5)))

    def model(B, y):
        pa = B.param("p_a", 0.3)
        pb = B.param("p_b", np.array([[-0.2], [0.4]]))
        w = B.param("p_w", 0.8)
        with B.plate("group", G, dim=-2):
            a = B.sample("a", B.dist.Bernoulli(logits=pa))
            with B.plate("item", I, dim=-1):
                b = B.sample("b", B.dist.Bernoulli(logits=pb + 0.5 * a))
                B.sample("y", B.dist.Normal(w * b - 0.3 * a, 1.0), obs=y)

    return Spec("nested", model, guide, (y,), doc="site b inside two plates, a in the outer one")


# --------------------------------------------------------------------------------------------
# (d) subsampled data plate (N=4, subsample_size=2)
# --------------------------------------------------------------------------------------------

def subsample(subsample_size=2):
    N = 4
    x = np.array([0.9, -0.4, 1.7, 0.2])

    def guide(B, x):
        w = B.param("q_w", 0.8)
        c = B.param("q_c", -0.3)
        with B.plate("data", N, subsample_size=subsample_size, dim=-1) as idx:
            xs = B.index_select(x, 0, idx)
            B.sample("b", B.dist.Bernoulli(logits=w * xs + c))

    def model(B, x):
        p = B.param("p_logit", 0.4)
        mu = B.param("p_mu", 1.1)
        with B.plate("data", N, subsample_size=subsample_size, dim=-1) as idx:
            xs = B.index_select(x, 0, idx)
            b = B.sample("b", B.dist.Bernoulli(logits=p))
            B.sample("x", B.dist.Normal(mu * b - 0.2, 0.8), obs=xs)

    full = None if subsample_size is None else (lambda: subsample(None))
    return Spec("subsample", model, guide, (x,), full=full,
                doc=f"data plate N=4, subsample_size={subsample_size}")


# --------------------------------------------------------------------------------------------
# (e) masked site
# --------------------------------------------------------------------------------------------

def masked():
    N = 4
    x = np.array([0.5, -1.0, 1.5, 0.3])
    m = np.array([True, True, False, True])

    def guide(B, x):
        a = B.param("q_logits", np.array([0.4, -0.9, 1.2, -0.1]))
        with B.plate("data", N, dim=-1), B.mask(m):
            B.sample("b", B.dist.Bernoulli(logits=a))

    def model(B, x):
        p = B.param("p_logit", -0.3)
        mu = B.param("p_mu", 0.9)
        with B.plate("data", N, dim=-1), B.mask(m):
            b = B.sample("b", B.dist.Bernoulli(logits=p))
            B.sample("x", B.dist.Normal(mu * b, 1.0), obs=x)

    return Spec("masked", model, guide, (x,),
                doc="element 2 masked in model and guide: its logit gradient is exactly 0")


# --------------------------------------------------------------------------------------------
# (f) two dependent layers in the guide
# --------------------------------------------------------------------------------------------

def two_layer():
    N, D, H1, H2 = 2, 3, 2, 2
    r = _rng(4)
    x = (r.random((N, D)) < 0.5).astype(np.float64)
    qW1 = r.uniform(-0.7, 0.7, (D, H1))
    qW2 = r.uniform(-1.0, 1.0, (H1, H2))
    pU = r.uniform(-1.0, 1.0, (H2, H1))
    pW = r.uniform(-1.0, 1.0, (H1, D))

    def guide(B, x):
        W1 = B.param("q_W1", qW1)
        c1 = B.param("q_c1", np.array([0.2, -0.3]))
        W2 = B.param("q_W2", qW2)
        c2 = B.param("q_c2", np.array([-0.1, 0.4]))
        with B.plate("data", N, dim=-1):
            b1 = B.sample("b1", B.dist.Bernoulli(logits=B.matmul(x, W1) + c1).to_event(1))
            B.sample("b2", B.dist.Bernoulli(logits=B.matmul(b1, W2) + c2).to_event(1))

    def model(B, x):
        p2 = B.param("p_prior", np.array([0.3, -0.2]))
        U = B.param("p_U", pU)
        d = B.param("p_d", np.array([0.1, -0.1]))
        W = B.param("p_W", pW)
        e = B.param("p_e", np.array([0.0, 0.2, -0.2]))
        with B.plate("data", N, dim=-1):
            b2 = B.sample("b2", B.dist.Bernoulli(logits=p2).to_event(1))
            b1 = B.sample("b1", B.dist.Bernoulli(logits=B.matmul(b2, U) + d).to_event(1))
            B.sample("x", B.dist.Bernoulli(logits=B.matmul(b1, W) + e).to_event(1), obs=x)

    return Spec("two_layer", model, guide, (x,), doc="guide b1 -> b2, model b2 -> b1 -> x")


# --------------------------------------------------------------------------------------------
# (g) reparameterized Normal upstream of a Bernoulli (the bias trap)
# --------------------------------------------------------------------------------------------

def mixed():
    N = 3
    x = np.array([0.7, -0.5, 1.2])

    def guide(B, x):
        mz = B.param("q_mz", 0.3)
        lz = B.param("q_log_sz", np.log(0.6))
        a = B.param("q_a", np.array([0.5, -0.7, 0.2]))
        k = B.param("q_k", 0.6)
        z = B.sample("z", B.dist.Normal(mz, B.exp(lz)))
        with B.plate("data", N, dim=-1):
            B.sample("b", B.dist.Bernoulli(logits=a + k * z))

    def model(B, x):
        p = B.param("p_logit", -0.2)
        r = B.param("p_r", 0.5)
        mu = B.param("p_mu", 1.0)
        z = B.sample("z", B.dist.Normal(0.0, 1.0))
        with B.plate("data", N, dim=-1):
            b = B.sample("b", B.dist.Bernoulli(logits=p + r * z))
            B.sample("x", B.dist.Normal(mu * b + 0.5 * z, 1.0), obs=x)

    return Spec("mixed", model, guide, (x,), discrete=False,
                doc="reparameterized Normal z upstream of Bernoulli b (logits depend on z)")


# --------------------------------------------------------------------------------------------
# (h) global latent drawn after local discrete sites (plate-localisation trap)
# --------------------------------------------------------------------------------------------

def global_after_local():
    N = 3
    x = np.array([0.4, 1.1, -0.6])

    def guide(B, x):
        a = B.param("q_a", np.array([0.6, -0.4, 0.1]))
        m = B.param("q_m", -0.2)
        w = B.param("q_w", 0.7)
        ls = B.param("q_log_s", np.log(0.7))
        with B.plate("data", N, dim=-1):
            b = B.sample("b", B.dist.Bernoulli(logits=a))
        # keepdims: a global site computed from local values has batch shape (1,)
        B.sample("u", B.dist.Normal(m + w * B.sum(b, -1, keepdims=True), B.exp(ls)))

    def model(B, x):
        p = B.param("p_logit", 0.1)
        r = B.param("p_r", -0.6)
        mu = B.param("p_mu", 0.8)
        u = B.sample("u", B.dist.Normal(B.zeros((1,)), 1.0))
        with B.plate("data", N, dim=-1):
            b = B.sample("b", B.dist.Bernoulli(logits=p + r * u))
            B.sample("x", B.dist.Normal(mu * b + 0.4 * u, 1.0), obs=x)

    return Spec("global_after_local", model, guide, (x,), discrete=False,
                doc="local b_n, then a global Normal u whose loc depends on sum(b)")


def global_after_local_discrete():
    N = 3
    x = np.array([0.4, 1.1, -0.6])

    def guide(B, x):
        a = B.param("q_a", np.array([0.6, -0.4, 0.1]))
        m = B.param("q_m", -0.5)
        w = B.param("q_w", 0.5)
        with B.plate("data", N, dim=-1):
            b = B.sample("b", B.dist.Bernoulli(logits=a))
        B.sample("g", B.dist.Bernoulli(logits=m + w * B.sum(b, -1, keepdims=True)))

    def model(B, x):
        pg = B.param("p_g", 0.2)
        p = B.param("p_logit", 0.1)
        r = B.param("p_r", -0.8)
        mu = B.param("p_mu", 0.8)
        g = B.sample("g", B.dist.Bernoulli(logits=pg * B.ones((1,))))
        with B.plate("data", N, dim=-1):
            b = B.sample("b", B.dist.Bernoulli(logits=p + r * g))
            B.sample("x", B.dist.Normal(mu * b + 0.4 * g, 1.0), obs=x)

    return Spec("global_after_local_discrete", model, guide, (x,),
                doc="local b_n, then a global Bernoulli g whose logit depends on sum(b)")


# --------------------------------------------------------------------------------------------
# (i) logits exactly 0.0 (NumPyro's Bernoulli.log_prob gradient bug)
# --------------------------------------------------------------------------------------------

def zero_logits():
    N = 3
    x = np.array([1.0, 0.0, 1.0])

    def guide(B, x):
        a = B.param("q_logits", np.zeros(N))
        with B.plate("data", N, dim=-1):
            B.sample("b", B.dist.Bernoulli(logits=a))

    def model(B, x):
        p = B.param("p_logit", 0.0)
        w = B.param("p_w", 1.5)
        c = B.param("p_c", 0.0)
        with B.plate("data", N, dim=-1):
            b = B.sample("b", B.dist.Bernoulli(logits=p))
            # logits exactly 0 for b = 0 (whatever w)
            B.sample("x", B.dist.Bernoulli(logits=w * b + c), obs=x)

    return Spec("zero_logits", model, guide, (x,), doc="all guide/model logits exactly 0.0")


# --------------------------------------------------------------------------------------------
# (j) Categorical guide sites
# --------------------------------------------------------------------------------------------

def categorical():
    y = np.array(0.8)
    r = _rng(5)
    qT = r.uniform(-1.0, 1.0, (3, 4))

    def guide(B, y):
        a1 = B.param("q_a1", np.array([0.4, -0.3, 0.1]))
        T = B.param("q_T", qT)
        c1 = B.sample("c1", B.dist.Categorical(logits=a1))
        B.sample("c2", B.dist.Categorical(logits=T[c1]))

    def model(B, y):
        p1 = B.param("p_1", np.array([0.0, 0.5, -0.5]))
        p2 = B.param("p_2", np.array([0.2, -0.2, 0.3, -0.3]))
        mu = B.param("p_mu", np.array([-1.0, 0.0, 1.0]))
        nu = B.param("p_nu", np.array([0.5, -0.5, 0.0, 1.0]))
        c1 = B.sample("c1", B.dist.Categorical(logits=p1))
        c2 = B.sample("c2", B.dist.Categorical(logits=p2))
        B.sample("y", B.dist.Normal(mu[c1] + nu[c2], 1.0), obs=y)

    return Spec("categorical", model, guide, (y,),
                doc="two Categorical sites (3 and 4 classes), c2's logits depend on c1")


def categorical_plate():
    N = 2
    y = np.array([0.8, -0.4])

    def guide(B, y):
        a = B.param("q_a", np.array([[0.4, -0.3, 0.1], [-0.6, 0.2, 0.5]]))
        with B.plate("data", N, dim=-1):
            B.sample("c", B.dist.Categorical(logits=a))

    def model(B, y):
        p = B.param("p_logits", np.array([0.1, 0.0, -0.1]))
        mu = B.param("p_mu", np.array([-1.0, 0.0, 1.0]))
        with B.plate("data", N, dim=-1):
            c = B.sample("c", B.dist.Categorical(logits=p))
            B.sample("y", B.dist.Normal(mu[c], 1.0), obs=y)

    return Spec("categorical_plate", model, guide, (y,), doc="a Categorical site in a plate of 2")


# --------------------------------------------------------------------------------------------
# (k) OneHotCategorical guide sites (one-hot values used in matrix products)
# --------------------------------------------------------------------------------------------

def onehot_plate():
    N = 2
    y = np.array([0.8, -0.4])

    def guide(B, y):
        a = B.param("q_a", np.array([[0.4, -0.3, 0.1], [-0.6, 0.2, 0.5]]))
        with B.plate("data", N, dim=-1):
            B.sample("z", B.OneHotCategorical(logits=a))

    def model(B, y):
        p = B.param("p_logits", np.array([0.1, 0.0, -0.1]))
        mu = B.param("p_mu", np.array([-1.0, 0.0, 1.0]))
        with B.plate("data", N, dim=-1):
            z = B.sample("z", B.OneHotCategorical(logits=p))
            B.sample("y", B.dist.Normal(B.sum(z * mu, -1), 1.0), obs=y)

    return Spec("onehot_plate", model, guide, (y,), doc="a 3-class one-hot site in a plate of 2")


def onehot_two_layer():
    N = 2
    y = np.array([0.5, -0.9])
    r = _rng(6)
    qT = r.uniform(-1.0, 1.0, (3, 4))
    pU = r.uniform(-1.0, 1.0, (4, 3))

    def guide(B, y):
        a1 = B.param("q_a1", np.array([[0.4, -0.3, 0.1], [-0.2, 0.6, -0.5]]))
        T = B.param("q_T", qT)
        with B.plate("data", N, dim=-1):
            z1 = B.sample("z1", B.OneHotCategorical(logits=a1))
            B.sample("z2", B.OneHotCategorical(logits=B.matmul(z1, T)))

    def model(B, y):
        p2 = B.param("p_2", np.array([0.2, -0.2, 0.3, -0.3]))
        U = B.param("p_U", pU)
        mu = B.param("p_mu", np.array([-1.0, 0.0, 1.0]))
        with B.plate("data", N, dim=-1):
            z2 = B.sample("z2", B.OneHotCategorical(logits=p2))
            z1 = B.sample("z1", B.OneHotCategorical(logits=B.matmul(z2, U)))
            B.sample("y", B.dist.Normal(B.sum(z1 * mu, -1) + 0.3 * z2[..., 0], 1.0), obs=y)

    return Spec("onehot_two_layer", model, guide, (y,),
                doc="guide z1 -> z2 (3 and 4 classes), model z2 -> z1 -> y, plate of 2")


# --------------------------------------------------------------------------------------------
# scale handlers
# --------------------------------------------------------------------------------------------

def scaled():
    N = 3
    x = np.array([0.2, 1.4, -0.3])
    s_lik = np.array([1.0, 2.0, 0.5])

    def guide(B, x):
        a = B.param("q_logits", np.array([0.3, -1.1, 0.8]))
        ag = B.param("q_g", -0.4)
        B.sample("g", B.dist.Bernoulli(logits=ag))
        with B.plate("data", N, dim=-1), B.scale(2.0):
            B.sample("b", B.dist.Bernoulli(logits=a))

    def model(B, x):
        pg = B.param("p_g", 0.3)
        p = B.param("p_logit", 0.2)
        mu = B.param("p_mu", 0.7)
        g = B.sample("g", B.dist.Bernoulli(logits=pg))
        with B.plate("data", N, dim=-1):
            with B.scale(2.0):
                b = B.sample("b", B.dist.Bernoulli(logits=p))
            with B.scale(s_lik):
                B.sample("x", B.dist.Normal(mu * b + 0.5 * g, 1.0), obs=x)

    return Spec("scaled", model, guide, (x,), doc="scale 2.0 on b (model+guide), array scale on x")


SPECS = {
    "scalar": scalar,
    "sbn": sbn,
    "nested": nested,
    "subsample": subsample,
    "masked": masked,
    "two_layer": two_layer,
    "mixed": mixed,
    "global_after_local": global_after_local,
    "global_after_local_discrete": global_after_local_discrete,
    "zero_logits": zero_logits,
    "categorical": categorical,
    "categorical_plate": categorical_plate,
    "scaled": scaled,
    "onehot_plate": onehot_plate,
    "onehot_two_layer": onehot_two_layer,
}

DISCRETE_SPECS = [k for k, f in SPECS.items() if f().discrete]
BERNOULLI_SPECS = [k for k in SPECS if not k.startswith(("categorical", "onehot"))]


# --------------------------------------------------------------------------------------------
# specs for the K-sample (IWAE) oracles only (not in SPECS: the other suites stay as they are)
# --------------------------------------------------------------------------------------------

def outside_obs(with_global=True):
    """Local Bernoulli b_n in a data plate, plus (``with_global``) a global observed site y with no
    latent dependence: outside the plates common to the latent sites, so the K-sample bound adds
    its log-prob once, outside the log-mean-exp."""
    N = 3
    x = np.array([0.6, -0.9, 1.4])
    y = np.array(0.35)

    def guide(B, x, y):
        a = B.param("q_a", np.array([0.2, -0.6, 0.9]))
        with B.plate("data", N, dim=-1):
            B.sample("b", B.dist.Bernoulli(logits=a))

    def model(B, x, y):
        p = B.param("p_logit", -0.3)
        mu = B.param("p_mu", 1.2)
        m = B.param("p_m", -0.4)
        if with_global:
            B.sample("y", B.dist.Normal(m, 1.0), obs=y)
        with B.plate("data", N, dim=-1):
            b = B.sample("b", B.dist.Bernoulli(logits=p))
            B.sample("x", B.dist.Normal(mu * b - 0.1, 1.0), obs=x)

    return Spec("outside_obs" if with_global else "outside_obs_without_y", model, guide, (x, y),
                doc="data plate of 3 local bits; a global observed y outside it (IWAE oracles)")


IWAE_SPECS = {
    "outside_obs": outside_obs,
}
