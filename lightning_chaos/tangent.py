"""TangentProbe: the Lyapunov spectrum of training from tangent vectors (no finite ε), and the sharpness beside it."""

import math
from typing import Any, Callable, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.adam import adam as functional_adam
from torch.optim.sgd import sgd as functional_sgd
from torch.utils.hooks import RemovableHandle

from lightning_chaos import logging as chaos_logging
from lightning_chaos._validation import check_flag
from lightning_chaos.functional.tangent import (
    adam_preconditioner,
    adam_sharpness_threshold,
    adam_tangent_step,
    clip_tangent,
    gd_sharpness_threshold,
    hessian_top_eigenvalue,
    kaplan_yorke_dimension,
    qr_renormalize,
    sgd_tangent_steps,
)
from lightning_chaos.mirror import all_reduce_mean, overridden_hooks, run_after_other_callbacks, split_output
from lightning_chaos.shadow import (
    RngState,
    capture_rng_state,
    make_shadow_module,
    replayed_rng,
)

_SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
_SUPPORTED_PRECISIONS = ("32-true", "64-true", "32", "64")
_SEED = 0  # the probe's own generator for the random initial tangents; the global RNG is never drawn from
# The replayed loss's gradient must reproduce the real one: beyond this relative difference the replay missed something
# (a random draw outside training_step, a hook that edits gradients) and the results are marked untrusted.
_REPLAY_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4}
_SHARPNESS_ITERATIONS = 20
_SHARPNESS_TOL = 1e-3


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")


def _relative_gaps(*pairs: tuple[list[Tensor], list[Tensor]]) -> list[float]:
    """‖tensors − reference‖ / ‖reference‖ over all blocks (absolute if the reference is 0), for each pair
    ``(tensors, reference)``: a few fused kernels (foreach), norms accumulated in float64, one host synchronisation for
    all the pairs (in the training loop each synchronisation costs about as much as the arithmetic here)."""
    blocks: list[Tensor] = []
    for tensors, reference in pairs:
        blocks += [*torch._foreach_sub(tensors, reference), *reference]
    norms = torch.stack(torch._foreach_norm(blocks, 2, dtype=torch.float64)).tolist()  # the few sums: on the host
    gaps, offset = [], 0
    for _, reference in pairs:
        n = len(reference)
        difference = math.fsum(x * x for x in norms[offset:offset + n])
        norm = math.fsum(x * x for x in norms[offset + n:offset + 2 * n])
        gaps.append(math.sqrt(difference / norm) if norm > 0 else math.sqrt(difference))
        offset += 2 * n
    return gaps


def _relative_gap(tensors: list[Tensor], reference: list[Tensor]) -> float:
    """:func:`_relative_gaps` of one pair."""
    return _relative_gaps((tensors, reference))[0]


_HYPERPARAMETERS = ("lr", "momentum", "dampening", "nesterov", "betas", "eps", "weight_decay", "decoupled_weight_decay",
                    "maximize")


def _state_copies(optimizer: Optimizer, params: list[Tensor]) -> list[dict[str, Any]]:
    """Copies of the optimizer's per-parameter state the update reads (momentum buffer; Adam's moments and step)."""
    return [{k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in optimizer.state.get(p, {}).items()}
            for p in params]


def _update(optimizer: Optimizer, theta: list[Tensor], grads: list[Optional[Tensor]],
            states: list[dict[str, Any]]) -> None:
    """The optimizer's own update (torch's functional SGD or Adam, with each param group's settings) applied in place
    to ``theta`` and ``states``, copies of the parameters and state before the step, with ``grads`` (None: a parameter
    the optimizer skips, as it skips a parameter without ``.grad``)."""
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"]
                                                 if p.requires_grad)}
    for group in optimizer.param_groups:
        members = [index[id(p)] for p in group["params"] if id(p) in index and grads[index[id(p)]] is not None]
        if not members:
            continue
        ps, ss = [theta[i] for i in members], [states[i] for i in members]
        gs = [g for g in (grads[i] for i in members) if g is not None]
        if isinstance(optimizer, torch.optim.SGD):
            buffers = [state.get("momentum_buffer") for state in ss]
            functional_sgd(ps, gs, buffers, foreach=group["foreach"], weight_decay=group["weight_decay"],
                           momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                           nesterov=group["nesterov"], maximize=group["maximize"])
        else:
            beta1, beta2 = group["betas"]
            functional_adam(
                ps, gs, [state["exp_avg"] for state in ss], [state["exp_avg_sq"] for state in ss], [],
                [state["step"] for state in ss], foreach=group["foreach"], capturable=group["capturable"],
                decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=False, beta1=beta1, beta2=beta2,
                lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])


def _hyperparameters(optimizer: Optimizer) -> list[tuple[Any, ...]]:
    """The param groups' values of what the tangents' linearisation reads (tensors as Python numbers)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.tolist()
        return tuple(plain(v) for v in value) if isinstance(value, (tuple, list)) else value

    return [tuple(plain(group.get(name)) for name in _HYPERPARAMETERS) for group in optimizer.param_groups]


class _TrainingStepAsForward(nn.Module):
    """A LightningModule's ``training_step`` presented as ``forward``, for ``functional_call``."""

    def __init__(self, module: LightningModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any, batch_idx: int) -> Any:
        loss, _ = split_output(self.module.training_step(batch, batch_idx))
        if loss is None:
            raise RuntimeError("training_step returned no loss for this batch")
        return loss


class TangentProbe(Callback):
    r"""Push tangent vectors through the Jacobian of every training step: the Lyapunov spectrum, with no finite ε.

    The training step is a map on the whole state s = (θ, optimizer state), s(t+1) = U_t(s(t)). Each probed optimizer
    step, ``num_exponents`` = k tangent vectors u are moved by its Jacobian, u ← J_{U_t}(s(t)) u, parameters and
    optimizer state together:

    * SGD (torch's convention, with momentum, dampening, Nesterov, weight decay, ``maximize``): for plain GD
      J = I − ηH; with momentum (u_θ, u_b) ↦ (u_θ − η(μ u_b + H u_θ), μ u_b + H u_θ) (dampening and Nesterov as torch
      applies them);
    * Adam and AdamW: (θ, m, v) linearised exactly, bias corrections, ε and both kinds of weight decay included
      (:func:`~lightning_chaos.functional.tangent.adam_tangent_step`); ``amsgrad`` is refused.

    The Hessian-vector products H u are reverse-over-reverse (a backward that keeps its graph, then one batched
    backward for all k tangents) through the module's own ``training_step`` on the real batch, run with
    ``functional_call`` on a copy of the module that logs nothing, at the real parameters, with the random streams the
    real batch saw replayed (the same dropout masks) and then restored. Each step's learning rate, momentum and betas
    are read from the optimizer's param groups in ``on_before_optimizer_step``, after any scheduler or warm-up set
    them. Every ``orthonormalize_every`` steps the tangents are re-orthonormalised by QR and ln R_ii accumulated
    (Benettin et al. 1980; ChaosTools.jl ``lyapunovspectrum``): the running exponents Σ ln R_ii / t are the k largest
    Lyapunov exponents of the training, per optimizer step.

    Against :class:`~lightning_chaos.ChaosProbe`: tangents are exact in the ε → 0 limit, never saturate, work in any
    precision and give k exponents, not only the largest; they need the optimizer's update linearised (SGD and Adam
    here), while shadows follow any optimizer with the papers' finite-ε protocol.

    With ``sharpness=True`` the top eigenvalue of the loss Hessian on the step's batch (the *sharpness*) is found
    every ``sharpness_every`` steps by power iteration on Hessian-vector products, warm-started from the previous
    eigenvector, and logged beside its stability threshold: 2/η for GD ((2 + 2μ)/η with heavy-ball momentum); under
    full-batch GD it rises to 2/η and hovers there, the edge of stability (Cohen et al. 2021), exactly where the top
    tangent exponent of I − ηH crosses 0. For Adam the preconditioned sharpness, the top eigenvalue of P⁻¹H with
    P Adam's preconditioner, is measured too, against its threshold (2 + 2β₁)/((1 − β₁)η) (Cohen et al. 2022).

    Under DDP the Hessian-vector products (and the replayed gradient) are averaged across processes, as DDP averages
    the gradients, so every rank holds the same tangents: those of one process on the whole batch.

    Observation does not perturb: the real weights, gradients, optimizer state, random streams and logged metrics are
    bit-identical with and without the probe. A check on every step compares the replayed loss's gradient with the
    real one; a mismatch (a random draw outside ``training_step``, a hook that edits gradients) is warned about once
    and marks the results untrusted (:attr:`trusted`). So do, checked after each real step, a step changed after this
    callback's ``on_before_optimizer_step`` (the module's own hook runs after the callbacks', then its
    ``configure_gradient_clipping`` and ``clip_gradients``: the gradients, hyperparameters and starting weights of
    the real update are compared with the tangents', when one of those is overridden), and a change to the
    parameters between two optimizer steps, outside the optimizer (a max-norm constraint in ``on_train_batch_end``,
    compared exactly): the tangents follow the optimizer's update of what they saw, not what a hook does to it.

    Cost per probed step: the replayed forward, a backward that keeps its graph and one more backward for the k
    tangents together (about 2.5× a training step's gradient for k = 1), one copy of the parameters and optimizer
    state per tangent, one more copy of the parameters (θ as the real step left it, for the check above; with one
    of the hooks above overridden, also of the gradients and the optimizer state, for the step), and a QR of a
    [D, k] matrix (a norm for k = 1); with
    ``sharpness=True`` up to 20 more Hessian-vector products every ``sharpness_every`` steps (fewer when warm).

    Args:
        num_exponents: k ≥ 1, the number of tangent vectors: the k largest exponents are measured.
        orthonormalize_every: re-orthonormalise by QR every N ≥ 1 optimizer steps. Every step (the default, as
            ChaosTools) keeps the vectors well-conditioned; larger N saves the QR's cost on large models, but vectors
            grow or shrink by e^{λN} in between and collapse onto the top direction when N(λ₁ − λ_k) is large.
        sharpness: also measure the sharpness (and for Adam the preconditioned sharpness).
        sharpness_every: measure it every N ≥ 1 probed steps (the first probed step included); each costs up to 20
            Hessian-vector products, about 2–3 when warm-started from a slowly moving eigenvector.
        start_step: the optimizer step (``trainer.global_step``) from which to probe; with momentum or Adam the
            tangents attach at the first step at or after it where the optimizer's state exists (after its first
            step), since before it the state is not a variable of the map.
        stop_step: the optimizer step at which to stop and free the tangents (results stay); ``None``: until the end.
        log_every_n_steps: log every N probed steps; ``None`` follows ``Trainer(log_every_n_steps=...)``.

    Refused (a warning, and the probe disables itself, leaving the training untouched): optimizers other than
    ``torch.optim.SGD``, ``Adam`` and ``AdamW`` (subclasses included, as their step may differ), ``amsgrad``, several
    optimizers, an overridden ``configure_gradient_clipping`` and precisions other than 32/64-bit true, whose step
    this probe does not linearise. The Trainer's own clipping (``gradient_clip_val``, by norm or by value) is
    linearised (:func:`~lightning_chaos.functional.tangent.clip_tangent`); under gradient accumulation every batch of
    the step is replayed with its own random state.

    Raises:
        ValueError: at construction, for an argument out of its range (the message names it).
        MisconfigurationException: at setup, for manual optimisation or a multi-process strategy other than DDP.

    Example:
        >>> from lightning.pytorch import Trainer, seed_everything
        >>> from lightning_chaos import TangentProbe
        >>> from lightning_chaos.demo import DigitsDataModule, MLPClassifier
        >>> _ = seed_everything(0, verbose=False)
        >>> probe = TangentProbe(num_exponents=2, sharpness=True)
        >>> trainer = Trainer(max_epochs=1, callbacks=[probe], logger=False, enable_progress_bar=False,
        ...                   enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(MLPClassifier(lr=0.5), datamodule=DigitsDataModule())  # SGD, 22 steps
        >>> probe.spectrum_history.shape  # the running exponents after each step, per optimizer step
        torch.Size([22, 2])
        >>> bool(probe.lyapunov_spectrum[0] >= probe.lyapunov_spectrum[1])  # descending
        True
        >>> probe.sharpness < probe.sharpness_threshold  # below the edge of stability, 2/η = 4
        True
    """

    observes_training = True  # ordered after the callbacks it observes (mirror.run_after_other_callbacks)

    def __init__(
        self,
        num_exponents: int = 1,
        orthonormalize_every: int = 1,
        sharpness: bool = False,
        sharpness_every: int = 10,
        start_step: int = 0,
        stop_step: Optional[int] = None,
        log_every_n_steps: Optional[int] = None,
    ) -> None:
        _check_positive_int("num_exponents", num_exponents)
        _check_positive_int("orthonormalize_every", orthonormalize_every)
        check_flag("sharpness", sharpness)
        _check_positive_int("sharpness_every", sharpness_every)
        _check_positive_int("start_step", start_step, minimum=0)
        if stop_step is not None and (
            isinstance(stop_step, bool) or not isinstance(stop_step, int) or stop_step <= start_step
        ):
            raise ValueError(f"`stop_step` must be None or an integer > start_step={start_step}, got {stop_step!r}")
        if log_every_n_steps is not None:
            _check_positive_int("log_every_n_steps", log_every_n_steps)
        self.num_exponents = num_exponents
        self.orthonormalize_every = orthonormalize_every
        self.measure_sharpness = sharpness
        self.sharpness_every = sharpness_every
        self.start_step = start_step
        self.stop_step = stop_step
        self.log_every_n_steps = log_every_n_steps
        self._restored: Optional[dict[str, Any]] = None
        self._reset()

    def _reset(self) -> None:
        if getattr(self, "_step_hooks", None):
            self._forget_real_step()
        self._disabled = False
        self._stopped = False
        self._steps = 0  # probed optimizer steps
        self._steps_at_qr = 0
        self._attach_step = 0
        self._log_sum = torch.zeros(self.num_exponents, dtype=torch.float64)
        # (Σ ln R_ii, steps at that QR) after every probed step; divided and sorted only when read
        self._history: list[tuple[Tensor, int]] = []
        self._sharpness: list[float] = []
        self._sharpness_steps: list[int] = []
        self._thresholds: list[float] = []
        self._preconditioned: list[float] = []
        self._preconditioned_thresholds: list[float] = []
        self._eigenvector: Optional[Tensor] = None
        self._preconditioned_eigenvector: Optional[Tensor] = None
        self._trusted = True
        self._replay_gap = 0.0
        self._optimizer_name = ""
        self._tangents: Optional[list[Tensor]] = None  # per block (component × parameter): [k, *shape]
        self._pending_tangents: Optional[list[Tensor]] = None  # from a checkpoint, until attach
        self._params: list[Tensor] = []
        self._leaves: tuple[Tensor, ...] = ()
        self._step_module: Optional[_TrainingStepAsForward] = None
        # θ as the real optimizer step left it, to notice a change made to the parameters between two steps, outside
        # the map the tangents follow
        self._after_step: Optional[list[Tensor]] = None
        # copies of the gradients the tangents were stepped with (clipped as Lightning clips), the hyperparameters, and
        # the parameters and optimizer state before the step: against what the real optimizer then did
        self._stepped_with: Optional[tuple[list[Tensor], list[tuple[Any, ...]], list[Tensor], list[dict[str, Any]]]]
        self._stepped_with = None
        self._step_hooks: list[RemovableHandle] = []
        self._hook_error: Optional[str] = None  # an error inside the step post-hook, said outside the real step
        self._untrusted_reason = ""
        # whether anything runs between this callback's on_before_optimizer_step and the update that could change
        # the gradients, the hyperparameters or the weights (set at attach); without, those checks are skipped
        self._step_editable = False
        # the batches of this optimizer step (several under gradient accumulation), with the RNG states they saw
        self._micro: list[tuple[Any, int, RngState]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            num_exponents=self.num_exponents,
            orthonormalize_every=self.orthonormalize_every,
            sharpness=self.measure_sharpness,
            sharpness_every=self.sharpness_every,
            start_step=self.start_step,
            stop_step=self.stop_step,
        )

    # -- public results -------------------------------------------------------------------------------------------

    @property
    def lyapunov_spectrum(self) -> Tensor:
        """The k running exponents Σ ln R_ii / t per optimizer step, float64 [k], descending (NaN before the first
        re-orthonormalisation)."""
        if self._steps_at_qr == 0:
            return torch.full((self.num_exponents,), math.nan, dtype=torch.float64)
        return torch.sort(self._log_sum / self._steps_at_qr, descending=True).values

    @property
    def spectrum_history(self) -> Tensor:
        """The running spectrum after every probed step, float64 [steps, k], each row descending (rows between two
        re-orthonormalisations repeat the last one)."""
        if not self._history:
            return torch.empty(0, self.num_exponents, dtype=torch.float64)
        sums = torch.stack([log_sum for log_sum, _ in self._history])
        counts = torch.tensor([count for _, count in self._history], dtype=torch.float64)
        return torch.sort(sums / counts.unsqueeze(1), dim=1, descending=True).values  # 0/0: NaN before the first QR

    @property
    def num_positive(self) -> int:
        """How many of the k exponents are positive: directions of the training state that expand."""
        return int((self.lyapunov_spectrum > 0).sum())

    @property
    def kaplan_yorke_dimension(self) -> float:
        """The Kaplan–Yorke dimension of :attr:`lyapunov_spectrum` (at most k; NaN before the first QR)."""
        return kaplan_yorke_dimension(self.lyapunov_spectrum)

    @property
    def sharpness(self) -> float:
        """The latest top eigenvalue of the loss Hessian on the step's batch (NaN before one was measured)."""
        return self._sharpness[-1] if self._sharpness else math.nan

    @property
    def sharpness_history(self) -> Tensor:
        """Every sharpness measured, float64 [n]; the optimizer steps they belong to are :attr:`sharpness_steps`."""
        return torch.tensor(self._sharpness, dtype=torch.float64)

    @property
    def sharpness_steps(self) -> Tensor:
        """The real model's optimizer step (``trainer.global_step`` before the update) of each sharpness, int64 [n]."""
        return torch.tensor(self._sharpness_steps, dtype=torch.int64)

    @property
    def sharpness_threshold(self) -> float:
        """The latest stability threshold of the raw sharpness: 2/η for GD, (2 + 2μ)/η with heavy ball (NaN for
        Adam, whose threshold is on the preconditioned sharpness)."""
        return self._thresholds[-1] if self._thresholds else math.nan

    @property
    def preconditioned_sharpness(self) -> float:
        """Adam only: the latest top eigenvalue of P⁻¹H (NaN otherwise)."""
        return self._preconditioned[-1] if self._preconditioned else math.nan

    @property
    def preconditioned_sharpness_history(self) -> Tensor:
        """Adam only: every preconditioned sharpness measured, float64 [n] (at :attr:`sharpness_steps`)."""
        return torch.tensor(self._preconditioned, dtype=torch.float64)

    @property
    def preconditioned_sharpness_threshold(self) -> float:
        """Adam only: the latest (2 + 2β₁)/((1 − β₁)η) (NaN otherwise)."""
        return self._preconditioned_thresholds[-1] if self._preconditioned_thresholds else math.nan

    @property
    def trusted(self) -> bool:
        """False once the replayed loss's gradient differed from the real one, the optimizer stepped with gradients
        or hyperparameters set after the probe saw them, or the parameters changed between two steps outside the
        optimizer (see the class docstring)."""
        return self._trusted

    # -- Lightning hooks ------------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # after every other callback: a warm-up's LR set in on_before_optimizer_step is the one the tangents step with
        trainer.callbacks = run_after_other_callbacks(trainer.callbacks)  # type: ignore[attr-defined]
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "TangentProbe supports automatic optimization only; this LightningModule sets"
                " `automatic_optimization = False` (manual optimization)."
            )
        if trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            raise MisconfigurationException(
                f"TangentProbe supports multi-process training through DDP only; found {type(trainer.strategy).__name__}"
                f" with world_size={trainer.world_size}."
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        restored, self._restored = self._restored, None
        self._reset()
        if restored:
            self._load(restored)
        if self._stopped:
            return
        reason = self._refusal(trainer)
        if reason is not None:
            self._disable(f"TangentProbe: {reason}; the probe is off for this fit.")
            return
        self._optimizer_name = type(trainer.optimizers[0]).__name__

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after every callback's on_fit_start: a ChaosProbe's layout is written by then, and one layout per writer
        from lightning_chaos.probe import ChaosProbe

        with_chaos = any(isinstance(c, ChaosProbe) for c in trainer.callbacks)  # type: ignore[attr-defined]
        chaos_logging.write_tangent_layout(trainer, with_chaos_layout=with_chaos)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._active and trainer.global_step >= self.start_step:
            self._micro.append((batch, batch_idx, capture_rng_state(pl_module.device)))

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if not self._active or not self._micro:
            return
        if self.stop_step is not None and trainer.global_step >= self.stop_step:
            self._stop(trainer)
            return
        try:
            with torch.enable_grad():
                self._probe_step(trainer, pl_module, optimizer)
        except Exception as error:  # a fault inside the probe must never reach the user's training
            self._disable(f"TangentProbe stopped after an error while stepping the tangents: {error!r}.")
        finally:
            self._micro = []

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._forget_real_step()  # no hook of ours left on the user's optimizer after a crash or an interrupt

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._forget_real_step()  # the tangents stay, for a checkpoint saved after the fit
        if self._steps == 0:
            return
        self._log(trainer, trainer.global_step)
        rank_zero_info(self._summary())

    # -- checkpointing --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self._steps == 0 and self._tangents is None and not self._stopped:
            return {}
        tangents = self._tangents if self._tangents is not None else self._pending_tangents
        return {
            "steps": self._steps,
            "steps_at_qr": self._steps_at_qr,
            "attach_step": self._attach_step,
            "log_sum": self._log_sum.clone(),
            "history": self.spectrum_history,
            "sharpness": list(self._sharpness),
            "sharpness_steps": list(self._sharpness_steps),
            "thresholds": list(self._thresholds),
            "preconditioned": list(self._preconditioned),
            "preconditioned_thresholds": list(self._preconditioned_thresholds),
            "eigenvector": None if self._eigenvector is None else self._eigenvector.cpu(),
            "preconditioned_eigenvector": None if self._preconditioned_eigenvector is None
            else self._preconditioned_eigenvector.cpu(),
            "tangents": None if tangents is None or self._stopped or self._disabled
            else [t.detach().cpu() for t in tangents],
            "stopped": self._stopped or self._disabled,
            "trusted": self._trusted,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # devices are not known yet (the module moves later): the tangents are moved when they attach
        self._restored = state_dict or None

    def _load(self, state: dict[str, Any]) -> None:
        self._steps = state["steps"]
        self._steps_at_qr = state["steps_at_qr"]
        self._attach_step = state["attach_step"]
        self._log_sum = state["log_sum"].to(torch.float64)
        self._history = [(row, 1) for row in state["history"].to(torch.float64)]
        self._sharpness = list(state["sharpness"])
        self._sharpness_steps = list(state["sharpness_steps"])
        self._thresholds = list(state["thresholds"])
        self._preconditioned = list(state["preconditioned"])
        self._preconditioned_thresholds = list(state["preconditioned_thresholds"])
        self._eigenvector = state["eigenvector"]
        self._preconditioned_eigenvector = state["preconditioned_eigenvector"]
        self._pending_tangents = state["tangents"]
        self._stopped = state["stopped"]
        self._trusted = state["trusted"]

    # -- internals ------------------------------------------------------------------------------------------------

    @property
    def _active(self) -> bool:
        return not (self._disabled or self._stopped)

    def _refusal(self, trainer: Trainer) -> Optional[str]:
        """Why this fit's training step is not one the probe linearises exactly, or None."""
        if len(trainer.optimizers) != 1:
            return f"it supports exactly one optimizer, found {len(trainer.optimizers)}"
        optimizer = trainer.optimizers[0]
        if type(optimizer) not in _SUPPORTED_OPTIMIZERS:
            return (f"the optimizer {type(optimizer).__name__} is not supported (its update is linearised for"
                    " torch.optim.SGD, Adam and AdamW only); use ChaosProbe, which follows any optimizer")
        if any(group.get("amsgrad") for group in optimizer.param_groups):
            return f"{type(optimizer).__name__}(amsgrad=True) is not supported"
        if trainer.gradient_clip_val and "configure_gradient_clipping" in overridden_hooks(trainer.lightning_module):
            return "an overridden configure_gradient_clipping is not supported (its clipping is not linearised)"
        if str(trainer.precision) not in _SUPPORTED_PRECISIONS:
            return f"precision={trainer.precision!r} is not supported (32-true and 64-true are)"
        return None

    def _disable(self, message: str) -> None:
        self._disabled = True
        self._release()
        rank_zero_warn(message + " The real training continues unaffected.")

    def _release(self) -> None:
        self._forget_real_step()
        self._tangents = None
        self._step_module = None
        self._params = []
        self._leaves = ()

    def _stop(self, trainer: Trainer) -> None:
        self._stopped = True
        self._log(trainer, trainer.global_step)
        self._release()
        rank_zero_info(f"TangentProbe: stopped at step {trainer.global_step} after {self._steps} probed steps.")

    def _trainable(self, optimizer: Optimizer) -> list[tuple[Tensor, dict[str, Any]]]:
        return [(p, group) for group in optimizer.param_groups for p in group["params"] if p.requires_grad]

    def _state_ready(self, optimizer: Optimizer, pairs: list[tuple[Tensor, dict[str, Any]]]) -> bool:
        """Whether the optimizer's state is a variable of the map yet (it is made by the first step)."""
        for p, group in pairs:
            if p.grad is None:
                continue
            state = optimizer.state.get(p, {})
            if isinstance(optimizer, torch.optim.SGD):
                if group["momentum"] and state.get("momentum_buffer") is None:
                    return False
            elif "step" not in state:
                return False
        return True

    def _components(self, optimizer: Optimizer) -> int:
        """Blocks of the state per parameter: θ, plus the momentum buffer, or Adam's two moments."""
        if isinstance(optimizer, torch.optim.SGD):
            return 2 if any(group["momentum"] for group in optimizer.param_groups) else 1
        return 3

    def _attach(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer,
                pairs: list[tuple[Tensor, dict[str, Any]]]) -> None:
        self._params = [p for p, _ in pairs]
        # Lightning's closure (the forward, backward, on_before_optimizer_step, clipping) runs inside step(): only a
        # post-hook sees what the update used
        self._step_hooks = [optimizer.register_step_post_hook(self._record_real_step)]
        # after this hook and before the update Lightning runs the later callbacks' on_before_optimizer_step, the
        # module's own, then its clipping through configure_gradient_clipping and clip_gradients (Lightning's own
        # clipping is linearised); the callbacks that only observe (a ChaosProbe) edit nothing
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        later = callbacks[callbacks.index(self) + 1:] if self in callbacks else callbacks
        editors = overridden_hooks(pl_module, ("on_before_optimizer_step", "configure_gradient_clipping",
                                               "clip_gradients"))
        self._step_editable = bool(editors) or any(
            type(callback).on_before_optimizer_step is not Callback.on_before_optimizer_step
            and not getattr(type(callback), "observes_training", False) for callback in later)
        shadow = make_shadow_module(pl_module)  # logs nothing and keeps its writes (metrics, attributes) to itself
        self._step_module = _TrainingStepAsForward(shadow)
        # the copy has the real module's structure: each step's tensors go into the twin of the module they sit in
        self._module_pairs = list(zip(pl_module.modules(), shadow.modules()))
        if len(self._module_pairs) != len(list(shadow.modules())) or any(
            type(real) is not type(twin) or real._parameters.keys() != twin._parameters.keys()
            for real, twin in self._module_pairs
        ):
            raise RuntimeError("the module's copy does not have the module's structure")
        self._trainable_index = {id(p): i for i, p in enumerate(self._params)}
        blocks = [p for _ in range(self._components(optimizer)) for p in self._params]
        k = self.num_exponents
        dimension = sum(p.numel() for p in blocks)
        if k > dimension:
            raise ValueError(f"num_exponents={k} exceeds the dimension {dimension} of the training state")
        if self._pending_tangents is not None:
            saved, self._pending_tangents = self._pending_tangents, None
            if [tuple(t.shape[1:]) for t in saved] != [tuple(p.shape) for p in blocks]:
                raise ValueError("the checkpoint's tangents do not match this model's parameters")
            self._tangents = [t.to(p.device, p.dtype) for t, p in zip(saved, blocks)]
            return
        generator = torch.Generator().manual_seed(_SEED)
        start = torch.randn(dimension, k, generator=generator, dtype=torch.float64)
        q, _ = qr_renormalize(start)
        self._tangents = self._split(q.T.contiguous(), blocks)
        self._attach_step = trainer.global_step

    @staticmethod
    def _split(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
        """[k, D] → one [k, *shape] view per block, in the blocks' dtype and device."""
        k, pieces, offset = flat.shape[0], [], 0
        for p in like:
            pieces.append(flat[:, offset:offset + p.numel()].reshape(k, *p.shape).to(p.device, p.dtype))
            offset += p.numel()
        return pieces

    def _install(self, leaves: tuple[Tensor, ...]) -> None:
        """Put θ = ``leaves`` into the copy, with everything else as the real module has it now.

        What ``functional_call`` does, without its per-call name resolution and weight-tying analysis: the
        tensors go straight into the copy's ``_parameters``/``_buffers`` (a parameter shared by several modules gets
        the same leaf in each), and stay there; the copy is the probe's own.
        """
        index = self._trainable_index
        clones: dict[int, Tensor] = {}
        for real, shadow in self._module_pairs:
            shadow.training = real.training  # eval()/train() set on the real one
            for name, p in real._parameters.items():
                if p is not None:
                    i = index.get(id(p))
                    shadow._parameters[name] = leaves[i] if i is not None else p.detach()  # type: ignore[assignment]
            for name, b in real._buffers.items():
                # BatchNorm's running statistics among them: an eval-mode (frozen) BatchNorm normalises with them
                if b is not None and shadow._buffers.get(name) is not None:
                    # copies: a training_step that updates a buffer in place (a train-mode BatchNorm) must not write
                    # into the real one
                    if id(b) not in clones:
                        clones[id(b)] = b.detach().clone()
                    shadow._buffers[name] = clones[id(b)]

    def _probe_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        pairs = self._trainable(optimizer)
        if self._tangents is None:
            if not self._state_ready(optimizer, pairs):
                return  # momentum or Adam before their first step: attach once the state exists
            self._attach(trainer, pl_module, optimizer, pairs)
        elif len(pairs) != len(self._params) or any(p is not q for (p, _), q in zip(pairs, self._params)):
            self._stop(trainer)
            rank_zero_warn("TangentProbe: the set of trainable parameters changed (a finetuning callback, a new param"
                           " group): the state space changed, so probing stopped here. The results so far stay.")
            return
        if self._hook_error is not None:
            error, self._hook_error = self._hook_error, None
            self._distrust("the check after the real step failed", f"the check after the real optimizer step failed"
                           f" ({error}), so the probe cannot tell whether that step was the one the tangents followed")
        gradients, hvp = self._differentiate(trainer, pl_module)
        n = len(self._params)
        with torch.no_grad():
            self._check_replay_and_untouched(gradients)
        assert self._tangents is not None  # attached above
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        products = list(hvp(tuple(self._tangents[:n])))
        clip_val = trainer.gradient_clip_val
        if clip_val:  # Lightning clips after on_before_optimizer_step: p.grad is unclipped here
            algorithm = getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm"
            grads, products = clip_tangent(grads, products, float(clip_val), str(algorithm))
        if self._step_editable:  # copies: the grads may be the .grad tensors themselves, which an edit would change
            self._stepped_with = ([g.detach().clone() for g in grads], _hyperparameters(optimizer),
                                  [p.detach().clone() for p in self._params], _state_copies(optimizer, self._params))
        self._tangents = self._step_tangents(optimizer, pairs, tuple(products), grads)
        self._steps += 1
        if self._steps % self.orthonormalize_every == 0:
            self._orthonormalize()
        self._history.append((self._log_sum, self._steps_at_qr))  # _log_sum is replaced, never changed in place
        if self.measure_sharpness and (self._steps - 1) % self.sharpness_every == 0:
            self._measure_sharpness(trainer, optimizer, pairs, hvp, grads)
        interval = self.log_every_n_steps or trainer.log_every_n_steps or 1  # type: ignore[attr-defined]
        if self._steps % interval == 0:
            self._log(trainer, trainer.global_step + 1)

    def _differentiate(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> tuple[tuple[Tensor, ...], Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]]]:
        """The replayed step's gradient, and H·u for batches of vectors u ([k, *shape] per parameter) on its graph.

        On one process the gradient returned is the graph's own (read it under ``no_grad``); under DDP a reduced copy.

        Reverse over reverse: one forward and a backward that keeps its graph, then one more backward per call (all k
        vectors at once, ``is_grads_batched``). On small models this is 5–7× faster than ``torch.func``'s
        forward-over-reverse ``jvp(grad(...))``, whose cost there is per-operator overhead, and gives the same
        products to rounding; the graph serves the sharpness's power iteration too, with no second replay.
        """
        leaves = self._leaves
        # θ as leaves of the probe's graph: views of the real parameters, so they follow the optimizer's in-place
        # updates and can be kept from step to step, unless a parameter's storage was swapped (``p.data = ...``)
        if len(leaves) != len(self._params) or any(
            leaf.data_ptr() != p.data_ptr() or leaf.shape != p.shape for leaf, p in zip(leaves, self._params)
        ):
            leaves = self._leaves = tuple(p.detach().requires_grad_() for p in self._params)
        module = self._step_module
        assert module is not None  # built at attach
        accumulate = trainer.accumulate_grad_batches
        gradients: tuple[Tensor, ...] = ()
        for batch, batch_idx, rng_state in self._micro:  # under accumulation, each batch of the step with its RNG
            self._install(leaves)  # fresh buffer copies for every batch, as the real module has them now
            with replayed_rng(rng_state, self._params[0].device), trainer.precision_plugin.train_step_context(), \
                    torch.enable_grad():
                loss = module(batch, batch_idx)
                if accumulate != 1:  # Lightning divides each batch's loss by accumulate_grad_batches before backward
                    loss = loss / accumulate
                grads = torch.autograd.grad(loss, leaves, create_graph=True, materialize_grads=True)
            gradients = grads if not gradients else tuple(a + b for a, b in zip(gradients, grads))
        # a gradient that does not depend on θ (a parameter entering linearly) adds nothing to H·u
        curved = [i for i, g in enumerate(gradients) if g.requires_grad]
        world_size = trainer.world_size

        def hvp(vectors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            if not curved:
                return tuple(torch.zeros_like(v) for v in vectors)
            single = vectors[0].shape[0] == 1  # batching one vector through vmap only adds overhead
            products = torch.autograd.grad([gradients[i] for i in curved], leaves,
                                           grad_outputs=[vectors[i][0] if single else vectors[i] for i in curved],
                                           retain_graph=True, is_grads_batched=not single, materialize_grads=True)
            # without create_graph the products are already detached
            reduced = [product.unsqueeze(0) for product in products] if single else list(products)
            if world_size > 1:  # DDP averages the gradients, so the Hessian of the step is the ranks' mean too
                all_reduce_mean(reduced, world_size)
            return tuple(reduced)

        if world_size == 1:
            return gradients, hvp  # still attached to the graph: read them under no_grad
        replayed = [g.detach().clone() for g in gradients]  # copies: reduced in place, and the graph needs its own
        all_reduce_mean(replayed, world_size)
        return tuple(replayed), hvp

    def _forget_real_step(self) -> None:
        for hook in self._step_hooks:
            hook.remove()
        self._step_hooks = []
        self._after_step = None
        self._stepped_with = None

    def _distrust(self, reason: str, message: str) -> None:
        """Mark the results untrusted (once), saying why."""
        if not self._trusted:
            return
        self._trusted = False
        self._untrusted_reason = reason
        rank_zero_warn(f"TangentProbe: {message}. The tangents follow another map than the real one: results"
                       " UNTRUSTED.")

    @property
    def _tolerance(self) -> float:
        return _REPLAY_TOLERANCE.get(self._params[0].dtype, 1e-2)

    def _check_real_step(self, optimizer: Optimizer) -> None:
        """After the real step: did the optimizer step with the gradients and hyperparameters the tangents were
        stepped with? An edit after this callback's ``on_before_optimizer_step`` (the module's own runs after the
        callbacks'; so do its ``configure_gradient_clipping`` and ``clip_gradients``) goes unseen by the replay check.
        The optimizers the probe supports leave ``.grad`` and their hyperparameters as they found them."""
        stepped_with, self._stepped_with = self._stepped_with, None
        if stepped_with is None or not self._trusted:
            return
        grads, hyperparameters, theta, states = stepped_with
        real = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        # a tolerance, not equality: Lightning's clipping and the probe's round differently
        what = ("gradients" if _relative_gap(grads, real) > self._tolerance
                else "hyperparameters" if hyperparameters != _hyperparameters(optimizer) else "")
        if not what:  # the weights the update started from: the same update from the probe's θ lands where it did
            _update(optimizer, theta, [p.grad for p in self._params], states)
            gap = _relative_gap(theta, [p.detach() for p in self._params])
            what = "weights" if gap > 8 * torch.finfo(self._params[0].dtype).eps else ""
        if what:
            self._distrust(
                f"the optimizer stepped with other {what}",
                f"at step {self._attach_step + self._steps - 1} the optimizer stepped with other {what} than the ones"
                " the probe saw in its on_before_optimizer_step: something changed them after it (the LightningModule's"
                " on_before_optimizer_step, configure_gradient_clipping or clip_gradients, a callback listed after"
                " TangentProbe)")

    def _record_real_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """After the real optimizer's step (a step post-hook): the gradients it stepped with, and θ as it left it."""
        try:
            with torch.no_grad():
                self._check_real_step(optimizer)
                params = self._params  # under no_grad: no detached views needed (each one is an operation)
                if self._after_step is None or len(self._after_step) != len(params):
                    self._after_step = [p.detach().clone() for p in params]
                else:
                    torch._foreach_copy_(self._after_step, params)
        except Exception as error:  # inside the real step: never let the probe's bookkeeping reach it
            self._after_step, self._hook_error = None, repr(error)

    def _check_replay_and_untouched(self, gradients: tuple[Tensor, ...]) -> None:
        """Two checks, one host synchronisation.

        The replayed gradient against the real ``.grad``: a cheap proof that the replay saw the real step.

        θ now against θ as the last real step left it, exactly: the tangent map is the optimizer's update, so a change
        made to the parameters in between (a constraint or projection in a hook, through ``.data`` too, weights loaded
        or averaged into the model) is a part of the real map that the tangents miss. Weights swapped out and back
        with the same values (for validation) are not a change.
        """
        after, self._after_step = self._after_step, None
        pairs = [(g, p.grad) for g, p in zip(gradients, self._params) if p.grad is not None]
        checks = [([g for g, _ in pairs], [r for _, r in pairs])] if pairs else []
        if after is not None and self._trusted and len(after) == len(self._params):
            checks.append((after, self._params))  # called under no_grad
        if not checks:
            return
        gaps = _relative_gaps(*checks)
        if after is not None and len(checks) == 1 + bool(pairs) and gaps[-1] != 0.0:
            self._distrust(
                "the parameters changed between two steps, outside the optimizer",
                f"before step {self._attach_step + self._steps} the parameters changed after the optimizer's step,"
                " outside it (a max-norm constraint, clamp or projection in a hook such as on_train_batch_end or"
                " optimizer_step, weights loaded, averaged or reset into the model); the tangents follow the"
                " optimizer's update only, not that change. ChaosProbe's shadows run the module's hooks and follow it")
        if not pairs:
            return
        gap = gaps[0]
        self._replay_gap = max(self._replay_gap, gap)
        tolerance = self._tolerance
        if gap > tolerance and self._trusted:
            self._untrusted_reason = f"the replayed gradient differed from the real one by {gap:.1e}"
            self._trusted = False
            rank_zero_warn(
                f"TangentProbe: at step {self._attach_step + self._steps} the gradient of the replayed training_step"
                f" differs from the real one by {gap:.1e} (relative; tolerance {tolerance:.0e}): something outside"
                " training_step changed the step (random draws in a hook, a hook that edits the gradients, state the"
                " module carries from batch to batch such as an RNN's hidden state, which the tangents do not"
                " follow). The"
                " tangents follow another map than the real one: results UNTRUSTED."
            )

    def _step_tangents(self, optimizer: Optimizer, pairs: list[tuple[Tensor, dict[str, Any]]],
                       hvps: tuple[Tensor, ...], grads: list[Tensor]) -> list[Tensor]:
        """The optimizer's linearised update on every block of the tangents (``hvps``: the derivative of the
        gradient the optimizer steps with, H u_θ or its clipped form; ``grads``: that gradient)."""
        n = len(pairs)
        tangents = self._tangents
        assert tangents is not None
        out: list[Optional[Tensor]] = [None] * len(tangents)
        # SGD: the parameters of a param group in one call (foreach kernels), split by whether the buffer exists yet
        batches: dict[tuple[int, bool], list[int]] = {}
        for i, ((p, group), hv) in enumerate(zip(pairs, hvps)):
            if p.grad is None:  # torch skips the parameter: its block of the map is the identity
                for block in range(i, len(tangents), n):
                    out[block] = tangents[block]
                continue
            state = optimizer.state.get(p, {})
            if isinstance(optimizer, torch.optim.SGD):
                batches.setdefault((id(group), state.get("momentum_buffer") is None), []).append(i)
            else:
                beta1, beta2 = (float(b) for b in group["betas"])
                exp_avg = state["exp_avg"] if "exp_avg" in state else torch.zeros_like(p)
                exp_avg_sq = state["exp_avg_sq"] if "exp_avg_sq" in state else torch.zeros_like(p)
                step = float(state["step"]) if "step" in state else 0.0
                out[i], out[n + i], out[2 * n + i] = adam_tangent_step(
                    tangents[i], hv, tangents[n + i], tangents[2 * n + i], p.detach(), grads[i], exp_avg, exp_avg_sq,
                    step, lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]),
                    decoupled_weight_decay=bool(group.get("decoupled_weight_decay", False)),
                    maximize=bool(group["maximize"]),
                )
        for (_, first_step), indices in batches.items():
            group = pairs[indices[0]][1]
            momentum = float(group["momentum"])
            u_theta, u_buffer = sgd_tangent_steps(
                [tangents[i] for i in indices], [hvps[i] for i in indices],
                [tangents[n + i] for i in indices] if momentum else None,
                lr=float(group["lr"]), momentum=momentum, dampening=float(group["dampening"]),
                weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]),
                maximize=bool(group["maximize"]), first_step=first_step,
            )
            for j, i in enumerate(indices):
                out[i] = u_theta[j]
                if len(tangents) > n:
                    out[n + i] = u_buffer[j] if u_buffer is not None else tangents[n + i]
        return out  # type: ignore[return-value]

    def _orthonormalize(self) -> None:
        blocks = self._tangents
        assert blocks is not None
        k = self.num_exponents
        if k == 1:  # QR of one column is its norm: R = ‖u‖ > 0, Q = u / ‖u‖; no concatenation, no LAPACK call
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(blocks, 2, dtype=torch.float64)))
            self._log_sum = self._log_sum + norm.log()
            self._steps_at_qr = self._steps
            self._tangents = list(torch._foreach_div(blocks, norm))  # in the blocks' dtype
            return
        flat = torch.cat([t.reshape(k, -1) for t in blocks], dim=1)
        q, log_r = qr_renormalize(flat.T)
        self._log_sum = self._log_sum + log_r
        self._steps_at_qr = self._steps
        self._tangents = self._split(q.T.contiguous(), [t[0] for t in blocks])

    def _measure_sharpness(self, trainer: Trainer, optimizer: Optimizer, pairs: list[tuple[Tensor, dict[str, Any]]],
                           step_hvp: Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]], grads: list[Tensor]) -> None:
        device = self._params[0].device
        dtype = self._params[0].dtype
        shapes = [p.shape for p in self._params]
        sizes = [p.numel() for p in self._params]

        def hvp(u: Tensor, scale: Optional[Tensor] = None) -> Tensor:
            u = u.to(dtype)
            if scale is not None:
                u = u * scale
            pieces = tuple(piece.reshape(1, *shape) for piece, shape in zip(torch.split(u, sizes), shapes))
            flat = torch.cat([product.reshape(-1) for product in step_hvp(pieces)])  # the step's graph: its masks
            return flat * scale if scale is not None else flat

        dimension = sum(sizes)
        generator = torch.Generator().manual_seed(_SEED + 1)
        top = hessian_top_eigenvalue(hvp, self._warm(self._eigenvector, dimension, generator, device),
                                     _SHARPNESS_ITERATIONS, _SHARPNESS_TOL)
        self._eigenvector = top.vector
        self._sharpness.append(top.value)
        self._sharpness_steps.append(trainer.global_step)
        group = optimizer.param_groups[0]
        lr = float(group["lr"])
        if isinstance(optimizer, torch.optim.SGD):
            self._thresholds.append(gd_sharpness_threshold(lr, float(group["momentum"]), float(group["dampening"]),
                                                           bool(group["nesterov"])))
            return
        self._thresholds.append(math.nan)
        # P^{-1/2} H P^{-1/2} has the eigenvalues of P^{-1} H and is symmetric
        inverse_root = []
        for (p, param_group), g in zip(pairs, grads):  # the gradient Adam steps with: clipped, when clipping
            beta1, beta2 = (float(b) for b in param_group["betas"])
            state = optimizer.state.get(p, {})
            if param_group["maximize"]:
                g = -g
            if param_group["weight_decay"] and not param_group.get("decoupled_weight_decay", False):
                g = g + float(param_group["weight_decay"]) * p.detach()
            v = (1 - beta2) * g * g
            if "exp_avg_sq" in state:
                v = v + beta2 * state["exp_avg_sq"]
            step = float(state["step"]) + 1 if "step" in state else 1.0
            preconditioner = adam_preconditioner(v, step, beta1=beta1, beta2=beta2, eps=float(param_group["eps"]))
            inverse_root.append(preconditioner.rsqrt().reshape(-1))
        scale = torch.cat(inverse_root)
        top = hessian_top_eigenvalue(lambda u: hvp(u, scale),
                                     self._warm(self._preconditioned_eigenvector, dimension, generator, device),
                                     _SHARPNESS_ITERATIONS, _SHARPNESS_TOL)
        self._preconditioned_eigenvector = top.vector
        self._preconditioned.append(top.value)
        self._preconditioned_thresholds.append(adam_sharpness_threshold(lr, float(group["betas"][0])))

    @staticmethod
    def _warm(previous: Optional[Tensor], dimension: int, generator: torch.Generator, device: torch.device) -> Tensor:
        if previous is not None and previous.numel() == dimension:
            return previous.to(device)
        return torch.randn(dimension, generator=generator, dtype=torch.float64).to(device)

    def _log(self, trainer: Trainer, step: int) -> None:
        if not trainer.loggers or self._steps_at_qr == 0:
            return
        spectrum = self.lyapunov_spectrum
        metrics = {chaos_logging.tangent_exponent_tag(i): value for i, value in enumerate(spectrum.tolist())}
        metrics[chaos_logging.TANGENT_NUM_POSITIVE] = float(self.num_positive)
        metrics[chaos_logging.TANGENT_KAPLAN_YORKE] = self.kaplan_yorke_dimension
        if self._sharpness:
            metrics[chaos_logging.SHARPNESS] = self.sharpness
            if math.isfinite(self.sharpness_threshold):
                metrics[chaos_logging.SHARPNESS_THRESHOLD] = self.sharpness_threshold
        if self._preconditioned:
            metrics[chaos_logging.PRECONDITIONED_SHARPNESS] = self.preconditioned_sharpness
            metrics[chaos_logging.PRECONDITIONED_SHARPNESS_THRESHOLD] = self.preconditioned_sharpness_threshold
        chaos_logging.log_metrics(trainer, metrics, step)

    def _summary(self) -> str:
        every = "every step" if self.orthonormalize_every == 1 else f"every {self.orthonormalize_every} steps"
        lines = [f"TangentProbe summary ({self._optimizer_name}, {self._steps} optimizer steps, {self.num_exponents}"
                 f" tangent vector(s), QR {every})", "  i    λ_i per step"]
        lines += [f"  {i:<4} {value:+.4e}" for i, value in enumerate(self.lyapunov_spectrum.tolist())]
        lines.append(f"  positive exponents: {self.num_positive} of {self.num_exponents};"
                     f" Kaplan-Yorke dimension {self.kaplan_yorke_dimension:.3g}")
        if self._sharpness:
            line = f"  sharpness {self.sharpness:.4g} (latest of {len(self._sharpness)})"
            if math.isfinite(self.sharpness_threshold):
                line += (f"; threshold {self.sharpness_threshold:.4g},"
                         f" ratio {self.sharpness / self.sharpness_threshold:.3f}")
            lines.append(line)
        if self._preconditioned:
            lines.append(f"  preconditioned sharpness {self.preconditioned_sharpness:.4g}; threshold"
                         f" (2 + 2β₁)/((1 − β₁)η) = {self.preconditioned_sharpness_threshold:.4g}")
        if not self._trusted:
            lines.append(f"  UNTRUSTED: {self._untrusted_reason}")
        return "\n".join(lines)
