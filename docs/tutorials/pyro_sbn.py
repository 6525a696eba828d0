"""A sigmoid belief net on 8x8 "bars" images, trained with DisARM in Pyro."""
import argparse

import numpy as np
import torch
import pyro
import pyro.distributions as dist
from pyro.infer import SVI
from pyro_binary_grads import DisARM_ELBO, iwae_bound

parser = argparse.ArgumentParser()
parser.add_argument("--num-steps", type=int, default=2000)
num_steps = parser.parse_args().num_steps

rng = np.random.default_rng(0)  # 200 images, each a random set of 8 rows / 8 columns
bars = rng.random((200, 16)) < 0.15
data = torch.tensor(np.logical_or(bars[:, :8, None], bars[:, None, 8:]).reshape(200, 64) * 1.0,
                    dtype=torch.float32)
H, D = 16, 64


def model(x):
    prior = pyro.param("prior", torch.zeros(H))
    w, b = pyro.param("w", 0.1 * torch.randn(H, D)), pyro.param("b", torch.zeros(D))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(logits=prior).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=z @ w + b).to_event(1), obs=x)


def guide(x):
    v, c = pyro.param("v", 0.1 * torch.randn(D, H)), pyro.param("c", torch.zeros(H))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Bernoulli(logits=x @ v + c).to_event(1))


pyro.set_rng_seed(0)
svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), DisARM_ELBO())  # the only change
for step in range(num_steps):
    loss = svi.step(data)
    if step % 500 == 0 or step == num_steps - 1:
        print(f"step {step:5d}  ELBO per image {-loss / len(data):8.3f}")
bound = iwae_bound(model, guide, data, num_samples=100)
print(f"IWAE bound per image (K=100): {bound / len(data):.3f}")
