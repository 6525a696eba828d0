"""A sigmoid belief net on 8x8 "bars" images, trained with DisARM in NumPyro."""
import argparse

import numpy as np
import jax
import jax.numpy as jnp
import optax
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI
from numpyro_binary_grads import DisARM_ELBO

parser = argparse.ArgumentParser()
parser.add_argument("--num-steps", type=int, default=2000)
num_steps = parser.parse_args().num_steps

rng = np.random.default_rng(0)  # 200 images, each a random set of 8 rows / 8 columns
bars = rng.random((200, 16)) < 0.15
data = jnp.asarray(np.logical_or(bars[:, :8, None], bars[:, None, 8:]).reshape(200, 64) * 1.0)
H, D = 16, 64
init = jax.random.split(jax.random.PRNGKey(1))


def model(x):
    prior = numpyro.param("prior", jnp.zeros(H))
    w = numpyro.param("w", 0.1 * jax.random.normal(init[0], (H, D)))
    b = numpyro.param("b", jnp.zeros(D))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Bernoulli(logits=prior).to_event(1))
        numpyro.sample("x", dist.Bernoulli(logits=z @ w + b).to_event(1), obs=x)


def guide(x):
    v = numpyro.param("v", 0.1 * jax.random.normal(init[1], (D, H)))
    c = numpyro.param("c", jnp.zeros(H))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Bernoulli(logits=x @ v + c).to_event(1))


svi = SVI(model, guide, optax.adam(0.01), DisARM_ELBO())  # the only change
result = svi.run(jax.random.PRNGKey(0), num_steps, data, progress_bar=False)
for step in list(range(0, num_steps, 500)) + [num_steps - 1]:
    print(f"step {step:5d}  ELBO per image {-result.losses[step] / len(data):8.3f}")
