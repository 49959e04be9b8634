// One batch-1 decode step of a Llama-family model in one call (rlhf_core/native_decode.py).
//
// The Python step (`decoding._forward`) dispatches ~1,000 small torch ops a token at 2-3 us
// each beside its 121 matrix products; here the whole step is plain loops: a bf16 matrix-vector
// product with AVX512-BF16 (vdpbf16ps over the weights' own row-major (out, in) layout, so
// nothing is repacked), float32 norms, rotary, attention and residual stream. The step runs on
// torch's OpenMP threads (`torch.get_num_threads()`): each product is split by output rows, the
// threads meet at a spin barrier between the phases of a layer (4 per layer).
//
// Numerics follow `_forward` at bf16: a product's input is rounded to bf16, its output too
// (oneDNN returns bf16), bias and residual added in float32; the KV cache is float32.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

using bf16 = uint16_t;

namespace {

inline float bf16_to_float(bf16 v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline bf16 float_to_bf16(float f) {  // round to nearest even, as torch's .to(bfloat16)
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<bf16>(bits >> 16);
}

inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

// -- the kernels (AVX512-BF16; called only where the CPU has it: `cpu_supported`) ------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,fma,avx2")

// y[r] = round_bf16(W[r,:] . x) for r in [r0, r1); W (rows, n) bf16 row-major,
// x n bf16. Four rows at a time: one load of x feeds four vdpbf16ps.
void gemv_rows(const bf16* W, const bf16* x, int64_t n, int64_t r0, int64_t r1, float* y) {
  const int64_t full = n / 32 * 32;
  const __mmask32 tail = n == full ? 0 : static_cast<__mmask32>((1ull << (n - full)) - 1);
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const bf16* w0 = W + r * n;
    const bf16* w1 = w0 + n;
    const bf16* w2 = w1 + n;
    const bf16* w3 = w2 + n;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < full; i += 32) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + i), xv);
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w1 + i), xv);
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w2 + i), xv);
      a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w3 + i), xv);
    }
    if (tail) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + full);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(tail, w0 + full), xv);
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(tail, w1 + full), xv);
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_maskz_loadu_epi16(tail, w2 + full), xv);
      a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_maskz_loadu_epi16(tail, w3 + full), xv);
    }
    y[r] = round_bf16(_mm512_reduce_add_ps(a0));
    y[r + 1] = round_bf16(_mm512_reduce_add_ps(a1));
    y[r + 2] = round_bf16(_mm512_reduce_add_ps(a2));
    y[r + 3] = round_bf16(_mm512_reduce_add_ps(a3));
  }
  for (; r < r1; ++r) {
    const bf16* w0 = W + r * n;
    __m512 a0 = _mm512_setzero_ps();
    for (int64_t i = 0; i < full; i += 32)
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + i),
                            (__m512bh)_mm512_loadu_si512(x + i));
    if (tail)
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(tail, w0 + full),
                            (__m512bh)_mm512_maskz_loadu_epi16(tail, x + full));
    y[r] = round_bf16(_mm512_reduce_add_ps(a0));
  }
}

float dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy(float a, const float* x, float* y, int64_t n) {  // y += a * x
  const __m512 av = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

#pragma GCC pop_options

// rms_norm(h) * w, rounded to bf16 (the next product's input); `keep` the float32 result too
void rms_norm_bf16(const float* h, const float* w, float eps, int64_t n, bf16* out,
                   float* keep = nullptr) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(h[i]) * h[i];
  const float scale = 1.0f / std::sqrt(static_cast<float>(ss / n) + eps);
  for (int64_t i = 0; i < n; ++i) {
    const float v = h[i] * scale * w[i];
    if (keep) keep[i] = v;
    if (out) out[i] = float_to_bf16(v);
  }
}

void rope(const float* x, const float* cos, const float* sin, int64_t d, float* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
  }
}

// -- threads -------------------------------------------------------------------------------
// Spin (a phase of a layer takes microseconds), yielding the core after a while: on a machine
// whose cores are busy the thread waited for may be off-CPU, and pure spinning would slow it.
template <class Ready>
inline void spin_until(Ready ready) {
  for (int i = 0; !ready(); ++i) {
    if (i < 4096) _mm_pause();
    else std::this_thread::yield();
  }
}

// A spin barrier for the threads of one step (they are all running: no sleeping inside a step).
class Barrier {
 public:
  void reset() { count_.store(0); phase_.store(0); }
  void wait(int n) {
    if (n == 1) return;
    const int phase = phase_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      count_.store(0, std::memory_order_relaxed);
      phase_.store(phase + 1, std::memory_order_release);
    } else {
      spin_until([&] { return phase_.load(std::memory_order_acquire) != phase; });
    }
  }

 private:
  std::atomic<int> count_{0};
  std::atomic<int> phase_{0};
};

inline std::pair<int64_t, int64_t> share(int64_t n, int tid, int threads, int64_t align = 4) {
  // rows [r0, r1) of thread tid: contiguous, multiples of `align` but for the last
  const int64_t per = (n + threads - 1) / threads;
  const int64_t chunk = (per + align - 1) / align * align;
  const int64_t r0 = std::min<int64_t>(n, chunk * tid);
  return {r0, std::min<int64_t>(n, r0 + chunk)};
}

torch::Tensor checked(const torch::Tensor& t, torch::ScalarType type, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.is_contiguous(), what,
              ": expected a contiguous CPU tensor of ", c10::toString(type));
  return t;
}

const bf16* bf16_ptr(const torch::Tensor& t) {
  return reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>());
}

struct Layer {
  torch::Tensor ln1, ln2, qkv, qkv_bias, o, o_bias, gate, up, down;  // bias: undefined or f32
};

}  // namespace

// The model's weights as `decoding.Weights` holds them (unpacked bf16 matrices), bound once per
// decode; `bind` then the cache and rotary tables of one decode, `step` once per token.
class Step {
 public:
  Step(torch::Tensor embed, torch::Tensor norm, torch::Tensor lm_head, std::vector<py::dict> layers,
       int64_t n_heads, int64_t n_kv, int64_t head_dim, double eps)
      : embed_(embed), norm_(checked(norm, torch::kFloat, "norm")),
        lm_head_(checked(lm_head, torch::kBFloat16, "lm_head")), n_heads_(n_heads), n_kv_(n_kv),
        d_(head_dim), eps_(static_cast<float>(eps)) {
    TORCH_CHECK(embed.is_contiguous() && (embed.scalar_type() == torch::kFloat ||
                                          embed.scalar_type() == torch::kBFloat16),
                "embed: float32 or bfloat16, contiguous");
    H_ = embed.size(1);
    V_ = lm_head.size(0);
    TORCH_CHECK(lm_head.size(1) == H_ && n_heads % n_kv == 0, "shapes");
    auto bias = [](py::dict& d, const char* k, int64_t n) {
      if (d[k].is_none()) return torch::Tensor();
      auto b = d[k].cast<torch::Tensor>().to(torch::kFloat).contiguous();
      TORCH_CHECK(b.numel() == n, k, ": size");
      return b;
    };
    const int64_t nqkv = (n_heads + 2 * n_kv) * head_dim;
    for (auto& d : layers) {
      Layer ly;
      ly.ln1 = checked(d["ln1"].cast<torch::Tensor>(), torch::kFloat, "ln1");
      ly.ln2 = checked(d["ln2"].cast<torch::Tensor>(), torch::kFloat, "ln2");
      ly.qkv = checked(d["qkv"].cast<torch::Tensor>(), torch::kBFloat16, "qkv");
      ly.o = checked(d["o"].cast<torch::Tensor>(), torch::kBFloat16, "o");
      ly.gate = checked(d["gate"].cast<torch::Tensor>(), torch::kBFloat16, "gate");
      ly.up = checked(d["up"].cast<torch::Tensor>(), torch::kBFloat16, "up");
      ly.down = checked(d["down"].cast<torch::Tensor>(), torch::kBFloat16, "down");
      ly.qkv_bias = bias(d, "qkv_bias", nqkv);
      ly.o_bias = bias(d, "o_bias", H_);
      I_ = ly.down.size(1);
      TORCH_CHECK(ly.qkv.size(0) == nqkv && ly.qkv.size(1) == H_ && ly.o.size(0) == H_ &&
                      ly.o.size(1) == n_heads * head_dim && ly.gate.size(0) == I_ &&
                      ly.up.size(0) == I_ && ly.gate.size(1) == H_ && ly.up.size(1) == H_ &&
                      ly.down.size(0) == H_,
                  "layer shapes");
      layers_.push_back(ly);
    }
    h_.assign(H_, 0.f);
    qkv_.assign(nqkv, 0.f);
    att_.assign(n_heads * head_dim, 0.f);
    act_.assign(I_, 0);
  }

  // k, v: (layers, rows, kv heads, L, head dim) float32, row 0 used; cos, sin: (L, head dim)
  // float32; key_bias: (L,) float32 (0 where a key may be attended, -inf elsewhere).
  void bind(torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin,
            torch::Tensor key_bias) {
    for (auto* t : {&k, &v})
      TORCH_CHECK(t->dim() == 5 && t->scalar_type() == torch::kFloat &&
                      t->size(0) == static_cast<int64_t>(layers_.size()) && t->size(2) == n_kv_ &&
                      t->size(4) == d_ && t->stride(4) == 1,
                  "cache layout");
    k_ = k;
    v_ = v;
    cos_ = checked(cos, torch::kFloat, "cos");
    sin_ = checked(sin, torch::kFloat, "sin");
    bias_ = checked(key_bias, torch::kFloat, "key_bias");
    L_ = std::min({k.size(3), cos.size(0), sin.size(0), key_bias.size(0)});
  }

  // token at cache position `at` -> (logits (1, V), final normed hidden state (1, H)), float32
  std::tuple<torch::Tensor, torch::Tensor> step(int64_t token, int64_t at) {
    TORCH_CHECK(k_.defined(), "bind() first");
    TORCH_CHECK(at >= 0 && at < L_ && token >= 0 && token < embed_.size(0), "token or position");
    auto logits = torch::empty({1, V_}, torch::kFloat);
    auto last = torch::empty({1, H_}, torch::kFloat);
    if (embed_.scalar_type() == torch::kFloat) {
      std::memcpy(h_.data(), embed_.data_ptr<float>() + token * H_, H_ * sizeof(float));
    } else {
      const bf16* e = bf16_ptr(embed_) + token * H_;
      for (int64_t i = 0; i < H_; ++i) h_[i] = bf16_to_float(e[i]);
    }
    float* lg = logits.data_ptr<float>();
    float* lst = last.data_ptr<float>();
    barrier_.reset();
    // torch's own OpenMP threads (the extension links the libgomp torch loaded): no second pool
    // competing with them for the cores
#pragma omp parallel num_threads(std::max(1, at::get_num_threads()))
    run(omp_get_thread_num(), omp_get_num_threads(), at, lg, lst);
    return {logits, last};
  }

 private:
  void run(int tid, int threads, int64_t at, float* logits, float* last) {
    const int64_t d = d_, nq = n_heads_ * d, nk = n_kv_ * d, group = n_heads_ / n_kv_;
    const float* cos = cos_.data_ptr<float>() + at * d;
    const float* sin = sin_.data_ptr<float>() + at * d;
    const float* kbias = bias_.data_ptr<float>();
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    std::vector<bf16> xb(std::max(H_, nq));  // this thread's product input
    std::vector<float> tmp(std::max({2 * I_, H_, 2 * d}));
    std::vector<float> scores(at + 1);
    float* kc = k_.data_ptr<float>();
    float* vc = v_.data_ptr<float>();
    const int64_t sl = k_.stride(0), sh = k_.stride(2), sp = k_.stride(3);
    const int64_t vl = v_.stride(0), vh = v_.stride(2), vp = v_.stride(3);
    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& ly = layers_[li];
      // attention: qkv product
      rms_norm_bf16(h_.data(), ly.ln1.data_ptr<float>(), eps_, H_, xb.data());
      auto [q0, q1] = share(qkv_.size(), tid, threads);
      gemv_rows(bf16_ptr(ly.qkv), xb.data(), H_, q0, q1, qkv_.data());
      if (ly.qkv_bias.defined()) {
        const float* b = ly.qkv_bias.data_ptr<float>();
        for (int64_t r = q0; r < q1; ++r) qkv_[r] += b[r];
      }
      barrier_.wait(threads);
      // rotary, the new key/value into the cache, each query head over positions [0, at]
      for (int64_t head = tid; head < n_heads_; head += threads) {
        const int64_t g = head / group;
        float* kl = kc + li * sl + g * sh;
        float* vlp = vc + li * vl + g * vh;
        float* knew = tmp.data();
        float* q = tmp.data() + d;
        rope(qkv_.data() + nq + g * d, cos, sin, d, knew);  // this step's key, computed here
        const float* vnew = qkv_.data() + nq + nk + g * d;
        if (head % group == 0) {  // the group's first head stores it for later steps
          std::memcpy(kl + at * sp, knew, d * sizeof(float));
          std::memcpy(vlp + at * vp, vnew, d * sizeof(float));
        }
        rope(qkv_.data() + head * d, cos, sin, d, q);
        float mx = -INFINITY;
        for (int64_t p = 0; p <= at; ++p) {
          const float* key = p == at ? knew : kl + p * sp;
          scores[p] = dot(q, key, d) * scale + kbias[p];
          mx = std::max(mx, scores[p]);
        }
        float sum = 0.f;
        for (int64_t p = 0; p <= at; ++p) sum += scores[p] = std::exp(scores[p] - mx);
        float* out = att_.data() + head * d;
        std::fill(out, out + d, 0.f);
        for (int64_t p = 0; p <= at; ++p)
          axpy(scores[p] / sum, p == at ? vnew : vlp + p * vp, out, d);
      }
      barrier_.wait(threads);
      // o product + residual
      for (int64_t i = 0; i < nq; ++i) xb[i] = float_to_bf16(att_[i]);
      auto [o0, o1] = share(H_, tid, threads);
      gemv_rows(bf16_ptr(ly.o), xb.data(), nq, o0, o1, tmp.data());
      const float* ob = ly.o_bias.defined() ? ly.o_bias.data_ptr<float>() : nullptr;
      for (int64_t r = o0; r < o1; ++r) h_[r] += ob ? tmp[r] + ob[r] : tmp[r];
      barrier_.wait(threads);
      // MLP: gate and up rows j on the same thread, silu(gate) * up to act
      rms_norm_bf16(h_.data(), ly.ln2.data_ptr<float>(), eps_, H_, xb.data());
      auto [j0, j1] = share(I_, tid, threads, 4);
      gemv_rows(bf16_ptr(ly.gate), xb.data(), H_, j0, j1, tmp.data());
      gemv_rows(bf16_ptr(ly.up), xb.data(), H_, j0, j1, tmp.data() + I_);
      for (int64_t j = j0; j < j1; ++j) {
        const float g = tmp[j];
        act_[j] = float_to_bf16(g / (1.0f + std::exp(-g)) * tmp[I_ + j]);
      }
      barrier_.wait(threads);
      auto [d0, d1] = share(H_, tid, threads);
      gemv_rows(bf16_ptr(ly.down), act_.data(), I_, d0, d1, tmp.data());
      for (int64_t r = d0; r < d1; ++r) h_[r] += tmp[r];
      barrier_.wait(threads);
    }
    rms_norm_bf16(h_.data(), norm_.data_ptr<float>(), eps_, H_, xb.data(),
                  tid == 0 ? last : nullptr);
    auto [v0, v1] = share(V_, tid, threads, 64);
    gemv_rows(bf16_ptr(lm_head_), xb.data(), H_, v0, v1, logits);
  }

  torch::Tensor embed_, norm_, lm_head_;
  std::vector<Layer> layers_;
  int64_t n_heads_, n_kv_, d_, H_ = 0, I_ = 0, V_ = 0, L_ = 0;
  float eps_;
  torch::Tensor k_, v_, cos_, sin_, bias_;
  std::vector<float> h_, qkv_, att_;
  std::vector<bf16> act_;
  Barrier barrier_;
};

bool cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_supported", &cpu_supported, "the CPU has AVX512-BF16 (the step's kernels need it)");
  py::class_<Step>(m, "Step")
      .def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, std::vector<py::dict>, int64_t,
                    int64_t, int64_t, double>())
      .def("bind", &Step::bind)
      .def("step", &Step::step, py::call_guard<py::gil_scoped_release>());
}
