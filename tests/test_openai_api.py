"""The OpenAI API through the official `openai` client against a real server (uvicorn on 127.0.0.1, a tiny random
GPT): model names (aliases, 404 model_not_found, GET /v1/models/{id}), logprobs streamed and not, echo with the
prompt's logprobs (max_tokens 0: prompt scoring, as lm-evaluation-harness's loglikelihood tasks send it, checked
against the model's own forward), batch prompts, penalties / logit_bias / min_tokens, and the fields refused."""
import math

import openai
import pytest
import torch

from conftest import serve_in_thread
from fastchat_core.checkpoint import load_model
from fastchat_core.engine import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["sft-d1", "tiny", "alias"]


@pytest.fixture(scope="module")
def server(checkpoint):
    with serve_in_thread(checkpoint, "--model-name", "sft-d1,tiny", "--model-name", "alias") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)[0].eval()


def reference_logprobs(model, ids) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, from the model's plain forward (softcapped logits)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    return logits[:-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_model_names(client, server):
    assert [m.id for m in client.models.list().data] == NAMES
    assert client.models.retrieve("alias").id == "alias"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert out.model == "tiny"
    for call in (lambda: client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]),
                 lambda: client.completions.create(model="gpt-4o", prompt="hi")):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["code"] == "model_not_found" and "sft-d1" in e.value.body["message"]


def test_chat_logprobs_match_the_engine_and_stream(client, server, reference):
    engine, tok = reference
    messages = [{"role": "user", "content": "Tell me a story."}]
    kw = dict(model="sft-d1", messages=messages, max_tokens=8, temperature=0.9, seed=5)
    out = client.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
    want = engine.generate([tok.render_for_completion(messages)],
                           SamplingParams(max_tokens=8, temperature=0.9, seed=5, logprobs=3))[0]
    plain = client.chat.completions.create(**kw)   # asking for logprobs changes no token
    assert out.choices[0].message.content == plain.choices[0].message.content == want.text
    content = out.choices[0].logprobs.content
    assert len(content) == len(want.token_ids)
    for entry, t, (lp, top) in zip(content, want.token_ids, want.logprobs):
        assert bytes(entry.bytes) == tok.token_to_bytes(t) and entry.logprob == pytest.approx(lp, abs=1e-5)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.logprob - 1e-6
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx([v for _, v in top], abs=1e-5)
    streamed = [c for chunk in client.chat.completions.create(**kw, logprobs=True, top_logprobs=3, stream=True)
                for ch in chunk.choices if ch.logprobs for c in ch.logprobs.content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-5)


def test_logprobs_are_the_models_raw_distribution(client, model, reference):
    """Each output token's logprob equals the model forward's over prompt + output so far, whatever the
    temperature (logprobs are reported before temperature and penalties)."""
    engine, tok = reference
    prompt = tok.encode("The sky is", prepend=tok.bos_id)
    for temperature in (0, 1.5):
        out = client.completions.create(model="sft-d1", prompt="The sky is", max_tokens=6, temperature=temperature,
                                        seed=1, logprobs=2).choices[0]
        ids = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=temperature, seed=1))[0].token_ids
        ref = reference_logprobs(model, prompt + ids)[len(prompt) - 1:]
        assert out.logprobs.token_logprobs == pytest.approx(ref.tolist(), abs=1e-4)
        assert out.logprobs.tokens == [tok.decode([t]) for t in ids]
        assert all(len(top) <= 3 for top in out.logprobs.top_logprobs)   # the 2 best and the chosen one
        if temperature == 0:   # greedy: the chosen token is the best
            for lp, top in zip(out.logprobs.token_logprobs, out.logprobs.top_logprobs):
                assert lp == pytest.approx(max(top.values()))


def test_loglikelihood_task_through_echo(client, model, reference):
    """lm-evaluation-harness's local-completions loglikelihood request: echo, logprobs=1, max_tokens=0, a batch
    of token-id prompts (context + continuation); the continuation's summed logprob and is_greedy must equal
    what the model's own forward says, and the right answer of a tiny multiple-choice item is the model's."""
    _, tok = reference
    context = tok.encode("Question: what colour is the sky? Answer:", prepend=tok.bos_id)
    choices = [tok.encode(" blue"), tok.encode(" green"), tok.encode(" a very long answer about the sea")]
    prompts = [context + c for c in choices]
    for max_tokens in (0, 1):   # lm-eval sends 0 (older) or 1 and drops the generated token
        out = client.completions.create(model="sft-d1", prompt=prompts, echo=True, logprobs=1, max_tokens=max_tokens,
                                        temperature=0)
        assert len(out.choices) == 3 and out.usage.prompt_tokens == sum(map(len, prompts))
        scores = []
        for choice, ids, cont in zip(out.choices, prompts, choices):
            lps = choice.logprobs.token_logprobs
            assert len(lps) == len(ids) + max_tokens and lps[0] is None   # token ids: the first is not predicted
            assert choice.text.startswith(tok.decode(ids))
            ref = reference_logprobs(model, ids)
            assert lps[1:len(ids)] == pytest.approx(ref.tolist(), abs=1e-4)
            ctx = len(context)
            got = sum(lps[ctx:len(ids)])
            assert got == pytest.approx(ref[ctx - 1:].sum().item(), abs=1e-3)
            greedy = all(lp == max(top.values()) for lp, top in
                         zip(lps[ctx:len(ids)], choice.logprobs.top_logprobs[ctx:len(ids)]))
            with torch.no_grad():
                best = model(torch.tensor([ids]))[0][ctx - 1:-1].argmax(-1)
            assert greedy == bool((best == torch.tensor(cont)).all())
            scores.append(got)
        assert max(range(3), key=scores.__getitem__) == max(range(3), key=lambda i: reference_logprobs(
            model, prompts[i])[len(context) - 1:].sum().item())
    # a text prompt: the server's <|bos|> is not echoed, every echoed token has its logprob
    out = client.completions.create(model="sft-d1", prompt="Hello there", echo=True, logprobs=0, max_tokens=0)
    choice = out.choices[0]
    assert choice.text == "Hello there" and None not in choice.logprobs.token_logprobs
    ref = reference_logprobs(model, tok.encode("Hello there", prepend=tok.bos_id))
    assert choice.logprobs.token_logprobs == pytest.approx(ref.tolist(), abs=1e-4)
    assert choice.logprobs.text_offset[0] == 0 and choice.finish_reason == "length"
    # streamed: the prompt's text and logprobs come first
    chunks = list(client.completions.create(model="sft-d1", prompt="Hello there", echo=True, logprobs=0,
                                            max_tokens=3, temperature=0, stream=True))
    lps = [lp for c in chunks for ch in c.choices if ch.logprobs for lp in ch.logprobs.token_logprobs]
    assert lps[:len(ref)] == pytest.approx(ref.tolist(), abs=1e-4) and len(lps) == len(ref) + 3
    assert "".join(ch.text for c in chunks for ch in c.choices).startswith("Hello there")


def test_batch_prompts_equal_single_requests(client):
    prompts = ["Once upon a time", "The capital of France", "1 2 3"]
    batch = client.completions.create(model="sft-d1", prompt=prompts, max_tokens=5, temperature=0.8, seed=3, n=2)
    assert [c.index for c in batch.choices] == list(range(6))
    for i, p in enumerate(prompts):
        one = client.completions.create(model="sft-d1", prompt=p, max_tokens=5, temperature=0.8, seed=3, n=2)
        assert [c.text for c in batch.choices[2 * i:2 * i + 2]] == [c.text for c in one.choices]


def test_penalties_bias_and_min_tokens(client, reference):
    engine, tok = reference
    messages = [{"role": "user", "content": "Repeat after me: la la la la"}]
    prompt = tok.render_for_completion(messages)
    kw = dict(model="sft-d1", messages=messages, max_tokens=12, temperature=0)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    # a huge bias forces one token everywhere
    forced = tok.encode("la")[0]
    out = client.chat.completions.create(**kw, logit_bias={str(forced): 100}, logprobs=True)
    assert [bytes(c.bytes) for c in out.choices[0].logprobs.content] == [tok.token_to_bytes(forced)] * 12
    # ... and a frequency penalty then spreads it out: as the engine does it, and differently from plain greedy
    p = SamplingParams(max_tokens=12, temperature=0, frequency_penalty=2.0, presence_penalty=1.0)
    want = engine.generate([prompt], p)[0]
    out = client.chat.completions.create(**kw, frequency_penalty=2.0, presence_penalty=1.0)
    assert out.choices[0].message.content == want.text
    assert len(set(want.token_ids)) == len(want.token_ids) or want.text != plain
    # min_tokens: with the end token boosted the answer ends at once, unless min_tokens holds it off
    end = tok.encode_special("<|assistant_end|>")
    short = client.chat.completions.create(**kw, logit_bias={str(end): 100})
    assert short.usage.completion_tokens == 1 and short.choices[0].finish_reason == "stop"
    held = client.chat.completions.create(**kw, logit_bias={str(end): 100}, extra_body={"min_tokens": 4})
    assert held.usage.completion_tokens == 5 and held.choices[0].finish_reason == "stop"


def test_penalties_in_the_sampler_leave_other_rows_alone():
    """Batched: a penalized row changes, the others' logits are the same tensor values (same seeded tokens)."""
    from fastchat_core.engine.sampler import penalize, sample
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0.7, seed=1), SamplingParams(frequency_penalty=1.5, presence_penalty=0.5),
              SamplingParams(logit_bias={7: 5.0}, min_tokens=2, stop_token_ids=[3])]
    history = torch.tensor([[4, 4, 9, -1]])
    out = penalize(logits, params, [0, 3, 1], history, end_ids={2})
    assert torch.equal(out[0], logits[0])
    want = logits[1].clone()
    want[4] -= 2 * 1.5 + 0.5
    want[9] -= 1.5 + 0.5
    assert torch.allclose(out[1], want)
    assert out[2, 7] == logits[2, 7] + 5 and out[2, 2] == out[2, 3] == float("-inf")
    assert penalize(logits, params[:1], [0]) is logits   # nothing asked: no copy, no work
    g = torch.Generator()
    assert sample(out[:1], params[:1], [0], g).item() == sample(logits[:1], params[:1], [0], g).item()


def test_unsupported_fields_are_refused(client):
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    for kw in (dict(tools=tools), dict(tool_choice="required"), dict(response_format={"type": "json_object"})):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="sft-d1", messages=messages, max_tokens=2, **kw)
        assert "not supported" in e.value.body["message"]
    out = client.chat.completions.create(model="sft-d1", messages=messages, max_tokens=2,
                                         response_format={"type": "text"}, tool_choice="none")
    assert out.choices[0].message.content is not None and math.isfinite(out.usage.total_tokens)


def test_sampling_params_refuse_non_finite_adjustments():
    for bad in (dict(presence_penalty=float("nan")), dict(frequency_penalty=float("inf")),
                dict(logit_bias={3: float("nan")}), dict(logit_bias={3: -float("inf")})):
        with pytest.raises(ValueError, match="finite number"):
            SamplingParams(**bad)
    SamplingParams(presence_penalty=-2.0, logit_bias={3: -100.0})
