// CUDA kernels of the parametric cross-entropy: forward and backward here,
// the double backward in parametric_ce_double_backward.cu (docs/math.md sections
// 1, 3, 4), with the schemas and results of the CPU kernels (csrc/cpu). The
// kernels are in kernels.cuh, the launch logic in launch.cuh, the math of an
// element in ../parametric_ce_math.h.
//
// Label and group ranges: every op raises the CPU kernels' IndexError before
// its launch (check_row_indices_cuda in launch.cuh: one small kernel and one
// host synchronisation per call).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "launch.cuh"

namespace autobalance {
namespace cuda {
namespace {

// ---------------------------------------------------------------- forward

std::tuple<Tensor, Tensor> parametric_ce_cuda(
    const Tensor& logits, const Tensor& target,
    const std::optional<Tensor>& group, const Tensor& weight,
    const Tensor& scale, const Tensor& shift, int64_t ignore_index) {
  const Sizes s = check_inputs(logits, target, group, weight, scale, shift);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto acc_opts = logits.options().dtype(accumulate_type(logits.scalar_type()));
  Tensor loss = at::empty({s.rows}, acc_opts);
  Tensor lse = at::empty({s.rows}, acc_opts);
  if (s.rows == 0) return {loss, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "parametric_ce_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        Launch<scalar_t> l(logits, target, group, weight, scale, shift, s, ignore_index);
        l.a.loss = loss.mutable_data_ptr<acc_t>();
        l.a.lse_out = lse.mutable_data_ptr<acc_t>();
        l.set_vec();
        run_rows<false>(l.a, l.stream);
      });
  return {loss, lse};
}

// --------------------------------------------------------------- backward

std::tuple<Tensor, Tensor, Tensor, Tensor> parametric_ce_backward_cuda(
    const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
    const std::optional<Tensor>& group, const Tensor& weight,
    const Tensor& scale, const Tensor& shift, const Tensor& lse,
    int64_t ignore_index, bool table_grads) {
  const Sizes s = check_backward_inputs(grad_loss, logits, target, group, weight,
                                        scale, shift, lse);
  const c10::cuda::CUDAGuard guard(logits.device());
  table_grads = table_grads && s.rows > 0;
  Tensor grad_logits = at::empty({s.rows, s.classes}, logits.options());
  Tensor grad_weight = table_grad(weight, table_grads);
  Tensor grad_scale = table_grad(weight, table_grads);
  Tensor grad_shift = table_grad(weight, table_grads);
  if (s.rows == 0) return {grad_logits, grad_weight, grad_scale, grad_shift};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "parametric_ce_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        Launch<scalar_t> l(logits, target, group, weight, scale, shift, s, ignore_index);
        l.a.upstream = l.template input<acc_t>(grad_loss);
        l.a.lse = l.template input<acc_t>(lse);
        l.a.dz = grad_logits.mutable_data_ptr<scalar_t>();
        l.set_vec();
        run_tiles<false>(l.a, grad_weight, grad_scale, grad_shift, table_grads, l.stream);
      });
  return {grad_logits, grad_weight, grad_scale, grad_shift};
}

}  // namespace

TORCH_LIBRARY_IMPL(autobalance, CUDA, m) {
  m.impl("parametric_ce", &parametric_ce_cuda);
  m.impl("parametric_ce_backward", &parametric_ce_backward_cuda);
  m.impl("parametric_ce_double_backward", &parametric_ce_double_backward_cuda);
}

}  // namespace cuda
}  // namespace autobalance
