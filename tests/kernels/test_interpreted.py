"""Each kernel test module in its own Python process with the Triton interpreter on (see conftest.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels.conftest import KERNEL_TEST_MODULES

pytest.importorskip("triton")
HERE = Path(__file__).parent


@pytest.mark.parametrize("module", KERNEL_TEST_MODULES)
def test_module_under_triton_interpreter(module):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / module)],
                            cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
