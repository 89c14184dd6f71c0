// The row loop of the CPU kernels: rows spread over threads with
// at::parallel_for, per-thread scratch kept between calls, deterministic
// table-gradient sums, the inputs as raw pointers, and a row's gradient from
// its residual (shared by the forward with gradients and the backward).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../parametric_ce_math.h"
#include "vec.h"

namespace autobalance {
namespace cpu C10_HIDDEN {  // as in vec.h

using at::Tensor;

// One sample after its index lookups. `ignored` rows are skipped entirely.
struct RowIndex {
  int64_t y;
  int64_t g;
  bool ignored;
};

// `target` null: a probability target (no label: y = -1, never ignored).
inline RowIndex read_row(int64_t i, const int64_t* target, const int64_t* group,
                         int64_t K, int64_t G, int64_t ignore_index) {
  if (!target) {
    const int64_t g = group ? group[i] : 0;
    check_row_indices(i, 0, g, K, G, ignore_index);
    return {-1, g, false};
  }
  const int64_t y = target[i];
  if (y == ignore_index) return {y, 0, true};
  const int64_t g = group ? group[i] : 0;
  check_row_indices(i, y, g, K, G, ignore_index);
  return {y, g, false};
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

// The row blocks of the table gradients: `count` blocks of `rows` rows (the
// last one shorter), each summing into its own partial [3, G, K] tables. At
// most 64 blocks of at least 16 rows, and fewer, larger blocks when G K is
// large, so that the partials take at most kMaxPartialBytes (or one block's
// tables, when those alone are larger). A function of the shape and dtype
// only, never of the thread count: the sums are bit-identical whatever it is.
constexpr int64_t kMaxPartialBytes = int64_t(32) << 20;

struct RowBlocks {
  int64_t rows, count;
};

inline RowBlocks table_blocks(int64_t N, int64_t G, int64_t K, int64_t acc_bytes) {
  constexpr int64_t kMaxBlocks = 64, kMinRows = 16;
  const int64_t fit = kMaxPartialBytes / (3 * G * K * acc_bytes);
  const int64_t most = std::clamp<int64_t>(fit, 1, kMaxBlocks);
  const int64_t rows = std::max<int64_t>((N + most - 1) / most, kMinRows);
  return {rows, std::max<int64_t>((N + rows - 1) / rows, 1)};
}

// Runs span_fn(i, n, partial, scratch) over the rows [0, N) in consecutive
// spans of n <= `span` rows (so that a kernel can interleave the rows of a
// span). With table gradients, rows go to the fixed blocks of table_blocks;
// each block sums into its own partial [3, G, K] tables (W, S, L)
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
  const int64_t table = G * K;
  const auto [rows_per_block, blocks] = table_blocks(N, G, K, sizeof(acc_t));
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
  const int64_t* target;  // class indices, or null with a probability target
  const scalar_t* P;      // the probability target [N, K], or null
  const int64_t* group;
  const acc_t *W, *S, *L;
  int64_t N, K, G, ignore_index;
  int64_t D;  // spatial logits [B, K, D] (Sizes::inner; 1 for [N, K])

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
        target(s.probs ? nullptr : target_c.const_data_ptr<int64_t>()),
        P(s.probs ? target_c.const_data_ptr<scalar_t>() : nullptr),
        group(group_c.defined() ? group_c.const_data_ptr<int64_t>() : nullptr),
        W(weight_c.const_data_ptr<acc_t>()),
        S(scale_c.const_data_ptr<acc_t>()),
        L(shift_c.const_data_ptr<acc_t>()),
        N(s.rows),
        K(s.classes),
        G(s.groups),
        ignore_index(ignore),
        D(s.inner) {}

  // Row i of `x` (the logits, or a probability target of their layout) as a
  // contiguous row in the accumulation type: in place, widened, or for spatial
  // logits gathered with class stride D into `buf`. Consecutive rows of a
  // spatial block share their cache lines, so the gather reads each line once.
  const acc_t* row_in(const scalar_t* x, int64_t i, acc_t* buf) const {
    if (D == 1) return widen(x + i * K, buf, K);
    const scalar_t* p = x + (i / D) * K * D + i % D;
    for (int64_t k = 0; k < K; ++k) buf[k] = static_cast<acc_t>(p[k * D]);
    return buf;
  }

  // Row i of an output of the logits' layout: `out` itself ([N, K]), or for
  // spatial logits `row` (a scratch row) scattered with class stride D by
  // row_out_done.
  acc_t* row_out(acc_t* out, int64_t i, acc_t* row) const { return D == 1 ? out + i * K : row; }
  void row_out_done(acc_t* out, int64_t i, const acc_t* row) const {
    if (D == 1) return;
    acc_t* p = out + (i / D) * K * D + i % D;
    for (int64_t k = 0; k < K; ++k) p[k * D] = row[k];
  }

  RowIndex row(int64_t i) const {
    return read_row(i, target, group, K, G, ignore_index);
  }
};

// ----------------------------------------- a row's gradient from its residual

// The residual path takes float32/float64 logits only (r is kept in their dtype).
inline void check_residual_dtype(const Tensor& logits) {
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
                   "autobalance: the residual path takes float32 or float64 `logits`, got ",
                   dtype_name(logits.scalar_type()));
}

// grad_logits [N, K] (undefined unless `with_logits`) and the zeroed
// grad_weight, grad_scale, grad_shift [G, K].
inline std::tuple<Tensor, Tensor, Tensor, Tensor> backward_outputs(const Sizes& s,
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
  math::add_grad_shift(load(dL, k, n), once).store(dL + k, n);
  math::add_grad_scale(load(dS, k, n), once, zk).store(dS + k, n);
}

// The dense part of a row's target (checks.h: TargetCoefficients): its P row
// (widened; null without a probability target) and the coefficients as
// vectors. d(k, n) = β P_k + γ over a chunk.
template <typename T>
struct DenseRow {
  const T* P;
  Vec<T> beta, gamma;

  DenseRow(const T* P_, const TargetCoefficients<T>& q) : P(P_), beta(q.beta), gamma(q.gamma) {}
  Vec<T> d(int64_t k, int64_t n) const {
    return P ? math::dense_target(beta, load(P, k, n), gamma) : gamma;
  }
};

// Σ_k d_k W_k over a row (the dense part of Σ = Σ_k q_k W_k), and likewise
// for another table (UW) when `U` is given: {Σ d W, Σ d U}.
template <typename T>
std::pair<T, T> dense_weight_sums(const DenseRow<T>& q, const T* W, const T* U, int64_t K) {
  Vec<T> sw(T(0)), su(T(0));
  for_chunks<T>(K, [&](int64_t k, int64_t n) {
    const Vec<T> dk = q.d(k, n);
    sw = sw + keep(dk * load(W, k, n), n, T(0));
    if (U) su = su + keep(dk * load(U, k, n), n, T(0));
  });
  return {reduce_sum(sw), reduce_sum(su)};
}

// dz = S r over one row with r = c R (R: the kept residual, or the
// exponentials with 1/sum folded into c), written over R, and (with `dL`,
// `dS`) the row's share of the table gradients dL += r, dS += r z. Disjoint
// chunks (a masked tail, not for_lanes' overlapping last chunk): each lane of
// R is read before it is overwritten.
template <typename T>
inline void row_gradient_over_residual(T* R, const T* z, const T* S, T c, int64_t K, T* dL,
                                       T* dS) {
  const Vec<T> vc(c);
  for_chunks<T>(K, [&](int64_t k, int64_t n) {
    const Vec<T> rk = math::residual(vc, load(R, k, n));
    if (dL) add_table_grads<T>(dL, dS, k, n, rk, load(z, k, n), nullptr);
    math::grad_logit(load(S, k, n), rk).store(R + k, n);
  });
}

}  // namespace cpu
}  // namespace autobalance
