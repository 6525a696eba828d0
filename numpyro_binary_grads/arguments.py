"""Constructor-argument checks, shared with Pyro: :mod:`binary_grads_common.arguments`."""

from binary_grads_common.arguments import *  # noqa: F401,F403
from binary_grads_common.arguments import __all__  # noqa: F401
