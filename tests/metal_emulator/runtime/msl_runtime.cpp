// The executor: runs a kernel over a grid of threadgroups on one OS thread. The
// threads of a threadgroup are cooperative fibers that switch only at barriers,
// simd collectives and exit, so a schedule (forward, reverse, random) is the order in
// which ready fibers are resumed. Everything GPU-semantic that the emulator checks
// (barrier participation, uniform collectives, threadgroup-memory limit and
// poisoning) lives here; the checked device accesses are inline in the shim.
#if defined(__APPLE__)
#define _XOPEN_SOURCE 700 // macOS hides the (deprecated) ucontext API without it
#endif
#include "msl_rt.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#if !(defined(__x86_64__) && defined(__ELF__)) || defined(MSL_USE_UCONTEXT)
#define MSL_UCONTEXT 1
#include <ucontext.h>
#endif

#if !defined(MSL_UCONTEXT)
// Saves the callee-saved registers, MXCSR and the x87 control word on the current
// stack, stores the stack pointer in *save and resumes the context saved at `next`.
extern "C" void msl_ctx_switch(void** save, void* next);
asm(R"(
  .text
  .globl msl_ctx_switch
  .hidden msl_ctx_switch
  .type msl_ctx_switch,@function
msl_ctx_switch:
  .cfi_startproc
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .cfi_endproc
  .size msl_ctx_switch,.-msl_ctx_switch
)");
#endif

namespace msl {

namespace {

constexpr std::size_t kStackBytes = 64 * 1024;
// Poisoned bytes around every threadgroup variable; a write into them is reported.
constexpr std::size_t kGuardBytes = 64;
constexpr std::size_t kArenaBytes = MSL_TG_MEM_LIMIT + 64 * 1024;

enum State { READY, AT_BARRIER, AT_COLLECTIVE, DONE, FAILED };

const char* const kOpNames[OP_COUNT] = {
    "simd_sum",
    "simd_product",
    "simd_min",
    "simd_max",
    "simd_and",
    "simd_or",
    "simd_xor",
    "simd_shuffle",
    "simd_shuffle_down",
    "simd_shuffle_up",
    "simd_shuffle_xor",
    "simd_broadcast",
    "simd_broadcast_first",
    "simd_prefix_inclusive_sum",
    "simd_prefix_exclusive_sum",
    "simd_prefix_inclusive_product",
    "simd_prefix_exclusive_product",
    "simd_any",
    "simd_all",
    "simd_ballot",
    "simdgroup_barrier"};

struct Site {
  const char* file = nullptr;
  unsigned line = 0, col = 0;
  bool operator==(const Site& o) const {
    return line == o.line && col == o.col &&
        (file == o.file || (file && o.file && std::strcmp(file, o.file) == 0));
  }
  std::string str() const {
    return std::string(file ? file : "?") + ":" + std::to_string(line) + ":" + std::to_string(col);
  }
};

struct Fiber {
  void* sp = nullptr;
#if defined(MSL_UCONTEXT)
  ucontext_t ctx;
#endif
  char* stack_lo = nullptr;
  State state = READY;
  unsigned lid = 0;
  ThreadInfo ti;
  unsigned gen = 0; // the collective generation it joined
  alignas(16) unsigned char value[MSL_MAX_LANE_BYTES];
};

struct SimdGroup {
  unsigned first = 0, n_lanes = 0, n_exited = 0, n_waiting = 0, gen = 0;
  int op = 0;
  Site site;
  unsigned site_lane = 0;
  unsigned arg = 0; // of the first lane at a shuffle
  LaneSlots slots[2]; // double-buffered: lanes read slot gen&1 while others move on
};

struct TgVar {
  const void* key; // null for [[threadgroup(n)]] arguments
  std::string name;
  std::size_t offset, size;
};

std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

std::string xyz(const unsigned* v) {
  return fmt("(%u,%u,%u)", v[0], v[1], v[2]);
}

} // namespace

struct Launch {
  MslLaunch* d = nullptr;
  Thunk thunk = nullptr;
  BufDesc bufs[MSL_MAX_BUFFERS];
  std::vector<std::vector<unsigned char>> shadows;
  std::vector<Fiber> fibers;
  std::vector<SimdGroup> sgs;
  unsigned n_threads = 0;
  unsigned tg_pos[3] = {0, 0, 0};
  // Threadgroup memory: one arena, poisoned before every threadgroup. Variables are
  // laid out with guard gaps; tg_used counts what Metal would allocate (no guards).
  std::vector<unsigned char> arena;
  std::size_t tg_used = 0;
  std::size_t arena_end = kGuardBytes;
  std::vector<TgVar> tg_vars;
  std::size_t tg_arg_off[MSL_MAX_BUFFERS];
  // Barrier state of the running threadgroup.
  unsigned n_exited = 0, n_at_barrier = 0;
  Site barrier_site;
  unsigned barrier_first = 0;
  Fiber* cur = nullptr;
  void* sched_sp = nullptr;
#if defined(MSL_UCONTEXT)
  ucontext_t sched_ctx;
#endif
  char* stacks = nullptr;
  std::size_t stacks_bytes = 0;
  bool failed = false;

  ~Launch() {
    if (stacks) {
      munmap(stacks, stacks_bytes);
    }
  }
};

namespace {

thread_local Launch* g_launch = nullptr;

std::string thread_name(const Launch& L, const Fiber& f) {
  return "thread " + xyz(f.ti.v[B_THREAD_POSITION_IN_THREADGROUP]) + " of threadgroup " +
      xyz(L.tg_pos);
}

void set_error(Launch& L, const std::string& msg) {
  if (!L.failed) {
    L.failed = true;
    std::snprintf(L.d->error, sizeof L.d->error, "%s", msg.c_str());
  }
}

void yield_to_scheduler(Launch& L) {
  Fiber* f = L.cur;
#if defined(MSL_UCONTEXT)
  swapcontext(&f->ctx, &L.sched_ctx);
#else
  msl_ctx_switch(&f->sp, L.sched_sp);
#endif
}

// Stops the calling thread for good and aborts the launch with `msg`.
[[noreturn]] void fail(const std::string& msg) {
  Launch& L = *g_launch;
  set_error(L, msg);
  L.cur->state = FAILED;
  yield_to_scheduler(L);
  __builtin_unreachable();
}

void complete_collective(Launch& L, SimdGroup& sg) {
  LaneSlots& s = sg.slots[sg.gen & 1];
  s.active = 0;
  for (unsigned i = 0; i < sg.n_lanes; ++i) {
    Fiber& f = L.fibers[sg.first + i];
    if (f.state == AT_COLLECTIVE) {
      s.active |= 1u << i;
      std::memcpy(s.data[i], f.value, MSL_MAX_LANE_BYTES);
      f.state = READY;
    }
  }
  sg.n_waiting = 0;
  sg.gen++;
}

[[noreturn]] void thread_exit() {
  Launch& L = *g_launch;
  Fiber& f = *L.cur;
  L.n_exited++;
  if (L.n_at_barrier > 0) {
    fail(
        fmt("%s exited while %u thread(s) wait at threadgroup_barrier at %s: every "
            "thread of a threadgroup must reach each barrier (undefined behaviour in "
            "Metal)",
            thread_name(L, f).c_str(),
            L.n_at_barrier,
            L.barrier_site.str().c_str()));
  }
  f.state = DONE;
  SimdGroup& sg = L.sgs[f.lid / MSL_SIMD_WIDTH];
  sg.n_exited++;
  // Exited lanes are inactive, as on the GPU: a pending collective completes without them.
  if (sg.n_waiting > 0 && sg.n_waiting == sg.n_lanes - sg.n_exited) {
    complete_collective(L, sg);
  }
  yield_to_scheduler(L);
  __builtin_unreachable();
}

void fiber_entry() {
  Launch& L = *g_launch;
  L.thunk(L.cur->ti, L);
  thread_exit();
}

#if defined(MSL_UCONTEXT)
void start_fiber(Launch& L, Fiber& f) {
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack_lo;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_entry, 0);
  (void)L;
}

void resume(Launch& L, Fiber& f) {
  L.cur = &f;
  swapcontext(&L.sched_ctx, &f.ctx);
}
#else
void start_fiber(Launch&, Fiber& f) {
  // A frame that msl_ctx_switch "returns" into fiber_entry from; see its pop order.
  auto top = reinterpret_cast<std::uintptr_t>(f.stack_lo + kStackBytes) & ~std::uintptr_t(15);
  auto* s = reinterpret_cast<std::uint64_t*>(top);
  *--s = 0; // fiber_entry's return address: it never returns
  *--s = reinterpret_cast<std::uint64_t>(&fiber_entry);
  for (int i = 0; i < 6; ++i) {
    *--s = 0; // rbp rbx r12 r13 r14 r15
  }
  --s;
  std::uint32_t mxcsr;
  std::uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::memcpy(reinterpret_cast<char*>(s), &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(s) + 4, &fpucw, 2);
  f.sp = s;
}

void resume(Launch& L, Fiber& f) {
  L.cur = &f;
  msl_ctx_switch(&L.sched_sp, f.sp);
}
#endif

std::string describe_deadlock(Launch& L) {
  std::string msg = "deadlock in threadgroup " + xyz(L.tg_pos) + ": ";
  if (L.n_at_barrier) {
    msg +=
        fmt("%u thread(s) wait at threadgroup_barrier at %s; ",
            L.n_at_barrier,
            L.barrier_site.str().c_str());
  }
  for (std::size_t s = 0; s < L.sgs.size(); ++s) {
    const SimdGroup& sg = L.sgs[s];
    if (sg.n_waiting) {
      msg +=
          fmt("%u lane(s) of simdgroup %zu wait at %s at %s; ",
              sg.n_waiting,
              s,
              kOpNames[sg.op],
              sg.site.str().c_str());
    }
  }
  msg +=
      fmt("%u thread(s) exited. Barriers and collectives must be reached in uniform "
          "control flow.",
          L.n_exited);
  return msg;
}

// Lays out a threadgroup variable; false when it does not fit (caller reports).
bool place(
    Launch& L,
    const void* key,
    std::string name,
    std::size_t size,
    std::size_t align,
    std::size_t* offset) {
  align = std::max<std::size_t>(align, 16);
  std::size_t used = (L.tg_used + align - 1) / align * align + size;
  std::size_t off = (L.arena_end + align - 1) / align * align;
  if (used > MSL_TG_MEM_LIMIT || off + size + kGuardBytes > kArenaBytes) {
    L.tg_used = used;
    return false;
  }
  L.tg_used = used;
  L.d->tg_mem_used = used;
  L.arena_end = off + size + kGuardBytes;
  L.tg_vars.push_back({key, std::move(name), off, size});
  *offset = off;
  return true;
}

// The first guard byte that is no longer poison, as an error message naming the
// nearer variable, with the offset relative to its start.
std::string check_guards(const Launch& L) {
  std::size_t gap_start = 0;
  const TgVar* before = nullptr;
  for (std::size_t k = 0; k <= L.tg_vars.size(); ++k) {
    const TgVar* next = k < L.tg_vars.size() ? &L.tg_vars[k] : nullptr;
    std::size_t gap_end = next ? next->offset : L.arena.size();
    for (std::size_t i = gap_start; i < gap_end; ++i) {
      if (L.arena[i] != 0xFF) {
        const TgVar* v = before && (!next || i - gap_start < gap_end - i) ? before : next;
        return fmt(
            "threadgroup memory written out of bounds at byte offset %lld of %s (%zu "
            "bytes) in threadgroup %s",
            static_cast<long long>(i) - static_cast<long long>(v->offset),
            v->name.c_str(),
            v->size,
            xyz(L.tg_pos).c_str());
      }
    }
    if (next) {
      gap_start = next->offset + next->size;
      before = next;
    }
  }
  return "";
}

// Runs every thread of the threadgroup at tg_pos to completion, resuming ready
// fibers in `order` (reshuffled on every pass for the random schedule).
bool run_threadgroup(Launch& L, std::vector<unsigned>& order, std::mt19937_64& rng) {
  const MslLaunch& d = *L.d;
  std::fill(L.arena.begin(), L.arena.end(), 0xFF); // NaN bytes: reads before writes show
  L.n_exited = 0;
  L.n_at_barrier = 0;
  for (auto& sg : L.sgs) {
    sg.n_exited = sg.n_waiting = sg.gen = 0;
  }
  for (unsigned i = 0; i < L.n_threads; ++i) {
    Fiber& f = L.fibers[i];
    f.state = READY;
    unsigned t[3] = {
        i % d.threadgroup[0],
        (i / d.threadgroup[0]) % d.threadgroup[1],
        i / (d.threadgroup[0] * d.threadgroup[1])};
    auto set = [&](Builtin b, unsigned x, unsigned y, unsigned z) {
      f.ti.v[b][0] = x;
      f.ti.v[b][1] = y;
      f.ti.v[b][2] = z;
    };
    const unsigned* tg = d.threadgroup;
    const unsigned* gr = d.grid;
    const unsigned* p = L.tg_pos;
    set(B_THREAD_POSITION_IN_GRID, p[0] * tg[0] + t[0], p[1] * tg[1] + t[1], p[2] * tg[2] + t[2]);
    set(B_THREAD_POSITION_IN_THREADGROUP, t[0], t[1], t[2]);
    set(B_THREAD_INDEX_IN_THREADGROUP, i, 0, 0);
    set(B_THREADGROUP_POSITION_IN_GRID, p[0], p[1], p[2]);
    set(B_THREADS_PER_THREADGROUP, tg[0], tg[1], tg[2]);
    set(B_THREADGROUPS_PER_GRID, gr[0], gr[1], gr[2]);
    set(B_THREADS_PER_GRID, gr[0] * tg[0], gr[1] * tg[1], gr[2] * tg[2]);
    set(B_THREAD_INDEX_IN_SIMDGROUP, i % MSL_SIMD_WIDTH, 0, 0);
    set(B_SIMDGROUP_INDEX_IN_THREADGROUP, i / MSL_SIMD_WIDTH, 0, 0);
    set(B_SIMDGROUPS_PER_THREADGROUP, unsigned(L.sgs.size()), 0, 0);
    set(B_THREADS_PER_SIMDGROUP, MSL_SIMD_WIDTH, 0, 0);
    start_fiber(L, f);
  }
  while (L.n_exited < L.n_threads) {
    if (d.schedule == 2) {
      std::shuffle(order.begin(), order.end(), rng);
    }
    bool progress = false;
    for (unsigned i : order) {
      Fiber& f = L.fibers[i];
      if (f.state != READY) {
        continue;
      }
      resume(L, f);
      progress = true;
      if (L.failed) {
        return false;
      }
    }
    if (!progress) {
      set_error(L, describe_deadlock(L));
      return false;
    }
  }
  std::string guard = check_guards(L);
  if (!guard.empty()) {
    set_error(L, guard);
    return false;
  }
  return true;
}

bool setup(Launch& L, const MslParam* params, int n_params) {
  MslLaunch& d = *L.d;
  for (int a = 0; a < 3; ++a) {
    if (d.grid[a] == 0 || d.threadgroup[a] == 0) {
      set_error(L, "grid and threadgroup sizes must be positive");
      return false;
    }
  }
  L.n_threads = d.threadgroup[0] * d.threadgroup[1] * d.threadgroup[2];
  if (L.n_threads > 1024) {
    set_error(L, fmt("%u threads per threadgroup; Metal allows at most 1024", L.n_threads));
    return false;
  }
  for (int i = 0; i < MSL_MAX_BUFFERS; ++i) {
    MslBuffer& b = d.buffers[i];
    BufDesc& bd = L.bufs[i];
    bd.base = static_cast<char*>(b.data);
    bd.size = b.present ? b.size : 0;
    bd.index = i;
    bd.writable = b.writable;
    bd.n_read = &d.bytes_read[i];
    bd.n_written = &d.bytes_written[i];
    bd.shadow_read = bd.shadow_write = nullptr;
    d.bytes_read[i] = d.bytes_written[i] = d.unique_read[i] = d.unique_written[i] = 0;
  }
  if (d.count_unique) {
    L.shadows.resize(2 * MSL_MAX_BUFFERS);
    for (int i = 0; i < MSL_MAX_BUFFERS; ++i) {
      if (d.buffers[i].present) {
        L.shadows[2 * i].assign((d.buffers[i].size + 7) / 8, 0);
        L.shadows[2 * i + 1].assign((d.buffers[i].size + 7) / 8, 0);
        L.bufs[i].shadow_read = L.shadows[2 * i].data();
        L.bufs[i].shadow_write = L.shadows[2 * i + 1].data();
      }
    }
  }
  for (int k = 0; k < n_params; ++k) {
    const MslParam& p = params[k];
    if (p.kind == MSL_PARAM_BUILTIN) {
      continue;
    }
    if (p.kind == MSL_PARAM_THREADGROUP) {
      if (!place(
              L,
              nullptr,
              fmt("[[threadgroup(%d)]]", p.index),
              d.tg_arg_bytes[p.index],
              16,
              &L.tg_arg_off[p.index])) {
        set_error(
            L,
            fmt("[[threadgroup(n)]] arguments take %zu bytes of threadgroup memory; "
                "the limit is %d",
                L.tg_used,
                MSL_TG_MEM_LIMIT));
        return false;
      }
      continue;
    }
    if (!d.buffers[p.index].present) {
      set_error(L, fmt("buffer(%d) is not bound", p.index));
      return false;
    }
    if (d.buffers[p.index].size < unsigned(p.elem_size) && p.kind == MSL_PARAM_CONSTANT_REF) {
      set_error(
          L,
          fmt("buffer(%d) has %llu bytes; the kernel reads %d",
              p.index,
              d.buffers[p.index].size,
              p.elem_size));
      return false;
    }
  }

  L.fibers.assign(L.n_threads, Fiber());
  unsigned n_sg = (L.n_threads + MSL_SIMD_WIDTH - 1) / MSL_SIMD_WIDTH;
  L.sgs.assign(n_sg, SimdGroup());
  for (unsigned s = 0; s < n_sg; ++s) {
    L.sgs[s].first = s * MSL_SIMD_WIDTH;
    L.sgs[s].n_lanes = std::min<unsigned>(MSL_SIMD_WIDTH, L.n_threads - s * MSL_SIMD_WIDTH);
  }
  // One guard page under each fiber stack turns a stack overflow into a fault.
  std::size_t page = sysconf(_SC_PAGESIZE);
  std::size_t per = kStackBytes + page;
  L.stacks_bytes = per * L.n_threads;
  void* m = mmap(
      nullptr,
      L.stacks_bytes,
      PROT_READ | PROT_WRITE,
      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
      -1,
      0);
  if (m == MAP_FAILED) {
    set_error(L, "cannot allocate fiber stacks");
    return false;
  }
  L.stacks = static_cast<char*>(m);
  for (unsigned i = 0; i < L.n_threads; ++i) {
    char* base = L.stacks + i * per;
    mprotect(base, page, PROT_NONE);
    L.fibers[i].stack_lo = base + page;
    L.fibers[i].lid = i;
  }
  return true;
}

std::uint64_t popcount_bytes(const std::vector<unsigned char>& v) {
  std::uint64_t n = 0;
  for (unsigned char c : v) {
    n += __builtin_popcount(c);
  }
  return n;
}

} // namespace

namespace rt {

void threadgroup_barrier(const char* file, unsigned line, unsigned col) {
  Launch& L = *g_launch;
  Fiber& f = *L.cur;
  Site site{file, line, col};
  if (L.n_exited > 0) {
    fail(
        fmt("%s reached threadgroup_barrier at %s after %u thread(s) of its threadgroup "
            "exited: every thread must reach each barrier (undefined behaviour in Metal)",
            thread_name(L, f).c_str(),
            site.str().c_str(),
            L.n_exited));
  }
  if (L.n_at_barrier == 0) {
    L.barrier_site = site;
    L.barrier_first = f.lid;
  } else if (!(site == L.barrier_site)) {
    fail(
        fmt("threads of one threadgroup wait at different barriers: %s at %s, thread "
            "index %u at %s",
            thread_name(L, f).c_str(),
            site.str().c_str(),
            L.barrier_first,
            L.barrier_site.str().c_str()));
  }
  f.state = AT_BARRIER;
  if (++L.n_at_barrier == L.n_threads) {
    for (Fiber& g : L.fibers) {
      g.state = READY;
    }
    L.n_at_barrier = 0;
    return;
  }
  yield_to_scheduler(L);
}

const LaneSlots* collective(
    int op,
    const void* value,
    int size,
    const char* file,
    unsigned line,
    unsigned col,
    unsigned arg) {
  Launch& L = *g_launch;
  Fiber& f = *L.cur;
  SimdGroup& sg = L.sgs[f.lid / MSL_SIMD_WIDTH];
  Site site{file, line, col};
  const unsigned lane = f.lid % MSL_SIMD_WIDTH;
  if (sg.n_waiting == 0) {
    sg.op = op;
    sg.site = site;
    sg.site_lane = lane;
  } else if (op != sg.op || !(site == sg.site)) {
    fail(
        fmt("divergent simd collectives in simdgroup %u of threadgroup %s: lane %u at %s "
            "(%s), lane %u at %s (%s). Metal would run them with partial masks, which "
            "the emulator does not model; keep collectives in uniform control flow",
            f.lid / MSL_SIMD_WIDTH,
            xyz(L.tg_pos).c_str(),
            lane,
            kOpNames[op],
            site.str().c_str(),
            sg.site_lane,
            kOpNames[sg.op],
            sg.site.str().c_str()));
  }
  if (op == OP_SHUFFLE_DOWN || op == OP_SHUFFLE_UP || op == OP_SHUFFLE_XOR) {
    if (sg.n_waiting > 0 && arg != sg.arg) {
      fail(
          fmt("%s in simdgroup %u of threadgroup %s at %s: lane %u passes %u, lane %u "
              "passes %u; Metal requires the same value in every lane",
              kOpNames[op],
              f.lid / MSL_SIMD_WIDTH,
              xyz(L.tg_pos).c_str(),
              site.str().c_str(),
              lane,
              arg,
              sg.site_lane,
              sg.arg));
    }
    sg.arg = arg;
  }
  std::memcpy(f.value, value, size);
  f.gen = sg.gen;
  f.state = AT_COLLECTIVE;
  if (++sg.n_waiting == sg.n_lanes - sg.n_exited) {
    complete_collective(L, sg);
  } else {
    yield_to_scheduler(L);
  }
  return &sg.slots[f.gen & 1];
}

unsigned lane() {
  return g_launch->cur->lid % MSL_SIMD_WIDTH;
}

void* tg_alloc(
    const void* key,
    unsigned long long size,
    unsigned long long align,
    const char* name) {
  Launch& L = *g_launch;
  for (const TgVar& v : L.tg_vars) {
    if (v.key == key) {
      return L.arena.data() + v.offset;
    }
  }
  std::size_t off;
  if (!place(L, key, name, size, align, &off)) {
    fail(
        fmt("threadgroup memory of %zu bytes (with %s) exceeds the %d-byte limit of Metal",
            L.tg_used,
            name,
            MSL_TG_MEM_LIMIT));
  }
  return L.arena.data() + off;
}

void* tg_arg(int index) {
  Launch& L = *g_launch;
  return L.arena.data() + L.tg_arg_off[index];
}

void out_of_bounds(const BufDesc* b, const void* p, unsigned long long size, bool write) {
  Launch& L = *g_launch;
  const char* what = write ? "write" : "read";
  if (!b) {
    fail(fmt("%s through a null device pointer by %s", what, thread_name(L, *L.cur).c_str()));
  }
  long long off = static_cast<const char*>(p) - b->base;
  fail(
      fmt("out-of-bounds %s of %llu bytes at byte offset %lld of buffer(%d) (%llu bytes) "
          "by %s",
          what,
          size,
          off,
          b->index,
          b->size,
          thread_name(L, *L.cur).c_str()));
}

void read_only_write(const BufDesc* b, const void* p) {
  Launch& L = *g_launch;
  long long off = static_cast<const char*>(p) - b->base;
  fail(
      fmt("write at byte offset %lld of buffer(%d), which was passed as a read-only array, "
          "by %s",
          off,
          b->index,
          thread_name(L, *L.cur).c_str()));
}

const BufDesc* buffer(Launch& L, int index) {
  return &L.bufs[index];
}

const void* constant_bytes(Launch& L, int index) {
  return L.d->buffers[index].data;
}

} // namespace rt

int run(MslLaunch* desc, Thunk thunk, const MslParam* params, int n_params) {
  Launch L;
  L.d = desc;
  L.thunk = thunk;
  L.arena.assign(kArenaBytes, 0xFF);
  desc->error[0] = 0;
  desc->tg_mem_used = 0;
  if (!setup(L, params, n_params)) {
    return -1;
  }
  desc->tg_mem_used = L.tg_used;
  Launch* saved = g_launch;
  g_launch = &L;
  const unsigned* gr = desc->grid;
  const unsigned long long n_tg = 1ull * gr[0] * gr[1] * gr[2];
  std::vector<unsigned> order(L.n_threads);
  for (unsigned i = 0; i < L.n_threads; ++i) {
    order[i] = desc->schedule == 1 ? L.n_threads - 1 - i : i;
  }
  std::vector<unsigned long long> tg_order(n_tg);
  for (unsigned long long i = 0; i < n_tg; ++i) {
    tg_order[i] = desc->schedule == 1 ? n_tg - 1 - i : i;
  }
  std::mt19937_64 rng(desc->seed);
  if (desc->schedule == 2) {
    std::shuffle(tg_order.begin(), tg_order.end(), rng);
  }
  for (unsigned long long t : tg_order) {
    L.tg_pos[0] = unsigned(t % gr[0]);
    L.tg_pos[1] = unsigned((t / gr[0]) % gr[1]);
    L.tg_pos[2] = unsigned(t / (1ull * gr[0] * gr[1]));
    if (!run_threadgroup(L, order, rng)) {
      break;
    }
  }
  g_launch = saved;
  if (desc->count_unique && !L.failed) {
    for (int i = 0; i < MSL_MAX_BUFFERS; ++i) {
      if (desc->buffers[i].present) {
        desc->unique_read[i] = popcount_bytes(L.shadows[2 * i]);
        desc->unique_written[i] = popcount_bytes(L.shadows[2 * i + 1]);
      }
    }
  }
  return L.failed ? -1 : 0;
}

} // namespace msl
