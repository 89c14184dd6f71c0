// Autograd for the three ops, in C++ so that the training hot path never
// enters Python: parametric_ce's backward is parametric_ce_backward, whose
// backward is the fused parametric_ce_double_backward; a third derivative
// raises. Registered under the Autograd key, so it serves every backend.
//
// Each backward calls the next op through the dispatcher (not below
// autograd), so with create_graph=True the second derivatives are recorded
// and later run through the fused double-backward kernel.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <cmath>

namespace autobalance {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = std::tuple<Tensor, Tensor>(
    const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
    const Tensor&, const Tensor&, int64_t, double);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, bool, double);
using DoubleBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
    const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const std::optional<Tensor>&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, const std::optional<Tensor>&, int64_t, bool, double);

using ResidualSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
    const Tensor&, const Tensor&, int64_t);
using WithGradientSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
    const Tensor&, const Tensor&, int64_t, bool, bool, double);
using FromResidualSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&,
    int64_t, bool);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The ops' dispatcher handles, looked up once.
struct Ops {
  c10::TypedOperatorHandle<ForwardSig> forward = op<ForwardSig>("autobalance::parametric_ce");
  c10::TypedOperatorHandle<BackwardSig> backward =
      op<BackwardSig>("autobalance::parametric_ce_backward");
  c10::TypedOperatorHandle<DoubleBackwardSig> double_backward =
      op<DoubleBackwardSig>("autobalance::parametric_ce_double_backward");
  c10::TypedOperatorHandle<ResidualSig> residual =
      op<ResidualSig>("autobalance::_parametric_ce_with_residual");
  c10::TypedOperatorHandle<WithGradientSig> with_gradient =
      op<WithGradientSig>("autobalance::_parametric_ce_reduced_with_gradient");
  c10::TypedOperatorHandle<FromResidualSig> from_residual =
      op<FromResidualSig>("autobalance::_parametric_ce_backward_from_residual_");
};

const Ops& ops() {
  static const Ops handles;
  return handles;
}

std::optional<Tensor> optional(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

Tensor value(const std::optional<Tensor>& t) {
  return t.has_value() ? *t : Tensor();
}

// The node has one edge per defined tensor input, in argument order; an absent
// optional `group` has none. `Edges` maps argument positions to edges.
struct Edges {
  AutogradContext* ctx;
  int64_t group_at;  // the argument position of `group`

  size_t edge(int64_t arg) const {
    return arg > group_at ? arg - 1 + ctx->saved_data["has_group"].toBool() : arg;
  }
  bool needed(int64_t arg) const { return ctx->needs_input_grad(edge(arg)); }
  Tensor keep(int64_t arg, Tensor t) const { return needed(arg) ? std::move(t) : Tensor(); }
};

// How parametric_ce_reduced reduces the per-row losses (parametric_ce: kNone).
enum Reduction : int64_t { kNone = 0, kSum = 1, kMean = 2 };

// Per-cell counts of the rows that are not ignored, [G * K] in the tables'
// dtype: the mean's denominator is <counts, W>, differentiable in W. Whole
// numbers added in floating point: exact and deterministic.
Tensor cell_counts(const Tensor& target, const std::optional<Tensor>& group,
                   const Tensor& weight, int64_t ignore_index) {
  const Tensor valid = target.ne(ignore_index).reshape(-1);
  Tensor cell = (group.has_value() && group->defined()
                     ? target.add(*group, weight.sym_size(1))
                     : target).reshape(-1);
  return at::zeros_symint({weight.sym_numel()}, weight.options())
      .index_add_(0, cell.masked_fill(valid.logical_not(), 0), valid.to(weight.scalar_type()));
}

// Sums over rows (or cells) that give the same bits whatever the thread
// count. On the CPU, ATen sums a tensor of fewer than GRAIN_SIZE elements on
// one thread, and each output of a reduction with several outputs on one
// thread, but it splits a single sum of more elements (and BLAS a long dot
// product) across threads. So a long vector is summed in blocks of kSumBlock
// elements (a [blocks, kSumBlock] reduction, blocks >= 2), then the block sums
// in the same way; the blocks depend only on the length. (A CUDA sum is
// already the same from run to run: one plain sum there.)
constexpr int64_t kGrainSize = 32768;  // at::internal::GRAIN_SIZE (ATen/TensorIterator.h)
constexpr int64_t kSumBlock = kGrainSize / 2;

Tensor fixed_block_sum(const Tensor& x) {
  const c10::SymInt n = x.sym_numel();
  if (!x.is_cpu() || n < kGrainSize) return x.sum();
  const c10::SymInt blocks = n / kSumBlock, full = blocks * kSumBlock;
  Tensor sums = x.narrow_symint(0, 0, full).reshape_symint({blocks, kSumBlock}).sum(1);
  if (full != n) sums = at::cat({sums, x.narrow_symint(0, full, n - full).sum().unsqueeze(0)});
  return fixed_block_sum(sums);
}

// The 0-dim `g` broadcast to n rows, in fixed_block_sum's blocks: its
// backward (a sum of the n incoming gradients) is then a fixed-block sum too.
Tensor fixed_block_broadcast(const Tensor& g, const c10::SymInt& n) {
  if (!g.is_cpu() || n < kGrainSize) return g.expand_symint({n});
  const c10::SymInt blocks = n / kSumBlock, full = blocks * kSumBlock;
  const Tensor per_block = fixed_block_broadcast(g, full == n ? blocks : blocks + 1);
  Tensor out = per_block.narrow_symint(0, 0, blocks)
                   .unsqueeze(1)
                   .expand_symint({blocks, kSumBlock})
                   .reshape_symint({full});
  if (full != n) out = at::cat({out, per_block.narrow_symint(0, blocks, 1).expand_symint({n - full})});
  return out;
}

Tensor weight_sum(const Tensor& counts, const Tensor& weight) {
  return fixed_block_sum(counts.mul(weight.reshape(-1)));
}

// The per-row losses reduced (sum, or mean = sum / <counts, W>) the same way on
// every path, so the reduced loss has the same bits whichever kernel made the
// losses. For a mean, undefined `counts` are computed here (after the kernel,
// which has checked the indices). A probability target's mean divides by the
// number of rows instead (docs/math.md section 8), and `counts` stay undefined.
Tensor reduce_losses(const Tensor& loss, int64_t reduction, Tensor& counts, const Tensor& target,
                     const std::optional<Tensor>& group, const Tensor& weight,
                     int64_t ignore_index) {
  if (reduction == kNone) return loss;
  const Tensor total = fixed_block_sum(loss);
  if (reduction == kSum) return total;
  if (target.is_floating_point()) return total.div(loss.sym_size(0));
  if (!counts.defined()) counts = cell_counts(target, group, weight, ignore_index);
  return total.div(weight_sum(counts, weight));
}

// Spatial logits [B, K, D] (csrc/checks.h: Sizes::spatial), their target and
// group as the [B D, K] rows and [B D] indices the other ops take: by ATen
// ops, so autograd records the copy of the logits (and takes the gradient back
// through it). Only the CPU's reduced fast path reads spatial logits in place.
struct Rows {
  Tensor logits, target;
  std::optional<Tensor> group;
};

Rows as_rows(const Tensor& logits, const Tensor& target, const std::optional<Tensor>& group) {
  const auto rows = [&](const Tensor& t) {
    return t.movedim(1, -1).reshape_symint({c10::SymInt(-1), logits.sym_size(1)});
  };
  return {rows(logits), target.is_floating_point() ? rows(target) : target.reshape(-1),
          group.has_value() && group->defined() ? std::optional<Tensor>(group->reshape(-1))
                                                : std::nullopt};
}

// ∂ℓ_i/∂P[i,k] = ω_i (1 - ε) W[g,k] nlp_ik for a probability target P that
// needs a gradient (docs/math.md section 8), from the saved inputs (logits,
// target, group, weight, scale, shift). ATen ops, not a kernel: learned soft
// labels are rare, and these ops are differentiable again.
Tensor probability_target_grad(const Tensor& upstream, const variable_list& s,
                               double label_smoothing) {
  const Tensor& group = s[2];
  const auto rows = [&](const Tensor& table) {
    return group.defined() ? table.index_select(0, group) : table;
  };
  const Tensor a = rows(s[4]).mul(s[0].to(s[4].scalar_type())).add(rows(s[5]));
  const Tensor nlp = a.log_softmax(1).neg();
  return upstream.unsqueeze(1)
      .mul(rows(s[3]))
      .mul(nlp)
      .mul(1.0 - label_smoothing)
      .to(s[1].scalar_type());
}

// The 0-dim incoming gradient's value (read in place: no dispatch).
double scalar_value(const Tensor& g) {
  if (g.is_cpu() && g.numel() == 1) {
    if (g.scalar_type() == at::kFloat) return *g.const_data_ptr<float>();
    if (g.scalar_type() == at::kDouble) return *g.const_data_ptr<double>();
  }
  return g.item<double>();
}

// Arguments: logits 0, target 1, group 2, weight 3, scale 4, shift 5.
//
// With `reduction` the node returns the sum or the weighted mean of the
// per-row losses itself (one autograd node instead of half a dozen small ones).
//
// With `fast` (CPU, float32/float64 logits, some input needs a gradient) the
// forward does part of the backward's work while the row is in cache, for a
// backward that is not differentiated again (no create_graph):
// - a sum or mean is computed with its gradients and the cell counts
//   (_parametric_ce_reduced_with_gradient), and the backward only scales the
//   gradients by its incoming gradient (usually 1: nothing to do);
// - per-row losses keep the residual r = W_y (p - e_y), and the backward reads
//   it instead of recomputing the softmax: one exponential per logit for
//   forward + backward instead of two. That pays while the [N, K] buffers stay
//   in cache; beyond kResidualMaxElements logits, reading r back costs more
//   than recomputing the exponentials (4096 x 1000 lost ~7%).
// A backward with create_graph recomputes through the differentiable
// parametric_ce_backward op instead.
constexpr int64_t kResidualMaxElements = int64_t(1) << 20;
struct ParametricCE : torch::autograd::Function<ParametricCE> {
  static variable_list forward(AutogradContext* ctx, const Tensor& logits,
                               const Tensor& target, const std::optional<Tensor>& group,
                               const Tensor& weight, const Tensor& scale,
                               const Tensor& shift, int64_t ignore_index, double label_smoothing,
                               bool fast, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out, lse, kept, counts, dW, dS, dL;  // kept: the residual or grad_logits
    if (fast && reduction != kNone) {
      // the loss with the gradients of its sum or mean, and the cell counts
      const bool table_grads = weight.requires_grad() || scale.requires_grad() || shift.requires_grad();
      std::tie(out, lse, counts, kept, dW, dS, dL) = ops().with_gradient.call(
          logits, target, group, weight, scale, shift, ignore_index, reduction == kMean,
          table_grads, label_smoothing);
    } else if (fast) {
      std::tie(out, lse, kept) =
          ops().residual.call(logits, target, group, weight, scale, shift, ignore_index);
    } else {
      std::tie(out, lse) = ops().forward.call(logits, target, group, weight, scale, shift,
                                              ignore_index, label_smoothing);
    }
    out = reduce_losses(out, reduction, counts, target, group, weight, ignore_index);
    if (reduction == kMean) ctx->saved_data["counts"] = counts;
    if (fast && reduction != kNone) {
      // The node's own buffers, outside the saved variables: the backward that
      // uses them unpacks none.
      ctx->saved_data["gradients"] = std::vector<Tensor>{kept, dW, dS, dL};
      kept = Tensor();
    }
    // lse is a statistic for the backward, not a model output; its (absent)
    // incoming gradient is not materialised as [N] zeros.
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({logits, target, value(group), weight, scale, shift, lse, kept, out});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["has_group"] = group.has_value() && group->defined();
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(10);  // no gradient flows into the loss
    const Edges e{ctx, 2};
    // Grad mode is on exactly when this backward is differentiated again.
    const bool differentiable = at::GradMode::is_enabled();
    // The kept buffers are this node's own and are freed after this backward,
    // unless the graph is kept (retain_graph=True) for another: then copies.
    const bool keep_graph = torch::autograd::get_current_graph_task_keep_graph();
    auto own = [&](const Tensor& t) { return keep_graph ? t.clone() : t; };
    Tensor dz, dW, dS, dL, dq;
    const auto gradients = ctx->saved_data.find("gradients");
    // A non-finite incoming gradient times the kept gradients would be NaN on
    // ignored rows and empty cells too (0 * inf), where the kernels give 0 (an
    // ignored row contributes nothing; docs/math.md section 3): recompute.
    const double incoming =
        gradients != ctx->saved_data.end() ? scalar_value(grads[0]) : 0.0;
    if (!differentiable && gradients != ctx->saved_data.end() && std::isfinite(incoming)) {
      // The forward made the gradients of `out`: handed over (the entry
      // erased, so that AccumulateGrad can take them without a copy) and
      // scaled by the incoming gradient unless it is 1.
      const std::vector<Tensor> made = gradients->second.toTensorVector();
      if (!keep_graph) ctx->saved_data.erase(gradients);
      dz = own(made[0]);
      dW = own(made[1]);
      dS = own(made[2]);
      dL = own(made[3]);
      if (incoming != 1.0) {
        for (Tensor* t : {&dz, &dW, &dS, &dL})
          if (t->defined()) t->mul_(grads[0]);
      }
    } else {
      const auto s = ctx->get_saved_variables();
      const bool table_grads = e.needed(3) || e.needed(4) || e.needed(5);
      const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
      const int64_t reduction = ctx->saved_data["reduction"].toInt();
      const double label_smoothing = ctx->saved_data["label_smoothing"].toDouble();
      const bool probs = s[1].is_floating_point();
      const bool use_kept = s[7].defined() && !differentiable;
      // d out / d loss_i: 1 (sum), 1 / <counts, W> (mean) or 1 / N (mean of a
      // probability target), times the incoming gradient.
      Tensor upstream = grads[0], counts, denominator;
      if (reduction == kMean && probs) {
        upstream = upstream.div(s[6].sym_size(0));
      } else if (reduction == kMean) {
        counts = ctx->saved_data["counts"].toTensor();
        denominator = weight_sum(counts, s[3]);
        upstream = upstream.div(denominator);
      }
      if (reduction != kNone) {
        upstream = differentiable ? fixed_block_broadcast(upstream, s[6].sym_numel())
                                  : upstream.expand_as(s[6]);
      }
      if (use_kept) {
        // dz overwrites the residual r
        dz = own(s[7]);
        std::tie(dW, dS, dL) = ops().from_residual.call(upstream, s[0], s[1], optional(s[2]), s[3],
                                                        s[4], s[5], s[6], dz, ignore_index, table_grads);
      } else if (s[0].dim() == 3) {
        // spatial logits (the fast path's forward): the backward op on their rows
        const Rows r = as_rows(s[0], s[1], optional(s[2]));
        std::tie(dz, dW, dS, dL) = ops().backward.call(upstream, r.logits, r.target, r.group, s[3],
                                                       s[4], s[5], s[6], ignore_index, table_grads,
                                                       label_smoothing);
        dz = dz.reshape_symint({s[0].sym_size(0), s[0].sym_size(2), s[0].sym_size(1)}).movedim(2, 1);
      } else {
        std::tie(dz, dW, dS, dL) = ops().backward.call(upstream, s[0], s[1], optional(s[2]), s[3],
                                                       s[4], s[5], s[6], ignore_index, table_grads,
                                                       label_smoothing);
      }
      if (probs && e.needed(1)) dq = probability_target_grad(upstream, s, label_smoothing);
      if (reduction == kMean && !probs && e.needed(3)) {
        // the denominator's share: d(sum / D)/dW = -(out / D) counts
        dW = dW.sub(grads[0].mul(s[8]).div(denominator).mul(counts.view_as(dW)));
      }
    }
    return {e.keep(0, dz), dq, Tensor(), e.keep(3, dW), e.keep(4, dS),
            e.keep(5, dL), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// Arguments: grad_loss 0, logits 1, target 2, group 3, weight 4, scale 5,
// shift 6, lse 7.
struct ParametricCEBackward : torch::autograd::Function<ParametricCEBackward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_loss,
                               const Tensor& logits, const Tensor& target,
                               const std::optional<Tensor>& group, const Tensor& weight,
                               const Tensor& scale, const Tensor& shift,
                               const Tensor& lse, int64_t ignore_index,
                               bool table_grads, double label_smoothing) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dz, dW, dS, dL] =
        ops().backward.call(grad_loss, logits, target, group, weight,
                           scale, shift, lse, ignore_index, table_grads, label_smoothing);
    ctx->save_for_backward({grad_loss, logits, target, value(group), weight, scale, shift, lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["has_group"] = group.has_value() && group->defined();
    ctx->saved_data["table_grads"] = table_grads;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->set_materialize_grads(false);  // absent cotangents stay undefined: no [N, K] zeros
    return {dz, dW, dS, dL};
  }

  static variable_list backward(AutogradContext* ctx, variable_list u) {
    if (!ctx->saved_data["table_grads"].toBool()) {
      // the table outputs were constant zeros
      u[1] = u[2] = u[3] = Tensor();
    }
    variable_list none(11);
    if (!u[0].defined() && !u[1].defined() && !u[2].defined() && !u[3].defined())
      return none;
    const auto s = ctx->get_saved_variables();
    const Edges e{ctx, 3};
    TORCH_CHECK_NOT_IMPLEMENTED(!e.needed(2), "autobalance: second derivatives with respect to a "
                                "probability target are not implemented; detach the target or "
                                "differentiate once");
    const bool table_grads = e.needed(4) || e.needed(5) || e.needed(6);
    auto [grad_grad_loss, dz, dW, dS, dL] = ops().double_backward.call(
        s[0], s[1], s[2], optional(s[3]), s[4], s[5], s[6], s[7], optional(u[0]),
        optional(u[1]), optional(u[2]), optional(u[3]),
        ctx->saved_data["ignore_index"].toInt(), table_grads,
        ctx->saved_data["label_smoothing"].toDouble());
    none[0] = e.keep(0, grad_grad_loss);
    none[1] = e.keep(1, dz);
    none[4] = e.keep(4, dW);
    none[5] = e.keep(5, dS);
    none[6] = e.keep(6, dL);
    return none;
  }
};

// Third derivatives are not needed by anything in the package.
struct ParametricCEDoubleBackward
    : torch::autograd::Function<ParametricCEDoubleBackward> {
  static variable_list forward(
      AutogradContext* ctx, const Tensor& grad_loss, const Tensor& logits,
      const Tensor& target, const std::optional<Tensor>& group, const Tensor& weight,
      const Tensor& scale, const Tensor& shift, const Tensor& lse,
      const std::optional<Tensor>& u_logits, const std::optional<Tensor>& u_weight,
      const std::optional<Tensor>& u_scale, const std::optional<Tensor>& u_shift,
      int64_t ignore_index, bool table_grads, double label_smoothing) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [a, b, c, d, e] = ops().double_backward.call(
        grad_loss, logits, target, group, weight, scale, shift, lse, u_logits,
        u_weight, u_scale, u_shift, ignore_index, table_grads, label_smoothing);
    return {a, b, c, d, e};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        false,
        "autobalance: third derivatives of the parametric cross-entropy are not "
        "implemented; differentiate at most twice (create_graph=True once)");
  }
};

variable_list apply_parametric_ce(const Tensor& logits, const Tensor& target,
                                  const std::optional<Tensor>& group, const Tensor& weight,
                                  const Tensor& scale, const Tensor& shift,
                                  int64_t ignore_index, double label_smoothing,
                                  int64_t reduction) {
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (logits.requires_grad() || weight.requires_grad() ||
                           scale.requires_grad() || shift.requires_grad());
  // (Symbolic shapes, under torch.compile's dynamic tracing, take the plain path
  // rather than a guard on N K.)
  // Eager tensors only: not under FakeTensor / functionalization tracing.
  const bool traced = logits.key_set().has(c10::DispatchKey::Python) ||
                      logits.key_set().has(c10::DispatchKey::Functionalize);
  // The residual op takes class-index targets without label smoothing; the
  // reduced one every target, except one that needs its own gradient.
  const bool one_hot = !target.is_floating_point() && label_smoothing == 0.0;
  const bool fast = needs_grad && !traced && (one_hot || reduction != kNone) &&
                    !target.requires_grad() && logits.device().is_cpu() &&
                    !logits.unsafeGetTensorImpl()->has_symbolic_sizes_strides() &&
                    (reduction != kNone || logits.numel() <= kResidualMaxElements) &&
                    (logits.scalar_type() == at::kFloat ||
                     logits.scalar_type() == at::kDouble);
  if (logits.dim() == 3 && reduction != kNone && !fast) {  // (per-row ops take [N, K] only)
    const Rows r = as_rows(logits, target, group);
    return apply_parametric_ce(r.logits, r.target, r.group, weight, scale, shift, ignore_index,
                               label_smoothing, reduction);
  }
  return ParametricCE::apply(logits, target, group, weight, scale, shift, ignore_index,
                             label_smoothing, fast, reduction);
}

std::tuple<Tensor, Tensor> parametric_ce_autograd(
    const Tensor& logits, const Tensor& target, const std::optional<Tensor>& group,
    const Tensor& weight, const Tensor& scale, const Tensor& shift,
    int64_t ignore_index, double label_smoothing) {
  auto out = apply_parametric_ce(logits, target, group, weight, scale, shift, ignore_index,
                                 label_smoothing, kNone);
  return {out[0], out[1]};
}

Tensor parametric_ce_reduced_autograd(
    const Tensor& logits, const Tensor& target, const std::optional<Tensor>& group,
    const Tensor& weight, const Tensor& scale, const Tensor& shift,
    int64_t ignore_index, bool mean, double label_smoothing) {
  return apply_parametric_ce(logits, target, group, weight, scale, shift, ignore_index,
                             label_smoothing, mean ? kMean : kSum)[0];
}

// Below autograd (and for FakeTensor tracing), the reduced op in terms of the
// per-row op.
Tensor parametric_ce_reduced_composite(
    const Tensor& logits, const Tensor& target, const std::optional<Tensor>& group,
    const Tensor& weight, const Tensor& scale, const Tensor& shift,
    int64_t ignore_index, bool mean, double label_smoothing) {
  if (logits.dim() == 3) {
    const Rows r = as_rows(logits, target, group);
    return parametric_ce_reduced_composite(r.logits, r.target, r.group, weight, scale, shift,
                                           ignore_index, mean, label_smoothing);
  }
  Tensor counts;
  return reduce_losses(
      std::get<0>(ops().forward.call(logits, target, group, weight, scale, shift, ignore_index,
                                     label_smoothing)),
      mean ? kMean : kSum, counts, target, group, weight, ignore_index);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> parametric_ce_backward_autograd(
    const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
    const std::optional<Tensor>& group, const Tensor& weight, const Tensor& scale,
    const Tensor& shift, const Tensor& lse, int64_t ignore_index, bool table_grads,
    double label_smoothing) {
  auto out = ParametricCEBackward::apply(grad_loss, logits, target, group,
                                         weight, scale, shift, lse, ignore_index,
                                         table_grads, label_smoothing);
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>
parametric_ce_double_backward_autograd(
    const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
    const std::optional<Tensor>& group, const Tensor& weight, const Tensor& scale,
    const Tensor& shift, const Tensor& lse, const std::optional<Tensor>& u_logits,
    const std::optional<Tensor>& u_weight, const std::optional<Tensor>& u_scale,
    const std::optional<Tensor>& u_shift, int64_t ignore_index, bool table_grads,
    double label_smoothing) {
  auto out = ParametricCEDoubleBackward::apply(
      grad_loss, logits, target, group, weight, scale, shift, lse, u_logits,
      u_weight, u_scale, u_shift, ignore_index, table_grads, label_smoothing);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(autobalance, Autograd, m) {
  m.impl("parametric_ce", &parametric_ce_autograd);
  m.impl("parametric_ce_reduced", &parametric_ce_reduced_autograd);
  m.impl("parametric_ce_backward", &parametric_ce_backward_autograd);
  m.impl("parametric_ce_double_backward", &parametric_ce_double_backward_autograd);
}

TORCH_LIBRARY_IMPL(autobalance, CompositeExplicitAutograd, m) {
  m.impl("parametric_ce_reduced", &parametric_ce_reduced_composite);
}

}  // namespace autobalance
