// Errors inside the library are C++ exceptions carrying a kt_status; api.cpp catches them at the
// extern "C" boundary and stores the message in a thread-local buffer read by kt_last_error().
#pragma once

#include <cstdio>
#include <stdexcept>
#include <string>

#include "kt_trl.h"

namespace kt {

struct Error : std::runtime_error {
    kt_status status;
    Error(kt_status s, const std::string &msg) : std::runtime_error(msg), status(s) {}
};

void set_last_error(const char *msg);
const char *last_error();

[[noreturn]] inline void fail(kt_status status, const char *msg) { throw Error(status, msg); }

template <typename... Args>
[[noreturn]] void fail(kt_status status, const char *fmt, Args... args) {
    char buf[512];
    std::snprintf(buf, sizeof buf, fmt, args...);
    throw Error(status, buf);
}

}  // namespace kt

// KT_CHECK(cond, "fmt", args...): invalid argument unless cond holds.
#define KT_CHECK(cond, ...)                                               \
    do {                                                                  \
        if (!(cond)) ::kt::fail(KT_ERR_INVALID_ARGUMENT, __VA_ARGS__);    \
    } while (0)
