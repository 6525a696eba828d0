"""
The noise of the discrete guide sites: the mechanism draws every site's
uniforms :math:`u` itself (keyed by site name, so that every evaluation of a
draw, vectorized or not, sees the same :math:`u`) and sets the value from
:math:`u` and the logits :math:`\\alpha` the guide passes:
:math:`b = 1[u < \\sigma(\\alpha)]`, its antithetic
:math:`\\tilde b = 1[1 - u < \\sigma(\\alpha)]`, a Gumbel-argmax or stick-breaking
class (categorical sites), or an estimator's relaxed value.
"""

import math
import zlib

import torch
import torch.nn.functional as F

from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

from binary_grads_common.logits import bad_logits_message

from .estimators import antithetic_value, bernoulli_value, pair_value, stick_breaking_value
from .structure import StructureChanged, compact, site_logits

_GENERATORS = {}


def _generator(device):
    """One reusable generator per device (reseeded for every site and draw)."""
    gen = _GENERATORS.get(device)
    if gen is None:
        gen = _GENERATORS[device] = torch.Generator(device=device)
    return gen


def site_seed(seed, name, index):
    """The seed of a site's noise in one draw: from its position among the
    cached structure's discrete sites, or from its name for a site found
    only in this draw."""
    if index is None:
        index = 1000 + zlib.crc32(name.encode())
    return (seed + 7919 * (index + 1)) % (2**62)


def uniform(noise, name, index, seed, shape, alpha):
    """The uniforms of site ``name`` of ``shape`` (drawn once per draw and
    kept in ``noise``; a user-given entry is used as is)."""
    u = noise.get(name)
    if u is None:
        if seed is None:  # compiled classes: the global RNG, so that the trace keeps the draw
            u = torch.rand(shape, dtype=alpha.dtype, device=alpha.device)
        else:
            gen = _generator(alpha.device)
            gen.manual_seed(site_seed(seed, name, index))
            u = torch.rand(shape, generator=gen, dtype=alpha.dtype, device=alpha.device)
        # keep u in (0, 1): the logit and Gumbel transforms stay finite
        u = u.clamp(min=torch.finfo(u.dtype).tiny)
        noise[name] = u
    elif u.numel() != math.prod(shape):
        raise ValueError(
            f"Noise for site '{name}' has shape {tuple(u.shape)}, expected {tuple(shape)}."
        )
    return u.reshape(shape)


def check_logits(name, alpha):
    if not torch.isfinite(compact(alpha)).all():
        raise ValueError(bad_logits_message(name))


def categorical_value(u, alpha, one_hot):
    """Gumbel-argmax: ``argmax(alpha - log(-log u))``."""
    z = (alpha - torch.log(-torch.log(u))).argmax(-1)
    return F.one_hot(z, alpha.shape[-1]).to(alpha.dtype) if one_hot else z


def hard_value(info, plan, u, alpha, flip, flips_any=True):
    """A site's hard value from its noise: ``flip`` (a bool or a bool tensor
    over the evaluation dim) takes the antithetic value."""
    if info.kind == "bernoulli":
        if isinstance(flip, bool):
            return (antithetic_value if flip else bernoulli_value)(u, alpha)
        if not flips_any:
            return bernoulli_value(u, alpha)
        return pair_value(u, compact(alpha), flip)
    if plan.stick_breaking:
        z = stick_breaking_value(u, alpha, flip)
        if info.kind == "onehot":
            return F.one_hot(z, alpha.shape[-1]).to(alpha.dtype)
        return z
    return categorical_value(u, alpha, info.kind == "onehot")


class NoiseMessenger(Messenger):
    """
    Owns the noise of the discrete guide sites of one vectorized estimator
    draw: all evaluations of ``plan`` at once, over the evaluation dim at
    ``-(U + 1)``.

    Enter it outside the evaluation and particle plates so that ``msg["fn"]``
    is seen after broadcasting. It sets ``msg["value"]`` only, so the sites
    stay latent and replayable. A discrete site that the cached ``structure``
    does not have (or has at another position or shape) raises
    :class:`~pyro_binary_grads.structure.StructureChanged`.

    :param structure: the :class:`~pyro_binary_grads.structure.GuideStructure`.
    :param plan: the :class:`~pyro_binary_grads.plans.Plan` of evaluations.
    :param int plate_nesting: the user's ``max_plate_nesting`` U.
    :param dict noise: site name -> uniforms of shape ``alpha.shape`` with
        ``plan.num_draws`` at the evaluation dim; filled on first use.
    """

    def __init__(self, structure, plan, plate_nesting, noise, seed, check_values=False,
                 shape_key=None):
        super().__init__()
        self.shape_key = shape_key
        self.structure = structure
        self.plan = plan
        self.plate_nesting = plate_nesting
        self.noise = noise
        self.seed = seed
        self.check_values = check_values
        self._count = 0
        self.alphas = {}  # site name -> the logits seen (after broadcasting)

    def _pyro_sample(self, msg):
        if msg["is_observed"] or isinstance(msg["fn"], _Subsample):
            return
        name = msg["name"]
        info = self.structure.discrete.get(name)
        if info is None:
            if name not in self.structure.num_before:
                raise StructureChanged(name)
            return
        if info.index != self._count:
            raise StructureChanged(name)
        self._count += 1
        alpha = self.alphas[name] = site_logits(msg["fn"])
        seen = info.shapes.setdefault(self.shape_key, alpha.shape)
        if seen != alpha.shape:
            raise StructureChanged(name)
        if self.check_values:
            check_logits(name, alpha)
        U, plan = self.plate_nesting, self.plan
        edim = alpha.dim() - info.alpha_event_dim - (U + 1)
        if edim < 0:
            raise StructureChanged(name)
        shape = alpha.shape[:edim] + (plan.num_draws,) + alpha.shape[edim + 1 :]
        u = uniform(self.noise, name, info.index, self.seed, shape, alpha)
        if plan.num_draws > 1:
            u = u.index_select(edim, plan.tensors(alpha.device)[0])
        flip, relax = plan.site_tensors(info.index, alpha.dim() - edim - 1, alpha.device)
        value = hard_value(info, plan, u, alpha, flip, plan.flips_any(info.index))
        if plan.value_fn is not None:
            value = plan.value_fn(info, u, alpha, value, relax)
        msg["value"] = value

    def _pyro_post_sample(self, msg):
        """Copy the base slices of non-discrete latent sites into the
        evaluations whose changed site comes later (DESIGN.md trap 3)."""
        if (
            msg["is_observed"]
            or isinstance(msg["fn"], _Subsample)
            or msg["name"] in self.structure.discrete
        ):
            return
        index = self.plan.copy_index(self.structure.num_before[msg["name"]])
        if index == list(range(len(index))):
            return
        value = msg["value"]
        edim = value.dim() - msg["fn"].event_dim - (self.plate_nesting + 1)
        msg["value"] = value.index_select(edim, torch.tensor(index, device=value.device))
