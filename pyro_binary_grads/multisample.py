"""
Multi-sample (importance-weighted) objectives: the :math:`K`-sample bound

.. math::
    \\mathcal L_K = \\sum_{n} s_P \\log \\frac1K \\sum_{k=1}^K
        \\exp f_{n,k}, \\qquad f_{n,k} = \\log p(x_n, z^k_n) - \\log q(z^k_n \\mid x_n),

with one term per element :math:`n` of the plates :math:`P` common to all
latent sites of the guide (each element has its own :math:`K` samples),
:math:`f_{n,k}` built without :math:`P`'s subsample scales and
:math:`s_P` the product of those scales. Log-prob terms outside :math:`P`
must not depend on the samples; they are added once.

Unlike the single-sample ELBO, the direct term
:math:`\\sum_k \\tilde w_k \\nabla f_k` does not vanish here: the discrete
guide log-probs stay differentiable inside :math:`f`.
"""

import math

import torch

import pyro
import pyro.poutine as poutine
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

from binary_grads_common.arguments import check_count

from . import estimators
from .elbo import SiteELBO
from .plans import Plan
from .signals import score
from .structure import GuideStructure, subsample_scale, user_frames
from .vectorized import run_vectorized


class SampleBound:
    """
    The per-element sample log-weights of a multi-sample objective.

    :ivar f: ``f_{n,k}`` with the evaluation dim at ``-(U + 1)`` and the dims
        of the common plates :math:`P` kept (others summed).
    :ivar scale: :math:`s_P`.
    :ivar outside: the sum of the terms outside :math:`P` (one value per
        particle).
    """

    def __init__(self, evals, structure, U):
        latent_frames = [
            {f.name: f for f in user_frames(site)}
            for name, site in evals.guide_trace.nodes.items()
            if name in structure.discrete or name in structure.num_before
        ]
        common = set(latent_frames[0]) if latent_frames else set()
        for frames in latent_frames[1:]:
            common &= set(frames)
        frames = {n: latent_frames[0][n] for n in common}
        self.scale = math.prod(subsample_scale(f) for f in frames.values())
        edim = -(U + 1)
        keep = {f.dim for f in frames.values()}
        self.f, self.outside = 0.0, 0.0
        for (side, name), (names, site_frames, t) in evals.terms.items():
            for frame in site_frames:
                if subsample_scale(frame) != 1.0 and frame.name not in common:
                    raise NotImplementedError(
                        f"The {side} site '{name}' is in the subsampled plate "
                        f"'{frame.name}', which not every latent site is in; the "
                        "K-sample bound is only defined for subsampling of the plates "
                        f"common to all latent sites ({sorted(common)})."
                    )
            dims = [t.dim() + d for d in range(-U, 0) if d not in keep]
            if common <= names:
                if dims:
                    t = t.sum(dims, keepdim=True)
                self.f = self.f + t / self.scale
                continue
            t0 = t.narrow(edim, 0, 1)
            if t.shape[edim] > 1 and not torch.equal(t.detach(), t0.detach().expand_as(t)):
                raise ValueError(
                    f"The {side} site '{name}' is outside the plates {sorted(common)} "
                    "common to all latent sites, and its log-prob depends on the "
                    "samples; the per-element K-sample bound is not defined for it. "
                    "Put the site inside those plates, or the latent sites outside."
                )
            self.outside = self.outside + _sum_right(t0, U + 1)
        if not torch.is_tensor(self.f):  # no sample site: f = 0 in every sample
            self.f = torch.zeros((evals.num_evaluations,) + (1,) * U)

    def bound(self, f, U):
        """:math:`\\sum_n s_P \\log \\frac1K \\sum_k e^{f_{n,k}}` + outside terms,
        one value per particle."""
        edim = -(U + 1)
        K = f.shape[edim]
        lme = torch.logsumexp(f, edim, keepdim=True) - math.log(K)
        return self.scale * _sum_right(lme, U + 1) + self.outside


def _sum_right(t, n):
    """Sum the rightmost ``n`` dims (keeping any particle dim)."""
    if not torch.is_tensor(t):
        return t
    return t.sum(tuple(range(t.dim() - n, t.dim()))) if t.dim() >= n else t.sum()


def leave_one_out_geometric(f, dim):
    """
    VIMCO's leave-one-out bounds (Mnih & Rezende 2016, Sec. 3):
    :math:`\\hat{\\mathcal L}_{-k} = \\log \\frac1K \\big(\\sum_{j \\ne k} e^{f_j}
    + \\exp \\frac{1}{K-1} \\sum_{j \\ne k} f_j\\big)`, for every :math:`k`.
    """
    K = f.shape[dim]
    f = f.movedim(dim, -1)
    others = (f.sum(-1, keepdim=True) - f) / (K - 1)
    eye = torch.eye(K, dtype=torch.bool, device=f.device)
    # matrix[..., k, j] = f_j, with f_k replaced by the mean of the others
    matrix = torch.where(eye, others.unsqueeze(-1), f.unsqueeze(-2))
    return (torch.logsumexp(matrix, -1) - math.log(K)).movedim(-1, dim)


def replace_one(f, f_tilde, dim):
    """:math:`\\mathcal L^{(k)}`: the bound with sample :math:`k` of ``f``
    replaced by sample :math:`k` of ``f_tilde``, for every :math:`k`."""
    K = f.shape[dim]
    f, f_tilde = f.movedim(dim, -1), f_tilde.movedim(dim, -1)
    eye = torch.eye(K, dtype=torch.bool, device=f.device)
    matrix = torch.where(eye, f_tilde.unsqueeze(-1), f.unsqueeze(-2))
    return (torch.logsumexp(matrix, -1) - math.log(K)).movedim(-1, dim)


class _MultiSampleELBO(SiteELBO):
    """Multi-sample objectives keep the discrete guide log-probs in ``f``."""

    detach_discrete = False


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
    ``OneHotCategorical`` sites, multi-layer guides (the score of a chain
    sums its layers' scores) and reparameterized sites (pathwise gradients
    of the bound). Each element of the plates common to all latent sites
    has its own :math:`K` samples and signals.

    Example::

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), VIMCO(num_samples=4))

    :param int num_samples: :math:`K \\ge 2`.

    Other parameters as :class:`~pyro_binary_grads.ARM_ELBO`;
    ``num_particles`` averages independent replicates of the whole estimator.

    [1] Andriy Mnih, Danilo J. Rezende, "Variational Inference for Monte
        Carlo Objectives", ICML 2016.
    """

    supports = (Bernoulli, Categorical, OneHotCategorical)

    def __init__(self, num_particles=1, max_plate_nesting=float("inf"),
                 vectorize_particles=False, *, num_samples=2, vectorize=True, **kwargs):
        self.num_samples = check_count("VIMCO", "num_samples", num_samples, minimum=2)
        super().__init__(num_particles, max_plate_nesting, vectorize_particles,
                         vectorize=vectorize, **kwargs)

    def plan(self, num_sites):
        return Plan.independent(self.num_samples, num_sites)

    def value_and_surrogate(self, evals, structure, U):
        sb = SampleBound(evals, structure, U)
        edim = -(U + 1)
        bound = sb.bound(sb.f, U)
        num_particles = bound.numel()
        f = sb.f.detach()
        L = torch.logsumexp(f, edim, keepdim=True) - math.log(f.shape[edim])
        c = sb.scale * (L - leave_one_out_geometric(f, edim)) / num_particles
        surr = bound.mean()
        for info in structure.discrete.values():
            alpha, value = evals.discrete[info.name]
            present = evals.present.get(info.name)
            ci = c if present is None else c * present
            ci = ci.reshape(ci.shape + (1,) * info.alpha_event_dim)
            surr = surr + (alpha * (ci * score(info, alpha, value))).sum()
        return bound.mean(), surr


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

    Other parameters as :class:`~pyro_binary_grads.ARM_ELBO`.

    [1] Zhe Dong, Andriy Mnih, George Tucker, "DisARM: An Antithetic Gradient
        Estimator for Binary Latent Variables", NeurIPS 2020.
    """

    dynamic_structure = False

    def __init__(self, num_particles=1, max_plate_nesting=float("inf"),
                 vectorize_particles=False, *, num_pairs=1, vectorize=True, **kwargs):
        self.num_pairs = check_count("LocalDisARM_IWAE", "num_pairs", num_pairs)
        super().__init__(num_particles, max_plate_nesting, vectorize_particles,
                         vectorize=vectorize, **kwargs)

    def plan(self, num_sites):
        if num_sites > 1:
            names = list(self._structure.discrete)
            raise NotImplementedError(
                f"LocalDisARM_IWAE is defined for one stochastic layer, but the guide "
                f"has {num_sites} discrete sites {names}. Use VIMCO for multi-layer "
                "guides, or make the layer one site."
            )
        return Plan.antithetic_pairs(self.num_pairs, num_sites)

    def value_and_surrogate(self, evals, structure, U):
        sb = SampleBound(evals, structure, U)
        edim = -(U + 1)
        f_b, f_bt = _split_pairs(sb.f, edim)
        bound = sb.bound(f_b, U)
        num_particles = bound.numel()
        f_b, f_bt = f_b.detach(), f_bt.detach()
        L = torch.logsumexp(f_b, edim, keepdim=True) - math.log(f_b.shape[edim])
        if not structure.discrete:  # nothing to estimate
            return bound.mean(), bound.mean()
        L_k = replace_one(f_b, f_bt, edim)
        (info,) = structure.discrete.values()
        alpha, value = evals.discrete[info.name]
        d = edim - info.event_dim
        a_b, _ = _split_pairs(alpha, d)
        b, bt = _split_pairs(value, d)
        pad = (1,) * info.event_dim
        g = estimators.disarm(
            (sb.scale * L).reshape(L.shape + pad), (sb.scale * L_k).reshape(L_k.shape + pad),
            b, bt, a_b.detach(),
        )
        surr = bound.mean() + (a_b * g).sum() / num_particles
        return bound.mean(), surr


def _split_pairs(t, dim):
    """Evaluations ``0, 2, 4, ...`` and ``1, 3, 5, ...`` along ``dim``."""
    shape = t.shape
    dim = dim % t.dim()
    t = t.reshape(shape[:dim] + (shape[dim] // 2, 2) + shape[dim + 1 :])
    return t.select(dim + 1, 0), t.select(dim + 1, 1)


def iwae_bound(model, guide, *args, num_samples=100, chunk_size=10,
               max_plate_nesting=None, **kwargs):
    """
    The :math:`K`-sample importance-weighted bound :math:`\\mathcal L_K`
    (see the module docstring) of a model and guide, for evaluation (no
    gradients). The samples run vectorized, ``chunk_size`` at a time, and are
    combined exactly (log-sum-exp over chunks), so memory is that of
    ``chunk_size`` samples.

    :param int num_samples: :math:`K`; the papers report :math:`K = 100`.
    :param int max_plate_nesting: guessed from a first run if not given.
    :returns: the bound, a float.
    """
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        if max_plate_nesting is None:
            dims = [
                f.dim
                for trace in (model_trace, guide_trace)
                for site in trace.nodes.values()
                if site["type"] == "sample"
                for f in user_frames(site)
                if f.dim is not None
            ]
            max_plate_nesting = -min(dims) if dims else 0
        U = max_plate_nesting
        structure = GuideStructure(
            model_trace, guide_trace, "iwae_bound", (Bernoulli, Categorical, OneHotCategorical)
        )
        edim = -(U + 1)
        total, done = None, 0
        with pyro.validation_enabled(False):
            while done < num_samples:
                k = min(chunk_size, num_samples - done)
                plan = Plan.independent(k, structure.num_sites)
                seed = int(torch.randint(0, 2**62, ()).item())
                evals = run_vectorized(model, guide, args, kwargs, structure, plan, U, {},
                                       seed, detach_discrete=False)
                sb = SampleBound(evals, structure, U)
                lse = torch.logsumexp(sb.f, edim, keepdim=True)
                total = lse if total is None else torch.logaddexp(total, lse)
                done += k
        lme = total - math.log(num_samples)
        return (sb.scale * _sum_right(lme, U + 1) + sb.outside).item()
