"""The attention kernel is chosen concretely when the network is loaded, never while a bucket is traced."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import layers
from model.config import ModelConfig
from model.network import choose_attentions
from model.weights import load_network


@pytest.fixture
def fresh_probe():
    layers.cudnn_supports.cache_clear()
    yield
    layers.cudnn_supports.cache_clear()


def failing_probe(head_dim, dtype):
    raise RuntimeError("cuDNN is not detected.")


def test_the_real_probe_runs_concretely_and_fails_here(fresh_probe, caplog):
    """No cuDNN on this CPU: a probe that only traced would wrongly report success."""
    with caplog.at_level(logging.WARNING, logger="model.layers"):
        assert layers.cudnn_supports(64, "bfloat16") is False
        jax.jit(lambda x: x + layers.cudnn_supports(72, "bfloat16"))(1.0)  # reached under a trace: still concrete
    assert layers.cudnn_supports(72, "bfloat16") is False
    assert len([r for r in caplog.records if "cuDNN attention unavailable" in r.message]) == 2


def test_a_failing_probe_falls_back_to_xla_with_one_log_line(fresh_probe, monkeypatch, caplog, tiny_converted):
    monkeypatch.setattr(layers, "_cudnn_attention_probe", failing_probe)
    cfg = ModelConfig.from_dir(tiny_converted)
    with caplog.at_level(logging.WARNING, logger="model.layers"):
        chosen = choose_attentions(cfg, None, jnp.bfloat16, backend="gpu")
        assert choose_attentions(cfg, None, jnp.bfloat16, backend="gpu") == chosen  # probed once per head size
    assert chosen == {"vision": "xla", "text": "xla"}
    assert [r.message for r in caplog.records] == [
        "cuDNN attention unavailable for head_dim 16 (cuDNN is not detected.): using XLA's"]


def test_a_passing_probe_picks_cudnn_per_tower(fresh_probe, monkeypatch, tiny_converted):
    monkeypatch.setattr(layers, "_cudnn_attention_probe",
                        lambda head_dim, dtype: None if head_dim == 16 else failing_probe(head_dim, dtype))
    cfg = ModelConfig.from_dir(tiny_converted)  # text heads 16 wide, vision heads 32/2 = 16 wide
    assert choose_attentions(cfg, None, jnp.bfloat16, backend="gpu") == {"vision": "cudnn", "text": "cudnn"}
    assert choose_attentions(cfg, None, jnp.float32, backend="gpu") == {"vision": "xla", "text": "xla"}
    assert choose_attentions(cfg, "xla", jnp.bfloat16, backend="gpu") == {"vision": "xla", "text": "xla"}
    assert choose_attentions(cfg, None, jnp.bfloat16, backend="cpu") == {"vision": None, "text": None}


def test_the_loaded_network_carries_the_choice(tiny_converted):
    cfg = ModelConfig.from_dir(tiny_converted)
    outputs = []
    for kernel in ("blocked", "xla"):
        graphdef, state = load_network(tiny_converted, cfg, dtype=jnp.float32, attention_implementation=kernel)
        network = layers.nnx.merge(graphdef, state)
        assert network.language_model.layers.self_attn.implementation == kernel
        assert network.vision_model.encoder.layers.self_attn.implementation == kernel
        outputs.append(network.language_model(jnp.ones((1, 8, 64)), jnp.asarray([5], jnp.int32)))
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)
    with pytest.raises(ValueError, match="attention implementation must be one of"):
        load_network(tiny_converted, cfg, dtype=jnp.float32, attention_implementation="fast")
