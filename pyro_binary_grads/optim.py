"""
Optimizers for :class:`~pyro.infer.SVI` with one torch optimizer for all
parameters.

:class:`pyro.optim.PyroOptim` (``pyro.optim.Adam`` and the others) builds one
``torch.optim`` optimizer per parameter and steps them one by one, and
:class:`~pyro.infer.SVI` then replaces every gradient by a new tensor of zeros
(:func:`pyro.infer.util.zero_grads`). For a model of a few large tensors (an
``nn.Module`` encoder and decoder) that is a small cost per step, but one that
a compiled ELBO (:mod:`pyro_binary_grads.compiled`) makes visible: the
hand-written PyTorch step it is compared with steps one optimizer and lets the
next backward write fresh gradients (``zero_grad(set_to_none=True)``).

:class:`SharedOptim` is a drop-in :class:`~pyro.optim.PyroOptim`: it holds ONE
torch optimizer, adds the parameters it has not seen to it as they appear
(new ``pyro.param`` sites at any step), and after each step sets the stepped
parameters' gradients to ``None`` (:func:`~pyro.infer.util.zero_grads` then
has nothing to do, and the next backward writes the gradients afresh). The
update is the one ``pyro.optim`` makes, step for step: a parameter that had a
gradient before and gets none at this step is stepped with a zero gradient, as
``zero_grads`` would have left it; a parameter that never had one is skipped;
only the parameters of this step are stepped. :meth:`~SharedOptim.get_state`
returns Pyro's format (one optimizer state dict per parameter name), so a state
saved from ``pyro.optim.Adam`` loads here and the other way round.

Example::

    from pyro_binary_grads import JitDisARM_ELBO
    from pyro_binary_grads.optim import Adam

    svi = SVI(model, guide, Adam({"lr": 1e-3}), JitDisARM_ELBO())  # not pyro.optim.Adam

Any ``optim_args`` of the torch optimizer pass through (``foreach=True``,
``fused=True`` for torch's fused Adam: faster on CPU, and ``pyro.optim.Adam``
takes them too). Per-parameter ``optim_args`` (a callable, as for
``pyro.optim``) give each parameter its own parameter group of the one
optimizer. Pyro's learning-rate schedulers (``pyro.optim.ExponentialLR``, ...)
are not covered: use them as they are.
"""

import torch

import pyro
from pyro.optim.optim import PyroOptim

__all__ = ["SharedOptim", "Adam"]


def _hyper(group):
    return {k: v for k, v in group.items() if k != "params"}


def _same(a, b):
    try:
        return a.keys() == b.keys() and all(bool(a[k] == b[k]) for k in a)
    except (RuntimeError, TypeError, ValueError):  # tensor hyperparameters of other shapes
        return False


class SharedOptim(PyroOptim):
    """
    A :class:`~pyro.optim.PyroOptim` that steps every parameter with one
    ``optim_constructor`` optimizer (:attr:`optimizer`) instead of one per
    parameter, and leaves the stepped gradients ``None`` (see
    :mod:`pyro_binary_grads.optim`).

    ``optim_objs`` (as in :class:`~pyro.optim.PyroOptim`) maps every parameter
    to the one optimizer; to change a learning rate, change the groups of
    :attr:`optimizer` (``optimizer.param_groups``).

    :param optim_constructor: a ``torch.optim.Optimizer`` class
    :param optim_args: its arguments, a dict, or a callable of the parameter
        name as for :class:`~pyro.optim.PyroOptim` (one parameter group each)
    :param clip_args: ``clip_norm`` / ``clip_value`` per parameter, as for
        :class:`~pyro.optim.PyroOptim`
    :param bool set_to_none: after a step, set the stepped parameters'
        gradients to ``None`` (default); ``False`` leaves them for
        :func:`~pyro.infer.util.zero_grads` (zeros after ``SVI.step``, as with
        ``pyro.optim``)
    """

    def __init__(self, optim_constructor, optim_args, clip_args=None, *, set_to_none=True):
        super().__init__(optim_constructor, optim_args, clip_args)
        self.set_to_none = set_to_none
        #: the one torch optimizer (built at the first step)
        self.optimizer = None
        self._shared = self._shared_hyper = None  # the shared parameter group (dict optim_args)
        self._had_grad = set()  # parameters pyro's zero_grads would keep a (zero) gradient for

    def _add(self, new):
        """
        Adds parameters to :attr:`optimizer`: with dict ``optim_args`` to one
        shared parameter group, with callable ones each to a group of its own.
        A parameter with a state waiting from :meth:`set_state` is loaded
        through a one-parameter optimizer (torch casts the state as its
        ``load_state_dict`` does) and keeps a group of its own if its saved
        hyperparameters differ from the shared group's.
        """
        shared = not callable(self.pt_optim_args)
        plain, states, store = [], {}, pyro.get_param_store()
        for p in new:
            self.grad_clip[p] = self._get_grad_clip(p)
            state = self._state_waiting_to_be_consumed.pop(store.param_name(p), None)
            if state is None and shared:
                plain.append(p)
                continue
            one = self.pt_optim_constructor([p], **self._get_optim_args(p))
            if self._shared_hyper is None and shared:
                self._shared_hyper = _hyper(one.param_groups[0])
            if state is not None:
                one.load_state_dict(state)
                states[p] = one.state.get(p)
            hyper = _hyper(one.param_groups[0])
            if shared and _same(hyper, self._shared_hyper):
                plain.append(p)
            else:
                self._group([p], hyper)
        if plain:
            if self._shared is None:
                self._shared = self._group(plain, {})
            else:
                self._shared["params"].extend(plain)
        for p, state in states.items():
            if state is not None:
                self.optimizer.state[p] = state
        for p in new:
            self.optim_objs[p] = self.optimizer

    def _group(self, params, hyper):
        """A new parameter group of ``params`` (``hyper`` over the optimizer's defaults)."""
        group = {**hyper, "params": list(params)}
        if self.optimizer is None:
            args = self._get_optim_args(params[0])
            self.optimizer = self.pt_optim_constructor([group], **args)
        else:
            self.optimizer.add_param_group(group)
        return self.optimizer.param_groups[-1]

    def __call__(self, params, *args, **kwargs):
        """
        One step of :attr:`optimizer` on ``params`` (the parameters of this
        ``SVI`` step); parameters not seen before join it.
        """
        params = params if isinstance(params, (set, frozenset)) else set(params)
        new = [p for p in params if p not in self.optim_objs]
        if new:
            self._add(new)
        # pyro.optim steps only this step's parameters: hide the others' gradients
        hidden = [(p, p.grad) for p in self.optim_objs
                  if p not in params and p.grad is not None] if len(params) < len(self.optim_objs) else []
        for p, _ in hidden:
            p.grad = None
        for p in params:
            if p.grad is not None:
                self._had_grad.add(p)
            elif p in self._had_grad:  # zero_grads would have left zeros: Adam still moves it
                p.grad = torch.zeros_like(p)
            clip = self.grad_clip[p]
            if clip is not None:
                clip(p)
        try:
            self.optimizer.step(*args, **kwargs)
        finally:
            for p, g in hidden:
                p.grad = g
        if self.set_to_none:
            for p in params:
                p.grad = None

    def get_state(self):
        """
        Pyro's format: ``{parameter name: a one-parameter optimizer state
        dict}``, as :meth:`pyro.optim.PyroOptim.get_state` returns.
        """
        store = pyro.get_param_store()
        out = {}
        if self.optimizer is None:
            return out
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = {0: self.optimizer.state[p]} if p in self.optimizer.state else {}
                out[store.param_name(p)] = {"state": state,
                                            "param_groups": [{**_hyper(group), "params": [0]}]}
        return out


def Adam(optim_args, clip_args=None, *, set_to_none=True):
    """
    :class:`SharedOptim` of :class:`torch.optim.Adam`: a drop-in for
    ``pyro.optim.Adam`` (same arguments, same updates) with one torch Adam for
    all parameters [1].

    [1] Kingma, D. P. and Ba, J. "Adam: A Method for Stochastic Optimization",
    ICLR 2015.
    """
    return SharedOptim(torch.optim.Adam, optim_args, clip_args, set_to_none=set_to_none)
