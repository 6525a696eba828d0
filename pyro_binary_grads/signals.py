"""
Learning signals and surrogates: from the log-prob terms of one draw's
evaluations to the ELBO estimate and the scalar whose gradient is the
estimator's.

A discrete site's learning signal keeps the plate dims it is local to
(DESIGN.md point 4): element :math:`n` of a data plate is credited with its
own terms plus the global ones. The surrogate is
:math:`\\sum \\alpha \\cdot \\mathrm{sg}(\\hat g_\\alpha)` plus the pathwise part.
Sites that ran in only some evaluations of a draw (dynamic structure) carry
a presence mask; their score terms count where they ran only.
"""

import torch
import torch.nn.functional as F



def learning_signal(evals, info, U):
    """
    The learning signal of discrete site ``info`` on every evaluation: the sum
    of all log-prob terms, each summed over the plates the site's signal is
    not local to and broadcast over those it is local to.

    Terms carry Pyro's scales only (a subsampled plate's terms its subsample
    scale :math:`N / n`, terms outside it none), so the estimate is of the
    gradient of the minibatch objective the program defines, as
    ``Trace_ELBO``'s and ``TraceGraph_ELBO``'s: with :math:`\\alpha_i` the logit
    of element :math:`i` of a minibatch :math:`S`,
    :math:`\\partial_{\\alpha_i} E_q[f_S]` with
    :math:`f_S = \\tfrac{N}{n} \\sum_{j \\in S} \\ell_j + \\ell_{\\mathrm{global}}`.
    Multiplying the terms outside the plate by :math:`N / n` as well (an
    earlier version) gave a biased gradient for a site outside the plate
    whose log-prob depends on the plate's values (z = -66 measured).
    """
    kept = {f.dim: f.name for f in info.kept}
    total = None
    for names, (frames, t) in evals.groups().items():
        dims = [
            t.dim() + d
            for d in range(-U, 0)
            if kept.get(d) not in names
        ]
        if dims:
            t = t.sum(dims, keepdim=True)
        total = t if total is None else total + t
    return total


def total_elbo(evals, U):
    """The ELBO integrand summed over the plates: shape ``(P, E)`` or ``(E,)``
    (zeros for a program without sample sites, as ``Trace_ELBO`` gives)."""
    f = None
    for _, t in evals.groups().values():
        t = _sum_but(t, -(U + 1))
        f = t if f is None else f + t
    if f is None:
        f = torch.zeros(evals.num_evaluations)
    elif f.dim() == 0:
        f = f.reshape(1)
    return f


def _sum_but(t, edim):
    """Sum every dim except the evaluation dim and the dims left of it."""
    keep = t.dim() + edim + 1
    return t.sum(tuple(range(keep, t.dim()))) if t.dim() > keep else t


def site_signal(evals, info, U):
    """A site's learning signal, its alpha and value, each with the evaluation
    dim at the same position (signal broadcast to the value's event dims)."""
    alpha, value = evals.discrete[info.name]
    signal = learning_signal(evals, info, U).detach()
    signal = signal.reshape(signal.shape + (1,) * info.event_dim)
    return signal, alpha, value


def _mean_over(n, t):
    return t if n == 1 else t / n


def pair_surrogate(evals, structure, U, pair_estimate, categorical_estimate=None):
    """
    ``(elbo, surrogate)`` of one draw of a pair estimator (ARM, DisARM): the
    ELBO averaged over the evaluations, and a surrogate whose gradient is
    pathwise for model parameters and reparameterized sites and
    ``pair_estimate`` (of the base and flipped evaluations of each site) for
    the discrete sites' logits; ``categorical_estimate(f, f_tilde, D, D_tilde,
    alpha)`` for categorical sites (one-hot values, class dim last).
    """
    f = total_elbo(evals, U)
    num_particles = f.numel() // f.shape[-1]
    if evals.sequential and f.shape[-1] > 2:
        # Which sites a draw has may depend on the values drawn: then so does
        # the number 1 + T of evaluations, and their plain mean is biased.
        # Evaluation 1 (site 1 flipped) exists whenever site 1 does, which
        # depends only on what precedes site 1, shared with evaluation 0.
        f = f[..., :2]
    elbo = surr = f.mean()
    for name, info in structure.discrete.items():
        signal, alpha, value = site_signal(evals, info, U)
        d = -(U + 1) - info.alpha_event_dim
        j = info.index + 1
        alpha0 = alpha.narrow(d, 0, 1)
        u = evals.noise[name].reshape(alpha0.shape)
        if info.kind != "bernoulli":  # one-hot values, signal over the class dim
            if info.kind == "categorical":
                value = F.one_hot(value.long(), alpha.shape[-1]).to(alpha.dtype)
                signal = signal.unsqueeze(-1)
            g = categorical_estimate(
                signal.narrow(d, 0, 1), signal.narrow(d, j, 1),
                value.narrow(d, 0, 1), value.narrow(d, j, 1), alpha0.detach(),
            )
            surr = surr + _mean_over(num_particles, (alpha0 * g.detach()).sum())
            continue
        g = pair_estimate(
            signal.narrow(d, 0, 1), signal.narrow(d, j, 1), u,
            value.narrow(d, 0, 1), value.narrow(d, j, 1), alpha0.detach(),
        )
        surr = surr + _mean_over(num_particles, (alpha0 * g.detach()).sum())
    return elbo, surr


def score(info, alpha, value):
    """:math:`\\nabla_\\alpha \\log q(v)`: ``v - sigmoid(alpha)``, or
    ``one_hot(v) - softmax(alpha)`` for categorical sites (detached)."""
    alpha = alpha.detach()
    if info.kind == "bernoulli":
        return value - torch.sigmoid(alpha)
    if info.kind == "categorical":
        value = F.one_hot(value.long(), alpha.shape[-1]).to(alpha.dtype)
    return value - torch.softmax(alpha, -1)


def score_surrogate(evals, structure, U, weight):
    """
    ``sum_sites sum_e alpha_e * sg(c_e * score_e)`` for score-function
    estimators, where ``c = weight(signal)`` maps each site's learning
    signals on the evaluations (evaluation dim at ``-(U + 1)``) to their
    coefficients.
    """
    surr = 0.0
    for info in structure.discrete.values():
        signal, alpha, value = site_signal(evals, info, U)
        c = weight(signal.reshape(signal.shape[: signal.dim() - info.event_dim]))
        present = evals.present.get(info.name)
        if present is not None:
            c = c * present
        c = c.reshape(c.shape + (1,) * info.alpha_event_dim)
        surr = surr + (alpha * (c * score(info, alpha, value).detach())).sum()
    return surr
