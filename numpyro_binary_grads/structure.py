"""
Site structure and checks of the site mechanism (:mod:`numpyro_binary_grads.sites`):
which guide sites are discrete and of which kind, their logits and log-probs
(computed from the logits, never with ``fn.log_prob``: NumPyro's
``Bernoulli(logits=0.).log_prob`` has a wrong gradient), the static
:class:`GuideStructure` found at trace time, and the checks that raise
named errors for sites the estimators cannot handle or where model and guide
disagree.
"""

from collections import namedtuple
import math

import jax
from jax.lax import stop_gradient
import jax.numpy as jnp
import numpy as np

import numpyro.distributions as dist
from numpyro.distributions import ExpandedDistribution, Independent, MaskedDistribution
from numpyro.distributions.util import clamp_probs
from numpyro.util import not_jax_tracer

from binary_grads_common.logits import (
    CERTAIN_FAR, CERTAIN_GAP, CERTAIN_LOGITS_DOC, bad_logits_message,
)
from .distributions import OneHotCategorical, masked_log_softmax

__all__ = [
    "GuideStructure",
    "SiteInfo",
    "check_one_hot",
    "site_log_prob",
    "site_logits",
]


# ---------------------------------------------------------------------------
# distributions
# ---------------------------------------------------------------------------

_WRAPPERS = (Independent, ExpandedDistribution, MaskedDistribution)
_BERNOULLI = (dist.BernoulliLogits, dist.BernoulliProbs)
_CATEGORICAL = (dist.CategoricalLogits, dist.CategoricalProbs)
_KINDS = {"bernoulli": "Bernoulli", "categorical": "Categorical", "onehot": "OneHotCategorical"}


def _base_dist(fn):
    while isinstance(fn, _WRAPPERS):
        fn = fn.base_dist
    return fn


def _kind(base):
    if isinstance(base, _BERNOULLI):
        return "bernoulli"
    if isinstance(base, _CATEGORICAL):
        return "categorical"
    if isinstance(base, OneHotCategorical):
        return "onehot"
    return None


def _bernoulli_logits(base, exact=False):
    """
    The logits of a Bernoulli site. ``probs`` are clamped to
    ``[tiny, 1 - eps]`` first, as NumPyro's ``BernoulliProbs.logits`` does
    (``clamp_probs``): probs near or at 0 or 1 (``sigmoid(h)`` is 1 for ``h``
    above about 17 in float32) give finite logits whose gradient is 0, not
    NaN. With ``exact`` (a guide site's draws, as in Pyro's ``_exact_logits``)
    probs of exactly 0 or 1 give ``-inf`` / ``+inf``: NumPyro's sampler never
    draws their other value, nor then do the estimators (:func:`certain_logits`).
    """
    if isinstance(base, dist.BernoulliLogits):
        return base.logits
    p = base.probs
    c = clamp_probs(p)
    a = jnp.log(c) - jnp.log1p(-c)
    if not exact:
        return a
    return jnp.where(p <= 0, -jnp.inf, jnp.where(p >= 1, jnp.inf, a))


def site_logits(fn, kind, shape):
    """
    The logits of a discrete site, broadcast to the value's ``shape``
    (``sample_shape + batch_shape + event_shape``) plus the class dim for a
    ``Categorical``.
    """
    base = _base_dist(fn)
    if kind == "bernoulli":
        a = _bernoulli_logits(base, exact=True)
    else:
        a = base.logits
        if kind == "categorical":
            shape = tuple(shape) + jnp.shape(a)[-1:]
    a = jnp.broadcast_to(a, shape)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(jnp.result_type(float))
    return certain_logits(a, kind)


def certain_logits(a, kind):
    # docstring below: binary_grads_common.logits, one text with Pyro's
    far = min(CERTAIN_FAR, float(jnp.finfo(jnp.result_type(a)).max) / 16)  # (float16: 4094)
    if kind == "bernoulli":
        return jnp.where(certain_outcomes(a, kind), jnp.sign(a) * far, a)
    m = stop_gradient(jnp.max(a, axis=-1, keepdims=True))
    return jnp.where(a < m - (CERTAIN_GAP + jnp.abs(m)), m - (far + jnp.abs(m)), a)


def certain_outcomes(a, kind):
    """Where the logits ``a`` give an outcome of probability 0 (a Bernoulli
    logit beyond ``CERTAIN_GAP`` from 0, a categorical one that far below
    its row's largest): those :func:`certain_logits` puts at ``CERTAIN_FAR``."""
    if kind == "bernoulli":
        return jnp.abs(a) > CERTAIN_GAP
    m = stop_gradient(jnp.max(a, axis=-1, keepdims=True))
    return a < m - (CERTAIN_GAP + jnp.abs(m))


certain_logits.__doc__ = CERTAIN_LOGITS_DOC.format(
    extra=", ``Categorical(probs=...)`` with a zero, whose NumPyro logit is ``-inf``",
    check=":func:`_check_finite`")


def _log_prob(fn, value, detach, certain=False):
    """Log-prob of ``value`` under ``fn`` before scale, or None to defer to fn; of
    at least ``fn``'s batch shape, as ``fn.log_prob`` (an observation smaller than
    a plate-expanded site's batch counts once per element)."""
    lp = _unbroadcast_log_prob(fn, value, detach, certain)
    if lp is None:
        return None
    return jnp.broadcast_to(lp, jnp.broadcast_shapes(jnp.shape(lp), tuple(fn.batch_shape)))


def _unbroadcast_log_prob(fn, value, detach, certain):
    if isinstance(fn, Independent):
        lp = _log_prob(fn.base_dist, value, detach, certain)
        if lp is None:
            return None
        n = fn.reinterpreted_batch_ndims
        return jnp.sum(lp, axis=tuple(range(-n, 0))) if n else lp
    if isinstance(fn, ExpandedDistribution):
        return _log_prob(fn.base_dist, value, detach, certain)
    if isinstance(fn, MaskedDistribution):
        lp = _log_prob(fn.base_dist, value, detach, certain)
        if lp is None:
            return None
        mask = fn._mask
        if mask is True:
            return lp
        if mask is False:
            return jnp.zeros_like(lp)
        return jnp.where(mask, lp, 0.0)
    kind = _kind(fn)
    if kind is None:
        return None
    a = _bernoulli_logits(fn, exact=certain) if kind == "bernoulli" else fn.logits
    a = certain_logits(a, kind) if certain else a
    a = stop_gradient(a) if detach else a
    if kind == "bernoulli":
        return _bernoulli_log_prob(a, jnp.asarray(value, dtype=jnp.result_type(a)))
    if kind == "categorical":
        logp = jax.nn.log_softmax(a, -1)
        value = jnp.asarray(value).astype(jnp.int32)
        shape = jnp.broadcast_shapes(jnp.shape(value), logp.shape[:-1])
        logp = jnp.broadcast_to(logp, shape + logp.shape[-1:])
        value = jnp.broadcast_to(value, shape)
        return jnp.take_along_axis(logp, value[..., None], -1)[..., 0]
    return jnp.sum(value * masked_log_softmax(a, value), -1)


def _bernoulli_log_prob(a, v):
    """
    :math:`v a - \\mathrm{softplus}(a)`, and at an infinite logit the limit: 0
    where the value is certain (a unit forced off by ``-inf`` and observed 0),
    ``-inf`` elsewhere, with gradient 0 (``v a - softplus(a)`` is NaN there). Not
    NumPyro's ``binary_cross_entropy_with_logits``, whose gradient at a logit of
    exactly 0 is ``v`` instead of ``v - 1/2`` (its ``max(a, 0)`` and ``|a|`` kinks).
    """
    inf = jnp.isinf(a)
    safe = jnp.where(inf, 0.0, a)  # (a NaN logit stays NaN)
    lp = v * safe - jax.nn.softplus(safe)
    certain = jnp.where(a > 0, v == 1, v == 0)
    return jnp.where(inf, jnp.where(certain, 0.0, -jnp.inf), lp)


def site_log_prob(site, detach=False, certain=False):
    """
    Scaled, masked log-prob array (batch shape) of a trace's sample site.

    Bernoulli, Categorical and :class:`OneHotCategorical` (possibly wrapped in
    ``Independent`` / ``ExpandedDistribution`` / ``MaskedDistribution``) are
    computed from the logits, as ``v * a - softplus(a)`` and
    ``sum(v * log_softmax(a))``; ``detach=True`` stops the gradient through
    those logits; ``certain=True`` (a guide site drawn by the mechanism) uses
    its :func:`certain_logits`, those its values were drawn from. Everything
    else uses ``fn.log_prob``.
    """
    fn, value = site["fn"], site["value"]
    lp = _log_prob(fn, value, detach, certain)
    if lp is None:
        if site.get("intermediates"):
            lp = fn.log_prob(value, site["intermediates"])
        else:
            lp = fn.log_prob(value)
    else:
        batch = jnp.shape(value)[: max(jnp.ndim(value) - fn.event_dim, 0)]
        lp = jnp.broadcast_to(lp, jnp.broadcast_shapes(jnp.shape(lp), batch))
    scale = site["scale"]
    if scale is not None:
        lp = scale * lp
    return lp


def check_one_hot(name, fn, estimator_name, why, alternatives):
    """
    Raise for an integer ``Categorical`` guide site ``name`` (distribution
    ``fn``) where ``estimator_name`` needs one-hot values (``why``), pointing
    to ``OneHotCategorical`` and to ``alternatives``.
    """
    if _kind(_base_dist(fn)) == "categorical":
        raise NotImplementedError(
            f"Guide site '{name}' is a Categorical (integer-valued) site. "
            f"{estimator_name} {why}, which needs a one-hot sample: use "
            "numpyro_binary_grads.OneHotCategorical(logits=...) in the guide and the "
            "model (one-hot float values; index with a matrix product, e.g. "
            "value @ table, rather than table[value]), or keep the Categorical "
            f"site and use {alternatives}."
        )


def _check_guide_site(msg, owner, supports):
    """Trace-time checks of a latent guide sample site; True if we own it."""
    name, fn = msg["name"], msg["fn"]
    enum = (msg.get("infer") or {}).get("enumerate")
    if enum:
        raise ValueError(
            f"Guide site '{name}' is marked for enumeration "
            f"(infer={{'enumerate': {enum!r}}}); {owner} estimates gradients by "
            "sampling. Remove the enumerate flag, or use "
            "numpyro.infer.TraceEnum_ELBO to enumerate it."
        )
    if fn.has_rsample:
        return False
    base = _base_dist(fn)
    kind = _kind(base)
    if kind is not None and kind in supports:
        return True
    if not getattr(fn.support, "is_discrete", False):
        raise NotImplementedError(
            f"Guide site '{name}' ({type(base).__name__}) is neither "
            f"reparameterizable nor a discrete site {owner} handles; use "
            "a reparameterizable distribution or numpyro.infer.TraceGraph_ELBO."
        )
    handled = ", ".join(_KINDS[k] for k in supports)
    if kind == "onehot":
        way_out = (
            "DisARM_ELBO, REBAR_ELBO, RELAX_ELBO, RLOO_ELBO and VIMCO (unbiased) "
            "and the straight-through family (ST_ELBO, ReinMax_ELBO, ...) handle "
            "OneHotCategorical sites"
        )
    elif kind == "categorical":
        way_out = (
            "DisARM_ELBO, RLOO_ELBO and VIMCO handle Categorical sites; REBAR, "
            "RELAX and the straight-through family need OneHotCategorical sites"
        )
    else:
        way_out = "numpyro.infer.TraceGraph_ELBO handles any discrete site"
    raise NotImplementedError(
        f"Guide site '{name}' has a {type(base).__name__} distribution, which "
        f"{owner} does not handle (it handles {handled}). {way_out}; "
        "use one of those for this guide, or change the site."
    )


def _check_finite(name, alpha):
    """NaN/inf logits raise where values are concrete (outside jit and grad)."""
    # numpy, not jnp: a concrete array inside a trace (e.g. a ``lax.map`` body)
    # would give a traced isfinite
    if not_jax_tracer(alpha) and not np.all(np.isfinite(np.asarray(alpha))):
        raise ValueError(
            bad_logits_message(name) + " "
            "(Under jit or grad this cannot be detected and the loss is NaN; "
            "SVI.stable_update skips such steps.)"
        )


# ---------------------------------------------------------------------------
# the structure of a guide, found at trace time
# ---------------------------------------------------------------------------


SiteInfo = namedtuple(
    "SiteInfo",
    ["name", "index", "event_dim", "kind", "alpha_event_dim", "signal_plates", "signal_ndim"],
)
SiteInfo.__doc__ = """
Static facts about one discrete guide site.

:param str name: site name.
:param int index: 0-based position among the discrete guide sites in
    execution order (``Plan.pairs``: evaluation ``index + 1`` flips it).
:param int event_dim: event dims of the site's value.
:param str kind: ``"bernoulli"``, ``"categorical"`` or ``"onehot"``.
:param int alpha_event_dim: event dims of the logits (``event_dim``, plus the
    class dim of a ``Categorical``).
:param tuple signal_plates: ``((plate_name, dim), ...)``, the plates the
    learning signal keeps (the site's plates where localising is valid).
:param int signal_ndim: number of right-aligned batch dims of the signal.
"""


class GuideStructure:
    """
    The discrete sites of a guide in execution order and the plates, found
    by :func:`discover` at trace time.

    :ivar discrete: ``OrderedDict`` name -> :class:`SiteInfo`.
    :ivar num_before: non-discrete latent site -> number of discrete sites
        executed before it.
    :ivar plate_scales: plate name -> ``size / subsample_size``.
    :ivar common_plates: ``((plate_name, dim), ...)``, the plates common to
        all latent guide sites (the per-element K-sample bound's plates).
    :ivar common_ndim: right-aligned dims of that layout.
    """

    def __init__(self, discrete, num_before, plate_scales, common_plates):
        self.discrete = discrete
        self.num_before = num_before
        self.plate_scales = plate_scales
        self.common_plates = common_plates
        self.common_ndim = max((-d for _, d in common_plates), default=0)

    @property
    def num_sites(self):
        return len(self.discrete)

    @property
    def common_scale(self):
        """:math:`s_P`, the product of the common plates' subsample scales."""
        return math.prod(self.plate_scales.get(n, 1.0) for n, _ in self.common_plates)


# ---------------------------------------------------------------------------
# model/guide agreement
# ---------------------------------------------------------------------------


def _site_shape(site):
    return tuple(site["fn"].shape(tuple(site["kwargs"].get("sample_shape", ()))))


def _check_match(model_trace, guide_trace):
    """
    Raise, naming the site, where a latent guide site and the model site of
    the same name disagree in their plates' sizes or their shapes (as
    :func:`numpyro.util.check_model_guide_match` does, with the plate),
    before NumPyro's own plate checks fail with a bare broadcasting error.
    """
    plate_sizes = {}
    for side, tr in (("model", model_trace), ("guide", guide_trace)):
        for name, site in tr.items():
            if site["type"] == "plate":
                plate_sizes[side, name] = site["args"][0]
    for name, g in guide_trace.items():
        m = model_trace.get(name)
        if g["type"] != "sample" or g.get("is_observed") or m is None or m["type"] != "sample":
            continue
        m_frames = {f.name: f for f in m["cond_indep_stack"]}
        for f in g["cond_indep_stack"]:
            mf = m_frames.get(f.name)
            if mf is None:
                continue
            g_size = (plate_sizes.get(("guide", f.name), f.size), f.size)
            m_size = (plate_sizes.get(("model", f.name), mf.size), mf.size)
            if g_size != m_size or f.dim != mf.dim:
                what = lambda s, d: f"size {s[0]}" + (  # noqa: E731
                    f" (subsample {s[1]})" if s[1] != s[0] else "") + f" at dim {d}"
                raise ValueError(
                    f"Model and guide disagree at site '{name}': its plate '{f.name}' "
                    f"has {what(m_size, mf.dim)} in the model and "
                    f"{what(g_size, f.dim)} in the guide. Give the plate the same "
                    "size, subsample size and dim in both."
                )
        if not hasattr(m["fn"], "shape") or not hasattr(g["fn"], "shape"):
            continue
        m_shape, g_shape = _site_shape(m), _site_shape(g)
        if m_shape == g_shape:
            continue
        n = max(len(m_shape), len(g_shape))
        if any(a != b for a, b in zip((1,) * (n - len(m_shape)) + m_shape,
                                      (1,) * (n - len(g_shape)) + g_shape)):
            raise ValueError(
                f"Model and guide shapes disagree at site '{name}': {m_shape} (model) vs "
                f"{g_shape} (guide). Give the site the same batch and event shape in "
                "both (plates, .expand, .to_event)."
            )


def _summarize(tr):
    sites, plates = {}, {}
    for name, site in tr.items():
        if site["type"] == "plate":
            plates[name] = site["args"][0]
        elif site["type"] == "sample":
            sites[name] = {
                "observed": site.get("is_observed", False),
                "frames": tuple(site["cond_indep_stack"]),
                "plates": {f.name for f in site["cond_indep_stack"]},
                "event_dim": site["fn"].event_dim,
                "kind": _kind(_base_dist(site["fn"])),
                "enumerate": (site.get("infer") or {}).get("enumerate"),
            }
    return sites, plates
