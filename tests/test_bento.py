"""The bento and the container it becomes, checked without Docker and without a network.

`bentoml build` runs offline (in a network namespace of its own where `unshare` allows it, with package indexes
turned off in any case) from a fresh-clone copy of the repository into a temporary BENTOML_HOME: the developer's
BentoML store is never touched. Then: the Dockerfile (CUDA 12 base, jax[cuda12], BentoML's entry point), the APIs
(`apis/openapi.yaml`, the BentoML API `embed_batch`, the NIM routes), the files the bento carries, the service imported
from inside the bento the way a BentoML worker imports it (every project module must come from the bento), and every
third-party import of that code covered by the bento's requirements.

The BentoML model path: a tiny converted checkpoint stored with `python -m bento_tools.store_model`, resolved from
`bento:NAME[:VERSION]`, baked into a bento with `python -m bento_tools.build --model`, laid out as
`bentoml containerize` lays out the image's build context, and resolved and loaded from inside that layout.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
BENTO_NAME = "nemotron-embed-vl"
PACKAGES = ("model", "conversion", "engine", "serving", "bento_tools")  # what the service is made of
NOT_IN_BENTO = ("tests", "bench", "deploy", "indexer", ".venv", ".git", "__pycache__")
NIM_ROUTES = ("/v1/embeddings", "/v1/models", "/v1/health/ready", "/v1/health/live", "/v1/metrics")
MODEL_NAME = "tiny-embed"
TIMEOUT_S = 180


# ---- helpers ------------------------------------------------------------------------------------------------------
@cache
def offline_prefix() -> tuple[str, ...]:
    """`unshare -rn`: a new user and network namespace, no interface but a down loopback. () where not permitted."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode == 0:
        return (unshare, "-rn")
    return ()


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BENTOML_", "BENTO_", "EMBED_", "PYTHONPATH"))}
    return {**env, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "PIP_NO_INDEX": "1",
            "UV_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", **extra}


def run(args: list[str], home: Path, cwd: Path = ROOT, offline: bool = True, **extra: str) -> str:
    """Run a command of this interpreter's environment; its stdout, or a failure showing its output."""
    cmd = [*(offline_prefix() if offline else ()), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env_for(home, **extra), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(args)} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def python(code: str, home: Path, cwd: Path, **extra: str):
    """Run `code` in a fresh interpreter; it prints one JSON line last, returned decoded."""
    out = run([sys.executable, "-c", code], home, cwd=cwd, **extra)
    return json.loads(out.strip().splitlines()[-1])


def bento_dir(home: Path, tag: str) -> Path:
    name, version = tag.split(":")
    return home / "bentos" / name / version


def build_tag(stdout: str) -> str:
    """The tag `bentoml build -o tag` prints (`__tag__:NAME:VERSION`), or the last line of bento_tools.build."""
    found = re.findall(r"__tag__:(\S+)", stdout)
    return found[-1] if found else stdout.strip().splitlines()[-1]


def fresh_clone(dst: Path) -> Path:
    """The files a fresh clone has, plus new files not yet committed (what `git add -A` would commit)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True) if shutil.which("git") else None
    if listed is None or listed.returncode != 0:  # not a git checkout: the tree without what .gitignore ignores
        shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.pyc", ".cache",
                                                                 "checkpoints", "build", "dist", "*.egg-info"))
        return dst
    for rel in filter(None, listed.stdout.split("\0")):
        src = ROOT / rel
        if src.is_file():  # deleted but not yet staged: absent from a clone of the next commit too
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def requirement_closure(lines: list[str]) -> set[str]:
    """Distribution names that installing `lines` brings in, following the installed distributions' metadata."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(line) for line in lines]
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.distribution(req.name).requires or []
        except metadata.PackageNotFoundError:  # e.g. jax's CUDA plugin on a machine without a GPU
            continue
        for dep in map(Requirement, requires):
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append(dep)
    return {name for name, _ in seen}


def imported_modules(src: Path) -> dict[str, set[str]]:
    """Top-level absolute imports of every Python file under `src` (imports inside functions too) -> files."""
    found: dict[str, set[str]] = {}
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [])
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(src)))
    return found


# ---- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bentoml_home")


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return fresh_clone(tmp_path_factory.mktemp("clone"))


@pytest.fixture(scope="module")
def bento(clone, home) -> Path:
    """`bentoml build` of the fresh clone, offline; the bento's directory."""
    if shutil.which("uv") is None:
        try:
            metadata.version("uv")
        except metadata.PackageNotFoundError:
            pytest.fail("uv is not installed: `bentoml build` looks for it even without locking, and installs it "
                        "from PyPI when missing, which cannot work offline (it is in pyproject.toml's test extra)")
    out = run([sys.executable, "-m", "bentoml", "build", "-o", "tag", str(clone)], home, cwd=clone)
    path = bento_dir(home, build_tag(out))
    assert (path / "bento.yaml").is_file(), out
    return path


@pytest.fixture(scope="module")
def bento_yaml(bento) -> dict:
    return yaml.safe_load((bento / "bento.yaml").read_text())


@pytest.fixture(scope="module")
def stored(tiny_converted, home) -> dict:
    """The tiny converted checkpoint stored as the BentoML model `tiny-embed`, through the documented CLI."""
    out = run([sys.executable, "-m", "bento_tools.store_model", str(tiny_converted), "--name", MODEL_NAME, "--quiet"],
              home)
    return json.loads(out)


# ---- the bento -----------------------------------------------------------------------------------------------------
def test_bento_carries_the_service_and_nothing_else(bento, clone):
    src = bento / "src"
    assert (src / "service.py").read_bytes() == (clone / "service.py").read_bytes()
    for package in PACKAGES:
        wanted = sorted(p.relative_to(clone).as_posix() for p in (clone / package).rglob("*.py"))
        assert wanted, f"{package}/ has no Python files"
        carried = sorted(p.relative_to(src).as_posix() for p in (src / package).rglob("*.py"))
        assert carried == wanted, f"{package}/: the bento carries {carried}, the repository has {wanted}"
    assert (src / "pyproject.toml").is_file()  # /v1/version reads the release number from it
    for path in src.rglob("*"):
        parts = path.relative_to(src).parts
        assert not set(parts) & set(NOT_IN_BENTO), f"{path.relative_to(src)} should not be in the bento"
        assert path.suffix != ".pyc"


def test_dockerfile_is_cuda12_with_jax_cuda12(bento, bento_yaml):
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    assert re.fullmatch(r"nvidia/cuda:12\.\d+(\.\d+)?-\S+", base), base
    assert bento_yaml["image"]["base_image"] == base

    requirements = (bento / "env" / "python" / "requirements.txt").read_text().split()
    jax = [Requirement(r) for r in requirements if canonicalize_name(Requirement(r).name) == "jax"]
    assert len(jax) == 1 and jax[0].extras == {"cuda12"}, requirements
    # BentoML's v2 Dockerfile: uv from pip, a virtual environment of the image's Python, the requirements in it.
    assert re.search(r"^RUN apt-get install .*\bpython3-pip\b", dockerfile, re.M)
    assert re.search(r"^ARG PIP_BREAK_SYSTEM_PACKAGES=1$", dockerfile, re.M)  # Ubuntu 24.04's pip refuses otherwise
    python = bento_yaml["image"]["python_version"]
    assert f"uv venv --python {python} /app/.venv" in dockerfile
    ubuntu_python = {"ubuntu24.04": "3.12", "ubuntu22.04": "3.10"}  # another would be downloaded while building
    assert python == ubuntu_python[base.rsplit("-", 1)[-1]], f"{base} has no Python {python}"
    assert "pip install -r $BENTO_PATH/env/python/requirements.txt" in dockerfile
    # The cache directories a volume can be mounted on belong to the service's user.
    setup = [c for c in bento_yaml["image"]["post_commands"] if "env/docker/script__" in c]
    assert len(setup) == 1 and setup[0].split("&& ")[-1] in dockerfile
    script = (bento / setup[0].split("&& ")[-1]).read_text()
    assert "install -d -o bentoml -g bentoml" in script and "/home/bentoml/.cache/nemotron-embed-vl" in script
    # BentoML's entry point: `bentoml serve $BENTO_PATH` as the bentoml user, port 3000.
    assert re.search(r'^ENTRYPOINT \[ "/home/bentoml/bento/env/docker/entrypoint.sh" \]$', dockerfile, re.M)
    assert re.search(r"^USER bentoml$", dockerfile, re.M) and re.search(r"^EXPOSE 3000$", dockerfile, re.M)
    entrypoint = (bento / "env" / "docker" / "entrypoint.sh").read_text()
    assert 'set -- bentoml serve "$@" "$BENTO_PATH"' in entrypoint
    envs = {e["name"]: e["value"] for e in bento_yaml["envs"]}
    assert envs["EMBED_MODEL"] == "nvidia/llama-nemotron-embed-vl-1b-v2"
    assert envs["EMBED_CACHE_DIR"] == "/home/bentoml/.cache/nemotron-embed-vl"
    assert re.search(r"^ENV EMBED_MODEL=\$EMBED_MODEL$", dockerfile, re.M)


def test_requirements_cover_every_import_of_the_bento(bento):
    """Every third-party module the bento's code imports is installed by its requirements (or what they pull in)."""
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().split()
    closure = requirement_closure(requirements)
    local = {p.name for p in (bento / "src").iterdir() if p.is_dir()} | {"service"}
    distributions = metadata.packages_distributions()
    uncovered = {}
    for module, files in imported_modules(bento / "src").items():
        if module in sys.stdlib_module_names or module in local or module == "__future__":
            continue
        dists = {canonicalize_name(d) for d in distributions.get(module, [])}
        assert dists, f"{module} (imported by {sorted(files)}) is not installed here"
        if not dists & closure:
            uncovered[module] = sorted(files)
    assert not uncovered, f"imported but not installed by the bento's requirements: {uncovered}"
    # bentoml: the version this environment runs (pinned in pyproject.toml), added by `bentoml build`.
    assert f"bentoml=={metadata.version('bentoml')}" in requirements


def test_openapi_has_the_bentoml_api_and_the_nim_routes(bento, bento_yaml):
    openapi = yaml.safe_load((bento / "apis" / "openapi.yaml").read_text())
    embed_batch = openapi["paths"]["/embed_batch"]["post"]
    assert embed_batch["x-bentoml-name"] == "embed_batch"
    schema = bento_yaml["schema"]
    (route,) = [r for r in schema["routes"] if r["name"] == "embed_batch"]
    # Not BentoML-batchable: the engine's own queue batches every door's inputs together (engine/queue.py).
    assert route["route"] == "/embed_batch" and route["batchable"] is False
    assert route["input"]["properties"]["items"]["type"] == "array"
    # The NIM routes are a mounted ASGI app: in the bento's schema, not in BentoML's OpenAPI document.
    for path in NIM_ROUTES:
        assert path in schema["paths"] or path in openapi["paths"], f"{path} is not served by the bento"
    config = bento_yaml["services"][0]["config"]
    assert config["endpoints"] == {"livez": "/v1/health/live", "readyz": "/v1/health/ready"}


IMPORT_CHECK = """
import json, os, sys
from _bentoml_impl.loader import load
svc = load(sys.argv[1] if len(sys.argv) > 1 else {bento!r}, standalone_load=True)  # as a BentoML worker does
import bento_tools.model_ref, bento_tools.store_model, bento_tools.build, conversion.__main__  # imported lazily
modules = {{name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())
           if name.split(".")[0] in {packages!r}}}
print(json.dumps({{"service": svc.name, "cwd": os.getcwd(), "modules": modules,
                  "apis": sorted(svc.apis)}}))
"""


def test_service_imports_from_inside_the_bento(bento, home, tmp_path):
    """Loaded from the bento directory by BentoML's loader in a fresh interpreter: every module of the project
    must come from the bento's src/ (a file left out of the bento would be found nowhere, or in the repository)."""
    code = IMPORT_CHECK.format(bento=str(bento), packages=("service", *PACKAGES))
    got = python(code, home, cwd=tmp_path, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    src = (bento / "src").resolve()
    assert got["service"] == BENTO_NAME and Path(got["cwd"]).resolve() == src
    assert "embed_batch" in got["apis"]
    for package in ("service", *PACKAGES):
        assert package in got["modules"], f"{package} was not imported"
    outside = {n: f for n, f in got["modules"].items() if not f or not Path(f).resolve().is_relative_to(src)}
    assert not outside, f"imported from outside the bento: {outside}"


# ---- BentoML models: store, resolve, bake, containerize ----------------------------------------------------------
def test_store_model_and_resolve_bento_refs(stored, home, tiny_converted, tmp_path):
    tag = stored["tag"]
    name, version = tag.split(":")
    assert name == MODEL_NAME and stored["EMBED_MODEL"] == f"bento:{tag}"
    path = Path(stored["path"])
    assert path == home / "models" / name / version
    for f in tiny_converted.iterdir():
        if f.is_file():
            assert (path / f.name).read_bytes() == f.read_bytes(), f.name
    info = yaml.safe_load((path / "model.yaml").read_text())
    from model.weights import FORMAT

    assert info["metadata"]["format"] == FORMAT and info["metadata"]["dtype"]

    code = f"""
import json
from bento_tools.model_ref import bento_model_dir, resolve_model_ref
from conversion.resolve import ModelNotFoundError
from model import Embedder
paths = [str(bento_model_dir(r)) for r in ("bento:{name}", "bento:{tag}", "bento:{name}:latest")]
try:
    bento_model_dir("bento:no-such-model")
    missing = None
except ModelNotFoundError as e:
    missing = str(e)
embedder = Embedder.from_pretrained(resolve_model_ref("bento:{tag}"), dtype="float32")
print(json.dumps({{"paths": paths, "missing": missing, "unchanged": str(resolve_model_ref("/models/x")),
                  "embedding_size": embedder.config.embedding_size}}))
"""
    got = python(code, home, cwd=ROOT)
    assert got["paths"] == [str(path)] * 3
    assert "no-such-model:latest" in got["missing"] and "bento_tools.store_model" in got["missing"]
    assert got["unchanged"] == "/models/x"
    manifest = json.loads((tiny_converted / "manifest.json").read_text())
    assert got["embedding_size"] == manifest["config"]["embedding_size"]


def test_conversion_resolve_accepts_bento_refs(stored, home):
    """EMBED_MODEL=bento:NAME[:VERSION] reaches the service through conversion.resolve (the wiring of
    bento_tools.model_ref into `fetch_source`): the stored directory is used in place, nothing is converted."""
    tag = stored["tag"]
    code = f"""
import json
from conversion.resolve import resolve
from model import Embedder
paths = [str(resolve("bento:{tag}")), str(resolve("bento:{tag.split(':')[0]}"))]
embedder = Embedder.from_pretrained("bento:{tag}", dtype="float32")  # what the service calls with EMBED_MODEL
print(json.dumps({{"paths": paths, "size": embedder.config.embedding_size}}))
"""
    got = python(code, home, cwd=ROOT)
    assert got["paths"] == [stored["path"]] * 2
    assert got["size"] == json.loads((Path(stored["path"]) / "manifest.json").read_text())["config"]["embedding_size"]


CONTAINER_CONTEXT = """
import json, os, shutil, sys
import bentoml
from bentoml._internal.container import construct_containerfile
bento = bentoml.bentos.get(sys.argv[1])
with construct_containerfile(bento, enable_buildkit=True) as (context, dockerfile):  # what containerize hands docker
    shutil.copytree(context, sys.argv[2])
    print(json.dumps({"dockerfile": os.path.relpath(dockerfile, context)}))
"""


def test_model_baked_into_the_image(stored, bento, clone, home, tmp_path):
    """`bento_tools.build --model` then `bentoml containerize`'s build context: the weights are in the image at
    $BENTO_PATH/models, EMBED_MODEL names them, and the service started from that layout finds and loads them."""
    tag = stored["tag"]
    out = run([sys.executable, "-m", "bento_tools.build", str(clone), "--model", MODEL_NAME], home, cwd=clone)
    baked = bento_dir(home, build_tag(out))
    info = yaml.safe_load((baked / "bento.yaml").read_text())
    assert [m["tag"] for m in info["models"]] == [tag]
    envs = {e["name"]: e["value"] for e in info["envs"]}
    assert envs["EMBED_MODEL"] == f"bento:{tag}" and info["labels"]["weights"] == tag
    assert envs["EMBED_CACHE_DIR"] == "/home/bentoml/.cache/nemotron-embed-vl"  # the rest of bentofile.yaml kept
    assert info["image"] == yaml.safe_load((bento / "bento.yaml").read_text())["image"]

    image = tmp_path / "image"  # the build context: what `COPY . ./` puts at /home/bentoml/bento
    out = run([sys.executable, "-c", CONTAINER_CONTEXT, f"{BENTO_NAME}:{baked.name}", str(image)], home)
    dockerfile = (image / json.loads(out.splitlines()[-1])["dockerfile"]).read_text()
    assert re.search(r"^FROM nvidia/cuda:12\.", dockerfile, re.M)
    assert re.search(rf"^ARG EMBED_MODEL=bento:{re.escape(tag)}$", dockerfile, re.M)
    assert re.search(r"^COPY --chown=bentoml:bentoml \. \./$", dockerfile, re.M)
    name, version = tag.split(":")
    weights = image / "models" / name / version
    stored_weights = Path(stored["path"]) / "flax_params.safetensors"
    assert (weights / "flax_params.safetensors").read_bytes() == stored_weights.read_bytes()

    # In the container: BENTO_PATH is that directory and BENTOML_HOME an empty store. Load the service as a worker
    # does (which switches to the bento's model store), then resolve EMBED_MODEL and load the weights.
    code = """
import json, os
from _bentoml_impl.loader import load
load(os.environ["BENTO_PATH"], standalone_load=True)
from bento_tools.model_ref import bento_model_dir
from model import Embedder
path = bento_model_dir(os.environ["EMBED_MODEL"])
print(json.dumps({"path": str(path), "size": Embedder(path, dtype="float32").config.embedding_size}))
"""
    got = python(code, tmp_path / "container_home", cwd=tmp_path, BENTO_PATH=str(image),
                 EMBED_MODEL=envs["EMBED_MODEL"], PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    assert Path(got["path"]) == weights
    assert got["size"] == yaml.safe_load((weights / "manifest.json").read_text())["config"]["embedding_size"]
