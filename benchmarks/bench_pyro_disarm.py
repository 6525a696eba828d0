"""
Benchmark: ``pyro_binary_grads.DisARM_ELBO`` against a hand-written pure-PyTorch
DisARM step of the same math and against Pyro's ``TraceGraph_ELBO``.

Model: linear one-layer SBN 784-200 (``examples/sbn.py``), batch 50, dynamic
binarization of ``shared/data/mnist.npz`` (train = first 50000 images).  The
three trainers start from the same initial parameters, use the same optimizer
(Adam) and see the same data stream; they run in one process, interleaved in
blocks of ``--block`` steps, round-robin.

Reported:

* ms/step per trainer (median over blocks) and the ratio ours / hand-written;
* train ELBO (nats per example) after the same number of steps: the mean of the
  minibatch ELBO over the last blocks, and a one-sample ELBO on a fixed set of
  training images (fixed binarization, averaged over several draws of b);
* encoder-gradient variance at a fixed parameter point (the hand-written
  trainer's final parameters, one fixed minibatch): per-coordinate variance of
  d loss / d encoder.weight over ``--grad-draws`` draws, summed over
  coordinates, as the ratio TraceGraph_ELBO / DisARM_ELBO (and hand / DisARM);
* the performance shape (DESIGN.md, issue 18): ms/step at batch 1, 50 and 500
  of fresh trainers in one process, interleaved in rounds (``--shape-block``
  steps per trainer per round, the order rotating), each trainer's first steps
  timed apart (``JitDisARM_ELBO``: eager, tracing; ``torch.compile``: compiling).
  Per round, each trainer's block is divided by ``hand``'s block of the same
  round; the median and interquartile range of these ratios over the rounds are
  printed on the wall clock and on the process's CPU time (on a shared CPU the
  wall clock also counts the time the process waits for a core). Trainers:
  ``hand`` (the reference), ``hand_compiled`` (its surrogate through
  ``torch.compile``), ``jit_disarm`` / ``disarm`` (``SVI`` with
  ``JitDisARM_ELBO`` / ``DisARM_ELBO``), ``jit_nosvi`` / ``disarm_nosvi``
  (``loss_and_grads`` + one ``torch.optim.Adam``, no ``SVI``),
  ``jit_disarm_shared`` (``SVI`` + ``JitDisARM_ELBO`` with
  ``pyro_binary_grads.optim.Adam``: one ``torch.optim.Adam`` for all parameters
  instead of ``pyro.optim.Adam``'s one per parameter, gradients left ``None``
  as the hand step's ``zero_grad(set_to_none=True)``), ``svi_floor`` (``SVI.step`` with a loss that computes
  nothing) and ``adam_only`` (the optimizer step alone): ``svi_floor -
  adam_only`` is what ``SVI.step`` adds to any ELBO; ``hand+traces`` (the
  hand-written step plus Pyro's traces of the user's guide and model, the floor
  of an eager Pyro ELBO) and ``tracegraph``. On request (``--shape-trainers``):
  ``hand_fused`` and ``jit_disarm_shared_fused``, both with torch's fused Adam
  (``fused=True``: one kernel per parameter, several times faster on CPU than
  the default Adam; the ratio of the two is the like-for-like one).

Usage::

    python benchmarks/bench_pyro_disarm.py --steps 1000 --device cpu
    python benchmarks/bench_pyro_disarm.py --steps 2000 --device cuda
    python benchmarks/bench_pyro_disarm.py --shape-only --threads 1   # issue 18's timing

At large batches part of the vectorized Pyro steps' remaining gap is glibc's
allocator, not the step: their (2, B, 784) buffers are mmapped and returned to
the OS at every step, and each new one is page-faulted in. With
``MALLOC_MMAP_THRESHOLD_=1073741824`` in the environment (or jemalloc, tcmalloc)
the replayed ``JitDisARM_ELBO`` forward and backward at batch 500 cost
1.00-1.05x the hand-written ones instead of 1.2x, and ``SVI`` with it 1.03x the
hand step instead of 1.06x (measured on a loaded 2-core CPU, one thread).

Pyro's distribution validation is off for all Pyro trainers (``--validation`` to
turn it on); the hand-written step has none.
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import pyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.append(str(ROOT))  # an installed pyro_binary_grads wins over the checkout
from data import add_data_argument, centring_offset, load_mnist, output_bias_init  # noqa: E402
from sbn import SBN, make_model_and_guide  # noqa: E402

try:
    from pyro_binary_grads import DisARM_ELBO
    from pyro_binary_grads import JitDisARM_ELBO
    from pyro_binary_grads.optim import Adam as SharedAdam
except ImportError as e:  # not written yet
    DisARM_ELBO = None
    DISARM_IMPORT_ERROR = str(e)


# ----------------------------------------------------------------------------
# Hand-written DisARM (no Pyro)


def log_bernoulli(v, logits):
    """log Bernoulli(v | logits), summed over the last dim: v*a - softplus(a)."""
    return (v * logits - F.softplus(logits)).sum(-1)


def handwritten_disarm_surrogate(net, x, num_data):
    """
    One DisARM surrogate for the SBN on minibatch ``x`` (rows of a data set of
    ``num_data`` examples).  Returns ``(surrogate, loss_value)``: the surrogate's
    gradient is the DisARM estimate of -grad ELBO (scaled to the data set), and
    ``loss_value`` is the antithetic-pair estimate of -ELBO (what SVI.step returns).
    """
    a = net.encoder_logits(x)  # (B, H) encoder logits
    u = torch.rand_like(a)
    b = (torch.log(u) - torch.log1p(-u) < a).to(a.dtype)  # 1[u < sigmoid(a)]
    bt = (torch.log1p(-u) - torch.log(u) < a).to(a.dtype)  # 1[1 - u < sigmoid(a)]
    a_sg = a.detach()

    def f(bv):  # log p(x, b) - log q(b | x) per example, guide log-q detached
        return (
            log_bernoulli(bv, net.prior_logits)
            + log_bernoulli(x, net.decoder(bv))
            - log_bernoulli(bv, a_sg)
        )

    fb, fbt = f(b), f(bt)
    with torch.no_grad():
        g = 0.5 * (fb - fbt).unsqueeze(-1) * (1 - 2 * bt) * (b != bt) * torch.sigmoid(a_sg.abs())
    scale = num_data / x.shape[0]
    surrogate = -scale * ((a * g).sum() + 0.5 * (fb + fbt).sum())
    loss_value = -scale * 0.5 * (fb + fbt).sum().detach()
    return surrogate, loss_value


class HandTrainer:
    name = "hand"
    surrogate = staticmethod(handwritten_disarm_surrogate)

    def __init__(self, net, lr):
        self.net = net
        self.opt = torch.optim.Adam(net.parameters(), lr=lr)

    def step(self, x, idx, num_data):
        self.opt.zero_grad(set_to_none=True)
        surrogate, loss = self.surrogate(self.net, x, num_data)
        surrogate.backward()
        self.opt.step()
        return loss.item()

    def encoder_grad(self, x, idx, num_data):
        self.net.zero_grad(set_to_none=True)
        surrogate, _ = self.surrogate(self.net, x, num_data)
        surrogate.backward()
        return self.net.encoder.weight.grad.detach().clone()


class CompiledHandTrainer(HandTrainer):
    """The hand-written step with its surrogate (forward and, through
    AOTAutograd, backward) compiled by ``torch.compile`` (inductor, static
    shapes: one compilation per batch size); Adam eager, as in the others."""

    name = "hand_compiled"

    def __init__(self, net, lr):
        super().__init__(net, lr)
        self.surrogate = torch.compile(handwritten_disarm_surrogate, dynamic=False)


class AdamOnlyTrainer(HandTrainer):
    """``torch.optim.Adam.step`` alone, on gradients left in place: the
    hand-written step's optimizer cost (reference of ``svi_floor``)."""

    name = "adam_only"

    def step(self, x, idx, num_data):
        if self.net.encoder.weight.grad is None:
            for p in self.net.parameters():
                p.grad = torch.full_like(p, 1e-3)
        self.opt.step()
        return 0.0


class _ReadParams(pyro.infer.ELBO):
    """A loss that only reads the SBN's parameters (``pyro.module``) and leaves
    their gradients as they are: ``SVI.step`` with it costs SVI's own
    bookkeeping (param capture, one ``pyro.optim`` optimizer per parameter,
    ``zero_grads``) and nothing else."""

    def __init__(self, name, net):
        super().__init__()
        self.name, self.net = name, net

    def loss_and_grads(self, model, guide, *args, **kwargs):
        pyro.module(self.name, self.net)
        return 0.0

    loss = loss_and_grads

    def _get_trace(self, *args, **kwargs):
        raise NotImplementedError


class SviFloorTrainer(HandTrainer):
    """``SVI.step`` with a loss that computes nothing (:class:`_ReadParams`);
    minus ``adam_only``, the cost SVI adds to any ELBO."""

    name = "svi_floor"

    def __init__(self, net, lr):
        super().__init__(net, lr)
        for p in net.parameters():
            p.grad = torch.full_like(p, 1e-3)
        model, guide = make_model_and_guide(net, name=f"sbn_floor_{id(net)}")
        self.svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": lr}),
                                  _ReadParams(f"sbn_floor_{id(net)}", net))

    def step(self, x, idx, num_data):
        return self.svi.step(x, idx, num_data)


class FusedHandTrainer(HandTrainer):
    """The hand-written step with torch's fused Adam (``fused=True``): the
    reference of ``jit_disarm_shared_fused``."""

    name = "hand_fused"

    def __init__(self, net, lr):
        super().__init__(net, lr)
        self.opt = torch.optim.Adam(net.parameters(), lr=lr, fused=True)


class TracedHandTrainer(HandTrainer):
    """
    The hand-written step plus one Pyro trace of the guide and one replayed
    trace of the model (the user's program run by Pyro, nothing else, no
    gradient): the floor any Pyro ELBO pays on top of the hand-written step.
    """

    name = "hand+traces"

    def __init__(self, net, lr):
        super().__init__(net, lr)
        self.model, self.guide = make_model_and_guide(net, name="sbn_hand_traces")

    def step(self, x, idx, num_data):
        with torch.no_grad():
            guide_trace = pyro.poutine.trace(self.guide).get_trace(x, idx, num_data)
            pyro.poutine.trace(pyro.poutine.replay(self.model, trace=guide_trace)).get_trace(
                x, idx, num_data)
        return super().step(x, idx, num_data)


class PyroTrainer:
    def __init__(self, name, net, elbo, lr, optim=None, **optim_args):
        self.name = name
        self.net = net
        self.elbo = elbo
        # one pyro.module name per trainer instance (fresh nets per batch size)
        self.model, self.guide = make_model_and_guide(net, name=f"sbn_{name}_{id(net)}")
        optim = (optim or pyro.optim.Adam)({"lr": lr, **optim_args})
        self.svi = pyro.infer.SVI(self.model, self.guide, optim, elbo)

    def step(self, x, idx, num_data):
        return self.svi.step(x, idx, num_data)

    def encoder_grad(self, x, idx, num_data):
        self.net.zero_grad(set_to_none=True)
        self.elbo.loss_and_grads(self.model, self.guide, x, idx, num_data)
        return self.net.encoder.weight.grad.detach().clone()


class ElboOnlyTrainer(PyroTrainer):
    """
    ``elbo.loss_and_grads`` followed by a plain ``torch.optim.Adam`` step (no
    ``SVI``, no ``pyro.optim``): isolates the ELBO's own cost from SVI's
    param-capture trace and per-parameter optimizers, which TraceGraph_ELBO pays too.
    """

    def __init__(self, name, net, elbo, lr):
        super().__init__(name, net, elbo, lr)
        self.opt = torch.optim.Adam(net.parameters(), lr=lr)

    def step(self, x, idx, num_data):
        self.opt.zero_grad(set_to_none=True)
        loss = self.elbo.loss_and_grads(self.model, self.guide, x, idx, num_data)
        self.opt.step()
        return loss


def _jit():
    return JitDisARM_ELBO(max_plate_nesting=1, ignore_jit_warnings=True)


SIMPLE = {"hand": HandTrainer, "hand+traces": TracedHandTrainer, "hand_compiled": CompiledHandTrainer,
          "adam_only": AdamOnlyTrainer, "svi_floor": SviFloorTrainer, "hand_fused": FusedHandTrainer}


def make_trainers(base_net, lr, which):
    trainers = []
    for name in which:
        net = copy.deepcopy(base_net)
        if name in SIMPLE:
            trainers.append(SIMPLE[name](net, lr))
        elif name == "disarm":
            trainers.append(PyroTrainer("disarm", net, DisARM_ELBO(max_plate_nesting=1), lr))
        elif name == "jit_disarm":
            trainers.append(PyroTrainer("jit_disarm", net, _jit(), lr))
        elif name == "jit_disarm_shared":
            trainers.append(PyroTrainer(name, net, _jit(), lr, optim=SharedAdam))
        elif name == "jit_disarm_shared_fused":
            trainers.append(PyroTrainer(name, net, _jit(), lr, optim=SharedAdam, fused=True))
        elif name == "jit_nosvi":
            trainers.append(ElboOnlyTrainer(name, net, _jit(), lr))
        elif name == "disarm_nosvi":
            trainers.append(ElboOnlyTrainer("disarm_nosvi", net, DisARM_ELBO(max_plate_nesting=1), lr))
        elif name == "tracegraph":
            trainers.append(
                PyroTrainer("tracegraph", net, pyro.infer.TraceGraph_ELBO(max_plate_nesting=1), lr)
            )
    return trainers


# ----------------------------------------------------------------------------


@torch.no_grad()
def fixed_set_elbo(net, x, reps=5):
    """One-sample ELBO per example on fixed images ``x``, averaged over ``reps`` draws of b."""
    a = net.encoder_logits(x)
    tot = 0.0
    for _ in range(reps):
        b = torch.bernoulli(torch.sigmoid(a))
        f = (
            log_bernoulli(b, net.prior_logits)
            + log_bernoulli(x, net.decoder(b))
            - log_bernoulli(b, a)
        )
        tot += f.mean().item()
    return tot / reps


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(trainers, batches_fn, num_steps, block, num_data, device):
    """
    Train all ``trainers`` on the same stream, ``block`` steps each, round-robin.
    Returns per trainer the list of block ms/step (wall clock), the per-step
    ELBO history, and the list of block ms/step of this process's CPU time
    (``time.process_time``: on a shared CPU, robust to the time the process
    waits for a core; not meaningful on a GPU).
    """
    ms = {t.name: [] for t in trainers}
    cpu = {t.name: [] for t in trainers}
    hist = {t.name: [] for t in trainers}
    done = 0
    while done < num_steps:
        n = min(block, num_steps - done)
        batch_list = batches_fn(n)
        order = trainers[done // block % len(trainers):] + trainers[: done // block % len(trainers)]
        for t in order:  # rotate who goes first, to spread cache / frequency effects
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            losses = [t.step(x, idx, num_data) for idx, x in batch_list]
            sync(device)
            ms[t.name].append(1000 * (time.perf_counter() - t0) / n)
            cpu[t.name].append(1000 * (time.process_time() - c0) / n)
            hist[t.name].extend(-loss / num_data for loss in losses)
        done += n
    return ms, hist, cpu


def make_batch_fn(train, batch_size, rng, device):
    def endless():
        while True:
            yield from train.batches(batch_size, rng, num_steps=None)

    it = endless()

    def batches_fn(n):
        out = []
        for _ in range(n):
            idx, xb = next(it)
            out.append(
                (torch.as_tensor(idx, device=device), torch.as_tensor(xb, device=device))
            )
        return out

    return batches_fn


def grad_variance(trainers, state, x, idx, num_data, draws):
    out = {}
    for t in trainers:
        t.net.load_state_dict(state)
        gs = torch.stack([t.encoder_grad(x, idx, num_data) for _ in range(draws)])
        gs = gs.double()
        out[t.name] = {
            "var_sum": gs.var(0).sum().item(),
            "mean": gs.mean(0),
        }
    return out


SHAPE_TRAINERS = ["hand", "hand_compiled", "jit_disarm", "jit_disarm_shared", "disarm", "jit_nosvi",
                  "svi_floor", "adam_only", "hand+traces", "disarm_nosvi", "tracegraph"]
OTHER_TRAINERS = ["hand_fused", "jit_disarm_shared_fused"]  # --shape-trainers only
LIKE_FOR_LIKE = [("jit_disarm_shared_fused", "hand_fused")]  # also printed: ratio of the pair
FIRST_STEPS = {"jit_disarm": ("eager", "tracing"), "jit_disarm_shared": ("eager", "tracing"),
               "jit_disarm_shared_fused": ("eager", "tracing"),
               "jit_nosvi": ("eager", "tracing"), "hand_compiled": ("compiling", "")}


def _spread(values):
    """(median, 25th, 75th percentile) of ``values``."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q2, q1, q3


def performance_shape(args, base, train, num_data, device, which):
    """
    ms/step of fresh trainers at each of ``--shape-batches``, in one process,
    interleaved in blocks of ``--shape-block`` steps (the order rotates every
    round), after each trainer's first steps (eager, tracing, compiling), timed
    apart. Each round's block of a trainer is divided by the same round's block
    of ``hand``: the ratios' median and interquartile range over the rounds,
    on the wall clock and on this process's CPU time.
    """
    rounds = max(1, args.shape_steps // args.shape_block)
    print(f"\n== performance shape: {rounds} rounds of {args.shape_block} steps per trainer and "
          "batch size, interleaved; ratio to hand = median [IQR] over rounds")
    shape = {}
    for bs in args.shape_batches:
        pyro.set_rng_seed(args.seed)
        trs = make_trainers(base, args.lr, which)
        bf = make_batch_fn(train, bs, np.random.default_rng(args.seed + bs), device)
        first = {}
        for t in list(trs):
            first[t.name] = []
            for idx, xb in bf(2):
                sync(device)
                t0 = time.perf_counter()
                try:
                    t.step(xb, idx, num_data)
                except Exception as e:  # noqa: BLE001 -- torch.compile may fail on a machine
                    print(f"batch {bs:>4}: {t.name} failed on its first steps, left out: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    trs.remove(t)
                    break
                sync(device)
                first[t.name].append(1000 * (time.perf_counter() - t0))
        print(f"batch {bs:>4}: first steps, ms (wall): " + "; ".join(
            f"{k} " + ", ".join(f"{v:.0f}" + (f" ({FIRST_STEPS[k][i]})" if k in FIRST_STEPS
                                               and FIRST_STEPS[k][i] else "")
                                for i, v in enumerate(vs))
            for k, vs in first.items() if vs))
        interleaved(trs, bf, 5 * len(trs), 5, num_data, device)  # warm-up
        wall, _, cpu = interleaved(trs, bf, rounds * args.shape_block, args.shape_block,
                                   num_data, device)
        shape[bs] = {}
        print(f"{'trainer':<20}{'wall ms':>9}{'ratio (wall)':>22}{'cpu ms':>9}{'ratio (cpu)':>22}")
        for t in trs:
            row = {"first_steps_ms": first[t.name]}
            for clock, ms in (("wall", wall), ("cpu", cpu)):
                row[f"{clock}_ms"] = statistics.median(ms[t.name])
                row[f"ratio_{clock}"] = _spread([a / h for a, h in zip(ms[t.name], ms["hand"])])
            shape[bs][t.name] = row
            print(f"{t.name:<20}" + "".join(
                f"{row[c + '_ms']:>9.2f}{'':>3}{row['ratio_' + c][0]:.3f} "
                f"[{row['ratio_' + c][1]:.3f}, {row['ratio_' + c][2]:.3f}]"
                for c in ("wall", "cpu")))
        r = shape[bs]
        for num, den in LIKE_FOR_LIKE:
            if num in r and den in r:
                for c, ms in (("wall", wall), ("cpu", cpu)):
                    q = _spread([a / h for a, h in zip(ms[num], ms[den])])
                    r[num][f"ratio_{c}_to_{den}"] = q
                    print(f"  {num} / {den} ({c}): {q[0]:.3f} [{q[1]:.3f}, {q[2]:.3f}]")
        if "svi_floor" in r and "adam_only" in r:
            for c in ("wall", "cpu"):
                floor = r["svi_floor"][c + "_ms"] - r["adam_only"][c + "_ms"]
                print(f"  SVI.step's own cost ({c}; svi_floor - adam_only: param capture, one "
                      f"optimizer per parameter, zero_grads): {floor:.2f} ms = "
                      f"{floor / r['hand'][c + '_ms']:.3f} of hand")
    return shape


def train_and_compare(args, base, train, num_data, x_eval, rng, device, which):
    """Sections 1 and 2: interleaved training at ``--batch-size`` (ms/step,
    ELBO) and the encoder-gradient variance at the hand-written trainer's
    final parameters."""
    # 1. Interleaved training at --batch-size.
    trainers = make_trainers(base, args.lr, which)
    batches_fn = make_batch_fn(train, args.batch_size, rng, device)
    t0 = time.perf_counter()
    ms, hist, _ = interleaved(trainers, batches_fn, args.steps, args.block, num_data, device)
    wall = time.perf_counter() - t0
    tail = max(args.block, args.steps // 10)
    results = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
               "train_wall_s": wall, "trainers": {}}
    print(f"\n== training: SBN {train.dim}-{args.hidden}, batch {args.batch_size}, "
          f"{args.steps} steps each, blocks of {args.block}, lr {args.lr:g} ({wall:.1f} s)")
    print(f"{'trainer':<12}{'ms/step':>10}{'train ELBO (last ' + str(tail) + ' steps)':>32}"
          f"{'fixed-set ELBO':>18}")
    for t in trainers:
        med = statistics.median(ms[t.name])
        last = float(np.mean(hist[t.name][-tail:]))
        fixed = fixed_set_elbo(t.net, x_eval)
        results["trainers"][t.name] = {"ms_per_step": med, "train_elbo_tail": last,
                                       "fixed_set_elbo": fixed}
        print(f"{t.name:<12}{med:>10.2f}{last:>32.2f}{fixed:>18.2f}")
    r = results["trainers"]
    if "disarm" in r:
        results["ratio_ours_over_hand"] = r["disarm"]["ms_per_step"] / r["hand"]["ms_per_step"]
        print(f"ratio DisARM_ELBO / hand-written ms/step: {results['ratio_ours_over_hand']:.2f}")
    results["ratio_tracegraph_over_hand"] = r["tracegraph"]["ms_per_step"] / r["hand"]["ms_per_step"]
    print(f"ratio TraceGraph_ELBO / hand-written ms/step: {results['ratio_tracegraph_over_hand']:.2f}")

    # 2. Encoder-gradient variance at a fixed point (the hand-written trainer's
    #    final parameters), one fixed minibatch.
    state = copy.deepcopy(next(t for t in trainers if t.name == "hand").net.state_dict())
    idx0, xb0 = next(train.batches(args.batch_size, np.random.default_rng(123), num_steps=1))
    x0 = torch.as_tensor(xb0, device=device)
    i0 = torch.as_tensor(idx0, device=device)
    gv = grad_variance(trainers, state, x0, i0, num_data, args.grad_draws)
    print(f"\n== encoder.weight gradient variance, {args.grad_draws} draws, fixed params "
          f"(hand-written trainer after {args.steps} steps) and fixed minibatch")
    print("   (chi2/dof: |mean - mean_hand|^2 / sum((var + var_hand) / draws); ~1 when both "
          "estimate the same gradient)")
    ref = gv["hand"]
    for name, v in gv.items():
        line = f"{name:<12} sum of per-coordinate variances {v['var_sum']:.4e}"
        if name != "hand":
            chi = ((v["mean"] - ref["mean"]) ** 2).sum().item() / (
                (v["var_sum"] + ref["var_sum"]) / args.grad_draws)
            line += f"   chi2/dof vs hand {chi:.2f}"
        print(line)
    results["grad_var_sum"] = {k: v["var_sum"] for k, v in gv.items()}
    denom = "disarm" if "disarm" in gv else "hand"
    results["var_ratio_tracegraph_over_" + denom] = gv["tracegraph"]["var_sum"] / gv[denom]["var_sum"]
    print(f"variance ratio TraceGraph_ELBO / {denom}: "
          f"{results['var_ratio_tracegraph_over_' + denom]:.1f}")
    if "disarm" in gv:
        results["var_ratio_hand_over_disarm"] = gv["hand"]["var_sum"] / gv["disarm"]["var_sum"]
        print(f"variance ratio hand-written / DisARM_ELBO: {results['var_ratio_hand_over_disarm']:.2f}"
              " (should be ~1)")
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="training steps per trainer")
    p.add_argument("--block", type=int, default=50, help="steps per interleaved block")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--hidden", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch.set_num_threads (default: all cores, %(default)s)")
    p.add_argument("--grad-draws", type=int, default=200)
    p.add_argument("--shape-batches", type=int, nargs="*", default=None,
                   help="batch sizes of the performance-shape timing (default 1 50 500; "
                        "on a GPU 1 50 500 5000)")
    p.add_argument("--shape-steps", type=int, default=200,
                   help="timed steps per trainer and batch size in the performance shape")
    p.add_argument("--shape-block", type=int, default=10,
                   help="steps per interleaved block in the performance shape (rounds = "
                        "shape-steps / shape-block)")
    p.add_argument("--shape-trainers", nargs="*", default=SHAPE_TRAINERS,
                   choices=SHAPE_TRAINERS + OTHER_TRAINERS,
                   help="trainers timed in the performance shape")
    p.add_argument("--shape-only", action="store_true",
                   help="only the performance shape (no training comparison, no variance)")
    p.add_argument("--no-torch-compile", dest="torch_compile", action="store_false",
                   help="leave out the torch.compile'd hand-written step (inductor compiles "
                        "once per batch size: minutes on a small CPU)")
    p.add_argument("--validation", action="store_true", help="Pyro validation on")
    p.add_argument("--out", type=Path, default=Path("out/bench"))
    add_data_argument(p)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    pyro.enable_validation(args.validation)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    device = torch.device(args.device)
    if args.shape_batches is None:
        args.shape_batches = [1, 50, 500] + ([5000] if device.type == "cuda" else [])
    print(f"# device: {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f" ({torch.get_num_threads()} threads)"), flush=True)
    rng = np.random.default_rng(args.seed)

    which = ["disarm", "hand", "tracegraph"]
    if DisARM_ELBO is None:
        print(f"# pyro_binary_grads.DisARM_ELBO not available ({DISARM_IMPORT_ERROR}); "
              "running hand-written and TraceGraph_ELBO only", file=sys.stderr)
        which.remove("disarm")

    train = load_mnist(args.data, args.binarize, "train")
    num_data = len(train)
    base = SBN(train.dim, args.hidden, output_bias_init(train), centring_offset(train)).to(device)
    x_eval = torch.as_tensor(train.fixed_binarization(2000, seed=1), device=device)
    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "validation": args.validation,
        "binarize": args.binarize,
        "data": str(args.data),
    }
    print("#", json.dumps(info))

    results = {}
    if not args.shape_only:
        results = train_and_compare(args, base, train, num_data, x_eval, rng, device, which)

    # 3. Performance shape: ms/step at batch 1, 50, 500 (fresh trainers, interleaved).
    shape_which = [t for t in args.shape_trainers if t != "hand_compiled" or args.torch_compile]
    if DisARM_ELBO is None:
        shape_which = [t for t in shape_which if "disarm" not in t]
    shape = performance_shape(args, base, train, num_data, device, shape_which)
    results["shape_ms_per_step"] = shape

    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"bench_pyro_disarm_{args.device}{'_shape' if args.shape_only else ''}.json"
    with open(out, "w") as fh:
        json.dump({**info, **results}, fh, indent=1)
    print(f"# written: {out}")


if __name__ == "__main__":
    main()
