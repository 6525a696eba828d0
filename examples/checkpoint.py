"""
Checkpoints of a training run, so that a full-budget run longer than one
sitting is split and resumed rather than skipped (``--checkpoint-every STEPS``
and ``--resume`` of the examples; ``benchmarks/reproduce.py`` passes both).

A checkpoint holds the trainer's state (NumPyro: the ``SVIState``, i.e. the
parameters, the optimizer state and the ELBO's random key; Pyro: the param
store's unconstrained values, the torch optimizers' state and torch's random
state), the training
loop's history and timings, and the number of minibatches drawn. On resume
the minibatch iterator is rebuilt from its seed and advanced by that number
(drawing the same batches, untrained), so a resumed run sees the minibatches
and noise an uninterrupted run would have seen (``tests/test_examples_cli.py``
checks this: a run stopped and resumed ends with the parameters of an
uninterrupted one).

The file is written next to the run's outputs as ``NAME.ckpt`` (a pickle:
load only checkpoints you wrote), atomically (written to a temporary name,
then renamed), and removed when the run finishes.
"""

import os
import pickle
from pathlib import Path

#: format version written into every checkpoint
VERSION = 1

#: arguments that may differ between the parts of one run
FREE_ARGS = frozenset({"resume", "checkpoint", "checkpoint_every", "no_progress", "overwrite",
                       "threads", "out", "resumed_at", "adapted"})


def settings_of(args):
    """The run's arguments that must not change on resume."""
    return {k: str(v) for k, v in sorted(vars(args).items()) if k not in FREE_ARGS}


def path_for(args, name):
    return Path(args.out) / f"{name}.ckpt"


def trainer_state(trainer):
    """The trainer's state as plain (picklable) values."""
    if hasattr(trainer, "svi"):  # NumPyroTrainer
        import jax

        return {"backend": "numpyro", "state": jax.device_get(trainer.state)}
    import torch

    store = trainer.bk.pyro.get_param_store()
    return {"backend": "pyro",
            "params": {k: store._params[k].detach().clone() for k in store.keys()},
            "optims": [o.state_dict() for o in trainer.optims],
            "torch_rng": torch.get_rng_state(),
            # a run on a GPU draws its noise there (the ST family's torch.rand)
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def restore_trainer(trainer, saved):
    if saved["backend"] == "numpyro":
        import jax
        import jax.numpy as jnp

        trainer.state = jax.tree_util.tree_map(jnp.asarray, saved["state"])
        return
    import torch

    store = trainer.bk.pyro.get_param_store()
    with torch.no_grad():  # in place: the optimizers hold these tensors
        for k, v in saved["params"].items():
            store._params[k].copy_(v)
    for o, s in zip(trainer.optims, saved["optims"]):
        o.load_state_dict(s)
    torch.set_rng_state(saved["torch_rng"])
    if saved.get("cuda_rng") is not None:  # (checkpoints before 2026-12-07 have none)
        torch.cuda.set_rng_state_all(saved["cuda_rng"])


def save(path, trainer, loop):
    """Write ``loop`` (the training loop's state: step, history, tests,
    timings) and the trainer's state to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        pickle.dump({"version": VERSION, "loop": loop, "trainer": trainer_state(trainer)}, fh)
    os.replace(tmp, path)


def load(path, trainer):
    """The saved loop state, with ``trainer`` restored; ``None`` if there is
    no checkpoint at ``path``."""
    path = Path(path)
    if not path.exists():
        return None
    with open(path, "rb") as fh:
        saved = pickle.load(fh)
    if saved.get("version") != VERSION:
        raise SystemExit(f"{path}: a checkpoint of format {saved.get('version')}, this "
                         f"program reads {VERSION}; remove it to start afresh")
    restore_trainer(trainer, saved["trainer"])
    return saved["loop"]


class Resumable:
    """The checkpointing of one run of :func:`common.train`: ``every`` steps
    (0: never) to ``path``; ``resume``: continue from ``path`` if it exists."""

    def __init__(self, path, every=0, resume=False):
        self.path, self.every, self.resume = Path(path), int(every or 0), resume

    def start(self, trainer, batches, settings=None):
        """``(loop, batches)``: the saved loop state (``None`` when starting
        afresh) and the minibatch iterator advanced past the batches drawn.
        ``settings`` (the run's arguments) must equal the saved run's."""
        self.settings = settings
        loop = load(self.path, trainer) if self.resume else None
        if loop is not None and loop.get("settings") != settings:
            diff = sorted(k for k in set(settings or {}) | set(loop.get("settings") or {})
                          if (settings or {}).get(k) != (loop.get("settings") or {}).get(k))
            raise SystemExit(f"{self.path} is a checkpoint of a run with other settings "
                             f"({', '.join(diff)}); remove it or run with its settings")
        batches = iter(batches)
        for _ in range(loop["step"] if loop else 0):
            next(batches)
        return loop, batches

    def maybe_save(self, step, num_steps, trainer, loop):
        if self.every and step % self.every == 0 and step != num_steps:
            save(self.path, trainer, {**loop, "settings": self.settings})

    def finish(self):
        if self.path.exists():
            self.path.unlink()
