"""
Compiled ELBOs: the estimators' step traced once with :func:`torch.jit.trace`
(Pyro's parameters as the trace's inputs, as :func:`pyro.ops.jit.trace` does
for :class:`~pyro.infer.JitTrace_ELBO`) and replayed. The replay skips the
Python of Pyro's tracing and of the site mechanism; what it runs is the same
tensor program as the eager class's vectorized path.

The first step of each (model, guide) runs eagerly: it discovers the guide's
structure, checks that the program broadcasts over the evaluation dim, and
records which ``pyro.param`` sites the step reads (they become the trace's
inputs). The second step traces, later ones replay. The noise is drawn inside
the trace from torch's global generator (``torch.rand``), so every step draws
afresh (a seeded generator would be baked into the trace as a constant).

How the trace is run (measured on the one-layer SBN, batch 50, one CPU
thread; ``benchmarks/bench_pyro_disarm.py``): TorchScript's optimizing
executor would replace the graph by autodiff subgraphs whose backward runs
TorchScript's symbolic gradients (``softplus`` as ``exp``/``where``/``mul``,
several passes where autograd's kernel makes one), slower than eager autograd
on CPU. The trace is therefore run with
:func:`torch.jit.optimized_execution` off (set :attr:`optimize_trace` to
change it), after TorchScript's constant propagation, peephole, CSE and
dead-code passes have removed the tracer's bookkeeping (shape arithmetic,
repeated constants): about a third of the traced nodes.

:func:`torch.jit.trace` records the ops the step runs under ``torch.no_grad()``
but not the mode; the values that did not require grad in the traced run are
detached in the graph (:func:`_detach_no_grad_values`), so that the replayed
step is the eager one draw for draw (without it, the site mechanism's detached
guide log-probs would add a zero-mean score term to every gradient, and REBAR's
conditional noise would be differentiated: biased).

:class:`JitREBAR_ELBO`: with ``adapt=True`` REBAR's variance term needs
second-order :func:`torch.autograd.grad`, which a trace cannot record; the
trace computes the loss, the surrogate and the step's temperatures and etas,
and the term is added after each replay, through the replayed graph.

Inside :class:`~pyro.infer.SVI`, ``pyro.optim``'s one torch optimizer per
parameter and :func:`~pyro.infer.util.zero_grads` cost more than the replay's
own Python (at batch 1 a quarter of the step, at batch 50 a tenth):
:func:`pyro_binary_grads.optim.Adam` is a drop-in for ``pyro.optim.Adam`` with
one torch Adam for all parameters. At large batches glibc's allocator returns
the step's large buffers to the OS and page-faults new ones every step (batch
500: the replay 1.2x the hand-written step's forward and backward, 1.0-1.05x
with ``MALLOC_MMAP_THRESHOLD_=1073741824`` in the environment).

As for Pyro's compiled ELBOs, only static programs compile: the same sites
and control flow at every step, every ``pyro.param`` created on the first step.
The tensors among the arguments (positional or keyword, also inside tuples,
named tuples, lists and dicts) are the trace's inputs; other arguments (a
Python ``num_data``) are constants of it. Each program, number and shapes of
the tensor arguments and value of the other arguments has its own trace (a
short last minibatch gets its own: a Python branch on a shape, frozen by the
trace, once gave it a wrong gradient), at most :attr:`max_traces` of them, the
least recently used dropped with one warning. A step with an argument that is
neither a tensor nor hashable (a NumPy array) runs eagerly, with one warning:
a trace could not tell whether it changed. A non-tensor object changed in
place between steps is not seen by the replay (as for Pyro's compiled ELBOs,
whose ``**kwargs`` are constants). A replayed step with a non-finite loss
runs the eager step's check, which names a guide site with NaN or infinite
logits. A program that does not broadcast, or whose trace fails, raises an error
that names the eager class to use. A ``pyro.module`` whose parameters are not
the ones the param store holds under its name (a new module registered under a
name used before) raises an error that says so.
"""

import math
import warnings
import weakref
from collections import OrderedDict, defaultdict

import torch

import pyro
import pyro.poutine as poutine
from pyro.poutine.messenger import Messenger
from pyro.util import ignore_jit_warnings, warn_if_nan

from .elbo import ARM_ELBO, DisARM_ELBO, RLOO_ELBO
from .multisample import VIMCO, LocalDisARM_IWAE
from .relaxed import REBAR_ELBO
from .structure import preserved_rng

__all__ = ["JitARM_ELBO", "JitDisARM_ELBO", "JitRLOO_ELBO", "JitVIMCO", "JitLocalDisARM_IWAE",
           "JitREBAR_ELBO"]

_MODULE_DIVIDER = "$$$"  # pyro.module's "name$$$param" names


class ModuleNameReused(ValueError):
    """A ``pyro.module`` registered parameters other than those the param
    store holds under its name."""


class _ParamRecorder(Messenger):
    """
    Records the names of the ``pyro.param`` sites a step reads, and for each
    ``pyro.module`` parameter whether the module's own tensor is the one the
    param store returned. ``pyro.module(name, m)`` calls
    ``pyro.param("name$$$p", m.p)``; the store returns the tensor it already
    holds under that name, which is not ``m.p`` when another module was
    registered under ``name`` before: ``m`` then computes with parameters that
    are neither optimized nor inputs of a trace. (With
    ``update_module_params=True``, Pyro puts the store's tensors into ``m``
    after the first call: only the last call of each name counts.)
    """

    def __init__(self):
        super().__init__()
        self.names = {}  # name -> None, in first-read order
        self.foreign = {}  # module param name -> module tensor is not the store's

    def _pyro_post_param(self, msg):
        name = msg["args"][0]
        self.names.setdefault(name, None)
        init = msg["args"][1] if len(msg["args"]) > 1 else None
        if _MODULE_DIVIDER in name and torch.is_tensor(init) and init.requires_grad:
            value = msg["value"]
            stored = value.unconstrained() if hasattr(value, "unconstrained") else value
            self.foreign[name] = init is not value and init is not stored


def _detach_no_grad_values(graph):
    """
    Make the traced graph keep the eager run's ``torch.no_grad()`` regions:
    :func:`torch.jit.trace` records the ops run under ``no_grad`` but not the
    mode, so on replay gradients would flow through them (for the site
    mechanism's detached guide log-probs an extra zero-mean score term, for
    REBAR's conditional noise a biased gradient). The tracer does record
    whether each value required grad: every floating-point value that did not,
    although an input of its op did, is detached after the op. Returns the
    number of values detached.
    """
    count = 0
    for node in list(graph.nodes()):
        if not any(_requires_grad(v) for v in node.inputs()):
            continue
        for out in node.outputs():
            t = out.type()
            if not isinstance(t, torch._C.TensorType) or t.requires_grad() is not False \
                    or t.dtype() is None or not t.dtype().is_floating_point:
                continue
            detach = graph.create("aten::detach", [out])
            detach.insertAfter(node)
            detach.output().setType(t)
            out.replaceAllUsesAfterNodeWith(detach, detach.output())
            count += 1
    return count


def _requires_grad(value):
    t = value.type()
    return isinstance(t, torch._C.TensorType) and bool(t.requires_grad())


def _optimize_graph(graph):
    """TorchScript's graph clean-up passes (those its optimizing executor runs
    first), in place; a pass missing from this torch version is skipped. None
    of them moves or merges a nondeterministic op such as ``aten::rand``."""
    passes = (
        ("_jit_pass_inline", ()),
        ("_jit_pass_constant_propagation", ()),
        ("_jit_pass_peephole", (True,)),
        ("_jit_pass_cse", ()),
        ("_jit_pass_dce", ()),
    )
    for name, extra in passes:
        fn = getattr(torch._C, name, None)
        if fn is not None:
            fn(graph, *extra)


class _Trace:
    """
    ``fn(*tensors)`` traced by :func:`torch.jit.trace` with the unconstrained
    values of the ``pyro.param`` sites ``names`` as leading inputs, as
    :class:`pyro.ops.jit.CompiledFunction` does, but with the names recorded
    on the eager step (no extra param-capture run of ``fn``) and the graph
    cleaned up once (:func:`_optimize_graph`). Every call reads each parameter
    through ``pyro.param``, so that ``SVI``'s parameter capture sees them.
    """

    def __init__(self, fn, names, ignore_warnings=False, jit_options=None, optimize=True):
        self.fn = fn
        self.names = list(names)
        self.ignore_warnings = ignore_warnings
        self.jit_options = dict(jit_options or {})
        self.jit_options.setdefault("check_trace", False)
        self.optimize = optimize
        self.compiled = None
        self.state = None  # the ELBO's Python state of the tracing run

    def __call__(self, *tensors):
        params = tuple(pyro.param(name).unconstrained() for name in self.names)
        if self.compiled is None:
            weakself = weakref.ref(self)

            def replayed(*params_and_tensors):
                self = weakself()
                constrained = {name: pyro.param(name) for name in self.names}
                with _ParamRecorder() as seen, poutine.replay(params=constrained):
                    out = self.fn(*params_and_tensors[len(self.names):])
                new = [name for name in seen.names if name not in constrained]
                if new:
                    raise NotImplementedError(
                        f"the step created pyro.param {new[0]!r} after its first step; "
                        "compiled ELBOs need every parameter created on the first step")
                return out

            if self.ignore_warnings:
                replayed = ignore_jit_warnings()(replayed)
            with pyro.validation_enabled(False):
                compiled = torch.jit.trace(replayed, params + tensors, **self.jit_options)
            self.num_detached = _detach_no_grad_values(compiled.graph)
            if self.optimize:
                _optimize_graph(compiled.graph)
            self.compiled = compiled
        return self.compiled(*(params + tensors))


class _Compiled:
    """Mixin: ``loss_and_grads`` traced by :func:`torch.jit.trace` (see
    :mod:`pyro_binary_grads.compiled`)."""

    #: run the replayed trace with TorchScript's optimizing executor (autodiff
    #: subgraphs, symbolic gradients); off: eager autograd, faster on CPU
    optimize_trace = False
    #: run TorchScript's clean-up passes on the trace once
    optimize_graph = True
    #: traces kept (one per program, set of argument shapes and constant arguments)
    max_traces = 32

    def __init__(self, *args, **kwargs):
        # ignore_jit_warnings and jit_options are pyro.infer.ELBO's own arguments
        super().__init__(*args, **kwargs)
        self._compiled = OrderedDict()
        self._tracing = False
        self._warned_unhashable = self._warned_evicted = False

    @property
    def _eager_name(self):
        return type(self).__name__[len("Jit"):]

    def __getstate__(self):
        state = super().__getstate__()
        state.update(_compiled=OrderedDict(), _tracing=False)
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

    def _check_modules(self, recorder):
        foreign = [name for name, bad in recorder.foreign.items() if bad]
        if foreign:
            module = foreign[0].split(_MODULE_DIVIDER)[0]
            raise ModuleNameReused(
                f"pyro.module({module!r}, ...) registered an nn.Module whose parameters are "
                f"not the ones Pyro's param store holds under that name ({foreign[0]!r}): "
                f"another module was registered as {module!r} before, and the store kept "
                f"its parameters. {type(self).__name__} cannot trace a module whose "
                "parameters are not the store's (nor would SVI optimize them). Give each "
                "module its own name, call pyro.clear_param_store() before building new "
                "modules, or pass update_module_params=True to pyro.module to load the "
                "stored parameters into the module."
            )

    # -- what the trace computes (subclasses whose step is not one tensor program) --

    def _traced_step(self, model, guide, args, kwargs):
        """The tensors the trace computes: ``(loss, surrogate)``."""
        return self._value_and_surrogate(model, guide, args, kwargs)

    def _trace_state(self):
        """Python state of the tracing run that :meth:`_after_replay` needs."""
        return None

    def _after_replay(self, outputs, state):
        """``(loss, surrogate)`` from the trace's outputs (eager work after the replay)."""
        return outputs

    def _key(self, model, guide, spec):
        """The trace's key: the program, and the arguments' spec (tensor shapes,
        dtypes, devices; constants). None where a constant is unhashable."""
        try:
            key = (model, guide, spec)  # bound methods compare equal across calls
            hash(key)
            return key
        except TypeError:
            pass
        try:
            key = (id(model), id(guide), spec)
            hash(key)
            return key
        except TypeError:
            return None

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """
        As the eager class's :meth:`loss_and_grads`; from the second step of a
        (model, guide) with the same argument shapes on, the step is a replayed
        trace.
        """
        # tensors (also inside tuples, lists and dicts) are the trace's inputs; other
        # arguments (a Python num_data, say) are constants of it: one trace per
        # distinct value, and one per distinct set of tensor shapes
        tensors = []
        spec = _flatten((args, dict(sorted(kwargs.items()))), tensors)
        key = self._key(model, guide, spec)
        if key is None:
            if not self._warned_unhashable:
                self._warned_unhashable = True
                warnings.warn(
                    f"{type(self).__name__} runs this step eagerly: an argument of the "
                    "program is neither a tensor (nor a tuple, list or dict of them) nor "
                    "hashable, so a trace could not tell whether it changed since it "
                    "was traced. Pass it as a tensor for the compiled step, or use "
                    f"{self._eager_name}.",
                    UserWarning,
                    stacklevel=2,
                )
            return super().loss_and_grads(model, guide, *args, **kwargs)
        fn = self._compiled.get(key)
        if fn is None:
            with _ParamRecorder() as recorder:
                loss = super().loss_and_grads(model, guide, *args, **kwargs)  # eager, discovers
            self._check_modules(recorder)
            self._check_static()
            weakself = weakref.ref(self)

            def step(*tensors):
                self = weakself()
                args, kwargs = _unflatten(spec, iter(tensors))
                return self._traced_step(model, guide, args, kwargs)

            self._store(key, _Trace(step, recorder.names, self.ignore_jit_warnings,
                                    self.jit_options, self.optimize_graph))
            return loss
        self._compiled.move_to_end(key)
        self._tracing, tracing = True, fn.compiled is None
        try:
            with torch.jit.optimized_execution(self.optimize_trace):
                outputs = fn(*tensors)
            if tracing:
                fn.state = self._trace_state()
        except (RuntimeError, TypeError, NotImplementedError) as e:
            del self._compiled[key]
            raise NotImplementedError(
                f"{type(self).__name__} could not compile this program with "
                f"torch.jit.trace ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                f"Use {self._eager_name}."
            ) from e
        finally:
            self._tracing = False
        with torch.jit.optimized_execution(self.optimize_trace):
            loss, surr = self._after_replay(outputs, fn.state)
            loss = loss.item()  # (one sync, before the backward, as the eager step)
            if not math.isfinite(loss):
                self._name_bad_logits(model, guide, args, kwargs)
            if surr.requires_grad:
                surr.backward(retain_graph=self.retain_graph)
        warn_if_nan(loss, "loss")
        return loss

    def _store(self, key, trace):
        """Keeps at most :attr:`max_traces` traces, the least recently used dropped
        (with one warning: a program whose shapes or constant arguments change at
        every step recompiles at every step)."""
        if len(self._compiled) >= self.max_traces:
            self._compiled.popitem(last=False)
            if not self._warned_evicted:
                self._warned_evicted = True
                warnings.warn(
                    f"{type(self).__name__} has traced {self.max_traces} variants of its "
                    "step (one per program, set of argument shapes and value of the "
                    "non-tensor arguments) and drops the least recently used: each new "
                    "variant costs an eager step and a trace. If the shapes or the "
                    "non-tensor arguments change at every step, use "
                    f"{self._eager_name}, or pad the data to a few shapes.",
                    UserWarning,
                    stacklevel=3,
                )
        self._compiled[key] = trace

    def _name_bad_logits(self, model, guide, args, kwargs):
        """A non-finite replayed loss: the eager step's check, which raises naming a
        guide site with NaN or infinite logits (one eager evaluation, no gradient,
        the RNG left as it was)."""
        with torch.no_grad(), preserved_rng():
            super()._value_and_surrogate(model, guide, args, kwargs)
        self._check_finite(float("nan"))


_TENSOR, _CONSTANT = "tensor", "constant"  # kinds of leaves in an argument spec


def _flatten(obj, tensors):
    """
    The hashable spec of a step's arguments ``obj``: each tensor, also inside
    tuples (named ones too), lists and dicts, is appended to ``tensors`` (the
    trace's inputs) and stands in the spec as its shape, dtype, device and
    ``requires_grad``; other values are constants of the trace.
    """
    if torch.is_tensor(obj):
        tensors.append(obj)
        return (_TENSOR, tuple(obj.shape), obj.dtype, obj.device, obj.requires_grad)
    if type(obj) in (tuple, list) or _is_namedtuple(obj):
        return (type(obj), tuple(_flatten(o, tensors) for o in obj))
    if type(obj) in (dict, OrderedDict):
        return (type(obj), tuple((k, _flatten(v, tensors)) for k, v in obj.items()))
    if type(obj) is defaultdict:
        return (defaultdict, obj.default_factory,
                tuple((k, _flatten(v, tensors)) for k, v in obj.items()))
    return (_CONSTANT, obj)


def _unflatten(spec, tensors):
    kind, rest = spec[0], spec[1:]
    if kind is _TENSOR:
        return next(tensors)
    if kind is _CONSTANT:
        return rest[0]
    if kind in (dict, OrderedDict):
        return kind((k, _unflatten(v, tensors)) for k, v in rest[0])
    if kind is defaultdict:
        return defaultdict(rest[0], ((k, _unflatten(v, tensors)) for k, v in rest[1]))
    items = [_unflatten(v, tensors) for v in rest[0]]
    return kind(*items) if _is_namedtuple_type(kind) else kind(items)


def _is_namedtuple(obj):
    return _is_namedtuple_type(type(obj))


def _is_namedtuple_type(t):
    return isinstance(t, type) and issubclass(t, tuple) and hasattr(t, "_fields")


def _doc(eager):
    return f"""
    Like :class:`~pyro_binary_grads.{eager.__name__}` (below) but with
    :meth:`loss_and_grads` compiled by :func:`torch.jit.trace` (see
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


class JitREBAR_ELBO(_Compiled, REBAR_ELBO):
    __doc__ = _doc(REBAR_ELBO) + """
    Compiled: the trace computes the loss, the surrogate and (``adapt=True``)
    this step's temperatures and etas; the variance term of the adapted
    parameters (second-order ``torch.autograd.grad``, which a trace cannot
    record) is added after each replay, through the replayed graph.
    """

    def _traced_step(self, model, guide, args, kwargs):
        self._psi, self._step_psi = {}, []
        try:
            # REBAR_ELBO's step without its variance term
            loss, surr = super(REBAR_ELBO, self)._value_and_surrogate(model, guide, args, kwargs)
            psi = tuple(self._step_psi) if torch.is_grad_enabled() else ()
        finally:
            self._psi, self._step_psi = {}, []
        return (loss, surr) + psi

    def _trace_state(self):
        return list(self._guide_param_names)

    def _after_replay(self, outputs, state):
        loss, surr, *psi = outputs
        if psi and surr.requires_grad:
            self._guide_param_names = state
            surr = surr + self._variance_term(surr, psi)
        return loss, surr
