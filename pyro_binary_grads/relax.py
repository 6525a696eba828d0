"""
RELAX (Grathwohl et al. 2018): REBAR's control variate plus a learned
network :math:`r_\\rho(z)` per discrete site, trained on the variance of the
gradient estimate. The relaxation, the conditional noise and the per-layer
scheme are REBAR's (:mod:`pyro_binary_grads.relaxed`); the module
:mod:`numpyro_binary_grads.relax` holds the same classes in JAX.
"""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import pyro

from binary_grads_common.arguments import check_count

from .relaxed import REBAR_ELBO, perturbed_logits
from .structure import certain_outcomes

__all__ = ["ControlVariateNet", "RELAX_ELBO"]

class ControlVariateNet(nn.Module):
    """
    The default learned part :math:`r_\\rho(z)` of :class:`RELAX_ELBO`'s control
    variate for one site: an MLP on the site's perturbed logits (event dims
    flattened) with one hidden layer of ``hidden_size`` LeakyReLU(0.3) units
    (the DisARM authors' RELAX reimplementation uses 137), returning one value
    per batch element. The output layer starts at zero, so training starts
    from REBAR's control variate.
    """

    def __init__(self, input_size, hidden_size=137, event_dim=1):
        super().__init__()
        self.event_dim = event_dim
        self.hidden = nn.Linear(input_size, hidden_size)
        self.out = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z):
        z = z.reshape(z.shape[: z.dim() - self.event_dim] + (-1,)) if self.event_dim else z[..., None]
        return self.out(F.leaky_relu(self.hidden(z), 0.3)).squeeze(-1)


class RELAX_ELBO(REBAR_ELBO):
    """
    The ELBO with gradients of its discrete guide sites (``Bernoulli`` and
    ``OneHotCategorical``) estimated by RELAX [1] (Sec. 3.2, eq. (8) of the
    camera-ready version) with the control variate of its VAE experiments,

    .. math::
        c_\\psi(z) = \\eta\\, f(\\sigma_\\lambda(z)) + r_\\rho(z),
        \\qquad
        \\hat g_\\alpha = \\big[f(b) - c_\\psi(\\tilde z)\\big]\\nabla_\\alpha\\log q(b)
            + \\nabla_\\alpha c_\\psi(z) - \\nabla_\\alpha c_\\psi(\\tilde z),

    unbiased for any :math:`\\psi` ([1] App. A). The network :math:`r_\\rho`
    (one per discrete site) and, with ``adapt=True``, :math:`\\lambda` and
    :math:`\\eta` are trained on the single-sample variance gradient
    :math:`\\nabla_\\psi \\overline{\\hat g_\\phi^2}` ([1] eq. (6)) by the
    optimizer you pass to SVI. They are created inside ``loss_and_grads``
    (``pyro.param`` and ``pyro.module`` named ``_bg_<site>_...``), where
    ``SVI.step`` collects them, so no wrapping is needed::

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), RELAX_ELBO())

    ``elbo.wrap_guide(guide)`` keeps working. NumPyro keeps ``wrap_guide``
    required (its ``SVI.init`` collects params from the model and guide
    traces only).

    Everything else (conditional noise, per-layer scheme with
    :math:`1 + 2T` evaluations, plate-local signals, relaxed values in the
    model) as :class:`REBAR_ELBO`; the network adds two evaluations of
    :math:`r_\\rho` per site. :math:`r_\\rho(z)` returns one value per element
    of the site's plates; its input is the site's perturbed logits
    :math:`z` (batch shape plus event shape).

    :param control_variate: ``None`` for a :class:`ControlVariateNet` per
        site, a ``torch.nn.Module`` used for every site, or a dict from site
        name to module.
    :param int hidden_size: hidden units of the default network.

    Other parameters as :class:`REBAR_ELBO`.

    [1] Will Grathwohl, Dami Choi, Yuhuai Wu, Geoffrey Roeder, David
        Duvenaud, "Backpropagation through the Void: Optimizing control
        variates for black-box gradient estimation", ICLR 2018.
    """

    def __init__(self, num_particles=1, max_plate_nesting=float("inf"),
                 vectorize_particles=False, *, control_variate=None, hidden_size=137,
                 temperature=0.5, eta=1.0, adapt=True, vectorize=True, **kwargs):
        self.hidden_size = check_count("RELAX_ELBO", "hidden_size", hidden_size)
        self._nets = {}
        self._user_nets = control_variate
        super().__init__(num_particles, max_plate_nesting, vectorize_particles,
                         temperature=temperature, eta=eta, adapt=adapt,
                         vectorize=vectorize, **kwargs)

    @property
    def adapts(self):
        return True

    def _net(self, name, event_shape, like=None):
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
                size = int(torch.Size(event_shape).numel()) if event_shape else 1
                net = ControlVariateNet(size, self.hidden_size, len(event_shape))
                dtype, device = like if like is not None else (torch.get_default_dtype(), None)
                net = net.to(dtype=dtype, device=device)
            self._nets[name] = net
        return self._nets[name]

    def __getstate__(self):
        state = super().__getstate__()
        nets = copy.deepcopy(self._nets)
        for net in nets.values():  # the param store's weak references do not pickle
            for p in net.parameters():
                p.__dict__.pop("unconstrained", None)
        state["_nets"] = nets
        return state

    def _site_psi(self, name, event_shape, like=None):
        psi = super()._site_psi(name, event_shape, like)
        pyro.module(self.param_name(name, "control_variate"), self._net(name, event_shape, like))
        return psi

    def adapted_tensors(self):
        params = [p for name in self._psi for p in self._nets[name].parameters()]
        return super().adapted_tensors() + params

    @staticmethod
    def _net_input(kind, alpha, u, b, conditional):
        """The network's input: the perturbed logits, 0 at outcomes of
        probability 0 (whose logits :func:`certain_logits` put at 1e9; a
        constant there keeps the control variate a function of ``z``)."""
        z = perturbed_logits(kind, alpha, u, b, conditional)
        return torch.where(certain_outcomes(alpha, kind), 0.0, z)

    def control_variate(self, info, u, alpha, b, a, c):
        d = -(self._user_plate_nesting + 1) - info.alpha_event_dim
        net = self._nets[info.name]
        z, zt = (self._net_input(info.kind, alpha.narrow(d, e, 1), u, b, e == c) for e in (a, c))
        shape = z.shape[: z.dim() - info.alpha_event_dim] + (1,) * info.event_dim
        return net(z).reshape(shape), net(zt).reshape(shape)
