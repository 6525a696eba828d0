r"""
The sequential evaluation path: the evaluations of a plan one after the
other, each an ordinary (unbatched) run of guide and model with the same
noise. Correct for every program ``Trace_ELBO`` accepts, including those that
do not broadcast over dims left of their plates (``b.sum()``,
``.view(n, -1)``, ``torch.mm``) and those whose discrete sites differ between
draws (``if b.item():``, AIR's ``z_pres`` loop, sequential subsampled plates).

Evaluation 0 is the base path; it fixes this draw's discrete sites
:math:`1..T` in execution order, and the plan of the other evaluations is the
estimator's plan for that :math:`T`. Noise is keyed by site name, so a site
that runs in several evaluations sees the same :math:`u` (common random
numbers); a site that runs only in some evaluations has its log-prob terms in
those only (a site that did not run contributes nothing to :math:`f`) and is
marked present there. Every latent site that runs before an evaluation's
first changed (flipped or relaxed) discrete site takes its value from the
base evaluation of the same noise draw (DESIGN.md trap 3); subsample sites
come from evaluation 0, so all evaluations share one minibatch.

With :data:`SHARE_CONTINUOUS_NOISE` (off by default) a reparameterized
(continuous) guide site after a changed site is drawn again, at its new
parameters, from **the same base noise** as in the other
evaluations of its noise draw (common random numbers, as for the discrete
sites): its ``rsample`` runs with torch's generator seeded from the draw's
seed, the site's name and the noise draw ``source[e]``, so a Normal site
gives :math:`z_e = \mu_e + \sigma_e \varepsilon` with one
:math:`\varepsilon` for all evaluations of the draw. This keeps every
estimator unbiased: the seed is random, so each evaluation's value is
marginally distributed as the guide given the discrete values, and its noise
is independent of the discrete sites' uniforms (another seed); the pair
estimators are linear in :math:`f` of each evaluation, so
:math:`E[f(\tilde b, z(\varepsilon, \tilde b)) \mid u] = E_{z \mid \tilde b} f`
whether or not :math:`\varepsilon` is shared. Independent draws (RLOO,
VIMCO: different ``source``) keep independent noise, as their objective
needs. Sharing lowers the variance of the difference
:math:`f(b) - f(\tilde b)`, so of the discrete logits' gradient, but raises
that of the pathwise part (the evaluations' pathwise terms become
correlated) and costs a seeded RNG fork per site and evaluation: measured
on ``tests/pyro/test_unchanged_programs.py::discrete_then_continuous``, the
logit's gradient variance falls 8.9x, the location parameter's rises
1.9x (the scale-like one's is unchanged), a step costs ~1.6x. Hence off by default (each evaluation after a
change draws fresh noise, as the vectorized path does).

The particle plate, when particles are vectorized, sits at ``-(U + 1)`` as
in ``Trace_ELBO``, so programs that assert their shapes see the shapes they
expect.
"""

from collections import OrderedDict

import torch

from .noise import site_seed

import pyro.poutine as poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

from .noise import check_logits, hard_value, uniform
from .structure import (GuideStructure, SiteInfo, is_discrete_latent, preserved_rng, site_logits,
                        user_frames)
from .vectorized import Evaluations, log_prob_terms, pad, wrap


#: share the base noise of reparameterized guide sites between the
#: evaluations of a noise draw (off: fresh noise after a change; see above)
SHARE_CONTINUOUS_NOISE = False


def _shared_rsample(fn, msg, seed):
    """``fn``'s reparameterized sample with torch's generator(s) seeded by
    ``seed``; the global RNG state is left as it was."""
    with preserved_rng():
        torch.manual_seed(seed)
        return fn(*msg["args"], **msg["kwargs"])


class SequentialNoise(Messenger):
    """The noise handler of one evaluation ``e`` of a sequential draw."""

    def __init__(self, draw, e):
        super().__init__()
        self.draw = draw
        self.e = e
        self.changed = False
        self.alphas = {}

    def _pyro_sample(self, msg):
        draw, e = self.draw, self.e
        name, fn = msg["name"], msg["fn"]
        if isinstance(fn, _Subsample):
            if e > 0 and name in draw.traces[0].nodes:
                msg["value"] = draw.traces[0].nodes[name]["value"]
            return
        if msg["is_observed"]:
            return
        if not is_discrete_latent(msg):
            base = draw.plan.base[e]
            if not self.changed and base != e and name in draw.traces[base].nodes:
                msg["value"] = draw.traces[base].nodes[name]["value"]
            elif SHARE_CONTINUOUS_NOISE and draw.seed is not None \
                    and getattr(fn, "has_rsample", False) and msg["value"] is None:
                source = draw.plan.source[e]
                seed = site_seed(draw.seed, f"{name}\x00continuous\x00{source}", None)
                msg["value"] = _shared_rsample(fn, msg, seed)
            return
        info = draw.infos.get(name)
        if info is None:
            info = draw.infos[name] = SiteInfo(name, len(draw.infos), user_frames(msg), fn)
        alpha = self.alphas[name] = site_logits(fn)
        if draw.check_values:
            check_logits(name, alpha)
        plan, j = draw.plan, info.index
        flip = bool(plan.flips[e][j]) if j < draw.T else False
        relax = plan.relax[e][j] if j < draw.T else 0
        u = self._noise(info, alpha)
        value = hard_value(info, plan, u, alpha, flip)
        if plan.value_fn is not None:
            value = plan.value_fn(info, u, alpha, value, relax)
        self.changed = self.changed or flip or bool(relax)
        msg["value"] = value

    def _noise(self, info, alpha):
        """This evaluation's slice of the site's uniforms, shaped like ``alpha``
        (stored in the vectorized layout, so both paths share them)."""
        draw = self.draw
        full = pad(alpha, draw.L + info.alpha_event_dim, info.name)
        edim = full.dim() - info.alpha_event_dim - draw.U
        shape = full.shape[:edim] + (draw.plan.num_draws,) + full.shape[edim:]
        index = draw.seed_index.get(info.name)
        u = draw.noise.get(info.name)
        if u is not None and u.numel() != torch.Size(shape).numel():
            u = uniform({}, info.name, None, draw.seed + 1 + self.e, shape, alpha)
        else:
            u = uniform(draw.noise, info.name, index, draw.seed, shape, alpha)
        return u.narrow(edim, draw.plan.source[self.e], 1).reshape(alpha.shape)


class _Draw:
    def __init__(self, plan, T, U, num_particles, noise, seed, check_values, seed_index):
        self.plan, self.T, self.U = plan, T, U
        self.L = U + (num_particles is not None)
        self.noise, self.seed, self.check_values = noise, seed, check_values
        self.seed_index = seed_index
        self.infos = OrderedDict()
        self.traces = []


def run_sequential(model, guide, args, kwargs, make_plan, cached, U, noise, seed,
                   num_particles=None, check_values=False, detach_discrete=True,
                   estimator_name="", supports=(), dynamic=True):
    """
    The evaluations of the plan ``make_plan(T)`` one at a time, with the same
    noise, :math:`T` being the number of discrete sites of the base path.
    ``cached`` is the cached structure (its site order seeds the noise, as on
    the vectorized path). Returns ``(evaluations, structure of this draw)``.
    """
    T0 = cached.num_sites if cached is not None else 0
    seed_index = {n: i.index for n, i in cached.discrete.items()} if cached is not None else {}
    draw = _Draw(make_plan(T0), T0, U, num_particles, noise, seed, check_values, seed_index)
    particle_dim = -(U + 1)
    g = wrap(guide, None, U, num_particles, particle_dim)
    m = wrap(model, None, U, num_particles, particle_dim)
    runs, alphas = [], []
    e = 0
    while e < draw.plan.num_evaluations:
        messenger = SequentialNoise(draw, e)
        with messenger:
            guide_trace = poutine.trace(g).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(m, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        if e == 0:
            T = len(draw.infos)
            if T != draw.T:
                draw.plan, draw.T = make_plan(T), T
        draw.traces.append(guide_trace)
        runs.append((guide_trace, model_trace))
        alphas.append(messenger.alphas)
        e += 1
    plan = draw.plan
    structure = GuideStructure(runs[0][1], runs[0][0], estimator_name, supports)
    if plan.source[1:] and any(s != 0 for s in plan.source):  # independent draws: all sites
        for e in range(1, len(runs)):
            other = GuideStructure(runs[e][1], runs[e][0], estimator_name, supports, warn=False)
            _merge(structure, other)
    return _combine(runs, alphas, structure, plan, draw, detach_discrete, dynamic,
                    estimator_name), structure


def _merge(structure, other):
    for name, info in other.discrete.items():
        mine = structure.discrete.get(name)
        if mine is None:
            info.index = len(structure.discrete)
            structure.discrete[name] = info
        else:
            keep = {f.name for f in info.kept}
            mine.kept = tuple(f for f in mine.kept if f.name in keep)
    for name, k in other.num_before.items():
        structure.num_before.setdefault(name, k)


def _stack(tensors, edim):
    """Concatenate per-evaluation tensors (None: absent, filled with zeros)
    along ``edim``; also returns which were present."""
    present = [t for t in tensors if t is not None]
    present = torch.broadcast_tensors(*present)
    zero = torch.zeros_like(present[0])
    it = iter(present)
    full = [next(it) if t is not None else zero for t in tensors]
    return torch.cat(full, dim=edim)


def _combine(runs, alphas, structure, plan, draw, detach_discrete, dynamic, estimator_name):
    U, L = draw.U, draw.L
    edim = -(U + 1)
    E = len(runs)
    per_eval = [
        log_prob_terms(m, g, L, plan.hard[e] if detach_discrete == "hard" else detach_discrete)
        for e, (g, m) in enumerate(runs)
    ]
    keys = OrderedDict()
    for p in per_eval:
        for key, (names, frames, _) in p.items():
            keys.setdefault(key, (names, frames))
    terms = OrderedDict()
    for key, (names, frames) in keys.items():
        ts = [p[key][2].unsqueeze(edim) if key in p else None for p in per_eval]
        terms[key] = (names, frames, _stack(ts, edim))
    discrete, present = OrderedDict(), {}
    for name, info in structure.discrete.items():
        ran = [name in a for a in alphas]
        if not all(ran) and not dynamic:
            missing = [e for e, r in enumerate(ran) if not r]
            raise NotImplementedError(
                f"Discrete guide site '{name}' ran in some evaluations of a draw and not "
                f"in others ({missing}); {estimator_name} evaluates the guide at relaxed "
                "or flipped values of every site and needs a guide whose discrete sites "
                "do not depend on the values drawn. Use DisARM_ELBO, RLOO_ELBO or VIMCO "
                "for this guide."
            )
        d = edim - info.alpha_event_dim
        al = [
            pad(a[name], L + info.alpha_event_dim, name).unsqueeze(d) if name in a else None
            for a in alphas
        ]
        vs = [
            pad(g.nodes[name]["value"], L + info.event_dim, name).unsqueeze(edim - info.event_dim)
            if name in a else None
            for a, (g, _) in zip(alphas, runs)
        ]
        discrete[name] = (_stack(al, d), _stack(vs, edim - info.event_dim))
        if not all(ran):
            device = next(x for x in al if x is not None).device
            present[name] = torch.tensor(ran, device=device).reshape((E,) + (1,) * U)
    evals = Evaluations(terms, discrete, draw.noise, runs[0][0], runs[0][1], present,
                        num_evaluations=E)
    evals.sequential = True
    evals.guide_traces = [g for g, _ in runs]  # per evaluation (tests read the values)
    return evals
