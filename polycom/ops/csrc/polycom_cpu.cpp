// Fused CPU kernels for order-3 PolyNorm and PolyReLU (forward and hand-derived backward).
//
// Plain C++17 with OpenMP and no PyTorch headers, so it compiles in about a second and is
// called through ctypes (see polycom/ops/cpu.py). Every function works on a 2-D view
// [rows, d] whose rows may be strided (row stride in elements, last dim contiguous).
//
// Coefficients arrive as float64 [w0, w1, w2, b]; w0 pairs with the cubic term (official layout).
// Math runs in float for fp32/fp16/bf16 inputs and in double for fp64; row reductions sum
// blocks of BLOCK elements in the compute type (vectorised) and add block sums in double;
// results are rounded once to the input type (round to nearest even).
//
// PolyNorm, per row (u_p = x^p, r_p = 1/sqrt(mean(u_p^2) + eps), a_p = w_p r_p):
//   y  = a3 x^3 + a2 x^2 + a1 x + b                                       (Horner form)
//   dx = dy (3 a3 x^2 + 2 a2 x + a1) - x (k5 x^4 + k3 x^2 + k1),  k_(2p-1) = p w_p r_p^3 S_p / d
//   S_p = sum_i dy_i x_i^p;   dw_p = r_p S_p;   db = sum_i dy_i
// PolyReLU (z = relu(x)): y = w0 z^3 + w1 z^2 + w2 z + b (in the official op order);
//   dx = dy (3 w0 z^2 + 2 w1 z + w2) [x > 0];  dw_p = sum dy z^p;  db = sum dy.
// Backward writes per-row partial sums of dW/dB and adds them up in row order on one thread,
// so gradients are bit-identical whatever the thread count.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t BLOCK = 256;

struct BF16 {
  uint16_t bits;
};

template <typename T>
struct ComputeOf {
  using type = float;
};
template <>
struct ComputeOf<double> {
  using type = double;
};

// ---- explicit 256-bit vectors for the row reductions ----------------------------------
typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef _Float16 f16x8 __attribute__((vector_size(16)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

template <typename C>
struct VecOf {
  using type = f32x8;
  static constexpr int W = 8;
};
template <>
struct VecOf<double> {
  using type = f64x4;
  static constexpr int W = 4;
};

inline f32x8 loadv(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f64x4 loadv(const double* p) {
  f64x4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f32x8 loadv(const _Float16* p) {
  f16x8 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, f32x8);
}
inline f32x8 loadv(const BF16* p) {
  u16x8 h;
  std::memcpy(&h, p, sizeof h);
  const u32x8 bits = __builtin_convertvector(h, u32x8) << 16;
  f32x8 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// ---- vector stores, rounding to T ----------------------------------------------------------
// Ordinary stores on purpose: outputs are freshly allocated, and the kernel's page-fault zeroing
// has just put each destination page in cache. Streaming (non-temporal) stores measured 1.3-1.5x
// slower here for that reason (they win only when writing into memory that was already mapped).
inline void storev(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }
inline void storev(double* p, f64x4 v) { std::memcpy(p, &v, sizeof v); }
inline void storev(_Float16* p, f32x8 v) {
  const f16x8 h = __builtin_convertvector(v, f16x8);
  std::memcpy(p, &h, sizeof h);
}
inline void storev(BF16* p, f32x8 v) {
  u32x8 bits;
  std::memcpy(&bits, &v, sizeof bits);
  const u32x8 nan = (bits & 0x7fffffffu) > 0x7f800000u;  // all-ones lanes where v is NaN
  const u32x8 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const u32x8 quiet = (bits >> 16) | 0x40u;
  const u16x8 h = __builtin_convertvector((nan & quiet) | (~nan & rounded), u16x8);
  std::memcpy(p, &h, sizeof h);
}

// sums[k] = sum over i < d of terms(a[i], b[i])[k], for k < K. Each BLOCK of elements is
// summed in the compute type over U independent vector accumulators (so no single add chain
// limits throughput), then added in double. The ragged tail is zero-padded: every term vanishes
// at a = b = 0. terms(va, vb, t) fills t[0..K) with vectors and returns an output vector, which
// is stored to out[i] when out is not null (one pass for reductions and an element-wise result).
template <typename T, int K, typename Terms>
inline void row_sums(int64_t d, const T* a, const T* b, Terms terms, double* sums, T* out = nullptr) {
  using C = typename ComputeOf<T>::type;
  using V = typename VecOf<C>::type;
  constexpr int W = VecOf<C>::W;
  constexpr int U = 4;
  for (int k = 0; k < K; ++k) sums[k] = 0;
  for (int64_t start = 0; start < d; start += BLOCK) {
    const int64_t end = std::min(start + BLOCK, d);
    V acc[K][U] = {};
    int64_t i = start;
    for (; i + U * W <= end; i += U * W) {
      for (int u = 0; u < U; ++u) {
        V t[K];
        const V o = terms(loadv(a + i + u * W), loadv(b + i + u * W), t);
        if (out) storev(out + i + u * W, o);
        for (int k = 0; k < K; ++k) acc[k][u] += t[k];
      }
    }
    for (; i < end; i += W) {
      const int n = static_cast<int>(std::min<int64_t>(W, end - i));
      T pa[W] = {}, pb[W] = {}, po[W];
      for (int j = 0; j < n; ++j) {
        pa[j] = a[i + j];
        pb[j] = b[i + j];
      }
      V t[K];
      storev(po, terms(loadv(pa), loadv(pb), t));
      if (out)
        for (int j = 0; j < n; ++j) out[i + j] = po[j];
      for (int k = 0; k < K; ++k) acc[k][0] += t[k];
    }
    for (int k = 0; k < K; ++k) {
      const V v = (acc[k][0] + acc[k][1]) + (acc[k][2] + acc[k][3]);
      C block = 0;
      for (int j = 0; j < W; ++j) block += v[j];
      sums[k] += block;
    }
  }
}

// out[i] = fn(a[i], b[i]) over one row, W lanes at a time; the ragged tail goes through a
// zero-padded buffer.
template <typename T, typename Fn>
inline void row_map(int64_t d, const T* a, const T* b, T* out, Fn fn) {
  using C = typename ComputeOf<T>::type;
  constexpr int W = VecOf<C>::W;
  int64_t i = 0;
  for (; i + W <= d; i += W) storev(out + i, fn(loadv(a + i), loadv(b + i)));
  if (i < d) {
    T pa[W] = {}, pb[W] = {}, po[W];
    for (int j = 0; i + j < d; ++j) {
      pa[j] = a[i + j];
      pb[j] = b[i + j];
    }
    storev(po, fn(loadv(pa), loadv(pb)));
    for (int j = 0; i + j < d; ++j) out[i + j] = po[j];
  }
}

// ---- PolyNorm ----------------------------------------------------------------------------
// Forward over the rows [r0, r1) of one thread, software-pipelined: the loop that sums row
// r+1's powers also writes row r's output from x_r, which is still in L1/L2. A plain two-pass
// row (sum, then write) alternates a read-only phase with a write phase; overlapping them keeps
// the read and the write stream in flight together, as in a copy. Same sums, same bits.
template <typename T, typename C>
void poly_norm_fwd_rows(const T* x, int64_t x_stride, T* y, C* rstd, int64_t r0, int64_t r1, int64_t d,
                        const double* coef, double eps) {
  if (r0 >= r1) return;
  auto even_powers = [](auto v, auto* t) {  // x^2, x^4, x^6
    const auto v2 = v * v;
    t[0] = v2;
    t[1] = v2 * v2;
    t[2] = t[1] * v2;
  };
  double s[3];  // sum x^2, x^4, x^6 of the row being summed
  row_sums<T, 3>(d, x + r0 * x_stride, x + r0 * x_stride, [=](auto v, auto, auto* t) {
    even_powers(v, t);
    return v;  // no element-wise output for the first row's sums
  }, s);
  for (int64_t r = r0; r < r1; ++r) {
    const C r3 = static_cast<C>(1.0 / std::sqrt(s[2] / d + eps));
    const C r2 = static_cast<C>(1.0 / std::sqrt(s[1] / d + eps));
    const C r1_ = static_cast<C>(1.0 / std::sqrt(s[0] / d + eps));
    rstd[3 * r] = r3;
    rstd[3 * r + 1] = r2;
    rstd[3 * r + 2] = r1_;
    const C a3 = static_cast<C>(coef[0]) * r3, a2 = static_cast<C>(coef[1]) * r2;
    const C a1 = static_cast<C>(coef[2]) * r1_, b = static_cast<C>(coef[3]);
    auto output = [=](auto v) { return ((a3 * v + a2) * v + a1) * v + b; };
    const T* xr = x + r * x_stride;
    if (r + 1 < r1) {  // sum row r+1 and write row r in one pass
      row_sums<T, 3>(d, x + (r + 1) * x_stride, xr, [=](auto next, auto cur, auto* t) {
        even_powers(next, t);
        return output(cur);
      }, s, y + r * d);
    } else {
      row_map(d, xr, xr, y + r * d, [=](auto v, auto) { return output(v); });
    }
  }
}

template <typename T, typename C>
void poly_norm_bwd_row(const T* dy, const T* x, T* dx, const C* rstd, int64_t d, const double* coef,
                       double* partial) {
  double s[4];  // sum dy, dy x, dy x^2, dy x^3
  row_sums<T, 4>(
      d, dy, x,
      [](auto g, auto v, auto* t) {
        t[0] = g;
        t[1] = g * v;
        t[2] = t[1] * v;
        t[3] = t[2] * v;
        return v;  // no element-wise output in this pass
      },
      s);
  const double s0 = s[0], s1 = s[1], s2 = s[2], s3 = s[3];
  const double r3 = rstd[0], r2 = rstd[1], r1 = rstd[2];
  partial[0] = r3 * s3;
  partial[1] = r2 * s2;
  partial[2] = r1 * s1;
  partial[3] = s0;
  const C c2 = static_cast<C>(3.0 * coef[0] * r3);
  const C c1 = static_cast<C>(2.0 * coef[1] * r2);
  const C c0 = static_cast<C>(coef[2] * r1);
  const C k5 = static_cast<C>(3.0 * coef[0] * r3 * r3 * r3 * s3 / d);
  const C k3 = static_cast<C>(2.0 * coef[1] * r2 * r2 * r2 * s2 / d);
  const C k1 = static_cast<C>(coef[2] * r1 * r1 * r1 * s1 / d);
  row_map(d, dy, x, dx, [=](auto g, auto v) {
    const auto v2 = v * v;
    return g * ((c2 * v + c1) * v + c0) - v * ((k5 * v2 + k3) * v2 + k1);
  });
}

// ---- PolyReLU ----------------------------------------------------------------------------
// relu keeps NaN (like torch.relu): z = (x <= 0) ? 0 : x.
template <typename T, typename C>
void poly_relu_fwd_row(const T* x, T* y, int64_t d, const double* coef) {
  const C w0 = static_cast<C>(coef[0]), w1 = static_cast<C>(coef[1]);
  const C w2 = static_cast<C>(coef[2]), b = static_cast<C>(coef[3]);
  // The official module's operation order (z**3 = (z*z)*z, highest power first, bias last;
  // built with -ffp-contract=off), so fp32/bf16/fp16 results equal it bit for bit.
  row_map(d, x, x, y, [=](auto v, auto) {
    const auto z = v <= 0 ? 0 : v;
    const auto z2 = z * z;
    return ((w0 * (z2 * z) + w1 * z2) + w2 * z) + b;
  });
}

template <typename T, typename C>
void poly_relu_bwd_row(const T* dy, const T* x, T* dx, int64_t d, const double* coef, double* partial) {
  const C c2 = static_cast<C>(3.0 * coef[0]), c1 = static_cast<C>(2.0 * coef[1]);
  const C c0 = static_cast<C>(coef[2]);
  double s[4];  // sum dy, dy z, dy z^2, dy z^3; dx written in the same pass
  row_sums<T, 4>(
      d, dy, x,
      [=](auto g, auto v, auto* t) {
        const auto z = v <= 0 ? 0 : v;  // keeps NaN, like torch.relu
        t[0] = g;
        t[1] = g * z;
        t[2] = t[1] * z;
        t[3] = t[2] * z;
        // torch's relu backward passes the gradient unless x <= 0 (so NaN inputs give NaN)
        return v <= 0 ? 0 : g * ((c2 * z + c1) * z + c0);
      },
      s, dx);
  const double s0 = s[0], s1 = s[1], s2 = s[2], s3 = s[3];
  partial[0] = s3;
  partial[1] = s2;
  partial[2] = s1;
  partial[3] = s0;
}

// Sum per-row partials [rows, 4] in row order into out[4] (deterministic).
void sum_partials(const double* partial, int64_t rows, double* out) {
  double acc[4] = {0, 0, 0, 0};
  for (int64_t r = 0; r < rows; ++r)
    for (int k = 0; k < 4; ++k) acc[k] += partial[4 * r + k];
  for (int k = 0; k < 4; ++k) out[k] = acc[k];
}

// ---- row loops ---------------------------------------------------------------------------
// Contiguous row ranges per thread (what schedule(static) would give), so each thread can
// pipeline its rows.
inline void thread_rows(int64_t rows, int64_t* r0, int64_t* r1) {
  const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
  const int64_t per = rows / nt, extra = rows % nt;
  *r0 = tid * per + std::min(tid, extra);
  *r1 = *r0 + per + (tid < extra ? 1 : 0);
}

template <typename T>
void poly_norm_fwd(const void* x, void* y, void* rstd, int64_t rows, int64_t d, int64_t x_stride,
                   const double* coef, double eps, int threads) {
  using C = typename ComputeOf<T>::type;
  const T* xp = static_cast<const T*>(x);
  T* yp = static_cast<T*>(y);
  C* rp = static_cast<C*>(rstd);
#pragma omp parallel num_threads(threads)
  {
    int64_t r0, r1;
    thread_rows(rows, &r0, &r1);
    poly_norm_fwd_rows<T, C>(xp, x_stride, yp, rp, r0, r1, d, coef, eps);
  }
}

template <typename T>
void poly_norm_bwd(const void* dy, int64_t dy_stride, const void* x, int64_t x_stride, void* dx,
                   const void* rstd, int64_t rows, int64_t d, const double* coef, double* partial,
                   double* out, int threads) {
  using C = typename ComputeOf<T>::type;
  const T* gp = static_cast<const T*>(dy);
  const T* xp = static_cast<const T*>(x);
  T* dp = static_cast<T*>(dx);
  const C* rp = static_cast<const C*>(rstd);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r)
    poly_norm_bwd_row<T, C>(gp + r * dy_stride, xp + r * x_stride, dp + r * d, rp + 3 * r, d, coef,
                            partial + 4 * r);
  sum_partials(partial, rows, out);
}

template <typename T>
void poly_relu_fwd(const void* x, void* y, int64_t rows, int64_t d, int64_t x_stride, const double* coef,
                   int threads) {
  using C = typename ComputeOf<T>::type;
  const T* xp = static_cast<const T*>(x);
  T* yp = static_cast<T*>(y);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) poly_relu_fwd_row<T, C>(xp + r * x_stride, yp + r * d, d, coef);
}

template <typename T>
void poly_relu_bwd(const void* dy, int64_t dy_stride, const void* x, int64_t x_stride, void* dx, int64_t rows,
                   int64_t d, const double* coef, double* partial, double* out, int threads) {
  using C = typename ComputeOf<T>::type;
  const T* gp = static_cast<const T*>(dy);
  const T* xp = static_cast<const T*>(x);
  T* dp = static_cast<T*>(dx);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r)
    poly_relu_bwd_row<T, C>(gp + r * dy_stride, xp + r * x_stride, dp + r * d, d, coef, partial + 4 * r);
  sum_partials(partial, rows, out);
}

// dtype codes shared with cpu.py
enum Dtype { F32 = 0, F16 = 1, BF16_ = 2, F64 = 3 };

#define POLYCOM_DISPATCH(dtype, FN, ...)   \
  switch (dtype) {                         \
    case F32:                              \
      FN<float>(__VA_ARGS__);              \
      return 0;                            \
    case F16:                              \
      FN<_Float16>(__VA_ARGS__);           \
      return 0;                            \
    case BF16_:                            \
      FN<BF16>(__VA_ARGS__);               \
      return 0;                            \
    case F64:                              \
      FN<double>(__VA_ARGS__);             \
      return 0;                            \
    default:                               \
      return 1;                            \
  }

}  // namespace

extern "C" {

// Returns 0 on success, 1 for an unknown dtype code.
int polycom_poly_norm_fwd(int dtype, const void* x, void* y, void* rstd, int64_t rows, int64_t d,
                          int64_t x_stride, const double* coef, double eps, int threads) {
  POLYCOM_DISPATCH(dtype, poly_norm_fwd, x, y, rstd, rows, d, x_stride, coef, eps, threads)
}

int polycom_poly_norm_bwd(int dtype, const void* dy, int64_t dy_stride, const void* x, int64_t x_stride,
                          void* dx, const void* rstd, int64_t rows, int64_t d, const double* coef,
                          double* partial, double* out, int threads) {
  POLYCOM_DISPATCH(dtype, poly_norm_bwd, dy, dy_stride, x, x_stride, dx, rstd, rows, d, coef, partial, out,
                   threads)
}

int polycom_poly_relu_fwd(int dtype, const void* x, void* y, int64_t rows, int64_t d, int64_t x_stride,
                          const double* coef, int threads) {
  POLYCOM_DISPATCH(dtype, poly_relu_fwd, x, y, rows, d, x_stride, coef, threads)
}

int polycom_poly_relu_bwd(int dtype, const void* dy, int64_t dy_stride, const void* x, int64_t x_stride,
                          void* dx, int64_t rows, int64_t d, const double* coef, double* partial, double* out,
                          int threads) {
  POLYCOM_DISPATCH(dtype, poly_relu_bwd, dy, dy_stride, x, x_stride, dx, rows, d, coef, partial, out, threads)
}

}  // extern "C"
