"""ChaosLRFinder: sweep the learning rate for chaos and trainability on clones, without taking over the fit loop, and
set it just below the top of the learning band (or the onset of chaos)."""

import math
import random
import time
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any, NamedTuple, Optional, Union, cast

import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.tuner.lr_finder import _determine_lr_attr_name
from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, _TunerExitException
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_setattr
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from lightning_chaos import logging as chaos_logging
from lightning_chaos._validation import check_flag, check_seed
from lightning_chaos.functional.exponents import benettin_exponent
from lightning_chaos.functional.onset import (
    LEARNS_WELL_TOLERANCE,
    learns_well_threshold,
    ONSET_RULES,
    chaotic_mask,
    edge_of_chaos_suggestion,
    trainability_edge_suggestion,
)
from lightning_chaos.mirror import BatchContext, mirroring_blocker
from lightning_chaos.shadow import Perturbation, ShadowEnsemble, capture_rng_state, make_shadow_module, replayed_rng
from lightning_chaos.vectorized import (
    NotVectorizable,
    StackedOptimizer,
    StackedShadows,
    build_like,
    check_vectorize,
    vectorization_blocker,
    worth_vectorizing,
)

ANCHORS = ("onset", "trainability")

# A reference run "learns" when its mean loss over the last quarter of the window is below this share of its first loss
# (at the initial parameters, the same for every η); it "diverged" when the loss turns non-finite or exceeds this many times its first loss.
_LEARNING_LOSS_RATIO = 0.95
_DIVERGENCE_LOSS_FACTOR = 10.0
_DIVERGENCE_CHECK_EVERY = 10

# ``margin="auto"``: how far below its anchor the suggestion steps back. Under an optimizer that scales each
# coordinate's step by a running measure of its gradients, the loss after the sweep's window keeps improving past the
# fastest η, so the top of the learning band lies further above it (benchmarks/FINDER_RESULTS.md, held-out set 4).
MARGIN = 1.5
ADAPTIVE_MARGIN = 2.5
ADAPTIVE_OPTIMIZERS = tuple(
    getattr(torch.optim, name)
    for name in (
        "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "SparseAdam", "Adafactor"
    )
    if hasattr(torch.optim, name)  # Adafactor came with torch 2.5
)


class _Run(NamedTuple):
    """What one η and initialisation of the sweep measured."""

    exponent: float
    loss_ratio: float
    learning: bool
    losses: Tensor  # the reference's training loss per optimizer step, NaN after it stopped
    model_steps: int  # forward and backward passes of one copy of the model


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
        trainability_edge: the largest η that still learns well (see
            :func:`~lightning_chaos.functional.onset.trainability_edge_suggestion`), or None.
        anchor: what the suggestion was derived from, ``"trainability"`` or ``"onset"``.
        margin: the factor the suggestion stepped back from its anchor by (``margin="auto"`` resolved).
        seconds: wall time of the sweep.
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
    anchor: str = "trainability"
    margin: float = MARGIN
    seconds: float = 0.0
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


class ChaosLRFinder(Callback):
    r"""Sweep the learning rate for chaos and trainability, and set it before training starts.

    For each η of a geometric grid from ``min_lr`` to ``max_lr``, a reference copy of the model and ε-perturbed
    shadows train for ``steps_per_lr`` optimizer steps on the same batches (the first batches of the trainer's
    training data, with the same dropout masks for every η), with the user's optimizer class and hyperparameters and
    only the learning rate changed, through the user's ``training_step`` (the lockstep engine of
    :class:`~lightning_chaos.ChaosProbe`). Renormalised two-trajectory exponents Λ(η) tell where the trajectory
    turns sensitive to initial conditions; the reference's loss tells whether the network still learns there.

    Two edges are read off the sweep. The onset of chaos η* is the first η at which at least half of the
    initialisations are chaotic by ``rule`` (see :func:`~lightning_chaos.functional.onset.chaotic_mask`). The top of
    the learning band is the largest η whose loss still falls nearly as well as the sweep's best (see
    :func:`~lightning_chaos.functional.onset.trainability_edge_suggestion`). The suggestion steps back by ``margin``
    from the one named by ``anchor``, after refining the grid with ``refine`` points next to it.

    The default anchor is the top of the learning band. The seed paper's hypothesis, that training is fastest near the
    onset of chaos, held on tanh networks under SGD, where the two edges coincide. On the benchmark's ReLU MLPs and
    under Adam the trajectory is already chaotic far below the fastest η, and on CNNs whose initial plateau is chaotic
    the onset falls past the band: over 15 tasks and 20 seeds the onset suggestion never reached the target accuracy
    on 7, while the top of the learning band reached it on all (by median; on 295 of 300 seeds) and, with the
    default margin, within 1.25× of the best grid η on all 15 and on five held-out tasks under Adam, AdamW and
    RMSprop (benchmarks/FINDER_RESULTS.md). With the default there is no suggestion when nothing learns
    or when the network still learns well at ``max_lr``. ``anchor="onset"`` keeps the paper's
    rule; then there is also none when the grid never reaches chaos or chaos appears only where learning has already
    failed. A warning says what to widen.

    Under Adam, Λ(η) can be a burst in the first steps spread over the window rather than a sustained rate. Adam's
    first steps are nearly sign(g), so the perturbation flips small gradient components and the separation grows by
    e^6 or more within the first pull-back period, which is left out as transient. The moment separation made then
    keeps turning into parameter separation for a few 1/(1 − β₁) steps and adds a fixed ln-growth that the window
    divides: on the benchmark's CNN every η that kills the network reads Λ ≈ 2.9/(``steps_per_lr`` −
    ``renormalize_every``). A Λ that halves when ``steps_per_lr`` doubles is such a burst; the e-fold rule, which asks
    about growth within the window, counts it as chaos.

    Everything runs on clones in the finder's own loop: afterwards the model's weights, the optimizer's state, the RNG
    state and the trainer's state are what they were, apart from the learning rate it sets, which is written like
    Lightning's ``LearningRateFinder`` does: into ``lr``/``learning_rate`` (or ``attr_name``) of the model, its
    hparams or the datamodule, and into the optimizer's param groups (scaling every group by the same factor).

    Args:
        min_lr: smallest η of the grid (> 0).
        max_lr: largest η of the grid (> min_lr).
        num_lrs: points of the geometric grid (≥ 3).
        steps_per_lr: optimizer steps per η (≥ 10). Longer windows separate neutral from chaotic better. With the
            Trainer's ``accumulate_grad_batches`` each step accumulates that many batches, as training will.
        num_inits: initialisations per η (≥ 1); the first is the model as given, the others are drawn by the
            model's own ``reset_parameters`` (of the LightningModule if it has one, else of every submodule).
        num_shadows: perturbed copies per initialisation (≥ 1).
        epsilon: relative size of the perturbation, ‖δ‖ = ε‖θ‖.
        renormalize_every: pull-back period of the Benettin estimate, in steps.
        rule: onset rule, ``"efold"`` (default), ``"baseline"`` or ``"positive"``.
        margin: factor ≥ 1 to step back below the anchor, or ``"auto"`` (default): 2.5 below the top of the learning
            band under an adaptive optimizer (torch's Adam, AdamW, Adamax, NAdam, RAdam, RMSprop, Adagrad,
            Adadelta, SparseAdam, Adafactor, or a subclass: ``lightning_chaos.finder.ADAPTIVE_OPTIMIZERS``), 1.5
            otherwise (also for a wrapper such as ``ZeroRedundancyOptimizer``, whatever it wraps) and below the
            onset. ``result.margin`` says which was taken. 1.5 was chosen for the onset anchor on five tasks (1
            overshot into divergence) and kept for the band's top, below which τ grows about like 1/η under SGD, so
            the margin is roughly what it costs. Under adaptive optimizers the loss after the window keeps improving
            past the fastest η, so the band's top lies 2–3× above it: 1.5 overshot to 1.31× the best τ on Adam's
            digits MLP. 2.5 was chosen on the two Adam tasks and then passed a rule fixed before five held-out adaptive
            tasks were run (worst 1.23× there, against 1.32× at 1.5; benchmarks/FINDER_RESULTS.md). An optimizer
            this list does not know (a third-party one, say) gets 1.5: pass ``margin=2.5`` if it is adaptive.
        refine: extra grid points next to the anchor: just above the top of the learning band, or between the last
            ordered η and the onset (0 to skip).
        attr_name: name of the learning-rate attribute; by default ``lr`` or ``learning_rate``.
        update_attr: write the suggestion into the model and the optimizer.
        seed: seed of the perturbations, the re-initialisations and the sweep's random draws (dropout masks, and
            torch, Python ``random`` or NumPy draws in ``training_step``), in [0, 2**32 − 1].
        anchor: what the suggestion steps back from by ``margin``. ``"trainability"`` (default): the top of the
            learning band, the largest η whose loss still falls within 1.25× as well as the sweep's best
            (:func:`~lightning_chaos.functional.onset.trainability_edge_suggestion`). ``"onset"``: the onset of chaos
            η*, the seed paper's edge of chaos. On tanh networks under SGD the two agree; on ReLU networks, CNNs and
            under Adam the onset lies far below the fastest η (benchmarks/FINDER_RESULTS.md).
        vectorize: train the candidates of a grid (every η's reference and shadows) as one ``torch.func.vmap`` per
            step. ``"auto"`` (default) does for models up to 1 M parameters that vmap can run (no ``.item()`` in
            ``training_step``). It then runs the whole coarse grid at once, without stopping past the edge. With
            torch's SGD, Adam, AdamW, Adamax, NAdam, RAdam, RMSprop, Adadelta or Adagrad, and no gradient clipping or
            GradScaler, the candidates' optimizer steps are one step too
            (:class:`~lightning_chaos.vectorized.StackedOptimizer`). Otherwise, or with ``False``, the candidates
            train one after the other, with two copies of the model in memory instead of 2 × ``num_lrs``. Both give
            the same Λ(η) and loss ratios to float tolerance wherever the network learns; where it fails, a chaotic
            trajectory amplifies the two ways' different rounding into another realisation of itself (Λ there
            differed by up to 15 % on the digits under Adam). On CUDA a dropout draws one mask for all stacked rows,
            not the fused kernel's mask of an unbatched step, so with dropout the two agree in distribution only.
            The suggestion moves with rounding only where the loss ratios sit at the learning band's threshold: the
            stacked optimizer step changed it on 12 of 300 benchmark seeds, by one or two refinement steps
            (benchmarks/FINDER_RESULTS.md).

    Raises:
        ValueError: at construction, for an argument out of its range (the message names it).
        MisconfigurationException: before any training, for manual optimisation or several optimizers.
        AttributeError: before any training, when no learning-rate attribute is found (with ``update_attr``).

    Example:
        >>> from lightning.pytorch import Trainer, seed_everything
        >>> from lightning_chaos import ChaosLRFinder
        >>> from lightning_chaos.demo import DigitsDataModule, MLPClassifier
        >>> _ = seed_everything(0, verbose=False)
        >>> finder = ChaosLRFinder(min_lr=1e-2, max_lr=10, num_lrs=4, steps_per_lr=20)  # a short sweep
        >>> model = MLPClassifier()
        >>> trainer = Trainer(max_epochs=1, callbacks=[finder], logger=False, enable_progress_bar=False,
        ...                   enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(model, datamodule=DigitsDataModule())  # sweeps on clones first, then trains at the suggestion
        >>> model.lr == finder.result.suggestion
        True

        ``finder.result.plot()`` draws the sweep: Λ(η), ρ(η), both edges and the suggestion.
    """

    def __init__(
        self,
        min_lr: float = 1e-4,
        max_lr: float = 10.0,
        num_lrs: int = 11,
        steps_per_lr: int = 100,
        num_inits: int = 1,
        num_shadows: int = 1,
        epsilon: float = 1e-4,
        renormalize_every: int = 5,
        rule: str = "efold",
        margin: Union[float, str] = "auto",
        refine: int = 4,
        attr_name: str = "",
        update_attr: bool = True,
        seed: int = 0,
        vectorize: Union[bool, str] = "auto",
        anchor: str = "trainability",
    ) -> None:
        for name, value in (("min_lr", min_lr), ("max_lr", max_lr), ("epsilon", epsilon)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")
        if min_lr >= max_lr:
            raise ValueError(f"`min_lr` ({min_lr}) must be smaller than `max_lr` ({max_lr})")
        for name, value, least in (
            ("num_lrs", num_lrs, 3),
            ("steps_per_lr", steps_per_lr, 10),
            ("num_inits", num_inits, 1),
            ("num_shadows", num_shadows, 1),
            ("renormalize_every", renormalize_every, 1),
            ("refine", refine, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"`{name}` must be an integer >= {least}, got {value!r}")
        if rule not in ONSET_RULES:
            raise ValueError(f"`rule` must be one of {ONSET_RULES}, got {rule!r}")
        if anchor not in ANCHORS:
            raise ValueError(f"`anchor` must be one of {ANCHORS}, got {anchor!r}")
        check_vectorize(vectorize)
        if not (isinstance(margin, str) and margin == "auto") and (
            isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 1 <= margin < math.inf
        ):
            raise ValueError(f"`margin` must be 'auto' or a finite number >= 1, got {margin!r}")
        check_seed("seed", seed)
        check_flag("update_attr", update_attr)
        if not isinstance(attr_name, str):
            raise ValueError(f"`attr_name` must be a string (empty: `lr` or `learning_rate`), got {attr_name!r}")
        self.min_lr = float(min_lr)
        self.max_lr = float(max_lr)
        self.num_lrs = num_lrs
        self.steps_per_lr = steps_per_lr
        self.num_inits = num_inits
        self.num_shadows = num_shadows
        self.epsilon = float(epsilon)
        self.renormalize_every = renormalize_every
        self.rule = rule
        self.margin = margin if isinstance(margin, str) else float(margin)
        self._onset_margin = self._edge_margin = MARGIN  # resolved from the optimizer at each sweep
        self.refine = refine
        self.attr_name = attr_name
        self.update_attr = update_attr
        self.seed = seed
        self.vectorize = vectorize
        self.anchor = anchor
        self._stack = False
        self._said_why_optimizers_step_apart = False
        self._accumulate = 1
        self.result: Optional[ChaosLRFinderResult] = None
        self._early_exit = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.ckpt_path is not None:  # Lightning restores the checkpoint's optimizer, LR included, after this hook
            rank_zero_info(
                "ChaosLRFinder: resuming from a checkpoint, whose optimizer state sets the learning rate; no sweep."
            )
            return
        self.find(trainer, pl_module)
        if self._early_exit:
            raise _TunerExitException()

    def find(self, trainer: Trainer, pl_module: LightningModule) -> ChaosLRFinderResult:
        """Run the sweep on clones, store and return the result, and set the suggestion (with ``update_attr``)."""
        if not pl_module.automatic_optimization:
            raise MisconfigurationException("ChaosLRFinder supports automatic optimization only (manual found).")
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException(
                f"ChaosLRFinder needs exactly one optimizer, found {len(trainer.optimizers)}."
            )
        attr_name = self._lr_attribute(pl_module) if self.update_attr else self.attr_name
        optimizer = trainer.optimizers[0]
        self._onset_margin, self._edge_margin = self._margins(optimizer)
        base_lr = (
            float(lightning_getattr(pl_module, attr_name))  # type: ignore[arg-type]  # the model's number
            if attr_name else _unscheduled_lr(optimizer.param_groups[0])
        )
        started = time.monotonic()
        # Lightning's isolate_rng restores only on a normal exit: an error (or an interrupt) in the user's
        # training_step would leave the global streams where the sweep seeded them.
        rng_states = _collect_rng_states()
        try:
            result = self._sweep(trainer, pl_module, base_lr)
        finally:
            _set_rng_states(rng_states)
        result.seconds = time.monotonic() - started
        result = trainer.strategy.broadcast(result, src=0)  # every rank ends with rank 0's suggestion
        self.result = result
        if result.suggestion is None:
            rank_zero_warn(f"ChaosLRFinder found no suggestion: {result.reason}.")
        elif self.update_attr:
            self._apply(trainer, pl_module, attr_name, result.suggestion, base_lr)
        self._warn_if_anchors_disagree(result)
        self._report(trainer, result)
        return result

    def _margins(self, optimizer: Optimizer) -> tuple[float, float]:
        """The margins below the onset and below the top of the learning band."""
        if self.margin != "auto":
            return cast(float, self.margin), cast(float, self.margin)  # a number: checked in __init__
        return MARGIN, auto_margin(optimizer)

    # -- the sweep ------------------------------------------------------------------------------------------------

    def _sweep(self, trainer: Trainer, pl_module: LightningModule, base_lr: float) -> ChaosLRFinderResult:
        self._accumulate = trainer.accumulate_grad_batches
        batches = self._collect_batches(trainer, pl_module)
        # New dropout masks and augmentation draws at every step, the same for every η. Seeded once per sweep:
        # torch.manual_seed also seeds every accelerator lazily and costs about a millisecond, as much as a small
        # model's step. The caller's streams come back in find, however the sweep ends.
        rng_states = []
        for batch_idx in range(len(batches)):
            torch.manual_seed(self.seed + batch_idx)
            random.seed(self.seed + batch_idx)
            np.random.seed((self.seed + batch_idx) % 2**32)
            rng_states.append(capture_rng_state(pl_module.device))
        batches = list(zip(batches, rng_states))
        inits = self._initial_states(pl_module)
        coarse = torch.logspace(math.log10(self.min_lr), math.log10(self.max_lr), self.num_lrs, dtype=torch.float64)
        runs: dict[float, list[_Run]] = {}
        progress = self._progress(trainer, self.num_lrs * len(inits))
        self._stack = self._should_stack(pl_module)
        if self._stack:  # the whole coarse grid in one vmap per step
            self._run_grid(trainer, pl_module, coarse.tolist(), inits, batches, base_lr, runs, progress)
        else:
            for lr in coarse.tolist():
                self._run_grid(trainer, pl_module, [lr], inits, batches, base_lr, runs, progress)
                if self._past_the_edge(runs):
                    break  # larger learning rates only fail faster: the rest of the grid adds nothing
        result = self._summarise(runs)
        bracket = self._refinement_bracket(result)
        if self.refine and bracket is not None:
            low, high = bracket
            fine = torch.logspace(math.log10(low), math.log10(high), self.refine + 2, dtype=torch.float64)
            extra = [lr for lr in fine[1:-1].tolist() if lr not in runs]
            if progress is not None:
                progress.total += len(extra) * len(inits)
            self._run_grid(trainer, pl_module, extra, inits, batches, base_lr, runs, progress)
            result = self._summarise(runs)
        if progress is not None:
            progress.close()
        return result

    def _warn_if_anchors_disagree(self, result: ChaosLRFinderResult) -> None:
        """With the onset anchor, say when the top of the learning band points somewhere else: on the benchmark's
        ReLU networks and a Fashion-MNIST CNN the onset suggestion was 3x too small or never reached the target."""
        if self.anchor != "onset" or result.suggestion is None or result.trainability_edge is None:
            return
        alternative = result.trainability_edge / self._edge_margin
        ratio = result.suggestion / alternative
        if ratio > 1.5 or ratio < 1 / 3:
            where = "above" if ratio > 1 else "far below"
            rank_zero_warn(
                f"ChaosLRFinder: the suggestion lr={result.suggestion:.3g} (from the onset of chaos) lies {where} the"
                f" top of the learning band (lr={result.trainability_edge:.3g}); `anchor='trainability'` would suggest"
                f" lr={alternative:.3g}. On such sweeps it was the faster choice in benchmarks/FINDER_RESULTS.md."
            )

    def _refinement_bracket(self, result: ChaosLRFinderResult) -> Optional[tuple[float, float]]:
        """The grid interval to refine: just below the onset, or just above the top of the learning band."""
        lrs = result.lrs
        if self.anchor == "onset":
            if result.onset is None or result.onset <= lrs[0].item():
                return None
            return lrs[lrs < result.onset][-1].item(), result.onset
        if result.trainability_edge is None or result.trainability_edge >= lrs[-1].item():
            return None
        return result.trainability_edge, lrs[lrs > result.trainability_edge][0].item()

    def _should_stack(self, pl_module: LightningModule) -> bool:
        copies = self.num_lrs * (1 + self.num_shadows)
        wanted = worth_vectorizing(pl_module, copies) if self.vectorize == "auto" else self.vectorize
        if not wanted:
            return False
        reason = vectorization_blocker(pl_module, pl_module.device, stacks_the_reference=True) or mirroring_blocker(
            pl_module, pl_module.trainer.optimizers[0], stacked_optimizer=True
        )
        if reason is not None:
            rank_zero_info(f"ChaosLRFinder: training the candidates one at a time: {reason}.")
        return reason is None

    def _past_the_edge(self, runs: dict[float, list[_Run]]) -> bool:
        """Whether the latest η is chaotic and not learning, after some smaller η learned."""
        lrs = sorted(runs)
        learned = [sum(run.learning for run in runs[lr]) * 2 >= len(runs[lr]) for lr in lrs]
        if learned[-1] or not any(learned):
            return False
        table = torch.tensor([[run.exponent for run in runs[lr]] for lr in lrs], dtype=torch.float64)
        return bool(chaotic_mask(table, self.steps_per_lr, rule=self.rule)[-1].double().mean() >= 0.5)

    def _run_grid(
        self, trainer: Trainer, pl_module: LightningModule, lrs: list[float], inits: list[Any], batches: list,
        base_lr: float, runs: dict[float, list[_Run]], progress: Any,
    ) -> None:
        for lr in lrs:
            runs[lr] = []
        for init_state in inits:
            candidates = [self._candidate(trainer, pl_module, init_state, lr / base_lr) for lr in lrs]
            if self._stack:
                self._train_stacked(pl_module, candidates, batches, trainer.precision_plugin.train_step_context)
            else:
                for candidate in candidates:
                    self._train_one(pl_module, candidate, batches, trainer.precision_plugin.train_step_context)
            for lr, candidate in zip(lrs, candidates):
                runs[lr].append(candidate.result(self.steps_per_lr, self.renormalize_every, self._accumulate))
            if progress is not None:
                progress.update(len(lrs))
                progress.set_postfix(lr=f"{lrs[-1]:.3g}")

    def _candidate(
        self, trainer: Trainer, pl_module: LightningModule, init_state: Optional[dict[str, Tensor]], lr_scale: float
    ) -> "_Candidate":
        """A reference copy of the model at one η, fresh optimizer state, and its ε-perturbed shadows."""
        optimizer = trainer.optimizers[0]
        reference = ShadowEnsemble(pl_module, optimizer, 1, Perturbation(0.0))
        if init_state is not None:
            reference.shadows[0].load_state_dict(init_state)
        reference_optimizer = reference.optimizers[0]
        _reset_state(reference_optimizer)  # the sweep starts every η from a fresh optimizer
        for group, template in zip(reference_optimizer.param_groups, optimizer.param_groups):
            group["lr"] = _unscheduled_lr(template) * lr_scale  # a fixed η: no warm-up factor
        if reference_optimizer.param_groups[0].get("train_mode") is False:  # schedule-free: step only in train mode
            reference_optimizer.train()  # type: ignore[attr-defined]  # a schedule-free optimizer's mode
        shadows = ShadowEnsemble(
            reference.shadows[0],
            reference_optimizer,
            self.num_shadows,
            Perturbation(self.epsilon, relative=True, perturb_biases=True),
            generator=torch.Generator().manual_seed(self.seed),
        )
        return _Candidate(reference, shadows, trainer.gradient_clip_val, trainer.gradient_clip_algorithm)

    def _train_one(self, pl_module: LightningModule, candidate: "_Candidate", batches: list, step_context: Any) -> None:
        """One candidate after the other: only two copies of the model in memory at a time."""
        device, accumulate = pl_module.device, self._accumulate
        window: list[Optional[Tensor]] = []  # the losses of this optimizer step's batches
        for batch_idx, (batch, rng_state) in enumerate(batches):
            context = candidate.context(batch_idx, accumulate, step_context)
            window.append(candidate.run_batch(batch, context, rng_state, device))
            if context.optimizer_steps:
                if candidate.step(_mean_loss(window), self.renormalize_every, optimizers_stepped=True):
                    break
                window = []

    def _train_stacked(self, pl_module: LightningModule, candidates: list["_Candidate"], batches: list,
                       step_context: Any) -> None:
        """All candidates (references and shadows of every η) in one ``vmap`` per batch and, where the optimizer
        allows, one optimizer step (:class:`~lightning_chaos.vectorized.StackedOptimizer`); one at a time from the
        batch where a batched step fails (the reason is said once at info level). A candidate that diverged leaves the
        stack: the others go on in a smaller one, so its rows cost nothing more."""
        device, accumulate = pl_module.device, self._accumulate
        names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        width = 1 + self.num_shadows
        in_stack = list(candidates)  # the candidates whose rows are in `stacked`, in row order
        stacked = self._stack_candidates(in_stack, names)
        stepper = self._stacked_optimizer(stacked, in_stack)
        active: list[_Candidate] = []
        windows: list[list[Optional[Tensor]]] = []  # per active candidate, the losses of this optimizer step's batches
        for batch_idx, (batch, rng_state) in enumerate(batches):
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
                    self._stack = False
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
                    loss = _mean_loss(windows[row])
                    candidate.step(loss, self.renormalize_every, optimizers_stepped=stepper is not None)
                    candidate.release_gradients()
            if last_of_step and stepper is not None:
                stepper.release_gradients()
            grads = None  # type: ignore[assignment]  # with the .grad views gone, the batched gradients are freed before the next step's

    def _stacked_optimizer(
        self, stacked: Optional[StackedShadows], candidates: list["_Candidate"]
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

    def _stack_candidates(self, candidates: list["_Candidate"], names: list[str]) -> Optional[StackedShadows]:
        """The candidates' references and shadows as views into stacked tensors, or None (said at info level) when
        the module cannot be stacked: an odd module must not stop the sweep."""
        members = [m for c in candidates for m in c.reference.shadows + c.shadows.shadows]
        try:
            return StackedShadows(members, names, stacks_the_reference=True)
        except Exception as error:
            self._stack = False
            rank_zero_info(f"ChaosLRFinder: training the candidates one at a time: {error!r}.")
            return None

    def _summarise(self, runs: dict[float, list[_Run]]) -> ChaosLRFinderResult:
        lrs = sorted(runs)
        table = torch.tensor([[run.exponent for run in runs[lr]] for lr in lrs], dtype=torch.float64)
        ratios = torch.tensor([[run.loss_ratio for run in runs[lr]] for lr in lrs], dtype=torch.float64)
        learned = torch.tensor([[run.learning for run in runs[lr]] for lr in lrs])
        losses = torch.stack([torch.stack([run.losses for run in runs[lr]]).mean(0) for lr in lrs])
        chaotic = chaotic_mask(table, self.steps_per_lr, rule=self.rule)
        sensitive_fraction = chaotic.double().mean(1)
        learning = learned.double().mean(1) >= 0.5
        lr_tensor = torch.tensor(lrs, dtype=torch.float64)
        exponents = table.nanmean(1)
        suggestion, onset, reason = edge_of_chaos_suggestion(
            lr_tensor, sensitive_fraction, learning, exponents, self._onset_margin
        )
        loss_ratio = ratios.nanmean(1)
        by_trainability, edge, edge_reason = trainability_edge_suggestion(
            lr_tensor, loss_ratio, learning, self._edge_margin
        )
        if self.anchor == "trainability":
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
            steps_per_lr=self.steps_per_lr,
            rule=self.rule,
            reason=reason,
            learning_at_onset=None if onset is None else bool(learning[lrs.index(onset)]),
            trainability_edge=edge,
            anchor=self.anchor,
            margin=self._edge_margin if self.anchor == "trainability" else self._onset_margin,
            losses=losses,
            model_steps=sum(run.model_steps for lr in lrs for run in runs[lr]),
        )

    # -- data, initialisations, LR attribute ------------------------------------------------------------------------

    def _collect_batches(self, trainer: Trainer, pl_module: LightningModule) -> list[Any]:
        """The first ``steps_per_lr`` × ``accumulate_grad_batches`` training batches, on the device, cycling through the
        data (or the part of it that ``limit_train_batches`` allows) if it is shorter.

        The loader comes straight from the data source (the user's ``train_dataloader``), not from the fit loop:
        setting the fit loop's data up here would move its RNG draws inside the sweep's isolated RNG. A loader's
        own generators (``DataLoader(generator=...)``, a sampler's) are put back afterwards, so the training that
        follows sees the batches it would have seen without the sweep.
        """
        wanted = self.steps_per_lr * trainer.accumulate_grad_batches
        dataloaders = trainer.fit_loop._data_source.dataloader()
        loader = CombinedLoader(dataloaders, mode="max_size_cycle")
        generators = _generators_of(loader.flattened)
        saved = [generator.get_state() for generator in generators]
        batches: list[Any] = []
        try:
            # limit_train_batches=0 skips the training, not the sweep the user asked for: then the whole loader
            per_pass = _batches_per_pass(loader, trainer.limit_train_batches) or math.inf
            while len(batches) < wanted:
                before = len(batches)
                for index, batch in enumerate(_batches_of(loader)):
                    if index >= per_pass:  # the Trainer's limit_train_batches: cycle through the batches it allows
                        break
                    batch = trainer.precision_plugin.convert_input(batch)
                    batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
                    batches.append(trainer.strategy.batch_to_device(batch, dataloader_idx=0))
                    if len(batches) == wanted:
                        break
                if len(batches) == before:
                    raise MisconfigurationException("ChaosLRFinder: the training dataloader yielded no batch.")
        finally:
            for generator, state in zip(generators, saved):
                generator.set_state(state)
        return batches

    def _initial_states(self, pl_module: LightningModule) -> list[Optional[dict[str, Tensor]]]:
        states: list[Optional[dict[str, Tensor]]] = [None]  # None: the model as given
        if self.num_inits == 1:
            return states
        scratch = make_shadow_module(pl_module)
        for index in range(1, self.num_inits):
            torch.manual_seed(self.seed + 1000 + index)
            if callable(getattr(scratch, "reset_parameters", None)):
                scratch.reset_parameters()  # type: ignore[operator]  # nn.Module.__getattr__ types it a Tensor
            else:
                for module in scratch.modules():
                    if module is not scratch and callable(getattr(module, "reset_parameters", None)):
                        module.reset_parameters()  # type: ignore[operator]
            states.append({k: v.clone() for k, v in scratch.state_dict().items()})
        return states

    def _lr_attribute(self, pl_module: LightningModule) -> str:
        try:
            return _determine_lr_attr_name(pl_module, self.attr_name)
        except AttributeError as error:
            looked = f"`{self.attr_name}`" if self.attr_name else "`lr` and `learning_rate`"
            raise AttributeError(
                f"ChaosLRFinder: no learning-rate attribute found; it looked for {looked} on the LightningModule, its"
                " `hparams` and the datamodule. Pass `attr_name=` with the attribute your `configure_optimizers`"
                " reads, or `update_attr=False` to only measure."
            ) from error

    @staticmethod
    def _apply(trainer: Trainer, pl_module: LightningModule, attr_name: str, lr: float, base_lr: float) -> None:
        lightning_setattr(pl_module, attr_name, lr)
        scale = lr / base_lr
        # The whole schedule moves with the LR: the schedulers' anchors in the param groups (OneCycleLR's max_lr and
        # min_lr) and on the scheduler (base_lrs, CyclicLR's max_lrs).
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                    if isinstance(group.get(key), (int, float, Tensor)):
                        group[key] = group[key] * scale
        for config in trainer.lr_scheduler_configs:
            # SequentialLR and ChainedScheduler keep their own schedulers, each with its anchors
            for scheduler in (config.scheduler, *getattr(config.scheduler, "_schedulers", ())):
                for attribute in ("base_lrs", "max_lrs"):
                    if isinstance(getattr(scheduler, attribute, None), list):
                        setattr(scheduler, attribute, [value * scale for value in getattr(scheduler, attribute)])
                if isinstance(getattr(scheduler, "_last_lr", None), list):  # what get_last_lr() reports until a step
                    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    @staticmethod
    def _progress(trainer: Trainer, total: int) -> Any:
        if not trainer.is_global_zero or trainer.progress_bar_callback is None:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="ChaosLRFinder sweep", leave=False)

    @staticmethod
    def _report(trainer: Trainer, result: ChaosLRFinderResult) -> None:
        if result.suggestion is not None:
            if result.anchor == "trainability":
                found = f"top of the learning band at lr={result.trainability_edge:.3g}"
                other = "" if result.onset is None else f"; anchor='onset' would step back from lr={result.onset:.3g}"
            else:
                where = "still learning there" if result.learning_at_onset else "where learning also fails"
                found, other = f"onset of chaos at lr={result.onset:.3g} ({where})", ""
            rank_zero_info(
                f"ChaosLRFinder: {found}; suggested lr={result.suggestion:.3g}, {result.margin:g}x below it{other}"
                f" ({len(result.lrs)} learning rates, {result.seconds:.1f} s)."
            )
        if not trainer.is_global_zero:
            return
        for logger in chaos_logging.tensorboard_loggers(trainer):
            chaos_logging.write_finder_result(logger, result)


def auto_margin(optimizer: Optimizer) -> float:
    """The step back below the top of the learning band that ``margin="auto"`` takes: 2.5 under an adaptive optimizer
    (one of ``ADAPTIVE_OPTIMIZERS`` or a subclass), 1.5 otherwise. Below the onset of chaos it always takes 1.5."""
    return ADAPTIVE_MARGIN if isinstance(optimizer, ADAPTIVE_OPTIMIZERS) else MARGIN


class _Candidate:
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

    def result(self, planned_steps: int, renormalize_every: int, accumulate: int = 1) -> _Run:
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
        return _Run(exponent, ratio, learning, curve, steps * accumulate * (1 + len(shadows.shadows)))



def _reset_state(optimizer: Optimizer) -> None:
    """The state a freshly built optimizer of this class has: empty for most, but Adagrad makes its accumulators in
    ``__init__`` (and before torch 2.13 its step fails without them). Built over the same param groups; an optimizer
    that cannot be rebuilt from them (required arguments beyond the groups) is left with an empty state."""
    optimizer.state.clear()
    try:
        fresh = build_like(optimizer, [dict(group) for group in optimizer.param_groups])
    except Exception:  # a custom optimizer's constructor: fresh state is what its step makes of none
        return
    optimizer.state.update(fresh.state)


def _unscheduled_lr(group: dict[str, Any]) -> float:
    """A param group's LR without its scheduler's current factor: OneCycleLR's peak (``max_lr``), another scheduler's
    ``initial_lr``, else ``lr``. Under a warm-up, ``lr`` at fit start is a fraction of the LR the user set."""
    for key in ("max_lr", "initial_lr", "lr"):
        if key in group:
            return float(group[key])
    raise KeyError("the optimizer's param group has no `lr`")


def _mean_loss(losses: list[Optional[Tensor]]) -> Optional[Tensor]:
    """The loss of one optimizer step: the mean over its batches (None where ``training_step`` skipped one)."""
    kept = [loss for loss in losses if loss is not None]
    if len(kept) <= 1:
        return kept[0] if kept else None
    return torch.stack(kept).mean()


def _generators_of(loaders: list[Any]) -> list[torch.Generator]:
    """The torch generators that iterating ``loaders`` draws from besides the global one: a DataLoader's own, its
    sampler's and its batch sampler's sampler's."""
    found: list[torch.Generator] = []
    for loader in loaders:
        batch_sampler = getattr(loader, "batch_sampler", None)
        for owner in (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
                found.append(generator)
    return found


def _batches_per_pass(loader: CombinedLoader, limit: Union[int, float]) -> Union[int, float]:
    """How many batches of a pass ``limit_train_batches`` allows. Only a fraction needs the loader's length, which
    takes an iterator (and, for a shuffled loader, a draw the sweep's batches would otherwise not see)."""
    if isinstance(limit, int) or limit == 1.0:
        return limit if isinstance(limit, int) else math.inf
    iter(loader)  # a CombinedLoader knows its length once iterated
    try:
        length: Union[int, float] = len(loader)
    except (TypeError, NotImplementedError):
        length = math.inf
    return _parse_num_batches(RunningStage.TRAINING, length, limit)


def _batches_of(loader: CombinedLoader) -> Iterator[Any]:
    iter(loader)
    for batch, _, _ in loader:
        yield batch


def find_chaos_lr(
    trainer: Trainer,
    model: LightningModule,
    train_dataloaders: Optional[Union[DataLoader, Any]] = None,
    val_dataloaders: Optional[Union[DataLoader, Any]] = None,
    datamodule: Optional[LightningDataModule] = None,
    **finder_kwargs: Any,
) -> ChaosLRFinderResult:
    """Run a :class:`ChaosLRFinder` sweep on ``model`` with ``trainer``'s settings, without training it.

    The data arguments are those of ``Tuner.lr_find``. With ``update_attr=True`` (default) the suggestion is written
    into the model's (or its hparams' or datamodule's) learning-rate attribute, so a following ``trainer.fit(model)``
    trains at it. The model's weights and the RNG state are left as they were.

    Returns:
        The :class:`ChaosLRFinderResult` (also ``result.plot()`` for the figure).

    Example:
        >>> from lightning.pytorch import Trainer, seed_everything
        >>> from lightning_chaos import find_chaos_lr
        >>> from lightning_chaos.demo import DigitsDataModule, MLPClassifier
        >>> _ = seed_everything(0, verbose=False)
        >>> model = MLPClassifier()
        >>> trainer = Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
        ...                   enable_checkpointing=False, enable_model_summary=False)
        >>> result = find_chaos_lr(trainer, model, datamodule=DigitsDataModule(), min_lr=1e-2, max_lr=10, num_lrs=4,
        ...                        steps_per_lr=20)
        >>> result.suggestion == model.lr  # set on the model, whose weights are left as they were
        True
    """
    finder = ChaosLRFinder(**finder_kwargs)
    finder._early_exit = True
    trainer.callbacks = [*trainer.callbacks, finder]  # type: ignore[attr-defined]  # set in Trainer.__init__
    try:
        trainer.fit(model, train_dataloaders, val_dataloaders, datamodule)
    finally:
        trainer.callbacks = [cb for cb in trainer.callbacks if cb is not finder]  # type: ignore[attr-defined]
    if finder.result is None:  # pragma: no cover - fit ended before on_fit_start
        raise RuntimeError("find_chaos_lr: the sweep did not run")
    return finder.result
