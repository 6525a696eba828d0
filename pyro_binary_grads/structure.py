"""
Site structure: which guide sites the mechanism handles, their plates and
order, and the checks made on them.

Discrete log-probs are computed here from the logits
(:math:`v\\alpha - \\mathrm{softplus}(\\alpha)`, :math:`\\sum_i v_i \\log\\mathrm{softmax}(\\alpha)_i`),
never with ``fn.log_prob``: smooth, valid at relaxed values, differentiable in
:math:`v` (DESIGN.md, "the site mechanism", point 5).
"""

import math
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Categorical, Independent, OneHotCategorical

import pyro.poutine as poutine
from binary_grads_common.logits import (
    CERTAIN_FAR, CERTAIN_GAP, CERTAIN_LOGITS_DOC, MASKED_LOG_SOFTMAX_DOC,
)
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.distributions.util import scale_and_mask, sum_rightmost
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import site_is_subsample

EVAL_PLATE = "_bg_evaluations"
PARTICLE_PLATE = "_bg_particles"
_OUR_PLATES = (EVAL_PLATE, PARTICLE_PLATE)


class StructureChanged(Exception):
    """Raised inside a vectorized run when the guide's discrete sites (names,
    order or shapes) differ from the cached structure; the run is redone
    after the structure is found again."""


# ---------------------------------------------------------------------------
# distributions: unwrapping, logits and log-probs computed by us
# ---------------------------------------------------------------------------


def _base_dist(fn):
    while isinstance(fn, (Independent, MaskedDistribution, ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def is_discrete_latent(site):
    """Whether a guide site is a non-reparameterized discrete latent."""
    fn = site["fn"]
    return (
        site["type"] == "sample"
        and not site["is_observed"]
        and not isinstance(fn, _Subsample)
        and not getattr(fn, "has_rsample", False)
        and bool(getattr(getattr(fn, "support", None), "is_discrete", False))
    )


def is_latent(site):
    """A latent (not observed, not a subsample) sample site."""
    return site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)


def site_kind(fn):
    base = _base_dist(fn)
    if isinstance(base, Bernoulli):
        return "bernoulli"
    if isinstance(base, OneHotCategorical):
        return "onehot"
    return "categorical"


def site_logits(fn):
    """
    The logits of a Bernoulli (or categorical) distribution, broadcast to
    ``fn.batch_shape + fn.event_shape`` (plus the class dim for categoricals).
    """
    base = _base_dist(fn)
    logits = certain_logits(_exact_logits(base), site_kind(base))
    if isinstance(base, Bernoulli):
        return logits.expand(fn.batch_shape + fn.event_shape)
    shape = fn.batch_shape + fn.event_shape
    if isinstance(base, Categorical) and not isinstance(base, OneHotCategorical):
        shape = shape + logits.shape[-1:]
    return logits.expand(shape)


def _exact_logits(base):
    """
    ``base.logits``, except for a distribution made from ``probs`` with
    probabilities of exactly 0 (or a Bernoulli's 1): ``-inf`` (``+inf``)
    there, not torch's ``log(eps)`` (``probs_to_logits`` clamps), so that the
    estimators never draw what Pyro's sampler never draws
    (:func:`certain_logits` then makes them finite). Probabilities near 0
    or 1 keep torch's clamped logits and their gradient.
    """
    logits = base.logits
    d = base._categorical if isinstance(base, OneHotCategorical) else base
    probs = d.__dict__.get("probs")
    if probs is None or d._param is not probs:  # made from logits
        return logits
    if isinstance(base, Bernoulli):
        return torch.where(probs <= 0, -math.inf, torch.where(probs >= 1, math.inf, logits))
    return torch.where(probs <= 0, -math.inf, logits)


def certain_logits(a, kind):
    # docstring below: binary_grads_common.logits, one text with NumPyro's
    far = min(CERTAIN_FAR, torch.finfo(a.dtype).max / 16)  # (float16: 4094)
    if kind == "bernoulli":
        return torch.where(certain_outcomes(a, kind), a.sign() * far, a)
    m = a.detach().amax(-1, keepdim=True)
    return torch.where(a < m - (CERTAIN_GAP + m.abs()), m - (far + m.abs()), a)


def certain_outcomes(a, kind):
    """Where the logits ``a`` give an outcome of probability 0 (a Bernoulli
    logit beyond ``CERTAIN_GAP`` from 0, a categorical one that far below
    its row's largest): those :func:`certain_logits` puts at ``CERTAIN_FAR``."""
    if kind == "bernoulli":
        return a.abs() > CERTAIN_GAP
    m = a.detach().amax(-1, keepdim=True)
    return a < m - (CERTAIN_GAP + m.abs())


certain_logits.__doc__ = CERTAIN_LOGITS_DOC.format(
    extra="", check=":func:`~pyro_binary_grads.noise.check_logits`")


def discrete_log_prob(fn, value, certain=False):
    """
    Elementwise log-prob of a Bernoulli / Categorical / OneHotCategorical
    (possibly wrapped in ``Independent``, masked or expanded), computed from
    the logits: smooth, valid at relaxed values, no validation.
    Returns a tensor of ``fn``'s batch shape (event dims summed, masks applied).
    With ``certain`` (a guide site drawn by the mechanism) the logits are
    :func:`certain_logits`, those its values were drawn from.
    """
    if isinstance(fn, Independent):
        return sum_rightmost(
            discrete_log_prob(fn.base_dist, value, certain), fn.reinterpreted_batch_ndims
        )
    if isinstance(fn, MaskedDistribution):
        return scale_and_mask(discrete_log_prob(fn.base_dist, value, certain), mask=fn._mask)
    if isinstance(fn, ExpandedDistribution):
        return discrete_log_prob(fn.base_dist, value, certain).expand(fn.batch_shape)
    if not isinstance(fn, (Bernoulli, Categorical, OneHotCategorical)):
        return fn.log_prob(value)
    a = fn.logits
    if certain:
        a = certain_logits(compact(_exact_logits(fn)), site_kind(fn)).expand(a.shape)
    if isinstance(fn, Bernoulli):
        return value * a - F.softplus(compact(a))
    if isinstance(fn, OneHotCategorical):
        return (value * _masked_log_softmax(a, value)).sum(-1)
    if isinstance(fn, Categorical):
        logp = torch.log_softmax(a, -1)
        value, logp = torch.broadcast_tensors(value.long().unsqueeze(-1), logp)
        return logp.gather(-1, value[..., :1]).squeeze(-1)


def _masked_log_softmax(a, value):
    # docstring below: binary_grads_common.logits, one text with NumPyro's
    logp = torch.log_softmax(a, -1)
    return torch.where(torch.isneginf(logp) & (value == 0), 0.0, logp)


_masked_log_softmax.__doc__ = MASKED_LOG_SOFTMAX_DOC


def compact(t):
    """The smallest view of ``t`` that broadcasts back to it: expanded
    (stride-0) dims get size 1, so elementwise math on logits that were
    broadcast over plates or evaluations is not repeated."""
    if all(st != 0 or n == 1 for st, n in zip(t.stride(), t.shape)):
        return t
    return t[tuple(slice(0, 1) if st == 0 else slice(None) for st in t.stride())]


def _is_handled_discrete(fn):
    return isinstance(_base_dist(fn), (Bernoulli, Categorical, OneHotCategorical))


def site_log_prob(site, detach_discrete=False, sign=1.0, certain=False):
    """The scaled and masked log-prob of a sample site, of its batch shape,
    times ``sign`` (folded into the scale: one op fewer per site); with
    ``certain``, a latent discrete site's from its :func:`certain_logits`."""
    fn, value = site["fn"], site["value"]
    if _is_handled_discrete(fn):
        certain = certain and not site["is_observed"]
        if detach_discrete and not site["is_observed"]:
            with torch.no_grad():  # no graph for a term whose gradient is dropped
                lp = discrete_log_prob(fn, value, certain)
        else:
            lp = discrete_log_prob(fn, value, certain)
    else:
        lp = fn.log_prob(value)
    scale = site["scale"] if sign == 1.0 else sign * site["scale"]
    return scale_and_mask(lp, scale, site["mask"])


def user_frames(site):
    return tuple(f for f in site["cond_indep_stack"] if f.name not in _OUR_PLATES)


def subsample_scale(frame):
    full = frame.full_size
    return 1.0 if full is None or full == frame.size else full / frame.size


def preserved_rng():
    """
    ``torch.random.fork_rng`` over the CPU generator and, where CUDA is already
    initialised, every device's: the global RNG state is left as it was
    (``fork_rng()`` with its default devices would initialise CUDA, and warns on
    several devices).

    Around the first-use runs (inspection, discovery, the broadcasting check) a
    step draws what it would draw without them. A ``pyro.param`` initialised
    lazily from the RNG inside such a run takes its value from the stream the
    step then draws from again, once; keeping its draws instead would make a
    fresh instance's draws depend on whether the program's params existed.
    """
    devices = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = list(range(torch.cuda.device_count()))
    return torch.random.fork_rng(devices=devices)


def inspection_trace(guide, args, kwargs):
    """One blocked trace of ``guide`` to inspect its sites, leaving the global RNG
    as it was: an ELBO's first-use inspections must not shift the draws of the
    steps (a run resumed with a fresh ELBO equals an uninterrupted one)."""
    with poutine.block(), preserved_rng():
        return poutine.trace(guide).get_trace(*args, **kwargs)


def guess_plate_nesting(*traces):
    """The user's plate nesting U from the dims of the plates seen in ``traces``."""
    dims = [
        f.dim
        for trace in traces
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for f in user_frames(site)
        if f.dim is not None
    ]
    return -min(dims) if dims else 0


# ---------------------------------------------------------------------------
# the structure of a guide, found on a trace
# ---------------------------------------------------------------------------


class SiteInfo:
    """Static facts about one discrete guide site."""

    def __init__(self, name, index, frames, fn):
        self.name = name
        self.index = index  # 0-based position among discrete sites
        self.frames = frames  # user plate frames
        self.event_dim = fn.event_dim
        self.kind = site_kind(fn)
        # the logits carry a class dim beyond the value's dims for Categorical
        self.alpha_event_dim = self.event_dim + (self.kind == "categorical")
        self.kept = frames  # frames in which the learning signal stays local
        self.subsampled = tuple(f for f in frames if subsample_scale(f) != 1.0)
        self.shapes = {}  # the logits' shapes seen in vectorized runs, by run kind


class GuideStructure:
    """
    The discrete sites of a guide in execution order, and for every other
    latent site how many discrete sites precede it, found on one run of guide
    and model. ``signature`` (kinds, shapes, plates and order, not names)
    identifies programs whose broadcasting was already checked.
    """

    def __init__(self, model_trace, guide_trace, estimator_name, supports, warn=True):
        self.discrete = OrderedDict()
        self.num_before = {}  # non-discrete latent site -> number of discrete sites before it
        latents, signature = [], []
        for name, site in guide_trace.nodes.items():
            if not is_latent(site):
                continue
            check_guide_site(site, estimator_name, supports)
            latents.append(site)
            frames = user_frames(site)
            signature.append((
                is_discrete_latent(site), type(_base_dist(site["fn"])).__name__,
                tuple(site["fn"].shape()), tuple((f.name, f.dim, f.size) for f in frames),
            ))
            if is_discrete_latent(site):
                self.discrete[name] = SiteInfo(name, len(self.discrete), frames, site["fn"])
            else:
                self.num_before[name] = len(self.discrete)
        for name, site in model_trace.nodes.items():
            if is_latent(site) and name not in guide_trace.nodes:
                raise ValueError(
                    f"Model site '{name}' is latent but not in the guide. "
                    f"{estimator_name} needs every latent site of the model to be "
                    "sampled in the guide; observe it (obs=...) or add it to the guide."
                )
        self.signature = tuple(signature)
        self._localise(latents, warn)

    @property
    def num_sites(self):
        return len(self.discrete)

    def _localise(self, latents, warn):
        """
        A site's learning signal may stay local to a plate only if no guide
        site outside that plate runs after it (DESIGN.md, trap 4).
        """
        order = [s["name"] for s in latents]
        for info in self.discrete.values():
            later = latents[order.index(info.name) + 1 :]
            nonlocal_ = []
            for frame in info.frames:
                if frame.dim is None and subsample_scale(frame) == 1.0:
                    continue  # a sequential plate: its signal is summed anyway
                outside = [
                    s["name"]
                    for s in later
                    if frame.name not in {f.name for f in user_frames(s)}
                ]
                if outside:
                    nonlocal_.append((frame, outside))
            for frame, outside in nonlocal_:
                if warn:
                    warnings.warn(
                        f"Guide site(s) {outside} outside plate '{frame.name}' run after "
                        f"discrete site '{info.name}' inside it; the learning signal of "
                        f"'{info.name}' is summed over '{frame.name}' (unbiased, but its "
                        "variance grows with the plate size).",
                        RuntimeWarning,
                    )
            drop = {frame.name for frame, _ in nonlocal_}
            info.kept = tuple(f for f in info.frames if f.name not in drop and f.dim is not None)


def check_one_hot(name, fn, estimator_name, why, alternatives):
    """
    Raise for an integer ``Categorical`` guide site ``name`` (distribution
    ``fn``) where ``estimator_name`` needs one-hot values (``why``), pointing
    to ``OneHotCategorical`` and to ``alternatives``.
    """
    base = _base_dist(fn)
    if isinstance(base, Categorical) and not isinstance(base, OneHotCategorical):
        raise NotImplementedError(
            f"Guide site '{name}' is a Categorical (integer-valued) site. "
            f"{estimator_name} {why}, which needs a one-hot sample: use "
            "pyro_binary_grads.OneHotCategorical(logits=...) in the guide and the "
            "model (one-hot float values; index with a matrix product, e.g. "
            "value @ table, rather than table[value]), or keep the Categorical "
            f"site and use {alternatives}."
        )


def check_guide_site(site, estimator_name, supports):
    name, fn = site["name"], site["fn"]
    if site["infer"].get("enumerate"):
        raise ValueError(
            f"Guide site '{name}' is marked for enumeration "
            f"(infer={{'enumerate': {site['infer']['enumerate']!r}}}); {estimator_name} "
            "estimates gradients by sampling. Remove the enumerate flag, or use "
            "pyro.infer.TraceEnum_ELBO to enumerate it."
        )
    if getattr(fn, "has_rsample", False) or not is_discrete_latent(site):
        if not getattr(fn, "has_rsample", False):
            raise NotImplementedError(
                f"Guide site '{name}' ({type(_base_dist(fn)).__name__}) is neither "
                f"reparameterizable nor a discrete site {estimator_name} handles; use "
                "a reparameterizable distribution or pyro.infer.TraceGraph_ELBO."
            )
        return
    base = _base_dist(fn)
    if not isinstance(base, supports):
        handled = ", ".join(t.__name__ for t in supports)
        if isinstance(base, OneHotCategorical):
            way_out = (
                "DisARM_ELBO, REBAR_ELBO, RELAX_ELBO, RLOO_ELBO and VIMCO (unbiased) "
                "and the straight-through family (ST_ELBO, ReinMax_ELBO, ...) handle "
                "OneHotCategorical sites"
            )
        elif isinstance(base, Categorical):
            way_out = (
                "DisARM_ELBO, RLOO_ELBO and VIMCO handle Categorical sites; REBAR, "
                "RELAX and the straight-through family need OneHotCategorical sites"
            )
        else:
            way_out = "pyro.infer.TraceGraph_ELBO handles any discrete site"
        raise NotImplementedError(
            f"Guide site '{name}' has a {type(base).__name__} distribution, which "
            f"{estimator_name} does not handle (it handles {handled}). {way_out}; "
            "use one of those for this guide, or change the site."
        )
