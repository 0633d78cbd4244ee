import json

from click.testing import CliRunner

from bigcode_deploy.cli import main
from bigcode_deploy.exporter.export import export_bundle
from bigcode_deploy.runtime.progress import quiet


def test_bench_json_reports_medians(tmp_path):
    bundle = export_bundle(None, tmp_path / "b", check=False, progress=quiet)
    result = CliRunner().invoke(
        main,
        ["bench", str(bundle), "--prompt-len", "16", "--new-tokens", "8", "--batch", "2", "--repeats", "2", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {"prefill_s", "decode_tok_s", "batch", "prompt_len", "new_tokens", "backend"} <= data.keys()
    assert data["batch"] == 2 and data["prompt_len"] == 16 and data["backend"] == "ort"
    assert data["prefill_s"] > 0 and data["decode_tok_s"] > 0 and data["peak_rss_mb"] > 0


def test_bench_context_overflow_is_one_line(tmp_path):
    bundle = export_bundle(None, tmp_path / "b", check=False, progress=quiet)
    n_positions = json.loads((bundle / "manifest.json").read_text())["config"]["n_positions"]
    result = CliRunner().invoke(
        main, ["bench", str(bundle), "--prompt-len", str(n_positions - 5), "--new-tokens", "10"]
    )
    assert result.exit_code == 2 and "exceeds the model's context" in result.output
