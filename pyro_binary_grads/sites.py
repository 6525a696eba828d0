"""
The site mechanism: the one place where discrete guide sites are handled.

For every non-reparameterized discrete site of the guide the mechanism

1. **owns the noise**: it draws the site's uniforms :math:`u` itself and sets
   the value :math:`b = 1[u < \\sigma(\\alpha)]` from the logits :math:`\\alpha`
   that the guide passes to the distribution;
2. **evaluates the ELBO integrand on several configurations in one pass**,
   vectorized over an extra *evaluation* dim of size :math:`E = 1 + T` placed
   just left of the user's plates: evaluation 0 is the base path and evaluation
   :math:`t` flips site :math:`t` (the discrete sites in execution order) to its
   antithetic value :math:`\\tilde b = 1[1 - u < \\sigma(\\alpha)]`. Downstream
   discrete sites reuse their own :math:`u` (common random numbers); every
   site executed before the flipped one keeps its base value, continuous
   sites included;
3. **keeps plate dims in each site's learning signal**: the log-prob terms of
   model and guide are reduced to the plates of the site, so element :math:`n`
   of a data plate is credited with its own terms plus the global terms;
4. **builds one surrogate** whose value is the ordinary ELBO estimate and whose
   gradient is the estimator's.

Discrete log-probs are computed here from the logits
(:math:`v\\alpha - \\mathrm{softplus}(\\alpha)`), never with ``fn.log_prob``.
"""

import math
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Categorical, Independent, OneHotCategorical

import pyro
import pyro.poutine as poutine
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.distributions.util import scale_and_mask, sum_rightmost
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import site_is_subsample

from .estimators import antithetic_value, bernoulli_value, pair_value, stick_breaking_value

EVAL_PLATE = "_bg_evaluations"
PARTICLE_PLATE = "_bg_particles"
_OUR_PLATES = (EVAL_PLATE, PARTICLE_PLATE)


# ---------------------------------------------------------------------------
# distributions: unwrapping, logits and log-probs computed by us
# ---------------------------------------------------------------------------


def _base_dist(fn):
    while isinstance(fn, (Independent, MaskedDistribution, ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def is_discrete_latent(site):
    """Whether a guide site is a non-reparameterized discrete latent."""
    fn = site["fn"]
    return (
        site["type"] == "sample"
        and not site["is_observed"]
        and not isinstance(fn, _Subsample)
        and not getattr(fn, "has_rsample", False)
        and bool(getattr(fn.support, "is_discrete", False))
    )


def site_logits(fn):
    """
    The logits of a Bernoulli (or categorical) distribution, broadcast to
    ``fn.batch_shape + fn.event_shape`` (plus the class dim for categoricals).
    """
    base = _base_dist(fn)
    logits = base.logits
    if isinstance(base, Bernoulli):
        return logits.expand(fn.batch_shape + fn.event_shape)
    shape = fn.batch_shape + fn.event_shape
    if isinstance(base, Categorical) and not isinstance(base, OneHotCategorical):
        shape = shape + logits.shape[-1:]
    return logits.expand(shape)


def discrete_log_prob(fn, value):
    """
    Elementwise log-prob of a Bernoulli / Categorical / OneHotCategorical
    (possibly wrapped in ``Independent``, masked or expanded), computed from
    the logits: smooth, valid at relaxed values, no validation.
    Returns a tensor of ``fn``'s batch shape (event dims summed, masks applied).
    """
    if isinstance(fn, Independent):
        return sum_rightmost(
            discrete_log_prob(fn.base_dist, value), fn.reinterpreted_batch_ndims
        )
    if isinstance(fn, MaskedDistribution):
        return scale_and_mask(discrete_log_prob(fn.base_dist, value), mask=fn._mask)
    if isinstance(fn, ExpandedDistribution):
        return discrete_log_prob(fn.base_dist, value).expand(fn.batch_shape)
    if isinstance(fn, Bernoulli):
        a = fn.logits
        return value * a - F.softplus(_compact(a))
    if isinstance(fn, OneHotCategorical):
        return (value * torch.log_softmax(fn.logits, -1)).sum(-1)
    if isinstance(fn, Categorical):
        logp = torch.log_softmax(fn.logits, -1)
        value, logp = torch.broadcast_tensors(value.long().unsqueeze(-1), logp)
        return logp.gather(-1, value[..., :1]).squeeze(-1)
    return fn.log_prob(value)


def _compact(t):
    """The smallest view of ``t`` that broadcasts back to it: expanded
    (stride-0) dims get size 1, so elementwise math on logits that were
    broadcast over plates or evaluations is not repeated."""
    if all(st != 0 or n == 1 for st, n in zip(t.stride(), t.shape)):
        return t
    return t[tuple(slice(0, 1) if st == 0 else slice(None) for st in t.stride())]


def _is_handled_discrete(fn):
    return isinstance(_base_dist(fn), (Bernoulli, Categorical, OneHotCategorical))


def site_log_prob(site, detach_discrete=False, sign=1.0):
    """The scaled and masked log-prob of a sample site, of its batch shape,
    times ``sign`` (folded into the scale: one op fewer per site)."""
    fn, value = site["fn"], site["value"]
    if _is_handled_discrete(fn):
        if detach_discrete and not site["is_observed"]:
            with torch.no_grad():  # no graph for a term whose gradient is dropped
                lp = discrete_log_prob(fn, value)
        else:
            lp = discrete_log_prob(fn, value)
    else:
        lp = fn.log_prob(value)
    scale = site["scale"] if sign == 1.0 else sign * site["scale"]
    return scale_and_mask(lp, scale, site["mask"])


def user_frames(site):
    return tuple(f for f in site["cond_indep_stack"] if f.name not in _OUR_PLATES)


def subsample_scale(frame):
    full = frame.full_size
    return 1.0 if full is None or full == frame.size else full / frame.size


# ---------------------------------------------------------------------------
# the structure of a guide, found once on a first trace
# ---------------------------------------------------------------------------


class SiteInfo:
    """Static facts about one discrete guide site."""

    def __init__(self, name, index, frames, fn):
        self.name = name
        self.index = index  # 0-based position among discrete sites
        self.frames = frames  # user plate frames
        self.event_dim = fn.event_dim
        base = _base_dist(fn)
        if isinstance(base, Bernoulli):
            self.kind = "bernoulli"
        elif isinstance(base, OneHotCategorical):
            self.kind = "onehot"
        else:
            self.kind = "categorical"
        # the logits carry a class dim beyond the value's dims for Categorical
        self.alpha_event_dim = self.event_dim + (self.kind == "categorical")
        self.kept = frames  # frames in which the learning signal stays local
        self.subsampled = tuple(f for f in frames if subsample_scale(f) != 1.0)


class GuideStructure:
    """
    The discrete sites of a guide in execution order, and for every other
    latent site how many discrete sites precede it. Found on a first run of
    guide and model and checked on every later run.
    """

    def __init__(self, model_trace, guide_trace, estimator_name, supports):
        self.discrete = OrderedDict()
        self.num_before = {}  # non-discrete latent site -> number of discrete sites before it
        latents = []
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            if site_is_subsample(site):
                continue
            _check_guide_site(site, estimator_name, supports)
            latents.append(site)
            if is_discrete_latent(site):
                self.discrete[name] = SiteInfo(
                    name, len(self.discrete), user_frames(site), site["fn"]
                )
            else:
                self.num_before[name] = len(self.discrete)
        for name, site in model_trace.nodes.items():
            if (
                site["type"] == "sample"
                and not site["is_observed"]
                and not site_is_subsample(site)
                and name not in guide_trace.nodes
            ):
                raise ValueError(
                    f"Model site '{name}' is latent but not in the guide. "
                    f"{estimator_name} needs every latent site of the model to be "
                    "sampled in the guide; observe it (obs=...) or add it to the guide."
                )
        self._localise(latents)

    @property
    def num_sites(self):
        return len(self.discrete)

    def _localise(self, latents):
        """
        A site's learning signal may stay local to a plate only if no guide
        site outside that plate runs after it (DESIGN.md, trap 4).
        """
        order = [s["name"] for s in latents]
        for info in self.discrete.values():
            later = latents[order.index(info.name) + 1 :]
            nonlocal_ = []
            for frame in info.frames:
                outside = [
                    s["name"]
                    for s in later
                    if frame.name not in {f.name for f in user_frames(s)}
                ]
                if outside:
                    nonlocal_.append((frame, outside))
            for frame, outside in nonlocal_:
                if subsample_scale(frame) != 1.0:
                    raise NotImplementedError(
                        f"Discrete site '{info.name}' is in the subsampled plate "
                        f"'{frame.name}' and guide site(s) {outside} outside that plate "
                        "run after it; the learning signal of a subsampled element then "
                        "depends on the other elements and cannot be estimated without "
                        "bias. Do not subsample this plate, or draw the global site(s) "
                        "before the local discrete site."
                    )
                warnings.warn(
                    f"Guide site(s) {outside} outside plate '{frame.name}' run after "
                    f"discrete site '{info.name}' inside it; the learning signal of "
                    f"'{info.name}' is summed over '{frame.name}' (unbiased, but its "
                    "variance grows with the plate size).",
                    RuntimeWarning,
                )
            drop = {frame.name for frame, _ in nonlocal_}
            info.kept = tuple(f for f in info.frames if f.name not in drop)


def check_one_hot(name, fn, estimator_name, why, alternatives):
    """
    Raise for an integer ``Categorical`` guide site ``name`` (distribution
    ``fn``) where ``estimator_name`` needs one-hot values (``why``), pointing
    to ``OneHotCategorical`` and to ``alternatives``.
    """
    base = _base_dist(fn)
    if isinstance(base, Categorical) and not isinstance(base, OneHotCategorical):
        raise NotImplementedError(
            f"Guide site '{name}' is a Categorical (integer-valued) site. "
            f"{estimator_name} {why}, which needs a one-hot sample: use "
            "pyro_binary_grads.OneHotCategorical(logits=...) in the guide and the "
            "model (one-hot float values; index with a matrix product, e.g. "
            "value @ table, rather than table[value]), or keep the Categorical "
            f"site and use {alternatives}."
        )


def _check_guide_site(site, estimator_name, supports):
    name, fn = site["name"], site["fn"]
    if site["infer"].get("enumerate"):
        raise ValueError(
            f"Guide site '{name}' is marked for enumeration "
            f"(infer={{'enumerate': {site['infer']['enumerate']!r}}}); {estimator_name} "
            "estimates gradients by sampling. Remove the enumerate flag, or use "
            "pyro.infer.TraceEnum_ELBO to enumerate it."
        )
    if getattr(fn, "has_rsample", False) or not is_discrete_latent(site):
        if not getattr(fn, "has_rsample", False):
            raise NotImplementedError(
                f"Guide site '{name}' ({type(_base_dist(fn)).__name__}) is neither "
                f"reparameterizable nor a discrete site {estimator_name} handles; use "
                "a reparameterizable distribution or pyro.infer.TraceGraph_ELBO."
            )
        return
    base = _base_dist(fn)
    if not isinstance(base, supports):
        handled = ", ".join(t.__name__ for t in supports)
        if isinstance(base, OneHotCategorical):
            way_out = (
                "DisARM_ELBO, REBAR_ELBO, RELAX_ELBO, RLOO_ELBO and VIMCO (unbiased) "
                "and the straight-through family (ST_ELBO, ReinMax_ELBO, ...) handle "
                "OneHotCategorical sites"
            )
        elif isinstance(base, Categorical):
            way_out = (
                "DisARM_ELBO, RLOO_ELBO and VIMCO handle Categorical sites; REBAR, "
                "RELAX and the straight-through family need OneHotCategorical sites"
            )
        else:
            way_out = "pyro.infer.TraceGraph_ELBO handles any discrete site"
        raise NotImplementedError(
            f"Guide site '{name}' has a {type(base).__name__} distribution, which "
            f"{estimator_name} does not handle (it handles {handled}). {way_out}; "
            "use one of those for this guide, or change the site."
        )


# ---------------------------------------------------------------------------
# evaluation plans
# ---------------------------------------------------------------------------


class Plan:
    """
    Which configurations an estimator evaluates. Evaluation ``e`` uses noise
    draw ``source[e]`` of every discrete site and takes the antithetic value
    at the sites ``j`` with ``flips[e][j]``; ``relax[e][j]`` (optional) marks
    sites that take a relaxed value instead (1: at the perturbed logits
    :math:`z`, 2: at the conditional :math:`\\tilde z`; REBAR, RELAX). A
    non-discrete latent site after ``k`` discrete sites is copied from
    evaluation ``base[e]`` (same noise draw, no changes) unless one of the
    first ``k`` sites is flipped or relaxed in ``e``. Evaluations without
    relaxed sites are the *hard* ones.
    """

    #: categorical sites sampled by stick-breaking, the flipped evaluations
    #: taking the antithetic class (DisARM's categorical coupling); else Gumbel-argmax
    stick_breaking = False

    def __init__(self, source, flips, value_fn=None, relax=None):
        #: optional ``value_fn(info, u, alpha, hard, relax) -> value``: the
        #: value a discrete site takes given its noise, logits, hard sample and
        #: relax code (an int, or an int tensor over the evaluation dim), e.g.
        #: a straight-through value ``hard + (s - sg(s))``; default the hard one
        self.value_fn = value_fn
        self.source = list(source)
        self.flips = [tuple(f) for f in flips]
        self.num_evaluations = len(self.source)
        self.num_draws = max(self.source) + 1
        T = len(self.flips[0]) if self.flips else 0
        self.relax = [tuple(int(x) for x in r) for r in relax] if relax else None
        if self.relax is None:
            self.relax = [(0,) * T] * self.num_evaluations
        #: per evaluation, whether every site takes its hard value
        self.hard = [not any(r) for r in self.relax]
        self.changed = [
            tuple(bool(f) or bool(r) for f, r in zip(fl, rl))
            for fl, rl in zip(self.flips, self.relax)
        ]
        unchanged = {}
        for e, (s, c) in enumerate(zip(self.source, self.changed)):
            if not any(c):
                unchanged.setdefault(s, e)
        self.base = [unchanged.get(s, e) for e, s in enumerate(self.source)]
        self._cache = {}

    @classmethod
    def pairs(cls, T):
        """ARM/DisARM: the base path and one antithetic flip per site."""
        return cls([0] * (T + 1), [[t == e - 1 for t in range(T)] for e in range(T + 1)])

    @classmethod
    def independent(cls, K, T):
        """K independent samples (RLOO, VIMCO)."""
        return cls(range(K), [[False] * T] * K)

    @classmethod
    def relaxed(cls, T):
        """REBAR/RELAX, per layer (ESTIMATORS.md section 5): the hard path, then
        for each site ``t`` two evaluations in which the sites before ``t``
        keep their hard values, site ``t`` is relaxed at :math:`z_t`
        (evaluation ``2t + 1``) or at :math:`\\tilde z_t` (``2t + 2``), and
        the sites after it are relaxed at their own :math:`z`: ``1 + 2T``."""
        relax = [[0] * T]
        for t in range(T):
            for code in (1, 2):
                relax.append([0] * t + [code] + [1] * (T - t - 1))
        return cls([0] * (1 + 2 * T), [[False] * T] * (1 + 2 * T), relax=relax)

    @classmethod
    def antithetic_pairs(cls, P, T):
        """P independent antithetic pairs of the whole configuration (local
        DisARM): evaluations ``2k`` and ``2k + 1`` share noise draw ``k``."""
        return cls([e // 2 for e in range(2 * P)], [[e % 2 == 1] * T for e in range(2 * P)])

    def flips_any(self, j):
        key = ("flips_any", j)
        if key not in self._cache:
            self._cache[key] = any(f[j] for f in self.flips)
        return self._cache[key]

    def copy_index(self, k):
        """Per evaluation, where a non-discrete site after ``k`` discrete sites
        takes its value from."""
        if k not in self._cache:
            self._cache[k] = [
                e if any(self.changed[e][:k]) else self.base[e]
                for e in range(self.num_evaluations)
            ]
        return self._cache[k]

    def site_tensors(self, j, tail, device):
        """Site ``j``'s flips and relax codes over the evaluations, shaped
        ``(E,) + (1,) * tail``."""
        key = ("site", j, tail, device)
        if key not in self._cache:
            _, flips, relax = self.tensors(device)
            shape = (-1,) + (1,) * tail
            self._cache[key] = (flips[:, j].reshape(shape), relax[:, j].reshape(shape))
        return self._cache[key]

    def tensors(self, device):
        key = ("tensors", device)
        if key not in self._cache:
            self._cache[key] = (
                torch.tensor(self.source, device=device),
                torch.tensor(self.flips, dtype=torch.bool, device=device).reshape(
                    self.num_evaluations, -1
                ),
                torch.tensor(self.relax, device=device).reshape(self.num_evaluations, -1),
            )
        return self._cache[key]


# ---------------------------------------------------------------------------
# the noise handler
# ---------------------------------------------------------------------------


_GENERATORS = {}


def _generator(device):
    """One reusable generator per device (reseeded for every site and draw)."""
    gen = _GENERATORS.get(device)
    if gen is None:
        gen = _GENERATORS[device] = torch.Generator(device=device)
    return gen


def _categorical_value(u, alpha, one_hot):
    """Gumbel-argmax: ``argmax(alpha - log(-log u))``."""
    z = (alpha - torch.log(-torch.log(u))).argmax(-1)
    return F.one_hot(z, alpha.shape[-1]).to(alpha.dtype) if one_hot else z


class NoiseMessenger(Messenger):
    """
    Owns the noise of the discrete guide sites of one estimator draw.

    Enter it outside the evaluation and particle plates so that ``msg["fn"]``
    is seen after broadcasting. It sets ``msg["value"]`` only, so the sites
    stay latent and replayable.

    :param structure: the :class:`GuideStructure`.
    :param plan: the :class:`Plan` of evaluations.
    :param int plate_nesting: the user's ``max_plate_nesting`` U.
    :param evaluation: None for the vectorized run over the evaluation dim
        (at dim ``-(U + 1)``), or the index ``e`` of a single evaluation.
    :param dict noise: site name -> uniforms of shape ``alpha.shape`` with
        ``plan.num_draws`` at the evaluation dim; filled on first use.
    :param traces: for a single evaluation, the guide traces of the earlier
        evaluations, from which subsample sites and copied latent sites are
        replayed.
    """

    def __init__(self, structure, plan, plate_nesting, evaluation, noise, seed,
                 check_values=False, traces=None, replay_values=None, batch_dims=None):
        super().__init__()
        self.batch_dims = batch_dims
        self.structure = structure
        self.plan = plan
        self.plate_nesting = plate_nesting
        self.evaluation = evaluation
        self.noise = noise
        self.seed = seed
        self.check_values = check_values
        self.traces = traces or []
        self.replay_values = replay_values or {}
        self._count = 0
        self.alphas = {}  # site name -> the logits seen (after broadcasting)

    def _uniform(self, info, alpha, shape):
        u = self.noise.get(info.name)
        if u is None:
            gen = _generator(alpha.device)
            gen.manual_seed(self.seed + 7919 * (info.index + 1))
            u = torch.rand(shape, generator=gen, dtype=alpha.dtype, device=alpha.device)
            # keep u in (0, 1): the logit and Gumbel transforms stay finite
            u = u.clamp(min=torch.finfo(u.dtype).tiny)
            self.noise[info.name] = u
        elif u.numel() != math.prod(shape):
            raise ValueError(
                f"Noise for site '{info.name}' has shape {tuple(u.shape)}, expected {shape}."
            )
        return u.reshape(shape)

    def _pyro_sample(self, msg):
        name = msg["name"]
        if msg["is_observed"] or msg["type"] != "sample" or isinstance(msg["fn"], _Subsample):
            if name in self.replay_values:
                msg["value"] = self.replay_values[name]
            elif self.traces and name in self.traces[0]:
                msg["value"] = self.traces[0].nodes[name]["value"]
            return
        info = self.structure.discrete.get(name)
        if info is None and name not in self.structure.num_before:
            raise ValueError(
                f"Guide site '{name}' was not in the guide on the first step. The "
                "discrete structure of the guide must not change between steps."
            )
        if info is None:
            self._replay_upstream(msg)
            return
        if info.index != self._count:
            order = list(self.structure.discrete)
            raise ValueError(
                f"Discrete guide site '{name}' ran in position {self._count}, but the "
                f"first step saw the discrete sites in the order {order}. The "
                "discrete structure of the guide must not change between steps."
            )
        self._count += 1
        alpha = self.alphas[name] = site_logits(msg["fn"])
        if self.check_values and not torch.isfinite(_compact(alpha)).all():
            raise ValueError(
                f"Guide site '{name}' has NaN or infinite logits; check the guide's "
                "parameters (e.g. lower the learning rate) or clamp the logits."
            )
        value = self._value(info, alpha)
        if self.plan.value_fn is not None:
            value = self.plan.value_fn(info, self._last_u, alpha, value, self._last_relax)
        msg["value"] = value

    def _value(self, info, alpha):
        U, plan, e = self.plate_nesting, self.plan, self.evaluation
        if e is None:
            edim = alpha.dim() - info.alpha_event_dim - (U + 1)
            shape = alpha.shape[:edim] + (plan.num_draws,) + alpha.shape[edim + 1 :]
            u = self._uniform(info, alpha, shape)
            if plan.num_draws > 1:
                u = u.index_select(edim, plan.tensors(alpha.device)[0])
            flip, self._last_relax = plan.site_tensors(info.index, alpha.dim() - edim - 1,
                                                       alpha.device)
        else:
            full = _pad(alpha, self.batch_dims + info.alpha_event_dim, info.name)
            edim = full.dim() - info.alpha_event_dim - (U + 1)
            shape = full.shape[:edim] + (plan.num_draws,) + full.shape[edim + 1 :]
            u = self._uniform(info, alpha, shape)
            u = u.narrow(edim, plan.source[e], 1).reshape(alpha.shape)
            flip = plan.flips[e][info.index]
            self._last_relax = plan.relax[e][info.index]
        self._last_u = u
        if info.kind == "bernoulli":
            if e is not None:
                return (antithetic_value if flip else bernoulli_value)(u, alpha)
            if not plan.flips_any(info.index):
                return bernoulli_value(u, alpha)
            return pair_value(u, _compact(alpha), flip)
        if plan.stick_breaking:
            z = stick_breaking_value(u, alpha, flip)
            if info.kind == "onehot":
                return F.one_hot(z, alpha.shape[-1]).to(alpha.dtype)
            return z
        return _categorical_value(u, alpha, info.kind == "onehot")

    def _replay_upstream(self, msg):
        """Sequential path: copied latent sites take the earlier evaluation's value."""
        name = msg["name"]
        if name in self.replay_values:
            msg["value"] = self.replay_values[name]
            return
        e = self.evaluation
        if e is not None:
            c = self.plan.copy_index(self.structure.num_before[name])[e]
            if c != e:
                msg["value"] = self.traces[c].nodes[name]["value"]

    def _pyro_post_sample(self, msg):
        """Vectorized path: copy the base slices of non-discrete latent sites."""
        if (
            self.evaluation is not None
            or msg["is_observed"]
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


# ---------------------------------------------------------------------------
# running the evaluations
# ---------------------------------------------------------------------------


class Evaluations:
    """
    The ELBO integrand of one estimator draw on all its evaluations.

    :ivar terms: ``{key: (frame_names, frames, tensor)}``, one scaled and masked
        log-prob term per site (guide terms negated), each of ``L`` batch dims
        with the evaluation dim at ``-(U + 1)``.
    :ivar discrete: ``{name: (alpha, value)}`` of the discrete guide sites,
        with the evaluation dim at ``-(U + 1 + alpha_event_dim)`` in alpha.
    :ivar noise: ``{name: u}``, the uniforms of the discrete sites.
    """

    def __init__(self, terms, discrete, noise, guide_trace, model_trace):
        self.terms = terms
        self.noise = noise
        self.discrete = discrete
        self.guide_trace = guide_trace
        self.model_trace = model_trace
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


def _pad(t, L, name):
    if t.dim() == L:
        return t
    if t.dim() > L:
        raise ValueError(
            f"Site '{name}' has batch shape {tuple(t.shape)} with more dims than "
            f"max_plate_nesting allows; declare its batch dims with pyro.plate, "
            "use .to_event(), or raise max_plate_nesting."
        )
    return t.reshape((1,) * (L - t.dim()) + t.shape)


def _terms(model_trace, guide_trace, L, detach_discrete):
    terms = OrderedDict()
    for prefix, trace, sign in (("guide", guide_trace, -1.0), ("model", model_trace, 1.0)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if prefix == "guide" and site["is_observed"]:
                continue
            frames = user_frames(site)
            lp = site_log_prob(site, detach_discrete and prefix == "guide", sign)
            if not torch.is_tensor(lp):
                continue
            terms[prefix, name] = (frozenset(f.name for f in frames), frames, _pad(lp, L, name))
    return terms


def _detach_hard(terms, structure, plan, U):
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


def _wrap(fn, E, U, num_particles):
    """``fn`` inside the evaluation and particle plates (cached: a plate is
    reusable, and building one costs about as much as a small tensor op)."""
    key = (fn, E, U, num_particles)
    wrapped = _WRAPPED.get(key)
    if wrapped is None:
        if len(_WRAPPED) > 64:
            _WRAPPED.clear()
        wrapped = _WRAPPED[key] = _plates(fn, E, U, num_particles)
    return wrapped


def _plates(fn, E, U, num_particles):
    if E is not None:
        fn = pyro.plate(EVAL_PLATE, E, dim=-(U + 1))(fn)
    if num_particles is not None:
        fn = pyro.plate(PARTICLE_PLATE, num_particles, dim=-(U + 2))(fn)
    return fn


def _run(model, guide, args, kwargs, messenger, E, U, num_particles):
    guide = _wrap(guide, E, U, num_particles)
    model = _wrap(model, E, U, num_particles)
    with messenger:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    if messenger._count != messenger.structure.num_sites:
        missing = list(messenger.structure.discrete)[messenger._count :]
        raise ValueError(
            f"Discrete guide site(s) {missing} of the first step did not run. The "
            "discrete structure of the guide must not change between steps."
        )
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        *args, **kwargs
    )
    return guide_trace, model_trace


def run_vectorized(model, guide, args, kwargs, structure, plan, U, noise, seed,
                   num_particles=None, check_values=False, detach_discrete=True):
    """All evaluations of ``plan`` in one guide and one model execution."""
    E = plan.num_evaluations
    L = U + 1 + (num_particles is not None)
    messenger = NoiseMessenger(structure, plan, U, None, noise, seed, check_values)
    try:
        guide_trace, model_trace = _run(
            model, guide, args, kwargs, messenger, E, U, num_particles
        )
    except (RuntimeError, ValueError, IndexError) as e:
        if "must not change between steps" in str(e) or "NaN or infinite" in str(e):
            raise
        raise ValueError(
            "The model or guide failed when run vectorized over the evaluation "
            f"dim (dim={-(U + 1)}, size {E}): {e}\nModel and guide must broadcast "
            "over dims left of their plates (no reshape or reduction over them). "
            "Pass vectorize=False to evaluate sequentially, or give the right "
            "max_plate_nesting."
        ) from e
    if detach_discrete == "hard":
        terms = _terms(model_trace, guide_trace, L, False)
        _detach_hard(terms, structure, plan, U)
    else:
        terms = _terms(model_trace, guide_trace, L, detach_discrete)
    discrete = OrderedDict(
        (name, (messenger.alphas[name], guide_trace.nodes[name]["value"]))
        for name in structure.discrete
    )
    return Evaluations(terms, discrete, noise, guide_trace, model_trace)


def run_sequential(model, guide, args, kwargs, structure, plan, U, noise, seed,
                   num_particles=None, check_values=False, detach_discrete=True,
                   replay=None):
    """
    The evaluations of ``plan`` one at a time, with the same noise.
    ``replay`` optionally maps each evaluation to values of its non-discrete
    latent sites (used to check the vectorized path).
    """
    E = plan.num_evaluations
    L = U + 1 + (num_particles is not None)
    runs, traces = [], []
    for e in range(E):
        messenger = NoiseMessenger(
            structure, plan, U, e, noise, seed, check_values and e == 0,
            traces=traces, replay_values=replay[e] if replay else None, batch_dims=L,
        )
        guide_trace, model_trace = _run(
            model, guide, args, kwargs, messenger, None, U, num_particles
        )
        traces.append(guide_trace)
        runs.append((guide_trace, model_trace))
    per_eval = [
        _terms(m, g, L, plan.hard[e] if detach_discrete == "hard" else detach_discrete)
        for e, (g, m) in enumerate(runs)
    ]
    edim = -(U + 1)
    terms = OrderedDict()
    for key, (names, frames, _) in per_eval[0].items():
        ts = torch.broadcast_tensors(*[p[key][2] for p in per_eval])
        terms[key] = (names, frames, torch.cat(ts, dim=edim))
    discrete = OrderedDict()
    for name, info in structure.discrete.items():
        alphas, values = [], []
        for g, _ in runs:
            site = g.nodes[name]
            alphas.append(_pad(site_logits(site["fn"]), L + info.alpha_event_dim, name))
            values.append(_pad(site["value"], L + info.event_dim, name))
        discrete[name] = (
            torch.cat(torch.broadcast_tensors(*alphas), dim=edim - info.alpha_event_dim),
            torch.cat(torch.broadcast_tensors(*values), dim=edim - info.event_dim),
        )
    return Evaluations(terms, discrete, noise, runs[0][0], runs[0][1])


def check_vectorized(model, guide, args, kwargs, structure, plan, U, noise, seed,
                     num_particles, vectorized):
    """
    Re-run the evaluations sequentially with the vectorized run's noise and
    continuous values; a model or guide that mis-broadcasts over the
    evaluation dim gives different numbers. Raises naming the first site.
    """
    E = plan.num_evaluations
    replay = [dict() for _ in range(E)]
    for name, site in vectorized.guide_trace.nodes.items():
        if site_is_subsample(site):
            for e in range(E):
                replay[e][name] = site["value"]
        elif name in structure.num_before and not site["is_observed"]:
            v = site["value"]
            d = v.dim() - site["fn"].event_dim - (U + 1)
            for e in range(E):
                replay[e][name] = v.narrow(d, e, 1)
    with torch.no_grad():
        seq = run_sequential(model, guide, args, kwargs, structure, plan, U, noise, seed,
                             num_particles, replay=replay)
    edim = -(U + 1)
    for key, (_, _, t) in vectorized.terms.items():
        a = _sum_but(t.detach(), edim)
        b = _sum_but(seq.terms[key][2], edim)
        bad = ~torch.isclose(a, b, rtol=1e-4, atol=1e-4 * (1 + a.abs().max().item()))
        if bad.any():
            e = bad.nonzero()[0].tolist()
            raise ValueError(
                f"The {key[0]} site '{key[1]}' gives different log-probs when the "
                "evaluations run vectorized and sequentially (at index "
                f"{e}: {a[tuple(e)].item():.6g} vs {b[tuple(e)].item():.6g}): the model "
                "or guide does not broadcast over the evaluation dim left of its plates "
                "(a reshape or a reduction over a leading dim?). Make it broadcast, or "
                "pass vectorize=False."
            )


def _sum_but(t, edim):
    """Sum every dim except the evaluation dim and the dims left of it."""
    keep = t.dim() + edim + 1
    return t.sum(tuple(range(keep, t.dim()))) if t.dim() > keep else t


# ---------------------------------------------------------------------------
# learning signals and the surrogate
# ---------------------------------------------------------------------------


def learning_signal(evals, info, U):
    """
    The learning signal of discrete site ``info`` on every evaluation: the sum
    of all log-prob terms, each summed over the plates the site's signal is
    not local to and broadcast over those it is local to. A term outside a
    subsampled plate of the site is multiplied by that plate's subsample scale,
    so that each element's signal estimates the full-data objective.
    """
    kept = {f.dim: f.name for f in info.kept}
    total = None
    for names, (frames, t) in evals.groups().items():
        dims = [
            t.dim() + d
            for d in range(-U, 0)
            if t.shape[d] > 1 and kept.get(d) not in names
        ]
        if dims:
            t = t.sum(dims, keepdim=True)
        scale = 1.0
        for frame in info.subsampled:
            if frame.name not in names:
                scale *= subsample_scale(frame)
        t = t * scale if scale != 1.0 else t
        total = t if total is None else total + t
    return total


def total_elbo(evals, U):
    """The ELBO integrand summed over the plates: shape ``(P, E)`` or ``(E,)``."""
    f = None
    for _, t in evals.groups().values():
        t = _sum_but(t, -(U + 1))
        f = t if f is None else f + t
    return f


def site_signal(evals, info, U):
    """A site's learning signal, its alpha and value, each with the evaluation
    dim at the same position (signal broadcast to the value's event dims)."""
    alpha, value = evals.discrete[info.name]
    signal = learning_signal(evals, info, U).detach()
    signal = signal.reshape(signal.shape + (1,) * info.event_dim)
    return signal, alpha, value


def _mean_over(n, t):
    return t if n == 1 else t / n


def pair_surrogate(evals, structure, U, pair_estimate, categorical_estimate=None):
    """
    ``(elbo, surrogate)`` of one draw of a pair estimator (ARM, DisARM): the
    ELBO averaged over the evaluations, and a surrogate whose gradient is
    pathwise for model parameters and reparameterized sites and
    ``pair_estimate`` (of the base and flipped evaluations of each site) for
    the discrete sites' logits; ``categorical_estimate(f, f_tilde, D, D_tilde,
    alpha)`` for categorical sites (one-hot values, class dim last).
    """
    f = total_elbo(evals, U)
    num_particles = f.numel() // f.shape[-1]
    elbo = surr = f.mean()
    for name, info in structure.discrete.items():
        signal, alpha, value = site_signal(evals, info, U)
        d = -(U + 1) - info.alpha_event_dim
        j = info.index + 1
        alpha0 = alpha.narrow(d, 0, 1)
        u = evals.noise[name].reshape(alpha0.shape)
        if info.kind != "bernoulli":  # one-hot values, signal over the class dim
            if info.kind == "categorical":
                value = F.one_hot(value.long(), alpha.shape[-1]).to(alpha.dtype)
                signal = signal.unsqueeze(-1)
            g = categorical_estimate(
                signal.narrow(d, 0, 1), signal.narrow(d, j, 1),
                value.narrow(d, 0, 1), value.narrow(d, j, 1), alpha0.detach(),
            )
            surr = surr + _mean_over(num_particles, (alpha0 * g.detach()).sum())
            continue
        g = pair_estimate(
            signal.narrow(d, 0, 1), signal.narrow(d, j, 1), u,
            value.narrow(d, 0, 1), value.narrow(d, j, 1), alpha0.detach(),
        )
        surr = surr + _mean_over(num_particles, (alpha0 * g.detach()).sum())
    return elbo, surr


def score(info, alpha, value):
    """:math:`\\nabla_\\alpha \\log q(v)`: ``v - sigmoid(alpha)``, or
    ``one_hot(v) - softmax(alpha)`` for categorical sites (detached)."""
    alpha = alpha.detach()
    if info.kind == "bernoulli":
        return value - torch.sigmoid(alpha)
    if info.kind == "categorical":
        value = F.one_hot(value.long(), alpha.shape[-1]).to(alpha.dtype)
    return value - torch.softmax(alpha, -1)


def score_surrogate(evals, structure, U, weight):
    """
    ``sum_sites sum_e alpha_e * sg(c_e * score_e)`` for score-function
    estimators, where ``c = weight(signal)`` maps each site's learning
    signals on the evaluations (evaluation dim at ``-(U + 1)``) to their
    coefficients.
    """
    surr = 0.0
    for info in structure.discrete.values():
        signal, alpha, value = site_signal(evals, info, U)
        c = weight(signal.reshape(signal.shape[: signal.dim() - info.event_dim]))
        c = c.reshape(c.shape + (1,) * info.alpha_event_dim)
        surr = surr + (alpha * (c * score(info, alpha, value).detach())).sum()
    return surr
