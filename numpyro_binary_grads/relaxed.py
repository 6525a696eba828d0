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
:math:`1 + 2T` evaluations, run as one vectorized guide and model execution
(``jax.vmap`` over the evaluations).

The adapted parameters (temperatures, scales :math:`\\eta`, RELAX's networks)
are ordinary ``numpyro.param`` sites declared by :meth:`REBAR_ELBO.wrap_guide`;
the ELBO reads them from the ``param_map`` it is given, so everything runs
under ``jit`` and ``SVI.update``. The module :mod:`pyro_binary_grads.relaxed`
holds the same functions and classes in PyTorch.
"""

import functools

import jax
from jax.lax import stop_gradient
import jax.numpy as jnp

import numpyro
from numpyro.distributions import constraints
from numpyro.distributions.distribution import validation_enabled
from numpyro.handlers import block, seed, substitute, trace

from .arguments import check_bool, check_finite
from .elbo import _COMMON_DOC, SiteELBO, check_rng_key
from .sites import Plan, _base_dist, _expand, _float_value, _kind, check_one_hot, score, total_elbo

__all__ = [
    "TEMPERATURE_MIN",
    "REBAR_ELBO",
    "bernoulli_conditional",
    "gumbel_conditional",
    "logistic_noise",
    "perturbed_logits",
    "relax",
]


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


# ---------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------


def logistic_noise(u):
    """:math:`\\mathrm{logit}(1 - u) = -\\mathrm{logit}(u)`: the perturbation with
    :math:`b = 1[\\alpha - \\mathrm{logit}(u) > 0] = 1[u < \\sigma(\\alpha)]`, the
    mechanism's sample (:doc:`the estimator notes </notation>` uses :math:`1 - u` for our :math:`u`)."""
    return jnp.log1p(-u) - jnp.log(u)


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
    a, u, b = stop_gradient(alpha), stop_gradient(u), stop_gradient(b)
    p = jax.nn.sigmoid(a)
    tiny = jnp.finfo(jnp.result_type(u)).tiny
    # logit(v), written in u = 1 - w so that it keeps precision near p
    logit_v = stop_gradient(jnp.where(
        b > 0,
        jnp.log(jnp.maximum(p - u, tiny)) - jnp.log(u),
        jnp.log1p(-u) - jnp.log(jnp.maximum(u - p, tiny)),
    ))
    return jnp.where(
        b > 0,
        jax.nn.softplus(logit_v + jax.nn.softplus(alpha)),
        -jax.nn.softplus(-logit_v + jax.nn.softplus(-alpha)),
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
    a, u, D = stop_gradient(alpha), stop_gradient(u), stop_gradient(D)
    z = a - jnp.log(-jnp.log(u))
    zk = jnp.sum(z * D, -1, keepdims=True)
    lse = jax.nn.logsumexp(a, -1, keepdims=True)
    gap = jnp.minimum(z - zk, -jnp.finfo(jnp.result_type(z)).eps)
    logE = stop_gradient(jnp.where(D > 0, lse - zk, a - z + jnp.log(-jnp.expm1(gap))))
    top = jax.nn.logsumexp(alpha, -1, keepdims=True) - jnp.sum(logE * D, -1, keepdims=True)
    rest = -jnp.logaddexp(logE - alpha, -top)
    return jnp.where(D > 0, top, rest)


def perturbed_logits(kind, alpha, u, hard, conditional):
    """:math:`z` (``conditional=False``) or :math:`\\tilde z` of a site."""
    if kind == "bernoulli":
        if conditional:
            return bernoulli_conditional(alpha, u, hard)
        return alpha + logistic_noise(u)
    if conditional:
        return gumbel_conditional(alpha, u, hard)
    return alpha - jnp.log(-jnp.log(u))


def relax(kind, z, temperature):
    """:math:`\\sigma(z/\\lambda)`, or :math:`\\mathrm{softmax}(z/\\lambda)` for one-hot sites."""
    if kind == "bernoulli":
        return jax.nn.sigmoid(z / temperature)
    return jax.nn.softmax(z / temperature, -1)


# ---------------------------------------------------------------------------
# the ELBO classes
# ---------------------------------------------------------------------------


class REBAR_ELBO(SiteELBO):
    __doc__ = """
    The ELBO with gradients of its discrete guide sites (``Bernoulli`` and
    :class:`~numpyro_binary_grads.OneHotCategorical`) estimated by REBAR [1]:
    the REINFORCE estimator with the ELBO integrand at the concrete relaxation
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
    :math:`\\lambda \\ge` :data:`TEMPERATURE_MIN` and scale :math:`\\eta \\in (0, 2)` (initialised at
    ``temperature`` and ``eta``), declared as NumPyro params
    ``_bg_<site>_temperature`` and ``_bg_<site>_eta`` by :meth:`wrap_guide`,
    and trained by the optimizer you pass to SVI on the single-sample variance
    gradient :math:`\\nabla_{\\lambda,\\eta} \\overline{\\hat g_\\phi^2}` (the
    mean square of the estimator's gradient over the guide's parameters,
    by double differentiation with the same noise) instead of the ELBO
    gradient::

        elbo = REBAR_ELBO()
        svi = SVI(model, elbo.wrap_guide(guide), optax.adam(1e-3), elbo)
        state = svi.init(jax.random.PRNGKey(0), data)
        state, loss = jax.jit(svi.update)(state, data)

    The ELBO reads the adapted values from the ``param_map`` it is given
    (an error names any it lacks). With
    ``adapt=False`` they stay fixed and no wrapping is needed
    (``REBAR_ELBO(temperature=0.1, adapt=False)`` is "REBAR (0.1)" of [1]).

    The model and guide are run at relaxed values in :math:`(0, 1)` (one-hot
    sites: on the simplex): write them so that such values flow through
    (e.g. matrix products). Discrete log-probs are computed from the logits
    and accept relaxed values; NumPyro's validation is off inside these
    evaluations. Integer ``Categorical`` sites raise an error pointing to
    :class:`~numpyro_binary_grads.OneHotCategorical`.
    """ + _COMMON_DOC + """
    :param float temperature: the (initial) temperature
        :math:`\\lambda \\ge` :data:`TEMPERATURE_MIN` (``1e-2``; below it the
        gradient is almost always exactly 0, see :data:`TEMPERATURE_MIN`);
        adapted, it stays above that bound (constraint
        ``greater_than(TEMPERATURE_MIN)``).
    :param float eta: the (initial) control-variate scale :math:`\\eta`
        (finite; in :math:`(0, 2)` when adapted).
    :param bool adapt: train :math:`\\lambda, \\eta` on the variance gradient.

    Other parameters as :class:`~numpyro_binary_grads.ARM_ELBO`.

    [1] George Tucker, Andriy Mnih, Chris J. Maddison, Dieterich Lawson,
        Jascha Sohl-Dickstein, "REBAR: Low-variance, unbiased gradient
        estimates for discrete latent variable models", NeurIPS 2017.
    """

    supports = ("bernoulli", "onehot")
    detach_discrete = "hard"

    def __init__(self, num_particles=1, vectorize_particles=True, *, temperature=0.5,
                 eta=1.0, adapt=True, vectorize=True):
        owner = type(self).__name__
        adapt = check_bool(owner, "adapt", adapt)
        temperature = check_finite(
            owner, "temperature", temperature, low=TEMPERATURE_MIN,
            hint=f"Below {TEMPERATURE_MIN:g} the relaxation is flat on almost every draw "
            "and the gradient is almost always exactly 0 (its variance grows as "
            "1/temperature; see numpyro_binary_grads.relaxed.TEMPERATURE_MIN).",
        )
        if adapt:
            eta = check_finite(
                owner, "eta", eta, 0.0, 2.0, low_open=True, high_open=True,
                hint="adapt=True keeps eta in (0, 2); pass adapt=False to use a fixed "
                "eta outside that range.",
            )
        else:
            eta = check_finite(owner, "eta", eta)
        self.temperature = temperature
        self.eta = eta
        self.adapt = adapt
        self._discrete = None  # discrete guide site names, found at trace time
        self._psi = None  # {site: (temperature, eta)} of the particle being traced
        super().__init__(num_particles, vectorize_particles, vectorize=vectorize)

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
        parameters (``numpyro.param`` sites named ``_bg_<site>_...``), so that
        ``SVI.init`` collects them and SVI optimizes them with everything
        else. Pass the wrapped guide to SVI (and to this ELBO's ``loss``).
        The guide's discrete sites are found once, by running it blocked and
        seeded, and cached on this ELBO.
        """

        # [(name, kind, event_shape)] of this guide's discrete sites, found on
        # its first call (per wrapped guide: one ELBO may wrap several guides)
        found = []

        @functools.wraps(guide)
        def wrapped(*args, **kwargs):
            self._declare(guide, args, kwargs, found)
            return guide(*args, **kwargs)

        wrapped._bg_elbo = self
        return wrapped

    def _find_sites(self, guide, args, kwargs, found):
        if not found:
            with block(), validation_enabled(False):
                tr = trace(seed(guide, rng_seed=0)).get_trace(*args, **kwargs)
            found.extend(
                (name, _kind(_base_dist(site["fn"])), tuple(site["fn"].event_shape),
                 _logits_dtype(site["fn"]))
                for name, site in tr.items()
                if _is_discrete_latent(site)
            )
        return found

    def _declare(self, guide, args, kwargs, found):
        if not self.adapts:
            return
        for name, kind, event_shape, dtype in self._find_sites(guide, args, kwargs, found):
            self._declare_site(name, kind, event_shape, dtype)

    def _declare_site(self, name, kind, event_shape, dtype=None):
        """Declare site ``name``'s adapted params, in the dtype of its logits."""
        if self.adapt:
            numpyro.param(self.param_name(name, "temperature"),
                          jnp.asarray(self.temperature, dtype),
                          constraint=constraints.greater_than(TEMPERATURE_MIN))
            numpyro.param(self.param_name(name, "eta"), jnp.asarray(self.eta, dtype),
                          constraint=constraints.interval(0.0, 2.0))

    def adapted_names(self):
        """The names of the params trained on the variance gradient."""
        if not self.adapt:
            return []
        return [self.param_name(n, w) for n in self._discrete for w in ("temperature", "eta")]

    def _inspect_guide(self, rng_key, params, guide, args, kwargs):
        """
        Trace the guide abstractly (trace time only): raise for integer
        ``Categorical`` sites and for a missing wrapper; record the discrete
        sites; return the names of the guide's params.
        """
        found = {}

        def fn(key, params):
            tr = trace(seed(substitute(guide, data=params), key)).get_trace(*args, **kwargs)
            found["params"] = [n for n, site in tr.items() if site["type"] == "param"]
            found["sites"] = [
                (n, site["fn"]) for n, site in tr.items() if _is_discrete_latent(site)
            ]
            return jnp.zeros(())

        with validation_enabled(False):
            jax.eval_shape(fn, rng_key, params)
        for name, site_fn in found["sites"]:
            check_one_hot(name, site_fn, type(self).__name__,
                          "evaluates the model at relaxed one-hot values",
                          "RLOO_ELBO, DisARM_ELBO or VIMCO")
            prefix = self.param_name(name, "")
            if self.adapts and not any(n.startswith(prefix) for n in found["params"]):
                raise ValueError(
                    f"{type(self).__name__} adapts parameters of guide site '{name}' "
                    "on the variance gradient, but the guide does not declare them. "
                    "Pass guide = elbo.wrap_guide(guide) to SVI (and to this ELBO), or "
                    "use adapt=False."
                )
        self._discrete = [name for name, _ in found["sites"]]
        return found["params"]

    def _adapted_value(self, param_map, name, what):
        key = self.param_name(name, what)
        if key not in param_map:
            raise ValueError(
                f"{type(self).__name__} reads its adapted parameter '{key}' from the "
                "params it is given, but they lack it. Pass the params of the SVI "
                "state (svi.get_params(state), which holds what elbo.wrap_guide(guide) "
                "declared), or use adapt=False."
            )
        return param_map[key]

    def _read_adapted(self, param_map):
        """This particle's temperature and eta per site, from ``param_map``."""
        psi = {}
        for name in self._discrete:
            if self.adapt:
                psi[name] = (
                    self._adapted_value(param_map, name, "temperature"),
                    self._adapted_value(param_map, name, "eta"),
                )
            else:
                psi[name] = (self.temperature, self.eta)
        self._psi = psi

    # -- mechanism hooks ----------------------------------------------------

    def plan(self, num_sites):
        plan = Plan.relaxed(num_sites)
        plan.value_fn = self._site_value
        return plan

    def _site_value(self, info, u, alpha, hard, code):
        lam = self._psi[info.name][0]
        if isinstance(code, int):
            if code == 0:
                return hard
            return relax(info.kind, perturbed_logits(info.kind, alpha, u, hard, code == 2), lam)
        z = perturbed_logits(info.kind, alpha, u, hard, False)
        zt = perturbed_logits(info.kind, alpha, u, hard, True)
        return jnp.where(code == 0, hard, relax(info.kind, jnp.where(code == 2, zt, z), lam))

    def control_variate(self, info, u, alpha, b, a, c):
        """The learned part :math:`r(z), r(\\tilde z)` of the control variate
        (evaluations ``a`` and ``c``); none for REBAR."""
        return None

    def value_and_surrogate(self, evals, structure):
        f = total_elbo(evals)
        value = f[0]
        surr = value
        live = self.adapts
        for info in structure.discrete.values():
            lam, eta = self._psi[info.name]
            a, c = 2 * info.index + 1, 2 * info.index + 2
            alpha, u, hard = evals.sites[info.name]
            signal = evals.signals[(info.signal_plates, info.signal_ndim)]
            signal = _expand(signal, info.signal_ndim, alpha, info.alpha_event_dim)
            alpha0 = alpha[0]
            b = stop_gradient(_float_value(info, alpha, hard[0]))
            coef = stop_gradient(signal[0]) - eta * (
                signal[c] if live else stop_gradient(signal[c])
            )
            r = self.control_variate(info, u, alpha, b, a, c)
            if r is not None:
                r_z, r_zt = r
                coef = coef - r_zt
                surr = surr + jnp.sum(r_z - r_zt)
            coef = coef * score(info, alpha0, b)
            if live or r is not None:
                surr = surr + jnp.sum((alpha0 - stop_gradient(alpha0)) * coef)
            else:
                surr = surr + jnp.sum(alpha0 * stop_gradient(coef))
            surr = surr + eta * (f[a] - f[c])
        return value, surr

    def _particle_loss(self, rng_key, param_map, model, guide, args, kwargs, noise=None):
        self._read_adapted(param_map)
        try:
            return super()._particle_loss(
                rng_key, param_map, model, guide, args, kwargs, noise=noise
            )
        finally:
            self._psi = None

    # -- the variance gradient ----------------------------------------------

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        """
        As :meth:`SiteELBO.loss_with_mutable_state`; with adapted params in
        ``param_map`` their gradient is the variance gradient (below).
        """
        check_rng_key(type(self).__name__, rng_key)
        guide_params = self._inspect_guide(rng_key, param_map, guide, args, kwargs)
        psi = {n: param_map[n] for n in self.adapted_names() if n in param_map}
        phi = [
            n for n in guide_params
            if not n.startswith("_bg_") and n in param_map and _inexact(param_map[n])
        ]
        if not (psi and phi):
            return super().loss_with_mutable_state(
                rng_key, param_map, model, guide, *args, **kwargs)
        return self._with_variance_gradient(
            rng_key, param_map, psi, phi, model, guide, args, kwargs)

    def _with_variance_gradient(self, rng_key, param_map, psi, phi, model, guide, args, kwargs):
        """
        The loss, equal in value to the estimator's, whose gradient w.r.t. the
        adapted params ``psi`` is the single-sample variance gradient
        :math:`\\nabla_\\psi \\overline{\\hat g_\\phi^2}` (RELAX eq. (6)) and
        w.r.t. every other param :math:`\\theta` the estimator
        :math:`\\hat g_\\theta`. One evaluation serves both:
        :math:`\\hat g = ` ``jax.grad`` of the estimator's loss w.r.t. all
        params but ``psi`` is returned through the surrogate
        :math:`\\theta \\cdot \\mathrm{sg}(\\hat g_\\theta)`, and its mean square
        over the guide's params ``phi`` is differentiated w.r.t. ``psi`` by one
        reverse pass (same key, hence the same noise). (Letting SVI
        differentiate the loss again instead repeats the evaluation and its
        gradient: the REBAR-table SBN step, linear one-layer, batch 24, took
        5.4-5.5 ms instead of 4.1-4.3 ms on one CPU thread.)

        The returned loss is therefore a surrogate in the params only: its
        value and its first derivatives w.r.t. ``param_map`` are exact (what
        SVI uses), but its derivative w.r.t. anything else (the model's
        arguments, say) is 0, and its second derivatives are not the
        estimator's (0 or meaningless). For those, differentiate the loss of
        ``REBAR_ELBO(adapt=False)`` built with the current temperature and eta
        (same value, same gradients w.r.t. every param but the adapted ones).
        """
        base = super().loss_with_mutable_state
        fixed = stop_gradient(param_map)
        rest = {n: v for n, v in param_map.items() if n not in psi and _inexact(v)}

        def loss_and_variance(psi_):
            def loss_of(rest_):
                out = base(rng_key, {**fixed, **rest_, **psi_}, model, guide, *args, **kwargs)
                return out["loss"], out["mutable_state"]

            (loss, state), g = jax.value_and_grad(loss_of, has_aux=True)(stop_gradient(rest))
            leaves = jax.tree.leaves([g[n] for n in phi])
            n = sum(x.size for x in leaves)
            return (loss, sum(jnp.sum(x * x) for x in leaves) / n), (g, state)

        (loss, var), pullback, (g, state) = jax.vjp(
            loss_and_variance, stop_gradient(psi), has_aux=True)
        (dvar,) = pullback((jnp.zeros_like(loss), jnp.ones_like(var)))
        surr = 0.0  # weakly typed: the sum takes the dtype of the parameters
        for params, grads in ((rest, g), (psi, dvar)):
            for p, gp in zip(jax.tree.leaves(params), jax.tree.leaves(grads)):
                surr = surr + jnp.sum(p * stop_gradient(gp))
        return {"loss": stop_gradient(loss) + (surr - stop_gradient(surr)),
                "mutable_state": state}


def _is_discrete_latent(site):
    """A latent, non-reparameterized discrete guide sample site of a kind we know."""
    return (
        site["type"] == "sample"
        and not site.get("is_observed", False)
        and not site["fn"].has_rsample
        and _kind(_base_dist(site["fn"])) is not None
    )


def _logits_dtype(fn):
    """The dtype of a discrete site's logits (or probs)."""
    base = _base_dist(fn)
    x = getattr(base, "logits", None)
    return jnp.result_type(base.probs if x is None else x)


def _inexact(tree):
    return all(jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in jax.tree.leaves(tree))
