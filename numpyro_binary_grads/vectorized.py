"""
The evaluation path of the site mechanism (:mod:`numpyro_binary_grads.sites`):
guide and model traced for one evaluation under the :class:`~numpyro_binary_grads.noise.NoiseMessenger`,
all evaluations of a :class:`~numpyro_binary_grads.noise.Plan` run with the
same key (``jax.vmap`` over the evaluation index, or ``jax.lax.map``), and
:func:`discover`, which finds the static structure by tracing the base path
abstractly (:func:`jax.eval_shape`) and raises the structural errors.
"""

from collections import OrderedDict, namedtuple
from functools import partial
import warnings

import jax
from jax import random
from jax.lax import stop_gradient
import jax.numpy as jnp

from numpyro.distributions.distribution import validation_enabled
from numpyro.handlers import replay, seed, substitute, trace
from numpyro.util import _validate_model, check_model_guide_match

from .noise import NoiseMessenger
from .signals import _bound_terms, _signals, zeros_like_terms
from .structure import GuideStructure, SiteInfo, _check_finite, _check_match, _summarize, site_log_prob

__all__ = ["Evaluations", "discover", "run_evaluations"]


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
                lp = site_log_prob(site, certain=True)
                lp = jnp.where(detach_discrete, stop_gradient(lp), lp)
            else:
                detach = not traced and detach_discrete and name in owned
                lp = site_log_prob(site, detach=detach, certain=name in owned)
            terms.append(("guide", name, site["cond_indep_stack"], -lp))
    return terms


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
    f = sum((jnp.sum(lp) for _, _, _, lp in terms), start=zeros_like_terms((), terms))
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
            # subsampled or not: the signal summed over the plate is that of the
            # minibatch objective (terms carry NumPyro's scales), as in Pyro
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
        outside = sum((v[0] for v in out["outside"].values()),
                      start=jnp.zeros((), jnp.result_type(out["f"])))
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
