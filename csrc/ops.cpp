// fastchat_core._C: the schemas of the paged KV cache ops. The kernels register themselves per device:
// cache_cpu.cpp and attention_cpu.cpp (always built), cache_cuda.cu and attention_cuda.cu (CUDA builds).
// Python sees them as torch.ops.fastchat.*; fastchat_core/csrc_ops.py adds the fake (meta) implementations
// that torch.compile needs and thin Python wrappers.
#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(fastchat, m) {
  // Tell torch where the fake implementations live, so it can import them on demand.
  m.set_python_module("fastchat_core.csrc_ops");
  // Write each token's key/value rows into its cache slot; slot -1 skips the token (e.g. padding).
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping) -> ()");
  // Decode attention: one query token per sequence over its paged context. The CUDA kernel decides how many
  // thread blocks split each context from the shapes alone and reads the partition lengths off the real
  // contexts on the device, so it never syncs with the device and can be captured in a CUDA graph.
  m.def(
      "paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor context_lens, float scale) -> Tensor");
  // Copy whole blocks (src -> dst) in both caches: copy-on-write of a shared prefix block.
  m.def("copy_blocks(Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor block_mapping) -> ()");
}

// Importing fastchat_core._C loads this library, which runs the registrations; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastchat paged KV cache ops (torch.ops.fastchat)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
