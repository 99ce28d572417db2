"""Shared pytest fixtures."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `pytest` (not only `python -m pytest`) finds conversion/ and model/
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random float32 checkpoint in the real Hugging Face layout (see conversion/random_checkpoint.py)."""
    from conversion.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"), size="tiny", seed=0, dtype="float32")
