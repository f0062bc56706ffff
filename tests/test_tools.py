"""The calculator fast path and the sandboxed Python runner (each run_python call starts a small child)."""
import ast
import subprocess
import sys
import time

import pytest

from fastchat_core.tools import MAX_OUTPUT, calculator, check_program, run_python


@pytest.mark.parametrize("expr, value", [
    ("12*7+3", "87"), ("12/4", "3.0"), ("7 // 2", "3"), ("-3 % 5", "2"), ("2**10", "1024"),
    ("(1.5 + 2.5) * 3", "12.0"), ("1,234 * 2", "2468"), ("-(4 - 10)", "6"),
])
def test_calculator_arithmetic(expr, value):
    assert calculator(expr) == value


def test_calculator_refuses_what_is_not_arithmetic_or_too_big():
    for expr in ["__import__('os')", "abs(-3)", "x + 1", "(2)(3)", "...", "1 +", "1, 2", "", "1" * 300]:
        assert calculator(expr) is None, expr
    assert calculator("1/0") == "ZeroDivisionError: division by zero"
    assert calculator("9**9**9").startswith("OverflowError")   # refused before computing 9**387420489
    assert calculator("10.0**400").startswith("OverflowError")


def test_calculator_agrees_with_sandbox():
    exprs = ["12*7+3", "12/4", "2**0.5", "1/0", "17 % 5 * (3 - 8)"]
    assert [calculator(e) for e in exprs] == [run_python(e).output for e in exprs]


def test_repl_value_and_print_output():
    r = run_python("print('hello')\nx = 6 * 7\nx")
    assert r == (True, "hello\n42")
    assert run_python("'abc'").output == "'abc'"          # a REPL shows the repr
    assert run_python("x = 5") == (True, "")              # a statement shows nothing
    assert run_python("import math\nmath.factorial(10)").output == "3628800"


def test_errors_are_reported():
    r = run_python("def f(:\n    pass")
    assert not r.ok and "SyntaxError" in r.output
    r = run_python("print('before')\n[][1]")
    assert not r.ok and r.output.startswith("before") and r.output.endswith("IndexError: list index out of range")
    r = run_python("import sys\nsys.exit(0)")
    assert not r.ok and "SystemExit" in r.output           # exiting early is not success


def test_infinite_loop_killed_by_timeout():
    t0 = time.perf_counter()
    r = run_python("while True:\n    pass", timeout=1.0)
    assert not r.ok and "Timeout" in r.output
    assert time.perf_counter() - t0 < 5


def test_memory_bomb_is_limited():
    r = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(10**6))", timeout=5, memory_mb=128)
    assert not r.ok and "MemoryError" in r.output
    assert run_python("len(bytearray(50 * 10**6))", memory_mb=256).output == str(50 * 10**6)   # below the limit


def test_files_are_private_to_the_call(tmp_path):
    """The working dir is a private tmpfs: usable within a call, empty in the next; host files are not there."""
    host = tmp_path / "keep.txt"
    host.write_text("data")
    assert run_python("open('notes.txt', 'w').write('abc')\nopen('notes.txt').read()") == (True, "'abc'")
    assert run_python("import os\nos.listdir('.')") == (True, "[]")
    r = run_python(f"open({str(host)!r}).read()")
    assert not r.ok and "FileNotFoundError" in r.output
    r = run_python(f"import os\nos.remove({str(host)!r})")
    assert not r.ok and host.read_text() == "data"


def test_network_and_programs_refused():
    r = run_python("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)")
    assert not r.ok and "PermissionError" in r.output
    r = run_python("import subprocess\nsubprocess.run(['/bin/sh', '-c', 'true'])")
    assert not r.ok and ("PermissionError" in r.output or "FileNotFoundError" in r.output)


def test_output_truncated():
    r = run_python("print('x' * 100_000)\nprint('the end')")
    head, tail = r.output.split("\n... [output truncated] ...\n")
    assert r.ok and head == "x" * MAX_OUTPUT and tail.endswith("the end") and len(tail) <= 500


SOLUTION = '''
def add_digits(n: int) -> int:
    """Sum of the decimal digits of a non-negative integer."""
    return sum(int(c) for c in str(n))
'''
WRONG_SOLUTION = '''
def add_digits(n: int) -> int:
    return n % 10
'''
TESTS = '''
def check(candidate):
    assert candidate(0) == 0
    assert candidate(7) == 7
    assert candidate(1234) == 10

check(add_digits)
'''


def test_check_program():
    assert check_program(SOLUTION + TESTS, timeout=3.0) == (True, "")
    passed, error = check_program(WRONG_SOLUTION + TESTS, timeout=3.0)
    assert not passed and error == "AssertionError"
    passed, error = check_program("def add_digits(n):\n    while True: pass\n" + TESTS, timeout=1.0)
    assert not passed and "Timeout" in error


def test_check_program_with_separate_tests():
    tests = TESTS.replace("check(add_digits)", "")
    assert check_program(SOLUTION, tests=tests, entry_point="add_digits") == (True, "")
    assert check_program(WRONG_SOLUTION, tests=tests, entry_point="add_digits") == (False, "AssertionError")
    # what passes the one-program form by ending the process early fails here
    forged = SOLUTION.replace("return sum", "return 0 * sum") + "import os\nos._exit(0)\n"
    assert check_program(forged + TESTS)[0]
    assert not check_program(forged, tests=tests, entry_point="add_digits")[0]
    with pytest.raises(ValueError):
        check_program(SOLUTION, tests=tests)


def test_refuses_to_run_without_isolation(tmp_path):
    """Where namespaces are unavailable (here: unshare denied by a seccomp filter on the caller), the tool
    raises an error saying why (no output the code could print looks like it), and the code never runs: it
    would have created the marker."""
    marker = tmp_path / "ran"
    script = f"""
import ctypes
lib = ctypes.CDLL("libseccomp.so.2")
lib.seccomp_init.restype = ctypes.c_void_p
ctx = ctypes.c_void_p(lib.seccomp_init(0x7fff0000))
assert lib.seccomp_rule_add(ctx, 0x50001, lib.seccomp_syscall_resolve_name(b"unshare"), 0) == 0
assert lib.seccomp_load(ctx) == 0
from fastchat_core.tools import SandboxUnavailable, run_python, tool_output
code = "open({str(marker)!r}, 'w').write('x')"
try:
    run_python(code)
except SandboxUnavailable as e:
    print(repr(("raised", str(e), tool_output(code))))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    raised, message, pasted = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert message.startswith("the python tool is unavailable") and "unshare" in message
    assert pasted == message   # what the engine pastes as the tool's output
    assert not marker.exists()


def test_stdlib_with_its_shared_libraries_works():
    """Extension modules load their system libraries (libffi, libcrypto, libsqlite3, liblzma...) in the sandbox."""
    code = ("import bz2, ctypes, decimal, hashlib, lzma, sqlite3, ssl, zlib\n"
            "print(hashlib.sha256(b'a').hexdigest()[:8], decimal.Decimal('1.1') + 2)\n"
            "sqlite3.connect(':memory:').execute('select 6*7').fetchone()[0]")
    assert run_python(code) == (True, "ca978112 3.1\n42")
