// reshape_and_cache and copy_blocks on CPU: row and block copies. Indices are validated before anything is
// written, so a bad slot or block id raises instead of corrupting the cache.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "paged_kv.h"

namespace fastchat {
namespace {

template <typename Index>
void reshape_and_cache_impl(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                            at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  const int64_t num_tokens = key.size(0), num_heads = key.size(1), head_dim = key.size(2);
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const Index* slots = slot_mapping.data_ptr<Index>();
  for (int64_t n = 0; n < num_tokens; ++n) {
    TORCH_CHECK(slots[n] >= -1 && slots[n] < num_slots, "slot_mapping[", n, "] = ", slots[n],
                " is out of range: a slot is block * block_size + offset in [0, ", num_slots, "), or -1 to skip");
  }
  const int64_t row_bytes = head_dim * key.element_size();
  const auto* k = static_cast<const char*>(key.data_ptr());
  const auto* v = static_cast<const char*>(value.data_ptr());
  auto* kc = static_cast<char*>(key_cache.data_ptr());
  auto* vc = static_cast<char*>(value_cache.data_ptr());
  const int64_t es = key.element_size();
  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (slots[n] < 0) continue;
      for (int64_t h = 0; h < num_heads; ++h) {
        const int64_t dst = ((int64_t)slots[n] * num_heads + h) * row_bytes;
        std::memcpy(kc + dst, k + (n * key.stride(0) + h * key.stride(1)) * es, row_bytes);
        std::memcpy(vc + dst, v + (n * value.stride(0) + h * value.stride(1)) * es, row_bytes);
      }
    }
  });
}

void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                           at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping);
  // Rows are copied whole, so only the head_dim axis must be dense (key/value are often views of a fused qkv).
  const at::Tensor k = key.stride(2) == 1 ? key : key.contiguous();
  const at::Tensor v = value.stride(2) == 1 ? value : value.contiguous();
  const at::Tensor slots = slot_mapping.contiguous();
  AT_DISPATCH_INDEX_TYPES(slots.scalar_type(), "reshape_and_cache_cpu",
                          [&] { reshape_and_cache_impl<index_t>(k, v, key_cache, value_cache, slots); });
}

void copy_blocks_cpu(at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& block_mapping) {
  check_copy_blocks(key_cache, value_cache, block_mapping);
  const at::Tensor mapping = block_mapping.to(at::kLong).contiguous();
  const int64_t num_copies = mapping.size(0), num_blocks = key_cache.size(0);
  const int64_t* ids = mapping.data_ptr<int64_t>();
  // Copies run in parallel (on CUDA too), so a destination must not also be read or written by another copy.
  std::vector<uint8_t> role(num_blocks, 0);  // 1: source, 2: destination
  for (int64_t i = 0; i < num_copies; ++i) {
    const int64_t src = ids[2 * i], dst = ids[2 * i + 1];
    TORCH_CHECK(src >= 0 && src < num_blocks && dst >= 0 && dst < num_blocks, "block_mapping[", i, "] = (", src,
                ", ", dst, ") is out of range: block ids are in [0, ", num_blocks, ")");
    role[src] = 1;
  }
  for (int64_t i = 0; i < num_copies; ++i) {
    const int64_t dst = ids[2 * i + 1];
    TORCH_CHECK(role[dst] == 0, "block ", dst, " is a destination in block_mapping but also ",
                role[dst] == 1 ? "a source" : "another destination", ": copy into fresh, distinct blocks only");
    role[dst] = 2;
  }
  const int64_t block_bytes = key_cache.stride(0) * key_cache.element_size();
  auto* kc = static_cast<char*>(key_cache.data_ptr());
  auto* vc = static_cast<char*>(value_cache.data_ptr());
  at::parallel_for(0, num_copies, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t src = ids[2 * i] * block_bytes, dst = ids[2 * i + 1] * block_bytes;
      std::memcpy(kc + dst, kc + src, block_bytes);
      std::memcpy(vc + dst, vc + src, block_bytes);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastchat, CPU, m) {
  m.impl("reshape_and_cache", &reshape_and_cache_cpu);
  m.impl("copy_blocks", &copy_blocks_cpu);
}

}  // namespace fastchat
