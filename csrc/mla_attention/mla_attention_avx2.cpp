// The mla_decode_attention chunk kernel compiled with AVX2 + FMA (see CMakeLists.txt).
#define MLA_NS mla_avx2
#include "mla_attention/mla_attention_kernel.h"
