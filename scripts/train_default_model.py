"""Train the embedded default model: a small GPTBigCode on the Python standard library's own .py files.

Reproducible: files are read in sorted order, the held-out split is a hash of each file's path, the BPE
tokenizer is trained by the tokenizers library on the training split, and the model (exporter.model, the same
reference model everything else uses) is trained for a fixed number of steps from fixed seeds on one thread.
The standard library is PSF-licensed. Writes config.json, model.safetensors, tokenizer.json and
generation_config.json, logging training loss and held-out perplexity.

    .venv/bin/python scripts/train_default_model.py --out exporter/default_model
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bigcode_deploy.exporter.checkpoint import save_checkpoint
from bigcode_deploy.exporter.config import GPTBigCodeConfig
from bigcode_deploy.exporter.model import GPTBigCodeForCausalLM, init_weights

EOT = "<|endoftext|>"


def stdlib_files(root: Path) -> list[Path]:
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__")
    return sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))


def is_held_out(path: Path, root: Path) -> bool:
    return hashlib.sha256(str(path.relative_to(root)).encode()).digest()[0] < 13  # ~5% of files


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
        special_tokens=[EOT],
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


def batches(data: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(data) - seq - 1, batch)
        x = np.stack([data[s : s + seq] for s in starts])
        y = np.stack([data[s + 1 : s + seq + 1] for s in starts])
        yield torch.from_numpy(x), torch.from_numpy(y)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=8)
    parser.add_argument("--n-positions", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    train_files = [p for p in files if not is_held_out(p, root)]
    held_files = [p for p in files if is_held_out(p, root)]
    train_texts, held_texts = read_texts(train_files), read_texts(held_files)
    print(
        f"corpus: {root} (Python {sys.version.split()[0]}): {len(train_texts)} training files, "
        f"{len(held_texts)} held out",
        flush=True,
    )

    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train_ids, held_ids = encode_corpus(tokenizer, train_texts), encode_corpus(tokenizer, held_texts)
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
    model = init_weights(GPTBigCodeForCausalLM(config), config, args.seed).train()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters ({config.n_layer} layers, width {config.n_embd})", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))),
    )
    data = batches(train_ids, args.batch, args.seq, np.random.default_rng(args.seed))
    start = time.time()
    log = []
    for step in range(1, args.steps + 1):
        x, y = next(data)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.steps:
            entry = {"step": step, "loss": round(loss.item(), 4), "minutes": round((time.time() - start) / 60, 2)}
            if step % 500 == 0 or step == args.steps:
                entry["held_out_perplexity"] = round(perplexity(model, held_ids, args.seq), 2)
            log.append(entry)
            print(json.dumps(entry), flush=True)

    model.eval()
    save_checkpoint(model, config, args.out)
    tokenizer.save(str(args.out / "tokenizer.json"))
    (args.out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": eot, "eos_token_id": eot, "max_new_tokens": 64}, indent=2) + "\n"
    )
    (args.out / "training_log.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "params": params, "log": log}, indent=2) + "\n"
    )
    print(f"wrote {args.out}; held-out perplexity {log[-1]['held_out_perplexity']}", flush=True)


if __name__ == "__main__":
    main()
