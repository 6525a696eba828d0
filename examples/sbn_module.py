"""
A helper module, not a script (there is nothing to run here): the original
Pyro-only linear one-layer SBN of ``examples/sbn.py`` as a
``torch.nn.Module`` (``SBN``) with its ``make_model_and_guide(net, name)``,
kept for ``benchmarks/bench_pyro_disarm.py`` (``from sbn import SBN,
make_model_and_guide`` resolves here). The example itself uses the
backend-neutral definitions of ``sbn.py``.
"""

import torch
import torch.nn as nn

import pyro
import pyro.distributions as dist


class SBN(nn.Module):
    """Parameters of the linear one-layer SBN: prior logits, decoder, encoder."""

    def __init__(self, x_dim=784, hidden=200, output_bias=None, input_mean=None):
        super().__init__()
        self.hidden = hidden
        self.prior_logits = nn.Parameter(torch.zeros(hidden))
        self.decoder = nn.Linear(hidden, x_dim)
        self.encoder = nn.Linear(x_dim, hidden)
        if output_bias is not None:
            with torch.no_grad():
                self.decoder.bias.copy_(torch.as_tensor(output_bias))
        centre = torch.zeros(x_dim) if input_mean is None else torch.as_tensor(input_mean)
        self.register_buffer("input_mean", centre.clone().float())

    def encoder_logits(self, x):
        return self.encoder(x - self.input_mean)


def make_model_and_guide(net, name="sbn"):
    """
    Pyro model and guide of the SBN ``net``; both take ``(x, idx, num_data)``.
    ``name`` is the ``pyro.module`` name (distinct names let several SBNs share
    Pyro's global param store, as in the benchmarks).
    """

    def model(x, idx, num_data):
        pyro.module(name, net)
        with pyro.plate("data", num_data, subsample=idx):
            b = pyro.sample("b", dist.Bernoulli(logits=net.prior_logits).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=net.decoder(b)).to_event(1), obs=x)

    def guide(x, idx, num_data):
        pyro.module(name, net)
        with pyro.plate("data", num_data, subsample=idx):
            pyro.sample("b", dist.Bernoulli(logits=net.encoder_logits(x)).to_event(1))

    return model, guide
