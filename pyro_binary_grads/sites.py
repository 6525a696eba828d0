"""
The site mechanism: the one place where discrete guide sites are handled.

For every non-reparameterized discrete site of the guide the mechanism

1. **owns the noise** (:mod:`~pyro_binary_grads.noise`): it draws the site's
   uniforms :math:`u` itself, keyed by site name, and sets the value
   :math:`b = 1[u < \\sigma(\\alpha)]` from the logits :math:`\\alpha` that the
   guide passes to the distribution;
2. **evaluates the ELBO integrand on several configurations**
   (:mod:`~pyro_binary_grads.plans`): evaluation 0 is the base path and
   evaluation :math:`t` flips site :math:`t` (the discrete sites in execution
   order) to its antithetic value :math:`\\tilde b = 1[1 - u < \\sigma(\\alpha)]`
   (or draws an independent sample, or a relaxed value). Downstream discrete
   sites reuse their own :math:`u` (common random numbers); every site
   executed before the flipped one keeps its base value, continuous sites
   included. Programs that broadcast over dims left of their plates run all
   evaluations in one pass, vectorized over an *evaluation* dim just left of
   the user's plates (:mod:`~pyro_binary_grads.vectorized`); the others, and
   guides whose discrete sites depend on the values drawn, one evaluation at
   a time (:mod:`~pyro_binary_grads.sequential`). Which path a program takes
   is checked deterministically on its first step
   (:mod:`~pyro_binary_grads.broadcast`);
3. **keeps plate dims in each site's learning signal**
   (:mod:`~pyro_binary_grads.signals`): the log-prob terms of model and guide
   are reduced to the plates of the site, so element :math:`n` of a data
   plate is credited with its own terms plus the global terms;
4. **builds one surrogate** whose value is the ordinary ELBO estimate and whose
   gradient is the estimator's.

Discrete log-probs are computed from the logits
(:math:`v\\alpha - \\mathrm{softplus}(\\alpha)`), never with ``fn.log_prob``
(:mod:`~pyro_binary_grads.structure`).

This module gathers the mechanism's public pieces under one name.
"""

from .broadcast import check_broadcasting
from .noise import NoiseMessenger, categorical_value, hard_value, uniform
from .plans import Plan
from .sequential import run_sequential
from .signals import (
    learning_signal,
    pair_surrogate,
    score,
    score_surrogate,
    site_signal,
    total_elbo,
)
from .structure import (
    EVAL_PLATE,
    PARTICLE_PLATE,
    GuideStructure,
    SiteInfo,
    StructureChanged,
    check_guide_site,
    check_one_hot,
    discrete_log_prob,
    is_discrete_latent,
    site_log_prob,
    site_logits,
    subsample_scale,
    user_frames,
)
from .vectorized import Evaluations, log_prob_terms, pad, run_vectorized

__all__ = [
    "EVAL_PLATE",
    "Evaluations",
    "GuideStructure",
    "NoiseMessenger",
    "PARTICLE_PLATE",
    "Plan",
    "SiteInfo",
    "StructureChanged",
    "categorical_value",
    "check_broadcasting",
    "check_guide_site",
    "check_one_hot",
    "discrete_log_prob",
    "hard_value",
    "is_discrete_latent",
    "learning_signal",
    "log_prob_terms",
    "pad",
    "pair_surrogate",
    "run_sequential",
    "run_vectorized",
    "score",
    "score_surrogate",
    "site_log_prob",
    "site_logits",
    "site_signal",
    "subsample_scale",
    "total_elbo",
    "uniform",
    "user_frames",
]
