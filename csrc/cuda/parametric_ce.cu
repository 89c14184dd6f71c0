// CUDA kernels of the parametric cross-entropy: forward, backward and double
// backward (MATH.md sections 1, 3, 4), same schemas and results as
// csrc/cpu/parametric_ce.cpp. The kernels are in kernels.cuh; this file
// checks arguments, allocates outputs, picks a kernel shape by K and
// launches on the current stream, with no host synchronisation.
//
// Label and group ranges: the CPU kernels raise IndexError; here an
// out-of-range target or group trips a device-side assert (CUDA_KERNEL_ASSERT
// in read_row), reported by the next synchronising CUDA call.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "kernels.cuh"

namespace autobalance {
namespace {

using at::Tensor;
using cuda::Args;
using cuda::kThreads;
using cuda::kVec;

// Row chunks (and so table-gradient slabs) per column tile: enough blocks to
// fill a GPU, while every team gets a few rows to sum over. A function of the
// shape only, so table gradients are bit-identical run to run.
constexpr int64_t kTargetBlocks = 2048;
constexpr int64_t kMinRowsPerTeam = 4;
constexpr int64_t kMaxGrid = int64_t{1} << 20;  // row_kernel loops past it

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <int N>
using template_int = std::integral_constant<int, N>;

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// Contiguous copies of the inputs (kept alive for the launches) and the
// kernel arguments pointing into them and into the outputs.
template <typename scalar_t>
struct Launch {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<Tensor> keep;
  Args<scalar_t> a{};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  Launch(const Tensor& logits, const Tensor& target,
         const std::optional<Tensor>& group, const Tensor& weight,
         const Tensor& scale, const Tensor& shift, const Sizes& s,
         int64_t ignore_index) {
    a.z = input<scalar_t>(logits);
    a.target = input<int64_t>(target);
    a.group = group.has_value() ? input<int64_t>(*group) : nullptr;
    a.W = input<acc_t>(weight);
    a.S = input<acc_t>(scale);
    a.L = input<acc_t>(shift);
    TORCH_CHECK(s.classes < (int64_t{1} << 30), "autobalance: the CUDA kernels support "
                "K < 2^30 classes, got K = ", s.classes);
    a.N = s.rows;
    a.K = static_cast<int>(s.classes);
    a.G = s.groups;
    a.ignore_index = ignore_index;
  }

  template <typename T>
  const T* input(const Tensor& t) {
    keep.push_back(t.contiguous());
    return keep.back().const_data_ptr<T>();
  }
  template <typename T>
  const T* input(const std::optional<Tensor>& t) {
    return t.has_value() ? input<T>(*t) : nullptr;
  }

  // Call once every pointer is set: 16-byte accesses need K % VEC == 0 and
  // aligned row starts ([G, K] tables are read VEC accumulators at a time).
  void set_vec() {
    constexpr int VEC = kVec<scalar_t>;
    constexpr int64_t table_bytes = VEC * sizeof(acc_t);
    a.vec = a.K % VEC == 0 && aligned(a.z, 16) && aligned(a.uz, 16) &&
            aligned(a.dz, 16) && aligned(a.S, table_bytes) &&
            aligned(a.L, table_bytes) && aligned(a.US, table_bytes) &&
            aligned(a.UL, table_bytes);
  }
};

template <bool kPrep, typename scalar_t, int TEAM>
void launch_rows(const Args<scalar_t>& a, cudaStream_t stream) {
  constexpr int64_t teams = kThreads / TEAM;
  const int64_t blocks = std::min(ceil_div(a.N, teams), kMaxGrid);
  cuda::row_kernel<kPrep, scalar_t, TEAM><<<blocks, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Forward: 4 lanes per row for tiny K, a warp up to 256 chunks, else the
// block. The double backward's row pass only runs for large K: the block.
template <bool kPrep, typename scalar_t>
void run_rows(const Args<scalar_t>& a, cudaStream_t stream) {
  constexpr int VEC = kVec<scalar_t>;
  if constexpr (!kPrep) {
    if (a.K <= 4 * VEC) return launch_rows<false, scalar_t, 4>(a, stream);
    if (a.K <= 256 * VEC) return launch_rows<false, scalar_t, 32>(a, stream);
  }
  launch_rows<kPrep, scalar_t, kThreads>(a, stream);
}

template <bool kDouble, typename scalar_t, int TX, int CH>
void launch_tiles(Args<scalar_t> a, const Tensor& grad_weight,
                  const Tensor& grad_scale, const Tensor& grad_shift,
                  bool table_grads, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t tile = TX * CH * kVec<scalar_t>;
  constexpr int64_t teams = kThreads / TX;
  const int64_t col_tiles = ceil_div(a.K, tile);
  TORCH_CHECK(col_tiles <= 65535, "autobalance: K = ", a.K,
              " classes is more than the CUDA kernels support");
  const int64_t max_chunks = std::max<int64_t>(1, ceil_div(a.N, teams * kMinRowsPerTeam));
  const int64_t want = std::clamp<int64_t>(ceil_div(kTargetBlocks, col_tiles), 1, max_chunks);
  a.rows_per_chunk = ceil_div(a.N, want);
  const int64_t chunks = ceil_div(a.N, a.rows_per_chunk);
  Tensor partial;
  if (table_grads) {
    partial = at::empty({chunks, 3, a.G, a.K}, grad_weight.options());
    a.partial = partial.mutable_data_ptr<acc_t>();
  }
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(col_tiles));
  cuda::tile_kernel<kDouble, scalar_t, TX, CH><<<grid, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (table_grads) {
    const int64_t table = a.G * a.K;
    cuda::sum_partials_kernel<acc_t><<<ceil_div(3 * table, 32), kThreads, 0, stream>>>(
        a.partial, chunks, table, grad_weight.mutable_data_ptr<acc_t>(),
        grad_scale.mutable_data_ptr<acc_t>(), grad_shift.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// 16-byte chunks per lane in a tile: 16 accumulated values per lane (8 for
// float64), or twice that in the wide tile of the fused double backward.
template <typename scalar_t>
constexpr int kChunks = std::is_same_v<scalar_t, double> ? 4 : 16 / kVec<scalar_t>;
template <typename scalar_t>
constexpr int64_t kLaneCols = kChunks<scalar_t> * kVec<scalar_t>;

// Largest K whose row the fused double backward keeps in one tile: 1024
// (256 for float64).
template <typename scalar_t>
constexpr int64_t kFusedMaxK =
    (std::is_same_v<scalar_t, double> ? 32 : 64) * kLaneCols<scalar_t>;

// The fewest lanes (4 to 32) whose tile holds a whole row, when a tile may
// (backward) or must (fused double backward) hold one; else 32-lane tiles
// side by side along the row.
template <bool kDouble, typename scalar_t>
void run_tiles(const Args<scalar_t>& a, const Tensor& grad_weight,
               const Tensor& grad_scale, const Tensor& grad_shift,
               bool table_grads, cudaStream_t stream) {
  constexpr int CH = kChunks<scalar_t>;
  constexpr int64_t E = kLaneCols<scalar_t>;
  const auto go = [&](auto lanes, auto chunks) {
    launch_tiles<kDouble, scalar_t, decltype(lanes)::value, decltype(chunks)::value>(
        a, grad_weight, grad_scale, grad_shift, table_grads, stream);
  };
  constexpr template_int<CH> chunks{};
  const int64_t K = a.K;
  if (kDouble && a.vbar != nullptr) {
    go(template_int<32>{}, chunks);  // column tiles; v̄ came from the row pass
  } else if (K <= 4 * E) {
    go(template_int<4>{}, chunks);
  } else if (K <= 8 * E) {
    go(template_int<8>{}, chunks);
  } else if (K <= 16 * E) {
    go(template_int<16>{}, chunks);
  } else if (K <= 32 * E || !kDouble) {
    go(template_int<32>{}, chunks);  // backward, large K: column tiles
  } else if constexpr (kDouble && !std::is_same_v<scalar_t, double>) {
    TORCH_INTERNAL_ASSERT(K <= kFusedMaxK<scalar_t>);
    go(template_int<32>{}, template_int<2 * CH>{});
  } else {
    TORCH_INTERNAL_ASSERT(false, "autobalance: K = ", K, " is too large for the fused tile");
  }
}

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

// Zeros when there is nothing to sum (no table grads, or N = 0); otherwise
// sum_partials_kernel writes every entry.
Tensor table_grad(const Tensor& weight, bool computed) {
  const auto sizes = {weight.size(0), weight.size(1)};
  return computed ? at::empty(sizes, weight.options()) : at::zeros(sizes, weight.options());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> parametric_ce_backward_cuda(
    const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
    const std::optional<Tensor>& group, const Tensor& weight,
    const Tensor& scale, const Tensor& shift, const Tensor& lse,
    int64_t ignore_index, bool table_grads) {
  const Sizes s = check_inputs(logits, target, group, weight, scale, shift);
  const auto acc = accumulate_type(logits.scalar_type());
  check_per_row(grad_loss, "grad_loss", s, acc);
  check_per_row(lse, "lse", s, acc);
  // check_per_row does not look at devices; a host pointer must not reach a kernel.
  check_same_device(grad_loss, "grad_loss", logits);
  check_same_device(lse, "lse", logits);
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
        l.a.gamma = l.template input<acc_t>(grad_loss);
        l.a.lse = l.template input<acc_t>(lse);
        l.a.dz = grad_logits.mutable_data_ptr<scalar_t>();
        l.set_vec();
        run_tiles<false>(l.a, grad_weight, grad_scale, grad_shift, table_grads, l.stream);
      });
  return {grad_logits, grad_weight, grad_scale, grad_shift};
}

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
    bool table_grads) {
  const Sizes s = check_inputs(logits, target, group, weight, scale, shift);
  const auto acc = accumulate_type(logits.scalar_type());
  check_per_row(grad_loss, "grad_loss", s, acc);
  check_per_row(lse, "lse", s, acc);
  check_same_device(grad_loss, "grad_loss", logits);
  check_same_device(lse, "lse", logits);
  check_cotangents(logits, s, u_logits, u_weight, u_scale, u_shift);
  const c10::cuda::CUDAGuard guard(logits.device());
  table_grads = table_grads && s.rows > 0;
  Tensor grad_grad_loss = at::empty({s.rows}, grad_loss.options());
  Tensor grad_logits = at::empty({s.rows, s.classes}, logits.options());
  Tensor grad_weight = table_grad(weight, table_grads);
  Tensor grad_scale = table_grad(weight, table_grads);
  Tensor grad_shift = table_grad(weight, table_grads);
  if (s.rows == 0) return {grad_grad_loss, grad_logits, grad_weight, grad_scale, grad_shift};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(),
      "parametric_ce_double_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        Launch<scalar_t> l(logits, target, group, weight, scale, shift, s, ignore_index);
        l.a.gamma = l.template input<acc_t>(grad_loss);
        l.a.lse = l.template input<acc_t>(lse);
        l.a.uz = l.template input<scalar_t>(u_logits);
        l.a.UW = l.template input<acc_t>(u_weight);
        l.a.US = l.template input<acc_t>(u_scale);
        l.a.UL = l.template input<acc_t>(u_shift);
        l.a.dgamma = grad_grad_loss.mutable_data_ptr<acc_t>();
        l.a.dz = grad_logits.mutable_data_ptr<scalar_t>();
        l.set_vec();
        Tensor vbar;
        if (s.classes > kFusedMaxK<scalar_t>) {
          // The row does not fit one tile: a row pass computes v̄ and
          // grad_grad_loss first, then the tiles read v̄.
          vbar = at::empty({s.rows}, grad_loss.options());
          l.a.vbar_out = vbar.mutable_data_ptr<acc_t>();
          run_rows<true>(l.a, l.stream);
          l.a.vbar = vbar.const_data_ptr<acc_t>();
        }
        run_tiles<true>(l.a, grad_weight, grad_scale, grad_shift, table_grads, l.stream);
      });
  return {grad_grad_loss, grad_logits, grad_weight, grad_scale, grad_shift};
}

}  // namespace

TORCH_LIBRARY_IMPL(autobalance, CUDA, m) {
  m.impl("parametric_ce", &parametric_ce_cuda);
  m.impl("parametric_ce_backward", &parametric_ce_backward_cuda);
  m.impl("parametric_ce_double_backward", &parametric_ce_double_backward_cuda);
}

}  // namespace autobalance
