"""Running model-written Python: the calculator tool (GSM8K-style) and HumanEval solution checking.

`calculator` evaluates pure arithmetic in-process through the AST, so the common case costs microseconds.
Anything else goes to `run_python`: a fresh `python -I` child with a minimal environment, a temporary
working directory, resource limits (address space, CPU seconds, no core files, no file growth), a
wall-clock kill, and Python-level guards that refuse sockets, subprocesses, file writes and deletions.

This is a BEST-EFFORT SANDBOX, NOT A SECURITY BOUNDARY. It stops the accidents a small model makes (endless
loops, huge allocations, stray file writes, a reward-hacking sys.exit) but code determined to escape can
(ctypes, restoring patched functions from C modules, ...). For untrusted users, run it in a container or VM.
"""
import ast
import json
import math
import operator
import os
import re
import signal
import subprocess
import sys
import tempfile
import traceback
from typing import NamedTuple

MAX_OUTPUT = 4000   # characters of captured output kept; a tool result must fit in the model's context


class ToolResult(NamedTuple):
    ok: bool       # ran to the end without an exception, timeout or limit
    output: str    # printed text, then the REPL-style value of a final expression or the error


# The child process. It sets its limits and guards, then runs the code like a REPL cell: a final expression
# statement has its repr printed. Its result goes back as one JSON object on a saved copy of stdout, while
# fds 1 and 2 point at /dev/null, so code writing to them directly cannot flood the parent.
_CHILD = r'''
import _socket, ast, builtins, io, json, math, os, resource, shutil, signal, socket, subprocess, sys, traceback

timeout, memory_mb, max_output = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
code = sys.stdin.read()


class Capped(io.TextIOBase):
    """stdout and stderr of the code: keeps the first max_output characters."""
    def __init__(self):
        self.parts, self.size, self.truncated = [], 0, False

    def writable(self):
        return True

    def write(self, s):
        room = max_output - self.size
        if len(s) > room:
            s, self.truncated = s[:max(room, 0)], True
        self.parts.append(s)
        self.size += len(s)
        return len(s)

    def getvalue(self):
        return "".join(self.parts).rstrip("\n") + ("\n... [output truncated]" if self.truncated else "")


def refuse(what):
    def refused(*args, **kwargs):
        raise PermissionError(f"{what} is disabled in the sandbox")
    return refused


def install_guards():
    real_open, real_os_open = builtins.open, os.open

    def open_read_only(file, mode="r", *args, **kwargs):
        if set(mode) & set("wax+"):
            raise PermissionError("writing files is disabled in the sandbox")
        return real_open(file, mode, *args, **kwargs)

    def os_open_read_only(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC):
            raise PermissionError("writing files is disabled in the sandbox")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = open_read_only
    os.open = os_open_read_only
    for name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "mkdir",
                 "makedirs", "link", "symlink", "truncate", "ftruncate", "chmod", "chown", "chdir", "fchdir",
                 "chroot", "kill", "killpg", "fork", "forkpty", "system", "popen",
                 "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
                 "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
                 "posix_spawn", "posix_spawnp", "setuid", "setgid"):
        if hasattr(os, name):
            setattr(os, name, refuse(f"os.{name}"))
    for name in ("rmtree", "move", "copy", "copy2", "copyfile", "copytree", "chown"):
        setattr(shutil, name, refuse(f"shutil.{name}"))
    subprocess.Popen = refuse("starting processes")
    for module in (socket, _socket):
        class NoSocket(module.socket):   # still a class, so library code that subclasses it imports fine
            __init__ = refuse("network access")
        module.socket = NoSocket
        for name in ("socketpair", "fromfd", "getaddrinfo", "gethostbyname"):
            setattr(module, name, refuse("network access"))


def run(code):
    tree = ast.parse(code, "<sandbox>")
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    scope = {"__name__": "__main__", "__builtins__": builtins}
    exec(compile(tree, "<sandbox>", "exec"), scope)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), "<sandbox>", "eval"), scope)
        if value is not None:
            print(repr(value))


out = Capped()
write, dumps = os.write, json.dumps   # kept before the code runs: it could replace the module attributes
result_fd = os.dup(1)
devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(devnull, 1)
os.dup2(devnull, 2)
sys.stdout = sys.stderr = out
memory = memory_mb * 2**20
cpu = math.ceil(timeout) + 1
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the size limit then fails instead of killing
install_guards()
ok, error = True, ""
try:
    run(code)
except BaseException as e:   # SystemExit too: exiting early must not count as passing the tests
    ok, error = False, "".join(traceback.format_exception_only(e))
out.write(error)   # the traceback (and a memory bomb's garbage with it) is released by now
write(result_fd, dumps({"ok": ok, "output": out.getvalue()}).encode())
'''


# No secrets from the parent's environment; one BLAS thread, so numpy fits the memory limit and one core.
_CHILD_ENV = {"PATH": os.defpath, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def run_python(code: str, timeout: float = 3.0, memory_mb: int = 256) -> ToolResult:
    """Run `code` in a sandboxed child process; `timeout` is wall-clock seconds, interpreter start included."""
    args = [sys.executable, "-I", "-c", _CHILD, str(timeout), str(memory_mb), str(MAX_OUTPUT)]
    with tempfile.TemporaryDirectory(prefix="fastchat-sandbox-") as cwd:
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=_CHILD_ENV, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(code.encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # its whole session: anything it managed to start too
            proc.communicate()
            return ToolResult(False, f"TimeoutError: killed after {timeout:g} s")
    try:
        result = json.loads(stdout)
        return ToolResult(bool(result["ok"]), str(result["output"]))
    except (ValueError, KeyError, TypeError):
        return ToolResult(False, _describe_crash(proc.returncode, stderr))


def check_program(program: str, timeout: float = 3.0) -> tuple[bool, str]:
    """Run a HumanEval-style program (solution + tests + check call): (passed, last error line or '')."""
    result = run_python(program, timeout=timeout)
    if result.ok:
        return True, ""
    lines = result.output.strip().splitlines()
    return False, lines[-1] if lines else "failed without output"


def _describe_crash(returncode: int, stderr: bytes) -> str:
    if returncode == -signal.SIGXCPU:
        return "TimeoutError: CPU time limit exceeded"
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return f"the program was killed by {name} (out of memory or another resource limit)"
    tail = stderr.decode(errors="replace").strip()[-MAX_OUTPUT:]
    return f"the sandbox failed (exit code {returncode}): {tail or 'no error output'}"


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
