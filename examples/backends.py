"""
The examples' backend layer: one model / guide definition runs under Pyro and
NumPyro. :func:`get_backend` gives ``bk.sample``, ``bk.params``, ``bk.plate(idx,
num_data)``, ``bk.dist``, ``bk.ops`` (activations, stop-gradient); the numpy
parameter initialisation (:func:`linear_init`: ``nn.Linear``'s
uniform(+-1/sqrt(fan_in)), :func:`mlp_init`, :func:`mlp`) is identical for both.
"""

import math

import numpy as np


class _TorchOps:
    def __init__(self):
        import torch
        import torch.nn.functional as F

        self.tanh = torch.tanh
        self.relu = torch.relu
        self.leaky_relu = lambda x: F.leaky_relu(x, 0.3)
        self.sg = lambda x: x.detach()
        self.zeros = lambda shape: torch.zeros(shape)

    @staticmethod
    def reshape(x, shape):
        return x.reshape(shape)


class _JaxOps:
    def __init__(self):
        import jax
        import jax.numpy as jnp

        self.tanh = jnp.tanh
        self.relu = jax.nn.relu
        self.leaky_relu = lambda x: jax.nn.leaky_relu(x, 0.3)
        self.sg = jax.lax.stop_gradient
        self.zeros = lambda shape: jnp.zeros(shape)

    @staticmethod
    def reshape(x, shape):
        return x.reshape(shape)


class PyroBackend:
    name = "pyro"

    def __init__(self, init_params):
        import torch
        import pyro
        import pyro.distributions as dist

        self.pyro, self.dist, self.torch = pyro, dist, torch
        self.ops = _TorchOps()
        pyro.clear_param_store()
        for k, v in init_params.items():
            pyro.param(k, torch.as_tensor(np.asarray(v, np.float32)).clone())
        self.names = list(init_params)

    def params(self):
        return {k: self.pyro.param(k) for k in self.names}

    def sample(self, name, fn, obs=None):
        return self.pyro.sample(name, fn, obs=obs)

    def plate(self, idx, num_data):
        return self.pyro.plate("data", num_data, subsample=idx)

    def asarray(self, x):
        return self.torch.as_tensor(x)

    def one_hot_categorical(self, logits):
        from pyro_binary_grads import OneHotCategorical

        return OneHotCategorical(logits=logits)


class NumPyroBackend:
    name = "numpyro"

    def __init__(self, init_params):
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist
        from numpyro import handlers

        self.numpyro, self.dist, self.handlers, self.jnp = numpyro, dist, handlers, jnp
        self.ops = _JaxOps()
        self.init = {k: jnp.asarray(np.asarray(v, np.float32)) for k, v in init_params.items()}

    def params(self):
        return {k: self.numpyro.param(k, v) for k, v in self.init.items()}

    def sample(self, name, fn, obs=None):
        return self.numpyro.sample(name, fn, obs=obs)

    def plate(self, idx, num_data):
        # a plate of the batch size, scaled to the data set (NumPyro's
        # subsample_size would draw a permutation of num_data rows every step)
        from contextlib import ExitStack

        stack = ExitStack()
        stack.enter_context(self.handlers.scale(scale=num_data / idx.shape[0]))
        stack.enter_context(self.numpyro.plate("data", idx.shape[0], dim=-1))
        return stack

    def asarray(self, x):
        return self.jnp.asarray(x)

    def one_hot_categorical(self, logits):
        from numpyro_binary_grads import OneHotCategorical

        return OneHotCategorical(logits=logits)


def get_backend(name, init_params):
    if name == "pyro":
        return PyroBackend(init_params)
    if name == "numpyro":
        return NumPyroBackend(init_params)
    raise SystemExit(f"--backend must be pyro or numpyro, got {name!r}")


def linear_init(rng, fan_in, fan_out, name, params, bias=None):
    """``nn.Linear``'s init, weight stored (fan_in, fan_out): ``params[name+'_W'/'_b']``."""
    lim = 1.0 / math.sqrt(fan_in)
    params[name + "_W"] = rng.uniform(-lim, lim, (fan_in, fan_out)).astype(np.float32)
    params[name + "_b"] = (
        rng.uniform(-lim, lim, fan_out).astype(np.float32) if bias is None
        else np.asarray(bias, np.float32)
    )


def mlp_init(rng, sizes, name, params, out_bias=None):
    """Layers ``name0, name1, ...`` of an MLP with ``sizes`` (in, h1, ..., out)."""
    for i in range(len(sizes) - 1):
        last = i == len(sizes) - 2
        linear_init(rng, sizes[i], sizes[i + 1], f"{name}{i}", params,
                    out_bias if last else None)


def mlp(P, name, x, n_layers, act):
    """Apply an MLP initialised by :func:`mlp_init` (``act`` between layers)."""
    for i in range(n_layers):
        x = x @ P[f"{name}{i}_W"] + P[f"{name}{i}_b"]
        if i < n_layers - 1:
            x = act(x)
    return x

