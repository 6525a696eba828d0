"""Exact ELBO (and its gradients) for small NumPyro models, by enumeration and quadrature.

``exact_elbo(params, model, guide, *args, **kwargs)`` is differentiable with ``jax.grad`` w.r.t. the
``params`` dict ({param name: value}, substituted into model and guide) and equals
``E_q[log p(x, z) - log q(z)]`` with Trace_ELBO's scale/mask semantics, computed by

* enumerating every joint configuration of the guide's discrete sites (Bernoulli, Categorical,
  any ``*OneHotCategorical`` with ``.logits``; possibly ``.to_event``, in plates, dependent). The
  weight of a configuration is the product of the discrete sites' UNSCALED, UNMASKED probabilities;
* Gauss-Hermite quadrature over reparameterized Normal guide sites (value = loc + sqrt(2)*scale*node).

Configurations are run one at a time under ``jax.vmap`` (no broadcasting requirement on the model).
Discrete log-probs (guide AND model sites, observed ones included) are computed from the logits,
``v*a - softplus(a)`` / ``log_softmax``: NumPyro's ``Bernoulli(logits=0.).log_prob`` has a wrong
gradient at logits exactly 0.

Importing this module enables float64 in JAX (``jax_enable_x64``), globally.
"""
import math

import numpy as np
import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)

import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro import handlers  # noqa: E402
from numpyro.distributions.distribution import (  # noqa: E402
    ExpandedDistribution, Independent, MaskedDistribution)
from numpyro.primitives import Messenger  # noqa: E402

MAX_DISCRETE_CONFIGS = 4096
MAX_TOTAL_CONFIGS = 400_000


def _sum_rightmost(x, k):
    return jnp.sum(x, axis=tuple(range(-k, 0))) if k > 0 else x


def _unwrap(fn):
    ev, masks = 0, []
    while True:
        if isinstance(fn, Independent):
            ev += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        elif isinstance(fn, MaskedDistribution):
            masks.append((fn._mask, ev))
            fn = fn.base_dist
        elif isinstance(fn, ExpandedDistribution):
            fn = fn.base_dist
        else:
            return fn, ev, masks


def _kind(fn):
    base, _, _ = _unwrap(fn)
    name = type(base).__name__
    if isinstance(base, (dist.BernoulliLogits, dist.BernoulliProbs)):
        return "bernoulli"
    if "OneHotCategorical" in name and hasattr(base, "logits"):
        return "onehot"
    if isinstance(base, (dist.CategoricalLogits, dist.CategoricalProbs)):
        return "categorical"
    if isinstance(base, dist.Normal) and fn.has_rsample:
        return "normal"
    return None


def _discrete_log_prob(fn, value):
    """(log q without masks, log q with Masked-distribution masks), shape
    broadcast(fn.batch_shape, value batch shape)."""
    base, ev, masks = _unwrap(fn)
    kind = _kind(base)
    a = base.logits
    if kind == "bernoulli":
        lp = value * a - jax.nn.softplus(a)
    elif kind == "onehot":
        lp = jnp.sum(value * jax.nn.log_softmax(a, -1), -1)
    elif kind == "categorical":
        ls = jax.nn.log_softmax(a, -1)
        shape = jnp.broadcast_shapes(ls.shape[:-1], jnp.shape(value))
        ls = jnp.broadcast_to(ls, shape + ls.shape[-1:])
        v = jnp.broadcast_to(jnp.asarray(value).astype(jnp.int32), shape)
        lp = jnp.take_along_axis(ls, v[..., None], -1)[..., 0]
    else:
        raise NotImplementedError(f"not a discrete distribution: {type(base).__name__}")
    event_dim = fn.event_dim
    shape = jnp.broadcast_shapes(tuple(fn.batch_shape), jnp.shape(value)[: jnp.ndim(value) - event_dim])
    # an observation smaller than the site (a scalar obs of an .expand(...).to_event(1) site)
    # counts once per element of the event dims too
    lp = jnp.broadcast_to(lp, jnp.broadcast_shapes(jnp.shape(lp), shape + tuple(fn.event_shape)[:ev]))
    lp_unmasked = _sum_rightmost(lp, ev)
    lp_masked, done = lp, 0
    for m, depth in sorted(masks, key=lambda t: -t[1]):
        lp_masked = _sum_rightmost(lp_masked, (ev - depth) - done)
        done = ev - depth
        lp_masked = jnp.where(m, lp_masked, 0.0)
    lp_masked = _sum_rightmost(lp_masked, ev - done)
    return jnp.broadcast_to(lp_unmasked, shape), jnp.broadcast_to(lp_masked, shape)


def _site_log_prob(site):
    fn, value = site["fn"], site["value"]
    if _kind(fn) in ("bernoulli", "categorical", "onehot"):
        lp = _discrete_log_prob(fn, value)[1]
    else:
        lp = fn.log_prob(value)
    if site.get("scale") is not None:
        lp = lp * site["scale"]
    return jnp.sum(lp)


def _normal_value(fn, node):
    base, _, _ = _unwrap(fn)
    return base.loc + math.sqrt(2.0) * base.scale * node


class _Site:
    def __init__(self, name, kind, shape, event_dim, K):
        self.name, self.kind, self.shape, self.event_dim, self.K = name, kind, shape, event_dim, K


def _build_grid(sites, num_nodes):
    """Mixed-radix enumeration. Returns C, {name: np array (C, *shape)}, log quad weights (C,)."""
    cards = []
    n_disc = n_total = 1
    for s in sites:
        n = int(np.prod(s.shape)) if s.shape else 1
        if s.kind == "onehot":
            n //= s.K
        cards.append((s.K, n))
        n_total *= s.K ** n
        if s.kind != "normal":
            n_disc *= s.K ** n
    if n_disc > MAX_DISCRETE_CONFIGS:
        raise NotImplementedError(f"{n_disc} discrete configurations > {MAX_DISCRETE_CONFIGS}")
    if n_total > MAX_TOTAL_CONFIGS:
        raise NotImplementedError(f"{n_total} configurations (with quadrature) > {MAX_TOTAL_CONFIGS}")
    C = n_total
    c = np.arange(C)
    stride = 1
    values, logw = {}, np.zeros(C)
    nodes, weights = np.polynomial.hermite.hermgauss(num_nodes)
    for s, (K, n) in zip(sites, cards):
        digits = np.stack([(c // (stride * K ** j)) % K for j in range(n)], axis=-1)  # (C, n)
        stride *= K ** n
        if s.kind == "bernoulli":
            v = digits.astype(np.float64).reshape((C,) + s.shape)
        elif s.kind == "categorical":
            v = digits.astype(np.int32).reshape((C,) + s.shape)
        elif s.kind == "onehot":
            v = np.eye(K)[digits].reshape((C,) + s.shape)
        else:
            v = nodes[digits].reshape((C,) + s.shape)
            logw += np.log(weights[digits] / np.sqrt(np.pi)).sum(-1)
        values[s.name] = v
    return C, values, logw


class _SetValues(Messenger):
    """Sets the value of every latent sample site: enumerated/quadrature values for the sites
    in ``sites``; with ``sites=None`` (discovery), zeros of the site's shape. No site is ever
    sampled, so no rng (and no threefry to compile) is needed."""

    def __init__(self, fn, sites, values):
        self.sites = None if sites is None else {s.name: s for s in sites}
        self.values = values
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["is_observed"] or msg["value"] is not None:
            return
        fn = msg["fn"]
        if self.sites is None:
            dtype = jnp.int32 if _kind(fn) == "categorical" else jnp.result_type(float)
            msg["value"] = jnp.zeros(fn.shape(msg["kwargs"].get("sample_shape", ())), dtype)
            return
        s = self.sites.get(msg["name"])
        if s is None:
            return
        v = self.values[s.name]
        msg["value"] = _normal_value(fn, v) if s.kind == "normal" else v


def _traces(params, model, guide, args, kwargs, sites=None, values=None):
    g = _SetValues(handlers.substitute(guide, data=params), sites, values)
    gtr = handlers.trace(g).get_trace(*args, **kwargs)
    m = handlers.substitute(model, data=params)
    mtr = handlers.trace(handlers.replay(m, trace=gtr)).get_trace(*args, **kwargs)
    return gtr, mtr


def _discover(params, model, guide, args, kwargs, num_nodes):
    gtr, _ = _traces(params, model, guide, args, kwargs)
    sites = []
    for name, site in gtr.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        fn = site["fn"]
        kind = _kind(fn)
        if kind is None:
            raise NotImplementedError(
                f"guide site {name!r}: {type(fn).__name__} is neither a discrete "
                "(Bernoulli/Categorical/OneHotCategorical) nor a reparameterized Normal site")
        base, _, _ = _unwrap(fn)
        K = {"bernoulli": 2, "normal": num_nodes}.get(kind) or base.logits.shape[-1]
        sites.append(_Site(name, kind, tuple(jnp.shape(site["value"])), fn.event_dim, K))
    return sites


def exact_elbo(params, model, guide, *args, num_nodes=40, **kwargs):
    """Exact ELBO (float64 scalar) of a small model; differentiable w.r.t. ``params``."""
    sites = _discover(params, model, guide, args, kwargs, num_nodes)
    C, values, logw = _build_grid(sites, num_nodes)
    values = {k: jnp.asarray(v) for k, v in values.items()}
    kinds = {s.name: s.kind for s in sites}

    def one(vals):
        gtr, mtr = _traces(params, model, guide, args, kwargs, sites, vals)
        f = 0.0
        lw = 0.0
        for name, site in mtr.items():
            if site["type"] != "sample":
                continue
            if not site["is_observed"] and name not in gtr:
                raise NotImplementedError(f"model latent site {name!r} is not in the guide")
            f = f + _site_log_prob(site)
        for name, site in gtr.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            f = f - _site_log_prob(site)
            if kinds[name] != "normal":
                lw = lw + jnp.sum(_discrete_log_prob(site["fn"], site["value"])[0])
        return lw, f

    lw, f = jax.vmap(one)(values)
    return jnp.sum(jnp.exp(lw + jnp.asarray(logw)) * f)


# ------------------------------------------------------------------------------------------
# convenience for specs
# ------------------------------------------------------------------------------------------

def bind(spec):
    """(model, guide, args) of ``spec`` (as given, possibly subsampled) for NumPyro."""
    import specs
    return spec.bind(specs.numpyro_backend())


def init_params(spec):
    """{param name: float64 jax array} at the spec's initial values (guide and model params).
    The spec runs abstractly (``jax.eval_shape``; no op is compiled): the values are the numpy
    init values it passes to ``B.param``."""
    import specs
    B = specs.numpyro_backend()
    inits = {}
    param = B.param

    def recording_param(name, init_value):
        inits.setdefault(name, np.asarray(init_value, dtype=np.float64))
        return param(name, init_value)

    B.param = recording_param
    model, guide, args = spec.full().bind(B)
    jax.eval_shape(lambda: _traces({}, model, guide, args, {}) and 0.0)
    return {k: jnp.asarray(v, dtype=jnp.float64) for k, v in inits.items()}


def exact_value_and_grads(spec, params=None, *, loss=False, num_nodes=40):
    """(value, {param name: numpy float64 gradient}) of the exact ELBO of ``spec.full()``
    (of the loss -ELBO with ``loss=True``) at ``params`` (default: the spec's initial params)."""
    if params is None:
        params = init_params(spec)
    model, guide, args = bind(spec.full())
    sign = -1.0 if loss else 1.0

    def fn(p):
        return sign * exact_elbo(p, model, guide, *args, num_nodes=num_nodes)

    vg = jax.value_and_grad(fn)
    try:  # cheaper XLA compile (about 40%); the numbers are the same
        value, grads = jax.jit(vg, compiler_options={"xla_backend_optimization_level": 0})(dict(params))
    except Exception:  # noqa: BLE001 -- option unknown to this jaxlib
        value, grads = jax.jit(vg)(dict(params))
    return float(value), {k: np.asarray(v, dtype=np.float64) for k, v in grads.items()}


def exact_grads(spec, params=None, *, loss=False, num_nodes=40):
    """{param name: numpy float64 gradient} of the exact ELBO (or -ELBO with ``loss=True``)."""
    return exact_value_and_grads(spec, params, loss=loss, num_nodes=num_nodes)[1]


# ------------------------------------------------------------------------------------------
# the K-sample importance-weighted bound (DESIGN.md, "Conventions shared by both packages")
# ------------------------------------------------------------------------------------------
#
# E[L_K] = sum_n sum_c prod_k q_n(c_k) * logmeanexp_k f_{n,k}(c_k) + outside, with c = (c_1..c_K)
# the joint configurations of ONE element (of the plates P common to all guide latent sites) in
# the K copies, enumerated for all elements at once ("diagonally"); see tests/pyro/pyro_oracle.py.
# Here configurations and copies run under two nested jax.vmap's (one copy, one configuration per
# trace, as in ``exact_elbo``).


def _site_log_prob_array(site):
    """Like ``_site_log_prob`` but not summed: shape = the site's batch shape."""
    fn, value = site["fn"], site["value"]
    if _kind(fn) in ("bernoulli", "categorical", "onehot"):
        lp = _discrete_log_prob(fn, value)[1]
    else:
        lp = fn.log_prob(value)
    if site.get("scale") is not None:
        lp = lp * site["scale"]
    return lp


def _discover_plates(params, model, guide, args, kwargs):
    """(max plate nesting M, {name: (dim, size)} of the plates common to every guide latent
    site); raises on subsampled plates."""
    gtr, mtr = _traces(params, model, guide, args, kwargs)
    M = 0
    for tr in (gtr, mtr):
        for name, site in tr.items():
            if site["type"] == "plate":
                size = site["args"][0]
                if jnp.shape(site["value"])[0] != size:
                    raise NotImplementedError(f"plate {name!r} is subsampled (use spec.full())")
            if site["type"] != "sample":
                continue
            for f in site["cond_indep_stack"]:
                M = max(M, -f.dim)
            M = max(M, len(site["fn"].batch_shape),
                    jnp.ndim(site["value"]) - site["fn"].event_dim)
    common = None
    for name, site in gtr.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        fr = {(f.name, f.dim, f.size) for f in site["cond_indep_stack"]}
        common = fr if common is None else common & fr
    return M, {n: (d, s) for n, d, s in (common or ())}


def _build_iwae_grid(sites, K, num_nodes, pdims):
    """Joint configurations of one element's latents in K copies, broadcast over P's dims.
    Returns C, {name: np array (C, K, *shape)}, log quadrature weights (C,)."""
    elem = []
    n_disc = n_total = 1
    for s in sites:
        bd = len(s.shape) - s.event_dim
        eshape = list(s.shape)
        for d in pdims:
            eshape[bd + d] = 1
        eshape = tuple(eshape)
        n = int(np.prod(eshape)) if eshape else 1
        if s.kind == "onehot":
            n //= s.K
        elem.append((eshape, n))
        n_total *= s.K ** (n * K)
        if s.kind != "normal":
            n_disc *= s.K ** (n * K)
    if n_disc > MAX_DISCRETE_CONFIGS:
        raise NotImplementedError(
            f"{n_disc} discrete configurations per element (K={K}) > {MAX_DISCRETE_CONFIGS}")
    if n_total > MAX_TOTAL_CONFIGS:
        raise NotImplementedError(
            f"{n_total} configurations per element (K={K}, with quadrature) > {MAX_TOTAL_CONFIGS}")
    C = n_total
    c = np.arange(C)
    stride = 1
    values = {s.name: [] for s in sites}
    logw = np.zeros(C)
    nodes, weights = np.polynomial.hermite.hermgauss(num_nodes)
    for k in range(K):
        for s, (eshape, n) in zip(sites, elem):
            Kc = s.K
            digits = np.stack([(c // (stride * Kc ** j)) % Kc for j in range(n)], axis=-1)  # (C, n)
            stride *= Kc ** n
            if s.kind == "bernoulli":
                v = digits.astype(np.float64).reshape((C,) + eshape)
            elif s.kind == "categorical":
                v = digits.astype(np.int32).reshape((C,) + eshape)
            elif s.kind == "onehot":
                v = np.eye(Kc)[digits].reshape((C,) + eshape)
            else:
                v = nodes[digits].reshape((C,) + eshape)
                logw += np.log(weights[digits] / np.sqrt(np.pi)).sum(-1)
            values[s.name].append(np.broadcast_to(v, (C,) + s.shape))
    return C, {k: np.stack(v, 1) for k, v in values.items()}, logw


def exact_iwae_bound(params, model, guide, *args, num_samples=1, num_nodes=40, **kwargs):
    """E over K = ``num_samples`` i.i.d. guide copies of the K-sample bound L_K (float64 scalar,
    differentiable w.r.t. ``params``). ``num_samples=1`` is the ELBO. Same site kinds as
    ``exact_elbo``; at most 4096 discrete (400,000 with quadrature) configurations of ONE element
    of P in all K copies. Subsampled plates raise (use ``spec.full()``: then s_P = 1).
    A site outside P whose log-prob depends on the latents makes L_K undefined: raises when the
    values are concrete, returns NaN under a jax transformation."""
    K = int(num_samples)
    if K < 1:
        raise ValueError("num_samples must be >= 1")
    sites = _discover(params, model, guide, args, kwargs, num_nodes)
    M, P = _discover_plates(params, model, guide, args, kwargs)
    pdims = {d for d, _ in P.values()}
    pshape = [1] * M
    for d, size in P.values():
        pshape[M + d] = size
    pshape = tuple(pshape)
    pnames = set(P)
    C, values, logw = _build_iwae_grid(sites, K, num_nodes, sorted(pdims))
    values = {k: jnp.asarray(v) for k, v in values.items()}
    kinds = {s.name: s.kind for s in sites}
    keep = tuple(M + d for d in range(-M, 0) if d not in pdims)

    def one(params, vals):
        gtr, mtr = _traces(params, model, guide, args, kwargs, sites, vals)
        f = jnp.zeros(pshape)
        lq = jnp.zeros(pshape)
        out = jnp.zeros(())

        def add(site, lp, sign):
            lp = jnp.reshape(lp, (1,) * (M - jnp.ndim(lp)) + jnp.shape(lp))
            if pnames <= {fr.name for fr in site["cond_indep_stack"]}:
                return f + sign * jnp.broadcast_to(jnp.sum(lp, keep, keepdims=True), pshape), out
            return f, out + sign * jnp.sum(lp)

        for name, site in mtr.items():
            if site["type"] != "sample":
                continue
            if not site["is_observed"] and name not in gtr:
                raise NotImplementedError(f"model latent site {name!r} is not in the guide")
            f, out = add(site, _site_log_prob_array(site), 1.0)
        for name, site in gtr.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            f, out = add(site, _site_log_prob_array(site), -1.0)
            if kinds[name] != "normal":
                lp = _discrete_log_prob(site["fn"], site["value"])[0]
                lp = jnp.reshape(lp, (1,) * (M - jnp.ndim(lp)) + jnp.shape(lp))
                lq = lq + jnp.broadcast_to(jnp.sum(lp, keep, keepdims=True), pshape)
        return lq, f, out

    # jit: called eagerly (outside any jax transformation) this is one compile instead of
    # thousands of op-by-op dispatches; inside jit/grad it is inlined/traced as usual
    core = jax.jit(lambda p, v: jax.vmap(jax.vmap(lambda u: one(p, u)))(v))
    lq, f, out = core(params, values)  # (C, K, *pshape) x2, (C, K)
    lw = jnp.sum(lq, 1) + jnp.reshape(jnp.asarray(logw), (C,) + (1,) * M)
    lme = jax.nn.logsumexp(f, 1) - math.log(K)
    const = jnp.all(jnp.abs(out - out[0, 0]) <= 1e-12 * (1 + jnp.max(jnp.abs(out))))
    if not isinstance(out, jax.core.Tracer):
        if not bool(const):
            raise NotImplementedError(
                f"a site outside the plates {sorted(pnames)} common to the latent sites depends "
                "on the latents: L_K is not defined for it")
        tot = np.asarray(jnp.sum(jnp.exp(lw), 0))
        assert np.abs(tot - 1).max() < 1e-8, f"configuration weights sum to {tot}"
    value = jnp.sum(jnp.exp(lw) * lme) + out[0, 0]
    return jnp.where(const, value, jnp.nan)


def exact_iwae_value_and_grads(spec, params=None, num_samples=1, *, loss=False, num_nodes=40):
    """(value, {param name: numpy float64 gradient}) of E[L_K] (K = ``num_samples``) of
    ``spec.full()`` (of -E[L_K] with ``loss=True``) at ``params`` (default: the spec's initial
    params), like ``exact_value_and_grads``."""
    if params is None:
        params = init_params(spec)
    model, guide, args = bind(spec.full())
    sign = -1.0 if loss else 1.0

    def fn(p):
        return sign * exact_iwae_bound(p, model, guide, *args, num_samples=num_samples,
                                       num_nodes=num_nodes)

    vg = jax.value_and_grad(fn)
    try:  # cheaper XLA compile; the numbers are the same
        value, grads = jax.jit(vg, compiler_options={"xla_backend_optimization_level": 0})(dict(params))
    except Exception:  # noqa: BLE001 -- option unknown to this jaxlib
        value, grads = jax.jit(vg)(dict(params))
    return float(value), {k: np.asarray(v, dtype=np.float64) for k, v in grads.items()}
