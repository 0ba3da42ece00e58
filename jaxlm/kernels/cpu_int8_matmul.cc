// Weight-only matmuls for XLA:CPU through jax.ffi: y[T, O] = x[T, I] . dequant(q[O, I])^T, with q int8 and one
// scale per row, or int4 (packed two per byte, low nibble first, as XLA stores s4) and one scale per group.
// Built on first use by jaxlm/kernels/cpu_int8.py (why: see there). One thread: on a 2-core machine an
// OpenMP team fought XLA's own pool (3x slower); each weight byte is read once, widened in registers.
#include <cstdint>
#include <vector>
#include <immintrin.h>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// One token: four accumulators keep the FMA latency chain off the critical path.
static inline float row_dot(const float* x, const int8_t* q, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef __AVX512F__
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (; i + 64 <= n; i += 64) {
    for (int k = 0; k < 4; ++k) {
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i + 16 * k));
      a[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), _mm512_loadu_ps(x + i + 16 * k), a[k]);
    }
  }
  sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
#endif
  for (; i < n; ++i) sum += x[i] * static_cast<float>(q[i]);
  return sum;
}

constexpr int64_t kTile = 8;  // tokens whose accumulators stay in registers while a row is read once

// y[t0:t0+n, o] for one weight row: each 16 int8 weights are widened once and used for n tokens.
static inline void row_tile(const float* x, const int8_t* q, int64_t I, int64_t n, float scale, float* y,
                            int64_t O) {
  float sums[kTile] = {0};
  int64_t i = 0;
#ifdef __AVX512F__
  __m512 acc[kTile];
  for (int64_t t = 0; t < n; ++t) acc[t] = _mm512_setzero_ps();
  for (; i + 16 <= I; i += 16) {
    __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i))));
    for (int64_t t = 0; t < n; ++t) acc[t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + t * I + i), acc[t]);
  }
  for (int64_t t = 0; t < n; ++t) sums[t] = _mm512_reduce_add_ps(acc[t]);
#endif
  for (; i < I; ++i) {
    for (int64_t t = 0; t < n; ++t) sums[t] += x[t * I + i] * static_cast<float>(q[i]);
  }
  for (int64_t t = 0; t < n; ++t) y[t * O] = sums[t] * scale;
}

static ffi::Error Int8Matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> scale,
                             ffi::ResultBuffer<ffi::F32> y) {
  const int64_t T = x.dimensions()[0], I = x.dimensions()[1], O = q.dimensions()[0];
  if (q.dimensions()[1] != I || scale.element_count() != O) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jaxlm_int8_matmul: shapes do not match");
  }
  const float* xd = x.typed_data();
  const int8_t* qd = q.typed_data();
  const float* sd = scale.typed_data();
  float* yd = y->typed_data();
  if (T == 1) {
    for (int64_t o = 0; o < O; ++o) yd[o] = row_dot(xd, qd + o * I, I) * sd[o];
    return ffi::Error::Success();
  }
  for (int64_t t0 = 0; t0 < T; t0 += kTile) {
    const int64_t n = T - t0 < kTile ? T - t0 : kTile;
    for (int64_t o = 0; o < O; ++o) row_tile(xd + t0 * I, qd + o * I, I, n, sd[o], yd + t0 * O + o, O);
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// One int4 row against one token: x split into even / odd elements (the low / high nibbles of a byte).
static inline float row_dot4(const float* xe, const float* xo, const uint8_t* q, const float* scale, int64_t I,
                             int64_t G) {
  float total = 0.f;
  for (int64_t g0 = 0, k = 0; g0 < I; g0 += G, ++k) {
    const int64_t end = g0 + G < I ? g0 + G : I;
    int64_t j = g0 / 2;   // byte index: two elements per byte
    float sum = 0.f;
#ifdef __AVX512F__
    __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
    for (; 2 * j + 32 <= end; j += 16) {
      __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)));
      __m512 wl = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 28), 28));
      __m512 wh = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 28));
      lo = _mm512_fmadd_ps(wl, _mm512_loadu_ps(xe + j), lo);
      hi = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xo + j), hi);
    }
    sum = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
#endif
    for (; 2 * j < end; ++j) {
      const int8_t b = static_cast<int8_t>(q[j]);
      sum += xe[j] * static_cast<float>(static_cast<int8_t>(b << 4) >> 4) + xo[j] * static_cast<float>(b >> 4);
    }
    total += sum * scale[k];
  }
  return total;
}

static ffi::Error Int4Matmul(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q, ffi::Buffer<ffi::F32> scale,
                             ffi::ResultBuffer<ffi::F32> y, int64_t group) {
  const int64_t T = x.dimensions()[0], I = x.dimensions()[1], O = y->dimensions()[1];
  const int64_t groups = (I + group - 1) / group;
  if (I % 2 || group % 2 || scale.element_count() != O * groups) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jaxlm_int4_matmul: shapes do not match");
  }
  const float* xd = x.typed_data();
  const uint8_t* qd = static_cast<const uint8_t*>(q.untyped_data());
  const float* sd = scale.typed_data();
  float* yd = y->typed_data();
  std::vector<float> split(2 * (I / 2));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < I / 2; ++j) {
      split[j] = xd[t * I + 2 * j];
      split[I / 2 + j] = xd[t * I + 2 * j + 1];
    }
    for (int64_t o = 0; o < O; ++o) {
      yd[t * O + o] = row_dot4(split.data(), split.data() + I / 2, qd + o * (I / 2), sd + o * groups, I, group);
    }
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlmInt4Matmul, Int4Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group"));
