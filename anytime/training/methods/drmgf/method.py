"""DR-MGF: dynamic routes + meta-weighted gradient fusion (docs/drmgf.md), and its two ablations.

One epoch: for every exit t (deepest first) train one pass from the epoch's starting point θ0 (weights
and BatchNorm buffers) with exit t's gated forward and loss ℓ_t + ρ Σ_{j≠t} ℓ_j, fold, record Δ_t on
exit t's route, restore θ0; then fuse the Δ_t into the shared weights. Only M_t moves in exit t's pass.

The network optimiser's momentum (`momentum`): "carry" (the original code) lets each pass continue from
the momentum the previous pass ended with; "fused" starts every pass from one momentum fused like the
parameters (the owner's buffer for single-route parameters, the mean of the owners' buffers for shared
ones); "reset" starts every pass from the epoch start's momentum, which is empty at epoch 0 and so stays
empty for the whole run (kept only to measure what momentum is worth).

`passes="split"` is the cheap variant: exit t's pass covers only the t-th of T disjoint parts of the
epoch's batches, so the T passes together see the training set once and an epoch costs about two joint
epochs (one of passes, one of fusion) instead of T + 1. Fusion averages the Δ_t, each 1/T of an epoch
long; `split_gain` scales them (default 1: measured, larger gains are unstable at lr 0.1).

Fusions per epoch (rounds): the epoch's exit passes and its fusion pass are cut into R contiguous parts,
and round r runs every exit pass over its part r, from the network fused in round r-1, then fuses over the
fusion pass's part r. Each exit still sees the whole epoch once, so an epoch costs what it costs with R = 1
(the paper's), but each pass drifts from its start for 1/R as many steps before the exits' updates are
merged. With split passes, round r's part of the epoch is shared out among the exits. By default R is
chosen so that an exit pass is about `pass_steps` (8) steps long: long passes drift apart before they are
averaged; 16-step passes beat the paper's one fusion per epoch on every benchmark measured, and 8-step
passes beat 16-step ones on every one of those where both ran, at the same CPU time (docs/drmgf.md).
`rounds=R` sets R directly; `rounds=1` is the paper's schedule.

`fusion_share=1/F` runs the fusion pass (meta-learning the scales, or re-estimating BatchNorm statistics
under mean fusion) over only the first 1/F of the epoch's fusion order, which is reshuffled every epoch:
with split passes an epoch then costs about 1 + 1/F joint epochs.

Fusion rules (θ0 + ...):
- a parameter on one route (head, deepest-only block): its owner's Δ;
- a shared conv weight (meta fusion): per [o, i/groups] connection Σ_t Ω_t Δ_t / Σ_t Ω_t with
  Ω_t = (|M_t| / Σ_i' |M_t|) · |s_t| on gated convs, Ω_t = |s_t| where there is no M (1x1 convs, and
  every conv in Meta-GF: with a uniform importance the M factor is a constant that cancels);
- shared BatchNorm γ and β (meta fusion): the same with per-channel scales, Ω_t = |s_t|;
- every other shared parameter (biases, any shared linear weight), and everything under mean fusion:
  the plain mean of the Δ_t.
The scales s (init 1e-3) are meta-learned by one pass with Adam (lr 0.1) on the sum of all exits' losses
of the fused network, BatchNorm in train mode so its running statistics are re-estimated on it.
After the switch epoch the exits train with the plain forward, M is frozen, and s is smoothed by an EMA.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from anytime.errors import ConfigError, TrainingError
from anytime.models.base import MultiExitNetwork
from anytime.training.base import MethodOptions, TrainingContext, TrainingMethod
from anytime.training.methods.drmgf.fusion import FusionScales
from anytime.training.methods.drmgf.gates import RouteGates

logger = logging.getLogger(__name__)

FUSIONS = ("meta", "mean")
EXIT_ORDERS = ("deepest-first", "shallowest-first")
MOMENTUM_RULES = ("carry", "fused", "reset")
PASS_DATA = ("full", "split")
IMPORTANCE_STARTS = ("carry", "fused")


def _sum_losses(losses: list[torch.Tensor]) -> torch.Tensor:
    """sum() of the per-exit losses, typed as the tensor it is (a network has at least one exit)."""
    total = sum(losses)
    assert isinstance(total, torch.Tensor), "no exit losses to sum"
    return total


@dataclass(frozen=True)
class DRMGFOptions(MethodOptions):
    aux_weight: float = 0.4  # ρ, weight of the other exits' losses in exit t's pass
    kappa: float = 10.0  # κ, how much more exit t's own importance counts in its gate
    gate: bool = True  # dynamic routes (gated forward) in the exit passes
    fusion: Literal["meta", "mean"] = "meta"  # "meta": meta-learned scales; "mean": plain mean of the Δ_t
    switch_epoch: int | None = None  # first epoch without dynamic routes; None: half of training
    ema: float = 0.9  # β of the moving average of s after the switch epoch
    fusion_lr: float = 0.1  # Adam lr of the fusion scales
    fusion_init: float = 1e-3  # initial value of every fusion scale
    importance_momentum: float = 0.9
    importance_weight_decay: float = 5e-5
    # The importance variables' learning rate as a multiple of the network's (the paper: the same, 1).
    importance_lr: float = 1.0
    # Where each epoch's gated passes start their importance: "carry" (the paper), M_t as exit t's last pass
    # left it, so the gated network starts from exit t's own magnitudes on the fused directions; "fused",
    # every M reset so that each gated network starts as the fused one (the identity), its route then
    # learned within the pass.
    importance_start: Literal["carry", "fused"] = "carry"
    exit_order: Literal["deepest-first", "shallowest-first"] = "deepest-first"
    momentum: Literal["carry", "fused", "reset"] = "carry"  # network optimiser momentum across exit passes
    passes: Literal["full", "split"] = "full"  # "split": each exit pass over a 1/T part of the epoch
    # Split passes: each Δ_t is multiplied by this before fusion. The fused step is a normalised average
    # of the Δ_t, so with 1 it is 1/T of a full pass's; T would match a full epoch to first order, but at
    # lr 0.1 gains of 2 and more made training collapse (docs/drmgf.md), so the default stays 1.
    split_gain: float = 1.0
    # Fusions per epoch (see the module docstring): None derives them from pass_steps; 1: the paper's.
    rounds: int | None = None
    pass_steps: int = 8  # the exit passes' length in steps that sets the rounds when rounds is not given
    fusion_share: float = 1.0  # share 1/F of the epoch that the fusion pass covers; 1: the paper's, all of it

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"invalid DR-MGF option: {what}")

        need(self.aux_weight >= 0, f"aux_weight must be >= 0, got {self.aux_weight}")
        need(self.kappa >= 1, f"kappa must be >= 1 (own importance weighs at least as much), got {self.kappa}")
        need(self.fusion in FUSIONS, f"fusion must be one of {', '.join(FUSIONS)}, got '{self.fusion}'")
        need(self.switch_epoch is None or self.switch_epoch >= 0, f"switch_epoch must be >= 0, got {self.switch_epoch}")
        need(0 <= self.ema < 1, f"ema must be in [0, 1), got {self.ema}")
        need(self.fusion_lr > 0, f"fusion_lr must be > 0, got {self.fusion_lr}")
        need(self.fusion_init != 0, "fusion_init must be non-zero (the fusion weights are |s|)")
        need(
            0 <= self.importance_momentum < 1, f"importance_momentum must be in [0, 1), got {self.importance_momentum}"
        )
        need(self.importance_lr >= 0, f"importance_lr must be >= 0, got {self.importance_lr}")
        need(
            self.importance_start in IMPORTANCE_STARTS,
            f"importance_start must be one of {', '.join(IMPORTANCE_STARTS)}, got '{self.importance_start}'",
        )
        need(
            self.importance_weight_decay >= 0,
            f"importance_weight_decay must be >= 0, got {self.importance_weight_decay}",
        )
        need(
            self.exit_order in EXIT_ORDERS,
            f"exit_order must be one of {', '.join(EXIT_ORDERS)}, got '{self.exit_order}'",
        )
        need(
            self.momentum in MOMENTUM_RULES,
            f"momentum must be one of {', '.join(MOMENTUM_RULES)}, got '{self.momentum}'",
        )
        need(self.passes in PASS_DATA, f"passes must be one of {', '.join(PASS_DATA)}, got '{self.passes}'")
        need(self.split_gain > 0, f"split_gain must be > 0, got {self.split_gain}")

        def positive_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        need(self.rounds is None or positive_int(self.rounds), f"rounds must be an integer >= 1, got {self.rounds!r}")
        need(positive_int(self.pass_steps), f"pass_steps must be an integer >= 1, got {self.pass_steps!r}")
        need(
            0 < self.fusion_share <= 1 and abs(1 / self.fusion_share - round(1 / self.fusion_share)) < 1e-6,
            f"fusion_share must be 1/F for a whole number F (1, 0.5, 0.25, ...), got {self.fusion_share}",
        )
        need(
            self.split_gain == 1.0 or self.passes == "split",
            "split_gain applies to passes=split only; add -m passes=split or drop split_gain",
        )


def _check_ablation(name: str, options: DRMGFOptions, gate: bool, fusion: str, what: str) -> None:
    """An ablation's name fixes `gate` and `fusion`: other values would train (and record) another method."""
    if options.gate != gate or options.fusion != fusion:
        raise ConfigError(
            f"invalid {name} options gate={str(options.gate).lower()}, fusion={options.fusion}: {name} is {what} "
            f"(gate={str(gate).lower()}, fusion={fusion}); for other combinations use --method drmgf with "
            "-m gate=... -m fusion=..."
        )


@dataclass(frozen=True)
class MetaGFOptions(DRMGFOptions):
    gate: bool = False  # Meta-GF: plain forward in the exit passes, meta fusion

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_ablation("meta-gf", self, False, "meta", "DR-MGF without dynamic routes, with meta fusion")


@dataclass(frozen=True)
class DRAvgFOptions(DRMGFOptions):
    fusion: Literal["meta", "mean"] = "mean"  # DR-avgF: dynamic routes, plain mean fusion

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_ablation("dr-avgf", self, True, "mean", "DR-MGF with dynamic routes and plain mean fusion")


class DRMGF(TrainingMethod):
    """Dynamic routes + meta-weighted gradient fusion; `gate` and `fusion` switch the ablations."""

    name = "drmgf"
    Options = DRMGFOptions

    def setup(self, ctx: TrainingContext) -> None:
        opts: DRMGFOptions = self.options  # type: ignore[assignment]
        model, routes = ctx.model, ctx.routes
        self.routes = routes
        self.num_exits = ctx.num_exits
        # exits on each parameter's route (ascending); Δ and s rows follow this order
        self.owners = {name: routes.owners(name) for name in routes.names}
        self.switch_epoch = opts.switch_epoch if opts.switch_epoch is not None else (ctx.epochs + 1) // 2
        self.rounds = self.rounds_for(ctx.steps_per_epoch)
        self.gates: RouteGates | None = RouteGates.from_model(model, routes, opts.kappa) if opts.gate else None
        # The gate arithmetic runs inside the compiled region too, where its element-wise steps are fused.
        self._gated_forward = ctx.compiled(self.gates.forward) if self.gates is not None else None
        self.importance_optimizer: torch.optim.SGD | None = None
        if self.gates is not None and self.gates.layers:
            self.importance_optimizer = torch.optim.SGD(
                self.gates.parameters(),
                lr=ctx.lr(0) * opts.importance_lr,
                momentum=opts.importance_momentum,
                weight_decay=opts.importance_weight_decay,
            )
        # Fusion scales s, grouped into flat buffers (fusion.py); none under mean fusion.
        self.fusion: FusionScales | None = None
        self.fusion_optimizer: torch.optim.Adam | None = None
        if opts.fusion == "meta":
            self.fusion = FusionScales(model, routes, opts.fusion_init, ctx.device)
            if self.fusion:
                self.fusion_optimizer = torch.optim.Adam(self.fusion.parameters(), lr=opts.fusion_lr)
        # Δ_t of every route parameter, stacked [owners, *shape] (views into the fusion buffers for the
        # meta-fused ones): T deltas of route parameters, allocated once.
        in_fusion = self.fusion.delta_views() if self.fusion is not None else {}
        # Fused weights are built inside the compiled region, as the gated ones are: handed in from outside,
        # they would be graph inputs that are not leaves, which dynamo inspects (and warns about) on tracing.
        self._fused_forward = ctx.compiled(self._fused_network)
        params = dict(model.named_parameters())
        self.deltas = {
            name: in_fusion[name]
            if name in in_fusion
            else torch.zeros((len(owners), *params[name].shape), dtype=params[name].dtype, device=params[name].device)
            for name, owners in self.owners.items()
            if owners
        }
        # switch_epoch is 0-based internally; the log counts epochs from 1 like the progress bar.
        routes_until = (
            f"dynamic routes in epochs 1-{self.switch_epoch}"
            if self.gates is not None and self.switch_epoch > 0
            else "no dynamic routes"
        )
        logger.info(
            "%s: %d gated conv layers, %d meta-fused parameters, %d shared parameters, %s",
            self.name,
            len(self.gates.layers) if self.gates else 0,
            len(self.scales),
            len(routes.shared),
            routes_until,
        )

    def rounds_for(self, steps_per_epoch: int) -> int:
        """Fusions per epoch: `rounds` when given, else enough that each exit pass is about `pass_steps` steps."""
        opts: DRMGFOptions = self.options  # type: ignore[assignment]
        # Each round cuts the epoch's batches into this many parts (the split passes' T pieces, the fusion
        # pass's F); more parts than batches would leave some empty, and an empty fusion part learns nothing.
        pieces = max(self.num_exits if opts.passes == "split" else 1, round(1 / opts.fusion_share))
        most = max(1, steps_per_epoch // pieces)
        if opts.rounds is not None:
            if opts.rounds > most:
                raise ConfigError(
                    f"rounds={opts.rounds} cuts this epoch's {steps_per_epoch} batches into {opts.rounds * pieces} "
                    f"parts, so some exit or fusion passes would get no batch; give rounds <= {most}, or leave "
                    "rounds out (pass_steps sets it)"
                )
            return opts.rounds
        pass_epoch_steps = steps_per_epoch / (self.num_exits if opts.passes == "split" else 1)
        return min(most, max(1, round(pass_epoch_steps / opts.pass_steps)))

    # ------------------------------------------------------------------ epoch
    def exit_order(self) -> list[int]:
        order = list(range(self.num_exits))
        return order[::-1] if self.options.exit_order == "deepest-first" else order  # type: ignore[attr-defined]

    def dynamic(self, epoch: int) -> bool:
        return self.gates is not None and epoch < self.switch_epoch

    def train_epoch(self, ctx: TrainingContext, epoch: int) -> dict[str, float]:
        opts: DRMGFOptions = self.options  # type: ignore[assignment]
        model = ctx.model
        model.train()
        dynamic = self.dynamic(epoch)
        if self.importance_optimizer is not None:
            for group in self.importance_optimizer.param_groups:
                group["lr"] = ctx.lr(epoch) * opts.importance_lr
        if dynamic and opts.importance_start == "fused":
            self._anchor_importance(model)
        epoch_start = snapshot(model)
        epoch_optimizer = copy.deepcopy(ctx.optimizer.state_dict())
        # (loss summed over images, images) per metric: the epoch's means weigh each round by the images it
        # saw, so rounds of unequal parts, or with an empty part (more parts than batches), count right.
        sums: dict[str, tuple[float, int]] = {}
        try:
            for r in range(self.rounds):
                round_metrics = self._round(ctx, epoch, dynamic, (r, self.rounds) if self.rounds > 1 else None)
                for name, (total, count) in round_metrics.items():
                    before = sums.get(name, (0.0, 0))
                    sums[name] = (before[0] + total, before[1] + count)
        except BaseException:
            # An interrupted or failed epoch leaves the plain model of the epoch start, never a half-trained
            # exit pass or a half-fused network (M and s may have moved; the next epoch re-derives all).
            restore(model, epoch_start)
            ctx.optimizer.load_state_dict(copy.deepcopy(epoch_optimizer))
            raise
        metrics = {name: total / max(count, 1) for name, (total, count) in sums.items()}
        ctx.sync_buffers(model)
        metrics["dynamic_routes"] = float(dynamic)
        return metrics

    def _round(
        self, ctx: TrainingContext, epoch: int, dynamic: bool, round_part: tuple[int, int] | None
    ) -> dict[str, tuple[float, int]]:
        """Every exit pass from the current network, then fusion; `round_part` (r, R): over part r of R.
        Returns each metric as (loss summed over the images of the round's part, those images)."""
        opts: DRMGFOptions = self.options  # type: ignore[assignment]
        model = ctx.model
        start = snapshot(model)
        # Carried momentum never goes back to the round's start: no copy of it (one per round otherwise).
        optimizer_start = copy.deepcopy(ctx.optimizer.state_dict()) if opts.momentum != "carry" else {}
        fused_momentum = MomentumFusion(model, self.owners) if opts.momentum == "fused" else None
        metrics: dict[str, tuple[float, int]] = {}
        for k, t in enumerate(self.exit_order()):
            restore(model, start)
            if opts.momentum != "carry":
                # deepcopy: load_state_dict may alias the given tensors, and the pass mutates them in place
                ctx.optimizer.load_state_dict(copy.deepcopy(optimizer_start))
            # Split passes share one order: exit k-th in line takes the k-th of the T pieces of round r's part.
            # Full passes take part r of each exit's own order.
            split = opts.passes == "split"
            if split:
                r, rounds = round_part or (0, 1)
                part: tuple[int, int] | None = (r * self.num_exits + k, rounds * self.num_exits)
            else:
                part = round_part
            phase = "exit passes" if split else f"exit {t + 1}"
            # exit t's pass objective ℓ_t + ρ Σ_{j≠t} ℓ_j (0-based t, like joint's loss_exit_t)
            metrics[f"pass_loss_exit_{t}"] = self._exit_pass(ctx, epoch, t, dynamic, part, phase)
            self._record_deltas(model, start, t, dynamic)
            if fused_momentum is not None:
                fused_momentum.add(ctx.optimizer, t)
        restore(model, start)
        if fused_momentum is not None:
            ctx.optimizer.load_state_dict(copy.deepcopy(optimizer_start))
            fused_momentum.write(ctx.optimizer)
        elif opts.momentum == "reset":
            ctx.optimizer.load_state_dict(copy.deepcopy(optimizer_start))
        # Σ_t ℓ_t of the fused network over the fusion pass: the same quantity as joint's "loss"
        metrics["loss"] = self._fuse(ctx, epoch, start, self._fusion_part(round_part))
        return metrics

    def _fusion_part(self, round_part: tuple[int, int] | None) -> tuple[int, int] | None:
        """The fusion pass of round r of R covers part r of R·F: together the first 1/F of the epoch."""
        pieces = round(1 / self.options.fusion_share)  # type: ignore[attr-defined]
        r, rounds = round_part or (0, 1)
        return None if rounds * pieces == 1 else (r, rounds * pieces)

    def _anchor_importance(self, model: nn.Module) -> None:
        """Every M set so that each exit's gated network equals the plain one (and its momentum cleared)."""
        assert self.gates is not None
        self.gates.reset_to_identity(model)
        if self.importance_optimizer is not None:
            self.importance_optimizer.state.clear()

    def _exit_pass(
        self,
        ctx: TrainingContext,
        epoch: int,
        t: int,
        dynamic: bool,
        part: tuple[int, int] | None = None,
        phase: str | None = None,
    ) -> tuple[float, int]:
        """Exit t's pass; returns its objective summed over the pass's images, and the images."""
        model, rho, precision = ctx.model, self.options.aux_weight, ctx.precision  # type: ignore[attr-defined]
        params = [p for p in model.parameters() if p.requires_grad]
        importance = self.gates.parameters(t) if dynamic and self.gates is not None else []
        if self.gates is not None:
            # Another exit's M still holds the gradient of its own pass's last step; the optimiser would
            # step it again (with momentum) at every step of this pass. Only M_t may move here.
            for m in self.gates.parameters():
                m.grad = None
        phase = phase or f"exit {t + 1}"
        total, count = 0.0, 0
        for step, (x, y) in enumerate(ctx.train_batches(epoch, phase=phase, part=part)):
            with precision.autocast():
                outputs = self._gated_forward(model, x, t) if importance else model(x)  # type: ignore[misc]
                losses = ctx.exit_losses(outputs, y, epoch)
                loss = losses[t] + rho * sum(other for j, other in enumerate(losses) if j != t)
            value = float(loss.detach())  # the one host sync of the step
            if not math.isfinite(value):
                ctx.check_finite(loss, epoch, step, t)  # raises TrainingError naming epoch, step and exit
            ctx.optimizer.zero_grad(set_to_none=True)
            for m in importance:
                m.grad = None
            precision.scale(loss).backward()
            ctx.sync_gradients(params + importance)
            if importance:  # only M_t has .grad
                precision.step(ctx.optimizer, self.importance_optimizer)  # type: ignore[arg-type]
            else:
                precision.step(ctx.optimizer)
            ctx.log_step(value, int(x.shape[0]))
            total, count = total + value * x.shape[0], count + int(x.shape[0])
        for m in importance:
            m.grad = None
        return total, count

    @torch.no_grad()
    def _record_deltas(self, model: nn.Module, start: "Snapshot", t: int, dynamic: bool) -> None:
        """Δ_t = (parameters with exit t's gates folded in) − θ0, for exit t's route only."""
        params = dict(model.named_parameters())
        folded = self.gates.effective_weights(params, t) if dynamic and self.gates is not None else {}
        gain = self.delta_gain
        for name in self.routes.per_exit[t]:
            row = self.deltas[name][self.owners[name].index(t)]
            torch.sub(folded.get(name, params[name]), start.params[name], out=row)
            if gain != 1.0:
                row.mul_(gain)

    @property
    def delta_gain(self) -> float:
        # The options refuse a gain other than 1 without split passes.
        return self.options.split_gain  # type: ignore[attr-defined]

    # ----------------------------------------------------------------- fusion
    def _fuse(
        self, ctx: TrainingContext, epoch: int, start: "Snapshot", part: tuple[int, int] | None = None
    ) -> tuple[float, int]:
        model = ctx.model
        params = dict(model.named_parameters())
        fusion = self.fusion
        with torch.no_grad():
            for name, stacked in self.deltas.items():
                if fusion is None or name not in fusion:  # one owner: its Δ; shared: the plain mean
                    params[name].copy_(start.params[name] + stacked.mean(dim=0))
        if fusion is None or not fusion:
            return self._refresh_batchnorm(ctx, epoch, part)
        fusion.begin(start.params, self.gates)
        scales = fusion.parameters()
        loss_sum, count = 0.0, 0
        precision = ctx.precision
        for step, (x, y) in enumerate(ctx.train_batches(epoch, phase="fusion", part=part)):
            with precision.autocast():
                outputs = self._fused_forward(model, x)
                loss = _sum_losses(ctx.exit_losses(outputs, y, epoch))
            value = float(loss.detach())
            if not math.isfinite(value):
                ctx.check_finite(loss, epoch, step, None)
            # Δ and θ0 are constants; only s learns. The gradient is of the scaled loss under fp16, and the
            # step unscales it (Adam is not scale-free: its eps is not scaled).
            grads = torch.autograd.grad(precision.scale(loss), scales)
            for s, g in zip(scales, grads):
                s.grad = g
            ctx.sync_gradients(scales)
            precision.step(self.fusion_optimizer)  # type: ignore[arg-type]
            ctx.log_step(value, int(x.shape[0]))
            loss_sum, count = loss_sum + value * x.shape[0], count + int(x.shape[0])
        # The network takes the fusion of the scales just learned; the EMA then smooths the scales that the
        # next epoch starts from (the original's order: write, then smooth).
        with torch.no_grad():
            for name, fused in fusion.fused().items():
                params[name].copy_(fused)
        if epoch >= self.switch_epoch:
            fusion.smooth(self.options.ema)  # type: ignore[attr-defined]
        fusion.remember()
        return loss_sum, count

    def _fused_network(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """All exits' logits of the network with the fused weights θ0 + Σ_t Ω_t Δ_t / Σ_t Ω_t (differentiable in s)."""
        assert self.fusion is not None
        return functional_call(model, self.fusion.fused(), (x,), strict=False)

    @property
    def scales(self) -> dict[str, torch.Tensor]:
        """Fusion scales per meta-fused parameter, [R, *scale shape] (detached views; {} for mean fusion)."""
        return self.fusion.views() if self.fusion is not None else {}

    @torch.no_grad()
    def _refresh_batchnorm(
        self, ctx: TrainingContext, epoch: int, part: tuple[int, int] | None = None
    ) -> tuple[float, int]:
        """Mean fusion has nothing to learn; one forward pass in train mode re-estimates BN statistics."""
        loss_sum, count = 0.0, 0
        for step, (x, y) in enumerate(ctx.train_batches(epoch, phase="fusion", part=part)):
            with ctx.precision.autocast():
                loss = _sum_losses(ctx.exit_losses(ctx.model(x), y, epoch))
            value = float(loss)
            if not math.isfinite(value):
                ctx.check_finite(loss, epoch, step, None)
            ctx.log_step(value, int(x.shape[0]))
            loss_sum, count = loss_sum + value * x.shape[0], count + int(x.shape[0])
        return loss_sum, count

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "options": asdict(self.options),
            "switch_epoch": self.switch_epoch,
            "rounds": self.rounds,
            "importance": self.gates.state_dict() if self.gates is not None else {},
            "importance_optimizer": self.importance_optimizer.state_dict() if self.importance_optimizer else None,
            "fusion": self.fusion.state_dict() if self.fusion is not None else {},
            "fusion_optimizer": self.fusion_optimizer.state_dict() if self.fusion_optimizer else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.gates is not None:
            self.gates.load_state_dict(state.get("importance", {}))
        elif state.get("importance"):
            raise TrainingError(
                f"cannot resume {self.name} (no dynamic routes) from a checkpoint that has importance variables; "
                "resume with the same --method and method options"
            )
        if self.fusion is not None:
            self.fusion.load_state_dict(state.get("fusion", {}))
        elif state.get("fusion"):
            raise TrainingError(
                f"cannot resume {self.name} (mean fusion) from a checkpoint with fusion scales; resume with the "
                "same --method and method options"
            )
        if self.importance_optimizer is not None and state.get("importance_optimizer") is not None:
            self.importance_optimizer.load_state_dict(state["importance_optimizer"])
        if self.fusion_optimizer is not None and state.get("fusion_optimizer") is not None:
            self.fusion_optimizer.load_state_dict(state["fusion_optimizer"])
        self.switch_epoch = int(state.get("switch_epoch", self.switch_epoch))
        # A run resumes with the fusions per epoch it started with, also when the default changed since:
        # checkpoints from before pass_steps hold them in their options (1 when absent, the old default).
        saved_rounds = state.get("rounds", (state.get("options") or {}).get("rounds") or 1)
        if int(saved_rounds) != self.rounds:
            logger.info("%s: resuming with %d fusions per epoch, as the run started", self.name, int(saved_rounds))
        self.rounds = int(saved_rounds)

    def plain_model(self, model: MultiExitNetwork) -> MultiExitNetwork:
        # Every epoch ends by writing the fused (already folded) values into the parameters, so the
        # model holds plain weights between epochs; importance and scales live only in this object.
        return model

    def analysis(self) -> dict[str, Any]:
        """Importance variables per gated layer (and the fusion scales), for `anytime routes`."""
        return {
            "method": self.name,
            "num_exits": self.num_exits,
            "kappa": float(self.options.kappa),  # type: ignore[attr-defined]
            "importance": self.gates.analysis() if self.gates is not None else {},
            "fusion_scales": {
                name: {"exits": list(self.owners[name]), "values": s.clone()} for name, s in self.scales.items()
            },
        }


class MetaGF(DRMGF):
    """Ablation: plain forward in the exit passes (no dynamic routes), meta-learned fusion."""

    name = "meta-gf"
    Options = MetaGFOptions


class DRAvgF(DRMGF):
    """Ablation: dynamic routes, plain mean fusion (plus a BatchNorm refresh pass)."""

    name = "dr-avgf"
    Options = DRAvgFOptions


# ---------------------------------------------------------------- momentum
class MomentumFusion:
    """The "fused" momentum rule: Σ over exit passes of each pass's momentum on its own route, averaged
    over the parameter's owners (like the plain fusion of the parameters themselves)."""

    def __init__(self, model: nn.Module, owners: dict[str, list[int]]) -> None:
        self.params = dict(model.named_parameters())
        self.owners = owners
        self.sums: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def add(self, optimizer: torch.optim.Optimizer, t: int) -> None:
        for name, owners in self.owners.items():
            if t not in owners:
                continue
            buf = optimizer.state.get(self.params[name], {}).get("momentum_buffer")
            if buf is None:
                continue
            share = buf / len(owners)
            if name in self.sums:
                self.sums[name].add_(share)
            else:
                self.sums[name] = share.clone()

    @torch.no_grad()
    def write(self, optimizer: torch.optim.Optimizer) -> None:
        for name, value in self.sums.items():
            optimizer.state[self.params[name]]["momentum_buffer"] = value


# ---------------------------------------------------------------- snapshot
@dataclass
class Snapshot:
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]


@torch.no_grad()
def snapshot(model: nn.Module) -> Snapshot:
    return Snapshot(
        params={n: p.detach().clone() for n, p in model.named_parameters()},
        buffers={n: b.detach().clone() for n, b in model.named_buffers()},
    )


@torch.no_grad()
def restore(model: nn.Module, start: Snapshot) -> None:
    for name, p in model.named_parameters():
        p.copy_(start.params[name])
    for name, b in model.named_buffers():
        b.copy_(start.buffers[name])
