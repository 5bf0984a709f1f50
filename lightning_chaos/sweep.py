"""The learning-rate sweep engine behind :class:`~lightning_chaos.ChaosLRFinder`.

A *candidate* is one learning rate η of the sweep: a reference copy of the model and its ε-perturbed shadows, trained
through the module's own ``training_step`` and ``optimizer_step`` (the lockstep engine, :mod:`lightning_chaos.shadow`
and :mod:`lightning_chaos.mirror`) on the same batches and random draws as every other candidate. :class:`LRSweep`
trains lists of candidates, all in one ``vmap`` per step (:mod:`lightning_chaos.vectorized`) or one at a time, splits
them across processes and gathers what they measured (:class:`SweepRun`); :func:`summarise` turns the runs into a
:class:`ChaosLRFinderResult` with the pure rules of :mod:`lightning_chaos.functional.onset`. Nothing here touches a
Trainer: the callback (:mod:`lightning_chaos.finder`) collects the batches and writes the suggestion.
"""

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer

from lightning_chaos.functional.exponents import benettin_exponent
from lightning_chaos.functional.onset import (
    LEARNS_WELL_TOLERANCE,
    chaotic_mask,
    edge_of_chaos_suggestion,
    learning_band,
    learns_well_threshold,
    past_the_edge,
    speed_band_top,
    trainability_edge_suggestion,
)
from lightning_chaos.mirror import BatchContext
from lightning_chaos.shadow import Perturbation, ShadowEnsemble, capture_rng_state, make_shadow_module, replayed_rng
from lightning_chaos.vectorized import NotVectorizable, StackedOptimizer, StackedShadows, build_like

# A reference run "learns" when its mean loss over the last quarter of the window is below this share of its first loss
# (at the initial parameters, the same for every η); it "diverged" when the loss turns non-finite or exceeds this many
# times its first loss.
_LEARNING_LOSS_RATIO = 0.95
_DIVERGENCE_LOSS_FACTOR = 10.0
_DIVERGENCE_CHECK_EVERY = 10

MARGIN = 1.5  # the finder's step back below the onset, and below the band's top under a non-adaptive optimizer


class SweepRun(NamedTuple):
    """What one η and initialisation of the sweep measured."""

    exponent: float
    loss_ratio: float
    learning: bool
    losses: Tensor  # the reference's training loss per optimizer step, NaN after it stopped
    model_steps: int  # forward and backward passes of one copy of the model


Runs = dict[float, list[SweepRun]]  # per η, one run per initialisation


@dataclass
class ChaosLRFinderResult:
    """The evidence of a chaos LR sweep. Every per-η tensor follows ``lrs`` (increasing).

    Attributes:
        lrs: the swept learning rates η (the coarse grid plus any refinement next to the anchor).
        exponents: Λ(η), mean over initialisations, per optimizer step.
        sensitive_fraction: ρ(η), the fraction of initialisations that are chaotic by the onset rule.
        learning: whether the reference run still learned at η (loss went down, no divergence), by majority.
        suggestion: the suggested learning rate, or None (see the warning it came with).
        onset: η*, the first η with ρ ≥ 0.5 (or, when chaos starts below every η that learns, the first failing η
            above the learning band), or None.
        exponents_per_init: Λ per η and initialisation, [num_lrs, num_inits].
        loss_ratio: mean loss of the last quarter of the window over the first loss (at the initial parameters), per η.
            For a negative first loss, 1 − (first − last) / |first|: below 1 always means the loss fell.
        steps_per_lr: optimizer steps each Λ was measured over.
        rule: the onset rule used.
        reason: why there is no suggestion ("" when there is one).
        learning_at_onset: whether the network still learned at η* (None without an onset). Under minibatch SGD
            the onset often coincides with where learning fails: then η* marks the edge of trainability as much as
            the edge of chaos.
        trainability_edge: the top of the learning band, the largest η that still learns well: by where its window
            ends and by how fast it gets down (the lower of the end band's and the speed band's tops; see
            :func:`~lightning_chaos.functional.onset.trainability_edge_suggestion`), or None.
        speed_edge: the top of the speed band alone, the largest η that gets 90 % of the way down to the sweep's best
            loss within 1.25× the fewest steps (:func:`~lightning_chaos.functional.onset.speed_band_top`), or None.
        lr_range: ``(low, high)`` for ``OneCycleLR(max_lr=high)`` and ``CyclicLR(base_lr=low, max_lr=high)``:
            ``high`` is the top of the learning band, ``low`` the smaller of the band's bottom
            (:func:`~lightning_chaos.functional.onset.learning_band`) and the suggestion below the top (top /
            margin, whatever the anchor); None when nothing learns or the band reaches ``max_lr``. With plain SGD pass
            ``cycle_momentum=False``: torch's default cycles a momentum the sweep never measured, which broke training
            at ``high`` in the benchmark (benchmarks/FINDER_RESULTS.md).
        anchor: what the suggestion was derived from, ``"trainability"`` or ``"onset"``.
        margin: the factor the suggestion stepped back from its anchor by (``margin="auto"`` resolved).
        seconds: wall time of the sweep.
        swept: what the swept number is to the optimizer: ``"the learning rate"``, or for an optimizer that estimates
            its own step size (Prodigy, D-Adaptation) the multiplier its ``lr`` is (:func:`swept_quantity`).
        losses: the reference run's training loss at each optimizer step, [num_lrs, steps_per_lr], mean over
            initialisations; NaN after a run stopped (it diverged).
        model_steps: forward and backward passes of one copy of the model that the sweep trained (every η's reference
            and shadows, every initialisation): its cost in units of a training step.
    """

    lrs: Tensor
    exponents: Tensor
    sensitive_fraction: Tensor
    learning: Tensor
    suggestion: Optional[float]
    onset: Optional[float] = None
    exponents_per_init: Tensor = field(default_factory=lambda: torch.empty(0))
    loss_ratio: Tensor = field(default_factory=lambda: torch.empty(0))
    steps_per_lr: int = 0
    rule: str = "efold"
    reason: str = ""
    learning_at_onset: Optional[bool] = None
    trainability_edge: Optional[float] = None
    lr_range: Optional[tuple[float, float]] = None
    speed_edge: Optional[float] = None
    anchor: str = "trainability"
    margin: float = MARGIN
    seconds: float = 0.0
    swept: str = "the learning rate"
    losses: Tensor = field(default_factory=lambda: torch.empty(0, 0))
    model_steps: int = 0

    def plot(self, ax: Any = None) -> Any:
        """The sweep as a matplotlib Figure: Λ(η) with ρ(η) on top, the loss ratio below, both edges and the
        suggestion marked. With ``ax`` only the Λ panel is drawn, into it.

        Needs matplotlib (``pip install 'lightning-chaos[examples]'``); draws without a display.
        """
        import matplotlib

        if ax is None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        loss_ax = None
        if ax is None:
            fig, (ax, loss_ax) = plt.subplots(
                2, 1, figsize=(7, 6.5), sharex=True, gridspec_kw={"height_ratios": (3, 2)}
            )
        else:
            fig = ax.figure
        lrs = self.lrs.numpy()
        learning = self.learning.numpy()
        exponents = self.exponents.numpy()
        ax.plot(lrs, exponents, "-", color="tab:blue", label="Λ(η), mean over inits")
        ax.plot(lrs[learning], exponents[learning], "o", color="tab:blue", label="still learning")
        ax.plot(lrs[~learning], exponents[~learning], "x", color="tab:red", label="not learning / diverged")
        if self.exponents_per_init.numel() and self.exponents_per_init.shape[1] > 1:
            for column in self.exponents_per_init.T.numpy():
                ax.plot(lrs, column, ".", color="tab:blue", alpha=0.3)
        if self.rule == "efold" and self.steps_per_lr:
            ax.axhline(1.0 / self.steps_per_lr, color="gray", ls=":", label="1 e-fold over the window")
        ax.axhline(0.0, color="black", lw=0.5)
        ax.set_xscale("log")
        ax.set_ylabel("Lyapunov exponent Λ (per step)")
        twin = ax.twinx()
        twin.plot(lrs, self.sensitive_fraction.numpy(), "s--", color="tab:orange", ms=3, label="ρ(η)")
        twin.set_ylim(-0.05, 1.05)
        twin.set_ylabel("ρ: fraction chaotic", color="tab:orange")
        panels = [ax] if loss_ax is None else [ax, loss_ax]
        if loss_ax is not None and self.loss_ratio.numel() == len(lrs):
            ratio = self.loss_ratio.numpy()
            finite = np.isfinite(ratio)
            loss_ax.plot(lrs[finite], ratio[finite], "-", color="tab:gray")
            loss_ax.plot(lrs[finite & learning], ratio[finite & learning], "o", color="tab:blue", label="learning")
            loss_ax.plot(lrs[finite & ~learning], ratio[finite & ~learning], "x", color="tab:red",
                         label="not learning")
            if (finite & learning).any():
                threshold = learns_well_threshold(float(ratio[finite & learning].min()))
                loss_ax.axhline(threshold, color="tab:purple", ls=":", lw=1,
                                label=f"{LEARNS_WELL_TOLERANCE:g} × the best ratio: learns well below")
            loss_ax.axhline(1.0, color="black", lw=0.5)
            if (ratio[finite] > 0).all():
                loss_ax.set_yscale("log")
            else:  # a loss that crossed zero: a log axis would drop those η
                loss_ax.set_yscale("symlog", linthresh=1e-2)
            loss_ax.set_ylabel("loss ratio (end / start)")
            loss_ax.legend(loc="upper left", fontsize=7)
        for panel in panels:
            labelled = panel is ax
            if self.lr_range is not None:
                panel.axvspan(*self.lr_range, color="tab:purple", alpha=0.07,
                              label=f"lr_range {self.lr_range[0]:.3g} to {self.lr_range[1]:.3g}" if labelled else None)
            if self.onset is not None:
                panel.axvline(self.onset, color="tab:orange", ls="--", lw=1,
                              label=f"onset η* = {self.onset:.3g}" if labelled else None)
            if self.trainability_edge is not None:
                panel.axvline(self.trainability_edge, color="tab:purple", ls=":", lw=1,
                              label=f"top of learning band {self.trainability_edge:.3g}" if labelled else None)
            if self.suggestion is not None:
                panel.axvline(self.suggestion, color="tab:green", lw=2,
                              label=f"suggestion {self.suggestion:.3g} ({self.anchor} / {self.margin:g})"
                              if labelled else None)
        panels[-1].set_xlabel("learning rate η")
        ax.legend(loc="upper left", fontsize=7)
        ax.set_title("ChaosLRFinder sweep: Λ(η), and the loss ratio the learning band is read from")
        fig.tight_layout()
        return fig


class Candidate:
    """One η of the sweep: a reference run and its shadows, their losses, and the Benettin bookkeeping."""

    def __init__(
        self, reference: ShadowEnsemble, shadows: ShadowEnsemble, clip_val: Optional[float], clip_algorithm: Optional[str]
    ) -> None:
        self.reference, self.shadows = reference, shadows
        self.clip_val, self.clip_algorithm = clip_val, clip_algorithm
        self.reference_clip = reference.gradient_clipper(clip_val, clip_algorithm)
        self.shadow_clip = shadows.gradient_clipper(clip_val, clip_algorithm)
        self.losses: list[Tensor] = []
        self.steps = 0
        self.transient = torch.zeros(len(shadows.shadows), device=reference.real_params[0].device)
        self.done = False

    def forward_backward(
        self, batch: Any, batch_idx: int, rng_state: Any, device: torch.device, accumulate: int, step_context: Any
    ) -> Optional[Tensor]:
        """The reference's and the shadows' training_step and backward on one batch; the reference's loss."""
        loss = self.reference.forward_backward(batch, batch_idx, rng_state, device, accumulate, step_context)[0]
        self.shadows.forward_backward(batch, batch_idx, rng_state, device, accumulate, step_context)
        return loss

    def context(self, batch_idx: int, accumulate: int, step_context: Any) -> BatchContext:
        return BatchContext(
            batch_idx=batch_idx,
            epoch=0,
            global_step=self.steps,
            accumulate_grad_batches=accumulate,
            optimizer_steps=(batch_idx + 1) % accumulate == 0,
            step_context=step_context,
            clip_val=self.clip_val,
            clip_algorithm=self.clip_algorithm,
        )

    def run_batch(self, batch: Any, context: BatchContext, rng_state: Any, device: torch.device) -> Optional[Tensor]:
        """The reference's and the shadows' whole batch through the module's own hooks and ``optimizer_step``
        (:mod:`lightning_chaos.mirror`: closure optimizers, a warm-up in ``optimizer_step``, gradient hooks);
        the reference's training loss."""
        self.reference.run_batch(batch, context, rng_state, device, follow_outside=False)
        self.shadows.run_batch(batch, context, rng_state, device, follow_outside=False)
        loss = self.reference.last_losses[0]
        return None if loss is None else loss * context.accumulate_grad_batches

    @property
    def optimizers(self) -> list[Optimizer]:
        """The reference's and the shadows' optimizers, in the stack's row order."""
        return [*self.reference.optimizers, *self.shadows.optimizers]

    @property
    def clips(self) -> bool:
        return self.reference_clip is not None

    def step(self, loss: Optional[Tensor], renormalize_every: int, optimizers_stepped: bool = False) -> bool:
        """The optimizer steps after a backward (unless a stacked optimizer made them), the pull-back every period;
        True once the run diverged."""
        if not optimizers_stepped:  # a fixed η, set once: re-setting the groups would undo an adaptive optimizer's own
            self.reference.optimizer_step(None, self.reference_clip)
            self.shadows.optimizer_step(None, self.shadow_clip)
        self.steps += 1
        if self.steps % renormalize_every == 0:  # distances are needed only at pull-backs and at the end
            self.shadows.pull_back(self.shadows.distances())
            if self.steps == renormalize_every:  # the first period aligns the separation: leave it out
                self.transient = self.shadows.log_growth_sum.clone()
        if loss is not None:
            self.losses.append(loss)
        if self.steps % _DIVERGENCE_CHECK_EVERY == 0 and self.losses and self._diverged():
            self.done = True
        return self.done

    def release_gradients(self) -> None:
        """Drop the ``.grad`` views after the optimizer steps: they would keep this step's batched gradients of every
        candidate alive through the next step's forward and backward, doubling the gradients' peak memory."""
        for params in self.reference.shadow_params + self.shadows.shadow_params:
            for parameter in params:
                parameter.grad = None

    @torch.no_grad()
    def detach_from_stack(self) -> None:
        """Give a finished run's tensors their own storage: as views into a stack they would keep the whole stack
        (every other candidate's rows) alive after the others moved on to a smaller one."""
        self.release_gradients()
        for module in self.reference.shadows + self.shadows.shadows:
            for tensor in (*module.parameters(), *module.buffers()):
                tensor.data = tensor.data.clone()

    def _diverged(self) -> bool:
        first, last = self.losses[0].item(), self.losses[-1].item()
        return not math.isfinite(last) or abs(last) > _DIVERGENCE_LOSS_FACTOR * abs(first) + 1e-12

    def result(self, planned_steps: int, renormalize_every: int, accumulate: int = 1) -> SweepRun:
        """Λ, loss ratio, learning and the loss curve of this η."""
        steps, shadows = self.steps, self.shadows
        pulled_back = steps % renormalize_every == 0
        growth = shadows.log_growth(shadows.distances(), renormalized=True, pulled_back=pulled_back)
        if steps > renormalize_every:
            growth, measured = growth - self.transient.to(growth), steps - renormalize_every
        else:
            measured = steps
        exponent = benettin_exponent(growth.double().cpu(), measured).nanmean().item()
        loss_values = torch.stack(self.losses).double().cpu() if self.losses else torch.tensor([math.nan])
        head = loss_values[0]  # the loss at the initial parameters: the same for every η
        tail = loss_values[-max(1, len(loss_values) // 4) :].mean()
        # tail / head for a positive initial loss; measured against |head| so that below 1 means "fell" for any sign
        ratio = (1 - (head - tail) / head.abs().clamp_min(torch.finfo(torch.float64).tiny)).item()
        diverged = steps < planned_steps or not torch.isfinite(loss_values).all()
        learning = not diverged and ratio < _LEARNING_LOSS_RATIO
        curve = torch.full((planned_steps,), math.nan, dtype=torch.float64)
        curve[: len(self.losses)] = loss_values[:planned_steps] if self.losses else curve[:0]
        return SweepRun(exponent, ratio, learning, curve, steps * accumulate * (1 + len(shadows.shadows)))



def reset_state(optimizer: Optimizer) -> None:
    """The state a freshly built optimizer of this class has: empty for most, but Adagrad makes its accumulators in
    ``__init__`` (and before torch 2.13 its step fails without them). Built over the same param groups; an optimizer
    that cannot be rebuilt from them (required arguments beyond the groups) is left with an empty state."""
    optimizer.state.clear()
    try:
        fresh = build_like(optimizer, [dict(group) for group in optimizer.param_groups])
    except Exception:  # a custom optimizer's constructor: fresh state is what its step makes of none
        return
    optimizer.state.update(fresh.state)


def unscheduled_lr(group: dict[str, Any]) -> float:
    """A param group's LR without its scheduler's current factor: OneCycleLR's peak (``max_lr``), another scheduler's
    ``initial_lr``, else ``lr``. Under a warm-up, ``lr`` at fit start is a fraction of the LR the user set."""
    for key in ("max_lr", "initial_lr", "lr"):
        if key in group:
            return float(group[key])
    raise KeyError("the optimizer's param group has no `lr`")


def mean_loss(losses: list[Optional[Tensor]]) -> Optional[Tensor]:
    """The loss of one optimizer step: the mean over its batches (None where ``training_step`` skipped one)."""
    kept = [loss for loss in losses if loss is not None]
    if len(kept) <= 1:
        return kept[0] if kept else None
    return torch.stack(kept).mean()



class LRSweep:
    """Trains candidates at given learning rates from every initialisation, on the same batches and random draws.

    Args:
        module: the LightningModule the candidates are copied from (its trainer supplies nothing here).
        optimizer: the optimizer whose class and hyperparameters every candidate gets, with only the LR changed.
        batches: ``(batch, rng_state)`` pairs on the module's device: the batches of the window, in order, with the
            random state each is replayed under (:func:`seeded_rng_states`).
        base_lr: the LR that ``optimizer``'s param groups are scaled from (every group by the same factor).
        steps_per_lr: optimizer steps per candidate.
        num_shadows: perturbed copies per candidate.
        epsilon: relative size of the perturbation.
        renormalize_every: pull-back period of the Benettin estimate.
        seed: seed of the perturbations.
        init_states: the initialisations' state dicts (None: the module as given).
        accumulate: batches per optimizer step.
        step_context: the precision plugin's ``train_step_context``.
        clip_val, clip_algorithm: the Trainer's gradient clipping.
        stack: train a grid's candidates in one ``vmap`` per step (the module and optimizer were checked).
        rank, world_size, gather: this process, the number of processes, and an all-gather of Python objects: the
            candidates of every grid are split across processes and their runs gathered, so every rank holds them all.
        on_trained: called with the η just trained (for a progress bar).
    """

    def __init__(
        self,
        module: LightningModule,
        optimizer: Optimizer,
        batches: list[tuple[Any, Any]],
        *,
        base_lr: float,
        steps_per_lr: int,
        num_shadows: int = 1,
        epsilon: float = 1e-4,
        renormalize_every: int = 5,
        seed: int = 0,
        init_states: Sequence[Optional[dict[str, Tensor]]] = (None,),
        accumulate: int = 1,
        step_context: Callable[[], Any] = torch.enable_grad,
        clip_val: Optional[float] = None,
        clip_algorithm: Optional[str] = None,
        stack: bool = False,
        rank: int = 0,
        world_size: int = 1,
        gather: Optional[Callable[[Any], list[Any]]] = None,
        on_trained: Optional[Callable[[float], None]] = None,
    ) -> None:
        if world_size > 1 and gather is None:
            raise ValueError("`gather` is needed to split a sweep across processes")
        self.module, self.optimizer, self.batches = module, optimizer, batches
        self.base_lr, self.steps_per_lr, self.num_shadows = base_lr, steps_per_lr, num_shadows
        self.epsilon, self.renormalize_every, self.seed = epsilon, renormalize_every, seed
        self.init_states, self.accumulate, self.step_context = list(init_states), accumulate, step_context
        self.clip_val, self.clip_algorithm = clip_val, clip_algorithm
        self.stack = stack
        self.rank, self.world_size, self.gather = rank, world_size, gather
        self.on_trained = on_trained
        self.trained_here: list[float] = []  # the η this process trained
        self._said_why_optimizers_step_apart = False

    def grid(self, lrs: Sequence[float], stop_past_the_edge: bool = False, rule: str = "efold") -> Runs:
        """Train every η of ``lrs`` (increasing) from every initialisation; every process gets every run.

        With ``stop_past_the_edge`` and candidates trained one at a time, the grid ends after the first η that is
        chaotic and no longer learns once a smaller one learned: larger η only fail faster. Split across processes,
        each trains its share to the end and the runs past that η are dropped, so the result is the one process's.
        """
        share = list(lrs)[self.rank :: self.world_size]
        stops = stop_past_the_edge and not self.stack
        runs: Runs = {}
        if self.stack:
            runs.update(self._train(share))
        else:
            for lr in share:
                runs.update(self._train([lr]))
                if stops and self.world_size == 1 and _past_the_edge(runs, self.steps_per_lr, rule):
                    break
        if self.world_size > 1:
            assert self.gather is not None
            runs = {lr: run for part in self.gather(runs) for lr, run in part.items()}
        runs = dict(sorted(runs.items()))
        if stops:
            runs = _as_one_process_stops(runs, self.steps_per_lr, rule)
        return runs

    def _train(self, lrs: list[float]) -> Runs:
        runs: Runs = {lr: [] for lr in lrs}
        for init_state in self.init_states:
            candidates = [self.candidate(init_state, lr) for lr in lrs]
            if self.stack:
                self._train_stacked(candidates)
            else:
                for candidate in candidates:
                    self._train_one(candidate)
            for lr, candidate in zip(lrs, candidates):
                runs[lr].append(candidate.result(self.steps_per_lr, self.renormalize_every, self.accumulate))
        for lr in lrs:
            self.trained_here.append(lr)
            if self.on_trained is not None:
                self.on_trained(lr)
        return runs

    def candidate(self, init_state: Optional[dict[str, Tensor]], lr: float) -> "Candidate":
        """A reference copy of the module at ``lr`` with a fresh optimizer state, and its ε-perturbed shadows."""
        optimizer = self.optimizer
        reference = ShadowEnsemble(self.module, optimizer, 1, Perturbation(0.0))
        if init_state is not None:
            reference.shadows[0].load_state_dict(init_state)
        reference_optimizer = reference.optimizers[0]
        reset_state(reference_optimizer)  # the sweep starts every η from a fresh optimizer
        for group, template in zip(reference_optimizer.param_groups, optimizer.param_groups):
            group["lr"] = unscheduled_lr(template) * lr / self.base_lr  # a fixed η: no warm-up factor
        if reference_optimizer.param_groups[0].get("train_mode") is False:  # schedule-free: step only in train mode
            reference_optimizer.train()  # type: ignore[attr-defined]  # a schedule-free optimizer's mode
        shadows = ShadowEnsemble(
            reference.shadows[0],
            reference_optimizer,
            self.num_shadows,
            Perturbation(self.epsilon, relative=True, perturb_biases=True),
            generator=torch.Generator().manual_seed(self.seed),
        )
        return Candidate(reference, shadows, self.clip_val, self.clip_algorithm)

    def _train_one(self, candidate: "Candidate") -> None:
        """One candidate after the other: only two copies of the model in memory at a time."""
        device, accumulate = self.module.device, self.accumulate
        window: list[Optional[Tensor]] = []  # the losses of this optimizer step's batches
        for batch_idx, (batch, rng_state) in enumerate(self.batches):
            context = candidate.context(batch_idx, accumulate, self.step_context)
            window.append(candidate.run_batch(batch, context, rng_state, device))
            if context.optimizer_steps:
                if candidate.step(mean_loss(window), self.renormalize_every, optimizers_stepped=True):
                    break
                window = []

    def _train_stacked(self, candidates: list["Candidate"]) -> None:
        """All candidates (references and shadows of every η) in one ``vmap`` per batch and, where the optimizer
        allows, one optimizer step (:class:`~lightning_chaos.vectorized.StackedOptimizer`); one at a time from the
        batch where a batched step fails (the reason is said once at info level). A candidate that diverged leaves the
        stack: the others go on in a smaller one, so its rows cost nothing more."""
        device, accumulate, step_context = self.module.device, self.accumulate, self.step_context
        names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        width = 1 + self.num_shadows
        in_stack = list(candidates)  # the candidates whose rows are in `stacked`, in row order
        stacked = self._stack_candidates(in_stack, names)
        stepper = self._stacked_optimizer(stacked, in_stack)
        active: list[Candidate] = []
        windows: list[list[Optional[Tensor]]] = []  # per active candidate, the losses of this optimizer step's batches
        for batch_idx, (batch, rng_state) in enumerate(self.batches):
            first_of_step = batch_idx % accumulate == 0
            last_of_step = (batch_idx + 1) % accumulate == 0
            if first_of_step:
                active = [c for c in candidates if not c.done]
                if not active:
                    break  # every candidate diverged: nothing left to learn from these steps
                if stacked is not None and len(active) < len(in_stack):
                    if stepper is not None:
                        stepper.unstack()
                    for candidate in in_stack:
                        if candidate.done:  # it must keep neither the old stack nor its batched gradients alive
                            candidate.detach_from_stack()
                    in_stack = active
                    stacked = self._stack_candidates(in_stack, names)
                    stepper = self._stacked_optimizer(stacked, in_stack)
                windows = [[] for _ in active]
            losses: Optional[Tensor] = None
            if stacked is not None:
                try:
                    with replayed_rng(rng_state, device):
                        losses, grads = stacked.forward_backward(batch, batch_idx, step_context, accumulate)
                except NotVectorizable as error:
                    stacked = None
                    self.stack = False
                    if stepper is not None:
                        stepper.unstack()
                        stepper = None
                    rank_zero_info(f"ChaosLRFinder: training the candidates one at a time from now on: {error}.")
            if losses is not None and stepper is not None:
                stepper.accumulate_gradients(grads, zero_grad=first_of_step)
                if last_of_step:
                    stepper.step()
            for row, candidate in enumerate(active):
                if losses is not None:
                    offset = row * width  # `active` is the stack's row order here
                    if stepper is None:
                        candidate.reference.take_gradients(grads, [offset], zero_grad=first_of_step)
                        candidate.shadows.take_gradients(grads, range(offset + 1, offset + width), first_of_step)
                    loss: Optional[Tensor] = losses[offset]
                else:
                    loss = candidate.forward_backward(batch, batch_idx, rng_state, device, accumulate, step_context)
                windows[row].append(loss)
                if last_of_step:
                    loss = mean_loss(windows[row])
                    candidate.step(loss, self.renormalize_every, optimizers_stepped=stepper is not None)
                    candidate.release_gradients()
            if last_of_step and stepper is not None:
                stepper.release_gradients()
            grads = None  # type: ignore[assignment]  # with the .grad views gone, the batched gradients are freed before the next step's

    def _stacked_optimizer(
        self, stacked: Optional[StackedShadows], candidates: list["Candidate"]
    ) -> Optional[StackedOptimizer]:
        """One optimizer step for the whole stack, or None: without a stack, with gradient clipping (per candidate), or
        for an optimizer whose step is not linear in the learning rate (said at info level)."""
        if stacked is None or any(c.clips for c in candidates):
            return None
        try:
            return StackedOptimizer(stacked, [o for c in candidates for o in c.optimizers])
        except NotVectorizable as error:
            if not self._said_why_optimizers_step_apart:  # once, not at every restack
                rank_zero_info(f"ChaosLRFinder: stepping the candidates' optimizers one at a time: {error}.")
                self._said_why_optimizers_step_apart = True
            return None

    def _stack_candidates(self, candidates: list["Candidate"], names: list[str]) -> Optional[StackedShadows]:
        """The candidates' references and shadows as views into stacked tensors, or None (said at info level) when
        the module cannot be stacked: an odd module must not stop the sweep."""
        members = [m for c in candidates for m in c.reference.shadows + c.shadows.shadows]
        try:
            return StackedShadows(members, names, stacks_the_reference=True)
        except Exception as error:
            self.stack = False
            rank_zero_info(f"ChaosLRFinder: training the candidates one at a time: {error!r}.")
            return None


def _past_the_edge(runs: Runs, steps_per_lr: int, rule: str) -> bool:
    lrs = sorted(runs)
    exponents = torch.tensor([[run.exponent for run in runs[lr]] for lr in lrs], dtype=torch.float64)
    learned = torch.tensor([[run.learning for run in runs[lr]] for lr in lrs])
    return past_the_edge(exponents, learned, steps_per_lr, rule)


def _as_one_process_stops(runs: Runs, steps_per_lr: int, rule: str) -> Runs:
    """``runs`` up to the η where one process training one candidate after the other would have stopped."""
    kept: Runs = {}
    for lr, run in runs.items():
        kept[lr] = run
        if _past_the_edge(kept, steps_per_lr, rule):
            break
    return kept


def swept_quantity(optimizer: Optimizer) -> str:
    """What a sweep of ``optimizer``'s ``lr`` sweeps. Optimizers that estimate their own step size d and keep it in
    their param groups (Prodigy, the D-Adaptation family) take ``lr`` as a multiplier of d, default 1: sweeping it
    asks how far from their own estimate to step, not which step size to take."""
    group = optimizer.param_groups[0]
    if "d" in group and "lr" in group:
        return f"the `lr` of {type(optimizer).__name__}, a multiplier (default 1) of the step size d it estimates itself"
    return "the learning rate"


def seeded_rng_states(count: int, seed: int, device: torch.device) -> list[Any]:
    """The random state of each of the window's ``count`` batches: new dropout masks and augmentation draws at every
    step, the same for every η. Seeded once per sweep (torch.manual_seed also seeds every accelerator lazily and costs
    about a millisecond, as much as a small model's step); the caller's streams are the caller's to restore."""
    states = []
    for batch_idx in range(count):
        torch.manual_seed(seed + batch_idx)
        random.seed(seed + batch_idx)
        np.random.seed((seed + batch_idx) % 2**32)
        states.append(capture_rng_state(device))
    return states


def initial_states(module: LightningModule, num_inits: int, seed: int) -> list[Optional[dict[str, Tensor]]]:
    """The module as given (None), then ``num_inits`` − 1 initialisations drawn by the module's own
    ``reset_parameters`` (of the LightningModule if it has one, else of every submodule)."""
    states: list[Optional[dict[str, Tensor]]] = [None]
    if num_inits == 1:
        return states
    scratch = make_shadow_module(module)
    for index in range(1, num_inits):
        torch.manual_seed(seed + 1000 + index)
        if callable(getattr(scratch, "reset_parameters", None)):
            scratch.reset_parameters()  # type: ignore[operator]  # nn.Module.__getattr__ types it a Tensor
        else:
            for submodule in scratch.modules():
                if submodule is not scratch and callable(getattr(submodule, "reset_parameters", None)):
                    submodule.reset_parameters()  # type: ignore[operator]
        states.append({k: v.clone() for k, v in scratch.state_dict().items()})
    return states


def _lr_range(
    lrs: Tensor, edge: Optional[float], band: Optional[tuple[float, float]], margin: float
) -> Optional[tuple[float, float]]:
    """From the smaller of the learning band's bottom and the suggestion below the edge, up to the edge: the band is
    often a single grid point wide (every η of it learned within 1.25× of the best over the window, which rules slow η
    out), and a cycle through it should pass the constant LR the finder suggests."""
    if edge is None or band is None or edge == lrs[-1].item():
        return None
    return min(band[0], edge / margin), edge


def summarise(
    runs: Runs, *, steps_per_lr: int, rule: str, anchor: str, onset_margin: float, edge_margin: float
) -> "ChaosLRFinderResult":
    """The sweep's evidence and suggestion from its runs: Λ(η) and ρ(η) with ``rule``, the loss ratios and curves, both
    edges, and the suggestion stepped back from ``anchor`` (``"trainability"`` or ``"onset"``)."""
    lrs = sorted(runs)
    table = torch.tensor([[run.exponent for run in runs[lr]] for lr in lrs], dtype=torch.float64)
    ratios = torch.tensor([[run.loss_ratio for run in runs[lr]] for lr in lrs], dtype=torch.float64)
    learned = torch.tensor([[run.learning for run in runs[lr]] for lr in lrs])
    losses = torch.stack([torch.stack([run.losses for run in runs[lr]]).mean(0) for lr in lrs])
    chaotic = chaotic_mask(table, steps_per_lr, rule=rule)
    sensitive_fraction = chaotic.double().mean(1)
    learning = learned.double().mean(1) >= 0.5
    lr_tensor = torch.tensor(lrs, dtype=torch.float64)
    exponents = table.nanmean(1)
    suggestion, onset, reason = edge_of_chaos_suggestion(lr_tensor, sensitive_fraction, learning, exponents, onset_margin)
    loss_ratio = ratios.nanmean(1)
    by_trainability, edge, edge_reason = trainability_edge_suggestion(
        lr_tensor, loss_ratio, learning, edge_margin, losses=losses
    )
    if anchor == "trainability":
        suggestion, reason = by_trainability, edge_reason
    return ChaosLRFinderResult(
        lrs=lr_tensor,
        exponents=exponents,
        sensitive_fraction=sensitive_fraction,
        learning=learning,
        suggestion=suggestion,
        onset=onset,
        exponents_per_init=table,
        loss_ratio=loss_ratio,
        steps_per_lr=steps_per_lr,
        rule=rule,
        reason=reason,
        learning_at_onset=None if onset is None else bool(learning[lrs.index(onset)]),
        trainability_edge=edge,
        lr_range=_lr_range(lr_tensor, edge, learning_band(lr_tensor, loss_ratio, learning), edge_margin),
        speed_edge=speed_band_top(lr_tensor, losses, learning),
        anchor=anchor,
        margin=edge_margin if anchor == "trainability" else onset_margin,
        losses=losses,
        model_steps=sum(run.model_steps for lr in lrs for run in runs[lr]),
    )
