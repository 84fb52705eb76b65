#include "thread_pool.h"

#include "cpu_features.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace kt {
namespace {

class Pool {
public:
    explicit Pool(int threads) : pid_(getpid()) {
        const std::vector<int> cpus = cpus_by_core();
        const bool pin = !cpus.empty() && threads <= static_cast<int>(cpus.size());
        for (int w = 1; w < threads; ++w) {
            workers_.emplace_back([this, w] { loop(w); });
            // Named so that per-thread CPU accounting (/proc, top -H) tells the engine's workers apart.
            char name[16];
            std::snprintf(name, sizeof name, "kt_engine_%d", w);
            pthread_setname_np(workers_.back().native_handle(), name);
            if (pin) {
                cpu_set_t one;
                CPU_ZERO(&one);
                CPU_SET(cpus[w], &one);
                pthread_setaffinity_np(workers_.back().native_handle(), sizeof one, &one);
            }
        }
    }

    ~Pool() {
        {
            std::lock_guard<std::mutex> lock(mu_);
            stop_ = true;
            ++generation_;
        }
        wake_.notify_all();
        for (auto &t : workers_) t.join();
    }

    int size() const { return static_cast<int>(workers_.size()) + 1; }
    pid_t owner() const { return pid_; }

    void run(int64_t n_items, const ThreadPool::Task &task) {
        {
            std::lock_guard<std::mutex> lock(mu_);
            task_ = &task;
            n_items_ = n_items;
            next_.store(0);
            pending_ = static_cast<int>(workers_.size());
            error_ = nullptr;
            ++generation_;
        }
        wake_.notify_all();
        work(0);
        std::unique_lock<std::mutex> lock(mu_);
        done_.wait(lock, [this] { return pending_ == 0; });
        task_ = nullptr;
        if (error_) std::rethrow_exception(error_);
    }

private:
    void loop(int w) {
        uint64_t seen = 0;
        for (;;) {
            {
                std::unique_lock<std::mutex> lock(mu_);
                wake_.wait(lock, [&] { return generation_ != seen; });
                seen = generation_;
                if (stop_) return;
            }
            work(w);
            std::lock_guard<std::mutex> lock(mu_);
            if (--pending_ == 0) done_.notify_one();
        }
    }

    void work(int w) {
        for (;;) {
            const int64_t item = next_.fetch_add(1);
            if (item >= n_items_) return;
            try {
                (*task_)(item, w);
            } catch (...) {
                std::lock_guard<std::mutex> lock(err_mu_);
                if (!error_) error_ = std::current_exception();
                next_.store(n_items_);   // stop handing out items
            }
        }
    }

    pid_t pid_;
    std::vector<std::thread> workers_;
    std::mutex mu_, err_mu_;
    std::condition_variable wake_, done_;
    uint64_t generation_ = 0;
    bool stop_ = false;
    const ThreadPool::Task *task_ = nullptr;
    int64_t n_items_ = 0;
    std::atomic<int64_t> next_{0};
    int pending_ = 0;
    std::exception_ptr error_;
};

Pool *g_pool = nullptr;
int g_threads = 1;

Pool &pool() {
    // After fork() the workers do not exist in the child: forget the parent's pool (its threads
    // and locks belong to the parent; touching them would hang) and start a fresh one.
    if (g_pool && g_pool->owner() != getpid()) g_pool = nullptr;
    if (!g_pool) g_pool = new Pool(g_threads);
    return *g_pool;
}

}  // namespace

void ThreadPool::run(int64_t n_items, const Task &task) {
    if (n_items <= 0) return;
    pool().run(n_items, task);
}

void ThreadPool::resize(int threads) {
    threads = std::max(threads, 1);
    if (g_pool && g_pool->owner() == getpid() && g_pool->size() == threads) return;
    if (g_pool && g_pool->owner() == getpid()) delete g_pool;
    g_pool = nullptr;
    g_threads = threads;
}

int ThreadPool::size() { return g_threads; }

}  // namespace kt
