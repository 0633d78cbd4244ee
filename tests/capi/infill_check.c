/* bcr_infill through the C ABI: streams the middle between a prefix and a suffix. Driven by
 * tests/capi/test_capi_infill.py.
 *   infill_check BUNDLE PREFIX SUFFIX MAX_NEW_TOKENS
 * prints "TOKEN id" per streamed token, "TEXT <the middle's text>" and "CHECK infill status message". */
#include <bigcode_runtime.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char middle[65536];

static int32_t on_token(void *user_data, int32_t row, int32_t token, const char *text, int32_t finished) {
    (void)user_data; (void)row; (void)finished;
    printf("TOKEN %d\n", (int)token);
    if (text != NULL && strlen(middle) + strlen(text) < sizeof middle) strcat(middle, text);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: infill_check BUNDLE PREFIX SUFFIX MAX_NEW_TOKENS\n");
        return 2;
    }
    bcr_bundle *bundle = NULL;
    bcr_session *session = NULL;
    bcr_status status = bcr_bundle_open(argv[1], NULL, &bundle);
    if (status == BCR_OK) status = bcr_session_create(bundle, &session);
    if (status == BCR_OK) {
        bcr_sampling_options options;
        bcr_sampling_options_default(&options);
        options.max_new_tokens = atoi(argv[4]);
        int32_t generated = 0;
        status = bcr_infill(session, argv[2], argv[3], &options, on_token, NULL, &generated);
    }
    printf("TEXT %s\n", middle);
    printf("CHECK infill %d %s\n", (int)status, status == BCR_OK ? "" : bcr_last_error());
    bcr_session_close(session);
    bcr_bundle_close(bundle);
    return 0;
}
