"""
RELAX (Grathwohl et al. 2018): REBAR's control variate plus a learned
network :math:`r_\\rho(z)` per discrete site, trained on the variance of the
gradient estimate. The relaxation, the conditional noise and the per-layer
scheme are REBAR's (:mod:`numpyro_binary_grads.relaxed`); the module
:mod:`pyro_binary_grads.relax` holds the same classes in PyTorch.
"""

import math

import jax
from jax import random
import jax.numpy as jnp

import numpyro

from .arguments import check_count
from .relaxed import REBAR_ELBO, perturbed_logits
from .structure import certain_outcomes

__all__ = ["ControlVariateNet", "RELAX_ELBO"]

class ControlVariateNet:
    """
    The default learned part :math:`r_\\rho(z)` of :class:`RELAX_ELBO`'s control
    variate for one site: an MLP on the site's perturbed logits (event dims
    flattened) with one hidden layer of ``hidden_size`` LeakyReLU(0.3) units
    (the DisARM authors' RELAX reimplementation uses 137), returning one value
    per batch element. The output layer starts at zero, so training starts
    from REBAR's control variate; the hidden layer starts as torch's
    ``nn.Linear`` default, uniform in :math:`\\pm 1/\\sqrt{d}`, from
    ``PRNGKey(0)``.

    ``net(params, z)`` applies it; :meth:`init_params` gives the initial
    params (a pytree).
    """

    def __init__(self, input_size, hidden_size=137, event_dim=1):
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.event_dim = event_dim

    def init_params(self, dtype=None):
        dtype = jnp.result_type(float) if dtype is None else dtype
        bound = 1.0 / math.sqrt(self.input_size)
        d, h = self.input_size, self.hidden_size
        # concrete even when first called under a trace (the values are cached)
        with jax.ensure_compile_time_eval():
            kw, kb = random.split(random.PRNGKey(0))
            return {
                "hidden": {
                    "w": random.uniform(kw, (d, h), dtype, -bound, bound),
                    "b": random.uniform(kb, (h,), dtype, -bound, bound),
                },
                "out": {"w": jnp.zeros((h, 1), dtype), "b": jnp.zeros((1,), dtype)},
            }

    def __call__(self, params, z):
        if self.event_dim:
            z = jnp.reshape(z, jnp.shape(z)[: jnp.ndim(z) - self.event_dim] + (-1,))
        else:
            z = z[..., None]
        h = jax.nn.leaky_relu(z @ params["hidden"]["w"] + params["hidden"]["b"], 0.3)
        return (h @ params["out"]["w"] + params["out"]["b"])[..., 0]


class RELAX_ELBO(REBAR_ELBO):
    """
    The ELBO with gradients of its discrete guide sites (``Bernoulli`` and
    :class:`~numpyro_binary_grads.OneHotCategorical`) estimated by RELAX [1]
    (Sec. 3.2, eq. (8) of the camera-ready version) with the control variate
    of its VAE experiments,

    .. math::
        c_\\psi(z) = \\eta\\, f(\\sigma_\\lambda(z)) + r_\\rho(z),
        \\qquad
        \\hat g_\\alpha = \\big[f(b) - c_\\psi(\\tilde z)\\big]\\nabla_\\alpha\\log q(b)
            + \\nabla_\\alpha c_\\psi(z) - \\nabla_\\alpha c_\\psi(\\tilde z),

    unbiased for any :math:`\\psi` ([1] App. A). The network :math:`r_\\rho`
    (one per discrete site) and, with ``adapt=True``, :math:`\\lambda` and
    :math:`\\eta` are trained on the single-sample variance gradient
    :math:`\\nabla_\\psi \\overline{\\hat g_\\phi^2}` ([1] eq. (6)) by the
    optimizer you pass to SVI; they are declared by :meth:`wrap_guide`
    (the network's params as one pytree-valued param
    ``_bg_<site>_control_variate``), which is required::

        elbo = RELAX_ELBO()
        svi = SVI(model, elbo.wrap_guide(guide), optax.adam(1e-3), elbo)

    Everything else (conditional noise, per-layer scheme with
    :math:`1 + 2T` evaluations, plate-local signals, relaxed values in the
    model) as :class:`REBAR_ELBO`; the network adds two evaluations of
    :math:`r_\\rho` per site. :math:`r_\\rho(z)` returns one value per element
    of the site's plates; its input is the site's perturbed logits
    :math:`z` (batch shape plus event shape).

    :param control_variate: ``None`` for a :class:`ControlVariateNet` per
        site; an ``(apply_fn, init_params)`` pair used for every site, with
        ``apply_fn(params, z)`` returning an array of ``z``'s batch shape; or a
        dict from site name to such a pair.
    :param int hidden_size: hidden units of the default network.

    Other parameters as :class:`REBAR_ELBO`.

    [1] Will Grathwohl, Dami Choi, Yuhuai Wu, Geoffrey Roeder, David
        Duvenaud, "Backpropagation through the Void: Optimizing control
        variates for black-box gradient estimation", ICLR 2018.
    """

    def __init__(self, num_particles=1, vectorize_particles=True, *, control_variate=None,
                 hidden_size=137, temperature=0.5, eta=1.0, adapt=True, vectorize=True):
        self.hidden_size = check_count("RELAX_ELBO", "hidden_size", hidden_size, 1)
        self._nets = {}
        self._user_nets = control_variate
        self._rho = None
        super().__init__(num_particles, vectorize_particles, temperature=temperature,
                         eta=eta, adapt=adapt, vectorize=vectorize)

    @property
    def adapts(self):
        return True

    def _net(self, name, event_shape, dtype=None):
        """``(apply_fn, init_params)`` of site ``name``'s network (the default
        network's params in ``dtype``, that of the site's logits)."""
        if name not in self._nets:
            user = self._user_nets
            if isinstance(user, dict):
                if name not in user:
                    raise ValueError(
                        f"RELAX_ELBO's control_variate dict has no network for guide "
                        f"site '{name}' (it has {sorted(user)})."
                    )
                net = user[name]
            elif user is not None:
                net = user
            else:
                size = math.prod(event_shape) if event_shape else 1
                module = ControlVariateNet(size, self.hidden_size, len(event_shape))
                net = (module, module.init_params(dtype))
            if not (isinstance(net, (tuple, list)) and len(net) == 2 and callable(net[0])):
                raise ValueError(
                    "RELAX_ELBO's control_variate must be None, an (apply_fn, "
                    "init_params) pair or a dict of such pairs by site name; got "
                    f"{type(net).__name__} for site '{name}'."
                )
            self._nets[name] = tuple(net)
        return self._nets[name]

    def _declare_site(self, name, kind, event_shape, dtype=None):
        super()._declare_site(name, kind, event_shape, dtype)
        numpyro.param(self.param_name(name, "control_variate"),
                      self._net(name, event_shape, dtype)[1])

    def _inspect_guide(self, rng_key, params, guide, args, kwargs):
        if not hasattr(guide, "_bg_elbo"):
            raise ValueError(
                "RELAX_ELBO trains a control-variate network per discrete guide site, "
                "declared by its wrapper: pass guide = elbo.wrap_guide(guide) to SVI "
                "(and to this ELBO)."
            )
        return super()._inspect_guide(rng_key, params, guide, args, kwargs)

    def adapted_names(self):
        nets = [self.param_name(n, "control_variate") for n in self._discrete]
        return super().adapted_names() + nets

    def _read_adapted(self, param_map):
        super()._read_adapted(param_map)
        self._rho = {
            name: self._adapted_value(param_map, name, "control_variate")
            if name in self._nets else None
            for name in self._discrete
        }

    def _particle_loss(self, rng_key, param_map, model, guide, args, kwargs, noise=None):
        try:
            return super()._particle_loss(
                rng_key, param_map, model, guide, args, kwargs, noise=noise
            )
        finally:
            self._rho = None

    @staticmethod
    def _net_input(kind, alpha, u, b, conditional):
        """The network's input: the perturbed logits, 0 at outcomes of
        probability 0 (whose logits :func:`certain_logits` put at 1e9; a
        constant there keeps the control variate a function of ``z``)."""
        z = perturbed_logits(kind, alpha, u, b, conditional)
        return jnp.where(certain_outcomes(alpha, kind), 0.0, z)

    def control_variate(self, info, u, alpha, b, a, c):
        event_shape = alpha.shape[alpha.ndim - info.alpha_event_dim:]
        apply_fn, init = self._net(info.name, event_shape, alpha.dtype)
        rho = self._rho.get(info.name)
        rho = init if rho is None else rho
        z, zt = (self._net_input(info.kind, alpha[e], u[e], b, e == c) for e in (a, c))
        batch = z.shape[: z.ndim - info.alpha_event_dim]
        shape = batch + (1,) * info.event_dim
        r_z = jnp.reshape(apply_fn(rho, z), shape)
        r_zt = jnp.reshape(apply_fn(rho, zt), shape)
        return r_z, r_zt
