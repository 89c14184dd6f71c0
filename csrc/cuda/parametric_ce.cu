// CUDA kernels of the parametric cross-entropy: forward and backward here,
// the double backward in parametric_ce_double_backward.cu (docs/math.md sections
// 1, 3, 4), with the schemas and results of the CPU kernels (csrc/cpu). The
// kernels are in kernels.cuh, the launch logic in launch.cuh, the math of an
// element in ../parametric_ce_math.h.
//
// Label and group ranges: every op raises the CPU kernels' IndexError before
// its launch (check_row_indices_cuda below: one small kernel and one
// host synchronisation per call).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "launch.cuh"

namespace autobalance {
namespace cuda {
namespace {

// *first = the lowest row whose target (not ignore_index) or group is out of
// range, left as it was (N) when there is none; `target` null: the group
// alone. Integer atomics: the result does not depend on the order.
__global__ void __launch_bounds__(kThreads) first_bad_row_kernel(
    const int64_t* target, const int64_t* group, int64_t N, int64_t K, int64_t G,
    int64_t ignore_index, unsigned long long* first) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t y = target ? target[i] : 0;
    if (target && y == ignore_index) continue;
    const int64_t g = group ? group[i] : 0;
    if (y < 0 || y >= K || g < 0 || g >= G) atomicMin(first, static_cast<unsigned long long>(i));
  }
}

}  // namespace

// The CPU kernels' IndexError for the lowest row whose target (not
// ignore_index) or group is out of range. It costs one pass over the indices
// (a small kernel) and one device-to-host copy of its 8-byte result, i.e. a
// host synchronisation per op call; the error path reads that row's indices back.
// Skipped while the stream is captured into a CUDA graph, where a read-back is
// not allowed: the kernels then skip bad rows (read_row) instead of raising.
void check_row_indices_cuda(const Tensor& target, const Tensor& group, const Sizes& s,
                            int64_t ignore_index, cudaStream_t stream) {
  if (s.rows == 0 || (!target.defined() && !group.defined()) ||
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None)
    return;
  const Tensor& index = target.defined() ? target : group;
  Tensor first = at::full({1}, s.rows, index.options());
  const int64_t blocks = std::min<int64_t>(ceil_div(s.rows, kThreads), 1024);
  first_bad_row_kernel<<<blocks, kThreads, 0, stream>>>(
      target.defined() ? target.const_data_ptr<int64_t>() : nullptr,
      group.defined() ? group.const_data_ptr<int64_t>() : nullptr,
      s.rows, s.classes, s.groups, ignore_index,
      reinterpret_cast<unsigned long long*>(first.mutable_data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t i = first.item<int64_t>();
  if (i == s.rows) return;
  check_row_indices(i, target.defined() ? target[i].item<int64_t>() : 0,
                    group.defined() ? group[i].item<int64_t>() : 0,
                    s.classes, s.groups, ignore_index);
}

namespace {

// ---------------------------------------------------------------- forward

std::tuple<Tensor, Tensor> parametric_ce_cuda(
    const Tensor& logits, const Tensor& target,
    const std::optional<Tensor>& group, const Tensor& weight,
    const Tensor& scale, const Tensor& shift, int64_t ignore_index, double label_smoothing) {
  const Sizes s = check_inputs(logits, target, group, weight, scale, shift);
  check_label_smoothing(label_smoothing);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto acc_opts = logits.options().dtype(accumulate_type(logits.scalar_type()));
  Tensor loss = at::empty({s.rows}, acc_opts);
  Tensor lse = at::empty({s.rows}, acc_opts);
  if (s.rows == 0) return {loss, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "parametric_ce_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        Launch<scalar_t> l(logits, target, group, weight, scale, shift, s, ignore_index,
                           label_smoothing);
        l.a.loss = loss.mutable_data_ptr<acc_t>();
        l.a.lse_out = lse.mutable_data_ptr<acc_t>();
        l.set_vec();
        run_rows<RowPass::kForward>(l.a, l.stream);
      });
  return {loss, lse};
}

// --------------------------------------------------------------- backward

std::tuple<Tensor, Tensor, Tensor, Tensor> parametric_ce_backward_cuda(
    const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
    const std::optional<Tensor>& group, const Tensor& weight,
    const Tensor& scale, const Tensor& shift, const Tensor& lse,
    int64_t ignore_index, bool table_grads, double label_smoothing) {
  const Sizes s = check_backward_inputs(grad_loss, logits, target, group, weight,
                                        scale, shift, lse);
  check_label_smoothing(label_smoothing);
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
        Launch<scalar_t> l(logits, target, group, weight, scale, shift, s, ignore_index,
                           label_smoothing);
        l.a.upstream = l.template input<acc_t>(grad_loss);
        l.a.lse = l.template input<acc_t>(lse);
        l.a.dz = grad_logits.mutable_data_ptr<scalar_t>();
        l.set_vec();
        Tensor sigma;
        if (l.a.q.dense && s.classes > kTileMaxK<scalar_t>) {
          // The row does not fit one tile: a row pass sums the dense target's
          // Σ_k d_k W_k first, then the tiles read it.
          sigma = at::empty({s.rows}, grad_loss.options());
          l.a.sigma_out = sigma.mutable_data_ptr<acc_t>();
          run_rows<RowPass::kSums>(l.a, l.stream);
          l.a.sigma = sigma.const_data_ptr<acc_t>();
        }
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
