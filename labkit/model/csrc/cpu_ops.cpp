// The decoder's small bfloat16 ops on the CPU, each one pass over its rows, and the module's bindings.
// Each rounds where torch's own ops round (the sum of a sublayer and the residual stream, the weighted normalised
// row, silu before the product), so outputs match torch's bf16 path except where a
// float32 sum taken in another order lands on the other side of a bfloat16 rounding boundary.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "vec.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                           torch::Tensor context_lens, int64_t block_size, double scale,
                           std::optional<torch::Tensor> token_rows);
torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor d, torch::Tensor m, int64_t bits);

namespace {

using bf16 = c10::BFloat16;

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kBFloat16 && x.dim() == 2 && x.is_contiguous(),
              name, " must be a contiguous 2-d bfloat16 CPU tensor");
}

// out = rms_norm(total) * weight, rounded once as torch's fused rms_norm rounds: bf16(total / rms * weight)
void norm_row(const uint16_t* total, const uint16_t* w, int64_t dim, float eps, uint16_t* out) {
  float sumsq = 0.f;
#pragma omp simd reduction(+ : sumsq)
  for (int64_t i = 0; i < dim; ++i) {
    const float t = bits_to_float(total[i]);
    sumsq += t * t;
  }
  const float r = 1.f / std::sqrt(sumsq / static_cast<float>(dim) + eps);
#pragma omp simd
  for (int64_t i = 0; i < dim; ++i)
    out[i] = round_bits(bits_to_float(total[i]) * r * bits_to_float(w[i]));
}

}  // namespace

// (rms_norm(x + residual) * weight, x + residual) for rows x, residual [N, dim] and weight [dim], all bfloat16
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight,
                                                      double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(x.sizes() == residual.sizes(), "x and residual must have one shape");
  TORCH_CHECK(weight.scalar_type() == torch::kBFloat16 && weight.is_contiguous() && weight.numel() == x.size(1),
              "weight must be a contiguous bfloat16 tensor of one row's size");
  const int64_t N = x.size(0), dim = x.size(1);
  auto normed = torch::empty_like(x), total = torch::empty_like(x);
  const auto* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<bf16>());
  const auto* rs = reinterpret_cast<const uint16_t*>(residual.data_ptr<bf16>());
  const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<bf16>());
  auto* ts = reinterpret_cast<uint16_t*>(total.data_ptr<bf16>());
  auto* os = reinterpret_cast<uint16_t*>(normed.data_ptr<bf16>());
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t o = n * dim;
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) ts[o + i] = round_bits(bits_to_float(xs[o + i]) + bits_to_float(rs[o + i]));
      norm_row(ts + o, w, dim, static_cast<float>(eps), os + o);
    }
  });
  return {normed, total};
}

// rms_norm(x) * weight for rows x [N, dim], bfloat16
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.scalar_type() == torch::kBFloat16 && weight.is_contiguous() && weight.numel() == x.size(1),
              "weight must be a contiguous bfloat16 tensor of one row's size");
  const int64_t N = x.size(0), dim = x.size(1);
  auto normed = torch::empty_like(x);
  const auto* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<bf16>());
  const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<bf16>());
  auto* os = reinterpret_cast<uint16_t*>(normed.data_ptr<bf16>());
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) norm_row(xs + n * dim, w, dim, static_cast<float>(eps), os + n * dim);
  });
  return normed;
}

// silu(gate) * up for gate_up [N, 2I] = [gate | up] -> [N, I], bfloat16: bf16(bf16(silu(gate)) * up)
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even number of columns");
  const int64_t N = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = torch::empty({N, I}, gate_up.options());
  const auto* gu = reinterpret_cast<const uint16_t*>(gate_up.data_ptr<bf16>());
  auto* os = reinterpret_cast<uint16_t*>(out.data_ptr<bf16>());
  at::parallel_for(0, N, 4, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint16_t* g = gu + n * 2 * I;
      const uint16_t* u = g + I;
      uint16_t* o = os + n * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) {
        const float x = bits_to_float(g[i]);
        o[i] = round_bits(bits_to_float(round_bits(x / (1.f + std::exp(-x)))) * bits_to_float(u[i]));
      }
    }
  });
  return out;
}

// Rotate-half RoPE for x [N, H, D] bfloat16 (any row and head strides, D contiguous) with cos, sin [N, 1, D]
// (sin's first half negated) -> a new contiguous [N, H, D]: bf16(bf16(x * cos) + bf16(roll(x, D/2) * sin)), the
// three roundings of torch's `x * cos + torch.roll(x, D // 2, -1) * sin` in one pass instead of four.
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kBFloat16 && x.dim() == 3 && x.stride(2) == 1 &&
                  x.size(2) % 2 == 0, "x must be a bfloat16 CPU tensor [N, H, D], D even and contiguous");
  const int64_t N = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == torch::kBFloat16 && t->is_contiguous() && t->numel() == N * D,
                "cos and sin must be contiguous bfloat16 [N, 1, D]");
  auto out = torch::empty({N, H, D}, x.options());
  const auto* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<bf16>());
  const auto* cs = reinterpret_cast<const uint16_t*>(cos.data_ptr<bf16>());
  const auto* ss = reinterpret_cast<const uint16_t*>(sin.data_ptr<bf16>());
  auto* os = reinterpret_cast<uint16_t*>(out.data_ptr<bf16>());
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  at::parallel_for(0, N * H, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / H;
      const uint16_t* r = xs + n * s0 + (i % H) * s1;
      const uint16_t* c = cs + n * D;
      const uint16_t* s = ss + n * D;
      uint16_t* o = os + i * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const float rolled = bits_to_float(r[d < half ? d + half : d - half]);
        const float a = bits_to_float(round_bits(bits_to_float(r[d]) * bits_to_float(c[d])));
        o[d] = round_bits(a + bits_to_float(round_bits(rolled * bits_to_float(s[d]))));
      }
    }
  });
  return out;
}

// k_cache[:, slot[n]] = k[n] and the same for v: k, v [N, Hkv, D]; caches heads-major [Hkv, slots, D], one dtype
void write_kv(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
              torch::Tensor slot_mapping) {
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes(), "the caches must be contiguous [Hkv, slots, D]");
  TORCH_CHECK(k.dim() == 3 && k.size(1) == k_cache.size(0) && k.size(2) == k_cache.size(2) &&
                  v.sizes() == k.sizes(), "k and v must be [N, Hkv, D] like the cache");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(), "k, v and the caches must share a dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == k.size(0), "slot_mapping must be [N] int64");
  const int64_t N = k.size(0), Hkv = k.size(1), D = k.size(2), slots = k_cache.size(1);
  const int64_t item = k.element_size(), row = D * item;
  auto slot = slot_mapping.contiguous();
  const int64_t* s = slot.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(s[n] >= 0 && s[n] < slots, "slot ", s[n], " is outside the cache");
  const auto* kb = static_cast<const char*>(k.data_ptr());
  const auto* vb = static_cast<const char*>(v.data_ptr());
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const int64_t ks0 = k.stride(0) * item, ks1 = k.stride(1) * item, vs0 = v.stride(0) * item, vs1 = v.stride(1) * item;
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "k and v rows must be contiguous in D");
  at::parallel_for(0, N * Hkv, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / Hkv, h = i % Hkv, dst = (h * slots + s[n]) * row;
      std::memcpy(kc + dst, kb + n * ks0 + h * ks1, row);
      std::memcpy(vc + dst, vb + n * vs0 + h * vs1, row);
    }
  });
}

// The step's keys and values written to their slots, then its decode rows' attention over the cache [slots, Hkv, D]
// (heads-major views): one op, so a compiled step that writes the cache and reads it is one declared mutation
torch::Tensor write_and_attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_cache,
                               torch::Tensor v_cache, torch::Tensor slot_mapping, torch::Tensor block_tables,
                               torch::Tensor context_lens, int64_t block_size, double scale) {
  auto k_heads = k_cache.transpose(0, 1), v_heads = v_cache.transpose(0, 1);
  write_kv(k_heads, v_heads, k, v, slot_mapping);
  return paged_decode(q, k_heads, v_heads, block_tables, context_lens, block_size, scale, std::nullopt);
}

// The same kernels as torch operators, for torch.compile: a compiled step calls them through the dispatcher with no
// Python in between (their shapes for tracing are registered in labkit.model.cpu_attention)
TORCH_LIBRARY(labkit, m) {
  m.def("gguf_linear(Tensor x, Tensor codes, Tensor d, Tensor m, int bits) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("write_and_attend(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
        "Tensor block_tables, Tensor context_lens, int block_size, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(labkit, CPU, m) {
  m.impl("gguf_linear", &gguf_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rope", &rope);
  m.impl("write_and_attend", &write_and_attend);
}

// Each op lets go of the GIL while it runs (arguments are converted before, results after): a server's event
// loop shares the process with the engine's thread, and a layer's attention is a millisecond of pure C++.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using no_gil = py::call_guard<py::gil_scoped_release>;
  m.def("paged_decode", &paged_decode, "paged attention of query tokens over a heads-major cache (CPU)", py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("block_size"),
        py::arg("scale"), py::arg("token_rows") = py::none(), no_gil());
  m.def("add_rms_norm", &add_rms_norm, "(rms_norm(x + residual) * weight, x + residual), bfloat16 rows", no_gil());
  m.def("rms_norm", &rms_norm, "rms_norm(x) * weight, bfloat16 rows", no_gil());
  m.def("silu_mul", &silu_mul, "silu(gate) * up, bfloat16 rows [gate | up]", no_gil());
  m.def("rope", &rope, "rotate-half RoPE of x [N, H, D] with cos, sin [N, 1, D], bfloat16", no_gil());
  m.def("gguf_linear", &gguf_linear, "x [M, K] times GGUF Q4_1 (bits 4) or Q8_0 (bits 8) blocks [N, K] (CPU)",
        py::arg("x"), py::arg("codes"), py::arg("d"), py::arg("m"), py::arg("bits"), no_gil());
  m.def("write_kv", &write_kv, "store k, v [N, Hkv, D] at their slots of a heads-major cache", no_gil());
}
