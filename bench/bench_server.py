"""Online serving benchmark: the real HTTP server under Poisson load, with the offline engine beside it.

    python -m fastchat_core.bench.bench_server --out bench/results/server.json            # d20, CUDA
    python -m fastchat_core.bench.bench_server --device cpu --depth 1 --num-requests 8 \\
        --rates 2,inf --max-len 64 --out /tmp/server.json                                  # CPU smoke test

The server is `fastchat serve` itself, started as a child process on 127.0.0.1 (so the load generator never
competes with it for the GIL), over --checkpoint DIR or, by default, a d20-shaped model with random bf16
weights (bench_serving.build_model) saved to a temporary checkpoint with a synthetic tokenizer of the
model's 65,536-token vocabulary (every " " + lowercase n-gram up to the vocabulary's size; no training).

Workload (fixed seed): --num-requests requests with ShareGPT-like lengths: input and output lognormal with
median 200 tokens and sigma 0.8, capped at 1024 (every length scales with --max-len / 1024). Prompts are
random words that encode to one token each, so a prompt is exactly its sampled length (bos included), and
each pass (warm-up, every rate, the offline run) gets fresh words: no prefix-cache hits across passes.
Every request is POST /v1/completions with stream=true, ignore_eos=true, temperature 0 and max_tokens =
its output length, so every request generates exactly that many tokens.

For each rate (requests/s, Poisson arrivals; inf = all at once; the default 4,8,..,64,inf keeps the arrivals
to about two minutes at 200 requests per rate) the client (asyncio streams, standard library only) records the
time to the first streamed token (TTFT, from sending the request), the gaps between streamed chunks (inter-token
latency, ITL), and the end-to-end latency; it reports request and output-token throughput (first send to
last response), TTFT / ITL / TPOT / latency p50 and p99, errors and preemptions. Then, with the server
stopped, the same model runs the same workload offline in this process (bench_serving.run_engine: one
engine.generate call over all requests, tokenizer attached as in the server), and
http_overhead = 1 - (output tok/s over HTTP at the highest rate) / (offline output tok/s).
"""
import argparse
import asyncio
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from contextlib import aclosing, contextmanager
from pathlib import Path

import numpy as np
import torch

from fastchat_core.common import git_commit
from fastchat_core.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer


MEDIAN, SIGMA, CAP = 200, 0.8, 1024   # ShareGPT-like token lengths at --max-len 1024


# ---- workload ---------------------------------------------------------------------------------------------

def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """A fastchat byte-level BPE of exactly vocab_size ids without training: the specials, the 256 bytes, then
    " a".." z", " aa".." zz", ... (each merge extends a word by one letter) until the vocabulary is full."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    if vocab_size < len(vocab) + 26:
        raise SystemExit(f"vocab_size {vocab_size} is too small for a synthetic tokenizer (at least {len(vocab) + 26})")
    merges, words = [], ["\u0120"]   # the byte-level character of " "
    while len(vocab) < vocab_size:
        longer = []
        for w in words:
            for c in string.ascii_lowercase:
                if len(vocab) == vocab_size:
                    break
                vocab[w + c] = len(vocab)
                merges.append((w, c))
                longer.append(w + c)
        words = longer
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(hf)


def length_mix(n: int, max_len: int, seed: int) -> list[tuple[int, int]]:
    """(input tokens with bos, output tokens) per request: lognormal, median 200 and cap 1024 at max_len 1024."""
    rng = random.Random(seed)
    scale = max_len / CAP
    mu = math.log(MEDIAN * scale)

    def draw(lo):
        return max(lo, min(max_len, round(rng.lognormvariate(mu, SIGMA))))

    return [(draw(2), draw(1)) for _ in range(n)]


def prompt_words(tok: Tokenizer) -> list[str]:
    """Words (" abc") that are one token each, alone and after one another: a prompt of k of them is k tokens."""
    texts = [tok.decode([i]) for i in range(tok.vocab_size)]
    words = [t for t in texts if re.fullmatch(r" [a-z]{2,}", t)]
    words = [w for w, ids in zip(words, tok.encode(words)) if len(ids) == 1]
    if len(words) < 100:
        raise SystemExit(f"the tokenizer has only {len(words)} one-token lowercase words: too few for random "
                         "prompts (use the synthetic tokenizer: leave out --tokenizer)")
    return words


def make_prompts(lengths, words, tok: Tokenizer, seed: int) -> list[tuple[str, list[int]]]:
    """(text, the ids the server encodes it to) per request: n_in - 1 random words after bos."""
    rng = random.Random(seed)
    texts = ["".join(rng.choices(words, k=n_in - 1)) for n_in, _ in lengths]
    return [(t, [tok.bos_id] + ids) for t, ids in zip(texts, tok.encode(texts))]


# ---- model and server -------------------------------------------------------------------------------------

def prepare_checkpoint(args, workdir: Path) -> tuple[Path, Path]:
    """(checkpoint folder, tokenizer.json): --checkpoint as given, else a random-weight model saved under workdir."""
    from fastchat_core.checkpoint import load_meta, resolve_checkpoint, save_checkpoint
    from fastchat_core.config import ModelConfig
    if args.checkpoint:
        ckpt = resolve_checkpoint(args.checkpoint)
        tok_path = args.tokenizer or load_meta(ckpt).get("args", {}).get("tokenizer")
        if not tok_path:
            raise SystemExit(f"{ckpt} names no tokenizer: pass --tokenizer PATH")
        return ckpt, Path(tok_path)
    if args.tokenizer:
        tok_path = Path(args.tokenizer)
        vocab = Tokenizer.load(tok_path).vocab_size
    else:
        vocab = ModelConfig().vocab_size
        tok_path = workdir / "tokenizer.json"
        synthetic_tokenizer(vocab).save(tok_path)
    if args.device == "cuda" and vocab == ModelConfig().vocab_size:
        from fastchat_core.bench.bench_serving import build_model   # the offline benchmark's model exactly
        model, cfg = build_model(args.depth, args.n_kv_head)
    else:
        from fastchat_core.model import GPT
        cfg = ModelConfig(depth=args.depth, n_kv_head=args.n_kv_head, vocab_size=vocab)
        torch.manual_seed(0)
        with torch.device(args.device):
            model = GPT(cfg).init_weights(0)
        with torch.no_grad():   # random weights everywhere, as bench_serving.build_model
            for p in model.parameters():
                p.normal_(0, p.size(-1) ** -0.5)
        if args.device == "cuda":
            model = model.to(torch.bfloat16)
    meta = {"model_config": cfg.to_dict(), "args": {"tokenizer": str(tok_path)}, "random_weights": True}
    ckpt = save_checkpoint(workdir / "bench" / f"d{args.depth}", 0, model, [], {}, meta)
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return ckpt, tok_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(args, ckpt: Path, tok_path: Path, max_queue: int, log_path: Path):
    """`python -m fastchat_core.serve` on a free port of 127.0.0.1; yields its base URL, stops it at the end."""
    port = free_port()
    cmd = [sys.executable, "-m", "fastchat_core.serve", "--checkpoint", str(ckpt), "--tokenizer", str(tok_path),
           "--device", args.device, "--port", str(port), "--max-num-seqs", str(args.max_num_seqs),
           "--max-queue", str(max_queue), "--model-name", "bench", "--drain-timeout", "5"]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    env = dict(os.environ)
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(args.cpu_threads)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + args.server_timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with code {proc.returncode} before it was ready:\n"
                                 + _tail(log_path))
            if time.time() > deadline:
                raise SystemExit(f"the server was not ready after {args.server_timeout:.0f} s:\n" + _tail(log_path))
            try:
                _get(url + "/health", timeout=2)
                break
            except OSError:   # not listening yet (URLError and timeouts are OSErrors)
                pass
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _get(url: str, timeout: float) -> str:
    """GET with the standard library, never through a proxy from the environment."""
    import urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as r:
        return r.read().decode()


def preemptions(url: str) -> int | None:
    try:
        text = _get(url + "/metrics", timeout=10)
    except OSError:
        return None
    m = re.search(r"^fastchat_preemptions_total (\d+)", text, re.M)
    return int(m[1]) if m else None


# ---- load generator ---------------------------------------------------------------------------------------

async def _post_lines(url: str, body: dict):
    """POST JSON over one HTTP/1.1 connection; yields (status, None) once, then (arrival time, line) for each line
    of the response body. The standard library only (asyncio streams): a lean load generator, no client package."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
    try:
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        await writer.drain()
        yield int((await reader.readline()).split()[1]), None
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        buf = b""
        while True:
            if headers.get("transfer-encoding") == "chunked":
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    break
                data = await reader.readexactly(size)
                await reader.readexactly(2)   # the CRLF after each chunk
            else:
                data = await reader.read(1 << 16)
                if not data:
                    break
            now = time.perf_counter()
            *lines, buf = (buf + data).split(b"\n")
            for line in lines:
                yield now, line.decode().rstrip("\r")
        if buf:
            yield time.perf_counter(), buf.decode()
    finally:
        writer.close()


async def _one(url: str, text: str, n_out: int, delay: float, t0: float) -> dict:
    await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
    body = {"model": "bench", "prompt": text, "max_tokens": n_out, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    rec = {"lag": start - (t0 + delay), "start": start, "ttft": None, "itl": [], "tokens": 0, "error": None}
    last, status, body_lines = None, None, []
    try:
        async with aclosing(_post_lines(url, body)) as lines:
            async for now, line in lines:
                if status is None:
                    status = now
                    continue
                if status != 200:
                    body_lines.append(line)
                    continue
                if line.startswith("data: "):
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        rec["error"] = chunk["error"].get("message", "error")[:200]
                        continue
                    if chunk.get("usage"):
                        rec["tokens"] = chunk["usage"]["completion_tokens"]
                    if any(c.get("text") for c in chunk.get("choices", ())):
                        if last is None:
                            rec["ttft"] = now - start
                        else:
                            rec["itl"].append(now - last)
                        last = now
        if status != 200:
            rec["error"] = f"HTTP {status}: {' '.join(body_lines)[:200]}"
    except Exception as e:   # count it, keep the run going
        rec["error"] = f"{type(e).__name__}: {e}"[:200]
    rec["end"] = time.perf_counter()
    if rec["error"] is None and rec["tokens"] != n_out:
        rec["error"] = f"generated {rec['tokens']} tokens, asked for {n_out}"
    return rec


async def run_load(url: str, prompts, lengths, rate: float, seed: int) -> tuple[list[dict], float]:
    """Send every request at its Poisson arrival time; (per-request records, seconds from first send to last end)."""
    rng = random.Random(seed)
    delays, t = [], 0.0
    for _ in prompts:
        delays.append(t)
        t += rng.expovariate(rate) if math.isfinite(rate) else 0.0
    t0 = time.perf_counter() + 0.05
    recs = await asyncio.gather(*(_one(url, text, n_out, d, t0)
                                  for (text, _), (_, n_out), d in zip(prompts, lengths, delays)))
    return recs, max(r["end"] for r in recs) - min(r["start"] for r in recs)


def _pct(xs, q):
    return float(np.percentile(xs, q)) * 1e3 if len(xs) else None


def summarize(rate, recs, seconds, n_in) -> dict:
    ok = [r for r in recs if r["error"] is None]
    out_tok = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [g for r in ok for g in r["itl"]]
    tpot = [(r["end"] - r["start"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1 and r["ttft"]]
    e2e = [r["end"] - r["start"] for r in ok]
    errors = [r["error"] for r in recs if r["error"] is not None]
    return {"rate": f"{rate:g}", "requests": len(recs), "completed": len(ok),
            "errors": len(errors), "error_examples": sorted(set(errors))[:3], "seconds": seconds,
            "request_per_s": len(ok) / seconds, "output_tok_per_s": out_tok / seconds,
            "total_tok_per_s": (out_tok + sum(n for n, r in zip(n_in, recs) if r["error"] is None)) / seconds,
            "ttft_ms": {"p50": _pct(ttft, 50), "p99": _pct(ttft, 99),
                        "mean": 1e3 * float(np.mean(ttft)) if ttft else None},
            "itl_ms": {"p50": _pct(itl, 50), "p99": _pct(itl, 99)},
            "tpot_ms": {"p50": _pct(tpot, 50), "p99": _pct(tpot, 99)},
            "latency_ms": {"p50": _pct(e2e, 50), "p99": _pct(e2e, 99)},
            "max_send_lag_ms": 1e3 * max(r["lag"] for r in recs)}


# ---- offline ----------------------------------------------------------------------------------------------

def run_offline(args, ckpt: Path, tok: Tokenizer, reqs) -> dict:
    """The same model and workload through one engine.generate call per repeat (best repeat reported)."""
    from fastchat_core.bench.bench_serving import run_engine
    from fastchat_core.checkpoint import load_model
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if args.device == "cuda" else torch.float32
    model, _ = load_model(ckpt, args.device, dtype)
    runs = []
    for _ in range(args.offline_repeats):   # repeats: one-time costs (allocator growth, autotuning) stay in the first
        stats, _ = run_engine(model, reqs, tokenizer=tok, max_num_seqs=args.max_num_seqs,
                              max_num_batched_tokens=max(8192, args.max_num_seqs))
        runs.append(stats)
        print(f"offline: {stats['output_tok_per_s']:,.1f} output tok/s ({stats['seconds']:.2f} s)", flush=True)
    best = max(runs, key=lambda s: s["output_tok_per_s"])
    return {**best, "runs_output_tok_per_s": [s["output_tok_per_s"] for s in runs]}


# ---- main -------------------------------------------------------------------------------------------------

def get_args(argv=None):
    p = argparse.ArgumentParser(prog="bench_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/server.json")
    p.add_argument("--checkpoint", default=None, help="serve this checkpoint (default: random weights of --depth)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (default: the checkpoint's; for random weights a synthetic 65,536-id one)")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--n-kv-head", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--rates", default="4,8,16,32,64,inf", help="requests/s, comma separated; inf = all at once")
    p.add_argument("--num-requests", type=int, default=200, help="requests per rate")
    p.add_argument("--max-len", type=int, default=CAP,
                   help="longest input and output, in tokens; the length medians scale with it (200 at 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=16, help="requests sent (all at once) before the first rate")
    p.add_argument("--max-num-seqs", type=int, default=256, help="the server's (and offline engine's) batch")
    p.add_argument("--offline-repeats", type=int, default=2)
    p.add_argument("--server-timeout", type=float, default=900, help="seconds to wait for the server to start")
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads per process on cpu")
    p.add_argument("--workdir", default=None, help="where the temporary checkpoint and server log go")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        args.rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        p.error(f"--rates must be numbers or inf, comma separated, got {args.rates!r}")
    if not args.rates or any(r <= 0 for r in args.rates):
        p.error("--rates must be positive")
    if args.num_requests < 1 or args.max_len < 2:
        p.error("--num-requests must be >= 1 and --max-len >= 2")
    return args


def _versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = git_commit()
    return {"torch": torch.__version__, "triton": triton_version, "commit": commit}


def _ms(x) -> str:
    return f"{x:.1f}" if x is not None else "-"


def _stats(xs) -> dict:
    return {"mean": float(np.mean(xs)), "p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99)),
            "max": int(max(xs))}


def main(argv=None):
    args = get_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.cpu_threads)
    from fastchat_core.checkpoint import load_meta
    from fastchat_core.config import ModelConfig
    workdir = Path(tempfile.mkdtemp(prefix="bench_server_", dir=args.workdir))
    try:
        t_setup = time.perf_counter()
        ckpt, tok_path = prepare_checkpoint(args, workdir)
        tok = Tokenizer.load(tok_path)
        cfg = ModelConfig(**load_meta(ckpt)["model_config"])
        if 2 * args.max_len > 4 * cfg.seq_len:   # the rotary table (4x the training length) bounds a sequence
            raise SystemExit(f"--max-len {args.max_len}: prompt + output can reach {2 * args.max_len} tokens, more "
                             f"than this model's context of {4 * cfg.seq_len}: lower --max-len")
        lengths = length_mix(args.num_requests, args.max_len, args.seed)
        n_in = [i for i, _ in lengths]
        words = prompt_words(tok)
        print(f"model d{cfg.depth} ({cfg.num_params() / 1e6:.0f}M params) on {args.device}; {args.num_requests} "
              f"requests/rate, input mean {np.mean(n_in):.0f} / output mean {np.mean([o for _, o in lengths]):.0f} "
              f"tokens; setup {time.perf_counter() - t_setup:.1f} s", flush=True)
        passes = iter(range(1, 1 << 30))   # a fresh prompt seed per pass: no prefix-cache hits between passes
        rows = []
        with running_server(args, ckpt, tok_path, max(256, args.num_requests), workdir / "server.log") as url:
            if args.warmup:
                warm = lengths[:args.warmup]
                recs, _ = asyncio.run(run_load(url, make_prompts(warm, words, tok, args.seed * 1000 + next(passes)),
                                               warm, float("inf"), args.seed))
                failed = [r["error"] for r in recs if r["error"]]
                if len(failed) == len(recs):
                    raise SystemExit(f"every warm-up request failed, e.g. {failed[0]}\n"
                                     + _tail(workdir / "server.log"))
            for rate in args.rates:
                prompts = make_prompts(lengths, words, tok, args.seed * 1000 + next(passes))
                assert all(len(ids) == n for (_, ids), n in zip(prompts, n_in)), "prompt lengths drifted"
                before = preemptions(url)
                recs, seconds = asyncio.run(run_load(url, prompts, lengths, rate, args.seed + 1))
                after = preemptions(url)
                row = summarize(rate, recs, seconds, n_in)
                row["preemptions"] = after - before if None not in (before, after) else None
                rows.append(row)
                print(f"rate {row['rate']}: {row['request_per_s']:.2f} req/s, {row['output_tok_per_s']:,.1f} "
                      f"out tok/s, TTFT p50 {_ms(row['ttft_ms']['p50'])} ms, errors {row['errors']}", flush=True)
        prompts = make_prompts(lengths, words, tok, args.seed * 1000 + next(passes))
        offline = run_offline(args, ckpt, tok, [(ids, o) for (_, ids), (_, o) in zip(prompts, lengths)])
        top = max(rows, key=lambda r: float(r["rate"]))   # the highest rate: inf when it is run
        overhead = 1 - top["output_tok_per_s"] / offline["output_tok_per_s"]
        device = (torch.cuda.get_device_name(0) if args.device == "cuda"
                  else f"cpu ({args.cpu_threads} torch thread(s) per process)")
        doc = {"device": device, **_versions(),
               "model": {"checkpoint": args.checkpoint, "random_weights": args.checkpoint is None,
                         "depth": cfg.depth, "dim": cfg.dim, "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head,
                         "vocab": cfg.vocab_size, "params": cfg.num_params(),
                         "dtype": args.dtype or ("bfloat16" if args.device == "cuda" else "float32")},
               "server": {"max_num_seqs": args.max_num_seqs, "max_queue": max(256, args.num_requests),
                          "endpoint": "POST /v1/completions, stream=true, ignore_eos=true, temperature=0"},
               "workload": {"requests_per_rate": args.num_requests, "seed": args.seed, "max_len": args.max_len,
                            "lengths": f"lognormal, median {MEDIAN * args.max_len / CAP:g}, sigma {SIGMA}, "
                                       f"capped at {args.max_len}",
                            "input_tokens": _stats(n_in), "output_tokens": _stats([o for _, o in lengths]),
                            "arrivals": "Poisson at each rate (inf: all at once)",
                            "warmup_requests": min(args.warmup, args.num_requests),
                            "prompts": "random one-token words, fresh per pass (no prefix-cache hits)"},
               "rates": rows,
               "offline": {**offline, "how": "one engine.generate over the workload (bench_serving.run_engine on "
                                             "cuda), tokenizer attached: it detokenizes as the server does"},
               "http_overhead": {"at_rate": top["rate"], "value": overhead,
                                 "definition": "1 - http output tok/s / offline output tok/s"}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{device}, d{cfg.depth}, {args.num_requests} requests per rate -> {args.out}")
    print(f"{'rate':>6} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} {'p99':>8} "
          f"{'errors':>6}")
    for r in rows:
        print(f"{r['rate']:>6} {r['request_per_s']:>7.2f} {r['output_tok_per_s']:>10,.1f} "
              f"{_ms(r['ttft_ms']['p50']):>9} {_ms(r['ttft_ms']['p99']):>8} {_ms(r['itl_ms']['p50']):>8} "
              f"{_ms(r['itl_ms']['p99']):>8} {r['errors']:>6}")
    print(f"{'offline':>6} {'':>7} {offline['output_tok_per_s']:>10,.1f}   (engine.generate, no HTTP)")
    print(f"HTTP overhead at rate {top['rate']}: {100 * overhead:.1f}% of offline output tok/s  (latencies in ms)")


if __name__ == "__main__":
    main()
