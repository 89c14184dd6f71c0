// CUDA kernels of the parametric cross-entropy (docs/math.md sections 1, 3, 4,
// and 8 for target distributions).
//
// Two kernel shapes serve the three ops:
//
// - row_kernel: one team of TEAM threads per row (4 or 32 lanes of a warp for
//   small K, the whole block for large K) streams the row once with 16-byte
//   loads and reduces it to per-row numbers: the forward's loss and lse, and
//   for large K the double backward's v̄ and grad_grad_loss, and a dense
//   target's Σ_k d_k W_k (and Σ_k d_k UW_k) that the tiles then read.
// - tile_kernel: the backward and the double backward. Block (c, t) takes
//   the rows of row chunk c and the columns of column tile t. A team of TX
//   lanes takes one row at a time and each lane owns the same E = CH * VEC
//   columns of every row, so it sums its table-gradient terms in registers.
//   When one tile holds the whole row (small K) the team also reduces the
//   row: that is the fused double backward, one read of the row, kept in
//   registers between its two passes.
//
// A target with a dense part (a probability target, or label smoothing;
// checks.h: TargetCoefficients) runs the kernels' kDense instances, chosen at
// launch: the one-hot instances are the code (and registers) without it.
// Its forward makes a second pass over the row once lse is known; its
// backward and double backward need Σ_k d_k W_k before the per-element terms:
// the team sums it when its tile holds the whole row, else a row pass has.
//
// Table gradients are deterministic, with no atomics: a block adds up its
// teams in a fixed tree order into its own slab of a [chunks, 3, G, K]
// workspace (rows of group g are summed in pass g, so a slab needs no zero
// fill), then sum_partials_kernel adds the slabs in chunk order. The number
// of chunks depends only on N, K and the dtype (never on timing or the
// device), so results are bit-identical from run to run.
//
// The per-element math is ../parametric_ce_math.h, shared with the CPU
// kernels. Everything accumulates in at::opmath_type (float32 for
// bfloat16/float16). Column indices are int (the host checks K < 2^31); row
// offsets are int64.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#include "../checks.h"
#include "../parametric_ce_math.h"

namespace autobalance {
namespace cuda {

constexpr int kThreads = 256;  // every kernel's block size

// Elements of one 16-byte access.
template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Kernel arguments; pointers an op does not use are null. Tables [G, K],
// per-row vectors [N] and rows [N, K] are contiguous.
template <typename scalar_t>
struct Args {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* z;  // logits
  const int64_t* target;  // class indices; null with a probability target
  const scalar_t* P;      // the probability target [N, K], or null
  TargetCoefficients<acc_t> q;
  const int64_t* group;  // null when G == 1
  const acc_t *W, *S, *L;
  const acc_t* upstream;  // grad_loss
  const acc_t* lse;
  // Double backward cotangents; null = absent (zero). US and UL are both
  // given or both null (autobalance::table_cotangents).
  const scalar_t* uz;
  const acc_t *UW, *US, *UL;
  bool scale_table;  // US was given, not zero-filled (math::Given)
  const acc_t* vbar;  // double backward, large K: v̄ from row_kernel
  // A dense target whose row a tile does not hold: Σ_k d_k W_k [N], then
  // Σ_k d_k UW_k [N] when UW is given, from row_kernel.
  const acc_t* sigma;
  acc_t* sigma_out;
  acc_t* loss;
  acc_t* lse_out;
  acc_t* vbar_out;
  acc_t* grad_grad_loss;
  scalar_t* dz;   // grad_logits
  acc_t* partial;  // [chunks, 3, G, K]; null when table_grads is false
  int64_t N;
  int K;
  int64_t G, ignore_index;
  int64_t rows_per_chunk;  // tile_kernel
  bool vec;  // K % VEC == 0 and every row starts aligned: vector accesses
};

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// max that propagates NaN (fmax would drop it).
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// ------------------------------------------------------------------ rows

struct Row {
  int y;  // -1: no label (a probability target)
  int64_t g;
  bool skip;  // ignore_index (or, with asserts compiled out, a bad index)
};

template <bool kDense, typename scalar_t>
__device__ __forceinline__ Row read_row(const Args<scalar_t>& a, int64_t i) {
  if constexpr (kDense) {
    if (!a.target) {  // a probability target: never ignored, only the group to check
      const int64_t g = a.group ? a.group[i] : 0;
      const bool ok = g >= 0 && g < a.G;
      return {-1, ok ? g : 0, !ok};
    }
  }
  const int64_t y = a.target[i];
  if (y == a.ignore_index) return {0, 0, true};
  const int64_t g = a.group ? a.group[i] : 0;
  // The host has checked every index before the launch
  // (check_row_indices_cuda in parametric_ce.cu raises the CPU kernels'
  // IndexError); should a bad one come through anyway (the indices changed on
  // another stream, or the check was skipped during CUDA-graph capture), the
  // row is skipped, so nothing is read or written out of bounds.
  const bool ok = y >= 0 && y < a.K && g >= 0 && g < a.G;
  return {ok ? static_cast<int>(y) : 0, ok ? g : 0, !ok};
}

// The VEC columns first + v * step that a lane handles in a chunk of
// LANES * VEC columns starting at `base`: contiguous (one vector access) when
// rows are aligned, else strided by LANES so that the scalar accesses of
// neighbouring lanes are coalesced. Either way the lanes cover the chunk once.
struct Cols {
  int first, step;
  __device__ __forceinline__ int operator[](int v) const { return first + v * step; }
};

template <int LANES, int VEC>
__device__ __forceinline__ Cols chunk_cols(int base, int lane, bool vec) {
  return vec ? Cols{base + lane * VEC, 1} : Cols{base + lane, LANES};
}

// Loads row[c[v]] for v < VEC, zero past K. step == 1 only on the aligned
// path, where K % VEC == 0 makes a chunk either full or entirely past K.
template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load(const T* row, Cols c, int K) {
  Pack<T, VEC> out;
  if (c.step == 1 && c.first + VEC <= K) {
    out = *reinterpret_cast<const Pack<T, VEC>*>(row + c.first);
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) out.v[v] = c[v] < K ? row[c[v]] : T(0);
  }
  return out;
}

template <int VEC, typename T>
__device__ __forceinline__ void store(T* row, Cols c, int K, const Pack<T, VEC>& x) {
  if (c.step == 1 && c.first + VEC <= K) {
    *reinterpret_cast<Pack<T, VEC>*>(row + c.first) = x;
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v)
      if (c[v] < K) row[c[v]] = x.v[v];
  }
}

// ------------------------------------------------------------ reductions

// Lanes of this thread's team within its warp (LANES a power of two <= 32).
template <int LANES>
__device__ __forceinline__ unsigned team_mask() {
  if constexpr (LANES == 32) {
    return 0xffffffffu;
  } else {
    return ((1u << LANES) - 1u) << ((threadIdx.x & 31) & ~(LANES - 1));
  }
}

template <typename T>
__device__ __forceinline__ T shfl_xor(unsigned mask, T v, int offset) {
  return __shfl_xor_sync(mask, v, offset);
}

// Online log-sum-exp: running max m and sum s of exp(a - m).
template <typename T>
struct Lse {
  T m, s;
};

template <typename T>
__device__ __forceinline__ Lse<T> shfl_xor(unsigned mask, Lse<T> v, int offset) {
  return {__shfl_xor_sync(mask, v.m, offset), __shfl_xor_sync(mask, v.s, offset)};
}

template <typename T>
__device__ __forceinline__ Lse<T> lse_merge(Lse<T> a, Lse<T> b) {
  const T m = nan_max(a.m, b.m);
  if (m == neg_inf<T>()) return a;  // both empty
  return {m, a.s * exp_(a.m - m) + b.s * exp_(b.m - m)};
}

// Adds one chunk of adjusted logits; masked entries are -inf.
template <int VEC, typename T>
__device__ __forceinline__ void lse_add(Lse<T>& acc, const T (&a)[VEC]) {
  T chunk_max = a[0];
#pragma unroll
  for (int v = 1; v < VEC; ++v) chunk_max = nan_max(chunk_max, a[v]);
  if (chunk_max == neg_inf<T>()) return;
  const T m = nan_max(acc.m, chunk_max);
  T s = 0;
#pragma unroll
  for (int v = 0; v < VEC; ++v) s += exp_(a[v] - m);
  acc.s = acc.s * exp_(acc.m - m) + s;
  acc.m = m;
}

struct Plus {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

struct LseMerge {
  template <typename T>
  __device__ __forceinline__ Lse<T> operator()(Lse<T> a, Lse<T> b) const {
    return lse_merge(a, b);
  }
};

// Reduces v over a team of TEAM threads: TEAM <= 32 lanes of one warp (all
// of them must call), or the whole block (TEAM == kThreads; every thread must
// call). Every thread gets the result.
template <int TEAM, typename T, typename Op>
__device__ __forceinline__ T team_reduce(T v, Op op) {
  constexpr int kLanes = TEAM < 32 ? TEAM : 32;
  const unsigned mask = team_mask<kLanes>();
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) v = op(v, shfl_xor(mask, v, offset));
  if constexpr (TEAM > 32) {
    static_assert(TEAM == kThreads, "a team wider than a warp is the block");
    __shared__ T warp_result[kThreads / 32];
    if ((threadIdx.x & 31) == 0) warp_result[threadIdx.x / 32] = v;
    __syncthreads();
    v = warp_result[0];
#pragma unroll
    for (int w = 1; w < kThreads / 32; ++w) v = op(v, warp_result[w]);
    __syncthreads();  // warp_result is reused by the next row
  }
  return v;
}

// ------------------------------------------------------------------ math

// p_k = exp(a_k - lse) (docs/math.md section 1).
template <typename T>
__device__ __forceinline__ T prob(T S, T z, T L, T lse) {
  return exp_(math::adjusted_logit(S, z, L) - lse);
}

template <typename scalar_t>
__device__ __forceinline__ math::Given given_cotangents(const Args<scalar_t>& a) {
  return {a.uz != nullptr, a.US != nullptr, a.scale_table};
}

// One chunk of the cotangent tables US and UL of the group row at `off`;
// zeros, which math:: does not read, when they are not given.
template <int VEC, typename T>
struct CotangentTables {
  Pack<T, VEC> US{}, UL{};
};

template <int VEC, typename scalar_t>
__device__ __forceinline__ CotangentTables<VEC, at::opmath_type<scalar_t>> load_cotangent_tables(
    const Args<scalar_t>& a, math::Given given, int64_t off, Cols c) {
  CotangentTables<VEC, at::opmath_type<scalar_t>> t;
  if (given.tables) {
    t.US = load<VEC>(a.US + off, c, a.K);
    t.UL = load<VEC>(a.UL + off, c, a.K);
  }
  return t;
}

// Adds Σ_k p_k v_k over one chunk of a row (columns past K left out) to
// `sum`: the chunk's share of v̄ (docs/math.md section 4). `off` is the
// offset of the row's group in the tables.
template <int VEC, typename scalar_t>
__device__ __forceinline__ void add_vbar_chunk(at::opmath_type<scalar_t>& sum, const Args<scalar_t>& a,
                                               math::Given given, int64_t off, Cols c,
                                               const Pack<scalar_t, VEC>& z, const Pack<scalar_t, VEC>& uz,
                                               at::opmath_type<scalar_t> lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto Sc = load<VEC>(a.S + off, c, a.K);
  const auto Lc = load<VEC>(a.L + off, c, a.K);
  const auto U = load_cotangent_tables<VEC>(a, given, off, c);
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    if (c[v] >= a.K) continue;
    const acc_t zk = static_cast<acc_t>(z.v[v]);
    const acc_t uk = given.uz ? static_cast<acc_t>(uz.v[v]) : acc_t(0);
    sum += prob(Sc.v[v], zk, Lc.v[v], lse) * math::cotangent(given, Sc.v[v], uk, zk, U.US.v[v], U.UL.v[v]);
  }
}

// The per-row numbers of the double backward (docs/math.md section 4).
template <typename T>
struct DoubleRow {
  T c;    // ω W[g,y]: r_k = c (p_k - [k = y])
  T cu;   // ω UW[g,y]
  T ce;   // lse - a_y
  T v_y;  // v at the label
  T Wy, UWy;
};

template <typename scalar_t>
__device__ __forceinline__ DoubleRow<at::opmath_type<scalar_t>> double_row(
    const Args<scalar_t>& a, int64_t i, const Row& r) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t at_y = r.g * a.K + r.y;
  const math::Given given = given_cotangents(a);
  const acc_t z_y = static_cast<acc_t>(a.z[i * a.K + r.y]);
  const acc_t uz_y = given.uz ? static_cast<acc_t>(a.uz[i * a.K + r.y]) : acc_t(0);
  const acc_t S_y = a.S[at_y];
  const acc_t upstream = a.upstream[i];
  DoubleRow<acc_t> d;
  d.Wy = a.W[at_y];
  d.UWy = a.UW ? a.UW[at_y] : acc_t(0);
  d.c = math::residual_scale(upstream, d.Wy);
  d.cu = math::residual_scale(upstream, d.UWy);
  d.ce = math::cross_entropy(a.lse[i], math::adjusted_logit(S_y, z_y, a.L[at_y]));
  d.v_y = math::cotangent(given, S_y, uz_y, z_y, given.tables ? a.US[at_y] : acc_t(0),
                          given.tables ? a.UL[at_y] : acc_t(0));
  return d;
}

// ------------------------------------------- target distributions (section 8)

// d_k = β P_k + γ over one chunk of row i (P widened from the logits' dtype).
template <int VEC, typename scalar_t>
__device__ __forceinline__ Pack<at::opmath_type<scalar_t>, VEC> load_dense(const Args<scalar_t>& a,
                                                                           int64_t i, Cols c) {
  using acc_t = at::opmath_type<scalar_t>;
  Pack<acc_t, VEC> d;
  if (a.P) {
    const auto P = load<VEC>(a.P + i * a.K, c, a.K);
#pragma unroll
    for (int v = 0; v < VEC; ++v)
      d.v[v] = math::dense_target(a.q.beta, static_cast<acc_t>(P.v[v]), a.q.gamma);
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) d.v[v] = a.q.gamma;
  }
  return d;
}

// The dense parts of Σ = Σ_k q_k W_k and ΣU = Σ_k q_k UW_k (u stays 0
// without UW).
template <typename T>
struct DenseSums {
  T w, u;
};

template <int VEC, typename scalar_t>
__device__ __forceinline__ void add_dense_sums_chunk(DenseSums<at::opmath_type<scalar_t>>& sum,
                                                     const Args<scalar_t>& a, int64_t i,
                                                     int64_t off, Cols c) {
  const auto d = load_dense<VEC>(a, i, c);
  const auto Wc = load<VEC>(a.W + off, c, a.K);
  Pack<at::opmath_type<scalar_t>, VEC> UWc{};
  if (a.UW) UWc = load<VEC>(a.UW + off, c, a.K);
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    if (c[v] >= a.K) continue;
    sum.w += d.v[v] * Wc.v[v];
    if (a.UW) sum.u += d.v[v] * UWc.v[v];
  }
}

// Reduces a team's DenseSums; every lane of the team must call.
template <int TEAM, typename T>
__device__ __forceinline__ DenseSums<T> team_reduce_sums(DenseSums<T> s, bool with_u) {
  s.w = team_reduce<TEAM>(s.w, Plus{});
  if (with_u) s.u = team_reduce<TEAM>(s.u, Plus{});
  return s;
}

// Adds the forward's Σ_k d_k W_k nlp_k over one chunk of row i.
template <int VEC, typename scalar_t>
__device__ __forceinline__ void add_dense_loss_chunk(at::opmath_type<scalar_t>& sum,
                                                     const Args<scalar_t>& a, int64_t i,
                                                     int64_t off, Cols c,
                                                     at::opmath_type<scalar_t> lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto z = load<VEC>(a.z + i * a.K, c, a.K);
  const auto Sc = load<VEC>(a.S + off, c, a.K);
  const auto Lc = load<VEC>(a.L + off, c, a.K);
  const auto Wc = load<VEC>(a.W + off, c, a.K);
  const auto d = load_dense<VEC>(a, i, c);
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    if (c[v] >= a.K) continue;
    const acc_t nlp =
        math::cross_entropy(lse, math::adjusted_logit(Sc.v[v], static_cast<acc_t>(z.v[v]), Lc.v[v]));
    sum += math::loss(d.v[v] * Wc.v[v], nlp);
  }
}

// Adds the dense part of ∂Q/∂ω, Σ_k d_k (W_k (v̄ - v_k) + UW_k nlp_k), over one
// chunk of row i.
template <int VEC, typename scalar_t>
__device__ __forceinline__ void add_dense_grad_grad_loss_chunk(
    at::opmath_type<scalar_t>& sum, const Args<scalar_t>& a, math::Given given, int64_t i,
    int64_t off, Cols c, at::opmath_type<scalar_t> lse, at::opmath_type<scalar_t> vbar) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto z = load<VEC>(a.z + i * a.K, c, a.K);
  Pack<scalar_t, VEC> uz{};
  if (given.uz) uz = load<VEC>(a.uz + i * a.K, c, a.K);
  const auto Sc = load<VEC>(a.S + off, c, a.K);
  const auto Lc = load<VEC>(a.L + off, c, a.K);
  const auto Wc = load<VEC>(a.W + off, c, a.K);
  Pack<acc_t, VEC> UWc{};
  if (a.UW) UWc = load<VEC>(a.UW + off, c, a.K);
  const auto U = load_cotangent_tables<VEC>(a, given, off, c);
  const auto d = load_dense<VEC>(a, i, c);
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    if (c[v] >= a.K) continue;
    const acc_t zk = static_cast<acc_t>(z.v[v]);
    const acc_t uk = given.uz ? static_cast<acc_t>(uz.v[v]) : acc_t(0);
    const acc_t vk = math::cotangent(given, Sc.v[v], uk, zk, U.US.v[v], U.UL.v[v]);
    const acc_t nlp = math::cross_entropy(lse, math::adjusted_logit(Sc.v[v], zk, Lc.v[v]));
    sum += math::grad_grad_loss(d.v[v] * Wc.v[v], d.v[v] * UWc.v[v], vbar, vk, nlp);
  }
}

// The label's part of a row of a dense target: double_row's numbers with
// α W[g,y] and α UW[g,y] (so c and cu are the label's ω α W_y, ω α UW_y);
// all zero without a label.
template <typename scalar_t>
__device__ __forceinline__ DoubleRow<at::opmath_type<scalar_t>> dense_label_row(
    const Args<scalar_t>& a, int64_t i, const Row& r) {
  DoubleRow<at::opmath_type<scalar_t>> d{};
  if (r.y < 0) return d;
  d = double_row(a, i, r);
  d.Wy = a.q.alpha * d.Wy;
  d.UWy = a.q.alpha * d.UWy;
  d.c = math::residual_scale(a.upstream[i], d.Wy);
  d.cu = math::residual_scale(a.upstream[i], d.UWy);
  return d;
}

// ------------------------------------------------------------- row_kernel

enum class RowPass {
  kForward,  // writes loss and lse
  // the backward of a dense target whose row no tile holds: writes
  // sigma_out = Σ_k d_k W_k
  kSums,
  // double backward for large K: writes v̄ = Σ_k p_k v_k and grad_grad_loss,
  // and for a dense target sigma_out = Σ_k d_k W_k, Σ_k d_k UW_k
  kPrep,
};

// A dense target's instances get more registers rather than spill.
template <RowPass kPass, typename scalar_t, int TEAM, bool kDense>
__global__ void __launch_bounds__(kThreads, kPass == RowPass::kPrep ? 1 : (kDense ? 2 : 3))
    row_kernel(const Args<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kForward = kPass == RowPass::kForward;
  constexpr bool kPrep = kPass == RowPass::kPrep;
  constexpr int VEC = kVec<scalar_t>;
  constexpr int kTeams = kThreads / TEAM;
  constexpr int kStride = TEAM * VEC;  // columns per team chunk
  constexpr int kAhead = 4;            // chunks loaded before any is used
  const int lane = threadIdx.x % TEAM;
  const int K = a.K;
  constexpr bool dense = kDense;
  const math::Given given = given_cotangents(a);
  // Team-uniform loops: the lanes of a team always take the same branches.
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kTeams + threadIdx.x / TEAM; i < a.N;
       i += static_cast<int64_t>(gridDim.x) * kTeams) {
    const Row r = read_row<kDense>(a, i);
    if (r.skip) {
      if (lane == 0) {
        if constexpr (kPrep) {
          a.vbar_out[i] = 0;
          a.grad_grad_loss[i] = 0;
        } else if constexpr (kForward) {
          a.loss[i] = 0;
          a.lse_out[i] = 0;
        }
      }
      continue;
    }
    const scalar_t* z = a.z + i * K;
    const scalar_t* uz = given.uz ? a.uz + i * K : nullptr;
    const int64_t off = r.g * K;
    const acc_t* S = a.S + off;
    const acc_t* L = a.L + off;
    const acc_t lse_in = kPrep ? a.lse[i] : acc_t(0);
    Lse<acc_t> lse{neg_inf<acc_t>(), acc_t(0)};  // forward
    acc_t vbar = 0;                               // prep
    DenseSums<acc_t> sums{};                      // sums, and prep of a dense target
    for (int base = 0; base < K; base += kAhead * kStride) {
      Pack<scalar_t, VEC> zc[kAhead], uc[kAhead];
#pragma unroll
      for (int u = 0; u < kAhead; ++u) {
        const int b = base + u * kStride;
        if (kPass == RowPass::kSums || b >= K) continue;
        const Cols c = chunk_cols<TEAM, VEC>(b, lane, a.vec);
        zc[u] = load<VEC>(z, c, K);
        if (kPrep && given.uz) uc[u] = load<VEC>(uz, c, K);
      }
#pragma unroll
      for (int u = 0; u < kAhead; ++u) {
        const int b = base + u * kStride;
        if (b >= K) continue;
        const Cols c = chunk_cols<TEAM, VEC>(b, lane, a.vec);
        if constexpr (kForward) {
          const auto Sc = load<VEC>(S, c, K);
          const auto Lc = load<VEC>(L, c, K);
          acc_t logit[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v)
            logit[v] = c[v] < K
                           ? math::adjusted_logit(Sc.v[v], static_cast<acc_t>(zc[u].v[v]), Lc.v[v])
                           : neg_inf<acc_t>();
          lse_add(lse, logit);
        } else {
          if constexpr (kPrep) add_vbar_chunk<VEC>(vbar, a, given, off, c, zc[u], uc[u], lse_in);
          if constexpr (dense) add_dense_sums_chunk<VEC>(sums, a, i, off, c);
        }
      }
    }
    if constexpr (kForward) {
      lse = team_reduce<TEAM>(lse, LseMerge{});
      const acc_t value = lse.m + log_(lse.s);
      // A dense target's Σ_k d_k W_k nlp_k needs lse: a second pass.
      acc_t dense_loss = 0;
      if constexpr (dense) {
        for (int b = 0; b < K; b += kStride)
          add_dense_loss_chunk<VEC>(dense_loss, a, i, off, chunk_cols<TEAM, VEC>(b, lane, a.vec), value);
        dense_loss = team_reduce<TEAM>(dense_loss, Plus{});
      }
      if (lane == 0) {
        a.lse_out[i] = value;
        if constexpr (!dense) {
          const acc_t a_y = math::adjusted_logit(S[r.y], static_cast<acc_t>(z[r.y]), L[r.y]);
          a.loss[i] = math::loss(a.W[off + r.y], math::cross_entropy(value, a_y));
        } else if (r.y >= 0) {
          const acc_t a_y = math::adjusted_logit(S[r.y], static_cast<acc_t>(z[r.y]), L[r.y]);
          a.loss[i] = dense_loss + math::loss(a.q.alpha * a.W[off + r.y], math::cross_entropy(value, a_y));
        } else {
          a.loss[i] = dense_loss;
        }
      }
      continue;
    }
    if constexpr (dense) {
      sums = team_reduce_sums<TEAM>(sums, a.UW != nullptr);
      if (lane == 0) {
        a.sigma_out[i] = sums.w;
        if (a.UW) a.sigma_out[a.N + i] = sums.u;
      }
    }
    if constexpr (kPrep) {
      vbar = team_reduce<TEAM>(vbar, Plus{});
      // The dense part of grad_grad_loss needs v̄: a second pass.
      acc_t dense_ggl = 0;
      if constexpr (dense) {
        for (int b = 0; b < K; b += kStride) {
          add_dense_grad_grad_loss_chunk<VEC>(dense_ggl, a, given, i, off,
                                              chunk_cols<TEAM, VEC>(b, lane, a.vec), lse_in, vbar);
        }
        dense_ggl = team_reduce<TEAM>(dense_ggl, Plus{});
      }
      if (lane == 0) {
        a.vbar_out[i] = vbar;
        if constexpr (!dense) {
          const auto d = double_row(a, i, r);
          a.grad_grad_loss[i] = math::grad_grad_loss(d.Wy, d.UWy, vbar, d.v_y, d.ce);
        } else if (r.y >= 0) {
          const auto d = dense_label_row(a, i, r);
          a.grad_grad_loss[i] = dense_ggl + math::grad_grad_loss(d.Wy, d.UWy, vbar, d.v_y, d.ce);
        } else {
          a.grad_grad_loss[i] = dense_ggl;
        }
      }
    }
  }
}

// ------------------------------------------------------------ tile_kernel

// The slot ch * VEC + v at which this lane holds column tile0 + rel (the
// inverse of chunk_cols), or -1 when another lane (or tile) has it.
template <int TX, int CH, int VEC>
__device__ __forceinline__ int owned_slot(int rel, int lane, bool vec) {
  if (rel < 0 || rel >= TX * CH * VEC) return -1;
  int ch, v, owner;
  if (vec) {
    ch = rel / (TX * VEC);
    owner = rel / VEC % TX;
    v = rel % VEC;
  } else {
    ch = rel / (TX * VEC);
    v = rel % (TX * VEC) / TX;
    owner = rel % TX;
  }
  return owner == lane ? ch * VEC + v : -1;
}

// With 16 float32 values per lane (E = 16) the backward fits 128 registers,
// so two blocks per SM: four 16-byte loads in flight per lane. The double
// backward of 2-byte logits, float64, the wide fused tile (E = 32) and dense
// targets (which spilled at 128) need more and get one block per SM.
template <bool kDouble, typename scalar_t, int CH, bool kDense>
constexpr int tile_min_blocks() {
  constexpr bool fits = sizeof(at::opmath_type<scalar_t>) == 4 && CH * kVec<scalar_t> <= 16 &&
                        !(kDouble && sizeof(scalar_t) == 2) && !kDense;
  return fits ? 2 : 1;
}

// kDouble = false: backward (docs/math.md section 3). kDouble = true: double
// backward (section 4); with a.vbar null the tile holds the whole row and
// the team computes v̄ and grad_grad_loss itself, else row_kernel<kPrep> has.
// A dense target (section 8) adds ω d_k W_k (ω d_k UW_k) to each column's
// terms and grad W (one entry per column, summed in the tree); its Σ and ΣU
// come from a.sigma when set, else the tile holds the whole row.
template <bool kDouble, typename scalar_t, int TX, int CH, bool kDense>
__global__ void __launch_bounds__(kThreads, (tile_min_blocks<kDouble, scalar_t, CH, kDense>()))
    tile_kernel(const Args<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VEC = kVec<scalar_t>;
  constexpr int TY = kThreads / TX;  // teams per block
  constexpr int E = CH * VEC;        // columns per lane
  constexpr int TILE = TX * E;
  // Slot e of team j is tree[j * TILE + e * TX + lane] (lane fastest: no bank
  // conflicts). During a pass it sums grad W (one entry per row, so not worth
  // E registers); at the end it holds each table in turn for the tree sum.
  __shared__ acc_t tree[kThreads * E];

  const int lane = threadIdx.x % TX, team = threadIdx.x / TX;
  acc_t* const my_tree = tree + team * TILE + lane;
  const int K = a.K;
  const int64_t G = a.G;
  const int tile0 = blockIdx.y * TILE;
  const int64_t chunk = blockIdx.x;
  const int64_t row_begin = chunk * a.rows_per_chunk;
  const int64_t row_end =
      row_begin + a.rows_per_chunk < a.N ? row_begin + a.rows_per_chunk : a.N;
  const bool table_grads = a.partial != nullptr;
  const bool fused = kDouble && a.vbar == nullptr;
  constexpr bool dense = kDense;
  const math::Given given = given_cotangents(a);
  const auto cols = [&](int ch) {
    return chunk_cols<TX, VEC>(tile0 + ch * TX * VEC, lane, a.vec);
  };
  const auto in_row = [&](int ch) { return tile0 + ch * TX * VEC < K; };
  // The dense parts of row i's Σ and ΣU: from the row pass, or summed by the
  // team over its tile, which then holds the whole row.
  const auto dense_sums = [&](int64_t i, int64_t off) {
    if (a.sigma) return DenseSums<acc_t>{a.sigma[i], a.UW ? a.sigma[a.N + i] : acc_t(0)};
    DenseSums<acc_t> sums{};
#pragma unroll
    for (int ch = 0; ch < CH; ++ch)
      if (in_row(ch)) add_dense_sums_chunk<VEC>(sums, a, i, off, cols(ch));
    return team_reduce_sums<TX>(sums, a.UW != nullptr);
  };

  // With table grads, pass g takes the rows of group g (ignored rows go to
  // pass 0), so each pass fills the slab of one group.
  const int64_t passes = table_grads ? G : 1;
  for (int64_t pass = 0; pass < passes; ++pass) {
    acc_t acc[2][E];  // this lane's sums of grad S and grad L
#pragma unroll
    for (int e = 0; e < E; ++e) {
      acc[0][e] = acc[1][e] = 0;
      my_tree[e * TX] = 0;
    }

    for (int64_t i = row_begin + team; i < row_end; i += TY) {
      const Row r = read_row<kDense>(a, i);
      if (table_grads && r.g != pass) continue;
      scalar_t* dz = a.dz + i * K;
      if (r.skip) {
        Pack<scalar_t, VEC> zero;
#pragma unroll
        for (int v = 0; v < VEC; ++v) zero.v[v] = scalar_t(0);
#pragma unroll
        for (int ch = 0; ch < CH; ++ch)
          if (in_row(ch)) store<VEC>(dz, cols(ch), K, zero);
        if (fused && lane == 0) a.grad_grad_loss[i] = 0;
        continue;
      }
      const int64_t off = r.g * K;
      const int y_slot = owned_slot<TX, CH, VEC>(r.y - tile0, lane, a.vec);
      const acc_t upstream = a.upstream[i], lse = a.lse[i];
      const scalar_t* z = a.z + i * K;
      const scalar_t* uz = given.uz ? a.uz + i * K : nullptr;
      // One read of the row, kept in registers for both passes.
      Pack<scalar_t, VEC> zc[CH], uc[CH];
#pragma unroll
      for (int ch = 0; ch < CH; ++ch) {
        if (!in_row(ch)) continue;
        zc[ch] = load<VEC>(z, cols(ch), K);
        if (kDouble && given.uz) uc[ch] = load<VEC>(uz, cols(ch), K);
      }

      // Every column takes the off-label form of r and t; the label's column
      // then takes its term off (math::residual_label), as on the CPU.
      acc_t dW_y = 0;
      if constexpr (!kDouble) {
        // Section 3: r, grad z, grad S, grad L and grad W[g,y]. A dense target
        // (section 8): c = ω Σ for the p-terms, ω α W_y for the label's.
        acc_t c, c_label;
        if constexpr (!dense) {
          c = c_label = math::residual_scale(upstream, a.W[off + r.y]);
          const acc_t a_y =
              math::adjusted_logit(a.S[off + r.y], static_cast<acc_t>(z[r.y]), a.L[off + r.y]);
          dW_y = math::grad_weight(upstream, math::cross_entropy(lse, a_y));
        } else {
          const acc_t W_label = r.y >= 0 ? a.q.alpha * a.W[off + r.y] : acc_t(0);
          c = math::residual_scale(upstream, dense_sums(i, off).w + W_label);
          c_label = math::residual_scale(upstream, W_label);
          if (r.y >= 0) {
            const acc_t a_y =
                math::adjusted_logit(a.S[off + r.y], static_cast<acc_t>(z[r.y]), a.L[off + r.y]);
            dW_y = math::grad_weight(upstream * a.q.alpha, math::cross_entropy(lse, a_y));
          }
        }
#pragma unroll
        for (int ch = 0; ch < CH; ++ch) {
          if (!in_row(ch)) continue;
          const Cols cc = cols(ch);
          const auto Sc = load<VEC>(a.S + off, cc, K);
          const auto Lc = load<VEC>(a.L + off, cc, K);
          Pack<acc_t, VEC> Wc{}, dc{};
          if constexpr (dense) {
            Wc = load<VEC>(a.W + off, cc, K);
            dc = load_dense<VEC>(a, i, cc);
          }
          Pack<scalar_t, VEC> out;
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const int e = ch * VEC + v;
            const acc_t zk = static_cast<acc_t>(zc[ch].v[v]);
            const acc_t p = prob(Sc.v[v], zk, Lc.v[v], lse);
            acc_t rk;
            if constexpr (!dense) {
              rk = math::residual(c, p);
            } else {
              const acc_t ud = upstream * dc.v[v];
              rk = math::dense_residual(c, p, ud, Wc.v[v]);
              const acc_t nlp = math::cross_entropy(lse, math::adjusted_logit(Sc.v[v], zk, Lc.v[v]));
              if (table_grads) my_tree[e * TX] += math::grad_weight(ud, nlp);
            }
            acc_t dzk = math::grad_logit(Sc.v[v], rk);
            acc[0][e] = math::add_grad_scale(acc[0][e], rk, zk);
            acc[1][e] = math::add_grad_shift(acc[1][e], rk);
            if (e == y_slot) math::residual_label(c_label, Sc.v[v], zk, dzk, &acc[0][e], &acc[1][e]);
            out.v[v] = static_cast<scalar_t>(dzk);
          }
          store<VEC>(dz, cc, K, out);
        }
      } else {
        // A dense target's d holds the label's part (zero without a label).
        const auto d = dense ? dense_label_row(a, i, r) : double_row(a, i, r);
        acc_t vbar;
        if (fused) {
          // Pass 1: v̄ = Σ_k p_k v_k over the row, all of it in this tile.
          acc_t sum = 0;
#pragma unroll
          for (int ch = 0; ch < CH; ++ch) {
            if (in_row(ch)) add_vbar_chunk<VEC>(sum, a, given, off, cols(ch), zc[ch], uc[ch], lse);
          }
          vbar = team_reduce<TX>(sum, Plus{});
          if (!dense && lane == 0) {
            a.grad_grad_loss[i] = math::grad_grad_loss(d.Wy, d.UWy, vbar, d.v_y, d.ce);
          }
        } else {
          vbar = a.vbar[i];
        }
        // The p-terms' c and cu: the label's, or with a dense target ω Σ and
        // ω ΣU (section 8).
        acc_t c = d.c, cu = d.cu;
        if constexpr (dense) {
          const auto sums = dense_sums(i, off);
          c = math::residual_scale(upstream, sums.w + d.Wy);
          cu = math::residual_scale(upstream, sums.u + d.UWy);
        }
        acc_t dense_ggl = 0;  // fused: the dense part of grad_grad_loss
        // Pass 2 (section 4): r, t, grad z, grad S, grad L and grad W[g,y].
        dW_y = math::double_grad_weight(dense ? upstream * a.q.alpha : upstream, vbar, d.v_y);
#pragma unroll
        for (int ch = 0; ch < CH; ++ch) {
          if (!in_row(ch)) continue;
          const Cols cc = cols(ch);
          const auto Sc = load<VEC>(a.S + off, cc, K);
          const auto Lc = load<VEC>(a.L + off, cc, K);
          const auto U = load_cotangent_tables<VEC>(a, given, off, cc);
          Pack<acc_t, VEC> Wc{}, UWc{}, dc{};
          if constexpr (dense) {
            Wc = load<VEC>(a.W + off, cc, K);
            if (a.UW) UWc = load<VEC>(a.UW + off, cc, K);
            dc = load_dense<VEC>(a, i, cc);
          }
          Pack<scalar_t, VEC> out;
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const int e = ch * VEC + v;
            const acc_t zk = static_cast<acc_t>(zc[ch].v[v]);
            const acc_t uk = given.uz ? static_cast<acc_t>(uc[ch].v[v]) : acc_t(0);
            const acc_t p = prob(Sc.v[v], zk, Lc.v[v], lse);
            const acc_t vk = math::cotangent(given, Sc.v[v], uk, zk, U.US.v[v], U.UL.v[v]);
            acc_t rk, tk;
            if constexpr (!dense) {
              rk = math::residual(c, p);
              tk = math::double_residual(c, cu, p, vk, vbar);
            } else {
              const acc_t ud = upstream * dc.v[v];
              rk = math::dense_residual(c, p, ud, Wc.v[v]);
              tk = math::dense_double_residual(c, cu, p, vk, vbar, ud, UWc.v[v]);
              if (fused && cc[v] < K) {
                const acc_t nlp = math::cross_entropy(lse, math::adjusted_logit(Sc.v[v], zk, Lc.v[v]));
                dense_ggl += math::grad_grad_loss(dc.v[v] * Wc.v[v], dc.v[v] * UWc.v[v], vbar, vk, nlp);
              }
              if (table_grads) my_tree[e * TX] += math::double_grad_weight(ud, vbar, vk);
            }
            acc_t dzk = math::double_grad_logit(given, Sc.v[v], tk, U.US.v[v], rk);
            acc[0][e] = math::add_double_grad_scale(given, acc[0][e], zk, tk, uk, rk);
            acc[1][e] = math::add_grad_shift(acc[1][e], tk);
            if (e == y_slot) {
              math::double_residual_label(given, d.c, d.cu, Sc.v[v], zk, uk, U.US.v[v], dzk,
                                          &acc[0][e], &acc[1][e]);
            }
            out.v[v] = static_cast<scalar_t>(dzk);
          }
          store<VEC>(dz, cc, K, out);
        }
        if (dense && fused) {
          dense_ggl = team_reduce<TX>(dense_ggl, Plus{});
          if (lane == 0) {
            a.grad_grad_loss[i] =
                r.y >= 0 ? dense_ggl + math::grad_grad_loss(d.Wy, d.UWy, vbar, d.v_y, d.ce)
                         : dense_ggl;
          }
        }
      }
      if (y_slot >= 0) my_tree[y_slot * TX] += dW_y;
    }

    if (!table_grads) continue;  // uniform over the block
    // Sum the TY teams in a fixed tree order; team 0 writes this block's slab
    // of group `pass`, one table at a time (W is already in the tree).
#pragma unroll
    for (int t = 0; t < 3; ++t) {
      if (t > 0) {
#pragma unroll
        for (int e = 0; e < E; ++e) my_tree[e * TX] = acc[t - 1][e];
      }
      __syncthreads();
#pragma unroll
      for (int half = TY / 2; half > 0; half /= 2) {
        if (team < half) {
#pragma unroll
          for (int e = 0; e < E; ++e) my_tree[e * TX] += my_tree[half * TILE + e * TX];
        }
        __syncthreads();
      }
      if (team == 0) {
        acc_t* slab = a.partial + ((chunk * 3 + t) * G + pass) * K;
#pragma unroll
        for (int ch = 0; ch < CH; ++ch) {
          const Cols cc = cols(ch);
#pragma unroll
          for (int v = 0; v < VEC; ++v)
            if (cc[v] < K) slab[cc[v]] = my_tree[(ch * VEC + v) * TX];
        }
      }
      __syncthreads();  // the tree is refilled next
    }
  }
}

// grad table[t][g, k] = Σ_chunk partial[chunk, t, g, k], chunks in a fixed
// order: kStripes threads per entry take every kStripes-th chunk, then one
// thread adds the stripes in order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(
    const acc_t* partial, int64_t chunks, int64_t table, acc_t* grad_weight,
    acc_t* grad_scale, acc_t* grad_shift) {
  constexpr int kCols = 32, kStripes = kThreads / kCols;
  __shared__ acc_t stripe_sum[kStripes][kCols];
  const int col = threadIdx.x % kCols, stripe = threadIdx.x / kCols;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kCols + col;  // in [3, G, K]
  const bool valid = e < 3 * table;
  acc_t s = 0;
  if (valid)
    for (int64_t c = stripe; c < chunks; c += kStripes) s += partial[c * 3 * table + e];
  stripe_sum[stripe][col] = s;
  __syncthreads();
  if (stripe == 0 && valid) {
    acc_t total = stripe_sum[0][col];
#pragma unroll
    for (int j = 1; j < kStripes; ++j) total += stripe_sum[j][col];
    acc_t* out = e < table ? grad_weight : (e < 2 * table ? grad_scale : grad_shift);
    out[e % table] = total;
  }
}

}  // namespace cuda
}  // namespace autobalance
