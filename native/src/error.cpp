#include "error.h"

#include <cstring>

namespace kt {
namespace {
thread_local char g_last_error[512] = "";
}

void set_last_error(const char *msg) {
    std::strncpy(g_last_error, msg, sizeof g_last_error - 1);
    g_last_error[sizeof g_last_error - 1] = '\0';
}

const char *last_error() { return g_last_error; }

}  // namespace kt
