"""Shared test set-up.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before anything
imports triton, which is why it happens here, at collection time. GPU tests carry @pytest.mark.gpu.

Data: the suite runs from a plain clone on its own small fixtures, tests/data/ (a few items of every file of the
data set, laid out like ../shared/data; tests/data/make_fixtures.py builds them). When FASTCHAT_DATA names a
data folder, the tests read it instead, and the integration tests (those using the `full_data_dir` fixture,
marked full_data: exact sizes, every item) run too; otherwise they are deselected, and one line of the summary
says why. Without it, FASTCHAT_DATA is set to the fixtures here, at collection time, so that library code
(which reads $FASTCHAT_DATA) sees the same folder as the tests.
"""
import contextlib
import gzip
import os
import threading
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURE_DATA = Path(__file__).resolve().parent / "data"


def _full_data():
    """(the full data root named by $FASTCHAT_DATA or None, why there is none: one line)."""
    root = os.environ.get("FASTCHAT_DATA")
    if not root:
        return None, "FASTCHAT_DATA is not set (CI sets it to ../shared/data)"
    if not os.path.isdir(root):
        return None, f"FASTCHAT_DATA={root} is not a folder"
    if Path(root).resolve() == FIXTURE_DATA:
        return None, "FASTCHAT_DATA names the test fixtures (tests/data)"
    return root, None


FULL_DATA, NO_FULL_DATA = _full_data()
DATA = FULL_DATA or str(FIXTURE_DATA)
os.environ["FASTCHAT_DATA"] = DATA   # unchanged when it names a data folder; the fixtures otherwise

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    # the full-data layer: deselected, not skipped, without the full set, so that a plain clone's run skips
    # only what needs a GPU; the terminal summary says why in one line
    full = [item for item in items if "full_data_dir" in getattr(item, "fixturenames", ())]
    for item in full:
        item.add_marker(pytest.mark.full_data)
    if FULL_DATA is None and full:
        config.hook.pytest_deselected(items=full)
        dropped = set(full)
        items[:] = [item for item in items if item not in dropped]
        config.stash[_FULL_DATA_DESELECTED] = len(full)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_FULL_DATA_DESELECTED = pytest.StashKey[int]()


def pytest_report_header(config):
    return f"data: {FULL_DATA}" if FULL_DATA else f"data: the test fixtures in {FIXTURE_DATA}"


def pytest_terminal_summary(terminalreporter, config):
    n = config.stash.get(_FULL_DATA_DESELECTED, 0)
    if n:
        terminalreporter.write_line(f"DESELECTED {n} integration tests on the full data set (marker full_data): "
                                    f"{NO_FULL_DATA}")


@pytest.fixture(scope="session")
def data_dir():
    """The data root: $FASTCHAT_DATA when it names a data folder, else the suite's fixtures (tests/data).
    Either way $FASTCHAT_DATA names it too. Assert sizes with `records`, not the full set's counts."""
    return DATA


@pytest.fixture(scope="session")
def full_data_dir():
    """The full data root ($FASTCHAT_DATA): for integration tests (exact sizes, every item); skips without it."""
    if FULL_DATA is None:
        pytest.skip(f"needs the full data set: {NO_FULL_DATA}")
    return FULL_DATA


def records(data_dir, *parts):
    """The number of records (lines) of a .jsonl.gz file under data_dir."""
    with gzip.open(Path(data_dir).joinpath(*parts), "rb") as f:
        return sum(1 for _ in f)


def tolerance(dtype):
    """(rtol, atol) for comparing a kernel against a float64 reference, by the kernel's I/O dtype."""
    return {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-3), torch.bfloat16: (5e-2, 1e-2)}[dtype]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and on shared cores spinning BLAS threads cost 10x.
    A test module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory, data_dir):
    """A small real-data tokenizer, saved: BPE vocab 512 on the first 300 docs (4000 chars each) of shard 0."""
    import gzip
    import json
    from pathlib import Path

    from fastchat_core.tokenizer import Tokenizer
    with gzip.open(Path(data_dir) / "pretrain" / "shard_000.jsonl.gz", "rt") as f:
        texts = [json.loads(line)["text"][:4000] for line, _ in zip(f, range(300))]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train_from_iterator(texts, vocab_size=512).save(path)
    return path


@pytest.fixture(scope="session")
def tok(tokenizer_file):
    """The Tokenizer of `tokenizer_file` (test_engine and test_tokenizer define their own `tok`)."""
    from fastchat_core.tokenizer import Tokenizer
    return Tokenizer.load(tokenizer_file)


def tiny_gpt(vocab_size, depth=1, seq_len=64, head_dim=32, dim=None, n_kv_head=0, seed=0, init_seed=1, noise=0.05):
    """A random tiny GPT (fp32, CPU) whose weights are moved away from the zero init by `noise` * N(0, 1), so that
    every layer matters. torch's global RNG is seeded with `seed` first (unless None); `init_seed` seeds
    init_weights."""
    from fastchat_core.config import ModelConfig
    from fastchat_core.model import GPT
    if seed is not None:
        torch.manual_seed(seed)
    cfg = ModelConfig(depth=depth, vocab_size=vocab_size, seq_len=seq_len, dim=dim or 2 * head_dim,
                      head_dim=head_dim, n_kv_head=n_kv_head)
    model = GPT(cfg).init_weights(seed=init_seed)
    if noise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    return model


def save_tiny_run(run_dir, model, step=0, tokenizer=None, optimizers=(), loader_state=None):
    """Save `model` as checkpoint `step` of the run folder `run_dir`, as a training driver would; the meta names
    `tokenizer` (a path) when given. Returns run_dir."""
    from pathlib import Path

    from fastchat_core.checkpoint import save_checkpoint
    args = {"tokenizer": str(tokenizer)} if tokenizer is not None else {}
    save_checkpoint(run_dir, step, model, optimizers, loader_state,
                    {"model_config": model.config.to_dict(), "args": args})
    return Path(run_dir)


# ---- the chat server, shared by test_server and test_webui ---------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_file):
    """A run folder holding a random tiny GPT whose meta points at a tokenizer trained on real text."""
    import shutil

    from fastchat_core.tokenizer import Tokenizer
    root = tmp_path_factory.mktemp("serve")
    shutil.copy(tokenizer_file, root / "tokenizer.json")
    model = tiny_gpt(Tokenizer.load(tokenizer_file).vocab_size, seq_len=64)
    return save_tiny_run(root / "sft" / "d1", model, 1, tokenizer=root / "tokenizer.json", loader_state={})


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The engine used directly, no server: what every HTTP answer must equal."""
    from fastchat_core.checkpoint import load_model
    from fastchat_core.engine import Engine
    from fastchat_core.tokenizer import Tokenizer
    model, _ = load_model(checkpoint)
    tok = Tokenizer.load(checkpoint.parent.parent / "tokenizer.json")
    return Engine(model, tok), tok


@contextlib.contextmanager
def serve_in_thread(checkpoint, *argv):
    """A real uvicorn server on a free port of 127.0.0.1, in a thread; yields (base url, the server's Engine)."""
    import uvicorn

    from fastchat_core.serve import create_app, get_args
    app = create_app(get_args(["--checkpoint", str(checkpoint), "--device", "cpu", *argv]))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app.state.server.engine.engine
    finally:
        server.should_exit = True
        thread.join(30)


@contextlib.contextmanager
def slow_steps(engine, seconds):
    """Pace the engine, so that a test can act while a request is surely still generating."""
    step = engine.step
    engine.step = lambda: (time.sleep(seconds), step())[1]
    try:
        yield
    finally:
        del engine.step


def scripted_sampler(scripts, cycle=False, then=None):
    """A stand-in for Engine._sample(self, seqs, logits) that plays fixed token scripts: the n-th sampled token
    of a request (pasted tool output not counted) is its script's n-th, then 0 (or the script again with
    cycle, or what `then(engine, seqs, logits)` samples, e.g. the real Engine._sample). `scripts`: request
    id -> list, or one list for every request. The engine samples one token ahead of knowing whether the
    previous one ended the sequence or opened a tool call, and draws again for a token it dropped, so a draw
    must depend on n alone, not on how many draws came before (as the real sampler's seeded draws do)."""
    def nth(engine, seq):
        n, pasted, ids = 0, False, engine.tool_ids
        for t in seq.output_ids:   # the newest may still be PENDING: it was sampled, so it counts
            pasted |= ids is not None and t == ids[2]
            n += not pasted
            pasted &= ids is None or t != ids[3]
        return n

    def token(seq, n):
        script = scripts[seq.request_id] if isinstance(scripts, dict) else scripts
        return script[n % len(script)] if cycle else script[n] if n < len(script) else None

    def play(engine, seqs, logits):
        # `then` samples every row, scripted or not, as the engine would
        tokens = then(engine, seqs, logits) if then is not None else torch.zeros(len(seqs), dtype=torch.long)
        for i, seq in enumerate(seqs):
            t = token(seq, nth(engine, seq))
            if t is not None:
                tokens[i] = t
        return tokens

    return play
