"""The lockstep engine: ε-perturbed shadow copies of a LightningModule stepped exactly as the real one.

This layer knows torch and a LightningModule's ``training_step``; it knows no callback hooks. The callback tells it
what the real model saw (batch, RNG state, hyperparameters, clipping) and when the real optimizer stepped.
"""

import copy
import dataclasses
import inspect
import random
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_chaos.functional.distance import flat_norm, parameter_distance
from lightning_chaos.mirror import (
    BatchContext,
    Isolated,
    PER_SHADOW_HOOKS,
    ModuleSync,
    OptimizerSync,
    ShadowOptimizer,
    ShadowScheduler,
    all_reduce_mean,
    bind_optimizers,
    mirroring_blocker,
    run_batch,
    split_output,
)
from lightning_chaos.vectorized import NotVectorizable, StackedShadows, vectorization_blocker

DISTRIBUTIONS = ("uniform", "normal")


@dataclass(frozen=True)
class Perturbation:
    """How a shadow's initial displacement δ is drawn.

    ``uniform``: δ_i ~ U(−ε, ε) per element; ``normal``: δ_i ~ N(0, ε²) per element. With ``relative`` the whole
    vector is then rescaled so that ‖δ‖ = ε·‖θ‖ (norms over all trainable parameters, in the probe's norm).
    Parameters whose name ends in ``bias`` are left untouched unless ``perturb_biases``.
    """

    epsilon: float
    distribution: str = "uniform"
    relative: bool = True
    perturb_biases: bool = False


class RngState(NamedTuple):
    """The random streams a ``training_step`` may draw from: dropout from torch's (the CPU generator and, on CUDA, the
    device's), augmentation such as mixup often from Python's ``random`` or NumPy's global generator."""

    torch_cpu: Tensor
    cuda: Optional[Tensor]
    python: Any
    numpy: Any


def capture_rng_state(device: torch.device) -> RngState:
    """The state of every random stream a ``training_step`` on ``device`` may draw from."""
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return RngState(torch.get_rng_state(), cuda_state, random.getstate(), np.random.get_state())


def _set_rng_state(state: RngState, device: torch.device) -> None:
    """Set every stream of ``state``; a Python or NumPy field of None is left as it is."""
    torch.set_rng_state(state.torch_cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state(state.cuda, device)
    if state.python is not None:
        random.setstate(state.python)
    if state.numpy is not None:
        np.random.set_state(state.numpy)


def _same_numpy_state(a: Any, b: Any) -> bool:
    return a[2:] == b[2:] and np.array_equal(a[1], b[1])  # (name, key array, pos, has_gauss, cached_gaussian)


@contextmanager
def _preserved_rng(device: torch.device, replayed: RngState) -> Iterator[RngState]:
    """Yield what to replay of ``replayed``, and restore the caller's streams on exit.

    Python's and NumPy's streams are replayed (and restored) only when they moved since ``replayed`` was captured,
    that is, when the real step drew from them: setting NumPy's state costs about 40 µs, once per shadow and step.
    """
    saved = capture_rng_state(device)
    python_moved = saved.python != replayed.python
    numpy_moved = not _same_numpy_state(saved.numpy, replayed.numpy)
    saved = saved._replace(python=saved.python if python_moved else None, numpy=saved.numpy if numpy_moved else None)
    try:
        yield replayed._replace(python=replayed.python if python_moved else None,
                                numpy=replayed.numpy if numpy_moved else None)
    finally:
        _set_rng_state(saved, device)


@contextmanager
def replayed_rng(state: RngState, device: torch.device) -> Iterator[None]:
    """Run the body from the RNG ``state`` (the dropout masks and augmentation draws a real step made), then restore
    the caller's streams."""
    with _preserved_rng(device, state) as replay:
        _set_rng_state(replay, device)
        yield


def clone_optimizer(optimizer: Optimizer, param_map: dict[int, Tensor]) -> Optimizer:
    """A fresh optimizer of the same class over the mapped parameters, with a deep copy of the state.

    ``deepcopy(optimizer)`` would copy an attached LR scheduler's patched ``step`` (still bound to the real
    optimizer), and ``load_state_dict`` alone would alias state tensors that are already on the right device.
    """
    groups = []
    for group in optimizer.param_groups:
        new_group = {k: v for k, v in group.items() if k != "params"}
        new_group["params"] = [param_map[id(p)] for p in group["params"]]
        groups.append(new_group)
    try:
        clone = type(optimizer)(groups, **optimizer.defaults)
    except TypeError:
        clone = type(optimizer)(groups)  # type: ignore[call-arg]  # an optimizer whose defaults are not its kwargs
    clone.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return clone


def _no_log(*_: Any, **__: Any) -> None:
    """Stands in for a shadow's ``self.log``: the user's metrics must only see the real model."""


class _ShadowTrainerView(Isolated):
    """What a shadow's hooks see as ``self.trainer``: the real trainer to read (epoch, global step, strategy), its own
    copy of anything it sets (``self.trainer.should_stop = True`` on a shadow's NaN loss must not stop the real run),
    the shadow itself as ``lightning_module``, a view of the datamodule that keeps its writes too (a curriculum's
    ``self.trainer.datamodule.difficulty += 1`` in a mirrored epoch hook), and Lightning's ``DummyLogger`` for every
    logger (``self.logger.experiment.add_scalar`` must not write a shadow's values into the user's logs)."""

    def __init__(self, trainer: Any, shadow: Optional[LightningModule] = None) -> None:
        super().__init__(trainer)
        object.__setattr__(self, "loggers", [DummyLogger() for _ in trainer.loggers])
        object.__setattr__(self, "logger", self.loggers[0] if self.loggers else None)
        if shadow is not None:
            object.__setattr__(self, "lightning_module", shadow)
            object.__setattr__(self, "model", shadow)
        datamodule = getattr(trainer, "datamodule", None)
        object.__setattr__(self, "datamodule", None if datamodule is None else Isolated(datamodule))

    def stepping(self, global_step: int) -> "_Stepping":
        """Within a shadow's batch, ``self.global_step`` reads what the real model read in its batch: the real
        optimizer has stepped (and the real trainer counted it) by the time the shadows step."""
        return _Stepping(self, global_step)


class _Stepping:
    """The context of :meth:`_ShadowTrainerView.stepping` (a class: it is entered for every shadow on every step)."""

    __slots__ = ("view", "global_step")

    def __init__(self, view: _ShadowTrainerView, global_step: int) -> None:
        self.view, self.global_step = view, global_step

    def __enter__(self) -> None:
        object.__setattr__(self.view, "global_step", self.global_step)

    def __exit__(self, *exc: Any) -> None:
        object.__delattr__(self.view, "global_step")


def _stepping(member: LightningModule, global_step: int) -> AbstractContextManager:
    view = member._trainer
    return view.stepping(global_step) if isinstance(view, _ShadowTrainerView) else nullcontext()


def _uncompiled(module: nn.Module) -> None:
    """Make a deep copy run eagerly, with its own parameters.

    ``torch.compile`` leaves wrappers that a deep copy keeps bound to the *real* module: Lightning's ``from_compiled``
    sets ``forward``/``training_step``/... as instance attributes wrapping the real module's bound methods, an
    ``OptimizedModule`` (a compiled submodule) holds a ``forward`` wrapping the real ``_orig_mod``, and
    ``nn.Module.compile()`` a ``_compiled_call_impl`` of the real module. A shadow keeping them would run the real
    model on the real parameters. Running them through the compiler with the shadow as ``self`` would recompile the
    real model's code (dynamo guards on ``self``) and change how the real model rounds. So the copy drops them, and
    any other instance attribute that hides a method of its class, and runs eagerly.
    """
    for submodule in module.modules():
        attributes = submodule.__dict__
        if isinstance(submodule, torch._dynamo.eval_frame.OptimizedModule):
            attributes["forward"] = submodule._orig_mod.__call__
            attributes.pop("_forward", None)
            continue
        if attributes.get("_compiled_call_impl") is not None:
            attributes["_compiled_call_impl"] = None
        if attributes.get("_compiler_ctx"):
            attributes["_compiler_ctx"] = None
        for name in [n for n, v in attributes.items() if callable(v) and not isinstance(v, (nn.Module, Tensor))]:
            if _bound_elsewhere(attributes[name], submodule) and inspect.isfunction(getattr(type(submodule), name, None)):
                del attributes[name]


def _bound_elsewhere(value: Any, owner: nn.Module) -> bool:
    """Whether ``value`` (a method, or a wrapper around one: ``__wrapped__``, a closure, a ``partial``) is bound to
    a module other than ``owner``."""
    seen = [value, getattr(value, "__wrapped__", None), getattr(value, "func", None)]
    seen += [cell.cell_contents for cell in getattr(value, "__closure__", None) or () if _has_contents(cell)]
    return any(
        isinstance(getattr(v, "__self__", None), nn.Module) and v.__self__ is not owner for v in seen if v is not None
    )


def _has_contents(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` (a LightningModule from ``torch.compile``, or with a compiled submodule) runs compiled code."""
    return any(
        isinstance(m, torch._dynamo.eval_frame.OptimizedModule)
        or m.__dict__.get("_compiler_ctx")
        or m.__dict__.get("_compiled_call_impl") is not None
        for m in module.modules()
    )


def _carried_state_memo(module: nn.Module) -> dict[int, Tensor]:
    """Detached copies of the tensors a module carries in plain attributes with their graph (an LSTM's hidden state
    between batches), for ``copy.deepcopy``'s memo: torch cannot deep-copy a non-leaf tensor, and a module that
    carries state across batches detaches it before use (truncated backpropagation), so the value is all that
    matters."""
    memo: dict[int, Tensor] = {}
    for submodule in module.modules():
        for value in submodule.__dict__.values():
            for tensor in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(tensor, Tensor) and tensor.grad_fn is not None:
                    memo[id(tensor)] = tensor.detach().clone()
    return memo


def make_shadow_module(module: LightningModule) -> LightningModule:
    """Deep copy of ``module`` that runs its ``training_step`` and hooks without acting on the user's run.

    The copy reads the real trainer (``self.current_epoch``, ``self.trainer`` in a training_step stay meaningful)
    through a view that keeps its writes to itself and gives it dummy loggers; its ``log``/``log_dict`` do nothing;
    torchmetrics inside it are its own copies; compiled code is replaced by the eager original (:func:`_uncompiled`).
    """
    trainer = module._trainer
    shadow = copy.deepcopy(module, _carried_state_memo(module))  # LightningModule.__getstate__ drops the trainer
    _uncompiled(shadow)
    if trainer is not None:
        real = trainer._real if isinstance(trainer, _ShadowTrainerView) else trainer
        shadow._trainer = _ShadowTrainerView(real, shadow)  # type: ignore[assignment]  # stands in for the Trainer
    shadow.log = _no_log  # type: ignore[method-assign]
    shadow.log_dict = _no_log  # type: ignore[method-assign]
    return shadow


def _is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "bias"


class ShadowEnsemble:
    """K ε-perturbed copies of a LightningModule and its optimizer, stepped in lockstep with the real pair.

    Distances are kept on the device as tensors; nothing here synchronises with the host.

    Two ways to step them. The probe's :meth:`run_batch` mirrors the real run (:mod:`lightning_chaos.mirror`): each
    shadow goes through the module's own hooks, its ``optimizer_step`` and closure, with its own optimizer, and takes
    from the real model only what was done to it from outside (flags, modes, param groups, scheduled
    hyperparameters). The finder's :meth:`forward_backward` and :meth:`optimizer_step` step copies at fixed
    hyperparameters of its own choosing.

    Args:
        module: the real LightningModule (already on its device, in its training precision).
        optimizer: the real optimizer (its state is copied, never shared).
        num_shadows: K.
        perturbation: how δ is drawn.
        norm: ``"l2"`` or ``"l1"`` for all distances.
        generator: a CPU generator for δ; drawing on the CPU makes δ identical on every device and rank.
        shadow_states: saved :meth:`state_dicts` to restore instead of perturbing (resume from a checkpoint).
        grad_scaler: the real training's GradScaler (``16-mixed``): every shadow gets its own copy, scaled, unscaled,
            stepped and updated as Lightning does for the real optimizer, so a shadow skips exactly the steps with
            non-finite gradients that its own scaler finds.
        vectorize: run the K shadows' training steps as one ``torch.func.vmap`` over stacked parameters
            (:mod:`lightning_chaos.vectorized`) when the module allows. When it does not, known before the first step
            (:func:`~lightning_chaos.vectorized.vectorization_blocker`, :func:`mirroring_blocker`) or when a
            vectorised step raises, the shadows run one at a time from then on and the reason is said once at info
            level (:attr:`sequential_reason`). Both paths agree to float tolerance, not bit for bit: a batched kernel
            may sum in another order.
        twin: add an unperturbed copy (δ = 0), stepped like the shadows but not measured as one: the sentinel
            (:meth:`twin_drift`) that checks the mirroring on the user's own model. :meth:`drop_twin` frees it.
    """

    def __init__(
        self,
        module: LightningModule,
        optimizer: Optimizer,
        num_shadows: int,
        perturbation: Perturbation,
        norm: str = "l2",
        generator: Optional[torch.Generator] = None,
        shadow_states: Optional[Sequence[dict[str, Any]]] = None,
        grad_scaler: Optional["torch.amp.GradScaler"] = None,
        vectorize: bool = False,
        twin: bool = False,
    ) -> None:
        self.norm = norm
        self.perturbation = perturbation
        self.real_module = module
        self.real_optimizer = optimizer
        self.num_shadows = num_shadows
        self.compiled = is_compiled(module)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters to probe")
        names = [n for n, _ in named]
        self.names = names
        self.real_params = [p for _, p in named]
        self.members: list[LightningModule] = [make_shadow_module(module) for _ in range(num_shadows + int(twin))]
        self.has_twin = twin
        if shadow_states is not None:
            for shadow, state in zip(self.members, shadow_states):
                shadow.load_state_dict(state["module"])
        self.member_optimizers: list[Optimizer] = []
        self.member_params: list[list[Tensor]] = []
        self.member_scalers: list[Optional[torch.amp.GradScaler]] = []
        self.param_maps: list[dict[int, Tensor]] = []
        self.facades: list[ShadowOptimizer] = []
        for k, shadow in enumerate(self.members):
            self._wire(shadow, module, optimizer, grad_scaler,
                       shadow_states[k] if shadow_states is not None and k < len(shadow_states) else None)
        self.following = False  # the real optimizer's outside changes (the probe's shadows; not the finder's copies)
        self.module_sync = ModuleSync(module)
        self.optimizer_sync = OptimizerSync(optimizer)
        self.stacked: Optional[StackedShadows] = None
        self.sequential_reason: Optional[str] = None
        if vectorize:
            self.sequential_reason = vectorization_blocker(module, self.real_params[0].device) or mirroring_blocker(
                module, optimizer
            )
            if self.sequential_reason is None:
                self.stacked = StackedShadows(self.members, names)
            else:
                rank_zero_info(f"ChaosProbe: running the shadows one at a time: {self.sequential_reason}.")
        if shadow_states is None:
            self._perturb(names, generator)
        # Benettin bookkeeping: d(0), the distance right after the last pull-back, and Σ ln(d / d_prev).
        self.initial_distance = self.distances()
        self.last_twin_drift: Optional[Tensor] = None
        self.last_losses: list[Optional[Tensor]] = [None] * len(self.members)  # the closure losses of the last batch
        self.previous_distance = self.initial_distance.clone()
        self.log_growth_sum = torch.zeros_like(self.initial_distance)

    def _wire(self, shadow: LightningModule, module: LightningModule, optimizer: Optimizer,
              grad_scaler: Optional["torch.amp.GradScaler"], state: Optional[dict[str, Any]]) -> None:
        """Give a new member its own optimizer (a clone of the real one, or ``state``), scaler and hooks' view."""
        shadow_named = dict(shadow.named_parameters())
        param_map: dict[int, Tensor] = {id(p): shadow_named[n] for n, p in module.named_parameters()}
        shadow_optimizer = clone_optimizer(optimizer, param_map)
        scaler = copy.deepcopy(grad_scaler) if grad_scaler is not None else None
        if state is not None:
            shadow_optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
        self.member_scalers.append(scaler)
        self.member_optimizers.append(shadow_optimizer)
        self.member_params.append([shadow_named[n] for n in self.names])
        self.param_maps.append(param_map)
        facade = ShadowOptimizer(shadow_optimizer, shadow, scaler)
        self.facades.append(facade)
        if isinstance(shadow._trainer, _ShadowTrainerView):
            view = shadow._trainer
            object.__setattr__(view, "optimizers", [shadow_optimizer])
            object.__setattr__(view, "lr_scheduler_configs", [
                dataclasses.replace(config, scheduler=ShadowScheduler(config.scheduler))
                for config in getattr(view._real, "lr_scheduler_configs", [])
            ])
        bind_optimizers(shadow, facade)

    def add_twin(self, module: LightningModule, optimizer: Optimizer,
                 grad_scaler: Optional["torch.amp.GradScaler"] = None) -> None:
        """A new unperturbed twin, cloned from the real model and optimizer as they are now (the sentinel's second
        window), stepped from the next batch like the shadows."""
        if self.has_twin:
            return
        twin = make_shadow_module(module)
        self.members.append(twin)
        self._wire(twin, module, optimizer, grad_scaler, None)
        self.last_losses.append(None)
        if self.following:
            self.facades[-1].sync = self.optimizer_sync
            self.optimizer_sync.register(self.member_optimizers[-1])
        self.has_twin = True
        if self.stacked is not None:
            self.stacked = StackedShadows(self.members, self.names)

    @property
    def shadows(self) -> list[LightningModule]:
        """The K measured shadows (the twin, if any, is not one)."""
        return self.members[: self.num_shadows]

    @property
    def optimizers(self) -> list[Optimizer]:
        return self.member_optimizers[: self.num_shadows]

    @property
    def shadow_params(self) -> list[list[Tensor]]:
        return self.member_params[: self.num_shadows]

    @property
    def scalers(self) -> list[Optional["torch.amp.GradScaler"]]:
        return self.member_scalers[: self.num_shadows]

    # -- set-up -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _perturb(self, names: list[str], generator: Optional[torch.Generator]) -> None:
        spec = self.perturbation
        if spec.epsilon == 0:
            return
        mask = [spec.perturb_biases or not _is_bias(n) for n in names]
        if not any(mask):
            raise ValueError("`perturb_biases=False` leaves no parameter to perturb: the model has only biases")
        reference_norm = flat_norm(self.real_params, self.norm) if spec.relative else None
        if reference_norm is not None and not reference_norm > 0:
            raise ValueError(
                f"`relative=True` scales δ by ‖θ‖, but ‖θ‖ = {reference_norm.item()} (all-zero or non-finite"
                " parameters): use `relative=False` for an absolute epsilon"
            )
        for params in self.shadow_params:
            deltas = []
            for p, perturbed in zip(params, mask):
                if not perturbed:
                    deltas.append(torch.zeros(p.shape, dtype=torch.float64))
                elif spec.distribution == "uniform":
                    deltas.append((torch.rand(p.shape, generator=generator, dtype=torch.float64) * 2 - 1) * spec.epsilon)
                else:
                    deltas.append(torch.randn(p.shape, generator=generator, dtype=torch.float64) * spec.epsilon)
            if reference_norm is not None:
                scale = spec.epsilon * reference_norm.double().cpu() / flat_norm(deltas, self.norm)
                torch._foreach_mul_(deltas, scale.item())
            for p, delta in zip(params, deltas):
                p.add_(delta.to(device=p.device, dtype=p.dtype))

    # -- the mirrored step (the probe) ----------------------------------------------------------------------------

    def follow_real_optimizer(self) -> None:
        """Follow what is done to the real optimizer from outside (:class:`~lightning_chaos.mirror.OptimizerSync`):
        the probe's shadows do; the finder's copies train at settings of their own."""
        self.optimizer_sync.track()
        self.following = True
        for optimizer, facade in zip(self.member_optimizers, self.facades):
            facade.sync = self.optimizer_sync
            self.optimizer_sync.register(optimizer)

    def capture_outside(self) -> None:
        """At the start of a real batch: record the real module's flags (:class:`~lightning_chaos.mirror.ModuleSync`),
        and give every member the param groups added to the real optimizer and the hyperparameters set on it since."""
        self.module_sync.capture()
        for optimizer, param_map in zip(self.member_optimizers, self.param_maps):
            self.optimizer_sync.add_new_groups(optimizer, param_map)
        self.optimizer_sync.sync(self.member_optimizers)
        self.optimizer_sync.during = None

    def sync_outside(self) -> None:
        """A sync point between batches (the epoch hooks): hyperparameters set on the real optimizer since the last."""
        self.optimizer_sync.sync(self.member_optimizers)

    def sync_optimizer_modes(self) -> None:
        """Switch every member's optimizer mode (schedule-free ``train()``/``eval()``) the way the real one is now."""
        for optimizer in self.member_optimizers:
            self.optimizer_sync.sync_mode(optimizer)

    def epoch_hook(self, hook: str, rng_state: RngState, device: torch.device, alive: Optional[list[bool]]) -> None:
        """The module's ``hook`` (an epoch hook) on every live member, each from the RNG state the real hook sees."""
        members = [m for k, m in enumerate(self.members) if self._alive(alive, k)]
        with _preserved_rng(device, rng_state) as replay:
            for member in members:
                _set_rng_state(replay, device)
                getattr(member, hook)()

    def skipped_batch(self, batch: Any, batch_idx: int, rng_state: RngState, device: torch.device,
                      alive: Optional[list[bool]]) -> None:
        """The real module's ``on_train_batch_start`` returned -1, which ends Lightning's epoch before the batch: each
        member's runs too (its side effects are the member's), and nothing else of the batch."""
        if "on_train_batch_start" not in self.facades[0].hooks:
            return
        with _preserved_rng(device, rng_state) as replay:
            for k, member in enumerate(self.members):
                if self._alive(alive, k):
                    _set_rng_state(replay, device)
                    member.on_train_batch_start(batch, batch_idx)

    def run_batch(
        self,
        batch: Any,
        context: BatchContext,
        rng_state: RngState,
        device: torch.device,
        alive: Optional[list[bool]] = None,
        follow_outside: bool = True,
    ) -> Optional[Tensor]:
        """Every live member's training batch, as the real model's went (:func:`~lightning_chaos.mirror.run_batch`).

        Args:
            follow_outside: copy the real module's flags and the real optimizer's mode onto the members first. The
                finder's copies train at settings of their own and leave it off.

        Returns:
            The distances ``[K]`` after the step (measured before ``on_train_batch_end``, where the real model is
            measured too), or None when the real optimizer did not step.
        """
        if follow_outside:
            trainable_changed = False
            for member in self.members:
                trainable_changed |= self.module_sync.apply(member)
            if trainable_changed:
                self._refresh_trainable()
            self.sync_optimizer_modes()
        if self.vectorized:
            try:
                return self._run_batch_stacked(batch, context, rng_state, device, alive)
            except NotVectorizable as error:
                self._stop_vectorizing(f"a vectorised step failed ({error})")
        return self._run_batch_sequential(batch, context, rng_state, device, alive)

    def _alive(self, alive: Optional[list[bool]], k: int) -> bool:
        return alive is None or k >= len(alive) or alive[k]

    def _run_batch_sequential(
        self, batch: Any, context: BatchContext, rng_state: RngState, device: torch.device,
        alive: Optional[list[bool]],
    ) -> Optional[Tensor]:
        distances: list[Tensor] = []
        after = self._changes_since_the_batch_began()
        with _preserved_rng(device, rng_state) as replay:
            for k, member in enumerate(self.members):
                outputs = None
                if self._alive(alive, k):
                    _set_rng_state(replay, device)
                    with _stepping(member, context.global_step):
                        outputs = run_batch(member, self.facades[k], batch, context, self.member_scalers[k])
                self.last_losses[k] = None if outputs is None else outputs.get("loss")
                self._measure(k, distances, context)
                self._give(k, after)
                if outputs is not None:
                    member.on_train_batch_end(outputs, batch, context.batch_idx)
        self._renew_record(after)
        return torch.stack(distances) if context.optimizer_steps else None

    def _changes_since_the_batch_began(self) -> Optional[list[dict[str, Any]]]:
        """What was set on the real optimizer after its step (a scheduler steps before ``on_train_batch_end``), to
        give each member after its own step, so that its ``on_train_batch_end`` reads what the real one reads."""
        return self.optimizer_sync.changes() if self.following else None

    def _give(self, k: int, changes: Optional[list[dict[str, Any]]]) -> None:
        if changes is not None:
            self.optimizer_sync.apply(self.member_optimizers[k], changes)

    def _renew_record(self, changes: Optional[list[dict[str, Any]]]) -> None:
        if changes is not None:
            self.optimizer_sync.rebase()  # the members have them: the real optimizer's record moves on

    def _measure(self, k: int, distances: list[Tensor], context: BatchContext) -> None:
        """Member k's separation after its step and before its ``on_train_batch_end``: where the real model stands
        when the probe's ``on_train_batch_end`` runs, before the module's own."""
        if not context.optimizer_steps:
            return
        if k < self.num_shadows:
            distances.append(self._distance(k))
        else:
            self.last_twin_drift = self.twin_drift()

    def _run_batch_stacked(
        self, batch: Any, context: BatchContext, rng_state: RngState, device: torch.device,
        alive: Optional[list[bool]],
    ) -> Optional[Tensor]:
        assert self.stacked is not None  # typing: called while vectorized
        with replayed_rng(rng_state, device), _stepping(self.members[0], context.global_step):
            # under randomness="same" each member draws the real masks
            losses, grads = self.stacked.forward_backward(
                batch, context.batch_idx, context.step_context, context.accumulate_grad_batches,
                self._loss_scales(device),
            )
            hooks = self.facades[0].hooks.intersection(PER_SHADOW_HOOKS)
            after = capture_rng_state(device) if hooks else None
        first = context.batch_idx % context.accumulate_grad_batches == 0
        self.take_gradients(grads, range(len(self.members)), first, alive)
        if context.optimizer_steps and context.world_size > 1:
            self.all_reduce_gradients(context.world_size, alive)
        losses = losses / context.accumulate_grad_batches
        distances: list[Tensor] = []
        changes = self._changes_since_the_batch_began()
        with _preserved_rng(device, after) if hooks else nullcontext() as replay:  # type: ignore[arg-type]
            for k, member in enumerate(self.members):
                live = self._alive(alive, k)
                if live and hooks:
                    _set_rng_state(replay, device)  # type: ignore[arg-type]  # the state captured after the batch
                if live:
                    facade = self.facades[k]
                    facade.context = context
                    with _stepping(member, context.global_step):
                        if "on_after_backward" in hooks:
                            member.on_after_backward()
                        if context.optimizer_steps and "optimizer_step" in hooks:
                            # the facade stands in for the Optimizer
                            member.optimizer_step(
                                context.epoch, context.batch_idx, facade, lambda k=k: losses[k]  # type: ignore[arg-type, misc]
                            )
                        elif context.optimizer_steps:
                            facade.step(closure=lambda k=k: losses[k])  # type: ignore[misc]
                self._measure(k, distances, context)
                self._give(k, changes)
                if live and "on_train_batch_end" in hooks:
                    member.on_train_batch_end({"loss": losses[k]}, batch, context.batch_idx)
        self._renew_record(changes)
        return torch.stack(distances) if context.optimizer_steps else None

    def _stop_vectorizing(self, reason: str) -> None:
        self.stacked = None
        self.sequential_reason = reason
        rank_zero_info(f"ChaosProbe: running the shadows one at a time from now on: {reason}.")

    def _refresh_trainable(self) -> None:
        """The real model's set of trainable parameters changed (a finetuning callback unfroze layers): measure over
        the new set, and restack the batched path over it."""
        named = [(n, p) for n, p in self.real_module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.real_params = [p for _, p in named]
        self.member_params = [[dict(m.named_parameters())[n] for n in self.names] for m in self.members]
        if self.stacked is not None:
            self.stacked = StackedShadows(self.members, self.names)

    @torch.no_grad()
    def _distance(self, k: int) -> Tensor:
        return parameter_distance(self.real_params, self.member_params[k], self.norm)

    @torch.no_grad()
    def twin_drift(self) -> Optional[Tensor]:
        """‖θ_twin − θ‖ / ‖θ‖ over the trainable parameters, and the floating buffers (0-dim tensor on the device), or
        None without a twin. Exactly 0 while the mirroring holds on the one-at-a-time path."""
        if not self.has_twin:
            return None
        twin = self.members[-1]
        real_buffers = [b for b in self.real_module.buffers() if b.is_floating_point()]
        twin_buffers = [b for b in twin.buffers() if b.is_floating_point()]
        drift = parameter_distance(self.real_params + real_buffers, self.member_params[-1] + twin_buffers, self.norm)
        return drift / self.reference_norm().to(drift).clamp_min(torch.finfo(drift.dtype).tiny)

    def drop_twin(self) -> None:
        """Free the twin after the sentinel's window (restacking the batched path without it)."""
        if not self.has_twin:
            return
        self.has_twin = False
        for members in (self.members, self.member_optimizers, self.member_params, self.member_scalers, self.param_maps,
                        self.facades, self.last_losses):
            del members[-1]
        if self.stacked is not None:
            self.stacked = StackedShadows(self.members, self.names)

    # -- the lockstep step ----------------------------------------------------------------------------------------

    def forward_backward(
        self,
        batch: Any,
        batch_idx: int,
        rng_state: RngState,
        device: torch.device,
        accumulate_grad_batches: int,
        step_context: Callable[[], AbstractContextManager] = nullcontext,
        alive: Optional[list[bool]] = None,
    ) -> list[Optional[Tensor]]:
        """Each shadow's training_step and backward on ``batch`` with the RNG the real training_step saw.

        Mirrors Lightning's automatic optimisation: gradients are zeroed on the first micro-batch of an accumulation
        window, and the loss is divided by ``accumulate_grad_batches`` before backward.

        Returns:
            Each shadow's detached training loss (None for a retired shadow or a skipped step), on the device.
        """
        zero_grad = batch_idx % accumulate_grad_batches == 0
        if self.stacked is not None:  # self.vectorized
            try:
                with replayed_rng(rng_state, device):  # under randomness="same" each shadow draws the real masks
                    stacked_losses, grads = self.stacked.forward_backward(
                        batch, batch_idx, step_context, accumulate_grad_batches, self._loss_scales(device)
                    )
            except NotVectorizable as error:
                self._stop_vectorizing(f"a vectorised step failed ({error})")
            else:
                self.take_gradients(grads, range(len(self.shadows)), zero_grad, alive)
                return [loss if alive is None or alive[k] else None for k, loss in enumerate(stacked_losses.unbind())]
        losses: list[Optional[Tensor]] = []
        with _preserved_rng(device, rng_state) as replay:
            for k, shadow in enumerate(self.shadows):
                loss = None
                if alive is None or alive[k]:
                    _set_rng_state(replay, device)  # the dropout masks and draws the real training_step made
                    with step_context():
                        loss, _ = split_output(shadow.training_step(batch, batch_idx))
                    if zero_grad:
                        self.optimizers[k].zero_grad(set_to_none=True)
                    if loss is not None:
                        scaled = loss / accumulate_grad_batches if accumulate_grad_batches > 1 else loss
                        scaler = self.scalers[k]
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                        loss = loss.detach()
                losses.append(loss)
        return losses

    @property
    def vectorized(self) -> bool:
        """Whether the next step runs all shadows in one ``vmap``."""
        return self.stacked is not None

    def _loss_scales(self, device: torch.device) -> Optional[Tensor]:
        """Each shadow's GradScaler scale as one tensor [K] (16-mixed), or None."""
        if all(scaler is None for scaler in self.member_scalers):
            return None
        one = torch.ones((), device=device)
        return torch.stack([scaler.scale(one) for scaler in self.member_scalers])  # type: ignore[union-attr]

    def take_gradients(
        self, grads: Sequence[Optional[Tensor]], rows: Sequence[int], zero_grad: bool, alive: Optional[list[bool]] = None
    ) -> None:
        """Give shadow k the gradients in row ``rows[k]`` of batched ``grads`` (one ``[N, ...]`` tensor or None per
        trainable parameter), zeroing first at the start of an accumulation window, adding otherwise.

        The shadows' ``.grad`` become views of the batched gradients: the optimizers, clipping and scalers act on them.
        """
        for k, (params, row) in enumerate(zip(self.member_params, rows)):
            if zero_grad:  # a retired shadow too: its .grad must not keep a whole batched gradient alive
                self.member_optimizers[k].zero_grad(set_to_none=True)
            if not self._alive(alive, k):
                continue
            for p, grad in zip(params, grads):
                if grad is None:
                    continue
                if p.grad is None:
                    p.grad = grad[row]
                else:
                    p.grad.add_(grad[row])

    def gradient_clipper(
        self, clip_val: Optional[float], algorithm: Optional[str]
    ) -> Optional[Callable[[Optimizer], None]]:
        """Clipping for a shadow's optimizer through its module's ``configure_gradient_clipping``, as Lightning clips
        the real one (so a user override applies to the shadows too); None when the Trainer does not clip."""
        if not clip_val:
            return None

        def clip(optimizer: Optimizer) -> None:
            shadow = self.shadows[self.optimizers.index(optimizer)]
            shadow.configure_gradient_clipping(
                optimizer, gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm
            )

        return clip

    def all_reduce_gradients(self, world_size: int, alive: Optional[list[bool]] = None) -> None:
        """Average every live member's gradients across processes, as DDP does for the real model's, in one
        all-reduce (:func:`~lightning_chaos.mirror.all_reduce_mean`). With gradient accumulation this runs once, at the
        step, on the accumulated sums (DDP itself only synchronises on the last micro-batch)."""
        all_reduce_mean(
            [p.grad for k, params in enumerate(self.member_params) if self._alive(alive, k) for p in params
             if p.grad is not None],
            world_size,
        )

    def optimizer_step(
        self,
        hyperparameters: Optional[list[dict[str, Any]]],
        clip_gradients: Optional[Callable[[Optimizer], None]] = None,
        alive: Optional[list[bool]] = None,
    ) -> None:
        """Step every shadow optimizer, after clipping; with ``hyperparameters`` (per param group) set first."""
        for k, optimizer in enumerate(self.optimizers):
            if alive is not None and not alive[k]:
                continue
            for group, values in zip(optimizer.param_groups, hyperparameters or ()):
                group.update(values)
            scaler = self.scalers[k]
            if scaler is not None:
                scaler.unscale_(optimizer)
            if clip_gradients is not None:
                clip_gradients(optimizer)
            if scaler is not None:
                scaler.step(optimizer)  # skipped when this shadow's gradients are not finite
                scaler.update()
            else:
                optimizer.step()

    # -- measurement and renormalisation ----------------------------------------------------------------------------

    @torch.no_grad()
    def distances(self) -> Tensor:
        """d_k = ‖θ − θ̃_k‖ for every shadow, as one tensor [K] on the device."""
        return torch.stack([parameter_distance(self.real_params, params, self.norm) for params in self.shadow_params])

    @torch.no_grad()
    def reference_norm(self) -> Tensor:
        """‖θ‖ of the real model's trainable parameters."""
        return flat_norm(self.real_params, self.norm)

    def pull_back(self, distances: Tensor) -> None:
        """One Benettin renormalisation: add ln(d / d_prev) to the sum and pull every shadow back to d0.

        d0 is ε·‖θ(t)‖ now for a relative perturbation (an absolute d0 becomes unrepresentable once θ grows or
        shrinks by orders of magnitude), else d(0).
        """
        if self.perturbation.relative:
            target = self.perturbation.epsilon * self.reference_norm().to(distances.dtype).expand_as(distances)
        else:
            target = self.initial_distance
        self.log_growth_sum = self.log_growth_sum + torch.log(distances / self.previous_distance)
        self.renormalize(distances, target)
        self.previous_distance = target.clone()

    def log_growth(self, distances: Tensor, renormalized: bool, pulled_back: bool = False) -> Tensor:
        """Total ln-growth of each separation since attach, given the latest measured ``distances``.

        Free evolution: ln(d(t) / d(0)). Renormalised: Σ ln(d / d_prev) + ln(d(t) / d_prev), where the second term is
        already in the sum when ``distances`` were measured right before a pull-back (``pulled_back``).
        """
        if not renormalized:
            return torch.log(distances / self.initial_distance.to(distances))
        total = self.log_growth_sum.to(distances)
        return total if pulled_back else total + torch.log(distances / self.previous_distance.to(distances))

    def measurement_state(self) -> dict[str, Tensor]:
        return {
            "initial_distance": self.initial_distance.detach().cpu(),
            "previous_distance": self.previous_distance.detach().cpu(),
            "log_growth_sum": self.log_growth_sum.detach().cpu(),
        }

    def load_measurement_state(self, state: dict[str, Tensor]) -> None:
        device = self.initial_distance.device
        self.initial_distance = state["initial_distance"].to(device)
        self.previous_distance = state["previous_distance"].to(device)
        self.log_growth_sum = state["log_growth_sum"].to(device)

    @torch.no_grad()
    def renormalize(self, distances: Tensor, target: Tensor) -> None:
        """Pull every shadow back along its separation to distance ``target``: θ̃ ← θ + (θ̃ − θ)·target/d.

        Optimizer state that lives per parameter (momentum buffers, Adam moments) is part of the dynamical system and
        is scaled the same way around the real optimizer's state. A zero or non-finite distance is left alone.
        """
        scales = torch.where(torch.isfinite(distances) & (distances > 0), target / distances, torch.ones_like(distances))
        for k, params in enumerate(self.shadow_params):
            scale = scales[k]
            diff = torch._foreach_sub(params, self.real_params)  # type: ignore[arg-type]
            torch._foreach_mul_(diff, scale)
            torch._foreach_add_(diff, self.real_params)  # type: ignore[arg-type]
            torch._foreach_copy_(params, diff)
            self._scale_optimizer_state(self.optimizers[k], params, scale)

    def _scale_optimizer_state(self, optimizer: Optimizer, params: list[Tensor], scale: Tensor) -> None:
        real_state = self.real_optimizer.state
        for real_p, shadow_p in zip(self.real_params, params):
            shadow_buffers = optimizer.state.get(shadow_p)
            real_buffers = real_state.get(real_p)
            if not shadow_buffers or not real_buffers:
                continue
            for key, value in shadow_buffers.items():
                reference = real_buffers.get(key)
                if (
                    key == "step"
                    or value is reference  # one tensor shared with the reference (a StackedOptimizer's mu_product)
                    or not isinstance(value, Tensor)
                    or not isinstance(reference, Tensor)
                    or not value.is_floating_point()
                    or value.shape != shadow_p.shape
                ):
                    continue
                value.sub_(reference).mul_(scale).add_(reference)

    def release(self) -> None:
        """Free the shadows (modules, parameters, gradients, optimizer state); the measurement state stays."""
        self.members, self.member_optimizers, self.member_params, self.member_scalers = [], [], [], []
        self.param_maps, self.facades = [], []
        self.has_twin = False
        self.stacked = None
        self.optimizer_sync.remove()

    # -- checkpointing ----------------------------------------------------------------------------------------------

    def state_dicts(self) -> list[dict[str, Any]]:
        """Each shadow's module and optimizer state, for the callback's checkpoint."""
        return [
            {
                "module": shadow.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
            }
            for shadow, optimizer, scaler in zip(self.shadows, self.optimizers, self.scalers)
        ]
