"""Fill-in-the-middle prompts (runtime/fim.py): both spellings, both orders, the boundaries, where a middle ends."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from bigcode_deploy.runtime.errors import BigCodeError, BundleError
from bigcode_deploy.runtime.fim import (
    SANTACODER_FIM,
    STARCODER_FIM,
    FimPrompter,
    FimTokens,
    check_fim_record,
    fim_stop_ids,
    find_fim_tokens,
    middle_ids,
    no_fim_error,
    split_at_cursor,
)

CODE = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "for i in range(10):\n    print(i, end=' ')\n",
] * 4


def tokenizer(specials: list[str], prefix_space: bool = False, bos: str | None = None) -> Tokenizer:
    """A small byte-level BPE (as GPTBigCode's) trained here, with the given special tokens."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t.train_from_iterator(CODE, trainer)
    if bos is not None:
        t.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, t.token_to_id(bos))])
    return t


STARCODER = ["<|endoftext|>", *STARCODER_FIM.values()]
SANTACODER = ["<|endoftext|>", *SANTACODER_FIM.values()]


@pytest.fixture(scope="module")
def star():
    return tokenizer(STARCODER)


@pytest.mark.parametrize(
    ("specials", "spelling"),
    [(STARCODER, "starcoder"), (SANTACODER, "santacoder"), ([*STARCODER, "<file_sep>"], "starcoder")],
)
def test_finds_both_spellings(specials, spelling):
    t = tokenizer(specials)
    found = find_fim_tokens(t)
    names = STARCODER_FIM if spelling == "starcoder" else SANTACODER_FIM
    assert found.spelling == spelling
    assert (found.prefix, found.middle, found.suffix, found.pad) == tuple(t.token_to_id(names[r]) for r in names)
    assert found.file_sep == t.token_to_id("<file_sep>")  # None without one
    assert found.mode == "psm"


def test_no_fim_tokens_is_none_and_one_line():
    assert find_fim_tokens(tokenizer(["<|endoftext|>", "<fim_prefix>"])) is None  # an incomplete set is no set
    for has_tokenizer in (True, False):
        message = str(no_fim_error("out/b", has_tokenizer))
        assert "\n" not in message and "out/b" in message


def test_psm_and_spm_orders(star):
    tokens = find_fim_tokens(star)
    p = FimPrompter(star, tokens)
    pre, suf = p.encode("def add(a, b):\n"), p.encode("\n    return c\n")
    assert p.prompt("def add(a, b):\n", "\n    return c\n") == [tokens.prefix, *pre, tokens.suffix, *suf, tokens.middle]
    spm = p.prompt("def add(a, b):\n", "\n    return c\n", mode="spm")
    assert spm == [tokens.prefix, tokens.suffix, *suf, tokens.middle, *pre]
    assert FimPrompter(star, FimTokens.from_json({**tokens.to_json(), "mode": "spm"})).prompt("a", "b") == [
        tokens.prefix,
        tokens.suffix,
        *p.encode("b"),
        tokens.middle,
        *p.encode("a"),
    ]
    with pytest.raises(BigCodeError, match="psm"):
        p.prompt("a", "b", mode="pms")


def test_parts_join_without_an_inserted_space(star):
    p = FimPrompter(star, find_fim_tokens(star))
    prefix, suffix = "def add(a,", "b):\n    return a + b\n"
    ids = p.prompt(prefix, suffix)
    assert star.decode(ids, skip_special_tokens=True) == prefix + suffix  # nothing added where the parts meet
    assert p.encode("") == [] and p.prompt("", "") == [p.tokens.prefix, p.tokens.suffix, p.tokens.middle]


def test_a_tokenizer_that_adds_a_prefix_space_is_refused():
    t = tokenizer(STARCODER, prefix_space=True)
    with pytest.raises(BundleError, match="add_prefix_space"):
        FimPrompter(t, find_fim_tokens(t))


def test_bos_only_at_the_start(star):
    t = tokenizer([*STARCODER, "<s>"], bos="<s>")
    bos = t.token_to_id("<s>")
    assert t.encode("x").ids[0] == bos  # the post-processor adds it to every text
    ids = FimPrompter(t, find_fim_tokens(t)).prompt("def f(x):", "    return x\n")
    assert ids[0] == bos and bos not in ids[1:]
    ids = FimPrompter(star, find_fim_tokens(star)).prompt("a", "b")
    assert ids[0] == find_fim_tokens(star).prefix  # no BOS where the tokenizer adds none


def test_a_middle_ends_at_eos_or_file_sep():
    t = tokenizer([*STARCODER, "<file_sep>"])
    tokens = find_fim_tokens(t)
    stops = fim_stop_ids([0], tokens)
    assert set(stops) == {0, tokens.file_sep}
    assert middle_ids([7, 8, tokens.file_sep, 9], stops) == [7, 8]
    assert middle_ids([7, 0, 9], stops) == [7]
    assert middle_ids([7, 8], stops) == [7, 8]
    assert fim_stop_ids([0, 5], find_fim_tokens(tokenizer(STARCODER))) == (0, 5)  # no file_sep in this vocabulary


def test_manifest_record_round_trips_and_bad_ones_are_refused(star):
    tokens = find_fim_tokens(star)
    assert FimTokens.from_json(tokens.to_json()) == tokens

    def bad(name, what):
        return BundleError(f"{name} {what}")

    check_fim_record(None, 300, bad)
    check_fim_record(tokens.to_json(), 300, bad)
    for broken in (
        {**tokens.to_json(), "mode": "xyz"},
        {**tokens.to_json(), "spelling": "other"},
        {**tokens.to_json(), "tokens": {**tokens.to_json()["tokens"], "middle": 300}},
        {**tokens.to_json(), "tokens": {**tokens.to_json()["tokens"], "prefix": True}},
        {**tokens.to_json(), "file_sep": -1},
        {**tokens.to_json(), "extra": 1},
        [],
    ):
        with pytest.raises(BundleError, match="fim"):
            check_fim_record(broken, 300, bad)


def test_split_at_cursor():
    assert split_at_cursor("a<CURSOR>b", "<CURSOR>", "f.py") == ("a", "b")
    for text in ("ab", "a<CURSOR>b<CURSOR>"):
        with pytest.raises(BigCodeError, match="f.py"):
            split_at_cursor(text, "<CURSOR>", "f.py")
