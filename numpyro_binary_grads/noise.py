"""
Noise of the site mechanism (:mod:`numpyro_binary_grads.sites`): the
:class:`NoiseMessenger` that draws each discrete guide site's uniforms itself
and sets its value from noise and logits (``b = 1[u < sigmoid(alpha)]``,
Gumbel-argmax, or stick-breaking), antithetic, relaxed or hard as the
:class:`~numpyro_binary_grads.plans.Plan` says.
"""

import jax
from jax import random
import jax.numpy as jnp

from numpyro.primitives import Messenger

from .estimators import antithetic_value, bernoulli_value, stick_breaking_value
from .structure import _base_dist, _check_finite, _check_guide_site, _kind, site_logits

__all__ = ["NoiseMessenger"]


# ---------------------------------------------------------------------------
# the noise handler
# ---------------------------------------------------------------------------


def _categorical_value(u, alpha, one_hot):
    """Gumbel-argmax: ``argmax(alpha - log(-log u))``."""
    z = jnp.argmax(alpha - jnp.log(-jnp.log(u)), -1)
    if one_hot:
        return jax.nn.one_hot(z, alpha.shape[-1], dtype=alpha.dtype)
    return z.astype(jnp.result_type(int))


def _stick_breaking_value(u, alpha, flip, one_hot):
    """The stick-breaking class (antithetic where ``flip``), as
    :func:`_categorical_value` returns it."""
    z = stick_breaking_value(u, alpha, flip)
    if one_hot:
        return jax.nn.one_hot(z, alpha.shape[-1], dtype=alpha.dtype)
    return z.astype(jnp.result_type(int))


class NoiseMessenger(Messenger):
    """
    Owns the noise of the discrete guide sites of one evaluation.

    Sets only ``msg["value"]`` (the site stays latent and replayable). For a
    continuous latent site it folds the key given by the (inner) ``seed``
    handler with the evaluation's noise draw (when the plan has several).
    Records ``(alpha, u, value)`` per discrete site in ``self.record``.

    :param fn: the (seeded, substituted) guide.
    :param plan: the :class:`Plan`, or None for the base path (draw 0, no
        flips; used by :func:`discover`).
    :param evaluation: the evaluation index ``e`` (int or traced scalar).
    :param noise_key: key from which the uniforms are drawn.
    :param dict noise: optional ``{site_name: u}`` overriding the noise
        (tests): ``u`` of the logits' shape (every draw) or with a leading
        ``num_draws`` dim.
    :param str owner: the ELBO class name, for error messages.
    :param tuple supports: the site kinds handled.
    """

    def __init__(self, fn=None, plan=None, evaluation=0, noise_key=None, noise=None,
                 owner="ELBO", supports=("bernoulli",), infos=None):
        self.plan = plan
        self.evaluation = evaluation
        self.noise_key = noise_key
        self.noise = noise or {}
        self.owner = owner
        self.supports = supports
        self.infos = infos or {}
        self.record = {}
        self.draw, self.flips, self.relax = None, None, None
        self.control_flow = set()  # names of the sites scan / cond drew
        if plan is not None:
            source, flips, relax = plan.arrays()
            self.flips = flips[evaluation]
            self.relax = relax[evaluation]
            if plan.num_draws > 1:
                self.draw = source[evaluation]
        super().__init__(fn)

    def postprocess_message(self, msg):
        if msg["type"] == "control_flow":
            self.control_flow |= _control_flow_sites(msg["value"])

    def process_message(self, msg):
        if msg["type"] == "control_flow":  # scan / cond: their sites draw from this key
            key = msg["kwargs"].get("rng_key")
            if self.draw is not None and key is not None:
                msg["kwargs"]["rng_key"] = random.fold_in(key, self.draw)
            return
        if msg["type"] != "sample" or msg.get("is_observed", False):
            return
        if not _check_guide_site(msg, self.owner, self.supports):
            key = msg["kwargs"].get("rng_key")
            if self.draw is not None and msg["value"] is None and key is not None:
                msg["kwargs"]["rng_key"] = random.fold_in(key, self.draw)
            return
        name, fn = msg["name"], msg["fn"]
        if msg["value"] is not None and name in self.control_flow:
            raise NotImplementedError(
                f"Discrete guide site '{name}' is drawn inside numpyro.contrib.control_flow "
                f"(scan or cond), which draws its sites itself; {self.owner} must draw "
                "each discrete site itself. Draw it outside scan/cond (e.g. in a "
                "numpyro.plate or a Python loop), or use TraceGraph_ELBO for this guide."
            )
        if msg["value"] is not None:
            raise ValueError(
                f"Discrete guide site '{name}' already has a value (substituted or "
                f"conditioned); {self.owner} must draw it itself. Remove the "
                "substitution from the guide."
            )
        index = len(self.record)
        kind = _kind(_base_dist(fn))
        shape = tuple(msg["kwargs"].get("sample_shape", ())) + tuple(fn.shape())
        alpha = site_logits(fn, kind, shape)
        _check_finite(name, alpha)
        u = self._uniform(name, index, alpha)
        flip = False
        if self.plan is not None and self.plan.flips_any(index):
            flip = self.flips[index]  # a traced bool under vmap
        if kind == "bernoulli":
            hard = bernoulli_value(u, alpha)
            if flip is not False:
                hard = jnp.where(flip, antithetic_value(u, alpha), hard)
        elif self.plan is not None and self.plan.stick_breaking:
            hard = _stick_breaking_value(u, alpha, flip, kind == "onehot")
        else:
            hard = _categorical_value(u, alpha, kind == "onehot")
        if self.plan is not None and self.plan.value_fn is not None:
            value = self.plan.value_fn(
                self.infos.get(name), u, alpha, hard, self.relax[index]
            )
        elif kind == "bernoulli":
            value = hard.astype(jnp.result_type(int))
        else:
            value = hard
        msg["value"] = value
        self.record[name] = (alpha, u, hard)

    def _uniform(self, name, index, alpha):
        shape = alpha.shape
        if name in self.noise:
            u = jnp.asarray(self.noise[name], alpha.dtype)
            if self.draw is not None and u.ndim == len(shape) + 1:
                u = u[self.draw]
            return jnp.broadcast_to(u, shape)
        key = random.fold_in(self.noise_key, index + 1)
        if self.draw is not None:
            key = random.fold_in(key, self.draw)
        # in (0, 1): the logit and Gumbel transforms stay finite
        return random.uniform(key, shape, alpha.dtype, minval=jnp.finfo(alpha.dtype).tiny)


def _control_flow_sites(value):
    """The site names in a scan / cond message's value: ``((length, key, carry),
    (trace, ys))`` for scan, ``(value, trace)`` for cond (the body's trace is
    replayed site by site after the message, values set)."""
    for part in value if isinstance(value, tuple) else ():
        for t in (part if isinstance(part, tuple) else (part,)):
            if isinstance(getattr(t, "trace", None), dict):
                return set(t.trace)
    return set()
