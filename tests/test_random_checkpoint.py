"""The random-checkpoint generator writes the real model's layout, deterministically."""

import json
import math
import pathlib

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer

from conversion.random_checkpoint import (ADDED_TOKENS, FULL_PARAMETERS, LLAMA_SPECIALS, checkpoint_shapes,
                                          count_parameters, parameter_budget, read_shapes, write_random_checkpoint)


def _files(path: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _load_all(path: pathlib.Path, framework: str) -> dict:
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for file in files:
        with safe_open(file, framework) as f:
            out.update((k, f.get_tensor(k)) for k in f.keys())
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> pathlib.Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), size="tiny", seed=0)


def test_deterministic_per_seed(tiny, tmp_path):
    again = write_random_checkpoint(tmp_path / "again", size="tiny", seed=0)
    assert _files(again) == _files(tiny)
    other = _files(write_random_checkpoint(tmp_path / "other", size="tiny", seed=1))
    assert other["model.safetensors"] != _files(tiny)["model.safetensors"]
    assert other["tokenizer.json"] == _files(tiny)["tokenizer.json"]  # the tokenizer does not depend on the seed


@pytest.mark.parametrize("vision_prefix", ["vision_model.vision_model.", "vision_model."])
@pytest.mark.parametrize("shards", [1, 3])
def test_names_and_shapes(tmp_path, vision_prefix, shards):
    path = write_random_checkpoint(tmp_path, size="tiny", dtype="float32", shards=shards, vision_prefix=vision_prefix)
    expected = checkpoint_shapes("tiny", vision_prefix=vision_prefix)
    assert read_shapes(path) == expected
    loaded = _load_all(path, "numpy")  # float32 loads in numpy, independently of our header reader
    assert {k: v.shape for k, v in loaded.items()} == expected

    v = vision_prefix
    assert expected[f"{v}embeddings.patch_embedding.weight"] == (32, 3, 16, 16)
    assert expected[f"{v}embeddings.position_embedding.weight"] == (16, 32)
    assert expected[f"{v}encoder.layers.1.self_attn.out_proj.bias"] == (32,)
    assert expected[f"{v}encoder.layers.1.mlp.fc1.weight"] == (64, 32)
    assert expected["mlp1.1.weight"] == (64, 128)
    assert expected["language_model.embed_tokens.weight"] == (1040, 64)
    assert expected["language_model.layers.1.self_attn.k_proj.weight"] == (32, 64)
    assert expected["language_model.layers.1.self_attn.o_proj.weight"] == (64, 64)
    assert "language_model.layers.0.self_attn.q_proj.bias" not in expected
    assert len([k for k in expected if k.startswith(f"{v}head.")]) == 11


def test_sharded_index(tmp_path):
    path = write_random_checkpoint(tmp_path, size="tiny", shards=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert not (path / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(checkpoint_shapes("tiny"))
    for name, file in index["weight_map"].items():
        with safe_open(path / file, "pt") as f:
            assert name in f.keys()
    bf16_bytes = sum(2 * math.prod(s) for s in checkpoint_shapes("tiny").values())
    assert index["metadata"]["total_size"] == bf16_bytes
    # Sharding only moves tensors between files: the values are those of the single-file layout.
    single = write_random_checkpoint(tmp_path / "single", size="tiny")
    a, b = _load_all(path, "pt"), _load_all(single, "pt")
    assert all(a[k].equal(b[k]) for k in b)


def test_values(tmp_path, tiny):
    f32 = _load_all(write_random_checkpoint(tmp_path, size="tiny", dtype="float32"), "numpy")
    bf16 = _load_all(tiny, "pt")
    # The bf16 file is the float32 one, rounded to nearest.
    assert all(np.array_equal(bf16[k].float().numpy(), f32[k].astype(ml_dtypes.bfloat16).astype(np.float32))
               for k in f32)
    norm = f32["language_model.layers.0.input_layernorm.weight"]
    assert 0.5 < norm.min() and norm.max() < 1.5 and norm.std() > 0.05  # near 1, but not 1
    bias = f32["vision_model.vision_model.encoder.layers.0.self_attn.q_proj.bias"]
    assert (bias != 0).all() and bias.std() < 0.05
    q = f32["language_model.layers.0.self_attn.q_proj.weight"]
    assert q.std() == pytest.approx(1 / 8, rel=0.2)  # 1/sqrt(fan_in 64)


def test_tokenizer(tiny):
    from transformers import AutoTokenizer

    fast = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(tiny)
    config = json.loads((tiny / "config.json").read_text())
    ids = {s: fast.token_to_id(s) for s in LLAMA_SPECIALS + ADDED_TOKENS}

    # Llama-3 specials, then the 10 added tokens, right after the BPE vocabulary, in order.
    first = min(ids.values())
    assert list(ids.values()) == list(range(first, first + 16))
    assert fast.get_vocab_size() == first + 16 <= config["llm_config"]["vocab_size"]
    assert config["img_context_token_id"] == ids["<IMG_CONTEXT>"] == hf.convert_tokens_to_ids("<IMG_CONTEXT>")
    bos = ids["<|begin_of_text|>"]
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        config["llm_config"]["bos_token_id"], config["llm_config"]["eos_token_id"],
        config["llm_config"]["pad_token_id"]) == (bos, ids["<|end_of_text|>"], ids["<|finetune_right_pad_id|>"])

    for text in ["query: hi", "passage: hello world", "passage: <img><IMG_CONTEXT></img> Some text.\n\nMore."]:
        assert fast.encode(text).ids == hf(text)["input_ids"]
        assert fast.encode(text).ids[0] == bos
        assert bos not in fast.encode(text).ids[1:] and ids["<|end_of_text|>"] not in fast.encode(text).ids
        assert hf.decode(hf(text)["input_ids"], skip_special_tokens=False) == "<|begin_of_text|>" + text
    assert len(fast.encode("hello world").ids) <= 4
    # Special tokens never merge with their neighbours; the trailing space stays one token.
    assert fast.encode("<img><IMG_CONTEXT><IMG_CONTEXT></img> ").ids == [
        bos, ids["<img>"], ids["<IMG_CONTEXT>"], ids["<IMG_CONTEXT>"], ids["</img>"], fast.token_to_id("Ġ")]


def test_full_parameter_count_from_shapes():
    shapes = checkpoint_shapes("full")
    assert len(shapes) == 600
    assert sum(math.prod(s) for s in shapes.values()) == FULL_PARAMETERS == 1_678_252_480
    assert parameter_budget("full") == dict(vision=413_534_448, head=15_238_352, projector=13_644_800,
                                            decoder=973_146_112, embedding=262_688_768)
    assert shapes["language_model.layers.15.self_attn.k_proj.weight"] == (512, 2048)
    assert shapes["vision_model.vision_model.embeddings.position_embedding.weight"] == (1024, 1152)
    assert shapes["mlp1.0.weight"] == (4608,)


def test_mid_has_real_widths():
    shapes = checkpoint_shapes("mid")
    assert shapes["language_model.embed_tokens.weight"] == (128266, 2048)
    assert shapes["vision_model.vision_model.encoder.layers.1.mlp.fc2.weight"] == (1152, 4304)
    assert "vision_model.vision_model.encoder.layers.2.mlp.fc2.weight" not in shapes
    assert "language_model.layers.2.mlp.up_proj.weight" not in shapes


def test_count_parameters(tiny):
    assert count_parameters(tiny) == sum(math.prod(s) for s in checkpoint_shapes("tiny").values())


def test_too_many_shards(tmp_path):
    with pytest.raises(ValueError):
        write_random_checkpoint(tmp_path, size="tiny", shards=1000)
