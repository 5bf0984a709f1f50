"""Vectorised shadows: K shadow copies of a module run as one batched computation with ``torch.func.vmap``.

Each trainable parameter (and buffer) of the K shadows lives in one stacked tensor ``[K, ...]``; every shadow's own
parameter is a view of its row, so the shadows' optimizers, clipping, scalers and checkpoints work on them exactly as
on separate copies. A step is then one ``vmap`` over ``functional_call(training_step)`` and one backward, instead of K
training steps: K small kernels become one wide one, which is where a GPU gains.

This layer knows torch only. The probe's :class:`~lightning_chaos.shadow.ShadowEnsemble` and the finder (which stacks the
candidates of a whole learning-rate grid) decide when to use it.
"""

import functools
import inspect
import operator
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode
from torchmetrics import Metric

# Under vmap(randomness="same") a dropout draws its mask with bernoulli_. On the CPU so does the real model's dropout,
# and the masks agree; on CUDA the real model's fused dropout kernel draws another mask from the same RNG state.
_DROPOUT_FUNCTIONS = {
    nn.functional.dropout: ("p", 1),
    nn.functional.dropout1d: ("p", 1),
    nn.functional.dropout2d: ("p", 1),
    nn.functional.dropout3d: ("p", 1),
    nn.functional.alpha_dropout: ("p", 1),
    nn.functional.feature_alpha_dropout: ("p", 1),
    torch.dropout: ("p", 1),
    torch.feature_dropout: ("p", 1),
    torch.alpha_dropout: ("p", 1),
    torch.feature_alpha_dropout: ("p", 1),
    torch.native_dropout: ("p", 1),
    nn.functional.scaled_dot_product_attention: ("dropout_p", 4),
}
_DROPOUT_MODULES = (nn.modules.dropout._DropoutNd,)


# "auto" batches 4 or more copies of models up to 1 M parameters. Measured (benchmarks/RESULTS.md): on MLPs of 10-100 k
# parameters vmap's fixed cost outweighs its gain at K = 2, breaks even at K = 4 and halves the time at K = 16 on an
# H100; on a ResNet-18 (11 M), bound by arithmetic, it gains at most 12 % and holds the activations of all K copies at
# once (16.5 GB instead of 2.9 GB at K = 16).
AUTO_MIN_COPIES = 4
AUTO_MAX_PARAMETERS = 1_000_000


def worth_vectorizing(module: nn.Module, copies: int) -> bool:
    """The ``vectorize="auto"`` rule: batch ``copies`` ≥ 4 copies of a module of at most 1 M trainable parameters."""
    size = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return copies >= AUTO_MIN_COPIES and size <= AUTO_MAX_PARAMETERS


def check_vectorize(value: Any) -> None:
    """Validate a callback's ``vectorize`` argument: ``"auto"``, ``True`` or ``False``.

    Raises:
        ValueError: naming the argument. Checked by type, because ``1 == True`` would pass a plain ``in``.
    """
    if not (isinstance(value, bool) or (isinstance(value, str) and value == "auto")):
        raise ValueError(f"`vectorize` must be one of ('auto', True, False), got {value!r}")


class NotVectorizable(RuntimeError):
    """The module's training step cannot run under ``vmap``; the caller falls back to one shadow at a time."""


def vectorization_blocker(module: nn.Module, device: torch.device, stacks_the_reference: bool = False) -> Optional[str]:
    """Why the shadows of ``module`` cannot share one ``vmap``, found before any step; None if nothing is known to.

    ``stacks_the_reference``: the trajectories compared are all in the stack (the finder), so they can share a
    numerical precision and dropout masks the real model does not use.

    Most obstacles (``.item()``, data-dependent branches, a functional dropout on CUDA) only show when the step runs:
    the first vectorised step that raises turns vectorisation off (see :class:`StackedShadows`).
    """
    compared_outside_on_cuda = device.type == "cuda" and not stacks_the_reference
    for name, submodule in module.named_modules():
        if compared_outside_on_cuda and isinstance(submodule, _DROPOUT_MODULES) and submodule.p > 0:
            return f"{name} is a dropout on CUDA, where a batched dropout cannot replay the real model's fused masks"
        if (
            compared_outside_on_cuda
            and isinstance(submodule, nn.modules.conv._ConvNd)
            and torch.backends.cudnn.allow_tf32
        ):
            return (
                f"{name} is a convolution on CUDA with TF32 allowed (torch.backends.cudnn.allow_tf32), which cuDNN"
                " rounds differently for the batched (grouped) convolution than for the real model's"
            )
        is_batch_norm = isinstance(submodule, nn.modules.batchnorm._NormBase)
        if is_batch_norm and submodule.track_running_stats and submodule.momentum is None:
            # the cumulative average reads num_batches_tracked as a Python number, which a batched tensor is not
            return f"{name or type(module).__name__} is a BatchNorm with momentum=None (cumulative running average)"
    for name, parameter in module.named_parameters():
        if parameter.requires_grad and (parameter.is_sparse or parameter.is_complex()):
            return f"the parameter {name!r} is sparse or complex"
    return None


class _DropoutOnCudaGuard(TorchFunctionMode):
    """Raises :class:`NotVectorizable` at a dropout that would draw other masks than the real model's: any random
    dropout on CUDA (unless ``allow_cuda`` says no real model outside the stack is compared), and an attention with
    ``dropout_p > 0`` anywhere (its fused kernels draw their own way)."""

    def __init__(self, allow_cuda: bool = False) -> None:
        super().__init__()
        self.allow_cuda = allow_cuda

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        spec = _DROPOUT_FUNCTIONS.get(func)
        if spec is not None:
            name, position = spec
            p = kwargs.get(name, args[position] if len(args) > position else 0.5 if name == "p" else 0.0)
            positional_training = args[2] if name == "p" and len(args) > 2 else True
            training = kwargs.get("training", kwargs.get("train", positional_training))
            tensor = args[0] if args else None
            on_cuda = isinstance(tensor, Tensor) and tensor.is_cuda
            attention = func is nn.functional.scaled_dot_product_attention
            if p and training is not False and ((on_cuda and not self.allow_cuda) or attention):
                raise NotVectorizable(f"{func.__name__} with {name}={p} cannot replay the real model's random mask")
            if p and training is not False and isinstance(tensor, Tensor) and _permuted(tensor):
                # a CPU dropout fills its mask in memory order: another layout, another mask for the same RNG state
                raise NotVectorizable(f"{func.__name__} on a transposed (permuted) input draws its mask in another order")
        return func(*args, **kwargs)


def _permuted(tensor: Tensor) -> bool:
    """Whether ``tensor``'s dimensions lie in memory in another order than their logical one (a transpose, channels
    last). Gaps between rows (a batched copy's layout) keep the order and do not count."""
    strides = [stride for size, stride in zip(tensor.shape, tensor.stride()) if size > 1]
    return any(a < b for a, b in zip(strides, strides[1:]))


@contextmanager
def _convolutions_without_tf32() -> Iterator[None]:
    """Batched convolutions in full float32 precision.

    Under vmap a convolution with batched weights becomes a grouped one, for which cuDNN picks TF32 kernels when
    allowed (PyTorch allows them for convolutions by default), rounding at ~5e-4: more than a 1e-4 perturbation.
    Measured on an H100: the finder's Λ on a small CNN came out up to 5x too large with TF32 and matched the
    one-at-a-time path to five digits without it.
    """
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = allowed


class _TrainingStep(nn.Module):
    """Presents a LightningModule's ``training_step`` as ``forward``, for ``functional_call``.

    ``functional_call`` puts the module's own tensors back afterwards, so a ``training_step`` that *reassigns* a
    buffer (``self.ema = 0.9 * self.ema + ...``) would lose the update without a word: that raises
    :class:`NotVectorizable` instead. In-place updates (BatchNorm's running statistics) keep the tensor and are fine.
    """

    def __init__(self, module: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.module = module
        self.passed: dict[str, Tensor] = {}
        # where each passed tensor lives, looked up once: the check below runs on every step
        self._owners = [(name, *self._owner_of(name)) for name in names]
        self._watch = _AttributeWatch(module)

    def _owner_of(self, name: str) -> tuple[nn.Module, str]:
        module_path, _, leaf = name.rpartition(".")
        return self.get_submodule(module_path), leaf

    def forward(self, batch: Any, batch_idx: int) -> Any:
        taken = self._watch.take()
        try:
            output = self.module.training_step(batch, batch_idx)  # type: ignore[operator]  # a LightningModule
        except BaseException:
            _restore(self.module, self._watch.expand(taken))  # no batched tensor may stay for the one-at-a-time redo
            raise
        for name, owner, leaf in self._owners:
            if getattr(owner, leaf) is not self.passed[name]:
                raise NotVectorizable(f"training_step reassigns {name[len('module.'):]!r} instead of updating it")
        if self._watch.unchanged(taken):
            return output
        before = self._watch.expand(taken)
        changed = _changed_state(self.module, before)
        if changed:
            # Whatever training_step keeps outside its parameters and buffers happened once, in the first row, with
            # batched tensors that must not escape the vmap: put it back. The states of torchmetrics' metrics are
            # observation only (a shadow logs nothing) and may stay as they were; anything else (a recurrent hidden
            # state, a list of outputs, a step counter) is part of each shadow's own run: the step is redone one by one.
            _restore(self.module, before)
            carried = [name for name, metric in changed if not metric]
            if carried:
                raise NotVectorizable(f"training_step changes the plain attribute {carried[0]!r} (state kept between"
                                      " steps, which each shadow must keep for itself)")
        return output


_CONTAINERS = (list, dict, set)


class _Attributes(NamedTuple):
    module: nn.Module
    values: dict[str, Any]  # a shallow copy of the module's plain attributes
    sizes: dict[str, int]  # the length of each list, dict or set among them: an append keeps the identity


class _AttributeWatch:
    """Sees what a ``training_step`` keeps in plain attributes, at a few microseconds a step: the keys and values of
    every submodule's ``__dict__`` compared by identity in C, and the lengths of its lists, dicts and sets (found
    again only when the keys change)."""

    def __init__(self, module: nn.Module) -> None:
        self.modules = list(module.modules())
        self._keys: list[tuple[str, ...]] = []
        self._containers: list[tuple[dict, str]] = []
        self._internal = _internal_attributes()

    def take(self) -> tuple[list[tuple[tuple[str, ...], tuple[Any, ...]]], list[int]]:
        taken = [(tuple(m.__dict__), tuple(m.__dict__.values())) for m in self.modules]
        keys = [k for k, _ in taken]
        if keys != self._keys:
            self._keys = keys
            self._containers = [(m.__dict__, k) for m in self.modules for k, v in m.__dict__.items()
                                if isinstance(v, _CONTAINERS) and k not in self._internal]
        return taken, [len(d.get(k, ())) for d, k in self._containers]

    def unchanged(self, taken: tuple[list[tuple[tuple[str, ...], tuple[Any, ...]]], list[int]]) -> bool:
        for m, (keys, values) in zip(self.modules, taken[0]):
            attributes = m.__dict__
            if len(attributes) != len(keys) or tuple(attributes) != keys:
                return False
            if not all(map(operator.is_, attributes.values(), values)):
                return False
        return [len(d.get(k, ())) for d, k in self._containers] == taken[1]

    def expand(self, taken: tuple[list[tuple[tuple[str, ...], tuple[Any, ...]]], list[int]]) -> list[_Attributes]:
        """The snapshot in the form :func:`_changed_state` and :func:`_restore` read (only when something changed)."""
        sizes: dict[int, dict[str, int]] = {}
        for (d, k), size in zip(self._containers, taken[1]):
            sizes.setdefault(id(d), {})[k] = size
        return [_Attributes(m, dict(zip(keys, values)), sizes.get(id(m.__dict__), {}))
                for m, (keys, values) in zip(self.modules, taken[0])]


@functools.lru_cache(maxsize=None)
def _internal_attributes() -> frozenset[str]:
    """torch's and Lightning's own bookkeeping in a module's ``__dict__`` (hook registries, ``_parameters``, ...): no
    ``training_step`` appends to them, and watching their lengths would cost more than the rest of the watch."""
    from lightning.pytorch import LightningModule

    return frozenset(nn.Module().__dict__) | frozenset(LightningModule().__dict__)


def _changed_state(module: nn.Module, before: list[_Attributes]) -> list[tuple[str, bool]]:
    """(name, in a torchmetrics Metric) of each plain attribute that ``training_step`` replaced or grew."""
    changed = []
    for submodule, saved, sizes in before:
        for key, value in submodule.__dict__.items():
            replaced = value is not saved.get(key, _MISSING)
            grown = not replaced and key in sizes and len(value) != sizes[key]
            if replaced or grown:
                changed.append((key, isinstance(submodule, Metric)))
    return changed


_MISSING = object()


def _restore(module: nn.Module, before: list[_Attributes]) -> None:
    for submodule, saved, sizes in before:
        attributes = submodule.__dict__
        for key in {*attributes, *saved}:
            old, new = saved.get(key, _MISSING), attributes.get(key, _MISSING)
            if old is _MISSING:
                del attributes[key]
            elif old is not new:
                attributes[key] = old
            elif isinstance(new, list) and len(new) > sizes.get(key, len(new)):
                del new[sizes[key]:]  # outputs appended in the batched step, batched tensors among them


def _stack_into_views(tensors_per_module: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Copy the i-th tensor of every module into one stacked tensor ``[K, ...]`` and make each module's tensor a view
    of its row (``tensor.data = row``, as FSDP makes parameters views of its flat parameter): the tensors keep their
    identity, so optimizers built over them, tied weights and any other reference stay valid."""
    stacked = []
    for column in zip(*tensors_per_module):
        rows = torch.stack([t.detach() for t in column])
        for tensor, row in zip(column, rows):
            tensor.data = row
        stacked.append(rows)
    return stacked


class StackedShadows:
    """K copies of one module whose trainable parameters and buffers are views into stacked ``[K, ...]`` tensors.

    The copies may belong to different owners (the finder stacks the references and shadows of every learning rate
    of its grid): each keeps its own parameter objects, so optimizers over them keep working.

    Args:
        shadows: K copies of the same LightningModule (same architecture, same parameter names).
        parameter_names: names of the trainable parameters, in the order the caller uses.
        stacks_the_reference: every trajectory compared is in the stack (the finder), none outside it (the probe's
            real model). Then the batched convolutions run with TF32 off (see :func:`_convolutions_without_tf32`),
            and a dropout on CUDA is batched: every row draws the one mask of ``randomness="same"``, which is not
            the mask the fused kernel of an unbatched step would draw, so the stack agrees with the one-at-a-time
            path in distribution there, not mask for mask. The probe instead leaves both to
            :func:`vectorization_blocker`, which refuses them.
    """

    def __init__(
        self, shadows: Sequence[nn.Module], parameter_names: list[str], stacks_the_reference: bool = False
    ) -> None:
        self.shadows = list(shadows)
        self.stacks_the_reference = stacks_the_reference
        self.parameter_names = list(parameter_names)
        buffer_names = [name for name, buffer in shadows[0].named_buffers() if buffer is not None]
        parameter_rows = _stack_into_views([[m.get_parameter(n) for n in parameter_names] for m in self.shadows])
        buffer_rows = _stack_into_views([[m.get_buffer(n) for n in buffer_names] for m in self.shadows])
        self.parameters = dict(zip(parameter_names, parameter_rows))
        self.buffers = dict(zip(buffer_names, buffer_rows))
        self._call = _TrainingStep(self.shadows[0], ["module." + n for n in (*parameter_names, *buffer_names)])
        self._checked = False  # the first step runs under _DropoutOnCudaGuard, later ones without its overhead

    def forward_backward(
        self,
        batch: Any,
        batch_idx: int,
        step_context: Callable[[], AbstractContextManager],
        divisor: int = 1,
        loss_scales: Optional[Tensor] = None,
    ) -> tuple[Tensor, list[Optional[Tensor]]]:
        """Every shadow's ``training_step`` on ``batch`` in one ``vmap``, then one backward.

        The caller sets the RNG state first: ``randomness="same"`` makes every shadow draw the one dropout mask that
        an unbatched ``training_step`` would draw from that state, the mask the real model saw.

        Args:
            divisor: each loss is divided by it before backward (gradient accumulation), as Lightning divides.
            loss_scales: ``[K]`` loss scales of the shadows' GradScalers, multiplied in after the division.

        Returns:
            The K detached losses ``[K]``, and per trainable parameter its gradients ``[K, ...]`` (None where the
            loss does not depend on it, as autograd leaves ``.grad`` unset).

        Raises:
            NotVectorizable: the step cannot run under ``vmap`` (the error that ``vmap`` raised is chained). Buffers
                are restored to their values before the call, so the caller can redo the step sequentially.
        """
        leaves = {"module." + name: rows.detach().requires_grad_() for name, rows in self.parameters.items()}
        buffers = {"module." + name: rows for name, rows in self.buffers.items()}
        saved_buffers = [rows.clone() for rows in self.buffers.values()]

        def shadow_loss(parameters: dict[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
            self._call.passed = {**parameters, **buffers}
            output = functional_call(self._call, self._call.passed, (batch, batch_idx))
            loss = output if output is None or isinstance(output, Tensor) else output.get("loss")
            if loss is None:
                raise NotVectorizable("training_step returned no loss for this batch")
            return loss

        guard = _DropoutOnCudaGuard(allow_cuda=self.stacks_the_reference) if not self._checked else nullcontext()
        full_precision = _convolutions_without_tf32 if self.stacks_the_reference else nullcontext
        try:
            with step_context(), guard, full_precision():
                losses = vmap(shadow_loss, randomness="same")(leaves, buffers)
            scaled = losses / divisor if divisor > 1 else losses  # the sequential path's operations, in its order
            if loss_scales is not None:
                scaled = scaled * loss_scales
            with full_precision():  # the backward convolutions too
                grads = torch.autograd.grad(scaled.sum(), list(leaves.values()), allow_unused=True)
        except Exception as error:
            for rows, saved in zip(self.buffers.values(), saved_buffers):
                rows.copy_(saved)
            if isinstance(error, NotVectorizable):
                raise
            raise NotVectorizable(f"{type(error).__name__}: {error}") from error
        finally:
            self._call.passed = {}  # no batched tensors outlive the call
        self._checked = True
        return losses.detach(), list(grads)


# Optimizers whose step is θ ← θ − η·u, with u and the state updates independent of η (weight decay included: L2 enters
# u, decoupled decay is θ ← θ(1 − η·λ), also linear in η). For these one step at η = 1 gives u for every row at once.
_LR_LINEAR_OPTIMIZERS = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adadelta,
    torch.optim.Adagrad,
)


def lr_linear_blocker(optimizer: torch.optim.Optimizer) -> Optional[str]:
    """Why rows stepped by copies of ``optimizer`` at different learning rates cannot share one step; None if they can.

    Only the exact classes of torch's optimizers whose update is linear in the learning rate qualify: a subclass or
    another optimizer may use the learning rate in its state (ASGD, Rprop, Adagrad with ``lr_decay``, LBFGS)."""
    if type(optimizer) not in _LR_LINEAR_OPTIMIZERS:
        return f"{type(optimizer).__name__} is not one of torch's optimizers known to be linear in the learning rate"
    for group in optimizer.param_groups:
        if group.get("lr_decay", 0):
            return "Adagrad's lr_decay makes its update non-linear in the learning rate"
        if group.get("differentiable", False):
            return "a differentiable optimizer"
        if isinstance(group.get("lr"), Tensor):
            return "a tensor learning rate"
    return None


_SHARED_STATE = ("step", "mu_product")  # per-parameter scalars that every row shares


class StackedOptimizer:
    r"""One optimizer step for all rows of a :class:`StackedShadows` whose optimizers differ only in learning rate.

    Each row k has its own optimizer (same class, same param groups and hyperparameters but ``lr``). Instead of K
    steps, one optimizer of that class over the stacked ``[K, ...]`` tensors steps at η = 1, and each row is then moved
    to its own η: θ_k ← θ_k + η_k·(θ_k' − θ_k), exact for optimizers linear in η (:func:`lr_linear_blocker`). Per-row
    optimizer state (momenta, moments) lives in the stacked optimizer, and each row's optimizer sees views of its
    rows, so code that reads or scales a row's state in place (the Benettin pull-back) keeps working.
    :meth:`unstack` gives the rows' optimizers their own copies again, before they step on their own.

    Rounding differs from K separate steps: the update is formed at η = 1 and scaled, about one ulp of θ per step.

    Args:
        stacked: the K rows, whose trainable parameters are views into stacked tensors.
        optimizers: one optimizer per row, in row order, over that row's parameters (frozen ones may be among them).

    Raises:
        NotVectorizable: the optimizers cannot share a step (another class, an option that makes the step non-linear
            in η, other hyperparameters or param groups, a trainable parameter outside the stack). The caller steps
            them one by one instead.
    """

    def __init__(self, stacked: StackedShadows, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if len(optimizers) != len(stacked.shadows):
            raise ValueError(f"one optimizer per row expected, got {len(optimizers)} for {len(stacked.shadows)} rows")
        blocker = lr_linear_blocker(optimizers[0])
        if blocker is not None:
            raise NotVectorizable(blocker)
        first = optimizers[0]
        self.optimizers = list(optimizers)
        self.rows = len(optimizers)
        index_of = {name: i for i, name in enumerate(stacked.parameter_names)}
        self._groups: list[list[int]] = []  # per param group, its parameters' positions in stacked.parameter_names
        names = {id(p): n for n, p in stacked.shadows[0].named_parameters()}
        for group in first.param_groups:
            unstacked = [p for p in group["params"] if names.get(id(p)) not in index_of]
            if any(p.requires_grad for p in unstacked):
                raise NotVectorizable("the optimizer holds a trainable parameter that is not in the stack")
            self._groups.append([index_of[names[id(p)]] for p in group["params"] if p.requires_grad])
        for optimizer, module in zip(self.optimizers, stacked.shadows):
            if type(optimizer) is not type(first) or len(optimizer.param_groups) != len(first.param_groups):
                raise NotVectorizable("the rows' optimizers differ in class or param groups")
            names = {id(p): n for n, p in module.named_parameters()}
            for group, template, positions in zip(optimizer.param_groups, first.param_groups, self._groups):
                if [index_of.get(names.get(id(p)), -1)  # type: ignore[arg-type]  # None: not found, as -1
                        for p in group["params"] if p.requires_grad] != positions:
                    raise NotVectorizable("the rows' optimizers hold their parameters in another order")
                if not _same_hyperparameters(group, template):
                    raise NotVectorizable("the rows' optimizers differ in a hyperparameter besides the learning rate")
        self.stacked_params = list(stacked.parameters.values())
        self._row_params = [[module.get_parameter(n) for n in stacked.parameter_names] for module in stacked.shadows]
        groups = [{**_without_lr(group), "params": [self.stacked_params[i] for i in positions], "lr": 1.0}
                  for group, positions in zip(first.param_groups, self._groups)]
        self.optimizer = build_like(first, groups, lr=1.0)
        # η per row and param group, shaped to broadcast over each stacked parameter
        self._weights = []
        for g, positions in enumerate(self._groups):
            lrs = torch.tensor([float(o.param_groups[g]["lr"]) for o in self.optimizers], dtype=torch.float64)
            for i in positions:
                rows = self.stacked_params[i]
                self._weights.append((i, lrs.to(rows).reshape(-1, *[1] * (rows.dim() - 1))))
        self._linked = 0  # how many stacked parameters have state, as last linked to the rows
        self._load_row_states()

    def _load_row_states(self) -> None:
        """Stack the rows' existing optimizer state (after a restack), then make the rows' state views of it."""
        for i, stacked_param in enumerate(self.stacked_params):
            row_states = [o.state.get(params[i]) for o, params in zip(self.optimizers, self._row_params)]
            if not all(row_states):
                continue
            merged = {}
            for key, value in row_states[0].items():  # type: ignore[union-attr]  # all(row_states) above
                per_row = isinstance(value, Tensor) and value.shape == self._row_params[0][i].shape
                if per_row and key not in _SHARED_STATE:
                    merged[key] = torch.stack([state[key] for state in row_states])  # type: ignore[index]
                else:
                    merged[key] = value.clone() if isinstance(value, Tensor) else value
            self.optimizer.state[stacked_param] = merged
        self._link_row_states()

    def _link_row_states(self) -> None:
        self._linked = len(self.optimizer.state)
        for i, stacked_param in enumerate(self.stacked_params):
            state = self.optimizer.state.get(stacked_param)
            if not state:
                continue
            for row, (optimizer, params) in enumerate(zip(self.optimizers, self._row_params)):
                optimizer.state[params[i]] = {
                    key: value[row] if isinstance(value, Tensor) and value.shape == stacked_param.shape else value
                    for key, value in state.items()
                }

    def accumulate_gradients(self, grads: Sequence[Optional[Tensor]], zero_grad: bool) -> None:
        """The batched gradients ``[K, ...]`` (None where unused) as the stacked parameters' ``.grad``: set at the start
        of an accumulation window, added to otherwise."""
        for parameter, grad in zip(self.stacked_params, grads):
            if zero_grad:
                parameter.grad = None
            if grad is None:
                continue
            if parameter.grad is None:
                parameter.grad = grad
            else:
                parameter.grad = parameter.grad + grad

    @torch.no_grad()
    def step(self) -> None:
        """Every row's optimizer step, at its own learning rate."""
        rows = [(self.stacked_params[i], weight) for i, weight in self._weights]
        stepped = [(parameter, weight, parameter.clone()) for parameter, weight in rows if parameter.grad is not None]
        self.optimizer.step()
        for parameter, weight, before in stepped:
            parameter.copy_(before.lerp_(parameter, weight))
        if len(self.optimizer.state) != self._linked:  # state made on this step: the rows must see it
            self._link_row_states()

    def release_gradients(self) -> None:
        for parameter in self.stacked_params:
            parameter.grad = None

    def unstack(self) -> None:
        """Give every row's optimizer its own copy of its state, so that it can step on its own, and every row its
        share of gradients accumulated so far (as views, which its optimizer's ``zero_grad`` drops)."""
        for optimizer, params, row in zip(self.optimizers, self._row_params, range(self.rows)):
            for parameter, stacked_param in zip(params, self.stacked_params):
                if stacked_param.grad is not None:
                    parameter.grad = stacked_param.grad[row]
                state = optimizer.state.get(parameter)
                if state:
                    optimizer.state[parameter] = {
                        k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()
                    }
        self.release_gradients()


def build_like(
    optimizer: torch.optim.Optimizer, param_groups: list[dict[str, Any]], **overrides: Any
) -> torch.optim.Optimizer:
    """A new optimizer of ``optimizer``'s class over ``param_groups``, with its defaults: some constructors read an
    argument rather than the group (Adagrad's ``initial_accumulator_value`` for the accumulators it makes)."""
    accepted = inspect.signature(type(optimizer)).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted and k not in overrides}
    return type(optimizer)(param_groups, **defaults, **overrides)


def _same_hyperparameters(group: dict[str, Any], template: dict[str, Any]) -> bool:
    mine, theirs = _without_lr(group), _without_lr(template)
    if mine.keys() != theirs.keys():
        return False
    for key, value in mine.items():
        other = theirs[key]
        if isinstance(value, Tensor) or isinstance(other, Tensor):
            if not (isinstance(value, Tensor) and isinstance(other, Tensor) and torch.equal(value, other)):
                return False
        elif value != other:
            return False
    return True


def _without_lr(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's hyperparameters, without its parameters and the learning rate (and the schedulers' copies)."""
    return {k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr", "max_lr", "min_lr")}
