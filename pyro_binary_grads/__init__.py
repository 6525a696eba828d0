"""
Low-variance gradient estimators for discrete latent variables, as drop-in
ELBO classes for Pyro::

    from pyro_binary_grads import DisARM_ELBO
    svi = SVI(model, guide, optim, DisARM_ELBO())   # instead of TraceGraph_ELBO()
"""

from pyro.distributions import OneHotCategorical

from .categorical import (
    GumbelRao_ELBO,
    GumbelSoftmaxST_ELBO,
    ReinMax_ELBO,
    ReinMaxCV_ELBO,
    ReinMaxRao_ELBO,
    ST_ELBO,
)
from .compiled import (
    JitARM_ELBO,
    JitDisARM_ELBO,
    JitLocalDisARM_IWAE,
    JitREBAR_ELBO,
    JitRLOO_ELBO,
    JitVIMCO,
)
from .diagnostics import compare_estimators
from .elbo import ARM_ELBO, DisARM_ELBO, RLOO_ELBO
from .multisample import VIMCO, LocalDisARM_IWAE, iwae_bound
from .relax import RELAX_ELBO
from .relaxed import REBAR_ELBO

__version__ = "0.1.0"

__all__ = [
    "ARM_ELBO",
    "DisARM_ELBO",
    "GumbelRao_ELBO",
    "GumbelSoftmaxST_ELBO",
    "JitARM_ELBO",
    "JitDisARM_ELBO",
    "JitLocalDisARM_IWAE",
    "JitREBAR_ELBO",
    "JitRLOO_ELBO",
    "JitVIMCO",
    "LocalDisARM_IWAE",
    "OneHotCategorical",
    "REBAR_ELBO",
    "RELAX_ELBO",
    "RLOO_ELBO",
    "ReinMaxCV_ELBO",
    "ReinMaxRao_ELBO",
    "ReinMax_ELBO",
    "ST_ELBO",
    "VIMCO",
    "compare_estimators",
    "iwae_bound",
]
