"""The `bigcode-deploy` command line: a thin click layer, each option one argument of a Python function."""

from __future__ import annotations

import functools
import sys
from importlib.metadata import version

import click

from exporter.errors import BigCodeError

MODEL_DIR = click.argument("model_dir", required=False, type=click.Path(path_type=str))
DTYPE = click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)


def user_errors(fn):
    """Errors a user can cause become one line on stderr and exit code 2; anything else is a bug (traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BigCodeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version("bigcode-deploy"), prog_name="bigcode-deploy")
def main() -> None:
    """Export GPTBigCode models to ONNX and TensorRT, and run them with verified parity."""


@main.command()
@MODEL_DIR
@click.option("--ids", default="1,2,3", show_default=True, help="Comma-separated prompt token ids.")
@click.option("--top", default=5, show_default=True, help="How many next-token candidates to print.")
@DTYPE
@user_errors
def forward(model_dir: str | None, ids: str, top: int, dtype: str) -> None:
    """Run one forward pass of the reference model (MODEL_DIR: default, the embedded model)."""
    from runtime.reference import next_token_candidates

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
        click.option("--task", type=click.Choice(["causal-lm", "base", "sequence-classification", "token-classification"]),
                     default="causal-lm", show_default=True),
        DTYPE,
        click.option("--opset", default=18, show_default=True, help="ONNX opset of the standard domain (18-23)."),
        click.option("--no-cache", is_flag=True, help="No past inputs and no present outputs (prefill-only graph)."),
        click.option("--external-data", is_flag=True, help="Store weights in model.onnx.data (automatic above 1 GiB)."),
        click.option("--force", is_flag=True, help="Replace an existing OUT_DIR."),
        click.option("--no-check", is_flag=True, help="Skip onnx.checker and the ONNX Runtime parity check."),
        user_errors,
    ]
    for decorator in reversed(decorators):
        fn = decorator(fn)
    return fn


def _run_export(args, task, dtype, opset, no_cache, external_data, force, no_check) -> None:
    from exporter.export import export_bundle

    if len(args) > 2:
        raise click.UsageError("expected [MODEL_DIR] OUT_DIR")
    model_dir, out_dir = (None, args[0]) if len(args) == 1 else args
    export_bundle(
        model_dir, out_dir, task=task, dtype=dtype, opset=opset, use_cache=not no_cache,
        external_data=external_data, force=force, check=not no_check,
        progress=lambda message: click.echo(message, err=True),
    )


@main.command()
@_export_options
def export(**kwargs) -> None:
    """Export MODEL_DIR (default: the embedded model) to a deployment bundle OUT_DIR."""
    _run_export(**kwargs)


@click.command(name="export-to-onnx", context_settings={"help_option_names": ["-h", "--help"]})
@_export_options
def export_to_onnx_main(**kwargs) -> None:
    """Export MODEL_DIR (default: the embedded model) to a deployment bundle OUT_DIR."""
    _run_export(**kwargs)


@main.command()
@click.argument("bundle", type=click.Path(path_type=str))
@user_errors
def inspect(bundle: str) -> None:
    """Print a bundle's manifest summary and its node counts by domain and op."""
    from runtime.inspect import describe

    click.echo(describe(bundle))
