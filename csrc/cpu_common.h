// What the C++ kernel files share: includes, the multi-versioning macro, the autocast guard, tile constants, the
// split-accumulator reductions and argument checks. Everything here is inline or constexpr, so each translation unit
// may include it.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CC_X86_DISPATCH 1
#include <immintrin.h>
#else
#define CC_X86_DISPATCH 0
#endif

// Hot loops are compiled three times (AVX-512, AVX2+FMA, baseline x86-64) and the best clone is picked at load time
// by the dynamic loader (GCC function multi-versioning), so one build is both fast and portable. Elsewhere the
// attribute is empty and the loops get whatever the compiler flags allow.
#if CC_X86_DISPATCH
#define CC_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CC_MULTIVERSION
#endif

namespace cascade_clip {

// The ops define their own dtypes (inputs' dtype out, float32 accumulation). Under torch.autocast the ATen matmuls
// inside these kernels would otherwise be recast to bf16/fp16 and disagree with the buffers allocated around them.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// Elements handled per task. 2048 floats = 8 KiB per tap: the per-tile accumulators stay in L1 while each tap is
// streamed once. Fixed (never derived from the thread count) so that tiled reductions are deterministic.
constexpr int64_t kTile = 2048;
// Lanes of the split accumulators of dot products: lets the compiler vectorise a reduction without -ffast-math
// (which would make results depend on the compiler's reassociation).
constexpr int64_t kLanes = 16;

// Minimum tiles per parallel chunk: below ~64K elements a thread wake-up costs more than it saves.
constexpr int64_t kTileGrain = std::max<int64_t>(1, 65536 / kTile);

// sum_j a[j] * b[j] over n elements with kLanes split accumulators (fixed order: deterministic).
template <typename A, typename T>
inline A dot_lanes(const A* a, const T* b, int64_t n) {
  A lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[j + l] * static_cast<A>(b[j + l]);
  }
  for (int64_t l = 0; j < n; ++j, ++l) lanes[l] += a[j] * static_cast<A>(b[j]);
  A total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// sum_j x[j]^2 over n elements, split accumulators as in dot_lanes.
template <typename A, typename T>
inline A sumsq_lanes(const T* x, int64_t n) {
  A lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const A v = static_cast<A>(x[j + l]);
      lanes[l] += v * v;
    }
  }
  for (int64_t l = 0; j < n; ++j, ++l) {
    const A v = static_cast<A>(x[j]);
    lanes[l] += v * v;
  }
  A total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// sum_j v[j] over n elements, split accumulators as in dot_lanes.
template <typename A>
inline A sum_lanes(const A* v, int64_t n) {
  A lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += v[j + l];
  }
  for (int64_t l = 0; j < n; ++j, ++l) lanes[l] += v[j];
  A total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

inline at::ScalarType compute_dtype(std::initializer_list<at::Tensor> ts) {
  for (const auto& t : ts) {
    if (t.scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

inline void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "cascade_clip: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "cascade_clip: ", name, " must be floating point, got ",
              t.scalar_type());
}

}  // namespace cascade_clip
