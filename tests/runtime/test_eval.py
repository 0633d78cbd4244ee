"""Fill-in-the-middle end to end (API, CLI, export's manifest record) and `eval` on a tiny random bundle."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bigcode_deploy.cli import main
from bigcode_deploy.exporter.export import export_bundle
from bigcode_deploy.runtime.api import open_generator
from bigcode_deploy.runtime.bundle import Bundle, left_pad, position_ids
from bigcode_deploy.runtime.eval import (
    LineCase,
    evaluate,
    first_line,
    line_matches,
    read_sources,
    sample_lines,
    source_files,
)
from bigcode_deploy.runtime.manifest import Manifest
from bigcode_deploy.runtime.progress import quiet
from tests.helpers import make_hf_model
from tests.runtime.test_fim import SANTACODER, tokenizer

SOURCE = '''import os


def walk(root):
    """Yield every file under root."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            yield os.path.join(dirpath, name)


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)
'''


def export_fim_bundle(root: Path) -> Path:
    """A 2-layer random model with a SantaCoder-spelled FIM tokenizer (hyphens), exported with SPM order."""
    model_dir = root / "ckpt"
    make_hf_model("causal-lm", seed=1, vocab_size=300, n_positions=128).save_pretrained(model_dir)
    tokenizer(SANTACODER).save(str(model_dir / "tokenizer.json"))
    return export_bundle(model_dir, root / "bundle", check=False, fim_mode="spm", progress=quiet)


def strip_fim(bundle: Path, copy: Path, drop_tokenizer: bool) -> Path:
    """A copy of the bundle whose manifest has no `fim` record (and, with drop_tokenizer, no tokenizer)."""
    shutil.copytree(bundle, copy)
    manifest = Manifest.read(copy)
    manifest.fim = None
    if drop_tokenizer:
        manifest.tokenizer = None
    manifest.write(copy)
    return copy


@pytest.fixture(scope="module")
def fim_bundle(tmp_path_factory):
    return export_fim_bundle(tmp_path_factory.mktemp("fim"))


@pytest.fixture(scope="module")
def sources_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    for i in range(3):
        (root / f"m{i}.py").write_text(SOURCE.replace("Stack", f"Stack{i}"))
    (root / "notes.txt").write_text("not python\n")
    return root


def test_export_records_fim_tokens_and_mode(fim_bundle):
    record = Bundle.open(fim_bundle).manifest.fim
    assert record["spelling"] == "santacoder" and record["mode"] == "spm"
    t = tokenizer(SANTACODER)
    assert record["tokens"]["prefix"] == t.token_to_id("<fim-prefix>")
    assert record["tokens"]["middle"] == t.token_to_id("<fim-middle>")


def test_infill_is_the_greedy_middle_of_the_fim_prompt(fim_bundle):
    prefix, suffix = "def walk(root):\n", "\n            yield name\n"
    with open_generator(fim_bundle) as g:
        tokens = g.fim_prompter().tokens
        prompt = g.fim_prompter().prompt(prefix, suffix)
        assert prompt[:2] == [tokens.prefix, tokens.suffix]  # the bundle's order: SPM
        stops = g.infill_stops()
        raw = g.generate([prompt], max_new_tokens=12, stop_token_ids=stops)[0]
        middle = [t for t in raw if t not in stops]
        text = g.infill(prefix, suffix, max_new_tokens=12)
        assert text == g.tokenizer.decode(middle, skip_special_tokens=True)
        pieces, stats = g.stream_infill(prefix, suffix, max_new_tokens=12)
        assert "".join(pieces) == text and stats.new_tokens == len(raw)  # streaming gives the same middle
        psm = g.fim_prompter().prompt(prefix, suffix, mode="psm")
        assert psm[0] == tokens.prefix and psm[-1] == tokens.middle


def test_cli_infill_from_options_and_from_a_file(fim_bundle, tmp_path):
    runner = CliRunner()
    args = ["generate", str(fim_bundle), "--max-new-tokens", "6"]
    out = runner.invoke(main, [*args, "--prompt", "def f(x):\n", "--suffix", "\n    return y\n"])
    assert out.exit_code == 0, out.output
    source = tmp_path / "a.py"
    source.write_text("def f(x):\n    <CURSOR>\n    return y\n")
    by_file = runner.invoke(main, [*args, "--file", str(source)])
    assert by_file.exit_code == 0, by_file.output
    source.write_text("def f(x):\n")
    missing = runner.invoke(main, [*args, "--file", str(source)])
    assert missing.exit_code == 2 and "cursor marker" in missing.output
    both = runner.invoke(main, [*args, "--file", str(source), "--prompt", "x"])
    assert both.exit_code == 2


@pytest.fixture(scope="module")
def plain_bundles(fim_bundle, tmp_path_factory):
    """The FIM bundle copied twice: its manifest without the `fim` record, and without a tokenizer as well."""
    root = tmp_path_factory.mktemp("plain")
    return {
        "no-fim": strip_fim(fim_bundle, root / "no-fim", drop_tokenizer=False),
        "no-tokenizer": strip_fim(fim_bundle, root / "no-tokenizer", drop_tokenizer=True),
    }


@pytest.mark.parametrize("name", ["no-fim", "no-tokenizer"])
def test_infill_on_a_bundle_without_fim_tokens_is_one_line(plain_bundles, name):
    out = CliRunner().invoke(main, ["generate", str(plain_bundles[name]), "--prompt", "a", "--suffix", "b"])
    assert out.exit_code == 2
    errors = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "FIM" in errors[0] and str(plain_bundles[name]) in errors[0]


def test_sample_is_seeded_and_nested(sources_dir):
    sources = read_sources(source_files(sources_dir))
    assert len(sources) == 3  # *.py only
    ten, twenty = sample_lines(sources, 10, seed=3), sample_lines(sources, 20, seed=3)
    assert ten == twenty[:10] and ten != sample_lines(sources, 10, seed=4)
    for case in twenty:
        text = dict(sources)[case.file]
        assert case.prefix + "\n" + case.line + case.suffix == text  # the three parts are the file
        assert case.line.strip()


def test_line_matching():
    case = LineCase("f.py", 2, "def f():", "    return 1", "\n")
    assert first_line("\n    return 1\n    x = 2") == "\n    return 1"
    assert line_matches("\n    return 1  \nfoo", case)
    assert not line_matches("    return 1", case)  # the completion must start the new line
    assert not line_matches("\n        return 1", case)  # indentation counts


def test_stepped_perplexity_equals_a_full_forward(fim_bundle, sources_dir):
    """The perplexity eval computes one token per step; on a graph with every position's logits, one forward
    over the window must give the same number."""
    sources = read_sources(source_files(sources_dir))
    with open_generator(fim_bundle) as g:
        result = evaluate(g, sources, lines=8, windows=2, window=32, progress=quiet)
        ids = []
        for _, text in sources:
            ids += g.tokenizer.encode(text, add_special_tokens=False).ids + [0]
        rows = [ids[s : s + 33] for s in (0, 32)]
        input_ids, mask = left_pad([r[:32] for r in rows])
        feeds = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids(mask, 0)}
        feeds.update(g.bundle.empty_past(2))
        logits = g.backend.run(feeds)["logits"].astype(np.float64)  # (2, 32, vocab)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    targets = np.array([r[1:] for r in rows])
    nll = -np.take_along_axis(logp, targets[..., None], -1).mean()
    assert result.perplexity_tokens == 64
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-4)


def test_cli_eval_table_and_json(fim_bundle, sources_dir, tmp_path):
    out_json = tmp_path / "eval.json"
    args = ["eval", str(fim_bundle), str(fim_bundle), "--files", str(sources_dir), "--lines", "12"]
    out = CliRunner().invoke(main, [*args, "--windows", "1", "--window", "32", "--json", str(out_json)])
    assert out.exit_code == 0, out.output
    assert "| bundle |" in out.output and "lines: 12/12" in out.output  # the table, and progress
    results = json.loads(out_json.read_text())
    assert len(results) == 2 and results[0]["l2r"]["lines"] == 12
    assert results[0]["fim"]["exact_match"] is not None and results[0]["settings"]["fim_mode"] == "spm"
    assert results[0]["perplexity"] == results[1]["perplexity"]  # deterministic
    assert [r["l2r"] for r in results[0]["per_line"]] == [r["l2r"] for r in results[1]["per_line"]]
    for line in results[0]["per_line"]:  # token healing at the line boundary: every answer starts the new line
        assert line["l2r_text"].startswith("\n") and line["fim_text"].startswith("\n")


def test_eval_without_fim_tokens_or_tokenizer(plain_bundles, sources_dir):
    args = ["--files", str(sources_dir), "--lines", "4", "--windows", "0"]
    out = CliRunner().invoke(main, ["eval", str(plain_bundles["no-fim"]), *args])
    assert out.exit_code == 0, out.output
    assert "n/a" in out.output  # FIM not measured, and the table says so
    out = CliRunner().invoke(main, ["eval", str(plain_bundles["no-tokenizer"]), *args])
    assert out.exit_code == 2 and "tokenizer" in out.output
