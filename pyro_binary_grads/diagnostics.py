"""
Gradient diagnostics on a user's own model: measure several ELBO estimators
side by side (:func:`compare_estimators`) and, on small models, against the
exact gradient (:func:`exact_elbo`, by enumeration of the guide's discrete
sites).

Every gradient here is the gradient of the **loss** (the negative ELBO or
negative bound) with respect to the unconstrained parameters in Pyro's param
store, which is what :class:`pyro.infer.SVI` hands to the optimizer.
"""

import math
import sys
import time

import numpy as np
import torch
from torch.distributions import Bernoulli, Categorical, Independent, OneHotCategorical

import pyro
import pyro.poutine as poutine
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

from binary_grads_common.report import Comparison, EstimatorReport, named_estimators

from .structure import _exact_logits, certain_logits, discrete_log_prob, site_kind

__all__ = ["compare_estimators", "exact_elbo"]

#: the largest number of joint discrete configurations :func:`exact_elbo` enumerates
MAX_CONFIGURATIONS = 2**16


# ---------------------------------------------------------------------------
# exact ELBO by enumeration
# ---------------------------------------------------------------------------


def _base(fn):
    while isinstance(fn, (Independent, MaskedDistribution, ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def _log_q(fn, value):
    """The unscaled, unmasked guide log-prob of a discrete value, summed over
    the event dims (masks remove terms from ``f``, they do not change ``q``),
    from the site's :func:`certain_logits` as the estimators draw it: a value
    of probability 0 has a finite log-prob (about -1e9), weight exactly 0."""
    base = _base(fn)
    a = certain_logits(_exact_logits(base), site_kind(base))
    if isinstance(base, Bernoulli):
        lp = value * a - torch.nn.functional.softplus(a)
    elif isinstance(base, OneHotCategorical):
        lp = (value * torch.log_softmax(a, -1)).sum(-1)
    else:
        logp = torch.log_softmax(a, -1)
        value, logp = torch.broadcast_tensors(value.long().unsqueeze(-1), logp)
        lp = logp.gather(-1, value[..., :1]).squeeze(-1)
    event = fn.event_dim - (1 if isinstance(base, OneHotCategorical) else 0)
    return lp.sum(tuple(range(-event, 0))) if event else lp


def _log_f(site, certain=False):
    """A site's term of the ELBO integrand: scaled, masked log-prob (discrete
    ones from the logits, as the estimators compute them; a guide site's from
    its :func:`certain_logits` with ``certain``)."""
    fn, value = site["fn"], site["value"]
    if isinstance(_base(fn), (Bernoulli, Categorical, OneHotCategorical)):
        lp = discrete_log_prob(fn, value, certain)
    else:
        lp = fn.log_prob(value)
    if site["mask"] is not None:
        lp = torch.where(site["mask"], lp, torch.zeros_like(lp))
    return lp * site["scale"] if site["scale"] is not None else lp


def _is_sample(site):
    return site["type"] == "sample" and not isinstance(site["fn"], _Subsample)


class _SetValues(Messenger):
    """Gives the enumerated guide sites their values for every configuration."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg):
        if msg["name"] in self.values and not msg["is_observed"]:
            msg["value"] = self.values[msg["name"]]


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
        d = np.zeros((C, n), dtype=np.int64)
        for j in range(n):
            d[:, j] = (c // stride) % K
            stride *= K
        values[name] = np.eye(K)[d].reshape((C,) + shape) if kind == "onehot" else d.reshape(
            (C,) + shape)
    return C, values


def exact_elbo(model, guide, *args, **kwargs):
    """
    The exact ELBO :math:`\\sum_c q(c)\\, f(c)` of a small model whose guide
    has only discrete latent sites (``Bernoulli``, ``Categorical``,
    ``OneHotCategorical``; possibly ``.to_event``, inside plates, depending on
    earlier sites), by enumeration of every joint configuration :math:`c` of
    those sites, with :math:`f = \\log p(x, c) - \\log q(c)` (scales and masks
    as in ``Trace_ELBO``) and :math:`q(c)` the product of the sites'
    unscaled probabilities. Differentiable w.r.t. the param store
    (``torch.autograd``). All configurations run in one vectorized pass over a
    dim left of the user's plates, so model and guide must broadcast over it
    (as this package's ELBOs require anyway).

    :raises ValueError: a continuous latent guide site, or more than
        :data:`MAX_CONFIGURATIONS` configurations.
    """
    with poutine.block(), torch.no_grad():
        gtr = poutine.trace(guide).get_trace(*args, **kwargs)
        mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(*args, **kwargs)
    P = 0
    for tr in (gtr, mtr):
        for site in tr.nodes.values():
            if _is_sample(site):
                P = max([P] + [-f.dim for f in site["cond_indep_stack"] if f.dim is not None])
                P = max(P, len(site["fn"].batch_shape))
    sites = []
    for name, site in gtr.nodes.items():
        if not _is_sample(site) or site["is_observed"]:
            continue
        base = _base(site["fn"])
        discrete = isinstance(base, (Bernoulli, Categorical, OneHotCategorical))
        if not discrete or getattr(site["fn"], "has_rsample", False):
            raise ValueError(
                f"exact=True enumerates the guide's discrete sites, but guide site '{name}' "
                f"is a {type(site['fn']).__name__}, not a Bernoulli, Categorical or "
                "OneHotCategorical site; continuous latent sites cannot be enumerated. "
                "Use exact=False (no bias column), or compare on a model whose guide is "
                "discrete."
            )
        kind = ("bernoulli" if isinstance(base, Bernoulli) else
                "onehot" if isinstance(base, OneHotCategorical) else "categorical")
        K = 2 if kind == "bernoulli" else base.logits.shape[-1]
        sites.append((name, kind, tuple(site["value"].shape), K))
    for name, site in mtr.nodes.items():
        if _is_sample(site) and not site["is_observed"] and name not in gtr.nodes:
            raise ValueError(f"Model site '{name}' is latent but not in the guide.")
    C, grid = _grid(sites)
    dtype = torch.get_default_dtype()
    values = {}
    for name, kind, shape, K in sites:
        event = 1 if kind == "onehot" else 0
        pad = (1,) * (P - (len(shape) - event))
        v = torch.as_tensor(grid[name]).reshape((C,) + pad + shape)
        values[name] = v.long() if kind == "categorical" else v.to(dtype)

    def per_config(lp):
        lp = lp.reshape((1,) * (P + 1 - lp.dim()) + tuple(lp.shape)) if lp.dim() <= P else lp
        return lp.reshape(lp.shape[0], -1).sum(-1)

    with _SetValues(values):
        gtr = poutine.trace(guide).get_trace(*args, **kwargs)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(*args, **kwargs)
    f, log_q = 0.0, 0.0
    for site in mtr.nodes.values():
        if _is_sample(site):
            f = f + per_config(_log_f(site))
    for name, site in gtr.nodes.items():
        if _is_sample(site) and not site["is_observed"]:
            f = f - per_config(_log_f(site, certain=True))
            log_q = log_q + per_config(_log_q(site["fn"], site["value"]))
    q = torch.exp(log_q)
    # a configuration of probability 0 counts 0 (its f may be -inf: a masked
    # class in the model's prior too)
    return (q * torch.where(q > 0, f, 0.0)).sum()


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


def _params(model, guide, args, kwargs):
    """Create every param of model and guide; ``{name: unconstrained tensor}``."""
    with poutine.trace(param_only=True) as tr, torch.no_grad():
        gtr = poutine.trace(guide).get_trace(*args, **kwargs)
        poutine.replay(model, trace=gtr)(*args, **kwargs)
    store = pyro.get_param_store()
    return {name: store[name].unconstrained() for name in tr.trace.nodes}


def evaluations_per_step(elbo):
    """The integrand evaluations one ``loss_and_grads`` call of ``elbo`` costs:
    ``plan.num_evaluations * num_particles`` for this package's ELBOs (after
    their first step), ``num_particles`` for other ELBOs."""
    plan = getattr(elbo, "_plan", None)
    per_draw = plan.num_evaluations if plan is not None else 1
    return per_draw * getattr(elbo, "num_particles", 1)


def gradient_draws(elbo, model, guide, args, kwargs, params, num_samples, bar=None):
    """
    ``num_samples`` single-step gradients of ``elbo``'s loss w.r.t. ``params``
    (``{name: unconstrained tensor}``), each from one ``elbo.loss_and_grads``
    call: ``({name: array (num_samples, *shape)}, seconds)``.
    """
    names = list(params)
    out = {k: np.empty((num_samples,) + tuple(p.shape)) for k, p in params.items()}
    start = time.perf_counter()
    for i in range(num_samples):
        for p in params.values():
            p.grad = None
        elbo.loss_and_grads(model, guide, *args, **kwargs)
        for k in names:
            g = params[k].grad
            out[k][i] = 0.0 if g is None else g.detach().cpu().numpy()
        if bar is not None:
            bar.update(1)
    seconds = time.perf_counter() - start
    for p in params.values():
        p.grad = None
    return out, seconds


def compare_estimators(model, guide, *args, estimators, num_samples=1000, exact=False,
                       seed=None, progress=False, on_row=None, **kwargs):
    """
    Measure gradient estimators on your own model, at the current parameter
    values of Pyro's param store (params not yet there are created by a first
    run of guide and model).

    For each estimator (an ELBO instance: one of this package's classes, or
    Pyro's own, e.g. ``TraceGraph_ELBO()``), draws ``num_samples``
    single-step gradients of its loss w.r.t. every unconstrained parameter
    (one ``elbo.loss_and_grads`` call each; after one warm-up step that is
    neither timed nor counted) and reports:

    * the mean and variance of the gradient per parameter, the total variance
      (summed over coordinates), the variance per parameter group (one group
      per param name) and the signal-to-noise ratio ``|mean| / std``
      (median over coordinates);
    * the cost per step: *executions*, the Python calls of model plus guide
      (a vectorized call counts once; the ELBO's broadcasting re-checks at its
      10th, 100th and 1000th draw are included, amortized), *evaluations*, the evaluations of the
      ELBO integrand the estimator uses (``1 + T`` for DisARM with ``T``
      discrete sites, ``K`` for RLOO/VIMCO, times ``num_particles``), and
      wall-clock milliseconds;
    * with ``exact=True``, the exact gradient (:func:`exact_elbo`, by
      enumeration; the guide must have only discrete latent sites), the bias
      ``mean - exact`` per parameter and its z-scores
      ``bias / sqrt(var / num_samples)``, summarised as ``max |z|`` and
      ``rms z`` (about 1 for an unbiased estimator). Multi-sample bounds
      (VIMCO, LocalDisARM_IWAE) estimate the gradient of a different
      objective than the ELBO: their bias column measures that difference.

    Example::

        from pyro.infer import TraceGraph_ELBO
        from pyro_binary_grads import DisARM_ELBO, RLOO_ELBO, compare_estimators

        table = compare_estimators(model, guide, data, num_samples=500,
                                   estimators=[DisARM_ELBO(), RLOO_ELBO(num_samples=2),
                                               TraceGraph_ELBO()])
        print(table)
        table["DisARM_ELBO"].group_variance     # {param name: variance}

    :param model: the Pyro model.
    :param guide: the Pyro guide.
    :param args: arguments of model and guide.
    :param estimators: a list of ELBO instances, or a dict ``{label: ELBO}``.
    :param int num_samples: gradient draws per estimator.
    :param bool exact: also compute the bias against the exact gradient.
    :param int seed: if given, ``pyro.set_rng_seed(seed)`` right before each
        estimator's draws (after its warm-up step), so the draws are
        reproducible (and the same across calls).
    :param bool progress: show a progress bar of the draws on stderr (tqdm,
        if installed).
    :param on_row: called with each :class:`EstimatorReport` as soon as its
        estimator is done (e.g. to print it).
    :param kwargs: keyword arguments of model and guide (so ``estimators``,
        ``num_samples``, ``exact``, ``seed``, ``progress`` and ``on_row``
        cannot be passed through: wrap the model if it needs them).
    :returns: a :class:`Comparison`.
    """
    if num_samples < 2:
        raise ValueError(f"compare_estimators needs num_samples >= 2, got {num_samples}.")
    items = named_estimators(estimators)
    if not items:
        raise ValueError("compare_estimators needs at least one estimator.")
    params = _params(model, guide, args, kwargs)
    exact_grads = None
    if exact:
        _progress_note(progress, "exact gradient by enumeration ...")
        loss = -exact_elbo(model, guide, *args, **kwargs)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        exact_grads = {k: (np.zeros(tuple(p.shape)) if g is None else g.detach().cpu().numpy())
                       for (k, p), g in zip(params.items(), grads)}
    rows = []
    bar = _progress_bar(progress, len(items) * (num_samples + 1))
    for name, elbo in items:
        if bar is not None:
            bar.set_description(name)
        counted_model, counted_guide = _Counted(model), _Counted(guide)
        gradient_draws(elbo, counted_model, counted_guide, args, kwargs, params, 1, bar)
        counted_model.calls = counted_guide.calls = 0
        if seed is not None:
            pyro.set_rng_seed(seed)
        draws, seconds = gradient_draws(elbo, counted_model, counted_guide, args, kwargs,
                                        params, num_samples, bar)
        rows.append(EstimatorReport(
            name, num_samples,
            executions=(counted_model.calls + counted_guide.calls) / num_samples,
            evaluations=evaluations_per_step(elbo),
            ms_per_step=1e3 * seconds / num_samples,
            mean={k: d.mean(0) for k, d in draws.items()},
            var={k: d.var(0, ddof=1) for k, d in draws.items()},
            exact=exact_grads,
        ))
        if on_row is not None:
            on_row(rows[-1])
    if bar is not None:
        bar.close()
    return Comparison(rows)


def _progress_bar(progress, total):
    """A tqdm bar on stderr when ``progress`` and tqdm is installed, else None."""
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, file=sys.stderr, unit="draw", mininterval=1.0)


def _progress_note(progress, text):
    if progress:
        print(text, file=sys.stderr, flush=True)
