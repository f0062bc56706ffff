// Input checks shared by the CPU and CUDA implementations of the paged KV cache ops.
//
// Layout (the same for keys and values):
//   cache        (num_blocks, block_size, num_kv_heads, head_dim), contiguous
//   slot         block * block_size + offset: a token's row in the cache viewed as (slots, heads, dim)
//   block_tables (batch, max_blocks_per_seq) int32: row b lists sequence b's blocks in order
//   context_lens (batch,) int32: tokens of sequence b in the cache, the current one included
#pragma once

#include <ATen/ATen.h>

namespace fastchat {

// Calls f(T{}) with T the element type of a KV cache dtype: float, c10::Half or c10::BFloat16.
// (AT_DISPATCH_FLOATING_TYPES_AND2 would also instantiate double, which the caches never hold.)
template <typename F>
void dispatch_cache_dtype(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: TORCH_CHECK(false, "the KV cache must be float32, float16 or bfloat16, got ", dtype);
  }
}

inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& cache) {
  TORCH_CHECK(t.device() == cache.device(), name, " is on ", t.device(), " but the KV cache is on ",
              cache.device(), ": move it with .to(key_cache.device)");
}

inline void check_caches(const at::Tensor& key_cache, const at::Tensor& value_cache) {
  TORCH_CHECK(key_cache.dim() == 4, "key_cache must be (num_blocks, block_size, num_kv_heads, head_dim), got shape ",
              key_cache.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache shape ", value_cache.sizes(),
              " must equal key_cache shape ", key_cache.sizes());
  TORCH_CHECK(value_cache.scalar_type() == key_cache.scalar_type(), "value_cache dtype ", value_cache.scalar_type(),
              " must equal key_cache dtype ", key_cache.scalar_type());
  const auto dtype = key_cache.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "the KV cache must be float32, float16 or bfloat16, got ", dtype);
  check_device(value_cache, "value_cache", key_cache);
  // The ops write into the caches in place, so they cannot quietly work on a contiguous copy.
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(),
              "key_cache and value_cache must be contiguous: allocate them with "
              "torch.empty(num_blocks, block_size, num_kv_heads, head_dim)");
}

inline void check_reshape_and_cache(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                                    const at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  check_caches(key_cache, value_cache);
  TORCH_CHECK(key.dim() == 3, "key must be (num_tokens, num_kv_heads, head_dim), got shape ", key.sizes());
  TORCH_CHECK(value.sizes() == key.sizes(), "value shape ", value.sizes(), " must equal key shape ", key.sizes());
  TORCH_CHECK(key.size(1) == key_cache.size(2) && key.size(2) == key_cache.size(3), "key has ", key.size(1),
              " heads of dim ", key.size(2), " but the cache holds ", key_cache.size(2), " heads of dim ",
              key_cache.size(3));
  TORCH_CHECK(key.scalar_type() == key_cache.scalar_type() && value.scalar_type() == key_cache.scalar_type(),
              "key/value dtype (", key.scalar_type(), ", ", value.scalar_type(), ") must equal the cache dtype ",
              key_cache.scalar_type(), ": cast them with .to(key_cache.dtype)");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0), "slot_mapping must be (num_tokens,) = (",
              key.size(0), ",), got shape ", slot_mapping.sizes());
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong || slot_mapping.scalar_type() == at::kInt,
              "slot_mapping must be int64 or int32, got ", slot_mapping.scalar_type());
  check_device(key, "key", key_cache);
  check_device(value, "value", key_cache);
  check_device(slot_mapping, "slot_mapping", key_cache);
}

inline void check_paged_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens) {
  check_caches(key_cache, value_cache);
  TORCH_CHECK(query.dim() == 3, "query must be (batch, num_heads, head_dim), one token per sequence, got shape ",
              query.sizes());
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type(), "query dtype ", query.scalar_type(),
              " must equal the cache dtype ", key_cache.scalar_type());
  TORCH_CHECK(query.size(2) == key_cache.size(3), "query head_dim ", query.size(2), " != cache head_dim ",
              key_cache.size(3));
  const int64_t num_heads = query.size(1), num_kv_heads = key_cache.size(2);
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "num_heads (", num_heads,
              ") must be a multiple of num_kv_heads (", num_kv_heads, "): GQA shares each kv head among ",
              "num_heads / num_kv_heads query heads");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == query.size(0),
              "block_tables must be (batch, max_blocks_per_seq) with batch = ", query.size(0), ", got shape ",
              block_tables.sizes());
  TORCH_CHECK(block_tables.scalar_type() == at::kInt, "block_tables must be int32, got ", block_tables.scalar_type());
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == query.size(0),
              "context_lens must be (batch,) = (", query.size(0), ",), got shape ", context_lens.sizes());
  TORCH_CHECK(context_lens.scalar_type() == at::kInt, "context_lens must be int32, got ", context_lens.scalar_type());
  check_device(query, "query", key_cache);
  check_device(block_tables, "block_tables", key_cache);
  check_device(context_lens, "context_lens", key_cache);
}

inline void check_copy_blocks(const at::Tensor& key_cache, const at::Tensor& value_cache,
                              const at::Tensor& block_mapping) {
  check_caches(key_cache, value_cache);
  TORCH_CHECK(block_mapping.dim() == 2 && block_mapping.size(1) == 2,
              "block_mapping must be (num_copies, 2) rows of (src, dst) block ids, got shape ", block_mapping.sizes());
  TORCH_CHECK(block_mapping.scalar_type() == at::kLong || block_mapping.scalar_type() == at::kInt,
              "block_mapping must be int64 or int32, got ", block_mapping.scalar_type());
  check_device(block_mapping, "block_mapping", key_cache);
}

}  // namespace fastchat
