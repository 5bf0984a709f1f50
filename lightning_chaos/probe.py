"""ChaosProbe: measure how sensitive a training trajectory is to its initial conditions, as a Lightning callback."""

import math
import time
from typing import Any, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer

from lightning_chaos import logging as chaos_logging
from lightning_chaos._validation import check_flag, check_seed
from lightning_chaos.functional.distance import NORMS
from lightning_chaos.functional.exponents import WindowFit, benettin_exponent, window_fit_before_saturation
from lightning_chaos.functional.onset import regime
from lightning_chaos.mirror import (
    TRAINING_HOOKS,
    BatchContext,
    overridden_hooks,
    run_after_other_callbacks,
    sentinel_report,
)
from lightning_chaos.shadow import DISTRIBUTIONS, Perturbation, RngState, ShadowEnsemble, capture_rng_state
from lightning_chaos.vectorized import check_vectorize, worth_vectorizing

_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLA")
_MIN_FIT_POINTS = 4
_FIT_EVERY_N_LOGS = 10
# The unit roundoff of the precision the forward and backward run in, where it is coarser than the weights' dtype.
_COMPUTE_ROUNDOFF = {"bf16": 2.0**-8, "16": 2.0**-11}
_CALLBACK_TRAINING_HOOKS = ("on_train_epoch_start", "on_train_batch_start", "on_before_zero_grad", "on_before_backward",
                            "on_after_backward", "on_before_optimizer_step", "on_train_batch_end", "on_train_epoch_end")


def _log_or_nan(value: float) -> float:
    """ln d for logging: -inf for d = 0 (a separation rounded away), NaN for a diverged (non-finite) d."""
    if value == 0:
        return -math.inf
    return math.log(value) if value > 0 and math.isfinite(value) else math.nan


def _merged(earlier: Optional[dict[str, Any]], later: dict[str, Any]) -> dict[str, Any]:
    """One verdict over the sentinel's windows: the steps checked, the largest drift, the first drift beyond its
    window's tolerance; exact and the tolerance as the later window had them."""
    if earlier is None:
        return later
    return {
        **later,
        "steps": earlier["steps"] + later["steps"],
        "max_drift": max(earlier["max_drift"], later["max_drift"]),
        "trusted": earlier["trusted"] and later["trusted"],
        "first_drift_step": earlier["first_drift_step"] if earlier["first_drift_step"] is not None
        else later["first_drift_step"],
    }


class ChaosProbe(Callback):
    r"""Clone the model into ε-perturbed shadow networks, step them in lockstep with the real one, and measure d(t).

    At the first training batch (or ``start_step``) the LightningModule is deep-copied into ``num_shadows`` shadows,
    each displaced by an independent perturbation δ of size ε and given its own optimizer. Each shadow is then an
    independent training from θ + δ (:mod:`lightning_chaos.mirror`): on every batch it goes through the module's own
    hooks, ``training_step``, ``optimizer_step`` and closure, with itself as ``self`` and its own optimizer; it
    takes from the real run what others did to it from outside (``requires_grad`` flags, train/eval modes, param
    groups added, hyperparameters set between optimizer steps by schedulers, an optimizer's train/eval mode) and
    keeps what its optimizer adapts inside its own step; and it sees the same batch and the same dropout masks and
    random draws (the torch, Python ``random`` and NumPy states the real batch saw are replayed, then the real
    streams restored), inside the same precision context. A sentinel (``sentinel_steps``) checks this on the user's
    model. After every optimizer step the probe measures

    .. math::  d_k(t) = \lVert \theta(t) - \tilde\theta_k(t) \rVert

    and derives Lyapunov exponents (per optimizer step):

    * free evolution (``renormalize_every=None``, the seed papers' way): the local exponent Λ_k is the slope of
      ln d_k(t) over its exponential phase, before saturation, found by the best-R² window search
      (:func:`~lightning_chaos.functional.window_fit_before_saturation`); the running exponent is
      ln(d_k(t)/d_k(0)) / t;
    * renormalised (``renormalize_every=N``, Benettin's two-trajectory method): every N steps ln(d/d_prev) is added
      to a sum and each shadow is pulled back along its separation to d0 (its optimizer state too); the running
      exponent Σ ln(d/d_prev) / t never saturates.

    Observation does not perturb: the real model trains bit-identically with or without the probe, and with
    ``epsilon=0`` every shadow stays bit-identical to the real model.

    Args:
        epsilon: size ε of the initial perturbation (≥ 0). The default ``1e-4`` with ``relative=True`` displaces
            the parameters by 1e-4 of their norm: about a thousand float32 rounding steps (unit roundoff ≈ 6e-8), so
            rounding does not masquerade as divergence, while leaving about ln(1e4) ≈ 9 e-foldings before the
            separation reaches the parameters' own size. The papers' ``1e-8`` absolute needs a float64 model.
        num_shadows: number K of perturbed copies (≥ 1). Each costs about one extra training step and one model's
            memory (parameters and optimizer state). More shadows give an error band across initial perturbations.
        distribution: ``"uniform"`` (δ_i ~ U(−ε, ε) per element, the papers') or ``"normal"`` (δ_i ~ N(0, ε²)).
        relative: if ``True``, δ is rescaled so that ‖δ‖ = ε·‖θ‖ (in ``norm``, over all trainable parameters); with
            ``renormalize_every`` the pull-back distance is then ε·‖θ(t)‖ at the time of the pull-back. If ``False``,
            ε is absolute (per element) and the pull-back distance is d(0).
        perturb_biases: also perturb parameters named ``*.bias`` (the papers perturb weights only).
        norm: ``"l2"`` (default) or ``"l1"`` (the papers): the norm of d(t), over all trainable parameters.
        renormalize_every: ``None`` for free evolution, or N ≥ 1 to renormalise every N optimizer steps.
        seed: seed of the probe's own generator for δ, in [0, 2**32 − 1]. The global RNG is never touched.
        monitor: a metric in ``trainer.callback_metrics`` (for example ``"val_acc"``) for time-to-target.
        target: the value of ``monitor`` to reach.
        mode: ``"max"`` (reached when ``monitor >= target``) or ``"min"`` (``monitor <= target``). The target is
            checked where ``EarlyStopping`` checks, at the end of each validation run and training epoch: for a finer
            time-to-target, validate more often (``Trainer(val_check_interval=...)``).
        stop_at_target: end training once the target is reached.
        log_every_n_steps: log every N optimizer steps; ``None`` follows ``Trainer(log_every_n_steps=...)``.
            Distances are measured at every step regardless.
        vectorize: ``"auto"`` (default) runs K ≥ 4 shadows of a model of up to 1 M parameters as one batched
            computation (``torch.func.vmap`` over their stacked parameters and buffers), else one at a time.
            Measured (benchmarks/RESULTS.md): batching halves the shadows' time at K = 16 on small models, whose
            steps are bound by kernel launches, costs more than it saves at K = 2, and gains little on large
            models while holding all K shadows' activations at once. ``True`` batches any K, ``False`` never. A module that cannot be batched falls back to one at a time, said once at info level:
            a BatchNorm with ``momentum=None``, dropout on CUDA (vmap cannot replay the fused kernel's masks),
            convolutions on CUDA with TF32 allowed (a grouped convolution rounds differently), a ``training_step``
            that calls ``.item()``, branches on tensor values or reassigns a buffer. The batched path agrees with the
            sequential one to float tolerance; only the sequential path is bit-identical to the real model at
            ``epsilon=0``. Under 16-bit precision ``"auto"`` runs the shadows one at a time: batched bf16 kernels round
            otherwise than the real model's, by more than the default ε.
        start_step: the real model's optimizer step (``trainer.global_step``) at which the shadows are cloned from
            it; until then the probe costs nothing. Probe a window of a long or large training this way.
        stop_step: the optimizer step after which the shadows are released (their parameters and optimizer state
            freed); the results and logs stay. ``None``: probe until the end of training. Logged metrics are
            plotted at the real model's step either way.
        sentinel_steps: for this many optimizer steps after the shadows attach, and again across the end of the
            first whole epoch (half before, half after: the epoch hooks, validation and the next epoch's start), an
            unperturbed twin (δ = 0), cloned from the real model, is stepped exactly like the shadows and compared
            with it. It must stay bit-identical on the
            one-at-a-time path (within 1 % of ε on the batched path, for a compiled model or on CUDA): a drift means
            something changed the real training that the shadows did not repeat (a callback that writes the weights,
            say). The probe then warns, naming the step and the hooks and callbacks that ran, and marks its results
            untrusted (:attr:`trusted`, the summary, ``chaos/trusted``). Costs one more shadow during the windows and
            nothing after them; 0 turns it off.

    Raises:
        ValueError: at construction, for an argument out of its range (the message names it).
        MisconfigurationException: at fit start, for manual optimisation, a sharded strategy or several processes.

    Example:
        >>> from lightning.pytorch import Trainer, seed_everything
        >>> from lightning_chaos import ChaosProbe
        >>> from lightning_chaos.demo import DigitsDataModule, MLPClassifier
        >>> _ = seed_everything(0, verbose=False)
        >>> probe = ChaosProbe(num_shadows=2, monitor="val_acc", target=0.5)
        >>> trainer = Trainer(max_epochs=2, callbacks=[probe], logger=False, enable_progress_bar=False,
        ...                   enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(MLPClassifier(lr=0.5), datamodule=DigitsDataModule())  # your model, unchanged
        >>> probe.distances.shape  # d(t) at t = 0 ... 44 optimizer steps, for 2 shadows
        torch.Size([45, 2])
        >>> probe.trusted  # the sentinel's verdict: the unperturbed twin followed the real model
        True
        >>> sorted(probe.time_to_target)  # when val_acc first reached 0.5
        ['epoch', 'seconds', 'step']

        ``probe.lyapunov_exponent`` is the mean local exponent per optimizer step (> 0 chaotic, < 0 contracting).
    """

    observes_training = True  # ordered after the callbacks it observes (mirror.run_after_other_callbacks)

    def __init__(
        self,
        epsilon: float = 1e-4,
        num_shadows: int = 1,
        distribution: str = "uniform",
        relative: bool = True,
        perturb_biases: bool = False,
        norm: str = "l2",
        renormalize_every: Optional[int] = None,
        seed: int = 0,
        monitor: Optional[str] = None,
        target: Optional[float] = None,
        mode: str = "max",
        stop_at_target: bool = False,
        log_every_n_steps: Optional[int] = None,
        vectorize: Union[bool, str] = "auto",
        start_step: int = 0,
        stop_step: Optional[int] = None,
        sentinel_steps: int = 8,
    ) -> None:
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon < 0:
            raise ValueError(f"`epsilon` must be a finite number >= 0, got {epsilon!r}")
        if isinstance(num_shadows, bool) or not isinstance(num_shadows, int) or num_shadows < 1:
            raise ValueError(f"`num_shadows` must be an integer >= 1, got {num_shadows!r}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"`distribution` must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if norm not in NORMS:
            raise ValueError(f"`norm` must be one of {NORMS}, got {norm!r}")
        if renormalize_every is not None and (
            isinstance(renormalize_every, bool) or not isinstance(renormalize_every, int) or renormalize_every < 1
        ):
            raise ValueError(f"`renormalize_every` must be None or an integer >= 1, got {renormalize_every!r}")
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ValueError(f"`log_every_n_steps` must be None or an integer >= 1, got {log_every_n_steps!r}")
        check_vectorize(vectorize)
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"`start_step` must be an integer >= 0, got {start_step!r}")
        if stop_step is not None and (
            isinstance(stop_step, bool) or not isinstance(stop_step, int) or stop_step <= start_step
        ):
            raise ValueError(f"`stop_step` must be None or an integer > start_step={start_step}, got {stop_step!r}")
        if isinstance(sentinel_steps, bool) or not isinstance(sentinel_steps, int) or sentinel_steps < 0:
            raise ValueError(f"`sentinel_steps` must be an integer >= 0, got {sentinel_steps!r}")
        check_seed("seed", seed)
        check_flag("relative", relative)
        check_flag("perturb_biases", perturb_biases)
        check_flag("stop_at_target", stop_at_target)
        if monitor is not None and not isinstance(monitor, str):
            raise ValueError(f"`monitor` must be None or the name of a logged metric, got {monitor!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"`mode` must be 'max' or 'min', got {mode!r}")
        if target is not None and monitor is None:
            raise ValueError("`target` was given without `monitor`: name the metric to compare with the target")
        if monitor is not None and target is None:
            raise ValueError(f"`monitor={monitor!r}` needs a `target` value to reach")
        if target is not None and (
            isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target)
        ):
            raise ValueError(f"`target` must be a finite number, got {target!r}")
        if stop_at_target and monitor is None:
            raise ValueError("`stop_at_target=True` needs `monitor` and `target`")

        self.perturbation = Perturbation(float(epsilon), distribution, relative, perturb_biases)
        self.epsilon = float(epsilon)
        self.num_shadows = num_shadows
        self.norm = norm
        self.renormalize_every = renormalize_every
        self.seed = seed
        self.monitor = monitor
        self.target = target
        self.mode = mode
        self.stop_at_target = stop_at_target
        self.log_every_n_steps = log_every_n_steps
        self.vectorize = vectorize
        self.start_step = start_step
        self.stop_step = stop_step
        self.sentinel_steps = sentinel_steps

        self._ensemble: Optional[ShadowEnsemble] = None
        self._restored: Optional[dict[str, Any]] = None
        self._disabled = False
        self._reset_measurements()
        self._reset_clock()

    def _reset_measurements(self) -> None:
        self._steps = 0
        self._attach_step = 0  # the real model's global step when the shadows were cloned: logs are plotted from it
        self._stopped = False
        self._final_running: Optional[Tensor] = None
        self._history: list[Tensor] = []  # CPU float64 blocks [n, K]
        self._pending: list[Tensor] = []  # device tensors [K], not yet moved to the host
        self._alive = [True] * self.num_shadows
        self._collapse_reported = False
        self._logs_written = 0
        self._last_logged_step: Optional[int] = None
        self._rng_state: Optional[RngState] = None
        self._real_stepped = False
        self._drifts: list[Tensor] = []  # the twin's relative drift after each step of the sentinel's window
        self._drift_steps: list[int] = []  # the real model's optimizer step of each
        self._boundary_window = False  # the second window, across the first epoch boundary, has started
        self._sentinel: Optional[dict[str, Any]] = None
        self._sentinel_exact = True
        self._short_run_reported = False

    def _reset_clock(self) -> None:
        """Time-to-target runs from the start of training (restarted in ``on_train_start``), whenever the shadows
        attach."""
        self._time_to_target: Optional[dict[str, float]] = None
        self._start_time = time.monotonic()
        self._elapsed_before_resume = 0.0

    @property
    def state_key(self) -> str:
        # every argument that shapes the measured state: probes that differ in any of them can share a Trainer
        return self._generate_state_key(
            epsilon=self.epsilon,
            num_shadows=self.num_shadows,
            seed=self.seed,
            distribution=self.perturbation.distribution,
            relative=self.perturbation.relative,
            perturb_biases=self.perturbation.perturb_biases,
            norm=self.norm,
            renormalize_every=self.renormalize_every,
            start_step=self.start_step,
            stop_step=self.stop_step,
        )

    # -- public results -------------------------------------------------------------------------------------------

    @property
    def distances(self) -> Tensor:
        """d(t) since attach, t = 0 included: float64 tensor [steps + 1, num_shadows] on the CPU.

        In renormalised mode d(t) is recorded before the pull-back of that step.
        """
        self._flush()
        if not self._history:
            return torch.empty(0, self.num_shadows, dtype=torch.float64)
        return torch.cat(self._history)

    @property
    def window_fit(self) -> Optional[WindowFit]:
        """Best-R² window fit of ln d_k(t) per shadow over its exponential phase, before it saturates (see
        :func:`~lightning_chaos.functional.window_fit_before_saturation`); free evolution only, None before 4
        recorded points."""
        distances = self.distances
        if self.renormalize_every is not None or distances.shape[0] < _MIN_FIT_POINTS:
            return None
        log_d = torch.where(distances > 0, distances.log(), torch.nan)
        return window_fit_before_saturation(log_d)

    @property
    def running_exponents(self) -> Tensor:
        """Running exponent per shadow, float64 [num_shadows]: Σ ln(d/d_prev)/t renormalised, ln(d(t)/d(0))/t free."""
        self._flush()
        if self._final_running is not None:  # stopped at stop_step: the shadows are gone, their result stays
            return self._final_running.clone()
        if self._steps == 0 or self._ensemble is None:
            return torch.full((self.num_shadows,), math.nan, dtype=torch.float64)
        renormalized = self.renormalize_every is not None
        pulled_back = self.renormalize_every is not None and self._steps % self.renormalize_every == 0
        growth = self._ensemble.log_growth(self._history[-1][-1], renormalized, pulled_back)
        exponents = benettin_exponent(growth.detach().to("cpu", torch.float64), self._steps)
        return torch.where(torch.tensor(self._alive), exponents, torch.nan)

    @property
    def local_exponents(self) -> Tensor:
        """Λ_k per shadow, float64 [num_shadows]: the fitted local exponent (free evolution) or the running exponent
        (renormalised). NaN for a shadow whose trajectory turned non-finite, or before enough steps."""
        if self.renormalize_every is not None:
            return self.running_exponents
        fit = self.window_fit
        if fit is None:
            return torch.full((self.num_shadows,), math.nan, dtype=torch.float64)
        return torch.where(torch.tensor(self._alive), fit.exponent, torch.nan)

    @property
    def lyapunov_exponent(self) -> float:
        """Mean of :attr:`local_exponents` over the shadows that stayed finite (NaN if none did), per step."""
        exponents = self.local_exponents
        return exponents.nanmean().item() if torch.isfinite(exponents).any() else math.nan

    @property
    def time_to_target(self) -> Optional[dict[str, float]]:
        """None, or ``{"step", "epoch", "seconds"}`` when ``monitor`` first reached ``target``."""
        return None if self._time_to_target is None else dict(self._time_to_target)

    @property
    def shadow_modules(self) -> list[LightningModule]:
        """The K shadow LightningModules now (empty before they attach and after ``stop_step`` releases them)."""
        return list(self._ensemble.shadows) if self._ensemble is not None else []

    @property
    def shadow_optimizers(self) -> list[Optimizer]:
        """Each shadow's own optimizer, in the order of :attr:`shadow_modules`."""
        return list(self._ensemble.optimizers) if self._ensemble is not None else []

    @property
    def sentinel(self) -> Optional[dict[str, Any]]:
        """The sentinel's report once its window ended: ``steps`` checked, ``max_drift`` (the twin's relative
        distance from the real model), ``tolerance`` (0: bit identity expected), ``exact``, ``trusted``, and
        ``first_drift_step`` (None if it never drifted). None before, or with ``sentinel_steps=0``."""
        return None if self._sentinel is None else dict(self._sentinel)

    @property
    def trusted(self) -> bool:
        """False when the sentinel saw the shadows fail to repeat the real training (see ``sentinel_steps``)."""
        return self._sentinel is None or bool(self._sentinel["trusted"])

    # -- Lightning hooks ------------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # after every other callback: the shadows see what they did, and only the module's own hooks, which the
        # shadows run themselves, come after
        trainer.callbacks = run_after_other_callbacks(trainer.callbacks)  # type: ignore[attr-defined]
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "ChaosProbe supports automatic optimization only; this LightningModule sets"
                " `automatic_optimization = False` (manual optimization)."
            )
        strategy_name = type(trainer.strategy).__name__
        if any(name in strategy_name for name in _UNSUPPORTED_STRATEGIES):
            raise MisconfigurationException(
                f"ChaosProbe does not support the sharded strategy {strategy_name}: its shadows would have to be"
                " sharded like the real model. See docs/scaling.md."
            )
        if trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            raise MisconfigurationException(
                f"ChaosProbe supports multi-process training through DDP only; found {strategy_name} with"
                f" world_size={trainer.world_size}."
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._disabled = False
        self._ensemble = None
        restored, self._restored = self._restored, None
        if not trainer.loggers:
            rank_zero_warn(
                "ChaosProbe: the Trainer has no logger, so nothing will be logged; the results stay on the callback"
                " (`probe.distances`, `probe.lyapunov_exponent`, `probe.time_to_target`)."
            )
        chaos_logging.write_layout(trainer)
        self._hparams = {
            "lr": trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else math.nan,
            "chaos/epsilon": self.epsilon,
            "chaos/num_shadows": self.num_shadows,
        }
        self._reset_measurements()
        self._reset_clock()
        if restored is not None:
            self._time_to_target = restored.get("time_to_target")
            self._elapsed_before_resume = restored.get("elapsed_seconds", 0.0)
        if restored is not None and restored.get("stopped"):  # resumed after stop_step: the measurements only
            self._load_measurements(restored)
            if restored.get("disabled"):
                rank_zero_warn(
                    "ChaosProbe: the probe in this checkpoint had been disabled by a fault; it stays off in the resumed"
                    " run. Its measurements up to the fault are kept."
                )
        elif restored is not None and "shadows" in restored:
            self._attach(trainer, pl_module, restored)
        # Otherwise the shadows are cloned at the first batch at or after start_step: not here, because Lightning
        # restores a checkpoint's optimizer state and global step only after on_fit_start.

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After every callback's on_fit_start (a finder's sweep, which may set the LR) and the checkpoint's restore.
        self._start_time = time.monotonic()
        if trainer.optimizers:
            self._hparams["lr"] = trainer.optimizers[0].param_groups[0]["lr"]


    def _attach(self, trainer: Trainer, pl_module: LightningModule, restored: Optional[dict[str, Any]]) -> None:
        """Clone the model as it is now into the shadows (or rebuild them from a checkpoint) and start measuring."""
        generator = torch.Generator().manual_seed(self.seed)
        try:
            self._ensemble = ShadowEnsemble(
                pl_module,
                trainer.optimizers[0],
                self.num_shadows,
                self.perturbation,
                norm=self.norm,
                generator=generator,
                shadow_states=None if restored is None else restored["shadows"],
                grad_scaler=getattr(trainer.precision_plugin, "scaler", None),
                vectorize=self._should_vectorize(trainer, pl_module),
                twin=self.sentinel_steps > 0 and restored is None,
            )
            self._ensemble.follow_real_optimizer()
        except Exception as error:  # an odd module (say, one deepcopy cannot copy) must not stop the training
            self._ensemble = None
            self._disable(f"ChaosProbe could not clone the model into shadows: {error!r}")
            return
        self._reset_measurements()
        self._warn_about_precision(trainer, pl_module)
        if restored is not None:
            self._load_measurements(restored)
            if "optimizer_sync" in restored:
                self._ensemble.optimizer_sync.load_state_dict(restored["optimizer_sync"])
            return
        self._attach_step = trainer.global_step
        self._pending.append(self._ensemble.initial_distance)
        self._log(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if (
            self._ensemble is None
            and not (self._disabled or self._stopped)
            and trainer.global_step >= self.start_step
            and batch_idx % trainer.accumulate_grad_batches == 0  # attach between optimizer steps only
        ):
            self._attach(trainer, pl_module, None)
        if self._active and self._boundary_window_due(trainer, batch_idx):
            self._boundary_window = True
            self._sentinel_exact = True
            assert self._ensemble is not None  # typing: _active
            try:
                self._ensemble.add_twin(pl_module, trainer.optimizers[0], getattr(trainer.precision_plugin, "scaler",
                                                                                  None))
            except Exception as error:  # the shadows go on; only this check is skipped, and said so
                rank_zero_warn(f"ChaosProbe: the sentinel could not clone the model for its second window ({error!r});"
                               " the first window's verdict stands.")
        if self._active:
            self._rng_state = capture_rng_state(pl_module.device)
            self._batch = (batch, batch_idx)
            self._batch_global_step = trainer.global_step
            assert self._ensemble is not None  # typing: _active
            self._guarded(self._ensemble.capture_outside)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        # Step-interval schedulers run before on_train_batch_end: read what was set from outside the step now.
        if self._active:
            self._real_stepped = True
            assert self._ensemble is not None  # typing: _active
            sync = self._ensemble.optimizer_sync
            sync.during = self._guarded(sync.changes)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active or self._rng_state is None:
            return
        self._guarded(self._lockstep, trainer, pl_module, batch, batch_idx)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._mirror_epoch_hook("on_train_epoch_start", pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._active and self._rng_state is not None:  # the module's on_train_batch_start returned -1
            batch, batch_idx = self._batch
            assert self._ensemble is not None  # typing: _active
            self._guarded(self._ensemble.skipped_batch, batch, batch_idx, self._rng_state, pl_module.device,
                          self._alive)
            self._rng_state = None
        self._mirror_epoch_hook("on_train_epoch_end", pl_module)
        self._check_target(trainer)

    # An optimizer with a train/eval mode (schedule-free) is switched around validation by the user's hooks.
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync_modes()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync_modes()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync_modes()
        self._check_target(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish_sentinel(trainer)
        attached = (self._ensemble is not None or self._stopped) and not self._disabled
        if self._steps + 1 < _MIN_FIT_POINTS and not self._short_run_reported and attached:
            self._short_run_reported = True
            rank_zero_warn(
                f"ChaosProbe: only {self._steps} optimizer step(s) were probed (fast_dev_run, max_steps or"
                f" limit_train_batches): fitting an exponent needs d(t) at {_MIN_FIT_POINTS} points, t = 0 included"
                f" ({_MIN_FIT_POINTS - 1} optimizer steps), so the exponents are NaN. Train longer to measure."
            )
        if self._steps == 0:
            return
        self._log(trainer, final=True)
        exponents = self.local_exponents
        chaos_logging.write_exponent_histogram(trainer, exponents, self._attach_step + self._steps)
        chaos_logging.write_hparams(trainer, self._hparams, self._hparam_metrics())
        rank_zero_info(self._summary(exponents))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._ensemble is not None:  # the real optimizer keeps no hook of ours after the fit
            self._ensemble.optimizer_sync.remove()

    # -- checkpointing --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self._ensemble is None and not self._stopped:  # not attached yet: only a target already reached
            if self._time_to_target is None:
                return {}
            return {"time_to_target": self._time_to_target, "elapsed_seconds": self._elapsed_seconds()}
        self._flush()
        state = {
            "steps": self._steps,
            "attach_step": self._attach_step,
            "distances": self.distances,
            "alive": list(self._alive),
            "time_to_target": self._time_to_target,
            "elapsed_seconds": self._elapsed_seconds(),
            # a checkpoint inside the sentinel's window keeps its verdict so far: the twin is not saved
            "sentinel": self._sentinel if self._sentinel is not None else self._sentinel_so_far(),
        }
        if self._stopped:
            return {**state, "stopped": True, "running_exponents": self._final_running}
        if self._disabled:  # the shadows froze at the fault: resuming them would measure a stale separation
            return {**state, "stopped": True, "disabled": True, "running_exponents": self.running_exponents}
        assert self._ensemble is not None  # typing: attached, neither stopped nor disabled
        return {
            **state,
            "measurements": self._ensemble.measurement_state(),
            "shadows": self._ensemble.state_dicts(),
            "optimizer_sync": self._ensemble.optimizer_sync.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Devices are not known yet (the module moves later): shadows are rebuilt from this at fit start.
        self._restored = state_dict or None

    def _load_measurements(self, state: dict[str, Any]) -> None:
        self._steps = state["steps"]
        self._attach_step = state.get("attach_step", 0)
        self._history = [state["distances"].to(torch.float64)]
        self._sentinel = state.get("sentinel")
        if self._sentinel is not None and not self._sentinel["trusted"]:
            rank_zero_warn(
                f"ChaosProbe: the probe in this checkpoint was marked UNTRUSTED by its sentinel (the unperturbed twin"
                f" left the real model at step {self._sentinel['first_drift_step']}); the resumed results stay so."
            )
        if state.get("stopped"):
            self._stopped = True
            self._final_running = state["running_exponents"]
        else:
            assert self._ensemble is not None  # typing: called by _attach, after the shadows are built
            self._ensemble.load_measurement_state(state["measurements"])
        self._alive = list(state["alive"])

    # -- internals ------------------------------------------------------------------------------------------------

    @property
    def _active(self) -> bool:
        return self._ensemble is not None and not (self._disabled or self._stopped)

    def _lockstep(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        loop = trainer.fit_loop.epoch_loop.automatic_optimization
        if loop._skip_backward:
            self._stop(trainer, reason=(
                "the Trainer runs training batches without backward from here (StochasticWeightAveraging's BatchNorm"
                " update on the averaged weights): the real model is no longer trained, so there is nothing to compare"
            ))
            return
        stepped, self._real_stepped = self._real_stepped, False
        context = BatchContext(
            batch_idx=batch_idx,
            epoch=trainer.current_epoch,
            global_step=self._batch_global_step,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            optimizer_steps=stepped,
            step_context=trainer.precision_plugin.train_step_context,
            clip_val=trainer.gradient_clip_val,
            clip_algorithm=trainer.gradient_clip_algorithm,
            world_size=trainer.world_size,
        )
        ensemble = self._ensemble
        assert ensemble is not None and self._rng_state is not None  # typing: on_train_batch_end checked both
        batched = ensemble.vectorized
        distances = ensemble.run_batch(batch, context, self._rng_state, pl_module.device, alive=self._alive)
        self._rng_state = None
        if distances is None:  # accumulating: the real optimizer did not step on this batch
            return
        self._steps += 1
        self._pending.append(distances)
        if ensemble.has_twin:
            self._sentinel_exact &= not batched and not ensemble.vectorized
            self._drifts.append(ensemble.last_twin_drift)  # type: ignore[arg-type]  # a tensor while has_twin
            self._drift_steps.append(self._attach_step + self._steps)
            if len(self._drifts) >= self.sentinel_steps:
                self._finish_sentinel(trainer)
        if self.renormalize_every is not None and self._steps % self.renormalize_every == 0:
            ensemble.pull_back(distances)
        if self._steps % self._log_interval(trainer) == 0:
            self._log(trainer)
        if self.stop_step is not None and trainer.global_step >= self.stop_step:
            self._stop(trainer)

    def _boundary_window_due(self, trainer: Trainer, batch_idx: int) -> bool:
        """Whether to start the sentinel's second window now: half of it before the end of the first epoch the probe
        sees whole, half after, so that it covers the epoch hooks, the validation run and the next epoch's start,
        where what the mirroring misses usually shows."""
        if self._boundary_window or self._sentinel is None or self._ensemble is None or self._ensemble.has_twin:
            return False
        batches = trainer.num_training_batches
        accumulate = trainer.accumulate_grad_batches
        if not isinstance(batches, int) or batch_idx % accumulate:
            return False
        start = max(batches - (self.sentinel_steps + 1) // 2 * accumulate, 0)
        return batch_idx == start - start % accumulate

    def _guarded(self, fn: Any, *args: Any) -> Any:
        """Run ``fn``; a fault inside the probe disables it with a warning and never reaches the user's training."""
        try:
            return fn(*args)
        except Exception as error:
            self._disable(f"ChaosProbe stopped probing after an error in a shadow step: {error!r}")
            return None

    def _mirror_epoch_hook(self, hook: str, pl_module: LightningModule) -> None:
        if self._active:
            assert self._ensemble is not None  # typing: _active
            self._guarded(self._ensemble.sync_optimizer_modes)
            self._guarded(self._ensemble.sync_outside)
            self._guarded(self._ensemble.epoch_hook, hook, capture_rng_state(pl_module.device), pl_module.device,
                          self._alive)

    def _sync_modes(self) -> None:
        if self._active:
            assert self._ensemble is not None  # typing: _active
            self._guarded(self._ensemble.sync_optimizer_modes)

    def _sentinel_so_far(self) -> Optional[dict[str, Any]]:
        """The sentinel's verdict on the steps checked so far (its whole window once it ended), or None."""
        ensemble = self._ensemble
        if ensemble is None or not ensemble.has_twin:
            return None
        drifts = torch.stack(self._drifts).double().cpu() if self._drifts else torch.zeros(0, dtype=torch.float64)
        exact = self._sentinel_exact and not ensemble.compiled and (
            ensemble.real_params[0].device.type == "cpu" or torch.are_deterministic_algorithms_enabled()
        )
        separation = (ensemble.initial_distance.double().mean() / ensemble.reference_norm().double()).item()
        report = sentinel_report(drifts, exact, separation)
        first_bad = report.pop("first_drift")
        report["first_drift_step"] = None if first_bad is None else self._drift_steps[first_bad - 1]
        return _merged(self._sentinel, report)

    def _finish_sentinel(self, trainer: Trainer) -> None:
        """End the sentinel's window: compare the twin's drift with what the path promises, report, free the twin."""
        ensemble = self._ensemble
        report = self._sentinel_so_far()
        if report is None:
            return
        # warn once: for the first window that drifts
        newly_bad = report["first_drift_step"] is not None and (self._sentinel is None or self._sentinel["trusted"])
        drift = float(self._drifts[self._drift_steps.index(report["first_drift_step"])]) if newly_bad else None
        self._drifts, self._drift_steps = [], []
        self._sentinel = report
        assert ensemble is not None  # typing: a report needs the ensemble
        ensemble.drop_twin()
        chaos_logging.log_metrics(
            trainer,
            {chaos_logging.SENTINEL_DRIFT: self._sentinel["max_drift"],
             chaos_logging.TRUSTED: float(self._sentinel["trusted"])},
            self._attach_step + self._steps,
        )
        if newly_bad:
            assert drift is not None  # typing: set when newly_bad
            rank_zero_warn(self._untrusted_message(trainer, drift, report))

    def _untrusted_message(self, trainer: Trainer, drift: float, report: dict[str, Any]) -> str:
        exact, tolerance = report["exact"], report["tolerance"]
        module = trainer.lightning_module
        hooks = overridden_hooks(module, TRAINING_HOOKS)
        callbacks = [
            type(c).__name__ for c in trainer.callbacks  # type: ignore[attr-defined]  # set in Trainer.__init__
            if not isinstance(c, ChaosProbe)
            and any(getattr(type(c), h) is not getattr(Callback, h) for h in _CALLBACK_TRAINING_HOOKS)
        ]
        expected = "bit-identical (drift 0)" if exact else f"below {tolerance:.1e} (1 % of the shadows' separation)"
        causes = ["a callback or code outside the module's hooks that changes the weights or the optimizer"]
        if self._ensemble is not None and self._ensemble.compiled:
            causes.insert(0, "the compiled model's random ops (dropout), which draw other numbers than the shadows'"
                             " eager ones")
        if not exact and not (self._ensemble is not None and self._ensemble.compiled):
            causes.append("a batched kernel (try `vectorize=False`)")
        return (
            f"ChaosProbe: the unperturbed twin left the real model at optimizer step {report['first_drift_step']}"
            f" (relative drift {drift:.1e}; it must stay {expected}), so the shadows do not repeat everything the"
            f" real training does: their numbers are UNTRUSTED. Hooks of {type(module).__name__} that ran:"
            f" {', '.join(hooks) or 'none overridden'}; callbacks acting on the training:"
            f" {', '.join(callbacks) or 'none'}. Likely causes: {'; '.join(causes)}."
        )

    def _should_vectorize(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        if self.vectorize != "auto":
            return bool(self.vectorize)  # True or False: check_vectorize allows no other value
        if "16" in str(trainer.precision) and worth_vectorizing(pl_module, self.num_shadows):
            # Batched 16-bit kernels round otherwise than the real model's: measured at ε = 0 under bf16-mixed, the
            # batched shadows of a small MLP drifted 56x further within 18 steps than ε = 1e-4 sets them apart. One
            # at a time they stay exact.
            rank_zero_info(f"ChaosProbe: precision={trainer.precision}: running the shadows one at a time.")
            return False
        return worth_vectorizing(pl_module, self.num_shadows)

    def _stop(self, trainer: Trainer, reason: Optional[str] = None) -> None:
        """At ``stop_step`` (or when the real training stops being one the shadows can follow, ``reason``): log, keep
        the results, and free the shadows' parameters and optimizer state."""
        self._finish_sentinel(trainer)
        self._log(trainer)
        self._final_running = self.running_exponents
        self._stopped = True
        assert self._ensemble is not None  # typing: called while attached
        self._ensemble.release()
        message = f"ChaosProbe: stopped at step {trainer.global_step} after {self._steps} probed steps; shadows released."
        if reason is None:
            rank_zero_info(message)
        else:
            rank_zero_warn(f"{message} Why: {reason}. The results up to here stay.")

    def _log_interval(self, trainer: Trainer) -> int:
        return self.log_every_n_steps or trainer.log_every_n_steps or 1  # type: ignore[attr-defined]

    def _flush(self) -> None:
        """Move pending device distances to the host (one synchronisation) and retire shadows that diverged."""
        if not self._pending:
            return
        block = torch.stack(self._pending).detach().to("cpu", torch.float64)
        self._pending = []
        self._history.append(block)
        if self.epsilon > 0 and not self._collapse_reported and (block == 0).any():
            self._collapse_reported = True
            rank_zero_warn(
                f"ChaosProbe: d(t) = 0 by optimizer step {self._steps}: the separation fell below the rounding step"
                " of the weights and a shadow merged with the real model. Use `relative=True` or a larger `epsilon`"
                " (or a float64 model)."
            )
        for k in range(self.num_shadows):
            if self._alive[k] and not torch.isfinite(block[:, k]).all():
                self._alive[k] = False
                rank_zero_warn(
                    f"ChaosProbe: shadow {k} turned non-finite (NaN or inf) by optimizer step {self._steps}; it is"
                    " retired and its exponent is NaN. The real training is not affected."
                    " This is common at large learning rates; a smaller `epsilon` may keep it finite longer."
                )

    def _log(self, trainer: Trainer, final: bool = False) -> None:
        """Log d(t) and the running exponents every interval; the window fit, which walks the whole history, every
        few logs and at the end of training (``final``) only. Nothing is written twice for the same step."""
        self._flush()
        if not trainer.loggers:
            return
        alive = torch.tensor(self._alive)
        metrics: dict[str, float] = {}
        if self._last_logged_step != self._steps:
            metrics.update(self._distance_metrics(alive))
            self._logs_written += 1
        if self._steps > 0 and (final or self._logs_written % _FIT_EVERY_N_LOGS == 1):
            metrics.update(self._fit_metrics(alive))
        if metrics:
            chaos_logging.log_metrics(trainer, metrics, self._attach_step + self._steps)
        self._last_logged_step = self._steps

    def _distance_metrics(self, alive: Tensor) -> dict[str, float]:
        latest = self._history[-1][-1]
        metrics = {}
        for k, value in enumerate(latest.tolist()):
            metrics[chaos_logging.shadow_distance_tag(k)] = value
            metrics[chaos_logging.shadow_log_distance_tag(k)] = _log_or_nan(value)
        if alive.any():
            mean_distance = latest[alive].mean().item()
            metrics[chaos_logging.DISTANCE_MEAN] = mean_distance
            metrics[chaos_logging.LOG_DISTANCE_MEAN] = _log_or_nan(mean_distance)
        if self._steps > 0:
            running = self.running_exponents[alive]
            running = running[torch.isfinite(running)]
            if running.numel():
                metrics[chaos_logging.RUNNING_EXPONENT] = running.mean().item()
                metrics[chaos_logging.RUNNING_EXPONENT_MIN] = running.min().item()
                metrics[chaos_logging.RUNNING_EXPONENT_MAX] = running.max().item()
        return metrics

    def _fit_metrics(self, alive: Tensor) -> dict[str, float]:
        fit = self.window_fit
        if fit is None:
            return {}
        usable = alive & torch.isfinite(fit.exponent)
        if not usable.any():
            return {}
        return {
            chaos_logging.LOCAL_EXPONENT: fit.exponent[usable].mean().item(),
            chaos_logging.LOCAL_EXPONENT_R2: fit.r2[usable].nanmean().item(),
        }

    def _hparam_metrics(self) -> dict[str, float]:
        reached = self._time_to_target
        return {
            chaos_logging.HPARAM_EXPONENT: self.lyapunov_exponent,
            chaos_logging.HPARAM_TIME_TO_TARGET: math.nan if reached is None else float(reached["step"]),
        }

    def _check_target(self, trainer: Trainer) -> None:
        if self.monitor is None or self._time_to_target is not None or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        current = float(value)
        assert self.target is not None  # typing: __init__ requires a target with a monitor
        reached = current >= self.target if self.mode == "max" else current <= self.target
        if not reached:
            return
        self._time_to_target = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "seconds": self._elapsed_seconds(),
        }
        chaos_logging.log_metrics(
            trainer, {f"{chaos_logging.TIME_TO_TARGET}/{key}": float(v) for key, v in self._time_to_target.items()},
            trainer.global_step,
        )
        if self.stop_at_target:
            trainer.should_stop = True

    def _elapsed_seconds(self) -> float:
        return self._elapsed_before_resume + time.monotonic() - self._start_time

    def _warn_about_precision(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dtype = next(p.dtype for p in pl_module.parameters())
        unit_roundoff = torch.finfo(dtype).eps / 2 if dtype.is_floating_point else 0.0
        compute = next((u for key, u in _COMPUTE_ROUNDOFF.items() if str(trainer.precision).startswith(key)), None)
        if self.epsilon > 0 and compute is not None and compute > unit_roundoff:
            assert self._ensemble is not None  # typing: called by _attach, after the shadows are built
            separation = (self._ensemble.initial_distance.double().mean() / self._ensemble.reference_norm().double())
            if separation.item() < 10 * compute:
                suggested = float(f"{10 * compute:.0e}")
                rank_zero_warn(
                    f"ChaosProbe: precision={trainer.precision!r} runs the forward and backward with a unit roundoff of"
                    f" {compute:.1e}, and epsilon={self.epsilon:g} displaces the weights by only"
                    f" {separation.item():.1e} of their norm: most of δ is rounded away in the forward pass and d(t)"
                    f" measures rounding. Use `ChaosProbe(epsilon={suggested:g})` (relative) or probe a 32-bit run."
                )
                return
        if 0 < self.epsilon < 100 * unit_roundoff and self.perturbation.relative:
            rank_zero_warn(
                f"ChaosProbe: epsilon={self.epsilon:g} is within 100 rounding steps of {dtype} (unit roundoff"
                f" {unit_roundoff:.1e}): rounding noise will dominate d(t). Use a larger epsilon or a float64 model."
            )
        elif not self.perturbation.relative and dtype != torch.float64 and 0 < self.epsilon < 1e-6:
            rank_zero_warn(
                f"ChaosProbe: an absolute epsilon={self.epsilon:g} in a {dtype} model is below the rounding step of"
                " O(1) weights; most of the perturbation vanishes. The papers use float64 for this reason."
            )

    def _disable(self, message: str) -> None:
        self._disabled = True
        rank_zero_warn(message + " The real training continues unaffected.")

    def _summary(self, exponents: Tensor) -> str:
        """A short table: each shadow's exponent with its fit quality, the regime in words, time-to-target."""
        free = self.renormalize_every is None
        mode = "free evolution" if free else f"renormalised every {self.renormalize_every} steps"
        lines = [f"ChaosProbe summary ({mode}, {self._steps} optimizer steps, {self.num_shadows} shadows)"]
        fit = self.window_fit if free else None
        lines.append("  shadow   Λ per step     " + ("R²      window" if fit is not None else ""))
        for k, value in enumerate(exponents.tolist()):
            row = f"  {k:<8} {value:+.4e}    "
            if fit is not None and math.isfinite(value):
                start, width = int(fit.start[k]), int(fit.width[k])
                row += f"{fit.r2[k].item():.3f}   [{start}, {start + width})"
            elif not self._alive[k]:
                row += "diverged (NaN or inf)"
            lines.append(row)
        finite = exponents[torch.isfinite(exponents)]
        if finite.numel():
            mean = finite.mean().item()
            spread = f" ± {finite.std(unbiased=False).item():.2e}" if finite.numel() > 1 else ""
            lines.append(f"  mean     {mean:+.4e}{spread}: {regime(mean, self._steps)} over {self._steps} steps")
        if self._sentinel is not None:
            report = self._sentinel
            if report["trusted"]:
                kind = "bit-identical" if report["exact"] else f"max relative drift {report['max_drift']:.1e}"
                lines.append(f"  sentinel: the unperturbed twin followed the real model for {report['steps']} steps"
                             f" ({kind})")
            else:
                lines.append(f"  UNTRUSTED: the unperturbed twin left the real model at step"
                             f" {report['first_drift_step']} (see the warning)")
        if self.monitor is not None:
            if self._time_to_target is None:
                lines.append(f"  {self.monitor} never reached {self.target}")
            else:
                t = self._time_to_target
                lines.append(
                    f"  {self.monitor} reached {self.target} at step {t['step']}, epoch {t['epoch']},"
                    f" {t['seconds']:.1f} s"
                )
        return "\n".join(lines)
