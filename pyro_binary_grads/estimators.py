"""
Gradient estimators as pure functions on tensors.

Each function maps the noise of one Bernoulli guide site, its logits
:math:`\\alpha` and the learning signals of the evaluations the estimator asked
for to a detached estimate :math:`\\hat g_\\alpha` of
:math:`\\nabla_\\alpha \\mathbb{E}_{q}[f]`. The site mechanism
(:mod:`pyro_binary_grads.sites`) backpropagates it with the surrogate
:math:`\\sum \\alpha \\cdot \\mathrm{sg}(\\hat g_\\alpha)`.

Notation follows :doc:`the estimator notes </notation>`: :math:`u \\sim \\mathcal U(0,1)`,
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
    return (torch.where(flip, -z, z) < alpha).to(alpha.dtype)


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


# ---------------------------------------------------------------------------
# categorical sites: the stick-breaking antithetic coupling
# ---------------------------------------------------------------------------


def stick_breaking_logits(alpha):
    """
    :math:`\\beta_i = \\alpha_i - \\log\\sum_{j > i} e^{\\alpha_j}`,
    :math:`i = 1..K-1` (class dim last): the logits of the binary decisions
    "stop at class :math:`i`" of the stick-breaking construction, with
    :math:`P(z = i) = \\sigma(\\beta_i)\\prod_{j < i}\\sigma(-\\beta_j) = \\mathrm{softmax}(\\alpha)_i`.
    """
    rest = torch.logcumsumexp(alpha.flip(-1), -1).flip(-1)[..., 1:]
    return alpha[..., :-1] - rest


def stick_breaking_order(alpha):
    """
    The class order of the stick-breaking construction: ascending logits
    (``order[..., k]`` is the class in position ``k``). In this order every
    stopping probability :math:`p_i = \\pi_{(i)} / \\sum_{j \\ge i} \\pi_{(j)}` is at
    most :math:`\\tfrac12`, so the antithetic pair can take every pair of classes
    and the importance weights of :func:`coupled_categorical` are finite (the
    estimator is biased in another order whenever some :math:`p_i > \\tfrac12`).
    """
    return torch.argsort(alpha.detach(), -1)


def stick_breaking_value(u, alpha, flip):
    """
    The class :math:`z` of the stick-breaking construction in the order of
    :func:`stick_breaking_order`: the first position :math:`i` with
    :math:`u_i < \\sigma(\\beta_i)` (the last if none), from the first
    :math:`K - 1` uniforms of ``u`` (shaped like ``alpha``); where ``flip`` is
    true, the antithetic :math:`\\tilde z` from :math:`1 - u` (Dong, Mnih &
    Tucker 2021). Both are distributed as :math:`\\mathrm{Cat}(\\mathrm{softmax}(\\alpha))`.
    Returns class indices.
    """
    order = stick_breaking_order(alpha)
    beta = stick_breaking_logits(alpha.gather(-1, order))
    logit_u = torch.log(u[..., :-1]) - torch.log1p(-u[..., :-1])
    logit_u = torch.where(torch.as_tensor(flip, device=u.device), -logit_u, logit_u)
    below = logit_u < beta  # (..., K-1); the last class stops the stick (K = 1: it alone)
    stop = torch.cat([below, below.new_ones(below.shape[:-1] + (1,))], -1)
    position = stop.to(torch.int8).argmax(-1, keepdim=True)
    return order.gather(-1, position).squeeze(-1)


def coupled_categorical(f, f_tilde, D, D_tilde, alpha):
    """
    The stick-breaking antithetic estimator with importance weights for a
    categorical site (Dong, Mnih & Tucker, "Coupled gradient estimators for
    discrete latent variables", NeurIPS 2021; the authors' ``importance_weight``
    option; :doc:`the estimator notes </notation>` section 8): in the order of
    :func:`stick_breaking_order`, with :math:`z \\ne \\tilde z` the coupled pair
    and :math:`n` the earlier of their positions,

    .. math::
        \\hat g_\\alpha = \\tfrac12\\, w\\, \\big(f(z) - f(\\tilde z)\\big)
            \\big(\\mathrm{onehot}(z) - \\mathrm{onehot}(\\tilde z)\\big),
        \\qquad
        w = \\sigma(|\\beta_n|) \\prod_{i < n} \\frac{(1 - p_i)^2}{1 - 2 p_i},

    :math:`p_i = \\sigma(\\beta_i)`, :math:`w = q(z) q(\\tilde z) / P(z, \\tilde z)`;
    zero when :math:`z = \\tilde z`. For :math:`K = 2` it is :func:`disarm`.
    ``D``, ``D_tilde``: one-hot values (class dim last).
    """
    if alpha.shape[-1] < 2:  # a one-class site is a constant: its gradient is zero
        return torch.zeros(torch.broadcast_shapes(torch.as_tensor(f).shape, D.shape, D_tilde.shape),
                           dtype=alpha.dtype, device=alpha.device)
    order = stick_breaking_order(alpha)
    beta = stick_breaking_logits(alpha.gather(-1, order))
    p = torch.sigmoid(beta)
    # log (1 - p)^2 / (1 - 2p), p < 1/2 in this order (ties: a measure-zero event)
    q = torch.clamp(p, max=0.5 - torch.finfo(p.dtype).eps)
    log_factor = 2 * torch.log1p(-q) - torch.log1p(-2 * q)
    log_prefix = torch.cumsum(log_factor, -1) - log_factor  # sum over i < n
    pos, pos_t = D.gather(-1, order).argmax(-1, keepdim=True), D_tilde.gather(-1, order).argmax(-1, keepdim=True)
    n = torch.minimum(pos, pos_t).clamp(max=beta.shape[-1] - 1)
    w = torch.sigmoid(beta.abs().gather(-1, n)) * torch.exp(log_prefix.gather(-1, n))
    return 0.5 * w * (f - f_tilde) * (D - D_tilde)
