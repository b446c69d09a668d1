// The fused distillation loss on the CPU: fastsd::distill_loss_fwd_cpu.
//
// The same contract as the Triton kernels (kernels/distill_loss.py): one pass over each row of the
// student logits z and teacher logits t yields the row's loss, its unweighted CE, KL and
// tolerant-teacher terms, and d(row loss)/dz. Rows are spread over threads with at::parallel_for;
// within a row every loop runs over contiguous float arrays so the compiler vectorises it, with a
// branch-free exp (fast_exp) in place of libm's scalar one. float64 input is computed in float64
// (for gradcheck); everything else in float32.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace fastsd {
namespace {

struct Options {
  double inv_temperature, inv_student_temperature, ce_weight, kd_scale, tol_weight;
  int64_t topk, ignore_index;
  bool has_target, has_teacher, has_tol, student_t_is_one, write_grad;
  double label_smoothing;  // ε: the CE target is (1 - ε) one-hot + ε/C
};

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTSD_CPU_DISPATCH 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "distill_loss_cpu_kernel.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace baseline {
#include "distill_loss_cpu_kernel.h"
}  // namespace baseline

template <typename scalar_t, typename teacher_t, typename acc_t, typename grad_t>
void distill_rows(const scalar_t* logits, const teacher_t* teacher, const int64_t* target,
                  acc_t* terms, grad_t* grad, int64_t rows, int64_t cols, const Options& o) {
#ifdef FASTSD_CPU_DISPATCH
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                               __builtin_cpu_supports("f16c");
  if (has_avx2) {
    avx2::distill_rows(logits, teacher, target, terms, grad, rows, cols, o);
    return;
  }
#endif
  baseline::distill_rows(logits, teacher, target, terms, grad, rows, cols, o);
}

std::tuple<at::Tensor, at::Tensor> distill_loss_fwd_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& teacher_logits, double temperature,
    double student_temperature, double ce_weight, double kd_scale, double tolerance_weight,
    int64_t topk, int64_t ignore_index, bool write_grad, double label_smoothing) {
  TORCH_CHECK(logits.dim() == 2, "fastsd::distill_loss_fwd_cpu: logits must be [N, C], got ",
              logits.sizes());
  TORCH_CHECK(logits.device().is_cpu(), "fastsd::distill_loss_fwd_cpu: logits must be on the CPU");
  const int64_t rows = logits.size(0), cols = logits.size(1);
  Options o{1.0 / temperature, 1.0 / student_temperature, ce_weight, kd_scale, tolerance_weight,
            topk, ignore_index, target.has_value(), teacher_logits.has_value(),
            tolerance_weight > 0, student_temperature == 1.0, write_grad,
            target.has_value() ? label_smoothing : 0.0};
  TORCH_CHECK(!o.has_tol || (topk >= 2 && topk <= cols),
              "fastsd::distill_loss_fwd_cpu: topk must be in [2, C] while the penalty is on");
  const at::Tensor z = logits.contiguous();
  at::Tensor y, t;
  if (o.has_target) {
    TORCH_CHECK(target->scalar_type() == at::kLong && target->numel() == rows,
                "fastsd::distill_loss_fwd_cpu: target must be int64 [N]");
    y = target->contiguous();
  }
  if (o.has_teacher) {
    TORCH_CHECK(teacher_logits->sizes() == logits.sizes(),
                "fastsd::distill_loss_fwd_cpu: teacher_logits must have the logits' shape");
    t = teacher_logits->contiguous();
  }
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // loss, CE, KL, TOL, counted: the layout of TERM_ROWS in kernels/distill_loss.py
  at::Tensor terms = at::empty({5, rows}, logits.options().dtype(acc_type));
  // float16 logits get a float32 gradient, rounded to float16 only after backward scales it
  // (gradient_dtype in kernels/distill_loss.py says why).
  const auto grad_type = logits.scalar_type() == at::kHalf ? at::kFloat : logits.scalar_type();
  at::Tensor grad = at::empty({write_grad ? rows : 0, cols}, logits.options().dtype(grad_type));
  const at::ScalarType teacher_type = o.has_teacher ? t.scalar_type() : logits.scalar_type();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "distill_z", [&] {
    using student_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<student_t, double>, double, float>;
    using grad_t = std::conditional_t<std::is_same_v<student_t, at::Half>, float, student_t>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher_type, "distill_t", [&] {
      distill_rows<student_t, scalar_t, acc_t, grad_t>(
          z.const_data_ptr<student_t>(),
          o.has_teacher ? t.const_data_ptr<scalar_t>() : nullptr,
          o.has_target ? y.const_data_ptr<int64_t>() : nullptr, terms.mutable_data_ptr<acc_t>(),
          write_grad ? grad.mutable_data_ptr<grad_t>() : nullptr, rows, cols, o);
    });
  });
  return {terms, grad};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastsd, m) {
  m.def(
      "distill_loss_fwd_cpu(Tensor logits, Tensor? target, Tensor? teacher_logits, "
      "float temperature, float student_temperature, float ce_weight, float kd_scale, "
      "float tolerance_weight, int topk, int ignore_index, bool write_grad, "
      "float label_smoothing=0.0) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastsd, CPU, m) {
  m.impl("distill_loss_fwd_cpu", &distill_loss_fwd_cpu);
}

}  // namespace fastsd
