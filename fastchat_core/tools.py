"""Running model-written Python: the calculator tool (GSM8K-style) and HumanEval solution checking.

`calculator` evaluates pure arithmetic in-process through the AST, so the common case costs microseconds.
Anything else goes to `run_python`, which runs the code in an operating-system sandbox (sandbox.py). The
code is treated as hostile and as knowing this implementation. What is guaranteed (x86_64 Linux):
- It sees only a read-only copy of the Python stdlib and the system libraries it loads, and a private
  32 MiB tmpfs at /tmp (its working directory): no /etc, /proc, /dev, /home, /root, project or checkpoint
  files, and nothing of the caller's environment (it starts empty). It can write only that tmpfs.
- No network of any kind (a fresh network namespace, and no socket family but AF_UNIX, whose names are
  per namespace too). No new programs (execve is refused), no ptrace, mounts, namespaces, io_uring, bpf,
  keyrings, inotify or other rarely needed syscalls (a seccomp filter, with no_new_privs; syscalls newer
  than its reviewed list fail with ENOSYS).
- It runs as an unprivileged uid (a fresh one per call when the caller is root; otherwise the caller's uid
  in a user namespace, with no capabilities) in its own pid namespace: it cannot see or signal anything
  outside its own processes, and every process it starts dies when the call ends (also when the caller is
  interrupted). The call returns within `timeout` plus about 0.3 s, whatever the code does, with what the
  code printed before it was stopped.
- Limits per call: `memory_mb` of address space per process, at most 8 processes and threads (so about
  8 x memory_mb in all), 64 open files, CPU seconds, file size; no System V IPC, memfd or enlarged socket and
  pipe buffers (memory no rlimit counts). Its output reaches the caller capped at MAX_OUTPUT characters (the
  first part and the last 500), so the caller's memory does not grow with it.
- Results come from the trusted supervisor (pid 1 of the namespace), never from the code: `ok` is the
  worker's exit status (a self-report: code may exit 0 early); `check_program(..., tests=, entry_point=)`
  runs the tests in the supervisor, calling the solution in the worker across a pipe with plain data both
  ways, so a pass cannot be forged by exiting, writing to fds, patching builtins or returning objects with
  a lying __eq__. It can still be earned by a solution that special-cases the tests' inputs.
Not guaranteed: protection against kernel bugs (the usual limit of namespaces + seccomp), or fairness of
CPU between concurrent calls. If namespaces or seccomp are unavailable, the python tool refuses to run
(SandboxUnavailable says why; the engine pastes it as the tool's output); it never runs code unsandboxed.
A calculator-class call costs 28.5 ms, 16.8 ms of it the isolation on top of starting Python
(bench/results/sandbox.json, 2 cores).
"""
import ast
import marshal
import math
import operator
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

MAX_OUTPUT = 4000   # characters of captured output kept; a tool result must fit in the model's context
MAX_CODE = 1 << 20   # characters of code (and tests) accepted
_SANDBOX = str(Path(__file__).with_name("sandbox.py"))


class SandboxUnavailable(RuntimeError):
    """This machine cannot isolate the code (no namespaces or seccomp): nothing ran. Never a result the code
    can produce, so a caller can tell it apart from anything printed."""


class ToolResult(NamedTuple):
    ok: bool       # ran to the end without an exception, timeout or limit
    output: str    # printed text, then the REPL-style value of a final expression or the error


def run_python(code: str, timeout: float = 3.0, memory_mb: int = 256) -> ToolResult:
    """Run `code` in the sandbox; `timeout` is wall-clock seconds, sandbox start-up included.
    Raises SandboxUnavailable where the sandbox cannot run."""
    return _sandboxed({"program": code}, timeout, memory_mb)


def tool_output(code: str) -> str:
    """What the engine pastes after a python tool call: the code's output, or why the tool cannot run."""
    try:
        return run_python(code).output
    except SandboxUnavailable as e:
        return str(e)


def check_program(program: str, timeout: float = 3.0, *, tests: str | None = None,
                  entry_point: str | None = None) -> tuple[bool, str]:
    """Check a HumanEval-style solution: (passed, last error line or ''). Raises SandboxUnavailable where the
    sandbox cannot run (a benchmark must not score 0 for it).

    With `tests` (code defining `check(candidate)`, trusted) and `entry_point`, the tests run apart from the
    untrusted `program` and call its `entry_point` function across a pipe: the verdict cannot be forged.
    Without them, `program` holds solution and tests together and passes when it runs to its end, which
    the program itself reports: use that form only for trusted code.
    """
    if (tests is None) != (entry_point is None):
        raise ValueError("check_program: pass both tests= and entry_point=, or neither")
    result = _sandboxed({"program": program, "entry_point": entry_point}, timeout, 256, tests)
    if result.ok:
        return True, ""
    lines = result.output.strip().splitlines()
    return False, lines[-1] if lines else "failed without output"


def _sandboxed(request: dict, timeout: float, memory_mb: int, tests: str | None = None) -> ToolResult:
    if len(request["program"]) + len(tests or "") > MAX_CODE:
        return ToolResult(False, f"ValueError: the code is longer than {MAX_CODE} characters")
    # The supervisor stops the code at the deadline and still reports what it printed; the launcher kills
    # the supervisor a moment later if it is still busy; the kill below, a second later, is the last backstop.
    request.update(memory_mb=int(memory_mb), cpu_seconds=math.ceil(timeout) + 1, max_output=MAX_OUTPUT,
                   has_tests=tests is not None, deadline=time.monotonic() + timeout)
    header, timed_out = marshal.dumps(request), f"TimeoutError: killed after {timeout:g} s"
    # The tests follow the header; the sandbox reads them only in its supervisor, after forking the worker.
    stdin = len(header).to_bytes(8, "little") + header + (tests or "").encode("utf-8", "surrogatepass")
    # An empty environment, no inherited fds, its own session so a timeout can kill the whole group.
    proc = subprocess.Popen([sys.executable, "-I", "-S", _SANDBOX], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd="/", env={}, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(stdin, timeout=timeout + 1)
    except BaseException as e:   # the timeout, or the caller interrupted: nothing may outlive the call
        os.killpg(proc.pid, signal.SIGKILL)   # the launcher; the namespace's pid 1 dies with it, then all of it
        proc.communicate()
        if not isinstance(e, subprocess.TimeoutExpired):
            raise
        return ToolResult(False, timed_out)
    try:
        result = ast.literal_eval(stdout.decode().splitlines()[-1])   # from the trusted supervisor
        assert isinstance(result, dict)
    except (ValueError, IndexError, SyntaxError, AssertionError, MemoryError, RecursionError):
        return ToolResult(False, f"the python tool failed (exit code {proc.returncode}): "
                                 f"{stderr.decode(errors='replace').strip()[-MAX_OUTPUT:] or 'no error output'}")
    if "unavailable" in result:
        raise SandboxUnavailable("the python tool is unavailable: its sandbox needs x86_64 Linux with namespaces "
                                 "(run as root, or with unprivileged user namespaces enabled) and libseccomp "
                                 f"(libseccomp2). The error was: {result['unavailable']}")
    output = str(result["output"])
    if result.get("timeout"):
        return ToolResult(False, (output + "\n" + timed_out).strip("\n"))
    if result.get("exit", 0) < 0:   # killed by a signal: say which, after what it printed
        output += "\n" + _describe_signal(-result["exit"])
    return ToolResult(bool(result["ok"]), output.strip("\n"))


def _describe_signal(signum: int) -> str:
    if signum == signal.SIGXCPU:
        return "TimeoutError: CPU time limit exceeded"
    try:
        name = signal.Signals(signum).name
    except ValueError:   # a real-time signal has no name
        name = f"signal {signum}"
    return f"the program was killed by {name} (out of memory or another resource limit)"


# ---- calculator: pure arithmetic without a subprocess ----------------------------------------------------

_ARITHMETIC = re.compile(r"[0-9+\-*/%()., ]+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")   # the comma in 1,234
_MAX_EXPR = 256
_MAX_BITS = 10_000   # ~3,000 digits: more than any word problem needs, and cheap to compute and print
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculator(expr: str) -> str | None:
    """Evaluate pure arithmetic (digits, + - * / // % ** ( ) . and spaces; commas as thousands separators).

    Returns what `run_python(expr)` would print: the value's repr ('87', '3.0') or the error line
    ('ZeroDivisionError: division by zero'); powers too large to compute cheaply are refused with an error
    line. None means `expr` is not pure arithmetic (the caller may hand it to `run_python`).
    """
    if len(expr) > _MAX_EXPR or not _ARITHMETIC.fullmatch(expr):
        return None
    expr = _THOUSANDS.sub("", expr).strip()
    if "," in expr:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return None
    try:
        return repr(_evaluate(tree.body))
    except _NotArithmetic:
        return None
    except (ArithmeticError, ValueError) as e:   # ValueError: an int too long to print
        return "".join(traceback.format_exception_only(e)).strip()


class _NotArithmetic(Exception):
    """Valid Python made of allowed characters that is still not arithmetic, e.g. (2)(3) or ..."""


def _evaluate(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if right * math.log2(abs(left)) > _MAX_BITS:
                raise OverflowError(f"{left}**{right} is too large for the calculator")
        return _BINARY[type(node.op)](left, right)
    raise _NotArithmetic
