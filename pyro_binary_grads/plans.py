"""
Evaluation plans: which configurations of the discrete guide sites an
estimator evaluates in one draw (base path, antithetic flips, independent
samples, relaxed values).
"""

import torch

class Plan:
    """
    Which configurations an estimator evaluates. Evaluation ``e`` uses noise
    draw ``source[e]`` of every discrete site and takes the antithetic value
    at the sites ``j`` with ``flips[e][j]``; ``relax[e][j]`` (optional) marks
    sites that take a relaxed value instead (1: at the perturbed logits
    :math:`z`, 2: at the conditional :math:`\\tilde z`; REBAR, RELAX). A
    non-discrete latent site after ``k`` discrete sites is copied from
    evaluation ``base[e]`` (same noise draw, no changes) unless one of the
    first ``k`` sites is flipped or relaxed in ``e``. Evaluations without
    relaxed sites are the *hard* ones.
    """

    #: categorical sites sampled by stick-breaking, the flipped evaluations
    #: taking the antithetic class (DisARM's categorical coupling); else Gumbel-argmax
    stick_breaking = False

    def __init__(self, source, flips, value_fn=None, relax=None):
        #: optional ``value_fn(info, u, alpha, hard, relax) -> value``: the
        #: value a discrete site takes given its noise, logits, hard sample and
        #: relax code (an int, or an int tensor over the evaluation dim), e.g.
        #: a straight-through value ``hard + (s - sg(s))``; default the hard one
        self.value_fn = value_fn
        self.source = list(source)
        self.flips = [tuple(f) for f in flips]
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
        self._cache = {}

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
        key = ("flips_any", j)
        if key not in self._cache:
            self._cache[key] = any(f[j] for f in self.flips)
        return self._cache[key]

    def copy_index(self, k):
        """Per evaluation, where a non-discrete site after ``k`` discrete sites
        takes its value from."""
        if k not in self._cache:
            self._cache[k] = [
                e if any(self.changed[e][:k]) else self.base[e]
                for e in range(self.num_evaluations)
            ]
        return self._cache[k]

    def site_tensors(self, j, tail, device):
        """Site ``j``'s flips and relax codes over the evaluations, shaped
        ``(E,) + (1,) * tail``."""
        key = ("site", j, tail, device)
        if key not in self._cache:
            _, flips, relax = self.tensors(device)
            shape = (-1,) + (1,) * tail
            self._cache[key] = (flips[:, j].reshape(shape), relax[:, j].reshape(shape))
        return self._cache[key]

    def tensors(self, device):
        key = ("tensors", device)
        if key not in self._cache:
            self._cache[key] = (
                torch.tensor(self.source, device=device),
                torch.tensor(self.flips, dtype=torch.bool, device=device).reshape(
                    self.num_evaluations, -1
                ),
                torch.tensor(self.relax, device=device).reshape(self.num_evaluations, -1),
            )
        return self._cache[key]

