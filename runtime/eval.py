"""Quality on real code: perplexity and single-line exact match, left-to-right and fill-in-the-middle.

Torch-free; runs any bundle with a tokenizer on any backend (through the step contract, so a last-token-logits or
quantized graph, or TensorRT, is measured the same way as the portable fp32 one).

- Perplexity: the files' tokens (each file followed by eos, as in training), cut into windows of `window` tokens,
  teacher-forced one token per step (prefill the first token, then step): every prediction is the logits of a row's
  last position, which every backend returns.
- Single-line exact match (the SantaCoder and InCoder papers' single-line protocol): N non-blank lines sampled with
  a fixed seed, every file weighing the same (one large file, e.g. pydoc's topic texts, would otherwise be most of
  the sample); a smaller N is the first N of a larger one. For line i of a file, the prefix is the text before
  the line's newline (ending at the end of line i-1), the target is "\\n" + line i, the suffix is the rest of the
  file from the newline after line i. The parts are cut at token boundaries (the last `prefix_tokens` of the prefix,
  the first `suffix_tokens` of the suffix), so both modes see exactly the same prefix:
    left-to-right: prompt = prefix; greedy until the text has a second line (or eos);
    FIM: prompt = the bundle's FIM order of prefix and suffix; greedy until a newline after the first character,
    eos or <file_sep>.
  A line counts when the generated line, trailing whitespace aside, equals the target line. Putting the cut before
  the newline keeps the tokenization natural for both modes (a BPE merges "\\n" with the next line's indentation);
  with line_start (the default) the first generated token is the likeliest one that begins with a newline, in both
  modes (token healing: the prompt cannot say "the previous line is complete" in the tokens the model was trained
  on, this constraint does); line_start=False lets the model continue the previous line instead.

The default corpus is the default model's held-out files: the Python standard library's own .py files whose path
hashes into the held-out ~5% (the same split scripts/train_default_model.py trains on the rest of).
"""

from __future__ import annotations

import hashlib
import json
import math
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bigcode_deploy.runtime.errors import BigCodeError
from bigcode_deploy.runtime.fim import FimPrompter, FimTokens, assemble, fim_stop_ids
from bigcode_deploy.runtime.generate import GenerationOptions, stop_ids
from bigcode_deploy.runtime.progress import Progress, print_progress
from bigcode_deploy.runtime.session import DecodingSession

STDLIB_SKIP = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__")
MAX_FILE_BYTES = 4 << 20  # a source file larger than this is skipped (generated data, not code)
PROGRESS_EVERY_S = 5.0


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[Path]:
    """The standard library's .py files, sorted, without tests, demos and installed packages."""
    return sorted(p for p in root.rglob("*.py") if not any(part in STDLIB_SKIP for part in p.relative_to(root).parts))


def is_held_out(path: Path, root: Path) -> bool:
    """The default model's held-out split: ~5% of files, chosen by a hash of the path relative to the stdlib root."""
    return hashlib.sha256(str(path.relative_to(root)).encode()).digest()[0] < 13


def default_eval_files() -> list[Path]:
    """The default model's held-out files, from this interpreter's standard library."""
    root = stdlib_root()
    return [p for p in stdlib_files(root) if is_held_out(p, root)]


def source_files(directory: str | Path | None, pattern: str = "*.py") -> list[Path]:
    """The files under `directory` matching `pattern`, sorted (None: default_eval_files()). Raises BigCodeError for a
    directory that does not exist or holds no such file."""
    if directory is None:
        return default_eval_files()
    root = Path(directory)
    if not root.is_dir():
        raise BigCodeError(f"--files {root} is not a directory; give a directory of source files")
    files = sorted(p for p in root.rglob(pattern) if p.is_file())
    if not files:
        raise BigCodeError(f"--files {root} holds no file matching {pattern!r}; give another directory or --pattern")
    return files


def read_sources(paths: list[Path]) -> list[tuple[str, str]]:
    """(name, text) of each readable UTF-8 file of at most MAX_FILE_BYTES; others are skipped."""
    out = []
    for p in paths:
        try:
            if p.stat().st_size > MAX_FILE_BYTES:
                continue
            out.append((str(p), p.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    return out


@dataclass(frozen=True)
class LineCase:
    """One sampled line: file, 1-based line number, and the text before it, the line itself and the text after it."""

    file: str
    line_no: int
    prefix: str  # up to (not including) the newline that ends line_no - 1
    line: str  # the target line, without newlines
    suffix: str  # from the newline that ends the target line


def sample_lines(sources: list[tuple[str, str]], n: int, seed: int = 0) -> list[LineCase]:
    """n non-blank lines (not a file's first, at most 200 characters), every file weighing the same: the files in a
    seeded order, each file's lines in a seeded order, then one line per file per round (a file whose lines run out
    leaves the rounds). A smaller n is the first lines of a larger one. Raises BigCodeError when there are fewer
    than n lines."""
    rng = np.random.default_rng(seed)
    queues = []
    for f in rng.permutation(len(sources)):
        lines = sources[f][1].split("\n")
        first = next((i for i, line in enumerate(lines) if line.strip()), len(lines))
        usable = [i for i in range(first + 1, len(lines)) if lines[i].strip() and len(lines[i]) <= 200]
        queues.append((int(f), [usable[k] for k in rng.permutation(len(usable))]))
    total = sum(len(q) for _, q in queues)
    if total < n:
        raise BigCodeError(f"--lines {n}: the files hold only {total} usable lines; lower --lines")
    picked: list[tuple[int, int]] = []
    for round_ in range(max(len(q) for _, q in queues)):
        picked += [(f, q[round_]) for f, q in queues if round_ < len(q)]
        if len(picked) >= n:
            break
    cases = []
    for f, i in picked[:n]:
        name, text = sources[f]
        lines = text.split("\n")
        suffix = "\n" + "\n".join(lines[i + 1 :]) if i + 1 < len(lines) else ""
        cases.append(LineCase(name, i + 1, "\n".join(lines[:i]), lines[i], suffix))
    return cases


def first_line(text: str) -> str:
    """A generation's text up to its second line: "\\n" + the line (the newline that starts it kept)."""
    cut = text.find("\n", 1)
    return text if cut < 0 else text[:cut]


def line_matches(generated: str, case: LineCase) -> bool:
    return first_line(generated).rstrip() == ("\n" + case.line).rstrip()


@dataclass
class ModeScore:
    exact_match: float | None  # percent; None: not measured (the reason says why)
    correct: int = 0
    lines: int = 0
    reason: str | None = None


@dataclass
class EvalResult:
    bundle: str
    backend: str
    dtype: str
    quantization: str | None
    perplexity: float | None
    perplexity_tokens: int
    perplexity_reason: str | None
    l2r: ModeScore
    fim: ModeScore
    settings: dict[str, Any] = field(default_factory=dict)
    per_line: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def label(self) -> str:
        """fp32, fp16, ... or the weight-only scheme (int8, int4) of a quantized graph."""
        return self.quantization or self.dtype

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def line_start_ids(tokenizer, vocab_size: int) -> np.ndarray:
    """(vocab_size,) bool: the ids whose text begins with a newline (those a new line can start with)."""
    allowed = np.zeros(vocab_size, dtype=bool)
    for i in range(min(vocab_size, tokenizer.get_vocab_size())):
        allowed[i] = tokenizer.decode([i], skip_special_tokens=False).startswith("\n")
    return allowed


class LineRunner:
    """Greedy single-line completion of a batch of prompts over a DecodingSession: each row stops at a stop id, at
    the start of its second line, or after max_new_tokens; finished rows leave the batch. With `first` ((vocab,)
    bool), the first token is the likeliest of those allowed: token healing at the line boundary, so a prompt that
    ends where the previous line's text ends still says that a new line starts there."""

    def __init__(self, session_factory, tokenizer, max_new_tokens: int, first: np.ndarray | None = None):
        self.session_factory = session_factory
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.first = first

    def run(self, prompts: list[list[int]], stops: tuple[int, ...] | set[int]) -> list[str]:
        session: DecodingSession = self.session_factory()
        logits = session.prefill(prompts)  # (B, vocab)
        if self.first is not None:
            logits = np.where(self.first[None, : logits.shape[1]], logits, -np.inf)
        generated: list[list[int]] = [[] for _ in prompts]
        texts = [""] * len(prompts)
        while True:
            rows = session.rows
            tokens = np.argmax(logits, axis=-1).astype(np.int64)  # (active,)
            keep = np.ones(len(rows), dtype=bool)
            for i, (row, token) in enumerate(zip(rows, tokens)):
                if int(token) in stops:
                    keep[i] = False
                    continue
                generated[row].append(int(token))
                texts[row] = self.tokenizer.decode(generated[row], skip_special_tokens=True)
                if "\n" in texts[row][1:] or len(generated[row]) >= self.max_new_tokens:
                    keep[i] = False
            if not keep.any():
                return texts
            session.keep_rows(keep)
            logits = session.step(tokens[keep])


def encode_plain(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids if text else []


def cut_parts(tokenizer, case: LineCase, prefix_tokens: int, suffix_tokens: int) -> tuple[list[int], list[int]]:
    """The last prefix_tokens ids of the prefix and the first suffix_tokens ids of the suffix (each encoded alone,
    from a character window wide enough for the budget)."""
    chars = 16  # characters per token that certainly covers the budget (code BPE averages ~3-4)
    prefix = encode_plain(tokenizer, case.prefix[-prefix_tokens * chars :])[-prefix_tokens:]
    suffix = encode_plain(tokenizer, case.suffix[: suffix_tokens * chars])[:suffix_tokens]
    return prefix, suffix


def token_stream(tokenizer, sources: list[tuple[str, str]], eos: int | None, limit: int) -> np.ndarray:
    """The files' ids, each followed by eos (when there is one), at most `limit` ids (int64)."""
    ids: list[int] = []
    for _, text in sources:
        ids.extend(encode_plain(tokenizer, text))
        if eos is not None:
            ids.append(eos)
        if len(ids) >= limit:
            break
    return np.asarray(ids[:limit], dtype=np.int64)


def stepped_perplexity(
    session_factory, stream: np.ndarray, window: int, windows: int, batch: int, progress: Progress
) -> tuple[float, int]:
    """exp(mean negative log-likelihood) of `windows` consecutive windows of `window` + 1 ids, each teacher-forced
    one token per step (prefill the first id, then step): (perplexity, predicted tokens)."""
    starts = list(range(0, len(stream) - window, window))[:windows]
    if not starts:
        raise BigCodeError(f"the files hold {len(stream)} tokens, fewer than one window of {window + 1}; add files")
    nll, count, last = 0.0, 0, time.perf_counter()
    for b in range(0, len(starts), batch):
        rows = np.stack([stream[s : s + window + 1] for s in starts[b : b + batch]])  # (B, window + 1)
        session: DecodingSession = session_factory()
        logits = session.prefill(rows[:, :1].tolist())  # (B, vocab)
        for t in range(1, window + 1):
            z = logits.astype(np.float64)
            z -= z.max(axis=-1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # (B, vocab)
            nll -= float(logp[np.arange(len(rows)), rows[:, t]].sum())
            count += len(rows)
            if t < window:
                logits = session.step(rows[:, t])
        if time.perf_counter() - last > PROGRESS_EVERY_S:
            progress(f"  perplexity: {min(b + batch, len(starts))}/{len(starts)} windows")
            last = time.perf_counter()
    return math.exp(nll / count), count


def evaluate(
    generator,
    sources: list[tuple[str, str]],
    *,
    lines: int = 500,
    seed: int = 0,
    prefix_tokens: int = 256,
    suffix_tokens: int = 128,
    max_new_tokens: int = 48,
    window: int | None = None,
    windows: int = 32,
    batch: int = 8,
    mode: str | None = None,
    line_start: bool = True,
    backend_name: str = "ort",
    progress: Progress = print_progress,
) -> EvalResult:
    """Perplexity and single-line exact match (left-to-right and FIM) of one opened bundle (a runtime.api.Generator)
    on `sources` [(name, text)]. Raises BigCodeError for a bundle without a tokenizer or bad settings; FIM is
    reported as not measured (with the reason) for a bundle without FIM tokens."""
    start = time.perf_counter()
    bundle, tokenizer = generator.bundle, generator.tokenizer
    if tokenizer is None:
        raise BigCodeError(f"{bundle.path} has no tokenizer.json: eval measures text, so it needs one")
    for name, value, least in (("--lines", lines, 1), ("--windows", windows, 0), ("--batch", batch, 1)):
        if not isinstance(value, int) or value < least:
            raise BigCodeError(f"{name} {value!r} must be an integer >= {least}")
    n_positions = bundle.config["n_positions"]
    window = min(n_positions, 1024) if window is None else window
    if not 1 <= window <= n_positions:
        raise BigCodeError(f"--window {window} must be in [1, {n_positions}] (the model's context)")
    eos_ids = stop_ids(bundle.manifest, GenerationOptions())
    fim_tokens = FimTokens.from_json(bundle.manifest.fim) if bundle.manifest.fim else None
    prompter = FimPrompter(tokenizer, fim_tokens) if fim_tokens else None
    lead = prompter.lead if prompter else []
    budget = n_positions - max_new_tokens - 3 - len(lead)  # room for prefix + suffix in a FIM prompt
    if budget < 2:
        raise BigCodeError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in {n_positions} positions")
    if prefix_tokens + suffix_tokens > budget:
        scale = budget / (prefix_tokens + suffix_tokens)
        prefix_tokens, suffix_tokens = max(1, int(prefix_tokens * scale)), max(1, int(suffix_tokens * scale))
    settings = {
        "files": len(sources),
        "lines": lines,
        "seed": seed,
        "prefix_tokens": prefix_tokens,
        "suffix_tokens": suffix_tokens,
        "max_new_tokens": max_new_tokens,
        "window": window,
        "windows": windows,
        "fim_mode": (mode or fim_tokens.mode) if fim_tokens else None,
        "line_start": line_start,
    }

    def session_factory():
        return generator.session()

    # Perplexity.
    ppl, ppl_tokens, ppl_reason = None, 0, None
    if windows:
        eos = min(eos_ids) if eos_ids else None
        stream = token_stream(tokenizer, sources, eos, windows * window + 1)
        progress(f"{bundle.path}: perplexity over {len(stream):,} tokens ({window}-token windows, stepped) ...")
        ppl, ppl_tokens = stepped_perplexity(session_factory, stream, window, windows, batch, progress)
    else:
        ppl_reason = "not measured (--windows 0)"

    # Single lines.
    cases = sample_lines(sources, lines, seed)
    first = line_start_ids(tokenizer, bundle.config["vocab_size"]) if line_start else None
    runner = LineRunner(session_factory, tokenizer, max_new_tokens, first)
    l2r_ok, fim_ok, l2r_text, fim_text = [], [], [], []
    fim_stops = fim_stop_ids(eos_ids, fim_tokens) if fim_tokens else ()
    progress(f"{bundle.path}: {lines} lines, left-to-right" + (" and FIM" if fim_tokens else "") + " ...")
    last = time.perf_counter()
    for b in range(0, len(cases), batch):
        chunk = cases[b : b + batch]
        parts = [cut_parts(tokenizer, c, prefix_tokens, suffix_tokens) for c in chunk]
        texts = runner.run([[*lead, *p] if lead or p else [min(eos_ids)] for p, _ in parts], eos_ids)
        l2r_text += texts
        l2r_ok += [line_matches(t, c) for t, c in zip(texts, chunk)]
        if fim_tokens:
            texts = runner.run([assemble(fim_tokens, p, s, mode, lead) for p, s in parts], fim_stops)
            fim_text += texts
            fim_ok += [line_matches(t, c) for t, c in zip(texts, chunk)]
        if time.perf_counter() - last > PROGRESS_EVERY_S or b + batch >= len(cases):
            done = min(b + batch, len(cases))
            score = f"left-to-right {100 * sum(l2r_ok) / done:.1f}%"
            score += f", FIM {100 * sum(fim_ok) / done:.1f}%" if fim_tokens else ""
            progress(f"  lines: {done}/{len(cases)} ({score} exact so far)")
            last = time.perf_counter()
    l2r = ModeScore(100 * sum(l2r_ok) / len(cases), sum(l2r_ok), len(cases))
    if fim_tokens:
        fim = ModeScore(100 * sum(fim_ok) / len(cases), sum(fim_ok), len(cases))
    else:
        fim = ModeScore(None, reason="the bundle's tokenizer has no FIM tokens")
    per_line = [
        {
            "file": c.file,
            "line_no": c.line_no,
            "l2r": l2r_ok[i],
            "fim": fim_ok[i] if fim_tokens else None,
            "l2r_text": first_line(l2r_text[i]),  # "\n" + the line when the model started a new line
            "fim_text": first_line(fim_text[i]) if fim_tokens else None,
        }
        for i, c in enumerate(cases)
    ]
    q = bundle.manifest.quantization
    return EvalResult(
        bundle=str(bundle.path),
        backend=backend_name,
        dtype=bundle.manifest.dtype,
        quantization=q.get("scheme") if isinstance(q, dict) else None,
        perplexity=ppl,
        perplexity_tokens=ppl_tokens,
        perplexity_reason=ppl_reason,
        l2r=l2r,
        fim=fim,
        settings=settings,
        per_line=per_line,
        seconds=time.perf_counter() - start,
    )


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(results: list[EvalResult]) -> str:
    """A markdown table, one row per bundle; deltas against the first row."""
    base = results[0]
    lines = [
        "| bundle | graph | backend | perplexity | left-to-right EM % | FIM EM % | FIM - L2R | vs first row |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        gain = (
            f"{r.fim.exact_match - r.l2r.exact_match:+.1f}"
            if r.fim.exact_match is not None and r.l2r.exact_match is not None
            else "n/a"
        )
        if r is base:
            versus = "(reference)"
        else:
            parts = []
            if r.perplexity is not None and base.perplexity is not None:
                parts.append(f"ppl {100 * (r.perplexity / base.perplexity - 1):+.1f}%")
            parts.append(f"L2R {r.l2r.exact_match - base.l2r.exact_match:+.1f}")
            if r.fim.exact_match is not None and base.fim.exact_match is not None:
                parts.append(f"FIM {r.fim.exact_match - base.fim.exact_match:+.1f}")
            versus = ", ".join(parts)
        lines.append(
            f"| {Path(r.bundle).name} | {r.label} | {r.backend} | {fmt(r.perplexity, 2)} | "
            f"{fmt(r.l2r.exact_match)} ({r.l2r.correct}/{r.l2r.lines}) | "
            f"{fmt(r.fim.exact_match)}"
            + (f" ({r.fim.correct}/{r.fim.lines})" if r.fim.exact_match is not None else "")
            + f" | {gain} | {versus} |"
        )
    s = results[0].settings
    lines.append(
        f"\n{s['lines']} lines (seed {s['seed']}) from {s['files']} files; prefix <= {s['prefix_tokens']} tokens, "
        f"suffix <= {s['suffix_tokens']} tokens, greedy, <= {s['max_new_tokens']} new tokens; perplexity over "
        f"{results[0].perplexity_tokens:,} tokens in {s['window']}-token windows."
    )
    return "\n".join(lines)


def write_json(results: list[EvalResult], path: str | Path) -> None:
    Path(path).write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n", encoding="utf-8")
