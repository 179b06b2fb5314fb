"""Data the tests read, copied into the repository (tests/data/README.md gives each file's source and license)."""
from __future__ import annotations

import lzma
import os
import tempfile
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
QWEN3_TOKENIZER = DATA_DIR / "qwen3-tokenizer"


def qwen3_tokenizer() -> Path:
    """The real Qwen3 tokenizer as a folder transformers loads. Its tokenizer.json is kept xz-compressed (11.4 MB ->
    1.4 MB of checkout, which also travels to the GPU machine) and unpacked beside the archive on first use."""
    target = QWEN3_TOKENIZER / "tokenizer.json"
    if not target.is_file():
        # unpacked under a temporary name and renamed: test processes that race here each see a whole file
        with tempfile.NamedTemporaryFile(dir=QWEN3_TOKENIZER, suffix=".part", delete=False) as part:
            part.write(lzma.decompress((QWEN3_TOKENIZER / "tokenizer.json.xz").read_bytes()))
        os.replace(part.name, target)
    return QWEN3_TOKENIZER
