/*
 * bigcode_runtime.h: the C ABI of the bigcode-deploy runtime.
 *
 * Open a deployment bundle, create generation sessions, prefill prompts (token ids or text), generate with a
 * per-token callback (streaming), read the last logits, and close. Any C or C++ compiler can use this header;
 * link with libbigcode_runtime.so (built by `make capi`).
 *
 * Implementation: the library embeds the Python runtime (CPython through cffi's embedding mode), which starts
 * on the first call in the process and drives ONNX Runtime (or TensorRT) exactly as the Python API does.
 *
 * Status and errors: every call that can fail returns a bcr_status; on failure, bcr_last_error() returns a
 * message for the calling thread (valid until that thread's next call into this library). BCR_OK is 0 and every
 * failure is non-zero. If the embedded Python runtime cannot start (a moved or broken virtual environment, a
 * package that fails to import), every call that returns a bcr_status returns BCR_ERR_RUNTIME_UNAVAILABLE, for the
 * life of the process (the start is tried once, on the first call); bcr_last_error() then says why on every
 * thread, bcr_bundle_close and bcr_session_close do nothing, and bcr_version and bcr_sampling_options_default,
 * which need no Python, still work. cffi prints the start's traceback on stderr as well.
 *
 * Ownership: handles are opaque ids, never addresses: do not dereference them. A bcr_bundle is owned by the
 * caller from bcr_bundle_open until bcr_bundle_close; a bcr_session from bcr_session_create until
 * bcr_session_close, and should be closed before its bundle. A closed handle is never valid again: using it
 * returns BCR_ERR_STATE, also after a newer bundle or session was created (no handle value is reused for another
 * object). A session whose bundle was closed returns BCR_ERR_STATE from every call (its cache is freed with the
 * bundle); bcr_session_close still releases it. Closing a NULL or closed handle does nothing. Strings passed in are
 * copied; strings returned (bcr_last_error, bcr_version, the callback's text) are owned by the library.
 *
 * Threads: every function may be called from any thread. Calls hold Python's global interpreter lock while
 * they run Python code; ONNX Runtime releases it while it computes, so sessions on different threads overlap
 * their graph runs but not their Python work (sampling, bookkeeping). One session must not be used by two
 * threads at once, except bcr_session_cancel, which any thread may call at any time; a bundle must not be closed
 * while a call on it or on one of its sessions is running.
 *
 * A failed call changes nothing: after any non-OK status (a bad argument, or the backend failing mid-step) the
 * session holds exactly what it held before the call, except bcr_session_generate, which consumes the prefilled
 * rows (prefill again after it, whatever its status).
 */
#ifndef BIGCODE_RUNTIME_H
#define BIGCODE_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum bcr_status {
    BCR_OK = 0,
    BCR_ERR_INVALID_ARGUMENT = 1,     /* a NULL pointer, a bad option value (threads outside [0, 1024], a
                                         count outside its range), an out-of-vocabulary id, a text or backend
                                         name that is not UTF-8 */
    BCR_ERR_BAD_BUNDLE = 2,           /* anything wrong with the bundle: a missing path or file, another format
                                         version, a manifest field of the wrong type or range, a graph hash
                                         mismatch, a file that resolves outside the bundle, a corrupt
                                         tokenizer.json (reported when the tokenizer is first needed: info,
                                         prefill_text, generate) */
    BCR_ERR_CONTEXT_OVERFLOW = 3,     /* prompt plus max_new_tokens beyond the model's context */
    BCR_ERR_BACKEND_UNAVAILABLE = 4,  /* e.g. backend "tensorrt" without TensorRT or a GPU */
    BCR_ERR_CANCELLED = 5,            /* bcr_session_cancel was called, or the callback returned non-zero */
    BCR_ERR_STATE = 6,                /* a call out of order (generate before prefill), a closed handle */
    BCR_ERR_INTERNAL = 7,             /* a bug only (never a bad argument or bundle): the message carries the
                                         Python exception */
    BCR_ERR_RUNTIME_UNAVAILABLE = 8   /* the embedded Python runtime could not start: see "Status and errors" */
} bcr_status;

typedef struct bcr_bundle bcr_bundle;
typedef struct bcr_session bcr_session;

typedef struct bcr_open_options {
    const char *backend; /* "ort" (default when NULL), "torch" or "tensorrt" */
    int32_t threads;     /* intra-op threads in [0, 1024]; 0: the library's default */
} bcr_open_options;

typedef struct bcr_sampling_options {
    int32_t max_new_tokens;         /* >= 1 */
    float temperature;              /* 0: greedy */
    int32_t top_k;                  /* 0: off */
    float top_p;                    /* 1: off */
    float repetition_penalty;       /* 1: off */
    int64_t seed;                   /* used when has_seed is non-zero */
    int32_t has_seed;
    const int32_t *stop_token_ids;  /* NULL with num_stop_token_ids 0: the bundle's stop ids (the manifest's
                                       stop_token_ids: generation_config.json's eos_token_id, an id or a list, any
                                       of which stops); num < 0: no stop token */
    int32_t num_stop_token_ids;
    int32_t show_special;           /* non-zero: the callback's text includes special tokens (<|endoftext|>, FIM
                                       tokens); 0 (default): their text is "" (the token id is passed either way) */
} bcr_sampling_options;

/* Called once per new token, in order. text is the token's decoded text when the bundle has a tokenizer (may be
 * "" while a multi-byte character is incomplete), else NULL. Return non-zero to cancel the generation. */
typedef int32_t (*bcr_token_callback)(void *user_data, int32_t row, int32_t token, const char *text,
                                      int32_t finished);

/* Library */
const char *bcr_version(void);     /* never NULL */
const char *bcr_last_error(void);  /* never NULL; "" after a call that succeeded */
void bcr_sampling_options_default(bcr_sampling_options *options); /* greedy, 32 tokens, the bundle's stop ids */

/* Bundles */
/* path: the bundle directory, bytes as the file system takes them (need not be UTF-8). */
bcr_status bcr_bundle_open(const char *path, const bcr_open_options *options, bcr_bundle **out);
/* A JSON object: task, dtype, target, vocab_size, n_positions, has_tokenizer, backend, and parity: {"status":
 * "ok" | "failed" | "none", "reason", and the report's summary fields}; "none" (with the reason) when parity.json
 * is missing, unreadable, or was written for another graph (its graph_sha256 differs from the manifest's).
 * Writes at most capacity bytes including the terminating NUL; *needed (if not NULL) gets the full size. */
bcr_status bcr_bundle_info(bcr_bundle *bundle, char *buffer, size_t capacity, size_t *needed);
void bcr_bundle_close(bcr_bundle *bundle);

/* Sessions */
bcr_status bcr_session_create(bcr_bundle *bundle, bcr_session **out);
/* batch in [1, 65536]; lengths[i] >= 1. A length beyond the model's context is BCR_ERR_CONTEXT_OVERFLOW, found
 * before prompts[i] is read. */
bcr_status bcr_session_prefill_ids(bcr_session *session, const int32_t *const *prompts, const int32_t *lengths,
                                   int32_t batch);
/* text: UTF-8 (other bytes: BCR_ERR_INVALID_ARGUMENT); needs the bundle's tokenizer.json. */
bcr_status bcr_session_prefill_text(bcr_session *session, const char *text);
/* Generate from the prefilled rows; *generated (if not NULL) gets the number of tokens produced (all rows). */
bcr_status bcr_session_generate(bcr_session *session, const bcr_sampling_options *options,
                                bcr_token_callback callback, void *user_data, int32_t *generated);
/* Fill in the middle: prefill the session with the FIM prompt of prefix and suffix (UTF-8 text; the bundle's order,
 * PSM or SPM, from the manifest's fim record), then generate as bcr_session_generate does. With no stop ids in the
 * options, the middle ends at the bundle's stop ids or <file_sep> where the vocabulary has it; the callback gets
 * every token of the middle, then the stop token (its text "" unless show_special). BCR_ERR_INVALID_ARGUMENT (with
 * one line in bcr_last_error) when the bundle has no tokenizer or its tokenizer no FIM tokens. */
bcr_status bcr_infill(bcr_session *session, const char *prefix, const char *suffix, const bcr_sampling_options *options,
                      bcr_token_callback callback, void *user_data, int32_t *generated);
/* One cached decode step: one token per active row. */
bcr_status bcr_session_step(bcr_session *session, const int32_t *tokens, int32_t count);
/* The last logits, row-major (rows x vocab), float32. capacity is in floats. */
bcr_status bcr_session_last_logits(bcr_session *session, float *out, size_t capacity, int32_t *rows,
                                   int32_t *vocab);
bcr_status bcr_session_cancel(bcr_session *session);
void bcr_session_close(bcr_session *session);

#ifdef __cplusplus
}
#endif

#endif /* BIGCODE_RUNTIME_H */
