"""Engine: greedy output equals naive full-recompute decoding under chunked prefill, preemption and prefix
caching; blocks are all returned; seeded sampling ignores batch composition; stop rules; tool calls; the
async streaming API. A tiny random-weight GPT on the CPU, fp32."""
import ast
import asyncio
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import fastchat_core.engine
from conftest import scripted_sampler, tiny_gpt
from fastchat_core.engine import AsyncEngine, Engine, QueueFull, SamplingParams, sample
from fastchat_core.engine.model_runner import graph_batch_sizes
from fastchat_core.tokenizer import Tokenizer

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
LENGTHS = (1, 5, 17, 40, 3, 33)
pytestmark = pytest.mark.usefixtures("one_thread")


def mqa_gpt(vocab=128, head_dim=32):
    """The engine tests' model: 2 layers, one KV head (MQA), seq_len 64."""
    return tiny_gpt(vocab, depth=2, head_dim=head_dim, n_kv_head=1)


@pytest.fixture(scope="module")
def model():
    return mqa_gpt()


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (n,), generator=gen).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def naive(model, prompts):
    """The oracle: greedy decoding by full recompute, no KV cache."""
    return {tuple(p): list(model.generate(p, GREEDY.max_tokens)) for p in prompts}


@pytest.fixture(scope="module")
def tok():
    text = "hello world, stop here please. the tool says 2+3 is 5 and sum(range(10)) is 45."
    return Tokenizer.train_from_iterator([text] * 10, vocab_size=300)


def assert_all_blocks_free(engine):
    assert engine.block_manager.num_used_blocks == 0
    assert not engine.has_unfinished() and not engine.requests


@pytest.mark.parametrize("kwargs", [
    {},
    dict(max_num_batched_tokens=8, max_num_seqs=4),       # chunked prefill: the 40-token prompt takes 5+ steps
    dict(num_blocks=15, block_size=4),                     # 60 slots for ~170 tokens in flight: preemption
    dict(num_blocks=15, block_size=4, max_num_batched_tokens=6, max_num_seqs=3),   # both at once
    dict(num_blocks=15, block_size=4, max_num_batched_tokens=6, max_num_seqs=3, overlap=False),   # synchronous
    dict(num_blocks=15, block_size=4, compile_decode=True),   # torch.compile'd decode (inductor on the CPU)
], ids=["plain", "chunked", "preempt", "chunked+preempt", "sync", "compiled"])
def test_greedy_matches_naive(model, prompts, naive, kwargs):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()   # a compile cached by another test would hide whether this engine compiles
    counters.clear()
    engine = Engine(model, **kwargs)
    results = engine.generate(prompts, GREEDY)
    assert bool(counters["stats"]["unique_graphs"]) == kwargs.get("compile_decode", False)
    for prompt, r in zip(prompts, results):
        assert r.token_ids == naive[tuple(prompt)]
        assert (r.finish_reason, r.num_prompt_tokens) == ("length", len(prompt))
    if "num_blocks" in kwargs:
        assert engine.metrics()["preemptions"] > 0
    assert_all_blocks_free(engine)


def test_weights_updated_in_place_reach_the_engine(prompts):
    """As RL does: the optimizer updates the model the engine samples from, in place, between generations.
    The engine's concatenated q/k/v copy must follow (outputs equal naive decoding of the updated model)."""
    model = mqa_gpt()
    engine = Engine(model, enable_prefix_caching=False)
    fused = [w.data_ptr() for w in engine.runner.qkv_weights]
    before = [r.token_ids for r in engine.generate(prompts, GREEDY)]
    gen = torch.Generator().manual_seed(3)
    for name in ("c_q", "c_k", "c_v"):   # each alone: a copy that skipped any one of them must fail
        with torch.no_grad():
            w = getattr(model.blocks[0].attn, name).weight
            w.add_(torch.randn(w.shape, generator=gen))
        expected = [list(model.generate(p, GREEDY.max_tokens)) for p in prompts]
        assert expected != before, name   # the update matters to the output
        assert [r.token_ids for r in engine.generate(prompts, GREEDY)] == expected, name
        before = expected
    # refreshed in place (CUDA graphs read these addresses) and equal to the model's weights
    assert [w.data_ptr() for w in engine.runner.qkv_weights] == fused
    for w, b in zip(engine.runner.qkv_weights, model.blocks):
        assert torch.equal(w, torch.cat([b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight]))
    assert_all_blocks_free(engine)


def test_prefix_cache_hits_keep_outputs_identical(model, naive):
    gen = torch.Generator().manual_seed(2)
    shared = torch.randint(0, 128, (24,), generator=gen).tolist()
    prompts = [shared + torch.randint(0, 128, (n,), generator=gen).tolist() for n in (3, 9, 1, 14)]
    expected = [list(model.generate(p, GREEDY.max_tokens)) for p in prompts]
    engine = Engine(model, block_size=4)
    first = engine.generate(prompts[:1], GREEDY)[0]
    rest = engine.generate(prompts[1:], GREEDY)
    assert first.num_cached_tokens == 0
    assert all(r.num_cached_tokens == len(shared) for r in rest)   # 24 = 6 full blocks of the shared prefix
    assert [r.token_ids for r in [first, *rest]] == expected
    # the same prompt again: everything but its last token comes from the cache
    again = engine.generate(prompts[1:2], GREEDY)[0]
    assert again.num_cached_tokens == (len(prompts[1]) - 1) // 4 * 4 and again.token_ids == expected[1]
    assert engine.metrics()["cached_tokens"] == sum(r.num_cached_tokens for r in [first, *rest, again])
    assert_all_blocks_free(engine)
    # in one batch with chunked prefill: later requests share blocks the first one wrote in earlier steps
    chunked = Engine(model, block_size=4, max_num_batched_tokens=8, max_num_seqs=8)
    results = chunked.generate(prompts, GREEDY)
    assert [r.token_ids for r in results] == expected and any(r.num_cached_tokens for r in results[1:])
    assert_all_blocks_free(chunked)


def test_identical_prompts_in_one_batch_compute_the_prompt_once(model):
    """n samples of one prompt (or RL's groups) in one batch: the first copy prefills it; the others wait a
    step, while a different prompt behind them goes ahead, then share its blocks; same outputs as without."""
    gen = torch.Generator().manual_seed(4)
    shared = torch.randint(0, 128, (30,), generator=gen).tolist()
    other = torch.randint(0, 128, (7,), generator=gen).tolist()
    prompts = [shared] * 4 + [other]
    params = [SamplingParams(max_tokens=6, temperature=1.0, seed=s) for s in range(5)]
    engine = Engine(model, block_size=4)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    engine.step()
    computed = [engine.requests[i].num_computed for i in ids]
    assert computed == [30, 0, 0, 0, 7]   # the copies held back, the other prompt admitted past them
    engine.step()
    seqs = [engine.requests[i] for i in ids[1:4]]
    assert [s.num_cached_tokens for s in seqs] == [28] * 3   # 7 full blocks before the last token
    results = {}
    while len(results) < len(ids):
        results.update({d.request_id: d.result for d in engine.step() if d.finished})
    unshared = Engine(model, block_size=4, enable_prefix_caching=False).generate(prompts, params)
    assert [results[i].token_ids for i in ids] == [r.token_ids for r in unshared]
    assert engine.metrics()["cached_tokens"] == 3 * 28
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("limit", [dict(max_num_seqs=2), dict(num_blocks=12)])
def test_a_held_back_copy_keeps_its_seat_and_blocks(model, limit):
    """Requests behind a held-back copy go ahead only with what it leaves: with 2 seats nothing passes it;
    with 12 blocks (8 for the prompt, 1 more for the copy's own last block) one short prompt of 2 does."""
    gen = torch.Generator().manual_seed(6)
    shared = torch.randint(0, 128, (30,), generator=gen).tolist()
    shorts = [torch.randint(0, 128, (7,), generator=gen).tolist() for _ in range(2)]
    engine = Engine(model, block_size=4, **limit)
    ids = [engine.add_request(p, GREEDY) for p in [shared, shared, *shorts]]
    engine.step()
    expected = [30, 0, 0, 0] if "max_num_seqs" in limit else [30, 0, 7, 0]
    assert [engine.requests[i].num_computed for i in ids] == expected
    engine.step()
    copy = engine.requests[ids[1]]
    assert copy.num_cached_tokens == 28 and copy.num_computed == 30
    while engine.has_unfinished():
        engine.step()
    assert_all_blocks_free(engine)


def test_copies_of_a_short_prompt_are_not_held_back(model):
    """Two full blocks to share (fewer than MIN_SHARED_BLOCKS): computing them again beats waiting a step."""
    prompt = list(range(10))
    engine = Engine(model, block_size=4)
    ids = [engine.add_request(prompt, GREEDY) for _ in range(3)]
    engine.step()
    assert [engine.requests[i].num_computed for i in ids] == [10] * 3


def test_reset_prefix_cache(model):
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 128, (21,), generator=gen).tolist()
    engine = Engine(model, block_size=4)
    engine.generate([prompt], GREEDY)
    assert engine.generate([prompt], GREEDY)[0].num_cached_tokens == 20
    engine.reset_prefix_cache()
    assert engine.generate([prompt], GREEDY)[0].num_cached_tokens == 0   # computed again, by today's weights
    engine.add_request(prompt, GREEDY)
    engine.step()
    with pytest.raises(RuntimeError, match="between generations"):
        engine.reset_prefix_cache()


def test_abort_mid_prefill_and_mid_generation_frees_blocks(model, prompts, naive):
    engine = Engine(model, block_size=4, max_num_batched_tokens=8, max_num_seqs=4)
    long_id = engine.add_request(prompts[3], GREEDY)          # 40 tokens: 5 steps of prefill
    engine.step()
    seq = engine.requests[long_id]
    assert 0 < seq.num_computed < len(prompts[3])
    used = engine.block_manager.num_used_blocks
    assert engine.abort(long_id)
    assert engine.block_manager.num_used_blocks == used - 10   # all 10 of its blocks, at once
    short_id = engine.add_request(prompts[1], GREEDY)
    keep_id = engine.add_request(prompts[2], GREEDY)
    seen = {short_id: [], keep_id: []}
    while len(seen[short_id]) < 3:
        for d in engine.step():
            seen[d.request_id] += d.new_token_ids
    assert engine.abort(short_id) and not engine.abort(short_id) and not engine.abort("no-such-request")
    n_short = len(seen[short_id])
    while engine.has_unfinished():
        for d in engine.step():
            seen[d.request_id] += d.new_token_ids
    assert len(seen[short_id]) == n_short                      # nothing more after the abort
    assert seen[keep_id] == naive[tuple(prompts[2])]            # and the others are undisturbed
    assert engine.metrics()["aborted"] == 2
    assert_all_blocks_free(engine)


def test_seeded_sampling_ignores_batch_composition(model, prompts):
    params = SamplingParams(max_tokens=10, temperature=1.5, top_k=40, top_p=0.95, seed=123)
    alone = Engine(model).generate([prompts[2]], params)[0].token_ids
    others = [SamplingParams(max_tokens=10, temperature=1.0, seed=s) for s in (1, 2)] + [SamplingParams(max_tokens=5)]
    batch = [prompts[0], prompts[3], prompts[2], prompts[5]]
    chunked = Engine(model, max_num_batched_tokens=16, max_num_seqs=4)
    assert chunked.generate(batch, [others[0], others[2], params, others[1]])[2].token_ids == alone
    tight = Engine(model, num_blocks=16, block_size=4)
    assert tight.generate(batch[::-1], [others[1], params, others[2], others[0]])[1].token_ids == alone
    assert tight.metrics()["preemptions"] > 0
    reseeded = Engine(model).generate([prompts[2]] * 3, [replace(params, seed=s) for s in (7, 8, 9)])
    assert any(r.token_ids != alone for r in reseeded)


def test_sampler_filters_and_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    n = 20000
    rows = logits.expand(n, -1)

    def freqs(**kw):
        toks = sample(rows, [SamplingParams(**kw)] * n, [0] * n, gen)
        return torch.bincount(toks, minlength=5).float() / n

    assert sample(logits, [SamplingParams(temperature=0)], [0], gen).tolist() == [0]
    torch.testing.assert_close(freqs(temperature=0.7), (logits[0] / 0.7).softmax(-1), atol=0.015, rtol=0)
    top2 = logits[0, :2].softmax(-1)
    torch.testing.assert_close(freqs(top_k=2)[:2], top2, atol=0.015, rtol=0)
    assert freqs(top_k=2)[2:].sum() == 0
    p = logits[0].softmax(-1)   # 0.56, 0.21, 0.13, ...: top_p 0.6 keeps the first two
    f = freqs(top_p=0.6)
    assert f[2:].sum() == 0 and abs(f[0] - top2[0]) < 0.015 and p[0] < 0.6 < p[0] + p[1]
    assert freqs(top_p=0.01)[0] == 1 and freqs(top_k=1)[0] == 1
    # filters are per row: a batch mixing top-k 2, no filter and top-k 1
    mixed = sample(rows[:3000], [SamplingParams(top_k=2), SamplingParams(), SamplingParams(top_k=1)] * 1000,
                   [0] * 3000, gen).view(1000, 3)
    assert [set(mixed[:, i].tolist()) for i in range(3)] == [{0, 1}, {0, 1, 2, 3, 4}, {0}]


def scripted(monkeypatch, scripts):
    """Replace sampling by fixed token scripts per request id (tools and stop rules still run)."""
    monkeypatch.setattr(Engine, "_sample", scripted_sampler(scripts))


def run(engine, prompt, params, request_id="r"):
    engine.add_request(prompt, params, request_id)
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
    assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])
    return deltas, deltas[-1].result


def test_stop_rules(monkeypatch, tok):
    model = mqa_gpt(tok.vocab_size)
    eos, bos = tok.encode_special("<|assistant_end|>"), tok.bos_id
    words = tok.encode("hello world, stop here please")
    utf8 = tok.encode("h\u00e9llo \U0001f389 w\u00f6rld")   # multi-byte characters split over byte tokens
    scripted(monkeypatch, {"eos": words[:2] + [eos, 7], "bos": [5, bos, 9], "ign": [5, eos, 6, 7],
                           "tok": [5, 6, 7, 8], "str": words + [eos], "len": words, "utf8": utf8 + [eos]})
    engine = Engine(model, tok)
    prompt = [bos, 11, 12]
    _, r = run(engine, prompt, SamplingParams(max_tokens=10), "eos")
    assert (r.token_ids, r.text, r.finish_reason) == (words[:2] + [eos], tok.decode(words[:2]), "stop")
    assert run(engine, prompt, SamplingParams(max_tokens=10), "bos")[1].token_ids == [5, bos]
    r = run(engine, prompt, SamplingParams(max_tokens=4, ignore_eos=True), "ign")[1]
    assert (r.token_ids, r.finish_reason) == ([5, eos, 6, 7], "length")
    assert run(engine, prompt, SamplingParams(max_tokens=9, stop_token_ids=[7]), "tok")[1].token_ids == [5, 6, 7]
    deltas, r = run(engine, prompt, SamplingParams(max_tokens=20, stop=["xyz", "stop"]), "str")
    text = tok.decode(words)
    assert r.finish_reason == "stop" and r.text == text[:text.index("stop")]
    assert "".join(d.text for d in deltas) == r.text           # streamed text never leaked the stop string
    assert "stop" in tok.decode(r.token_ids) and "stop" not in tok.decode(r.token_ids[:-1])
    deltas, r = run(engine, prompt, SamplingParams(max_tokens=3), "len")
    assert (r.token_ids, r.finish_reason, r.text) == (words[:3], "length", tok.decode(words[:3]))
    assert "".join(d.text for d in deltas) == r.text and [t for d in deltas for t in d.new_token_ids] == words[:3]
    deltas, r = run(engine, prompt, SamplingParams(max_tokens=30), "utf8")
    assert r.text == "h\u00e9llo \U0001f389 w\u00f6rld" == "".join(d.text for d in deltas)
    assert all("\ufffd" not in d.text for d in deltas) and len(utf8) > len(r.text)
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("code,output", [("2+3", "5"), ("sum(range(10))", "45")])   # calculator, then sandbox
def test_tool_call_forces_output_tokens(monkeypatch, tok, code, output):
    model = mqa_gpt(tok.vocab_size)
    sp = tok.encode_special
    call = [sp("<|python_start|>"), *tok.encode(code), sp("<|python_end|>")]
    after = tok.encode(" ok")
    scripted(monkeypatch, {"r": call + after + [sp("<|assistant_end|>")]})
    engine = Engine(model, tok, block_size=4)
    _, r = run(engine, [tok.bos_id, 3, 4], SamplingParams(max_tokens=40))
    forced = [sp("<|output_start|>"), *tok.encode(output), sp("<|output_end|>")]
    assert r.token_ids == call + forced + after + [sp("<|assistant_end|>")]
    assert f"<|python_end|><|output_start|>{output}<|output_end|>" in r.text
    # forced tokens count toward max_tokens
    scripted(monkeypatch, {"r": call})
    _, r = run(engine, [tok.bos_id, 3, 4], SamplingParams(max_tokens=len(call) + 2))
    assert (r.token_ids, r.finish_reason) == (call + forced[:2], "length")
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("code,output", [("2+3", "5"), ("sum(range(10))", "45")])   # calculator, then sandbox
def test_seeded_sampling_after_a_tool_call_is_the_same_with_and_without_overlap(monkeypatch, tok, code, output):
    """Overlap samples a row ahead for the token after <|python_end|> and drops it (tool output is pasted
    there): that dropped draw must not shift the seeded draws that follow the tool output."""
    model = mqa_gpt(tok.vocab_size)
    sp = tok.encode_special
    call = [sp("<|python_start|>"), *tok.encode(code), sp("<|python_end|>")]
    # the model "writes" the call, then the real sampler takes over
    monkeypatch.setattr(Engine, "_sample", scripted_sampler(call, then=Engine._sample))
    params = SamplingParams(max_tokens=len(call) + 20, temperature=1.0, seed=5, ignore_eos=True)

    def tokens(overlap, seed=5):
        return run(Engine(model, tok, overlap=overlap), [tok.bos_id, 3, 4], replace(params, seed=seed))[1].token_ids

    out = tokens(True)
    forced = [sp("<|output_start|>"), *tok.encode(output), sp("<|output_end|>")]
    assert out[:len(call) + len(forced)] == call + forced
    assert out == tokens(False) == tokens(True)
    assert tokens(True, seed=6) != out


def test_slow_tool_call_pauses_only_its_own_sequence(monkeypatch, tok):
    """A sandboxed call that takes a while runs beside the steps: the other request keeps decoding."""
    model = mqa_gpt(tok.vocab_size)
    sp = tok.encode_special
    call = [sp("<|python_start|>"), *tok.encode("import time; time.sleep(1.0); 6*7"), sp("<|python_end|>")]
    scripted(monkeypatch, {"tool": call + [sp("<|assistant_end|>")], "other": [5] * 80})
    engine = Engine(model, tok, block_size=4)
    engine.add_request([tok.bos_id, 3, 4], SamplingParams(max_tokens=100), "tool")
    engine.add_request([tok.bos_id, 3, 5], SamplingParams(max_tokens=80, ignore_eos=True), "other")
    order, results = [], {}
    while engine.has_unfinished():
        for d in engine.step():
            order.append(d.request_id)
            if d.finished:
                results[d.request_id] = d.result
    assert results["other"].finish_reason == "length" and len(results["other"].token_ids) == 80
    forced = [sp("<|output_start|>"), *tok.encode("42"), sp("<|output_end|>")]
    assert results["tool"].token_ids == call + forced + [sp("<|assistant_end|>")]
    # "tool" needs fewer steps than "other", so it ends last only because it paused during its 1 s call
    # while "other" kept decoding (a call run inside step() would stall both, and "tool" would end first)
    assert len(results["tool"].token_ids) < 80 and order[-1] == "tool"
    assert_all_blocks_free(engine)


def test_async_stream_matches_generate_and_aborts_on_cancel(model, prompts, naive):
    engine = Engine(model, block_size=4, max_num_seqs=2, max_num_batched_tokens=16)
    async_engine = AsyncEngine(engine, max_waiting=0)
    long = SamplingParams(max_tokens=150, temperature=0.0)   # still running when the test cancels it

    async def collect(prompt, params=GREEDY, first=None):
        tokens = []
        async for d in async_engine.stream(prompt, params):
            tokens += d.new_token_ids
            if first:
                first.set()
        return tokens

    async def main():
        outs = await asyncio.gather(*(collect(p) for p in prompts[:2]))
        assert outs == [naive[tuple(p)] for p in prompts[:2]]
        # full: 2 in flight = max_num_seqs + max_waiting
        s1, s2 = async_engine.stream(prompts[3], long), async_engine.stream(prompts[4], GREEDY)
        await s1.__anext__(), await s2.__anext__()
        with pytest.raises(QueueFull):
            await async_engine.stream(prompts[0], GREEDY).__anext__()
        await s1.aclose()                        # a client going away aborts its request
        first = asyncio.Event()
        task = asyncio.ensure_future(collect(prompts[5], long, first))
        await first.wait()
        task.cancel()                            # so does cancelling the task that reads the stream
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [t async for d in s2 for t in d.new_token_ids]   # the other request still finishes
        with pytest.raises(ValueError, match="empty prompt"):
            await async_engine.stream([], GREEDY).__anext__()
        for _ in range(200):                     # aborts reach the engine thread between steps
            if not engine.has_unfinished():
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    m = async_engine.metrics()
    async_engine.close()
    assert m["requests"] == 5 and m["finished"] == 3 and m["aborted"] == 2 and m["in_flight"] == 0
    assert len(m["ttft_s"]) == 5 and all(t > 0 for t in m["ttft_s"] + m["itl_s"])
    assert_all_blocks_free(engine)


def test_user_errors_have_clear_messages(model, tok):
    engine = Engine(model, num_blocks=8, block_size=8)   # 64 cache slots; rotary table: 4 * 64 = 256
    assert (engine.max_model_len, Engine(model).max_model_len, model.max_context) == (64, 256, 256)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match="too long for the model's context"):
        Engine(model).add_request([1] * 256, GREEDY)
    with pytest.raises(ValueError, match="lower max_tokens to at most 56"):
        Engine(model).add_request([1] * 200, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="whole KV cache"):
        engine.add_request([1] * 60, GREEDY)
    with pytest.raises(ValueError, match=r"ints in \[0, 128\)"):
        engine.add_request([1, 128], GREEDY)
    with pytest.raises(ValueError, match="create the Engine with a tokenizer"):
        engine.add_request([1], SamplingParams(max_tokens=4, stop=["x"]))
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Engine(model, max_num_seqs=16, max_num_batched_tokens=8)
    with pytest.raises(ValueError, match="one each"):
        engine.generate([[1], [2]], [GREEDY])
    with pytest.raises(ValueError, match="empty prompt"):   # all or nothing: the good prompt was not queued
        engine.generate([[1], []], GREEDY)
    assert not engine.has_unfinished()


@pytest.mark.gpu
@pytest.mark.parametrize("compile_decode", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_matches_eager_and_naive(dtype, compile_decode):
    model = mqa_gpt(head_dim=64).cuda()   # the CUDA decode kernel takes head_dim 64 and 128
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (1, 7, 40, 19, 3)]   # 5: a padded bucket
    graphed = Engine(model.to(dtype), num_blocks=20, block_size=4, max_num_seqs=40, compile_decode=compile_decode)
    assert sorted(graphed.runner.graphs) == [1, 2, 4, 8, 16, 32, 40]
    eager = Engine(model, num_blocks=20, block_size=4, max_num_seqs=40, use_cuda_graphs=False)
    a, b = graphed.generate(prompts, GREEDY), eager.generate(prompts, GREEDY)
    if dtype == torch.float32:   # bf16 rounding may flip near-ties against the fp32 oracle
        assert [r.token_ids for r in a] == [list(model.generate(p, GREEDY.max_tokens)) for p in prompts]
    assert sum(r.token_ids == s.token_ids for r, s in zip(a, b)) >= len(prompts) - 1
    assert graphed.metrics()["preemptions"] > 0   # 80 slots for 130 tokens: preempted under graphs too
    assert_all_blocks_free(graphed)


def test_generate_ending_on_a_stop_token_leaves_no_work(monkeypatch, tok):
    """The row computed ahead for a request's last token is not left behind as unfinished work."""
    eos = tok.encode_special("<|assistant_end|>")
    monkeypatch.setattr(Engine, "_sample", scripted_sampler([50, 60, eos]))
    engine = Engine(mqa_gpt(tok.vocab_size), tok)
    assert engine.generate([[tok.bos_id, 3]], SamplingParams(max_tokens=10))[0].token_ids == [50, 60, eos]
    assert not engine.has_unfinished()
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("overlap", [True, False])
def test_a_failing_step_aborts_what_is_in_flight_and_the_engine_goes_on(monkeypatch, model, prompts, naive, overlap):
    engine = Engine(model, num_blocks=15, block_size=4, overlap=overlap)
    decode, calls = engine.runner.decode, []

    def flaky(*args, **kw):   # the third decode fails, as a CUDA error would, with work pending
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return decode(*args, **kw)
    monkeypatch.setattr(engine.runner, "decode", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        engine.generate(prompts, GREEDY)
    assert engine.metrics()["aborted"] == len(prompts)
    assert_all_blocks_free(engine)
    results = engine.generate(prompts, GREEDY)   # and it serves again, exactly
    assert [r.token_ids for r in results] == [naive[tuple(p)] for p in prompts]
    assert_all_blocks_free(engine)


def test_serving_bench_drive_matches_generate_and_accounts_every_token(model, prompts, naive):
    """bench_serving times the engine step by step; that loop must give generate()'s results."""
    from fastchat_core.bench.bench_serving import drive
    engine = Engine(model, num_blocks=15, block_size=4, max_num_seqs=3)
    results, phases = drive(engine, prompts, [GREEDY] * len(prompts))
    assert [r.token_ids for r in results] == [naive[tuple(p)] for p in prompts]
    assert sum(p["tokens"] for p in phases.values()) == sum(len(r.token_ids) for r in results)
    assert "ramp" in phases and all(p["steps"] > 0 and p["seconds"] > 0 for p in phases.values())
    assert_all_blocks_free(engine)


def test_graph_buckets_keep_padding_small():
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    for m, step in ((256, 16), (1000, 64)):
        sizes = graph_batch_sizes(m)
        assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == m and sizes == sorted(set(sizes))
        assert max(b - a for a, b in zip(sizes, sizes[1:])) <= step


@pytest.mark.parametrize("softcap", [15.0, 0.0])
@pytest.mark.parametrize("compiled", [False, True])
def test_forward_paged_writes_logits_into_out(model, softcap, compiled, monkeypatch):
    """The CUDA graphs share one logits buffer through `out` (compiled too, as compile_decode captures it)."""
    from fastchat_core.attention import PagedBatch
    cfg = model.config
    monkeypatch.setattr(cfg, "softcap", softcap)
    forward = torch.compile(model.forward_paged, dynamic=True, fullgraph=True) if compiled else model.forward_paged
    caches = [(torch.zeros(8, 4, cfg.n_kv_head, cfg.head_dim), torch.zeros(8, 4, cfg.n_kv_head, cfg.head_dim))
              for _ in range(cfg.n_layer)]
    ids, pos = torch.tensor([5, 9]), torch.tensor([0, 0])
    batch = lambda: PagedBatch(False, torch.tensor([0, 4]), torch.tensor([[0], [1]], dtype=torch.int32),  # noqa: E731
                               torch.tensor([1, 1], dtype=torch.int32))
    with torch.inference_mode():
        expected = model.forward_paged(ids, pos, batch(), caches)
        out = torch.full((3, cfg.vocab_size), float("nan"))
        got = forward(ids, pos, batch(), caches, out=out[:2])
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out[:2], expected)
    assert out[2].isnan().all()


FLAG = re.compile(r"--[a-z][a-z0-9_-]*")
ENGINE = Path(fastchat_core.engine.__file__).parent


def test_every_flag_an_engine_error_names_exists(capsys):
    """Each --flag in an error the engine package raises is a flag of both commands that build engines."""
    from fastchat_core import chat_cli
    from fastchat_core.serve import get_args as serve_args
    flags = []
    for get_args in (chat_cli.get_args, serve_args):
        with pytest.raises(SystemExit):
            get_args(["--help"])
        flags.append(set(FLAG.findall(capsys.readouterr().out)))
    named = set()
    for path in ENGINE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Raise, ast.Return)):   # messages are raised, or built by a helper and returned
                texts = [t.value for t in ast.walk(node) if isinstance(t, ast.Constant) and isinstance(t.value, str)]
                named |= {(path.name, node.lineno, flag) for text in texts for flag in FLAG.findall(text)}
    assert named and not {n for n in named if not all(n[2] in f for f in flags)}


def test_the_engine_reads_the_model_only_through_its_interface():
    """The model's insides (its blocks, the rotary table, weight version counters) stay the model's: the engine
    uses config, forward_paged, max_context, qkv_parts, fuse_qkv and qkv_version."""
    inside = {"attn", "c_q", "c_k", "c_v", "mlp", "cos", "sin", "_version", "wte", "lm_head"}
    found = [f"{path.name}:{node.lineno} .{node.attr}" for path in ENGINE.glob("*.py")
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute) and node.attr in inside]
    assert not found
