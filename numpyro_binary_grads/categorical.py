"""
Straight-through family of (biased) gradient estimators for one-hot
categorical guide sites: ST, straight-through Gumbel-softmax, Gumbel-Rao,
ReinMax, ReinMax-Rao and ReinMax-CV.

All of them evaluate the ELBO integrand :math:`f` once, at the hard sample
:math:`D = \\mathrm{onehot}(\\arg\\max(\\alpha + G))`, :math:`G = -\\log(-\\log u)`
(so :math:`D \\sim \\mathrm{Cat}(\\mathrm{softmax}(\\alpha))`), and replace the
missing derivative of the sample by a surrogate :math:`s(\\alpha)`: the site
takes the value

.. math:: v = D + s(\\alpha) - \\mathrm{sg}(s(\\alpha)),

which equals :math:`D` numerically, and backpropagation gives

.. math:: \\hat g_\\alpha = \\Big(\\frac{\\partial s}{\\partial \\alpha}\\Big)^{\\!\\top} g_D,
    \\qquad g_D = \\frac{\\partial f}{\\partial D}\\Big|_{D},

plus every explicit dependence of :math:`f` on the parameters (model
parameters, the logits inside :math:`\\log q(D)`, reparameterized sites),
which is differentiated normally (:doc:`the estimator notes </notation>` 0.2). Discrete log-probs
are computed as :math:`\\sum_i v_i \\log\\mathrm{softmax}(\\alpha)_i`, so they are
differentiable in :math:`v`; the model must accept the one-hot value as a
float array (e.g. use it in a matrix product) for :math:`g_D` to exist.

Notation (:doc:`the estimator notes </notation>` section 0): :math:`\\pi = \\mathrm{softmax}(\\alpha)`,
:math:`J(p) = \\mathrm{diag}(p) - p p^\\top` (the Jacobian of softmax at
output :math:`p`; symmetric). Formulas: :doc:`the estimator notes </notation>` section 7, except
ReinMax-CV, which follows its authors' code (``docs/estimators/reinmax_cv.rst``).

The extra uniforms of Gumbel-Rao, ReinMax-Rao and ReinMax-CV are drawn from
``fold_in(fold_in(rng_key, tag), site_index)`` of the step's (particle's) key,
so everything runs under ``jit`` and ``vmap`` over keys. The module
:mod:`pyro_binary_grads.categorical` holds the same classes and functions in
PyTorch.
"""

import math

import jax
from jax import random
from jax.lax import stop_gradient
import jax.numpy as jnp

from numpyro.distributions.distribution import validation_enabled
from numpyro.handlers import seed, substitute, trace

from binary_grads_common.arguments import check_count, check_finite

from .elbo import SiteELBO
from .sites import Plan, check_one_hot, total_elbo

__all__ = [
    "CV_FORMS",
    "GumbelRao_ELBO",
    "GumbelSoftmaxST_ELBO",
    "ReinMaxCV_ELBO",
    "ReinMaxRao_ELBO",
    "ReinMax_ELBO",
    "ST_ELBO",
    "authors_gs_surrogate",
    "conditional_gumbel",
    "gumbel",
    "gumbel_rao_surrogate",
    "held_softmax",
    "reinmax_half",
    "reinmax_surrogate",
    "theta_D",
]

#: folded into a particle's key to derive the root key of the extra uniforms
#: (far from the small integers the mechanism's ``split`` uses)
_EXTRA_NOISE_TAG = 0x3C7A_11E5


# ---------------------------------------------------------------------------
# pure functions (class dim last)
# ---------------------------------------------------------------------------


def gumbel(u):
    """:math:`G = -\\log(-\\log u)`, the noise whose argmax with the logits is
    the mechanism's hard sample."""
    return -jnp.log(-jnp.log(u))


def conditional_gumbel(alpha, D, v):
    """
    Perturbed logits :math:`\\tilde z \\sim (\\alpha + G \\mid \\arg\\max(\\alpha + G) = D)`
    from uniforms ``v`` (shape ``(K,) + alpha.shape``): with
    :math:`E = -\\log v`, the top coordinate is
    :math:`\\tilde z_k = \\log\\sum_i e^{\\alpha_i} - \\log E_k` and the others
    :math:`\\tilde z_i = -\\log(E_i e^{-\\alpha_i} + e^{-\\tilde z_k})`
    (REBAR App. C; Gumbel-Rao eq. (9); ``cond_gumbel`` of :doc:`the estimator notes </notation>`
    section 5). Detached.
    """
    alpha, D = stop_gradient(alpha), stop_gradient(D)
    logE = jnp.log(-jnp.log(v))
    top = jax.nn.logsumexp(alpha, -1, keepdims=True) - jnp.sum(logE * D, -1, keepdims=True)
    rest = -jnp.logaddexp(logE - alpha, -top)
    return jnp.where(D > 0, top, rest)


def two_classes(alpha, u, b):
    """
    A Bernoulli site as two classes (:doc:`the estimator notes </notation>` section 7, "two-class
    form"): logits :math:`(\\alpha, 0)`, one-hot sample :math:`(b, 1 - b)` and
    uniforms whose Gumbels are :math:`(\\mathrm{logit}(u), 0)`, so that
    :math:`b = 1[\\alpha + \\mathrm{logit}(u) > 0]` is the same sample. Class 0 of
    a surrogate is then the Bernoulli surrogate, e.g. :math:`\\sigma(\\alpha/\\tau)`.
    """
    logit_u = jnp.log(u) - jnp.log1p(-u)
    u2 = jnp.stack([jnp.exp(-jnp.exp(-logit_u)), jnp.full_like(u, math.exp(-1.0))], -1)
    alpha2 = jnp.stack([alpha, jnp.zeros_like(alpha)], -1)
    return alpha2, u2, jnp.stack([b, 1 - b], -1)


def held_softmax(alpha, z, tau):
    """:math:`\\mathrm{softmax}((\\alpha + \\mathrm{sg}(z - \\alpha)) / \\tau)`: value
    :math:`\\mathrm{softmax}(z/\\tau)`, Jacobian w.r.t. :math:`\\alpha`
    :math:`\\frac1\\tau J(\\mathrm{softmax}(z/\\tau))` (the noise in ``z`` held fixed)."""
    return jax.nn.softmax((alpha + stop_gradient(z - alpha)) / tau, -1)


def reinmax_half(alpha, D, tau):
    """:math:`\\pi_{1/2} = \\tfrac12(\\mathrm{softmax}(\\alpha/\\tau) + D)`, detached."""
    return stop_gradient(0.5 * (jax.nn.softmax(alpha / tau, -1) + D))


def reinmax_surrogate(alpha, D, tau):
    """
    The ReinMax surrogate (Liu et al. 2023, Algorithm 2; the official code's
    backward): :math:`\\pi_1 = \\mathrm{softmax}(\\mathrm{sg}(\\log\\pi_{1/2} - \\alpha) + \\alpha)`
    (value :math:`\\pi_{1/2}`, Jacobian :math:`J(\\pi_{1/2})`),
    :math:`s = 2\\pi_1 - \\tfrac12\\pi`, so
    :math:`\\partial s/\\partial\\alpha = 2J(\\pi_{1/2}) - \\tfrac12 J(\\pi)`.
    """
    half = reinmax_half(alpha, D, tau)
    pi1 = held_softmax(alpha, jnp.log(half), 1.0)
    return 2 * pi1 - 0.5 * jax.nn.softmax(alpha, -1)


def theta_D(alpha, D):
    """:math:`\\theta_D = \\log\\tfrac12(\\pi + D)` (Wang & Bui), detached."""
    return stop_gradient(jnp.log(0.5 * (jax.nn.softmax(alpha, -1) + D)))


def gumbel_rao_surrogate(alpha, z, tau):
    """:math:`\\frac1K\\sum_k \\mathrm{softmax}((\\alpha + \\mathrm{sg}(\\tilde z^{(k)} - \\alpha))/\\tau)`
    for perturbed logits ``z`` of shape ``(K,) + alpha.shape``: Jacobian
    :math:`\\bar J_{\\rm GR} = \\frac1K\\sum_k \\frac1\\tau J(\\mathrm{softmax}(\\tilde z^{(k)}/\\tau))`."""
    return jnp.mean(held_softmax(alpha, z, tau), 0)


# ---------------------------------------------------------------------------
# the ELBO classes
# ---------------------------------------------------------------------------


class _StraightThroughELBO(SiteELBO):
    """
    Base class of the straight-through family: one evaluation of the ELBO
    integrand at the hard sample, whose value at each ``OneHotCategorical``
    guide site is ``D + s - sg(s)`` with the estimator's surrogate ``s``
    (:meth:`surrogate`). The value is the single-sample ELBO estimate; the
    gradient is the pathwise gradient through the surrogate plus every
    explicit dependence of the integrand on the parameters.
    """

    supports = ("onehot",)
    detach_discrete = False
    _signals = False

    def __init__(self, num_particles=1, vectorize_particles=True, *, temperature=1.0,
                 vectorize=True):
        temperature = check_finite(type(self).__name__, "temperature", temperature, low=0.0,
                                   low_open=True)
        self.temperature = temperature
        super().__init__(num_particles, vectorize_particles, vectorize=vectorize)
        #: test hook: {site name: uniforms of shape (K, *alpha.shape)} for the
        #: extra (conditional / unconditional) Gumbel draws, used by every draw
        self._extra_noise = None
        # the particle's root key of the extra uniforms (set while tracing a particle)
        self._extra_key = None

    # -- mechanism hooks ----------------------------------------------------

    def plan(self, num_sites):
        plan = Plan.independent(1, num_sites)
        plan.value_fn = self._site_value
        return plan

    def _site_value(self, info, u, alpha, hard, relax=0):
        if info.kind == "bernoulli":
            s = self.surrogate(info.name, *two_classes(alpha, u, hard))[..., 0]
        else:
            s = self.surrogate(info.name, alpha, u, hard)
        return hard + (s - stop_gradient(s))

    def surrogate(self, name, alpha, u, D):
        """The differentiable surrogate ``s(alpha)`` of one site (class dim last)."""
        raise NotImplementedError

    def value_and_surrogate(self, evals, structure):
        f = jnp.mean(total_elbo(evals))
        return f, f

    def _uniforms(self, name, num, alpha):
        """``num`` fresh uniform draws shaped like ``alpha`` (or the test hook's),
        from ``fold_in(particle key root, site index)``."""
        shape = (num,) + tuple(alpha.shape)
        hook = (self._extra_noise or {}).get(name)
        if hook is not None:
            hook = jnp.asarray(hook, alpha.dtype)
            if hook.size != num * alpha.size:
                raise ValueError(
                    f"Extra noise for site '{name}' has shape {tuple(hook.shape)}, "
                    f"expected {shape}."
                )
            return jnp.reshape(hook, shape)
        if self._extra_key is None:
            raise RuntimeError(f"{type(self).__name__}: no key for the extra noise.")
        key = random.fold_in(self._extra_key, self._structure.discrete[name].index)
        return random.uniform(key, shape, alpha.dtype, minval=jnp.finfo(alpha.dtype).tiny)

    def _particle_loss(self, rng_key, param_map, model, guide, args, kwargs, noise=None):
        self._check_categorical(rng_key, param_map, guide, args, kwargs)
        self._extra_key = random.fold_in(rng_key, _EXTRA_NOISE_TAG)
        try:
            return super()._particle_loss(
                rng_key, param_map, model, guide, args, kwargs, noise=noise
            )
        finally:
            self._extra_key = None

    # -- a clearer error for integer Categorical sites ------------------------

    def _check_categorical(self, rng_key, params, guide, args, kwargs):
        """Trace the guide abstractly (trace time only) and raise for integer
        ``Categorical`` latent sites, pointing to ``OneHotCategorical``."""
        found = []

        def fn(key, params):
            tr = trace(seed(substitute(guide, data=params), key)).get_trace(*args, **kwargs)
            found.extend((name, site["fn"]) for name, site in tr.items()
                         if site["type"] == "sample" and not site.get("is_observed", False)
                         and not site["fn"].has_rsample)
            return jnp.zeros(())

        with validation_enabled(False):
            jax.eval_shape(fn, rng_key, params)
        for name, site_fn in found:
            check_one_hot(name, site_fn, type(self).__name__,
                          "differentiates the integrand through the sample's value",
                          "an unbiased estimator such as numpyro_binary_grads.RLOO_ELBO")

_COMMON_PARAMS = """
    :param int num_particles: independent estimator draws averaged per step.
    :param vectorize_particles: ``jax.vmap`` over particles (True),
        ``jax.lax.map`` (False) or a callable, as in NumPyro's ELBOs.
    :param bool vectorize: ``jax.vmap`` (True) or ``jax.lax.map`` (False) over
        the mechanism's evaluation dim; the same numbers.
"""


class ST_ELBO(_StraightThroughELBO):
    __doc__ = """
    The ELBO with gradients of its ``OneHotCategorical`` guide sites (and
    ``Bernoulli`` sites, as two classes: :func:`two_classes`)
    estimated by the straight-through estimator [1] in its slope-annealed
    form ([2], eq. (5)):

    .. math::
        \\hat g_\\alpha = \\tfrac1\\tau\\, J(\\mathrm{softmax}(\\alpha/\\tau))\\, g_D,
        \\qquad D \\sim \\mathrm{Cat}(\\mathrm{softmax}(\\alpha)),

    i.e. the site's value is ``D + y - sg(y)``, :math:`y = \\mathrm{softmax}(\\alpha/\\tau)`.
    Biased (exact for :math:`f` linear in :math:`D` at :math:`\\tau = 1`); one
    evaluation of the integrand per step. Model parameters, the explicit
    :math:`-\\log q` term and reparameterized sites get ordinary gradients.

    Example::

        from numpyro_binary_grads import ST_ELBO, OneHotCategorical
        def guide(x):
            logits = encoder(x).reshape(-1, 20, 10)
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("z", OneHotCategorical(logits=logits).to_event(1))
        svi = SVI(model, guide, optax.adam(1e-3), ST_ELBO())

    :param float temperature: :math:`\\tau > 0` (default 1).
    """ + _COMMON_PARAMS + """
    [1] Yoshua Bengio, Nicholas Léonard, Aaron Courville, "Estimating or
        Propagating Gradients Through Stochastic Neurons for Conditional
        Computation", arXiv:1308.3432, 2013.
    [2] Max B. Paulus, Chris J. Maddison, Andreas Krause, "Rao-Blackwellizing
        the Straight-Through Gumbel-Softmax Gradient Estimator", ICLR 2021.
    """

    supports = ("onehot", "bernoulli")

    def surrogate(self, name, alpha, u, D):
        return jax.nn.softmax(alpha / self.temperature, -1)


class GumbelSoftmaxST_ELBO(_StraightThroughELBO):
    __doc__ = """
    The ELBO with gradients of its ``OneHotCategorical`` guide sites (and
    ``Bernoulli`` sites, as two classes: :func:`two_classes`)
    estimated by the straight-through Gumbel-softmax estimator ([1] Sec. 2.2;
    [2] eq. (6)):

    .. math::
        D = \\mathrm{onehot}(\\arg\\max(\\alpha + G)),\\qquad
        \\hat g_\\alpha = \\tfrac1\\lambda\\, J(\\mathrm{softmax}((\\alpha + G)/\\lambda))\\, g_D,

    with the Gumbel noise :math:`G` of the sample itself (the site's value is
    ``D + y - sg(y)``, :math:`y = \\mathrm{softmax}((\\alpha + G)/\\lambda)`).
    Biased; one evaluation of the integrand per step.

    Example::

        svi = SVI(model, guide, optax.adam(1e-3), GumbelSoftmaxST_ELBO(temperature=0.5))

    :param float temperature: :math:`\\lambda > 0` (default 1).
    """ + _COMMON_PARAMS + """
    [1] Eric Jang, Shixiang Gu, Ben Poole, "Categorical Reparameterization
        with Gumbel-Softmax", ICLR 2017.
    [2] Max B. Paulus, Chris J. Maddison, Andreas Krause, "Rao-Blackwellizing
        the Straight-Through Gumbel-Softmax Gradient Estimator", ICLR 2021.
    """

    supports = ("onehot", "bernoulli")

    def surrogate(self, name, alpha, u, D):
        return jax.nn.softmax((alpha + gumbel(u)) / self.temperature, -1)


class GumbelRao_ELBO(_StraightThroughELBO):
    __doc__ = """
    The ELBO with gradients of its ``OneHotCategorical`` guide sites
    estimated by Gumbel-Rao, the Rao-Blackwellised straight-through
    Gumbel-softmax estimator [1] (eqs. (7), (9), (10)):

    .. math::
        \\hat g_\\alpha = \\frac1K\\sum_{k=1}^K \\frac1\\lambda\\,
        J\\big(\\mathrm{softmax}(\\tilde z^{(k)}/\\lambda)\\big)\\, g_D,\\qquad
        \\tilde z^{(k)} \\sim (\\alpha + G \\mid \\arg\\max(\\alpha + G) = D),

    the derivative taken with the noise :math:`\\tilde z^{(k)} - \\alpha` held
    fixed (:doc:`the estimator notes </notation>` 11.2: the only reading whose mean equals ST-GS's,
    as the public implementations do). :math:`\\tilde z^{(1)} = \\alpha + G` is
    the sample's own perturbed logits (a draw from the conditional) and
    :math:`\\tilde z^{(2..K)}` are fresh conditional draws, so ``num_samples=1``
    is exactly :class:`GumbelSoftmaxST_ELBO` for the same noise and
    :math:`\\mathbb E[\\mathrm{GR}] = \\mathbb E[\\mathrm{ST\\text{-}GS}]` for every :math:`K`,
    with lower variance. Biased; one evaluation of the integrand per step
    and :math:`K` softmaxes per site element.

    Example::

        svi = SVI(model, guide, optax.adam(1e-3),
                  GumbelRao_ELBO(temperature=0.5, num_samples=10))

    :param float temperature: :math:`\\lambda > 0` (default 1).
    :param int num_samples: :math:`K \\ge 1` conditional Gumbel draws (default 10).
    """ + _COMMON_PARAMS + """
    [1] Max B. Paulus, Chris J. Maddison, Andreas Krause, "Rao-Blackwellizing
        the Straight-Through Gumbel-Softmax Gradient Estimator", ICLR 2021.
    """

    def __init__(self, num_particles=1, vectorize_particles=True, *, temperature=1.0,
                 num_samples=10, vectorize=True):
        self.num_samples = check_count("GumbelRao_ELBO", "num_samples", num_samples)
        super().__init__(num_particles, vectorize_particles, temperature=temperature,
                         vectorize=vectorize)

    def surrogate(self, name, alpha, u, D):
        z = (stop_gradient(alpha) + gumbel(u))[None]
        if self.num_samples > 1:
            v = self._uniforms(name, self.num_samples - 1, alpha)
            z = jnp.concatenate([z, conditional_gumbel(alpha, D, v)], 0)
        return gumbel_rao_surrogate(alpha, z, self.temperature)


class ReinMax_ELBO(_StraightThroughELBO):
    __doc__ = """
    The ELBO with gradients of its ``OneHotCategorical`` guide sites (and
    ``Bernoulli`` sites, as two classes: :func:`two_classes`)
    estimated by ReinMax [1] (Algorithm 2; formula as in the authors' code,
    ``microsoft/ReinMax``), a second-order (Heun's method) approximation of
    the gradient:

    .. math::
        \\hat g_\\alpha = 2\\,J(\\pi_{1/2})\\, g_D - \\tfrac12\\, J(\\pi)\\, g_D,\\qquad
        \\pi_{1/2} = \\tfrac12\\big(\\mathrm{softmax}(\\alpha/\\tau) + D\\big),\\quad
        \\pi = \\mathrm{softmax}(\\alpha),

    with :math:`D \\sim \\mathrm{Cat}(\\pi)` (sampled at temperature 1). Built as
    :math:`\\pi_1 = \\mathrm{softmax}(\\mathrm{sg}(\\log\\pi_{1/2} - \\alpha) + \\alpha)`,
    :math:`s = 2\\pi_1 - \\tfrac12\\pi`, value ``D + s - sg(s)``. Biased, but
    exact for :math:`f` quadratic in :math:`D` at :math:`\\tau = 1` in the
    spec's verification; as :math:`\\tau \\to \\infty`,
    :math:`\\mathrm{softmax}(\\alpha/\\tau) \\to` uniform. The authors' code
    refuses :math:`\\tau < 1`; so does this class.

    Example::

        svi = SVI(model, guide, optax.adam(1e-3), ReinMax_ELBO())

    :param float temperature: :math:`\\tau \\ge 1` (default 1).
    """ + _COMMON_PARAMS + """
    [1] Liyuan Liu, Chengyu Dong, Xiaodong Liu, Bin Yu, Jianfeng Gao,
        "Bridging Discrete and Backpropagation: Straight-Through and Beyond",
        NeurIPS 2023.
    """

    def __init__(self, num_particles=1, vectorize_particles=True, *, temperature=1.0,
                 vectorize=True):
        temperature = check_finite("ReinMax_ELBO", "temperature", temperature, low=1.0,
                                   hint="ReinMax needs temperature >= 1, as the authors' code.")
        super().__init__(num_particles, vectorize_particles, temperature=temperature,
                         vectorize=vectorize)

    supports = ("onehot", "bernoulli")

    def surrogate(self, name, alpha, u, D):
        return reinmax_surrogate(alpha, D, self.temperature)


class ReinMaxRao_ELBO(_StraightThroughELBO):
    __doc__ = """
    The ELBO with gradients of its ``OneHotCategorical`` guide sites
    estimated by ReinMax-Rao [1] (*provisional*: formula of :doc:`the estimator notes </notation>`
    section 7, as in the authors' development code ``danielwang0452/ReinMax_ASC``,
    method ``reinmax_v3`` with ``rao_gumbel_v3``; the paper text was not
    available). ReinMax's Jacobian at :math:`\\pi_{1/2}` is replaced by a
    Gumbel-Rao average at :math:`\\theta_D = \\log\\tfrac12(\\pi + D)`:

    .. math::
        \\hat g_\\alpha = 2\\,\\bar J_{\\rm GR}(\\theta_D;\\tau)\\, g_D - \\tfrac12 J(\\pi)\\, g_D,
        \\qquad
        \\bar J_{\\rm GR}(\\theta_D;\\tau) = \\frac1K\\sum_{k=1}^K\\frac1\\tau
        J\\big(\\mathrm{softmax}(\\tilde z^{(k)}/\\tau)\\big),

    :math:`\\tilde z^{(k)} \\sim (\\theta_D + G \\mid \\arg\\max(\\theta_D + G) = D)`
    fresh conditional Gumbel draws, :math:`D \\sim \\mathrm{Cat}(\\pi)`,
    :math:`\\pi = \\mathrm{softmax}(\\alpha)`. Biased; one evaluation of the
    integrand per step, :math:`K` softmaxes per site element.

    Example::

        svi = SVI(model, guide, optax.adam(1e-3),
                  ReinMaxRao_ELBO(temperature=1.0, num_samples=10))

    :param float temperature: :math:`\\tau > 0` of the Gumbel-Rao Jacobian (default 1).
    :param int num_samples: :math:`K \\ge 1` conditional Gumbel draws (default 10).
    """ + _COMMON_PARAMS + """
    [1] Daniel Wang, Thang D. Bui, arXiv:2603.08257, 2026 (methods
        "ReinMax-Rao" and "ReinMax-CV"; equation numbers not confirmed).
    """

    def __init__(self, num_particles=1, vectorize_particles=True, *, temperature=1.0,
                 num_samples=10, vectorize=True):
        self.num_samples = check_count(type(self).__name__, "num_samples", num_samples)
        super().__init__(num_particles, vectorize_particles, temperature=temperature,
                         vectorize=vectorize)

    def _gr_term(self, name, alpha, D, extra=0):
        """``gumbel_rao_surrogate`` at theta_D with K conditional draws (and
        the uniforms of ``extra`` further draws, returned unused)."""
        v = self._uniforms(name, self.num_samples + extra, alpha)
        tD = theta_D(alpha, D)
        z = conditional_gumbel(tD, D, v[: self.num_samples])
        return tD, gumbel_rao_surrogate(alpha, z, self.temperature), v[self.num_samples:]

    def surrogate(self, name, alpha, u, D):
        _, gr, _ = self._gr_term(name, alpha, D)
        return 2 * gr - 0.5 * jax.nn.softmax(alpha, -1)


#: the forms of ReinMaxCV_ELBO's Gumbel-softmax term
CV_FORMS = ("authors", "fresh")


def authors_gs_surrogate(alpha, tD, S, tau):
    """
    The Gumbel-softmax term of ReinMax-CV as the authors' code computes it:
    :math:`\\frac1\\tau\\mathrm{softmax}(\\alpha + \\mathrm{sg}(\\theta_D + S - \\alpha))`,
    Jacobian :math:`\\frac1\\tau J(\\mathrm{softmax}(\\theta_D + S))`, where ``S``
    is the soft sample :math:`\\mathrm{softmax}((\\alpha + G)/\\tau)` of the
    forward pass (a probability vector added to the logits, at temperature 1).
    """
    return held_softmax(alpha, tD + S, 1.0) / tau


class ReinMaxCV_ELBO(ReinMaxRao_ELBO):
    __doc__ = """
    The ELBO with gradients of its ``OneHotCategorical`` guide sites
    estimated by ReinMax-CV [1] as its authors ran it (their code,
    ``danielwang0452/ReinMax_ASC``, ``reinmax_jacobians.py``, method
    ``reinmax_cv``; the paper's equation numbers could not be checked here):
    ReinMax at temperature 1 plus :math:`\\eta` times the difference of a
    Gumbel-Rao and a Gumbel-softmax Jacobian at
    :math:`\\theta_D = \\log\\pi_{1/2}`, :math:`\\pi_{1/2} = \\tfrac12(\\pi + D)`:

    .. math::
        \\hat g_\\alpha = \\underbrace{\\big(2J(\\pi_{1/2}) - \\tfrac12 J(\\pi)\\big) g_D}_{\\rm ReinMax,\\ \\tau = 1}
        + \\eta\\Big(\\bar J_{\\rm GR}(\\theta_D;\\tau)
        - \\tfrac1\\tau J\\big(\\mathrm{softmax}(\\theta_D + S)\\big)\\Big) g_D,
        \\qquad S = \\mathrm{softmax}((\\alpha + G)/\\tau),

    where :math:`G` is the Gumbel noise of the sample itself,
    :math:`D = \\mathrm{onehot}(\\arg\\max(\\alpha + G))`, so :math:`S` is the
    forward pass's soft Gumbel-softmax sample, and
    :math:`\\bar J_{\\rm GR}(\\theta_D;\\tau) = \\frac1K\\sum_k\\frac1\\tau
    J(\\mathrm{softmax}(\\tilde z^{(k)}/\\tau))` with :math:`K` conditional draws
    :math:`\\tilde z^{(k)} \\sim (\\theta_D + G' \\mid \\arg\\max(\\theta_D + G') = D)`
    (as :class:`ReinMaxRao_ELBO`; the authors use :math:`K = 100`). The
    authors' forward pass saves :math:`S` in the slot its backward pass reads
    as the Gumbel noise, so their Gumbel-softmax term adds the probability
    vector :math:`S` to :math:`\\theta_D` inside a temperature-1 softmax and
    divides by :math:`\\tau`; this class computes exactly that.

    Bias and variance. Given :math:`D`, write
    :math:`\\hat g = m(D) + \\varepsilon` with :math:`m(D) = \\mathbb E[\\hat g \\mid D]`.
    The fluctuations of :math:`\\bar J_{\\rm GR}` (the conditional draws) and of
    the Gumbel-softmax term (:math:`S` given :math:`D`) are zero-mean given
    :math:`D`; the correction's conditional mean
    :math:`\\eta\\,(\\mathbb E[\\bar J_{\\rm GR} \\mid D] - \\mathbb E[\\tfrac1\\tau
    J(\\mathrm{softmax}(\\theta_D + S)) \\mid D])\\, g_D` is not (the two
    Jacobians are averages over different noise), so the estimator's mean
    differs from ReinMax's by its expectation over :math:`D` (a bias relative
    to ReinMax, which is exact for :math:`f` quadratic in :math:`D`). ReinMax's
    term is a function of :math:`D` alone, hence
    :math:`\\mathrm{Var}\\,\\hat g = \\mathrm{Var}\\, m(D) + \\mathbb E\\,\\mathrm{Var}(\\varepsilon \\mid D)`:
    the zero-mean part only adds variance, and any reduction comes from the
    deterministic part, the same part that carries the bias. Measured on
    two small models with :math:`f` quadratic in :math:`D` (where ReinMax is
    exact) at :math:`\\eta = 1.5`, :math:`K = 10`: 1.05x and 1.10x ReinMax's
    variance plus a squared bias, so no gain there; on the 8x4 categorical
    VAE (exact gradient enumerated) 0.83 +- 0.04x (eta 1.5) and 0.90 +- 0.05x
    (eta 1) of ReinMax's variance, ReinMax-Rao 0.50x. Derivation and tables:
    the docs page ``estimators/reinmax_cv``.

    ``form="fresh"`` is *our* earlier reading, not the authors' (formerly the
    default): the Gumbel-softmax term at
    :math:`\\tfrac1\\tau J(\\mathrm{softmax}((\\theta_D + G')/\\tau))` with a fresh
    unconditional Gumbel vector :math:`G'`. Its correction is mostly noise
    (1.19 +- 0.06x ReinMax's variance on the 8x4 categorical VAE at eta 1.5,
    K = 10), and training with it degraded after about 25,000 steps at the full
    budget; kept only to compare with.

    Example::

        svi = SVI(model, guide, optax.adam(5e-4), ReinMaxCV_ELBO(temperature=1.0, eta=1.5))

    :param float temperature: :math:`\\tau > 0` of the forward soft sample, the
        Gumbel-Rao and the Gumbel-softmax Jacobians (default 1); ReinMax's own
        is 1 (the authors' ``temperature``).
    :param float eta: the coefficient :math:`\\eta` (finite; default 1, the
        authors' script default; their released runs use 1.5 for the 8x4, 4x24,
        8x16, 16x12 and 64x8 VAEs and 1.0 for 10x30).
    :param int num_samples: :math:`K \\ge 1` conditional Gumbel draws (default
        100, as the authors).
    :param str form: ``"authors"`` (default) or ``"fresh"`` (ours, see above).
    """ + _COMMON_PARAMS + """
    [1] Daniel Wang, Thang D. Bui, "Beyond ReinMax: Low-Variance Gradient
        Estimators for Discrete Latent Variables", arXiv:2603.08257, 2026
        (method "ReinMax-CV").
    """

    def __init__(self, num_particles=1, vectorize_particles=True, *, temperature=1.0,
                 eta=1.0, num_samples=100, form="authors", vectorize=True):
        eta = check_finite("ReinMaxCV_ELBO", "eta", eta)
        if form not in CV_FORMS:
            raise ValueError(
                f"ReinMaxCV_ELBO: form must be one of {CV_FORMS} ('authors': the estimator "
                f"the authors ran; 'fresh': ours, for comparison), got {form!r}."
            )
        self.eta = float(eta)
        self.form = form
        super().__init__(num_particles, vectorize_particles, temperature=temperature,
                         num_samples=num_samples, vectorize=vectorize)

    def surrogate(self, name, alpha, u, D):
        tau = self.temperature
        if self.form == "authors":
            # extra noise: the K conditional draws; S is the forward soft sample
            tD, gr, _ = self._gr_term(name, alpha, D)
            S = jax.nn.softmax((stop_gradient(alpha) + gumbel(u)) / tau, -1)
            gs = authors_gs_surrogate(alpha, tD, S, tau)
        else:
            # extra noise: K conditional draws, then one unconditional Gumbel
            tD, gr, w = self._gr_term(name, alpha, D, extra=1)
            gs = held_softmax(alpha, tD + gumbel(w[0]), tau)
        return reinmax_surrogate(alpha, D, 1.0) + self.eta * (gr - gs)
