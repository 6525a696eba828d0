"""
A one-hot categorical distribution for NumPyro.

NumPyro 0.22 has no ``OneHotCategorical``; :mod:`pyro_binary_grads` re-exports
Pyro's under the same name. Values are one-hot vectors (event dim 1), sampled
by Gumbel-argmax, with log-prob :math:`\\sum_k v_k \\log\\mathrm{softmax}(a)_k`,
which is smooth in ``v`` (valid at relaxed values) and in the logits.
"""

import jax
import jax.numpy as jnp

from numpyro.distributions import constraints
from numpyro.distributions.distribution import Distribution
from numpyro.distributions.util import promote_shapes

from binary_grads_common.logits import MASKED_LOG_SOFTMAX_DOC


class _OneHot(constraints.Constraint):
    """One-hot vectors along the last dim."""

    is_discrete = True
    event_dim = 1

    def __call__(self, x):
        x = jnp.asarray(x)
        is_binary = (x == 0) | (x == 1)
        return jnp.all(is_binary, axis=-1) & (jnp.sum(x, axis=-1) == 1)

    def feasible_like(self, prototype):
        return jax.nn.one_hot(
            jnp.zeros(jnp.shape(prototype)[:-1], dtype=jnp.int32),
            jnp.shape(prototype)[-1],
            dtype=jnp.result_type(prototype),
        )

    def tree_flatten(self):
        return (), ((), dict())


one_hot = _OneHot()


def masked_log_softmax(a, value):
    # docstring below: binary_grads_common.logits, one text with Pyro's
    logp = jax.nn.log_softmax(a, -1)
    return jnp.where(jnp.isneginf(logp) & (value == 0), 0.0, logp)


masked_log_softmax.__doc__ = MASKED_LOG_SOFTMAX_DOC


class OneHotCategorical(Distribution):
    """
    Categorical distribution over one-hot vectors.

    :param probs: event probabilities (last dim), normalised.
    :param logits: unnormalised log-probabilities (last dim).

    Exactly one of ``probs`` and ``logits`` must be given. Samples are floats
    of the logits' dtype, drawn as ``one_hot(argmax(logits + Gumbel))``.
    """

    arg_constraints = {"logits": constraints.real_vector}
    support = one_hot
    has_enumerate_support = True
    pytree_data_fields = ("logits",)

    def __init__(self, probs=None, logits=None, *, validate_args=None):
        if (probs is None) == (logits is None):
            raise ValueError(
                "OneHotCategorical: give exactly one of `probs` and `logits`."
            )
        if logits is None:
            logits = jnp.log(probs)
        if jnp.ndim(logits) < 1:
            raise ValueError("OneHotCategorical: `logits` must have at least one dim.")
        (self.logits,) = promote_shapes(logits)
        self.logits = self.logits - jax.nn.logsumexp(self.logits, -1, keepdims=True)
        super().__init__(
            batch_shape=jnp.shape(self.logits)[:-1],
            event_shape=jnp.shape(self.logits)[-1:],
            validate_args=validate_args,
        )

    @property
    def probs(self):
        return jax.nn.softmax(self.logits, -1)

    @property
    def num_categories(self):
        return self.event_shape[0]

    def sample(self, key, sample_shape=()):
        shape = tuple(sample_shape) + self.batch_shape + self.event_shape
        gumbel = jax.random.gumbel(key, shape, dtype=jnp.result_type(self.logits))
        index = jnp.argmax(self.logits + gumbel, axis=-1)
        return jax.nn.one_hot(
            index, self.num_categories, dtype=jnp.result_type(self.logits)
        )

    def log_prob(self, value):
        # no support validation: valid (and smooth) at relaxed values too
        return jnp.sum(value * masked_log_softmax(self.logits, value), -1)

    @property
    def mean(self):
        return self.probs

    @property
    def variance(self):
        p = self.probs
        return p * (1 - p)

    def entropy(self):
        return -jnp.sum(self.probs * jax.nn.log_softmax(self.logits, -1), -1)

    def enumerate_support(self, expand=True):
        k = self.num_categories
        values = jnp.eye(k, dtype=jnp.result_type(self.logits))
        values = values.reshape((k,) + (1,) * len(self.batch_shape) + (k,))
        if expand:
            values = jnp.broadcast_to(values, (k,) + self.batch_shape + (k,))
        return values


__all__ = ["OneHotCategorical"]
