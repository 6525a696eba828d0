"""
The :class:`Plan` of an estimator's evaluations: which noise draw each
evaluation uses and which discrete sites take their antithetic or relaxed
value there (part of the site mechanism, :mod:`numpyro_binary_grads.sites`;
mirrors :mod:`pyro_binary_grads.plans`).
"""

import jax.numpy as jnp

__all__ = ["Plan"]


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
        """REBAR/RELAX, per layer (:doc:`the estimator notes </notation>` section 5): the hard path, then
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
