"""
Text and constants of the logits handling shared by both packages (one
source): outcomes of probability 0 (:data:`CERTAIN_GAP`, the docstring of
``certain_logits``), the masked log-softmax's docstring, and the error for
logits that give no distribution.
"""

__all__ = ["CERTAIN_GAP", "CERTAIN_LOGITS_DOC", "MASKED_LOG_SOFTMAX_DOC", "bad_logits_message"]

#: How far below the largest logit of its row a categorical logit may lie
#: (plus that logit's magnitude), and how far from 0 a Bernoulli logit:
#: beyond it the outcome has probability 0 in float32 and float64, and no
#: Gumbel or logistic draw (at most 37 in float64) reaches it.
CERTAIN_GAP = 1000.0

CERTAIN_LOGITS_DOC = r"""
    The logits of a guide site with outcomes of probability 0 (a masked class
    at ``-inf``, a unit forced by ``+-inf``{extra}) made finite, so that every
    estimator's arithmetic stays finite (``-inf * 0`` is NaN):

    * a Bernoulli logit is clamped to :math:`[-G, G]`;
    * a categorical logit is clamped from below at :math:`m - (G + |m|)`,
      with :math:`m` the largest logit of its row (not differentiated),

    :math:`G` = ``CERTAIN_GAP`` (1000). The draws and probabilities are the
    same (``exp(-G)`` is 0 in float32 and float64), and so is the gradient
    (0 at such logits). NaN, ``+inf`` in a categorical row and a row of
    ``-inf`` only are left as they are, for {check} to name.

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
