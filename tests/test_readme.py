"""The README's Python API example runs as written (in a scratch directory), so the documented imports stay true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "the README's Python API section lost its examples"
    for i, block in enumerate(blocks):
        result = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"README python block {i} failed:\n{result.stderr[-2000:]}"
    assert (tmp_path / "out" / "api-demo" / "reference_outputs.safetensors").is_file()
