/* Exercises the C ABI's error paths and a session loop; prints one "CHECK name status message" line per check
 * and "RSS before after" (kB) around 100 sessions. Driven by tests/capi/test_capi.py.
 *   capi_checks BUNDLE          every check
 *   capi_checks BUNDLE info     only "INFO <json>" (bcr_bundle_info)
 *   capi_checks BUNDLE start    every entry point once, for a process whose embedded runtime cannot start */
#include <bigcode_runtime.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void report(const char *name, bcr_status status) {
    printf("CHECK %s %d %s\n", name, (int)status, status == BCR_OK ? "" : bcr_last_error());
}

static long rss_kb(void) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f == NULL) return -1;
    if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = -1;
    fclose(f);
    return resident * 4;
}

static int32_t stop_after_two(void *user_data, int32_t row, int32_t token, const char *text, int32_t finished) {
    int *count = (int *)user_data;
    (void)row; (void)token; (void)text; (void)finished;
    return ++*count >= 2;
}

static int info_only(const char *path) {
    bcr_bundle *bundle = NULL;
    char info[4096];
    report("open", bcr_bundle_open(path, NULL, &bundle));
    report("info", bcr_bundle_info(bundle, info, sizeof info, NULL));
    printf("INFO %s\n", info);
    bcr_bundle_close(bundle);
    return 0;
}

/* Every entry point once; with a runtime that cannot start each must fail (non-zero) and say why. */
static int start_failure(const char *path) {
    bcr_sampling_options options;
    memset(&options, 0xff, sizeof options);
    bcr_sampling_options_default(&options);
    printf("DEFAULTS %d %g %d\n", options.max_new_tokens, options.top_p, options.num_stop_token_ids);
    printf("VERSION %s\n", bcr_version());
    bcr_bundle *bundle = NULL;
    bcr_session *session = NULL;
    char info[256];
    int32_t prompt[] = {1, 2, 3}, lengths[] = {3}, generated = -1, rows = -1, vocab = -1;
    const int32_t *prompts[] = {prompt};
    float logits[4];
    report("open", bcr_bundle_open(path, NULL, &bundle));
    report("info", bcr_bundle_info(bundle, info, sizeof info, NULL));
    report("session_create", bcr_session_create(bundle, &session));
    report("prefill_ids", bcr_session_prefill_ids(session, prompts, lengths, 1));
    report("prefill_text", bcr_session_prefill_text(session, "def f():"));
    report("generate", bcr_session_generate(session, &options, NULL, NULL, &generated));
    report("step", bcr_session_step(session, prompt, 1));
    report("last_logits", bcr_session_last_logits(session, logits, 4, &rows, &vocab));
    report("cancel", bcr_session_cancel(session));
    bcr_session_close(session);
    bcr_bundle_close(bundle);
    const char *error = bcr_last_error();
    printf("LAST_ERROR %s\n", error != NULL ? error : "(NULL)");
    return 0;
}

/* Hostile arguments to every entry point: each must return its documented code, never BCR_ERR_INTERNAL.
 *   capi_checks BUNDLE hostile BAD_BUNDLE BROKEN_TOKENIZER_BUNDLE NON_UTF8_NAMED_COPY */
static int hostile(const char *path, const char *bad_bundle, const char *broken_tokenizer, const char *non_utf8) {
    bcr_bundle *bundle = NULL, *other = NULL;
    bcr_session *session = NULL;
    bcr_open_options backend_bytes = {"\xff\xfeort", 0};
    bcr_open_options negative_threads = {"ort", -1};
    bcr_open_options huge_threads = {"ort", 2147483647};
    report("h_open_non_utf8_missing_path", bcr_bundle_open("/nonexistent/\xff\xfe/bundle", NULL, &other));
    report("h_open_non_utf8_backend", bcr_bundle_open(path, &backend_bytes, &other));
    report("h_open_negative_threads", bcr_bundle_open(path, &negative_threads, &other));
    report("h_open_huge_threads", bcr_bundle_open(path, &huge_threads, &other));
    report("h_open_null_out", bcr_bundle_open(path, NULL, NULL));
    report("h_open_empty_path", bcr_bundle_open("", NULL, &other));
    report("h_open_bad_bundle", bcr_bundle_open(bad_bundle, NULL, &other));
    report("h_open_non_utf8_named_copy", bcr_bundle_open(non_utf8, NULL, &other));
    bcr_bundle_close(other);
    other = NULL;

    report("h_open_broken_tokenizer", bcr_bundle_open(broken_tokenizer, NULL, &other));
    char info[4096];
    report("h_info_broken_tokenizer", bcr_bundle_info(other, info, sizeof info, NULL));
    bcr_session *broken = NULL;
    report("h_session_broken_tokenizer", bcr_session_create(other, &broken));
    report("h_prefill_text_broken_tokenizer", bcr_session_prefill_text(broken, "def f():"));
    int32_t ids[] = {1, 2, 3}, three[] = {3};
    const int32_t *one_prompt[] = {ids};
    report("h_prefill_ids_broken_tokenizer", bcr_session_prefill_ids(broken, one_prompt, three, 1));
    bcr_session_close(broken);
    bcr_bundle_close(other);

    report("h_open", bcr_bundle_open(path, NULL, &bundle));
    size_t needed = 0;
    report("h_info_null_buffer", bcr_bundle_info(bundle, NULL, 0, &needed));
    printf("NEEDED %zu\n", needed);
    report("h_info_null_bundle", bcr_bundle_info(NULL, info, sizeof info, NULL));
    report("h_session_null_out", bcr_session_create(bundle, NULL));
    report("h_session", bcr_session_create(bundle, &session));
    report("h_prefill_text_non_utf8", bcr_session_prefill_text(session, "def \xc3\x28():"));
    report("h_prefill_text_null", bcr_session_prefill_text(session, NULL));
    report("h_prefill_negative_batch", bcr_session_prefill_ids(session, one_prompt, three, -1));
    report("h_prefill_zero_batch", bcr_session_prefill_ids(session, one_prompt, three, 0));
    report("h_prefill_huge_batch", bcr_session_prefill_ids(session, one_prompt, three, 2147483647));
    int32_t negative[] = {-5}, huge[] = {2147483647};
    report("h_prefill_negative_length", bcr_session_prefill_ids(session, one_prompt, negative, 1));
    report("h_prefill_huge_length", bcr_session_prefill_ids(session, one_prompt, huge, 1));
    int32_t negative_id[] = {1, -7, 3};
    const int32_t *bad_prompt[] = {negative_id};
    report("h_prefill_negative_id", bcr_session_prefill_ids(session, bad_prompt, three, 1));
    report("h_prefill_null_lengths", bcr_session_prefill_ids(session, one_prompt, NULL, 1));
    report("h_step_before_prefill", bcr_session_step(session, ids, 1));
    report("h_prefill", bcr_session_prefill_ids(session, one_prompt, three, 1));
    report("h_step_negative_count", bcr_session_step(session, ids, -1));
    report("h_step_null_tokens", bcr_session_step(session, NULL, 1));
    int32_t rows = 0, vocab = 0;
    report("h_logits_null_out", bcr_session_last_logits(session, NULL, 0, &rows, &vocab));

    bcr_sampling_options options;
    bcr_sampling_options_default(&options);
    options.max_new_tokens = 2147483647;
    report("h_generate_huge_max_tokens", bcr_session_generate(session, &options, NULL, NULL, NULL));
    report("h_prefill_again_1", bcr_session_prefill_ids(session, one_prompt, three, 1));
    bcr_sampling_options_default(&options);
    options.max_new_tokens = -1;
    report("h_generate_negative_max_tokens", bcr_session_generate(session, &options, NULL, NULL, NULL));
    report("h_prefill_again_2", bcr_session_prefill_ids(session, one_prompt, three, 1));
    bcr_sampling_options_default(&options);
    options.temperature = NAN;
    report("h_generate_nan_temperature", bcr_session_generate(session, &options, NULL, NULL, NULL));
    report("h_prefill_again_3", bcr_session_prefill_ids(session, one_prompt, three, 1));
    bcr_sampling_options_default(&options);
    options.top_p = 2.0f;
    report("h_generate_top_p_2", bcr_session_generate(session, &options, NULL, NULL, NULL));
    report("h_prefill_again_4", bcr_session_prefill_ids(session, one_prompt, three, 1));
    bcr_sampling_options_default(&options);
    options.stop_token_ids = ids;
    options.num_stop_token_ids = 2147483647;
    report("h_generate_huge_stop_count", bcr_session_generate(session, &options, NULL, NULL, NULL));
    report("h_prefill_again_5", bcr_session_prefill_ids(session, one_prompt, three, 1));
    int32_t out_of_vocab_stop[] = {999999};
    bcr_sampling_options_default(&options);
    options.stop_token_ids = out_of_vocab_stop;
    options.num_stop_token_ids = 1;
    report("h_generate_stop_out_of_vocab", bcr_session_generate(session, &options, NULL, NULL, NULL));
    report("h_cancel_null", bcr_session_cancel(NULL));
    bcr_session_close(session);
    bcr_bundle_close(bundle);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *path = argv[1];
    if (argc > 2 && strcmp(argv[2], "info") == 0) return info_only(path);
    if (argc > 2 && strcmp(argv[2], "start") == 0) return start_failure(path);
    if (argc > 5 && strcmp(argv[2], "hostile") == 0) return hostile(path, argv[3], argv[4], argv[5]);
    bcr_bundle *bundle = NULL;
    bcr_session *session = NULL;

    report("open_missing", bcr_bundle_open("/nonexistent/bundle", NULL, &bundle));
    report("open_null_path", bcr_bundle_open(NULL, NULL, &bundle));
    bcr_open_options trt = {"tensorrt", 0};
    report("open_tensorrt", bcr_bundle_open(path, &trt, &bundle));
    bcr_open_options bad = {"nope", 0};
    report("open_bad_backend", bcr_bundle_open(path, &bad, &bundle));
    report("open", bcr_bundle_open(path, NULL, &bundle));

    char info[4096];
    size_t needed = 0;
    report("info_small_buffer", bcr_bundle_info(bundle, info, 8, &needed));
    report("info", bcr_bundle_info(bundle, info, sizeof info, &needed));
    printf("INFO %s\n", info);

    report("session", bcr_session_create(bundle, &session));
    report("generate_before_prefill", bcr_session_generate(session, NULL, NULL, NULL, NULL));
    int32_t out_of_vocab[] = {1, 999999};
    const int32_t *rows[] = {out_of_vocab};
    int32_t lengths[] = {2};
    report("prefill_out_of_vocab", bcr_session_prefill_ids(session, rows, lengths, 1));
    int32_t prompt[] = {1, 2, 3};
    rows[0] = prompt;
    lengths[0] = 3;
    report("prefill", bcr_session_prefill_ids(session, rows, lengths, 1));
    float small[4];
    int32_t n_rows = 0, vocab = 0;
    report("logits_small_buffer", bcr_session_last_logits(session, small, 4, &n_rows, &vocab));
    float *logits = malloc(sizeof(float) * (size_t)vocab);
    report("logits", bcr_session_last_logits(session, logits, (size_t)vocab, &n_rows, &vocab));
    printf("LOGITS %d %d %f\n", n_rows, vocab, logits[0]);
    int32_t wrong_count[] = {1, 2};
    report("step_wrong_count", bcr_session_step(session, wrong_count, 2));
    int32_t bad_token[] = {999999};
    report("step_out_of_vocab", bcr_session_step(session, bad_token, 1));
    float first = logits[0];
    report("logits_after_failed_steps", bcr_session_last_logits(session, logits, (size_t)vocab, &n_rows, &vocab));
    printf("UNCHANGED %d\n", n_rows == 1 && logits[0] == first);
    free(logits);
    bcr_sampling_options options;
    bcr_sampling_options_default(&options);
    options.max_new_tokens = 100000;
    report("context_overflow", bcr_session_generate(session, &options, NULL, NULL, NULL));
    report("prefill_again", bcr_session_prefill_ids(session, rows, lengths, 1));
    int count = 0;
    options.max_new_tokens = 8;
    options.num_stop_token_ids = -1;
    report("cancel_by_callback", bcr_session_generate(session, &options, stop_after_two, &count, NULL));
    bcr_session_close(session);
    report("use_after_close", bcr_session_prefill_ids(session, rows, lengths, 1));

    /* A closed handle must never reach a newer session, even one created right after it (the allocator's
     * favourite moment to hand out the same address again). */
    bcr_session *stale = NULL, *newer = NULL;
    report("create_a", bcr_session_create(bundle, &stale));
    bcr_session_close(stale);
    report("create_after_close", bcr_session_create(bundle, &newer));
    printf("HANDLES_DIFFER %d\n", newer != stale);
    report("stale_prefill", bcr_session_prefill_ids(stale, rows, lengths, 1));
    report("stale_cancel", bcr_session_cancel(stale));
    bcr_session_close(stale); /* a no-op: must not close the newer session */
    report("newer_prefill", bcr_session_prefill_ids(newer, rows, lengths, 1));
    report("newer_step", bcr_session_step(newer, prompt, 1));
    report("bundle_as_session", bcr_session_cancel((bcr_session *)bundle));
    bcr_session_close(newer);
    int reused = 0, reached = 0;
    for (int i = 0; i < 20; i++) {
        bcr_session *a = NULL, *b = NULL;
        if (bcr_session_create(bundle, &a) != BCR_OK) return 1;
        bcr_session_close(a);
        if (bcr_session_create(bundle, &b) != BCR_OK) return 1;
        reused += a == b;
        reached += bcr_session_cancel(a) != BCR_ERR_STATE;
        bcr_session_close(b);
    }
    printf("STALE_ROUNDS reused=%d reached=%d\n", reused, reached);

    long before = 0;
    for (int i = 0; i < 100; i++) {
        if (i == 10) before = rss_kb();
        bcr_session *s = NULL;
        int32_t generated = 0;
        if (bcr_session_create(bundle, &s) != BCR_OK || bcr_session_prefill_ids(s, rows, lengths, 1) != BCR_OK ||
            bcr_session_generate(s, &options, NULL, NULL, &generated) != BCR_OK || generated != 8) {
            printf("LOOP failed at %d: %s\n", i, bcr_last_error());
            return 1;
        }
        bcr_session_close(s);
    }
    printf("RSS %ld %ld\n", before, rss_kb());

    /* A session outliving its bundle: every call is STATE, and neither close crashes. */
    bcr_session *orphan = NULL;
    report("orphan_create", bcr_session_create(bundle, &orphan));
    report("orphan_prefill", bcr_session_prefill_ids(orphan, rows, lengths, 1));
    bcr_bundle_close(bundle);
    report("orphan_prefill_after_bundle_close", bcr_session_prefill_ids(orphan, rows, lengths, 1));
    report("orphan_generate_after_bundle_close", bcr_session_generate(orphan, &options, NULL, NULL, NULL));
    report("orphan_step_after_bundle_close", bcr_session_step(orphan, prompt, 1));
    report("info_after_bundle_close", bcr_bundle_info(bundle, info, sizeof info, &needed));
    bcr_session *none = NULL;
    report("create_after_bundle_close", bcr_session_create(bundle, &none));
    bcr_session_close(orphan);
    report("orphan_after_close", bcr_session_cancel(orphan));
    bcr_bundle_close(bundle);
    return 0;
}
