"""Vectorised shadows: K shadow copies of a module run as one batched computation with ``torch.func.vmap``.

Each trainable parameter (and buffer) of the K shadows lives in one stacked tensor ``[K, ...]``; every shadow's own
parameter is a view of its row, so the shadows' optimizers, clipping, scalers and checkpoints work on them exactly as
on separate copies. A step is then one ``vmap`` over ``functional_call(training_step)`` and one backward, instead of K
training steps: K small kernels become one wide one, which is where a GPU gains.

This layer knows torch only; :class:`~lightning_chaos.shadow.ShadowEnsemble` decides when to use it.
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
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


class NotVectorizable(RuntimeError):
    """The module's training step cannot run under ``vmap``; the caller falls back to one shadow at a time."""


def vectorization_blocker(module: nn.Module, device: torch.device) -> Optional[str]:
    """Why the shadows of ``module`` cannot share one ``vmap``, found before any step; None if nothing is known to.

    Most obstacles (``.item()``, data-dependent branches, a functional dropout on CUDA) only show when the step runs:
    the first vectorised step that raises turns vectorisation off (see :class:`StackedShadows`).
    """
    for name, submodule in module.named_modules():
        if device.type == "cuda" and isinstance(submodule, _DROPOUT_MODULES) and submodule.p > 0:
            return f"{name} is a dropout on CUDA, where a batched dropout cannot replay the real model's fused masks"
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


class _TrainingStep(nn.Module):
    """Presents a LightningModule's ``training_step`` as ``forward``, for ``functional_call``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any, batch_idx: int) -> Any:
        return self.module.training_step(batch, batch_idx)


def _stack_into_views(modules: Sequence[nn.Module], names: list[str], kind: str) -> dict[str, Tensor]:
    """Copy each named tensor of the K ``modules`` into one stacked tensor and rebind every module's tensor to a view
    of its row. ``kind`` is ``"parameter"`` or ``"buffer"``. Returns ``{name: stacked}``."""
    stacked: dict[str, Tensor] = {}
    for name in names:
        module_path, _, leaf = name.rpartition(".")
        owners = [m.get_submodule(module_path) for m in modules]
        table = "_parameters" if kind == "parameter" else "_buffers"
        originals = [getattr(owner, table)[leaf] for owner in owners]
        rows = torch.stack([t.detach() for t in originals])
        stacked[name] = rows
        for k, (module, original) in enumerate(zip(modules, originals)):
            row = nn.Parameter(rows[k], requires_grad=original.requires_grad) if kind == "parameter" else rows[k]
            # a tensor shared by several submodules (tied weights) is rebound wherever it appears
            for submodule in module.modules():
                entries = getattr(submodule, table)
                for key, value in list(entries.items()):
                    if value is original:
                        entries[key] = row
    return stacked


class StackedShadows:
    """K shadow modules whose trainable parameters and buffers are views into stacked ``[K, ...]`` tensors.

    Args:
        shadows: the K shadow LightningModules (deep copies of the real one). Their trainable parameters and their
            buffers are rebound in place to views of the stacked storage: build optimizers over them afterwards.
        parameter_names: names of the trainable parameters, in the order the ensemble uses.
    """

    def __init__(self, shadows: Sequence[nn.Module], parameter_names: list[str]) -> None:
        self.shadows = list(shadows)
        self.parameter_names = list(parameter_names)
        buffer_names = [name for name, buffer in shadows[0].named_buffers() if buffer is not None]
        self.parameters = _stack_into_views(self.shadows, self.parameter_names, "parameter")
        self.buffers = _stack_into_views(self.shadows, buffer_names, "buffer")
        self._call = _TrainingStep(self.shadows[0])
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
            output = functional_call(self._call, {**parameters, **buffers}, (batch, batch_idx))
            loss = output if output is None or isinstance(output, Tensor) else output.get("loss")
            if loss is None:
                raise NotVectorizable("training_step returned no loss for this batch")
            return loss

        try:
            with step_context(), (_DropoutOnCudaGuard() if not self._checked else nullcontext()):
                losses = vmap(shadow_loss, randomness="same")(leaves, buffers)
            scaled = losses / divisor if divisor > 1 else losses  # the sequential path's operations, in its order
            if loss_scales is not None:
                scaled = scaled * loss_scales
            grads = torch.autograd.grad(scaled.sum(), list(leaves.values()), allow_unused=True)
        except Exception as error:
            for rows, saved in zip(self.buffers.values(), saved_buffers):
                rows.copy_(saved)
            if isinstance(error, NotVectorizable):
                raise
            raise NotVectorizable(f"{type(error).__name__}: {error}") from error
        self._checked = True
        return losses.detach(), list(grads)
