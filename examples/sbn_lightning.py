"""
The linear one-layer SBN of ``examples/sbn.py`` trained with PyTorch Lightning,
as Pyro's ``examples/svi_lightning.py`` does with ``Trace_ELBO``: the model and
guide are ``PyroModule`` s, ``loss_fn = DisARM_ELBO()(model, guide)`` is a
``pyro.infer.elbo.ELBOModule`` (an ``nn.Module`` whose parameters are the
model's and the guide's) and the ``LightningModule`` returns ``loss_fn(*batch)``
from ``training_step``. Lightning's strategies (``--strategy ddp --devices N``,
GPUs with ``--accelerator gpu``) then average the gradients over the ranks.

Each rank seeds torch with ``--seed`` * 1000 + its rank before training, so the
ranks draw independent noise (the estimators take their noise from torch's
global generator); Lightning's ``DistributedSampler`` gives each rank its own
examples. ``--batch-size`` is the batch of one rank.

Requires ``pip install binary-grads[pyro,lightning]`` (or ``pip install
lightning``). Examples::

    python examples/sbn_lightning.py --max-steps 2000
    python examples/sbn_lightning.py --max-steps 2000 --strategy ddp --devices 2
    python examples/sbn_lightning.py --estimator rloo --accelerator gpu --devices 4

Prints a readable summary line and a JSON line (train objective of the last
tenth, the K-sample test bound on ``--eval-size`` test examples, ms/step).
"""

import argparse
import json
import math
import time

import numpy as np

import common  # noqa: E402  (sets sys.path)

common.limit_threads()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
from pyro.nn import PyroModule  # noqa: E402

from data import load_mnist, output_bias_init  # noqa: E402

try:
    import lightning.pytorch as pl
except ImportError as e:  # the optional [lightning] extra
    raise SystemExit(
        f"sbn_lightning.py needs PyTorch Lightning ({e}); install it with "
        "`pip install binary-grads[lightning]` or `pip install lightning`."
    ) from e

ESTIMATORS = ("disarm", "arm", "rloo", "vimco", "local_disarm")


class Model(PyroModule):
    """``b ~ Bern(sigmoid(prior))``, ``x ~ Bern(sigmoid(W b + c))`` in a data
    plate of ``num_data`` subsampled at ``idx`` (no plate subsampling of its
    own: every rank must use the examples its sampler gave it)."""

    def __init__(self, x_dim, hidden, output_bias):
        super().__init__()
        self.prior_logits = nn.Parameter(torch.zeros(hidden))
        self.decoder = nn.Linear(hidden, x_dim)
        with torch.no_grad():
            self.decoder.bias.copy_(torch.as_tensor(output_bias))

    def forward(self, x, idx, num_data):
        with pyro.plate("data", num_data, subsample=idx):
            b = pyro.sample("b", dist.Bernoulli(logits=self.prior_logits).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(b)).to_event(1), obs=x)


class Guide(PyroModule):
    """``b ~ Bern(sigmoid(V (x - mean) + d))``."""

    def __init__(self, x_dim, hidden, input_mean):
        super().__init__()
        self.encoder = nn.Linear(x_dim, hidden)
        self.register_buffer("input_mean", torch.as_tensor(input_mean))

    def forward(self, x, idx, num_data):
        with pyro.plate("data", num_data, subsample=idx):
            pyro.sample("b", dist.Bernoulli(logits=self.encoder(x - self.input_mean))
                        .to_event(1))


class BinarizedMNIST(torch.utils.data.Dataset):
    """``(x, idx)`` with a fresh Bernoulli(pixel intensity) draw per access
    (dynamic binarization, torch's generator of the loading process)."""

    def __init__(self, probs):
        self.probs = torch.as_tensor(probs, dtype=torch.float32)

    def __len__(self):
        return len(self.probs)

    def __getitem__(self, i):
        return torch.bernoulli(self.probs[i]), i


class SBNModule(pl.LightningModule):
    def __init__(self, loss_fn, lr, num_data, seed):
        super().__init__()
        self.loss_fn = loss_fn  # an ELBOModule: its parameters are model's and guide's
        self.lr, self.num_data, self.seed = lr, float(num_data), seed
        self.losses, self.times, self._t = [], [], None

    def on_train_start(self):
        torch.manual_seed(1000 * self.seed + self.global_rank)  # independent noise per rank

    def training_step(self, batch, batch_idx):
        x, idx = batch
        t = time.perf_counter()
        if self._t is not None:
            self.times.append(t - self._t)
        self._t = t
        loss = self.loss_fn(x, idx, self.num_data) / self.num_data  # per example
        self.losses.append(float(loss.detach()))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.loss_fn.parameters(), lr=self.lr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--estimator", choices=ESTIMATORS, default="disarm")
    p.add_argument("--num-samples", type=int, default=2,
                   help="RLOO / VIMCO samples, local DisARM 2 * pairs (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=50, help="examples per rank and step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=200)
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="mnist.npz (default: the shared data)")
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--eval-samples", type=int, default=100)
    p.add_argument("--threads", type=int, default=common.DEFAULT_THREADS,
                   help="intra-op threads per process (0: torch's choice)")
    # pl.Trainer arguments
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--strategy", default="auto")
    p.add_argument("--devices", default="auto")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args)
    t0 = time.perf_counter()
    pl.seed_everything(args.seed, verbose=False)  # the same initial parameters on every rank
    pyro.settings.set(module_local_params=True)
    train = load_mnist(args.data, "dynamic", "train")
    test = load_mnist(args.data, "dynamic", "test")
    model = Model(train.dim, args.hidden, output_bias_init(train))
    guide = Guide(train.dim, args.hidden, train.mean().astype(np.float32))
    elbo = common.make_elbo("pyro", args.estimator, num_samples=args.num_samples)
    loss_fn = elbo(model, guide)
    module = SBNModule(loss_fn, args.lr, len(train), args.seed)
    loader = torch.utils.data.DataLoader(BinarizedMNIST(train.probs), batch_size=args.batch_size,
                                         shuffle=True, drop_last=True)
    trainer = pl.Trainer(accelerator=args.accelerator, strategy=args.strategy,
                         devices=args.devices, max_steps=args.max_steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=not args.no_progress,
                         enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader)
    if not trainer.is_global_zero:
        return None
    from pyro_binary_grads import iwae_bound

    x_eval = torch.as_tensor(test.fixed_binarization(args.eval_size, 0))
    K = args.eval_samples
    model.cpu(), guide.cpu()
    with torch.no_grad():
        bound = iwae_bound(model, guide, x_eval, torch.arange(len(x_eval)), len(x_eval),
                           num_samples=K, chunk_size=min(K, 10), max_plate_nesting=1)
    bound = float(bound) / len(x_eval)
    n = max(1, len(module.losses) // 10)
    steps = len(module.losses)
    result = {
        "example": "sbn_lightning", "backend": "pyro", "estimator": args.estimator,
        "steps": steps, "batch_size": args.batch_size, "lr": args.lr,
        "world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
        "device": str(trainer.strategy.root_device), "seed": args.seed,
        "train_objective_last10pct": -float(np.mean(module.losses[-n:])),
        f"test_bound_{K}": bound, "test_size": len(x_eval),
        "ms_per_step": 1e3 * float(np.median(module.times)) if module.times else math.nan,
        "wall_time_s": time.perf_counter() - t0,
    }
    common.print_summary(result)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
