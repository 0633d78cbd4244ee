"""Every backend by name, the torch reference included (which needs torch and the checkpoint, so it cannot be
offered by the runtime layer itself)."""

from __future__ import annotations

from pathlib import Path

from bigcode_deploy.runtime.backends import MAX_THREADS, open_backend
from bigcode_deploy.runtime.bundle import Bundle
from bigcode_deploy.runtime.errors import BigCodeError


def open_any_backend(
    bundle: Bundle,
    backend: str = "ort",
    *,
    model_dir: str | Path | None = None,
    threads: int = 0,
    source_checked: bool = False,
):
    """ort, ort-cuda, tensorrt (bigcode_deploy.runtime.backends) or torch (the reference model from model_dir, or
    the checkpoint recorded in the manifest; source_checked: its sha256 was already compared with the manifest).
    Enter the result with `with`. Raises BigCodeError for another name."""
    if backend == "torch":
        if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= MAX_THREADS:
            raise BigCodeError(
                f"threads {str(threads)[:40]!r} must be an integer in [0, {MAX_THREADS}] (0: the default)"
            )
        from bigcode_deploy.exporter.torch_backend import TorchBackend

        return TorchBackend(bundle, model_dir=model_dir, threads=threads, source_checked=source_checked)
    return open_backend(bundle, backend, threads=threads)
