// Host side of the CUDA kernels: contiguous inputs, alignment, and the
// choice of kernel shape by K. Shared by parametric_ce.cu and
// parametric_ce_double_backward.cu; everything launches on the current
// stream; the one host synchronisation is the label check before the launch
// (check_row_indices_cuda; none while a CUDA graph is captured).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "kernels.cuh"

namespace autobalance {
namespace cuda {

using at::Tensor;

// Row chunks (and so table-gradient slabs) per column tile: enough blocks to
// fill a GPU, while every team gets a few rows to sum over. A function of the
// shape (and dtype) only, so table gradients are bit-identical run to run.
constexpr int64_t kTargetBlocks = 2048;
constexpr int64_t kMinRowsPerTeam = 4;
constexpr int64_t kMaxGrid = int64_t{1} << 20;  // row_kernel loops past it
// The partial tables of the table gradients ([chunks, 3, G, K]) take at most
// this much (or one chunk's, when that alone is larger): fewer chunks when
// G K is large.
constexpr int64_t kMaxPartialBytes = int64_t{256} << 20;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <int N>
using template_int = std::integral_constant<int, N>;

inline bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// The CPU kernels' IndexError for the lowest row whose target (not
// ignore_index) or group is out of range; `target` undefined (a probability
// target): the group alone. In parametric_ce.cu.
void check_row_indices_cuda(const Tensor& target, const Tensor& group, const Sizes& s,
                            int64_t ignore_index, cudaStream_t stream);

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
         int64_t ignore_index, double label_smoothing) {
    a.z = input<scalar_t>(logits);
    if (s.probs) {
      a.P = input<scalar_t>(target);
    } else {
      a.target = input<int64_t>(target);
    }
    const Tensor target_c = s.probs ? Tensor() : keep.back();
    a.q = target_coefficients<acc_t>(s, label_smoothing);
    a.group = group.has_value() ? input<int64_t>(*group) : nullptr;
    check_row_indices_cuda(target_c, group.has_value() ? keep.back() : Tensor(), s, ignore_index,
                           stream);
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
            aligned(a.dz, 16) && aligned(a.P, 16) && aligned(a.S, table_bytes) &&
            aligned(a.L, table_bytes) && aligned(a.US, table_bytes) &&
            aligned(a.UL, table_bytes);
  }
};

template <RowPass kPass, typename scalar_t, int TEAM>
void launch_rows(const Args<scalar_t>& a, cudaStream_t stream) {
  constexpr int64_t teams = kThreads / TEAM;
  const int64_t blocks = std::min(ceil_div(a.N, teams), kMaxGrid);
  if (kPass == RowPass::kSums || a.q.dense) {
    row_kernel<kPass, scalar_t, TEAM, true><<<blocks, kThreads, 0, stream>>>(a);
  } else if constexpr (kPass != RowPass::kSums) {
    row_kernel<kPass, scalar_t, TEAM, false><<<blocks, kThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Forward: 4 lanes per row for tiny K, a warp up to 256 chunks, else the
// block. The backward's sums run for K past one tile: a warp or the block.
// The double backward's row pass only runs for large K: the block.
template <RowPass kPass, typename scalar_t>
void run_rows(const Args<scalar_t>& a, cudaStream_t stream) {
  constexpr int VEC = kVec<scalar_t>;
  if constexpr (kPass == RowPass::kForward) {
    if (a.K <= 4 * VEC) return launch_rows<kPass, scalar_t, 4>(a, stream);
  }
  if constexpr (kPass != RowPass::kPrep) {
    if (a.K <= 256 * VEC) return launch_rows<kPass, scalar_t, 32>(a, stream);
  }
  launch_rows<kPass, scalar_t, kThreads>(a, stream);
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
  int64_t want = std::clamp<int64_t>(ceil_div(kTargetBlocks, col_tiles), 1, max_chunks);
  if (table_grads) {
    const int64_t chunk_bytes = 3 * a.G * a.K * static_cast<int64_t>(sizeof(acc_t));
    want = std::min(want, std::max<int64_t>(1, kMaxPartialBytes / chunk_bytes));
  }
  a.rows_per_chunk = ceil_div(a.N, want);
  const int64_t chunks = ceil_div(a.N, a.rows_per_chunk);
  Tensor partial;
  if (table_grads) {
    partial = at::empty({chunks, 3, a.G, a.K}, grad_weight.options());
    a.partial = partial.mutable_data_ptr<acc_t>();
  }
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(col_tiles));
  if (a.q.dense) {
    tile_kernel<kDouble, scalar_t, TX, CH, true><<<grid, kThreads, 0, stream>>>(a);
  } else {
    tile_kernel<kDouble, scalar_t, TX, CH, false><<<grid, kThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (table_grads) {
    const int64_t table = a.G * a.K;
    sum_partials_kernel<acc_t><<<ceil_div(3 * table, 32), kThreads, 0, stream>>>(
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

// Largest K whose row the backward's tile holds: 512 (256 for float64).
template <typename scalar_t>
constexpr int64_t kTileMaxK = 32 * kLaneCols<scalar_t>;

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
  // A dense target's Σ (section 8) is summed by a team whose tile holds the
  // whole row, else by the row pass before.
  TORCH_INTERNAL_ASSERT(!a.q.dense || a.sigma != nullptr ||
                        a.K <= (kDouble ? kFusedMaxK<scalar_t> : kTileMaxK<scalar_t>));
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
  } else if (K <= kTileMaxK<scalar_t> || !kDouble) {
    go(template_int<32>{}, chunks);  // backward, large K: column tiles
  } else if constexpr (kDouble && !std::is_same_v<scalar_t, double>) {
    TORCH_INTERNAL_ASSERT(K <= kFusedMaxK<scalar_t>);
    go(template_int<32>{}, template_int<2 * CH>{});
  } else {
    TORCH_INTERNAL_ASSERT(false, "autobalance: K = ", K, " is too large for the fused tile");
  }
}

// Zeros when there is nothing to sum (no table grads, or N = 0); otherwise
// sum_partials_kernel writes every entry.
inline Tensor table_grad(const Tensor& weight, bool computed) {
  const auto sizes = {weight.size(0), weight.size(1)};
  return computed ? at::empty(sizes, weight.options()) : at::zeros(sizes, weight.options());
}

// In parametric_ce_double_backward.cu.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> parametric_ce_double_backward_cuda(
    const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
    const std::optional<Tensor>& group, const Tensor& weight, const Tensor& scale,
    const Tensor& shift, const Tensor& lse, const std::optional<Tensor>& u_logits,
    const std::optional<Tensor>& u_weight, const std::optional<Tensor>& u_scale,
    const std::optional<Tensor>& u_shift, int64_t ignore_index, bool table_grads,
    double label_smoothing);

}  // namespace cuda
}  // namespace autobalance
