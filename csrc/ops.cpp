// CPU kernels of the three Cascade-CLIP head ops, registered as PyTorch operators `torch.ops.cascade_clip.*`
// (with the schemas of the loss's sums, whose kernels are in loss_sums.cpp).
//
// Contract (shapes are the API, see cascade_clip/ops/__init__.py):
//   nga(feats (S,K,B,N,D), weights (S,K))                          -> (S,B,N,D)   in feats' dtype
//   descriptor(text (C,d), g (B,d), weight (S,e,2d), bias (S,e))   -> (S,B,C,e)   in g's dtype
//   mask_logits(q (S,B,C,d), k (S,B,N,d), scale (S,), normalize)   -> ((B,C,N) in q's dtype, rk)
//     rk is (S,B,N) = 1 / max(|k[s,b,n]|, 1e-12) in the compute dtype when normalize, else an empty (0,) tensor;
//     it is an extra output only so that the backward need not read k once more to get the norms.
//   loss_sums(logits (B,C,H,W), labels (B,H,W), ignore_pixels)     -> (B,C,4) float32   (kernels in loss_sums.cpp)
// Every op has a `*_backward` op; autograd, fake (meta) kernels and the Python API live in
// cascade_clip/_cpp_backend.py.
//
// Numerics: everything accumulates in at::opmath_type<T> (float for float/bfloat16/half, double for double) and the
// result is rounded to the output dtype once, like the reference backend. Indices are int64_t throughout. Inputs are
// made contiguous here, so views and stride-0 gradients (the gradient of y.sum()) are accepted.

#include <Python.h>

#include "cpu_common.h"

#ifndef CASCADE_CLIP_TORCH_VERSION
#define CASCADE_CLIP_TORCH_VERSION "unknown"
#endif

namespace cascade_clip {
namespace {
constexpr double kNormEps = 1e-12;  // F.normalize's eps

template <typename A>
inline A inv_norm(A sumsq) {
  return A(1) / std::max(std::sqrt(sumsq), static_cast<A>(kNormEps));
}

// ------------------------------------------------------------------------------------------------------------------
// NGA
// ------------------------------------------------------------------------------------------------------------------

// out[j] = sum_k w[k] * taps[k * tap_stride + j] for j < len: one read of each tap, fp32 (opmath) accumulators in a
// tile-sized buffer (L1) so that each tap's loop is a plain, vectorisable axpy.
// Tiles [begin, end) of the flattened (S, tiles) grid; feats (S, K, M), out (S, M), w (S, K) in opmath.
// KK > 0 is the tap count known at compile time (Cascade-CLIP uses 3): every output vector then accumulates all its
// taps in registers and each tap is one continuous stream, which the hardware prefetchers follow. KK == 0 is the
// general K: accumulate tap by tap into an L1-resident tile buffer.
template <int KK, typename T, typename A>
CC_MULTIVERSION void nga_forward_range(const T* feats, const A* w, T* out, int64_t K, int64_t M, int64_t tiles,
                                       int64_t begin, int64_t end) {
  alignas(64) A acc[KK > 0 ? 1 : kTile];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t s = t / tiles;
    const int64_t m0 = (t % tiles) * kTile;
    const int64_t len = std::min(kTile, M - m0);
    const T* taps = feats + s * K * M + m0;
    const A* ws = w + s * K;
    T* o = out + s * M + m0;
    if constexpr (KK > 0) {
      A wk[KK];
      const T* f[KK];
      for (int k = 0; k < KK; ++k) {
        wk[k] = ws[k];
        f[k] = taps + k * M;
      }
      for (int64_t j = 0; j < len; ++j) {
        A a = wk[0] * static_cast<A>(f[0][j]);
        for (int k = 1; k < KK; ++k) a += wk[k] * static_cast<A>(f[k][j]);
        o[j] = static_cast<T>(a);
      }
    } else {
      const A w0 = ws[0];
      for (int64_t j = 0; j < len; ++j) acc[j] = w0 * static_cast<A>(taps[j]);
      for (int64_t k = 1; k < K; ++k) {
        const T* f = taps + k * M;
        const A wk = ws[k];
        for (int64_t j = 0; j < len; ++j) acc[j] += wk * static_cast<A>(f[j]);
      }
      for (int64_t j = 0; j < len; ++j) o[j] = static_cast<T>(acc[j]);
    }
  }
}

// Backward tiles [begin, end): gf[s,k] = w[s,k] * grad[s] (if gf) and partials[t, k] = <grad[s], feats[s,k]> over
// the tile (if partials). KK as in nga_forward_range: with a compile-time tap count one loop reads each grad vector
// once and serves all taps; the dot products use kLanes split accumulators so they vectorise deterministically.
template <int KK, typename T, typename A>
CC_MULTIVERSION void nga_backward_range(const T* grad, const T* feats, const A* w, T* gf, A* partials, int64_t K,
                                        int64_t M, int64_t tiles, int64_t begin, int64_t end) {
  alignas(64) A gbuf[KK > 0 ? 1 : kTile];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t s = t / tiles;
    const int64_t m0 = (t % tiles) * kTile;
    const int64_t len = std::min(kTile, M - m0);
    const T* g = grad + s * M + m0;
    if constexpr (KK > 0) {
      A wk[KK];
      const T* f[KK];
      T* o[KK];
      alignas(64) A lanes[KK][kLanes] = {};
      for (int k = 0; k < KK; ++k) {
        const int64_t off = (s * K + k) * M + m0;
        wk[k] = w[s * K + k];
        f[k] = feats + off;
        o[k] = gf != nullptr ? gf + off : nullptr;
      }
      // Loads, arithmetic and stores go through local kLanes-wide arrays so the compiler sees no possible aliasing
      // between a store to grad_feats and the next loads, and turns each group into one vector instruction.
      int64_t j = 0;
      for (; j + kLanes <= len; j += kLanes) {
        A gv[kLanes];
        for (int64_t l = 0; l < kLanes; ++l) gv[l] = static_cast<A>(g[j + l]);
        for (int k = 0; k < KK; ++k) {
          if (partials != nullptr) {
            A fv[kLanes];
            for (int64_t l = 0; l < kLanes; ++l) fv[l] = static_cast<A>(f[k][j + l]);
            for (int64_t l = 0; l < kLanes; ++l) lanes[k][l] += gv[l] * fv[l];
          }
          if (gf != nullptr) {
            T ov[kLanes];
            for (int64_t l = 0; l < kLanes; ++l) ov[l] = static_cast<T>(wk[k] * gv[l]);
            for (int64_t l = 0; l < kLanes; ++l) o[k][j + l] = ov[l];
          }
        }
      }
      for (int64_t l = 0; j < len; ++j, ++l) {  // tail (< kLanes elements)
        const A gv = static_cast<A>(g[j]);
        for (int k = 0; k < KK; ++k) {
          if (gf != nullptr) o[k][j] = static_cast<T>(wk[k] * gv);
          lanes[k][l] += gv * static_cast<A>(f[k][j]);
        }
      }
      if (partials != nullptr) {
        for (int k = 0; k < KK; ++k) {
          A total = 0;
          for (int64_t l = 0; l < kLanes; ++l) total += lanes[k][l];
          partials[t * K + k] = total;
        }
      }
    } else {
      for (int64_t j = 0; j < len; ++j) gbuf[j] = static_cast<A>(g[j]);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t off = (s * K + k) * M + m0;
        if (gf != nullptr) {
          T* o = gf + off;
          const A wk = w[s * K + k];
          for (int64_t j = 0; j < len; ++j) o[j] = static_cast<T>(wk * gbuf[j]);
        }
        if (partials != nullptr) partials[t * K + k] = dot_lanes(gbuf, feats + off, len);
      }
    }
  }
}

#if CC_X86_DISPATCH
// The float32 backward on AVX-512 machines, with non-temporal stores for grad_feats: it is the largest tensor of the
// op (K times the output) and is not read again here, so streaming it past the cache avoids reading every destination
// line before overwriting it. Needs M % 16 == 0 and a 64-byte aligned grad_feats (torch's CPU allocator aligns to 64).
// The dot products use 16-lane accumulators, reduced in a fixed order per tile, so the result stays deterministic.
template <int KK>
__attribute__((target("arch=x86-64-v4"))) void nga_backward_range_f32_avx512(const float* grad, const float* feats,
                                                                              const float* w, float* gf,
                                                                              float* partials, int64_t K, int64_t M,
                                                                              int64_t tiles, int64_t begin,
                                                                              int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    const int64_t s = t / tiles;
    const int64_t m0 = (t % tiles) * kTile;
    const int64_t len = std::min(kTile, M - m0);
    const float* g = grad + s * M + m0;
    __m512 wk[KK], lanes[KK];
    const float* f[KK];
    float* o[KK];
    for (int k = 0; k < KK; ++k) {
      const int64_t off = (s * K + k) * M + m0;
      wk[k] = _mm512_set1_ps(w[s * K + k]);
      lanes[k] = _mm512_setzero_ps();
      f[k] = feats + off;
      o[k] = gf != nullptr ? gf + off : nullptr;
    }
    for (int64_t j = 0; j < len; j += 16) {
      const __m512 gv = _mm512_loadu_ps(g + j);
      for (int k = 0; k < KK; ++k) {
        if (partials != nullptr) lanes[k] = _mm512_fmadd_ps(gv, _mm512_loadu_ps(f[k] + j), lanes[k]);
        if (gf != nullptr) _mm512_stream_ps(o[k] + j, _mm512_mul_ps(wk[k], gv));
      }
    }
    if (partials != nullptr) {
      for (int k = 0; k < KK; ++k) {
        alignas(64) float lane_vals[16];
        _mm512_store_ps(lane_vals, lanes[k]);
        float total = 0;
        for (int l = 0; l < 16; ++l) total += lane_vals[l];
        partials[t * K + k] = total;
      }
    }
  }
  _mm_sfence();  // make the streamed stores visible before the parallel region ends
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}
#endif

// Calls fn with the compile-time tap count (1..4) or 0 for any other K.
template <typename Fn>
void dispatch_taps(int64_t K, Fn&& fn) {
  switch (K) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    default: return fn(std::integral_constant<int, 0>{});
  }
}

at::Tensor nga_cpu(const at::Tensor& feats_in, const at::Tensor& weights_in) {
  const NoAutocast no_autocast;
  check_cpu_float(feats_in, "feats");
  check_cpu_float(weights_in, "weights");
  TORCH_CHECK(feats_in.dim() == 5, "nga: feats must be (S, K, B, N, D), got ", feats_in.sizes());
  TORCH_CHECK(weights_in.dim() == 2 && weights_in.size(0) == feats_in.size(0) && weights_in.size(1) == feats_in.size(1),
              "nga: weights must be (S, K), got ", weights_in.sizes(), " for feats ", feats_in.sizes());
  const at::Tensor feats = feats_in.contiguous();
  const int64_t S = feats.size(0), K = feats.size(1);
  const int64_t M = feats.size(2) * feats.size(3) * feats.size(4);  // elements per tap
  at::Tensor out = at::empty({S, feats.size(2), feats.size(3), feats.size(4)}, feats.options());
  if (out.numel() == 0) return out;
  if (K == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, feats.scalar_type(), "cascade_clip::nga", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w = weights_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const scalar_t* fp = feats.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t tiles = (M + kTile - 1) / kTile;
    dispatch_taps(K, [&](auto kk) {
      at::parallel_for(0, S * tiles, kTileGrain, [&](int64_t begin, int64_t end) {
        nga_forward_range<decltype(kk)::value, scalar_t, acc_t>(fp, wp, op, K, M, tiles, begin, end);
      });
    });
  });
  return out;
}

// grad (S,B,N,D) -> grad_feats (S,K,B,N,D) = weights[s,k] * grad[s] and grad_weights (S,K) = <grad[s], feats[s,k]>,
// both in one pass over grad and feats. The weight gradient is reduced per fixed-size tile into a partials buffer and
// the partials are summed in a fixed order, so the result does not depend on the number of threads.
std::tuple<at::Tensor, at::Tensor> nga_backward_cpu(const at::Tensor& grad_in, const at::Tensor& feats_in,
                                                    const at::Tensor& weights_in, std::array<bool, 2> mask) {
  const NoAutocast no_autocast;
  check_cpu_float(grad_in, "grad");
  check_cpu_float(feats_in, "feats");
  check_cpu_float(weights_in, "weights");
  TORCH_CHECK(feats_in.dim() == 5 && weights_in.dim() == 2, "nga_backward: bad ranks");
  const int64_t S = feats_in.size(0), K = feats_in.size(1);
  const int64_t M = feats_in.size(2) * feats_in.size(3) * feats_in.size(4);
  TORCH_CHECK(grad_in.dim() == 4 && grad_in.size(0) == S && grad_in.numel() == S * M, "nga_backward: grad must be ",
              "(S, B, N, D), got ", grad_in.sizes());
  const at::Tensor feats = feats_in.contiguous();
  // The gradient arrives in any dtype autograd chose for it; the kernel reads it in feats' dtype.
  const at::Tensor grad = grad_in.to(feats.scalar_type()).contiguous();
  at::Tensor grad_feats = mask[0] ? at::empty_like(feats) : at::empty({0}, feats.options());
  at::Tensor grad_weights = mask[1] ? at::zeros({S, K}, weights_in.options()) : at::empty({0}, weights_in.options());
  if (S * K * M == 0 || (!mask[0] && !mask[1])) return {grad_feats, grad_weights};
  const int64_t tiles = (M + kTile - 1) / kTile;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, feats.scalar_type(), "cascade_clip::nga_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w = weights_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const scalar_t* fp = feats.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* gfp = mask[0] ? grad_feats.mutable_data_ptr<scalar_t>() : nullptr;
    std::vector<acc_t> partials(mask[1] ? S * tiles * K : 0);  // (S, tiles, K)
    acc_t* pp = partials.data();
    dispatch_taps(K, [&](auto kk) {
      constexpr int KK = decltype(kk)::value;
#if CC_X86_DISPATCH
      if constexpr (std::is_same_v<scalar_t, float> && KK > 0) {
        if (cpu_has_avx512() && M % 16 == 0 && reinterpret_cast<uintptr_t>(gfp) % 64 == 0) {
          at::parallel_for(0, S * tiles, kTileGrain, [&](int64_t begin, int64_t end) {
            nga_backward_range_f32_avx512<KK>(gp, fp, wp, gfp, mask[1] ? pp : nullptr, K, M, tiles, begin, end);
          });
          return;
        }
      }
#endif
      at::parallel_for(0, S * tiles, kTileGrain, [&](int64_t begin, int64_t end) {
        nga_backward_range<KK, scalar_t, acc_t>(gp, fp, wp, gfp, mask[1] ? pp : nullptr, K, M, tiles, begin, end);
      });
    });
    if (mask[1]) {
      // Deterministic final reduction over tiles, in double: S*K sums of `tiles` partials (tiny).
      at::Tensor gw = at::empty({S, K}, at::kDouble);
      double* gwp = gw.mutable_data_ptr<double>();
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t k = 0; k < K; ++k) {
          double total = 0;
          for (int64_t i = 0; i < tiles; ++i) total += static_cast<double>(pp[(s * tiles + i) * K + k]);
          gwp[s * K + k] = total;
        }
      }
      grad_weights.copy_(gw);
    }
  });
  return {grad_feats, grad_weights};
}

// ------------------------------------------------------------------------------------------------------------------
// Descriptor
// ------------------------------------------------------------------------------------------------------------------
//
// out[s,b] = concat(text * g[b], text) @ W[s]^T + bias[s] = (text * g[b]) @ W1[s]^T + (text @ W2[s]^T + bias[s]),
// with W1 = W[..., :d], W2 = W[..., d:]. The (B, C, 2d) concatenation is never built. Two forward paths:
// * small C (padded text <= 48 KiB, e.g. VOC's C=15), float compute: one fused pass, descriptor_forward_rows below.
// * otherwise (and for float64): all stages share the left operand, so they become the columns of one GEMM: W viewed
//   as (S*e, 2d) and narrowed to W1/W2 is a strided matrix BLAS reads in place (ld = 2d); the text half does not
//   depend on b and is computed once (C rows instead of B*C).
// The backward has the same two paths (descriptor_backward_rows, or four GEMMs in descriptor_backward_cpu).

struct DescriptorInputs {
  at::Tensor text, g, w, w1, w2, bias;  // compute dtype; w (S*e, 2d), w1/w2 (S*e, d) strided views of w
  int64_t C, d, B, S, e;
};

DescriptorInputs prepare_descriptor(const at::Tensor& text, const at::Tensor& g, const at::Tensor& weight,
                                    const at::Tensor& bias) {
  check_cpu_float(text, "text");
  check_cpu_float(g, "g");
  check_cpu_float(weight, "weight");
  check_cpu_float(bias, "bias");
  TORCH_CHECK(text.dim() == 2 && g.dim() == 2 && g.size(1) == text.size(1), "descriptor: text (C, d) and g (B, d) ",
              "expected, got ", text.sizes(), " and ", g.sizes());
  const int64_t d = text.size(1);
  TORCH_CHECK(weight.dim() == 3 && weight.size(2) == 2 * d, "descriptor: weight must be (S, e, 2d), got ",
              weight.sizes());
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == weight.size(0) && bias.size(1) == weight.size(1),
              "descriptor: bias must be (S, e), got ", bias.sizes());
  const at::ScalarType ct = compute_dtype({text, g, weight, bias});
  DescriptorInputs in;
  in.C = text.size(0);
  in.d = d;
  in.B = g.size(0);
  in.S = weight.size(0);
  in.e = weight.size(1);
  in.text = text.to(ct).contiguous();
  in.g = g.to(ct).contiguous();
  in.w = weight.to(ct).contiguous().view({in.S * in.e, 2 * d});
  in.w1 = in.w.narrow(1, 0, d);
  in.w2 = in.w.narrow(1, d, d);
  in.bias = bias.to(ct).contiguous().view({1, in.S * in.e});
  return in;
}

// A (B*C, d) = text[c] * g[b], the only per-image operand (small: B*C*d).
at::Tensor descriptor_relation(const DescriptorInputs& in) {
  return (in.text.unsqueeze(0) * in.g.unsqueeze(1)).view({in.B * in.C, in.d});
}

// The float32 forward as one fused pass, used instead of the two GEMMs below: with V[s,b] = W1[s] * g[b] + W2[s]
// (each weight row scaled by g[b], plus its text half), out[s,b] = text @ V[s,b]^T + bias[s]. That is B*C*S*e*d
// multiply-adds instead of (B+1)*C*S*e*d, and each V row is built in L1 right before use and never stored. Rows r of
// W (r = s*e + j) are the parallel unit; for each row and image the C dot products text[c] . V[r,b] run in blocks of
// kDescCB classes held in 16-lane vector accumulators, over text padded with zeros to (Cp, dp) so no loop has a tail.
// GCC vector extensions lower to AVX-512, AVX2 or SSE in the respective clone.
constexpr int kDescCB = 8;
constexpr int64_t kDescFusedTextBytes = 48 * 1024;
typedef float vf16 __attribute__((vector_size(64)));

template <typename O>
CC_MULTIVERSION void descriptor_forward_rows(const float* text_pad, const float* g, const float* w, const float* bias,
                                             O* out, int64_t B, int64_t C, int64_t Cp, int64_t d, int64_t dp,
                                             int64_t e, int64_t r0, int64_t r1) {
  std::vector<float> vbuf(dp + 16, 0.0f);
  float* v = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(vbuf.data()) + 63) & ~uintptr_t(63));
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t s = r / e, j = r % e;
    const float* w1 = w + r * 2 * d;
    const float* w2 = w1 + d;
    const float bj = bias[r];
    for (int64_t b = 0; b < B; ++b) {
      const float* gb = g + b * d;
      for (int64_t i = 0; i < d; ++i) v[i] = gb[i] * w1[i] + w2[i];  // v[d:dp] stays 0
      for (int64_t c0 = 0; c0 < Cp; c0 += kDescCB) {
        vf16 acc[kDescCB];
        for (int k = 0; k < kDescCB; ++k) acc[k] = vf16{};
        for (int64_t i = 0; i < dp; i += 16) {
          vf16 vv;
          std::memcpy(&vv, v + i, sizeof(vv));
          for (int k = 0; k < kDescCB; ++k) {
            vf16 t;
            std::memcpy(&t, text_pad + (c0 + k) * dp + i, sizeof(t));
            acc[k] += t * vv;
          }
        }
        for (int k = 0; k < kDescCB && c0 + k < C; ++k) {
          float total = bj;
          for (int l = 0; l < 16; ++l) total += acc[k][l];
          out[((s * B + b) * C + c0 + k) * e + j] = static_cast<O>(total);
        }
      }
    }
  }
}

at::Tensor descriptor_cpu(const at::Tensor& text, const at::Tensor& g, const at::Tensor& weight,
                          const at::Tensor& bias) {
  const NoAutocast no_autocast;
  const DescriptorInputs in = prepare_descriptor(text, g, weight, bias);
  const int64_t B = in.B, C = in.C, S = in.S, e = in.e, Se = S * e, d = in.d;
  at::Tensor out = at::empty({S, B, C, e}, g.options());
  if (out.numel() == 0) return out;
  const int64_t Cp = (C + kDescCB - 1) / kDescCB * kDescCB, dp = (d + 15) / 16 * 16;
  // The fused pass re-reads the padded text for every (row, image); it wins while text stays in L1 (measured on a
  // 48 KiB-L1d EPYC: 2x faster at C=15, d=512, slower from C=32), beyond that the two BLAS GEMMs below are faster.
  if (in.w.scalar_type() == at::kFloat && d > 0 && Cp * dp * static_cast<int64_t>(sizeof(float)) <= kDescFusedTextBytes) {
    at::Tensor text_pad = at::zeros({Cp, dp}, in.text.options());
    text_pad.narrow(0, 0, C).narrow(1, 0, d).copy_(in.text);
    const at::Tensor bias_flat = in.bias.view({Se});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "cascade_clip::descriptor", [&] {
      const float* tp = text_pad.const_data_ptr<float>();
      const float* gp = in.g.const_data_ptr<float>();
      const float* wp = in.w.const_data_ptr<float>();
      const float* bp = bias_flat.const_data_ptr<float>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, Se, 8, [&](int64_t r0, int64_t r1) {
        descriptor_forward_rows<scalar_t>(tp, gp, wp, bp, op, B, C, Cp, d, dp, e, r0, r1);
      });
    });
    return out;
  }
  const at::Tensor P = at::mm(descriptor_relation(in), in.w1.t());  // (B*C, S*e), image-dependent half
  const at::Tensor T = at::addmm(in.bias, in.text, in.w2.t());      // (C, S*e), shared half + bias
  // Scatter-add the two GEMM results into (S, B, C, e): out[s,b,c,:] = P[b*C+c, s*e:] + T[c, s*e:].
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "cascade_clip::descriptor", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "cascade_clip::descriptor_acc", [&] {
      using acc_t = scalar_t;
      const acc_t* pp = P.const_data_ptr<acc_t>();
      const acc_t* tp = T.const_data_ptr<acc_t>();
      out_t* op = out.mutable_data_ptr<out_t>();
      at::parallel_for(0, S * B * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(e, 1)), [&](int64_t b0, int64_t b1) {
        for (int64_t r = b0; r < b1; ++r) {  // r = (s*B + b)*C + c
          const int64_t c = r % C, b = (r / C) % B, s = r / (B * C);
          const acc_t* prow = pp + (b * C + c) * Se + s * e;
          const acc_t* trow = tp + c * Se + s * e;
          out_t* orow = op + r * e;
          for (int64_t j = 0; j < e; ++j) orow[j] = static_cast<out_t>(prow[j] + trow[j]);
        }
      });
    });
  });
  return out;
}

// grad (S,B,C,e) -> (grad_text (C,d), grad_g (B,d), grad_weight (S,e,2d), grad_bias (S,e)); unrequested ones are
// returned as empty (0,) tensors. With Gp (B*C, S*e) the gradient laid out like P and Gt = sum_b Gp[b] (C, S*e):
//   gA = Gp @ W1                      (B*C, d), the gradient of A = text * g[b]
//   grad_g[b] = sum_c gA[b,c] * text[c];   grad_text = sum_b gA[b] * g[b] + Gt @ W2
//   grad_W1 = Gp^T @ A;  grad_W2 = Gt^T @ text;  grad_bias = sum_c Gt[c]
// The float32 backward as one fused pass over the weight rows (the small-C counterpart of descriptor_forward_rows).
// For a weight row r = s*e + j and image b, with G[r,b,c] = grad[s,b,c,j]:
//   u[b] = sum_c G[r,b,c] text[c]          -> grad_W1[r] = sum_b g[b] * u[b],  grad_W2[r] = sum_b u[b]
//                                             grad_g[b] += W1[r] * u[b]
//   grad_text[c] += sum_b G[r,b,c] (g[b] * W1[r] + W2[r])
//   grad_bias[r] = sum_{b,c} G[r,b,c]
// i.e. 2*B*C*S*e*d multiply-adds where the GEMM formulation needs 3*B*C*S*e*d, with every operand of a row in L1.
// Weight rows are owned by one task each; grad_text and grad_g are sums over rows, so each chunk of kDescRowChunk
// rows accumulates its own partial, and the partials are added in chunk order afterwards: deterministic for any
// number of threads.
constexpr int64_t kDescRowChunk = 64;
// The fused paths' text bound (kDescFusedTextBytes of padded float rows, each >= 16 wide) caps C at this.
constexpr int64_t kDescMaxC = kDescFusedTextBytes / (16 * sizeof(float));

// One weight row r and the images [b0, b0 + NB): the d axis in 16-float vectors, with v[b] = g[b] * W1[r] + W2[r] and
// u[b] held in vector registers across the whole class loop; only the grad_text partial row goes through L1.
template <int NB>
CC_MULTIVERSION void descriptor_backward_block(const float* Grow, const float* text, const float* g, const float* w1,
                                               const float* w2, float* gw1, float* gw2, float* text_part,
                                               float* g_part, int64_t b0, int64_t C, int64_t d) {
  auto load = [](const float* p) {
    vf16 x;
    std::memcpy(&x, p, sizeof(x));
    return x;
  };
  auto store = [](float* p, const vf16& x) { std::memcpy(p, &x, sizeof(x)); };
  float coef[NB][kDescMaxC];
  for (int nb = 0; nb < NB; ++nb)
    for (int64_t c = 0; c < C; ++c) coef[nb][c] = Grow[(b0 + nb) * C + c];
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    const vf16 W1 = load(w1 + i), W2 = load(w2 + i);
    vf16 V[NB], U[NB];
    for (int nb = 0; nb < NB; ++nb) {
      V[nb] = load(g + (b0 + nb) * d + i) * W1 + W2;
      U[nb] = vf16{};
    }
    for (int64_t c = 0; c < C; ++c) {
      const vf16 T = load(text + c * d + i);
      vf16 tp = load(text_part + c * d + i);
      for (int nb = 0; nb < NB; ++nb) {
        U[nb] += coef[nb][c] * T;
        tp += coef[nb][c] * V[nb];
      }
      store(text_part + c * d + i, tp);
    }
    vf16 a1 = load(gw1 + i), a2 = load(gw2 + i);
    for (int nb = 0; nb < NB; ++nb) {
      a1 += load(g + (b0 + nb) * d + i) * U[nb];
      a2 += U[nb];
      store(g_part + (b0 + nb) * d + i, load(g_part + (b0 + nb) * d + i) + W1 * U[nb]);
    }
    store(gw1 + i, a1);
    store(gw2 + i, a2);
  }
  for (; i < d; ++i) {  // tail (< 16 elements), same arithmetic in scalars
    float V[NB], U[NB] = {};
    for (int nb = 0; nb < NB; ++nb) V[nb] = g[(b0 + nb) * d + i] * w1[i] + w2[i];
    for (int64_t c = 0; c < C; ++c) {
      float tp = text_part[c * d + i];
      for (int nb = 0; nb < NB; ++nb) {
        U[nb] += coef[nb][c] * text[c * d + i];
        tp += coef[nb][c] * V[nb];
      }
      text_part[c * d + i] = tp;
    }
    for (int nb = 0; nb < NB; ++nb) {
      gw1[i] += g[(b0 + nb) * d + i] * U[nb];
      gw2[i] += U[nb];
      g_part[(b0 + nb) * d + i] += w1[i] * U[nb];
    }
  }
}

void descriptor_backward_rows(const float* Gr, const float* text, const float* g, const float* w, float* gw,
                              float* gbias, float* text_part, float* g_part, int64_t B, int64_t C, int64_t d,
                              int64_t Se, int64_t chunk) {
  const int64_t r_end = std::min(Se, (chunk + 1) * kDescRowChunk);
  for (int64_t r = chunk * kDescRowChunk; r < r_end; ++r) {
    const float* w1 = w + r * 2 * d;
    const float* Grow = Gr + r * B * C;  // (B, C)
    float* gw1 = gw + r * 2 * d;
    std::fill(gw1, gw1 + 2 * d, 0.0f);
    float bsum = 0.0f;
    for (int64_t k = 0; k < B * C; ++k) bsum += Grow[k];
    gbias[r] = bsum;
    for (int64_t b0 = 0; b0 < B; b0 += 4) {  // images in register blocks of up to 4
      const int64_t nb = std::min<int64_t>(4, B - b0);
      auto run = [&](auto n) {
        descriptor_backward_block<decltype(n)::value>(Grow, text, g, w1, w1 + d, gw1, gw1 + d, text_part, g_part, b0,
                                                      C, d);
      };
      switch (nb) {
        case 1: run(std::integral_constant<int, 1>{}); break;
        case 2: run(std::integral_constant<int, 2>{}); break;
        case 3: run(std::integral_constant<int, 3>{}); break;
        default: run(std::integral_constant<int, 4>{}); break;
      }
    }
  }
}

// out[i] = sum_k parts[k * n + i] for k < K (fixed order), i in [begin, end).
CC_MULTIVERSION void sum_parts(const float* parts, float* out, int64_t K, int64_t n, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) out[i] = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    const float* p = parts + k * n;
    for (int64_t i = begin; i < end; ++i) out[i] += p[i];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> descriptor_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& text, const at::Tensor& g, const at::Tensor& weight,
    const at::Tensor& bias, std::array<bool, 4> mask) {
  const NoAutocast no_autocast;
  const DescriptorInputs in = prepare_descriptor(text, g, weight, bias);
  const int64_t B = in.B, C = in.C, S = in.S, e = in.e, d = in.d, Se = S * e;
  check_cpu_float(grad_in, "grad");
  TORCH_CHECK(grad_in.dim() == 4 && grad_in.size(0) == S && grad_in.size(1) == B && grad_in.size(2) == C &&
                  grad_in.size(3) == e,
              "descriptor_backward: grad must be (S, B, C, e), got ", grad_in.sizes());
  const at::ScalarType ct = in.w.scalar_type();
  auto empty_like_ = [](const at::Tensor& t) { return at::empty({0}, t.options()); };
  const int64_t Cp = (C + kDescCB - 1) / kDescCB * kDescCB, dp = (d + 15) / 16 * 16;
  if (ct == at::kFloat && Se > 0 && d > 0 && Cp * dp * static_cast<int64_t>(sizeof(float)) <= kDescFusedTextBytes) {
    TORCH_INTERNAL_ASSERT(C <= kDescMaxC);
    // One copy converts the (small) gradient and lays it out per weight row: (S, e, B, C) = (S*e, B, C).
    const at::Tensor Gr = grad_in.to(ct).permute({0, 3, 1, 2}).contiguous();
    const int64_t chunks = (Se + kDescRowChunk - 1) / kDescRowChunk;
    at::Tensor gw = at::empty({Se, 2 * d}, in.w.options());
    at::Tensor gbias = at::empty({Se}, in.w.options());
    at::Tensor text_parts = at::zeros({chunks, C, d}, in.w.options());
    at::Tensor g_parts = at::zeros({chunks, B, d}, in.w.options());
    const float* grp = Gr.const_data_ptr<float>();
    const float* tp = in.text.const_data_ptr<float>();
    const float* gp = in.g.const_data_ptr<float>();
    const float* wp = in.w.const_data_ptr<float>();
    float* gwp = gw.mutable_data_ptr<float>();
    float* gbp = gbias.mutable_data_ptr<float>();
    float* tpp = text_parts.mutable_data_ptr<float>();
    float* gpp = g_parts.mutable_data_ptr<float>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t chunk = c0; chunk < c1; ++chunk) {
        descriptor_backward_rows(grp, tp, gp, wp, gwp, gbp, tpp + chunk * C * d, gpp + chunk * B * d, B, C, d, Se,
                                 chunk);
      }
    });
    at::Tensor gt = at::empty({C, d}, in.w.options()), gg = at::empty({B, d}, in.w.options());
    at::parallel_for(0, C * d, 4096, [&](int64_t i0, int64_t i1) {
      sum_parts(tpp, gt.mutable_data_ptr<float>(), chunks, C * d, i0, i1);
    });
    sum_parts(gpp, gg.mutable_data_ptr<float>(), chunks, B * d, 0, B * d);
    return {mask[0] ? gt.to(text.scalar_type()) : empty_like_(text), mask[1] ? gg.to(g.scalar_type()) : empty_like_(g),
            mask[2] ? gw.view({S, e, 2 * d}).to(weight.scalar_type()) : empty_like_(weight),
            mask[3] ? gbias.view({S, e}).to(bias.scalar_type()) : empty_like_(bias)};
  }
  // One copy both converts to the compute dtype and lays the (small) gradient out as (B*C, S*e).
  const at::Tensor Gp = grad_in.to(ct).permute({1, 2, 0, 3}).contiguous().view({B * C, Se});
  const at::Tensor Gt = Gp.view({B, C, Se}).sum(0);  // (C, S*e)
  at::Tensor grad_text = empty_like_(text), grad_g = empty_like_(g), grad_weight = empty_like_(weight),
             grad_bias = empty_like_(bias);
  if (mask[0] || mask[1]) {
    const at::Tensor gA = at::mm(Gp, in.w1).view({B, C, d});
    if (mask[1]) grad_g = (gA * in.text.unsqueeze(0)).sum(1).to(g.scalar_type());
    if (mask[0]) {
      at::Tensor gt = at::mm(Gt, in.w2);
      gt.add_((gA * in.g.unsqueeze(1)).sum(0));
      grad_text = gt.to(text.scalar_type());
    }
  }
  if (mask[2]) {
    at::Tensor gw = at::empty({Se, 2 * d}, in.w.options());
    at::Tensor gw1 = gw.narrow(1, 0, d), gw2 = gw.narrow(1, d, d);
    at::mm_out(gw1, Gp.t(), descriptor_relation(in));
    at::mm_out(gw2, Gt.t(), in.text);
    grad_weight = gw.view({S, e, 2 * d}).to(weight.scalar_type());
  }
  if (mask[3]) grad_bias = Gt.sum(0).view({S, e}).to(bias.scalar_type());
  return {grad_text, grad_g, grad_weight, grad_bias};
}

// ------------------------------------------------------------------------------------------------------------------
// Mask logits
// ------------------------------------------------------------------------------------------------------------------
//
// out[b] = sum_s scale[s] * q_hat[s,b] @ k_hat[s,b]^T. Normalising k would mean writing a normalised copy of the
// largest operand (S*B*N*d), so k is used raw and its normalisation is applied to the small (C, N) results:
//   L[s,b] = (scale[s] * q_hat[s,b]) @ k[s,b]^T   one batched GEMM over S*B, k read in place (no copy for fp32)
//   out[b,c,n] = sum_s L[s,b,c,n] * rk[s,b,n]     rk = 1/max(|k[s,b,n]|, eps), or 1 without normalize
// The stage sum is a cheap pass over S*B*C*N values; a single GEMM over the concatenated S*d axis would first need a
// (B, N, S*d) copy of k, which costs more memory traffic than the GEMM saves.

template <typename T, typename A>
CC_MULTIVERSION void row_inv_norms_range(const T* x, A* rk, int64_t d, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) rk[r] = inv_norm(sumsq_lanes<A>(x + r * d, d));
}

template <typename T, typename O, typename A>
CC_MULTIVERSION void normalize_backward_range(const A* gh, const T* x, O* out, int64_t d, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const A* grow = gh + r * d;
    const T* xrow = x + r * d;
    O* orow = out + r * d;
    const A norm = std::sqrt(sumsq_lanes<A>(xrow, d));
    // a NaN norm takes this branch too: the row's gradient is NaN, as F.normalize's (not grad / eps)
    if (!(norm <= static_cast<A>(kNormEps))) {
      const A inv = A(1) / norm;
      const A coef = dot_lanes(grow, xrow, d) * inv * inv * inv;
      for (int64_t j = 0; j < d; ++j) orow[j] = static_cast<O>(inv * grow[j] - coef * static_cast<A>(xrow[j]));
    } else {
      const A inv = A(1) / static_cast<A>(kNormEps);
      for (int64_t j = 0; j < d; ++j) orow[j] = static_cast<O>(inv * grow[j]);
    }
  }
}

// rk[r] = 1/max(|x[r,:]|, eps) for the R rows of a contiguous (..., d) tensor, in the compute dtype. R counts every
// dimension but the last, so that d = 0 still gives one value (1/eps, an empty row's norm clamped) per row.
at::Tensor row_inv_norms(const at::Tensor& x, int64_t d, at::ScalarType ct) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == d, "row_inv_norms: rows of width ", d, " expected, got ", x.sizes());
  const int64_t R = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor rk = at::empty({R}, x.options().dtype(ct));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cascade_clip::row_inv_norms", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(ct, "cascade_clip::row_inv_norms_acc", [&] {
      using acc_t = scalar_t;
      const in_t* xp = x.const_data_ptr<in_t>();
      acc_t* rp = rk.mutable_data_ptr<acc_t>();
      at::parallel_for(0, R, std::max<int64_t>(1, 65536 / std::max<int64_t>(d, 1)), [&](int64_t b0, int64_t b1) {
        row_inv_norms_range<in_t, acc_t>(xp, rp, d, b0, b1);
      });
    });
  });
  return rk;
}

// The gradient of x_hat = x / max(|x|, eps) row by row: given gh = dL/dx_hat (R, d, compute dtype) and x (R, d),
// out = r * gh - r^3 <gh, x> x with r = 1/|x| when |x| > eps, else out = gh / eps (the clamp has no gradient).
// Written for a row at a time so the row (d values) stays in L1 between the dot product and the update.
void normalize_backward_rows(const at::Tensor& gh, const at::Tensor& x, at::Tensor& out, int64_t d) {
  const int64_t R = d == 0 ? 0 : x.numel() / d;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cascade_clip::normalize_bwd", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "cascade_clip::normalize_bwd_out", [&] {
      using out_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(gh.scalar_type(), "cascade_clip::normalize_bwd_acc", [&] {
        using acc_t = scalar_t;
        const acc_t* gp = gh.const_data_ptr<acc_t>();
        const in_t* xp = x.const_data_ptr<in_t>();
        out_t* op = out.mutable_data_ptr<out_t>();
        at::parallel_for(0, R, std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1)), [&](int64_t b0, int64_t b1) {
          normalize_backward_range<in_t, out_t, acc_t>(gp, xp, op, d, b0, b1);
        });
      });
    });
  });
}

struct MaskInputs {
  at::Tensor q, k, kc, scale;  // q (S,B,C,d) and scale (S,) in compute dtype; kc = contiguous k (its own dtype); k = kc
                               // in compute dtype (same tensor when the dtypes agree)
  int64_t S, B, C, N, d;
  at::ScalarType ct;
};

MaskInputs prepare_mask(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale) {
  check_cpu_float(q, "q");
  check_cpu_float(k, "k");
  check_cpu_float(scale, "scale");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) && q.size(1) == k.size(1) &&
                  q.size(3) == k.size(3),
              "mask_logits: q (S, B, C, d) and k (S, B, N, d) expected, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == q.size(0), "mask_logits: scale must be (S,), got ", scale.sizes());
  MaskInputs in;
  in.ct = compute_dtype({q, k});
  in.S = q.size(0);
  in.B = q.size(1);
  in.C = q.size(2);
  in.N = k.size(2);
  in.d = q.size(3);
  in.q = q.to(in.ct).contiguous();
  in.kc = k.contiguous();
  in.k = in.kc.to(in.ct);
  in.scale = scale.to(in.ct).contiguous();
  return in;
}

// q_hat (S,B,C,d): q normalised along d (or q itself).
at::Tensor q_hat(const MaskInputs& in, bool normalize) {
  if (!normalize) return in.q;
  return in.q * row_inv_norms(in.q, in.d, in.ct).view({in.S, in.B, in.C, 1});
}

std::tuple<at::Tensor, at::Tensor> mask_logits_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                                                   bool normalize) {
  const NoAutocast no_autocast;
  const MaskInputs in = prepare_mask(q, k, scale);
  const int64_t S = in.S, B = in.B, C = in.C, N = in.N, d = in.d;
  at::Tensor rk = normalize ? row_inv_norms(in.kc, d, in.ct).view({S, B, N}) : at::empty({0}, q.options().dtype(in.ct));
  at::Tensor out = at::empty({B, C, N}, q.options());
  if (out.numel() == 0) return {out, rk};
  if (S == 0 || d == 0) return {out.zero_(), rk};
  const at::Tensor qs = q_hat(in, normalize) * in.scale.view({S, 1, 1, 1});
  const at::Tensor L = at::bmm(qs.view({S * B, C, d}), in.k.view({S * B, N, d}).transpose(1, 2));  // (S*B, C, N)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "cascade_clip::mask_logits", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(in.ct, "cascade_clip::mask_logits_acc", [&] {
      using acc_t = scalar_t;
      const acc_t* lp = L.const_data_ptr<acc_t>();
      const acc_t* rp = normalize ? rk.const_data_ptr<acc_t>() : nullptr;
      out_t* op = out.mutable_data_ptr<out_t>();
      const int64_t CN = C * N;
      at::parallel_for(0, B * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t r0, int64_t r1) {
        std::vector<acc_t> acc(N);
        for (int64_t r = r0; r < r1; ++r) {  // r = b*C + c
          const int64_t b = r / C, c = r % C;
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t s = 0; s < S; ++s) {
            const acc_t* lrow = lp + (s * B + b) * CN + c * N;
            if (rp) {
              const acc_t* rrow = rp + (s * B + b) * N;
              for (int64_t n = 0; n < N; ++n) acc[n] += lrow[n] * rrow[n];
            } else {
              for (int64_t n = 0; n < N; ++n) acc[n] += lrow[n];
            }
          }
          out_t* orow = op + r * N;
          for (int64_t n = 0; n < N; ++n) orow[n] = static_cast<out_t>(acc[n]);
        }
      });
    });
  });
  return {out, rk};
}

// grad (B,C,N) -> (grad_q (S,B,C,d), grad_k (S,B,N,d), grad_scale (S,)); unrequested ones are empty (0,) tensors.
// With Gs[s,b] = grad[b] * rk[s,b] (columns scaled; rk = 1 without normalize):
//   H[s,b]  = Gs[s,b] @ k[s,b]               (C, d) = dL/d(scale*q_hat) -> grad_scale[s] = sum <H, q_hat>,
//                                                      dL/dq_hat = scale[s] * H, then through the normalisation
//   Gk[s,b] = grad[b]^T @ (scale * q_hat)    (N, d) = dL/dk_hat, then through the normalisation (row pass)
std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_logits_backward_cpu(const at::Tensor& grad_in, const at::Tensor& q,
                                                                        const at::Tensor& k, const at::Tensor& scale,
                                                                        const at::Tensor& rk_in, bool normalize,
                                                                        std::array<bool, 3> mask) {
  const NoAutocast no_autocast;
  const MaskInputs in = prepare_mask(q, k, scale);
  const int64_t S = in.S, B = in.B, C = in.C, N = in.N, d = in.d;
  check_cpu_float(grad_in, "grad");
  TORCH_CHECK(grad_in.dim() == 3 && grad_in.size(0) == B && grad_in.size(1) == C && grad_in.size(2) == N,
              "mask_logits_backward: grad must be (B, C, N), got ", grad_in.sizes());
  at::Tensor rk;
  if (normalize) {
    rk = rk_in.numel() == S * B * N ? rk_in.to(in.ct).contiguous().view({S, B, N})
                                    : row_inv_norms(in.kc, d, in.ct).view({S, B, N});
  }
  const at::Tensor G = grad_in.to(in.ct).contiguous();  // (B, C, N)
  at::Tensor grad_q = at::empty({0}, q.options()), grad_k = at::empty({0}, k.options()),
             grad_scale = at::empty({0}, scale.options());
  if (!(mask[0] || mask[1] || mask[2])) return {grad_q, grad_k, grad_scale};
  const at::Tensor qh = q_hat(in, normalize);
  if (mask[0] || mask[2]) {
    at::Tensor H = at::empty({S, B, C, d}, in.q.options());
    for (int64_t s = 0; s < S; ++s) {
      const at::Tensor Gs = normalize ? G * rk[s].unsqueeze(1) : G;  // (B, C, N)
      at::Tensor Hs = H[s];  // contiguous (B, C, d) slice: the GEMM writes in place
      at::bmm_out(Hs, Gs, in.k[s]);
    }
    if (mask[2]) grad_scale = (H * qh).sum({1, 2, 3}).to(scale.scalar_type());
    if (mask[0]) {
      const at::Tensor gqh = H.mul_(in.scale.view({S, 1, 1, 1}));
      if (normalize) {
        grad_q = at::empty({S, B, C, d}, q.options());
        normalize_backward_rows(gqh, in.q, grad_q, d);
      } else {
        grad_q = gqh.to(q.scalar_type());
      }
    }
  }
  if (mask[1]) {
    const at::Tensor qs = qh * in.scale.view({S, 1, 1, 1});
    const at::Tensor Gt = G.transpose(1, 2);  // (B, N, C), a view: BLAS reads it transposed
    at::Tensor Gk = at::empty({S, B, N, d}, in.q.options());
    for (int64_t s = 0; s < S; ++s) {
      at::Tensor Gks = Gk[s];  // contiguous (B, N, d) slice: the GEMM writes in place
      at::bmm_out(Gks, Gt, qs[s]);
    }
    if (normalize) {
      // In place when k already has the compute dtype: each row is read completely before it is written.
      grad_k = k.scalar_type() == in.ct ? Gk : at::empty({S, B, N, d}, k.options());
      normalize_backward_rows(Gk, in.kc, grad_k, d);
    } else {
      grad_k = Gk.to(k.scalar_type());
    }
  }
  return {grad_q, grad_k, grad_scale};
}

}  // namespace

TORCH_LIBRARY(cascade_clip, m) {
  m.def("nga(Tensor feats, Tensor weights) -> Tensor");
  m.def("nga_backward(Tensor grad, Tensor feats, Tensor weights, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def("descriptor(Tensor text, Tensor g, Tensor weight, Tensor bias) -> Tensor");
  m.def(
      "descriptor_backward(Tensor grad, Tensor text, Tensor g, Tensor weight, Tensor bias, bool[4] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def("mask_logits(Tensor q, Tensor k, Tensor scale, bool normalize) -> (Tensor, Tensor)");
  m.def(
      "mask_logits_backward(Tensor grad, Tensor q, Tensor k, Tensor scale, Tensor rk, bool normalize, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // CPU kernels in loss_sums.cpp
  m.def("loss_sums(Tensor logits, Tensor labels, bool ignore_pixels) -> Tensor");
  m.def("loss_sums_backward(Tensor grad, Tensor logits, Tensor labels, bool ignore_pixels) -> Tensor");
}

TORCH_LIBRARY_IMPL(cascade_clip, CPU, m) {
  m.impl("nga", &nga_cpu);
  m.impl("nga_backward", &nga_backward_cpu);
  m.impl("descriptor", &descriptor_cpu);
  m.impl("descriptor_backward", &descriptor_backward_cpu);
  m.impl("mask_logits", &mask_logits_cpu);
  m.impl("mask_logits_backward", &mask_logits_backward_cpu);
}

}  // namespace cascade_clip

// Found by cascade_clip/_cpp_backend.py in the file itself when a build for another torch cannot even be loaded.
extern "C" __attribute__((used, visibility("default"))) const char cascade_clip_build_info[] =
    "CASCADE_CLIP_BUILT_FOR_TORCH=" CASCADE_CLIP_TORCH_VERSION;

// `import cascade_clip._C` loads this library (running the registrations above) through a minimal Python module,
// as in pytorch/extension-cpp; no pybind11 is needed. TORCH_VERSION lets Python report a build for another torch.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "Registers the torch.ops.cascade_clip operators (CPU kernels).", -1, nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddStringConstant(module, "TORCH_VERSION", CASCADE_CLIP_TORCH_VERSION) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
