// Argument checks shared by every backend, and the one argument convention
// they share (table_cotangents). Each message names the argument, what it got
// and what was expected; the TORCH_CHECK_* flavour picks the Python exception
// (TypeError, ValueError, IndexError).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <optional>
#include <string>
#include <utility>

namespace autobalance {

struct Sizes {
  int64_t rows;     // N
  int64_t classes;  // K
  int64_t groups;   // G
  bool probs;       // `target` is a probability target [N, K], not class indices [N]
  // Spatial logits [B, K, D] (class dimension 1, e.g. NCHW images with D = H W):
  // row r = b D + j has the logits [b, :, j], with class stride D; the target
  // and group are [B, D] (a probability target [B, K, D]) and rows = B D.
  // 1 for [N, K] logits.
  int64_t inner = 1;
  bool spatial = false;
};

// Dtype names as Python spells them, so C++ and Python errors read alike.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// float64 logits accumulate in float64; everything else in float32.
inline at::ScalarType accumulate_type(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same_device(const at::Tensor& t, const char* name,
                              const at::Tensor& logits) {
  TORCH_CHECK_VALUE(t.device() == logits.device(), "autobalance: `", name,
                    "` is on ", t.device(), " but `logits` is on ",
                    logits.device(), "; move both to the same device");
}

inline void check_table(const at::Tensor& t, const char* name,
                        const Sizes& s, at::ScalarType acc) {
  TORCH_CHECK_TYPE(t.scalar_type() == acc, "autobalance: `", name,
                   "` must have dtype ", dtype_name(acc),
                   " for logits of this dtype, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == s.groups &&
                        t.size(1) == s.classes,
                    "autobalance: `", name, "` must have shape [G, K] = [",
                    s.groups, ", ", s.classes, "], got ", t.sizes());
}

inline void check_index(const at::Tensor& t, const char* name,
                        const Sizes& s) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "autobalance: `", name,
                   "` must have dtype torch.int64, got ", dtype_name(t.scalar_type()));
  if (s.spatial) {
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) * t.size(1) == s.rows && t.size(1) == s.inner,
                      "autobalance: `", name, "` must have shape [B, D] = [", s.rows / s.inner,
                      ", ", s.inner, "] to match spatial logits [B, K, D], got ", t.sizes());
    return;
  }
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == s.rows, "autobalance: `",
                    name, "` must have shape [N] = [", s.rows,
                    "] to match logits, got ", t.sizes());
}

inline void check_per_row(const at::Tensor& t, const char* name,
                          const Sizes& s, at::ScalarType acc,
                          const at::Tensor& logits) {
  TORCH_CHECK_TYPE(t.scalar_type() == acc, "autobalance: `", name,
                   "` must have dtype ", dtype_name(acc), ", got ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == s.rows, "autobalance: `",
                    name, "` must have shape [N] = [", s.rows, "], got ",
                    t.sizes());
  check_same_device(t, name, logits);
}

// Checks logits, target, group and the three tables; returns N, K, G. With
// `spatial`, [B, K, D] logits are taken too (Sizes::spatial).
inline Sizes check_inputs(const at::Tensor& logits, const at::Tensor& target,
                          const std::optional<at::Tensor>& group,
                          const at::Tensor& weight, const at::Tensor& scale,
                          const at::Tensor& shift, bool spatial = false) {
  const auto dt = logits.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble ||
                       dt == at::kBFloat16 || dt == at::kHalf,
                   "autobalance: `logits` must be float32, float64, bfloat16 "
                   "or float16, got ",
                   dtype_name(dt));
  TORCH_CHECK_VALUE(logits.dim() == 2 || (spatial && logits.dim() == 3),
                    "autobalance: `logits` must have shape [N, K]",
                    spatial ? " or [B, K, D]" : "", ", got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) >= 1,
                    "autobalance: `logits` needs K >= 1 classes, got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "autobalance: `weight` must have shape "
                    "[G, K], got ", weight.sizes());
  Sizes s{logits.size(0), logits.size(1), weight.size(0)};
  if (logits.dim() == 3) {
    s.spatial = true;
    s.inner = logits.size(2);
    s.rows = logits.size(0) * s.inner;
  }
  TORCH_CHECK_VALUE(s.groups >= 1, "autobalance: tables need G >= 1 rows, got "
                    "`weight` of shape ", weight.sizes());
  const auto acc = accumulate_type(dt);
  s.probs = target.is_floating_point();
  if (s.probs) {
    TORCH_CHECK_TYPE(target.scalar_type() == dt, "autobalance: a probability `target` must have "
                     "the dtype of logits (", dtype_name(dt), "), got ",
                     dtype_name(target.scalar_type()));
    TORCH_CHECK_VALUE(target.sizes() == logits.sizes(), "autobalance: a floating-point `target` "
                      "is a probability target and must have the shape of logits ", logits.sizes(),
                      ", got ", target.sizes(), "; class-index targets must have dtype torch.int64");
  } else {
    check_index(target, "target", s);
  }
  check_same_device(target, "target", logits);
  if (group.has_value()) {
    check_index(*group, "group", s);
    check_same_device(*group, "group", logits);
  } else {
    TORCH_CHECK_VALUE(s.groups == 1, "autobalance: `group` is required when "
                      "the tables have G = ", s.groups, " > 1 rows");
  }
  check_table(weight, "weight", s, acc);
  check_table(scale, "scale", s, acc);
  check_table(shift, "shift", s, acc);
  check_same_device(weight, "weight", logits);
  check_same_device(scale, "scale", logits);
  check_same_device(shift, "shift", logits);
  return s;
}

// label_smoothing ε in [0, 1] (NaN fails too).
inline void check_label_smoothing(double label_smoothing) {
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "autobalance: `label_smoothing` must be in [0, 1], got ", label_smoothing);
}

// The CPU fast path's residual ops take class-index targets without label smoothing.
inline void check_class_indices(const Sizes& s) {
  TORCH_CHECK_VALUE(!s.probs, "autobalance: this op takes int64 class-index targets, got a "
                    "probability target");
}

inline void check_one_hot(double label_smoothing) {
  TORCH_CHECK_VALUE(label_smoothing == 0.0, "autobalance: this op takes no label smoothing, got ",
                    label_smoothing);
}

// A row's target distribution q_k = α [k = y] + β P_k + γ (docs/math.md
// section 8): class indices y with label smoothing ε give α = 1 - ε, β = 0,
// γ = ε / K; a probability target P gives α = 0, β = 1 - ε, γ = ε / K.
// `dense` says whether q has terms off the label (β P_k + γ); without them
// the kernels run the one-hot math alone.
template <typename T>
struct TargetCoefficients {
  T alpha, beta, gamma;
  bool dense;
};

template <typename T>
TargetCoefficients<T> target_coefficients(const Sizes& s, double label_smoothing) {
  const double gamma = label_smoothing / static_cast<double>(s.classes);
  if (s.probs) return {T(0), T(1.0 - label_smoothing), T(gamma), true};
  return {T(1.0 - label_smoothing), T(0), T(gamma), label_smoothing != 0.0};
}

// check_inputs plus the backward's per-row inputs grad_loss and lse.
inline Sizes check_backward_inputs(const at::Tensor& grad_loss,
                                   const at::Tensor& logits,
                                   const at::Tensor& target,
                                   const std::optional<at::Tensor>& group,
                                   const at::Tensor& weight,
                                   const at::Tensor& scale,
                                   const at::Tensor& shift,
                                   const at::Tensor& lse) {
  const Sizes s = check_inputs(logits, target, group, weight, scale, shift);
  const auto acc = accumulate_type(logits.scalar_type());
  check_per_row(grad_loss, "grad_loss", s, acc, logits);
  check_per_row(lse, "lse", s, acc, logits);
  return s;
}

// Row i's label y (not ignore_index) and group g against [0, K) and [0, G):
// the IndexError every backend raises (the CPU kernels as they read a row,
// the CUDA ops before their launch).
inline void check_row_indices(int64_t i, int64_t y, int64_t g, int64_t K, int64_t G,
                              int64_t ignore_index) {
  TORCH_CHECK_INDEX(y >= 0 && y < K, "autobalance: `target[", i, "]` = ", y,
                    " is out of range: expected a class in [0, ", K,
                    ") or ignore_index = ", ignore_index);
  TORCH_CHECK_INDEX(g >= 0 && g < G, "autobalance: `group[", i, "]` = ", g,
                    " is out of range: expected a group in [0, ", G,
                    ") (the tables have G = ", G, " rows)");
}

// Checks the optional cotangents of the double backward.
inline void check_cotangents(const at::Tensor& logits, const Sizes& s,
                             const std::optional<at::Tensor>& u_logits,
                             const std::optional<at::Tensor>& u_weight,
                             const std::optional<at::Tensor>& u_scale,
                             const std::optional<at::Tensor>& u_shift) {
  const auto acc = accumulate_type(logits.scalar_type());
  if (u_logits.has_value()) {
    TORCH_CHECK_TYPE(u_logits->scalar_type() == logits.scalar_type(),
                     "autobalance: `u_logits` must have the dtype of logits (",
                     dtype_name(logits.scalar_type()), "), got ",
                     dtype_name(u_logits->scalar_type()));
    TORCH_CHECK_VALUE(u_logits->sizes() == logits.sizes(),
                      "autobalance: `u_logits` must have the shape of logits ",
                      logits.sizes(), ", got ", u_logits->sizes());
    check_same_device(*u_logits, "u_logits", logits);
  }
  const std::optional<at::Tensor>* tables[] = {&u_weight, &u_scale, &u_shift};
  const char* names[] = {"u_weight", "u_scale", "u_shift"};
  for (int i = 0; i < 3; ++i) {
    if (tables[i]->has_value()) {
      check_table(**tables[i], names[i], s, acc);
      check_same_device(**tables[i], names[i], logits);
    }
  }
}

// The double backward's table cotangents (u_scale, u_shift) as every backend's
// kernels take them: both or neither, a missing one of the pair zero-filled,
// so the pair shares one kernel path. A zero-filled u_scale's term US_k z_k is
// still left out of v_k (math::Given::scale_table): 0 * z_k is NaN at a -inf
// logit (a masked class), which would make a finite row NaN. Elsewhere a zero
// table changes nothing (its products are 0 at finite logits, and a NaN or
// +inf logit makes the whole row NaN anyway).
inline std::pair<std::optional<at::Tensor>, std::optional<at::Tensor>> table_cotangents(
    const at::Tensor& weight, const std::optional<at::Tensor>& u_scale,
    const std::optional<at::Tensor>& u_shift) {
  if (!u_scale.has_value() && !u_shift.has_value()) return {};
  const auto given_or_zeros = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? *t : at::zeros_like(weight);
  };
  return {given_or_zeros(u_scale), given_or_zeros(u_shift)};
}

}  // namespace autobalance
