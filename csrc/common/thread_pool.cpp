#include "common/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

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

// How threads wait. The calling thread, once it has no task left, waits for the tasks
// the workers hold (at most their last claims) by spinning with sched_yield, which hands
// the core to any other runnable thread (MLX's stream thread and Python share these
// cores), for up to kWaitSpin, then parks: its wake-ups after the workers' end summed to
// 0.3-0.4 ms per decode token when parked, 0.04-0.07 ms spinning, on a 2-core VM
// (bench/RESULTS.md, issue 15 session 6). Idle workers park
// at once: a pause-spinning worker holds the core that the stream thread and Python need
// between calls, and made isolated decode calls 1.5-2.5x slower (session 3); spinning
// idle workers (sched_yield or pause, for twice the recent gap between jobs) measured no
// faster than parked ones in session 6's quiet runs.
// MOEQUANT_SPIN_US=N instead spins N us on both sides, with pause, or with sched_yield
// if MOEQUANT_SPIN_YIELD=1: session 5's pool with N = 0. Both are read once per process,
// at the first job (not per job: two getenv calls per job and per idle worker).
constexpr int64_t kWaitSpin = 2'000'000; // ns

struct SpinPolicy {
  bool fixed; // MOEQUANT_SPIN_US set
  int64_t ns;
  bool yield;
};

SpinPolicy read_spin_policy() {
  const char* env = std::getenv("MOEQUANT_SPIN_US");
  if (!env) {
    return {false, 0, true};
  }
  const char* y = std::getenv("MOEQUANT_SPIN_YIELD");
  return {true, int64_t(std::max(0, std::atoi(env))) * 1000, y && y[0] == '1'};
}

const SpinPolicy& fixed_spin() {
  static const SpinPolicy policy = read_spin_policy();
  return policy;
}

// MOEQUANT_POOL_TRACE=<path>: every job's submit time, its tasks' thread, start and stop
// (steady_clock ns, which is CLOCK_MONOTONIC: Python's time.monotonic_ns) and its end,
// written to <path> at exit, one line per job. For measuring the pool's wake-ups and
// tails (bench/RESULTS.md, issue 15 session 6); off, it costs one branch per job.
struct TaskTrace {
  int64_t start = 0, stop = 0;
  int thread = 0; // 0: the calling thread, w + 1: worker w
};
struct JobTrace {
  int64_t submit = 0, end = 0;
  std::size_t items = 0;
  std::vector<TaskTrace> tasks;
};

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

const char* trace_path() {
  static const char* path = std::getenv("MOEQUANT_POOL_TRACE");
  return path && path[0] ? path : nullptr;
}

std::vector<JobTrace>& trace_log() {
  static auto* log = new std::vector<JobTrace>();
  return *log;
}

// Writes the trace to a new file beside <path> and renames it over <path>: a reader sees
// a whole trace or none, processes given the same path never interleave their lines (the
// last one to finish wins), and a file hard-linked to <path> is left as it is. Any
// failure (missing directory, no permission, disk full) is said on stderr, and the
// temporary file removed.
void write_trace() {
  const std::string path = trace_path();
  auto fail = [&](const char* what, int err, const std::string& tmp) {
    if (!tmp.empty()) {
      ::unlink(tmp.c_str());
    }
    std::fprintf(
        stderr,
        "moequant: MOEQUANT_POOL_TRACE: no trace written to %s: %s: %s\n",
        path.c_str(),
        what,
        std::strerror(err));
  };
  // A name no other process or earlier attempt holds (O_EXCL): pid and clock.
  std::string tmp;
  int fd = -1;
  for (int attempt = 0; fd < 0 && attempt < 16; ++attempt) {
    tmp = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(now_ns() + attempt);
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST) {
      break;
    }
  }
  if (fd < 0) {
    fail("cannot create a file in its directory", errno, "");
    return;
  }
  FILE* f = ::fdopen(fd, "w");
  if (!f) {
    const int err = errno;
    ::close(fd);
    fail("cannot write", err, tmp);
    return;
  }
  int err = 0;
  errno = 0;
  for (const JobTrace& j : trace_log()) {
    std::fprintf(f, "%lld %lld %zu", (long long)j.submit, (long long)j.end, j.items);
    for (const TaskTrace& t : j.tasks) {
      std::fprintf(f, " %d:%lld:%lld", t.thread, (long long)t.start, (long long)t.stop);
    }
    std::fputc('\n', f);
    if (std::ferror(f)) { // a buffer flush failed (disk full, file size limit)
      err = errno ? errno : EIO;
      break;
    }
  }
  if (!err && std::fflush(f) != 0) {
    err = errno;
  }
  if (std::fclose(f) != 0 && !err) {
    err = errno;
  }
  if (err) {
    fail("cannot write", err, tmp);
    return;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    fail("cannot replace it", errno, tmp);
  }
}

// Registered when the library loads: a process that runs no parallel job still replaces
// an older trace at <path> (with an empty one) rather than leave it looking like its own.
[[maybe_unused]] const bool g_trace_at_exit = trace_path() && std::atexit(write_trace) == 0;

thread_local int t_thread = 0;
thread_local std::size_t t_items = 0;

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
    JobTrace* tr = nullptr;
    if (trace_path()) {
      trace_log().emplace_back();
      tr = &trace_log().back();
      tr->items = t_items;
      tr->tasks.resize(n_tasks);
      tr->submit = now_ns();
    }
    trace_ = tr;
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
    if (tr) {
      tr->end = now_ns();
    }
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
    // trace_ is this job's: read after claiming one of its tasks, like task_.
    TaskTrace* tt = trace_ ? &trace_->tasks[i] : nullptr;
    if (tt) {
      tt->thread = t_thread;
      tt->start = now_ns();
    }
    try {
      task(i);
    } catch (...) {
      std::lock_guard<std::mutex> lk(m_);
      if (!error_) {
        error_ = std::current_exception();
      }
    }
    if (tt) {
      tt->stop = now_ns();
    }
    if (completed_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_tasks) {
      std::lock_guard<std::mutex> lk(m_);
      done_cv_.notify_all();
    }
  }

  void wait_done(int n_tasks) {
    const SpinPolicy& p = fixed_spin();
    spin_then_park(p.fixed ? p.ns : kWaitSpin, p.yield, done_cv_, [&] {
      return completed_.load(std::memory_order_acquire) >= n_tasks;
    });
  }

  // Spins (sched_yield or pause) until ready() or `ns` elapse, then parks on cv.
  template <typename Ready>
  void spin_then_park(int64_t ns, bool yield, std::condition_variable& cv, Ready&& ready) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto budget = std::chrono::nanoseconds(ns);
    for (int it = 0; !ready(); ++it) {
      if (yield) {
        std::this_thread::yield();
      } else {
        cpu_relax();
      }
      if ((yield || (it & 63) == 63) && std::chrono::steady_clock::now() - t0 > budget) {
        std::unique_lock<std::mutex> lk(m_);
        cv.wait(lk, ready);
        return;
      }
    }
  }

  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      // The job about to be published is new to the worker, however late it starts.
      const int id = static_cast<int>(workers_.size()) + 1;
      workers_.emplace_back([this, id, seen = state_.load() >> 32] {
        t_thread = id;
        loop(seen);
      });
    }
  }

  void loop(uint64_t seen) {
    for (;;) {
      // Wait for a new job: spin first, then park.
      const SpinPolicy& p = fixed_spin();
      const int64_t idle = p.fixed ? p.ns : 0;
      spin_then_park(idle, p.yield, cv_, [&] {
        return (state_.load(std::memory_order_acquire) >> 32) != seen;
      });
      const uint64_t gen = state_.load(std::memory_order_acquire) >> 32;
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
  JobTrace* trace_ = nullptr;
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
    t_items = 0;
    fn(0, n);
    return;
  }
  if (trace_path() && t_items == 0) {
    t_items = n;
  }
  std::size_t chunk = (n + n_tasks - 1) / n_tasks;
  Pool::instance().run(n_tasks, [&](int t) {
    std::size_t b = static_cast<std::size_t>(t) * chunk;
    std::size_t e = std::min(n, b + chunk);
    if (b < e) {
      fn(b, e);
    }
  });
  t_items = 0;
}

void note_job_items(std::size_t n) {
  if (trace_path()) {
    t_items = n;
  }
}

} // namespace moequant
