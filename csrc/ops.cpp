// Every op schema of the package, declared once. Backends add their kernels
// with TORCH_LIBRARY_IMPL(autobalance, CPU|CUDA, m) in their own files.
//
// The math is docs/math.md sections 1, 3 and 4. Tables `weight`, `scale`, `shift`
// are the [G, K] tables W, S, L; `group` is an optional [N] group index
// (absent means G == 1). `target` is int64 [N] class indices, or a
// probability target: a floating [N, K] tensor of the logits' dtype, with no
// ignored rows. Rows whose class index equals `ignore_index` contribute
// nothing (zero loss, zero gradients). `label_smoothing` ε in [0, 1] mixes the
// target with the uniform distribution: q = (1 - ε) target + ε / K
// (docs/math.md section 8).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Lets `import autobalance_ext._C` load this library (and so the registrations
// below) without pybind11.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace autobalance {
int64_t parallel_threads_cpu(int64_t rows, int64_t classes);  // cpu/parametric_ce.cpp
int64_t table_grad_scratch_cpu(int64_t rows, int64_t groups, int64_t classes, bool float64);
}

TORCH_LIBRARY(autobalance, m) {
  // -> (loss [N], lse [N]); docs/math.md section 1.
  m.def(
      "parametric_ce(Tensor logits, Tensor target, Tensor? group, "
      "Tensor weight, Tensor scale, Tensor shift, int ignore_index, "
      "float label_smoothing=0.0) -> (Tensor, Tensor)");
  // -> the 0-dim sum of the per-row losses, or with `mean` their weighted mean
  // sum_i loss_i / sum_i W[g_i, y_i] over the rows not ignored (docs/math.md
  // section 1); with a probability target the mean divides by N (section 8).
  // One autograd node, in the accumulation dtype. `logits` may also be spatial,
  // [B, K, D] with [B, D] indices (a probability target [B, K, D]): row b D + j
  // is logits[b, :, j]. The CPU fast path reads them in place (NCHW images need
  // no transposed copy); every other path makes rows first.
  m.def(
      "parametric_ce_reduced(Tensor logits, Tensor target, Tensor? group, "
      "Tensor weight, Tensor scale, Tensor shift, int ignore_index, bool mean, "
      "float label_smoothing=0.0) -> Tensor");
  // -> (grad_logits [N,K], grad_weight, grad_scale, grad_shift [G,K]);
  // docs/math.md section 3. With table_grads=False the three table gradients are
  // returned as zeros and not computed.
  m.def(
      "parametric_ce_backward(Tensor grad_loss, Tensor logits, Tensor target, "
      "Tensor? group, Tensor weight, Tensor scale, Tensor shift, Tensor lse, "
      "int ignore_index, bool table_grads, float label_smoothing=0.0) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of Q = <(Uz, UW, US, UL), backward(...)>; docs/math.md section 4.
  // -> (grad_grad_loss [N], grad_logits [N,K], grad_weight, grad_scale,
  //     grad_shift [G,K]). Absent cotangents are zero.
  m.def(
      "parametric_ce_double_backward(Tensor grad_loss, Tensor logits, "
      "Tensor target, Tensor? group, Tensor weight, Tensor scale, "
      "Tensor shift, Tensor lse, Tensor? u_logits, Tensor? u_weight, "
      "Tensor? u_scale, Tensor? u_shift, int ignore_index, bool table_grads, "
      "float label_smoothing=0.0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The ops below are the CPU fast path's; the residual ones take class-index
  // targets without label smoothing only, the reduced one every target.
  // CPU, float32/float64: the forward that also returns the residual
  // r = W_y (softmax(S z + L) - onehot(y)) [N, K], and the backward that uses
  // it instead of recomputing the softmax (for a backward that is not itself
  // differentiated). That backward overwrites `residual` with grad_logits and
  // returns (grad_weight, grad_scale, grad_shift). Same results as
  // parametric_ce / parametric_ce_backward up to rounding.
  m.def(
      "_parametric_ce_with_residual(Tensor logits, Tensor target, Tensor? group, "
      "Tensor weight, Tensor scale, Tensor shift, int ignore_index) "
      "-> (Tensor, Tensor, Tensor)");
  // CPU, float32/float64: parametric_ce with the gradients of its sum (or
  // with `mean` its weighted mean), for a backward that is not differentiated
  // again. Takes spatial logits as parametric_ce_reduced does; grad_logits then
  // has their shape. -> (loss [N], lse [N],
  // counts [G*K] (rows per (group, class) cell, not ignored), grad_logits
  // [N,K], grad_weight, grad_scale, grad_shift [G,K]); the table gradients are
  // zeros unless table_grads.
  m.def(
      "_parametric_ce_reduced_with_gradient(Tensor logits, Tensor target, Tensor? group, "
      "Tensor weight, Tensor scale, Tensor shift, int ignore_index, bool mean, "
      "bool table_grads, float label_smoothing=0.0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_parametric_ce_backward_from_residual_(Tensor grad_loss, Tensor logits, "
      "Tensor target, Tensor? group, Tensor weight, Tensor scale, Tensor shift, "
      "Tensor lse, Tensor(a!) residual, int ignore_index, bool table_grads) "
      "-> (Tensor, Tensor, Tensor)");
  // Diagnostics: how many threads the CPU kernels' row loop uses.
  m.def("_parallel_threads(int rows, int classes) -> int",
        &autobalance::parallel_threads_cpu);
  // Diagnostics: the bytes of per-block partial tables the CPU kernels' table
  // gradients use (a function of the shape and dtype only).
  m.def("_table_grad_scratch(int rows, int groups, int classes, bool float64) -> int",
        &autobalance::table_grad_scratch_cpu);
}
