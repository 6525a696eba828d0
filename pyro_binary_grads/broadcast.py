"""
Whether a program broadcasts over the evaluation dim: established on the
first step of every (model, guide) and again whenever the guide's discrete
sites or shapes change, whatever Pyro's validation setting (DESIGN.md, Pyro
specifics).

The check is deterministic: guide and model run once vectorized over
:math:`E \\ge 2` evaluations in which every discrete site takes **forced
different** values (evaluation :math:`e` takes the sample :math:`b` from one
shared draw of uniforms where :math:`e` is even and its complement
:math:`1 - b` where :math:`e` is odd; categorical sites the class
:math:`(z + e) \\bmod K`), then once per evaluation unbatched with the same
values (continuous sites replayed from the vectorized run). A program that
reduces, reshapes or multiplies over the evaluation dim mixes the
evaluations and its log-prob terms differ; one that broadcasts gives equal
terms in every evaluation. Every element of every discrete site differs
between neighbouring evaluations, so the result does not depend on a lucky
draw. Parameter values could still hide the mixing (a weight initialised at 0
multiplying ``b.sum()``): during the check every ``pyro.param`` (not those of
``pyro.module``, which would be written back into the module) is perturbed in
its unconstrained space, the same in the vectorized and the unbatched runs
(:class:`_PerturbedParams`), and the ELBO repeats the check at its 10th, 100th
and 1000th step of each program.
"""

import zlib

import torch
import torch.nn.functional as F

import pyro.poutine as poutine
from torch.distributions import biject_to

import pyro
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

from .estimators import bernoulli_value
from .noise import categorical_value, uniform
from .structure import is_discrete_latent, site_kind, site_logits
from .vectorized import log_prob_terms, pad, wrap


class NotBroadcasting(Exception):
    """The program mixes evaluations at ``site``."""

    def __init__(self, site, why):
        super().__init__(f"{site}: {why}")
        self.site, self.why = site, why


def _forced(kind, u, alpha, e):
    """The forced value of evaluation(s) ``e`` (an int, or an int tensor over
    the evaluation dim) from uniforms ``u``."""
    if kind == "bernoulli":
        b = bernoulli_value(u, alpha)
        odd = (torch.as_tensor(e, device=b.device) % 2).to(b.dtype)
        return odd + (1 - 2 * odd) * b
    K = alpha.shape[-1]
    z = categorical_value(u, alpha, False)
    z = (z + torch.as_tensor(e, device=z.device)) % K
    return F.one_hot(z, K).to(alpha.dtype) if kind == "onehot" else z


class _ForcedValues(Messenger):
    """Forced-different discrete values; evaluation ``e`` (or all, ``None``)."""

    def __init__(self, U, E, e, L, noise, seed, vec_trace=None):
        super().__init__()
        self.U, self.E, self.e, self.L = U, E, e, L
        self.noise, self.seed, self.vec_trace = noise, seed, vec_trace

    def _pyro_sample(self, msg):
        name, fn = msg["name"], msg["fn"]
        vec = self.vec_trace
        if isinstance(fn, _Subsample):
            if vec is not None and name in vec.nodes:
                msg["value"] = vec.nodes[name]["value"]
            return
        if msg["is_observed"]:
            return
        if not is_discrete_latent(msg):
            if vec is not None:
                msg["value"] = self._slice(name, fn)
            return
        kind = site_kind(fn)
        alpha = site_logits(fn)
        aed = fn.event_dim + (kind == "categorical")
        if self.e is None:
            edim = alpha.dim() - aed - (self.U + 1)
            if edim < 0 or alpha.shape[edim] != self.E:
                raise NotBroadcasting(name, "its logits have no evaluation dim")
            shape = alpha.shape[:edim] + (1,) + alpha.shape[edim + 1 :]
            u = uniform(self.noise, name, None, self.seed, shape, alpha)
            e = torch.arange(self.E, device=alpha.device).reshape(
                (-1,) + (1,) * (alpha.dim() - edim - 1 - (kind != "bernoulli"))
            )
            msg["value"] = _forced(kind, u, alpha, e)
            return
        u = self.noise.get(name)
        if u is None or u.numel() != alpha.numel():
            raise NotBroadcasting(name, "its shape differs from the vectorized run's")
        msg["value"] = _forced(kind, u.reshape(alpha.shape), alpha, self.e)

    def _slice(self, name, fn):
        if name not in self.vec_trace.nodes:
            raise NotBroadcasting(name, "it did not run in the vectorized run")
        v = self.vec_trace.nodes[name]["value"]
        edim = v.dim() - fn.event_dim - (self.U + 1)
        if edim < 0 or v.shape[edim] != self.E:
            raise NotBroadcasting(name, "its value has no evaluation dim")
        v = v.narrow(edim, self.e, 1).squeeze(edim)
        shape = fn.shape()
        if v.numel() != shape.numel():
            raise NotBroadcasting(name, "its value has another shape per evaluation")
        return v.reshape(shape)


def _first_line(e):
    text = str(e).splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _per_particle(t, U):
    return t.sum(tuple(range(t.dim() - U, t.dim()))) if U else t


class _PerturbedParams(Messenger):
    """``pyro.param`` values moved by a fixed, name-seeded unit normal in the
    unconstrained space (0.5 sd), so that a parameter at 0 cannot hide a
    program that mixes evaluations. Module parameters are left alone."""

    def __init__(self):
        super().__init__()
        self._cache = {}

    def _pyro_post_param(self, msg):
        name, value = msg["args"][0], msg["value"]
        # pyro.module's params would be written back into the module; the ELBO's own
        # adapted params (_bg_*) are not the program's
        if "$$$" in name or name.startswith("_bg_") or not torch.is_tensor(value) \
                or not value.is_floating_point():
            return
        if name not in self._cache:
            store = pyro.get_param_store()
            constraint = store._constraints.get(name) if hasattr(store, "_constraints") else None
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            z = torch.randn(value.shape, generator=gen, dtype=value.dtype).to(value.device)
            try:
                t = biject_to(constraint) if constraint is not None else None
                new = t(t.inv(value.detach()) + 0.5 * z) if t is not None else value.detach() + 0.5 * z
            except Exception:  # noqa: BLE001 -- an unusual constraint: leave the value
                new = value.detach()
            self._cache[name] = new
        msg["value"] = self._cache[name]


def check_broadcasting(model, guide, args, kwargs, U, E, seed, num_particles=None):
    """
    ``None`` if model and guide broadcast over the evaluation dim (with
    ``E`` evaluations and ``num_particles`` vectorized particles), else
    ``(site, why)`` naming the first site where evaluations mix.
    """
    E = max(E, 2)
    noise = {}
    with _PerturbedParams():
        return _check(model, guide, args, kwargs, U, E, seed, num_particles, noise)


def _check(model, guide, args, kwargs, U, E, seed, num_particles, noise):
    Lv = U + 1 + (num_particles is not None)
    try:
        with torch.no_grad():
            with _ForcedValues(U, E, None, Lv, noise, seed):
                vg = poutine.trace(wrap(guide, E, U, num_particles)).get_trace(*args, **kwargs)
            vm = poutine.trace(
                poutine.replay(wrap(model, E, U, num_particles), trace=vg)
            ).get_trace(*args, **kwargs)
            vterms = log_prob_terms(vm, vg, Lv, False)
    except NotBroadcasting as e:
        return e.site, e.why
    except Exception as e:  # the program fails with the evaluation dim
        return None, f"it fails when run over the evaluation dim ({_first_line(e)})"
    Ls = U + (num_particles is not None)
    g = wrap(guide, None, U, num_particles, -(U + 1))
    m = wrap(model, None, U, num_particles, -(U + 1))
    for e in range(E):
        try:
            with torch.no_grad():
                with _ForcedValues(U, E, e, Ls, noise, seed, vec_trace=vg):
                    sg = poutine.trace(g).get_trace(*args, **kwargs)
                sm = poutine.trace(poutine.replay(m, trace=sg)).get_trace(*args, **kwargs)
                sterms = log_prob_terms(sm, sg, Ls, False)
        except NotBroadcasting as err:
            return err.site, err.why
        except Exception as err:
            return None, f"evaluation {e} run alone fails ({_first_line(err)})"
        for key in list(vterms) + [k for k in sterms if k not in vterms]:
            if key not in vterms or key not in sterms:
                return f"{key[0]} site '{key[1]}'", "it runs in some evaluations only"
            a = _per_particle(vterms[key][2].narrow(-(U + 1), e, 1).squeeze(-(U + 1)), U)
            b = _per_particle(pad(sterms[key][2], Ls, key[1]), U)
            try:
                a, b = torch.broadcast_tensors(a, b)
            except RuntimeError:
                return f"{key[0]} site '{key[1]}'", "its log-prob has another shape"
            finite = a[torch.isfinite(a)]  # (a NaN or infinite term is the loss's matter)
            tol = 1e-4 * (1 + (finite.abs().max().item() if finite.numel() else 0.0))
            if not torch.allclose(a, b, rtol=1e-4, atol=tol, equal_nan=True):
                return (f"{key[0]} site '{key[1]}'",
                        f"its log-prob in evaluation {e} is {a.flatten()[0].item():.6g} "
                        f"run vectorized but {b.flatten()[0].item():.6g} run alone")
    return None
