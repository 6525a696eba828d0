"""
The broadcasting evaluation path (the fast path): all evaluations of a plan
in one guide and one model execution, vectorized over an *evaluation* dim of
size :math:`E` at ``-(U + 1)``, just left of the user's ``U`` plate dims (and
right of the particle dim when particles are vectorized). Correct for
programs that broadcast over dims left of their plates; whether a program
does is checked first (:mod:`pyro_binary_grads.broadcast`).
"""

from collections import OrderedDict

import torch

import pyro
import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample

from .noise import NoiseMessenger
from .structure import EVAL_PLATE, PARTICLE_PLATE, StructureChanged, site_log_prob, user_frames


class Evaluations:
    """
    The ELBO integrand of one estimator draw on all its evaluations.

    :ivar terms: ``{key: (frame_names, frames, tensor)}``, one scaled and masked
        log-prob term per site (guide terms negated), each of ``L`` batch dims
        with the evaluation dim at ``-(U + 1)``.
    :ivar discrete: ``{name: (alpha, value)}`` of the discrete guide sites,
        with the evaluation dim at ``-(U + 1 + alpha_event_dim)`` in alpha.
    :ivar noise: ``{name: u}``, the uniforms of the discrete sites.
    :ivar present: ``{name: bool tensor}`` for sites that ran in only some
        evaluations (sequential path, dynamic structure): shaped like the
        site's learning signal, true where the site ran.
    """

    def __init__(self, terms, discrete, noise, guide_trace, model_trace, present=None,
                 num_evaluations=1):
        self.num_evaluations = num_evaluations
        self.sequential = False  # set by the sequential path
        self.terms = terms
        self.noise = noise
        self.discrete = discrete
        self.guide_trace = guide_trace
        self.model_trace = model_trace
        self.present = present or {}
        self._groups = None

    def groups(self):
        """``{frame_names: (frames, summed term)}``: the terms summed per plate
        set (computed once, shared by every site's learning signal)."""
        if self._groups is None:
            self._groups = OrderedDict()
            for names, frames, t in self.terms.values():
                if names in self._groups:
                    t = self._groups[names][1] + t
                self._groups[names] = (frames, t)
        return self._groups


def pad(t, L, name):
    """``t`` with exactly ``L`` dims: singleton dims added on the left, or
    extra leading singleton dims (left of the plates, as Pyro accepts them)
    dropped."""
    if t.dim() == L:
        return t
    if t.dim() > L:
        extra = t.shape[: t.dim() - L]
        if any(n != 1 for n in extra):
            raise ValueError(
                f"Site '{name}' has batch shape {tuple(t.shape)} with more dims than "
                f"max_plate_nesting allows; declare its batch dims with pyro.plate, "
                "use .to_event(), or raise max_plate_nesting."
            )
        return t.reshape(t.shape[t.dim() - L :])
    return t.reshape((1,) * (L - t.dim()) + t.shape)


def log_prob_terms(model_trace, guide_trace, L, detach_discrete):
    """One term per sample site of model and guide (guide terms negated, guide
    factors included as in ``Trace_ELBO``), each padded to ``L`` dims."""
    terms = OrderedDict()
    for prefix, trace, sign in (("guide", guide_trace, -1.0), ("model", model_trace, 1.0)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            frames = user_frames(site)
            guide = prefix == "guide"
            lp = site_log_prob(site, detach_discrete and guide, sign, certain=guide)
            if not torch.is_tensor(lp):  # masked out entirely
                continue
            terms[prefix, name] = (frozenset(f.name for f in frames), frames, pad(lp, L, name))
    return terms


def detach_hard(terms, structure, plan, U):
    """Detach the discrete guide sites' log-prob terms on the hard
    evaluations only (``detach_discrete="hard"``: REBAR and RELAX
    differentiate their relaxed evaluations totally)."""
    mask = None
    for key, (names, frames, t) in terms.items():
        if key[0] != "guide" or key[1] not in structure.discrete or not t.requires_grad:
            continue
        if mask is None:
            mask = torch.tensor(plan.hard, device=t.device).reshape((-1,) + (1,) * U)
        terms[key] = (names, frames, torch.where(mask, t.detach(), t))


_WRAPPED = {}


def wrap(fn, E, U, num_particles, particle_dim=None):
    """``fn`` inside the evaluation and particle plates (cached: a plate is
    reusable, and building one costs about as much as a small tensor op)."""
    key = (fn, E, U, num_particles, particle_dim)
    wrapped = _WRAPPED.get(key)
    if wrapped is None:
        if len(_WRAPPED) > 64:
            _WRAPPED.clear()
        wrapped = fn
        if E is not None:
            wrapped = pyro.plate(EVAL_PLATE, E, dim=-(U + 1))(wrapped)
        if num_particles is not None:
            dim = particle_dim if particle_dim is not None else -(U + 2)
            wrapped = pyro.plate(PARTICLE_PLATE, num_particles, dim=dim)(wrapped)
        _WRAPPED[key] = wrapped
    return wrapped


def run_vectorized(model, guide, args, kwargs, structure, plan, U, noise, seed,
                   num_particles=None, check_values=False, detach_discrete=True):
    """All evaluations of ``plan`` in one guide and one model execution.
    Raises :class:`StructureChanged` when the guide's discrete sites are not
    those of ``structure``."""
    E = plan.num_evaluations
    L = U + 1 + (num_particles is not None)
    messenger = NoiseMessenger(structure, plan, U, noise, seed, check_values,
                               shape_key=(E, num_particles))
    with messenger:
        guide_trace = poutine.trace(wrap(guide, E, U, num_particles)).get_trace(*args, **kwargs)
    if messenger._count != structure.num_sites:
        raise StructureChanged(list(structure.discrete)[messenger._count])
    model_trace = poutine.trace(
        poutine.replay(wrap(model, E, U, num_particles), trace=guide_trace)
    ).get_trace(*args, **kwargs)
    if detach_discrete == "hard":
        terms = log_prob_terms(model_trace, guide_trace, L, False)
        detach_hard(terms, structure, plan, U)
    else:
        terms = log_prob_terms(model_trace, guide_trace, L, detach_discrete)
    discrete = OrderedDict(
        (name, (messenger.alphas[name], guide_trace.nodes[name]["value"]))
        for name in structure.discrete
    )
    return Evaluations(terms, discrete, noise, guide_trace, model_trace, num_evaluations=E)
