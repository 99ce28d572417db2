"""The whole embedder network and its pure, jit-compiled forward function.

The network knows nothing of batching policy: it takes one padded batch and returns one unit vector per row.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from model import stacked
from model.config import ModelConfig
from model.layers import choose_attention
from model.llama import LlamaModel
from model.projector import Projector, pixel_shuffle
from model.siglip import SiglipVisionTower


class Batch(NamedTuple):
    """One padded forward pass. Rows are right-padded; padded rows have length ≥ 1 and are discarded.

    input_ids [B, T] int32; lengths [B] int32 (real tokens per row);
    image_index [B, T] int32: row of the flattened image features for an `<IMG_CONTEXT>` position, −1 elsewhere;
    pixels [N, S, S, C] uint8 tiles (RGB, channels last). `None` for both when the batch has no image,
    which compiles a variant that never runs the vision tower.
    """

    input_ids: jax.Array
    lengths: jax.Array
    image_index: jax.Array | None = None
    pixels: jax.Array | None = None


# uint8 -> (x/255 − 0.5)/0.5 in float32 with the reference's operation order, rounded to bfloat16 as its
# processor does. A 256-entry table keeps this bit-exact: XLA may rewrite `/ 255` as `* (1/255)`, which
# rounds differently and flips about 1% of the bfloat16 values.
_PIXEL_TABLE = ((np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)).astype(
    ml_dtypes.bfloat16)


def normalize_pixels(pixels: jax.Array, dtype) -> jax.Array:
    """uint8 tiles -> normalised pixels in `dtype`, exactly as the reference processor computes them."""
    return jnp.asarray(_PIXEL_TABLE)[pixels.astype(jnp.int32)].astype(dtype)


def masked_mean(hidden: jax.Array, lengths: jax.Array) -> jax.Array:
    """Mean over the first `lengths` positions, in float32: [B, T, D] -> [B, D]."""
    mask = (jnp.arange(hidden.shape[1])[None, :] < lengths[:, None]).astype(jnp.float32)[..., None]
    return (hidden.astype(jnp.float32) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)


def l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def choose_attentions(cfg: ModelConfig, requested: str | None, dtype,
                      backend: str | None = None) -> dict[str, str | None]:
    """The attention kernel of each tower ({"vision": …, "text": …}), chosen concretely at load time: the towers'
    head sizes differ (72 and 64 in the real model) and cuDNN may run one and not the other."""
    vision_head = cfg.vision.hidden_size // cfg.vision.num_attention_heads
    return {"vision": choose_attention(requested, dtype, vision_head, backend),
            "text": choose_attention(requested, dtype, cfg.text.head_dim, backend)}


class NemotronEmbedVL(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 attention_implementation: str | Mapping[str, str | None] | None = None):
        """attention_implementation: one kernel for both towers, or {"vision": …, "text": …}
        (`choose_attentions`)."""
        self.cfg = cfg
        self.dtype = dtype
        per_tower = attention_implementation if isinstance(attention_implementation, Mapping) else \
            {"vision": attention_implementation, "text": attention_implementation}
        self.vision_model = SiglipVisionTower(cfg.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                              implementation=per_tower["vision"])
        self.mlp1 = Projector(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.language_model = LlamaModel(cfg.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                         implementation=per_tower["text"])

    def image_features(self, pixels: jax.Array) -> jax.Array:
        """uint8 tiles [N, S, S, C] -> decoder-width features [N, tokens_per_tile, D]."""
        vision = self.vision_model(normalize_pixels(pixels, self.dtype))  # [N, P, Dv]
        return self.mlp1(pixel_shuffle(vision, self.cfg.shuffle_factor))

    def input_embeddings(self, input_ids: jax.Array, image_index: jax.Array | None,
                         features: jax.Array | None) -> jax.Array:
        """Token embeddings with image features [F, D] spliced in at `<IMG_CONTEXT>` positions: [B, T, D]."""
        embeds = self.language_model.embed_tokens(input_ids).astype(self.dtype)
        if features is None:
            return embeds
        spliced = features.astype(self.dtype)[jnp.maximum(image_index, 0)]
        return jnp.where(image_index[..., None] >= 0, spliced, embeds)

    def pool(self, embeds: jax.Array, lengths: jax.Array) -> jax.Array:
        """Decoder, masked mean, L2 normalisation: [B, T, D] -> [B, D] float32."""
        return l2_normalize(masked_mean(self.language_model(embeds, lengths), lengths))

    def __call__(self, batch: Batch) -> jax.Array:
        """-> L2-normalised embeddings [B, D], float32."""
        features = None
        if batch.pixels is not None:
            features = self.image_features(batch.pixels)
            features = features.reshape(-1, features.shape[-1])  # [N·tokens_per_tile, D]
        return self.pool(self.input_embeddings(batch.input_ids, batch.image_index, features), batch.lengths)


def build_abstract(cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                   attention_implementation=None) -> NemotronEmbedVL:
    """The network with shapes only: nothing is allocated."""
    return nnx.eval_shape(lambda: NemotronEmbedVL(
        cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0),
        attention_implementation=attention_implementation))


def param_path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def stacked_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flax parameter name -> shape as the network holds them, each tower's layers stacked on a leading axis
    (`language_model.layers.mlp.up_proj.kernel` [L, D, F]); from the configuration alone (no allocation)."""
    state = nnx.state(build_abstract(cfg), nnx.Param)
    return {param_path(path): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flax parameter name -> shape with every layer listed apart (`language_model.layers.{i}.…`), one entry per
    tensor of the checkpoint: the names conversion maps to before it stacks them (`stacked_shapes`)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in stacked_shapes(cfg).items():
        if stacked.is_stacked(name):
            out.update({stacked.layer_name(name, i): shape[1:] for i in range(shape[0])})
        else:
            out[name] = shape
    return out


def make_forward(graphdef: nnx.GraphDef):
    """A pure jit-compiled function (state, batch) -> embeddings; split once, never walk the graph per call."""

    @jax.jit
    def forward(state: nnx.State, batch: Batch) -> jax.Array:
        return nnx.merge(graphdef, state)(batch)

    return forward


class Staged(NamedTuple):
    """The forward pass in stages, each a pure jit-compiled function, for an engine that buckets them apart:

    vision(state, pixels [N, S, S, C], capacity) -> features [capacity·tokens_per_tile, D], zero-padded, so
      the decoder sees one feature shape whatever the tile bucket;
    text(state, input_ids, lengths) -> [B, D]: never runs the vision tower;
    multimodal(state, input_ids, lengths, image_index, features) -> [B, D].
    """

    vision: Any
    text: Any
    multimodal: Any


def make_staged(graphdef: nnx.GraphDef) -> Staged:
    @functools.partial(jax.jit, static_argnames="capacity")
    def vision(state, pixels, capacity: int):
        features = nnx.merge(graphdef, state).image_features(pixels)  # [N, tokens_per_tile, D]
        features = jnp.pad(features, ((0, capacity - features.shape[0]), (0, 0), (0, 0)))
        return features.reshape(-1, features.shape[-1])

    @jax.jit
    def text(state, input_ids, lengths):
        model = nnx.merge(graphdef, state)
        return model.pool(model.input_embeddings(input_ids, None, None), lengths)

    @jax.jit
    def multimodal(state, input_ids, lengths, image_index, features):
        model = nnx.merge(graphdef, state)
        return model.pool(model.input_embeddings(input_ids, image_index, features), lengths)

    return Staged(vision, text, multimodal)
