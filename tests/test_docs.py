"""The docs run as written: README.md and every docs/*.md (conventions: docs/development.md, "The docs and their test").

- Fenced blocks marked `bash runnable` / `python runnable` are executed in order, one working directory per file,
  against the tiny-checkpoint server of the test run (`nim_server`, tests/service_fixtures.py): `localhost:3000`
  becomes its address, and curl fails on HTTP errors. Other `bash` blocks must parse (`bash -n`), `python` blocks
  compile, `json` and `yaml` blocks load; the repository paths, `python -m` modules and --options their commands
  name must exist.
- The README's test command is the one `.ci/run` runs.
- Environment variables: every one the code reads (serving/settings.py's fields, `os.environ` / `os.getenv` reads in
  any Python file of the repository, `${NAME:-default}` in its shell scripts) or that bentofile.yaml and deploy/ set
  is in docs/configuration.md; every one listed there is read by the code, except under its "Read by the libraries
  underneath" heading, whose variables must at least appear in the repository outside the docs; the defaults listed
  for serving/settings.py's fields are the code's.
- Every Prometheus metric the code defines is in docs/operations.md.
- Every relative link and #anchor resolves.
Nothing here lists variables, metrics or blocks by name: they are discovered, so a new one fails until documented.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGURATION = ROOT / "docs" / "configuration.md"
OPERATIONS = ROOT / "docs" / "operations.md"
EXTERNAL_HEADING = "Read by the libraries underneath"  # configuration.md: variables only libraries read
LOCAL_SERVER = "localhost:3000"  # the address the docs' examples use
BLOCK_TIMEOUT_S = 300
# Prepended to every runnable bash block: an HTTP error fails the block (the docs keep plain `curl -s`).
BASH_PRELUDE = 'set -euo pipefail\ncurl() { command curl --fail-with-body "$@"; }\n'


# ---- reading the docs --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, from 1
    lang: str
    tags: frozenset[str]
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def runnable(self) -> bool:
        return "runnable" in self.tags


_FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


@cache
def blocks(path: Path) -> tuple[Block, ...]:
    found, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, info = opening["fence"], opening["info"].split()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence)
                    and not lines[j].strip().strip(fence[0])), None)
        assert end is not None, f"{path.relative_to(ROOT)}:{i + 1}: a code block is never closed"
        found.append(Block(path, i + 1, info[0].lower() if info else "", frozenset(info[1:]),
                           "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return tuple(found)


def prose(path: Path) -> str:
    """The file without its code blocks and inline code (where links and headings are not links or headings)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for block in blocks(path):
        count = block.text.count("\n") + 2
        lines[block.line - 1:block.line - 1 + count] = [""] * count
    return re.sub(r"`[^`\n]*`", "", "\n".join(lines))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every heading's anchor, with GitHub's -1, -2 ... suffixes for repeated ones."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for block in blocks(path):  # a `# comment` in a code block is not a heading
        count = block.text.count("\n") + 2
        lines[block.line - 1:block.line - 1 + count] = [""] * count
    seen: dict[str, int] = {}
    out = set()
    for line in lines:
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = _slug(heading[1])
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return frozenset(out)


def table_rows(path: Path) -> list[tuple[str, list[str]]]:
    """(the heading above, cells) of every data row of the tables of a markdown file (not header or rule rows)."""
    rows, heading, table = [], "", []
    for line in [*path.read_text(encoding="utf-8").splitlines(), ""]:
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        rows += [(heading, cells) for cells in table[2:]]  # a table: its header, its rule, then its data rows
        table = []
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
    return rows


# ---- the repository's files ---------------------------------------------------------------------------------------
@cache
def repository_files() -> tuple[Path, ...]:
    """What a fresh clone has, plus new files not yet committed; the tree without ignored paths outside git."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True) if shutil.which("git") else None
    if listed is not None and listed.returncode == 0:
        paths = [ROOT / p for p in filter(None, listed.stdout.split("\0"))]
    else:
        skip = {".venv", ".git", "__pycache__", "checkpoints", "build", "dist", ".cache"}
        paths = [p for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts)]
    return tuple(sorted(p for p in paths if p.is_file()))


def python_files() -> list[Path]:
    return [p for p in repository_files() if p.suffix == ".py"]


def shell_files() -> list[Path]:
    def is_shell(p: Path) -> bool:
        if p.suffix == ".sh":
            return True
        try:
            first = p.open("rb").readline()
        except OSError:
            return False
        return first.startswith(b"#!") and re.search(rb"\b(ba)?sh\b", first) is not None
    return [p for p in repository_files() if p.suffix not in (".py", ".md") and is_shell(p)]


def _is_environ(node: ast.AST) -> bool:
    """`os.environ` or a bare `environ`."""
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ")


def env_reads_in_python(source: str, filename: str) -> set[str]:
    """Names read with os.environ.get / os.environ[...] / os.environ.setdefault / os.getenv / `in os.environ`."""
    found = set()
    for node in ast.walk(ast.parse(source, filename)):
        name = None
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in ("get", "setdefault", "pop") and _is_environ(f.value):
                name = node.args[0].value
            elif getattr(f, "attr", None) == "getenv" or getattr(f, "id", None) == "getenv":
                name = node.args[0].value
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_environ(node.value):
            if isinstance(node.slice, ast.Constant):
                name = node.slice.value
        elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) and any(
                isinstance(op, (ast.In, ast.NotIn)) for op in node.ops) and any(map(_is_environ, node.comparators)):
            name = node.left.value
        if isinstance(name, str):
            found.add(name)
    return found


@cache
def settings_fields() -> dict[str, object]:
    """serving/settings.py's variables and their defaults (None: computed at start-up)."""
    from serving.settings import Settings

    return {f.alias: f.default for f in Settings.model_fields.values()}


@cache
def variables_read() -> dict[str, set[str]]:
    """Every environment variable the code reads -> the files reading it."""
    found: dict[str, set[str]] = {name: {"serving/settings.py"} for name in settings_fields()}
    for path in python_files():
        for name in env_reads_in_python(path.read_text(encoding="utf-8"), str(path)):
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    for path in shell_files():
        for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?[-=]", path.read_text(encoding="utf-8")):
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def variables_set_by_deployment() -> dict[str, set[str]]:
    """`env:` / `envs:` names of bentofile.yaml and every YAML file under deploy/."""
    found: dict[str, set[str]] = {}

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("env", "envs") and isinstance(value, list):
                    for entry in value:
                        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                            found.setdefault(entry["name"], set()).add(where)
                walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for path in repository_files():
        rel = path.relative_to(ROOT)
        if path.suffix in (".yaml", ".yml") and (rel.parts[0] == "deploy" or rel.as_posix() == "bentofile.yaml"):
            for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
                walk(document, rel.as_posix())
    return found


_VARIABLE = re.compile(r"`([A-Z][A-Z0-9_]*[A-Z0-9])`")


def documented_variables() -> tuple[dict[str, list[str]], set[str]]:
    """configuration.md: {variable: its row's cells} of the project's tables, and the names under EXTERNAL_HEADING."""
    ours: dict[str, list[str]] = {}
    external: set[str] = set()
    for heading, cells in table_rows(CONFIGURATION):
        for name in _VARIABLE.findall(cells[0]):
            if heading == EXTERNAL_HEADING:
                external.add(name)
            else:
                assert name not in ours, f"configuration.md lists {name} twice"
                ours[name] = cells
    return ours, external


# ---- the blocks run -----------------------------------------------------------------------------------------------
RUNNABLE_FILES = [p for p in DOCS if any(b.runnable for b in blocks(p))]


def block_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBED_", "NIM_", "BENTOML_", "BENTO_"))}
    return {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            "EMBED_CACHE_DIR": str(work / "cache"), "BENTOML_HOME": str(work / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("path", RUNNABLE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_runnable_blocks_run(path, nim_server, tmp_path):
    address = nim_server.url.removeprefix("http://")
    env = block_env(tmp_path)
    for i, block in enumerate(b for b in blocks(path) if b.runnable):
        assert block.lang in ("bash", "python"), f"{block.where}: only bash and python blocks can be runnable"
        text = block.text.replace(LOCAL_SERVER, address)
        script = tmp_path / f"block{i}.{'sh' if block.lang == 'bash' else 'py'}"
        script.write_text(BASH_PRELUDE + text if block.lang == "bash" else text)
        command = ["bash", str(script)] if block.lang == "bash" else [sys.executable, str(script)]
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        assert proc.returncode == 0, (f"{block.where}: the block exited with {proc.returncode}\n{block.text}\n"
                                      f"---- stdout\n{proc.stdout[-4000:]}\n---- stderr\n{proc.stderr[-4000:]}")


def test_every_block_parses():
    problems = []
    for path in DOCS:
        for block in blocks(path):
            if block.lang in ("bash", "sh", "shell"):
                proc = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
                if proc.returncode:
                    problems.append(f"{block.where}: bash -n: {proc.stderr.strip()}")
            elif block.lang == "python":
                try:
                    compile(block.text, block.where, "exec")
                except SyntaxError as e:
                    problems.append(f"{block.where}: {e}")
            elif block.lang == "json":
                try:
                    json.loads(block.text)
                except ValueError as e:
                    problems.append(f"{block.where}: invalid JSON: {e}")
            elif block.lang in ("yaml", "yml"):
                try:
                    list(yaml.safe_load_all(block.text))
                except yaml.YAMLError as e:
                    problems.append(f"{block.where}: invalid YAML: {e}")
            if block.runnable and block.lang not in ("bash", "python"):
                problems.append(f"{block.where}: `runnable` applies to bash and python blocks only")
    assert not problems, "\n".join(problems)


def _commands(text: str):
    """Each simple command of a shell block as its words (continuation lines joined; words shlex cannot split, or
    built at run time, are left out)."""
    for line in text.replace("\\\n", " ").splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        command: list[str] = []
        for word in [*words, ";"]:
            if word in (";", "&&", "||", "|", "&"):
                if command:
                    yield command
                command = []
            else:
                command.append(word)


def _options_defined(files: list[Path]) -> set[str]:
    """The --options that argparse `add_argument` calls define in these files."""
    found = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                found |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return found


def test_commands_name_files_modules_and_options_that_exist():
    """What `bash -n` cannot see in a block that does not run here: a repository path that does not exist, a
    `python -m` module of this project that is not there, or an --option its argparse does not define."""
    top = {p.relative_to(ROOT).parts[0] for p in repository_files()}
    problems = []
    for path in DOCS:
        for block in blocks(path):
            if block.lang not in ("bash", "sh", "shell"):
                continue
            for words in _commands(block.text):
                for word in words:
                    candidate = word.split("=", 1)[-1]
                    if "/" in candidate and candidate.split("/")[0] in top and not (ROOT / candidate).exists():
                        problems.append(f"{block.where}: {candidate} does not exist")
                for i, word in enumerate(words[:-1]):
                    if Path(word).name not in ("python", "python3"):
                        continue
                    target, rest = words[i + 1], words[i + 2:]
                    if target == "-m" and rest:
                        module, rest = rest[0], rest[1:]
                        label = f"python -m {module}"
                        if module.split(".")[0] not in top:  # not this project's: installed, then
                            if importlib.util.find_spec(module.split(".")[0]) is None:
                                problems.append(f"{block.where}: python -m {module}: no such module")
                            continue
                        base = ROOT.joinpath(*module.split("."))
                        files = ([base.with_suffix(".py")] if base.with_suffix(".py").is_file() else
                                 sorted(base.glob("*.py")) if (base / "__main__.py").is_file() else [])
                        if not files:
                            problems.append(f"{block.where}: python -m {module}: no such module in the repository")
                            continue
                    elif target.endswith(".py") and (ROOT / target).is_file():
                        files, label = [ROOT / target], target
                    else:
                        continue
                    defined = _options_defined(files)
                    for option in (w.split("=", 1)[0] for w in rest if w.startswith("--")):
                        if option not in defined and option != "--help":
                            problems.append(f"{block.where}: {label}: no option {option}")
    assert not problems, "\n".join(problems)


def test_readme_test_command_is_what_ci_runs():
    def pytest_lines(text: str) -> set[str]:
        return {line.strip() for line in text.splitlines()
                if re.search(r"\bpytest\b", line) and not line.lstrip().startswith("#")}

    readme = set().union(*(pytest_lines(b.text) for b in blocks(ROOT / "README.md") if b.lang == "bash"))
    ci = pytest_lines((ROOT / ".ci" / "run").read_text(encoding="utf-8"))
    assert ci, ".ci/run runs no pytest command"
    assert readme == ci, f"the README's test command {sorted(readme)} is not what .ci/run runs: {sorted(ci)}"


# ---- environment variables ----------------------------------------------------------------------------------------
def test_every_variable_the_code_reads_or_deployment_sets_is_documented():
    ours, external = documented_variables()
    wanted = {**{k: set(v) for k, v in variables_read().items()}}
    for name, files in variables_set_by_deployment().items():
        wanted.setdefault(name, set()).update(files)
    missing = {name: sorted(files) for name, files in wanted.items() if name not in ours and name not in external}
    assert not missing, f"environment variables missing from docs/configuration.md: {missing}"


def test_every_documented_variable_is_read_by_the_code():
    ours, external = documented_variables()
    assert ours, "docs/configuration.md lists no variable"
    unread = sorted(set(ours) - set(variables_read()))
    assert not unread, (f"docs/configuration.md lists variables no code reads: {unread} (a variable only libraries "
                        f"read goes under '{EXTERNAL_HEADING}')")
    elsewhere = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in repository_files()
                          if p not in DOCS and p.suffix not in (".log", ".json", ".parquet"))
    invented = sorted(name for name in external if not re.search(rf"\b{name}\b", elsewhere))
    assert not invented, f"'{EXTERNAL_HEADING}' lists variables that appear nowhere in the repository: {invented}"


def _default_text(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_documented_defaults_are_the_code_defaults():
    ours, _ = documented_variables()
    wrong = {}
    for name, default in settings_fields().items():
        if default is None or name not in ours:
            continue  # None: computed at start-up (the row says from what); missing: the test above says so
        cell = ours[name][1]
        shown = re.findall(r"`([^`]*)`", cell) or [cell]
        if _default_text(default) not in shown:
            wrong[name] = f"code: {_default_text(default)!r}, docs: {cell!r}"
    assert not wrong, f"docs/configuration.md's defaults differ from serving/settings.py: {wrong}"


# ---- metrics ------------------------------------------------------------------------------------------------------
_METRIC = re.compile(r"\b(?:Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*[\"']([a-zA-Z_:][a-zA-Z0-9_:]*)[\"']")


def test_every_metric_is_documented():
    defined = {name: str(p.relative_to(ROOT)) for p in python_files() if p.parts[len(ROOT.parts)] != "tests"
               for name in _METRIC.findall(p.read_text(encoding="utf-8"))}
    assert defined, "no Prometheus metric found in the code"
    text = OPERATIONS.read_text(encoding="utf-8")
    missing = {name: where for name, where in defined.items() if not re.search(rf"\b{name}\b", text)}
    assert not missing, f"metrics missing from docs/operations.md: {missing}"


# ---- links --------------------------------------------------------------------------------------------------------
_LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def test_internal_links_resolve():
    broken = []
    for path in DOCS:
        for target in _LINK.findall(prose(path)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: {file_part} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)
