"""Argument checks shared by the callbacks: each raises ValueError naming the argument and what was expected."""

from typing import Any

MAX_SEED = 2**32 - 1  # as lightning's seed_everything: NumPy's global generator takes no larger seed


def check_seed(name: str, value: Any) -> None:
    """An integer seed in [0, 2**32 − 1] (``bool`` is refused, though it is an ``int``)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"`{name}` must be an integer in [0, {MAX_SEED}], got {value!r}")


def check_flag(name: str, value: Any) -> None:
    """``True`` or ``False``: a string such as ``"no"`` would read as true."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")
