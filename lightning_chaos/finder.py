"""ChaosLRFinder: sweep the learning rate for chaos and trainability on clones, without taking over the fit loop, and
set it just below the top of the learning band (or the onset of chaos).

The Lightning glue only: the batches of the window, the learning-rate attribute, the report. The sweep itself is the
engine in :mod:`lightning_chaos.sweep`, and the rules that read it are pure functions in
:mod:`lightning_chaos.functional.onset`."""

import math
import time
from collections.abc import Iterator
from typing import Any, Optional, Union, cast

import torch
import torch.distributed
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.tuner.lr_finder import _determine_lr_attr_name
from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, _TunerExitException
from lightning.pytorch.utilities.parsing import (
    _lightning_get_all_attr_holders,
    lightning_getattr,
    lightning_setattr,
)
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from lightning_chaos import logging as chaos_logging
from lightning_chaos._validation import check_flag, check_seed
from lightning_chaos.functional.onset import ONSET_RULES, learning_band, refinement_bracket
from lightning_chaos.mirror import mirroring_blocker
from lightning_chaos.sweep import (
    MARGIN,
    ChaosLRFinderResult,
    LRSweep,
    Runs,
    initial_states,
    seeded_rng_states,
    summarise,
    swept_quantity,
    unscheduled_lr,
)
from lightning_chaos.vectorized import check_vectorize, vectorization_blocker, worth_vectorizing

__all__ = ["ChaosLRFinder", "ChaosLRFinderResult", "find_chaos_lr", "auto_margin"]

ANCHORS = ("onset", "trainability")

# ``margin="auto"``: how far below its anchor the suggestion steps back. Under an optimizer that scales each
# coordinate's step by a running measure of its gradients, the loss after the sweep's window keeps improving past the
# fastest η, so the top of the learning band lies further above it (benchmarks/FINDER_RESULTS.md, held-out sets 4, 5).
ADAPTIVE_MARGIN = 2.0
ADAPTIVE_OPTIMIZERS = tuple(
    getattr(torch.optim, name)
    for name in (
        "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "SparseAdam", "Adafactor"
    )
    if hasattr(torch.optim, name)  # Adafactor came with torch 2.5
)


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
    the learning band is the largest η that learns well both by where its window ends (the loss falls nearly as well
    as the sweep's best) and by how fast it gets there (90 % of the way down to the sweep's best loss within 1.25× the
    fewest steps; see :func:`~lightning_chaos.functional.onset.trainability_edge_suggestion`). The suggestion steps
    back by ``margin`` from the one named by ``anchor``, after refining the grid with ``refine`` points next to it.

    The default anchor is the top of the learning band. The seed paper's hypothesis, that training is fastest near the
    onset of chaos, held on tanh networks under SGD, where the two edges coincide. On the benchmark's ReLU MLPs and
    under Adam the trajectory is already chaotic far below the fastest η, and on CNNs whose initial plateau is chaotic
    the onset falls past the band: over 15 tasks and 20 seeds the onset suggestion never reached the target accuracy
    on 7, while the top of the learning band reached it on all (by median) and, with the default margin, within 1.25×
    of the best grid η on all 20 tasks of the benchmark. Where the best η reaches the target in a handful of steps
    the end of the window alone cannot tell η apart, and the speed band pulls the top down: on five held-out tasks
    of that kind it reached the target on 48 of 50 seed runs, against 37 without (benchmarks/FINDER_RESULTS.md,
    fifth held-out set). With the default there is no suggestion when nothing learns
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

    Under DDP the sweep is split: each process trains its share of every grid on rank 0's batches and the runs are
    gathered, so every rank gets the result one process would make on those batches, about N× sooner.

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
        margin: factor ≥ 1 to step back below the anchor, or ``"auto"`` (default): 2 below the top of the learning
            band under an adaptive optimizer (torch's Adam, AdamW, Adamax, NAdam, RAdam, RMSprop, Adagrad,
            Adadelta, SparseAdam, Adafactor, or a subclass: ``lightning_chaos.finder.ADAPTIVE_OPTIMIZERS``), 1.5
            otherwise (also for a wrapper such as ``ZeroRedundancyOptimizer``, whatever it wraps) and below the
            onset. ``result.margin`` says which was taken. 1.5 was chosen for the onset anchor on five tasks (1
            overshot into divergence) and kept for the band's top, below which τ grows about like 1/η under SGD, so
            the margin is roughly what it costs. Under adaptive optimizers the loss after the window keeps improving
            past the fastest η, so the end band's top lies 2–3× above it; 2.5 was the default until the speed band
            capped that top, and 2 came with it, chosen on the design tasks and the 20 tasks of record and adopted by
            a rule fixed before the fifth held-out set ran (benchmarks/FINDER_RESULTS.md). An optimizer this list
            does not know (a third-party one, say) gets 1.5: pass ``margin=2`` if it is adaptive.
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
            if attr_name else unscheduled_lr(optimizer.param_groups[0])
        )
        self._say_if_the_attribute_is_not_the_optimizers(pl_module, attr_name, base_lr, optimizer)
        started = time.monotonic()
        # Lightning's isolate_rng restores only on a normal exit: an error (or an interrupt) in the user's
        # training_step would leave the global streams where the sweep seeded them.
        rng_states = _collect_rng_states()
        try:
            result = self._sweep(trainer, pl_module, base_lr)
        finally:
            _set_rng_states(rng_states)
        result.seconds = time.monotonic() - started
        result.swept = swept_quantity(optimizer)
        result = trainer.strategy.broadcast(result, src=0)  # every rank ends with rank 0's suggestion
        self.result = result
        if result.suggestion is None:
            rank_zero_warn(f"ChaosLRFinder found no suggestion: {result.reason}.")
        elif self.update_attr:
            self._apply(trainer, pl_module, attr_name, result.suggestion, base_lr)
        self._warn_if_anchors_disagree(result)
        self._report(trainer, result)
        return result

    @staticmethod
    def _say_if_the_attribute_is_not_the_optimizers(
        pl_module: LightningModule, attr_name: str, base_lr: float, optimizer: Optimizer
    ) -> None:
        """The sweep scales every param group by η / the attribute's value: η is the optimizer's LR only where the two
        agree. Copies of the attribute that disagree (a ``self.lr`` beside another ``hparams.lr``: Lightning reads and
        writes the last) make the swept η, and the suggestion written back, another LR than the one that trains."""
        if not attr_name:
            return
        holders = _lightning_get_all_attr_holders(pl_module, attr_name)
        found = [(h, h[attr_name] if isinstance(h, dict) else getattr(h, attr_name)) for h in holders]
        numbers = [(h, float(v)) for h, v in found if isinstance(v, (int, float, Tensor)) and not isinstance(v, bool)]
        actual = unscheduled_lr(optimizer.param_groups[0])
        if any(not math.isclose(v, base_lr, rel_tol=1e-6) for _, v in numbers):
            where = ", ".join(f"{type(h).__name__} {v:.4g}" for h, v in numbers)
            rank_zero_warn(
                f"ChaosLRFinder: `{attr_name}` has different values ({where}); like Lightning's LR finder it reads the"
                f" last, {base_lr:.4g}, and sweeps every param group by η / {base_lr:.4g}, while the optimizer trains"
                f" at {actual:.4g}. The swept η and the suggestion written back are then not the learning rate that"
                f" trains: keep one `{attr_name}`, or pass `attr_name=`."
            )
        elif not math.isclose(actual, base_lr, rel_tol=1e-6):
            rank_zero_info(
                f"ChaosLRFinder: `{attr_name}` is {base_lr:.4g} and the optimizer's first param group trains at"
                f" {actual:.4g}: every group is swept in proportion, η in units of `{attr_name}`."
            )

    def _margins(self, optimizer: Optimizer) -> tuple[float, float]:
        """The margins below the onset and below the top of the learning band."""
        if self.margin != "auto":
            return cast(float, self.margin), cast(float, self.margin)  # a number: checked in __init__
        return MARGIN, auto_margin(optimizer)

    # -- the sweep ------------------------------------------------------------------------------------------------

    def _sweep(self, trainer: Trainer, pl_module: LightningModule, base_lr: float) -> ChaosLRFinderResult:
        batches = self._collect_batches(trainer, pl_module)
        self._stack = self._should_stack(pl_module)
        world_size = trainer.world_size
        progress = self._progress(trainer, math.ceil(self.num_lrs / world_size))
        engine = LRSweep(
            pl_module,
            trainer.optimizers[0],
            list(zip(batches, seeded_rng_states(len(batches), self.seed, pl_module.device))),
            base_lr=base_lr,
            steps_per_lr=self.steps_per_lr,
            num_shadows=self.num_shadows,
            epsilon=self.epsilon,
            renormalize_every=self.renormalize_every,
            seed=self.seed,
            init_states=initial_states(pl_module, self.num_inits, self.seed),
            accumulate=trainer.accumulate_grad_batches,
            step_context=trainer.precision_plugin.train_step_context,
            clip_val=trainer.gradient_clip_val,  # type: ignore[arg-type]  # a number once the Trainer checked it
            clip_algorithm=trainer.gradient_clip_algorithm,
            stack=self._stack,
            rank=trainer.global_rank,
            world_size=world_size,
            gather=_all_gather_objects if world_size > 1 else None,
            on_trained=None if progress is None else lambda lr: _advance(progress),
        )
        coarse = torch.logspace(math.log10(self.min_lr), math.log10(self.max_lr), self.num_lrs, dtype=torch.float64)
        runs = engine.grid(coarse.tolist(), stop_past_the_edge=True, rule=self.rule)
        result = self._summarise(runs)
        if self.anchor == "onset":
            bracket = refinement_bracket(result.lrs, result.onset, below=True)
        else:
            # above the end band's top, where the sweep's coarse grid leaves the most to resolve
            band = learning_band(result.lrs, result.loss_ratio, result.learning)
            bracket = refinement_bracket(result.lrs, None if band is None else band[1], below=False)
        if self.refine and bracket is not None:
            low, high = bracket
            fine = torch.logspace(math.log10(low), math.log10(high), self.refine + 2, dtype=torch.float64)
            extra = [lr for lr in fine[1:-1].tolist() if lr not in runs]
            if progress is not None:
                progress.total += math.ceil(len(extra) / world_size)
            runs.update(engine.grid(extra))
            result = self._summarise(runs)
        if progress is not None:
            progress.close()
        self._stack = engine.stack
        return result

    def _summarise(self, runs: Runs) -> ChaosLRFinderResult:
        return summarise(
            runs,
            steps_per_lr=self.steps_per_lr,
            rule=self.rule,
            anchor=self.anchor,
            onset_margin=self._onset_margin,
            edge_margin=self._edge_margin,
        )

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

    # -- data, initialisations, LR attribute ------------------------------------------------------------------------

    def _collect_batches(self, trainer: Trainer, pl_module: LightningModule) -> list[Any]:
        """The first ``steps_per_lr`` × ``accumulate_grad_batches`` training batches, on the device, cycling through the
        data (or the part of it that ``limit_train_batches`` allows) if it is shorter.

        The loader comes straight from the data source (the user's ``train_dataloader``), not from the fit loop:
        setting the fit loop's data up here would move its RNG draws inside the sweep's isolated RNG. A loader's
        own generators (``DataLoader(generator=...)``, a sampler's) are put back afterwards, so the training that
        follows sees the batches it would have seen without the sweep.

        Split across processes, every rank trains on rank 0's batches (broadcast before they go to each rank's
        device): the candidates that different ranks train are compared on the same data, as in one process.
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
                    batches.append(pl_module._on_before_batch_transfer(batch, dataloader_idx=0))
                    if len(batches) == wanted:
                        break
                if len(batches) == before:
                    raise MisconfigurationException("ChaosLRFinder: the training dataloader yielded no batch.")
        finally:
            for generator, state in zip(generators, saved):
                generator.set_state(state)
        if trainer.world_size > 1:
            batches = trainer.strategy.broadcast(batches, src=0)
        return [trainer.strategy.batch_to_device(batch, dataloader_idx=0) for batch in batches]

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
            what = "" if result.swept == "the learning rate" else f" (swept: {result.swept})"
            rank_zero_info(
                f"ChaosLRFinder: {found}; suggested lr={result.suggestion:.3g}{what}, {result.margin:g}x below"
                f" it{other} ({len(result.lrs)} learning rates, {result.seconds:.1f} s)."
            )
        if not trainer.is_global_zero:
            return
        for logger in chaos_logging.tensorboard_loggers(trainer):
            chaos_logging.write_finder_result(logger, result)


def auto_margin(optimizer: Optimizer) -> float:
    """The step back below the top of the learning band that ``margin="auto"`` takes: 2 under an adaptive optimizer
    (one of ``ADAPTIVE_OPTIMIZERS`` or a subclass), 1.5 otherwise. Below the onset of chaos it always takes 1.5."""
    return ADAPTIVE_MARGIN if isinstance(optimizer, ADAPTIVE_OPTIMIZERS) else MARGIN


def _advance(progress: Any) -> None:
    progress.update(1)


def _all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (an all-gather of picklable objects in the default process group)."""
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


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
