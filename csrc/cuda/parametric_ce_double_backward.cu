// CUDA double backward of the parametric cross-entropy (docs/math.md section 4);
// see parametric_ce.cu. In its own file so that it compiles in parallel.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>

#include "launch.cuh"

namespace autobalance {
namespace cuda {

// -------------------------------------------------------- double backward

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>
parametric_ce_double_backward_cuda(
    const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
    const std::optional<Tensor>& group, const Tensor& weight,
    const Tensor& scale, const Tensor& shift, const Tensor& lse,
    const std::optional<Tensor>& u_logits,
    const std::optional<Tensor>& u_weight,
    const std::optional<Tensor>& u_scale,
    const std::optional<Tensor>& u_shift, int64_t ignore_index,
    bool table_grads, double label_smoothing) {
  const Sizes s = check_backward_inputs(grad_loss, logits, target, group, weight,
                                        scale, shift, lse);
  check_label_smoothing(label_smoothing);
  check_cotangents(logits, s, u_logits, u_weight, u_scale, u_shift);
  const c10::cuda::CUDAGuard guard(logits.device());
  table_grads = table_grads && s.rows > 0;
  Tensor grad_grad_loss = at::empty({s.rows}, grad_loss.options());
  Tensor grad_logits = at::empty({s.rows, s.classes}, logits.options());
  Tensor grad_weight = table_grad(weight, table_grads);
  Tensor grad_scale = table_grad(weight, table_grads);
  Tensor grad_shift = table_grad(weight, table_grads);
  if (s.rows == 0) return {grad_grad_loss, grad_logits, grad_weight, grad_scale, grad_shift};
  const auto u_tables = table_cotangents(weight, u_scale, u_shift);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(),
      "parametric_ce_double_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        Launch<scalar_t> l(logits, target, group, weight, scale, shift, s, ignore_index,
                           label_smoothing);
        l.a.upstream = l.template input<acc_t>(grad_loss);
        l.a.lse = l.template input<acc_t>(lse);
        l.a.uz = l.template input<scalar_t>(u_logits);
        l.a.UW = l.template input<acc_t>(u_weight);
        l.a.US = l.template input<acc_t>(u_tables.first);
        l.a.UL = l.template input<acc_t>(u_tables.second);
        l.a.scale_table = u_scale.has_value();
        l.a.grad_grad_loss = grad_grad_loss.mutable_data_ptr<acc_t>();
        l.a.dz = grad_logits.mutable_data_ptr<scalar_t>();
        l.set_vec();
        Tensor vbar, sigma;
        if (s.classes > kFusedMaxK<scalar_t>) {
          // The row does not fit one tile: a row pass computes v̄ and
          // grad_grad_loss (and a dense target's Σ_k d_k W_k, Σ_k d_k UW_k)
          // first, then the tiles read them.
          vbar = at::empty({s.rows}, grad_loss.options());
          l.a.vbar_out = vbar.mutable_data_ptr<acc_t>();
          if (l.a.q.dense) {
            sigma = at::empty({l.a.UW ? 2 * s.rows : s.rows}, grad_loss.options());
            l.a.sigma_out = sigma.mutable_data_ptr<acc_t>();
          }
          run_rows<RowPass::kPrep>(l.a, l.stream);
          l.a.vbar = vbar.const_data_ptr<acc_t>();
          if (l.a.q.dense) l.a.sigma = sigma.const_data_ptr<acc_t>();
        }
        run_tiles<true>(l.a, grad_weight, grad_scale, grad_shift, table_grads, l.stream);
      });
  return {grad_grad_loss, grad_logits, grad_weight, grad_scale, grad_shift};
}

}  // namespace cuda
}  // namespace autobalance
