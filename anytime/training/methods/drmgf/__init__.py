"""DR-MGF (docs/drmgf.md) and its ablations Meta-GF and DR-avgF.

- `gates`: dynamic routes, i.e. the importance variables of the shared k x k convs, their lateral
  normalisation and the gated forward (`RouteGates`);
- `fusion`: the meta-weighted fusion of the exits' updates (`FusionScales`);
- `method`: the training method itself (`DRMGF`, `MetaGF`, `DRAvgF`), its options, the network-momentum
  rules across exit passes, and the snapshot/restore of θ0.
"""

from __future__ import annotations

from anytime.training.methods.drmgf.fusion import FusionScales
from anytime.training.methods.drmgf.gates import RouteGates
from anytime.training.methods.drmgf.method import (
    DRMGF,
    DRAvgF,
    DRAvgFOptions,
    DRMGFOptions,
    MetaGF,
    MetaGFOptions,
)

__all__ = [
    "DRMGF",
    "DRAvgF",
    "DRAvgFOptions",
    "DRMGFOptions",
    "FusionScales",
    "MetaGF",
    "MetaGFOptions",
    "RouteGates",
]
