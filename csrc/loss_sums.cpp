// CPU kernels of `loss_sums`: per (image, class) pixel sums of the official focal + dice loss, forward and backward.
//
// Contract (cascade_clip/ops/__init__.py; the schemas are defined beside the other ops in ops.cpp):
//   loss_sums(logits (B,C,H,W), labels (B,H,W) integers, ignore_pixels)  -> (B,C,4) float32 (float64 for float64)
//     [ sum focal(x, t), sum p, sum p * t, sum t ]   p = sigmoid(x), t = (label == c), 255 = no class
//     focal = BCEWithLogits(x, t) * (1 - p_t)^2 * alpha_t,  p_t = p t + (1 - p)(1 - t),  alpha_t = 0.25 t + 0.75(1 - t)
//     With ignore_pixels the first three sums leave out pixels labelled 255; otherwise those are negatives of every
//     class (the official loss).
//   loss_sums_backward(grad (B,C,4), logits, labels, ignore_pixels)       -> d logits (B,C,H,W) in logits' dtype
//
// Why: the reference (the official element-wise formulation) builds about ten float32 (B, C, H, W) intermediates at the
// label resolution and as many again in its backward. Here one task owns a tile of pixels of one image, reads its
// labels once and walks the classes: the forward reads the logits once, the backward reads them once and writes their
// gradient. The sums are reduced per tile into a partials buffer and the partials summed in a fixed order, so the
// result does not depend on the number of threads.
//
// float32 (and float16/bfloat16, computed in float32) evaluates exp and log1p with the polynomials below instead of
// libm calls, so that the per-pixel loop vectorises (16 pixels per AVX-512 instruction); float64 calls libm.
//
// Special values land where the reference puts them: the BCE term has the reference's terms, (1 - t) x - log sigmoid(x)
// (in a more accurate order), so +-inf logits give the reference's inf/NaN sums; a pixel left out by ignore_pixels is
// multiplied by 0 as in the reference, so a NaN or inf logit there still poisons its sums; and a non-finite logit has a
// NaN gradient (as autograd of the reference computes it).

#include "cpu_common.h"

namespace cascade_clip {
namespace {

constexpr int32_t kIgnoreLabel = 255;  // cascade_clip.catalog.IGNORE_INDEX

// The float with these bits (std::bit_cast without needing a C++20 library; compiles to a register move).
inline float float_from_bits(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// exp(a) for a <= 0 or NaN, float32, vectorisable (no calls, no branches). Cody-Waite reduction a = n ln2 + r with
// |r| <= ln2 / 2 and Cephes' degree-6 polynomial for exp(r) (relative error ~1e-7, about one ulp); 2^n is applied as
// two factors so that results down to the smallest subnormal come out right. Below -104 the result is 0 (the true
// value is under half the smallest subnormal).
inline float exp_nonpositive(float a) {
  const float clamped = a > -104.0f ? a : -104.0f;  // also maps NaN to a finite value; it is put back at the end
  // round-to-nearest of clamped * log2(e) with the 1.5 * 2^23 trick (no roundps needed on baseline x86-64)
  constexpr float kRound = 12582912.0f;
  const float n = (clamped * 1.44269504088896341f + kRound) - kRound;
  const float r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f;  // ln2 = 0.693359375 - 2.12194440e-4, hi exact
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float y = poly * r * r + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);  // in [-150, 0]
  const int32_t n1 = ni / 2, n2 = ni - n1;     // each in [-75, 0]: 2^n1 and 2^n2 are normal floats
  const float s1 = float_from_bits((n1 + 127) << 23);
  const float s2 = float_from_bits((n2 + 127) << 23);
  const float result = a > -104.0f ? y * s1 * s2 : 0.0f;
  return a == a ? result : a;
}

// log(1 + u) for u in [0, 1] (and NaN), float32, vectorisable. With f = u (u < 1/2) or f = (u - 1) / 2 (u >= 1/2, then
// log1p(u) = ln2 + log1p(f); u - 1 is exact there), log1p(f) = 2 atanh(s) with s = f / (2 + f), |s| <= 0.2, from its
// series to s^9 (truncation below 1e-8 relative). Small u keep their relative precision down to the normal range (no
// 1 + u is rounded; a subnormal u may lose it, where the result is added to |x| >= 87 anyway).
inline float log1p_unit(float u) {
  const bool upper = u >= 0.5f;
  const float f = upper ? (u - 1.0f) * 0.5f : u;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float series = z * (0.666666667f + z * (0.4f + z * (0.285714286f + z * 0.222222222f)));
  const float log1p_f = 2.0f * s + s * series;
  return upper ? log1p_f + 0.693147181f : log1p_f;
}

// What one pixel of one class needs: u = exp(-|x|), log(1 + u), p = sigmoid(x), q = 1 - p (from u: no cancellation).
template <typename A>
struct Sigmoid {
  A u, softplus_tail, p, q;
};

template <typename A>
inline Sigmoid<A> sigmoid_parts(A x) {
  Sigmoid<A> out;
  if constexpr (std::is_same_v<A, float>) {
    out.u = exp_nonpositive(-std::fabs(x));
    out.softplus_tail = log1p_unit(out.u);
  } else {
    out.u = std::exp(-std::fabs(x));
    out.softplus_tail = std::log1p(out.u);
  }
  const A inv = A(1) / (A(1) + out.u);
  const A small = out.u * inv;  // sigmoid(-|x|)
  out.p = x >= A(0) ? inv : small;
  out.q = x >= A(0) ? small : inv;
  return out;
}

// x[0:len] in the accumulation type: the pointer itself when T is A, else widened into buf (float16/bfloat16 convert
// through calls the vectoriser cannot see through, so the transcendental loops below read float32).
template <typename T, typename A>
inline const A* widen(const T* x, A* buf, int64_t len) {
  if constexpr (std::is_same_v<T, A>) {
    return x;
  } else {
    for (int64_t j = 0; j < len; ++j) buf[j] = static_cast<A>(x[j]);
    return buf;
  }
}

// One task of the (B, tiles) grid: image b, its pixels [p0, p0 + len) and their labels; keep[j] (the caller's buffer)
// is 1 where pixel j counts in the first three sums and 0 where ignore_pixels drops it.
struct PixelTile {
  int64_t b, tile, p0, len;
  const int32_t* labels;
};

template <typename A>
inline PixelTile pixel_tile(int64_t task, int64_t tiles, int64_t HW, const int32_t* labels, bool ignore_pixels,
                            A* keep) {
  PixelTile pt;
  pt.b = task / tiles;
  pt.tile = task % tiles;
  pt.p0 = pt.tile * kTile;
  pt.len = std::min(kTile, HW - pt.p0);
  pt.labels = labels + pt.b * HW + pt.p0;
  for (int64_t j = 0; j < pt.len; ++j) keep[j] = (ignore_pixels && pt.labels[j] == kIgnoreLabel) ? A(0) : A(1);
  return pt;
}

// Forward tasks [begin, end) of the (B, tiles) grid. logits (B, C, HW), labels (B, HW) int32; partials
// (B, tiles, C, 4). Per class, one element-wise pass writes each pixel's four terms to tile buffers (L1), then four
// lane-split sums reduce them: two simple loops that both vectorise.
template <typename T, typename A>
CC_MULTIVERSION void loss_sums_forward_range(const T* logits, const int32_t* labels, A* partials, int64_t C, int64_t HW,
                                             int64_t tiles, bool ignore_pixels, int64_t begin, int64_t end) {
  alignas(64) A keep[kTile];  // see pixel_tile
  alignas(64) A focal[kTile], prob[kTile], overlap[kTile], target[kTile];
  alignas(64) A x_acc[std::is_same_v<T, A> ? 1 : kTile];  // half-precision logits widened first (a scalar loop)
  for (int64_t task = begin; task < end; ++task) {
    const PixelTile pt = pixel_tile(task, tiles, HW, labels, ignore_pixels, keep);
    const int64_t b = pt.b, tile = pt.tile, p0 = pt.p0, len = pt.len;
    const int32_t* lab = pt.labels;
    for (int64_t c = 0; c < C; ++c) {
      const A* x = widen(logits + (b * C + c) * HW + p0, x_acc, len);
      const int32_t cls = static_cast<int32_t>(c);
      for (int64_t j = 0; j < len; ++j) {
        const A xv = x[j];
        const bool is_target = lab[j] == cls;
        const A t = is_target ? A(1) : A(0);
        const Sigmoid<A> sg = sigmoid_parts(xv);
        // The reference's (1 - t) x - log sigmoid(x), with log sigmoid(x) = min(x, 0) - log(1 + exp(-|x|)), summed in
        // another order: (1 - t) x - min(x, 0) is exact for finite x (max(x, 0) or max(-x, 0)), so adding the tail last
        // keeps the small BCE of a confident pixel (the reference rounds x - tail first and gets 0 for |x| >= 17),
        // while +-inf gives the reference's inf and NaN.
        const A bce = ((A(1) - t) * xv - std::min(xv, A(0))) + sg.softplus_tail;
        const A one_minus_pt = is_target ? sg.q : sg.p;  // q from u: exact where the reference's 1 - p_t rounds
        const A alpha = is_target ? A(0.25) : A(0.75);
        const A p_kept = sg.p * keep[j];
        focal[j] = bce * one_minus_pt * one_minus_pt * alpha * keep[j];
        prob[j] = p_kept;
        overlap[j] = p_kept * t;
        target[j] = t;
      }
      A* out = partials + ((b * tiles + tile) * C + c) * 4;
      out[0] = sum_lanes(focal, len);
      out[1] = sum_lanes(prob, len);
      out[2] = sum_lanes(overlap, len);
      out[3] = sum_lanes(target, len);
    }
  }
}

// Backward tasks [begin, end): d x = G0 d focal / d x + (G1 + G2 t) p (1 - p), times keep; grad (B, C, 4) in A.
//   d focal / d x = 0.25 q^2 (2 p log p - q)   where t = 1;   0.75 p^2 (p - 2 q log q)   where t = 0   (q = 1 - p)
template <typename T, typename A>
CC_MULTIVERSION void loss_sums_backward_range(const A* grad, const T* logits, const int32_t* labels, T* d_logits,
                                              int64_t C, int64_t HW, int64_t tiles, bool ignore_pixels, int64_t begin,
                                              int64_t end) {
  alignas(64) A keep[kTile];
  alignas(64) A x_acc[std::is_same_v<T, A> ? 1 : kTile];
  alignas(64) A dx_acc[std::is_same_v<T, A> ? 1 : kTile];
  for (int64_t task = begin; task < end; ++task) {
    const PixelTile pt = pixel_tile(task, tiles, HW, labels, ignore_pixels, keep);
    const int64_t b = pt.b, p0 = pt.p0, len = pt.len;
    const int32_t* lab = pt.labels;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t row = (b * C + c) * HW + p0;
      const A* x = widen(logits + row, x_acc, len);
      A* dx = std::is_same_v<T, A> ? reinterpret_cast<A*>(d_logits + row) : dx_acc;
      const A g_focal = grad[(b * C + c) * 4], g_prob = grad[(b * C + c) * 4 + 1];
      const A g_overlap = grad[(b * C + c) * 4 + 2];
      const int32_t cls = static_cast<int32_t>(c);
      for (int64_t j = 0; j < len; ++j) {
        const A xv = x[j];
        const bool is_target = lab[j] == cls;
        const Sigmoid<A> sg = sigmoid_parts(xv);
        const A log_p = std::min(xv, A(0)) - sg.softplus_tail;
        const A log_q = std::min(-xv, A(0)) - sg.softplus_tail;
        const A d_focal = is_target ? A(0.25) * sg.q * sg.q * (A(2) * sg.p * log_p - sg.q)
                                    : A(0.75) * sg.p * sg.p * (sg.p - A(2) * sg.q * log_q);
        const A d_prob = is_target ? g_prob + g_overlap : g_prob;
        // x - x is 0 for finite x and NaN for +-inf and NaN, where the reference's gradient is NaN
        const A d = (g_focal * d_focal + d_prob * (sg.p * sg.q) + (xv - xv)) * keep[j];
        dx[j] = d;
      }
      if constexpr (!std::is_same_v<T, A>) {
        T* out = d_logits + row;
        for (int64_t j = 0; j < len; ++j) out[j] = static_cast<T>(dx_acc[j]);
      }
    }
  }
}

void check_loss_inputs(const at::Tensor& logits, const at::Tensor& labels, const char* op) {
  check_cpu_float(logits, "logits");
  TORCH_CHECK(labels.device().is_cpu(), op, ": labels must be a CPU tensor, got ", labels.device());
  TORCH_CHECK(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false), op,
              ": labels must be an integer tensor, got ", labels.scalar_type());
  TORCH_CHECK(logits.dim() == 4 && labels.dim() == 3 && labels.size(0) == logits.size(0) &&
                  labels.size(1) == logits.size(2) && labels.size(2) == logits.size(3),
              op, ": logits (B, C, H, W) and labels (B, H, W) expected, got ", logits.sizes(), " and ",
              labels.sizes());
}

// A label that is no class and not the ignore label (negative, or past 255): never equal to a class index or 255.
constexpr int32_t kNoClass = -2;

// Labels as contiguous int32 (B, HW), in one pass (1/C of the logits' size) so the kernels need one label type. Every
// value keeps the meaning the reference gives it: [0, 255] as is; anything else (int64 past int32, negatives) matches
// no class and is not ignored, so it becomes kNoClass rather than being truncated. The one exception is int8 -1: the
// reference compares labels with the Python scalar 255, which wraps to -1 in int8 (loss.check_labels likewise), so
// there -1 is the ignore label.
at::Tensor labels_int32(const at::Tensor& labels_in) {
  const at::Tensor labels = labels_in.contiguous();
  at::Tensor out = at::empty({labels.size(0), labels.numel() / std::max<int64_t>(labels.size(0), 1)},
                             labels.options().dtype(at::kInt));
  int32_t* op = out.mutable_data_ptr<int32_t>();
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "cascade_clip::loss_sums_labels", [&] {
    const scalar_t* lp = labels.const_data_ptr<scalar_t>();
    at::parallel_for(0, labels.numel(), 65536, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        int64_t v = static_cast<int64_t>(lp[i]);
        if constexpr (std::is_same_v<scalar_t, int8_t>) v = v == -1 ? kIgnoreLabel : v;
        op[i] = (v >= 0 && v <= kIgnoreLabel) ? static_cast<int32_t>(v) : kNoClass;
      }
    });
  });
  return out;
}

at::Tensor loss_sums_cpu(const at::Tensor& logits_in, const at::Tensor& labels_in, bool ignore_pixels) {
  const NoAutocast no_autocast;
  check_loss_inputs(logits_in, labels_in, "loss_sums");
  const int64_t B = logits_in.size(0), C = logits_in.size(1), HW = logits_in.size(2) * logits_in.size(3);
  const at::ScalarType acc = compute_dtype({logits_in});
  at::Tensor out = at::zeros({B, C, 4}, logits_in.options().dtype(acc));
  if (B * C == 0 || HW == 0) return out;
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor labels = labels_int32(labels_in);
  const int64_t tiles = (HW + kTile - 1) / kTile;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cascade_clip::loss_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> partials(B * tiles * C * 4);
    const scalar_t* xp = logits.const_data_ptr<scalar_t>();
    const int32_t* yp = labels.const_data_ptr<int32_t>();
    acc_t* pp = partials.data();
    // one task is a tile of one image over all classes: C * kTile logits, so a grain of one task is enough work
    const int64_t grain = std::max<int64_t>(1, kTileGrain / std::max<int64_t>(C, 1));
    at::parallel_for(0, B * tiles, grain, [&](int64_t begin, int64_t end) {
      loss_sums_forward_range<scalar_t, acc_t>(xp, yp, pp, C, HW, tiles, ignore_pixels, begin, end);
    });
    // Fixed-order reduction over tiles in double (B * C * 4 sums of `tiles` partials; the counts stay exact).
    acc_t* op = out.mutable_data_ptr<acc_t>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t ck = 0; ck < C * 4; ++ck) {
        double total = 0;
        for (int64_t i = 0; i < tiles; ++i) total += static_cast<double>(pp[(b * tiles + i) * C * 4 + ck]);
        op[b * C * 4 + ck] = static_cast<acc_t>(total);
      }
    }
  });
  return out;
}

at::Tensor loss_sums_backward_cpu(const at::Tensor& grad_in, const at::Tensor& logits_in, const at::Tensor& labels_in,
                                  bool ignore_pixels) {
  const NoAutocast no_autocast;
  check_loss_inputs(logits_in, labels_in, "loss_sums_backward");
  const int64_t B = logits_in.size(0), C = logits_in.size(1), HW = logits_in.size(2) * logits_in.size(3);
  TORCH_CHECK(grad_in.dim() == 3 && grad_in.size(0) == B && grad_in.size(1) == C && grad_in.size(2) == 4,
              "loss_sums_backward: grad must be (B, C, 4) = (", B, ", ", C, ", 4), got ", grad_in.sizes());
  at::Tensor d_logits = at::empty(logits_in.sizes(), logits_in.options());  // contiguous
  if (d_logits.numel() == 0) return d_logits;
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor labels = labels_int32(labels_in);
  const int64_t tiles = (HW + kTile - 1) / kTile;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cascade_clip::loss_sums_backward",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // the gradient arrives in any dtype and layout (an expanded one from out.sum()); read it dense in acc_t
    const at::Tensor grad = grad_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* gp = grad.const_data_ptr<acc_t>();
    const scalar_t* xp = logits.const_data_ptr<scalar_t>();
    const int32_t* yp = labels.const_data_ptr<int32_t>();
    scalar_t* dp = d_logits.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kTileGrain / std::max<int64_t>(C, 1));
    at::parallel_for(0, B * tiles, grain, [&](int64_t begin, int64_t end) {
      loss_sums_backward_range<scalar_t, acc_t>(gp, xp, yp, dp, C, HW, tiles, ignore_pixels, begin, end);
    });
  });
  return d_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(cascade_clip, CPU, m) {
  m.impl("loss_sums", &loss_sums_cpu);
  m.impl("loss_sums_backward", &loss_sums_backward_cpu);
}

}  // namespace cascade_clip
