"""Exact ELBO (and its gradients) for small Pyro models, by enumeration and quadrature.

``exact_elbo(model, guide, *args, **kwargs)`` returns a differentiable float64 torch scalar equal to
``E_q[log p(x, z) - log q(z)]`` with Trace_ELBO's scale/mask semantics (every log-prob term times the
site's scale, masked elements removed), computed by

* enumerating every joint configuration of the guide's non-reparameterized discrete sites
  (Bernoulli, Categorical, OneHotCategorical; possibly ``.to_event``, inside plates, depending on
  earlier sites). The weight of a configuration is the product of the discrete sites' UNSCALED,
  UNMASKED probabilities (masking removes a log-prob term from f, it does not change q);
* Gauss-Hermite quadrature over reparameterized Normal guide sites
  (value = loc + sqrt(2) * scale * node, weight w / sqrt(pi), so pathwise gradients flow).

Discrete log-probs (guide and model) are computed from the logits (``v*a - softplus(a)``,
``log_softmax``), never via ``fn.log_prob``. Anything else raises ``NotImplementedError``.

Configurations are vectorized in one extra batch dim placed left of every plate dim (the model and
guide must be broadcast-safe, as the library requires anyway); ``vectorize=False`` runs one
configuration at a time (a check of the specs' broadcasting).

Gradients: ``torch.autograd.grad(exact_elbo(...), params)``, or ``exact_grads(spec)``.
"""
import math

import numpy as np
import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

MAX_DISCRETE_CONFIGS = 4096
MAX_TOTAL_CONFIGS = 400_000


# ------------------------------------------------------------------------------------------
# distribution helpers
# ------------------------------------------------------------------------------------------

def _sum_rightmost(x, k):
    return x.sum(tuple(range(-k, 0))) if k > 0 else x


def _unwrap(fn):
    """Strip Independent/Expanded/Masked; returns (base, event_dims_added, masks)."""
    ev, masks = 0, []
    while True:
        if isinstance(fn, torch.distributions.Independent):
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
    if isinstance(base, torch.distributions.Bernoulli):
        return "bernoulli"
    if isinstance(base, torch.distributions.OneHotCategorical):
        return "onehot"
    if isinstance(base, torch.distributions.Categorical):
        return "categorical"
    if isinstance(base, torch.distributions.Normal) and fn.has_rsample:
        return "normal"
    return None


def _discrete_log_prob(fn, value):
    """(log q without masks, log q with Masked-distribution masks), both of shape
    broadcast(fn.batch_shape, value batch shape)."""
    base, ev, masks = _unwrap(fn)
    if isinstance(base, torch.distributions.Bernoulli):
        a = base.logits
        lp = value * a - torch.nn.functional.softplus(a)
        base_ev = 0
    elif isinstance(base, torch.distributions.OneHotCategorical):
        lp = (value * torch.log_softmax(base.logits, -1)).sum(-1)
        base_ev = 1
    elif isinstance(base, torch.distributions.Categorical):
        ls = torch.log_softmax(base.logits, -1)
        v = value.long().unsqueeze(-1)
        ls, v = torch.broadcast_tensors(ls, v)
        lp = ls.gather(-1, v[..., :1]).squeeze(-1)
        base_ev = 0
    else:
        raise NotImplementedError(f"not a discrete distribution: {type(base).__name__}")
    event_dim = base_ev + ev
    assert event_dim == fn.event_dim, (event_dim, fn.event_dim)
    shape = torch.broadcast_shapes(fn.batch_shape, value.shape[: value.dim() - fn.event_dim])
    # masks sit at event depth `d` (number of reinterpreted dims outside them): apply them
    # after summing the inner event dims, innermost first.
    lp_unmasked = _sum_rightmost(lp, ev)
    lp_masked = lp
    done = 0
    for m, depth in sorted(masks, key=lambda t: -t[1]):
        lp_masked = _sum_rightmost(lp_masked, (ev - depth) - done)
        done = ev - depth
        lp_masked = torch.where(torch.as_tensor(m), lp_masked, torch.zeros_like(lp_masked))
    lp_masked = _sum_rightmost(lp_masked, ev - done)
    return lp_unmasked.expand(shape), lp_masked.expand(shape)


def _site_log_prob(site):
    """Trace_ELBO's term for a site: scale * mask * log_prob (discrete ones computed by hand)."""
    fn, value = site["fn"], site["value"]
    if _kind(fn) in ("bernoulli", "categorical", "onehot"):
        lp = _discrete_log_prob(fn, value)[1]
    else:
        lp = fn.log_prob(value)
    if site["mask"] is not None:
        lp = torch.where(site["mask"], lp, torch.zeros_like(lp))
    if site["scale"] is not None:
        lp = lp * site["scale"]
    return lp


def _normal_value(fn, node):
    base, _, _ = _unwrap(fn)
    return base.loc + math.sqrt(2.0) * base.scale * node


# ------------------------------------------------------------------------------------------
# the configuration grid
# ------------------------------------------------------------------------------------------

class _Site:
    def __init__(self, name, kind, shape, event_dim, K):
        self.name, self.kind, self.shape, self.event_dim, self.K = name, kind, shape, event_dim, K

    @property
    def num_values(self):  # values per element (categorical-like) and number of elements
        n = int(np.prod(self.shape)) if self.shape else 1
        if self.kind == "onehot":
            n //= self.K
        return self.K, n


def _build_grid(sites, num_nodes):
    """Mixed-radix enumeration. Returns C, {name: np array (C, *shape)}, log quad weights (C,)."""
    cards = []
    for s in sites:
        K, n = s.num_values
        cards.append((K, n))
    n_disc = 1
    n_total = 1
    for s, (K, n) in zip(sites, cards):
        n_total *= K ** n
        if s.kind != "normal":
            n_disc *= K ** n
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
            v = digits.reshape((C,) + s.shape)
        elif s.kind == "onehot":
            v = np.eye(K)[digits].reshape((C,) + s.shape)
        else:  # normal: standard Gauss-Hermite nodes
            v = nodes[digits].reshape((C,) + s.shape)
            logw += np.log(weights[digits] / np.sqrt(np.pi)).sum(-1)
        values[s.name] = v
    return C, values, logw


class _SetValues(Messenger):
    """Sets the value of the enumerated/quadrature guide sites (broadcast fn seen from outside
    the user's plates)."""

    def __init__(self, sites, values):
        super().__init__()
        self.sites = {s.name: s for s in sites}
        self.values = values

    def _pyro_sample(self, msg):
        s = self.sites.get(msg["name"])
        if s is None or msg["is_observed"]:
            return
        v = self.values[s.name]
        msg["value"] = _normal_value(msg["fn"], v) if s.kind == "normal" else v


def _is_sample(site):
    return site["type"] == "sample" and not isinstance(site["fn"], _Subsample)


def _discover(model, guide, args, kwargs):
    with poutine.block(), torch.no_grad():
        gtr = poutine.trace(guide).get_trace(*args, **kwargs)
        mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(*args, **kwargs)
    sites = []
    P = 0
    for tr in (gtr, mtr):
        for site in tr.nodes.values():
            if not _is_sample(site):
                continue
            fn = site["fn"]
            for f in site["cond_indep_stack"]:
                if f.dim is not None:
                    P = max(P, -f.dim)
            P = max(P, len(fn.batch_shape), site["value"].dim() - fn.event_dim)
    for name, site in gtr.nodes.items():
        if not _is_sample(site) or site["is_observed"]:
            continue
        fn = site["fn"]
        kind = _kind(fn)
        if kind is None:
            raise NotImplementedError(
                f"guide site {name!r}: {type(fn).__name__} is neither a discrete "
                "(Bernoulli/Categorical/OneHotCategorical) nor a reparameterized Normal site")
        base, _, _ = _unwrap(fn)
        K = 2 if kind == "bernoulli" else (1 if kind == "normal" else base.logits.shape[-1])
        if kind == "normal":
            K = None
        shape = tuple(site["value"].shape)
        sites.append(_Site(name, kind, shape, fn.event_dim, K))
    return sites, P


def exact_elbo(model, guide, *args, num_nodes=40, vectorize=True, **kwargs):
    """Exact ELBO (float64 scalar, differentiable w.r.t. the param store) of a small model."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        sites, P = _discover(model, guide, args, kwargs)
        for s in sites:
            if s.kind == "normal":
                s.K = num_nodes
        C, values, logw = _build_grid(sites, num_nodes)
        if vectorize:
            tv = {}
            for s in sites:
                v = values[s.name]
                pad = P - (len(s.shape) - s.event_dim)
                v = v.reshape((C,) + (1,) * pad + s.shape)
                tv[s.name] = torch.as_tensor(v, dtype=torch.long if s.kind == "categorical"
                                             else torch.float64)
            return _run(model, guide, args, kwargs, sites, tv, torch.as_tensor(logw), P, C)
        total = 0.0
        for c in range(C):
            tv = {s.name: torch.as_tensor(values[s.name][c], dtype=torch.long if s.kind == "categorical"
                                          else torch.float64) for s in sites}
            total = total + _run(model, guide, args, kwargs, sites, tv,
                                 torch.as_tensor(logw[c:c + 1]), None, 1)
        return total
    finally:
        torch.set_default_dtype(old)


def _run(model, guide, args, kwargs, sites, tv, logw, P, C):
    def reduce(lp):
        # P is None: one configuration, no extra dim -> a scalar
        if P is None:
            return lp.sum().reshape(1)
        if lp.dim() > P:
            assert lp.dim() == P + 1, (lp.shape, P)
            return lp.reshape(lp.shape[0], -1).sum(-1)
        return lp.sum().reshape(1)

    with _SetValues(sites, tv):
        gtr = poutine.trace(guide).get_trace(*args, **kwargs)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(*args, **kwargs)
    kinds = {s.name: s.kind for s in sites}
    f = torch.zeros(C, dtype=torch.float64)
    for name, site in mtr.nodes.items():
        if _is_sample(site):
            if not site["is_observed"] and name not in gtr.nodes:
                raise NotImplementedError(f"model latent site {name!r} is not in the guide")
            f = f + reduce(_site_log_prob(site))
    for name, site in gtr.nodes.items():
        if not _is_sample(site) or site["is_observed"]:
            continue
        f = f - reduce(_site_log_prob(site))
        if kinds[name] != "normal":
            logw = logw + reduce(_discrete_log_prob(site["fn"], site["value"])[0])
    return (logw.exp() * f).sum()


# ------------------------------------------------------------------------------------------
# convenience for specs
# ------------------------------------------------------------------------------------------

def init_params(spec, clear=True):
    """Clear the param store (by default) and create the spec's params at their initial values
    (float64). Returns {name: unconstrained tensor}."""
    import specs
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        if clear:
            pyro.clear_param_store()
        B = specs.pyro_backend()
        model, guide, args = spec.full().bind(B)
        with torch.no_grad():
            gtr = poutine.trace(guide).get_trace(*args)
            poutine.trace(poutine.replay(model, trace=gtr)).get_trace(*args)
    finally:
        torch.set_default_dtype(old)
    store = pyro.get_param_store()
    return {k: store[k].unconstrained() for k in store.keys()}


def exact_grads(spec, *, loss=False, num_nodes=40, init=True, vectorize=True):
    """{param name: numpy float64 gradient} of the exact ELBO of ``spec.full()`` w.r.t. the
    (unconstrained) params in the param store; of the loss (-ELBO) with ``loss=True``.
    ``init=True`` (default) clears the store and sets the spec's initial params; with
    ``init=False`` the current param-store values are used (missing ones are created)."""
    value, grads = exact_value_and_grads(spec, loss=loss, num_nodes=num_nodes, init=init,
                                         vectorize=vectorize)
    return grads


def exact_value_and_grads(spec, *, loss=False, num_nodes=40, init=True, vectorize=True):
    import specs
    if init:
        init_params(spec)
    else:
        init_params(spec, clear=False)
    store = pyro.get_param_store()
    names = list(store.keys())
    uparams = [store[k].unconstrained() for k in names]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model, guide, args = spec.full().bind(specs.pyro_backend())
        elbo = exact_elbo(model, guide, *args, num_nodes=num_nodes, vectorize=vectorize)
    finally:
        torch.set_default_dtype(old)
    if loss:
        elbo = -elbo
    grads = torch.autograd.grad(elbo, uparams, allow_unused=True)
    out = {}
    for k, p, g in zip(names, uparams, grads):
        out[k] = np.zeros(tuple(p.shape)) if g is None else g.detach().double().numpy().copy()
    return elbo.item(), out


# ------------------------------------------------------------------------------------------
# the K-sample importance-weighted bound (DESIGN.md, "Conventions shared by both packages")
# ------------------------------------------------------------------------------------------
#
# L_K = sum_n s_P * logmeanexp_k f_{n,k} (+ the terms of sites outside P's plates, once), with P
# the plates common to all guide latent sites and n the elements of P. The guide factorizes over
# the elements of P (plates assert conditional independence and no latent lies outside P), and
# f_{n,k} depends on element n of copy k only, so
#     E[L_K] = sum_n sum_c prod_k q_n(c_k) * logmeanexp_k f_{n,k}(c_k) + outside,
# where c = (c_1..c_K) runs over the joint configurations of ONE element's latents in the K copies.
# All elements are enumerated at once ("diagonally"): configuration c gives every element of P
# the same digits, and the weights/f are kept per element. Values are laid out as
# (C, K, *plate dims); the K copies are just one more batch dim left of the plates.


def _discover_plates(model, guide, args, kwargs):
    """{name: (dim, size)} of the plates common to every guide latent site (P); raises on
    sequential or subsampled plates."""
    with poutine.block(), torch.no_grad():
        gtr = poutine.trace(guide).get_trace(*args, **kwargs)
        mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(*args, **kwargs)
    for tr in (gtr, mtr):
        for name, site in tr.nodes.items():
            if not _is_sample(site):
                continue
            for f in site["cond_indep_stack"]:
                if f.dim is None:
                    raise NotImplementedError(f"site {name!r}: sequential plate {f.name!r}")
                if f.full_size is not None and f.size != f.full_size:
                    raise NotImplementedError(
                        f"site {name!r}: plate {f.name!r} is subsampled (use spec.full())")
    common = None
    for name, site in gtr.nodes.items():
        if not _is_sample(site) or site["is_observed"]:
            continue
        fr = {(f.name, f.dim, f.size) for f in site["cond_indep_stack"]}
        common = fr if common is None else common & fr
    return {n: (d, s) for n, d, s in (common or ())}


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
                v = digits.reshape((C,) + eshape)
            elif s.kind == "onehot":
                v = np.eye(Kc)[digits].reshape((C,) + eshape)
            else:
                v = nodes[digits].reshape((C,) + eshape)
                logw += np.log(weights[digits] / np.sqrt(np.pi)).sum(-1)
            values[s.name].append(np.broadcast_to(v, (C,) + s.shape))
    return C, {k: np.stack(v, 1) for k, v in values.items()}, logw


def exact_iwae_bound(model, guide, *args, num_samples=1, num_nodes=40, **kwargs):
    """E over K = ``num_samples`` i.i.d. guide copies of the K-sample bound L_K (float64 scalar,
    differentiable w.r.t. the param store). ``num_samples=1`` is the ELBO. Same site kinds as
    ``exact_elbo``; at most 4096 discrete (400,000 with quadrature) configurations of ONE element
    of P in all K copies. Subsampled plates raise (use ``spec.full()``: then s_P = 1)."""
    K = int(num_samples)
    if K < 1:
        raise ValueError("num_samples must be >= 1")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        sites, M = _discover(model, guide, args, kwargs)
        P = _discover_plates(model, guide, args, kwargs)
        pdims = sorted(d for d, _ in P.values())
        for s in sites:
            if s.kind == "normal":
                s.K = num_nodes
        C, values, logw = _build_iwae_grid(sites, K, num_nodes, pdims)
        tv = {}
        for s in sites:
            pad = M - (len(s.shape) - s.event_dim)
            v = values[s.name].reshape((C, K) + (1,) * pad + s.shape)
            tv[s.name] = torch.as_tensor(v, dtype=torch.long if s.kind == "categorical"
                                         else torch.float64)
        return _run_iwae(model, guide, args, kwargs, sites, tv, torch.as_tensor(logw), M, P, C, K)
    finally:
        torch.set_default_dtype(old)


def _run_iwae(model, guide, args, kwargs, sites, tv, logw, M, P, C, K):
    pdims = {d for d, _ in P.values()}
    pshape = [1] * M
    for d, size in P.values():
        pshape[M + d] = size
    pshape = tuple(pshape)
    pnames = set(P)

    def align(lp):  # -> (C', K', *M dims)
        if lp.dim() <= M:
            return lp.reshape((1, 1) + (1,) * (M - lp.dim()) + tuple(lp.shape))
        assert lp.dim() == M + 2, (tuple(lp.shape), M)
        return lp

    def in_P(site):
        return pnames <= {f.name for f in site["cond_indep_stack"]}

    def reduce_P(lp):  # sum the non-P plate dims of an aligned log-prob
        dims = [2 + M + d for d in range(-M, 0) if d not in pdims]
        return lp.sum(dims, keepdim=True) if dims else lp

    with _SetValues(sites, tv):
        gtr = poutine.trace(guide).get_trace(*args, **kwargs)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(*args, **kwargs)
    kinds = {s.name: s.kind for s in sites}
    f = torch.zeros((1, 1) + pshape)
    lq = torch.zeros((1, 1) + pshape)
    outside = torch.zeros(())

    def add(site, name, lp, sign):
        nonlocal f, outside
        lp = align(lp)
        if in_P(site):
            f = f + sign * reduce_P(lp)
            return
        lp = lp.sum(tuple(range(2, 2 + M)))  # (C', K')
        with torch.no_grad():
            if (lp - lp.reshape(-1)[0]).abs().max() > 1e-12 * (1 + lp.abs().max()):
                raise NotImplementedError(
                    f"site {name!r} lies outside the plates {sorted(pnames)} common to the "
                    "latent sites and depends on the latents: L_K is not defined for it")
        outside = outside + sign * lp.reshape(-1)[0]

    for name, site in mtr.nodes.items():
        if _is_sample(site):
            if not site["is_observed"] and name not in gtr.nodes:
                raise NotImplementedError(f"model latent site {name!r} is not in the guide")
            add(site, name, _site_log_prob(site), 1.0)
    for name, site in gtr.nodes.items():
        if not _is_sample(site) or site["is_observed"]:
            continue
        add(site, name, _site_log_prob(site), -1.0)
        if kinds[name] != "normal":
            lq = lq + reduce_P(align(_discrete_log_prob(site["fn"], site["value"])[0]))
    full = (C, K) + pshape
    lw = lq.expand(full).sum(1) + logw.reshape((C,) + (1,) * M)  # (C, *pshape)
    with torch.no_grad():
        tot = lw.exp().sum(0)
        assert (tot - 1).abs().max() < 1e-8, f"configuration weights sum to {tot}"
    lme = torch.logsumexp(f.expand(full), 1) - math.log(K)
    return (lw.exp() * lme).sum() + outside


def exact_iwae_value_and_grads(spec, num_samples=1, *, loss=False, num_nodes=40, init=True):
    """(value, {param name: numpy float64 gradient}) of E[L_K] (K = ``num_samples``) of
    ``spec.full()`` (of -E[L_K] with ``loss=True``), like ``exact_value_and_grads``."""
    import specs
    init_params(spec, clear=init)
    store = pyro.get_param_store()
    names = list(store.keys())
    uparams = [store[k].unconstrained() for k in names]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model, guide, args = spec.full().bind(specs.pyro_backend())
        value = exact_iwae_bound(model, guide, *args, num_samples=num_samples, num_nodes=num_nodes)
    finally:
        torch.set_default_dtype(old)
    if loss:
        value = -value
    grads = torch.autograd.grad(value, uparams, allow_unused=True)
    out = {}
    for k, p, g in zip(names, uparams, grads):
        out[k] = np.zeros(tuple(p.shape)) if g is None else g.detach().double().numpy().copy()
    return value.item(), out
