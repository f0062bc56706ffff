"""`fastchat serve` / `python -m fastchat_core.serve`: the OpenAI-compatible chat server and web UI.
(This folder is installed as `fastchat_core.serve`: setup.py maps it.)

One Engine per process, shared by every request through an AsyncEngine; see app.py for the routes.
Run one server per GPU and put a load balancer in front to use several. SIGTERM or Ctrl-C stops accepting,
lets in-flight requests finish (--drain-timeout) and exits 0.
"""
import argparse
import os
import signal


def get_args(argv=None):
    from fastchat_core.chat_cli import add_model_args
    from fastchat_core.serve.schemas import MAX_BODY_BYTES
    p = argparse.ArgumentParser(prog="fastchat serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port (the log says which)")
    p.add_argument("--api-key", default=os.environ.get("FASTCHAT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default $FASTCHAT_API_KEY; unset = open)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoded together in one batch")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait beyond the running batch; more get 429 Too Many Requests")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                   help="request bodies over this many bytes get 413, refused as soon as the upload passes the "
                        "limit (default %(default)s)")
    p.add_argument("--compile-decode", action="store_true",
                   help="torch.compile the decode step (fuses its elementwise work; costs a compile at start-up)")
    p.add_argument("--model-name", action="append", default=None,
                   help="a model id the API answers to, repeatable or comma-separated: /v1/models lists them all, "
                        "the first is the default (default: <stage>-<run>); requests naming another get 404")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="on SIGTERM / Ctrl-C, seconds to let in-flight requests finish before cancelling them")
    args = p.parse_args(argv)
    if args.max_num_seqs < 1 or args.max_queue < 0 or args.max_body_bytes < 1:
        p.error("--max-num-seqs and --max-body-bytes must be >= 1 and --max-queue >= 0")
    return args


def create_app(args):
    """The ASGI app for parsed arguments: load the checkpoint, start the engine thread, build the routes."""
    from fastchat_core.chat_cli import engine_options
    from fastchat_core.engine import AsyncEngine, load_engine
    from fastchat_core.serve.app import build_app

    engine, _, ckpt = load_engine(**engine_options(args), max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=max(8192, args.max_num_seqs),
                                  compile_decode=args.compile_decode)
    names = [n.strip() for arg in args.model_name or () for n in arg.split(",") if n.strip()]
    names = names or [f"{ckpt.parent.parent.name}-{ckpt.parent.name}"]   # e.g. sft-d20
    return build_app(AsyncEngine(engine, max_waiting=args.max_queue), model_names=names, api_key=args.api_key,
                     max_body_bytes=args.max_body_bytes)


def main(argv=None):
    args = get_args(argv)
    try:
        import uvicorn
        import starlette  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"fastchat serve needs uvicorn and starlette ({e}): pip install uvicorn starlette")
    app = create_app(args)
    # uvicorn drains on SIGTERM / Ctrl-C, then re-raises the signal to the handler it found: make SIGTERM's a
    # KeyboardInterrupt too, so that a drained shutdown exits 0 instead of dying by the signal
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.drain_timeout,
                    log_level="info")
    except KeyboardInterrupt:   # the re-raised signal, after the graceful shutdown: a clean exit
        pass
    return 0
