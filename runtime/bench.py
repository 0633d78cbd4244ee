"""`bigcode-deploy bench`: prefill time and decode speed of a bundle on a backend (medians after a warm-up)."""

from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from bigcode_deploy.runtime.backends import open_backend
from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import BigCodeError, ContextOverflow
from bigcode_deploy.runtime.manifest import MAX_DIM
from bigcode_deploy.runtime.session import DecodingSession

MAX_REPEATS = 1000  # timed repeats (and warm-ups) one bench run may ask for


@dataclass
class BenchResult:
    backend: str
    batch: int
    prompt_len: int
    new_tokens: int
    repeats: int
    prefill_s: float  # median seconds for the prompt's prefill
    decode_tok_s: float  # tokens per second over the decode steps (all rows), median over repeats
    token_latency_ms: float  # median latency of one decode step
    last_token_latency_ms: float  # median latency of the steps in the last eighth (the longest context)
    peak_rss_mb: float

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.backend}: batch {self.batch}, prompt {self.prompt_len}, {self.new_tokens} new tokens: "
            f"prefill {self.prefill_s * 1000:.1f} ms, decode {self.decode_tok_s:.1f} tokens/s "
            f"({self.token_latency_ms:.2f} ms/step), peak RSS {self.peak_rss_mb:.0f} MB"
        )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prefill_bytes(bundle: Bundle, batch: int, prompt_len: int) -> int:
    """A lower bound of the bytes a prefill of batch x prompt_len tokens holds at once: float32 logits (every
    position, or the last with logits_positions `last`) plus the KV cache (n_layer x 2 * head_dim values per token, the
    multi-query size; multi-head holds n_head times more)."""
    config = bundle.config
    positions = 1 if bundle.manifest.logits_positions == "last" else prompt_len
    logits = batch * positions * config["vocab_size"] * 4
    cache = batch * prompt_len * config["n_layer"] * 2 * (config["n_embd"] // config["n_head"]) * 4
    return logits + cache


def bench_bundle(
    bundle_path,
    *,
    prompt_len: int = 128,
    new_tokens: int = 64,
    batch: int = 1,
    backend: str = "ort",
    repeats: int = 3,
    warmup: int = 1,
    threads: int = 0,
    seed: int = 0,
    opener=None,
    progress=None,
) -> BenchResult:
    """Greedy decoding with no stop token, so every repeat does the same work. progress: called with one line once
    the options and the bundle are checked, before the work starts."""
    for name, value, least, most in (
        ("prompt_len", prompt_len, 1, MAX_DIM),
        ("new_tokens", new_tokens, 2, MAX_DIM),
        ("batch", batch, 1, MAX_DIM),
        ("repeats", repeats, 1, MAX_REPEATS),
        ("warmup", warmup, 0, MAX_REPEATS),
        ("seed", seed, 0, 2**63 - 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
            raise BigCodeError(f"{name}={str(value)[:40]} must be an integer >= {least} and <= {most}")
    bundle = Bundle.open(bundle_path)
    n_positions, vocab = bundle.config["n_positions"], bundle.config["vocab_size"]
    if prompt_len + new_tokens > n_positions:  # before any array is made: a huge prompt_len fails here, at once
        raise ContextOverflow(
            f"prompt_len={prompt_len} plus new_tokens={new_tokens} exceeds the model's context of {n_positions} "
            "positions; lower prompt_len or new_tokens"
        )
    need = prefill_bytes(bundle, batch, prompt_len)
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise BigCodeError(
            f"batch={batch} with prompt_len={prompt_len} needs ~{need / 2**30:.1f} GiB for the prefill's logits and "
            f"cache, more than this machine's {have / 2**30:.1f} GiB of memory; lower batch or prompt_len"
        )
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, vocab, (batch, prompt_len)).tolist()
    prefill, rates, steps_all, tail_all = [], [], [], []
    with (opener or open_backend)(bundle, backend, threads=threads) as b:  # checks threads, backend, checkpoint
        session = DecodingSession(b, bundle)
        session.check_fits(prompts, new_tokens)
        if progress is not None:
            progress(f"benchmarking {bundle_path} on {backend} ({repeats} repeats after a warm-up) ...")
        for r in range(warmup + repeats):
            start = time.perf_counter()
            logits = session.prefill(prompts)
            prefill_s = time.perf_counter() - start
            step_times = []
            for _ in range(new_tokens - 1):
                start = time.perf_counter()  # a step: choosing the token (greedy) and running the graph
                logits = session.step(logits.argmax(-1))
                step_times.append(time.perf_counter() - start)
            if r >= warmup:
                prefill.append(prefill_s)
                rates.append(batch * len(step_times) / sum(step_times))
                steps_all.extend(step_times)
                tail_all.extend(step_times[-max(1, len(step_times) // 8) :])
    return BenchResult(
        backend=backend,
        batch=batch,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        repeats=repeats,
        prefill_s=statistics.median(prefill),
        decode_tok_s=statistics.median(rates),
        token_latency_ms=statistics.median(steps_all) * 1000,
        last_token_latency_ms=statistics.median(tail_all) * 1000,
        peak_rss_mb=peak_rss_mb(),
    )
