#include "common/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace moequant {

namespace {

int default_threads() {
  if (const char* env = std::getenv("MOEQUANT_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) {
      return n;
    }
  }
  unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(hc);
}

std::atomic<int> g_num_threads{0};

// Workers may spin this long after a job before parking (MOEQUANT_SPIN_US, read per job;
// MOEQUANT_SPIN_YIELD=1 spins with sched_yield instead of pause): a condition-variable
// wake costs tens of microseconds on a VM. Off by default: on a 2-core host a spinning
// worker holds the core that MLX's stream thread and Python need between calls, and
// made isolated decode calls 1.5-2.5x slower in the median (bench/RESULTS.md, issue 15
// session 3).
int spin_us() {
  const char* env = std::getenv("MOEQUANT_SPIN_US");
  return env ? std::max(0, std::atoi(env)) : 0;
}

bool spin_yield() {
  const char* env = std::getenv("MOEQUANT_SPIN_YIELD");
  return env && env[0] == '1';
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_ia32_pause();
#endif
}

class Pool {
 public:
  static Pool& instance() {
    // Leaked on purpose: joining workers during static destruction at interpreter
    // exit can deadlock.
    static Pool* pool = new Pool();
    return *pool;
  }

  void run(int n_tasks, const std::function<void(int)>& task) {
    // One job at a time; concurrent callers (several MLX streams) take turns.
    std::lock_guard<std::mutex> job_lock(job_mutex_);
    ensure_workers(n_tasks - 1);
    // The job's state is one word, (generation, tasks, next task): a worker claims a
    // task by a compare-and-swap that also checks the generation, so a late worker can
    // never claim a task of a later job, nor read this job's task pointer after it ended.
    const uint64_t gen = (state_.load(std::memory_order_relaxed) >> 32) + 1;
    task_ = &task;
    error_ = nullptr;
    completed_.store(0, std::memory_order_relaxed);
    state_.store((gen << 32) | (static_cast<uint64_t>(n_tasks) << 16), std::memory_order_release);
    {
      // Parked workers re-check the state under m_: no lost wake-up.
      std::lock_guard<std::mutex> lk(m_);
    }
    cv_.notify_all();
    // The calling thread takes tasks too, then waits for the ones workers hold.
    for (int i; (i = claim(gen)) >= 0;) {
      work(task, i, n_tasks);
    }
    wait_done(n_tasks);
    if (error_) {
      std::rethrow_exception(error_);
    }
  }

 private:
  // The next task of job `gen`, or -1 when none is left (or another job is current).
  int claim(uint64_t gen) {
    uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      const int next = static_cast<int>(s & 0xFFFF);
      const int n = static_cast<int>((s >> 16) & 0xFFFF);
      if ((s >> 32) != gen || next >= n) {
        return -1;
      }
      if (state_.compare_exchange_weak(
              s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        return next;
      }
    }
  }

  void work(const std::function<void(int)>& task, int i, int n_tasks) {
    try {
      task(i);
    } catch (...) {
      std::lock_guard<std::mutex> lk(m_);
      if (!error_) {
        error_ = std::current_exception();
      }
    }
    if (completed_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_tasks) {
      std::lock_guard<std::mutex> lk(m_);
      done_cv_.notify_all();
    }
  }

  void wait_done(int n_tasks) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto budget = std::chrono::microseconds(spin_us());
    for (int it = 0; completed_.load(std::memory_order_acquire) < n_tasks; ++it) {
      cpu_relax();
      if ((it & 63) == 63 && std::chrono::steady_clock::now() - t0 > budget) {
        std::unique_lock<std::mutex> lk(m_);
        done_cv_.wait(lk, [&] { return completed_.load(std::memory_order_acquire) >= n_tasks; });
        break;
      }
    }
  }

  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      // The job about to be published is new to the worker, however late it starts.
      workers_.emplace_back([this, seen = state_.load() >> 32] { loop(seen); });
    }
  }

  void loop(uint64_t seen) {
    for (;;) {
      // Wait for a new job: spin first, then park.
      const auto t0 = std::chrono::steady_clock::now();
      const auto budget = std::chrono::microseconds(spin_us());
      const bool yield = spin_yield();
      uint64_t gen;
      for (int it = 0;; ++it) {
        gen = state_.load(std::memory_order_acquire) >> 32;
        if (gen != seen) {
          break;
        }
        if (yield) {
          std::this_thread::yield();
        } else {
          cpu_relax();
        }
        if ((yield || (it & 63) == 63) && std::chrono::steady_clock::now() - t0 > budget) {
          std::unique_lock<std::mutex> lk(m_);
          cv_.wait(lk, [&] { return (state_.load(std::memory_order_acquire) >> 32) != seen; });
          gen = state_.load(std::memory_order_acquire) >> 32;
          break;
        }
      }
      seen = gen;
      // task_ is read only after a successful claim of this job: it is this job's then.
      for (int i; (i = claim(gen)) >= 0;) {
        work(*task_, i, static_cast<int>((state_.load(std::memory_order_relaxed) >> 16) & 0xFFFF));
      }
    }
  }

  std::mutex job_mutex_;
  std::mutex m_;
  std::condition_variable cv_;
  std::condition_variable done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* task_ = nullptr;
  std::atomic<uint64_t> state_{0};
  std::atomic<int> completed_{0};
  std::exception_ptr error_;
};

} // namespace

int get_num_threads() {
  int n = g_num_threads.load();
  return n > 0 ? n : default_threads();
}

void set_num_threads(int n) {
  g_num_threads.store(n > 0 ? n : 0);
}

void parallel_for(
    std::size_t n,
    std::size_t min_chunk,
    const std::function<void(std::size_t, std::size_t)>& fn) {
  if (n == 0) {
    return;
  }
  min_chunk = std::max<std::size_t>(min_chunk, 1);
  std::size_t max_tasks = (n + min_chunk - 1) / min_chunk;
  int n_tasks = static_cast<int>(
      std::min<std::size_t>(max_tasks, static_cast<std::size_t>(get_num_threads())));
  if (n_tasks <= 1) {
    fn(0, n);
    return;
  }
  std::size_t chunk = (n + n_tasks - 1) / n_tasks;
  Pool::instance().run(n_tasks, [&](int t) {
    std::size_t b = static_cast<std::size_t>(t) * chunk;
    std::size_t e = std::min(n, b + chunk);
    if (b < e) {
      fn(b, e);
    }
  });
}

} // namespace moequant
