"""
ELBO classes: thin wrappers that pick an estimator and call the site
mechanism of :mod:`pyro_binary_grads.sites`.
"""


import torch
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

import pyro
import pyro.poutine as poutine
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled
from pyro.util import warn_if_nan

from . import estimators
from .sites import (
    GuideStructure,
    Plan,
    check_vectorized,
    pair_surrogate,
    run_sequential,
    run_vectorized,
    score_surrogate,
    total_elbo,
    user_frames,
)


class SiteELBO(ELBO):
    """
    Base class of the ELBOs built on the site mechanism of
    :mod:`pyro_binary_grads.sites`. A subclass says which configurations it
    evaluates (:meth:`plan`) and how it turns their learning signals into a
    value and a gradient surrogate (:meth:`value_and_surrogate`).
    """

    supports = (Bernoulli,)
    #: detach the discrete guide log-probs inside f (single-sample ELBOs)
    detach_discrete = True

    def __init__(
        self,
        num_particles=1,
        max_plate_nesting=float("inf"),
        vectorize_particles=False,
        *,
        vectorize=True,
        **kwargs,
    ):
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            **kwargs,
        )
        self.vectorize = vectorize
        self._user_plate_nesting = max_plate_nesting
        self._structure = None
        self._checked = False
        self._noise = None  # test hook: {site name: uniforms} for the next draw

    def plan(self, num_sites):
        raise NotImplementedError

    def value_and_surrogate(self, evals, structure, plate_nesting):
        raise NotImplementedError

    # -- structure --------------------------------------------------------

    def _setup(self, model, guide, args, kwargs):
        if self._structure is not None:
            return
        with poutine.block():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(
                poutine.replay(model, trace=guide_trace)
            ).get_trace(*args, **kwargs)
        if self._user_plate_nesting == float("inf"):
            dims = [
                f.dim
                for trace in (model_trace, guide_trace)
                for site in trace.nodes.values()
                if site["type"] == "sample"
                for f in user_frames(site)
                if f.dim is not None
            ]
            self._user_plate_nesting = -min(dims) if dims else 0
        self._structure = GuideStructure(
            model_trace, guide_trace, type(self).__name__, self.supports
        )
        self._plan = self.plan(self._structure.num_sites)

    # -- one estimator draw -----------------------------------------------

    def _draw(self, model, guide, args, kwargs, num_particles):
        self._setup(model, guide, args, kwargs)
        U = self._user_plate_nesting
        structure = self._structure
        check = is_validation_enabled()
        noise = {} if self._noise is None else dict(self._noise)
        seed = int(torch.randint(0, 2**62, ()))
        plan = self._plan
        run = run_vectorized if self.vectorize else run_sequential
        with pyro.validation_enabled(False):
            evals = run(model, guide, args, kwargs, structure, plan, U, noise, seed,
                        num_particles, check_values=check,
                        detach_discrete=self.detach_discrete)
            if self.vectorize and check and not self._checked:
                check_vectorized(model, guide, args, kwargs, structure, plan, U, noise,
                                 seed, num_particles, evals)
                self._checked = True
        return self.value_and_surrogate(evals, structure, U)

    def _get_trace(self, model, guide, args, kwargs):
        """
        Returns the model and guide traces of one draw, vectorized over the
        evaluation dim at ``-(max_plate_nesting + 1)``.
        """
        self._setup(model, guide, args, kwargs)
        with pyro.validation_enabled(False):
            evals = run_vectorized(model, guide, args, kwargs, self._structure,
                                   self._plan, self._user_plate_nesting, {},
                                   int(torch.randint(0, 2**62, ()).item()))
        return evals.model_trace, evals.guide_trace

    def _draws(self, model, guide, args, kwargs):
        if self.vectorize_particles and self.num_particles > 1:
            yield self._draw(model, guide, args, kwargs, self.num_particles)
        else:
            for _ in range(self.num_particles):
                yield self._draw(model, guide, args, kwargs, None)

    def _value_and_surrogate(self, model, guide, args, kwargs):
        draws = list(self._draws(model, guide, args, kwargs))
        if len(draws) == 1:
            value, surr = draws[0]
        else:
            value = sum(elbo for elbo, _ in draws) / len(draws)
            surr = sum(s for _, s in draws) / len(draws)
        return -value, -surr

    # -- the pyro.infer.ELBO interface ------------------------------------

    def loss(self, model, guide, *args, **kwargs):
        """
        :returns: an estimate of the negative ELBO (the mean over this
            estimator's evaluations, all of which are marginally distributed
            as the guide).
        :rtype: float
        """
        with torch.no_grad():
            loss, _ = self._value_and_surrogate(model, guide, args, kwargs)
        loss = torch.as_tensor(loss).item()
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """
        :returns: a scalar whose value is the negative ELBO estimate and whose
            gradient is this estimator's estimate of the negative ELBO gradient.
        """
        loss, surr = self._value_and_surrogate(model, guide, args, kwargs)
        return loss.detach() + (surr - surr.detach())

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """
        Computes the negative ELBO estimate and backpropagates the estimator's
        gradient into the parameters of model and guide.

        :returns: the negative ELBO estimate
        :rtype: float
        """
        loss, surr = self._value_and_surrogate(model, guide, args, kwargs)
        if surr.requires_grad:
            surr.backward(retain_graph=self.retain_graph)
        loss = loss.item()
        warn_if_nan(loss, "loss")
        return loss


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

    def value_and_surrogate(self, evals, structure, plate_nesting):
        return pair_surrogate(evals, structure, plate_nesting, self.pair_estimate,
                              self.categorical_estimate)

    @staticmethod
    def pair_estimate(f, f_tilde, u, b, b_tilde, alpha):
        raise NotImplementedError


class ARM_ELBO(_PairELBO):
    """
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
    dim at ``-(max_plate_nesting + 1)``. Learning signals keep plate dims:
    element :math:`n` of a data plate sees its own log-prob terms plus the
    global ones.

    Example::

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), ARM_ELBO())

    :param int num_particles: independent estimator draws averaged per step.
    :param int max_plate_nesting: the model's and guide's plate nesting,
        guessed on the first step if not given.
    :param bool vectorize_particles: draw the particles in one vectorized run.
    :param bool vectorize: evaluate the :math:`1 + T` configurations in one
        vectorized run (default) or one after the other, with the same noise
        (for models that do not broadcast over leading dims).

    [1] Mingzhang Yin, Mingyuan Zhou, "ARM: Augment-REINFORCE-Merge Gradient
        for Stochastic Binary Networks", ICLR 2019.
    """

    @staticmethod
    def pair_estimate(f, f_tilde, u, b, b_tilde, alpha):
        return estimators.arm(f, f_tilde, u)


class DisARM_ELBO(_PairELBO):
    """
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

    ``Categorical`` and ``OneHotCategorical`` sites get the categorical
    DisARM of [3]: the class is drawn by stick-breaking (binary decisions
    "stop at class :math:`i`" with logits
    :math:`\\beta_i = \\alpha_i - \\log\\sum_{j>i} e^{\\alpha_j}`, classes in ascending
    order of their logits), its antithetic partner :math:`\\tilde z` from the
    same uniforms reflected, and the pair is importance-weighted
    (:func:`~pyro_binary_grads.estimators.coupled_categorical`); unbiased, one
    extra evaluation per site as for a Bernoulli site, equal to DisARM for two
    classes.

    Example::

        from pyro_binary_grads import DisARM_ELBO
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), DisARM_ELBO())
        for step in range(1000):
            loss = svi.step(data)

    Parameters as :class:`ARM_ELBO`.

    [1] Zhe Dong, Andriy Mnih, George Tucker, "DisARM: An Antithetic Gradient
        Estimator for Binary Latent Variables", NeurIPS 2020.
    [2] Mingzhang Yin, Mingyuan Zhou, "ARM: Augment-REINFORCE-Merge Gradient
        for Stochastic Binary Networks", ICLR 2019.
    [3] Zhe Dong, Andriy Mnih, George Tucker, "Coupled Gradient Estimators
        for Discrete Latent Variables", NeurIPS 2021 (importance-weighted
        stick-breaking coupling).
    """

    supports = (Bernoulli, Categorical, OneHotCategorical)

    @staticmethod
    def pair_estimate(f, f_tilde, u, b, b_tilde, alpha):
        return estimators.disarm(f, f_tilde, b, b_tilde, alpha)

    categorical_estimate = staticmethod(estimators.coupled_categorical)


class RLOO_ELBO(SiteELBO):
    """
    The ELBO with gradients of its discrete guide sites estimated by
    REINFORCE with the leave-one-out baseline [1] on ``num_samples``
    independent samples:

    .. math::
        \\hat g = \\frac{1}{K - 1} \\sum_{k=1}^K \\big(f(b^k) - \\bar f\\big)\\,
        \\nabla_\\phi \\log q_\\phi(b^k), \\qquad \\bar f = \\frac1K \\sum_k f(b^k),

    the DisARM paper's strongest independent-sample baseline [2]. Handles
    ``Bernoulli``, ``Categorical`` and ``OneHotCategorical`` guide sites (the
    score of a layer is taken with its upstream sample fixed, so multi-layer
    guides work). The value is the mean of the :math:`K` single-sample ELBO
    estimates; model parameters and reparameterized sites get the mean of
    their :math:`K` pathwise gradients. The :math:`K` samples run as one
    vectorized guide and model execution; learning signals and baselines are
    plate-local.

    Example::

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), RLOO_ELBO(num_samples=4))

    :param int num_samples: the number :math:`K \\ge 2` of samples per draw.

    Other parameters as :class:`ARM_ELBO`.

    [1] Wouter Kool, Herke van Hoof, Max Welling, "Buy 4 REINFORCE Samples,
        Get a Baseline for Free!", ICLR 2019 Deep RL Meets Structured
        Prediction workshop.
    [2] Zhe Dong, Andriy Mnih, George Tucker, "DisARM: An Antithetic Gradient
        Estimator for Binary Latent Variables", NeurIPS 2020.
    """

    supports = (Bernoulli, Categorical, OneHotCategorical)

    def __init__(self, num_particles=1, max_plate_nesting=float("inf"),
                 vectorize_particles=False, *, num_samples=2, vectorize=True, **kwargs):
        if num_samples < 2:
            raise ValueError(f"RLOO_ELBO needs num_samples >= 2, got {num_samples}.")
        self.num_samples = num_samples
        super().__init__(num_particles, max_plate_nesting, vectorize_particles,
                         vectorize=vectorize, **kwargs)

    def plan(self, num_sites):
        return Plan.independent(self.num_samples, num_sites)

    def value_and_surrogate(self, evals, structure, plate_nesting):
        f = total_elbo(evals, plate_nesting)
        K, P = self.num_samples, f.numel() // f.shape[-1]
        d = -(plate_nesting + 1)

        def weight(signal):
            return (signal - signal.mean(d, keepdim=True)) / ((K - 1) * P)

        return f.mean(), f.mean() + score_surrogate(evals, structure, plate_nesting, weight)
