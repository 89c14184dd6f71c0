// The per-element math of the parametric cross-entropy (docs/math.md sections 1,
// 3, 4), written once for the CPU kernels (csrc/cpu) and the CUDA kernels
// (csrc/cuda): they differ only in loops, loads and stores, reductions,
// exponentials and launches. Its plain-PyTorch twin is
// python/autobalance/reference.py, an independent re-derivation by autograd.
//
// T is the accumulation type (float or double), or on the CPU its
// at::vec::Vectorized; both backends pass every argument in that one type.
// `upstream` is the per-row gradient of the loss (docs/math.md's ω, the ops'
// grad_loss), not the CDT/VS exponent gamma of the Python API.
//
// The label: r_k = c (p_k - [k = y]) and t_k = ... - cu [k = y] differ from
// their off-label forms only at k = y. The kernels compute the off-label form
// at every k, the label included, and then take the label's term off what the
// row added at y (residual_label, double_residual_label), so one loop body
// serves the whole row.
#pragma once

#include <c10/macros/Macros.h>

namespace autobalance {
namespace math {

// a * b + c. Vectorized arguments get at::vec::fmadd, one rounding:
// argument-dependent lookup finds it and it is the more specialised overload.
// For scalars, g++ (in C++ under any -std, unlike ISO C) and nvcc contract
// the expression to an fma where they see fit, as they did with the kernels'
// own a * b + c before this header: the CPU's outputs kept every bit.
template <typename T>
C10_HOST_DEVICE inline T fmadd(const T& a, const T& b, const T& c) {
  return a * b + c;
}

// ------------------------------------------------------ section 1: the loss

// a_k = S[g,k] z_k + L[g,k]
template <typename T>
C10_HOST_DEVICE inline T adjusted_logit(const T& S, const T& z, const T& L) {
  return fmadd(S, z, L);
}

// ce = lse - a_y
template <typename T>
C10_HOST_DEVICE inline T cross_entropy(const T& lse, const T& a_y) {
  return lse - a_y;
}

// ℓ = W[g,y] ce
template <typename T>
C10_HOST_DEVICE inline T loss(const T& W_y, const T& ce) {
  return W_y * ce;
}

// ------------------------------------------------- section 3: the backward

// The per-row c = ω W[g,y] of r_k = c (p_k - [k = y]); the double backward's
// cu = ω UW[g,y] likewise.
template <typename T>
C10_HOST_DEVICE inline T residual_scale(const T& upstream, const T& W_y) {
  return upstream * W_y;
}

// r_k off the label: c p_k.
template <typename T>
C10_HOST_DEVICE inline T residual(const T& c, const T& p) {
  return c * p;
}

// ∂/∂z_k = S[g,k] r_k
template <typename T>
C10_HOST_DEVICE inline T grad_logit(const T& S, const T& r) {
  return S * r;
}

// ∂/∂L[g,k] += r_k (and t_k in the double backward)
template <typename T>
C10_HOST_DEVICE inline T add_grad_shift(const T& dL, const T& r) {
  return dL + r;
}

// ∂/∂S[g,k] += r_k z_k
template <typename T>
C10_HOST_DEVICE inline T add_grad_scale(const T& dS, const T& r, const T& z) {
  return fmadd(r, z, dS);
}

// ∂/∂W[g,y] += ω ce
template <typename T>
C10_HOST_DEVICE inline T grad_weight(const T& upstream, const T& ce) {
  return upstream * ce;
}

// Takes the label's -c (r_y = c p_y - c) off what the row added at y from
// c p_y: grad z_y, and grad S_y and grad L_y unless dS_y is null.
template <typename T>
C10_HOST_DEVICE inline void residual_label(const T& c, const T& S_y, const T& z_y, T& dz_y,
                                           T* dS_y, T* dL_y) {
  dz_y -= S_y * c;
  if (dS_y) {
    *dL_y -= c;
    *dS_y -= c * z_y;
  }
}

// ------------------------------------------ section 4: the double backward

// Which cotangents are given. A missing one of US, UL is zero-filled by the
// host (autobalance::table_cotangents), so the pair is given or not as one;
// `scale_table` says whether US was given rather than zero-filled.
struct Given {
  bool uz, tables, scale_table;
};

// v_k = S[g,k] Uz_k + UL[g,k] + US[g,k] z_k, with the terms of absent
// cotangents left out (the arguments standing for them are not read). A
// zero-filled US's term is left out too: 0 * z_k is NaN at a -inf logit.
template <typename T>
C10_HOST_DEVICE inline T cotangent(Given given, const T& S, const T& Uz, const T& z,
                                   const T& US, const T& UL) {
  T v(0);
  if (given.uz) v = S * Uz;
  if (given.tables) v = given.scale_table ? fmadd(US, z, v + UL) : v + UL;
  return v;
}

// t_k off the label: p_k (c (v_k - v̄) + cu).
template <typename T>
C10_HOST_DEVICE inline T double_residual(const T& c, const T& cu, const T& p, const T& v,
                                         const T& vbar) {
  return p * fmadd(c, v - vbar, cu);
}

// ∂Q/∂z_k = S[g,k] t_k + US[g,k] r_k
template <typename T>
C10_HOST_DEVICE inline T double_grad_logit(Given given, const T& S, const T& t, const T& US,
                                           const T& r) {
  const T dz = S * t;
  return given.tables ? fmadd(US, r, dz) : dz;
}

// ∂Q/∂S[g,k] += z_k t_k + Uz_k r_k (∂Q/∂L[g,k] += t_k is add_grad_shift)
template <typename T>
C10_HOST_DEVICE inline T add_double_grad_scale(Given given, const T& dS, const T& z, const T& t,
                                               const T& Uz, const T& r) {
  const T with_t = fmadd(z, t, dS);
  return given.uz ? fmadd(Uz, r, with_t) : with_t;
}

// ∂Q/∂W[g,y] += ω (v̄ - v_y)
template <typename T>
C10_HOST_DEVICE inline T double_grad_weight(const T& upstream, const T& vbar, const T& v_y) {
  return upstream * (vbar - v_y);
}

// ∂Q/∂ω = W[g,y] (v̄ - v_y) + UW[g,y] ce
template <typename T>
C10_HOST_DEVICE inline T grad_grad_loss(const T& W_y, const T& UW_y, const T& vbar, const T& v_y,
                                        const T& ce) {
  return W_y * (vbar - v_y) + UW_y * ce;
}

// Takes the label's terms (t_y = ... - cu, r_y = c p_y - c) off what the row
// added at y: grad z_y, and grad S_y and grad L_y unless dS_y is null.
template <typename T>
C10_HOST_DEVICE inline void double_residual_label(Given given, const T& c, const T& cu,
                                                  const T& S_y, const T& z_y, const T& Uz_y,
                                                  const T& US_y, T& dz_y, T* dS_y, T* dL_y) {
  dz_y -= S_y * cu;
  if (given.tables) dz_y -= US_y * c;
  if (dS_y) {
    *dS_y -= z_y * cu;
    if (given.uz) *dS_y -= Uz_y * c;
    *dL_y -= cu;
  }
}

// ------------------------------ section 8: target distributions off the label
//
// A row's target q_k = α [k = y] + d_k (checks.h: TargetCoefficients). The
// label's part α [k = y] is the one-hot math above with c = ω α W[g,y] (and
// cu = ω α UW[g,y]); the kernels add the dense part d_k with the functions
// below, and the one-hot math's p-coefficient becomes c = ω Σ_k q_k W[g,k]
// (cu = ω Σ_k q_k UW[g,k]) while the label terms keep ω α W[g,y].

// d_k = β P_k + γ
template <typename T>
C10_HOST_DEVICE inline T dense_target(const T& beta, const T& P, const T& gamma) {
  return fmadd(beta, P, gamma);
}

// r_k off the label: c p_k - (ω d_k) W[g,k]
template <typename T>
C10_HOST_DEVICE inline T dense_residual(const T& c, const T& p, const T& upstream_d, const T& W) {
  return fmadd(c, p, -(upstream_d * W));
}

// t_k off the label: p_k (c (v_k - v̄) + cu) - (ω d_k) UW[g,k]
template <typename T>
C10_HOST_DEVICE inline T dense_double_residual(const T& c, const T& cu, const T& p, const T& v,
                                               const T& vbar, const T& upstream_d, const T& UW) {
  return fmadd(p, fmadd(c, v - vbar, cu), -(upstream_d * UW));
}

// The dense part's other terms reuse the one-hot functions with q's weight:
// the loss d_k W[g,k] nlp_k = loss(d_k W[g,k], nlp_k); ∂/∂W[g,k] += ω d_k nlp_k
// = grad_weight(ω d_k, nlp_k); ∂Q/∂W[g,k] += double_grad_weight(ω d_k, v̄, v_k);
// ∂Q/∂ω += grad_grad_loss(d_k W[g,k], d_k UW[g,k], v̄, v_k, nlp_k).

}  // namespace math
}  // namespace autobalance
