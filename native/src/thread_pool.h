// A persistent pool of worker threads (not an OpenMP runtime: torch has its own, and two runtimes
// spinning on the same cores slow each other down). The calling thread takes part as worker 0.
// Work is a count of items handed out through an atomic counter, so the caller orders items
// (largest first) and each item writes disjoint outputs: results do not depend on the number of
// threads. Fork-safe: a child process starts a fresh pool on its first use.
#pragma once

#include <cstdint>
#include <functional>

namespace kt {

class ThreadPool {
public:
    using Task = std::function<void(int64_t item, int worker)>;

    // Runs task(item, worker) for item in [0, n_items) on up to size() threads and returns when
    // all are done. The first exception thrown by a task is rethrown here.
    static void run(int64_t n_items, const Task &task);
    static void resize(int threads);   // threads >= 1; workers are pinned one per core
    static int size();
};

}  // namespace kt
