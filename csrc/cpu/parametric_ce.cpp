// CPU kernels of the parametric cross-entropy: forward, backward and double
// backward (MATH.md sections 1, 3, 4). Rows are spread over threads with
// at::parallel_for; the inner loops over classes use at::vec::Vectorized.
// Reduced-precision logits (bfloat16, float16) are widened row by row and
// everything accumulates in float32 (float64 for float64 logits).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <type_traits>
#include <vector>

#include "../checks.h"

namespace autobalance {
namespace {

using at::Tensor;
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
Vec<T> fresh_lanes(int64_t K) {
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

// a = S z + L over one chunk.
template <typename T>
inline Vec<T> affine(const T* S, const T* z, const T* L, int64_t k, int64_t n) {
  return at::vec::fmadd(load(S, k, n), load(z, k, n), load(L, k, n));
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
constexpr bool kExpKeepsNaN = false;

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
constexpr bool kExpKeepsNaN<float> = true;
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

// One sample after its index lookups. `ignored` rows are skipped entirely.
struct RowIndex {
  int64_t y;
  int64_t g;
  bool ignored;
};

inline RowIndex read_row(int64_t i, const int64_t* target, const int64_t* group,
                         int64_t K, int64_t G, int64_t ignore_index) {
  const int64_t y = target[i];
  if (y == ignore_index) return {y, 0, true};
  TORCH_CHECK_INDEX(y >= 0 && y < K, "autobalance: `target[", i, "]` = ", y,
                    " is out of range: expected a class in [0, ", K,
                    ") or ignore_index = ", ignore_index);
  const int64_t g = group ? group[i] : 0;
  TORCH_CHECK_INDEX(g >= 0 && g < G, "autobalance: `group[", i, "]` = ", g,
                    " is out of range: expected a group in [0, ", G,
                    ") (the tables have G = ", G, " rows)");
  return {y, g, false};
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

inline int64_t row_grain(int64_t K) {
  return std::max<int64_t>(1, 32768 / K);
}

// A buffer of at least `size` elements that the calling thread keeps between
// calls (`Slot` tells a thread's buffers apart); one over 8 MiB is allocated
// per call in `fallback` instead. A fresh heap block per call costs page
// faults: at 4096 x 100 the workers' scratch blocks alone cost ~250 faults and
// ~0.3 ms per call.
template <typename T, int Slot>
T* kept_buffer(int64_t size, std::unique_ptr<T[]>& fallback) {
  constexpr int64_t kMaxKeptBytes = int64_t(8) << 20;
  if (size * static_cast<int64_t>(sizeof(T)) > kMaxKeptBytes) {
    fallback.reset(new T[size]);
    return fallback.get();
  }
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

// Runs span_fn(i, n, partial, scratch) over the rows [0, N) in consecutive
// spans of n <= `span` rows (so that a kernel can interleave the rows of a
// span). With table gradients, rows go to fixed blocks whose number depends
// only on N; each block sums into its own partial [3, G, K] tables (W, S, L)
// and the partials are then added in block order, so results are bit-identical
// from run to run whatever the thread count, with no atomics. Without them
// `partial` is null.
template <typename acc_t, typename SpanFn>
void for_row_spans(int64_t N, int64_t G, int64_t K, int64_t span, int64_t scratch_size,
                   bool table_grads, std::array<acc_t*, 3> table_out,
                   const SpanFn& span_fn) {
  auto run = [&](int64_t begin, int64_t end, acc_t* partial, acc_t* scratch) {
    for (int64_t i = begin; i < end; i += span) span_fn(i, std::min(span, end - i), partial, scratch);
  };
  if (!table_grads) {
    at::parallel_for(0, N, row_grain(K), [&](int64_t begin, int64_t end) {
      std::unique_ptr<acc_t[]> fallback;
      run(begin, end, nullptr, kept_buffer<acc_t, 0>(scratch_size, fallback));
    });
    return;
  }
  constexpr int64_t kMaxBlocks = 64;
  const int64_t table = G * K;
  const int64_t rows_per_block =
      std::max<int64_t>((N + kMaxBlocks - 1) / kMaxBlocks, 16);
  const int64_t blocks = std::max<int64_t>((N + rows_per_block - 1) / rows_per_block, 1);
  std::unique_ptr<acc_t[]> partials_fallback;
  acc_t* const partials = kept_buffer<acc_t, 1>(blocks * 3 * table, partials_fallback);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::unique_ptr<acc_t[]> fallback;
    acc_t* scratch = kept_buffer<acc_t, 0>(scratch_size, fallback);
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* partial = partials + b * 3 * table;
      std::fill(partial, partial + 3 * table, acc_t(0));
      run(b * rows_per_block, std::min(N, (b + 1) * rows_per_block), partial, scratch);
    }
  });
  // Table by table (no index division in the inner loop).
  for (int64_t t = 0; t < 3; ++t) {
    acc_t* out = table_out[t];
    at::parallel_for(0, table, 4096, [&](int64_t c0, int64_t c1) {
      std::fill(out + c0, out + c1, acc_t(0));
      for (int64_t b = 0; b < blocks; ++b) {
        const acc_t* partial = partials + (b * 3 + t) * table;
        for (int64_t c = c0; c < c1; ++c) out[c] += partial[c];
      }
    });
  }
}

// for_row_spans one row at a time: row_fn(i, partial, scratch).
template <typename acc_t, typename RowFn>
void for_rows(int64_t N, int64_t G, int64_t K, int64_t scratch_size,
              bool table_grads, std::array<acc_t*, 3> table_out,
              const RowFn& row_fn) {
  for_row_spans<acc_t>(N, G, K, 1, scratch_size, table_grads, table_out,
                       [&](int64_t i, int64_t, acc_t* partial, acc_t* scratch) {
                         row_fn(i, partial, scratch);
                       });
}

// Contiguous inputs and raw pointers shared by the three kernels.
template <typename scalar_t, typename acc_t>
struct Inputs {
  Tensor logits_c, target_c, group_c, weight_c, scale_c, shift_c;
  const scalar_t* z;
  const int64_t* target;
  const int64_t* group;
  const acc_t *W, *S, *L;
  int64_t N, K, G, ignore_index;

  Inputs(const Tensor& logits, const Tensor& target_,
         const std::optional<Tensor>& group_, const Tensor& weight,
         const Tensor& scale, const Tensor& shift, const Sizes& s,
         int64_t ignore)
      : logits_c(logits.contiguous()),
        target_c(target_.contiguous()),
        group_c(group_.has_value() ? group_->contiguous() : Tensor()),
        weight_c(weight.contiguous()),
        scale_c(scale.contiguous()),
        shift_c(shift.contiguous()),
        z(logits_c.const_data_ptr<scalar_t>()),
        target(target_c.const_data_ptr<int64_t>()),
        group(group_c.defined() ? group_c.const_data_ptr<int64_t>() : nullptr),
        W(weight_c.const_data_ptr<acc_t>()),
        S(scale_c.const_data_ptr<acc_t>()),
        L(shift_c.const_data_ptr<acc_t>()),
        N(s.rows),
        K(s.classes),
        G(s.groups),
        ignore_index(ignore) {}

  RowIndex row(int64_t i) const {
    return read_row(i, target, group, K, G, ignore_index);
  }
};

// ---------------------------------------------------------------- forward

// {m, sum_k exp(S_k z_k + L_k - m)} with m the row's max, in two passes, so
// lse = m + log(sum). With `e`, the second pass also stores the exponentials.
// `fresh` is fresh_lanes<acc_t>(K).
template <typename acc_t>
std::pair<acc_t, acc_t> row_exp_sum(const acc_t* z, const acc_t* S, const acc_t* L,
                                    int64_t K, acc_t* e, const Vec<acc_t>& fresh) {
  using V = Vec<acc_t>;
  const acc_t lowest = -std::numeric_limits<acc_t>::infinity();
  V vmax(lowest);
  for_lanes<acc_t>(K, fresh, [&](int64_t k, int64_t n, const V*) {
    vmax = max_step(vmax, keep(affine(S, z, L, k, n), n, lowest));
  });
  const acc_t m = reduce_max(vmax);
  V vsum(acc_t(0));
  const V vm(m);
  for_lanes<acc_t>(K, fresh, [&](int64_t k, int64_t n, const V* f) {
    const V ek = fast_exp(affine(S, z, L, k, n) - vm);
    if (e) ek.store(e + k, n);
    vsum = vsum + counted(ek, n, f);
  });
  return {m, reduce_sum(vsum)};
}

// One row's pointers for row_exp_sum_pair: its (widened) logits, its group's
// scale and shift rows, and where to store the exponentials (or null).
template <typename acc_t>
struct ExpRow {
  const acc_t *z, *S, *L;
  acc_t* e;
};

// row_exp_sum of two rows at once: their dependency chains interleaved (a row
// alone is latency-bound; the forward with gradients is ~15-20% faster at
// K = 100).
template <typename acc_t>
std::array<std::pair<acc_t, acc_t>, 2> row_exp_sum_pair(const ExpRow<acc_t> a, const ExpRow<acc_t> b,
                                                        int64_t K, const Vec<acc_t>& fresh) {
  using V = Vec<acc_t>;
  const acc_t lowest = -std::numeric_limits<acc_t>::infinity();
  V max_a(lowest), max_b(lowest);
  for_lanes<acc_t>(K, fresh, [&](int64_t k, int64_t n, const V*) {
    max_a = max_step(max_a, keep(affine(a.S, a.z, a.L, k, n), n, lowest));
    max_b = max_step(max_b, keep(affine(b.S, b.z, b.L, k, n), n, lowest));
  });
  const acc_t ma = reduce_max(max_a), mb = reduce_max(max_b);
  const V vma(ma), vmb(mb);
  V sum_a(acc_t(0)), sum_b(acc_t(0));
  for_lanes<acc_t>(K, fresh, [&](int64_t k, int64_t n, const V* f) {
    const V ea = fast_exp(affine(a.S, a.z, a.L, k, n) - vma);
    const V eb = fast_exp(affine(b.S, b.z, b.L, k, n) - vmb);
    if (a.e) ea.store(a.e + k, n);
    if (b.e) eb.store(b.e + k, n);
    sum_a = sum_a + counted(ea, n, f);
    sum_b = sum_b + counted(eb, n, f);
  });
  return {std::make_pair(ma, reduce_sum(sum_a)), std::make_pair(mb, reduce_sum(sum_b))};
}

// The residual path takes float32/float64 logits only (r is kept in their dtype).
void check_residual_dtype(const Tensor& logits) {
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
                   "autobalance: the residual path takes float32 or float64 `logits`, got ",
                   dtype_name(logits.scalar_type()));
}

// grad_logits [N, K] (undefined unless `with_logits`) and the zeroed
// grad_weight, grad_scale, grad_shift [G, K].
std::tuple<Tensor, Tensor, Tensor, Tensor> backward_outputs(const Sizes& s,
                                                            const Tensor& logits,
                                                            const Tensor& weight,
                                                            bool with_logits = true) {
  return {with_logits ? at::empty({s.rows, s.classes}, logits.options()) : Tensor(),
          at::zeros({s.groups, s.classes}, weight.options()),
          at::zeros({s.groups, s.classes}, weight.options()),
          at::zeros({s.groups, s.classes}, weight.options())};
}

// dL += r and dS += r z over one chunk, each lane once (`fresh` as in for_lanes;
// a short chunk's masked stores leave its padding out).
template <typename T>
inline void add_table_grads(T* dL, T* dS, int64_t k, int64_t n, const Vec<T>& rk,
                            const Vec<T>& zk, const Vec<T>* fresh) {
  const Vec<T> once = fresh ? rk * *fresh : rk;
  (load(dL, k, n) + once).store(dL + k, n);
  at::vec::fmadd(once, zk, load(dS, k, n)).store(dS + k, n);
}

// dz = gamma S r over one row, written over r, and (with `dL`, `dS`) the row's
// share of the table gradients dL += gamma r, dS += gamma r z. Disjoint chunks
// (a masked tail, not for_lanes' overlapping last chunk): each lane of r is
// read before it is overwritten.
template <typename T>
inline void row_gradient_over_residual(T* r, const T* z, const T* S, T gamma, int64_t K,
                                       T* dL, T* dS) {
  const Vec<T> vg(gamma);
  for_chunks<T>(K, [&](int64_t k, int64_t n) {
    const Vec<T> rk = vg * load(r, k, n);
    if (dL) add_table_grads<T>(dL, dS, k, n, rk, load(z, k, n), nullptr);
    (load(S, k, n) * rk).store(r + k, n);
  });
}

// What the forward keeps besides (loss, lse).
enum class Keep {
  kNothing,
  // the residual r = W_y (p - e_y) [N, K] that a backward not differentiated
  // again reads instead of recomputing the softmax (that backward then needs
  // no exponential: dz = gamma S r, dL = sum gamma r, dS = sum gamma r z);
  kResidual,
  // the gradients of the reduced loss (the sum, or with `mean` the weighted
  // mean): grad_logits [N, K] and, with table_grads, grad_weight, grad_scale,
  // grad_shift [G, K] (the backward then only scales them by its incoming
  // gradient, usually 1), plus the per-cell row counts.
  kGradient,
};

struct ForwardOut {
  Tensor loss, lse;  // [N]
  Tensor kept;       // the residual or grad_logits [N, K]
  Tensor grad_weight, grad_scale, grad_shift;  // [G, K]
  Tensor counts;  // [G * K]
};

ForwardOut forward_cpu(
    const Tensor& logits, const Tensor& target,
    const std::optional<Tensor>& group, const Tensor& weight,
    const Tensor& scale, const Tensor& shift, int64_t ignore_index,
    Keep keep, bool mean = false, bool table_grads = false) {
  const Sizes s = check_inputs(logits, target, group, weight, scale, shift);
  if (keep != Keep::kNothing) check_residual_dtype(logits);
  const bool gradient = keep == Keep::kGradient;
  table_grads = table_grads && gradient;
  const auto acc_opts = logits.options().dtype(accumulate_type(logits.scalar_type()));
  ForwardOut out;
  out.loss = at::empty({s.rows}, acc_opts);
  out.lse = at::empty({s.rows}, acc_opts);
  if (keep != Keep::kNothing) out.kept = at::empty({s.rows, s.classes}, acc_opts);
  if (gradient) {
    std::tie(std::ignore, out.grad_weight, out.grad_scale, out.grad_shift) =
        backward_outputs(s, logits, weight, false);
    out.counts = at::zeros({s.groups * s.classes}, acc_opts);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "parametric_ce_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Inputs<scalar_t, acc_t> in(logits, target, group, weight, scale,
                                         shift, s, ignore_index);
        acc_t* loss_p = out.loss.mutable_data_ptr<acc_t>();
        acc_t* lse_p = out.lse.mutable_data_ptr<acc_t>();
        acc_t* r_out = out.kept.defined() ? out.kept.mutable_data_ptr<acc_t>() : nullptr;
        const int64_t K = in.K, table = in.G * K;
        // With `gradient`: the per-cell counts (checking every index first) and
        // the factor a = d reduced / d loss_i (1 / sum_i W[g_i, y_i] for a mean).
        acc_t a = 1, denominator = 0;
        if (gradient) {
          acc_t* counts = out.counts.mutable_data_ptr<acc_t>();
          for (int64_t i = 0; i < in.N; ++i) {
            const int64_t y = in.target[i];
            if (y == in.ignore_index) continue;
            const int64_t g = in.group ? in.group[i] : 0;
            // one unsigned comparison each; in.row raises the error
            if (static_cast<uint64_t>(y) >= static_cast<uint64_t>(K) ||
                static_cast<uint64_t>(g) >= static_cast<uint64_t>(in.G))
              in.row(i);
            counts[g * K + y] += 1;
          }
          if (mean) {
            for (int64_t c = 0; c < table; ++c) denominator += counts[c] * in.W[c];
            a = acc_t(1) / denominator;
          }
        }
        const Vec<acc_t> fresh = fresh_lanes<acc_t>(K);
        std::array<acc_t*, 3> tables{};
        if (table_grads) {
          tables = {out.grad_weight.mutable_data_ptr<acc_t>(), out.grad_scale.mutable_data_ptr<acc_t>(),
                    out.grad_shift.mutable_data_ptr<acc_t>()};
        }
        // After the row's exponential sum: loss, lse and what the mode keeps.
        auto finish = [&](int64_t i, const RowIndex& ri, const acc_t* z, acc_t m, acc_t sum,
                          acc_t* partial) {
          acc_t* r = r_out ? r_out + i * K : nullptr;
          const acc_t* S = in.S + ri.g * K;
          const acc_t* L = in.L + ri.g * K;
          const acc_t l = m + std::log(sum);
          const acc_t Wy = in.W[ri.g * K + ri.y];
          const acc_t a_y = S[ri.y] * z[ri.y] + L[ri.y];
          lse_p[i] = l;
          loss_p[i] = Wy * (l - a_y);
          if (!r) return;
          // r holds the exponentials e; the residual is c e - Wy [k = y].
          // A non-finite lse (a NaN or infinite logit) makes the whole row NaN.
          const acc_t c = nan_unless_finite(l, Wy / sum);
          if (!gradient) {
            const Vec<acc_t> vc(c);
            for_chunks<acc_t>(K, [&](int64_t k, int64_t n) { (vc * load(r, k, n)).store(r + k, n); });
            r[ri.y] -= Wy;
            return;
          }
          // The gradient row from e in one pass, then the k = y terms.
          acc_t* dS = partial ? partial + table + ri.g * K : nullptr;
          acc_t* dL = partial ? partial + 2 * table + ri.g * K : nullptr;
          row_gradient_over_residual(r, z, S, a * c, K, dL, dS);
          const acc_t aW = a * Wy;
          r[ri.y] -= S[ri.y] * aW;
          if (partial) {
            dL[ri.y] -= aW;
            dS[ri.y] -= aW * z[ri.y];
            partial[ri.g * K + ri.y] += a * (l - a_y);
          }
        };
        if (!r_out) {
          // loss and lse only: a row at a time (pairing does not pay here)
          for_rows<acc_t>(in.N, in.G, K, K, false, tables,
                          [&](int64_t i, acc_t* partial, acc_t* buf) {
            const RowIndex ri = in.row(i);
            if (ri.ignored) {
              loss_p[i] = lse_p[i] = 0;
              return;
            }
            const acc_t* z = widen(in.z + i * K, buf, K);
            const auto [m, sum] =
                row_exp_sum(z, in.S + ri.g * K, in.L + ri.g * K, K, (acc_t*)nullptr, fresh);
            finish(i, ri, z, m, sum, partial);
          });
        } else {
          // Rows in pairs (their exponential sums interleaved); one at a time
          // where a pair has an ignored row, and for the last row of an odd span.
          for_row_spans<acc_t>(in.N, in.G, K, 2, 2 * K, table_grads, tables,
                               [&](int64_t i, int64_t n, acc_t* partial, acc_t* buf) {
            std::array<RowIndex, 2> ri;
            std::array<ExpRow<acc_t>, 2> rows;
            int64_t live = 0;
            for (int64_t j = 0; j < n; ++j) {
              ri[j] = in.row(i + j);
              acc_t* r = r_out + (i + j) * K;
              if (ri[j].ignored) {
                loss_p[i + j] = lse_p[i + j] = 0;
                std::fill(r, r + K, acc_t(0));
                continue;
              }
              rows[j] = {widen(in.z + (i + j) * K, buf + j * K, K), in.S + ri[j].g * K,
                         in.L + ri[j].g * K, r};
              ++live;
            }
            if (live == 2) {
              const auto sums = row_exp_sum_pair(rows[0], rows[1], K, fresh);
              for (int64_t j = 0; j < 2; ++j)
                finish(i + j, ri[j], rows[j].z, sums[j].first, sums[j].second, partial);
              return;
            }
            for (int64_t j = 0; j < n; ++j) {
              if (ri[j].ignored) continue;
              const auto [m, sum] = row_exp_sum(rows[j].z, rows[j].S, rows[j].L, K, rows[j].e, fresh);
              finish(i + j, ri[j], rows[j].z, m, sum, partial);
            }
          });
        }
        if (gradient && mean && table_grads) {
          // the denominator's share of d mean / dW: -(mean / D) counts, with
          // the sum in row order (in double): deterministic whatever the
          // thread count
          double total = 0;
          for (int64_t i = 0; i < in.N; ++i) total += loss_p[i];
          const acc_t share = acc_t(total) / denominator / denominator;
          const acc_t* counts = out.counts.const_data_ptr<acc_t>();
          acc_t* dW = out.grad_weight.mutable_data_ptr<acc_t>();
          for (int64_t c = 0; c < table; ++c) dW[c] -= share * counts[c];
        }
      });
  return out;
}

std::tuple<Tensor, Tensor> parametric_ce_cpu(
    const Tensor& logits, const Tensor& target,
    const std::optional<Tensor>& group, const Tensor& weight,
    const Tensor& scale, const Tensor& shift, int64_t ignore_index) {
  auto out = forward_cpu(logits, target, group, weight, scale, shift, ignore_index, Keep::kNothing);
  return {out.loss, out.lse};
}

std::tuple<Tensor, Tensor, Tensor> parametric_ce_with_residual_cpu(
    const Tensor& logits, const Tensor& target,
    const std::optional<Tensor>& group, const Tensor& weight,
    const Tensor& scale, const Tensor& shift, int64_t ignore_index) {
  auto out = forward_cpu(logits, target, group, weight, scale, shift, ignore_index, Keep::kResidual);
  return {out.loss, out.lse, out.kept};
}

// With table_grads false the three table gradients are zeros.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
parametric_ce_reduced_with_gradient_cpu(
    const Tensor& logits, const Tensor& target,
    const std::optional<Tensor>& group, const Tensor& weight,
    const Tensor& scale, const Tensor& shift, int64_t ignore_index, bool mean,
    bool table_grads) {
  auto out = forward_cpu(logits, target, group, weight, scale, shift, ignore_index,
                         Keep::kGradient, mean, table_grads);
  return {out.loss, out.lse, out.counts, out.kept, out.grad_weight, out.grad_scale,
          out.grad_shift};
}

// --------------------------------------------------------------- backward

std::tuple<Tensor, Tensor, Tensor, Tensor> parametric_ce_backward_cpu(
    const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
    const std::optional<Tensor>& group, const Tensor& weight,
    const Tensor& scale, const Tensor& shift, const Tensor& lse,
    int64_t ignore_index, bool table_grads) {
  const Sizes s = check_backward_inputs(grad_loss, logits, target, group, weight,
                                        scale, shift, lse);
  Tensor grad_logits, grad_weight, grad_scale, grad_shift;
  std::tie(grad_logits, grad_weight, grad_scale, grad_shift) = backward_outputs(s, logits, weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "parametric_ce_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        using V = Vec<acc_t>;
        const Inputs<scalar_t, acc_t> in(logits, target, group, weight, scale,
                                         shift, s, ignore_index);
        const Tensor gamma_c = grad_loss.contiguous(), lse_c = lse.contiguous();
        const acc_t* gamma = gamma_c.const_data_ptr<acc_t>();
        const acc_t* lse_p = lse_c.const_data_ptr<acc_t>();
        scalar_t* dz_out = grad_logits.mutable_data_ptr<scalar_t>();
        const int64_t K = in.K, table = in.G * K;
        const V fresh = fresh_lanes<acc_t>(K);
        for_rows<acc_t>(
            in.N, in.G, K, 2 * K, table_grads,
            {grad_weight.mutable_data_ptr<acc_t>(), grad_scale.mutable_data_ptr<acc_t>(),
             grad_shift.mutable_data_ptr<acc_t>()},
            [&](int64_t i, acc_t* partial, acc_t* scratch) {
              const RowIndex r = in.row(i);
              if (r.ignored) {
                std::fill(dz_out + i * K, dz_out + (i + 1) * K, scalar_t(0));
                return;
              }
              const acc_t* z = widen(in.z + i * K, scratch, K);
              acc_t* dz = grad_row(dz_out + i * K, scratch + K);
              const acc_t* S = in.S + r.g * K;
              const acc_t* L = in.L + r.g * K;
              // A non-finite lse (a NaN or infinite logit) makes the whole row NaN.
              const acc_t c = nan_unless_finite(lse_p[i], gamma[i] * in.W[r.g * K + r.y]);
              const V vl(lse_p[i]), vc(c);
              // r_k = c p_k everywhere first; the -c at k = y is added below.
              acc_t* dW = partial ? partial + r.g * K : nullptr;
              acc_t* dS = partial ? partial + table + r.g * K : nullptr;
              acc_t* dL = partial ? partial + 2 * table + r.g * K : nullptr;
              for_lanes<acc_t>(K, fresh, [&](int64_t k, int64_t n, const V* f) {
                const V Sk = load(S, k, n), zk = load(z, k, n);
                const V rk = vc * fast_exp(at::vec::fmadd(Sk, zk, load(L, k, n)) - vl);
                (Sk * rk).store(dz + k, n);
                if (partial) add_table_grads(dL, dS, k, n, rk, zk, f);
              });
              const int64_t y = r.y;
              dz[y] -= S[y] * c;
              if (partial) {
                dL[y] -= c;
                dS[y] -= c * z[y];
                dW[y] += gamma[i] * (lse_p[i] - (S[y] * z[y] + L[y]));
              }
              narrow(dz, dz_out + i * K, K);
            });
      });
  return {grad_logits, grad_weight, grad_scale, grad_shift};
}

// ------------------------------------------ backward from the residual

// Overwrites `residual` with grad_logits (so the backward allocates no [N, K]
// buffer) and returns the three table gradients.
std::tuple<Tensor, Tensor, Tensor> parametric_ce_backward_from_residual_cpu(
    const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
    const std::optional<Tensor>& group, const Tensor& weight,
    const Tensor& scale, const Tensor& shift, const Tensor& lse,
    Tensor& residual, int64_t ignore_index, bool table_grads) {
  const Sizes s = check_backward_inputs(grad_loss, logits, target, group, weight,
                                        scale, shift, lse);
  check_residual_dtype(logits);
  TORCH_CHECK_VALUE(residual.sizes() == logits.sizes() &&
                        residual.scalar_type() == logits.scalar_type(),
                    "autobalance: `residual` must have the shape and dtype of logits (",
                    logits.sizes(), ", ", dtype_name(logits.scalar_type()), "), got ",
                    residual.sizes(), ", ", dtype_name(residual.scalar_type()));
  check_same_device(residual, "residual", logits);
  Tensor grad_weight, grad_scale, grad_shift;
  std::tie(std::ignore, grad_weight, grad_scale, grad_shift) = backward_outputs(s, logits, weight, false);
  Tensor r_c = residual.contiguous();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "parametric_ce_backward_from_residual_cpu", [&] {
    const Inputs<scalar_t, scalar_t> in(logits, target, group, weight, scale, shift, s,
                                        ignore_index);
    const Tensor gamma_c = grad_loss.contiguous(), lse_c = lse.contiguous();
    const scalar_t* gamma = gamma_c.const_data_ptr<scalar_t>();
    const scalar_t* lse_p = lse_c.const_data_ptr<scalar_t>();
    scalar_t* r_io = r_c.mutable_data_ptr<scalar_t>();
    const int64_t K = in.K, table = in.G * K;
    for_rows<scalar_t>(
        in.N, in.G, K, 0, table_grads,
        {grad_weight.mutable_data_ptr<scalar_t>(), grad_scale.mutable_data_ptr<scalar_t>(),
         grad_shift.mutable_data_ptr<scalar_t>()},
        [&](int64_t i, scalar_t* partial, scalar_t*) {
          const RowIndex ri = in.row(i);
          scalar_t* r = r_io + i * K;  // read as r, written as dz
          if (ri.ignored) {
            std::fill(r, r + K, scalar_t(0));
            return;
          }
          const scalar_t* z = in.z + i * K;
          const scalar_t* S = in.S + ri.g * K;
          scalar_t* dS = partial ? partial + table + ri.g * K : nullptr;
          scalar_t* dL = partial ? partial + 2 * table + ri.g * K : nullptr;
          row_gradient_over_residual(r, z, S, gamma[i], K, dL, dS);
          if (partial) {
            const int64_t y = ri.y;
            const scalar_t a_y = S[y] * z[y] + in.L[ri.g * K + y];
            partial[ri.g * K + y] += gamma[i] * (lse_p[i] - a_y);
          }
        });
  });
  if (!r_c.is_same(residual)) residual.copy_(r_c);
  return {grad_weight, grad_scale, grad_shift};
}

// -------------------------------------------------------- double backward

template <typename scalar_t, typename acc_t, bool HasUz, bool HasUTables>
void double_backward_rows(const Inputs<scalar_t, acc_t>& in, const acc_t* gamma,
                          const acc_t* lse_p, const scalar_t* uz_in,
                          const acc_t* UW, const acc_t* US, const acc_t* UL,
                          bool table_grads, acc_t* dgamma_out,
                          scalar_t* dz_out, std::array<acc_t*, 3> table_out) {
  using V = Vec<acc_t>;
  const int64_t K = in.K, table = in.G * K;
  // scratch: p, v, widened z, widened Uz, narrow-able dz
  for_rows<acc_t>(in.N, in.G, K, 5 * K, table_grads, table_out,
                  [&](int64_t i, acc_t* partial, acc_t* scratch) {
    const RowIndex r = in.row(i);
    if (r.ignored) {
      std::fill(dz_out + i * K, dz_out + (i + 1) * K, scalar_t(0));
      dgamma_out[i] = 0;
      return;
    }
    acc_t* p = scratch;
    acc_t* v = scratch + K;
    const acc_t* z = widen(in.z + i * K, scratch + 2 * K, K);
    const acc_t* Uz = HasUz ? widen(uz_in + i * K, scratch + 3 * K, K) : nullptr;
    acc_t* dz = grad_row(dz_out + i * K, scratch + 4 * K);
    const int64_t off = r.g * K, y = r.y;
    const acc_t *S = in.S + off, *L = in.L + off;
    const acc_t* USg = HasUTables ? US + off : nullptr;
    const acc_t* ULg = HasUTables ? UL + off : nullptr;
    const V vl(lse_p[i]);
    // Pass 1: p_k, v_k = S_k Uz_k + UL_k + US_k z_k, and v̄ = Σ p_k v_k.
    V vbar_acc(acc_t(0));
    for_chunks<acc_t>(K, [&](int64_t k, int64_t n) {
      const V Sk = load(S, k, n), zk = load(z, k, n);
      const V pk = fast_exp(at::vec::fmadd(Sk, zk, load(L, k, n)) - vl);
      V vk(acc_t(0));
      if constexpr (HasUz) vk = Sk * load(Uz, k, n);
      if constexpr (HasUTables)
        vk = at::vec::fmadd(load(USg, k, n), zk, vk + load(ULg, k, n));
      pk.store(p + k, n);
      vk.store(v + k, n);
      vbar_acc = vbar_acc + keep(pk * vk, n, acc_t(0));
    });
    const acc_t vbar = reduce_sum(vbar_acc);
    const acc_t Wy = in.W[off + y];
    const acc_t UWy = UW ? UW[off + y] : acc_t(0);
    // A non-finite lse (a NaN or infinite logit) makes the whole row NaN.
    const acc_t c = nan_unless_finite(lse_p[i], gamma[i] * Wy);    // r_k = c (p_k - [k = y])
    const acc_t cu = nan_unless_finite(lse_p[i], gamma[i] * UWy);  // t_k = p_k (c (v_k - v̄) + cu) - cu [k = y]
    const acc_t ce = lse_p[i] - (S[y] * z[y] + L[y]);
    const acc_t dv = vbar - v[y];
    dgamma_out[i] = nan_unless_finite(lse_p[i], Wy * dv + UWy * ce);
    // Pass 2: the k = y corrections of r and t are added after the loop.
    acc_t* dW = partial ? partial + off : nullptr;
    acc_t* dS = partial ? partial + table + off : nullptr;
    acc_t* dL = partial ? partial + 2 * table + off : nullptr;
    const V vc(c), vcu(cu), vvbar(vbar);
    for_chunks<acc_t>(K, [&](int64_t k, int64_t n) {
      const V pk = load(p, k, n);
      const V tk = pk * at::vec::fmadd(vc, load(v, k, n) - vvbar, vcu);
      V dzk = load(S, k, n) * tk;
      if constexpr (HasUTables) dzk = at::vec::fmadd(load(USg, k, n), vc * pk, dzk);
      dzk.store(dz + k, n);
      if (partial) {
        V dSk = at::vec::fmadd(load(z, k, n), tk, load(dS, k, n));
        if constexpr (HasUz) dSk = at::vec::fmadd(load(Uz, k, n), vc * pk, dSk);
        dSk.store(dS + k, n);
        (load(dL, k, n) + tk).store(dL + k, n);
      }
    });
    dz[y] -= S[y] * cu;
    if constexpr (HasUTables) dz[y] -= USg[y] * c;
    if (partial) {
      dS[y] -= z[y] * cu;
      if constexpr (HasUz) dS[y] -= Uz[y] * c;
      dL[y] -= cu;
      dW[y] += gamma[i] * dv;
    }
    narrow(dz, dz_out + i * K, K);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>
parametric_ce_double_backward_cpu(
    const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
    const std::optional<Tensor>& group, const Tensor& weight,
    const Tensor& scale, const Tensor& shift, const Tensor& lse,
    const std::optional<Tensor>& u_logits,
    const std::optional<Tensor>& u_weight,
    const std::optional<Tensor>& u_scale,
    const std::optional<Tensor>& u_shift, int64_t ignore_index,
    bool table_grads) {
  const Sizes s = check_backward_inputs(grad_loss, logits, target, group, weight,
                                        scale, shift, lse);
  check_cotangents(logits, s, u_logits, u_weight, u_scale, u_shift);
  Tensor grad_grad_loss = at::empty({s.rows}, grad_loss.options());
  Tensor grad_logits, grad_weight, grad_scale, grad_shift;
  std::tie(grad_logits, grad_weight, grad_scale, grad_shift) = backward_outputs(s, logits, weight);
  const bool has_uz = u_logits.has_value();
  const bool has_ut = u_scale.has_value() || u_shift.has_value();
  // A missing one of US/UL is zero; the pair shares one kernel path.
  const auto table_or_zeros = [&](const std::optional<Tensor>& t) {
    return t.has_value() ? t->contiguous() : at::zeros_like(weight);
  };
  const Tensor US = has_ut ? table_or_zeros(u_scale) : Tensor();
  const Tensor UL = has_ut ? table_or_zeros(u_shift) : Tensor();
  const Tensor UW = u_weight.has_value() ? u_weight->contiguous() : Tensor();
  const Tensor Uz = has_uz ? u_logits->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(),
      "parametric_ce_double_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Inputs<scalar_t, acc_t> in(logits, target, group, weight, scale,
                                         shift, s, ignore_index);
        const Tensor gamma_c = grad_loss.contiguous(), lse_c = lse.contiguous();
        const auto ptr = [](const Tensor& t) {
          return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
        };
        const scalar_t* uz = has_uz ? Uz.const_data_ptr<scalar_t>() : nullptr;
        const std::array<acc_t*, 3> out = {grad_weight.mutable_data_ptr<acc_t>(),
                                           grad_scale.mutable_data_ptr<acc_t>(),
                                           grad_shift.mutable_data_ptr<acc_t>()};
        auto run = [&](auto has_uz_c, auto has_ut_c) {
          double_backward_rows<scalar_t, acc_t, decltype(has_uz_c)::value,
                               decltype(has_ut_c)::value>(
              in, gamma_c.const_data_ptr<acc_t>(), lse_c.const_data_ptr<acc_t>(),
              uz, ptr(UW), ptr(US), ptr(UL), table_grads,
              grad_grad_loss.mutable_data_ptr<acc_t>(),
              grad_logits.mutable_data_ptr<scalar_t>(), out);
        };
        using T = std::true_type;
        using F = std::false_type;
        if (has_uz && has_ut) run(T{}, T{});
        else if (has_uz) run(T{}, F{});
        else if (has_ut) run(F{}, T{});
        else run(F{}, F{});
      });
  return {grad_grad_loss, grad_logits, grad_weight, grad_scale, grad_shift};
}

}  // namespace

// The number of distinct threads that run the row loop for rows x classes
// (what the kernels' at::parallel_for actually gets; a build without OpenMP
// flags silently gets 1).
int64_t parallel_threads_cpu(int64_t rows, int64_t classes) {
  TORCH_CHECK_VALUE(rows >= 0 && classes >= 1, "autobalance: expected rows >= 0 and classes >= 1, got ",
                    rows, " and ", classes);
  std::mutex mutex;
  std::set<std::thread::id> ids;
  at::parallel_for(0, rows, row_grain(classes), [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mutex);
    ids.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(ids.size());
}

TORCH_LIBRARY_IMPL(autobalance, CPU, m) {
  m.impl("parametric_ce", &parametric_ce_cpu);
  m.impl("parametric_ce_backward", &parametric_ce_backward_cpu);
  m.impl("parametric_ce_double_backward", &parametric_ce_double_backward_cpu);
  m.impl("_parametric_ce_with_residual", &parametric_ce_with_residual_cpu);
  m.impl("_parametric_ce_reduced_with_gradient", &parametric_ce_reduced_with_gradient_cpu);
  m.impl("_parametric_ce_backward_from_residual_", &parametric_ce_backward_from_residual_cpu);
}

}  // namespace autobalance
