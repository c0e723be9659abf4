"""Per-exit gradient aggregation methods (PCGrad, CAGrad, UPGrad, MGDA, IMTL-G, Aligned-MTL, Nash-MTL)
through TorchJD instead of re-implementations.

Each step computes the Jacobian of the exits' losses (one row per exit) with
`torchjd.autojac.backward`. Parameters on a single exit's route (heads) take their owner's gradient
unchanged; the Jacobian restricted to the *shared* parameters (on two or more routes) is aggregated into
one update by the method's aggregator (`torchjd.autojac.jac_to_grad`), as with `mtl_backward`, where
the shared part is the feature extractor. Note that aggregators differ in scale (PCGrad sums the
projected gradients, UPGrad and MGDA combine them with weights summing to about one).

A solver dependency that is missing (cvxpy for CAGrad and Nash-MTL, quadprog for UPGrad) raises
`MissingDependencyError` naming the `mtl` extra; there is no silent fallback to averaging.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import torch

from anytime.errors import ConfigError, MissingDependencyError, require
from anytime.training.base import MethodOptions, TrainingContext
from anytime.training.methods.stepwise import StepwiseMethod


class AggregatorMethod(StepwiseMethod):
    """Base: subclasses build a `torchjd.aggregation.Aggregator` from their options."""

    compilable = False  # one backward per exit through the same forward

    label: ClassVar[str]  # the method's name in papers, for messages
    solver_modules: ClassVar[tuple[str, ...]] = ()  # modules the aggregator imports on construction

    def __init__(self, options: MethodOptions | None = None) -> None:
        super().__init__(options)
        # Fail at construction, i.e. before any data is read or any training starts.
        require("torchjd", "mtl", f"the '{self.name}' training method ({self.label}, via TorchJD)")
        for module in self.solver_modules:
            require(module, "mtl", f"the '{self.name}' training method ({self.label}, via TorchJD)")
        self.aggregator: Any = None
        self.last_weights: torch.Tensor | None = None

    def make_aggregator(self, ctx: TrainingContext) -> Any:
        raise NotImplementedError

    def setup(self, ctx: TrainingContext) -> None:
        try:
            self.aggregator = self.make_aggregator(ctx)
        except ImportError as exc:  # TorchJD checks its optional solver packages on construction
            raise MissingDependencyError(
                f"the '{self.name}' training method ({self.label}) needs a solver that is not installed: {exc}. "
                "Install it with: pip install 'anytime[mtl]'"
            ) from exc
        named = dict(ctx.model.named_parameters())
        on_route = [n for n in ctx.routes.names if ctx.routes.owners(n)]
        self.params = [named[n] for n in on_route]
        self.shared = [named[n] for n in on_route if ctx.routes.is_shared(n)]
        self.specific = [named[n] for n in on_route if not ctx.routes.is_shared(n)]
        if not self.shared:
            raise ConfigError(
                f"method '{self.name}' aggregates the exits' gradients on shared parameters, but no parameter "
                "of this model is shared by two or more exits; use --method joint"
            )

    def backward(self, ctx: TrainingContext, losses: list[torch.Tensor], epoch: int) -> None:
        from torchjd.autojac import backward as jacobian_backward
        from torchjd.autojac import jac_to_grad

        # TorchJD differentiates all exits at once under torch.vmap; under autocast that fails on CPU in
        # BatchNorm's backward (bf16/fp16 activations against float32 weights: "expected scalar type
        # BFloat16 but found Float", torch 2.13). Differentiate one exit at a time there: the same Jacobian.
        chunk = None if ctx.precision.mode == "off" else 1
        jacobian_backward(losses, inputs=self.params, parallel_chunk_size=chunk)
        # Under fp16 the losses carry the loss scale. Aggregators are not linear in the Jacobian (Nash-MTL's
        # update does not even grow with it), so aggregate the true Jacobian and scale the result back for
        # the loss scaler to unscale.
        scale = ctx.precision.loss_scale
        with torch.no_grad():
            # One owner: the rows of the other exits are zero, so the sum is the owner's gradient.
            _sum_jacobian_into_grad(self.specific)
            if scale != 1.0:
                if not all(bool(p.jac.isfinite().all()) for p in self.shared):  # type: ignore[attr-defined]
                    # The loss scale overflowed fp16. Aggregators fail on a non-finite Jacobian (the solvers
                    # of CAGrad and Nash-MTL, the SVD of Aligned-MTL); hand the loss scaler the non-finite
                    # gradient instead, so that it skips this step and lowers the scale, as it does for joint.
                    _sum_jacobian_into_grad(self.shared)
                    return
                for p in self.shared:
                    p.jac.div_(scale)  # type: ignore[attr-defined]
        weights = jac_to_grad(self.shared, self.aggregator)
        if scale != 1.0:
            with torch.no_grad():
                for p in self.shared:
                    if p.grad is not None:
                        p.grad.mul_(scale)
        if weights is not None:
            self.last_weights = weights.detach().cpu()

    def analysis(self) -> dict[str, Any]:
        return {} if self.last_weights is None else {"exit_weights": self.last_weights}


def _sum_jacobian_into_grad(params: Sequence[torch.Tensor]) -> None:
    """Each parameter's Jacobian rows (one per exit) summed into its `.grad`, the Jacobian dropped."""
    for p in params:
        grad = p.jac.sum(dim=0)  # type: ignore[attr-defined]
        p.grad = grad if p.grad is None else p.grad + grad
        del p.jac  # type: ignore[attr-defined]


@dataclass(frozen=True)
class PCGradOptions(MethodOptions):
    pass


class PCGradMethod(AggregatorMethod):
    """Projecting conflicting gradients (Yu et al., NeurIPS 2020)."""

    name = "pcgrad"
    label = "PCGrad"
    Options = PCGradOptions

    def make_aggregator(self, ctx: TrainingContext) -> Any:
        from torchjd.aggregation import PCGrad

        return PCGrad()


@dataclass(frozen=True)
class CAGradOptions(MethodOptions):
    c: float = 0.4  # radius of the conflict-averse ball around the mean gradient (paper: 0.4 for MTL)
    norm_eps: float = 1e-4

    def __post_init__(self) -> None:
        if not self.c >= 0:
            raise ConfigError(f"cagrad c={self.c!r}: must be >= 0 (0 is plain averaging)")


class CAGradMethod(AggregatorMethod):
    """Conflict-averse gradient descent (Liu et al., NeurIPS 2021)."""

    name = "cagrad"
    label = "CAGrad"
    Options = CAGradOptions
    options: CAGradOptions
    solver_modules = ("cvxpy", "clarabel")

    def make_aggregator(self, ctx: TrainingContext) -> Any:
        from torchjd.aggregation import CAGrad

        return CAGrad(c=self.options.c, norm_eps=self.options.norm_eps)


@dataclass(frozen=True)
class UPGradOptions(MethodOptions):
    pass


class UPGradMethod(AggregatorMethod):
    """Unconflicting projection of gradients (Quinton & Rey, TorchJD)."""

    name = "upgrad"
    label = "UPGrad"
    Options = UPGradOptions
    solver_modules = ("qpsolvers", "quadprog")

    def make_aggregator(self, ctx: TrainingContext) -> Any:
        from torchjd.aggregation import UPGrad

        return UPGrad()


@dataclass(frozen=True)
class MGDAOptions(MethodOptions):
    epsilon: float = 1e-3
    max_iters: int = 100

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and self.max_iters >= 1):
            raise ConfigError(
                f"mgda epsilon={self.epsilon!r}, max_iters={self.max_iters!r}: need epsilon > 0, max_iters >= 1"
            )


class MGDAMethod(AggregatorMethod):
    """Multiple-gradient descent (Désidéri 2012; Sener & Koltun, NeurIPS 2018)."""

    name = "mgda"
    label = "MGDA"
    Options = MGDAOptions
    options: MGDAOptions

    def make_aggregator(self, ctx: TrainingContext) -> Any:
        from torchjd.aggregation import MGDA

        return MGDA(epsilon=self.options.epsilon, max_iters=self.options.max_iters)


@dataclass(frozen=True)
class IMTLGOptions(MethodOptions):
    pass


class IMTLGMethod(AggregatorMethod):
    """Impartial multi-task learning, gradient part (Liu et al., ICLR 2021)."""

    name = "imtlg"
    label = "IMTL-G"
    Options = IMTLGOptions

    def make_aggregator(self, ctx: TrainingContext) -> Any:
        from torchjd.aggregation import IMTLG

        return IMTLG()


@dataclass(frozen=True)
class AlignedMTLOptions(MethodOptions):
    scale_mode: str = "min"  # how the aligned gradient is rescaled: "min", "median" or "rmse"

    def __post_init__(self) -> None:
        if self.scale_mode not in ("min", "median", "rmse"):
            raise ConfigError(f"alignedmtl scale_mode={self.scale_mode!r}: choose min, median or rmse")


class AlignedMTLMethod(AggregatorMethod):
    """Aligned-MTL (Senushkin et al., CVPR 2023)."""

    name = "alignedmtl"
    label = "Aligned-MTL"
    Options = AlignedMTLOptions
    options: AlignedMTLOptions

    def make_aggregator(self, ctx: TrainingContext) -> Any:
        from torchjd.aggregation import AlignedMTL

        # __post_init__ has checked that scale_mode is one of these
        scale_mode = cast(Literal["min", "median", "rmse"], self.options.scale_mode)
        return AlignedMTL(scale_mode=scale_mode)


@dataclass(frozen=True)
class NashMTLOptions(MethodOptions):
    max_norm: float = 1.0
    update_weights_every: int = 1
    optim_niter: int = 20

    def __post_init__(self) -> None:
        if self.max_norm < 0 or self.update_weights_every < 1 or self.optim_niter < 1:
            raise ConfigError(
                f"nashmtl max_norm={self.max_norm}, update_weights_every={self.update_weights_every}, "
                f"optim_niter={self.optim_niter}: need max_norm >= 0 and the others >= 1"
            )


class NashMTLMethod(AggregatorMethod):
    """Nash-MTL (Navon et al., ICML 2022). Its solver warm start is part of the resumable state."""

    name = "nashmtl"
    label = "Nash-MTL"
    Options = NashMTLOptions
    options: NashMTLOptions
    solver_modules = ("cvxpy", "ecos")

    def make_aggregator(self, ctx: TrainingContext) -> Any:
        from torchjd.aggregation import NashMTL

        o = self.options
        return NashMTL(
            n_tasks=ctx.num_exits,
            max_norm=o.max_norm,
            update_weights_every=o.update_weights_every,
            optim_niter=o.optim_niter,
        )

    def state_dict(self) -> dict[str, Any]:
        w = self.aggregator.weighting
        return {
            "step": float(w.step),
            "prvs_alpha": torch.as_tensor(w.prvs_alpha).clone(),
            "normalization_factor": torch.as_tensor(w.normalization_factor).clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        w = self.aggregator.weighting
        w.prvs_alpha = state["prvs_alpha"].numpy()
        if state["step"] > 0:
            w._init_optim_problem()  # the solver problem is built on the first step; rebuild it
        w.step = state["step"]
        w.normalization_factor = state["normalization_factor"].numpy()
