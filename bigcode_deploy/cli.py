"""The `bigcode-deploy` command line: a thin click layer, each option one argument of a Python function."""

from __future__ import annotations

import functools
import sys

import click

from bigcode_deploy.runtime.errors import BigCodeError
from bigcode_deploy.runtime.fim import DEFAULT_CURSOR, DEFAULT_FIM_MODE, FIM_MODES, split_at_cursor
from bigcode_deploy.runtime.manifest import BACKENDS, GRAPH_DTYPES, OPSETS, QUANTIZATION_SCHEMES, TARGETS, TASKS
from bigcode_deploy.runtime.version import __version__

MODEL_DIR = click.argument("model_dir", required=False, type=click.Path(path_type=str))
DTYPE = click.option("--dtype", type=click.Choice(list(GRAPH_DTYPES)), default="fp32", show_default=True)


def one_line(message: str) -> str:
    """A message as one printable line: a newline or other control character, and a lone surrogate (a byte of a
    path or argument that is not UTF-8, as Python decodes it), escaped as repr writes it."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message)


def user_errors(fn):
    """Errors a user can cause become one line on stderr and exit code 2; anything else is a bug (traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BigCodeError as exc:
            click.echo(one_line(f"error: {exc}"), err=True)
            sys.exit(2)

    return wrapper


class OneLineUsageErrors:
    """click's usage errors (bad option, missing argument, bad choice) as one line, "error: ..." and exit 2, like
    every other user error, instead of click's usage block."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.ClickException as exc:
            command = exc.ctx.command_path if getattr(exc, "ctx", None) else "bigcode-deploy"
            click.echo(one_line(f"error: {exc.format_message()} (see `{command} --help`)"), err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)


class Group(OneLineUsageErrors, click.Group):
    pass


class Command(OneLineUsageErrors, click.Command):
    pass


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bigcode-deploy")
def main() -> None:
    """Export GPTBigCode models to ONNX and TensorRT, and run them with verified parity."""


@main.command()
@MODEL_DIR
@click.option("--ids", default="1,2,3", show_default=True, help="Comma-separated prompt token ids.")
@click.option(
    "--top", type=click.IntRange(min=1), default=5, show_default=True, help="How many next-token candidates to print."
)
@DTYPE
@user_errors
def forward(model_dir: str | None, ids: str, top: int, dtype: str) -> None:
    """Run one forward pass of the reference model (MODEL_DIR: default, the embedded model)."""
    from bigcode_deploy.exporter.reference import next_token_candidates

    try:
        token_ids = [int(t) for t in ids.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"{ids!r} is not a comma-separated list of integers", param_hint="--ids") from None
    for token, logit in next_token_candidates(model_dir, token_ids, top=top, dtype=dtype):
        click.echo(f"{token}\t{logit:.4f}")


def _export_options(fn):
    """The export command's arguments and options (shared by `bigcode-deploy export` and `export-to-onnx`)."""
    decorators = [
        click.argument("args", nargs=-1, required=True, metavar="[MODEL_DIR] OUT_DIR"),
        click.option("--task", type=click.Choice(list(TASKS)), default="causal-lm", show_default=True),
        DTYPE,
        click.option(
            "--opset",
            default=18,
            show_default=True,
            help=f"ONNX opset of the standard domain ({OPSETS.start}-{OPSETS.stop - 1}).",
        ),
        click.option("--no-cache", is_flag=True, help="No past inputs and no present outputs (prefill-only graph)."),
        click.option("--external-data", is_flag=True, help="Store weights in model.onnx.data (automatic above 1 GiB)."),
        click.option("--force", is_flag=True, help="Replace an existing OUT_DIR."),
        click.option("--no-check", is_flag=True, help="Skip onnx.checker and the ONNX Runtime parity check."),
        click.option(
            "--fim-mode",
            type=click.Choice(list(FIM_MODES)),
            default=DEFAULT_FIM_MODE,
            show_default=True,
            help="Fill-in-the-middle prompt order recorded for the bundle (when its tokenizer has FIM tokens).",
        ),
        user_errors,
    ]
    for decorator in reversed(decorators):
        fn = decorator(fn)
    return fn


def _run_export(args, task, dtype, opset, no_cache, external_data, force, no_check, fim_mode) -> None:
    from bigcode_deploy.exporter.export import export_bundle

    if len(args) > 2:
        raise click.UsageError("expected [MODEL_DIR] OUT_DIR")
    model_dir, out_dir = (None, args[0]) if len(args) == 1 else args
    export_bundle(
        model_dir,
        out_dir,
        task=task,
        dtype=dtype,
        opset=opset,
        use_cache=not no_cache,
        external_data=external_data,
        force=force,
        check=not no_check,
        fim_mode=fim_mode,
        progress=lambda message: click.echo(message, err=True),
    )


@main.command()
@_export_options
def export(**kwargs) -> None:
    """Export MODEL_DIR (default: the embedded model) to a deployment bundle OUT_DIR."""
    _run_export(**kwargs)


@click.command(cls=Command, name="export-to-onnx", context_settings={"help_option_names": ["-h", "--help"]})
@_export_options
def export_to_onnx_main(**kwargs) -> None:
    """Export MODEL_DIR (default: the embedded model) to a deployment bundle OUT_DIR."""
    _run_export(**kwargs)


@main.command()
@click.argument("bundle", type=click.Path(path_type=str))
@user_errors
def inspect(bundle: str) -> None:
    """Print a bundle's manifest summary and its node counts by domain and op."""
    from bigcode_deploy.runtime.inspect import describe

    click.echo(describe(bundle))


def _opener(model_dir):
    """open_any_backend with the checkpoint for --backend torch."""
    from bigcode_deploy.workflows.backends import open_any_backend

    return functools.partial(open_any_backend, model_dir=model_dir)


BACKEND = click.option(
    "--backend",
    type=click.Choice(list(BACKENDS)),
    default="ort",
    show_default=True,
    help="Where the bundle runs (torch: the reference model).",
)
THREADS = click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Intra-op threads (0: the library's default).",
)


@main.command()
@click.argument("bundle", type=click.Path(path_type=str))
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=str),
    default=None,
    help="Judge against the live torch reference of this checkpoint (default: the bundle's stored reference "
    "outputs; no torch or checkpoint needed).",
)
@BACKEND
@click.option(
    "--steps", type=int, default=None, help="Cached decode steps after the prefill (live reference; default 4)."
)
@click.option("--seed", type=int, default=None, help="Seed of the reference prompts (live reference; default 0).")
@THREADS
@user_errors
def verify(bundle, model_dir, backend, steps, seed, threads) -> None:
    """Judge BUNDLE on a backend against the torch reference; write parity.json; exit 2 on a mismatch."""
    from bigcode_deploy.workflows.verify import verify as run_verify

    report = run_verify(
        bundle,
        model_dir=model_dir,
        backend=backend,
        steps=steps,
        seed=seed,
        threads=threads,
        note=lambda message: click.echo(message, err=True),
    )
    click.echo(report.table())
    report.raise_on_failure()


def _read_text(path: str, option: str, limit: int = 16 << 20) -> str:
    """A UTF-8 text file of at most `limit` bytes, or BigCodeError naming the option, the path and what to do."""
    from bigcode_deploy.runtime.bounded_file import read_bytes

    data = read_bytes(path, limit=limit, error=BigCodeError, fix=f"give {option} a readable source file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BigCodeError(f"{option} {path} is not UTF-8 text; give a source file") from None


@main.command()
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--prompt", default=None, help="Prompt text (needs the bundle's tokenizer.json).")
@click.option("--ids", default=None, help="Prompt as comma-separated token ids.")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", default=0, show_default=True, help="0: off.")
@click.option("--top-p", default=1.0, show_default=True, help="1: off.")
@click.option("--repetition-penalty", default=1.0, show_default=True, help="1: off.")
@click.option("--seed", default=None, type=int, help="Seed for sampling (same seed, same tokens).")
@click.option(
    "--stop-token",
    "stop_tokens",
    multiple=True,
    type=int,
    help="Stop token id (repeatable; default: the bundle's, generation_config.json's eos ids).",
)
@click.option("--show-special", is_flag=True, help="Print special tokens' text (<|endoftext|>, FIM tokens).")
@click.option("--suffix", default=None, help="Fill in the middle: the text after the cursor (--prompt is before it).")
@click.option(
    "--file",
    "fim_file",
    type=click.Path(path_type=str),
    default=None,
    help="Fill in the middle of this file at its cursor marker (see --cursor); prints the middle.",
)
@click.option("--cursor", default=DEFAULT_CURSOR, show_default=True, help="The marker in --file where the middle goes.")
@click.option(
    "--fim-mode", type=click.Choice(list(FIM_MODES)), default=None, help="FIM prompt order (default: the bundle's)."
)
@BACKEND
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=str),
    default=None,
    help="Checkpoint for --backend torch (default: the one recorded in the manifest).",
)
@THREADS
@user_errors
def generate(
    bundle,
    prompt,
    ids,
    suffix,
    fim_file,
    cursor,
    fim_mode,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    repetition_penalty,
    seed,
    stop_tokens,
    show_special,
    backend,
    model_dir,
    threads,
) -> None:
    """Stream a continuation of a prompt from BUNDLE, or with --suffix / --file the middle between a prefix and a
    suffix (fill-in-the-middle); print tokens/s at the end."""
    from bigcode_deploy.runtime.api import open_generator

    infill = suffix is not None or fim_file is not None
    if fim_file is not None:
        if prompt is not None or ids is not None or suffix is not None:
            raise click.UsageError("--file takes the prefix and suffix from the file: drop --prompt, --ids, --suffix")
        prompt, suffix = split_at_cursor(_read_text(fim_file, "--file"), cursor, fim_file)
    elif suffix is not None and (prompt is None or ids is not None):
        raise click.UsageError("--suffix needs --prompt TEXT (the text before the cursor), not --ids")
    elif (prompt is None) == (ids is None):
        raise click.UsageError("give exactly one of --prompt TEXT or --ids 1,2,3")
    if fim_mode is not None and not infill:
        raise click.UsageError("--fim-mode applies to infilling: give --suffix or --file")
    options = dict(
        show_special=show_special,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop_token_ids=tuple(stop_tokens) if stop_tokens else None,
    )
    with open_generator(bundle, backend=backend, threads=threads, opener=_opener(model_dir)) as generator:
        if infill:
            pieces, stats = generator.stream_infill(prompt, suffix, mode=fim_mode, **options)
        else:
            pieces, stats = generator.stream_text(prompt if prompt is not None else None, ids=ids, **options)
        for piece in pieces:
            click.echo(piece, nl=False)
        click.echo()
    click.echo(
        f"[{stats.new_tokens} tokens; prefill {stats.prefill_s * 1000:.1f} ms; decode "
        f"{stats.decode_tokens_per_s:.1f} tokens/s]",
        err=True,
    )


@main.command()
@click.argument("bundle", type=click.Path(path_type=str))
@click.argument("out_dir", type=click.Path(path_type=str))
@click.option("--target", type=click.Choice(list(TARGETS)), required=True)
@click.option(
    "--dtype",
    type=click.Choice(list(GRAPH_DTYPES)),
    default=None,
    help="Graph dtype (default: the bundle's; another dtype re-exports the source checkpoint).",
)
@click.option("--last-token-logits", is_flag=True, help="Compute logits for each row's last position only.")
@click.option(
    "--quantize",
    type=click.Choice(list(QUANTIZATION_SCHEMES)),
    default=None,
    help="ort: weight-only quantization of the MatMul weights (lm_head included; embeddings exact).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="tensorrt: the batch range recorded for profiles.",
)
@click.option("--force", is_flag=True, help="Replace an existing OUT_DIR.")
@click.option("--no-check", is_flag=True, help="Skip the ONNX Runtime comparison with the input bundle.")
@user_errors
def optimize(bundle, out_dir, target, dtype, last_token_logits, quantize, max_batch, force, no_check) -> None:
    """Rewrite BUNDLE's graph for one target into a new bundle OUT_DIR."""
    from bigcode_deploy.workflows.optimize import optimize_bundle

    optimize_bundle(
        bundle,
        out_dir,
        target=target,
        dtype=dtype,
        last_token_logits=last_token_logits,
        quantize=quantize,
        max_batch=max_batch,
        force=force,
        check=not no_check,
        progress=lambda message: click.echo(message, err=True),
    )


@main.command()
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--target", type=click.Choice(["tensorrt"]), default="tensorrt", show_default=True)
@click.option(
    "--tensorrt-version",
    default=None,
    help="Judge the opset with this TensorRT's parser range (e.g. 10.13); default: the installed tensorrt's, "
    "else the newest known range.",
)
@user_errors
def lint(bundle, target, tensorrt_version) -> None:
    """Check statically what TensorRT's ONNX parser would reject; one line per problem, exit 1 when any."""
    from importlib import metadata

    from bigcode_deploy.graphs.lint import lint_bundle

    if tensorrt_version is None:
        try:  # the distribution's version, without importing tensorrt (no GPU needed to lint)
            tensorrt_version = metadata.version("tensorrt")
        except metadata.PackageNotFoundError:
            click.echo("tensorrt is not installed: the opset is judged against the newest known parser range", err=True)
    problems = lint_bundle(bundle, target, tensorrt_version)
    for problem in problems:
        click.echo(problem)
    if problems:
        sys.exit(1)
    click.echo(f"{bundle}: no problems for {target}" + (f" (TensorRT {tensorrt_version})" if tensorrt_version else ""))


@main.command(name="build-engine")
@click.argument("bundle", type=click.Path(path_type=str))
@click.option(
    "--lower-to",
    "lower_to",
    type=click.Path(path_type=str),
    default=None,
    help="For a bundle of another target: lower it into this new tensorrt bundle first, and build there.",
)
@click.option("--force", is_flag=True, help="Replace an existing --lower-to directory.")
@click.option(
    "--max-batch", type=click.IntRange(min=1), default=None, help="Largest batch (default: the manifest's batch range)."
)
@click.option("--max-prompt", type=click.IntRange(min=1), default=None, help="Longest prompt of the prefill profile.")
@click.option(
    "--max-context",
    type=click.IntRange(min=1),
    default=None,
    help="Longest context of the decode profile (default: n_positions).",
)
@click.option(
    "--timing-cache",
    type=click.Path(path_type=str),
    default=None,
    help="A directory of timing caches (one per GPU model and TensorRT version): read, reuse and save.",
)
@click.option("--workspace-gb", type=float, default=4.0, show_default=True, help="TensorRT's workspace limit (GiB).")
@click.option(
    "--same-compute-capability",
    is_flag=True,
    help="Build a plan that loads on any GPU of this compute capability (default: this GPU model only).",
)
@user_errors
def build_engine(
    bundle, lower_to, force, max_batch, max_prompt, max_context, timing_cache, workspace_gb, same_compute_capability
) -> None:
    """Build a TensorRT engine for a tensorrt BUNDLE into BUNDLE/engine/<gpu-arch>-trt<version>/.

    A bundle of another target is refused unless --lower-to OUT_DIR names where to lower it first.
    """
    from pathlib import Path

    from bigcode_deploy.workflows.build_engine import build_engine_for

    build_engine_for(
        bundle,
        lower_to=Path(lower_to) if lower_to else None,
        force=force,
        max_batch=max_batch,
        max_prompt=max_prompt,
        max_context=max_context,
        timing_cache=timing_cache,
        workspace_gb=workspace_gb,
        same_compute_capability=same_compute_capability,
        progress=lambda message: click.echo(message, err=True),
    )


@main.command()
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--prompt-len", default=128, show_default=True)
@click.option("--new-tokens", default=64, show_default=True)
@click.option("--batch", default=1, show_default=True)
@BACKEND
@click.option("--repeats", default=3, show_default=True, help="Timed repeats after one warm-up; medians are reported.")
@click.option(
    "--model", "model_dir", type=click.Path(path_type=str), default=None, help="Checkpoint for --backend torch."
)
@THREADS
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def bench(bundle, prompt_len, new_tokens, batch, backend, repeats, model_dir, threads, as_json) -> None:
    """Measure prefill time and decode tokens/s of BUNDLE on a backend."""
    import json as json_module

    from bigcode_deploy.runtime.bench import bench_bundle

    result = bench_bundle(
        bundle,
        progress=None if as_json else (lambda line: click.echo(line, err=True)),
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        batch=batch,
        backend=backend,
        repeats=repeats,
        threads=threads,
        opener=_opener(model_dir),
    )
    click.echo(json_module.dumps(result.to_json()) if as_json else result.summary())


@main.command(name="eval")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=str), metavar="BUNDLE...")
@click.option(
    "--files",
    "files_dir",
    type=click.Path(path_type=str),
    default=None,
    help="Directory of source files (default: the default model's held-out standard-library files).",
)
@click.option("--pattern", default="*.py", show_default=True, help="Which files under --files.")
@click.option("--lines", type=click.IntRange(min=1), default=500, show_default=True, help="Sampled lines.")
@click.option("--seed", default=0, show_default=True, help="Seed of the line sample.")
@click.option(
    "--windows", type=click.IntRange(min=0), default=32, show_default=True, help="Perplexity windows (0: skip)."
)
@click.option(
    "--window", type=click.IntRange(min=1), default=None, help="Tokens per window (default: the context, <= 1024)."
)
@click.option(
    "--prefix-tokens",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Context before the line (shrunk to fit).",
)
@click.option(
    "--suffix-tokens",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Context after it, FIM (shrunk to fit).",
)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=48, show_default=True, help="At most, per line.")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Rows per graph run.")
@click.option(
    "--free-start",
    is_flag=True,
    help="Let a completion continue the previous line (default: its first token must begin the new line).",
)
@click.option(
    "--fim-mode", type=click.Choice(list(FIM_MODES)), default=None, help="FIM prompt order (default: the bundle's)."
)
@BACKEND
@click.option(
    "--model", "model_dir", type=click.Path(path_type=str), default=None, help="Checkpoint for --backend torch."
)
@THREADS
@click.option("--json", "json_out", type=click.Path(path_type=str), default=None, help="Also write the results here.")
@user_errors
def eval_command(
    bundles,
    files_dir,
    pattern,
    lines,
    seed,
    windows,
    window,
    prefix_tokens,
    suffix_tokens,
    max_new_tokens,
    batch,
    free_start,
    fim_mode,
    backend,
    model_dir,
    threads,
    json_out,
) -> None:
    """Quality of BUNDLE(s) on real code: perplexity, single-line exact match left-to-right and fill-in-the-middle;
    a side-by-side table (deltas against the first bundle)."""
    from bigcode_deploy.runtime.api import open_generator
    from bigcode_deploy.runtime.eval import evaluate, read_sources, source_files, table, write_json

    sources = read_sources(source_files(files_dir, pattern))
    progress = lambda message: click.echo(message, err=True)  # noqa: E731
    results = []
    for bundle in bundles:
        with open_generator(bundle, backend=backend, threads=threads, opener=_opener(model_dir)) as generator:
            results.append(
                evaluate(
                    generator,
                    sources,
                    lines=lines,
                    seed=seed,
                    prefix_tokens=prefix_tokens,
                    suffix_tokens=suffix_tokens,
                    max_new_tokens=max_new_tokens,
                    window=window,
                    windows=windows,
                    batch=batch,
                    mode=fim_mode,
                    line_start=not free_start,
                    backend_name=backend,
                    progress=progress,
                )
            )
    click.echo(table(results))
    if json_out is not None:
        write_json(results, json_out)
        progress(f"wrote {json_out}")


if __name__ == "__main__":
    main()
