"""Conversion of the Hugging Face checkpoint: the name table, streaming output, manifest, checks and the CLI."""

import json
import math
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from conversion.convert import ConversionError, convert, sha256
from conversion.mapping import MappingError, conv_oihw_to_hwio, map_tensor, transformed_shape
from conversion.random_checkpoint import FULL_PARAMETERS, SIZES, checkpoint_shapes, write_random_checkpoint
from conversion.resolve import ModelNotFoundError, resolve
from conversion.safetensors_stream import write_streaming
from model.config import ModelConfig
from model.network import param_shapes


def full_config() -> ModelConfig:
    sizes = SIZES["full"]
    return ModelConfig.from_hf_config({
        "vision_config": sizes["vision_config"], "llm_config": sizes["llm_config"],
        "img_context_token_id": 128258, "downsample_ratio": 0.5,
    })


def test_full_size_shapes_add_up_without_allocating():
    """The real model's parameter count, through jax.eval_shape, with the skipped SigLIP head counted."""
    shapes = param_shapes(full_config())
    head = sum(math.prod(s) for n, s in checkpoint_shapes("full").items() if ".head." in n)
    assert head == 15_238_352
    assert sum(math.prod(s) for s in shapes.values()) + head == FULL_PARAMETERS == 1_678_252_480
    assert shapes["language_model.embed_tokens.embedding"] == (128266, 2048)
    assert shapes["language_model.layers.15.self_attn.k_proj.kernel"] == (2048, 512)
    assert shapes["vision_model.embeddings.patch_embedding.kernel"] == (16, 16, 3, 1152)
    assert shapes["mlp1.fc1.kernel"] == (4608, 2048)


@pytest.mark.parametrize("vision_prefix", ["vision_model.vision_model.", "vision_model."])
@pytest.mark.parametrize("llm_prefix", ["language_model.", "language_model.model."])
def test_every_full_size_tensor_maps_to_a_model_parameter(vision_prefix, llm_prefix):
    expected = param_shapes(full_config())
    mapped = {}
    for name, shape in checkpoint_shapes("full", vision_prefix, llm_prefix).items():
        result = map_tensor(name, len(shape), expected)
        if result is None:
            assert ".head." in name
            continue
        flax_name, transform = result
        mapped[flax_name] = transformed_shape(shape, transform)
    assert mapped == expected


def test_transforms():
    w = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # [O, I, kh, kw]
    assert conv_oihw_to_hwio(w)[1, 2, 0, 1] == w[1, 0, 1, 2]
    expected = {"mlp1.fc1.kernel": (4, 2), "language_model.norm.scale": (4,), "language_model.embed_tokens.embedding": (9, 4)}
    name, t = map_tensor("mlp1.1.weight", 2, expected)
    assert name == "mlp1.fc1.kernel" and t(np.ones((2, 4))).shape == (4, 2)
    assert map_tensor("language_model.norm.weight", 1, expected)[0] == "language_model.norm.scale"
    assert map_tensor("language_model.model.embed_tokens.weight", 2, expected)[0] == "language_model.embed_tokens.embedding"
    assert map_tensor("vision_model.vision_model.head.probe", 3, expected) is None
    with pytest.raises(MappingError, match="lm_head.weight"):
        map_tensor("lm_head.weight", 2, expected)


def test_streaming_writer_round_trips(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
               "b": np.linspace(-1, 1, 10).astype(ml_dtypes.bfloat16)}
    specs = [("a", (2, 3), "F32"), ("b", (10,), "BF16")]
    write_streaming(tmp_path / "x.safetensors", specs, tensors.__getitem__, metadata={"format": "t"})
    with safe_open(tmp_path / "x.safetensors", "numpy") as f:
        assert f.metadata() == {"format": "t"}
        for k, v in tensors.items():
            np.testing.assert_array_equal(f.get_tensor(k), v)
    with pytest.raises(ValueError, match="header says"):
        write_streaming(tmp_path / "y.safetensors", [("a", (3, 2), "F32")], tensors.__getitem__)


def converted_params(path):
    return load_file(path / "flax_params.safetensors")


@pytest.mark.parametrize("layout", [dict(shards=3), dict(vision_prefix="vision_model.", llm_prefix="language_model.model.")])
def test_layouts_convert_to_the_same_parameters(tmp_path, tiny_converted, layout):
    src = write_random_checkpoint(tmp_path / "src", size="tiny", seed=0, dtype="float32", **layout)
    convert(src, tmp_path / "out", progress=False)
    a, b = converted_params(tmp_path / "out"), converted_params(tiny_converted)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_values_are_the_transformed_source(tiny_checkpoint, tiny_converted):
    src = load_file(tiny_checkpoint / "model.safetensors")
    out = converted_params(tiny_converted)
    np.testing.assert_array_equal(out["language_model.layers.self_attn.q_proj.kernel"][1],
                                  src["language_model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(out["vision_model.embeddings.patch_embedding.kernel"],
                                  src["vision_model.vision_model.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(out["mlp1.layer_norm.scale"], src["mlp1.0.weight"])
    np.testing.assert_array_equal(out["vision_model.encoder.layers.layer_norm2.bias"][0],
                                  src["vision_model.vision_model.encoder.layers.0.layer_norm2.bias"])


def test_manifest(tiny_checkpoint, tiny_converted):
    m = json.loads((tiny_converted / "manifest.json").read_text())
    n_src = sum(v.size for v in load_file(tiny_checkpoint / "model.safetensors").values())
    assert m["parameters"]["total"] == n_src
    assert m["parameters"]["skipped"] == sum(v.size for k, v in load_file(tiny_checkpoint / "model.safetensors").items() if ".head." in k)
    assert m["files"]["model.safetensors"] == sha256(tiny_checkpoint / "model.safetensors")
    assert m["dtype"] == "float32" and m["tool"]["version"]
    assert m["config"]["embedding_size"] == 64
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_converted / f).read_bytes() == (tiny_checkpoint / f).read_bytes()


def test_bfloat16_output(tiny_checkpoint, tmp_path):
    m = convert(tiny_checkpoint, tmp_path, dtype="bfloat16", progress=False)
    assert m["dtype"] == "bfloat16"
    with safe_open(tmp_path / "flax_params.safetensors", "numpy") as f:
        assert f.get_tensor("mlp1.fc2.bias").dtype == ml_dtypes.bfloat16


def broken_checkpoint(tiny_checkpoint, tmp_path, edit):
    import shutil

    dst = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("language_model.layers.1.mlp.up_proj.weight"), "missing tensor for 'language_model.layers.1.mlp.up_proj.kernel'"),
    (lambda t: t.__setitem__("language_model.lm_head.weight", np.zeros((2, 2), np.float32)), "unexpected tensor 'language_model.lm_head.weight'"),
    (lambda t: t.__setitem__("mlp1.3.weight", np.zeros((3, 64), np.float32)), "mis-shaped tensor 'mlp1.3.weight'"),
])
def test_mismatches_are_named_before_anything_is_written(tiny_checkpoint, tmp_path, edit, message):
    src = broken_checkpoint(tiny_checkpoint, tmp_path, edit)
    with pytest.raises(ConversionError, match=message.replace("[", r"\[")):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli(tiny_checkpoint, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "conversion", str(tiny_checkpoint), str(tmp_path / "out"), "--quiet"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["parameters"]["total"] > 0
    bad = subprocess.run([sys.executable, "-m", "conversion", str(tmp_path / "nowhere"), str(tmp_path / "o2")],
                         capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert bad.returncode == 1 and bad.stderr.startswith("error:")


def test_resolve_converts_once_and_caches(tiny_checkpoint, tiny_converted, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBED_CACHE_DIR", str(tmp_path / "cache"))
    first = resolve(tiny_checkpoint, progress=False)
    assert first.parent.parent == tmp_path / "cache"
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert resolve(tiny_checkpoint, progress=False) == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    assert resolve(tiny_converted) == tiny_converted
    with pytest.raises(ModelNotFoundError, match="neither a converted model nor"):
        resolve(tmp_path)


def test_hub_download_offline_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="unreachable"):
        resolve("nvidia/llama-nemotron-embed-vl-1b-v2")


def test_layers_are_stored_stacked(tiny_checkpoint, tiny_converted):
    """Each tower's per-layer tensors become one [L, …] parameter, layer i at index i."""
    src = load_file(tiny_checkpoint / "model.safetensors")
    out = converted_params(tiny_converted)
    assert not [k for k in out if ".layers.0." in k or ".layers.1." in k]
    for flax_name, hf, transform in [
        ("language_model.layers.mlp.down_proj.kernel", "language_model.layers.{}.mlp.down_proj.weight", np.transpose),
        ("language_model.layers.input_layernorm.scale", "language_model.layers.{}.input_layernorm.weight", None),
        ("vision_model.encoder.layers.self_attn.k_proj.bias",
         "vision_model.vision_model.encoder.layers.{}.self_attn.k_proj.bias", None),
    ]:
        expected = np.stack([(transform or np.asarray)(src[hf.format(i)]) for i in range(2)])
        np.testing.assert_array_equal(out[flax_name], expected)
    with safe_open(tiny_converted / "flax_params.safetensors", "numpy") as f:
        assert f.metadata() == {"format": "nemotron-embed-vl-flax/2"}
    assert json.loads((tiny_converted / "manifest.json").read_text())["format"] == "nemotron-embed-vl-flax/2"


def test_streaming_writer_takes_a_tensor_slice_by_slice(tmp_path):
    layers = [np.full((2, 3), i, np.float32) for i in range(4)]
    write_streaming(tmp_path / "x.safetensors", [("s", (4, 2, 3), "F32")], lambda _: iter(layers))
    np.testing.assert_array_equal(load_file(tmp_path / "x.safetensors")["s"], np.stack(layers))
    for wrong in (layers[:3], layers + layers[:1]):
        with pytest.raises(ValueError, match="slices"):
            write_streaming(tmp_path / "y.safetensors", [("s", (4, 2, 3), "F32")], lambda _, w=wrong: iter(w))


def per_layer_copy(converted, dst):
    """`converted` rewritten in the first converted format: one tensor per layer, format 1 in file and manifest."""
    import shutil

    from model.stacked import is_stacked, layer_name

    shutil.copytree(converted, dst)
    params = {}
    for name, array in converted_params(converted).items():
        if is_stacked(name):
            params.update({layer_name(name, i): np.ascontiguousarray(a) for i, a in enumerate(array)})
        else:
            params[name] = array
    save_file(params, dst / "flax_params.safetensors", metadata={"format": "nemotron-embed-vl-flax/1"})
    manifest = json.loads((dst / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps(manifest | {"format": "nemotron-embed-vl-flax/1"}))
    return dst


def test_a_directory_in_the_per_layer_format_is_refused_clearly(tiny_converted, tmp_path):
    from model.config import ModelConfig
    from model.weights import WeightsError, load_network

    old = per_layer_copy(tiny_converted, tmp_path / "old")
    with pytest.raises(WeightsError, match=r"format 'nemotron-embed-vl-flax/1'.*python -m conversion SRC OUT"):
        load_network(old, ModelConfig.from_dir(old), dtype=np.float32)


def test_resolve_converts_a_stale_cached_conversion_again(tiny_checkpoint, tiny_converted, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("EMBED_CACHE_DIR", str(tmp_path / "cache"))
    cached = resolve(tiny_checkpoint, progress=False)
    shutil.rmtree(cached)
    per_layer_copy(tiny_converted, cached)
    assert resolve(tiny_checkpoint, progress=False) == cached
    assert json.loads((cached / "manifest.json").read_text())["format"] == "nemotron-embed-vl-flax/2"
    a, b = converted_params(cached), converted_params(tiny_converted)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
