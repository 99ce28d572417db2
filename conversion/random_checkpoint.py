"""Small random checkpoints in the exact Hugging Face layout of llama-nemotron-embed-vl-1b-v2.

Nothing real can be downloaded in tests or benchmarks, so this writes a checkpoint directory that
looks like the published one (config.json, safetensors with the real tensor names and PyTorch
layouts, a Llama-3-style tokenizer) with random weights:

    python -m conversion.random_checkpoint OUT_DIR --size {tiny,mid,full} [--seed N]
        [--dtype bfloat16|float32] [--shards N]

The weights are streamed tensor by tensor into a hand-written safetensors file, so even `full`
(1.68B parameters) needs only a few tens of MB of memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import struct
import zlib
from typing import NamedTuple

import ml_dtypes
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# HF keys for each size. `mid` has the real widths but 2 + 2 layers; `full` is the real model.
_REAL_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    patch_size=16, image_size=512)
_REAL_LLM = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=64, vocab_size=128266)
SIZES: dict[str, dict[str, dict[str, int]]] = {
    "tiny": dict(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=16, image_size=64),
        # The tokenizer's 1034 ids rounded up to a multiple of 8 (checked when writing).
        llm_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=1040),
    ),
    "mid": dict(vision_config=dict(_REAL_VISION, num_hidden_layers=2), llm_config=dict(_REAL_LLM, num_hidden_layers=2)),
    "full": dict(vision_config=dict(_REAL_VISION), llm_config=dict(_REAL_LLM)),
}
FULL_PARAMETERS = 1_678_252_480  # the published model's count, head included

DEFAULT_VISION_PREFIX = "vision_model.vision_model."
DEFAULT_LLM_PREFIX = "language_model."


# ----------------------------------------------------------------------------------------------
# Tensor table
# ----------------------------------------------------------------------------------------------

class _Tensor(NamedTuple):
    part: str  # "vision", "head", "projector" or "llm": picks the prefix, and labels the parameter budget
    name: str  # name below the prefix
    shape: tuple[int, ...]
    init: str  # "matrix" (std 1/sqrt(fan_in)), "norm" (1 + 0.1 N), "bias" / "small" (0.02 N), "embed" (N)


def _tensor_table(size: str) -> list[_Tensor]:
    v, lm = SIZES[size]["vision_config"], SIZES[size]["llm_config"]
    dv, iv, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    dl, il, hd = lm["hidden_size"], lm["intermediate_size"], lm["head_dim"]
    q_out, kv_out = lm["num_attention_heads"] * hd, lm["num_key_value_heads"] * hd
    dp = dv * 4  # pixel shuffle at ratio 0.5 concatenates 2x2 neighbours
    t: list[_Tensor] = []

    def linear(part, name, out_dim, in_dim, bias=True):
        t.append(_Tensor(part, f"{name}.weight", (out_dim, in_dim), "matrix"))
        if bias:
            t.append(_Tensor(part, f"{name}.bias", (out_dim,), "bias"))

    def layer_norm(part, name, dim, bias=True):
        t.append(_Tensor(part, f"{name}.weight", (dim,), "norm"))
        if bias:
            t.append(_Tensor(part, f"{name}.bias", (dim,), "bias"))

    t.append(_Tensor("vision", "embeddings.patch_embedding.weight", (dv, 3, p, p), "matrix"))
    t.append(_Tensor("vision", "embeddings.patch_embedding.bias", (dv,), "bias"))
    t.append(_Tensor("vision", "embeddings.position_embedding.weight", ((v["image_size"] // p) ** 2, dv), "small"))
    for i in range(v["num_hidden_layers"]):
        b = f"encoder.layers.{i}"
        layer_norm("vision", f"{b}.layer_norm1", dv)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear("vision", f"{b}.self_attn.{proj}", dv, dv)
        layer_norm("vision", f"{b}.layer_norm2", dv)
        linear("vision", f"{b}.mlp.fc1", iv, dv)
        linear("vision", f"{b}.mlp.fc2", dv, iv)
    layer_norm("vision", "post_layernorm", dv)

    # SigLIP's attention-pooling head: in the checkpoint, never used by the embedder.
    t.append(_Tensor("head", "head.probe", (1, 1, dv), "small"))
    t.append(_Tensor("head", "head.attention.in_proj_weight", (3 * dv, dv), "matrix"))
    t.append(_Tensor("head", "head.attention.in_proj_bias", (3 * dv,), "bias"))
    linear("head", "head.attention.out_proj", dv, dv)
    layer_norm("head", "head.layernorm", dv)
    linear("head", "head.mlp.fc1", iv, dv)
    linear("head", "head.mlp.fc2", dv, iv)

    # mlp1 is a torch Sequential: 0 LayerNorm, 1 Linear, 2 GELU (no weights), 3 Linear.
    layer_norm("projector", "mlp1.0", dp)
    linear("projector", "mlp1.1", dl, dp)
    linear("projector", "mlp1.3", dl, dl)

    t.append(_Tensor("llm", "embed_tokens.weight", (lm["vocab_size"], dl), "embed"))
    for i in range(lm["num_hidden_layers"]):
        b = f"layers.{i}"
        layer_norm("llm", f"{b}.input_layernorm", dl, bias=False)
        linear("llm", f"{b}.self_attn.q_proj", q_out, dl, bias=False)
        linear("llm", f"{b}.self_attn.k_proj", kv_out, dl, bias=False)
        linear("llm", f"{b}.self_attn.v_proj", kv_out, dl, bias=False)
        linear("llm", f"{b}.self_attn.o_proj", dl, q_out, bias=False)
        layer_norm("llm", f"{b}.post_attention_layernorm", dl, bias=False)
        linear("llm", f"{b}.mlp.gate_proj", il, dl, bias=False)
        linear("llm", f"{b}.mlp.up_proj", il, dl, bias=False)
        linear("llm", f"{b}.mlp.down_proj", dl, il, bias=False)
    layer_norm("llm", "norm", dl, bias=False)
    return t


def _full_name(t: _Tensor, vision_prefix: str, llm_prefix: str) -> str:
    prefix = {"vision": vision_prefix, "head": vision_prefix, "projector": "", "llm": llm_prefix}[t.part]
    return prefix + t.name


def checkpoint_shapes(size: str, vision_prefix: str = DEFAULT_VISION_PREFIX,
                      llm_prefix: str = DEFAULT_LLM_PREFIX) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a `size` checkpoint and its PyTorch-layout shape, in writing order."""
    return {_full_name(t, vision_prefix, llm_prefix): t.shape for t in _tensor_table(size)}


def parameter_budget(size: str) -> dict[str, int]:
    """Parameters per part, as MODEL_SPEC counts them: vision, head, projector, decoder, embedding."""
    budget = dict.fromkeys(("vision", "head", "projector", "decoder", "embedding"), 0)
    for t in _tensor_table(size):
        part = {"llm": "embedding" if t.name == "embed_tokens.weight" else "decoder"}.get(t.part, t.part)
        budget[part] += math.prod(t.shape)
    return budget


# ----------------------------------------------------------------------------------------------
# Weights: a streaming safetensors writer
# ----------------------------------------------------------------------------------------------

_DTYPES = {"bfloat16": (ml_dtypes.bfloat16, "BF16"), "float32": (np.dtype("<f4"), "F32")}
_CHUNK = 1 << 22  # elements generated at once: bounds memory whatever the tensor size


def _random_chunks(t: _Tensor, seed: int, dtype):
    """Yield the tensor's values, chunk by chunk, already cast to `dtype`.

    The generator is seeded by (seed, part + name), so a tensor's values do not depend on the
    prefixes, the sharding, or the other tensors of the table.
    """
    rng = np.random.default_rng([seed, zlib.crc32(f"{t.part}/{t.name}".encode())])
    n = math.prod(t.shape)
    for start in range(0, n, _CHUNK):
        x = rng.standard_normal(min(_CHUNK, n - start), dtype=np.float32)
        if t.init == "matrix":
            # 1/sqrt(fan_in) keeps every sublayer's output at about unit variance, so activations stay
            # sane through all layers and every layer visibly changes the result.
            x *= 1.0 / math.sqrt(math.prod(t.shape[1:]))
        elif t.init == "norm":
            x = 1.0 + 0.1 * x  # not all ones, so that a wrongly mapped norm weight shows in tests
        elif t.init in ("bias", "small"):
            x *= 0.02
        # "embed": unit normal, so token identity is as strong as the sublayers' outputs and
        # the image features (about 0.65 std) spliced next to it.
        yield x.astype(dtype)


def _write_safetensors(path: pathlib.Path, tensors: list[tuple[str, _Tensor]], seed: int, dtype: str) -> int:
    """Write one safetensors file, tensor by tensor; return the bytes of tensor data."""
    np_dtype, st_dtype = _DTYPES[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors:
        nbytes = math.prod(t.shape) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces to 8-byte alignment
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in tensors:
            for chunk in _random_chunks(t, seed, np_dtype):
                f.write(chunk.view(np.uint8).data)  # x86/ARM are little-endian, as the format wants
    return offset


def _split_shards(tensors: list, nbytes: list[int], shards: int) -> list[list]:
    """Cut the ordered tensors into `shards` non-empty runs of roughly equal bytes."""
    if not 1 <= shards <= len(tensors):
        raise ValueError(f"shards must be in [1, {len(tensors)}], got {shards}")
    out, current, current_bytes, left_bytes = [], [], 0, sum(nbytes)
    for k, (t, b) in enumerate(zip(tensors, nbytes)):
        current.append(t)
        current_bytes += b
        shards_left, tensors_left = shards - len(out), len(tensors) - k - 1
        if shards_left > 1 and (current_bytes >= left_bytes / shards_left or tensors_left == shards_left - 1):
            out.append(current)
            left_bytes -= current_bytes
            current, current_bytes = [], 0
    out.append(current)
    return out


def _write_weights(out_dir: pathlib.Path, size: str, seed: int, dtype: str, shards: int,
                   vision_prefix: str, llm_prefix: str) -> None:
    tensors = [(_full_name(t, vision_prefix, llm_prefix), t) for t in _tensor_table(size)]
    if shards == 1:
        _write_safetensors(out_dir / "model.safetensors", tensors, seed, dtype)
        return
    itemsize = np.dtype(_DTYPES[dtype][0]).itemsize
    groups = _split_shards(tensors, [math.prod(t.shape) * itemsize for _, t in tensors], shards)
    weight_map, total = {}, 0
    for k, group in enumerate(groups, 1):
        filename = f"model-{k:05d}-of-{shards:05d}.safetensors"
        total += _write_safetensors(out_dir / filename, group, seed, dtype)
        weight_map.update((name, filename) for name, _ in group)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out_dir / "model.safetensors.index.json", index)


def _safetensors_files(path: pathlib.Path) -> list[pathlib.Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [path / "model.safetensors"]


def read_shapes(path: str | pathlib.Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a checkpoint directory, read from the safetensors headers only."""
    shapes = {}
    for file in _safetensors_files(pathlib.Path(path)):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        shapes.update((name, tuple(info["shape"])) for name, info in header.items())
    return shapes


def count_parameters(path: str | pathlib.Path) -> int:
    """Parameters of a checkpoint directory; checks a full-size one against the published count."""
    shapes = read_shapes(path)
    total = sum(math.prod(s) for s in shapes.values())
    config = json.loads((pathlib.Path(path) / "config.json").read_text())
    if config["vision_config"]["num_hidden_layers"] == 27 and config["llm_config"]["num_hidden_layers"] == 16:
        assert total == FULL_PARAMETERS, f"full-size checkpoint has {total:,} parameters, not {FULL_PARAMETERS:,}"
    return total


# ----------------------------------------------------------------------------------------------
# Tokenizer: a small Llama-3-style byte-level BPE
# ----------------------------------------------------------------------------------------------

# Llama 3's pre-tokenizer split, verbatim from its tokenizer.json.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BPE_SIZE = 1018  # bytes + merges; chosen so the image tokens start at 1024
# Llama 3.2's first six special tokens (its ids 128000-128005), then the model's 10 added tokens.
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>"]
ADDED_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
                "<interval>"]
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"

_CORPUS = """\
The quick brown fox jumps over the lazy dog. Hello world! Hello, world: hello again, world.
A query is a short question; a passage is a longer piece of text that may answer it. The embedder
turns each query, passage, image or page into one vector, and documents are ranked by the cosine
similarity between their vectors and the query's vector.
Images are cut into tiles of five hundred and twelve pixels; each tile becomes a grid of patches,
and every patch is projected into the language model's space before the bidirectional decoder reads
the whole sequence at once. The output is the mean of the final hidden states, normalised to unit length.
In 2024, researchers measured retrieval quality on benchmarks with tables, charts, slides, scanned
forms, invoices, receipts, reports and manuals. Numbers such as 3.14, 42, 1000 and 65536 appear often.
What is the capital of France? Paris is the capital and the largest city of France, on the Seine river.
Which planet is the largest in the solar system? Jupiter is, followed by Saturn, Uranus and Neptune.
How do plants make food? Through photosynthesis, using sunlight, water and carbon dioxide.
Why is the sky blue? Because air scatters short wavelengths of sunlight more than long ones.
Weather today: cloudy in the morning, sunny in the afternoon, with light winds from the west.
Recipe: mix flour, sugar, butter and eggs; bake for thirty minutes until golden brown.
The server receives a request, validates it, batches it with others, runs the model on the
accelerator and returns the embeddings in the same order as the inputs.
Python code: def embed(texts): return model(tokenizer(texts)). JSON: {"input": ["hello"], "model": "embed"}.
Rivers, mountains, forests, deserts, oceans, islands and valleys cover the surface of the Earth.
Music, painting, poetry, theatre, dance and film are forms of art enjoyed around the world.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday; January, February, March, April, May,
June, July, August, September, October, November, December.
One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, twenty, hundred, thousand.
Red, orange, yellow, green, blue, indigo, violet, black, white, grey, pink, purple, silver, gold.
She said: "I'll be there at noon," and he replied that they'd meet near the old library's entrance.
Engineers write tests, measure latency and throughput, profile memory, and fix the slowest kernels first.
Doctors, teachers, farmers, pilots, lawyers, artists, scientists and students live in every city.
"""


def build_tokenizer() -> Tokenizer:
    """Train the BPE on the built-in corpus (deterministic), then add the special tokens after it."""
    tok = Tokenizer(models.BPE(ignore_merges=True))  # as Llama 3's tokenizer.json sets it
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_BPE_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    if tok.get_vocab_size() != _BPE_SIZE:
        raise RuntimeError(f"the corpus gave {tok.get_vocab_size()} BPE ids, not {_BPE_SIZE}: extend it")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in LLAMA_SPECIALS + ADDED_TOKENS])
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A:0", pair=f"{BOS} $A:0 {BOS}:1 $B:1",
                                      special_tokens=[(BOS, bos)]),
    ])
    return tok


def _write_tokenizer(out_dir: pathlib.Path, tok: Tokenizer) -> None:
    tok.save(str(out_dir / "tokenizer.json"))
    added = {str(tok.token_to_id(s)): dict(content=s, lstrip=False, normalized=False, rstrip=False,
                                           single_word=False, special=True)
             for s in LLAMA_SPECIALS + ADDED_TOKENS}
    _write_json(out_dir / "tokenizer_config.json", {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "pad_token": PAD,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    _write_json(out_dir / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD})


# ----------------------------------------------------------------------------------------------
# config.json and the entry points
# ----------------------------------------------------------------------------------------------

def _config(size: str, dtype: str, tok: Tokenizer) -> dict:
    vision, llm = copy.deepcopy(SIZES[size]["vision_config"]), copy.deepcopy(SIZES[size]["llm_config"])
    if tok.get_vocab_size() > llm["vocab_size"]:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} ids, more than vocab_size {llm['vocab_size']}")
    vision.update(model_type="siglip_vision_model", num_channels=3, layer_norm_eps=1e-6,
                  hidden_act="gelu_pytorch_tanh", attention_dropout=0.0)
    llm.update(model_type="llama_bidirec", architectures=["LlamaBidirectionalModel"], rms_norm_eps=1e-5,
               rope_theta=500000.0, max_position_embeddings=131072, hidden_act="silu",
               rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
               attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
               bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS),
               pad_token_id=tok.token_to_id(PAD), torch_dtype=dtype)
    return {
        "architectures": ["LlamaNemotronVLModel"],
        "model_type": "llama_nemotron_vl",
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "select_layer": -1,
        "force_image_size": vision["image_size"],
        "img_context_token_id": tok.token_to_id("<IMG_CONTEXT>"),
        "pooling": "avg",
        "query_prefix": "query:",
        "passage_prefix": "passage:",
        "use_thumbnail": True,
        "max_dynamic_patch": 6,
        "q_max_length": 8192,
        "p_max_length": 10240,
        "torch_dtype": dtype,
        "vision_config": vision,
        "llm_config": llm,
    }


def _write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_random_checkpoint(out_dir: str | pathlib.Path, size: str = "tiny", seed: int = 0,
                            dtype: str = "bfloat16", shards: int = 1,
                            vision_prefix: str = DEFAULT_VISION_PREFIX,
                            llm_prefix: str = DEFAULT_LLM_PREFIX) -> pathlib.Path:
    """Write a random checkpoint of `size` into `out_dir` (created if needed) and return its path."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    _write_json(out / "config.json", _config(size, dtype, tok))
    _write_tokenizer(out, tok)
    _write_weights(out, size, seed, dtype, shards, vision_prefix, llm_prefix)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args(argv)
    path = write_random_checkpoint(args.out_dir, args.size, args.seed, args.dtype, args.shards)
    print(f"wrote {path}: {count_parameters(path):,} parameters")


if __name__ == "__main__":
    main()
