"""
Text and constants of the logits handling shared by both packages (one
source): outcomes of probability 0 (:data:`CERTAIN_GAP`, the docstring of
``certain_logits``), the masked log-softmax's docstring, and the error for
logits that give no distribution.
"""

__all__ = ["CERTAIN_GAP", "CERTAIN_FAR", "CERTAIN_LOGITS_DOC", "MASKED_LOG_SOFTMAX_DOC",
           "bad_logits_message"]

#: How far below the largest logit of its row a categorical logit may lie
#: (plus that logit's magnitude), and how far from 0 a Bernoulli logit:
#: beyond it the outcome has probability 0 in float32 and float64, and no
#: Gumbel or logistic draw (at most 709 in float64) reaches it.
CERTAIN_GAP = 1000.0

#: Where a logit beyond :data:`CERTAIN_GAP` is put (same measure): far enough
#: that every relaxation of it (``exp(-CERTAIN_FAR / tau)``) is exactly 0 up
#: to temperatures of 1e6, so a masked class gets no relaxed mass and a
#: forced unit keeps its value (a masked class in the model's prior too
#: would otherwise give ``0 < mass`` times ``-inf``: NaN), and small enough
#: that products of a few such logits stay finite in float32. (float16,
#: whose largest value is 65504: its largest value / 16, i.e. 4094, exact
#: up to temperatures of about 200.)
CERTAIN_FAR = 1e9

CERTAIN_LOGITS_DOC = r"""
    The logits of a guide site with outcomes of probability 0 (a masked class
    at ``-inf``, a unit forced by ``+-inf``{extra}) made finite, so that every
    estimator's arithmetic stays finite (``-inf * 0`` is NaN):

    * a Bernoulli logit beyond :math:`\pm G` is put at :math:`\pm F`;
    * a categorical logit below :math:`m - (G + |m|)`, with :math:`m` the
      largest logit of its row (not differentiated), is put at
      :math:`m - (F + |m|)`,

    :math:`G` = ``CERTAIN_GAP`` (1000), :math:`F` = ``CERTAIN_FAR`` (1e9;
    float16: 4094).
    The draws and probabilities are the same (``exp(-G)`` is 0 in float32
    and float64), and so is the gradient (0 at such logits). Every
    relaxation of such an outcome (REBAR's, RELAX's, the straight-through
    family's soft samples) is exact up to temperatures of 1e6: no relaxed
    mass on a masked class, none leaking through the softmax Jacobian.
    NaN, ``+inf`` in a categorical row and a row of ``-inf`` only are left
    as they are, for {check} to name.

    :param a: logits (the class dim last for a categorical).
    :param str kind: ``"bernoulli"``, ``"categorical"`` or ``"onehot"``.
    """

MASKED_LOG_SOFTMAX_DOC = """``log_softmax(a)`` with 0 where it is ``-inf`` (a class of probability
    0, as masked logits give) and ``value`` is 0: ``value * log_softmax(a)`` is
    then 0 there, not NaN (its gradient in ``value`` 0 there, in ``a``
    unchanged)."""


def bad_logits_message(name):
    """The error for a guide site whose logits give no distribution."""
    return (
        f"Guide site '{name}' has NaN or infinite logits that give no "
        "distribution (NaN, +inf in a categorical, or a categorical row that "
        "is -inf throughout); check the guide's parameters (e.g. lower the "
        "learning rate) or clamp the logits. (Masked classes at -inf and "
        "Bernoulli logits of +-inf are fine.)"
    )
