// paged_attention on CPU: for each (sequence, kv head), read every cached K/V row once, share it among the
// query heads of that kv head (GQA), and run a plain fp32 softmax. Clear rather than fast: the CUDA kernel is
// the fast path; this one serves CPU-only users and is the reference the CUDA tests compare against.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "paged_kv.h"

namespace fastchat {
namespace {

// Every block a sequence reads must exist, and no context may outrun its row of the block table.
void check_tables(const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                  int64_t num_blocks) {
  const int64_t batch = block_tables.size(0), width = block_tables.size(1);
  const int* table = block_tables.data_ptr<int>();
  const int* lens = context_lens.data_ptr<int>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] <= width * block_size, "context_lens[", b, "] = ", lens[b],
                " does not fit its block table row of ", width, " blocks x ", block_size, " tokens");
    for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i) {
      const int id = table[b * width + i];
      TORCH_CHECK(id >= 0 && id < num_blocks, "block_tables[", b, ", ", i, "] = ", id,
                  " is not a block of the cache (num_blocks = ", num_blocks, ")");
    }
  }
}

template <typename T>
void paged_attention_impl(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                          const at::Tensor& value_cache, const at::Tensor& block_tables,
                          const at::Tensor& context_lens, float scale) {
  const int64_t batch = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = key_cache.size(1), num_kv_heads = key_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, width = block_tables.size(1);
  const T* q = query.data_ptr<T>();
  const T* kc = key_cache.data_ptr<T>();
  const T* vc = value_cache.data_ptr<T>();
  const int* table = block_tables.data_ptr<int>();
  const int* lens = context_lens.data_ptr<int>();
  T* o = out.data_ptr<T>();

  at::parallel_for(0, batch * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * head_dim), acc(group * head_dim), row(head_dim), probs;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / num_kv_heads, kvh = i % num_kv_heads, len = lens[b];
      const int64_t h0 = kvh * group;  // first query head of this kv head
      // Row of token t of this kv head, in the cache viewed as (slots, num_kv_heads, head_dim).
      auto cache_row = [&](const T* cache, int64_t t) {
        const int64_t slot = (int64_t)table[b * width + t / block_size] * block_size + t % block_size;
        return cache + (slot * num_kv_heads + kvh) * head_dim;
      };
      const T* qb = q + (b * num_heads + h0) * head_dim;  // the group's query heads are adjacent
      for (int64_t j = 0; j < group * head_dim; ++j) qf[j] = static_cast<float>(qb[j]) * scale;

      // Scores, laid out (group, len): each K row is converted to fp32 once and used by every query head.
      probs.assign(group * len, 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const T* k = cache_row(kc, t);
        for (int64_t d = 0; d < head_dim; ++d) row[d] = static_cast<float>(k[d]);
        for (int64_t g = 0; g < group; ++g) {
          float s = 0.f;
          for (int64_t d = 0; d < head_dim; ++d) s += qf[g * head_dim + d] * row[d];
          probs[g * len + t] = s;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* p = probs.data() + g * len;
        const float mx = len ? *std::max_element(p, p + len) : 0.f;
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) sum += (p[t] = std::exp(p[t] - mx));
        for (int64_t t = 0; t < len; ++t) p[t] /= sum;
      }

      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const T* v = cache_row(vc, t);
        for (int64_t d = 0; d < head_dim; ++d) row[d] = static_cast<float>(v[d]);
        for (int64_t g = 0; g < group; ++g) {
          const float p = probs[g * len + t];
          for (int64_t d = 0; d < head_dim; ++d) acc[g * head_dim + d] += p * row[d];
        }
      }
      // An empty context (a padded batch slot) attends to nothing: its output is zeros.
      T* ob = o + (b * num_heads + h0) * head_dim;
      for (int64_t j = 0; j < group * head_dim; ++j) ob[j] = static_cast<T>(acc[j]);
    }
  });
}

at::Tensor paged_attention_cpu(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                               const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  check_paged_attention(query, key_cache, value_cache, block_tables, context_lens);
  const at::Tensor q = query.contiguous();
  const at::Tensor tables = block_tables.contiguous();
  const at::Tensor lens = context_lens.contiguous();
  check_tables(tables, lens, key_cache.size(1), key_cache.size(0));
  at::Tensor out = at::empty(q.sizes(), q.options());
  dispatch_cache_dtype(q.scalar_type(), [&](auto t) {
    paged_attention_impl<decltype(t)>(out, q, key_cache, value_cache, tables, lens, static_cast<float>(scale));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastchat, CPU, m) { m.impl("paged_attention", &paged_attention_cpu); }

}  // namespace fastchat
