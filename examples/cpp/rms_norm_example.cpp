// Normalise a few rows with mmfuse::rms_norm_fwd and compare with a plain loop.
// Prints the library version, the SIMD flavour in use and the largest difference; exits 1 on a mismatch.
#include <mmfuse/mmfuse.h>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  const int64_t rows = 5, dim = 80;  // 80: the Qwen2.5-VL vision head size, not a SIMD-width multiple
  std::vector<float> x(rows * dim), w(dim), y(rows * dim), rstd(rows);
  for (int64_t i = 0; i < rows * dim; ++i) x[i] = std::sin(0.37f * float(i)) * float(1 + i % 7);
  for (int64_t j = 0; j < dim; ++j) w[j] = 0.5f + 0.01f * float(j);

  mmfuse::RmsNormFwdArgs args;
  args.x = x.data();
  args.weight = w.data();
  args.y = y.data();
  args.rstd = rstd.data();
  args.rows = rows;
  args.dim = dim;
  args.eps = 1e-6;
  mmfuse::rms_norm_fwd(args);

  double max_diff = 0;
  for (int64_t i = 0; i < rows; ++i) {
    double ss = 0;
    for (int64_t j = 0; j < dim; ++j) ss += double(x[i * dim + j]) * x[i * dim + j];
    const double r = 1.0 / std::sqrt(ss / dim + 1e-6);
    for (int64_t j = 0; j < dim; ++j)
      max_diff = std::fmax(max_diff, std::fabs(w[j] * x[i * dim + j] * r - y[i * dim + j]));
  }
  std::printf("mmfuse %s isa=%s rows=%lld dim=%lld max_abs_diff=%.3g\n", mmfuse::version(),
              mmfuse::isa_name(mmfuse::active_isa()), static_cast<long long>(rows), static_cast<long long>(dim),
              max_diff);
  const bool ok = max_diff < 1e-5;
  std::printf("%s\n", ok ? "OK" : "MISMATCH");
  return ok ? 0 : 1;
}
