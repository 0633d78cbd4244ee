"""bcr_infill, the C ABI's fill-in-the-middle: the same middle as the Python API, and one line without FIM tokens."""

from __future__ import annotations

import subprocess

import pytest

from bigcode_deploy.runtime.api import open_generator
from tests.capi.build import build_program
from tests.capi.test_capi import STATUS
from tests.runtime.test_eval import export_fim_bundle, strip_fim

PREFIX, SUFFIX = "def walk(root):\n", "\n            yield name\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(infill_check binary, FIM bundle, the same bundle without its fim record)."""
    root = tmp_path_factory.mktemp("capi-infill")
    _, binary = build_program(root, "infill_check.c")
    bundle = export_fim_bundle(root)
    return binary, bundle, strip_fim(bundle, root / "no-fim", drop_tokenizer=False)


def run(binary, bundle) -> dict[str, str | list[int]]:
    out = subprocess.run([str(binary), str(bundle), PREFIX, SUFFIX, "10"], capture_output=True, text=True, timeout=300)
    lines = out.stdout.splitlines()
    return {
        "tokens": [int(line.split()[1]) for line in lines if line.startswith("TOKEN ")],
        "text": next(line for line in lines if line.startswith("TEXT "))[5:],
        "check": next(line for line in lines if line.startswith("CHECK ")),
    }


def test_c_infill_streams_the_python_middle(built):
    binary, bundle, _ = built
    got = run(binary, bundle)
    assert got["check"].startswith("CHECK infill 0"), got["check"]
    with open_generator(bundle) as g:
        stops = g.infill_stops()
        expected = g.generate([g.fim_prompter().prompt(PREFIX, SUFFIX)], max_new_tokens=10, stop_token_ids=stops)[0]
        text = g.infill(PREFIX, SUFFIX, max_new_tokens=10)
    assert got["tokens"] == expected
    assert got["text"] == text.split("\n")[0]  # the C side prints one line of it


def test_c_infill_without_fim_tokens_is_invalid_argument_with_one_line(built):
    binary, _, plain = built
    got = run(binary, plain)
    _, _, status, *message = got["check"].split(" ")
    assert int(status) == STATUS["INVALID_ARGUMENT"] and "FIM" in " ".join(message)
    assert got["tokens"] == []
