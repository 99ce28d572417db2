"""Load converted Flax parameters into the abstract network, checking every name and shape."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
from flax import nnx
from safetensors import safe_open

from model.config import ModelConfig
from model.layers import ATTENTION_KERNELS
from model.network import NemotronEmbedVL, build_abstract, choose_attentions, param_path

PARAMS_FILE = "flax_params.safetensors"
# The converted layout this code reads; conversion writes it in the file's metadata and the manifest. Version 2
# stacks each tower's layers on a leading axis (`language_model.layers.mlp.up_proj.kernel` [L, D, F]); version 1
# had one tensor per layer.
FORMAT = "nemotron-embed-vl-flax/2"


class WeightsError(ValueError):
    pass


def load_network(path: str | Path, cfg: ModelConfig, *, dtype, param_dtype=None,
                 attention_implementation=None) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of the network with the converted parameters of `path`, cast to `param_dtype`.

    Built on `nnx.eval_shape` (nothing allocated twice); fails on unknown, missing or mis-shaped parameters.
    """
    param_dtype = param_dtype or dtype
    # Chosen here, concretely, never while a bucket is traced (where a failing kernel could not be caught).
    if attention_implementation not in (None, *ATTENTION_KERNELS):
        raise ValueError(f"attention implementation must be one of {list(ATTENTION_KERNELS)}; "
                         f"got {attention_implementation!r}")
    attentions = choose_attentions(cfg, attention_implementation, dtype)
    abstract = build_abstract(cfg, dtype=dtype, param_dtype=param_dtype, attention_implementation=attentions)
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    wanted = {param_path(p): p for p in flat}
    file = Path(path) / PARAMS_FILE
    if not file.is_file():
        raise WeightsError(f"{file} not found: convert the checkpoint first (python -m conversion SRC OUT)")
    with safe_open(file, "numpy") as f:
        found = (f.metadata() or {}).get("format")
        if found != FORMAT:
            raise WeightsError(
                f"{file} is in converted format {found!r}, this version reads {FORMAT!r} (layers stacked on a "
                f"leading axis): convert the checkpoint again (python -m conversion SRC OUT); a cached conversion "
                f"made by `from_pretrained` or the server is redone on its own")
        names = set(f.keys())
        problems = [f"unexpected parameter {n!r}" for n in sorted(names - set(wanted))]
        problems += [f"missing parameter {n!r}" for n in sorted(set(wanted) - names)]
        if problems:
            raise WeightsError(f"{file}: " + "; ".join(problems[:10]))
        for name, key in wanted.items():
            variable = flat[key]
            array = f.get_tensor(name)
            if tuple(array.shape) != tuple(variable.shape):
                raise WeightsError(f"{file}: {name} has shape {list(array.shape)}, expected {list(variable.shape)}")
            flat[key] = variable.replace(jax.device_put(jnp.asarray(array, dtype=param_dtype)))
            del array
    return graphdef, nnx.from_flat_state(list(flat.items()))


def network_for_inspection(graphdef: nnx.GraphDef, state: nnx.State) -> NemotronEmbedVL:
    """An eager module for tests and block-by-block comparisons (serving uses the pure forward)."""
    return nnx.merge(graphdef, state)
