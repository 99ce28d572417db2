"""A stack of identical layers held as one module whose parameters have a leading layer axis [L, …].

Running it is one `jax.lax.scan` over that axis, so a compiled program holds the layer body once whatever the
depth: tracing, lowering and compiling a bucket cost about the same for 2 layers as for 16. The layer keeps its
own (Hugging Face) submodule names, so `layers.self_attn.q_proj.kernel` is the stacked `layers.{i}.…` of the
checkpoint; `layer_name` and `stacked_name` translate between the two.
"""

from __future__ import annotations

import re
from typing import Callable, TypeVar

import jax
from flax import nnx

M = TypeVar("M", bound=nnx.Module)

# Flax prefixes whose parameters are stacked on a leading layer axis (the `layers` attribute of each tower).
STACKS: tuple[str, ...] = ("vision_model.encoder.layers.", "language_model.layers.")
_PER_LAYER = re.compile(r"^(?P<stack>" + "|".join(re.escape(s) for s in STACKS) + r")(?P<index>\d+)\.(?P<leaf>.+)$")


def stack(make: Callable[[nnx.Rngs], M], count: int, rngs: nnx.Rngs) -> M:
    """`count` layers built by `make`, as one module whose every parameter is stacked on axis 0."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=0, out_axes=0)
    def build(layer_rngs: nnx.Rngs) -> M:
        return make(layer_rngs)

    return build(rngs)


def scan(layers: nnx.Module, x: jax.Array, *args) -> jax.Array:
    """x through every layer of the stack in order: `x = layer(x, *args)`, as one scan over the layer axis."""
    graphdef, params = nnx.split(layers)

    def body(carry, layer_params):
        return nnx.merge(graphdef, layer_params)(carry, *args), None

    return jax.lax.scan(body, x, params)[0]


def layer(layers: M, index: int) -> M:
    """Layer `index` of a stack as an ordinary module (for inspection and block-by-block tests)."""
    graphdef, params = nnx.split(layers)
    return nnx.merge(graphdef, jax.tree.map(lambda p: p[index], params))


def num_layers(layers: nnx.Module) -> int:
    return jax.tree.leaves(nnx.state(layers))[0].shape[0]


def stacked_name(name: str) -> tuple[str, int | None]:
    """`…layers.{i}.leaf` -> (`…layers.leaf`, i); any other name -> (name, None)."""
    m = _PER_LAYER.match(name)
    return (m["stack"] + m["leaf"], int(m["index"])) if m else (name, None)


def layer_name(name: str, index: int) -> str:
    """The inverse of `stacked_name` for a stacked parameter: (`…layers.leaf`, i) -> `…layers.{i}.leaf`."""
    for prefix in STACKS:
        if name.startswith(prefix):
            return f"{prefix}{index}.{name[len(prefix):]}"
    raise ValueError(f"{name!r} is not a stacked parameter")


def is_stacked(name: str) -> bool:
    return name.startswith(STACKS)
