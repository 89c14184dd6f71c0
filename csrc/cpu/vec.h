// Vector helpers of the CPU kernels: at::vec::Vectorized loads and stores
// over a row's classes, lane bookkeeping for short and overlapping chunks,
// reductions, the exponential, and widening of reduced-precision rows.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Export.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace autobalance {
// Hidden: the CPU kernels' helpers bind within this library, so a call the
// compiler does not inline is direct, not through the PLT, and the inliner
// weighs them as it does file-local functions.
namespace cpu C10_HIDDEN {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Calls f(k, n) over [0, K) in chunks of n = Vec<T>::size() lanes, the last
// chunk shorter; masked loads and stores keep the tail on the vector path.
template <typename T, typename F>
inline void for_chunks(int64_t K, const F& f) {
  constexpr int64_t W = Vec<T>::size();
  int64_t k = 0;
  for (; k + W <= K; k += W) f(k, W);
  if (k < K) f(k, K - k);
}

template <typename T>
inline Vec<T> load(const T* p, int64_t k, int64_t n) {
  return n == Vec<T>::size() ? Vec<T>::loadu(p + k) : Vec<T>::loadu(p + k, n);
}

// Lanes past n of a short chunk hold padding; this replaces them by `fill`.
template <typename T>
inline Vec<T> keep(const Vec<T>& v, int64_t n, T fill) {
  return n == Vec<T>::size() ? v : Vec<T>::set(Vec<T>(fill), v, n);
}

// For K >= W every chunk is a full vector: the last starts at K - W and shares
// its first lanes with the chunk before (no masked tail: ~20% faster at
// K = 100). f(k, n, fresh) gets fresh = nullptr, or, for that last chunk, a
// 0/1 vector that is 0 on the shared lanes: sums must count each lane once
// (`counted`), while maxima and stores of the same values need nothing. For
// K < W, one masked chunk of n = K lanes (as for_chunks).
template <typename T>
inline Vec<T> fresh_lanes(int64_t K) {
  constexpr int64_t W = Vec<T>::size();
  const int64_t shared = (K >= W && K % W) ? W - K % W : 0;
  T f[W];
  for (int64_t j = 0; j < W; ++j) f[j] = j < shared ? T(0) : T(1);
  return Vec<T>::loadu(f);
}

template <typename T, typename F>
inline void for_lanes(int64_t K, const Vec<T>& fresh, const F& f) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T>* all = nullptr;
  if (K < W) return f(int64_t(0), K, all);
  int64_t k = 0;
  for (; k + W <= K; k += W) f(k, W, all);
  if (k < K) f(K - W, W, &fresh);
}

// v with the lanes this chunk must not count set to 0.
template <typename T>
inline Vec<T> counted(const Vec<T>& v, int64_t n, const Vec<T>* fresh) {
  return fresh ? v * *fresh : keep(v, n, T(0));
}

// The largest lane (NaN if any lane is NaN).
template <typename T>
inline T reduce_max(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, v);
}

template <typename T>
inline Vec<T> fast_exp(const Vec<T>& x) {
  return x.exp_u20();
}

// Whether fast_exp<T> returns NaN for a NaN argument. Then a row's max needs
// no NaN propagation (a NaN logit makes its exponential, hence the row's sum
// and lse, NaN; so does +inf, as inf - inf, and an all -inf row), and one
// plain max instruction serves instead of three.
template <typename T>
inline constexpr bool kExpKeepsNaN = false;

#if defined(CPU_CAPABILITY_AVX512)
// exp_u20's range reduction and polynomial (n = floor(x log2(e) + 1/2),
// r = x - n ln 2, p(r) of degree 5) with 2^n applied by one scalef, and the
// underflow to 0 below ln(FLT_MIN) folded into its zero mask: 11 instructions
// instead of 19 (the loss-only forward ~20% faster at K = 100). The same bits
// as exp_u20 for x >= -86.9 (n > -126); from there to ln(FLT_MIN) this gives
// the value (< 2^-125) that exp_u20 flushes to 0, and a NaN stays NaN. No
// clamp at ln(FLT_MAX): every exponent here is at most 0 (a logit minus its
// row's max or lse), and above it scalef gives inf.
template <>
inline Vec<float> fast_exp(const Vec<float>& v) {
  const __m512 x = v;
  const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3365478515625f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(
      _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269502162933349609375f), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147182464599609375f), x);
  __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(0.00828929059f), _mm512_set1_ps(0.0418978221f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.166676521f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.499991506f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.999999701f));
  p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(kept, p, n);
}

template <>
inline constexpr bool kExpKeepsNaN<float> = true;
#endif

// max(m, a) for a row's running max: NaN-propagating unless kExpKeepsNaN.
template <typename T>
inline Vec<T> max_step(const Vec<T>& m, const Vec<T>& a) {
  if constexpr (kExpKeepsNaN<T>) {
    return at::vec::clamp_min(a, m);
  } else {
    return at::vec::maximum(m, a);
  }
}

template <typename T>
inline T reduce_sum(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; },
                                    v);
}

// exp_u20 clamps its input, so a NaN would not propagate through p; rows
// whose lse is not finite get NaN multipliers instead.
template <typename T>
inline T nan_unless_finite(T lse, T value) {
  return std::isfinite(lse) ? value : std::numeric_limits<T>::quiet_NaN();
}

// Widens one row to the accumulation type (a no-op pointer for float/double).
template <typename scalar_t, typename acc_t>
inline const acc_t* widen(const scalar_t* src, acc_t* buf, int64_t K) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    at::vec::convert(src, buf, K);
    return buf;
  }
}

// Where a row's gradient is computed: straight into the output when the
// types agree, else into `buf`, narrowed by `narrow` afterwards.
template <typename scalar_t, typename acc_t>
inline acc_t* grad_row(scalar_t* out, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return out;
  } else {
    return buf;
  }
}

template <typename scalar_t, typename acc_t>
inline void narrow(const acc_t* buf, scalar_t* out, int64_t K) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(buf, out, K);
}

}  // namespace cpu
}  // namespace autobalance
