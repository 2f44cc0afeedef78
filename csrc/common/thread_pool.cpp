#include "common/thread_pool.h"

#include <algorithm>
#include <atomic>
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
    {
      std::lock_guard<std::mutex> lk(m_);
      task_ = &task;
      n_tasks_ = n_tasks;
      next_.store(1);
      pending_ = n_tasks - 1;
      error_ = nullptr;
      ++generation_;
    }
    cv_.notify_all();
    // The calling thread takes task 0 and then helps with the rest.
    work(task, 0);
    for (int i; (i = next_.fetch_add(1)) < n_tasks;) {
      work(task, i);
      std::lock_guard<std::mutex> lk(m_);
      --pending_;
    }
    // Wait for every worker that picked up this job to leave it, so none can reach a
    // stale task after the next job resets the counters.
    std::unique_lock<std::mutex> lk(m_);
    done_cv_.wait(lk, [&] { return pending_ == 0 && active_ == 0; });
    task_ = nullptr;
    if (error_) {
      std::rethrow_exception(error_);
    }
  }

 private:
  void work(const std::function<void(int)>& task, int i) {
    try {
      task(i);
    } catch (...) {
      std::lock_guard<std::mutex> lk(m_);
      if (!error_) {
        error_ = std::current_exception();
      }
    }
  }

  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      workers_.emplace_back([this] { loop(); });
    }
  }

  void loop() {
    unsigned long seen = 0;
    for (;;) {
      const std::function<void(int)>* task;
      int n_tasks;
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        task = task_;
        n_tasks = n_tasks_;
        if (task == nullptr) {
          continue;
        }
        ++active_;
      }
      for (int i; (i = next_.fetch_add(1)) < n_tasks;) {
        work(*task, i);
        std::lock_guard<std::mutex> lk(m_);
        --pending_;
      }
      std::lock_guard<std::mutex> lk(m_);
      --active_;
      done_cv_.notify_all();
    }
  }

  std::mutex job_mutex_;
  std::mutex m_;
  std::condition_variable cv_;
  std::condition_variable done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* task_ = nullptr;
  int n_tasks_ = 0;
  std::atomic<int> next_{0};
  int pending_ = 0;
  int active_ = 0;
  unsigned long generation_ = 0;
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
