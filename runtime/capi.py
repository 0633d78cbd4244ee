"""The Python side of the C ABI (runtime/include/bigcode_runtime.h), installed into the embedded interpreter.

libbigcode_runtime.so is built by cffi's embedding mode (runtime/capi_build.py): each entry point of the header
is a C function generated from its prototype that starts CPython on the first call (and returns
BCR_ERR_RUNTIME_UNAVAILABLE if that failed) and calls its implementation here, `bcr_py_<name>`, defined with
@ffi.def_extern by `install(ffi, lib)`. cffi was chosen over pybind11's embed because no C or C++ is written by
hand (the header is the whole interface) and it takes the GIL around every entry point by itself.

Every entry point maps exceptions to a status code and a thread-local message, so no Python exception crosses
into C. Handles are ids from a table with a generation counter per slot (`Handles`), never object addresses: a
closed handle can never reach a newer object.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import traceback
import weakref

import numpy as np

from bigcode_deploy.runtime.errors import (
    BackendUnavailable,
    BigCodeError,
    BundleError,
    CheckpointError,
    ConfigError,
    ContextOverflow,
    StateError,
)
from bigcode_deploy.runtime.parity_record import parity_summary

MAX_BATCH = 1 << 16  # rows one prefill may take: bounds what is read from the caller's arrays
(OK, INVALID_ARGUMENT, BAD_BUNDLE, CONTEXT_OVERFLOW, BACKEND_UNAVAILABLE, CANCELLED, STATE, INTERNAL) = range(8)
# 8, BCR_ERR_RUNTIME_UNAVAILABLE, is returned by the C side only (Python did not start).


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


PY_PREFIX = "bcr_py_"  # bcr_NAME's implementation (runtime/capi_build.py generates the C side)


class Handles:
    """Opaque C handles: an id of (generation << SLOT_BITS) | (slot + 1), never an object's address.

    Closing a handle empties its slot and bumps the slot's generation, so the closed id never names the slot's next
    object: a stale handle reads as closed (StateError). The generation wraps after 2**(bits - SLOT_BITS) reuses of
    one slot (2**32 on 64-bit machines). Thread-safe (a lock: entry points on other threads interleave)."""

    def __init__(self, pointer_bits: int):
        self.slot_bits = 32 if pointer_bits >= 64 else 16
        self.generation_limit = 1 << (pointer_bits - self.slot_bits)
        self.lock = threading.Lock()
        self.slots: list[list] = []  # [generation, object or None]
        self.free: list[int] = []

    def add(self, obj: object) -> int:
        with self.lock:
            if self.free:
                slot = self.free.pop()
            else:
                if len(self.slots) + 1 >= 1 << self.slot_bits:
                    raise BigCodeError(f"too many open handles ({len(self.slots)}); close some first")
                self.slots.append([1, None])
                slot = len(self.slots) - 1
            self.slots[slot][1] = obj
            return (self.slots[slot][0] << self.slot_bits) | (slot + 1)

    def _find(self, value: int) -> int | None:
        slot, generation = (value & ((1 << self.slot_bits) - 1)) - 1, value >> self.slot_bits
        if 0 <= slot < len(self.slots) and self.slots[slot][0] == generation and self.slots[slot][1] is not None:
            return slot
        return None

    def get(self, value: int) -> object | None:
        with self.lock:
            slot = self._find(value)
            return None if slot is None else self.slots[slot][1]

    def remove(self, value: int) -> object | None:
        with self.lock:
            slot = self._find(value)
            if slot is None:
                return None
            entry = self.slots[slot]
            obj, entry[1] = entry[1], None
            entry[0] = entry[0] % (self.generation_limit - 1) + 1  # 1 .. limit - 1: an id is never 0 (NULL)
            self.free.append(slot)
            return obj


class Session:
    def __init__(self, bundle_handle: BundleHandle):
        self.owner = bundle_handle
        self.decoding = bundle_handle.generator.session()
        self.logits: np.ndarray | None = None
        self.seen: list[list[int]] = []
        self.cancel = threading.Event()
        bundle_handle.sessions.add(self)

    def prefill(self, prompts: list[list[int]]) -> None:
        """Replace the batch; on failure (also the backend's) the previous batch stays, as DecodingSession does."""
        logits = self.decoding.prefill(prompts)
        self.logits, self.seen = logits, [list(p) for p in prompts]
        self.cancel.clear()

    def drop(self) -> None:
        """The bundle was closed: free the cache; every later call on this session is a StateError."""
        self.decoding, self.logits, self.seen = None, None, []


class BundleHandle:
    def __init__(self, path: str, backend: str, threads: int):
        from bigcode_deploy.runtime.api import Generator
        from bigcode_deploy.runtime.backends import open_backend
        from bigcode_deploy.runtime.bundle import Bundle

        bundle = Bundle.open(path)
        self.backend = open_backend(bundle, backend, threads=threads)
        self.backend.__enter__()
        self.generator = Generator(bundle, self.backend)
        self.sessions: weakref.WeakSet[Session] = weakref.WeakSet()
        self.closed = False

    def close(self) -> None:
        self.closed = True
        for session in list(self.sessions):
            session.drop()
        self.backend.__exit__(None, None, None)


def install(ffi, lib) -> None:
    local = threading.local()
    handles = Handles(8 * ffi.sizeof("uintptr_t"))

    def set_error(message: str) -> None:
        local.error = ffi.new("char[]", message.encode("utf-8", "replace"))

    def export(fn):
        """Define fn as the Python side of the header's function of the same name (bcr_py_NAME for bcr_NAME)."""
        return ffi.def_extern(name=PY_PREFIX + fn.__name__.removeprefix("bcr_"))(fn)

    def entry(fn):
        """Run fn; map exceptions to a status and the thread's last error. Exported returning BCR_ERR_INTERNAL should
        the mapping itself raise (cffi's default for that would be 0, BCR_OK)."""

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

        def onerror(kind, exc, tb):
            try:
                set_error(f"internal error: {kind.__name__}: {exc}")
            except BaseException:  # nothing may cross into C; the status is INTERNAL either way
                pass

        name = PY_PREFIX + fn.__name__.removeprefix("bcr_")
        return ffi.def_extern(name=name, error=INTERNAL, onerror=onerror)(wrapper)

    def new_handle(obj, ctype: str):
        return ffi.cast(ctype, handles.add(obj))

    def lookup(ptr, kind: type, name: str):
        if ptr == ffi.NULL:
            raise BigCodeError(f"{name} is NULL")
        obj = handles.get(int(ffi.cast("uintptr_t", ptr)))
        if not isinstance(obj, kind):
            raise StateError(f"{name} is not an open handle (closed already, or never opened)")
        if isinstance(obj, Session) and obj.owner.closed:
            raise StateError("the session's bundle was closed (bcr_bundle_close); close the session")
        return obj

    def release(ptr) -> object | None:
        if ptr == ffi.NULL:
            return None
        return handles.remove(int(ffi.cast("uintptr_t", ptr)))

    def prefilled(ptr, call: str) -> Session:
        s = lookup(ptr, Session, "session")
        if s.logits is None:
            raise StateError(f"{call} needs a prefill first (bcr_session_prefill_ids or _text)")
        return s

    def text(ptr, name: str) -> str:
        """A NUL-terminated UTF-8 argument; BigCodeError (INVALID_ARGUMENT) for NULL or bytes that are not UTF-8."""
        if ptr == ffi.NULL:
            raise BigCodeError(f"{name} is NULL")
        data = ffi.string(ptr)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BigCodeError(
                f"{name} is not valid UTF-8 (byte {data[exc.start]:#04x} at offset {exc.start}); pass UTF-8 text"
            ) from None

    def path_arg(ptr, name: str) -> str:
        """A file system path: bytes as the OS takes them (a name that is not UTF-8 is still a name)."""
        if ptr == ffi.NULL:
            raise BigCodeError(f"{name} is NULL")
        return os.fsdecode(ffi.string(ptr))

    # bcr_version and bcr_sampling_options_default are plain C (capi_build.py): they work without Python.

    @export
    def bcr_last_error():
        error = getattr(local, "error", None)
        if error is None:
            set_error("")
        return local.error

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
        out[0] = new_handle(BundleHandle(path_arg(path, "path"), backend, threads), "bcr_bundle *")

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
        info["parity"] = parity_summary(b.generator.bundle)  # "none" unless bound to this graph
        data = json.dumps(info).encode()
        if needed != ffi.NULL:
            needed[0] = len(data) + 1
        if buffer != ffi.NULL and capacity > 0:
            n = min(len(data), capacity - 1)
            ffi.memmove(buffer, data[:n], n)
            buffer[n] = b"\0"
        if capacity < len(data) + 1:
            raise BigCodeError(f"buffer too small: the info needs {len(data) + 1} bytes")

    @export
    def bcr_bundle_close(bundle):
        obj = release(bundle)
        if isinstance(obj, BundleHandle):
            obj.close()

    @entry
    def bcr_session_create(bundle, out):
        if out == ffi.NULL:
            raise BigCodeError("out is NULL")
        out[0] = ffi.NULL
        out[0] = new_handle(Session(lookup(bundle, BundleHandle, "bundle")), "bcr_session *")

    @entry
    def bcr_session_prefill_ids(session, prompts, lengths, batch):
        s = lookup(session, Session, "session")
        if prompts == ffi.NULL or lengths == ffi.NULL or not 1 <= batch <= MAX_BATCH:
            raise BigCodeError(f"prompts and lengths must be non-NULL and batch in [1, {MAX_BATCH}], got {batch}")
        n_positions = s.owner.generator.bundle.manifest.config["n_positions"]
        rows = []
        for i in range(batch):
            if prompts[i] == ffi.NULL or lengths[i] <= 0:
                raise BigCodeError(f"prompt {i} is NULL or empty")
            if lengths[i] > n_positions:  # checked before reading: never past the caller's array for a bad length
                raise ContextOverflow(
                    f"prompt {i} has {lengths[i]} tokens; it exceeds the model's context of {n_positions} positions"
                )
            rows.append(list(ffi.unpack(prompts[i], lengths[i])))
        s.prefill(rows)

    @entry
    def bcr_session_prefill_text(session, prompt):
        s = lookup(session, Session, "session")
        s.prefill([s.owner.generator.encode(text(prompt, "text"))])

    @entry
    def bcr_session_generate(session, options, callback, user_data, generated):
        generate_from(prefilled(session, "generate"), options, callback, user_data, generated)

    @entry
    def bcr_infill(session, prefix, suffix, options, callback, user_data, generated):
        s = lookup(session, Session, "session")
        generator = s.owner.generator
        s.prefill([generator.fim_prompter().prompt(text(prefix, "prefix"), text(suffix, "suffix"))])
        generate_from(s, options, callback, user_data, generated, default_stops=generator.infill_stops())

    def generate_from(s, options, callback, user_data, generated, default_stops=None):
        """bcr_session_generate's work on a prefilled session; default_stops: the ids that end a row when the options
        name none (None: the bundle's)."""
        from bigcode_deploy.runtime.generate import GenerationStats, continue_stream
        from bigcode_deploy.runtime.text import IncrementalDecoder

        if generated != ffi.NULL:
            generated[0] = 0
        o = options
        if o == ffi.NULL:
            o = ffi.new("bcr_sampling_options *")
            lib.bcr_sampling_options_default(o)
        if o.num_stop_token_ids < 0:
            stops = ()
        elif o.num_stop_token_ids == 0 or o.stop_token_ids == ffi.NULL:
            stops = default_stops
        elif o.num_stop_token_ids > s.owner.generator.bundle.manifest.config["vocab_size"]:
            raise BigCodeError(f"num_stop_token_ids {o.num_stop_token_ids} is more than the vocabulary's size")
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
        show_special = bool(o.show_special)
        decoders = [IncrementalDecoder(tokenizer, show_special) for _ in s.seen] if tokenizer is not None else None
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

    @entry
    def bcr_session_step(session, tokens, count):
        s = prefilled(session, "step")
        if tokens == ffi.NULL or count != len(s.decoding.rows):
            raise BigCodeError(f"step takes one token per active row ({len(s.decoding.rows)}), got {count}")
        chosen = np.array(ffi.unpack(tokens, count), dtype=np.int64)
        s.logits = s.decoding.step(chosen)  # validates the ids; a failure (also the backend's) changes nothing
        for row, token in zip(s.decoding.rows, chosen):
            s.seen[row].append(int(token))

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

    @entry
    def bcr_session_cancel(session):
        lookup(session, Session, "session").cancel.set()

    @export
    def bcr_session_close(session):
        release(session)
