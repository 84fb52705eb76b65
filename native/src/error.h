// Errors inside the library are C++ exceptions carrying a kt_status. Every extern "C" entry point
// (KT_API) runs its body through guarded(), which turns them into the status plus a thread-local
// message read by kt_last_error(), or, for the few entry points with no status to return, through
// guarded_or(): no exception ever crosses the C boundary.
#pragma once

#include <cstdio>
#include <new>
#include <stdexcept>
#include <string>

#include "kt_trl.h"

#define KT_API extern "C" __attribute__((visibility("default")))

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

// Runs f() for an entry point that returns a kt_status: KT_OK and an empty message, or the
// status and message of what it threw.
template <typename F>
kt_status guarded(F &&f) noexcept {
    try {
        f();
        set_last_error("");
        return KT_OK;
    } catch (const Error &e) {
        set_last_error(e.what());
        return e.status;
    } catch (const std::bad_alloc &) {
        set_last_error("out of memory");
        return KT_ERR_OUT_OF_MEMORY;
    } catch (const std::exception &e) {
        set_last_error(e.what());
        return KT_ERR_INTERNAL;
    } catch (...) {
        set_last_error("unknown internal error");
        return KT_ERR_INTERNAL;
    }
}

// Runs f() for an entry point without a status (a getter, a destructor): fallback if it throws.
// The thread's message is left alone: these run e.g. from Python's garbage collector, between a
// failing call and the kt_last_error() that reads its message.
template <typename T, typename F>
T guarded_or(T fallback, F &&f) noexcept {
    try {
        return f();
    } catch (...) {
        return fallback;
    }
}

template <typename F>
void guarded_or(F &&f) noexcept {
    try {
        f();
    } catch (...) {
    }
}

}  // namespace kt

// KT_CHECK(cond, "fmt", args...): invalid argument unless cond holds.
#define KT_CHECK(cond, ...)                                               \
    do {                                                                  \
        if (!(cond)) ::kt::fail(KT_ERR_INVALID_ARGUMENT, __VA_ARGS__);    \
    } while (0)
