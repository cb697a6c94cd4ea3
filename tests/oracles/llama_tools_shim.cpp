// q2lab's own stand-ins for the few libcommon symbols that llama.cpp's `llama-quantize` program
// and its imatrix loader need, so those two llama.cpp source files (taken unmodified from the
// llama-cpp-python sdist of the installed version) link against the installed shared libraries
// without building the whole of libcommon.  Nothing here changes how a file is read or quantized:
// logging prints to stderr, build info is a constant, and key=value overrides are refused.
#include "build-info.h"
#include "common.h"
#include "log.h"

#include <cstdarg>
#include <cstdio>

int llama_build_number(void) { return 0; }
const char * llama_commit(void) { return "llama-cpp-python sdist"; }
const char * llama_compiler(void) { return "q2lab oracle build"; }
const char * llama_build_target(void) { return "q2lab oracle build"; }
const char * llama_build_info(void) { return "q2lab oracle build"; }
void llama_print_build_info(const char * version, FILE * out) { fprintf(out, "llama.cpp %s (q2lab oracle build)\n", version); }

struct common_log { int unused; };
static common_log g_log;
int common_log_get_verbosity_thold(void) { return LOG_LEVEL_INFO; }
struct common_log * common_log_main() { return &g_log; }
void common_log_add(struct common_log *, enum ggml_log_level, const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vfprintf(stderr, fmt, args);
    va_end(args);
}

std::vector<std::string> string_split(const std::string & str, const std::string & delimiter) {
    std::vector<std::string> parts;
    size_t start = 0;
    size_t end = str.find(delimiter);
    while (end != std::string::npos) {
        parts.push_back(str.substr(start, end - start));
        start = end + delimiter.length();
        end = str.find(delimiter, start);
    }
    parts.push_back(str.substr(start));
    return parts;
}

bool string_parse_kv_override(const char * data, std::vector<llama_model_kv_override> &) {
    fprintf(stderr, "q2lab oracle build: --override-kv is not supported (%s)\n", data);
    return false;
}
