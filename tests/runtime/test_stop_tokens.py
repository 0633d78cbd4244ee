"""generation_config.json's stop tokens (an eos list) and clean completions, judged against transformers 4.53.3.

One bundle: a transformers checkpoint whose generation_config.json sets eos_token_id to a list of two ids that differ
from config.json's eos, and a word-level tokenizer in which those ids are special tokens (<|endoftext|>, <fim_middle>).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch
from click.testing import CliRunner

from bigcode_deploy.cli import main
from bigcode_deploy.exporter.config import GPTBigCodeConfig
from bigcode_deploy.exporter.export import export_bundle
from bigcode_deploy.exporter.hf_files import stop_token_ids
from bigcode_deploy.runtime.api import open_generator
from bigcode_deploy.runtime.errors import BundleError, ConfigError
from bigcode_deploy.runtime.manifest import Manifest
from bigcode_deploy.runtime.progress import quiet
from tests.capi.build import build_program
from tests.helpers import make_hf_model

PROMPT = [11, 12, 13]
MAX_NEW = 8


def greedy(hf_model, max_new_tokens=MAX_NEW) -> list[int]:
    """transformers' greedy continuation of PROMPT under the model's generation_config."""
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([PROMPT]),
            attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, len(PROMPT) :].tolist()


def word_tokenizer(vocab_size: int, special: dict[int, str]):
    """A word-level tokenizer: id i is "w{i}", except the ids in `special`, which are special added tokens."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {special.get(i, f"w{i}"): i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(text, special=True) for text in special.values()])
    return tokenizer


def make_stop_bundle(root):
    """(bundle, the free greedy tokens, the eos list [never, stop], transformers' tokens under that list)."""
    from transformers import GenerationConfig

    for seed in range(10):  # a seed whose free continuation has a token that first appears at index >= 2
        hf_model = make_hf_model("causal-lm", seed=seed)
        hf_model.generation_config = GenerationConfig(eos_token_id=None, pad_token_id=0)
        free = greedy(hf_model)
        firsts = [k for k in range(2, MAX_NEW - 1) if free[k] not in free[:k]]
        if firsts:
            break
    stop = free[firsts[0]]
    never = min(set(range(hf_model.config.vocab_size)) - set(free) - {hf_model.config.eos_token_id})
    model_dir = root / "ckpt"
    hf_model.save_pretrained(model_dir)
    generation = {"bos_token_id": 0, "eos_token_id": [never, stop], "pad_token_id": 0}
    (model_dir / "generation_config.json").write_text(json.dumps(generation))
    word_tokenizer(hf_model.config.vocab_size, {stop: "<|endoftext|>", never: "<fim_middle>"}).save(
        str(model_dir / "tokenizer.json")
    )
    hf_model.generation_config = GenerationConfig.from_pretrained(model_dir)
    expected = greedy(hf_model)
    bundle = export_bundle(model_dir, model_dir.parent / "bundle", check=False, progress=quiet)
    return bundle, free, [never, stop], expected


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_stop_bundle(tmp_path_factory.mktemp("stops"))


def test_manifest_records_the_generation_config_eos_list(setup):
    bundle, _, eos_list, _ = setup
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["stop_token_ids"] == eos_list
    assert manifest["config"]["eos_token_id"] == 0 != eos_list[1]  # config.json's eos is another id
    assert json.loads((bundle / "generation_config.json").read_text())["eos_token_id"] == eos_list


def test_generation_stops_on_any_id_of_the_list_like_transformers(setup):
    bundle, free, eos_list, expected = setup
    assert expected[-1] == eos_list[1] and len(expected) < MAX_NEW  # transformers stopped on the list's second id
    with open_generator(bundle) as g:
        assert g.generate([PROMPT], max_new_tokens=MAX_NEW) == [expected]
        assert g.generate([PROMPT], max_new_tokens=MAX_NEW, stop_token_ids=()) == [free]  # the caller's stops win
        assert g.generate([PROMPT], max_new_tokens=MAX_NEW, stop_token_ids=(free[1],)) == [
            free[: free.index(free[1]) + 1]
        ]


def test_completion_text_leaves_special_tokens_out_unless_asked(setup):
    bundle, _, _, expected = setup
    words = " ".join(f"w{t}" for t in expected[:-1])
    text = " ".join(f"w{t}" for t in PROMPT)  # the word-level tokenizer encodes it to PROMPT
    with open_generator(bundle) as g:
        assert g.encode(text) == PROMPT
        pieces, _ = g.stream_text(text, max_new_tokens=MAX_NEW)
        assert "".join(pieces) == words
        pieces, _ = g.stream_text(text, max_new_tokens=MAX_NEW, show_special=True)
        assert "".join(pieces) == words + " <|endoftext|>"
        assert g.decode(expected) == words and g.decode(expected, show_special=True).endswith("<|endoftext|>")
        assert [e.token for e in g.stream([PROMPT], max_new_tokens=MAX_NEW)] == expected  # the ids stay available
    args = ["generate", str(bundle), "--prompt", text, "--max-new-tokens", str(MAX_NEW)]
    plain, shown = CliRunner().invoke(main, args), CliRunner().invoke(main, [*args, "--show-special"])
    assert plain.exit_code == 0 and shown.exit_code == 0, plain.output + shown.output
    assert plain.stdout.strip() == words
    assert shown.stdout.strip() == words + " <|endoftext|>"


def test_c_abi_default_stop_ids_and_special_text(setup, tmp_path):
    """The C ABI (tests/capi/capi_stop_tokens.c, default bcr_sampling_options): the bundle's stop ids end the row, and
    the callback's text leaves special tokens out unless show_special; the ids are passed either way."""
    bundle, _, _, expected = setup
    _, program = build_program(tmp_path, "capi_stop_tokens.c")
    prompt = " ".join(f"w{t}" for t in PROMPT)
    words = " ".join(f"w{t}" for t in expected[:-1])
    for show_special, last_text in ((0, ""), (1, "<|endoftext|>")):
        result = subprocess.run(
            [str(program), str(bundle), prompt, str(show_special)], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stdout + result.stderr
        tokens = [line.split(" ", 4) for line in result.stdout.splitlines() if line.startswith("TOKEN ")]
        assert [int(t[2]) for t in tokens] == expected  # stopped on the eos list's second id, as transformers does
        assert [t[3] for t in tokens] == ["0"] * (len(expected) - 1) + ["1"]
        texts = [t[4] if len(t) > 4 else "" for t in tokens]
        assert texts[-1].strip() == last_text
        assert "".join(texts).strip() == (words + " " + last_text).strip()


def test_stop_ids_from_files(tmp_path):
    config = GPTBigCodeConfig(vocab_size=50, bos_token_id=3, eos_token_id=3)
    assert stop_token_ids(tmp_path, config) == [3]  # no generation_config.json: config.json's eos
    for eos, expected in ((7, [7]), ([7, 9, 7], [7, 9]), (None, [])):
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
        assert stop_token_ids(tmp_path, config) == expected
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 9}))
    assert stop_token_ids(tmp_path, config) == [3]  # the file does not set eos
    for eos in ([7, 50], "7", [True]):
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
        with pytest.raises(ConfigError, match="field eos_token_id=.*not a token id in \\[0, 50\\)"):
            stop_token_ids(tmp_path, config)
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        stop_token_ids(tmp_path, config)
    hostile = (
        ("[" * 100_000 + "]" * 100_000, "generation_config.json"),  # nested too deep to parse: one line, no recursion
        ("[1, 2]", "holds a JSON list, not an object"),
        (json.dumps({"eos_token_id": list(range(40)) * 2 + [1000]}), "lists 81 ids; at most 64"),
        (json.dumps({"eos_token_id": [1] * 50 + [1000]}), "holds 1000, not a token id"),
    )
    for text, message in hostile:
        (tmp_path / "generation_config.json").write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)) as caught:
            stop_token_ids(tmp_path, config)
        assert len(str(caught.value)) < 400  # a hostile list is cut in the message
    (tmp_path / "generation_config.json").unlink()
    with open(tmp_path / "generation_config.json", "wb") as big:
        big.truncate(1 << 30)  # sparse: the bound is checked before reading
    with pytest.raises(ConfigError, match="holds 1073741824 bytes, more than the 8388608"):
        stop_token_ids(tmp_path, config)


def test_manifest_refuses_stop_ids_outside_the_vocab(setup, tmp_path):
    bundle, *_ = setup
    raw = json.loads((bundle / "manifest.json").read_text())
    assert Manifest.from_json(raw).stop_token_ids == raw["stop_token_ids"]
    for bad in ([raw["config"]["vocab_size"]], [-1], "5", [True]):
        with pytest.raises(BundleError, match="stop_token_ids"):
            Manifest.from_json({**raw, "stop_token_ids": bad})
    # A manifest that does not record them (written before) falls back to config.json's eos.
    copy = tmp_path / "older"
    shutil.copytree(bundle, copy)
    del raw["stop_token_ids"]
    (copy / "manifest.json").write_text(json.dumps(raw))
    with open_generator(copy) as g:
        tokens = g.generate([PROMPT], max_new_tokens=MAX_NEW)[0]
    eos = raw["config"]["eos_token_id"]
    assert eos not in tokens[:-1] and (tokens[-1] == eos or len(tokens) == MAX_NEW)
