// Paged decode attention on CUDA: one query token per sequence, K/V read through block tables.
//
// Decode attention is a memory-bound scan of the K/V cache, so the kernel is built around reading it once at
// full bandwidth:
//   * One thread block per (sequence, kv head, chunk of up to 8 query heads, context partition). All query
//     heads of a kv head (GQA) are handled by the same block, so each K/V row is read once, not once per head.
//   * A row (head_dim elements) is read by LANES = head_dim * sizeof(T) / 16 lanes with one 16-byte load each
//     (D=128 bf16: 16 lanes, so a warp reads 2 whole rows per load); each lane group keeps several K and V
//     rows in flight before using them, and GQA blocks also prefetch the next step's rows.
//   * Every lane group runs its own online softmax (running max, sum, accumulator in fp32, in base 2 with
//     log2(e) folded into the query); groups, then warps, are merged once at the end.
//   * Split-KV (flash-decoding): when (sequences x kv heads) blocks cannot fill the GPU's resident slots, each
//     context is cut into partitions handled by separate blocks, which write a partial (max, sum,
//     accumulator); a second kernel combines them. The number of partition blocks uses shapes only (no
//     device sync, so the launch can be captured in a CUDA graph); each sequence's partition length is read
//     off its real context on the device, so the work is balanced whatever the block table's width (the
//     engine's graphs pass tables wide enough for the longest possible sequence: a length taken from the
//     width gave short contexts a single partition, i.e. no split). Partitions past a sequence's end exit.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>

#include "paged_kv.h"

namespace fastchat {
namespace {

constexpr int kWarpSize = 32;
constexpr int kNumWarps = 4;
constexpr int kThreads = kNumWarps * kWarpSize;
constexpr int kMaxGroup = 8;          // query heads per block: each costs 2 x 16 / sizeof(T) fp32 registers
constexpr int kMinPartition = 128;    // split-KV partitions hold at least this many tokens...
constexpr int kPartitionAlign = 64;   // ...in multiples of this
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFullMask = 0xffffffffu;

// Split-KV: the partition length of a context of ctx tokens cut into at most `parts` partitions.
__device__ __forceinline__ int partition_length(int ctx, int parts) {
  const int n = (ctx + parts - 1) / parts;
  return max(kMinPartition, (n + kPartitionAlign - 1) / kPartitionAlign * kPartitionAlign);
}

// 16 bytes of T -> 16 / sizeof(T) floats.
template <typename T>
__device__ __forceinline__ void to_float(const uint4& v, float* f);

template <>
__device__ __forceinline__ void to_float<float>(const uint4& v, float* f) {
  f[0] = __uint_as_float(v.x), f[1] = __uint_as_float(v.y), f[2] = __uint_as_float(v.z), f[3] = __uint_as_float(v.w);
}

template <>
__device__ __forceinline__ void to_float<c10::BFloat16>(const uint4& v, float* f) {
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bf16 is the top half of an fp32
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

template <>
__device__ __forceinline__ void to_float<c10::Half>(const uint4& v, float* f) {
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
    f[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
  }
}

// Merge online-softmax state (m2, l2, a2) into (m, l, a); m = -inf means "nothing seen yet".
template <int VEC>
__device__ __forceinline__ void merge(float& m, float& l, float* a, float m2, float l2, const float* a2) {
  const float mx = fmaxf(m, m2);
  const float f1 = m == -INFINITY ? 0.f : exp2f(m - mx);
  const float f2 = m2 == -INFINITY ? 0.f : exp2f(m2 - mx);
  m = mx;
  l = l * f1 + l2 * f2;
#pragma unroll
  for (int i = 0; i < VEC; ++i) a[i] = a[i] * f1 + a2[i] * f2;
}

// grid: (batch, num_kv_heads * chunks, partitions). Without split (part_acc == nullptr) it writes out directly.
template <typename T, int D, int G>
__global__ void __launch_bounds__(kThreads) paged_attention_kernel(
    T* __restrict__ out,               // (B, Hq, D)
    float* __restrict__ part_acc,      // (B, Hq, P, D): unnormalised accumulators, split only
    float* __restrict__ part_max,      // (B, Hq, P): running max, base-2 logits
    float* __restrict__ part_sum,      // (B, Hq, P): sum of exp2(logit - max)
    const T* __restrict__ query, const T* __restrict__ key_cache, const T* __restrict__ value_cache,
    const int* __restrict__ block_tables, const int* __restrict__ context_lens, float scale_log2, int num_heads,
    int num_kv_heads, int block_size, int64_t q_stride_b, int64_t q_stride_h, int64_t table_stride,
    int max_context) {
  constexpr int VEC = 16 / sizeof(T);        // elements per 16-byte load
  constexpr int LANES = D / VEC;             // lanes that share one row
  constexpr int ROWS = kWarpSize / LANES;    // rows a warp reads per load
  constexpr int INFLIGHT = G >= 8 ? 2 : 4;   // K and V rows per lane group loaded before use (registers permitting)
  constexpr int TILE = ROWS * INFLIGHT;      // tokens per warp per step
  static_assert(LANES >= 1 && LANES <= kWarpSize && kWarpSize % LANES == 0, "unsupported head_dim");

  const int b = blockIdx.x;
  const int group = num_heads / num_kv_heads;
  const int chunks = (group + G - 1) / G;
  const int kvh = blockIdx.y / chunks;
  const int chunk = blockIdx.y % chunks;
  const int h0 = kvh * group + chunk * G;         // first query head of this block
  const int heads = min(G, group - chunk * G);    // query heads of this block (block-uniform)
  const bool split = part_acc != nullptr;
  const int part = blockIdx.z;
  const int ctx = min(context_lens[b], max_context);  // a context longer than its table row reads only the row
  const int partition = split ? partition_length(ctx, gridDim.z) : max_context;
  const int start = part * partition;
  if (split && start >= ctx) return;  // past this sequence's end: the reduce kernel never reads it
  const int end = min(ctx, start + partition);

  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int col = (lane % LANES) * VEC;  // this lane's slice of every row
  const int row = lane / LANES;          // which of the warp's ROWS rows this lane reads

  float q[G][VEC];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int i = 0; i < VEC; ++i)
      q[g][i] = g < heads ? static_cast<float>(query[b * q_stride_b + (h0 + g) * q_stride_h + col + i]) * scale_log2
                          : 0.f;

  float m[G], l[G], acc[G][VEC];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY, l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[g][i] = 0.f;
  }

  const int* table = block_tables + b * table_stride;
  const int64_t slot_stride = (int64_t)num_kv_heads * D;  // elements between consecutive slots
  const T* k_head = key_cache + (int64_t)kvh * D + col;
  const T* v_head = value_cache + (int64_t)kvh * D + col;

  // Load the K and V rows of the step starting at `base` (zeros past `end`).
  auto load_step = [&](int base, uint4 (&kr)[INFLIGHT], uint4 (&vr)[INFLIGHT]) {
#pragma unroll
    for (int u = 0; u < INFLIGHT; ++u) {
      const int t = base + u * ROWS + row;
      if (t < end) {
        const int64_t slot = (int64_t)table[t / block_size] * block_size + t % block_size;
        kr[u] = __ldg(reinterpret_cast<const uint4*>(k_head + slot * slot_stride));
        vr[u] = __ldg(reinterpret_cast<const uint4*>(v_head + slot * slot_stride));
      } else {
        kr[u] = vr[u] = make_uint4(0, 0, 0, 0);
      }
    }
  };
  constexpr int kStep = kNumWarps * TILE;  // tokens per block per step
  // GQA blocks do G times the math per byte and, short of registers, run fewer warps per SM: they load the
  // next step's rows before using this step's. MHA blocks are many and light enough to hide the latency
  // with warps alone, and prefetching there costs occupancy (measured on H100: 98% of copy bandwidth at
  // 64 x 2048 without it, 80% with it).
  constexpr bool kPrefetch = G > 1;
  uint4 kr[INFLIGHT], vr[INFLIGHT];
  load_step(start + warp * TILE, kr, vr);
  // `base` is warp-uniform, so every lane reaches the shuffles below.
  for (int base = start + warp * TILE; base < end; base += kStep) {
    uint4 kn[INFLIGHT], vn[INFLIGHT];  // the next step's rows, when prefetching
    if constexpr (kPrefetch) load_step(base + kStep, kn, vn);
    // Logits: partial dot products over this lane's slice, summed across the row's LANES lanes.
    float s[INFLIGHT][G];
#pragma unroll
    for (int u = 0; u < INFLIGHT; ++u) {
      float kf[VEC];
      to_float<T>(kr[u], kf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (g >= heads) break;
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) dot += q[g][i] * kf[i];
#pragma unroll
        for (int o = LANES / 2; o > 0; o /= 2) dot += __shfl_xor_sync(kFullMask, dot, o);
        s[u][g] = base + u * ROWS + row < end ? dot : -INFINITY;
      }
    }
    // Online softmax: rescale once per step by the new running max, then accumulate the V rows.
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (g >= heads) break;
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < INFLIGHT; ++u) mx = fmaxf(mx, s[u][g]);
      if (mx == -INFINITY) continue;  // no valid token yet for this lane group
      const float alpha = exp2f(m[g] - mx);  // 0 when m was -inf
      m[g] = mx;
      l[g] *= alpha;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[g][i] *= alpha;
#pragma unroll
      for (int u = 0; u < INFLIGHT; ++u) s[u][g] = exp2f(s[u][g] - mx);  // masked tokens: exp2(-inf) = 0
    }
#pragma unroll
    for (int u = 0; u < INFLIGHT; ++u) {
      float vf[VEC];
      to_float<T>(vr[u], vf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (g >= heads) break;
        if (m[g] == -INFINITY) continue;  // s was left as a logit of -inf
        l[g] += s[u][g];
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[g][i] += s[u][g] * vf[i];
      }
    }
    if constexpr (kPrefetch) {
#pragma unroll
      for (int u = 0; u < INFLIGHT; ++u) kr[u] = kn[u], vr[u] = vn[u];
    } else {
      load_step(base + kStep, kr, vr);
    }
  }

  // Merge the ROWS lane groups of each warp: they differ in the lane bits above LANES.
#pragma unroll
  for (int o = LANES; o < kWarpSize; o *= 2) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (g >= heads) break;
      const float m2 = __shfl_xor_sync(kFullMask, m[g], o), l2 = __shfl_xor_sync(kFullMask, l[g], o);
      float a2[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) a2[i] = __shfl_xor_sync(kFullMask, acc[g][i], o);
      merge<VEC>(m[g], l[g], acc[g], m2, l2, a2);
    }
  }

  // Merge the warps through shared memory; each thread then finishes some (head, element) outputs.
  __shared__ float s_max[kNumWarps][G], s_sum[kNumWarps][G], s_acc[kNumWarps][G][D];
  if (row == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) s_acc[warp][g][col + i] = acc[g][i];
      if (lane == 0) s_max[warp][g] = m[g], s_sum[warp][g] = l[g];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < heads * D; idx += kThreads) {
    const int g = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kNumWarps; ++w) mx = fmaxf(mx, s_max[w][g]);
    float sum = 0.f, a = 0.f;
#pragma unroll
    for (int w = 0; w < kNumWarps; ++w) {
      if (s_max[w][g] == -INFINITY) continue;
      const float f = exp2f(s_max[w][g] - mx);
      sum += s_sum[w][g] * f;
      a += s_acc[w][g][d] * f;
    }
    const int h = h0 + g;
    if (split) {
      const int64_t i = ((int64_t)b * num_heads + h) * gridDim.z + part;
      part_acc[i * D + d] = a;
      if (d == 0) part_max[i] = mx, part_sum[i] = sum;
    } else {
      out[((int64_t)b * num_heads + h) * D + d] = static_cast<T>(sum > 0.f ? a / sum : 0.f);  // empty context: 0
    }
  }
}

// grid: (batch, num_heads), D threads. Combines the partitions that hold tokens of the sequence.
template <typename T, int D>
__global__ void __launch_bounds__(D) paged_attention_reduce_kernel(
    T* __restrict__ out, const float* __restrict__ part_acc, const float* __restrict__ part_max,
    const float* __restrict__ part_sum, const int* __restrict__ context_lens, int num_heads, int num_parts,
    int max_context) {
  const int b = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  const int ctx = max(min(context_lens[b], max_context), 0);
  const int parts = (ctx + partition_length(ctx, num_parts) - 1) / partition_length(ctx, num_parts);
  const int64_t base = ((int64_t)b * num_heads + h) * num_parts;
  float mx = -INFINITY;
  for (int p = 0; p < parts; ++p) mx = fmaxf(mx, part_max[base + p]);
  float sum = 0.f, a = 0.f;
  for (int p = 0; p < parts; ++p) {
    const float pm = part_max[base + p];
    if (pm == -INFINITY) continue;
    const float f = exp2f(pm - mx);
    sum += part_sum[base + p] * f;
    a += part_acc[(base + p) * D + d] * f;
  }
  out[((int64_t)b * num_heads + h) * D + d] = static_cast<T>(sum > 0.f ? a / sum : 0.f);
}

// The inputs of one call, made ready for the kernels.
struct Args {
  at::Tensor out, query, key_cache, value_cache, block_tables, context_lens;
  float scale_log2;
  int chunks;           // blocks per kv head along the query heads
  int64_t max_context;  // block_tables.size(1) * block_size: bounds every context
};

// Thread blocks of this kernel an SM runs at once (registers and shared memory permitting).
template <typename T, int D, int G>
int blocks_per_sm() {
  static const int n = [] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, paged_attention_kernel<T, D, G>,
                                                                 kThreads, 0));
    return std::max(blocks, 1);
  }();
  return n;
}

template <typename T, int D, int G>
void launch(const Args& a) {
  const int64_t batch = a.query.size(0), num_heads = a.query.size(1), num_kv_heads = a.key_cache.size(2);
  // Split-KV when the unsplit grid would leave the GPU part-empty: memory bandwidth comes from many loads in
  // flight, i.e. from resident warps. Split just enough to fill one wave of resident blocks (more waves only
  // add a tail: measured at 64 x 2048 MHA, 93% of copy bandwidth unsplit, 66% in 1.2 waves), in partitions of
  // at least kMinPartition tokens (each partition costs a partial result and a share of the reduce).
  const int64_t blocks = batch * num_kv_heads * a.chunks;
  const int64_t wave = blocks_per_sm<T, D, G>() * (int64_t)at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t partitions = std::min(std::max<int64_t>(wave / blocks, 1),
                                      (a.max_context + kMinPartition - 1) / kMinPartition);
  const bool split = partitions > 1;
  at::Tensor part_acc, part_max, part_sum;
  if (split) {
    const auto f32 = a.query.options().dtype(at::kFloat);
    part_acc = at::empty({batch, num_heads, partitions, D}, f32);
    part_max = at::empty({batch, num_heads, partitions}, f32);
    part_sum = at::empty({batch, num_heads, partitions}, f32);
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(batch, num_kv_heads * a.chunks, partitions);
  paged_attention_kernel<T, D, G><<<grid, kThreads, 0, stream>>>(
      a.out.data_ptr<T>(), split ? part_acc.data_ptr<float>() : nullptr, split ? part_max.data_ptr<float>() : nullptr,
      split ? part_sum.data_ptr<float>() : nullptr, a.query.data_ptr<T>(), a.key_cache.data_ptr<T>(),
      a.value_cache.data_ptr<T>(), a.block_tables.data_ptr<int>(), a.context_lens.data_ptr<int>(), a.scale_log2,
      num_heads, num_kv_heads, a.key_cache.size(1), a.query.stride(0), a.query.stride(1), a.block_tables.stride(0),
      static_cast<int>(a.max_context));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (split) {
    paged_attention_reduce_kernel<T, D><<<dim3(batch, num_heads), D, 0, stream>>>(
        a.out.data_ptr<T>(), part_acc.data_ptr<float>(), part_max.data_ptr<float>(), part_sum.data_ptr<float>(),
        a.context_lens.data_ptr<int>(), num_heads, partitions, static_cast<int>(a.max_context));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Query heads per block: the group of a kv head rounded up to a power of two, at most kMaxGroup.
template <typename T, int D>
void launch_group(const Args& a, int group_size) {
  switch (group_size) {
    case 1: return launch<T, D, 1>(a);
    case 2: return launch<T, D, 2>(a);
    case 4: return launch<T, D, 4>(a);
    default: return launch<T, D, kMaxGroup>(a);
  }
}

at::Tensor paged_attention_cuda(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  check_paged_attention(query, key_cache, value_cache, block_tables, context_lens);
  const int64_t head_dim = query.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "paged_attention on CUDA supports head_dim 64 and 128, got ",
              head_dim, " (the CPU kernel takes any head_dim)");
  const c10::cuda::CUDAGuard guard(query.device());
  Args a;
  a.query = query.stride(2) == 1 ? query : query.contiguous();
  a.key_cache = key_cache;
  a.value_cache = value_cache;
  a.block_tables = block_tables.stride(1) == 1 ? block_tables : block_tables.contiguous();
  a.context_lens = context_lens.contiguous();
  a.out = at::empty(a.query.sizes(), a.query.options());
  a.max_context = block_tables.size(1) * key_cache.size(1);
  const int64_t batch = query.size(0), num_heads = query.size(1), num_kv_heads = key_cache.size(2);
  if (batch == 0) return a.out;
  if (a.max_context == 0) return a.out.zero_();
  TORCH_CHECK(batch < (1ll << 31) && a.max_context < (1ll << 30),
              "paged_attention: shapes too large for 32-bit sequence and token indices");
  const int group = num_heads / num_kv_heads;
  int group_size = 1;
  while (group_size < group && group_size < kMaxGroup) group_size *= 2;
  a.chunks = (group + group_size - 1) / group_size;
  a.scale_log2 = static_cast<float>(scale) * kLog2e;
  dispatch_cache_dtype(a.query.scalar_type(), [&](auto t) {
    using T = decltype(t);
    if (head_dim == 64)
      launch_group<T, 64>(a, group_size);
    else
      launch_group<T, 128>(a, group_size);
  });
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastchat, CUDA, m) { m.impl("paged_attention", &paged_attention_cuda); }

}  // namespace fastchat
