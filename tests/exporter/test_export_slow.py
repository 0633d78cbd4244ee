"""Scale: a SantaCoder-shaped model (1.1B parameters, 4.4 GB in fp32, random weights) exports with external data
and passes the ONNX Runtime check on a 24 GB machine, with peak RSS under 2.5x the weight bytes.

Run with `make test-slow` (not in CI): it writes ~9 GB to a temporary directory and takes minutes.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import pytest

from bigcode_deploy.exporter.checkpoint import save_checkpoint
from bigcode_deploy.exporter.config import preset
from bigcode_deploy.exporter.model import GPTBigCodeForCausalLM, init_weights


@pytest.mark.slow
def test_santacoder_shaped_export_with_external_data(tmp_path):
    config = preset("santacoder")
    model = init_weights(GPTBigCodeForCausalLM(config), config, seed=0)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model_dir = save_checkpoint(model, config, tmp_path / "santacoder-random")
    del model

    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bigcode_deploy.cli",
            "export",
            str(model_dir),
            str(tmp_path / "bundle"),
            "--external-data",
        ],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
    print(result.stderr)
    print(
        f"santacoder-shaped export: {seconds:.0f}s, peak RSS {peak_rss / 1e9:.2f} GB, "
        f"weights {weight_bytes / 1e9:.2f} GB, ratio {peak_rss / weight_bytes:.2f}"
    )
    assert result.returncode == 0, result.stderr
    assert "parity ok" in result.stderr
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["graph"]["external_data"] == "model.onnx.data"
    assert peak_rss < 2.5 * weight_bytes
