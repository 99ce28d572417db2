"""Shared pytest fixtures."""

import sys
from pathlib import Path

import pytest

# The live `bentoml serve` fixtures: one server for every module that asks for `server`/`nim_server`.
pytest.register_assert_rewrite("tests.service_fixtures")
pytest_plugins = ["tests.service_fixtures"]

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `pytest` (not only `python -m pytest`) finds conversion/ and model/
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random float32 checkpoint in the real Hugging Face layout (see conversion/random_checkpoint.py)."""
    from conversion.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"), size="tiny", seed=0, dtype="float32")


@pytest.fixture(scope="session")
def tiny_converted(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint converted to Flax parameters."""
    from conversion.convert import convert

    out = tmp_path_factory.mktemp("tiny_converted")
    convert(tiny_checkpoint, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_embedder(tiny_converted):
    from model import Embedder

    return Embedder(tiny_converted, dtype="float32")
