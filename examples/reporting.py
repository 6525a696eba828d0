"""
The examples' run reporting: the training loop with tqdm and checkpoints
(:func:`train`), the plot (:func:`save_plot`), the drift check
(:func:`drift_summary`: the training objective of the best and of the last tenth
of the run), the final JSON line (:func:`finish`) and the readable summary
(:func:`print_summary`).
"""

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import checkpoint  # examples/checkpoint.py


def check_outputs(args, name, suffixes=(".json", ".png")):
    """Refuse to start (``SystemExit``) when ``<out>/<name>`` outputs of an earlier
    run exist and ``--overwrite`` was not given."""
    if getattr(args, "overwrite", False):
        return
    found = [args.out / f"{name}{s}" for s in suffixes if (args.out / f"{name}{s}").exists()]
    if found:
        raise SystemExit(
            f"{found[0]} exists (an earlier run with these settings). Pass --overwrite to "
            "replace it, or --tag SUFFIX / --out DIR to keep both."
        )


def print_summary(result):
    """One readable line: train objective (last tenth), test bound(s), ms/step, plot."""
    parts = [f"{result.get('example', 'run')} [{result.get('backend')}"
             + (f", {result['estimator']}" if "estimator" in result else "") + "]",
             f"{result.get('steps')} steps"]
    train = result.get("train_objective_last10pct")
    if train is not None:
        parts.append(f"train objective {train:.2f} (mean of the last tenth)")
    for k, v in result.items():
        if k.startswith("test_bound_") and not k.endswith("_subset") and v is not None:
            size = result.get("test_size")
            parts.append(f"test {k[len('test_bound_'):]}-sample bound {v:.2f}"
                         + (f" ({size} examples)" if size else ""))
    if result.get("ms_per_step") is not None:
        parts.append(f"{result['ms_per_step']:.1f} ms/step")
    if result.get("plot"):
        parts.append(f"plot {result['plot']}")
    print(" | ".join(parts), flush=True)


def train(args, trainer, batches, step_args, evaluate, desc):
    """
    The training loop: ``loss = trainer.step(*step_args(batch))`` for each
    batch; ``evaluate(step)`` (a float) at step 0, every ``args.eval_every``
    steps and at the end. Returns ``history`` [(step, -loss)], ``tests``
    [(step, value)], training seconds (excluding evaluations; includes the
    first steps' compilation under jit, reported apart as ``first_step_s``).
    With each evaluation it keeps ``trainer.adapted()`` (REBAR/RELAX's adapted
    temperature and eta, when there are any) in ``args.adapted`` [(step, dict)],
    checkpointed with the loop; :func:`finish` writes it as ``adapted``.
    """
    from tqdm import tqdm

    if getattr(args, "eval_every", None) is None:
        args.eval_every = max(1, min(10_000, (args.num_steps or 10_000) // 10))
    ckpt = checkpoint.Resumable(
        getattr(args, "checkpoint", None) or Path(args.out) / f"{desc.replace('/', '_')}.ckpt",
        getattr(args, "checkpoint_every", 0), getattr(args, "resume", False))
    loop, batches = ckpt.start(trainer, batches, checkpoint.settings_of(args))
    adapted = getattr(trainer, "adapted", dict)
    if loop is None:
        loop = {"step": 0, "history": [], "tests": [(0, evaluate(0))], "train_time": 0.0,
                "first": None, "running": None, "resumed_at": [], "adapted": []}
        values = adapted()
        if values:
            loop["adapted"].append((0, values))
    else:
        loop["resumed_at"].append(loop["step"])
        loop.setdefault("adapted", [])  # checkpoints written before it was recorded
    history, tests, start = loop["history"], loop["tests"], loop["step"]
    train_time, first, running = loop["train_time"], loop["first"], loop["running"]
    args.resumed_at, args.adapted = loop["resumed_at"], loop["adapted"]
    bar = tqdm(batches, total=args.num_steps, initial=start, disable=args.no_progress,
               file=sys.stderr, desc=desc, mininterval=2.0)
    for step, batch in enumerate(bar, start + 1):
        t = time.perf_counter()
        loss = trainer.step(*step_args(batch))
        dt = time.perf_counter() - t
        if first is None:
            first = dt
        else:
            train_time += dt
        value = -loss / args.num_data
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss at step {step}: {loss}")
        history.append((step, value))
        running = value if running is None else 0.99 * running + 0.01 * value
        if step % args.eval_every == 0 or step == args.num_steps:
            tests.append((step, evaluate(step)))
            values = adapted()
            if values:
                args.adapted.append((step, values))
        if step % 50 == 0 or step == args.num_steps:
            bar.set_postfix(train=f"{running:.2f}", test=f"{tests[-1][1]:.2f}")
        ckpt.maybe_save(step, args.num_steps, trainer, {
            "step": step, "history": history, "tests": tests, "train_time": train_time,
            "first": first, "running": running, "resumed_at": args.resumed_at,
            "adapted": args.adapted})
    bar.close()
    ckpt.finish()
    return history, tests, train_time, first or 0.0


def save_plot(path, history, tests, title, test_label, ylabel="nats per example", final=None):
    """
    The training curve (per step and smoothed), the periodic test bound
    (``tests``, every point inside the axes, the first included) and, with
    ``final = (value, n)``, the final test bound on ``n`` examples (the full
    test set by default) as a star at the last step. Returns the y limits.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([h[0] for h in history])
    values = np.array([h[1] for h in history])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(steps, values, color="0.8", lw=0.5, label="train objective (minibatch)")
    w = min(200, len(values) // 5)
    if w > 1:
        smooth = np.convolve(values, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, color="C0", label=f"train objective ({w}-step mean)")
    points = [t[1] for t in tests]
    if tests:
        ts = np.array(tests)
        ax.plot(ts[:, 0], ts[:, 1], "o-", color="C1", label=test_label)
    if final is not None:
        value, n = final
        ax.plot([steps[-1] if len(steps) else 0], [value], "*", color="C3", ms=12,
                label=f"final test bound, {n} examples: {value:.2f}")
        points.append(value)
    # the y range: the curve without its first tenth (the initial transient) and
    # every test point
    tail = values[len(values) // 10 :] if len(values) > 20 else values
    lo = min([np.percentile(tail, 1)] + points) if len(tail) else min(points)
    hi = max([values.max()] + points) if len(values) else max(points)
    pad = 0.05 * (hi - lo) + 1
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ax.get_ylim()


def drift_summary(history, parts=10):
    """
    The training objective averaged over each tenth of the run: the best tenth,
    the last tenth, and ``drift`` = best - last (nats; > 2 marks a run that got
    worse while it trained, as a collapsing estimator does). ``None`` values for
    runs shorter than ``parts`` steps.
    """
    values = np.array([h[1] for h in history], dtype=float)
    if len(values) < parts:
        return {"train_objective_best_tenth": None, "train_objective_last_tenth": None,
                "train_objective_drift": None}
    means = [float(c.mean()) for c in np.array_split(values, parts)]
    best, last = max(means), means[-1]
    return {"train_objective_best_tenth": best, "best_tenth_index": int(np.argmax(means)),
            "train_objective_last_tenth": last, "train_objective_drift": best - last}


def finish(args, name, result, history, tests):
    """
    Write ``<out>/<name>.json`` (with the curves) and print the JSON line; the
    line gets :func:`drift_summary`'s fields.
    """
    result = {**result, **drift_summary(history)}
    if getattr(args, "resumed_at", None):
        result["resumed_at"] = list(args.resumed_at)  # steps of the checkpoints resumed from
    if getattr(args, "adapted", None):
        result["adapted"] = list(args.adapted)  # [(step, {adapted param: value})]
    with open(args.out / f"{name}.json", "w") as fh:
        json.dump({**result, "history": history, "tests": tests}, fh)
    print(json.dumps(result), flush=True)
    return result


def mean_last(history, frac=0.1, at_least=100):
    n = max(1, min(len(history), max(at_least, int(len(history) * frac))))
    return float(np.mean([h[1] for h in history[-n:]]))

