"""
The sigmoid belief network of ``examples/sbn.py`` trained data-parallel: the
global minibatch (``--batch-size``) is split over the ranks (Pyro) or devices
(NumPyro); every rank evaluates its own estimator on its shard and the
gradients are averaged, so one step is one step of the global-batch estimator.

Pyro: one process per rank, launched by ``torchrun``; the loss is a
``torch.nn.Module`` (:class:`ELBOLoss`: the model's parameters and
``elbo.differentiable_loss``) wrapped in
``torch.nn.parallel.DistributedDataParallel``, which all-reduces the gradients
during ``backward``. Each rank draws its shard with a ``DistributedSampler`` and
its noise from its own seed (``--seed`` * 1000 + rank: the ranks' uniforms are
independent, the averaged gradient is the estimator of the global batch). The
process group is ``gloo`` on CPUs and ``nccl`` on GPUs (one GPU per rank,
``cuda:LOCAL_RANK``); ``--timeout`` bounds every collective, so a rank that
dies makes the others fail instead of hang. Evaluation is sharded the same way.

NumPyro: one process; the global batch is sharded over ``jax.devices()`` with a
``NamedSharding`` (parameters replicated) and the jitted ``svi.update`` is
partitioned by XLA. JAX's random bits are partitionable, so the sharded step
draws the same noise as the unsharded one and gives the same loss and
gradients up to float rounding. ``--host-devices N`` splits the CPU into N
XLA devices to try it without accelerators.

Estimators: ``disarm``, ``arm``, ``rloo``, ``vimco``, ``local_disarm`` (those
whose every trained parameter is the model's and the guide's; REBAR and RELAX
adapt extra parameters and ``TraceGraph_ELBO`` has no ``differentiable_loss``).
Flags, presets, progress bar, plot and JSON line are those of ``sbn.py``.

Examples::

    torchrun --standalone --nproc_per_node=2 examples/distributed_sbn.py --num-steps 2000
    torchrun --standalone --nproc_per_node=4 examples/distributed_sbn.py --preset disarm
    python examples/distributed_sbn.py --backend numpyro --host-devices 2 --num-steps 2000
    python examples/distributed_sbn.py --backend numpyro       # all of jax.devices()

Run without ``torchrun`` the Pyro backend trains in one process (world size 1).
Multi-node runs are launched by ``torchrun --nnodes ... --rdzv-endpoint ...``
(Pyro) or ``jax.distributed.initialize()`` (NumPyro); nothing here depends on
the number of nodes, but only single-node runs are tested.
"""

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np


def _preparse(argv):
    """``--host-devices`` and ``--threads`` must act before jax / torch are imported."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--host-devices", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)  # one per rank, as torchrun's OMP default
    return p.parse_known_args(argv)[0]


_pre = _preparse(sys.argv[1:])
if _pre.host_devices:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={_pre.host_devices}"
    ).strip()

import common  # noqa: E402  (sets sys.path)

common.limit_threads(_pre.threads, platform=None)  # GPUs are allowed here

import sbn  # noqa: E402
from data import load_mnist  # noqa: E402

ESTIMATORS = ("disarm", "arm", "rloo", "vimco", "local_disarm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    common.add_common_args(p, "out/distributed_sbn", list(ESTIMATORS), "disarm")
    common.add_sbn_args(p, sbn.PRESETS, sbn.MODELS)
    p.add_argument("--host-devices", type=int, default=None,
                   help="NumPyro: split the CPU into this many XLA devices "
                        "(--xla_force_host_platform_device_count)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="Pyro: seconds a collective may wait for the other ranks "
                        "before the run fails (default %(default)s)")
    p.add_argument("--cpu", action="store_true",
                   help="Pyro: train on CPUs (gloo) even when CUDA is available")
    return common.apply_preset(p.parse_args(argv), sbn.PRESETS)


# ---------------------------------------------------------------------------
# Pyro: DistributedDataParallel


class ModuleBackend(common.PyroBackend):
    """``sbn.py``'s backend with the parameters in a ``torch.nn.Module``
    (``self.module.params``) on ``device``, so that DDP sees and syncs them."""

    def __init__(self, init_params, device, dtype=None):
        import pyro
        import pyro.distributions as dist
        import torch

        self.pyro, self.dist, self.torch = pyro, dist, torch
        self.ops = common._TorchOps()
        self.device = torch.device(device)
        self.dtype = dtype or torch.get_default_dtype()
        self.module = torch.nn.Module()
        self.module.params = torch.nn.ParameterDict({
            k: torch.nn.Parameter(torch.tensor(np.asarray(v), dtype=self.dtype,
                                               device=self.device))  # a copy
            for k, v in init_params.items()
        })
        self.names = list(init_params)

    def params(self):
        return dict(self.module.params)

    def asarray(self, x):
        x = self.torch.as_tensor(x, device=self.device)
        return x.to(self.dtype) if x.is_floating_point() else x


def _loss_module_class():
    import torch

    class ELBOLoss(torch.nn.Module):
        """
        ``forward(*args) = elbo.differentiable_loss(model, guide, *args)``: the
        negative ELBO estimate, whose gradient is the estimator's. The
        parameters are ``params`` (an ``nn.Module``), so
        ``DistributedDataParallel(ELBOLoss(...))`` averages their gradients.
        """

        def __init__(self, params, model, guide, elbo):
            super().__init__()
            self.params = params
            self.model, self.guide, self.elbo = model, guide, elbo

        def forward(self, *args, **kwargs):
            return self.elbo.differentiable_loss(self.model, self.guide, *args, **kwargs)

    return ELBOLoss


def __getattr__(name):
    if name == "ELBOLoss":
        return _loss_module_class()
    raise AttributeError(name)


def rank_seed(seed, rank):
    """The torch seed of rank ``rank``: ranks draw independent noise."""
    return 1000 * seed + rank


class DDPTrainer(common.PyroTrainer):
    """
    ``step(*args)``: forward and backward through the DDP-wrapped
    :class:`ELBOLoss` (gradients averaged over the ranks), gradients divided by
    ``num_data`` (the per-example loss, as ``common.make_trainer``), one
    optimizer step (``common.PyroTrainer``'s); returns this rank's loss.
    Parameters in ``second_group`` get ``second_optim`` (``sbn.py``'s
    ``--prior-optim``).
    """

    def __init__(self, bk, loss_module, world, num_data, lr, betas, second_group=(),
                 second_optim=None, second_lr=None):
        from torch.nn.parallel import DistributedDataParallel

        if world > 1:
            ids = [bk.device.index] if bk.device.type == "cuda" else None
            self.loss = DistributedDataParallel(loss_module, device_ids=ids)
        else:
            self.loss = loss_module
        self._setup_optim(bk, bk.params(), "adam", lr, betas, second_group, second_optim,
                          second_lr, 1.0 / num_data)

    def step(self, *args):
        loss = self.loss(*args)
        loss.backward()
        self._update()
        return float(loss.detach())


def init_distributed(args):
    """``(rank, world, device)``; joins the process group when run by torchrun."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=args.timeout))
    return rank, world, device


def sampler_batches(n, batch, rank, world, seed, num_steps):
    """This rank's index batches: ``DistributedSampler`` over ``range(n)``,
    reshuffled every epoch (``set_epoch``), ``batch`` indices per step."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    step, epoch = 0, 0
    while num_steps is None or step < num_steps:
        sampler.set_epoch(epoch)
        idx = np.fromiter(iter(sampler), dtype=np.int64)
        for s in range(0, len(idx) - batch + 1, batch):
            yield idx[s : s + batch]
            step += 1
            if step == num_steps:
                return
        epoch += 1


def _local_batch(args, world):
    if args.batch_size % world:
        raise SystemExit(
            f"--batch-size {args.batch_size} is the global batch; it must be divisible "
            f"by the number of ranks / devices ({world})."
        )
    return args.batch_size // world


def main_pyro(args, train_set, test_set):
    import torch
    import torch.distributed as dist

    rank, world, device = init_distributed(args)
    try:
        local = _local_batch(args, world)
        rng = np.random.default_rng(args.seed)  # the same init on every rank
        bk = ModuleBackend(sbn.init_params(args, train_set, rng), device)
        model, guide = sbn.model_and_guide(bk, args, train_set.mean().astype(np.float32))
        elbo = common.make_elbo("pyro", args.estimator, num_samples=args.num_samples)
        common.set_seeds("pyro", rank_seed(args.seed, rank))
        trainer = DDPTrainer(
            bk, _loss_module_class()(bk.module, model, guide, elbo), world, len(train_set),
            args.lr, (0.9, args.beta2),
            second_group=("prior_logits",) if args.prior_optim else (),
            second_optim=args.prior_optim, second_lr=args.prior_lr,
        )
        bound = common.make_bound(bk, model, guide, sbn.make_args)
        K = args.eval_samples

        def sharded_bound(x):
            """The bound over all ranks' shards of ``x`` (one all-reduce)."""
            mine = x[rank::world]
            total = bound(trainer, (mine,), K) * len(mine) if len(mine) else 0.0
            t = torch.tensor([total, float(len(mine))], dtype=torch.float64, device=device)
            if world > 1:
                dist.all_reduce(t)
            return float(t[0] / t[1])

        x_eval = test_set.fixed_binarization(args.eval_size, args.test_seed)
        data_rng = np.random.default_rng(rank_seed(args.seed, rank) + 1)
        num_data = float(len(train_set))

        def step_args(idx):
            x = train_set.binarized(idx, data_rng)
            return bk.asarray(x), bk.asarray(idx), num_data

        batches = sampler_batches(len(train_set), local, rank, world, args.seed, args.num_steps)
        args.no_progress = args.no_progress or rank != 0
        history, tests, train_time, first = common.train(
            args, trainer, batches, step_args, lambda s: sharded_bound(x_eval),
            f"pyro x{world}/{args.model}/{args.estimator}",
        )
        # the training objective of the global batch: the mean of the ranks'
        h = torch.tensor([v for _, v in history], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(h)
        history = [(s, float(v) / world) for (s, _), v in zip(history, h.tolist())]
        t_eval = time.perf_counter()
        x_test = test_set.fixed_binarization(args.final_eval_size, args.test_seed)
        final = sharded_bound(x_test)
        final_eval_s = time.perf_counter() - t_eval
        extra = {"world_size": world, "local_batch_size": local, "device": str(device),
                 "dist_backend": dist.get_backend() if world > 1 else None}
        result = None
        if rank == 0:
            result = report(args, history, tests, train_time, first, final, len(x_eval),
                            len(x_test), final_eval_s, extra)
        if world > 1:
            # every rank leaves together: a rank that destroys the group and exits
            # while its peer is still reporting was seen to abort under load
            # ("terminate called without an active exception", gloo)
            dist.barrier()
        return result
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------
# NumPyro: the batch sharded over jax.devices()


def data_sharding(devices=None):
    """``(batch_sharding, replicated)``: ``NamedSharding`` s over a 1-d mesh
    ``("data",)`` of ``devices`` (default ``jax.devices()``)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(devices or jax.devices()), ("data",))
    return NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())


def main_numpyro(args, train_set, test_set):
    import jax

    devices = jax.devices()
    batch_sh, replicated = data_sharding(devices)
    _local_batch(args, len(devices))
    args.num_data = len(train_set)
    bk, model, guide, trainer = sbn.build(args, train_set)
    trainer.state = jax.device_put(trainer.state, replicated)
    bound = common.make_bound(bk, model, guide, sbn.make_args)
    K = args.eval_samples
    x_eval = test_set.fixed_binarization(args.eval_size, args.test_seed)
    rng = np.random.default_rng(args.seed + 1000)
    batches = train_set.batches(args.batch_size, rng, args.num_steps)
    num_data = float(len(train_set))

    def step_args(batch):
        idx, x = batch
        return (jax.device_put(np.asarray(x, np.float32), batch_sh),
                jax.device_put(np.asarray(idx), batch_sh), num_data)

    history, tests, train_time, first = common.train(
        args, trainer, batches, step_args, lambda s: bound(trainer, (x_eval,), K),
        f"numpyro x{len(devices)}/{args.model}/{args.estimator}",
    )
    t_eval = time.perf_counter()
    x_test = test_set.fixed_binarization(args.final_eval_size, args.test_seed)
    final = bound(trainer, (x_test,), K)
    final_eval_s = time.perf_counter() - t_eval
    extra = {"world_size": len(devices), "local_batch_size": args.batch_size // len(devices),
             "device": str(devices[0].platform), "dist_backend": "jax.sharding"}
    return report(args, history, tests, train_time, first, final, len(x_eval), len(x_test),
                  final_eval_s, extra)


# ---------------------------------------------------------------------------


def output_name(args):
    return f"dsbn_{args.backend}_{args.model}_{args.estimator}{args.tag}"


def report(args, history, tests, train_time, first, final, eval_size, test_size,
           final_eval_s, extra):
    name = output_name(args)
    args.out.mkdir(parents=True, exist_ok=True)
    plot = args.out / f"{name}.png"
    K = args.eval_samples
    world = extra["world_size"]
    common.save_plot(
        plot, history, tests,
        f"SBN {args.model} data-parallel x{world} ({Path(args.data).stem}, {args.binarize}), "
        f"{args.estimator} [{args.backend}], global batch {args.batch_size}, lr {args.lr:g}",
        f"test {K}-sample bound ({eval_size} examples)",
        final=(final, test_size),
    )
    steps = len(history)
    result = {
        "example": "distributed_sbn", "backend": args.backend, "model": args.model,
        "estimator": args.estimator, "preset": args.preset, "steps": steps,
        "batch_size": args.batch_size, **extra, "lr": args.lr, "beta2": args.beta2,
        "prior_optim": args.prior_optim, "prior_lr": args.prior_lr, "act": args.act,
        "pm1": args.pm1, "seed": args.seed, "data": str(args.data), "binarize": args.binarize,
        "train_objective_last10pct": common.mean_last(history),
        f"test_bound_{K}_subset": tests[-1][1], "eval_size": eval_size,
        f"test_bound_{K}": final, "test_size": test_size, "test_seed": args.test_seed,
        "ms_per_step": 1000 * train_time / max(1, steps - 1), "first_step_s": first,
        "steps_per_s": (steps - 1) / train_time if train_time else None,
        "final_eval_s": final_eval_s, "wall_time_s": time.perf_counter() - _T0,
        "plot": str(plot),
    }
    common.print_summary(result)
    return common.finish(args, name, result, history, tests)


_T0 = time.perf_counter()


def main(argv=None):
    args = parse_args(argv)
    common.check_outputs(args, output_name(args))  # every rank: all stop, none hangs
    common.set_threads(args)
    train_set = load_mnist(args.data, args.binarize, "train")
    test_set = load_mnist(args.data, args.binarize, "test")
    args.num_data = len(train_set)
    if args.backend == "pyro":
        return main_pyro(args, train_set, test_set)
    return main_numpyro(args, train_set, test_set)


if __name__ == "__main__":
    main()
