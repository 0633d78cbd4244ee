// Stream a completion from a deployment bundle through the C ABI, then print tokens/s.
//   bigcode_generate BUNDLE (--prompt TEXT | --ids 1,2,3) [--max-new-tokens N] [--temperature T] [--seed S]
//                   [--print-ids 1]
// Uses only bigcode_runtime.h. Token ids are printed comma-separated when the bundle has no tokenizer or
// --print-ids 1 is given; the completion's text otherwise.
#include <bigcode_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

namespace {

// Every failure is a non-zero status, also when the embedded runtime cannot start (BCR_ERR_RUNTIME_UNAVAILABLE).
int fail(const char *what, bcr_status status) {
    std::fprintf(stderr, "error: %s (status %d): %s\n", what, static_cast<int>(status), bcr_last_error());
    return 1;
}

struct Stream {
    bool print_ids = false;
    bool first = true;
};

int32_t on_token(void *user_data, int32_t /*row*/, int32_t token, const char *text, int32_t /*finished*/) {
    auto *stream = static_cast<Stream *>(user_data);
    if (text != nullptr && !stream->print_ids) {
        std::fputs(text, stdout);
    } else {
        std::printf(stream->first ? "%d" : ",%d", token);
    }
    stream->first = false;
    std::fflush(stdout);
    return 0;  // non-zero would cancel
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s BUNDLE (--prompt TEXT | --ids 1,2,3) [--max-new-tokens N] "
                             "[--temperature T] [--seed S] [--print-ids 1]\n", argv[0]);
        return 2;
    }
    const char *bundle_path = argv[1];
    std::string prompt;
    std::vector<int32_t> ids;
    bcr_sampling_options options;
    bcr_sampling_options_default(&options);
    Stream stream;
    for (int i = 2; i + 1 < argc; i += 2) {
        std::string flag = argv[i];
        const char *value = argv[i + 1];
        if (flag == "--prompt") {
            prompt = value;
        } else if (flag == "--ids") {
            std::stringstream list(value);
            for (std::string item; std::getline(list, item, ',');) ids.push_back(std::atoi(item.c_str()));
        } else if (flag == "--max-new-tokens") {
            options.max_new_tokens = std::atoi(value);
        } else if (flag == "--temperature") {
            options.temperature = static_cast<float>(std::atof(value));
        } else if (flag == "--print-ids") {
            stream.print_ids = std::atoi(value) != 0;
        } else if (flag == "--seed") {
            options.seed = std::atoll(value);
            options.has_seed = 1;
        } else {
            std::fprintf(stderr, "unknown option %s\n", flag.c_str());
            return 2;
        }
    }

    bcr_bundle *bundle = nullptr;
    bcr_status status = bcr_bundle_open(bundle_path, nullptr, &bundle);
    if (status != BCR_OK) return fail("opening the bundle", status);
    bcr_session *session = nullptr;
    status = bcr_session_create(bundle, &session);
    if (status != BCR_OK) return fail("creating a session", status);

    auto start = std::chrono::steady_clock::now();
    if (!ids.empty()) {
        const int32_t *rows[] = {ids.data()};
        const int32_t lengths[] = {static_cast<int32_t>(ids.size())};
        status = bcr_session_prefill_ids(session, rows, lengths, 1);
    } else {
        if (!stream.print_ids) std::fputs(prompt.c_str(), stdout);
        status = bcr_session_prefill_text(session, prompt.c_str());
    }
    if (status != BCR_OK) return fail("prefill", status);
    auto prefilled = std::chrono::steady_clock::now();

    int32_t generated = 0;
    status = bcr_session_generate(session, &options, on_token, &stream, &generated);
    if (status != BCR_OK) return fail("generate", status);
    auto done = std::chrono::steady_clock::now();
    std::printf("\n");

    double prefill_ms = std::chrono::duration<double, std::milli>(prefilled - start).count();
    double decode_s = std::chrono::duration<double>(done - prefilled).count();
    std::fprintf(stderr, "[%d tokens; prefill %.1f ms; %.1f tokens/s]\n", generated, prefill_ms,
                 decode_s > 0 ? generated / decode_s : 0.0);
    bcr_session_close(session);
    bcr_bundle_close(bundle);
    return 0;
}
