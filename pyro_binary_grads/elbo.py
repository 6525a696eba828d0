"""
ELBO classes: thin wrappers that pick an estimator and call the site
mechanism (:mod:`pyro_binary_grads.sites`).

Every (model, guide) pair an instance sees gets its own cached structure
(plate nesting, discrete sites, plan) and its own verdict on whether it
broadcasts over the evaluation dim, checked on its first step whatever
Pyro's validation setting and again whenever its discrete sites or shapes
change (:mod:`pyro_binary_grads.broadcast`). Programs that broadcast run on
the one-pass vectorized path; the others, and guides whose discrete sites
depend on the values drawn, on the sequential path, with one warning that
says how to get the fast path.
"""

import math
import numbers
import warnings
from collections import OrderedDict

import torch
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

import pyro
import pyro.poutine as poutine
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import site_is_subsample
from pyro.util import check_model_guide_match, check_site_shape, warn_if_nan

from binary_grads_common.arguments import check_bool, check_count
from pyro.poutine.messenger import Messenger

from . import estimators

from .broadcast import check_broadcasting
from .noise import check_logits
from .plans import Plan
from .sequential import run_sequential
from .signals import pair_surrogate, score_surrogate, total_elbo
from .structure import (PARTICLE_PLATE, GuideStructure, StructureChanged, guess_plate_nesting,
                        is_discrete_latent, preserved_rng, site_logits)
from .vectorized import run_vectorized

_MAX_PROGRAMS = 8
#: draws of a program at which a "broadcasts" verdict is checked again (its
#: parameters have moved since the first check)
_RECHECK_AT = (10, 100, 1000)


class _Program:
    """What an ELBO instance knows about one (model, guide) pair."""

    def __init__(self, U, structure):
        self.U = U
        self.structure = structure
        self.verdicts = {}  # (signature, particles) -> None (broadcasts) or (site, why)
        self.failed = None  # why the vectorized path failed on a later step
        self.steps = 0  # draws on the vectorized path


class _LogitsCheck(Messenger):
    """Checks the logits of each discrete guide site before it is sampled."""

    def _pyro_sample(self, msg):
        if not msg["is_observed"] and is_discrete_latent(msg):
            alpha = site_logits(msg["fn"])
            if alpha is not None:
                check_logits(msg["name"], alpha.detach())


def _name_bad_logits(guide, args, kwargs, err):
    """After the guide failed with ``err`` (torch's "Expected parameter logits ..."
    with validation on, "Expected p_in >= 0" from the sampler with it off): rerun
    it with validation off, checking each discrete site's logits, and raise the
    error that names the site with NaN or infinite logits, if one has them."""
    try:
        with pyro.validation_enabled(False), poutine.block(), _LogitsCheck():
            poutine.trace(guide).get_trace(*args, **kwargs)
    except ValueError as named:
        if "NaN or infinite logits" in str(named):
            raise named from err
    except Exception:  # noqa: BLE001 -- the original error is the one to show
        pass


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
    #: whether guides whose discrete sites differ between the evaluations of
    #: a draw are supported (sequential path)
    dynamic_structure = True

    def __init__(
        self,
        num_particles=1,
        max_plate_nesting=float("inf"),
        vectorize_particles=False,
        *,
        vectorize=True,
        **kwargs,
    ):
        if isinstance(num_particles, bool) or not isinstance(num_particles, numbers.Integral) \
                or num_particles < 1:
            raise ValueError(
                f"{type(self).__name__} needs num_particles to be a positive integer, "
                f"got num_particles={num_particles!r}."
            )
        owner = type(self).__name__
        vectorize_particles = check_bool(owner, "vectorize_particles", vectorize_particles)
        vectorize = check_bool(owner, "vectorize", vectorize)
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            **kwargs,
        )
        self.vectorize = vectorize
        self._given_plate_nesting = max_plate_nesting
        self._user_plate_nesting = max_plate_nesting
        self._programs = OrderedDict()
        self._structure = None
        self._plan = None
        self._plans = {}
        self._noise = None  # test hook: {site name: uniforms} for the next draw
        self._last_evals = None

    def plan(self, num_sites):
        raise NotImplementedError

    def value_and_surrogate(self, evals, structure, plate_nesting):
        raise NotImplementedError

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_programs=OrderedDict(), _program=None, _structure=None, _plan=None,
                     _plans={}, _last_evals=None)
        return state

    # -- structure --------------------------------------------------------

    def _make_plan(self, num_sites):
        plan = self._plans.get(num_sites)
        if plan is None:
            if len(self._plans) > 64:
                self._plans.clear()
            plan = self._plans[num_sites] = self.plan(num_sites)
        return plan

    def _discovery_particles(self):
        if self.vectorize_particles and self.num_particles > 1 \
                and self._given_plate_nesting != float("inf"):
            return self.num_particles
        return None

    def _discover(self, model, guide, args, kwargs, warn=True):
        """One blocked run of guide and model: plate nesting, discrete sites,
        Pyro's model/guide agreement checks."""
        U = self._given_plate_nesting
        P = self._discovery_particles()
        g, m = guide, model
        if P is not None:
            g = pyro.plate(PARTICLE_PLATE, P, dim=-(U + 1))(guide)
            m = pyro.plate(PARTICLE_PLATE, P, dim=-(U + 1))(model)
        # a discovery (or a check) leaves the global RNG as it was: draws do not
        # depend on whether an instance has seen this (model, guide) before
        with poutine.block(), preserved_rng():
            try:
                guide_trace = poutine.trace(g).get_trace(*args, **kwargs)
            except (ValueError, RuntimeError) as err:
                _name_bad_logits(g, args, kwargs, err)
                raise
            model_trace = poutine.trace(poutine.replay(m, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
        if U == float("inf"):
            U = guess_plate_nesting(model_trace, guide_trace)
        structure = GuideStructure(model_trace, guide_trace, type(self).__name__,
                                   self.supports, warn=warn)
        with warnings.catch_warnings():
            if not (warn and is_validation_enabled()):
                warnings.simplefilter("ignore")
            check_model_guide_match(model_trace, guide_trace, U + (P is not None))
        if is_validation_enabled():  # Pyro's log-prob shape check, as Trace_ELBO's
            # with max_plate_nesting not given, Trace_ELBO checks against an
            # unbounded nesting: a non-singleton dim left of a site's plates raises
            # Pyro's "invalid log_prob shape" (singleton dims pass)
            nesting = float("inf") if self._given_plate_nesting == float("inf") \
                else U + (P is not None)
            for trace in (model_trace, guide_trace):
                trace.compute_log_prob()
                for site in trace.nodes.values():
                    if site["type"] == "sample" and not site_is_subsample(site):
                        check_site_shape(site, nesting)
        return U, structure

    def _setup(self, model, guide, args, kwargs):
        """The cached program of (model, guide), discovered on first use."""
        key = (model, guide)
        prog = self._programs.get(key)
        if prog is None:
            U, structure = self._discover(model, guide, args, kwargs)
            prog = _Program(U, structure)
            self._programs[key] = prog
            while len(self._programs) > _MAX_PROGRAMS:
                self._programs.popitem(last=False)
        self._use(prog)
        return prog

    def _use(self, prog):
        self._program = prog
        self._user_plate_nesting = prog.U
        self._structure = prog.structure
        self._plan = self._make_plan(prog.structure.num_sites)

    def _rediscover(self, prog, model, guide, args, kwargs):
        U, structure = self._discover(model, guide, args, kwargs, warn=False)
        if structure.signature not in {s for s, _ in prog.verdicts}:
            U, structure = self._discover(model, guide, args, kwargs, warn=True)
        prog.U, prog.structure = U, structure
        self._use(prog)

    # -- which path --------------------------------------------------------

    def _vectorized(self, prog, model, guide, args, kwargs, num_particles, seed):
        """Whether this program runs on the vectorized path (checking it if
        its current structure is new)."""
        if not self.vectorize or prog.failed is not None:
            return False
        key = (prog.structure.signature, num_particles)
        prog.steps += 1
        if prog.steps in _RECHECK_AT and prog.verdicts.get(key, True) is None:
            del prog.verdicts[key]  # parameters have moved: check again
        if key not in prog.verdicts:
            E = self._plan.num_evaluations
            verdict = None
            if prog.structure.num_sites and E > 1:
                with pyro.validation_enabled(False), preserved_rng():
                    verdict = check_broadcasting(model, guide, args, kwargs, prog.U, E,
                                                 seed, num_particles)
            prog.verdicts[key] = verdict
            if verdict is not None:
                self._warn_sequential(*verdict)
        return prog.verdicts[key] is None

    def _warn_sequential(self, site, why):
        where = f"At {site}, the" if site else "The"
        warnings.warn(
            f"{where} model or guide does not broadcast over the evaluation dim "
            f"that {type(self).__name__} puts left of the plates ({why}). "
            f"{type(self).__name__} evaluates it sequentially instead: the gradient "
            "is correct, but a step costs one guide and model run per evaluation. For "
            "the one-pass vectorized path, write the program so that it works for "
            "any extra batch dims left of its plates: reduce and reshape only over "
            "the right-most dims (b.sum(-1, keepdim=True) instead of b.sum(), "
            "b.reshape(b.shape[:-2] + (-1,)) instead of b.reshape(n, -1), b @ W "
            "instead of torch.mm(b, W)), and draw a discrete site in a guide "
            "whose sites do not depend on drawn values (no if b.item() == 1:). Pass "
            "vectorize=False to choose the sequential path without this warning.",
            UserWarning,
            stacklevel=4,
        )

    # -- one estimator draw -----------------------------------------------

    def _draw(self, model, guide, args, kwargs, num_particles):
        self._setup(model, guide, args, kwargs)  # subclasses may not return it
        prog = self._program
        check = is_validation_enabled()
        noise = {} if self._noise is None else dict(self._noise)
        # compiled classes draw from the global RNG inside their trace (a Python
        # seed would be baked into it: the same noise at every step)
        seed = None if getattr(self, "_tracing", False) else int(torch.randint(0, 2**62, ()))
        evals = None
        with pyro.validation_enabled(False):
            for _ in range(3):
                if not self._vectorized(prog, model, guide, args, kwargs, num_particles, seed):
                    break
                try:
                    self._begin_evaluation()
                    evals = run_vectorized(
                        model, guide, args, kwargs, prog.structure, self._plan, prog.U,
                        noise, seed, num_particles, check_values=check,
                        detach_discrete=self.detach_discrete,
                    )
                except StructureChanged:
                    self._rediscover(prog, model, guide, args, kwargs)
                    noise = {} if self._noise is None else dict(self._noise)
                    continue
                except Exception as e:
                    if "NaN or infinite logits" in str(e) or getattr(self, "_tracing", False):
                        raise  # (a compiled class reports a failed trace itself)
                    evals = self._sequential(prog, model, guide, args, kwargs, noise,
                                             seed, num_particles, check)
                    prog.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    self._warn_sequential(None, "it fails when run vectorized: " + prog.failed)
                    break
                else:
                    break
            if evals is None:
                evals = self._sequential(prog, model, guide, args, kwargs, noise, seed,
                                         num_particles, check)
        self._last_evals = evals
        return self.value_and_surrogate(evals, self._structure, prog.U)

    def _begin_evaluation(self):
        """Called before each run whose graph the step's surrogate is built from:
        subclasses drop what earlier (blocked or abandoned) runs cached."""

    def _sequential(self, prog, model, guide, args, kwargs, noise, seed, num_particles,
                    check):
        self._begin_evaluation()
        evals, structure = run_sequential(
            model, guide, args, kwargs, self._make_plan, prog.structure, prog.U, noise,
            seed, num_particles, check_values=check, detach_discrete=self.detach_discrete,
            estimator_name=type(self).__name__, supports=self.supports,
            dynamic=self.dynamic_structure,
        )
        self._structure = structure
        self._plan = self._make_plan(structure.num_sites)
        return evals

    def _get_trace(self, model, guide, args, kwargs):
        """
        Returns the model and guide traces of one draw, vectorized over the
        evaluation dim at ``-(max_plate_nesting + 1)``.
        """
        self._setup(model, guide, args, kwargs)
        prog = self._program
        with pyro.validation_enabled(False):
            evals = run_vectorized(model, guide, args, kwargs, prog.structure,
                                   self._plan, prog.U, {},
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
        self._check_finite(loss)
        warn_if_nan(loss, "loss")
        return loss

    def _check_finite(self, loss):
        """A NaN loss with NaN or infinite logits at a discrete guide site
        raises naming the site, whatever the validation setting (the check
        costs nothing while the loss is finite)."""
        evals, self._last_evals = self._last_evals, None
        if math.isfinite(loss) or evals is None:
            return
        for name, (alpha, _) in evals.discrete.items():
            if not torch.isfinite(alpha.detach()).all():
                check_logits(name, alpha.detach())

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
        loss = loss.item()
        self._check_finite(loss)
        if surr.requires_grad:
            surr.backward(retain_graph=self.retain_graph)
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
        self.num_samples = check_count("RLOO_ELBO", "num_samples", num_samples, minimum=2)
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
