"""
Multi-sample (importance-weighted) objectives: the :math:`K`-sample bound

.. math::
    \\mathcal L_K = \\sum_{n} s_P \\log \\frac1K \\sum_{k=1}^K
        \\exp f_{n,k}, \\qquad f_{n,k} = \\log p(x_n, z^k_n) - \\log q(z^k_n \\mid x_n),

with one term per element :math:`n` of the plates :math:`P` common to all
latent sites of the guide (each element has its own :math:`K` samples),
:math:`f_{n,k}` built without :math:`P`'s subsample scales and
:math:`s_P` the product of those scales. Log-prob terms outside :math:`P`
must not depend on the samples; they are added once (checked at trace time:
such a term must not depend on the evaluation index under ``jax.vmap``).
Subsampling a plate other than those of :math:`P` raises.

Unlike the single-sample ELBO, the direct term
:math:`\\sum_k \\tilde w_k \\nabla f_k` does not vanish here: the discrete
guide log-probs stay differentiable inside :math:`f`.
"""

import math

import jax
from jax import random
from jax.lax import stop_gradient
import jax.numpy as jnp
import numpy as np

from numpyro.distributions.distribution import validation_enabled

from . import estimators
from . import sites as _sites
from .arguments import check_count
from .elbo import SiteELBO
from .sites import Plan, _expand, _float_value, score

__all__ = [
    "LocalDisARM_IWAE",
    "SampleBound",
    "VIMCO",
    "iwae_bound",
    "leave_one_out_geometric",
    "replace_one",
]


class SampleBound:
    """
    The per-element sample log-weights of a multi-sample objective.

    :ivar f: ``f_{n,k}``, shape ``(K, *common_plate_layout)`` (sample dim
        first, the dims of the common plates :math:`P` kept, right-aligned;
        others summed), without :math:`P`'s subsample scale.
    :ivar scale: :math:`s_P`.
    :ivar outside: the sum of the terms outside :math:`P` (a scalar).
    """

    def __init__(self, evals, structure):
        self.f = evals.bound
        self.scale = structure.common_scale
        self.outside = evals.outside
        self.ndim = structure.common_ndim

    def bound(self, f):
        """:math:`\\sum_n s_P \\log \\frac1K \\sum_k e^{f_{n,k}}` + outside terms."""
        K = f.shape[0]
        lme = jax.nn.logsumexp(f, 0) - math.log(K)
        return self.scale * jnp.sum(lme) + self.outside


def leave_one_out_geometric(f, axis):
    """
    VIMCO's leave-one-out bounds (Mnih & Rezende 2016, Sec. 3):
    :math:`\\hat{\\mathcal L}_{-k} = \\log \\frac1K \\big(\\sum_{j \\ne k} e^{f_j}
    + \\exp \\frac{1}{K-1} \\sum_{j \\ne k} f_j\\big)`, for every :math:`k`.
    """
    K = f.shape[axis]
    f = jnp.moveaxis(f, axis, -1)
    others = (jnp.sum(f, -1, keepdims=True) - f) / (K - 1)
    eye = jnp.eye(K, dtype=bool)
    # matrix[..., k, j] = f_j, with f_k replaced by the mean of the others
    matrix = jnp.where(eye, others[..., None], f[..., None, :])
    return jnp.moveaxis(jax.nn.logsumexp(matrix, -1) - math.log(K), -1, axis)


def replace_one(f, f_tilde, axis):
    """:math:`\\mathcal L^{(k)}`: the bound with sample :math:`k` of ``f``
    replaced by sample :math:`k` of ``f_tilde``, for every :math:`k`."""
    K = f.shape[axis]
    f, f_tilde = jnp.moveaxis(f, axis, -1), jnp.moveaxis(f_tilde, axis, -1)
    eye = jnp.eye(K, dtype=bool)
    matrix = jnp.where(eye, f_tilde[..., None], f[..., None, :])
    return jnp.moveaxis(jax.nn.logsumexp(matrix, -1) - math.log(K), -1, axis)


class _MultiSampleELBO(SiteELBO):
    """Multi-sample objectives keep the discrete guide log-probs in ``f``."""

    detach_discrete = False
    _signals = False
    _bound = True


class VIMCO(_MultiSampleELBO):
    """
    The :math:`K`-sample importance-weighted bound, with gradients of its
    discrete guide sites estimated by VIMCO [1] (Sec. 3):

    .. math::
        \\hat g = \\sum_k \\big(\\mathcal L_K - \\hat{\\mathcal L}_{-k}\\big)
            \\nabla_\\phi \\log q_\\phi(b^k) + \\sum_k \\tilde w_k \\nabla_\\phi f_k,

    where :math:`\\hat{\\mathcal L}_{-k}` replaces :math:`f_k` by the mean of the
    other samples' log-weights (the leave-one-out geometric-mean baseline)
    and :math:`\\tilde w = \\mathrm{softmax}(f)`. The value is the bound
    :math:`\\mathcal L_K` itself. Handles ``Bernoulli``, ``Categorical`` and
    :class:`~numpyro_binary_grads.OneHotCategorical` sites, multi-layer
    guides (the score of a chain sums its layers' scores) and
    reparameterized sites (pathwise gradients of the bound, each sample with
    its own continuous draws). Each element of the plates common to all
    latent sites has its own :math:`K` samples and signals (module
    docstring of :mod:`numpyro_binary_grads.multisample`).

    Example::

        svi = SVI(model, guide, optax.adam(1e-3), VIMCO(num_samples=4))

    :param int num_samples: :math:`K \\ge 2`.

    Other parameters as :class:`~numpyro_binary_grads.ARM_ELBO`;
    ``num_particles`` averages independent replicates of the whole estimator.

    [1] Andriy Mnih, Danilo J. Rezende, "Variational Inference for Monte
        Carlo Objectives", ICML 2016.
    """

    supports = ("bernoulli", "categorical", "onehot")

    def __init__(self, num_particles=1, vectorize_particles=True, *, num_samples=2,
                 vectorize=True):
        self.num_samples = check_count("VIMCO", "num_samples", num_samples, 2)
        super().__init__(num_particles, vectorize_particles, vectorize=vectorize)

    def plan(self, num_sites):
        return Plan.independent(self.num_samples, num_sites)

    def value_and_surrogate(self, evals, structure):
        sb = SampleBound(evals, structure)
        bound = sb.bound(sb.f)
        f = stop_gradient(sb.f)
        L = jax.nn.logsumexp(f, 0, keepdims=True) - math.log(f.shape[0])
        c = sb.scale * (L - leave_one_out_geometric(f, 0))
        surr = bound
        for info in structure.discrete.values():
            alpha, _, value = evals.sites[info.name]
            ci = _expand(c, sb.ndim, alpha, info.alpha_event_dim)
            surr = surr + jnp.sum(alpha * stop_gradient(ci * score(info, alpha, value)))
        return bound, surr


class LocalDisARM_IWAE(_MultiSampleELBO):
    """
    The :math:`P`-sample importance-weighted bound, with gradients of its
    Bernoulli guide site estimated by local DisARM [1] (the multi-sample
    section): :math:`P` independent antithetic pairs
    :math:`(b^k, \\tilde b^k)`, the bound :math:`\\mathcal L_P` on
    :math:`b^{1:P}` and, for each :math:`k`, the bound
    :math:`\\mathcal L^{(k)}` with :math:`b^k` replaced by :math:`\\tilde b^k`:

    .. math::
        \\hat g_i = \\sum_k \\tfrac12\\big(\\mathcal L_P - \\mathcal L^{(k)}\\big)
            (-1)^{\\tilde b^k_i} 1[b^k_i \\ne \\tilde b^k_i]\\,\\sigma(|\\alpha_i|)
            + \\sum_k \\tilde w_k \\nabla_\\alpha f(b^k).

    :math:`2P` evaluations, the budget of :class:`VIMCO` with
    :math:`K = 2P` (how the paper compares them). The value and the model
    gradients are those of :math:`\\mathcal L_P` on :math:`b^{1:P}`. Defined
    for one stochastic layer: a guide with more than one discrete site is
    refused (use :class:`VIMCO`).

    :param int num_pairs: :math:`P \\ge 1`.

    Other parameters as :class:`~numpyro_binary_grads.ARM_ELBO`.

    [1] Zhe Dong, Andriy Mnih, George Tucker, "DisARM: An Antithetic Gradient
        Estimator for Binary Latent Variables", NeurIPS 2020.
    """

    def __init__(self, num_particles=1, vectorize_particles=True, *, num_pairs=1,
                 vectorize=True):
        self.num_pairs = check_count("LocalDisARM_IWAE", "num_pairs", num_pairs, 1)
        super().__init__(num_particles, vectorize_particles, vectorize=vectorize)

    def plan(self, num_sites):
        if num_sites != 1:
            names = list(self._structure.discrete)
            raise NotImplementedError(
                f"LocalDisARM_IWAE is defined for one stochastic layer, but the guide "
                f"has {num_sites} discrete sites {names}. Use VIMCO for multi-layer "
                "guides, or make the layer one site."
            )
        return Plan.antithetic_pairs(self.num_pairs, num_sites)

    def value_and_surrogate(self, evals, structure):
        sb = SampleBound(evals, structure)
        f_b, f_bt = sb.f[0::2], sb.f[1::2]
        bound = sb.bound(f_b)
        f_b, f_bt = stop_gradient(f_b), stop_gradient(f_bt)
        L = jax.nn.logsumexp(f_b, 0, keepdims=True) - math.log(f_b.shape[0])
        L_k = replace_one(f_b, f_bt, 0)
        (info,) = structure.discrete.values()
        alpha, _, value = evals.sites[info.name]
        a_b = alpha[0::2]
        b = _float_value(info, alpha, value[0::2])
        bt = _float_value(info, alpha, value[1::2])
        g = estimators.disarm(
            _expand(sb.scale * L, sb.ndim, a_b, info.alpha_event_dim),
            _expand(sb.scale * L_k, sb.ndim, a_b, info.alpha_event_dim),
            b, bt, stop_gradient(a_b),
        )
        return bound, bound + jnp.sum(a_b * stop_gradient(g))


# ---------------------------------------------------------------------------
# evaluation: the K-sample bound
# ---------------------------------------------------------------------------


def iwae_bound(rng_key, params, model, guide, *args, num_samples=100, chunk_size=10,
               max_plate_nesting=None, **kwargs):
    """
    The :math:`K`-sample importance-weighted bound :math:`\\mathcal L_K`
    (see the module docstring) of a model and guide at ``params``, for
    evaluation (its gradient is not an estimator of anything useful). The
    samples run vectorized (``jax.vmap``), ``chunk_size`` at a time under
    ``jax.lax.map``, and are combined exactly (log-sum-exp over chunks), so
    memory is that of ``chunk_size`` samples; the last chunk is padded and
    its extra samples masked out.

    The signature follows NumPyro's utilities such as
    :func:`numpyro.infer.util.log_likelihood`: key and parameters first::

        params = svi.get_params(state)
        bound = iwae_bound(jax.random.PRNGKey(1), params, model, guide, x_test,
                           num_samples=100)

    Called outside a JAX transformation it compiles itself (once per model,
    guide, ``num_samples``, ``chunk_size`` and non-array arguments, cached);
    inside ``jit`` / ``vmap`` it is traced like any JAX function.

    :param rng_key: a JAX random key.
    :param dict params: parameter values keyed by site name (e.g.
        ``svi.get_params(state)``), substituted into model and guide.
    :param int num_samples: :math:`K`; the papers report :math:`K = 100`.
    :param int chunk_size: samples per vectorized chunk.
    :param max_plate_nesting: accepted for parity with the Pyro package;
        unused (NumPyro needs no dim bookkeeping here).
    :returns: the bound, a scalar JAX array.
    """
    del max_plate_nesting
    num_samples = check_count("iwae_bound", "num_samples", num_samples, 1)
    chunk_size = min(check_count("iwae_bound", "chunk_size", chunk_size, 1), num_samples)
    if rng_key is None:
        raise TypeError("iwae_bound needs an rng_key, got None; pass e.g. "
                        "jax.random.PRNGKey(0).")
    leaves, treedef = jax.tree.flatten((args, kwargs))
    dynamic = [isinstance(x, (jax.Array, np.ndarray, np.generic, float)) for x in leaves]
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((rng_key, params)))
    static = tuple(None if d else x for x, d in zip(leaves, dynamic))
    try:
        cache_key = (model, guide, num_samples, chunk_size, treedef, tuple(dynamic), static)
        hash(cache_key)
    except TypeError:
        cache_key = None
    if traced or cache_key is None:
        return _iwae_bound(rng_key, params, model, guide, args, kwargs, num_samples,
                           chunk_size)
    fn = _IWAE_CACHE.get(cache_key)
    if fn is None:
        if len(_IWAE_CACHE) > 32:
            _IWAE_CACHE.clear()

        def run(rng_key, params, dyn):
            it = iter(dyn)
            full = [next(it) if d else x for x, d in zip(static, dynamic)]
            a, kw = jax.tree.unflatten(treedef, full)
            return _iwae_bound(rng_key, params, model, guide, a, kw, num_samples, chunk_size)

        fn = _IWAE_CACHE[cache_key] = jax.jit(run)
    return fn(rng_key, params, [x for x, d in zip(leaves, dynamic) if d])


_IWAE_CACHE = {}
_ALL_KINDS = ("bernoulli", "categorical", "onehot")


def _iwae_bound(rng_key, params, model, guide, args, kwargs, num_samples, chunk_size):
    structure = _sites.discover(rng_key, params, model, guide, args, kwargs,
                                owner="iwae_bound", warned=set(), supports=_ALL_KINDS)
    plan = Plan.independent(chunk_size, structure.num_sites)
    num_chunks = -(-num_samples // chunk_size)

    def chunk(i):
        evals = _sites.run_evaluations(
            random.fold_in(rng_key, i), params, model, guide, args, kwargs,
            structure=structure, plan=plan, owner="iwae_bound", supports=_ALL_KINDS,
            detach_discrete=False, signals=False, bound=True,
        )
        index = i * chunk_size + jnp.arange(chunk_size)
        index = jnp.reshape(index, (chunk_size,) + (1,) * structure.common_ndim)
        f = jnp.where(index < num_samples, evals.bound, -jnp.inf)
        return jax.nn.logsumexp(f, 0), evals.outside

    with validation_enabled(False):
        lse, outside = jax.lax.map(chunk, jnp.arange(num_chunks))
    lme = jax.nn.logsumexp(lse, 0) - math.log(num_samples)
    return structure.common_scale * jnp.sum(lme) + outside[0]
