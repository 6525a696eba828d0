"""
Gradient estimators as pure functions on tensors.

Each function maps the noise of one Bernoulli guide site, its logits
:math:`\\alpha` and the learning signals of the evaluations the estimator asked
for to a detached estimate :math:`\\hat g_\\alpha` of
:math:`\\nabla_\\alpha \\mathbb{E}_{q}[f]`. The site mechanism
(:mod:`pyro_binary_grads.sites`) backpropagates it with the surrogate
:math:`\\sum \\alpha \\cdot \\mathrm{sg}(\\hat g_\\alpha)`.

Notation follows ``ESTIMATORS.md``: :math:`u \\sim \\mathcal U(0,1)`,
:math:`b = 1[u < \\sigma(\\alpha)]` (the base evaluation) and the antithetic
:math:`\\tilde b = 1[1 - u < \\sigma(\\alpha)]` (the evaluation that flips this
site). ``f`` and ``f_tilde`` are the learning signals of the two evaluations,
already reduced to the site's plate dims and broadcastable to ``alpha``.

The module :mod:`numpyro_binary_grads.estimators` holds the same functions
in JAX.
"""

import torch


def bernoulli_value(u, alpha):
    """
    :math:`b = 1[u < \\sigma(\\alpha)]`, computed as ``logit(u) < alpha``
    (no rounding at :math:`\\sigma(\\alpha) \\approx 1`).
    """
    return (torch.log(u) - torch.log1p(-u) < alpha).to(alpha.dtype)


def antithetic_value(u, alpha):
    """:math:`\\tilde b = 1[1 - u < \\sigma(\\alpha)]`."""
    return bernoulli_value(1 - u, alpha)


def pair_value(u, alpha, flip):
    """
    :math:`b` where ``flip`` is false and :math:`\\tilde b` where it is true,
    from one logit of the noise: :math:`\\mathrm{logit}(1 - u) = -\\mathrm{logit}(u)`.
    """
    z = torch.log(u) - torch.log1p(-u)
    return torch.where(flip, -z < alpha, z < alpha).to(alpha.dtype)


def arm(f, f_tilde, u):
    """
    ARM, the augment-REINFORCE-merge estimator (Yin & Zhou, ICLR 2019,
    Theorem 1, eq. (4)):

    .. math:: \\hat g = \\big(f(\\tilde b) - f(b)\\big)\\,(u - \\tfrac12),

    where :math:`\\tilde b = 1[u > \\sigma(-\\alpha)]` is the antithetic sample.
    """
    return (f_tilde - f) * (u - 0.5)


def disarm(f, f_tilde, b, b_tilde, alpha):
    """
    DisARM, the Rao-Blackwellised ARM estimator (Dong, Mnih & Tucker,
    NeurIPS 2020, Sec. 3):

    .. math::
        \\hat g_i = \\tfrac12\\big(f(b) - f(\\tilde b)\\big)\\,(-1)^{\\tilde b_i}\\,
        1[b_i \\ne \\tilde b_i]\\,\\sigma(|\\alpha_i|).

    It is :math:`\\mathbb E_u[\\hat g_{\\rm ARM} \\mid b, \\tilde b]`, hence
    never more variable than :func:`arm`.
    """
    sign = 1 - 2 * b_tilde
    return 0.5 * (f - f_tilde) * sign * (b != b_tilde) * torch.sigmoid(alpha.abs())
