"""
Compiled ELBOs: the estimators' step traced once with :func:`pyro.ops.jit.trace`
(:func:`torch.jit.trace` plus Pyro's param capture) and replayed, as Pyro's
:class:`~pyro.infer.JitTrace_ELBO` and :class:`~pyro.infer.JitTraceGraph_ELBO`
do for theirs. The trace skips the Python of Pyro's tracing and of the site
mechanism; what it replays is the same tensor program as the eager class's
vectorized path.

The first step of each (model, guide) runs eagerly (it discovers the guide's
structure and checks that the program broadcasts over the evaluation dim); the
second traces the step, later ones replay it. The noise is drawn inside the
trace from torch's global generator (``torch.rand``), so every step draws afresh
(a seeded generator would be baked into the trace as a constant).

As for Pyro's compiled ELBOs, only static programs compile: the same sites,
shapes and control flow at every step, every ``pyro.param`` created on the
first step, one trace per distinct ``**kwargs``. Tensor positional arguments
are the trace's inputs; other positional arguments (a Python ``num_data``) are
constants of it, one trace per distinct value (Pyro's own compiled ELBOs refuse
them). A program that does not broadcast,
or whose trace fails, raises an error that names the eager class to use.
"""

import weakref

import torch

import pyro
import pyro.ops.jit
from pyro.util import warn_if_nan

from .elbo import ARM_ELBO, DisARM_ELBO, RLOO_ELBO
from .multisample import VIMCO, LocalDisARM_IWAE

__all__ = ["JitARM_ELBO", "JitDisARM_ELBO", "JitRLOO_ELBO", "JitVIMCO", "JitLocalDisARM_IWAE"]


class _Compiled:
    """Mixin: ``loss_and_grads`` traced by :func:`pyro.ops.jit.trace`."""

    def __init__(self, *args, **kwargs):
        # ignore_jit_warnings and jit_options are pyro.infer.ELBO's own arguments
        super().__init__(*args, **kwargs)
        self._compiled = {}
        self._tracing = False

    @property
    def _eager_name(self):
        return type(self).__name__[len("Jit"):]

    def __getstate__(self):
        state = super().__getstate__()
        state.update(_compiled={}, _tracing=False)
        return state

    def _check_static(self):
        prog = self._program
        bad = [v for v in prog.verdicts.values() if v is not None]
        if bad or prog.failed or not self.vectorize:
            why = prog.failed or (f"at {bad[0][0]}: {bad[0][1]}" if bad else "vectorize=False")
            raise NotImplementedError(
                f"{type(self).__name__} compiles only programs that broadcast over the "
                f"evaluation dim ({why}). Use {self._eager_name}, which runs this program "
                "on its sequential path."
            )

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """
        As the eager class's :meth:`loss_and_grads`; from the second step of a
        (model, guide) on, the step is a replayed trace.
        """
        # tensors are the trace's inputs; other positional arguments (a Python
        # num_data, say) are constants of it: one trace per distinct value
        consts = tuple((i, a) for i, a in enumerate(args) if not torch.is_tensor(a))
        tensors = tuple(a for a in args if torch.is_tensor(a))
        try:
            key = (id(model), id(guide), consts)
            hash(key)
        except TypeError:
            key = (id(model), id(guide), tuple((i, id(a)) for i, a in consts))
        fn = self._compiled.get(key)
        if fn is None:
            loss = super().loss_and_grads(model, guide, *args, **kwargs)  # eager, discovers
            self._check_static()
            weakself = weakref.ref(self)
            n = len(args)

            @pyro.ops.jit.trace(ignore_warnings=self.ignore_jit_warnings,
                                jit_options=self.jit_options)
            def step(*tensors, **kwargs):
                self = weakself()
                fixed, it = dict(consts), iter(tensors)
                full = tuple(fixed[i] if i in fixed else next(it) for i in range(n))
                return self._value_and_surrogate(model, guide, full, kwargs)

            self._compiled[key] = step
            return loss
        self._tracing = True
        try:
            loss, surr = fn(*tensors, **kwargs)
        except (RuntimeError, TypeError, NotImplementedError) as e:
            raise NotImplementedError(
                f"{type(self).__name__} could not compile this program with "
                f"pyro.ops.jit.trace ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                f"Use {self._eager_name}."
            ) from e
        finally:
            self._tracing = False
        if surr.requires_grad:
            surr.backward(retain_graph=self.retain_graph)
        loss = loss.item()
        warn_if_nan(loss, "loss")
        return loss


def _doc(eager):
    return f"""
    Like :class:`~pyro_binary_grads.{eager.__name__}` (below) but with
    :meth:`loss_and_grads` compiled by :func:`pyro.ops.jit.trace` (see
    :mod:`pyro_binary_grads.compiled`); ``ignore_jit_warnings`` and
    ``jit_options`` as for Pyro's ``JitTrace_ELBO``. For static programs that
    broadcast over the evaluation dim; others raise an error naming
    :class:`~pyro_binary_grads.{eager.__name__}`.

    {eager.__name__}:
    """ + (eager.__doc__ or "")


class JitARM_ELBO(_Compiled, ARM_ELBO):
    __doc__ = _doc(ARM_ELBO)


class JitDisARM_ELBO(_Compiled, DisARM_ELBO):
    __doc__ = _doc(DisARM_ELBO)


class JitRLOO_ELBO(_Compiled, RLOO_ELBO):
    __doc__ = _doc(RLOO_ELBO)


class JitVIMCO(_Compiled, VIMCO):
    __doc__ = _doc(VIMCO)


class JitLocalDisARM_IWAE(_Compiled, LocalDisARM_IWAE):
    __doc__ = _doc(LocalDisARM_IWAE)
