// Standalone driver for the requantize CPU kernel, so tests can build it in other
// configurations than the extension (the portable path, arm64 under qemu) and compare
// the results with the extension's bit for bit.
//
// usage: requant_main BITS G SG SRC_DTYPE OUT_DTYPE ROWS K IN_DIR OUT_DIR
//   IN_DIR/packed.bin (rows*K/2 bytes), IN_DIR/scales.bin (rows*K/SG values)
//   writes OUT_DIR/wq.bin, OUT_DIR/scales.bin, OUT_DIR/biases.bin
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "requantize/requantize_cpu.h"

namespace mx = mlx::core;

static mx::Dtype parse_dtype(const std::string& s) {
  if (s == "float32")
    return mx::float32;
  if (s == "float16")
    return mx::float16;
  if (s == "bfloat16")
    return mx::bfloat16;
  std::fprintf(stderr, "unknown dtype %s\n", s.c_str());
  std::exit(2);
}

static std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "cannot read %s\n", path.c_str());
    std::exit(2);
  }
  return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

static void write_file(const std::string& path, const void* p, std::size_t n) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(p), static_cast<std::streamsize>(n));
}

// usage: requant_main minmax BITS G DTYPE ROWS K DIR: quantize_minmax of DIR/w.bin
// (rows*K values of DTYPE) into DIR/wq.bin, DIR/scales.bin, DIR/biases.bin.
static int minmax_main(char** argv) {
  moequant::cpu::QuantizeArgs a;
  a.bits = std::atoi(argv[2]);
  a.group_size = std::atoi(argv[3]);
  a.w_dtype = parse_dtype(argv[4]);
  a.rows = std::strtoull(argv[5], nullptr, 10);
  a.K = std::atoi(argv[6]);
  std::string dir = argv[7];
  auto w = read_file(dir + "/w.bin");
  std::size_t n_groups = a.rows * (a.K / a.group_size);
  std::size_t size = a.w_dtype == mx::float32 ? 4 : 2;
  std::vector<uint8_t> wq(a.rows * a.K * a.bits / 8);
  std::vector<uint8_t> os(n_groups * size), ob(n_groups * size);
  a.w = w.data();
  a.wq = wq.data();
  a.scales = os.data();
  a.biases = ob.data();
  moequant::cpu::quantize_minmax(a);
  write_file(dir + "/wq.bin", wq.data(), wq.size());
  write_file(dir + "/scales.bin", os.data(), os.size());
  write_file(dir + "/biases.bin", ob.data(), ob.size());
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 8 && std::string(argv[1]) == "minmax") {
    return minmax_main(argv);
  }
  if (argc != 10) {
    std::fprintf(stderr, "usage: %s BITS G SG SRC OUT ROWS K IN_DIR OUT_DIR\n", argv[0]);
    return 2;
  }
  moequant::cpu::RequantizeArgs a;
  a.bits = std::atoi(argv[1]);
  a.group_size = std::atoi(argv[2]);
  a.src_group_size = std::atoi(argv[3]);
  a.src_dtype = parse_dtype(argv[4]);
  a.out_dtype = parse_dtype(argv[5]);
  a.rows = std::strtoull(argv[6], nullptr, 10);
  a.K = std::atoi(argv[7]);
  std::string in = argv[8], out = argv[9];
  auto packed = read_file(in + "/packed.bin");
  auto scales = read_file(in + "/scales.bin");
  std::size_t n_groups = a.rows * (a.K / a.group_size);
  std::size_t out_size = a.out_dtype == mx::float32 ? 4 : 2;
  std::vector<uint8_t> wq(a.rows * a.K * a.bits / 8);
  std::vector<uint8_t> os(n_groups * out_size), ob(n_groups * out_size);
  a.packed = reinterpret_cast<const uint8_t*>(packed.data());
  a.src_scales = scales.data();
  a.wq = wq.data();
  a.scales = os.data();
  a.biases = ob.data();
  moequant::cpu::requantize_int4(a);
  write_file(out + "/wq.bin", wq.data(), wq.size());
  write_file(out + "/scales.bin", os.data(), os.size());
  write_file(out + "/biases.bin", ob.data(), ob.size());
  std::printf("simd=%d\n", moequant::cpu::requantize_simd_available() ? 1 : 0);
  return 0;
}
