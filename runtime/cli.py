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
