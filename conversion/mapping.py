"""The checkpoint's tensor names -> Flax parameter names: a declarative table plus small named transforms.

Module names already match (see model/), so the table only renames prefixes and leaves:
Linear `weight` [out, in] -> `kernel` [in, out]; Conv `weight` [O, I, kh, kw] -> `kernel` [kh, kw, I, O];
norm `weight` -> `scale`; Embedding `weight` -> `embedding`; `bias` unchanged.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

# Source prefix -> Flax prefix; the first match wins, so longer prefixes come first.
PREFIXES: tuple[tuple[str, str], ...] = (
    ("vision_model.vision_model.", "vision_model."),
    ("vision_model.", "vision_model."),
    ("language_model.model.", "language_model."),
    ("language_model.", "language_model."),
    ("mlp1.0.", "mlp1.layer_norm."),
    ("mlp1.1.", "mlp1.fc1."),
    ("mlp1.3.", "mlp1.fc2."),
)

# Tensors of the checkpoint that the forward pass never uses (SigLIP's attention-pooling head).
SKIPPED_PREFIXES: tuple[str, ...] = ("vision_model.head.",)


def transpose_linear(w: np.ndarray) -> np.ndarray:
    return w.T


def conv_oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)


def identity(w: np.ndarray) -> np.ndarray:
    return w


# Flax leaf name -> transform applied to a source `weight`, tried in this order against the model's own keys.
WEIGHT_LEAVES: tuple[tuple[str, Callable[[np.ndarray], np.ndarray]], ...] = (
    ("kernel", transpose_linear),  # replaced by conv_oihw_to_hwio for 4-D weights
    ("scale", identity),
    ("embedding", identity),
)


class MappingError(ValueError):
    pass


def flax_prefix(name: str) -> str | None:
    """The source name with its prefix renamed, or None when it belongs to no known part."""
    for src, dst in PREFIXES:
        if name.startswith(src):
            return dst + name[len(src):]
    return None


def is_skipped(flax_name: str) -> bool:
    return flax_name.startswith(SKIPPED_PREFIXES)


def map_tensor(name: str, ndim: int, expected: dict[str, tuple[int, ...]]) -> tuple[str, Callable] | None:
    """(flax name, transform) for one source tensor; None for a tensor to skip. Raises MappingError if unknown."""
    renamed = flax_prefix(name)
    if renamed is None:
        raise MappingError(f"unexpected tensor {name!r}")
    if is_skipped(renamed):
        return None
    module, _, leaf = renamed.rpartition(".")
    if leaf == "bias" and renamed in expected:
        return renamed, identity
    if leaf == "weight":
        for flax_leaf, transform in WEIGHT_LEAVES:
            if f"{module}.{flax_leaf}" in expected:
                if flax_leaf == "kernel" and ndim == 4:
                    transform = conv_oihw_to_hwio
                return f"{module}.{flax_leaf}", transform
    raise MappingError(f"unexpected tensor {name!r}")


def transformed_shape(shape: tuple[int, ...], transform: Callable) -> tuple[int, ...]:
    # A zero-stride view: transposes are views too, so nothing of the tensor's size is allocated.
    return tuple(transform(np.broadcast_to(np.zeros((), np.bool_), shape)).shape)
