/* The C ABI's default stop ids and special-token text. Prints "TOKEN row token finished text" per token.
 *   capi_stop_tokens BUNDLE PROMPT SHOW_SPECIAL     greedy from a text prompt with the default stop ids
 * Driven by tests/runtime/test_stop_tokens.py. */
#include <bigcode_runtime.h>

#include <stdio.h>
#include <stdlib.h>

static int32_t print_token(void *user_data, int32_t row, int32_t token, const char *text, int32_t finished) {
    (void)user_data;
    printf("TOKEN %d %d %d %s\n", (int)row, (int)token, (int)finished, text != NULL ? text : "(null)");
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: capi_stop_tokens BUNDLE PROMPT SHOW_SPECIAL\n");
        return 2;
    }
    bcr_bundle *bundle = NULL;
    bcr_session *session = NULL;
    bcr_sampling_options options;
    bcr_sampling_options_default(&options);
    options.max_new_tokens = 8;
    options.show_special = atoi(argv[3]);
    int32_t generated = 0;
    if (bcr_bundle_open(argv[1], NULL, &bundle) != BCR_OK || bcr_session_create(bundle, &session) != BCR_OK ||
        bcr_session_prefill_text(session, argv[2]) != BCR_OK ||
        bcr_session_generate(session, &options, print_token, NULL, &generated) != BCR_OK) {
        fprintf(stderr, "error: %s\n", bcr_last_error());
        return 1;
    }
    printf("GENERATED %d\n", (int)generated);
    bcr_session_close(session);
    bcr_bundle_close(bundle);
    return 0;
}
