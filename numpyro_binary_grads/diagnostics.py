"""
Gradient diagnostics on a user's own model, in JAX: measure several ELBO
estimators side by side (:func:`compare_estimators`) and, on small models,
against the exact gradient (:func:`exact_elbo`, by enumeration of the
guide's discrete sites). The NumPyro twin of
:mod:`pyro_binary_grads.diagnostics` (same table, same summaries).

Every gradient here is the gradient of the **loss** (the negative ELBO or
negative bound) with respect to the unconstrained parameters, which is what
:class:`numpyro.infer.SVI` hands to the optimizer.
"""

import math
import sys
import time

import numpy as np
import jax
from jax import random
import jax.numpy as jnp

import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.distribution import (
    ExpandedDistribution,
    Independent,
    MaskedDistribution,
    validation_enabled,
)
from numpyro.distributions.transforms import biject_to
from numpyro.primitives import Messenger

from binary_grads_common.report import Comparison, EstimatorReport, named_estimators

from .distributions import masked_log_softmax
from .structure import _bernoulli_log_prob, _bernoulli_logits, certain_logits

__all__ = ["compare_estimators", "exact_elbo"]

#: the largest number of joint discrete configurations :func:`exact_elbo` enumerates
MAX_CONFIGURATIONS = 2**16


# ---------------------------------------------------------------------------
# exact ELBO by enumeration
# ---------------------------------------------------------------------------

_BERNOULLI = (dist.BernoulliLogits, dist.BernoulliProbs)
_CATEGORICAL = (dist.CategoricalLogits, dist.CategoricalProbs)


def _kind(fn):
    """``"bernoulli"``, ``"categorical"``, ``"onehot"`` or ``None``."""
    while isinstance(fn, (Independent, MaskedDistribution, ExpandedDistribution)):
        fn = fn.base_dist
    if isinstance(fn, _BERNOULLI):
        return "bernoulli"
    if isinstance(fn, _CATEGORICAL):
        return "categorical"
    if "OneHotCategorical" in type(fn).__name__ and hasattr(fn, "logits"):
        return "onehot"
    return None


def _discrete_log_prob(fn, value, masked=True, certain=False):
    """Log-prob of a discrete value from the logits (NumPyro's
    ``Bernoulli(logits=0).log_prob`` has a wrong gradient), of ``fn``'s batch
    shape; ``masked=False`` ignores ``MaskedDistribution`` masks (for q);
    ``certain`` (a guide site) takes its :func:`certain_logits`, as the
    estimators do, so that a configuration of probability 0 has a finite
    log-prob (about -1e9) and weight exactly 0."""
    if isinstance(fn, Independent):
        lp = _discrete_log_prob(fn.base_dist, value, masked, certain)
        n = fn.reinterpreted_batch_ndims
        return jnp.sum(lp, axis=tuple(range(-n, 0))) if n else lp
    if isinstance(fn, MaskedDistribution):
        lp = _discrete_log_prob(fn.base_dist, value, masked, certain)
        return jnp.where(fn._mask, lp, 0.0) if masked else lp
    if isinstance(fn, ExpandedDistribution):
        lp = _discrete_log_prob(fn.base_dist, value, masked, certain)
        return jnp.broadcast_to(lp, jnp.broadcast_shapes(jnp.shape(lp), fn.batch_shape))
    kind = _kind(fn)
    a = _bernoulli_logits(fn, exact=certain) if kind == "bernoulli" else fn.logits
    a = certain_logits(a, kind) if certain else a
    if kind == "bernoulli":
        return _bernoulli_log_prob(a, jnp.asarray(value, dtype=jnp.result_type(a)))
    if kind == "onehot":
        return jnp.sum(value * masked_log_softmax(a, value), -1)
    logp = jax.nn.log_softmax(a, -1)
    shape = jnp.broadcast_shapes(logp.shape[:-1], jnp.shape(value))
    logp = jnp.broadcast_to(logp, shape + logp.shape[-1:])
    v = jnp.broadcast_to(jnp.asarray(value).astype(jnp.int32), shape)
    return jnp.take_along_axis(logp, v[..., None], -1)[..., 0]


def _log_f(site, certain=False):
    """A site's (scaled, masked) term of the ELBO integrand, summed."""
    fn, value = site["fn"], site["value"]
    lp = _discrete_log_prob(fn, value, certain=certain) if _kind(fn) else fn.log_prob(value)
    if site.get("scale") is not None:
        lp = lp * site["scale"]
    return jnp.sum(lp)


class _SetValues(Messenger):
    """Gives the enumerated guide sites their values."""

    def __init__(self, fn, values):
        self.values = values
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and msg["name"] in self.values:
            msg["value"] = self.values[msg["name"]]


def _traces(params, model, guide, args, kwargs, values):
    guide = handlers.seed(handlers.substitute(guide, data=params), 0)
    gtr = handlers.trace(_SetValues(guide, values)).get_trace(*args, **kwargs)
    model = handlers.seed(handlers.substitute(model, data=params), 0)
    mtr = handlers.trace(handlers.replay(model, trace=gtr)).get_trace(*args, **kwargs)
    return gtr, mtr


def _grid(sites):
    """Every joint configuration of the guide's discrete sites (mixed radix,
    the first site varying fastest): ``{name: array (C, *value shape)}``."""
    sizes = [int(np.prod(shape[:-1] if kind == "onehot" else shape, dtype=np.int64))
             for name, kind, shape, K in sites]
    C = math.prod(K**n for (name, kind, shape, K), n in zip(sites, sizes))
    if C > MAX_CONFIGURATIONS:
        raise ValueError(
            f"exact=True would enumerate {C} joint configurations of the guide's "
            f"discrete sites {[s[0] for s in sites]} (limit {MAX_CONFIGURATIONS}); "
            "use exact=False, or a smaller model (fewer or smaller discrete sites)."
        )
    c, stride, values = np.arange(C), 1, {}
    for (name, kind, shape, K), n in zip(sites, sizes):
        d = np.zeros((C, n), dtype=np.int32)
        for j in range(n):
            d[:, j] = (c // stride) % K
            stride *= K
        if kind == "onehot":
            values[name] = jnp.asarray(np.eye(K)[d].reshape((C,) + shape))
        elif kind == "bernoulli":
            values[name] = jnp.asarray(d.reshape((C,) + shape), dtype=jnp.result_type(float))
        else:
            values[name] = jnp.asarray(d.reshape((C,) + shape))
    return C, values


def _discrete_sites(params, model, guide, args, kwargs, what="exact=True"):
    """``[(name, kind, value shape, K)]`` of the guide's latent sites; raises
    on a continuous one."""
    gtr, _ = _traces(params, model, guide, args, kwargs, {})
    sites = []
    for name, site in gtr.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        kind = _kind(site["fn"])
        if kind is None or site["fn"].has_rsample:
            raise ValueError(
                f"{what} enumerates the guide's discrete sites, but guide site '{name}' "
                f"is a {type(site['fn']).__name__}, not a Bernoulli, Categorical or "
                "OneHotCategorical site; continuous latent sites cannot be enumerated. "
                "Use exact=False (no bias column), or compare on a model whose guide is "
                "discrete."
            )
        fn = site["fn"]
        while isinstance(fn, (Independent, MaskedDistribution, ExpandedDistribution)):
            fn = fn.base_dist
        K = 2 if kind == "bernoulli" else fn.logits.shape[-1]
        sites.append((name, kind, tuple(jnp.shape(site["value"])), K))
    return sites


def exact_elbo(params, model, guide, *args, **kwargs):
    """
    The exact ELBO :math:`\\sum_c q(c)\\, f(c)` of a small model whose guide
    has only discrete latent sites (``Bernoulli``, ``Categorical``,
    ``OneHotCategorical``; possibly ``.to_event``, inside plates, depending on
    earlier sites), by enumeration of every joint configuration :math:`c` of
    those sites, with :math:`f = \\log p(x, c) - \\log q(c)` (scales and masks
    as in ``Trace_ELBO``) and :math:`q(c)` the product of the sites'
    unscaled probabilities. The configurations run under ``jax.vmap``, one at
    a time as far as the model is concerned (no broadcasting requirement).
    Differentiable w.r.t. ``params`` (``jax.grad``).

    :param dict params: constrained parameter values, substituted into model
        and guide.
    :raises ValueError: a continuous latent guide site, or more than
        :data:`MAX_CONFIGURATIONS` configurations.

    It runs with NumPyro's validation off, as the estimators' evaluations
    do, so masked classes at ``-inf`` are accepted (their configurations
    count 0).
    """
    with validation_enabled(False):
        return _exact_elbo(params, model, guide, args, kwargs)


def _exact_elbo(params, model, guide, args, kwargs):
    sites = _discrete_sites(params, model, guide, args, kwargs)
    _, mtr = _traces(params, model, guide, args, kwargs, {})
    names = {s[0] for s in sites}
    for name, site in mtr.items():
        if site["type"] == "sample" and not site["is_observed"] and name not in names:
            raise ValueError(f"Model site '{name}' is latent but not in the guide.")
    C, grid = _grid(sites)

    def one(values):
        gtr, mtr = _traces(params, model, guide, args, kwargs, values)
        f, log_q = 0.0, 0.0
        for site in mtr.values():
            if site["type"] == "sample":
                f = f + _log_f(site)
        for name, site in gtr.items():
            if site["type"] == "sample" and not site["is_observed"]:
                f = f - _log_f(site, certain=True)
                log_q = log_q + jnp.sum(
                    _discrete_log_prob(site["fn"], site["value"], False, certain=True))
        return log_q, f

    log_q, f = jax.vmap(one)(grid)
    q = jnp.exp(log_q)
    # a configuration of probability 0 counts 0 (its f may be -inf: a masked
    # class in the model's prior too)
    return jnp.sum(q * jnp.where(q > 0, f, 0.0))


# ---------------------------------------------------------------------------
# compare_estimators
# ---------------------------------------------------------------------------


class _Counted:
    """A model or guide that counts its Python calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def init_params(rng_key, model, guide, *args, **kwargs):
    """
    The initial values of every ``numpyro.param`` of guide and model (a seeded
    run of the guide, then the model replayed on it), as
    ``{name: (constrained value, constraint)}``.
    """
    guide_key, model_key = random.split(rng_key)
    gtr = handlers.trace(handlers.seed(guide, guide_key)).get_trace(*args, **kwargs)
    mtr = handlers.trace(
        handlers.replay(handlers.seed(model, model_key), trace=gtr)
    ).get_trace(*args, **kwargs)
    out = {}
    for tr in (gtr, mtr):
        for name, site in tr.items():
            if site["type"] == "param" and name not in out:
                constraint = site["kwargs"].get("constraint", constraints.real)
                out[name] = (site["value"], constraint)
    return out


def evaluations_per_step(elbo, num_discrete_sites):
    """
    The integrand evaluations one step of ``elbo`` costs, times its
    ``num_particles``: ``2 P`` for ``num_pairs=P`` (local DisARM), ``K`` for
    ``num_samples=K`` (RLOO, VIMCO), ``1 + T`` for this package's pair
    estimators (ARM, DisARM; ``T`` discrete guide sites), 1 otherwise (one
    sample per particle, as NumPyro's own ELBOs).
    """
    if hasattr(elbo, "num_evaluations"):
        n = elbo.num_evaluations
        per_draw = n(num_discrete_sites) if callable(n) else n
    elif hasattr(elbo, "num_pairs"):
        per_draw = 2 * elbo.num_pairs
    elif hasattr(elbo, "num_samples"):
        per_draw = elbo.num_samples
    elif any(c.__module__.startswith("numpyro_binary_grads")
             and c.__name__ in ("ARM_ELBO", "DisARM_ELBO") for c in type(elbo).__mro__):
        per_draw = 1 + num_discrete_sites
    else:
        per_draw = 1
    return per_draw * getattr(elbo, "num_particles", 1)


def gradient_function(elbo, model, guide, args, kwargs, transforms):
    """``grad(unconstrained params, key)`` of ``elbo``'s loss, as SVI computes it."""

    def loss(uparams, key):
        params = {k: transforms[k](u) for k, u in uparams.items()}
        return elbo.loss(key, params, model, guide, *args, **kwargs)

    return jax.grad(loss)


def compare_estimators(rng_key, model, guide, *args, estimators, num_samples=1000, exact=False,
                       params=None, compiler_options=None, progress=False, on_row=None,
                       **kwargs):
    """
    Measure gradient estimators on your own model, at given parameter values.

    For each estimator (an ELBO instance: one of this package's classes, or
    NumPyro's own, e.g. ``TraceGraph_ELBO()``), draws ``num_samples``
    single-step gradients of its loss ``elbo.loss(key, params, model, guide,
    ...)`` w.r.t. every unconstrained parameter (as :class:`~numpyro.infer.SVI`
    differentiates it), under ``jax.jit``, and reports:

    * the mean and variance of the gradient per parameter, the total variance
      (summed over coordinates), the variance per parameter group (one group
      per param name) and the signal-to-noise ratio ``|mean| / std``
      (median over coordinates);
    * the cost per step: *executions*, the Python calls of model plus guide
      while one step is traced (under ``jit`` this is compile-time work; a
      ``vmap``-ed call counts once, and this package's ELBOs also trace model
      and guide once abstractly to find the discrete sites), *evaluations*,
      the evaluations of the ELBO integrand (:func:`evaluations_per_step`),
      and wall-clock milliseconds per step after compilation;
    * with ``exact=True``, the exact gradient (:func:`exact_elbo`, by
      enumeration; the guide must have only discrete latent sites), the bias
      ``mean - exact`` per parameter and its z-scores
      ``bias / sqrt(var / num_samples)``, summarised as ``max |z|`` and
      ``rms z`` (about 1 for an unbiased estimator).

    Draw ``i`` uses the key ``jax.random.split(draw_key, num_samples)[i]``
    with ``draw_key = jax.random.split(rng_key)[1]`` for every estimator
    (common keys; the same numbers on every call).

    Example::

        from numpyro.infer import TraceGraph_ELBO
        from numpyro_binary_grads import DisARM_ELBO, compare_estimators

        table = compare_estimators(jax.random.PRNGKey(0), model, guide, data,
                                   estimators=[DisARM_ELBO(), TraceGraph_ELBO()],
                                   num_samples=1000, params=svi.get_params(svi_state))
        print(table)

    :param jax.random.PRNGKey rng_key: the key of the parameter
        initialisation (when ``params`` is not given) and of the draws.
    :param model: the NumPyro model.
    :param guide: the NumPyro guide.
    :param args: arguments of model and guide.
    :param estimators: a list of ELBO instances, or a dict ``{label: ELBO}``.
    :param int num_samples: gradient draws per estimator.
    :param bool exact: also compute the bias against the exact gradient.
    :param dict params: the constrained parameter values to measure at, e.g.
        ``svi.get_params(state)``; missing ones (or all, when ``None``) take
        their initial values from a seeded run of guide and model
        (:func:`init_params`).
    :param dict compiler_options: passed to :func:`jax.jit` for the gradient
        functions (e.g. ``{"xla_backend_optimization_level": 0}`` compiles
        faster, runs slower).
    :param bool progress: show a progress bar of the draws on stderr (tqdm,
        if installed).
    :param on_row: called with each :class:`EstimatorReport` as soon as its
        estimator is done (e.g. to print it).
    :param kwargs: keyword arguments of model and guide (so ``estimators``,
        ``num_samples``, ``exact``, ``params``, ``compiler_options``,
        ``progress`` and ``on_row`` cannot be passed through: wrap the model if
        it needs them).
    :returns: a :class:`Comparison`.
    """
    if num_samples < 2:
        raise ValueError(f"compare_estimators needs num_samples >= 2, got {num_samples}.")
    items = named_estimators(estimators)
    if not items:
        raise ValueError("compare_estimators needs at least one estimator.")
    init_key, draw_key = random.split(rng_key)
    found = init_params(init_key, model, guide, *args, **kwargs)
    params = dict(params or {})
    transforms = {k: biject_to(c) for k, (_, c) in found.items()}
    uparams = {k: transforms[k].inv(params.get(k, v)) for k, (v, _) in found.items()}
    constrained = {k: transforms[k](u) for k, u in uparams.items()}
    num_discrete = sum(k is not None
                       for k in _latent_kinds(constrained, model, guide, args, kwargs))
    exact_grads = None
    if exact:
        if progress:
            print("exact gradient by enumeration ...", file=sys.stderr, flush=True)
        def exact_loss(u):
            return -exact_elbo({k: transforms[k](v) for k, v in u.items()}, model, guide,
                               *args, **kwargs)

        exact_grad = jax.jit(jax.grad(exact_loss), compiler_options=compiler_options)
        exact_grads = {k: np.asarray(g) for k, g in exact_grad(uparams).items()}
    keys = random.split(draw_key, num_samples)
    rows = []
    bar = _progress_bar(progress, len(items) * num_samples)
    for name, elbo in items:
        if bar is not None:
            bar.set_description(name)
        counted_model, counted_guide = _Counted(model), _Counted(guide)
        grad = jax.jit(gradient_function(elbo, counted_model, counted_guide, args, kwargs,
                                         transforms), compiler_options=compiler_options)
        first = jax.block_until_ready(grad(uparams, keys[0]))  # traces (counted), compiles
        executions = counted_model.calls + counted_guide.calls
        draws = {k: np.empty((num_samples,) + np.shape(v)) for k, v in uparams.items()}
        for k in draws:
            draws[k][0] = first[k]
        if bar is not None:
            bar.update(1)
        start = time.perf_counter()
        for i in range(1, num_samples):
            g = jax.block_until_ready(grad(uparams, keys[i]))
            for k in draws:
                draws[k][i] = g[k]
            if bar is not None:
                bar.update(1)
        seconds = time.perf_counter() - start
        rows.append(EstimatorReport(
            name, num_samples,
            executions=executions,
            evaluations=evaluations_per_step(elbo, num_discrete),
            ms_per_step=1e3 * seconds / (num_samples - 1),
            mean={k: d.mean(0) for k, d in draws.items()},
            var={k: d.var(0, ddof=1) for k, d in draws.items()},
            exact=exact_grads,
        ))
        if on_row is not None:
            on_row(rows[-1])
    if bar is not None:
        bar.close()
    return Comparison(rows)


def _latent_kinds(params, model, guide, args, kwargs):
    """The kind of every latent guide site (``None`` for continuous ones)."""
    gtr, _ = _traces(params, model, guide, args, kwargs, {})
    return [_kind(site["fn"]) if not site["fn"].has_rsample else None
            for site in gtr.values() if site["type"] == "sample" and not site["is_observed"]]


def _progress_bar(progress, total):
    """A tqdm bar on stderr when ``progress`` and tqdm is installed, else None."""
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, file=sys.stderr, unit="draw", mininterval=1.0)
