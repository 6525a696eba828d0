"""
REBAR and RELAX: unbiased estimators whose control variate is the ELBO
integrand (or a learned function) at a continuous relaxation of the sample.

Notation (:doc:`the estimator notes </notation>` sections 0, 5, 6). A Bernoulli site has logits
:math:`\\alpha`, perturbed logits :math:`z = \\alpha - \\mathrm{logit}(u)` and
sample :math:`b = 1[z > 0] = 1[u < \\sigma(\\alpha)]`; a one-hot categorical site has
:math:`z = \\alpha + G`, :math:`G = -\\log(-\\log u)` and
:math:`D = \\mathrm{onehot}(\\arg\\max z)`. The relaxed value is
:math:`\\sigma_\\lambda(z) = \\sigma(z / \\lambda)` (categorical:
:math:`\\mathrm{softmax}(z / \\lambda)`), :math:`\\tilde z \\sim p(z \\mid b)` the
conditional perturbation, and with a control variate :math:`c` the estimator
of the logits' gradient is (REBAR eq. (4); RELAX eq. (8))

.. math::
    \\hat g_\\alpha = \\big[f(b) - c(\\tilde z)\\big]\\,\\nabla_\\alpha \\log q(b)
        + \\nabla_\\alpha c(z) - \\nabla_\\alpha c(\\tilde z),

unbiased for every differentiable :math:`c`. REBAR takes
:math:`c = \\eta\\, f(\\sigma_\\lambda(z))`, RELAX
:math:`c = \\eta\\, f(\\sigma_\\lambda(z)) + r_\\rho(z)` with a learned
:math:`r_\\rho`. :math:`\\tilde z` is drawn with the common random numbers of
REBAR App. G.2 (the noise :math:`v` is derived from :math:`u` and held
fixed), so :math:`\\tilde z = z` in value and only the gradients differ.

Multi-layer guides use the per-layer scheme of REBAR (main text; the
reference code's "quadratic" mode): for the :math:`t`-th discrete site, one
evaluation relaxes it at :math:`z_t` and one at :math:`\\tilde z_t`, with the
sites before it hard and the sites after it relaxed at their own :math:`z`;
its control variate multiplies its own score only. A step costs
:math:`1 + 2T` evaluations, run as one vectorized guide and model execution.
"""

import functools

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, OneHotCategorical, constraints

import pyro

from binary_grads_common.arguments import check_bool, check_finite

from .elbo import SiteELBO
from .plans import Plan
from .signals import learning_signal, score, total_elbo
from .structure import check_one_hot, inspection_trace, is_discrete_latent


#: The smallest temperature :math:`\lambda` REBAR and RELAX accept (fixed, initial
#: or adapted). The relaxation :math:`\sigma(z/\lambda)` changes only where
#: :math:`|z| \lesssim 10\lambda`, which a fraction of about :math:`5\lambda` of the
#: draws reach (the density of :math:`z` at 0 is :math:`\sigma(\alpha)\sigma(-\alpha)
#: \le 1/4`): the control variate's pathwise terms are 0 on all other draws and
#: of order :math:`1/\lambda` on those, so the estimator stays unbiased but its
#: variance grows as :math:`1/\lambda` (measured on a one-site model: about
#: :math:`0.06/\lambda` for the logit's gradient from :math:`\lambda = 10^{-1}`
#: down to :math:`10^{-6}`, in float32 and float64) and at :math:`\lambda = 10^{-8}`
#: every one of 60,000 draws gave a gradient of exactly 0. At
#: :math:`\lambda = 10^{-2}` about 5% of the draws reach the transition and the
#: variance is about 5 times that at :math:`\lambda = 1`. Large temperatures are
#: harmless (:math:`\sigma(z/\lambda) \to 1/2`, a constant control variate).
TEMPERATURE_MIN = 1e-2


def _like(fn):
    """``(dtype, device)`` of a discrete site's logits (or probs)."""
    base = fn
    while hasattr(base, "base_dist"):
        base = base.base_dist
    t = base.logits if "logits" in base.__dict__ else getattr(base, "probs", None)
    if t is None:
        t = base.logits
    return (t.dtype, t.device)


def _event_shape(info, alpha):
    """A site's event shape, read off its logits."""
    n = info.event_dim
    return alpha.shape[alpha.dim() - info.alpha_event_dim : alpha.dim() - info.alpha_event_dim + n] \
        if n else torch.Size()


# ---------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------


def logistic_noise(u):
    """:math:`\\mathrm{logit}(1 - u) = -\\mathrm{logit}(u)`: the perturbation with
    :math:`b = 1[\\alpha - \\mathrm{logit}(u) > 0] = 1[u < \\sigma(\\alpha)]`, the
    mechanism's sample (:doc:`the estimator notes </notation>` uses :math:`1 - u` for our :math:`u`)."""
    return torch.log1p(-u) - torch.log(u)


def bernoulli_conditional(alpha, u, b):
    """
    :math:`\\tilde z \\sim p(z \\mid b)` for a Bernoulli site with the common
    random numbers of REBAR App. G.2. In the paper's notation (noise
    :math:`w = 1 - u`, :math:`z = \\alpha + \\mathrm{logit}(w)`,
    :math:`w' = \\sigma(-\\alpha)`): :math:`v = (w - w')/(1 - w')` if :math:`b = 1`,
    :math:`v = w / w'` if :math:`b = 0`, held fixed (detached), and (App. C, in
    the form that reproduces :math:`\\tilde z = z`; :doc:`the estimator notes </notation>` 11.1)

    .. math::
        \\tilde z = \\begin{cases}
            \\mathrm{softplus}(\\mathrm{logit}(v) + \\mathrm{softplus}(\\alpha)) & b = 1 \\\\
            -\\mathrm{softplus}(-\\mathrm{logit}(v) + \\mathrm{softplus}(-\\alpha)) & b = 0
        \\end{cases}

    differentiable in ``alpha``; equal to :math:`z` in value.
    """
    with torch.no_grad():
        p = torch.sigmoid(alpha)
        tiny = torch.finfo(u.dtype).tiny
        # logit(v), written in u = 1 - w so that it keeps precision near p
        logit_v = torch.where(
            b > 0,
            torch.log((p - u).clamp(min=tiny)) - torch.log(u),
            torch.log1p(-u) - torch.log((u - p).clamp(min=tiny)),
        )
    return torch.where(
        b > 0,
        F.softplus(logit_v + F.softplus(alpha)),
        -F.softplus(-logit_v + F.softplus(-alpha)),
    )


def gumbel_conditional(alpha, u, D):
    """
    :math:`\\tilde z \\sim (\\alpha + G \\mid \\arg\\max(\\alpha + G) = D)` for a
    one-hot categorical site (REBAR App. C, eq. (6); truncated Gumbels for
    unnormalised logits, :math:`\\Lambda = \\log\\sum_j e^{\\alpha_j}`):
    :math:`\\tilde z_k = \\Lambda - \\log E_k` at the sampled class and
    :math:`\\tilde z_i = -\\log(E_i e^{-\\alpha_i} + e^{-\\tilde z_k})` elsewhere, with
    the exponentials :math:`E` derived from :math:`z = \\alpha + G(u)` and held
    fixed (the categorical analogue of App. G.2, :doc:`the estimator notes </notation>` section 5):
    :math:`\\log E_k = \\Lambda - z_k`,
    :math:`\\log E_i = \\alpha_i - z_i + \\log(1 - e^{z_i - z_k})`.
    Differentiable in ``alpha``; equal to ``z`` in value.
    """
    with torch.no_grad():
        a = alpha.detach()
        z = a - torch.log(-torch.log(u))
        zk = (z * D).sum(-1, keepdim=True)
        lse = torch.logsumexp(a, -1, keepdim=True)
        gap = (z - zk).clamp(max=-torch.finfo(z.dtype).eps)
        logE = torch.where(D > 0, lse - zk, a - z + torch.log(-torch.expm1(gap)))
    top = torch.logsumexp(alpha, -1, keepdim=True) - (logE * D).sum(-1, keepdim=True)
    rest = -torch.logaddexp(logE - alpha, -top)
    return torch.where(D > 0, top, rest)


def perturbed_logits(kind, alpha, u, hard, conditional):
    """:math:`z` (``conditional=False``) or :math:`\\tilde z` of a site."""
    if kind == "bernoulli":
        if conditional:
            return bernoulli_conditional(alpha, u, hard)
        return alpha + logistic_noise(u)
    if conditional:
        return gumbel_conditional(alpha, u, hard)
    return alpha - torch.log(-torch.log(u))


def relax(kind, z, temperature):
    """:math:`\\sigma(z/\\lambda)`, or :math:`\\mathrm{softmax}(z/\\lambda)` for one-hot sites."""
    if kind == "bernoulli":
        return torch.sigmoid(z / temperature)
    return torch.softmax(z / temperature, -1)


# ---------------------------------------------------------------------------
# the ELBO classes
# ---------------------------------------------------------------------------


class REBAR_ELBO(SiteELBO):
    """
    The ELBO with gradients of its discrete guide sites (``Bernoulli`` and
    ``OneHotCategorical``) estimated by REBAR [1]: the REINFORCE estimator
    with the ELBO integrand at the concrete relaxation
    :math:`c(z) = \\eta\\, f(\\sigma_\\lambda(z))` as a control variate, made
    unbiased by the conditional reparameterization :math:`\\tilde z \\mid b`
    ([1] eq. (4), with the terms of App. G.2):

    .. math::
        \\hat g_\\alpha = \\big[f(b) - \\eta f(\\sigma_\\lambda(\\tilde z))\\big]
            \\nabla_\\alpha \\log q(b)
            + \\eta\\nabla_\\alpha f(\\sigma_\\lambda(z))
            - \\eta\\nabla_\\alpha f(\\sigma_\\lambda(\\tilde z)).

    The relaxed integrand is differentiated totally, the relaxed
    :math:`-\\log q_\\phi(\\sigma_\\lambda(z))` included (:doc:`the estimator notes </notation>` 0.2);
    its score term uses the plate-local learning signal of each element.
    Model parameters and reparameterized sites get pathwise gradients at the
    hard sample. :math:`\\tilde z` uses the common random numbers of App. G.2
    (categorical: App. C with the analogous coupling).

    **Multi-layer guides** use [1]'s per-layer scheme (main text): for the
    :math:`t`-th discrete site one evaluation relaxes it at :math:`z_t` and
    one at :math:`\\tilde z_t`, sites before it hard, sites after it relaxed
    at their own :math:`z`; :math:`1 + 2T` evaluations per step, run as one
    vectorized guide and model execution. (The single coupled pair of fully
    relaxed passes of App. F is not offered: with relaxed upstream values the
    conditional :math:`\\tilde z_t \\mid b_t` no longer matches the hard path.)

    **Adapting** :math:`\\lambda` **and** :math:`\\eta` ([1] Sec. 3.3; RELAX eq. (6)):
    with ``adapt=True`` each discrete site has its own temperature
    :math:`\\lambda > 0` and scale :math:`\\eta \\in (0, 2)` (initialised at
    ``temperature`` and ``eta``), Pyro params ``_bg_<site>_temperature`` and
    ``_bg_<site>_eta`` trained by the optimizer you pass to SVI on the
    single-sample variance gradient :math:`\\nabla_{\\lambda,\\eta} \\overline{\\hat g_\\phi^2}`
    (the mean square of the estimator's gradient over the guide's parameters,
    by double backpropagation) instead of the ELBO gradient. They are created
    inside ``loss_and_grads``, where ``SVI.step`` collects every
    ``pyro.param``, so nothing else is needed::

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), REBAR_ELBO())

    ``elbo.wrap_guide(guide)`` (which declares them in the guide) keeps
    working, e.g. for code shared with :mod:`numpyro_binary_grads`. NumPyro
    keeps ``wrap_guide`` required: its ``SVI.init`` collects params from the
    model and guide traces only, so a ``numpyro.param`` created inside the
    loss would never be optimized.

    With ``adapt=False`` they stay fixed and no wrapping is needed
    (``REBAR_ELBO(temperature=0.1, adapt=False)`` is "REBAR (0.1)" of [1]).

    The model and guide are run at relaxed values in :math:`(0, 1)` (one-hot
    sites: on the simplex): write them so that such values flow through
    (e.g. matrix products). Discrete log-probs are computed from the logits
    and accept relaxed values; Pyro's validation is off inside these
    evaluations only. Integer ``Categorical`` sites raise an error pointing to
    ``OneHotCategorical``.

    :param float temperature: the (initial) temperature :math:`\\lambda > 0`.
    :param float eta: the (initial) control-variate scale :math:`\\eta`
        (in :math:`(0, 2)` when adapted).
    :param bool adapt: train :math:`\\lambda, \\eta` on the variance gradient.

    Other parameters as :class:`~pyro_binary_grads.ARM_ELBO`.

    [1] George Tucker, Andriy Mnih, Chris J. Maddison, Dieterich Lawson,
        Jascha Sohl-Dickstein, "REBAR: Low-variance, unbiased gradient
        estimates for discrete latent variable models", NeurIPS 2017.
    """

    supports = (Bernoulli, OneHotCategorical)
    detach_discrete = "hard"
    dynamic_structure = False

    def __init__(self, num_particles=1, max_plate_nesting=float("inf"),
                 vectorize_particles=False, *, temperature=0.5, eta=1.0, adapt=True,
                 vectorize=True, **kwargs):
        owner = type(self).__name__
        adapt = check_bool(owner, "adapt", adapt)
        temperature = check_finite(
            owner, "temperature", temperature, low=TEMPERATURE_MIN,
            hint=f"Below {TEMPERATURE_MIN:g} the relaxation is flat on almost every draw "
            "and the gradient is almost always exactly 0 (its variance grows as "
            "1/temperature; see pyro_binary_grads.relaxed.TEMPERATURE_MIN).",
        )
        if adapt:
            eta = check_finite(
                owner, "eta", eta, 0.0, 2.0, low_open=True, high_open=True,
                hint="adapt=True keeps eta in (0, 2); pass adapt=False to use a fixed "
                "eta outside that range.",
            )
        else:
            eta = check_finite(owner, "eta", eta)
        self.temperature = float(temperature)
        self.eta = float(eta)
        self.adapt = adapt
        self._sites = {}  # {guide: [(site name, event shape)]}, found by the wrapper
        self._psi = {}  # {site: (temperature, eta)} of the current draw
        self._step_psi = []  # the adapted tensors of every draw of the current step
        super().__init__(num_particles, max_plate_nesting, vectorize_particles,
                         vectorize=vectorize, **kwargs)

    # -- adapted parameters -------------------------------------------------

    @property
    def adapts(self):
        """Whether this ELBO has parameters trained on the variance gradient."""
        return self.adapt

    def param_name(self, site, what):
        return f"_bg_{site}_{what}"

    def wrap_guide(self, guide):
        """
        Returns ``guide`` preceded by the declaration of this ELBO's adapted
        parameters (``pyro.param`` sites named ``_bg_<site>_...``). Optional in
        Pyro (the parameters are also created inside ``loss_and_grads``, where
        ``SVI.step`` collects them); required in NumPyro.
        """

        @functools.wraps(guide)
        def wrapped(*args, **kwargs):
            self._declare(guide, args, kwargs)
            return guide(*args, **kwargs)

        wrapped._bg_elbo = self
        return wrapped

    def _find_sites(self, guide, args, kwargs):
        """The discrete sites of ``guide`` (names and event shapes), one trace per guide."""
        if guide not in self._sites:
            trace = inspection_trace(guide, args, kwargs)
            self._sites[guide] = [
                (name, tuple(site["fn"].event_shape), _like(site["fn"]))
                for name, site in trace.nodes.items()
                if site["type"] == "sample" and is_discrete_latent(site)
            ]
        return self._sites[guide]

    def _declare(self, guide, args, kwargs):
        if not self.adapts:
            return
        for name, event_shape, like in self._find_sites(guide, args, kwargs):
            self._site_psi(name, torch.Size(event_shape), like)

    def __getstate__(self):
        # this step's params (non-leaf tensors) and traced sites do not copy or pickle
        state = super().__getstate__()
        state.update(_psi={}, _step_psi=[], _sites={})
        return state

    def _site_psi(self, name, event_shape, like=None):
        """This step's temperature and eta of site ``name`` (Pyro params,
        created on first use, in the graph, on the device and dtype of ``like``
        = ``(dtype, device)`` of the site's logits), or the fixed values."""
        kw = {} if like is None else dict(dtype=like[0], device=like[1])
        psi = self._psi.get(name)
        if psi is None:
            if self.adapt:
                psi = (
                    pyro.param(self.param_name(name, "temperature"),
                               lambda: torch.tensor(self.temperature, **kw),
                               constraint=constraints.greater_than(TEMPERATURE_MIN)),
                    pyro.param(self.param_name(name, "eta"), lambda: torch.tensor(self.eta, **kw),
                               constraint=constraints.interval(0.0, 2.0)),
                )
            else:
                psi = (self.temperature, self.eta)
            self._psi[name] = psi
        return psi

    def _setup(self, model, guide, args, kwargs):
        if (model, guide) not in self._programs:
            trace = inspection_trace(guide, args, kwargs)
            for name, site in trace.nodes.items():
                if site["type"] == "sample" and is_discrete_latent(site):
                    check_one_hot(name, site["fn"], type(self).__name__,
                                  "evaluates the model at relaxed one-hot values",
                                  "RLOO_ELBO, DisARM_ELBO or VIMCO")
        return super()._setup(model, guide, args, kwargs)

    # -- mechanism hooks ----------------------------------------------------

    def plan(self, num_sites):
        plan = Plan.relaxed(num_sites)
        plan.value_fn = self._site_value
        return plan

    def _site_value(self, info, u, alpha, hard, code):
        lam = self._site_psi(info.name, _event_shape(info, alpha), (alpha.dtype, alpha.device))[0]
        if isinstance(code, int):
            if code == 0:
                return hard
            return relax(info.kind, perturbed_logits(info.kind, alpha, u, hard, code == 2), lam)
        z = perturbed_logits(info.kind, alpha, u, hard, False)
        zt = perturbed_logits(info.kind, alpha, u, hard, True)
        return torch.where(code == 0, hard,
                           relax(info.kind, torch.where(code == 2, zt, z), lam))

    def control_variate(self, info, u, alpha, b, a, c):
        """The learned part :math:`r(z), r(\\tilde z)` of the control variate
        (evaluations ``a`` and ``c``); none for REBAR."""
        return None

    def value_and_surrogate(self, evals, structure, plate_nesting):
        U = plate_nesting
        self._guide_param_names = [
            n for n, site in evals.guide_trace.nodes.items() if site["type"] == "param"
        ]
        f = total_elbo(evals, U)
        P = f.numel() // f.shape[-1]
        value = f[..., 0].mean()
        surr = value
        live = torch.is_grad_enabled() and self.adapts
        for info in structure.discrete.values():
            a, c = 2 * info.index + 1, 2 * info.index + 2
            alpha, v = evals.discrete[info.name]
            lam, eta = self._site_psi(info.name, _event_shape(info, alpha),
                                      (alpha.dtype, alpha.device))
            signal = learning_signal(evals, info, U)
            signal = signal.reshape(signal.shape + (1,) * info.event_dim)
            d = -(U + 1) - info.event_dim
            alpha0 = alpha.narrow(d, 0, 1)
            b = v.narrow(d, 0, 1).detach()
            u = evals.noise[info.name].reshape(alpha0.shape)
            coef = signal.narrow(d, 0, 1).detach() - eta * (
                signal.narrow(d, c, 1) if live else signal.narrow(d, c, 1).detach()
            )
            r = self.control_variate(info, u, alpha, b, a, c)
            if r is not None:
                r_z, r_zt = r
                coef = coef - r_zt
                surr = surr + (r_z - r_zt).sum() / P
            coef = coef * score(info, alpha0, b)
            if live or r is not None:
                surr = surr + ((alpha0 - alpha0.detach()) * coef).sum() / P
            else:
                surr = surr + (alpha0 * coef.detach()).sum() / P
            surr = surr + eta * (f[..., a] - f[..., c]).sum() / P
        self._keep_adapted()
        return value, surr

    # -- the variance gradient ----------------------------------------------

    def adapted_tensors(self):
        """The tensors trained on the variance gradient in this step."""
        if not self.adapt:
            return []
        return [t for pair in self._psi.values() for t in pair]

    def _keep_adapted(self):
        # every draw of the step reads the params anew (num_particles unvectorized:
        # one pyro.param tensor per draw), and the variance gradient is taken through
        # all of them; a compiled replay reads one tensor for all draws (kept once)
        seen = {id(t) for t in self._step_psi}
        self._step_psi += [t for t in self.adapted_tensors() if id(t) not in seen]

    def _begin_evaluation(self):
        # a blocked run before this one (the first-use inspection and discovery, the
        # broadcasting check, an abandoned vectorized attempt) declared the params
        # too: this run must call pyro.param itself, or SVI.step does not see them
        # and the variance term is taken w.r.t. tensors outside the surrogate's graph
        self._psi = {}

    def _value_and_surrogate(self, model, guide, args, kwargs):
        self._psi, self._step_psi = {}, []
        try:
            loss, surr = super()._value_and_surrogate(model, guide, args, kwargs)
            psi = self._step_psi
            if psi and torch.is_grad_enabled() and surr.requires_grad:
                surr = surr + self._variance_term(surr, psi)
        finally:
            self._psi, self._step_psi = {}, []  # no graph kept between steps (deepcopy, pickle)
        return loss, surr

    def _variance_term(self, surr, psi):
        """
        ``sum(psi * sg(dVar/dpsi - dS/dpsi))``, value 0: with it the surrogate's
        gradient w.r.t. the adapted tensors ``psi`` is the single-sample
        variance gradient :math:`\\nabla_\\psi \\overline{\\hat g_\\phi^2}`
        (RELAX eq. (6)) instead of the ELBO gradient.
        """
        store = pyro.get_param_store()
        adapted = {id(t) for t in psi}
        names = {n for n in store.keys() if n.startswith("_bg_")}
        guide_params = [
            store._params[n] for n in self._guide_param_names if n not in names
        ]
        guide_params = [p for p in guide_params if p.requires_grad]
        grads = torch.autograd.grad(surr, guide_params, create_graph=True, allow_unused=True)
        grads = [g for g in grads if g is not None]
        if not grads:
            return 0.0
        n = sum(g.numel() for g in grads)
        var = sum((g * g).sum() for g in grads) / n
        dvar = torch.autograd.grad(var, psi, retain_graph=True, allow_unused=True)
        ds = torch.autograd.grad(surr, psi, retain_graph=True, allow_unused=True)
        term = 0.0
        for t, gv, gs in zip(psi, dvar, ds):
            assert id(t) in adapted
            step = (gv if gv is not None else 0.0) - (gs if gs is not None else 0.0)
            if torch.is_tensor(step):
                term = term + (t * step.detach()).sum()
        return term - (term.detach() if torch.is_tensor(term) else 0.0)
