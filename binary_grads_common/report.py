"""
The result table of ``compare_estimators``, shared by ``pyro_binary_grads``
and ``numpyro_binary_grads`` (framework-neutral: NumPy only).
"""

import numpy as np

__all__ = ["Comparison", "EstimatorReport", "estimator_name", "named_estimators"]


class EstimatorReport:
    """
    The measurements of one estimator (one row of a :class:`Comparison`).

    :ivar str name: the estimator's label.
    :ivar int num_samples: gradient draws measured.
    :ivar float executions: Python calls of model plus guide per step (in
        NumPyro counted while one step is traced: under ``jit`` they happen
        once, at compile time; a vectorized call counts once).
    :ivar float evaluations: evaluations of the ELBO integrand per step, as
        the estimator reports them (``plan.num_evaluations`` times
        ``num_particles`` for this library's classes, ``num_particles`` for
        the framework's ELBOs).
    :ivar float ms_per_step: wall-clock milliseconds per gradient draw.
    :ivar dict mean: ``{param: mean gradient array}``.
    :ivar dict var: ``{param: gradient variance array}`` (unbiased, ``ddof=1``).
    :ivar dict exact: ``{param: exact gradient array}`` or ``None``.
    """

    def __init__(self, name, num_samples, executions, evaluations, ms_per_step, mean, var,
                 exact=None):
        self.name, self.num_samples = name, num_samples
        self.executions, self.evaluations, self.ms_per_step = executions, evaluations, ms_per_step
        self.mean, self.var, self.exact = mean, var, exact

    # -- summaries --------------------------------------------------------

    @property
    def group_variance(self):
        """``{param: summed variance of its elements}`` (one group per param name)."""
        return {k: float(v.sum()) for k, v in self.var.items()}

    @property
    def total_variance(self):
        """The summed variance of every gradient coordinate (the trace of the covariance)."""
        return float(sum(self.group_variance.values()))

    def _flat(self, d):
        return np.concatenate([np.ravel(d[k]) for k in self.var]) if self.var else np.zeros(0)

    @property
    def snr(self):
        """The median over coordinates of ``|mean| / std`` (coordinates with zero
        variance left out)."""
        m, v = np.abs(self._flat(self.mean)), self._flat(self.var)
        keep = v > 0
        return float(np.median(m[keep] / np.sqrt(v[keep]))) if keep.any() else float("nan")

    @property
    def bias(self):
        """``{param: mean - exact}``, or ``None`` without ``exact=True``."""
        if self.exact is None:
            return None
        return {k: self.mean[k] - self.exact[k] for k in self.mean}

    @property
    def z(self):
        """``{param: (mean - exact) / se}``, the bias in standard errors
        (``se = sqrt(var / num_samples)``; 0 where both bias and se are 0)."""
        if self.exact is None:
            return None
        out = {}
        for k in self.mean:
            se = np.sqrt(self.var[k] / self.num_samples)
            b = self.mean[k] - self.exact[k]
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.where(se > 0, b / np.where(se > 0, se, 1.0), np.where(b == 0, 0.0, np.inf))
            out[k] = z
        return out

    @property
    def max_abs_z(self):
        """The largest ``|z|`` over coordinates (about 3 to 4 for an unbiased
        estimator with a few dozen coordinates)."""
        if self.exact is None:
            return None
        z = self._flat(self.z)
        return float(np.max(np.abs(z))) if z.size else 0.0

    @property
    def rms_z(self):
        """The root mean square of ``z`` over coordinates (about 1 when unbiased)."""
        if self.exact is None:
            return None
        z = self._flat(self.z)
        return float(np.sqrt(np.mean(z**2))) if z.size else 0.0

    @property
    def relative_bias(self):
        """``||mean - exact|| / ||exact||`` over all coordinates."""
        if self.exact is None:
            return None
        b, e = self._flat(self.bias), self._flat(self.exact)
        return float(np.linalg.norm(b) / max(np.linalg.norm(e), 1e-300))

    def to_dict(self):
        """Plain Python numbers and lists (JSON-serialisable)."""
        out = {
            "name": self.name,
            "num_samples": self.num_samples,
            "executions_per_step": self.executions,
            "evaluations_per_step": self.evaluations,
            "ms_per_step": self.ms_per_step,
            "total_variance": self.total_variance,
            "snr": self.snr,
            "params": {
                k: {
                    "mean": np.asarray(self.mean[k]).tolist(),
                    "var": np.asarray(self.var[k]).tolist(),
                    "variance": self.group_variance[k],
                }
                for k in self.var
            },
        }
        if self.exact is not None:
            out.update(max_abs_z=self.max_abs_z, rms_z=self.rms_z,
                       relative_bias=self.relative_bias)
            for k in self.var:
                out["params"][k].update(exact=np.asarray(self.exact[k]).tolist(),
                                        bias=np.asarray(self.bias[k]).tolist(),
                                        z=np.asarray(self.z[k]).tolist())
        return out


class Comparison:
    """
    The result of :func:`compare_estimators`: one :class:`EstimatorReport`
    per estimator (``comparison.rows``, or ``comparison["DisARM_ELBO"]``).
    ``print(comparison)`` shows one aligned row per estimator and one
    variance column per parameter group; :meth:`to_dict` gives plain data.
    """

    def __init__(self, rows):
        self.rows = list(rows)

    def __getitem__(self, name):
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def to_dict(self):
        """``{estimator name: EstimatorReport.to_dict()}``."""
        return {row.name: row.to_dict() for row in self.rows}

    def columns(self):
        """The table as ``(header, rows of strings)``."""
        groups = list(self.rows[0].var) if self.rows else []
        exact = any(r.exact is not None for r in self.rows)
        header = ["estimator", "exec/step", "evals/step", "ms/step", "total var", "SNR"]
        header += [f"var[{g}]" for g in groups]
        if exact:
            header += ["rel bias", "max|z|", "rms z"]
        body = []
        for r in self.rows:
            line = [r.name, f"{r.executions:g}", f"{r.evaluations:g}", f"{r.ms_per_step:.2f}",
                    f"{r.total_variance:.4g}", f"{r.snr:.3g}"]
            line += [f"{r.group_variance.get(g, float('nan')):.4g}" for g in groups]
            if exact:
                line += ["-", "-", "-"] if r.exact is None else [
                    f"{r.relative_bias:.3g}", f"{r.max_abs_z:.3g}", f"{r.rms_z:.3g}"]
            body.append(line)
        return header, body

    def __str__(self):
        header, body = self.columns()
        widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]

        def fmt(row):
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths)))

        lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
        n = {r.num_samples for r in self.rows}
        lines.append(f"({', '.join(map(str, sorted(n)))} gradient draws per estimator; "
                     "gradients of the loss w.r.t. unconstrained params)")
        return "\n".join(lines)

    __repr__ = __str__


def estimator_name(elbo):
    """A label for an ELBO instance: its class name plus its sample-size arguments."""
    name = type(elbo).__name__
    extra = [f"{k}={getattr(elbo, k)}" for k in ("num_samples", "num_pairs")
             if hasattr(elbo, k)]
    if getattr(elbo, "num_particles", 1) != 1:
        extra.append(f"num_particles={elbo.num_particles}")
    return f"{name}({', '.join(extra)})" if extra else name


def named_estimators(estimators):
    """``[(label, elbo)]`` from a list of ELBOs or a ``{label: elbo}`` dict;
    repeated labels get a ``#2``, ``#3`` suffix."""
    items = list(estimators.items()) if isinstance(estimators, dict) else [
        (estimator_name(e), e) for e in estimators]
    seen, out = {}, []
    for name, e in items:
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}#{seen[name]}", e))
    return out
