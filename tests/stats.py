"""Statistical helpers for unbiasedness tests (numpy only). See DESIGN.md, "Tests that are
statistically sound".

Typical use (draws: one gradient vector per vectorized particle or per step, flattened)::

    draws = stats.batch_means(per_draw_grads, num_batches=30)   # (30, D)
    res = stats.check_unbiased(draws, exact)                    # asserts |mean-exact| <= 5 se + tol
    stats.assert_powerful(res)                                  # max_i 0.1|exact_i|/se_i >= 8.1

Power: with the test statistic z_i = (mean_i - exact_i)/se_i and a 10% scaling bias
(mean_i -> 1.1 exact_i), z_i is centred at 0.1 |exact_i| / se_i; if that is >= 8.1 the
probability that |z_i| <= 5 is at most P(N(0,1) <= 5 - 8.1) = P(N(0,1) <= -3.1) < 0.001.
"""
from dataclasses import dataclass

import numpy as np

__all__ = ["CheckResult", "check_unbiased", "batch_means", "assert_powerful", "flatten_grads"]


@dataclass
class CheckResult:
    mean: np.ndarray
    exact: np.ndarray
    se: np.ndarray
    z: np.ndarray
    power: float          # max_i 0.1 * |exact_i| / se_i
    n: int
    names: list = None

    @property
    def max_abs_z(self):
        return float(np.max(np.abs(self.z))) if self.z.size else 0.0

    def table(self, max_rows=40):
        return _table(self.mean, self.exact, self.se, self.z, self.names, max_rows)

    def __str__(self):
        return (f"CheckResult(n={self.n}, max|z|={self.max_abs_z:.2f}, power={self.power:.2f})\n"
                + self.table())


def _names(D, names):
    if names is None:
        return [str(i) for i in range(D)]
    names = list(names)
    assert len(names) == D, (len(names), D)
    return names


def _table(mean, exact, se, z, names, max_rows=40, bad=None):
    names = _names(mean.size, names)
    w = max([5] + [len(n) for n in names])
    lines = [f"{'coord':>{w}} {'mean':>13} {'exact':>13} {'se':>11} {'z':>8}"]
    order = np.argsort(-np.abs(z), kind="stable")[:max_rows]
    for i in order:
        flag = "  <-- FAIL" if bad is not None and bad[i] else ""
        lines.append(f"{names[i]:>{w}} {mean[i]:13.6g} {exact[i]:13.6g} {se[i]:11.4g} {z[i]:8.2f}{flag}")
    if mean.size > max_rows:
        lines.append(f"... ({mean.size - max_rows} more coordinates, sorted by |z|)")
    return "\n".join(lines)


def flatten_grads(grads, names=None):
    """{name: array} -> (flat vector, coordinate names like 'q_W[1,0]'), in ``names`` order
    (default: sorted keys). For per-draw dicts of arrays with a leading draw dim, flatten each
    draw with ``np.stack([flatten_grads(g)[0] for g in draws])``."""
    names = sorted(grads) if names is None else list(names)
    vals, labels = [], []
    for k in names:
        a = np.asarray(grads[k], dtype=np.float64)
        vals.append(a.reshape(-1))
        if a.ndim == 0:
            labels.append(k)
        else:
            labels += [f"{k}[{','.join(map(str, idx))}]" for idx in np.ndindex(a.shape)]
    return (np.concatenate(vals) if vals else np.zeros(0)), labels


def batch_means(draws, num_batches=30):
    """(N, D) draws -> (num_batches, D) means of consecutive equal-size batches (the last
    N % num_batches draws are dropped). Use when draws are not independent (e.g. one array of
    vectorized particles sharing something) or to cut memory; the SE of the mean of the
    returned rows is the batch-means SE."""
    draws = np.asarray(draws, dtype=np.float64)
    if draws.ndim == 1:
        draws = draws[:, None]
    N = draws.shape[0]
    if num_batches < 2 or N < num_batches:
        raise ValueError(f"need at least num_batches={num_batches} >= 2 draws, got {N}")
    m = N // num_batches
    return draws[: m * num_batches].reshape(num_batches, m, *draws.shape[1:]).mean(1)


def check_unbiased(draws, exact, z_max=5.0, names=None, rtol_floor=1e-9):
    """Assert that the mean of ``draws`` (N, D) matches ``exact`` (D,) in every coordinate:
    ``|mean - exact| <= z_max * se + rtol_floor * (1 + |exact|)``, se = std(ddof=1)/sqrt(N).

    ``draws`` are i.i.d. per-draw gradient vectors or batch means (>= 30 rows recommended).
    Coordinates with se == 0 (e.g. a masked element whose estimator is exactly 0) must match
    to the floor. Returns a ``CheckResult`` (z-scores, power) on success; raises AssertionError
    with a table of mean / exact / se / z otherwise."""
    draws = np.asarray(draws, dtype=np.float64)
    if draws.ndim == 1:
        draws = draws[:, None]
    exact = np.asarray(exact, dtype=np.float64).reshape(-1)
    N, D = draws.shape
    if exact.size != D:
        raise ValueError(f"draws have {D} coordinates, exact has {exact.size}")
    if N < 2:
        raise ValueError("need at least 2 draws")
    if not np.all(np.isfinite(draws)):
        raise AssertionError(f"non-finite draws in coordinates "
                             f"{[n for n, ok in zip(_names(D, names), np.isfinite(draws).all(0)) if not ok]}")
    mean = draws.mean(0)
    se = draws.std(0, ddof=1) / np.sqrt(N)
    tol = z_max * se + rtol_floor * (1.0 + np.abs(exact))
    dev = mean - exact
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, dev / np.where(se > 0, se, 1.0),
                     np.where(np.abs(dev) <= tol, 0.0, np.sign(dev) * np.inf))
        pw = np.where(se > 0, 0.1 * np.abs(exact) / np.where(se > 0, se, 1.0),
                      np.where(np.abs(exact) > 0, np.inf, 0.0))
    power = float(np.max(pw)) if D else 0.0
    bad = np.abs(dev) > tol
    if np.any(bad):
        raise AssertionError(
            f"biased in {int(bad.sum())} of {D} coordinates (N={N}, z_max={z_max}):\n"
            + _table(mean, exact, se, z, names, bad=bad))
    return CheckResult(mean=mean, exact=exact, se=se, z=z, power=power, n=N,
                       names=None if names is None else list(names))


def assert_powerful(result, threshold=8.1):
    """Assert ``result.power = max_i 0.1 |exact_i| / se_i >= threshold`` (8.1: a 10% scaling
    bias would be detected with >= 99.9% probability by the 5-sigma check)."""
    if not result.power >= threshold:
        raise AssertionError(
            f"test has too little power: max_i 0.1*|exact_i|/se_i = {result.power:.2f} < {threshold} "
            f"(N={result.n}); use more draws\n" + result.table())
    return result
