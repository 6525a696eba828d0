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
float tensor (e.g. use it in a matrix product) for :math:`g_D` to exist.

Notation (:doc:`the estimator notes </notation>` section 0): :math:`\\pi = \\mathrm{softmax}(\\alpha)`,
:math:`J(p) = \\mathrm{diag}(p) - p p^\\top` (the Jacobian of softmax at
output :math:`p`; symmetric). Formulas: :doc:`the estimator notes </notation>` section 7, except
ReinMax-CV, which follows its authors' code (``docs/estimators/reinmax_cv.rst``).
"""

import math

import torch
from torch.distributions import Bernoulli, OneHotCategorical


from binary_grads_common.arguments import check_count, check_finite

from .elbo import SiteELBO
from .sites import Plan, check_one_hot, is_discrete_latent, total_elbo
from .structure import inspection_trace


# ---------------------------------------------------------------------------
# pure functions (class dim last)
# ---------------------------------------------------------------------------


def gumbel(u):
    """:math:`G = -\\log(-\\log u)`, the noise whose argmax with the logits is
    the mechanism's hard sample."""
    return -torch.log(-torch.log(u))


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
    alpha, D = alpha.detach(), D.detach()
    logE = torch.log(-torch.log(v))
    top = torch.logsumexp(alpha, -1, keepdim=True) - (logE * D).sum(-1, keepdim=True)
    rest = -torch.logaddexp(logE - alpha, -top)
    return torch.where(D > 0, top, rest)


def two_classes(alpha, u, b):
    """
    A Bernoulli site as two classes (:doc:`the estimator notes </notation>` section 7, "two-class
    form"): logits :math:`(\\alpha, 0)`, one-hot sample :math:`(b, 1 - b)` and
    uniforms whose Gumbels are :math:`(\\mathrm{logit}(u), 0)`, so that
    :math:`b = 1[\\alpha + \\mathrm{logit}(u) > 0]` is the same sample. Class 0 of
    a surrogate is then the Bernoulli surrogate, e.g. :math:`\\sigma(\\alpha/\\tau)`.
    """
    logit_u = torch.log(u) - torch.log1p(-u)
    u2 = torch.stack([torch.exp(-torch.exp(-logit_u)), torch.full_like(u, math.exp(-1.0))], -1)
    alpha2 = torch.stack([alpha, torch.zeros_like(alpha)], -1)
    return alpha2, u2, torch.stack([b, 1 - b], -1)


def held_softmax(alpha, z, tau):
    """:math:`\\mathrm{softmax}((\\alpha + \\mathrm{sg}(z - \\alpha)) / \\tau)`: value
    :math:`\\mathrm{softmax}(z/\\tau)`, Jacobian w.r.t. :math:`\\alpha`
    :math:`\\frac1\\tau J(\\mathrm{softmax}(z/\\tau))` (the noise in ``z`` held fixed)."""
    return torch.softmax((alpha + (z - alpha).detach()) / tau, -1)


def reinmax_half(alpha, D, tau):
    """:math:`\\pi_{1/2} = \\tfrac12(\\mathrm{softmax}(\\alpha/\\tau) + D)`, detached."""
    return 0.5 * (torch.softmax(alpha.detach() / tau, -1) + D)


def reinmax_surrogate(alpha, D, tau):
    """
    The ReinMax surrogate (Liu et al. 2023, Algorithm 2; the official code's
    backward): :math:`\\pi_1 = \\mathrm{softmax}(\\mathrm{sg}(\\log\\pi_{1/2} - \\alpha) + \\alpha)`
    (value :math:`\\pi_{1/2}`, Jacobian :math:`J(\\pi_{1/2})`),
    :math:`s = 2\\pi_1 - \\tfrac12\\pi`, so
    :math:`\\partial s/\\partial\\alpha = 2J(\\pi_{1/2}) - \\tfrac12 J(\\pi)`.
    """
    half = reinmax_half(alpha, D, tau)
    pi1 = held_softmax(alpha, torch.log(half), 1.0)
    return 2 * pi1 - 0.5 * torch.softmax(alpha, -1)


def theta_D(alpha, D):
    """:math:`\\theta_D = \\log\\tfrac12(\\pi + D)` (Wang & Bui), detached."""
    return torch.log(0.5 * (torch.softmax(alpha.detach(), -1) + D))


def gumbel_rao_surrogate(alpha, z, tau):
    """:math:`\\frac1K\\sum_k \\mathrm{softmax}((\\alpha + \\mathrm{sg}(\\tilde z^{(k)} - \\alpha))/\\tau)`
    for perturbed logits ``z`` of shape ``(K,) + alpha.shape``: Jacobian
    :math:`\\bar J_{\\rm GR} = \\frac1K\\sum_k \\frac1\\tau J(\\mathrm{softmax}(\\tilde z^{(k)}/\\tau))`."""
    return held_softmax(alpha, z, tau).mean(0)


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

    supports = (OneHotCategorical,)
    detach_discrete = False

    def __init__(self, num_particles=1, max_plate_nesting=float("inf"),
                 vectorize_particles=False, *, temperature=1.0, vectorize=True, **kwargs):
        temperature = check_finite(type(self).__name__, "temperature", temperature, low=0.0,
                                   low_open=True)
        self.temperature = temperature
        super().__init__(num_particles, max_plate_nesting, vectorize_particles,
                         vectorize=vectorize, **kwargs)
        #: test hook: {site name: uniforms of shape (K, *alpha.shape)} for the
        #: extra (conditional / unconditional) Gumbel draws of the next step
        self._extra_noise = None

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
        return hard + (s - s.detach())

    def surrogate(self, name, alpha, u, D):
        """The differentiable surrogate ``s(alpha)`` of one site (class dim last)."""
        raise NotImplementedError

    def value_and_surrogate(self, evals, structure, plate_nesting):
        f = total_elbo(evals, plate_nesting)
        return f.mean(), f.mean()

    def _uniforms(self, name, num, alpha):
        """``num`` fresh uniform draws shaped like ``alpha`` (or the test hook's)."""
        shape = (num,) + alpha.shape
        hook = (self._extra_noise or {}).get(name)
        if hook is not None:
            if hook.numel() != num * alpha.numel():
                raise ValueError(
                    f"Extra noise for site '{name}' has shape {tuple(hook.shape)}, "
                    f"expected {shape}."
                )
            return hook.reshape(shape).to(alpha)
        u = torch.rand(shape, dtype=alpha.dtype, device=alpha.device)
        return u.clamp(min=torch.finfo(u.dtype).tiny)

    # -- a clearer error for integer Categorical sites ------------------------

    def _setup(self, model, guide, args, kwargs):
        if self._structure is None:
            trace = inspection_trace(guide, args, kwargs)
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or not is_discrete_latent(site):
                    continue
                check_one_hot(name, site["fn"], type(self).__name__,
                              "differentiates the integrand through the sample's value",
                              "an unbiased estimator such as pyro_binary_grads.RLOO_ELBO")
        super()._setup(model, guide, args, kwargs)


_COMMON_PARAMS = """
    :param int num_particles: independent estimator draws averaged per step.
    :param int max_plate_nesting: the model's and guide's plate nesting,
        guessed on the first step if not given.
    :param bool vectorize_particles: draw the particles in one vectorized run.
    :param bool vectorize: run guide and model vectorized over the
        mechanism's evaluation dim (default) or not (for models that do not
        broadcast over leading dims).
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

        from pyro_binary_grads import ST_ELBO, OneHotCategorical
        def guide(x):
            logits = encoder(x).reshape(-1, 20, 10)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", OneHotCategorical(logits=logits).to_event(1))
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), ST_ELBO())

    :param float temperature: :math:`\\tau > 0` (default 1).
    """ + _COMMON_PARAMS + """
    [1] Yoshua Bengio, Nicholas Léonard, Aaron Courville, "Estimating or
        Propagating Gradients Through Stochastic Neurons for Conditional
        Computation", arXiv:1308.3432, 2013.
    [2] Max B. Paulus, Chris J. Maddison, Andreas Krause, "Rao-Blackwellizing
        the Straight-Through Gumbel-Softmax Gradient Estimator", ICLR 2021.
    """

    supports = (OneHotCategorical, Bernoulli)

    def surrogate(self, name, alpha, u, D):
        return torch.softmax(alpha / self.temperature, -1)


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

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}),
                  GumbelSoftmaxST_ELBO(temperature=0.5))

    :param float temperature: :math:`\\lambda > 0` (default 1).
    """ + _COMMON_PARAMS + """
    [1] Eric Jang, Shixiang Gu, Ben Poole, "Categorical Reparameterization
        with Gumbel-Softmax", ICLR 2017.
    [2] Max B. Paulus, Chris J. Maddison, Andreas Krause, "Rao-Blackwellizing
        the Straight-Through Gumbel-Softmax Gradient Estimator", ICLR 2021.
    """

    supports = (OneHotCategorical, Bernoulli)

    def surrogate(self, name, alpha, u, D):
        return torch.softmax((alpha + gumbel(u)) / self.temperature, -1)


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

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}),
                  GumbelRao_ELBO(temperature=0.5, num_samples=10))

    :param float temperature: :math:`\\lambda > 0` (default 1).
    :param int num_samples: :math:`K \\ge 1` conditional Gumbel draws (default 10).
    """ + _COMMON_PARAMS + """
    [1] Max B. Paulus, Chris J. Maddison, Andreas Krause, "Rao-Blackwellizing
        the Straight-Through Gumbel-Softmax Gradient Estimator", ICLR 2021.
    """

    def __init__(self, num_particles=1, max_plate_nesting=float("inf"),
                 vectorize_particles=False, *, temperature=1.0, num_samples=10,
                 vectorize=True, **kwargs):
        self.num_samples = check_count("GumbelRao_ELBO", "num_samples", num_samples)
        super().__init__(num_particles, max_plate_nesting, vectorize_particles,
                         temperature=temperature, vectorize=vectorize, **kwargs)

    def surrogate(self, name, alpha, u, D):
        z = (alpha.detach() + gumbel(u)).unsqueeze(0)
        if self.num_samples > 1:
            v = self._uniforms(name, self.num_samples - 1, alpha)
            z = torch.cat([z, conditional_gumbel(alpha, D, v)], 0)
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

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), ReinMax_ELBO())

    :param float temperature: :math:`\\tau \\ge 1` (default 1).
    """ + _COMMON_PARAMS + """
    [1] Liyuan Liu, Chengyu Dong, Xiaodong Liu, Bin Yu, Jianfeng Gao,
        "Bridging Discrete and Backpropagation: Straight-Through and Beyond",
        NeurIPS 2023.
    """

    def __init__(self, num_particles=1, max_plate_nesting=float("inf"),
                 vectorize_particles=False, *, temperature=1.0, vectorize=True, **kwargs):
        temperature = check_finite("ReinMax_ELBO", "temperature", temperature, low=1.0,
                                   hint="ReinMax needs temperature >= 1, as the authors' code.")
        super().__init__(num_particles, max_plate_nesting, vectorize_particles,
                         temperature=temperature, vectorize=vectorize, **kwargs)

    supports = (OneHotCategorical, Bernoulli)

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

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}),
                  ReinMaxRao_ELBO(temperature=1.0, num_samples=10))

    :param float temperature: :math:`\\tau > 0` of the Gumbel-Rao Jacobian (default 1).
    :param int num_samples: :math:`K \\ge 1` conditional Gumbel draws (default 10).
    """ + _COMMON_PARAMS + """
    [1] Daniel Wang, Thang D. Bui, arXiv:2603.08257, 2026 (methods
        "ReinMax-Rao" and "ReinMax-CV"; equation numbers not confirmed).
    """

    def __init__(self, num_particles=1, max_plate_nesting=float("inf"),
                 vectorize_particles=False, *, temperature=1.0, num_samples=10,
                 vectorize=True, **kwargs):
        self.num_samples = check_count(type(self).__name__, "num_samples", num_samples)
        super().__init__(num_particles, max_plate_nesting, vectorize_particles,
                         temperature=temperature, vectorize=vectorize, **kwargs)

    def _gr_term(self, name, alpha, D, extra=0):
        """``gumbel_rao_surrogate`` at theta_D with K conditional draws (and
        the uniforms of ``extra`` further draws, returned unused)."""
        v = self._uniforms(name, self.num_samples + extra, alpha)
        tD = theta_D(alpha, D)
        z = conditional_gumbel(tD, D, v[: self.num_samples])
        return tD, gumbel_rao_surrogate(alpha, z, self.temperature), v[self.num_samples:]

    def surrogate(self, name, alpha, u, D):
        _, gr, _ = self._gr_term(name, alpha, D)
        return 2 * gr - 0.5 * torch.softmax(alpha, -1)


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

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 5e-4}),
                  ReinMaxCV_ELBO(temperature=1.0, eta=1.5))

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

    def __init__(self, num_particles=1, max_plate_nesting=float("inf"),
                 vectorize_particles=False, *, temperature=1.0, eta=1.0, num_samples=100,
                 form="authors", vectorize=True, **kwargs):
        eta = check_finite("ReinMaxCV_ELBO", "eta", eta)
        if form not in CV_FORMS:
            raise ValueError(
                f"ReinMaxCV_ELBO: form must be one of {CV_FORMS} ('authors': the estimator "
                f"the authors ran; 'fresh': ours, for comparison), got {form!r}."
            )
        self.eta = float(eta)
        self.form = form
        super().__init__(num_particles, max_plate_nesting, vectorize_particles,
                         temperature=temperature, num_samples=num_samples,
                         vectorize=vectorize, **kwargs)

    def surrogate(self, name, alpha, u, D):
        tau = self.temperature
        if self.form == "authors":
            # extra noise: the K conditional draws; S is the forward soft sample
            tD, gr, _ = self._gr_term(name, alpha, D)
            S = torch.softmax((alpha.detach() + gumbel(u)) / tau, -1)
            gs = authors_gs_surrogate(alpha, tD, S, tau)
        else:
            # extra noise: K conditional draws, then one unconditional Gumbel
            tD, gr, w = self._gr_term(name, alpha, D, extra=1)
            gs = held_softmax(alpha, tD + gumbel(w[0]), tau)
        return reinmax_surrogate(alpha, D, 1.0) + self.eta * (gr - gs)
