"""The Python side of the C ABI (runtime/include/bigcode_runtime.h), installed into the embedded interpreter.

libbigcode_runtime.so is built by cffi's embedding mode (runtime/capi_build.py): cffi writes the C entry points,
starts CPython on the first call and runs `install(ffi, lib)`, which defines each entry point here with
@ffi.def_extern. cffi was chosen over pybind11's embed because it needs no hand-written C or C++ at all (the
header is the whole interface) and it takes the GIL around every entry point by itself.

Every entry point maps exceptions to a status code and a thread-local message, so no Python exception crosses
into C.
"""

from __future__ import annotations

import functools
import json
import threading
import traceback

import numpy as np

from bigcode_deploy.runtime.errors import (
    BackendUnavailable,
    BigCodeError,
    BundleError,
    CheckpointError,
    ConfigError,
    ContextOverflow,
)
from bigcode_deploy.runtime.version import __version__

OK, INVALID_ARGUMENT, BAD_BUNDLE, CONTEXT_OVERFLOW, BACKEND_UNAVAILABLE, CANCELLED, STATE, INTERNAL = range(8)


class StateError(BigCodeError):
    """A call out of order (generate before prefill, a closed handle)."""


class Cancelled(BigCodeError):
    """bcr_session_cancel was called, or the token callback asked to stop."""


def status_of(exc: BaseException) -> int:
    for kind, status in (
        (Cancelled, CANCELLED),
        (StateError, STATE),
        (ContextOverflow, CONTEXT_OVERFLOW),
        (BackendUnavailable, BACKEND_UNAVAILABLE),
        (BundleError, BAD_BUNDLE),
        (CheckpointError, BAD_BUNDLE),
        (ConfigError, INVALID_ARGUMENT),
        (BigCodeError, INVALID_ARGUMENT),
    ):
        if isinstance(exc, kind):
            return status
    return INTERNAL


class Session:
    def __init__(self, bundle_handle: BundleHandle):
        self.owner = bundle_handle
        self.decoding = bundle_handle.generator.session()
        self.logits: np.ndarray | None = None
        self.seen: list[list[int]] = []
        self.cancel = threading.Event()

    def prefill(self, prompts: list[list[int]]) -> None:
        self.cancel.clear()
        self.logits = self.decoding.prefill(prompts)
        self.seen = [list(p) for p in prompts]


class BundleHandle:
    def __init__(self, path: str, backend: str, threads: int):
        from bigcode_deploy.runtime.api import Generator
        from bigcode_deploy.runtime.backends import open_backend
        from bigcode_deploy.runtime.bundle import Bundle

        bundle = Bundle.open(path)
        self.backend = open_backend(bundle, backend, threads=threads)
        self.backend.__enter__()
        self.generator = Generator(bundle, self.backend)

    def close(self) -> None:
        self.backend.__exit__(None, None, None)


def install(ffi, lib) -> None:
    local = threading.local()
    alive: dict[int, object] = {}  # handle address -> the cdata from ffi.new_handle (keeps it valid)
    version = ffi.new("char[]", __version__.encode())

    def set_error(message: str) -> None:
        local.error = ffi.new("char[]", message.encode("utf-8", "replace"))

    def entry(fn):
        """Run fn; map exceptions to a status and the thread's last error."""

        @functools.wraps(fn)
        def wrapper(*args):
            set_error("")
            try:
                fn(*args)
                return OK
            except BaseException as exc:  # nothing may cross into C
                status = status_of(exc)
                if status == INTERNAL:
                    set_error(
                        f"internal error: {type(exc).__name__}: {exc} "
                        f"({traceback.extract_tb(exc.__traceback__)[-1].filename.split('/')[-1]})"
                    )
                else:
                    set_error(str(exc))
                return status

        return wrapper

    def new_handle(obj, ctype: str):
        handle = ffi.new_handle(obj)
        alive[int(ffi.cast("uintptr_t", handle))] = handle
        return ffi.cast(ctype, handle)

    def lookup(ptr, kind: type, name: str):
        if ptr == ffi.NULL:
            raise BigCodeError(f"{name} is NULL")
        handle = alive.get(int(ffi.cast("uintptr_t", ptr)))
        obj = ffi.from_handle(handle) if handle is not None else None
        if not isinstance(obj, kind):
            raise StateError(f"{name} is not an open handle (closed already, or never opened)")
        return obj

    def release(ptr) -> object | None:
        if ptr == ffi.NULL:
            return None
        handle = alive.pop(int(ffi.cast("uintptr_t", ptr)), None)
        return ffi.from_handle(handle) if handle is not None else None

    def prefilled(ptr, call: str) -> Session:
        s = lookup(ptr, Session, "session")
        if s.logits is None:
            raise StateError(f"{call} needs a prefill first (bcr_session_prefill_ids or _text)")
        return s

    def text(ptr, name: str) -> str:
        if ptr == ffi.NULL:
            raise BigCodeError(f"{name} is NULL")
        return ffi.string(ptr).decode("utf-8")

    @ffi.def_extern()
    def bcr_version():
        return version

    @ffi.def_extern()
    def bcr_last_error():
        error = getattr(local, "error", None)
        if error is None:
            set_error("")
        return local.error

    @ffi.def_extern()
    def bcr_sampling_options_default(options):
        if options == ffi.NULL:
            return
        options.max_new_tokens, options.temperature, options.top_k, options.top_p = 32, 0.0, 0, 1.0
        options.repetition_penalty, options.seed, options.has_seed = 1.0, 0, 0
        options.stop_token_ids, options.num_stop_token_ids = ffi.NULL, 0

    @ffi.def_extern()
    @entry
    def bcr_bundle_open(path, options, out):
        if out == ffi.NULL:
            raise BigCodeError("out is NULL")
        out[0] = ffi.NULL
        backend, threads = "ort", 0
        if options != ffi.NULL:
            if options.backend != ffi.NULL:
                backend = text(options.backend, "options.backend")
            threads = int(options.threads)
        out[0] = new_handle(BundleHandle(text(path, "path"), backend, threads), "bcr_bundle *")

    @ffi.def_extern()
    @entry
    def bcr_bundle_info(bundle, buffer, capacity, needed):
        b = lookup(bundle, BundleHandle, "bundle")
        manifest = b.generator.bundle.manifest
        info = {
            "task": manifest.task,
            "dtype": manifest.dtype,
            "target": manifest.target,
            "vocab_size": manifest.config["vocab_size"],
            "n_positions": manifest.config["n_positions"],
            "has_tokenizer": b.generator.tokenizer is not None,
            "backend": b.backend.name,
        }
        parity = b.generator.bundle.path / "parity.json"
        if parity.is_file():
            report = json.loads(parity.read_text())
            info["parity"] = {
                k: report.get(k)
                for k in ("ok", "backend", "dtype", "top1_agreement", "mean_abs_logit_error", "greedy_first_divergence")
            }
        data = json.dumps(info).encode()
        if needed != ffi.NULL:
            needed[0] = len(data) + 1
        if buffer != ffi.NULL and capacity > 0:
            n = min(len(data), capacity - 1)
            ffi.memmove(buffer, data[:n], n)
            buffer[n] = b"\0"
        if capacity < len(data) + 1:
            raise BigCodeError(f"buffer too small: the info needs {len(data) + 1} bytes")

    @ffi.def_extern()
    def bcr_bundle_close(bundle):
        obj = release(bundle)
        if isinstance(obj, BundleHandle):
            obj.close()

    @ffi.def_extern()
    @entry
    def bcr_session_create(bundle, out):
        if out == ffi.NULL:
            raise BigCodeError("out is NULL")
        out[0] = ffi.NULL
        out[0] = new_handle(Session(lookup(bundle, BundleHandle, "bundle")), "bcr_session *")

    @ffi.def_extern()
    @entry
    def bcr_session_prefill_ids(session, prompts, lengths, batch):
        s = lookup(session, Session, "session")
        if prompts == ffi.NULL or lengths == ffi.NULL or batch <= 0:
            raise BigCodeError("prompts and lengths must be non-NULL and batch >= 1")
        rows = []
        for i in range(batch):
            if prompts[i] == ffi.NULL or lengths[i] <= 0:
                raise BigCodeError(f"prompt {i} is NULL or empty")
            rows.append(list(ffi.unpack(prompts[i], lengths[i])))
        s.prefill(rows)

    @ffi.def_extern()
    @entry
    def bcr_session_prefill_text(session, prompt):
        s = lookup(session, Session, "session")
        s.prefill([s.owner.generator.encode(text(prompt, "text"))])

    @ffi.def_extern()
    @entry
    def bcr_session_generate(session, options, callback, user_data, generated):
        from bigcode_deploy.runtime.generate import GenerationStats, continue_stream
        from bigcode_deploy.runtime.text import IncrementalDecoder

        s = prefilled(session, "generate")
        if generated != ffi.NULL:
            generated[0] = 0
        o = options
        if o == ffi.NULL:
            o = ffi.new("bcr_sampling_options *")
            lib.bcr_sampling_options_default(o)
        if o.num_stop_token_ids < 0:
            stops = ()
        elif o.num_stop_token_ids == 0 or o.stop_token_ids == ffi.NULL:
            stops = None
        else:
            stops = tuple(ffi.unpack(o.stop_token_ids, o.num_stop_token_ids))
        options_py = s.owner.generator.options(
            max_new_tokens=int(o.max_new_tokens),
            temperature=float(o.temperature),
            top_k=int(o.top_k),
            top_p=float(o.top_p),
            repetition_penalty=float(o.repetition_penalty),
            seed=int(o.seed) if o.has_seed else None,
            stop_token_ids=stops,
        )
        tokenizer = s.owner.generator.tokenizer
        decoders = [IncrementalDecoder(tokenizer) for _ in s.seen] if tokenizer is not None else None
        logits, s.logits = s.logits, None  # the rows are consumed by this generation: prefill again after it
        count = 0
        for event in continue_stream(s.decoding, logits, s.seen, options_py, GenerationStats()):
            count += 1
            if generated != ffi.NULL:
                generated[0] = count
            if callback != ffi.NULL:
                piece = ffi.new("char[]", decoders[event.row].push(event.token).encode()) if decoders else ffi.NULL
                if callback(user_data, event.row, event.token, piece, int(event.finished)):
                    raise Cancelled("cancelled by the token callback")
            if s.cancel.is_set():
                raise Cancelled("cancelled by bcr_session_cancel")

    @ffi.def_extern()
    @entry
    def bcr_session_step(session, tokens, count):
        s = prefilled(session, "step")
        if tokens == ffi.NULL or count != len(s.decoding.rows):
            raise BigCodeError(f"step takes one token per active row ({len(s.decoding.rows)}), got {count}")
        chosen = np.array(ffi.unpack(tokens, count), dtype=np.int64)
        if ((chosen < 0) | (chosen >= s.decoding.vocab_size)).any():
            raise BigCodeError(f"a token id is outside the vocabulary [0, {s.decoding.vocab_size})")
        s.logits = s.decoding.step(chosen)
        for row, token in zip(s.decoding.rows, chosen):
            s.seen[row].append(int(token))

    @ffi.def_extern()
    @entry
    def bcr_session_last_logits(session, out, capacity, rows, vocab):
        s = prefilled(session, "last_logits")
        logits = np.ascontiguousarray(s.logits, dtype=np.float32)
        if rows != ffi.NULL:
            rows[0] = logits.shape[0]
        if vocab != ffi.NULL:
            vocab[0] = logits.shape[1]
        if out == ffi.NULL or capacity < logits.size:
            raise BigCodeError(f"out must hold {logits.size} floats ({logits.shape[0]} rows x {logits.shape[1]})")
        ffi.memmove(out, ffi.from_buffer(logits), logits.nbytes)

    @ffi.def_extern()
    @entry
    def bcr_session_cancel(session):
        lookup(session, Session, "session").cancel.set()

    @ffi.def_extern()
    def bcr_session_close(session):
        release(session)
