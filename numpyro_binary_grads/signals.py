r"""
Learning signals and gradient surrogates of the site mechanism
(:mod:`numpyro_binary_grads.sites`). Each model/guide log-prob term is
reduced to a discrete site's plate layout (summed over the plates the site
is not in, kept at those it is in, right-aligned, without the evaluation
dim: ``MultiFrameTensor.sum_to`` transposes arrays that carry a leading
evaluation dim). Terms carry NumPyro's scales only (a subsampled plate's terms
its subsample scale :math:`N/n`, terms outside it none), so the gradient is
that of the minibatch objective the program defines, as for NumPyro's
``Trace_ELBO``: :math:`f_S = \tfrac{N}{n}\sum_{j\in S}\ell_j +
\ell_{\rm global}`. (Multiplying the terms outside the plate by :math:`N/n`
too, an earlier version, was biased for a site outside the plate whose
log-prob depends on the plate's values: z = -214 measured.) Outside the
vmapped evaluation, every array has the evaluation dim first.
"""

import jax
from jax.lax import stop_gradient
import jax.numpy as jnp

__all__ = ["pair_surrogate", "score", "score_surrogate", "site_signal", "total_elbo"]


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


def zeros_like_terms(shape, terms):
    """Zeros of ``shape`` in the dtype of the log-prob ``terms`` (``(side,
    name, frames, lp)`` tuples), not JAX's default float: with
    ``jax_enable_x64`` a float32 program stays float32."""
    lps = [lp for *_, lp in terms]
    return jnp.zeros(shape, jnp.result_type(*lps) if lps else None)


def _signals(terms, structure):
    """Learning signals per layout ``(plates, ndim)`` of the discrete sites."""
    signals = {}
    for s in structure.discrete.values():
        layout = (s.signal_plates, s.signal_ndim)
        if layout in signals:
            continue
        total = zeros_like_terms((1,) * s.signal_ndim, terms)
        for _, _, frames, lp in terms:  # terms carry NumPyro's scales only
            total = total + _reduce_term(lp, frames, s.signal_plates, s.signal_ndim)
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
    f = zeros_like_terms((1,) * structure.common_ndim, terms)
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
    surr = 0.0  # weakly typed: the sum takes the dtype of the logits
    for info in structure.discrete.values():
        alpha, _, value = evals.sites[info.name]
        signal = stop_gradient(evals.signals[(info.signal_plates, info.signal_ndim)])
        c = _expand(weight(signal), info.signal_ndim, alpha, info.alpha_event_dim)
        surr = surr + jnp.sum(alpha * stop_gradient(c * score(info, alpha, value)))
    return surr
