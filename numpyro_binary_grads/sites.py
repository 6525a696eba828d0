"""
The site mechanism: THE one place where discrete guide sites are found, their
noise is owned, guide and model are run over an "evaluation" dim, and
per-site learning signals are formed.

For every non-reparameterized discrete guide site (``Bernoulli`` with logits
or probs, ``Categorical``, :class:`~numpyro_binary_grads.OneHotCategorical`;
possibly ``.to_event`` / expanded / masked, inside plates, possibly depending
on earlier sites) :class:`NoiseMessenger` draws the site's noise itself and
sets the value from noise and logits: ``b = 1[u < sigmoid(alpha)]`` for a
Bernoulli site, Gumbel-argmax ``argmax(alpha - log(-log u))`` from uniforms
shaped like the logits (class dim included) for a categorical one, or, when
the plan asks for it (``Plan.stick_breaking``, DisARM), stick-breaking from
the same uniforms (:func:`~numpyro_binary_grads.estimators.stick_breaking_value`).

Which configurations are evaluated is a :class:`Plan`: evaluation ``e`` uses
noise draw ``source[e]`` of every discrete site and takes the antithetic
value ``1[1 - u < sigmoid(alpha)]`` at the Bernoulli sites ``j`` with
``flips[e][j]``. The pair estimators (ARM, DisARM) evaluate ``e = 0`` (base)
and ``e = t`` ("flip site t", the discrete sites in execution order), all on
draw 0; RLOO and VIMCO evaluate ``K`` independent draws; local DisARM ``P``
antithetic pairs (evaluations ``2k`` and ``2k + 1`` share draw ``k``); REBAR
and RELAX ``1 + 2T`` evaluations on draw 0 in which some sites take relaxed
values (``Plan.relax`` codes, passed to the plan's ``value_fn``). The
uniforms of site ``j`` in draw ``s`` are
``uniform(fold_in(fold_in(noise_key, j), s), shape)`` (no fold with ``s``
when the plan has one draw), so ``jax.vmap`` and ``jax.lax.map`` over the
evaluations give the same numbers. Where the plan has
``stick_breaking`` (DisARM), a flipped categorical site takes the antithetic
stick-breaking class instead.

Continuous (reparameterized) guide sites: every evaluation runs with the same
guide key, and the key the ``seed`` handler gives a continuous latent site is
folded with the evaluation's noise draw ``source[e]`` (when the plan has more
than one draw). Evaluations that share a draw thus share every continuous
draw: a continuous site before any flipped site takes exactly the value of
the draw's unflipped evaluation (the continuous-upstream bias trap of
DESIGN.md; Pyro copies the values, here they are recomputed from the same
noise), and one after a flipped site reuses its noise on the new inputs
(common random numbers, unbiased). Independent draws (RLOO, VIMCO) get
independent continuous draws. Plate subsample indices and ``prng_key``
sites keep the shared key: all evaluations see one minibatch.

Learning signals keep plate dims: for discrete site ``j`` each model/guide
log-prob term is summed over the plates ``j`` is not in and broadcast over
those it is in; a term lacking a subsampled plate of ``j`` is multiplied by
that plate's subsample scale, so that element ``n``'s signal estimates the
full-data objective. Localising over a plate ``P`` is valid only if no guide
site outside ``P`` executes after ``j``; otherwise the signal is summed over
``P`` (with a warning naming the sites), and a subsampled ``P`` raises.
Multi-sample objectives instead reduce every term to the plates common to
all latent sites (:class:`numpyro_binary_grads.multisample.SampleBound`).

Discrete log-probs (Bernoulli, Categorical, one-hot) are computed here from
the logits, never with ``fn.log_prob``: NumPyro's
``Bernoulli(logits=0.).log_prob`` has a wrong gradient. All reductions are
done inside the vmapped function on arrays without the evaluation dim, with
explicit right-aligned shapes (``MultiFrameTensor.sum_to`` transposes arrays
that carry a leading evaluation dim). Outside, every per-evaluation array
has the evaluation dim first.

The static structure (sites, plates, ``E``) is found at trace time with
:func:`jax.eval_shape`, so it costs nothing per step under ``jit``.
Structural errors are raised then; NaN/inf logits only outside ``jit`` and
``grad`` (under them they surface as a NaN loss; ``SVI.stable_update`` exists
for that). NumPyro's distribution validation is off inside our evaluations
(as in the Pyro package): the user's choice applies outside them.
"""

from collections import OrderedDict, namedtuple
from functools import partial
import math
import warnings

import jax
from jax import random
from jax.lax import stop_gradient
import jax.numpy as jnp
import numpy as np

import numpyro.distributions as dist
from numpyro.distributions import ExpandedDistribution, Independent, MaskedDistribution
from numpyro.distributions.distribution import validation_enabled
from numpyro.distributions.util import clamp_probs
from numpyro.handlers import replay, seed, substitute, trace
from numpyro.primitives import Messenger
from numpyro.util import _validate_model, check_model_guide_match, not_jax_tracer

from .distributions import OneHotCategorical
from .estimators import antithetic_value, bernoulli_value, stick_breaking_value

__all__ = [
    "Evaluations",
    "GuideStructure",
    "NoiseMessenger",
    "Plan",
    "SiteInfo",
    "discover",
    "pair_surrogate",
    "run_evaluations",
    "score",
    "score_surrogate",
    "site_log_prob",
    "site_signal",
    "total_elbo",
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


def _bernoulli_logits(base):
    """
    The logits of a Bernoulli site. ``probs`` are clamped to
    ``[tiny, 1 - eps]`` first, as NumPyro's ``BernoulliProbs.logits`` does
    (``clamp_probs``): ``probs`` of exactly 0 or 1 (``sigmoid(h)`` saturates
    at ``h`` above about 17 in float32) give finite logits whose gradient is
    0, as in :class:`numpyro.infer.Trace_ELBO`, not NaN.
    """
    if isinstance(base, dist.BernoulliLogits):
        return base.logits
    probs = clamp_probs(base.probs)
    return jnp.log(probs) - jnp.log1p(-probs)


def site_logits(fn, kind, shape):
    """
    The logits of a discrete site, broadcast to the value's ``shape``
    (``sample_shape + batch_shape + event_shape``) plus the class dim for a
    ``Categorical``.
    """
    base = _base_dist(fn)
    if kind == "bernoulli":
        a = _bernoulli_logits(base)
    else:
        a = base.logits
        if kind == "categorical":
            shape = tuple(shape) + jnp.shape(a)[-1:]
    a = jnp.broadcast_to(a, shape)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(jnp.result_type(float))
    return a


def _log_prob(fn, value, detach):
    """Log-prob of ``value`` under ``fn`` before scale, or None to defer to fn."""
    if isinstance(fn, Independent):
        lp = _log_prob(fn.base_dist, value, detach)
        if lp is None:
            return None
        n = fn.reinterpreted_batch_ndims
        return jnp.sum(lp, axis=tuple(range(-n, 0))) if n else lp
    if isinstance(fn, ExpandedDistribution):
        return _log_prob(fn.base_dist, value, detach)
    if isinstance(fn, MaskedDistribution):
        lp = _log_prob(fn.base_dist, value, detach)
        if lp is None:
            return None
        mask = fn._mask
        if mask is True:
            return lp
        if mask is False:
            return jnp.zeros_like(lp)
        return jnp.where(mask, lp, 0.0)
    if isinstance(fn, _BERNOULLI):
        a = _bernoulli_logits(fn)
        a = stop_gradient(a) if detach else a
        return jnp.asarray(value, dtype=jnp.result_type(a)) * a - jax.nn.softplus(a)
    if isinstance(fn, _CATEGORICAL):
        a = stop_gradient(fn.logits) if detach else fn.logits
        logp = jax.nn.log_softmax(a, -1)
        value = jnp.asarray(value).astype(jnp.int32)
        shape = jnp.broadcast_shapes(jnp.shape(value), logp.shape[:-1])
        logp = jnp.broadcast_to(logp, shape + logp.shape[-1:])
        value = jnp.broadcast_to(value, shape)
        return jnp.take_along_axis(logp, value[..., None], -1)[..., 0]
    if isinstance(fn, OneHotCategorical):
        a = stop_gradient(fn.logits) if detach else fn.logits
        return jnp.sum(value * jax.nn.log_softmax(a, -1), -1)
    return None


def site_log_prob(site, detach=False):
    """
    Scaled, masked log-prob array (batch shape) of a trace's sample site.

    Bernoulli, Categorical and :class:`OneHotCategorical` (possibly wrapped in
    ``Independent`` / ``ExpandedDistribution`` / ``MaskedDistribution``) are
    computed from the logits, as ``v * a - softplus(a)`` and
    ``sum(v * log_softmax(a))``; ``detach=True`` stops the gradient through
    those logits. Everything else uses ``fn.log_prob``.
    """
    fn, value = site["fn"], site["value"]
    lp = _log_prob(fn, value, detach)
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
            f"Guide site '{name}' has NaN or infinite logits; check the guide's "
            "parameters (e.g. lower the learning rate) or clamp the logits. "
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
# evaluation plans
# ---------------------------------------------------------------------------


class Plan:
    """
    Which configurations an estimator evaluates. Evaluation ``e`` uses noise
    draw ``source[e]`` of every discrete site and takes the antithetic value
    at the sites ``j`` with ``flips[e][j]``; ``relax[e][j]`` (optional) marks
    sites that take a relaxed value instead (1: at the perturbed logits
    :math:`z`, 2: at the conditional :math:`\\tilde z`; REBAR, RELAX). A
    non-discrete latent site after ``k`` discrete sites takes the value of
    evaluation ``base[e]`` (same noise draw, no changes) unless one of the
    first ``k`` sites is flipped or relaxed in ``e`` (:meth:`copy_index`); in
    NumPyro this holds because evaluations of one draw share the continuous
    sites' keys (module docstring). Evaluations without relaxed sites are
    the *hard* ones.
    """

    #: categorical sites sampled by stick-breaking, the flipped evaluations
    #: taking the antithetic class (DisARM's categorical coupling); else Gumbel-argmax
    stick_breaking = False

    def __init__(self, source, flips, value_fn=None, relax=None):
        #: optional ``value_fn(info, u, alpha, hard, relax) -> value``: the
        #: value a discrete site takes given its noise, logits, hard sample and
        #: relax code (the evaluation's int code of the site, traced under
        #: ``vmap``), e.g. a straight-through value ``hard + (s - sg(s))``;
        #: default the hard one
        self.value_fn = value_fn
        self.source = list(source)
        self.flips = [tuple(bool(x) for x in f) for f in flips]
        self.num_evaluations = len(self.source)
        self.num_draws = max(self.source) + 1
        T = len(self.flips[0]) if self.flips else 0
        self.relax = [tuple(int(x) for x in r) for r in relax] if relax else None
        if self.relax is None:
            self.relax = [(0,) * T] * self.num_evaluations
        #: per evaluation, whether every site takes its hard value
        self.hard = [not any(r) for r in self.relax]
        self.changed = [
            tuple(bool(f) or bool(r) for f, r in zip(fl, rl))
            for fl, rl in zip(self.flips, self.relax)
        ]
        unchanged = {}
        for e, (s, c) in enumerate(zip(self.source, self.changed)):
            if not any(c):
                unchanged.setdefault(s, e)
        self.base = [unchanged.get(s, e) for e, s in enumerate(self.source)]

    @classmethod
    def pairs(cls, T):
        """ARM/DisARM: the base path and one antithetic flip per site."""
        return cls([0] * (T + 1), [[t == e - 1 for t in range(T)] for e in range(T + 1)])

    @classmethod
    def independent(cls, K, T):
        """K independent samples (RLOO, VIMCO)."""
        return cls(range(K), [[False] * T] * K)

    @classmethod
    def relaxed(cls, T):
        """REBAR/RELAX, per layer (ESTIMATORS.md section 5): the hard path, then
        for each site ``t`` two evaluations in which the sites before ``t``
        keep their hard values, site ``t`` is relaxed at :math:`z_t`
        (evaluation ``2t + 1``) or at :math:`\\tilde z_t` (``2t + 2``), and
        the sites after it are relaxed at their own :math:`z`: ``1 + 2T``."""
        relax = [[0] * T]
        for t in range(T):
            for code in (1, 2):
                relax.append([0] * t + [code] + [1] * (T - t - 1))
        return cls([0] * (1 + 2 * T), [[False] * T] * (1 + 2 * T), relax=relax)

    @classmethod
    def antithetic_pairs(cls, P, T):
        """P independent antithetic pairs of the whole configuration (local
        DisARM): evaluations ``2k`` and ``2k + 1`` share noise draw ``k``."""
        return cls([e // 2 for e in range(2 * P)], [[e % 2 == 1] * T for e in range(2 * P)])

    def flips_any(self, j):
        return any(f[j] for f in self.flips)

    def copy_index(self, k):
        """Per evaluation, the evaluation whose value a non-discrete site
        after ``k`` discrete sites takes."""
        return [
            e if any(self.changed[e][:k]) else self.base[e]
            for e in range(self.num_evaluations)
        ]

    def arrays(self):
        """``source`` as an ``(E,)`` int array, ``flips`` as ``(E, T)`` bool,
        ``relax`` codes as ``(E, T)`` int."""
        T = len(self.flips[0]) if self.flips else 0
        E = self.num_evaluations
        flips = jnp.asarray(self.flips, dtype=bool).reshape(E, T)
        relax = jnp.asarray(self.relax, dtype=jnp.int32).reshape(E, T)
        return jnp.asarray(self.source, dtype=jnp.int32), flips, relax


# ---------------------------------------------------------------------------
# the noise handler
# ---------------------------------------------------------------------------


def _categorical_value(u, alpha, one_hot):
    """Gumbel-argmax: ``argmax(alpha - log(-log u))``."""
    z = jnp.argmax(alpha - jnp.log(-jnp.log(u)), -1)
    if one_hot:
        return jax.nn.one_hot(z, alpha.shape[-1], dtype=alpha.dtype)
    return z.astype(jnp.result_type(int))


def _stick_breaking_value(u, alpha, flip, one_hot):
    """The stick-breaking class (antithetic where ``flip``), as
    :func:`_categorical_value` returns it."""
    z = stick_breaking_value(u, alpha, flip)
    if one_hot:
        return jax.nn.one_hot(z, alpha.shape[-1], dtype=alpha.dtype)
    return z.astype(jnp.result_type(int))


class NoiseMessenger(Messenger):
    """
    Owns the noise of the discrete guide sites of one evaluation.

    Sets only ``msg["value"]`` (the site stays latent and replayable). For a
    continuous latent site it folds the key given by the (inner) ``seed``
    handler with the evaluation's noise draw (when the plan has several).
    Records ``(alpha, u, value)`` per discrete site in ``self.record``.

    :param fn: the (seeded, substituted) guide.
    :param plan: the :class:`Plan`, or None for the base path (draw 0, no
        flips; used by :func:`discover`).
    :param evaluation: the evaluation index ``e`` (int or traced scalar).
    :param noise_key: key from which the uniforms are drawn.
    :param dict noise: optional ``{site_name: u}`` overriding the noise
        (tests): ``u`` of the logits' shape (every draw) or with a leading
        ``num_draws`` dim.
    :param str owner: the ELBO class name, for error messages.
    :param tuple supports: the site kinds handled.
    """

    def __init__(self, fn=None, plan=None, evaluation=0, noise_key=None, noise=None,
                 owner="ELBO", supports=("bernoulli",), infos=None):
        self.plan = plan
        self.evaluation = evaluation
        self.noise_key = noise_key
        self.noise = noise or {}
        self.owner = owner
        self.supports = supports
        self.infos = infos or {}
        self.record = {}
        self.draw, self.flips, self.relax = None, None, None
        if plan is not None:
            source, flips, relax = plan.arrays()
            self.flips = flips[evaluation]
            self.relax = relax[evaluation]
            if plan.num_draws > 1:
                self.draw = source[evaluation]
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample" or msg.get("is_observed", False):
            return
        if not _check_guide_site(msg, self.owner, self.supports):
            key = msg["kwargs"].get("rng_key")
            if self.draw is not None and msg["value"] is None and key is not None:
                msg["kwargs"]["rng_key"] = random.fold_in(key, self.draw)
            return
        name, fn = msg["name"], msg["fn"]
        if msg["value"] is not None:
            raise ValueError(
                f"Discrete guide site '{name}' already has a value (substituted or "
                f"conditioned); {self.owner} must draw it itself. Remove the "
                "substitution from the guide."
            )
        index = len(self.record)
        kind = _kind(_base_dist(fn))
        shape = tuple(msg["kwargs"].get("sample_shape", ())) + tuple(fn.shape())
        alpha = site_logits(fn, kind, shape)
        _check_finite(name, alpha)
        u = self._uniform(name, index, alpha)
        flip = False
        if self.plan is not None and self.plan.flips_any(index):
            flip = self.flips[index]  # a traced bool under vmap
        if kind == "bernoulli":
            hard = bernoulli_value(u, alpha)
            if flip is not False:
                hard = jnp.where(flip, antithetic_value(u, alpha), hard)
        elif self.plan is not None and self.plan.stick_breaking:
            hard = _stick_breaking_value(u, alpha, flip, kind == "onehot")
        else:
            hard = _categorical_value(u, alpha, kind == "onehot")
        if self.plan is not None and self.plan.value_fn is not None:
            value = self.plan.value_fn(
                self.infos.get(name), u, alpha, hard, self.relax[index]
            )
        elif kind == "bernoulli":
            value = hard.astype(jnp.result_type(int))
        else:
            value = hard
        msg["value"] = value
        self.record[name] = (alpha, u, hard)

    def _uniform(self, name, index, alpha):
        shape = alpha.shape
        if name in self.noise:
            u = jnp.asarray(self.noise[name], alpha.dtype)
            if self.draw is not None and u.ndim == len(shape) + 1:
                u = u[self.draw]
            return jnp.broadcast_to(u, shape)
        key = random.fold_in(self.noise_key, index + 1)
        if self.draw is not None:
            key = random.fold_in(key, self.draw)
        # in (0, 1): the logit and Gumbel transforms stay finite
        return random.uniform(key, shape, alpha.dtype, minval=jnp.finfo(alpha.dtype).tiny)


# ---------------------------------------------------------------------------
# one evaluation
# ---------------------------------------------------------------------------


def _traces(e, key, params, model, guide, args, kwargs, noise, owner, plan=None,
            supports=("bernoulli",), infos=None):
    noise_key, guide_key, model_key = random.split(key, 3)
    messenger = NoiseMessenger(
        seed(substitute(guide, data=params), guide_key),
        plan=plan,
        evaluation=e,
        noise_key=noise_key,
        noise=noise,
        owner=owner,
        supports=supports,
        infos=infos,
    )
    guide_trace = trace(messenger).get_trace(*args, **kwargs)
    mutable = {
        name: site["value"]
        for name, site in guide_trace.items()
        if site["type"] == "mutable"
    }
    model_params = {**params, **mutable}
    seeded_model = seed(replay(substitute(model, data=model_params), guide_trace), model_key)
    model_trace = trace(seeded_model).get_trace(*args, **kwargs)
    mutable.update(
        {
            name: site["value"]
            for name, site in model_trace.items()
            if site["type"] == "mutable"
        }
    )
    return guide_trace, model_trace, messenger.record, mutable


def _reduce_term(lp, term_frames, signal_plates, signal_ndim):
    """
    Sum one term's log-prob array over every dim except the plates of
    ``signal_plates`` it shares, laid out right-aligned in ``signal_ndim``
    dims (size 1 at the plates it lacks).
    """
    target = dict(signal_plates)
    keep = {f.dim: target[f.name] for f in term_frames if f.name in target}
    lp = jnp.asarray(lp)
    n = max(jnp.ndim(lp), max((-f.dim for f in term_frames), default=0))
    lp = jnp.reshape(lp, (1,) * (n - jnp.ndim(lp)) + jnp.shape(lp))
    sum_axes = tuple(i for i in range(n) if (i - n) not in keep)
    x = jnp.sum(lp, axis=sum_axes) if sum_axes else lp
    term_dims = sorted(keep)
    target_dims = [keep[d] for d in term_dims]
    if target_dims != sorted(target_dims):
        perm = sorted(range(len(target_dims)), key=lambda i: target_dims[i])
        x = jnp.transpose(x, perm)
        target_dims = sorted(target_dims)
    shape = [1] * signal_ndim
    for size, dim in zip(jnp.shape(x), target_dims):
        shape[signal_ndim + dim] = size
    return jnp.reshape(x, shape)


def _terms(model_trace, guide_trace, owned, detach_discrete):
    """``[(side, name, frames, lp)]``: scaled, masked log-prob arrays, guide
    terms negated; the discrete guide sites' log-probs detached if asked
    (``detach_discrete`` a bool, or a traced bool scalar: detached where
    true, as on REBAR's hard evaluations)."""
    traced = not isinstance(detach_discrete, bool)
    terms = []
    for name, site in model_trace.items():
        if site["type"] == "sample":
            terms.append(("model", name, site["cond_indep_stack"], site_log_prob(site)))
    for name, site in guide_trace.items():
        if site["type"] == "sample":
            if traced and name in owned:
                lp = site_log_prob(site)
                lp = jnp.where(detach_discrete, stop_gradient(lp), lp)
            else:
                detach = not traced and detach_discrete and name in owned
                lp = site_log_prob(site, detach=detach)
            terms.append(("guide", name, site["cond_indep_stack"], -lp))
    return terms


def _signals(terms, structure):
    """Learning signals per layout ``(plates, ndim)`` of the discrete sites."""
    signals = {}
    for s in structure.discrete.values():
        layout = (s.signal_plates, s.signal_ndim)
        if layout in signals:
            continue
        total = jnp.zeros((1,) * s.signal_ndim)
        for _, _, frames, lp in terms:
            x = _reduce_term(lp, frames, s.signal_plates, s.signal_ndim)
            names = {fr.name for fr in frames}
            for plate_name, _ in s.signal_plates:
                scale = structure.plate_scales.get(plate_name, 1.0)
                if plate_name not in names and scale != 1.0:
                    x = x * scale
            total = total + x
        signals[layout] = total
    return signals


def _bound_terms(terms, structure):
    """
    ``(f_P, outside)``: the terms inside all common plates reduced to their
    layout, without their subsample scale :math:`s_P`; and ``{(side, name):
    sum}`` of the terms outside them (checked later not to depend on the
    evaluation). A term in a subsampled plate that is not common raises.
    """
    common = {n for n, _ in structure.common_plates}
    s_P = structure.common_scale
    f = jnp.zeros((1,) * structure.common_ndim)
    outside = {}
    for side, name, frames, lp in terms:
        names = {fr.name for fr in frames}
        for fr in frames:
            if fr.name not in common and structure.plate_scales.get(fr.name, 1.0) != 1.0:
                raise NotImplementedError(
                    f"The {side} site '{name}' is in the subsampled plate "
                    f"'{fr.name}', which not every latent site is in; the "
                    "K-sample bound is only defined for subsampling of the plates "
                    f"common to all latent sites ({sorted(common)})."
                )
        if common <= names:
            x = _reduce_term(lp, frames, structure.common_plates, structure.common_ndim)
            f = f + (x / s_P if s_P != 1.0 else x)
        else:
            outside[side, name] = jnp.sum(lp)
    return f, outside


def _evaluate(e, key, params, structure, plan, model, guide, args, kwargs, noise, owner,
              supports, detach_discrete, signals, bound):
    """One evaluation: total f, learning signals, bound terms, site records."""
    guide_trace, model_trace, record, mutable = _traces(
        e, key, params, model, guide, args, kwargs, noise, owner, plan, supports,
        structure.discrete,
    )
    if detach_discrete == "hard":
        # REBAR, RELAX: detached on the hard evaluations only; the relaxed ones
        # are differentiated totally
        hard = jnp.asarray(plan.hard, dtype=bool)[e]
        terms = _terms(model_trace, guide_trace, set(record), hard)
    else:
        terms = _terms(model_trace, guide_trace, set(record), detach_discrete)
    f = sum((jnp.sum(lp) for _, _, _, lp in terms), start=jnp.zeros(()))
    out = {"f": f, "sites": {n: record[n] for n in structure.discrete}, "mutable": mutable}
    if signals:
        out["signals"] = _signals(terms, structure)
    if bound:
        out["bound"], out["outside"] = _bound_terms(terms, structure)
    return out


# ---------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------


def discover(key, params, model, guide, args, kwargs, owner="ELBO", warned=None,
             supports=("bernoulli",)):
    """
    Find the static :class:`GuideStructure` of ``model``/``guide`` by tracing
    the base path abstractly (:func:`jax.eval_shape`: no FLOPs, no device
    work).

    Raises the structural errors (unsupported or enumerated sites, a
    subsampled plate where localising is invalid) and warns once per
    ``warned`` set where a signal is summed over a plate.
    """
    found = {}

    def fn(key, params):
        guide_trace, model_trace, record, _ = _traces(
            0, key, params, model, guide, args, kwargs, None, owner, None, supports
        )
        _check_match(model_trace, guide_trace)
        _validate_model(model_trace, plate_warning="loose")
        found["traces"] = (model_trace, guide_trace)  # metadata only, after tracing
        found["guide"] = _summarize(guide_trace)
        found["model"] = _summarize(model_trace)
        found["owned"] = list(record)
        return jnp.zeros(())

    with validation_enabled(False):
        try:
            jax.eval_shape(fn, key, params)
        except (ValueError, TypeError, IndexError) as err:
            # e.g. a model that broadcasts the guide's values against its own
            # plate sizes: name the site where model and guide disagree
            _diagnose_mismatch(err, key, params, model, guide, args, kwargs, owner, supports)
            raise
    guide_sites, guide_plates = found["guide"]
    model_sites, model_plates = found["model"]
    for name, info in model_sites.items():
        if info["observed"] or name in guide_sites:
            continue
        if info["enumerate"]:
            raise ValueError(
                f"Model site '{name}' is marked for enumeration "
                f"(infer={{'enumerate': {info['enumerate']!r}}}); {owner} estimates "
                "gradients by sampling. Remove the enumerate flag, or use "
                "numpyro.infer.TraceEnum_ELBO to enumerate it."
            )
        raise ValueError(
            f"Model site '{name}' is latent but not in the guide. {owner} needs "
            "every latent site of the model to be sampled in the guide; observe it "
            "(obs=...) or add it to the guide."
        )
    check_model_guide_match(*found["traces"])
    plate_sizes = {**model_plates, **guide_plates}
    plate_scales = {}
    for sites in (guide_sites, model_sites):
        for info in sites.values():
            for f in info["frames"]:
                full = plate_sizes.get(f.name, f.size)
                plate_scales[f.name] = full / f.size
    order = [n for n, info in guide_sites.items() if not info["observed"]]
    owned = found["owned"]
    discrete = OrderedDict()
    for index, name in enumerate(owned):
        info = guide_sites[name]
        later = order[order.index(name) + 1 :]
        kept = []
        for f in info["frames"]:
            offenders = [n for n in later if f.name not in guide_sites[n]["plates"]]
            if not offenders:
                kept.append((f.name, f.dim))
                continue
            if plate_scales.get(f.name, 1.0) != 1.0:
                raise NotImplementedError(
                    f"Discrete site '{name}' is in the subsampled plate "
                    f"'{f.name}' and guide site(s) {offenders} outside that plate "
                    "run after it; the learning signal of a subsampled element then "
                    "depends on the other elements and cannot be estimated without "
                    "bias. Do not subsample this plate, or draw the global site(s) "
                    "before the local discrete site."
                )
            tag = (name, f.name, tuple(offenders))
            if warned is None or tag not in warned:
                if warned is not None:
                    warned.add(tag)
                warnings.warn(
                    f"Guide site(s) {offenders} outside plate '{f.name}' run after "
                    f"discrete site '{name}' inside it; the learning signal of "
                    f"'{name}' is summed over '{f.name}' (unbiased, but its "
                    "variance grows with the plate size).",
                    RuntimeWarning,
                    stacklevel=3,
                )
        ndim = max((-d for _, d in kept), default=0)
        kind = info["kind"]
        discrete[name] = SiteInfo(
            name, index, info["event_dim"], kind, info["event_dim"] + (kind == "categorical"),
            tuple(sorted(kept)), ndim,
        )
    num_before, count = {}, 0
    common = None
    for name in order:
        if name in discrete:
            count += 1
        else:
            num_before[name] = count
        frames = {(f.name, f.dim) for f in guide_sites[name]["frames"]}
        common = frames if common is None else common & frames
    return GuideStructure(discrete, num_before, plate_scales, tuple(sorted(common or ())))


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


def _diagnose_mismatch(err, key, params, model, guide, args, kwargs, owner, supports):
    """After ``err`` while tracing model and guide: trace both without
    replay (each with its own draws) and raise, from ``err``, the named
    mismatch of :func:`_check_match` if there is one; else return."""

    def fn(key, params):
        guide_key, model_key = random.split(key)
        messenger = NoiseMessenger(
            seed(substitute(guide, data=params), guide_key), noise_key=key, owner=owner,
            supports=supports,
        )
        guide_trace = trace(messenger).get_trace(*args, **kwargs)
        model_trace = trace(seed(substitute(model, data=params), model_key)).get_trace(
            *args, **kwargs
        )
        _check_match(model_trace, guide_trace)
        return jnp.zeros(())

    try:
        jax.eval_shape(fn, key, params)
    except ValueError as named:
        if str(named).startswith("Model and guide"):
            raise named from err
    except Exception:  # the model fails on its own: the original error stands
        pass


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


# ---------------------------------------------------------------------------
# all evaluations
# ---------------------------------------------------------------------------


Evaluations = namedtuple(
    "Evaluations", ["f", "signals", "sites", "mutable_state", "bound", "outside"]
)
Evaluations.__doc__ = """
Output of :func:`run_evaluations`; every per-evaluation array has the
evaluation dim first.

:param f: ``(E,)`` total f (log p - log q) per evaluation.
:param dict signals: ``(plates, ndim) -> (E, *signal_shape)`` learning
    signals (None unless asked for).
:param dict sites: ``name -> (alpha, u, hard value)``, each ``(E, ...)``.
:param mutable_state: the mutable state of evaluation 0 (or None).
:param bound: ``(E, *common_plate_shape)``: each evaluation's log-weight per
    element of the plates common to all latent sites, without their
    subsample scale (None unless asked for).
:param outside: the sum of the terms outside those plates (a scalar; they
    do not depend on the evaluation).
"""


def run_evaluations(
    key, params, model, guide, args, kwargs, *, structure, plan, vectorize=True, noise=None,
    owner="ELBO", supports=("bernoulli",), detach_discrete=True, signals=True, bound=False,
):
    """
    Run guide and model over the evaluations of ``plan`` with the same
    ``key``: ``jax.vmap`` over the evaluation index, or ``jax.lax.map`` when
    ``vectorize=False`` (the same numbers).

    With ``bound=True`` the terms outside the plates common to all latent
    sites must not depend on the evaluation; this is checked at trace time
    (``jax.vmap(..., out_axes=None)``) and raises naming the site.
    """
    run_one = partial(
        _evaluate,
        structure=structure,
        plan=plan,
        model=model,
        guide=guide,
        args=args,
        kwargs=kwargs,
        noise=noise,
        owner=owner,
        supports=supports,
        detach_discrete=detach_discrete,
        signals=signals,
        bound=bound,
    )
    evals = jnp.arange(plan.num_evaluations)
    with validation_enabled(False):
        if bound:
            _check_outside(run_one, evals, key, params, structure)
        if vectorize:
            out = jax.vmap(run_one, in_axes=(0, None, None))(evals, key, params)
        else:
            out = jax.lax.map(lambda e: run_one(e, key, params), evals)
    for name, (alpha, _, _) in out["sites"].items():
        _check_finite(name, alpha)
    mutable = out["mutable"]
    mutable = jax.tree.map(lambda x: x[0], mutable) if mutable else None
    outside = None
    if bound:
        outside = sum((v[0] for v in out["outside"].values()), start=jnp.zeros(()))
    return Evaluations(out["f"], out.get("signals"), out["sites"], mutable,
                       out.get("bound"), outside)


def _check_outside(run_one, evals, key, params, structure):
    """Trace-time (abstract) check that no term outside the common plates
    depends on the evaluation: such an output of ``jax.vmap`` is batched."""
    if len(evals) < 2:
        return

    def outside(e, key, params, name=None):
        terms = run_one(e, key, params)["outside"]
        return terms if name is None else terms[name]

    def check(name=None):
        fn = jax.vmap(partial(outside, name=name), in_axes=(0, None, None), out_axes=None)
        try:
            jax.eval_shape(fn, evals, key, params)
        except ValueError:
            return False
        return True

    if check():
        return
    common = sorted(n for n, _ in structure.common_plates)
    for side, name in jax.eval_shape(outside, evals[0], key, params):
        if not check((side, name)):
            raise ValueError(
                f"The {side} site '{name}' is outside the plates {common} "
                "common to all latent sites, and its log-prob depends on the "
                "samples; the per-element K-sample bound is not defined for it. "
                "Put the site inside those plates, or the latent sites outside."
            ) from None


# ---------------------------------------------------------------------------
# learning signals and surrogates
# ---------------------------------------------------------------------------


def total_elbo(evals):
    """The ELBO integrand summed over the plates: shape ``(E,)``."""
    return evals.f


def _expand(x, ndim, alpha, alpha_event_dim):
    """``x`` of shape ``(E', *layout)`` (``ndim`` right-aligned layout dims)
    reshaped to broadcast against ``alpha`` of shape ``(E, *batch, *event)``."""
    x = jnp.asarray(x)
    x = jnp.reshape(x, jnp.shape(x)[:1] + (1,) * (1 + ndim - jnp.ndim(x)) + jnp.shape(x)[1:])
    pad = alpha.ndim - 1 - alpha_event_dim - ndim
    return jnp.reshape(x, x.shape[:1] + (1,) * pad + x.shape[1:] + (1,) * alpha_event_dim)


def _float_value(info, alpha, value):
    if info.kind == "categorical":
        return jax.nn.one_hot(value, alpha.shape[-1], dtype=alpha.dtype)
    return jnp.asarray(value, alpha.dtype)


def site_signal(evals, info):
    """
    A site's learning signal (detached), alpha and hard value, each with the
    evaluation dim first; the signal reshaped to broadcast against alpha
    (size-1 dims at the plates it is summed over and at alpha's event dims).
    """
    alpha, _, value = evals.sites[info.name]
    signal = stop_gradient(evals.signals[(info.signal_plates, info.signal_ndim)])
    return _expand(signal, info.signal_ndim, alpha, info.alpha_event_dim), alpha, value


def pair_surrogate(evals, structure, pair_estimate, categorical_estimate=None):
    """
    ``(elbo, surrogate)`` of one draw of a pair estimator (ARM, DisARM): the
    ELBO averaged over the evaluations, and a surrogate whose gradient is
    pathwise for model parameters and reparameterized sites and
    ``pair_estimate(f, f_tilde, u, b, b_tilde, alpha)`` (of the base and
    flipped evaluations of each site) for the discrete sites' logits;
    ``categorical_estimate(f, f_tilde, D, D_tilde, alpha)`` for categorical
    sites (one-hot values, class dim last; the signal already has a size-1
    class dim, see :func:`site_signal`).
    """
    f = total_elbo(evals)
    surr = jnp.mean(f)
    for info in structure.discrete.values():
        signal, alpha, value = site_signal(evals, info)
        j = info.index + 1
        if info.kind != "bernoulli":  # one-hot values, signal over the class dim
            D = _float_value(info, alpha, value)
            g = categorical_estimate(signal[0], signal[j], D[0], D[j], stop_gradient(alpha[0]))
            surr = surr + jnp.sum(alpha[0] * stop_gradient(g))
            continue
        u = evals.sites[info.name][1][0]
        b = jnp.asarray(value[0], alpha.dtype)
        b_tilde = jnp.asarray(value[j], alpha.dtype)
        g = pair_estimate(signal[0], signal[j], u, b, b_tilde, stop_gradient(alpha[0]))
        surr = surr + jnp.sum(alpha[0] * stop_gradient(g))
    return jnp.mean(f), surr


def score(info, alpha, value):
    """:math:`\\nabla_\\alpha \\log q(v)`: ``v - sigmoid(alpha)``, or
    ``one_hot(v) - softmax(alpha)`` for categorical sites (detached)."""
    alpha = stop_gradient(alpha)
    value = _float_value(info, alpha, value)
    if info.kind == "bernoulli":
        return value - jax.nn.sigmoid(alpha)
    return value - jax.nn.softmax(alpha, -1)


def score_surrogate(evals, structure, weight):
    """
    ``sum_sites sum_e alpha_e * sg(c_e * score_e)`` for score-function
    estimators, where ``c = weight(signal)`` maps each site's learning
    signals on the evaluations (``(E, *signal_shape)``, evaluation dim
    first) to their coefficients.
    """
    surr = jnp.zeros(())
    for info in structure.discrete.values():
        alpha, _, value = evals.sites[info.name]
        signal = stop_gradient(evals.signals[(info.signal_plates, info.signal_ndim)])
        c = _expand(weight(signal), info.signal_ndim, alpha, info.alpha_event_dim)
        surr = surr + jnp.sum(alpha * stop_gradient(c * score(info, alpha, value)))
    return surr
