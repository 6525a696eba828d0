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
those it is in; terms carry NumPyro's scales only, so the estimate is of the
gradient of the minibatch objective, as ``Trace_ELBO``'s. Localising over a plate ``P`` is valid only if no guide
site outside ``P`` executes after ``j``; otherwise the signal is summed over
``P`` (with a warning naming the sites; for a subsampled ``P`` too, where the
summed signal is still that of the minibatch objective).
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


The mechanism is split by concern: :mod:`~numpyro_binary_grads.structure`
(site structure, logits, log-probs and checks), :mod:`~numpyro_binary_grads.plans`
(the :class:`Plan`), :mod:`~numpyro_binary_grads.noise` (the :class:`NoiseMessenger`),
:mod:`~numpyro_binary_grads.vectorized` (the evaluation path and
:func:`discover`) and :mod:`~numpyro_binary_grads.signals` (learning signals
and surrogates); this module re-exports their names.
"""

from .noise import NoiseMessenger, _categorical_value, _stick_breaking_value  # noqa: F401
from .plans import Plan  # noqa: F401
from .signals import (  # noqa: F401
    _bound_terms,
    _expand,
    _float_value,
    _reduce_term,
    _signals,
    pair_surrogate,
    score,
    score_surrogate,
    site_signal,
    total_elbo,
)
from .structure import (  # noqa: F401
    GuideStructure,
    SiteInfo,
    _base_dist,
    _bernoulli_logits,
    _check_finite,
    _check_guide_site,
    _check_match,
    _kind,
    _log_prob,
    _summarize,
    check_one_hot,
    site_log_prob,
    site_logits,
)
from .vectorized import (  # noqa: F401
    Evaluations,
    _diagnose_mismatch,
    _evaluate,
    _terms,
    _traces,
    discover,
    run_evaluations,
)

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
