// Runs harness kernels without Python, for targets where only an executable can run
// (arm64 under qemu, with the ucontext fiber switch): tg_sum under every schedule with
// its byte counts, simd_sum and a shuffle ladder, and two errors raised inside a fiber
// (an out-of-bounds write, the threadgroup-memory limit). Prints "ok" or what failed.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include "../runtime/msl_rt.h"

extern "C" int msl_kernel_count();
extern "C" const char* msl_kernel_name(int k);
extern "C" int msl_kernel_launch(int k, MslLaunch* d);

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what.c_str());
    ++failures;
  }
}

int kernel(const char* name) {
  for (int k = 0; k < msl_kernel_count(); ++k) {
    if (std::strcmp(msl_kernel_name(k), name) == 0) {
      return k;
    }
  }
  std::printf("FAIL: no kernel %s\n", name);
  std::exit(1);
}

void bind(MslLaunch& d, int i, void* p, std::size_t n, bool writable) {
  d.buffers[i] = {p, n, 1, writable ? 1 : 0};
}

void dims(MslLaunch& d, unsigned gx, unsigned tx, unsigned ty = 1) {
  d.grid[0] = gx;
  d.grid[1] = d.grid[2] = 1;
  d.threadgroup[0] = tx;
  d.threadgroup[1] = ty;
  d.threadgroup[2] = 1;
}

void tg_sum() {
  const unsigned n = 1000;
  static float x[n];
  for (unsigned i = 0; i < n; ++i) {
    x[i] = std::sin(0.37f * i);
  }
  for (int schedule = 0; schedule < 3; ++schedule) {
    static MslLaunch d;
    std::memset(&d, 0, sizeof d);
    float out[4] = {0, 0, 0, 0};
    unsigned n_arg = n;
    bind(d, 0, x, sizeof x, false);
    bind(d, 1, out, sizeof out, true);
    bind(d, 2, &n_arg, sizeof n_arg, false);
    dims(d, 4, 256);
    d.schedule = schedule;
    d.seed = 7;
    int rc = msl_kernel_launch(kernel("tg_sum_float"), &d);
    expect(rc == 0, std::string("tg_sum launch: ") + d.error);
    for (unsigned t = 0; t < 4; ++t) {
      double want = 0;
      for (unsigned i = 256 * t; i < n && i < 256 * (t + 1); ++i) {
        want += x[i];
      }
      expect(
          std::fabs(out[t] - want) <= 1e-4 * (1 + std::fabs(want)),
          "tg_sum threadgroup " + std::to_string(t) + " schedule " + std::to_string(schedule));
    }
    expect(d.bytes_read[0] == 4 * n && d.bytes_written[1] == 16, "tg_sum byte counts");
  }
}

void collectives() {
  static float x[64], out[64 * 12];
  for (int i = 0; i < 64; ++i) {
    x[i] = float(i % 7) - 2.5f;
  }
  static MslLaunch d;
  std::memset(&d, 0, sizeof d);
  bind(d, 0, x, sizeof x, false);
  bind(d, 1, out, sizeof out, true);
  dims(d, 1, 64);
  d.schedule = 2;
  expect(
      msl_kernel_launch(kernel("collectives"), &d) == 0,
      std::string("collectives launch: ") + d.error);
  for (int sg = 0; sg < 2; ++sg) {
    float sum = 0;
    for (int i = 0; i < 32; ++i) {
      sum += x[32 * sg + i];
    }
    expect(out[32 * sg * 12 + 0] == sum, "simd_sum");
    expect(out[32 * sg * 12 + 11] == sum, "shuffle-down ladder");
    expect(out[(32 * sg + 9) * 12 + 6] == x[32 * sg + 7], "simd_broadcast");
  }
}

void errors() {
  static float x[64], y[63];
  static MslLaunch d;
  std::memset(&d, 0, sizeof d);
  bind(d, 0, x, sizeof x, false);
  bind(d, 1, y, sizeof y, true);
  d.tg_arg_bytes[0] = 256;
  dims(d, 1, 64);
  int rc = msl_kernel_launch(kernel("tg_reverse"), &d);
  expect(
      rc != 0 && std::strstr(d.error, "out-of-bounds write of 4 bytes at byte offset 252"),
      std::string("out-of-bounds write not reported: ") + d.error);
  std::memset(&d, 0, sizeof d);
  bind(d, 0, y, sizeof y, true);
  dims(d, 1, 32);
  rc = msl_kernel_launch(kernel("tg_too_big"), &d);
  expect(
      rc != 0 && std::strstr(d.error, "exceeds the 32768-byte limit"),
      std::string("threadgroup limit not reported: ") + d.error);
}

} // namespace

int main() {
  tg_sum();
  collectives();
  errors();
  if (failures == 0) {
    std::printf("ok\n");
  }
  return failures ? 1 : 0;
}
