// Interface between the kernel translation unit (shim + translated .metal) and the
// executor (msl_runtime.cpp). Kernel code sees no standard headers, so this header
// uses only built-in types.
#pragma once

#define MSL_MAX_BUFFERS 32
#define MSL_SIMD_WIDTH 32
#define MSL_MAX_LANE_BYTES 64
#define MSL_TG_MEM_LIMIT 32768

extern "C" {

// One [[buffer(n)]] binding, filled by the Python side; mirrored in ctypes.
struct MslBuffer {
  void* data;
  unsigned long long size;
  int present;
  int writable;
};

// Everything about one launch: inputs from Python, outputs back to Python.
struct MslLaunch {
  MslBuffer buffers[MSL_MAX_BUFFERS];
  unsigned long long tg_arg_bytes[MSL_MAX_BUFFERS]; // [[threadgroup(n)]] sizes
  unsigned grid[3]; // threadgroups per grid
  unsigned threadgroup[3]; // threads per threadgroup
  int schedule; // 0 forward, 1 reverse, 2 random
  unsigned long long seed;
  int count_unique; // also count distinct bytes (shadow bitmaps)
  unsigned long long bytes_read[MSL_MAX_BUFFERS];
  unsigned long long bytes_written[MSL_MAX_BUFFERS];
  unsigned long long unique_read[MSL_MAX_BUFFERS];
  unsigned long long unique_written[MSL_MAX_BUFFERS];
  unsigned long long tg_mem_used;
  char error[2048];
};

// What a kernel parameter binds to; mirrored in ctypes.
enum MslParamKind {
  MSL_PARAM_DEVICE_PTR = 0,
  MSL_PARAM_CONSTANT_PTR = 1,
  MSL_PARAM_CONSTANT_REF = 2,
  MSL_PARAM_THREADGROUP = 3,
  MSL_PARAM_BUILTIN = 4,
};

struct MslParam {
  int kind;
  int index; // buffer / threadgroup index, or the builtin id
  int elem_size; // bytes of the pointee or referenced value
  int writable; // device pointer to non-const
};
}

namespace msl {

// Builtin ids, in the order of the attribute table in translate.py.
enum Builtin {
  B_THREAD_POSITION_IN_GRID,
  B_THREAD_POSITION_IN_THREADGROUP,
  B_THREAD_INDEX_IN_THREADGROUP,
  B_THREADGROUP_POSITION_IN_GRID,
  B_THREADS_PER_THREADGROUP,
  B_THREADGROUPS_PER_GRID,
  B_THREADS_PER_GRID,
  B_THREAD_INDEX_IN_SIMDGROUP,
  B_SIMDGROUP_INDEX_IN_THREADGROUP,
  B_SIMDGROUPS_PER_THREADGROUP,
  B_THREADS_PER_SIMDGROUP,
  B_COUNT
};

// The builtin values of one thread, as three components each.
struct ThreadInfo {
  unsigned v[B_COUNT][3];
};

// A bound device buffer as the checked pointers see it.
struct BufDesc {
  char* base;
  unsigned long long size;
  int index;
  int writable;
  unsigned long long* n_read;
  unsigned long long* n_written;
  unsigned char* shadow_read; // one bit per byte, or null
  unsigned char* shadow_write;
};

// Values of all lanes at one collective, valid until the lane's next collective.
struct LaneSlots {
  unsigned active; // bit per lane that took part
  alignas(16) unsigned char data[MSL_SIMD_WIDTH][MSL_MAX_LANE_BYTES];
};

enum CollectiveOp {
  OP_SUM,
  OP_PROD,
  OP_MIN,
  OP_MAX,
  OP_AND,
  OP_OR,
  OP_XOR,
  OP_SHUFFLE,
  OP_SHUFFLE_DOWN,
  OP_SHUFFLE_UP,
  OP_SHUFFLE_XOR,
  OP_BROADCAST,
  OP_BROADCAST_FIRST,
  OP_PREFIX_INCL_SUM,
  OP_PREFIX_EXCL_SUM,
  OP_PREFIX_INCL_PROD,
  OP_PREFIX_EXCL_PROD,
  OP_ANY,
  OP_ALL,
  OP_BALLOT,
  OP_SIMDGROUP_BARRIER,
  OP_COUNT
};

struct Launch; // the executor's state for one launch

namespace rt {
// Blocks the calling thread at a threadgroup barrier.
void threadgroup_barrier(const char* file, unsigned line, unsigned col);
// Publishes `size` bytes at a simd collective and returns every lane's value. `arg`
// is the shuffle delta or mask, which Metal requires to be uniform.
const LaneSlots* collective(
    int op,
    const void* value,
    int size,
    const char* file,
    unsigned line,
    unsigned col,
    unsigned arg = 0);
// The calling thread's lane in its simdgroup.
unsigned lane();
// Storage for a kernel-scope threadgroup variable, keyed by declaration.
void* tg_alloc(
    const void* key,
    unsigned long long size,
    unsigned long long align,
    const char* name);
// Storage for a [[threadgroup(n)]] argument.
void* tg_arg(int index);
// Reports an access outside a device buffer; does not return to the kernel.
[[noreturn]] void
out_of_bounds(const BufDesc* b, const void* p, unsigned long long size, bool write);
[[noreturn]] void read_only_write(const BufDesc* b, const void* p);
const BufDesc* buffer(Launch& L, int index);
const void* constant_bytes(Launch& L, int index);
} // namespace rt

typedef void (*Thunk)(const ThreadInfo&, Launch&);
// Runs one kernel over the launch's grid; returns 0 or -1 with L.error set.
int run(MslLaunch* desc, Thunk thunk, const MslParam* params, int n_params);

} // namespace msl
