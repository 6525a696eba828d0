"""
ELBO classes for NumPyro: pick an estimator, call the site mechanism
(:mod:`numpyro_binary_grads.sites`).

Each class returns from :meth:`loss` one scalar ``V + (S - sg(S))``: its value
is the ordinary ELBO estimate (minus the mean of ``f`` over the estimator's
hard evaluations, averaged over particles) and its gradient is the estimator.
They are drop-in replacements for :class:`numpyro.infer.Trace_ELBO`::

    svi = SVI(model, guide, optax.adam(1e-3), DisARM_ELBO())
    state = svi.init(key, data)
    state, loss = jax.jit(svi.update)(state, data)
"""

import warnings

import jax
from jax import random
import jax.numpy as jnp

from numpyro.infer.elbo import ELBO

from . import sites as _sites
from .estimators import arm, disarm

__all__ = ["ARM_ELBO", "DisARM_ELBO"]


class _SiteELBO(ELBO):
    """
    Shared machinery of the single-sample pair estimators.

    :param int num_particles: independent replicates of the whole estimator,
        averaged.
    :param vectorize_particles: ``jax.vmap`` over particles (True),
        ``jax.lax.map`` (False) or a callable, as in NumPyro's ELBOs.
    :param bool vectorize: ``jax.vmap`` over the ``1 + T`` evaluations (True)
        or ``jax.lax.map`` (False; the same numbers, less memory).
    """

    can_infer_discrete = True

    def __init__(self, num_particles=1, vectorize_particles=True, *, vectorize=True):
        super().__init__(
            num_particles=num_particles, vectorize_particles=vectorize_particles
        )
        self.vectorize = vectorize
        self._warned = set()
        self._noise = None  # test hook: {site name: uniforms} used by every draw

    def _site_gradient(self, f, f_tilde, u, b, b_tilde, alpha):
        raise NotImplementedError

    def _particle_loss(self, rng_key, param_map, model, guide, args, kwargs, noise=None):
        """One particle: ``(V + (S - sg S), mutable_state)``."""
        owner = type(self).__name__
        structure = _sites.discover(
            rng_key, param_map, model, guide, args, kwargs, owner=owner, warned=self._warned
        )
        evaluations = _sites.run_evaluations(
            rng_key,
            param_map,
            model,
            guide,
            args,
            kwargs,
            structure=structure,
            vectorize=self.vectorize,
            noise=noise,
            owner=owner,
        )
        loss = _sites.surrogate_loss(evaluations, structure, self._site_gradient)
        return loss, evaluations.mutable_state

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        """
        Like :meth:`loss`, and also returns the mutable state (of evaluation
        0), as :class:`numpyro.infer.Trace_ELBO` does.

        :return: ``{"loss": V + (S - sg(S)), "mutable_state": ...}``.
        """

        def single_particle(key):
            return self._particle_loss(
                key, param_map, model, guide, args, kwargs, noise=self._noise
            )

        if self.num_particles == 1:
            loss, mutable_state = single_particle(rng_key)
            return {"loss": loss, "mutable_state": mutable_state}
        keys = random.split(rng_key, self.num_particles)
        losses, mutable_state = self.vectorize_particles_fn(single_particle, keys)
        if mutable_state:
            warnings.warn("mutable state is currently ignored when num_particles > 1.")
        return {"loss": jnp.mean(losses), "mutable_state": None}

    def loss(self, rng_key, param_map, model, guide, *args, **kwargs):
        """
        Minus the ELBO estimate in value; its gradient is the estimator's.

        :param jax.random.key rng_key: random key.
        :param dict param_map: current parameter values keyed by site name.
        :param model: Python callable with NumPyro primitives for the model.
        :param guide: Python callable with NumPyro primitives for the guide.
        :param args: arguments to the model / guide.
        :param kwargs: keyword arguments to the model / guide.
        :return: a scalar ``V + (S - sg(S))``.
        """
        return self.loss_with_mutable_state(
            rng_key, param_map, model, guide, *args, **kwargs
        )["loss"]


class ARM_ELBO(_SiteELBO):
    """
    ELBO whose gradient for Bernoulli guide sites is ARM (Yin & Zhou, ICLR
    2019), per site and plate element, with reparameterized gradients for
    continuous sites and model parameters.

    Costs ``1 + T`` guide and model evaluations (``T`` the number of Bernoulli
    guide sites), vectorized in one pass. Discrete guide sites must be
    Bernoulli (logits or probs, possibly ``.to_event``, expanded, masked,
    inside plates, subsampled); categorical sites raise (use ``RLOO_ELBO`` or
    ``TraceGraph_ELBO``).

    NaN/inf logits raise ``ValueError`` only outside ``jit`` and ``grad``;
    under them the loss is NaN (``SVI.stable_update`` skips such steps).
    Model and guide are traced (``jax.vmap`` or ``jax.lax.map`` over the
    evaluations), so, as under ``jit``, no Python control flow on sampled
    values. NumPyro's distribution validation is off inside the evaluations.

    :param int num_particles: independent replicates of the estimator, averaged.
    :param vectorize_particles: ``jax.vmap`` over particles (True),
        ``jax.lax.map`` (False) or a callable.
    :param bool vectorize: ``jax.vmap`` (True) or ``jax.lax.map`` (False) over
        the evaluations; the same numbers.
    """

    def _site_gradient(self, f, f_tilde, u, b, b_tilde, alpha):
        return arm(f, f_tilde, u)


class DisARM_ELBO(_SiteELBO):
    """
    ELBO whose gradient for Bernoulli guide sites is DisARM (Dong, Mnih &
    Tucker, NeurIPS 2020), the Rao-Blackwellised ARM, per site and plate
    element, with reparameterized gradients for continuous sites and model
    parameters.

    Costs ``1 + T`` guide and model evaluations (``T`` the number of Bernoulli
    guide sites), vectorized in one pass. Discrete guide sites must be
    Bernoulli (logits or probs, possibly ``.to_event``, expanded, masked,
    inside plates, subsampled); categorical sites raise (use ``RLOO_ELBO`` or
    ``TraceGraph_ELBO``).

    NaN/inf logits raise ``ValueError`` only outside ``jit`` and ``grad``;
    under them the loss is NaN (``SVI.stable_update`` skips such steps).
    Model and guide are traced (``jax.vmap`` or ``jax.lax.map`` over the
    evaluations), so, as under ``jit``, no Python control flow on sampled
    values. NumPyro's distribution validation is off inside the evaluations.

    :param int num_particles: independent replicates of the estimator, averaged.
    :param vectorize_particles: ``jax.vmap`` over particles (True),
        ``jax.lax.map`` (False) or a callable.
    :param bool vectorize: ``jax.vmap`` (True) or ``jax.lax.map`` (False) over
        the evaluations; the same numbers.
    """

    def _site_gradient(self, f, f_tilde, u, b, b_tilde, alpha):
        return disarm(f, f_tilde, b, b_tilde, alpha)
