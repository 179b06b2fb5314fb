"""The repository stands alone: nothing it ships or tests reads a path outside the clone, and the vendored test data
is what tests/data/README.md says it is. The package ships what runs in production, and nothing of training/."""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import setuptools

from tests.data import DATA_DIR, qwen3_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CHECKED_FOLDERS = ("mixquant", "training", "tests", "gpu_tests", ".ci")
TEXT_SUFFIXES = {".py", ".sh", ".md", ".toml", ".json", ".jinja", ".txt", ".cfg", ".yaml", ""}
# a relative path that leaves its folder by name (such as the shared/data folder one level up)
PARENT_BY_NAME = re.compile(r"[.][.]/[\w$]")
# a folder named shared joined onto a path (the reference folder that sits beside the clone on developers' machines)
SHARED_JOIN = re.compile(r"/ *[\"']shared[\"']")
# Path(__file__)[.resolve()] then .parent / .parents[n] steps
FILE_ANCESTOR = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?((?:\.parent(?!s)|\.parents\[\d+\])+)")


def levels_up(steps: str) -> int:
    """How many folders `.parent.parents[2]...` climbs from a file (the file's own folder is 1)."""
    return sum(int(n) + 1 if n else 1 for n in re.findall(r"\.parents?(?:\[(\d+)\])?", steps))


def outside_references(path: Path, text: str) -> list[str]:
    """Every place in `text` (the file at `path`, relative to the repository root) that names a path outside it."""
    found = [f"{path}: {m.group(0)!r}" for pattern in (PARENT_BY_NAME, SHARED_JOIN) for m in pattern.finditer(text)]
    depth = len(path.parts)  # climbing this many levels from the file reaches the root
    for m in FILE_ANCESTOR.finditer(text):
        if levels_up(m.group(1)) > depth:
            found.append(f"{path}: {m.group(0)} climbs above the repository root")
    return found


def checked_files() -> list[Path]:
    files = []
    for folder in CHECKED_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*")):
            rel = path.relative_to(ROOT)
            if (path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in rel.parts
                    and rel.parts[:2] != ("tests", "data")):  # vendored third-party data is not code
                files.append(rel)
    return files


def test_no_file_names_a_path_outside_the_repository():
    files = checked_files()
    assert len(files) > 100 and Path(".ci/run") in files and Path("tests/conftest.py") in files
    found = [hit for rel in files for hit in outside_references(rel, (ROOT / rel).read_text(errors="replace"))]
    assert not found, "files that read outside the repository:\n" + "\n".join(found)


# what the check must find, put together at run time so that this file does not hold it
UP, FILE = "..", "Path(__file__)"


@pytest.mark.parametrize("text", [
    f'DATA = {FILE}.resolve().parents[1].parent / "data"',
    f"TOKENIZER = {FILE}.parent.parent.parent / 'x'",
    f'cp "{UP}/shared/data/qwen3-tokenizer" .carry/',
    f"open('{UP}/data/gsm8k.jsonl')",
    'TOKENIZER = _ROOT.parent / "shar' + 'ed" / "data"',
])
def test_the_check_finds_paths_outside(text):
    assert outside_references(Path("tests/conftest.py"), text)


@pytest.mark.parametrize("text", [
    'ROOT = Path(__file__).resolve().parents[1]',
    "HERE = Path(__file__).parent.parent / 'tests'",
    'cd "$(dirname "$0")/.."',
    "range(3)[..., None]",
])
def test_the_check_lets_paths_inside_pass(text):
    assert not outside_references(Path("tests/conftest.py"), text)


def vendored_files() -> list[tuple[str, str]]:
    """(path under tests/data, sha256) of every row of the README's table."""
    readme = (DATA_DIR / "README.md").read_text()
    return re.findall(r"^\| ([\w./-]+) \| [^|]+ \| \d+ \| ([0-9a-f]{64}) \|$", readme, flags=re.M)


def test_vendored_data_matches_its_readme():
    qwen3_tokenizer()  # tokenizer.json is unpacked from its archive on first use
    rows = vendored_files()
    assert len(rows) == 10
    for name, sha256 in rows:
        assert hashlib.sha256((DATA_DIR / name).read_bytes()).hexdigest() == sha256, name


def test_the_package_ships_the_checkpoint_and_no_training_code():
    # what `pip install .` packages, by the rules pyproject.toml gives setuptools
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = setuptools.find_packages(str(ROOT), **config["packages"]["find"])
    assert "mixquant.tiny" in packages and all(p.split(".")[0] == "mixquant" for p in packages)
    shipped = {f.name for pattern in config["package-data"]["mixquant.tiny"]
               for f in (ROOT / "mixquant" / "tiny").glob(pattern)}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= shipped
    # nothing installed may need the training folder, which is not installed
    imports = re.compile(r"^\s*(?:from|import)\s+training\b", re.M)
    found = [str(f.relative_to(ROOT)) for f in (ROOT / "mixquant").rglob("*.py") if imports.search(f.read_text())]
    assert (ROOT / "training" / "train.py").is_file() and not found, found


def test_the_command_line_parses_without_the_server_dependencies():
    # GPU machines for benchmarks often have torch and transformers but not fastapi, uvicorn or xgrammar
    blocker = textwrap.dedent("""
        import importlib.abc, sys
        SERVER_ONLY = {"fastapi", "uvicorn", "starlette", "xgrammar", "nixl", "jsonschema"}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in SERVER_ONLY:
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Block())
        from mixquant.cli import build_parser
        build_parser().parse_args(["bench", "prefill", "--shape", "qwen3-8b"])
        import mixquant.bench.offline
        print("parsed")
    """)
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "parsed" in result.stdout, result.stderr
