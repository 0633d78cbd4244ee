"""Train the embedded default model: a small GPTBigCode on the Python standard library's own .py files, with FIM.

Reproducible: files are read in sorted order, the held-out split is a hash of each file's path
(runtime.eval.is_held_out), the BPE tokenizer is trained by the tokenizers library on the training split with
StarCoder's special tokens (<|endoftext|>, <fim_prefix>, <fim_middle>, <fim_suffix>, <fim_pad>: ids 0..4), and the
model (exporter.model, the same reference model everything else uses) is trained for a fixed number of steps from
fixed seeds on one thread. The standard library is PSF-licensed.

Fill-in-the-middle, the SantaCoder/StarCoder recipe: each training row is, with probability --fim-rate, a window of
one file split at two uniformly random character positions into prefix / middle / suffix and rearranged, half of
those (--fim-spm-rate) in SPM order:
    PSM: <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle <|endoftext|>
    SPM: <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle <|endoftext|>
(the order of bigcode-project/Megatron-LM's permute(); the three parts are tokenized separately, as at inference).
With --fim-line-rate, that fraction of the FIM rows has a middle of 1-3 whole lines instead (from the newline
before them to the one after: what a single-line infilling request cuts). The other rows are plain windows of the
concatenated corpus. A FIM row longer than the sequence loses the end of its
suffix (as Megatron's truncate_or_pad does); a shorter one is padded with <fim_pad>, which carries no loss.
Writes config.json, model.safetensors, tokenizer.json, generation_config.json and training_log.json, logging the
training loss, the held-out perplexity and the held-out loss on FIM middles.

--init-from DIR continues a trained checkpoint instead (its tokenizer gains the FIM tokens at the end of its
vocabulary, ids 4096..4099 for the embedded model, and the embeddings new rows). The FIM candidate in the README was
made so, from the embedded model (itself made by this script as of commit dbeee27, before FIM): 28.3 minutes of

    .venv/bin/python scripts/train_default_model.py --out out/fim_model --init-from exporter/default_model \
        --n-positions 256 --seq 256 --batch 4 --lr 1e-3 --steps 1200 --eval-every 300

then 800 more steps with half of the FIM rows cut at line boundaries (11.1 minutes):

    .venv/bin/python scripts/train_default_model.py --out out/fim_model3 --init-from out/fim_model \
        --n-positions 256 --seq 256 --batch 4 --lr 5e-4 --steps 800 --eval-every 400 --seed 2 --fim-line-rate 0.5

From scratch (not run to the end here; as many tokens as the pre-FIM model, which took 28.6 minutes):

    .venv/bin/python scripts/train_default_model.py --out out/fim_model
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bigcode_deploy.exporter.checkpoint import load_model, save_checkpoint
from bigcode_deploy.exporter.config import GPTBigCodeConfig
from bigcode_deploy.exporter.model import GPTBigCodeForCausalLM, init_weights
from bigcode_deploy.runtime.eval import is_held_out, stdlib_files, stdlib_root
from bigcode_deploy.runtime.fim import STARCODER_FIM

EOT = "<|endoftext|>"
SPECIAL_TOKENS = [EOT, STARCODER_FIM["prefix"], STARCODER_FIM["middle"], STARCODER_FIM["suffix"], STARCODER_FIM["pad"]]
IGNORE = -100  # cross_entropy's ignore_index: labels of <fim_pad> rows


def read_texts(paths: list[Path]) -> list[str]:
    texts = []
    for p in paths:
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def encode_corpus(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    eot = tokenizer.token_to_id(EOT)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.int64)


class FimTransform:
    """The SantaCoder/StarCoder FIM transform of one document window, at character level, as token ids."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.eot = tokenizer.token_to_id(EOT)
        self.pre, self.mid, self.suf, self.pad = (tokenizer.token_to_id(STARCODER_FIM[r]) for r in STARCODER_FIM)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def __call__(
        self, text: str, length: int, rng: np.random.Generator, spm: bool, lines: bool = False
    ) -> tuple[list[int], int]:
        """Ids of exactly `length` tokens (suffix truncated or <fim_pad> appended) and the index of <fim_middle>.
        lines: the middle is 1-3 whole lines instead, from the newline before them to the one after (as a
        single-line infilling request cuts a file)."""
        newlines = [i for i, c in enumerate(text) if c == "\n"] if lines else []
        if len(newlines) >= 2:
            first = int(rng.integers(0, len(newlines) - 1))
            a, b = newlines[first], newlines[min(first + int(rng.integers(1, 4)), len(newlines) - 1)]
        else:
            a, b = sorted(rng.integers(0, len(text) + 1, 2))  # two uniform character boundaries: empty parts allowed
        prefix, middle, suffix = self.encode(text[:a]), self.encode(text[a:b]), self.encode(text[b:])
        over = len(prefix) + len(middle) + len(suffix) + 4 - length
        if over > 0:
            suffix = suffix[: max(0, len(suffix) - over)]
        if spm:
            ids = [self.pre, self.suf, *suffix, self.mid, *prefix, *middle, self.eot]
        else:
            ids = [self.pre, *prefix, self.suf, *suffix, self.mid, *middle, self.eot]
        ids = ids[:length]  # only when prefix + middle alone overflow
        return ids + [self.pad] * (length - len(ids)), ids.index(self.mid) if self.mid in ids else length


def batches(
    stream: np.ndarray,
    files: list[np.ndarray],
    fim: FimTransform,
    batch: int,
    seq: int,
    fim_rate: float,
    spm_rate: float,
    rng: np.random.Generator,
    line_rate: float = 0.0,
):
    """Rows of seq + 1 tokens: with probability fim_rate a FIM-transformed window of one file (files drawn in
    proportion to their length), else a plain window of the concatenated stream. Yields (x, y): [batch, seq] int64,
    y = x shifted by one with <fim_pad> positions set to IGNORE."""
    weights = np.asarray([len(f) for f in files], dtype=np.float64)
    weights /= weights.sum()
    while True:
        rows = []
        for _ in range(batch):
            if rng.random() < fim_rate:
                ids = files[rng.choice(len(files), p=weights)]
                start = int(rng.integers(0, max(1, len(ids) - seq + 1)))
                text = fim.tokenizer.decode(ids[start : start + seq - 4].tolist(), skip_special_tokens=False)
                spm, lines = bool(rng.random() < spm_rate), bool(rng.random() < line_rate)
                row, _ = fim(text, seq + 1, rng, spm=spm, lines=lines)
                rows.append(np.asarray(row, dtype=np.int64))
            else:
                s = int(rng.integers(0, len(stream) - seq - 1))
                rows.append(stream[s : s + seq + 1])
        data = np.stack(rows)
        y = data[:, 1:].copy()
        y[y == fim.pad] = IGNORE
        yield torch.from_numpy(data[:, :-1].copy()), torch.from_numpy(y)


@torch.no_grad()
def perplexity(model, data: np.ndarray, seq: int, max_windows: int = 64) -> float:
    model.eval()
    losses = []
    for start in range(0, min(len(data) - seq - 1, max_windows * seq), seq):
        x = torch.from_numpy(data[start : start + seq][None])
        y = torch.from_numpy(data[start + 1 : start + seq + 1][None])
        logits, _ = model(x)
        losses.append(F.cross_entropy(logits[0], y[0]).item())
    model.train()
    return math.exp(float(np.mean(losses)))


@torch.no_grad()
def fim_middle_perplexity(model, files: list[np.ndarray], fim: FimTransform, seq: int, n: int = 16) -> float:
    """Perplexity of the middle tokens (and the closing <|endoftext|>) of n PSM rows of held-out files (fixed seed)."""
    model.eval()
    rng = np.random.default_rng(1234)
    losses = []
    for i in range(n):
        ids = files[i % len(files)]
        start = int(rng.integers(0, max(1, len(ids) - seq + 1)))
        row, mid = fim(fim.tokenizer.decode(ids[start : start + seq - 4].tolist()), seq + 1, rng, spm=False)
        x = torch.tensor(row[:-1])[None]
        y = torch.tensor(row[1:])
        y[:mid] = IGNORE  # only what follows <fim_middle>
        y[y == fim.pad] = IGNORE
        if (y != IGNORE).sum() == 0:
            continue
        logits, _ = model(x)
        losses.append(F.cross_entropy(logits[0], y, ignore_index=IGNORE).item())
    model.train()
    return math.exp(float(np.mean(losses)))


def write_text_files(tokenizer: Tokenizer, eot: int, out: Path) -> None:
    """tokenizer.json and generation_config.json beside the checkpoint."""
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": eot, "eos_token_id": eot, "max_new_tokens": 64}, indent=2) + "\n"
    )


def continued_model(init_from: Path, vocab_size: int, n_positions: int, seed: int):
    """The checkpoint in init_from with its vocabulary grown to vocab_size (new embedding rows from the seeded
    initialisation) and its positions cut to n_positions: (model, config)."""
    old, old_config = load_model(init_from)
    values = old_config.to_dict()
    values.update(vocab_size=vocab_size, n_positions=n_positions)
    config = GPTBigCodeConfig.from_dict(values)
    model = init_weights(GPTBigCodeForCausalLM(config), config, seed)
    state = model.state_dict()
    with torch.no_grad():
        for name, value in old.state_dict().items():
            if name in ("transformer.wte.weight", "lm_head.weight"):
                state[name][: value.shape[0]] = value
            elif name == "transformer.wpe.weight":
                state[name].copy_(value[:n_positions])
            else:
                state[name].copy_(value)
    model.load_state_dict(state)
    return model, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=8)
    parser.add_argument("--n-positions", type=int, default=256, help="the context; keep it = --seq (all trained)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--fim-rate", type=float, default=0.5, help="fraction of rows FIM-transformed (SantaCoder)")
    parser.add_argument("--fim-spm-rate", type=float, default=0.5, help="fraction of FIM rows in SPM order")
    parser.add_argument(
        "--fim-line-rate",
        type=float,
        default=0.0,
        help="fraction of FIM rows whose middle is 1-3 whole lines (0: the recipe's character-level split only)",
    )
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=500, help="steps between held-out measurements")
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="continue from this checkpoint (its tokenizer gains the FIM tokens at the end of the vocabulary, its "
        "embeddings new rows; its sizes are kept, n_positions cut to --n-positions) instead of training from scratch",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    root = stdlib_root()
    files = stdlib_files(root)
    train_files = [p for p in files if not is_held_out(p, root)]
    held_files = [p for p in files if is_held_out(p, root)]
    train_texts, held_texts = read_texts(train_files), read_texts(held_files)
    print(
        f"corpus: {root} (Python {sys.version.split()[0]}): {len(train_texts)} training files, "
        f"{len(held_texts)} held out",
        flush=True,
    )

    if args.init_from is not None:
        tokenizer = Tokenizer.from_file(str(args.init_from / "tokenizer.json"))
        tokenizer.add_special_tokens([t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None])
    else:
        tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train_ids, held_ids = encode_corpus(tokenizer, train_texts), encode_corpus(tokenizer, held_texts)
    fim = FimTransform(tokenizer)
    train_docs = [np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(train_texts)]
    held_docs = [np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(held_texts) if len(e.ids) > 64]
    eot = tokenizer.token_to_id(EOT)
    print(
        f"tokenizer: {tokenizer.get_vocab_size()} tokens; {len(train_ids):,} training tokens, "
        f"{len(held_ids):,} held out",
        flush=True,
    )

    config = GPTBigCodeConfig(
        vocab_size=tokenizer.get_vocab_size(),
        n_positions=args.n_positions,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        multi_query=True,
        activation_function="gelu_pytorch_tanh",
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=None,
    )
    if args.init_from is not None:
        model, config = continued_model(args.init_from, tokenizer.get_vocab_size(), args.n_positions, args.seed)
    else:
        model = init_weights(GPTBigCodeForCausalLM(config), config, args.seed)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters ({config.n_layer} layers, width {config.n_embd})", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))),
    )
    data = batches(
        train_ids,
        train_docs,
        fim,
        args.batch,
        args.seq,
        args.fim_rate,
        args.fim_spm_rate,
        np.random.default_rng(args.seed),
        args.fim_line_rate,
    )
    start = time.time()
    log = []
    if args.init_from is not None:  # where the continued model starts
        entry = {"step": 0, "held_out_perplexity": round(perplexity(model, held_ids, args.seq, max_windows=32), 2)}
        entry["held_out_fim_middle_perplexity"] = round(fim_middle_perplexity(model, held_docs, fim, args.seq), 2)
        log.append(entry)
        print(json.dumps(entry), flush=True)
    for step in range(1, args.steps + 1):
        x, y = next(data)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), y.reshape(-1), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.steps:
            entry = {"step": step, "loss": round(loss.item(), 4), "minutes": round((time.time() - start) / 60, 2)}
            if step % args.eval_every == 0 or step == args.steps:
                entry["held_out_perplexity"] = round(perplexity(model, held_ids, args.seq, max_windows=32), 2)
                fim_ppl = fim_middle_perplexity(model, held_docs, fim, args.seq)
                entry["held_out_fim_middle_perplexity"] = round(fim_ppl, 2)
                save_checkpoint(model.eval(), config, args.out)  # a usable model if the run is cut short
                write_text_files(tokenizer, eot, args.out)
                model.train()
            log.append(entry)
            print(json.dumps(entry), flush=True)

    model.eval()
    save_checkpoint(model, config, args.out)
    write_text_files(tokenizer, eot, args.out)
    record = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "python": sys.version.split()[0],
        "files": {"train": len(train_texts), "held_out": len(held_texts)},
        "special_tokens": SPECIAL_TOKENS,
        "params": params,
        "log": log,
    }
    if args.init_from is not None and (args.init_from / "training_log.json").is_file():  # the earlier stage's record
        record["continued_from"] = json.loads((args.init_from / "training_log.json").read_text())
    (args.out / "training_log.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}; held-out perplexity {log[-1]['held_out_perplexity']}", flush=True)


if __name__ == "__main__":
    main()
