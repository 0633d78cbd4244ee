#define _POSIX_C_SOURCE 199309L /* clock_gettime */
/* Times greedy generation through the C ABI with a no-op token callback (what the ABI itself costs).
 *   capi_overhead BUNDLE TOKENS REPEATS  -> prints one line per repeat: "STEP_MS <ms per step>" */
#include <bigcode_runtime.h>

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static int32_t count_token(void *user_data, int32_t row, int32_t token, const char *text, int32_t finished) {
    (void)row; (void)token; (void)text; (void)finished;
    ++*(int32_t *)user_data;
    return 0;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    int tokens = atoi(argv[2]), repeats = atoi(argv[3]);
    bcr_bundle *bundle = NULL;
    if (bcr_bundle_open(argv[1], NULL, &bundle) != BCR_OK) {
        fprintf(stderr, "error: %s\n", bcr_last_error());
        return 1;
    }
    int32_t prompt[] = {5, 6, 7, 8};
    const int32_t *rows[] = {prompt};
    int32_t lengths[] = {4};
    bcr_sampling_options options;
    bcr_sampling_options_default(&options);
    options.max_new_tokens = tokens;
    options.num_stop_token_ids = -1; /* no stop token: every repeat does the same work */
    for (int r = 0; r < repeats; r++) {
        bcr_session *session = NULL;
        int32_t seen = 0;
        if (bcr_session_create(bundle, &session) != BCR_OK || bcr_session_prefill_ids(session, rows, lengths, 1) != BCR_OK) {
            fprintf(stderr, "error: %s\n", bcr_last_error());
            return 1;
        }
        double start = now_s();
        if (bcr_session_generate(session, &options, count_token, &seen, NULL) != BCR_OK) {
            fprintf(stderr, "error: %s\n", bcr_last_error());
            return 1;
        }
        printf("STEP_MS %.6f\n", (now_s() - start) * 1000.0 / seen);
        bcr_session_close(session);
    }
    bcr_bundle_close(bundle);
    return 0;
}
