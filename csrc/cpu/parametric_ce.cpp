// CPU forward of the parametric cross-entropy (docs/math.md section 1) in three
// modes: the loss alone, the loss with the residual that a backward reads
// instead of recomputing the softmax, and the loss with the gradients of its
// sum or mean. The backward ops are in parametric_ce_backward.cpp, the math
// of an element in ../parametric_ce_math.h, the vector helpers in vec.h and
// the row loop in rows.h. Rows are spread over threads with at::parallel_for;
// the inner loops over classes use at::vec::Vectorized. Reduced-precision
// logits (bfloat16, float16) are widened row by row and everything
// accumulates in float32 (float64 for float64 logits).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <limits>
#include <mutex>
#include <set>
#include <thread>
#include <utility>

#include "../checks.h"
#include "../parametric_ce_math.h"
#include "rows.h"
#include "vec.h"

namespace autobalance {
namespace cpu {
namespace {

// a = S z + L over one chunk.
template <typename T>
inline Vec<T> adjusted_logits(const T* S, const T* z, const T* L, int64_t k, int64_t n) {
  return math::adjusted_logit(load(S, k, n), load(z, k, n), load(L, k, n));
}

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
    vmax = max_step(vmax, keep(adjusted_logits(S, z, L, k, n), n, lowest));
  });
  const acc_t m = reduce_max(vmax);
  V vsum(acc_t(0));
  const V vm(m);
  for_lanes<acc_t>(K, fresh, [&](int64_t k, int64_t n, const V* f) {
    const V ek = fast_exp(adjusted_logits(S, z, L, k, n) - vm);
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
    max_a = max_step(max_a, keep(adjusted_logits(a.S, a.z, a.L, k, n), n, lowest));
    max_b = max_step(max_b, keep(adjusted_logits(b.S, b.z, b.L, k, n), n, lowest));
  });
  const acc_t ma = reduce_max(max_a), mb = reduce_max(max_b);
  const V vma(ma), vmb(mb);
  V sum_a(acc_t(0)), sum_b(acc_t(0));
  for_lanes<acc_t>(K, fresh, [&](int64_t k, int64_t n, const V* f) {
    const V ea = fast_exp(adjusted_logits(a.S, a.z, a.L, k, n) - vma);
    const V eb = fast_exp(adjusted_logits(b.S, b.z, b.L, k, n) - vmb);
    if (a.e) ea.store(a.e + k, n);
    if (b.e) eb.store(b.e + k, n);
    sum_a = sum_a + counted(ea, n, f);
    sum_b = sum_b + counted(eb, n, f);
  });
  return {std::make_pair(ma, reduce_sum(sum_a)), std::make_pair(mb, reduce_sum(sum_b))};
}

// The forward with the gradients of a sum or mean (Keep::kGradient) for
// spatial logits [B, K, D] with one group row (G == 1): positions in vectors
// of W consecutive ones (of one b), one class at a time, so every load and
// store is contiguous in the NCHW layout and nothing is transposed. Rows
// [i0, i0 + n0); the math of finish / finish_dense with the row's
// terms per lane: `a` = d reduced / d loss_i; the table gradients are summed
// per lane in `buf` ([3, K, W]: W, S, L) and added to `partial` at the end.
// Deterministic: the lanes and their order depend only on the shape.
template <typename scalar_t, typename acc_t>
void spatial_gradient_span(const Inputs<scalar_t, acc_t>& in, const TargetCoefficients<acc_t>& q, acc_t a,
                           int64_t i0, int64_t n0, acc_t* loss_p, acc_t* lse_p, acc_t* out,
                           acc_t* partial, acc_t* buf) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    TORCH_CHECK(false, "autobalance: spatial logits need float32 or float64 here");  // never called
  } else {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t K = in.K, D = in.D;
  const acc_t lowest = -std::numeric_limits<acc_t>::infinity();
  acc_t* acc = buf;            // [3, K, W] per-lane table gradients
  acc_t* E = buf + 3 * K * W;  // [K, W] exponentials of one vector of positions
  if (partial) std::fill(acc, acc + 3 * K * W, acc_t(0));
  const V zero(acc_t(0)), va(a), valpha(q.alpha), vbeta(q.beta), vgamma(q.gamma);
  for (int64_t i = i0; i < i0 + n0;) {
    const int64_t b = i / D, j = i % D, n = std::min({W, i0 + n0 - i, D - j});
    const int64_t base = b * K * D + j;  // class k of lane l at base + k D + l
    // the lanes' labels (as acc_t: K < 2^24 is checked by the caller; -1 for
    // none) and which lanes are rows (not ignored, not past n)
    acc_t label[W], row[W];
    for (int64_t l = 0; l < W; ++l) {
      const RowIndex ri = l < n ? in.row(i + l) : RowIndex{-1, 0, true};
      label[l] = ri.ignored ? acc_t(-1) : acc_t(ri.y);
      row[l] = ri.ignored ? acc_t(0) : acc_t(1);
    }
    const V vy = V::loadu(label), live = V::loadu(row) == V(acc_t(1));
    const auto z_at = [&](int64_t k) { return load(in.z + base + k * D, 0, n); };
    const auto d_at = [&](int64_t k) {  // d_k = β P_k + γ
      return in.P ? math::dense_target(vbeta, load(in.P + base + k * D, 0, n), vgamma) : vgamma;
    };
    V m(lowest);
    for (int64_t k = 0; k < K; ++k)
      m = max_step(m, keep(math::adjusted_logit(V(in.S[k]), z_at(k), V(in.L[k])), n, lowest));
    V sum(acc_t(0)), a_y(acc_t(0)), W_y(acc_t(0)), dense_w(acc_t(0));
    for (int64_t k = 0; k < K; ++k) {
      const V ak = math::adjusted_logit(V(in.S[k]), z_at(k), V(in.L[k]));
      const V e = fast_exp(ak - m);
      e.store(E + k * W);
      sum = sum + keep(e, n, acc_t(0));
      const V at_y = vy == V(acc_t(k));
      a_y = V::blendv(a_y, ak, at_y);
      W_y = V::blendv(W_y, V(in.W[k]), at_y);
      if (q.dense) dense_w = dense_w + d_at(k) * V(in.W[k]);
    }
    const V lse = m + sum.log();
    // A non-finite lse (a NaN or infinite logit) makes the lane's row NaN.
    const V finite = (lse - lse) == zero;
    const V nan(std::numeric_limits<acc_t>::quiet_NaN());
    const V label_w = valpha * W_y;  // α W_y, 0 without a label
    const V c = V::blendv(nan, va * (label_w + dense_w) / sum, finite);
    const V c_label = V::blendv(nan, va * label_w, finite);
    const V ce_y = math::cross_entropy(lse, a_y);
    V loss = math::loss(label_w, ce_y);
    for (int64_t k = 0; k < K; ++k) {
      const V zk = z_at(k), Sk(in.S[k]), Wk(in.W[k]);
      const V at_y = vy == V(acc_t(k));
      const V scaled_e = c * V::loadu(E + k * W);
      V r = V::blendv(scaled_e, scaled_e - c_label, at_y);
      V dW = V::blendv(zero, math::grad_weight(va * valpha, ce_y), at_y);
      if (q.dense) {
        const V dk = d_at(k), ad = va * dk;
        const V nlp = math::cross_entropy(lse, math::adjusted_logit(Sk, zk, V(in.L[k])));
        r = r - ad * Wk;
        loss = loss + math::loss(dk * Wk, nlp);
        dW = dW + math::grad_weight(ad, nlp);
      }
      r = V::blendv(zero, r, live);
      math::grad_logit(Sk, r).store(out + base + k * D, n);
      if (partial) {
        acc_t* dWk = acc + k * W;
        acc_t* dSk = acc + (K + k) * W;
        acc_t* dLk = acc + (2 * K + k) * W;
        (V::loadu(dWk) + V::blendv(zero, dW, live)).store(dWk);
        math::add_grad_scale(V::loadu(dSk), r, V::blendv(zero, zk, live)).store(dSk);
        math::add_grad_shift(V::loadu(dLk), r).store(dLk);
      }
    }
    V::blendv(zero, loss, live).store(loss_p + i, n);
    V::blendv(zero, lse, live).store(lse_p + i, n);
    i += n;
  }
  if (partial) {
    for (int64_t t = 0; t < 3; ++t)
      for (int64_t k = 0; k < K; ++k) partial[t * K + k] += reduce_sum(V::loadu(acc + (t * K + k) * W));
  }
  }
}

// What the forward keeps besides (loss, lse).
enum class Keep {
  kNothing,
  // the residual r = W_y (p - e_y) [N, K] that a backward not differentiated
  // again reads instead of recomputing the softmax (that backward then needs
  // no exponential: with u the upstream gradient, dz = u S r, dL = sum u r,
  // dS = sum u r z);
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
    Keep keep, bool mean = false, bool table_grads = false, double label_smoothing = 0.0) {
  // kGradient also takes spatial logits [B, K, D] (Sizes::spatial): its
  // gradient row is scattered back to their layout, so NCHW images need no
  // transposed copy.
  const Sizes s = check_inputs(logits, target, group, weight, scale, shift, keep == Keep::kGradient);
  check_label_smoothing(label_smoothing);
  if (keep != Keep::kNothing) check_residual_dtype(logits);
  if (keep == Keep::kResidual) {
    check_class_indices(s);
    check_one_hot(label_smoothing);
  }
  const bool gradient = keep == Keep::kGradient;
  table_grads = table_grads && gradient;
  const auto acc_opts = logits.options().dtype(accumulate_type(logits.scalar_type()));
  ForwardOut out;
  out.loss = at::empty({s.rows}, acc_opts);
  out.lse = at::empty({s.rows}, acc_opts);
  if (keep != Keep::kNothing) out.kept = at::empty(logits.sizes(), acc_opts);
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
        // the factor a = d reduced / d loss_i (1 / sum_i W[g_i, y_i] for a mean,
        // 1 / N for the mean of a probability target, whose counts stay 0).
        acc_t a = 1, denominator = 0;
        if (gradient && in.P) {
          if (mean) a = acc_t(1) / acc_t(in.N);
        } else if (gradient) {
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
        const auto q = target_coefficients<acc_t>(s, label_smoothing);
        // A target with a dense part (docs/math.md section 8): the loss
        // α W_y nlp_y + Σ_k d_k W_k nlp_k and, with kGradient, from the
        // exponentials e in r, the gradient row r_k = a (Σ e_k / sum - d_k W_k)
        // (less a α W_y at the label) with its table terms, in one pass after
        // Σ = Σ_k q_k W_k. Without r (the loss-only mode), the loss alone.
        auto finish_dense = [&](int64_t i, const RowIndex& ri, const acc_t* z, acc_t m, acc_t sum,
                                acc_t* r, acc_t* partial, const acc_t* P_row) {
          const int64_t off = ri.g * K, y = ri.y;
          const acc_t *S = in.S + off, *L = in.L + off, *W = in.W + off;
          const acc_t l = m + std::log(sum);
          const DenseRow<acc_t> d(P_row, q);
          const acc_t Wy = y >= 0 ? q.alpha * W[y] : acc_t(0);
          const Vec<acc_t> va(a), vl(l);
          Vec<acc_t> vc;
          if (r) {
            const acc_t sigma = dense_weight_sums<acc_t>(d, W, nullptr, K).first + Wy;
            // A non-finite lse (a NaN or infinite logit) makes the whole row NaN.
            vc = Vec<acc_t>(nan_unless_finite(l, a * sigma / sum));
          }
          acc_t* dW = partial ? partial + off : nullptr;
          acc_t* dS = partial ? partial + table + off : nullptr;
          acc_t* dL = partial ? partial + 2 * table + off : nullptr;
          Vec<acc_t> total(acc_t(0));
          for_chunks<acc_t>(K, [&](int64_t k, int64_t n) {
            const Vec<acc_t> Sk = load(S, k, n), zk = load(z, k, n), Wk = load(W, k, n);
            const Vec<acc_t> nlp = math::cross_entropy(vl, math::adjusted_logit(Sk, zk, load(L, k, n)));
            const Vec<acc_t> dk = d.d(k, n);
            // (cpu::keep: `keep` is this function's mode)
            total = total + cpu::keep(math::loss(dk * Wk, nlp), n, acc_t(0));
            if (!r) return;
            const Vec<acc_t> ad = va * dk;
            const Vec<acc_t> rk = math::dense_residual(vc, load(r, k, n), ad, Wk);
            if (partial) {
              add_table_grads<acc_t>(dL, dS, k, n, rk, zk, nullptr);
              (load(dW, k, n) + math::grad_weight(ad, nlp)).store(dW + k, n);
            }
            math::grad_logit(Sk, rk).store(r + k, n);
          });
          acc_t out = reduce_sum(total);
          if (y >= 0) {
            const acc_t ce = math::cross_entropy(l, math::adjusted_logit(S[y], z[y], L[y]));
            out += math::loss(Wy, ce);
            if (r) {
              math::residual_label(nan_unless_finite(l, math::residual_scale(a, Wy)), S[y], z[y], r[y],
                                   partial ? dS + y : nullptr, partial ? dL + y : nullptr);
              if (partial) dW[y] += math::grad_weight(a * q.alpha, ce);
            }
          }
          lse_p[i] = l;
          loss_p[i] = out;
        };
        // After the row's exponential sum: loss, lse and what the mode keeps
        // (in r: the row's exponentials on entry; null in the loss-only mode).
        auto finish = [&](int64_t i, const RowIndex& ri, const acc_t* z, acc_t m, acc_t sum,
                          acc_t* r, acc_t* partial, const acc_t* P_row) {
          if (q.dense) return finish_dense(i, ri, z, m, sum, r, partial, P_row);
          const int64_t y = ri.y;
          const acc_t* S = in.S + ri.g * K;
          const acc_t* L = in.L + ri.g * K;
          const acc_t l = m + std::log(sum);
          const acc_t Wy = in.W[ri.g * K + y];
          const acc_t ce = math::cross_entropy(l, math::adjusted_logit(S[y], z[y], L[y]));
          lse_p[i] = l;
          loss_p[i] = math::loss(Wy, ce);
          if (!r) return;
          // r holds the exponentials e = sum p: with 1/sum folded into c, the
          // residual is c e - Wy [k = y].
          // A non-finite lse (a NaN or infinite logit) makes the whole row NaN.
          const acc_t c = nan_unless_finite(l, Wy / sum);
          if (!gradient) {
            const Vec<acc_t> vc(c);
            for_chunks<acc_t>(K, [&](int64_t k, int64_t n) {
              math::residual(vc, load(r, k, n)).store(r + k, n);
            });
            r[y] -= Wy;
            return;
          }
          // The gradient row from e in one pass (upstream gradient a), then
          // the label's terms.
          acc_t* dS = partial ? partial + table + ri.g * K : nullptr;
          acc_t* dL = partial ? partial + 2 * table + ri.g * K : nullptr;
          row_gradient_over_residual(r, z, S, math::residual_scale(a, c), K, dL, dS);
          math::residual_label(math::residual_scale(a, Wy), S[y], z[y], r[y],
                               partial ? dS + y : nullptr, partial ? dL + y : nullptr);
          if (partial) partial[ri.g * K + y] += math::grad_weight(a, ce);
        };
        if (!r_out) {
          // loss and lse only: a row at a time (pairing does not pay here)
          for_rows<acc_t>(in.N, in.G, K, 2 * K, false, tables,
                          [&](int64_t i, acc_t* partial, acc_t* buf) {
            const RowIndex ri = in.row(i);
            if (ri.ignored) {
              loss_p[i] = lse_p[i] = 0;
              return;
            }
            const acc_t* z = widen(in.z + i * K, buf, K);
            const auto [m, sum] =
                row_exp_sum(z, in.S + ri.g * K, in.L + ri.g * K, K, (acc_t*)nullptr, fresh);
            finish(i, ri, z, m, sum, nullptr, partial, in.P ? widen(in.P + i * K, buf + K, K) : nullptr);
          });
        } else {
          // Rows in pairs (their exponential sums interleaved); one at a time
          // where a pair has an ignored row, and for the last row of an odd span.
          // Spatial logits go in spans of kTile rows: the span's logits (and
          // probability target) transposed into [n, K] rows in scratch, its
          // gradient rows transposed back at the end (Inputs::tile_in, tile_out).
          constexpr int64_t kTile = 16;
          const bool spatial = in.D > 1;
          // spatial logits with one group row: vectors over positions
          const bool by_positions = spatial && in.G == 1 && K < (int64_t(1) << 24);
          if (by_positions) {
            constexpr int64_t kSpan = 256, kW = Vec<acc_t>::size();
            for_row_spans<acc_t>(in.N, in.G, K, kSpan, 4 * K * kW, table_grads, tables,
                                 [&](int64_t i0, int64_t n0, acc_t* partial, acc_t* buf) {
              spatial_gradient_span(in, q, a, i0, n0, loss_p, lse_p, r_out, partial, buf);
            });
          }
          // scratch: two widened rows and a probability target row, or the
          // span's logits, probability target and gradient rows
          if (!by_positions)
          for_row_spans<acc_t>(in.N, in.G, K, spatial ? kTile : 2, (spatial ? 3 * kTile : 3) * K,
                               table_grads, tables,
                               [&](int64_t i0, int64_t n0, acc_t* partial, acc_t* buf) {
            acc_t *zt = buf, *pt = buf + kTile * K, *rt = buf + 2 * kTile * K;
            if (spatial) {
              in.tile_in(in.z, i0, n0, zt);
              if (in.P) in.tile_in(in.P, i0, n0, pt);
            }
            const auto p_row = [&](int64_t i) -> const acc_t* {
              if (!in.P) return nullptr;
              return spatial ? pt + (i - i0) * K : widen(in.P + i * K, buf + 2 * K, K);
            };
            for (int64_t i = i0; i < i0 + n0; i += 2) {
              const int64_t n = std::min<int64_t>(2, i0 + n0 - i);
              std::array<RowIndex, 2> ri;
              std::array<ExpRow<acc_t>, 2> rows;
              int64_t live = 0;
              for (int64_t j = 0; j < n; ++j) {
                ri[j] = in.row(i + j);
                acc_t* r = spatial ? rt + (i + j - i0) * K : r_out + (i + j) * K;
                if (ri[j].ignored) {
                  loss_p[i + j] = lse_p[i + j] = 0;
                  std::fill(r, r + K, acc_t(0));
                  continue;
                }
                const acc_t* z = spatial ? zt + (i + j - i0) * K : widen(in.z + (i + j) * K, buf + j * K, K);
                rows[j] = {z, in.S + ri[j].g * K, in.L + ri[j].g * K, r};
                ++live;
              }
              if (live == 2) {
                const auto sums = row_exp_sum_pair(rows[0], rows[1], K, fresh);
                for (int64_t j = 0; j < 2; ++j)
                  finish(i + j, ri[j], rows[j].z, sums[j].first, sums[j].second, rows[j].e, partial,
                         p_row(i + j));
                continue;
              }
              for (int64_t j = 0; j < n; ++j) {
                if (ri[j].ignored) continue;
                const auto [m, sum] = row_exp_sum(rows[j].z, rows[j].S, rows[j].L, K, rows[j].e, fresh);
                finish(i + j, ri[j], rows[j].z, m, sum, rows[j].e, partial, p_row(i + j));
              }
            }
            if (spatial) in.tile_out(rt, i0, n0, r_out);
          });
        }
        if (gradient && mean && table_grads && !in.P) {
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
    const Tensor& scale, const Tensor& shift, int64_t ignore_index, double label_smoothing) {
  auto out = forward_cpu(logits, target, group, weight, scale, shift, ignore_index, Keep::kNothing,
                         false, false, label_smoothing);
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
    bool table_grads, double label_smoothing) {
  auto out = forward_cpu(logits, target, group, weight, scale, shift, ignore_index,
                         Keep::kGradient, mean, table_grads, label_smoothing);
  return {out.loss, out.lse, out.counts, out.kept, out.grad_weight, out.grad_scale,
          out.grad_shift};
}

}  // namespace
}  // namespace cpu

// The number of distinct threads that run the row loop for rows x classes
// (what the kernels' at::parallel_for actually gets; a build without OpenMP
// flags silently gets 1).
int64_t parallel_threads_cpu(int64_t rows, int64_t classes) {
  TORCH_CHECK_VALUE(rows >= 0 && classes >= 1, "autobalance: expected rows >= 0 and classes >= 1, got ",
                    rows, " and ", classes);
  std::mutex mutex;
  std::set<std::thread::id> ids;
  at::parallel_for(0, rows, cpu::row_grain(classes), [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mutex);
    ids.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(ids.size());
}

// The bytes of partial tables the CPU kernels' table gradients keep for rows
// x (groups, classes), float32 or float64 accumulators (cpu::table_blocks).
int64_t table_grad_scratch_cpu(int64_t rows, int64_t groups, int64_t classes, bool float64) {
  TORCH_CHECK_VALUE(rows >= 0 && groups >= 1 && classes >= 1, "autobalance: expected rows >= 0, "
                    "groups >= 1 and classes >= 1, got ", rows, ", ", groups, " and ", classes);
  const int64_t bytes = float64 ? sizeof(double) : sizeof(float);
  return cpu::table_blocks(rows, groups, classes, bytes).count * 3 * groups * classes * bytes;
}

TORCH_LIBRARY_IMPL(autobalance, CPU, m) {
  m.impl("parametric_ce", &cpu::parametric_ce_cpu);
  m.impl("_parametric_ce_with_residual", &cpu::parametric_ce_with_residual_cpu);
  m.impl("_parametric_ce_reduced_with_gradient", &cpu::parametric_ce_reduced_with_gradient_cpu);
}

}  // namespace autobalance
