"""Vectorised shadows: K shadow copies of a module run as one batched computation with ``torch.func.vmap``.

Each trainable parameter (and buffer) of the K shadows lives in one stacked tensor ``[K, ...]``; every shadow's own
parameter is a view of its row, so the shadows' optimizers, clipping, scalers and checkpoints work on them exactly as
on separate copies. A step is then one ``vmap`` over ``functional_call(training_step)`` and one backward, instead of K
training steps: K small kernels become one wide one, which is where a GPU gains.

This layer knows torch only. The probe's :class:`~lightning_chaos.shadow.ShadowEnsemble` and the finder (which stacks the
candidates of a whole learning-rate grid) decide when to use it.
"""

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode

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
    numerical precision the real model does not use.

    Most obstacles (``.item()``, data-dependent branches, a functional dropout on CUDA) only show when the step runs:
    the first vectorised step that raises turns vectorisation off (see :class:`StackedShadows`).
    """
    for name, submodule in module.named_modules():
        if device.type == "cuda" and isinstance(submodule, _DROPOUT_MODULES) and submodule.p > 0:
            return f"{name} is a dropout on CUDA, where a batched dropout cannot replay the real model's fused masks"
        if (
            device.type == "cuda"
            and not stacks_the_reference
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
    dropout on CUDA, and an attention with ``dropout_p > 0`` anywhere (its fused kernels draw their own way)."""

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
            if p and training is not False and (on_cuda or attention):
                raise NotVectorizable(f"{func.__name__} with {name}={p} cannot replay the real model's random mask")
        return func(*args, **kwargs)


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

    def _owner_of(self, name: str) -> tuple[nn.Module, str]:
        module_path, _, leaf = name.rpartition(".")
        return self.get_submodule(module_path), leaf

    def forward(self, batch: Any, batch_idx: int) -> Any:
        output = self.module.training_step(batch, batch_idx)
        for name, owner, leaf in self._owners:
            if getattr(owner, leaf) is not self.passed[name]:
                raise NotVectorizable(f"training_step reassigns {name[len('module.'):]!r} instead of updating it")
        return output


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
        full_precision_convolutions: run the batched convolutions with TF32 off (see
            :func:`_convolutions_without_tf32`). Right when every trajectory compared is in the stack (the finder);
            the probe compares with a real model outside it, so there :func:`vectorization_blocker` refuses
            convolutions that the real model may run in TF32 instead.
    """

    def __init__(
        self, shadows: Sequence[nn.Module], parameter_names: list[str], full_precision_convolutions: bool = False
    ) -> None:
        self.shadows = list(shadows)
        self.full_precision_convolutions = full_precision_convolutions
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

        guard = _DropoutOnCudaGuard() if not self._checked else nullcontext()
        full_precision = _convolutions_without_tf32 if self.full_precision_convolutions else nullcontext
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
