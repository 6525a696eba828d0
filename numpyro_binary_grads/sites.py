"""
The site mechanism: THE one place where discrete guide sites are found, their
noise is owned, guide and model are run over an "evaluation" dim, and
per-site learning signals are formed.

For every non-reparameterized Bernoulli guide site (logits or probs, possibly
``.to_event`` / expanded / masked, inside plates, possibly depending on earlier
sites) :class:`NoiseMessenger` draws the site's uniform noise itself,
``u_j = uniform(fold_in(noise_key, j), shape)``, and sets the value from noise
and logits. With evaluations ``e = 0`` (base) and ``e = t`` ("flip site t",
``t = 1..T``, the discrete guide sites in execution order), site ``j`` takes
``1[u_j < sigmoid(alpha_j)]`` in every evaluation except ``e = j``, where it
takes the antithetic ``1[1 - u_j < sigmoid(alpha_j)]``.

All evaluations run with the same rng key, vectorized with
``jax.vmap(run_one, in_axes=(0, None, None))(jnp.arange(E), key, params)`` (or
``jax.lax.map`` with ``vectorize=False``; the same numbers): every draw other
than the owned noise is shared, so every site executed before the flipped
site keeps exactly its base value (the continuous-upstream bias trap of
DESIGN.md), and sites after it reuse their noise (common random numbers).

Learning signals keep plate dims: for discrete site ``j`` each model/guide
log-prob term is summed over the plates ``j`` is not in and broadcast over
those it is in; a term lacking a subsampled plate of ``j`` is multiplied by
that plate's subsample scale, so that element ``n``'s signal estimates the
full-data objective. Localising over a plate ``P`` is valid only if no guide
site outside ``P`` executes after ``j``; otherwise the signal is summed over
``P`` (with a warning naming the sites), and a subsampled ``P`` raises.

Discrete log-probs (Bernoulli, Categorical, one-hot) are computed here from
the logits, never with ``fn.log_prob``: NumPyro's
``Bernoulli(logits=0.).log_prob`` has a wrong gradient. All reductions are
done inside the vmapped function on arrays without the evaluation dim, with
explicit right-aligned shapes (``MultiFrameTensor.sum_to`` transposes arrays
that carry a leading evaluation dim).

The static structure (sites, plates, ``E``) is found at trace time with
:func:`jax.eval_shape`, so it costs nothing per step under ``jit``.
Structural errors are raised then; NaN/inf logits only outside ``jit`` and
``grad`` (under them they surface as a NaN loss; ``SVI.stable_update`` exists
for that). NumPyro's distribution validation is off inside our evaluations
(as in the Pyro package): the user's choice applies outside them.
"""

from collections import namedtuple
from functools import partial
import warnings

import jax
from jax import random
from jax.lax import stop_gradient
import jax.numpy as jnp

import numpyro.distributions as dist
from numpyro.distributions import ExpandedDistribution, Independent, MaskedDistribution
from numpyro.distributions.distribution import validation_enabled
from numpyro.handlers import replay, seed, substitute, trace
from numpyro.primitives import Messenger
from numpyro.util import _validate_model, check_model_guide_match, not_jax_tracer

from .distributions import OneHotCategorical
from .estimators import antithetic_value, bernoulli_value

__all__ = [
    "DiscreteSite",
    "Structure",
    "NoiseMessenger",
    "discover",
    "run_evaluations",
    "surrogate_loss",
    "site_log_prob",
]


DiscreteSite = namedtuple(
    "DiscreteSite", ["name", "index", "event_dim", "signal_plates", "signal_ndim"]
)
DiscreteSite.__doc__ = """
Static description of one discrete guide site.

:param str name: site name.
:param int index: ``j``, 1-based position among discrete guide sites in
    execution order; evaluation ``e = j`` flips this site.
:param int event_dim: event dims of the site's value.
:param tuple signal_plates: ``((plate_name, dim), ...)``, the plates the
    learning signal keeps (the site's plates where localising is valid).
:param int signal_ndim: number of right-aligned batch dims of the signal.
"""

Structure = namedtuple("Structure", ["sites", "plate_scales"])
Structure.__doc__ = """
Static structure of a guide/model pair, found at trace time.

:param tuple sites: the :class:`DiscreteSite` s in execution order.
:param dict plate_scales: plate name -> ``size / subsample_size``.
"""


def _num_evaluations(structure):
    return 1 + len(structure.sites)


# ---------------------------------------------------------------------------
# distributions
# ---------------------------------------------------------------------------

_WRAPPERS = (Independent, ExpandedDistribution, MaskedDistribution)
_BERNOULLI = (dist.BernoulliLogits, dist.BernoulliProbs)
_CATEGORICAL = (dist.CategoricalLogits, dist.CategoricalProbs)


def _base_dist(fn):
    while isinstance(fn, _WRAPPERS):
        fn = fn.base_dist
    return fn


def _bernoulli_logits(base):
    if isinstance(base, dist.BernoulliLogits):
        return base.logits
    probs = base.probs
    return jnp.log(probs) - jnp.log1p(-probs)


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
        logp = jnp.broadcast_to(logp, jnp.shape(value) + logp.shape[-1:])
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


def _check_guide_site(msg, owner):
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
    if isinstance(base, _BERNOULLI):
        return True
    if not getattr(fn.support, "is_discrete", False):
        raise NotImplementedError(
            f"Guide site '{name}' ({type(base).__name__}) is neither "
            f"reparameterizable nor a discrete site {owner} handles; use "
            "a reparameterizable distribution or numpyro.infer.TraceGraph_ELBO."
        )
    hint = ""
    if isinstance(base, _CATEGORICAL + (OneHotCategorical,)):
        hint = (
            " Categorical sites are handled by score-function estimators such "
            "as RLOO_ELBO or numpyro.infer.TraceGraph_ELBO;"
        )
    raise NotImplementedError(
        f"Guide site '{name}' has a {type(base).__name__} distribution, which "
        f"{owner} does not handle (it handles Bernoulli)." + hint
        + " Use numpyro.infer.TraceGraph_ELBO for this guide, or change the site."
    )


def _check_finite(name, alpha):
    """NaN/inf logits raise where values are concrete (outside jit and grad)."""
    if not_jax_tracer(alpha) and not bool(jnp.all(jnp.isfinite(alpha))):
        raise ValueError(
            f"Guide site '{name}' has NaN or infinite logits; check the guide's "
            "parameters (e.g. lower the learning rate) or clamp the logits. "
            "(Under jit or grad this cannot be detected and the loss is NaN; "
            "SVI.stable_update skips such steps.)"
        )


# ---------------------------------------------------------------------------
# the noise handler
# ---------------------------------------------------------------------------


class NoiseMessenger(Messenger):
    """
    Owns the noise of every non-reparameterized Bernoulli guide site.

    Sets only ``msg["value"]`` (the site stays latent and replayable):
    ``1[u_j < sigmoid(alpha_j)]``, or the antithetic value when
    ``evaluation == j``. Records ``(alpha, u, b, b_tilde)`` per site in
    ``self.record`` (``b``/``b_tilde`` as float arrays of the logits' dtype).

    :param fn: the (seeded, substituted) guide.
    :param evaluation: the evaluation index ``e`` (int or traced scalar).
    :param noise_key: key from which ``u_j = uniform(fold_in(noise_key, j))``.
    :param dict noise: optional ``{site_name: u}`` overriding the noise
        (tests; ``u`` must have the site's full shape).
    :param str owner: the ELBO class name, for error messages.
    """

    def __init__(self, fn=None, evaluation=0, noise_key=None, noise=None, owner="ELBO"):
        self.evaluation = evaluation
        self.noise_key = noise_key
        self.noise = noise or {}
        self.owner = owner
        self.record = {}
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample" or msg.get("is_observed", False):
            return
        if not _check_guide_site(msg, self.owner):
            return
        name, fn = msg["name"], msg["fn"]
        if msg["value"] is not None:
            raise ValueError(
                f"Discrete guide site '{name}' already has a value (substituted or "
                f"conditioned); {self.owner} must draw it itself. Remove the "
                "substitution from the guide."
            )
        index = len(self.record) + 1
        shape = tuple(msg["kwargs"].get("sample_shape", ())) + tuple(fn.shape())
        alpha = jnp.broadcast_to(_bernoulli_logits(_base_dist(fn)), shape)
        if not jnp.issubdtype(alpha.dtype, jnp.floating):
            alpha = alpha.astype(jnp.result_type(float))
        _check_finite(name, alpha)
        if name in self.noise:
            u = jnp.broadcast_to(jnp.asarray(self.noise[name], alpha.dtype), shape)
        else:
            u = random.uniform(random.fold_in(self.noise_key, index), shape, alpha.dtype)
        b = bernoulli_value(u, alpha)
        b_tilde = antithetic_value(u, alpha)
        value = jnp.where(self.evaluation == index, b_tilde, b)
        msg["value"] = value.astype(jnp.result_type(int))
        self.record[name] = (alpha, u, b, b_tilde)


# ---------------------------------------------------------------------------
# one evaluation
# ---------------------------------------------------------------------------


def _traces(e, key, params, model, guide, args, kwargs, noise, owner):
    noise_key, guide_key, model_key = random.split(key, 3)
    messenger = NoiseMessenger(
        seed(substitute(guide, data=params), guide_key),
        evaluation=e,
        noise_key=noise_key,
        noise=noise,
        owner=owner,
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


def _evaluate(e, key, params, structure, model, guide, args, kwargs, noise, owner):
    """One evaluation: total f, per-signal-layout learning signals, site records."""
    guide_trace, model_trace, record, mutable = _traces(
        e, key, params, model, guide, args, kwargs, noise, owner
    )
    owned = set(record)
    terms = []
    for name, site in model_trace.items():
        if site["type"] == "sample":
            terms.append((site["cond_indep_stack"], site_log_prob(site)))
    for name, site in guide_trace.items():
        if site["type"] == "sample":
            lp = site_log_prob(site, detach=name in owned)
            terms.append((site["cond_indep_stack"], -lp))
    f = sum((jnp.sum(lp) for _, lp in terms), start=jnp.zeros(()))
    signals = {}
    for s in structure.sites:
        layout = (s.signal_plates, s.signal_ndim)
        if layout in signals:
            continue
        total = None
        for frames, lp in terms:
            x = _reduce_term(lp, frames, s.signal_plates, s.signal_ndim)
            names = {fr.name for fr in frames}
            for plate_name, _ in s.signal_plates:
                scale = structure.plate_scales.get(plate_name, 1.0)
                if plate_name not in names and scale != 1.0:
                    x = x * scale
            total = x if total is None else total + x
        signals[layout] = jnp.zeros(()) if total is None else total
    sites = {name: record[name] for name in (s.name for s in structure.sites)}
    return f, signals, sites, mutable


# ---------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------


def discover(key, params, model, guide, args, kwargs, owner="ELBO", warned=None):
    """
    Find the static :class:`Structure` of ``model``/``guide`` by tracing
    evaluation 0 abstractly (:func:`jax.eval_shape`: no FLOPs, no device work).

    Raises the structural errors (unsupported or enumerated sites, a
    subsampled plate where localising is invalid) and warns once per
    ``warned`` set where a signal is summed over a plate.
    """
    found = {}

    def fn(key, params):
        guide_trace, model_trace, record, _ = _traces(
            0, key, params, model, guide, args, kwargs, None, owner
        )
        _validate_model(model_trace, plate_warning="loose")
        found["traces"] = (model_trace, guide_trace)  # metadata only, after tracing
        found["guide"] = _summarize(guide_trace)
        found["model"] = _summarize(model_trace)
        found["owned"] = list(record)
        return jnp.zeros(())

    with validation_enabled(False):
        jax.eval_shape(fn, key, params)
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
    result = []
    for index, name in enumerate(found["owned"], start=1):
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
        result.append(
            DiscreteSite(name, index, info["event_dim"], tuple(sorted(kept)), ndim)
        )
    return Structure(tuple(result), plate_scales)


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
                "enumerate": (site.get("infer") or {}).get("enumerate"),
            }
    return sites, plates


# ---------------------------------------------------------------------------
# all evaluations, and the surrogate
# ---------------------------------------------------------------------------


Evaluations = namedtuple("Evaluations", ["f", "signals", "sites", "mutable_state"])
Evaluations.__doc__ = """
Output of :func:`run_evaluations`.

:param f: ``(E,)`` total f (log p - log q, discrete guide log-probs detached)
    per evaluation.
:param dict signals: ``(plates, ndim) -> (E, *signal_shape)`` learning signals.
:param dict sites: ``name -> (alpha, u, b, b_tilde)`` of the base evaluation.
:param mutable_state: the mutable state of evaluation 0 (or None).
"""


def run_evaluations(
    key, params, model, guide, args, kwargs, *, structure, vectorize=True, noise=None, owner="ELBO"
):
    """
    Run guide and model over the ``E = 1 + T`` evaluations of ``structure``
    with the same ``key``: ``jax.vmap`` over the evaluation index, or
    ``jax.lax.map`` when ``vectorize=False`` (the same numbers).
    """
    run_one = partial(
        _evaluate,
        structure=structure,
        model=model,
        guide=guide,
        args=args,
        kwargs=kwargs,
        noise=noise,
        owner=owner,
    )
    E = _num_evaluations(structure)
    evals = jnp.arange(E)
    with validation_enabled(False):
        if vectorize:
            out = jax.vmap(run_one, in_axes=(0, None, None))(evals, key, params)
        else:
            out = jax.lax.map(lambda e: run_one(e, key, params), evals)
    f, signals, sites, mutable = out
    sites = {name: tuple(x[0] for x in rec) for name, rec in sites.items()}
    for name, (alpha, _, _, _) in sites.items():
        _check_finite(name, alpha)
    mutable = jax.tree.map(lambda x: x[0], mutable) if mutable else None
    return Evaluations(f, signals, sites, mutable)


def surrogate_loss(evaluations, structure, site_gradient):
    """
    The one scalar ``V + (S - sg(S))``: value ``V = -mean_e f_e`` (the
    ordinary ELBO estimate), gradient of
    ``S = -mean_e f_e - sum_j sum(alpha_j * sg(g_j))``, where
    ``g_j = site_gradient(f, f_tilde, u, b, b_tilde, alpha)`` is the detached
    estimate of d E[f] / d alpha_j, with ``f``/``f_tilde`` the signals of
    evaluations 0 and ``j`` broadcast to ``alpha_j``'s shape.
    """
    f = evaluations.f
    value = -jnp.mean(f)
    score = jnp.zeros((), dtype=value.dtype)
    for s in structure.sites:
        alpha, u, b, b_tilde = evaluations.sites[s.name]
        signal = evaluations.signals[(s.signal_plates, s.signal_ndim)]
        f0 = signal[0].reshape(signal.shape[1:] + (1,) * s.event_dim)
        fj = signal[s.index].reshape(signal.shape[1:] + (1,) * s.event_dim)
        g = site_gradient(f0, fj, u, b, b_tilde, alpha)
        score = score + jnp.sum(alpha * stop_gradient(g))
    return value - (score - stop_gradient(score))
