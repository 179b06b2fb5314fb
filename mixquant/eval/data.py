"""Where benchmark data comes from: a local JSON/JSONL file, or the Hugging Face hub through the optional `datasets`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DatasetUnavailable(Exception):
    """The data could not be loaded; the message says which file to pass instead."""


@dataclass(frozen=True)
class HubSource:
    repo: str
    split: str
    config: str | None = None
    # What to pass as --data-file when the hub cannot be reached: the file and the fields it must have.
    file_hint: str = ""

    def describe(self) -> str:
        return f"hf:{self.repo}" + (f":{self.config}" if self.config else "") + f":{self.split}"


def read_records(path: Path) -> list[dict[str, Any]]:
    """A JSON list, a JSON object holding its records under "data", or JSON lines."""
    if not path.is_file():
        raise DatasetUnavailable(f"--data-file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        return document["data"]
    if isinstance(document, list):
        return document
    raise DatasetUnavailable(f"{path}: expected a list of records, a {{'data': [...]}} object or JSON lines")


def load_records(name: str, data_file: str | Path | None, hub: HubSource | None) -> tuple[list[dict[str, Any]], str]:
    """The raw records of a benchmark and a description of where they came from (recorded with the results)."""
    if data_file is not None:
        path = Path(data_file).expanduser().resolve()
        return read_records(path), f"file:{path}"
    if hub is None:
        raise DatasetUnavailable(f"{name} has no default source: pass --data-file")
    try:
        import datasets  # optional: only needed when the data comes from the hub
    except ImportError:
        raise DatasetUnavailable(
            f"{name}: loading {hub.repo} from the Hugging Face hub needs the `datasets` package "
            f"(pip install 'mixquant[datasets]'). Or pass --data-file with {hub.file_hint}."
        ) from None
    try:
        rows = datasets.load_dataset(hub.repo, hub.config, split=hub.split)
    except Exception as error:  # no network, no such dataset, an authentication wall: all end the same way
        raise DatasetUnavailable(
            f"{name}: could not load {hub.repo} from the Hugging Face hub ({type(error).__name__}: {error}). "
            f"Without network, pass --data-file with {hub.file_hint}."
        ) from error
    return [dict(row) for row in rows], hub.describe()


def fingerprint(items: list[Any]) -> str:
    """sha256 of the benchmark items as evaluated: two runs with the same hash asked the same questions."""
    digest = hashlib.sha256()
    for item in items:  # one at a time: LongBench v2 alone is half a gigabyte of text
        digest.update(json.dumps(dataclasses.asdict(item), sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()
