// reshape_and_cache and copy_blocks on CUDA: pure data movement, so the only goal is wide memory accesses.
// Each thread moves a Unit: 16 bytes (uint4: 8 bf16/fp16 or 4 fp32) when every address involved is 16-byte
// aligned, else one element (views with odd strides still work, slower).
// Out-of-range slots and block ids are skipped, not reported: checking would need a device sync. The CPU
// kernels raise on them, which is where to debug an index bug.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "paged_kv.h"

namespace fastchat {
namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// One thread block per token: copy its num_heads rows of key and value into its slot.
template <typename T, typename Unit, typename Index>
__global__ void reshape_and_cache_kernel(const T* __restrict__ key, const T* __restrict__ value,
                                         T* __restrict__ key_cache, T* __restrict__ value_cache,
                                         const Index* __restrict__ slot_mapping, int64_t num_slots,
                                         int64_t key_stride, int64_t key_head_stride, int64_t value_stride,
                                         int64_t value_head_stride, int num_heads, int head_dim) {
  constexpr int kElems = sizeof(Unit) / sizeof(T);
  const int64_t n = blockIdx.x;
  const int64_t slot = slot_mapping[n];
  if (slot < 0 || slot >= num_slots) return;  // -1: padding or a token that needs no cache entry
  const int units_per_head = head_dim / kElems;
  const int64_t dst_base = slot * num_heads * head_dim;  // the slot's heads are adjacent rows of head_dim
  for (int i = threadIdx.x; i < num_heads * units_per_head; i += blockDim.x) {
    const int h = i / units_per_head, e = (i % units_per_head) * kElems;
    const int64_t dst = dst_base + (int64_t)i * kElems;
    *reinterpret_cast<Unit*>(key_cache + dst) =
        *reinterpret_cast<const Unit*>(key + n * key_stride + h * key_head_stride + e);
    *reinterpret_cast<Unit*>(value_cache + dst) =
        *reinterpret_cast<const Unit*>(value + n * value_stride + h * value_head_stride + e);
  }
}

template <typename T, typename Unit, typename Index>
void launch_reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                              at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  const int num_heads = key.size(1), head_dim = key.size(2);
  const int units = num_heads * head_dim / (sizeof(Unit) / sizeof(T));
  const int threads = std::min(512, (units + 31) / 32 * 32);
  reshape_and_cache_kernel<T, Unit, Index><<<key.size(0), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      key.data_ptr<T>(), value.data_ptr<T>(), key_cache.data_ptr<T>(), value_cache.data_ptr<T>(),
      slot_mapping.data_ptr<Index>(), key_cache.size(0) * key_cache.size(1), key.stride(0), key.stride(1),
      value.stride(0), value.stride(1), num_heads, head_dim);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void reshape_and_cache_cuda(const at::Tensor& key_in, const at::Tensor& value_in, at::Tensor& key_cache,
                            at::Tensor& value_cache, const at::Tensor& slot_mapping_in) {
  check_reshape_and_cache(key_in, value_in, key_cache, value_cache, slot_mapping_in);
  if (key_in.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(key_cache.device());
  // Rows are copied whole, so only the head_dim axis must be dense (key/value are often views of a fused qkv).
  const at::Tensor key = key_in.stride(2) == 1 ? key_in : key_in.contiguous();
  const at::Tensor value = value_in.stride(2) == 1 ? value_in : value_in.contiguous();
  const at::Tensor slot_mapping = slot_mapping_in.contiguous();
  const int64_t es = key.element_size();
  const bool vectorized = (key.size(2) * es) % 16 == 0 && (key.stride(0) * es) % 16 == 0 &&
                          (key.stride(1) * es) % 16 == 0 && (value.stride(0) * es) % 16 == 0 &&
                          (value.stride(1) * es) % 16 == 0 && aligned16(key.data_ptr()) &&
                          aligned16(value.data_ptr()) && aligned16(key_cache.data_ptr()) &&
                          aligned16(value_cache.data_ptr());
  dispatch_cache_dtype(key.scalar_type(), [&](auto t) {
    using T = decltype(t);
    AT_DISPATCH_INDEX_TYPES(slot_mapping.scalar_type(), "reshape_and_cache_cuda", [&] {
      if (vectorized)
        launch_reshape_and_cache<T, uint4, index_t>(key, value, key_cache, value_cache, slot_mapping);
      else
        launch_reshape_and_cache<T, T, index_t>(key, value, key_cache, value_cache, slot_mapping);
    });
  });
}

// One thread block per (copy, cache): blockIdx.y picks the key or the value cache.
template <typename Unit>
__global__ void copy_blocks_kernel(char* __restrict__ key_cache, char* __restrict__ value_cache,
                                   const int64_t* __restrict__ block_mapping, int64_t num_blocks,
                                   int64_t block_bytes) {
  const int64_t src = block_mapping[2 * blockIdx.x], dst = block_mapping[2 * blockIdx.x + 1];
  if (src < 0 || src >= num_blocks || dst < 0 || dst >= num_blocks) return;
  char* cache = blockIdx.y == 0 ? key_cache : value_cache;
  const Unit* from = reinterpret_cast<const Unit*>(cache + src * block_bytes);
  Unit* to = reinterpret_cast<Unit*>(cache + dst * block_bytes);
  for (int64_t i = threadIdx.x; i < block_bytes / (int64_t)sizeof(Unit); i += blockDim.x) to[i] = from[i];
}

void copy_blocks_cuda(at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& block_mapping_in) {
  check_copy_blocks(key_cache, value_cache, block_mapping_in);
  const int64_t num_copies = block_mapping_in.size(0);
  if (num_copies == 0) return;
  const c10::cuda::CUDAGuard guard(key_cache.device());
  const at::Tensor mapping = block_mapping_in.to(at::kLong).contiguous();
  const int64_t block_bytes = key_cache.stride(0) * key_cache.element_size();
  char* kc = static_cast<char*>(key_cache.data_ptr());
  char* vc = static_cast<char*>(value_cache.data_ptr());
  const dim3 grid(num_copies, 2);
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (block_bytes % 16 == 0 && aligned16(kc) && aligned16(vc))
    copy_blocks_kernel<uint4><<<grid, 256, 0, stream>>>(kc, vc, mapping.data_ptr<int64_t>(), key_cache.size(0),
                                                        block_bytes);
  else
    copy_blocks_kernel<char><<<grid, 256, 0, stream>>>(kc, vc, mapping.data_ptr<int64_t>(), key_cache.size(0),
                                                       block_bytes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastchat, CUDA, m) {
  m.impl("reshape_and_cache", &reshape_and_cache_cuda);
  m.impl("copy_blocks", &copy_blocks_cuda);
}

}  // namespace fastchat
