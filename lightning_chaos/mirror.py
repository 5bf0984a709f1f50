"""Mirroring: what the real run does to itself, done by every shadow to itself.

A shadow is an independent training from θ + δ only if it goes through everything the real model goes through. Two
kinds of things happen to the real model, and each has one mechanism here:

* **What the module does to itself** — its ``training_step`` and the hooks of Lightning's automatic optimisation
  (``on_train_batch_start``, ``on_before_zero_grad``, ``optimizer_zero_grad``, ``on_before_backward``, ``backward``,
  ``on_after_backward``, ``on_before_optimizer_step``, ``configure_gradient_clipping``, ``optimizer_step`` with its
  closure, ``on_train_batch_end``, the epoch hooks). :func:`run_batch` runs them in Lightning's order with the shadow as
  ``self`` and a :class:`ShadowOptimizer` as its optimizer, so a gradient mask, a weight constraint, a hidden-state
  reset, a warm-up in ``optimizer_step`` or a closure optimizer (LBFGS) acts on the shadow's own state.
* **What others do to it from outside** — callbacks, LR schedulers and the Trainer: ``requires_grad`` flags and
  train/eval modes (:class:`ModuleSync`), param groups added and hyperparameters changed between two optimizer
  steps, and an optimizer's own train/eval mode (:class:`OptimizerSync`). These are copied from the real model and
  optimizer; what an optimizer changes *inside* its own ``step`` (Prodigy's or D-Adaptation's adaptive step size in
  the param groups) is left to each shadow's optimizer, so each shadow adapts from its own trajectory.

What neither covers (a callback that writes the real weights, say) is caught by the probe's sentinel, an ε = 0 twin
checked against the real model during the first steps and across the first epoch boundary (the probe).

This layer knows torch and a LightningModule's hooks; it knows nothing of callbacks or measurement.
"""

import copy
import inspect
import weakref
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.optim import Optimizer

# Hooks that run inside the forward and backward of a batch: the batched (vmap) path cannot run them per shadow; nor
# on_train_batch_end, which receives everything training_step returned, where the vmap keeps the loss only.
BATCHED_PATH_BLOCKERS = ("on_train_batch_start", "on_before_zero_grad", "optimizer_zero_grad", "on_before_backward",
                         "backward", "on_train_batch_end")
# The module hooks the Trainer calls during a training batch or epoch, mirrored on every shadow.
TRAINING_HOOKS = (*BATCHED_PATH_BLOCKERS, "training_step", "on_after_backward", "on_before_optimizer_step",
                  "configure_gradient_clipping", "optimizer_step", "on_train_epoch_start", "on_train_epoch_end",
                  "lr_scheduler_step")
# Group keys that are not hyperparameters to replay: the parameters, and a mode that has its own protocol.
_NOT_REPLAYED = ("params", "train_mode")


def run_after_other_callbacks(callbacks: Sequence[Any]) -> list[Any]:
    """A Trainer's ``callbacks`` reordered into a new list: the observers (callbacks whose class sets
    ``observes_training``: ChaosProbe, TangentProbe) after every other callback, checkpointing excepted, which Lightning
    keeps last.

    An observer's hooks then see what the others did to the real training in the same hook (a warm-up callback's LR
    in ``on_before_optimizer_step``, random draws in ``on_train_batch_start``); only the module's own hooks come after.
    The others keep their order, and so do the observers among themselves: each observer calls this in ``setup`` and
    the result is the same whichever calls it, however often. A new list, assigned to ``trainer.callbacks``, as
    Lightning reorders: ``setup`` is being called over the old one, which must not change under that loop (a callback
    moved ahead of it would never be set up).
    """
    from lightning.pytorch.callbacks import Checkpoint

    def observes(callback: Any) -> bool:
        return bool(getattr(type(callback), "observes_training", False))

    checkpoints = [c for c in callbacks if isinstance(c, Checkpoint) and not observes(c)]
    others = [c for c in callbacks if not observes(c) and not isinstance(c, Checkpoint)]
    return others + [c for c in callbacks if observes(c)] + checkpoints


def overridden_hooks(module: LightningModule, hooks: Sequence[str] = TRAINING_HOOKS) -> list[str]:
    """The hooks among ``hooks`` that ``module``'s class defines itself (not LightningModule's defaults)."""
    return [name for name in hooks if getattr(type(module), name, None) is not getattr(LightningModule, name, None)]


@dataclass
class BatchContext:
    """What Lightning knew about the real batch that a shadow's batch must repeat.

    Args:
        batch_idx: the batch's index in the epoch (decides zero_grad under accumulation).
        global_step: ``trainer.global_step`` during the real batch (the real step has been counted since).
        epoch: ``trainer.current_epoch``, passed to ``optimizer_step`` and ``optimizer_zero_grad``.
        accumulate_grad_batches: the loss is divided by it before backward, as Lightning divides (even by 1).
        optimizer_steps: the real optimizer stepped on this batch (last micro-batch of an accumulation window).
        step_context: the precision plugin's ``train_step_context``.
        clip_val, clip_algorithm: the Trainer's gradient clipping arguments.
        world_size: processes; above 1 (DDP) a shadow's gradients are averaged across them after each backward of
            a stepping batch, as DDP averages the real model's.
    """

    batch_idx: int
    epoch: int
    global_step: int
    accumulate_grad_batches: int
    optimizer_steps: bool
    step_context: Callable[[], AbstractContextManager] = None  # type: ignore[assignment]
    clip_val: Optional[float] = None
    clip_algorithm: Optional[str] = None
    world_size: int = 1


class ShadowOptimizer:
    """What a shadow's hooks receive as the optimizer of ``optimizer_step`` and from ``self.optimizers()``: Lightning's
    ``LightningOptimizer`` for a shadow.

    ``step(closure)`` does what Lightning's precision plugin does around the real optimizer's step — the closure, then
    (16-mixed) unscaling, then the shadow's ``on_before_optimizer_step`` and gradient clipping, then the step (through
    the shadow's own GradScaler, which skips steps with non-finite gradients). It is an instance of the wrapped
    optimizer's class, as Lightning's wrapper is, and passes every other attribute through.
    """

    def __init__(self, optimizer: Optimizer, module: LightningModule, scaler: Optional["torch.amp.GradScaler"]) -> None:
        self._optimizer = optimizer
        self._module = module
        self._scaler = scaler
        self.context: Optional[BatchContext] = None
        self.sync: Optional["OptimizerSync"] = None  # the probe's: what the real optimizer got from outside
        # the hooks the module defines itself; LightningModule's defaults are no-ops or inlined below, saving their
        # calls on every step of every shadow
        self.hooks = frozenset(overridden_hooks(module, TRAINING_HOOKS))
        self.__class__ = type("Shadow" + type(optimizer).__name__, (ShadowOptimizer, type(optimizer)), {})

    def __getattr__(self, name: str) -> Any:  # only for what the wrapper does not define itself
        if name.startswith("__") or "_optimizer" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["_optimizer"], name)

    @property
    def optimizer(self) -> Optimizer:
        return self._optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._optimizer.param_groups

    @property
    def state(self) -> Any:
        return self._optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def _after_closure(self) -> None:
        module, context, hooks = self._module, self.context, self.hooks
        if "on_before_optimizer_step" in hooks:
            module.on_before_optimizer_step(self._optimizer)
        if context is None:
            return
        if "configure_gradient_clipping" in hooks:
            module.configure_gradient_clipping(
                self._optimizer, gradient_clip_val=context.clip_val, gradient_clip_algorithm=context.clip_algorithm
            )
        elif context.clip_val:  # LightningModule.configure_gradient_clipping's own body
            module.clip_gradients(
                self._optimizer, gradient_clip_val=context.clip_val, gradient_clip_algorithm=context.clip_algorithm
            )

    def step(self, closure: Optional[Callable[[], Any]] = None, **kwargs: Any) -> Any:
        closure = closure if closure is not None else (lambda: None)
        sync = self.sync
        if self._scaler is None:
            def wrapped() -> Any:
                result = closure()
                self._after_closure()
                return result

            if sync is not None:
                sync.apply(self._optimizer, sync.during)  # what the real optimizer got just before its step
            return self._optimizer.step(closure=wrapped, **kwargs)
        result = closure()
        if result is not None and not _optimizer_handles_unscaling(self._optimizer):  # as Lightning's MixedPrecision
            self._scaler.unscale_(self._optimizer)
        self._after_closure()
        if result is None:
            return result
        if sync is not None:
            sync.apply(self._optimizer, sync.during)
        output = self._scaler.step(self._optimizer, **kwargs)
        self._scaler.update()
        return output

    def toggle_model(self, sync_grad: bool = True) -> AbstractContextManager:
        return nullcontext()

    def train(self, *args: Any, **kwargs: Any) -> Any:  # schedule-free's mode switch, when the class has it
        return self._optimizer.train(*args, **kwargs)  # type: ignore[attr-defined]

    def eval(self, *args: Any, **kwargs: Any) -> Any:
        return self._optimizer.eval(*args, **kwargs)  # type: ignore[attr-defined]


def run_batch(
    module: LightningModule,
    optimizer: ShadowOptimizer,
    batch: Any,
    context: BatchContext,
    scaler: Optional["torch.amp.GradScaler"] = None,
) -> Optional[dict[str, Any]]:
    """One training batch of ``module`` as Lightning's automatic optimisation runs it, with ``module`` as ``self``.

    ``on_train_batch_start`` → [``optimizer_step`` with a closure of] ``training_step`` → ``on_before_zero_grad`` →
    ``optimizer_zero_grad`` (first micro-batch) → ``on_before_backward`` → ``backward`` → ``on_after_backward``, and
    inside the step ``on_before_optimizer_step`` and ``configure_gradient_clipping``. The caller runs
    ``on_train_batch_end`` (after measuring, so that both models are measured at the same point of the step).

    Returns:
        The batch's outputs as Lightning hands them to ``on_train_batch_end`` (``{"loss": ..., **extra}``, ``{}`` for a
        skipped step), or None when ``on_train_batch_start`` returned -1.
    """
    batch_idx, hooks = context.batch_idx, optimizer.hooks
    if "on_train_batch_start" in hooks and module.on_train_batch_start(batch, batch_idx) == -1:
        return None
    result: dict[str, Any] = {}

    def closure() -> Optional[Tensor]:
        with context.step_context():
            output = module.training_step(batch, batch_idx)
        loss, extra = split_output(output)
        closure_loss = loss
        if loss is not None and context.accumulate_grad_batches > 1:  # Lightning divides by 1 too: exact, skipped
            closure_loss = loss / context.accumulate_grad_batches
        if batch_idx % context.accumulate_grad_batches == 0:
            if "on_before_zero_grad" in hooks:
                module.on_before_zero_grad(optimizer.optimizer)
            if "optimizer_zero_grad" in hooks:
                module.optimizer_zero_grad(context.epoch, batch_idx, optimizer.optimizer)
            else:
                optimizer.optimizer.zero_grad()
        if closure_loss is not None:
            # scaled first, as MixedPrecision.pre_backward does
            scaled = scaler.scale(closure_loss) if scaler is not None else closure_loss
            if "on_before_backward" in hooks:
                module.on_before_backward(scaled)
            if "backward" in hooks:
                module.backward(scaled)
            else:
                scaled.backward()
            if context.world_size > 1 and context.optimizer_steps:
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                all_reduce_mean(grads, context.world_size)
            if "on_after_backward" in hooks:
                module.on_after_backward()
        result.clear()
        result.update({"loss": closure_loss.detach(), **extra} if closure_loss is not None else {})
        return result.get("loss")

    optimizer.context = context
    if not context.optimizer_steps:  # a micro-batch of an accumulation window
        closure()
    elif "optimizer_step" in hooks:
        module.optimizer_step(context.epoch, batch_idx, optimizer, closure)  # type: ignore[arg-type]  # the facade
    else:  # LightningModule.optimizer_step's own body
        optimizer.step(closure=closure)
    return result


# Hooks the batched path runs per shadow after its one backward; without any, it needs no per-shadow RNG replay.
PER_SHADOW_HOOKS = ("on_after_backward", "on_before_optimizer_step", "configure_gradient_clipping", "optimizer_step")


def mirroring_blocker(module: LightningModule, optimizer: Optimizer, stacked_optimizer: bool = False) -> Optional[str]:
    """Why the batched path cannot mirror ``module`` and ``optimizer``; None if it can. It runs one ``vmap`` forward
    and backward for all shadows, so it cannot run per shadow what happens inside them, nor re-evaluate the loss.
    ``stacked_optimizer``: the finder's stack also steps all rows at once, so no hook around the step can run per row
    either (gradient clipping excepted, which it applies per candidate)."""
    blockers: tuple[str, ...] = BATCHED_PATH_BLOCKERS
    if stacked_optimizer:
        blockers += tuple(h for h in PER_SHADOW_HOOKS if h != "configure_gradient_clipping")
    hooks = overridden_hooks(module, blockers)
    if hooks:
        return f"the module overrides {', '.join(hooks)}, which run inside each shadow's forward and backward"
    closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        return f"{type(optimizer).__name__} re-evaluates the loss through a closure at every step"
    return None


@torch.no_grad()
def all_reduce_mean(grads: list[Tensor], world_size: int) -> None:
    """Average ``grads`` across processes in one flattened all-reduce: one collective, not one per tensor."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    torch._foreach_copy_(grads, [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)])


def split_output(output: Any) -> tuple[Optional[Tensor], dict[str, Any]]:
    """The loss and the other outputs of a ``training_step`` (a Tensor, a mapping with ``"loss"``, or None), as
    Lightning reads them."""
    if output is None or isinstance(output, Tensor):
        return output, {}
    if hasattr(output, "get"):
        return output.get("loss"), {k: v for k, v in output.items() if k != "loss"}
    raise TypeError(f"`training_step` must return a Tensor, a dict with 'loss', or None; got {type(output).__name__}")


_IMMUTABLE = (float, int, bool, str, type(None), tuple)
_MISSING = object()


def _snapshot_value(value: Any) -> Any:
    # a tensor hyperparameter is compared by identity and version: no copy, no host synchronisation
    if isinstance(value, _IMMUTABLE):
        return value
    return ("tensor", id(value), value._version) if isinstance(value, Tensor) else copy.copy(value)


def _snapshot(optimizer: Optimizer) -> list[dict[str, Any]]:
    # runs a few times per step: immutable values (nearly all of them) skip the call
    return [
        {k: v if type(v) in _IMMUTABLE else _snapshot_value(v) for k, v in g.items() if k not in _NOT_REPLAYED}
        for g in optimizer.param_groups
    ]


class OptimizerSync:
    """Replays on shadow optimizers what was done to the real optimizer from *outside* its ``step``.

    The real optimizer's param groups are compared with a reference record at sync points: the start and the end of
    every real batch (around the shadows' own batch) and the epoch hooks. A key whose value changed since the record
    was set by someone (an LR scheduler, SWA's schedule, a warm-up callback, the module's own hooks), and is copied to
    every shadow whose own value of that key did not change since *its* record: a change the shadow's own hooks made
    (a warm-up in ``optimizer_step``, a decay in ``on_train_batch_end``, maybe from its own trajectory) is not applied
    twice. Changes made during a real batch, up to the real ``step`` (by a callback's ``on_before_optimizer_step``,
    which the probe runs after), are read in the probe's ``on_before_optimizer_step`` (:attr:`during`) and given to
    each shadow right before its own step, by the same rule. The real record is renewed after every real step, so
    what an optimizer changes inside its own step (Prodigy's or D-Adaptation's ``d``) is never taken for a change
    from outside: it stays each shadow's own. Param groups
    added to the real optimizer (``BackboneFinetuning``) are added to each shadow optimizer over the shadow's
    parameters, with a copy of the real state of those parameters.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self._base = _snapshot(optimizer)
        self._shadow_bases: dict[int, list[dict[str, Any]]] = {}
        # set on the real optimizer within this batch, before its step
        self.during: Optional[list[dict[str, Any]]] = None
        self._handles: list[Any] = []

    def track(self) -> None:
        """Start following the real optimizer's steps (the probe's shadows; the finder's copies have nothing outside
        to follow)."""
        if self._handles:
            return
        # a plain function holding a weak reference: a deep copy or pickle of the real optimizer (its hooks included)
        # must not drag the shadows along
        ref = weakref.ref(self)

        def after_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
            sync = ref()
            if sync is not None:
                sync._base = _snapshot(optimizer)

        self._handles = [self.optimizer.register_step_post_hook(after_step)]

    def register(self, shadow_optimizer: Optimizer) -> None:
        """Take ``shadow_optimizer``'s groups as they are now as its record (at attach, and after each of its steps)."""
        self._shadow_bases[id(shadow_optimizer)] = _snapshot(shadow_optimizer)

    def changes(self) -> list[dict[str, Any]]:
        """Per real param group, the keys changed since the record, with their values now (tensors cloned: a scheduler
        updates a tensor learning rate in place)."""
        changed = []
        for g, group in enumerate(self.optimizer.param_groups):
            before = self._base[g] if g < len(self._base) else {}
            changed.append({
                k: v.clone() if isinstance(v, Tensor) else v for k, v in group.items()
                if k not in _NOT_REPLAYED
                and before.get(k, _MISSING) != (v if type(v) in _IMMUTABLE else _snapshot_value(v))
            })
        return changed

    def sync(self, shadow_optimizers: Sequence[Optimizer]) -> None:
        """A sync point: give every shadow what changed on the real optimizer since the last, and renew the record."""
        changes = self.changes()
        for optimizer in shadow_optimizers:
            self.apply(optimizer, changes)
        self.rebase()

    def rebase(self) -> None:
        """Take the real optimizer's groups as they are now as the record."""
        self._base = _snapshot(self.optimizer)

    def apply(self, shadow_optimizer: Optimizer, changes: Optional[list[dict[str, Any]]]) -> None:
        """Copy ``changes`` to one shadow optimizer, but for the keys it changed itself since its record; renew it.

        With nothing to copy the record stays as it is (the common case, at every sync point of every step): what the
        shadow changed since is still its own, and the keys its optimizer changes inside its step (Prodigy's ``d``)
        are not set from outside."""
        if not changes or not any(changes):
            return
        base = self._shadow_bases.get(id(shadow_optimizer), [])
        for g, (group, values) in enumerate(zip(shadow_optimizer.param_groups, changes or ())):
            for key, value in values.items():
                if g < len(base) and key in base[g] and base[g][key] != _snapshot_value(group.get(key)):
                    continue  # the shadow's own hooks set it: its own value
                group[key] = value.clone() if isinstance(value, Tensor) else copy.copy(value)
        self.register(shadow_optimizer)

    def state_dict(self) -> list[dict[str, Any]]:
        """The reference record, for a checkpoint: on resume, Lightning restores the real optimizer wholesale, and only
        what changed since the record is news to the shadows; what the real steps had set (Prodigy's ``d``) is not.
        A tensor value is stored as unknown: replayed."""
        return [{k: "<tensor>" if isinstance(v, tuple) and v[:1] == ("tensor",) else v for k, v in group.items()}
                for group in self._base]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        self._base = [dict(group) for group in state]

    def add_new_groups(self, shadow_optimizer: Optimizer, param_map: dict[int, Tensor]) -> None:
        """Add the param groups added to the real optimizer since (``BackboneFinetuning``), over the shadow's own
        parameters. Called before the real batch runs, so the state copied is what the new parameters had before the
        real optimizer stepped them (none, usually)."""
        real_groups = self.optimizer.param_groups
        for g in range(len(shadow_optimizer.param_groups), len(real_groups)):
            group = real_groups[g]
            new = {k: copy.copy(v) for k, v in group.items() if k != "params"}
            new["params"] = [param_map[id(p)] for p in group["params"]]
            shadow_optimizer.add_param_group(new)
            for real_p, shadow_p in zip(group["params"], new["params"]):
                if real_p in self.optimizer.state:
                    shadow_optimizer.state[shadow_p] = copy.deepcopy(self.optimizer.state[real_p])

    def sync_mode(self, shadow_optimizer: Optimizer) -> None:
        """An optimizer with a train/eval mode (schedule-free moves the parameters between its sequences on a switch):
        switch the shadow's the way the real one was switched, with the shadow's own parameters."""
        real_mode = self.optimizer.param_groups[0].get("train_mode")
        if real_mode is None or shadow_optimizer.param_groups[0].get("train_mode") == real_mode:
            return
        getattr(shadow_optimizer, "train" if real_mode else "eval")()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class ModuleSync:
    """Copies the real module's ``requires_grad`` flags and train/eval modes onto shadows (set by the Trainer around
    validation, by finetuning callbacks, or by the module's own hooks, which the shadows also run)."""

    def __init__(self, module: nn.Module) -> None:
        self.modules = list(module.modules())
        self.parameters = [p for _, p in module.named_parameters()]
        self.capture()
        self._applied: dict[int, tuple[list[bool], list[bool]]] = {}  # per shadow, the flags it was last given

    def capture(self) -> None:
        """Record the real module's flags now (at the start of a real batch, before its hooks run)."""
        self.training = [m.training for m in self.modules]
        self.requires_grad = [p.requires_grad for p in self.parameters]

    def apply(self, shadow: nn.Module) -> bool:
        """Give ``shadow`` the recorded flags; True if its set of trainable parameters changed."""
        flags = (self.training, self.requires_grad)
        if self._applied.get(id(shadow)) == flags:  # nothing changed outside since: the common case, every step
            return False
        self._applied[id(shadow)] = flags
        for m, training in zip(shadow.modules(), self.training):
            m.training = training
        changed = False
        for p, flag in zip(shadow.parameters(), self.requires_grad):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
                changed = True
        return changed


def bind_optimizers(module: LightningModule, optimizer: ShadowOptimizer) -> None:
    """Make ``self.optimizers()`` in the shadow's hooks return the shadow's optimizer (a hook that switches a
    schedule-free optimizer's mode must switch the shadow's)."""

    def optimizers(use_pl_optimizer: bool = True) -> Optimizer:
        return optimizer if use_pl_optimizer else optimizer.optimizer  # type: ignore[return-value]  # the facade

    module.optimizers = optimizers  # type: ignore[method-assign, assignment]


class Isolated:
    """A view of ``real`` for a shadow: reads go through to it, writes stay on the view (``isinstance`` still holds)."""

    def __init__(self, real: Any) -> None:
        object.__setattr__(self, "_real", real)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance(self.trainer, Trainer) holds in a shadow's hooks too
        return type(self.__dict__["_real"])

    def __getattr__(self, name: str) -> Any:  # called only for what the view does not hold itself
        if name.startswith("__") or "_real" not in self.__dict__:  # copy and pickle probe a bare instance
            raise AttributeError(name)
        return getattr(self.__dict__["_real"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # kept on the view: the real object is not touched


class ShadowScheduler(Isolated):
    """What a shadow's hooks get from ``self.lr_schedulers()``: the real scheduler to read (``get_last_lr()``), whose
    ``step`` does nothing here. The real hook steps the real scheduler, and what that sets on the real optimizer
    reaches the shadow's (:class:`OptimizerSync`); stepping it again from a shadow would change the real training."""

    def step(self, *args: Any, **kwargs: Any) -> None:
        return None


# Where bit identity is not expected (batched kernels, a compiled real model, CUDA), the twin's relative drift must stay
# below this fraction of the shadows' relative separation: rounding, not a different trajectory.
SENTINEL_TOLERANCE = 1e-2


def sentinel_report(drifts: Tensor, exact: bool, separation: float) -> dict[str, Any]:
    """The sentinel's verdict on the twin's relative drifts ``[steps]`` (float64, CPU), one per optimizer step.

    Args:
        exact: bit identity is expected (one at a time, eager, on the CPU or with deterministic algorithms).
        separation: the shadows' relative initial separation d(0)/‖θ‖ (0 at ε = 0, then 1e-4 stands in).

    Returns:
        ``steps``, ``max_drift``, ``tolerance`` (0 when exact), ``exact``, ``trusted``, and ``first_drift``: the
        1-based step of the first drift beyond the tolerance, or None.
    """
    tolerance = 0.0 if exact else SENTINEL_TOLERANCE * (separation if separation > 0 else 1e-4)
    beyond = (~(drifts <= tolerance)).nonzero().flatten()  # NaN counts as beyond
    return {
        "steps": len(drifts),
        "max_drift": drifts.max().item() if len(drifts) else 0.0,
        "tolerance": tolerance,
        "exact": exact,
        "trusted": len(beyond) == 0,
        "first_drift": int(beyond[0]) + 1 if len(beyond) else None,
    }
