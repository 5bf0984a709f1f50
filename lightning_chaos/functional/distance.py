"""Distances between two parameter vectors given as lists of tensors."""

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Norm = Literal["l2", "l1"]
NORMS = ("l2", "l1")


def _order(norm: str) -> int:
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}, got {norm!r}")
    return 2 if norm == "l2" else 1


def _combine(per_tensor_norms: list[Tensor], order: int) -> Tensor:
    if len({n.dtype for n in per_tensor_norms}) > 1:
        per_tensor_norms = [n.double() for n in per_tensor_norms]
    return torch.linalg.vector_norm(torch.stack(per_tensor_norms), order)


def flat_norm(tensors: Sequence[Tensor], norm: str = "l2") -> Tensor:
    """Norm of the concatenation of ``tensors`` without concatenating them.

    ‖θ‖₂ = sqrt(Σ_i ‖θ_i‖₂²), ‖θ‖₁ = Σ_i ‖θ_i‖₁, computed with one fused ``torch._foreach_norm`` call.

    Args:
        tensors: the pieces of the flattened vector (for example a model's parameters).
        norm: ``"l2"`` or ``"l1"``.

    Returns:
        A 0-dim tensor on the pieces' device. No host synchronisation happens.

    Raises:
        ValueError: for an unknown ``norm`` or an empty ``tensors``.
    """
    order = _order(norm)
    if len(tensors) == 0:
        raise ValueError("`tensors` must hold at least one tensor")
    return _combine(list(torch._foreach_norm(list(tensors), order)), order)


def parameter_distance(reference: Sequence[Tensor], other: Sequence[Tensor], norm: str = "l2") -> Tensor:
    """Distance d = ‖θ − θ̃‖ between two parameter vectors given as matching lists of tensors.

    The seed papers (Jiménez-González et al. 2025; Danovski et al. 2024) use the L1 norm over all weight and bias
    entries; dynamical-systems libraries (ChaosTools.jl) use L2. Exponents do not depend on the choice once the
    separation is aligned with its fastest-growing direction, since all norms on a finite-dimensional space are
    equivalent; only d(0) and the saturation level change.

    Args:
        reference: θ, a list of tensors.
        other: θ̃, a list of tensors with the same shapes, in the same order.
        norm: ``"l2"`` (default) or ``"l1"``.

    Returns:
        A 0-dim tensor on the parameters' device (no host synchronisation).

    Raises:
        ValueError: for an unknown ``norm``, or lists of different lengths.

    Example:
        >>> a = [torch.zeros(2), torch.zeros(1)]
        >>> b = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]
        >>> parameter_distance(a, b).item(), parameter_distance(a, b, norm="l1").item()
        (5.0, 7.0)
    """
    if len(reference) != len(other):
        raise ValueError(f"`reference` has {len(reference)} tensors but `other` has {len(other)}")
    return flat_norm(torch._foreach_sub(list(other), list(reference)), norm)
