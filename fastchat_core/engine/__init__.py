"""The inference engine: continuous batching over a paged KV cache, one job per file.

    sequence.py       a request's state inside the engine (tokens, progress, tool and text state)
    block_manager.py  KV-cache block ids: paged allocation, reference counts, prefix-cache hashing, LRU
    scheduler.py      which sequences run each step: decodes first, chunked prefill under a token budget,
                      preemption; copies of a prompt being prefilled wait a step to share it (n > 1)
    model_runner.py   the KV cache tensors and the model's paged forward; CUDA-graph decode
    transfer.py       host lists to the device without a sync
    sampler.py        SamplingParams and the batched sampler (seeded rows independent of the batch)
    tool_calls.py     the python tool: calculator in process, else the sandbox on a worker thread
    outputs.py        Result / Delta, stop rules, incremental detokenization and stop strings
    engine.py         Engine: the synchronous step loop and generate()
    async_engine.py   AsyncEngine: an Engine in a background thread, streaming to asyncio (the server)
    loader.py         load_engine: an Engine from a checkpoint

What the engine reads from the model is a small interface (fastchat_core/model.py, GPT): `config`,
`forward_paged` (the paged forward), `max_context` (the longest sequence it can run), `qkv_parts`,
`fuse_qkv` and `qkv_version` (the fused q/k/v weights the decode GEMM uses and when to refresh them).
The usable context of an engine is `Engine.max_model_len`: min(model.max_context, the KV cache's tokens).
"""
from fastchat_core.engine.async_engine import AsyncEngine, QueueFull
from fastchat_core.engine.engine import Engine
from fastchat_core.engine.loader import default_checkpoint, load_engine
from fastchat_core.engine.outputs import Delta, Result
from fastchat_core.engine.sampler import SamplingParams, sample

__all__ = ["AsyncEngine", "Delta", "Engine", "QueueFull", "Result", "SamplingParams", "default_checkpoint",
           "load_engine", "sample"]
