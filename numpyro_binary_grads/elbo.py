"""
ELBO classes for NumPyro: thin wrappers that pick an estimator and call the
site mechanism of :mod:`numpyro_binary_grads.sites`.

Each class returns from :meth:`~SiteELBO.loss` one scalar
``-(V + (S - sg(S)))``: its value is minus the estimator's objective estimate
``V`` (the ELBO averaged over the estimator's hard evaluations, or the
K-sample bound for the multi-sample classes; averaged over particles) and its
gradient is minus the estimator's gradient. They are drop-in replacements
for :class:`numpyro.infer.Trace_ELBO`::

    svi = SVI(model, guide, optax.adam(1e-3), DisARM_ELBO())
    state = svi.init(key, data)
    state, loss = jax.jit(svi.update)(state, data)
"""

import warnings

from jax import random
from jax.lax import stop_gradient
import jax.numpy as jnp

from numpyro.infer.elbo import ELBO

from . import estimators
from . import sites as _sites
from .arguments import check_bool, check_count, check_vectorize_particles
from .sites import Plan, pair_surrogate, score_surrogate, total_elbo

__all__ = ["ARM_ELBO", "DisARM_ELBO", "RLOO_ELBO", "SiteELBO"]


class SiteELBO(ELBO):
    """
    Base class of the ELBOs built on the site mechanism of
    :mod:`numpyro_binary_grads.sites`. A subclass says which configurations
    it evaluates (:meth:`plan`) and how it turns their learning signals into
    a value and a gradient surrogate (:meth:`value_and_surrogate`).

    :param int num_particles: independent replicates of the whole estimator,
        averaged.
    :param vectorize_particles: ``jax.vmap`` over particles (True),
        ``jax.lax.map`` (False) or a callable, as in NumPyro's ELBOs.
    :param bool vectorize: ``jax.vmap`` over the evaluations (True) or
        ``jax.lax.map`` (False; the same numbers, less memory).
    """

    can_infer_discrete = True
    #: the discrete site kinds handled: "bernoulli", "categorical", "onehot"
    supports = ("bernoulli",)
    #: detach the discrete guide log-probs inside f (single-sample ELBOs)
    detach_discrete = True
    #: compute per-site learning signals / the per-element K-sample log-weights
    _signals = True
    _bound = False

    def __init__(self, num_particles=1, vectorize_particles=True, *, vectorize=True):
        owner = type(self).__name__
        num_particles = check_count(owner, "num_particles", num_particles)
        vectorize_particles = check_vectorize_particles(owner, vectorize_particles)
        super().__init__(
            num_particles=num_particles, vectorize_particles=vectorize_particles
        )
        self.vectorize = check_bool(owner, "vectorize", vectorize)
        self._warned = set()
        self._structure = None
        self._noise = None  # test hook: {site name: uniforms} used by every draw

    def plan(self, num_sites):
        """The :class:`~numpyro_binary_grads.sites.Plan` of evaluations."""
        raise NotImplementedError

    def value_and_surrogate(self, evals, structure):
        """``(V, S)`` of one estimator draw from its evaluations."""
        raise NotImplementedError

    def _particle_loss(self, rng_key, param_map, model, guide, args, kwargs, noise=None):
        """One particle: ``(-(V + (S - sg S)), mutable_state)``."""
        owner = type(self).__name__
        structure = _sites.discover(
            rng_key, param_map, model, guide, args, kwargs, owner=owner,
            warned=self._warned, supports=self.supports,
        )
        self._structure = structure
        evals = _sites.run_evaluations(
            rng_key,
            param_map,
            model,
            guide,
            args,
            kwargs,
            structure=structure,
            plan=self.plan(structure.num_sites),
            vectorize=self.vectorize,
            noise=noise,
            owner=owner,
            supports=self.supports,
            detach_discrete=self.detach_discrete,
            signals=self._signals,
            bound=self._bound,
        )
        value, surr = self.value_and_surrogate(evals, structure)
        loss = -(stop_gradient(value) + (surr - stop_gradient(surr)))
        return loss, evals.mutable_state

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        """
        Like :meth:`loss`, and also returns the mutable state (of evaluation
        0), as :class:`numpyro.infer.Trace_ELBO` does.

        :return: ``{"loss": -(V + (S - sg(S))), "mutable_state": ...}``.
        """
        check_rng_key(type(self).__name__, rng_key)

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
        Minus the objective estimate in value; its gradient is the
        estimator's.

        :param jax.random.key rng_key: random key.
        :param dict param_map: current parameter values keyed by site name.
        :param model: Python callable with NumPyro primitives for the model.
        :param guide: Python callable with NumPyro primitives for the guide.
        :param args: arguments to the model / guide.
        :param kwargs: keyword arguments to the model / guide.
        :return: a scalar ``-(V + (S - sg(S)))``.
        """
        return self.loss_with_mutable_state(
            rng_key, param_map, model, guide, *args, **kwargs
        )["loss"]


def check_rng_key(owner, rng_key):
    """Raise a clear error for a missing key (``elbo.loss(None, ...)``)."""
    if rng_key is None:
        raise TypeError(
            f"{owner} draws its own noise and needs an rng_key, got None. SVI passes "
            "one; when calling elbo.loss(...) directly, pass e.g. jax.random.PRNGKey(0)."
        )


class _PairELBO(SiteELBO):
    """
    Base class of the antithetic-pair estimators (ARM, DisARM): every discrete
    guide site :math:`t = 1..T` gets one extra evaluation in which it takes its
    antithetic value, so a step costs one guide and one model execution
    vectorized over :math:`E = 1 + T` evaluations.
    """

    #: the estimator of categorical sites (None: Bernoulli sites only)
    categorical_estimate = None

    def plan(self, num_sites):
        plan = Plan.pairs(num_sites)
        plan.stick_breaking = self.categorical_estimate is not None
        return plan

    def value_and_surrogate(self, evals, structure):
        return pair_surrogate(evals, structure, self.pair_estimate,
                              self.categorical_estimate)

    @staticmethod
    def pair_estimate(f, f_tilde, u, b, b_tilde, alpha):
        raise NotImplementedError


_COMMON_DOC = """
    NaN/inf logits raise ``ValueError`` only outside ``jit`` and ``grad``;
    under them the loss is NaN (``SVI.stable_update`` skips such steps).
    Model and guide are traced (``jax.vmap`` or ``jax.lax.map`` over the
    evaluations), so, as under ``jit``, no Python control flow on sampled
    values. NumPyro's distribution validation is off inside the evaluations.
"""


class ARM_ELBO(_PairELBO):
    __doc__ = """
    The ELBO with gradients of its discrete Bernoulli guide sites estimated by
    ARM, the augment-REINFORCE-merge estimator [1] (Theorem 1, eq. (4))

    .. math:: \\hat g_\\alpha = \\big(f(\\tilde b) - f(b)\\big)\\,(u - \\tfrac12),
        \\quad b = 1[u < \\sigma(\\alpha)],\\ \\tilde b = 1[1 - u < \\sigma(\\alpha)].

    Model parameters and reparameterized guide sites get pathwise gradients.
    Each of the :math:`T` discrete guide sites (in execution order, each its
    own layer) gets one antithetic evaluation with common random numbers
    downstream (the layer-wise scheme of [1], Prop. 2, with shared downstream
    noise), so a step costs :math:`1 + T` evaluations of the ELBO integrand,
    run as one guide and one model execution vectorized over an evaluation
    dim. Learning signals keep plate dims: element :math:`n` of a data plate
    sees its own log-prob terms plus the global ones. Discrete guide sites
    must be Bernoulli (logits or probs, possibly ``.to_event``, expanded,
    masked, inside plates, subsampled); categorical sites raise (use
    :class:`DisARM_ELBO`, :class:`RLOO_ELBO` or ``VIMCO``).
    """ + _COMMON_DOC + """
    Example::

        svi = SVI(model, guide, optax.adam(1e-3), ARM_ELBO())

    :param int num_particles: independent estimator draws averaged per step.
    :param vectorize_particles: ``jax.vmap`` over particles (True),
        ``jax.lax.map`` (False) or a callable.
    :param bool vectorize: ``jax.vmap`` (True) or ``jax.lax.map`` (False) over
        the :math:`1 + T` evaluations; the same numbers.

    [1] Mingzhang Yin, Mingyuan Zhou, "ARM: Augment-REINFORCE-Merge Gradient
        for Stochastic Binary Networks", ICLR 2019.
    """

    @staticmethod
    def pair_estimate(f, f_tilde, u, b, b_tilde, alpha):
        return estimators.arm(f, f_tilde, u)


class DisARM_ELBO(_PairELBO):
    __doc__ = """
    The ELBO with gradients of its discrete Bernoulli guide sites estimated by
    DisARM [1] (Sec. 3), the Rao-Blackwellisation of ARM [2] over the noise
    given the antithetic pair:

    .. math::
        \\hat g_{\\alpha_i} = \\tfrac12\\big(f(b) - f(\\tilde b)\\big)
        (-1)^{\\tilde b_i}\\,1[b_i \\ne \\tilde b_i]\\,\\sigma(|\\alpha_i|),

    with :math:`b = 1[u < \\sigma(\\alpha)]`, :math:`\\tilde b = 1[1 - u < \\sigma(\\alpha)]`.
    Its variance is never above ARM's. Everything else as
    :class:`ARM_ELBO`: pathwise gradients for model parameters and
    reparameterized sites, :math:`1 + T` evaluations for :math:`T` discrete
    guide sites with common random numbers downstream, plate-local learning
    signals.

    ``Categorical`` and :class:`~numpyro_binary_grads.OneHotCategorical` sites
    get the categorical DisARM of [3]: the class is drawn by stick-breaking
    (binary decisions "stop at class :math:`i`" with logits
    :math:`\\beta_i = \\alpha_i - \\log\\sum_{j>i} e^{\\alpha_j}`, classes in ascending
    order of their logits), its antithetic partner :math:`\\tilde z` from the
    same uniforms reflected, and the pair is importance-weighted
    (:func:`~numpyro_binary_grads.estimators.coupled_categorical`); unbiased, one
    extra evaluation per site as for a Bernoulli site, equal to DisARM for two
    classes.
    """ + _COMMON_DOC + """
    Example::

        from numpyro_binary_grads import DisARM_ELBO
        svi = SVI(model, guide, optax.adam(1e-3), DisARM_ELBO())
        state = svi.init(jax.random.PRNGKey(0), data)
        state, loss = jax.jit(svi.update)(state, data)

    Parameters as :class:`ARM_ELBO`.

    [1] Zhe Dong, Andriy Mnih, George Tucker, "DisARM: An Antithetic Gradient
        Estimator for Binary Latent Variables", NeurIPS 2020.
    [2] Mingzhang Yin, Mingyuan Zhou, "ARM: Augment-REINFORCE-Merge Gradient
        for Stochastic Binary Networks", ICLR 2019.
    [3] Zhe Dong, Andriy Mnih, George Tucker, "Coupled Gradient Estimators
        for Discrete Latent Variables", NeurIPS 2021 (importance-weighted
        stick-breaking coupling).
    """

    supports = ("bernoulli", "categorical", "onehot")

    @staticmethod
    def pair_estimate(f, f_tilde, u, b, b_tilde, alpha):
        return estimators.disarm(f, f_tilde, b, b_tilde, alpha)

    categorical_estimate = staticmethod(estimators.coupled_categorical)


class RLOO_ELBO(SiteELBO):
    __doc__ = """
    The ELBO with gradients of its discrete guide sites estimated by
    REINFORCE with the leave-one-out baseline [1] on ``num_samples``
    independent samples:

    .. math::
        \\hat g = \\frac{1}{K - 1} \\sum_{k=1}^K \\big(f(b^k) - \\bar f\\big)\\,
        \\nabla_\\phi \\log q_\\phi(b^k), \\qquad \\bar f = \\frac1K \\sum_k f(b^k),

    the DisARM paper's strongest independent-sample baseline [2]. Handles
    ``Bernoulli``, ``Categorical`` and
    :class:`~numpyro_binary_grads.OneHotCategorical` guide sites (the score
    of a layer is taken with its upstream sample fixed, so multi-layer guides
    work). The value is the mean of the :math:`K` single-sample ELBO
    estimates; model parameters and reparameterized sites get the mean of
    their :math:`K` pathwise gradients (each sample with its own continuous
    draws). The :math:`K` samples run as one vectorized guide and model
    execution; learning signals and baselines are plate-local.
    """ + _COMMON_DOC + """
    Example::

        svi = SVI(model, guide, optax.adam(1e-3), RLOO_ELBO(num_samples=4))

    :param int num_samples: the number :math:`K \\ge 2` of samples per draw.

    Other parameters as :class:`ARM_ELBO`.

    [1] Wouter Kool, Herke van Hoof, Max Welling, "Buy 4 REINFORCE Samples,
        Get a Baseline for Free!", ICLR 2019 Deep RL Meets Structured
        Prediction workshop.
    [2] Zhe Dong, Andriy Mnih, George Tucker, "DisARM: An Antithetic Gradient
        Estimator for Binary Latent Variables", NeurIPS 2020.
    """

    supports = ("bernoulli", "categorical", "onehot")

    def __init__(self, num_particles=1, vectorize_particles=True, *, num_samples=2,
                 vectorize=True):
        self.num_samples = check_count("RLOO_ELBO", "num_samples", num_samples, 2)
        super().__init__(num_particles, vectorize_particles, vectorize=vectorize)

    def plan(self, num_sites):
        return Plan.independent(self.num_samples, num_sites)

    def value_and_surrogate(self, evals, structure):
        f = total_elbo(evals)
        K = self.num_samples

        def weight(signal):
            return (signal - jnp.mean(signal, 0, keepdims=True)) / (K - 1)

        return jnp.mean(f), jnp.mean(f) + score_surrogate(evals, structure, weight)
