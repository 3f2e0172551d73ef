// Small-batch linear layer for CPU decode: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
//
// Decode multiplies a handful of token rows by every weight matrix, so it is bound by how fast the
// weights stream from memory. Each thread takes a contiguous range of weight rows and reads each row
// once, accumulating the dot products of all M token rows at the same time (M <= 8: Medusa
// trees and small decode batches).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>

namespace {

constexpr int64_t kLanes = 16;  // one 512-bit vector of fp32; GCC vectorises the lane loops

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <int M, typename W>
void gemv_rows(const float* x, const W* w, const float* bias, float* y, int64_t K, int64_t N,
               int64_t n_begin, int64_t n_end) {
  const int64_t K_vec = K - K % kLanes;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const W* row = w + n * K;
    float acc[M][kLanes] = {};
    for (int64_t k = 0; k < K_vec; k += kLanes) {
      float wv[kLanes];
      for (int64_t j = 0; j < kLanes; ++j) wv[j] = to_float(row[k + j]);
      for (int m = 0; m < M; ++m) {
        const float* xm = x + m * K + k;
        // without this GCC vectorises across m instead of j, and 2-4 rows run 2-8x slower than one
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) acc[m][j] += wv[j] * xm[j];
      }
    }
    for (int m = 0; m < M; ++m) {
      float sum = bias ? bias[n] : 0.f;
      for (int64_t j = 0; j < kLanes; ++j) sum += acc[m][j];
      for (int64_t k = K_vec; k < K; ++k) sum += to_float(row[k]) * x[m * K + k];
      y[m * N + n] = sum;
    }
  }
}

template <typename W>
void gemv_dispatch(int64_t M, const float* x, const W* w, const float* bias, float* y, int64_t K, int64_t N) {
  // ~64 KiB of weights per task: big enough to amortise scheduling, small enough to balance threads
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (K * static_cast<int64_t>(sizeof(W))));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    switch (M) {
      case 1: gemv_rows<1>(x, w, bias, y, K, N, begin, end); break;
      case 2: gemv_rows<2>(x, w, bias, y, K, N, begin, end); break;
      case 3: gemv_rows<3>(x, w, bias, y, K, N, begin, end); break;
      case 4: gemv_rows<4>(x, w, bias, y, K, N, begin, end); break;
      case 5: gemv_rows<5>(x, w, bias, y, K, N, begin, end); break;
      case 6: gemv_rows<6>(x, w, bias, y, K, N, begin, end); break;
      case 7: gemv_rows<7>(x, w, bias, y, K, N, begin, end); break;
      case 8: gemv_rows<8>(x, w, bias, y, K, N, begin, end); break;
    }
  });
}

}  // namespace

// x: [M, K] (any float dtype), weight: [N, K] fp32 or bf16 contiguous, bias: [N] or empty. Returns [M, N] in x's dtype.
torch::Tensor small_batch_linear(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "shape mismatch");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "small_batch_linear takes 1 to 8 rows");
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  auto x32 = x.to(torch::kFloat).contiguous();
  auto y = torch::empty({M, N}, x32.options());
  torch::Tensor b32;
  if (bias.has_value() && bias->defined()) b32 = bias->to(torch::kFloat).contiguous();
  const float* b = b32.defined() ? b32.data_ptr<float>() : nullptr;
  if (weight.scalar_type() == torch::kFloat) {
    gemv_dispatch(M, x32.data_ptr<float>(), weight.data_ptr<float>(), b, y.data_ptr<float>(), K, N);
  } else {
    TORCH_CHECK(weight.scalar_type() == torch::kBFloat16, "weight must be float32 or bfloat16");
    gemv_dispatch(M, x32.data_ptr<float>(), weight.data_ptr<at::BFloat16>(), b, y.data_ptr<float>(), K, N);
  }
  return y.to(x.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("small_batch_linear", &small_batch_linear, "y = x @ w.T + b for 1-8 rows, streaming w once");
}
