/* Exercises the C ABI's error paths and a session loop; prints one "CHECK name status message" line per check
 * and "RSS before after" (kB) around 100 sessions. Driven by tests/capi/test_capi.py. */
#include <bigcode_runtime.h>

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

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *path = argv[1];
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
    bcr_bundle_close(bundle);
    return 0;
}
