"""
Gradient estimators as pure functions on arrays.

Each function maps the noise of one Bernoulli guide site, its logits
:math:`\\alpha` and the learning signals of the evaluations the estimator asked
for to a detached estimate :math:`\\hat g_\\alpha` of
:math:`\\nabla_\\alpha \\mathbb{E}_{q}[f]`. The site mechanism
(:mod:`numpyro_binary_grads.sites`) backpropagates it with the surrogate
:math:`\\sum \\alpha \\cdot \\mathrm{sg}(\\hat g_\\alpha)`.

Notation follows :doc:`the estimator notes </notation>`: :math:`u \\sim \\mathcal U(0,1)`,
:math:`b = 1[u < \\sigma(\\alpha)]` (the base evaluation) and the antithetic
:math:`\\tilde b = 1[1 - u < \\sigma(\\alpha)]` (the evaluation that flips this
site). ``f`` and ``f_tilde`` are the learning signals of the two evaluations,
already reduced to the site's plate dims and broadcastable to ``alpha``.

The module :mod:`pyro_binary_grads.estimators` holds the same functions
in PyTorch.
"""

import jax
import jax.numpy as jnp


def bernoulli_value(u, alpha):
    """
    :math:`b = 1[u < \\sigma(\\alpha)]`, computed as ``logit(u) < alpha``
    (no rounding at :math:`\\sigma(\\alpha) \\approx 1`).
    """
    return (jnp.log(u) - jnp.log1p(-u) < alpha).astype(jnp.result_type(alpha))


def antithetic_value(u, alpha):
    """:math:`\\tilde b = 1[1 - u < \\sigma(\\alpha)]`."""
    return bernoulli_value(1 - u, alpha)


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
    return 0.5 * (f - f_tilde) * sign * (b != b_tilde) * jax.nn.sigmoid(jnp.abs(alpha))


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
    alpha = jnp.asarray(alpha)
    rest = jax.lax.cumlogsumexp(alpha, axis=alpha.ndim - 1, reverse=True)[..., 1:]
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
    return jnp.argsort(jax.lax.stop_gradient(alpha), axis=-1)


def stick_breaking_value(u, alpha, flip):
    """
    The class :math:`z` of the stick-breaking construction in the order of
    :func:`stick_breaking_order`: the first position :math:`i` with
    :math:`u_i < \\sigma(\\beta_i)` (the last if none), from the first
    :math:`K - 1` uniforms of ``u`` (shaped like ``alpha``); where ``flip`` is
    true (a bool, possibly traced, broadcastable to the batch shape), the
    antithetic :math:`\\tilde z` from :math:`1 - u` (Dong, Mnih & Tucker
    2021). Both are distributed as :math:`\\mathrm{Cat}(\\mathrm{softmax}(\\alpha))`.
    Returns class indices (int).
    """
    order = stick_breaking_order(alpha)
    beta = stick_breaking_logits(jnp.take_along_axis(alpha, order, -1))
    logit_u = jnp.log(u[..., :-1]) - jnp.log1p(-u[..., :-1])
    logit_u = jnp.where(jnp.asarray(flip)[..., None], -logit_u, logit_u)
    below = logit_u < beta  # (..., K-1); the last class stops the stick (K = 1: it alone)
    stop = jnp.concatenate([below, jnp.ones(below.shape[:-1] + (1,), bool)], -1)
    position = jnp.argmax(stop, -1, keepdims=True)  # the first True
    return jnp.take_along_axis(order, position, -1)[..., 0]


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
    K = alpha.shape[-1]
    diff = D - D_tilde
    if K < 2:  # one class: z = z~ always
        return jnp.zeros(jnp.broadcast_shapes(jnp.shape(f), diff.shape), alpha.dtype)
    order = stick_breaking_order(alpha)
    beta = stick_breaking_logits(jnp.take_along_axis(alpha, order, -1))
    p = jax.nn.sigmoid(beta)
    # log (1 - p)^2 / (1 - 2p), p < 1/2 in this order (p = 1/2 only at the last
    # position, on ties of the two largest logits, and never in a prefix)
    q = jnp.minimum(p, 0.5 - jnp.finfo(p.dtype).eps)
    log_factor = 2 * jnp.log1p(-q) - jnp.log1p(-2 * q)
    log_prefix = jnp.cumsum(log_factor, -1) - log_factor  # sum over i < n
    shape = jnp.broadcast_shapes(D.shape, D_tilde.shape, order.shape)
    order_b = jnp.broadcast_to(order, shape)
    pos = jnp.argmax(jnp.take_along_axis(jnp.broadcast_to(D, shape), order_b, -1), -1,
                     keepdims=True)
    pos_t = jnp.argmax(jnp.take_along_axis(jnp.broadcast_to(D_tilde, shape), order_b, -1), -1,
                       keepdims=True)
    n = jnp.minimum(jnp.minimum(pos, pos_t), K - 2)
    beta_b = jnp.broadcast_to(beta, shape[:-1] + (K - 1,))
    log_prefix = jnp.broadcast_to(log_prefix, shape[:-1] + (K - 1,))
    w = (jax.nn.sigmoid(jnp.abs(jnp.take_along_axis(beta_b, n, -1)))
         * jnp.exp(jnp.take_along_axis(log_prefix, n, -1)))
    return 0.5 * w * (f - f_tilde) * diff
