"""
Data loading shared by the examples and benchmarks (NumPy only, so the Pyro and
NumPyro examples can both use it).

Files are the ``.npz`` archives of ``shared/data/`` (see its README):

* ``mnist.npz`` / ``fashion_mnist.npz``: ``x_train`` (60000, 784) and ``x_test``
  (10000, 784), ``uint8`` grey levels 0..255.  Splits follow DisARM (Dong, Mnih &
  Tucker 2020): ``train`` = ``x_train[:50000]``, ``valid`` = ``x_train[50000:]``,
  ``test`` = ``x_test``; ``train_full`` = all 60000 training images.
* ``binarized_mnist.npz`` (Larochelle & Murray's static binarization): ``x_train``
  (50000), ``x_valid`` (10000), ``x_test`` (10000), already 0/1.

Binarization schemes (``binarize=``):

* ``"dynamic"``: a fresh ``Bernoulli(x / 255)`` draw every time an example is
  used (every minibatch, every epoch).  Evaluation sets use one fixed draw with a
  stated seed (:meth:`Dataset.fixed_binarization`).
* ``"threshold"``: ``x > 127`` (i.e. ``x / 255 > 0.5``), deterministic.
* ``"static"``: one Bernoulli draw made once at load time with ``static_seed``
  (the way ARM's code binarizes Omniglot); for ``binarized_mnist.npz`` the file's
  own fixed binarization is used as it is.

Results under different schemes are not comparable: state the scheme with any
number you report.
"""

from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_PATH = DATA_DIR / "mnist.npz"

BINARIZE_CHOICES = ("dynamic", "static", "threshold")
SPLIT_CHOICES = ("train", "valid", "test", "train_full")


def default_data_path(name="mnist.npz"):
    """``<repo>/../shared/data/<name>``, resolved from this file's location."""
    return DATA_DIR / name


def add_data_argument(parser):
    """Add ``--data PATH`` and ``--binarize`` to an ``argparse`` parser."""
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_PATH,
        help="path to mnist.npz / fashion_mnist.npz / binarized_mnist.npz "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--binarize",
        choices=BINARIZE_CHOICES,
        default="dynamic",
        help="binarization scheme (default: %(default)s)",
    )
    return parser


class Dataset:
    """
    One split of an image data set.

    ``probs`` holds ``float32`` values in ``[0, 1]`` of shape ``(n, 784)``: grey
    levels / 255 for ``binarize="dynamic"``, the binary pixels otherwise.
    :meth:`binarized` returns binary ``float32`` pixels for given rows (a fresh
    draw for dynamic binarization).
    """

    def __init__(self, probs, binarize, name=""):
        self.probs = np.ascontiguousarray(probs, dtype=np.float32)
        self.binarize = binarize
        self.name = name

    def __len__(self):
        return self.probs.shape[0]

    @property
    def dim(self):
        return self.probs.shape[1]

    def binarized(self, idx, rng):
        """Binary pixels of rows ``idx``; fresh Bernoulli draws if dynamic."""
        p = self.probs[idx]
        if self.binarize == "dynamic":
            return (rng.random(p.shape, dtype=np.float32) < p).astype(np.float32)
        return p.copy()

    def fixed_binarization(self, n=None, seed=0):
        """
        ``n`` rows (all if ``None``) binarized once: a single Bernoulli draw with
        ``seed`` for dynamic binarization, the stored pixels otherwise.  A subset
        (``n < len``) is a random one drawn with ``seed``, in sorted order, not the
        first ``n`` rows (``binarized_mnist.npz``'s test file is not shuffled: it
        starts with a run of zeros).  Use it for evaluation sets and say which
        seed was used.
        """
        rng = np.random.default_rng(seed)
        if n is None or n >= len(self):
            idx = np.arange(len(self))
        else:
            idx = np.sort(rng.choice(len(self), size=n, replace=False))
        return self.binarized(idx, rng)

    def mean(self):
        """Per-pixel mean of the split (probabilities; the data mean under dynamic binarization)."""
        return self.probs.mean(axis=0)

    def batches(self, batch_size, rng, num_steps=None, shuffle=True, drop_last=True):
        """
        Minibatch iterator yielding ``(idx, x)`` with ``idx`` the ``int64`` row
        indices (for a subsampled ``pyro.plate``) and ``x`` the binarized
        ``float32`` pixels.  Reshuffles every epoch; stops after ``num_steps``
        batches (``None``: one epoch).
        """
        n = len(self)
        step = 0
        while True:
            order = rng.permutation(n) if shuffle else np.arange(n)
            stop = n - batch_size + 1 if drop_last else n
            for start in range(0, max(stop, 1), batch_size):
                idx = order[start : start + batch_size]
                yield idx, self.binarized(idx, rng)
                step += 1
                if num_steps is not None and step >= num_steps:
                    return
            if num_steps is None:
                return


def _is_prebinarized(archive):
    return "x_valid" in archive.files


def load_mnist(path=None, binarize="dynamic", split="train", static_seed=0):
    """
    Load one split of an MNIST-layout ``.npz`` archive as a :class:`Dataset`.

    :param path: ``.npz`` file; default ``shared/data/mnist.npz`` next to the repo.
    :param binarize: ``"dynamic"``, ``"static"`` or ``"threshold"`` (see module doc).
    :param split: ``"train"`` (first 50000), ``"valid"`` (last 10000 of the
        training file), ``"test"``, or ``"train_full"`` (train + valid).
    :param static_seed: seed of the one-off draw for ``binarize="static"`` on a
        grey-level file (the same seed gives the same binarization in every split).
    """
    if binarize not in BINARIZE_CHOICES:
        raise ValueError(f"binarize must be one of {BINARIZE_CHOICES}, got {binarize!r}")
    if split not in SPLIT_CHOICES:
        raise ValueError(f"split must be one of {SPLIT_CHOICES}, got {split!r}")
    path = Path(DEFAULT_PATH if path is None else path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found; pass --data PATH (expected the layout of shared/data/README.md)"
        )
    with np.load(path) as d:
        if _is_prebinarized(d):
            if binarize != "static":
                raise ValueError(
                    f"{path.name} is already binarized (Larochelle & Murray); "
                    f"use binarize='static', not {binarize!r}"
                )
            parts = {"train": d["x_train"], "valid": d["x_valid"], "test": d["x_test"]}
            if split == "train_full":
                x = np.concatenate([parts["train"], parts["valid"]])
            else:
                x = parts[split]
            return Dataset(x.astype(np.float32), "static", f"{path.stem}:{split}")

        if split == "test":
            x = d["x_test"]
        else:
            x = d["x_train"]
            rows = {"train": slice(0, 50000), "valid": slice(50000, None), "train_full": slice(None)}
            row_slice = rows[split]
    if binarize == "threshold":
        probs = (x > 127).astype(np.float32)
    else:
        probs = x.astype(np.float32) / 255.0
        if binarize == "static":
            # One draw over the whole file, so train/valid rows get the same
            # binarization whichever split is asked for.
            rng = np.random.default_rng(static_seed + (1 if split == "test" else 0))
            probs = (rng.random(probs.shape, dtype=np.float32) < probs).astype(np.float32)
    if split != "test":
        probs = probs[row_slice]
    return Dataset(probs, binarize, f"{path.stem}:{split}")


def output_bias_init(train, eps=1e-3):
    """
    Logit of the clipped per-pixel training mean: the decoder output bias init
    used by REBAR / DisARM ("output bias initialized to the data statistics").
    """
    m = np.clip(train.mean(), eps, 1 - eps)
    return (np.log(m) - np.log1p(-m)).astype(np.float32)


def centring_offset(train):
    """
    Per-pixel training mean, to subtract from the inference network's input
    (REBAR App. G: "input to the inference network centred by the training mean").
    """
    return train.mean().astype(np.float32)
