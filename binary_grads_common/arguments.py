"""
Checks of the ELBO classes' constructor arguments: a bad value raises a
``ValueError`` at construction that names the class, the argument and the
value, instead of a NaN, a division by zero or an XLA error at the first step.

Pure Python (no JAX, no torch): the same checks serve both packages.
"""

import math
import numbers

__all__ = ["check_bool", "check_count", "check_finite", "check_vectorize_particles"]


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_count(owner, name, value, minimum=1):
    """``value`` as an ``int >= minimum``; raise naming ``owner`` and ``name`` otherwise."""
    if not _is_int(value):
        # integral floats (4.0) are accepted, as NumPy shapes accept them
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and \
                math.isfinite(value) and float(value).is_integer():
            value = int(value)
        else:
            raise ValueError(
                f"{owner} needs an integer {name} >= {minimum}, got {value!r} "
                f"({type(value).__name__})."
            )
    if value < minimum:
        raise ValueError(f"{owner} needs {name} >= {minimum}, got {value}.")
    return int(value)


def check_bool(owner, name, value):
    """``value`` as a bool; a string such as ``"no"`` (truthy) raises."""
    if isinstance(value, bool):
        return value
    if getattr(value, "shape", None) == () and getattr(getattr(value, "dtype", None), "kind",
                                                       None) == "b":
        return bool(value)  # a NumPy / JAX bool scalar
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{owner} needs {name}=True or False, got {value!r} ({type(value).__name__}).")


def check_finite(owner, name, value, low=-math.inf, high=math.inf, low_open=False,
                 high_open=False, hint=""):
    """``value`` as a finite float in ``[low, high]`` (open ends if asked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{owner} needs a number for {name}, got {value!r} ({type(value).__name__})."
        )
    value = float(value)
    bad = not math.isfinite(value)
    bad = bad or value < low or (low_open and value == low)
    bad = bad or value > high or (high_open and value == high)
    if bad:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(
            f"{owner} needs a finite {name} in {lo}{low:g}, {high:g}{hi}, got {value!r}."
            + (f" {hint}" if hint else "")
        )
    return value


def check_vectorize_particles(owner, value):
    """NumPyro's ``vectorize_particles``: a bool or a callable."""
    if isinstance(value, bool) or callable(value):
        return value
    raise ValueError(
        f"{owner} needs vectorize_particles=True (jax.vmap), False (jax.lax.map) or a "
        f"callable such as jax.pmap, got {value!r} ({type(value).__name__})."
    )
