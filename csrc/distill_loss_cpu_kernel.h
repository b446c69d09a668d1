// The row kernel of the CPU distillation loss. Included twice by distill_loss_cpu.cpp, inside
// two namespaces: once compiled for the baseline ISA and once for AVX2+FMA, chosen at run time,
// so that one binary is both portable and fast. Not a standalone header: it relies on the
// includes and the Options struct of distill_loss_cpu.cpp.

// exp(x) for float: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial, 2^n by building
// the exponent bits. Relative error about 2e-7 (a couple of ulp). Results below the smallest
// normal float flush to 0 (exp(-inf) = 0 exactly); NaN stays NaN. No branches, so loops over it
// vectorise. The flush is invisible in a loss: the kernels shift by the row's max, so a flushed
// probability p is below 1.2e-38 of the largest one's, and its KL term p (log p - log q) (log p
// from the logits, not from p) is as small unless log q is astronomically low.
inline float fast_exp(float x) {
  const float lo = -87.3f, hi = 88.7f;
  float xc = x < lo ? lo : x;  // NaN fails both comparisons and passes through
  xc = xc > hi ? hi : xc;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float shifted = xc * 1.44269504088896341f + round_magic;
  float n = shifted - round_magic;
  int32_t n_int;
  std::memcpy(&n_int, &shifted, sizeof(n_int));
  n_int -= 0x4B400000;  // the bits of round_magic: what is left is n as an integer
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (n_int + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float result = p * scale;
  return x < lo ? 0.0f : result;
}

inline double fast_exp(double x) { return std::exp(x); }

template <typename acc_t>
acc_t row_max(const acc_t* x, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < n; ++c) m = x[c] > m ? x[c] : m;
  return m;
}

// Sums of long rows are taken in blocks of this many elements, each block in vector lanes, and
// the block sums added up: the rounding error grows with the block length plus the number of
// blocks, not with the row length (a plain running sum of 131 072 floats loses about 1e-4).
constexpr int64_t kSumBlock = 512;

// out[c] = exp(x[c] - shift); returns the sum.
template <typename acc_t>
acc_t exp_shifted(const acc_t* x, acc_t shift, acc_t* out, int64_t n) {
  acc_t total = 0;
  for (int64_t start = 0; start < n; start += kSumBlock) {
    const int64_t stop = std::min(n, start + kSumBlock);
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = start; c < stop; ++c) {
      out[c] = fast_exp(x[c] - shift);
      sum += out[c];
    }
    total += sum;
  }
  return total;
}

template <typename acc_t, typename in_t>
void load_scaled(const in_t* src, acc_t scale, acc_t* dst, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<acc_t>(src[c]) * scale;
}

// load_scaled, returning the max of what it wrote (one pass over the row instead of two).
template <typename acc_t, typename in_t>
acc_t load_scaled_max(const in_t* src, acc_t scale, acc_t* dst, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < n; ++c) {
    dst[c] = static_cast<acc_t>(src[c]) * scale;
    m = dst[c] > m ? dst[c] : m;
  }
  return m;
}

// Shift applied before exp: the max, or 0 for a row of -inf (whose terms are exp(-inf) = 0).
template <typename acc_t>
acc_t safe_shift(acc_t m) {
  return m == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : m;
}


// Indices of the K largest values, largest first; ties go to the lower index. Returns how many
// were found (fewer than K only when NaNs are involved).
template <typename acc_t>
int64_t top_k(const acc_t* z, int64_t n, int64_t k, int64_t* index, acc_t* value) {
  int64_t found = 0;
  for (int64_t c = 0; c < n; ++c) {
    acc_t v = z[c];
    if (found == k && !(v > value[k - 1])) continue;  // the common case: not in the top K
    if (!(v == v)) continue;                           // NaN: the loss is NaN anyway
    int64_t pos = found < k ? found++ : k - 1;
    while (pos > 0 && v > value[pos - 1]) {  // strict: an equal earlier index stays ahead
      value[pos] = value[pos - 1];
      index[pos] = index[pos - 1];
      --pos;
    }
    value[pos] = v;
    index[pos] = c;
  }
  return found;
}

template <typename scalar_t, typename teacher_t, typename acc_t, typename grad_t>
void distill_rows(const scalar_t* logits, const teacher_t* teacher, const int64_t* target,
                  acc_t* terms, grad_t* grad, int64_t rows, int64_t cols, const Options& o) {
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const acc_t inv_t = static_cast<acc_t>(o.inv_temperature);
  const acc_t inv_ts = static_cast<acc_t>(o.inv_student_temperature);
  const acc_t ce_w = static_cast<acc_t>(o.ce_weight), kd_scale = static_cast<acc_t>(o.kd_scale);
  const acc_t tol_w = static_cast<acc_t>(o.tol_weight);
  const acc_t kd_grad = kd_scale * inv_ts;
  const acc_t smoothing = static_cast<acc_t>(o.label_smoothing);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1));

  // acc_t rows are read in place, other dtypes through a float buffer; an acc_t gradient (also
  // that of float16 logits: see gradient_dtype in kernels/distill_loss.py) is written in place,
  // another one goes through the buffer (the logits are consumed by then) before its one write.
  constexpr bool kReadInPlace = std::is_same_v<scalar_t, acc_t>;
  constexpr bool kWriteInPlace = std::is_same_v<grad_t, acc_t>;

  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> z_buffer(kReadInPlace && kWriteInPlace ? 0 : cols), f(cols), t, p, q;
    if (o.has_teacher) {
      t.resize(cols);
      p.resize(cols);
      if (!o.student_t_is_one) q.resize(cols);
    }
    // topk means nothing while the penalty is off (it may be any value then): no lists.
    std::vector<int64_t> top_index(o.has_tol ? o.topk : 0);
    std::vector<acc_t> top_value(o.has_tol ? o.topk : 0);
    for (int64_t row = begin; row < end; ++row) {
      // The row as acc_t: read in place when it already is, else converted into the buffer.
      const acc_t* z = z_buffer.data();
      if constexpr (kReadInPlace) {
        z = logits + row * cols;
      } else {
        load_scaled(logits + row * cols, acc_t(1), z_buffer.data(), cols);
      }
      const acc_t z_max = row_max(z, cols);
      const acc_t z_sum = exp_shifted(z, safe_shift(z_max), f.data(), cols);
      const acc_t z_lse = z_max + std::log(z_sum);
      // f holds exp(z - max); softmax(z) = f * inv_z_sum, a factor the loops below fold in
      // rather than spend a pass over the row on it (likewise p and inv_t_sum).
      const acc_t inv_z_sum = acc_t(1) / z_sum;

      bool counted = true;
      int64_t label = -1;
      acc_t ce = 0, kl = 0, tol = 0;
      if (o.has_target) {
        label = target[row];
        counted = label != o.ignore_index;
        const bool label_ok = label >= 0 && label < cols;
        ce = label_ok ? z_lse - z[label] : nan;  // never read out of bounds
        if (!label_ok) label = -1;
        if (smoothing > 0) {  // CE to (1 - ε) one-hot + ε/C gains ε (lse - mean z)
          acc_t z_total = 0;  // the mean, summed as z / C: a sum of huge logits would overflow
          const acc_t inv_cols = acc_t(1) / acc_t(cols);
          for (int64_t start = 0; start < cols; start += kSumBlock) {
            const int64_t stop = std::min(cols, start + kSumBlock);
            acc_t block = 0;
#pragma omp simd reduction(+ : block)
            for (int64_t c = start; c < stop; ++c) block += z[c] * inv_cols;
            z_total += block;
          }
          ce = (1 - smoothing) * ce + smoothing * (z_lse - z_total);
        }
      }
      const acc_t* q_row = nullptr;      // softmax(z / T_s) when T_s != 1 (else it is f's)
      acc_t inv_t_sum = 0;
      if (o.has_teacher) {
        const acc_t t_max = load_scaled_max(teacher + row * cols, inv_t, t.data(), cols);
        const acc_t t_sum = exp_shifted(t.data(), safe_shift(t_max), p.data(), cols);
        const acc_t t_lse = t_max + std::log(t_sum);
        inv_t_sum = acc_t(1) / t_sum;
        acc_t q_lse = z_lse;
        acc_t zq_scale = acc_t(1);
        if (!o.student_t_is_one) {
          zq_scale = inv_ts;
          // q = softmax(z / T_s): exp into q, from the scaled logits, then normalise.
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) q[c] = z[c] * inv_ts;
          const acc_t q_max = z_max * inv_ts;
          const acc_t q_sum = exp_shifted(q.data(), safe_shift(q_max), q.data(), cols);
          q_lse = q_max + std::log(q_sum);
          const acc_t inv_q_sum = acc_t(1) / q_sum;
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) q[c] *= inv_q_sum;
          q_row = q.data();
        }
        for (int64_t start = 0; start < cols; start += kSumBlock) {
          const int64_t stop = std::min(cols, start + kSumBlock);
          acc_t kl_sum = 0;
#pragma omp simd reduction(+ : kl_sum)
          for (int64_t c = start; c < stop; ++c) {
            const acc_t p_c = p[c] * inv_t_sum;
            // 0 * log 0 = 0: classes the teacher rules out add nothing; NaN propagates.
            const acc_t term = p_c * ((t[c] - t_lse) - (z[c] * zq_scale - q_lse));
            kl_sum += p_c == 0 ? acc_t(0) : term;
          }
          kl += kl_sum;
        }
      }
      int64_t found = 0;
      if (o.has_tol) {
        found = top_k(z, cols, o.topk, top_index.data(), top_value.data());
        acc_t others = 0;
        for (int64_t k = 1; k < found; ++k) others += f[top_index[k]] * inv_z_sum;
        tol = found > 0 ? f[top_index[0]] * inv_z_sum - others / acc_t(o.topk - 1) : nan;
      }

      acc_t* row_terms = terms + row;
      // A weight of 0 leaves its term out even where it is infinite (0 * inf is NaN).
      const auto weighted = [](acc_t w, acc_t term) { return w == 0 ? acc_t(0) : w * term; };
      row_terms[0] =
          counted ? weighted(ce_w, ce) + weighted(kd_scale, kl) + weighted(tol_w, tol) : acc_t(0);
      row_terms[rows] = counted ? ce : acc_t(0);
      row_terms[2 * rows] = counted ? kl : acc_t(0);
      row_terms[3 * rows] = counted ? tol : acc_t(0);
      row_terms[4 * rows] = counted ? acc_t(1) : acc_t(0);
      if (!o.write_grad) continue;

      grad_t* g_row = grad + row * cols;
      if (!counted) {
        std::fill(g_row, g_row + cols, grad_t(0));
        continue;
      }
      if (o.has_target && label < 0 && ce_w != 0) {
        // A row whose loss is NaN for its label gets a NaN gradient: a check of the gradients
        // alone (GradScaler's) then also sees the bad step.
        std::fill(g_row, g_row + cols, static_cast<grad_t>(nan));
        continue;
      }
      // Dense part: ce_w (f - ε/C) + kd_grad (q - p) - tol_w TOL f; then the few sparse
      // corrections (-ce_w (1 - ε) at the label, tol_w f w at the top-K) on the float row before
      // the one write.
      const acc_t f_coef = (o.has_target ? ce_w : acc_t(0)) - (o.has_tol ? tol_w * tol : acc_t(0));
      const acc_t uniform = o.has_target ? -ce_w * smoothing / acc_t(cols) : acc_t(0);
      acc_t* g = nullptr;
      if constexpr (kWriteInPlace) {
        g = g_row;
      } else {
        g = z_buffer.data();  // the logits are consumed: the buffer takes the float gradient
      }
      // softmax(z) and softmax(t/T) normalised here, element by element, so that q - p is
      // taken between the normalised values (they nearly cancel where the student agrees).
      if (o.has_teacher && kd_grad != 0) {  // weight 0: no term, not 0 * NaN of a bad teacher
        const acc_t* p_row = p.data();
        if (o.student_t_is_one) {  // q is softmax(z)
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) {
            const acc_t f_c = f[c] * inv_z_sum;
            g[c] = f_coef * f_c + uniform + kd_grad * (f_c - p_row[c] * inv_t_sum);
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c)
            g[c] = f_coef * (f[c] * inv_z_sum) + uniform +
                   kd_grad * (q_row[c] - p_row[c] * inv_t_sum);
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) g[c] = f_coef * (f[c] * inv_z_sum) + uniform;
      }
      if (label >= 0) g[label] -= ce_w * (1 - smoothing);
      if (o.has_tol) {
        const acc_t other_w = acc_t(-1) / acc_t(o.topk - 1);
        for (int64_t k = 0; k < found; ++k)
          g[top_index[k]] += tol_w * (f[top_index[k]] * inv_z_sum) * (k == 0 ? acc_t(1) : other_w);
      }
      if constexpr (!kWriteInPlace) {
        for (int64_t c = 0; c < cols; ++c) g_row[c] = static_cast<grad_t>(g[c]);
      }
    }
  });
}
