"""Starting without the model at hand: offline, or with the Hugging Face Hub unreachable, and no EMBED_MODEL.

`bentoml serve` must stop at once (exit status 1) with one line that says what failed and what to do instead (a
local checkpoint, or a random one), not a traceback and a server left up unready. "Offline" is simulated with
HF_HUB_OFFLINE=1 or a Hub endpoint where nothing listens (HF_ENDPOINT=http://127.0.0.1:PORT), never the network.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conversion.resolve import DEFAULT_REPO_ID, ModelNotFoundError
from serving.lifecycle import Background
from serving.preflight import RANDOM_CHECKPOINT, check_checkpoint
from tests.service_fixtures import free_port

ROOT = Path(__file__).resolve().parents[1]


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No EMBED_MODEL (the default Hub id), an empty Hugging Face cache, no Hub token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBED_", "HF_", "HUGGING_FACE"))}
    env.update({"HF_HOME": str(tmp_path / "hf"), "EMBED_CACHE_DIR": str(tmp_path / "cache"),
                "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true", "JAX_PLATFORMS": "cpu",
                **extra})
    return env


def unreachable_hub() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connections are refused


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "HF_ENDPOINT"])
def test_serve_without_the_model_offline_stops_with_one_line(tmp_path, offline):
    extra = {"HF_HUB_OFFLINE": "1"} if offline == "HF_HUB_OFFLINE" else {"HF_ENDPOINT": unreachable_hub()}
    done = subprocess.run([sys.executable, "-m", "bentoml", "serve", "--port", str(free_port())], cwd=ROOT,
                          env=clean_env(tmp_path, **extra), capture_output=True, text=True, timeout=180)
    log = done.stdout + done.stderr
    assert done.returncode == 1, log
    assert "Traceback" not in log, log
    fatal = [line for line in log.splitlines() if "FATAL" in line]
    assert len(fatal) == 1, log
    line = fatal[0]
    assert line.startswith(f"FATAL: cannot serve EMBED_MODEL={DEFAULT_REPO_ID}: ")
    reason = "downloads are off (HF_HUB_OFFLINE=1)" if offline == "HF_HUB_OFFLINE" else "is unreachable"
    assert reason in line
    assert "Set EMBED_MODEL to a local checkpoint directory" in line and line.endswith(RANDOM_CHECKPOINT)
    assert "Uvicorn running" not in log and "Starting production" not in log  # no server was left up


def preflight_in_child(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    code = f"from serving.preflight import preflight_download; preflight_download({DEFAULT_REPO_ID!r})"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(tmp_path, **env),
                          capture_output=True, text=True, timeout=120)


def test_a_model_in_the_local_cache_needs_no_network(tmp_path):
    """Offline with the snapshot in the Hugging Face cache: the check passes (the worker will load it)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / f"models--{DEFAULT_REPO_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    for env in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": unreachable_hub()}):
        done = preflight_in_child(tmp_path, **env)
        assert done.returncode == 0, done.stderr
    (repo / "refs" / "main").unlink()  # not cached any more
    done = preflight_in_child(tmp_path, HF_HUB_OFFLINE="1")
    assert done.returncode == 1 and "FATAL: cannot serve" in done.stderr and "Traceback" not in done.stderr


def test_the_library_says_what_to_do_without_naming_the_servers_variable(tmp_path):
    """Embedder.from_pretrained's error (conversion.resolve.download) suits a Python caller: a path in place of
    the Hub id, or a random checkpoint; EMBED_MODEL is the server's setting, not the library's."""
    code = (f"from conversion.resolve import download\n"
            f"try:\n    download({DEFAULT_REPO_ID!r})\n"
            f"except Exception as e:\n    print(type(e).__name__, e)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(tmp_path, HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=120)
    out = done.stdout.strip()
    assert out.startswith("ModelNotFoundError cannot download"), done.stdout + done.stderr
    assert "python -m conversion.random_checkpoint /tmp/tiny --size tiny --dtype float32" in out
    assert "local checkpoint directory in place of the Hub id" in out and "EMBED_MODEL" not in out


def test_the_suggested_random_checkpoint_is_servable(tmp_path):
    make = shlex.split(RANDOM_CHECKPOINT.split(" && ")[0].replace("/tmp/tiny", str(tmp_path / "tiny")))
    assert make[:3] == ["python", "-m", "conversion.random_checkpoint"]
    done = subprocess.run([sys.executable, *make[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    check_checkpoint(str(tmp_path / "tiny"))  # what the server's preflight checks before serving it


def test_a_load_failure_is_logged_as_one_line_first(caplog):
    def missing():
        raise ModelNotFoundError("cannot download 'x': the Hub is unreachable")

    def broken():
        raise RuntimeError("shapes do not match")

    with caplog.at_level(logging.DEBUG, logger="serving.lifecycle"):
        loader = Background(missing).start()
        loader.wait(30)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert loader.failed and len(errors) == 1
    assert errors[0].getMessage() == "model failed to load: ModelNotFoundError: cannot download 'x': the Hub is " \
                                     "unreachable" and not errors[0].exc_info  # explained: no traceback
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)  # the details, for debugging

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="serving.lifecycle"):
        Background(broken).start().wait(30)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].getMessage().startswith("model failed to load: RuntimeError")
    assert errors[0].exc_info  # unexpected: the traceback follows the line
