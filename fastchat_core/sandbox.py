"""The sandbox process behind tools.run_python and tools.check_program (started as `python -I -S sandbox.py`).

One file over 400 lines on purpose: it runs as a script in a fresh interpreter that sees only the stdlib (not
this package), so its three processes cannot be split into modules. It imports little at start (imports cost
most of a call's time): json and traceback only when needed. The processes:

  launcher (the process tools.py starts; trusted, never reachable from the code)
    reads the request's header from stdin (the tests, if any, stay in the pipe), unshares mount, pid, net,
    ipc, uts and cgroup namespaces (plus a user namespace unless it is root of the host), forks the
    supervisor, and keeps the deadline: at deadline + GRACE it kills the supervisor, and with it, pid 1,
    the whole namespace, then reports the timeout itself. Killed itself (the caller's backstop), it takes
    the supervisor along (parent-death signal).
  supervisor, pid 1 of the new pid namespace (trusted)
    builds a root of read-only binds (the stdlib directories and the system libraries they load) and a
    small private tmpfs at /tmp, pivots into it, drops the old root and forks the worker; then confines
    itself (its own uid) and collects the worker's output (capped) and exit status, or in check mode runs
    the trusted tests with `candidate` a proxy that calls the worker's function over pipes, plain data both
    ways. It stops the worker at the deadline and writes the one result line on a descriptor the worker
    never holds.
  worker (runs the untrusted code)
    gets only its pipes, drops to an unprivileged uid (a fresh one per call when root; no capabilities in
    the user namespace otherwise), takes rlimits, no_new_privs and a seccomp filter, then runs the code
    REPL-style.
"""
import _ast
import _signal as signal   # the C module: `signal` imports enum, a fifth of our start-up time
import builtins
import ctypes
import marshal
import os
import resource
import select
import sys
import time

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38

TMP_BYTES = 32 << 20        # the private /tmp: enough for scratch files, too small to hurt the host
MAX_FILES = 64
MAX_TASKS = 8               # processes + threads of the worker (with memory_mb each, this bounds its memory)
MAX_MESSAGE = 1 << 20       # one proxy call's arguments or result, encoded
GRACE = 0.25                # the launcher's kill, after the supervisor's own stop at the deadline

# x86_64 syscall numbers, written here rather than resolved by libseccomp: a libseccomp that does not know
# a name must not drop its rule silently. Numbers above NEWEST_REVIEWED (syscalls newer than this list)
# get ENOSYS, as from an older kernel.
NR = dict(socket=41, setsockopt=54, clone=56, execve=59, fcntl=72, ptrace=101, syslog=103, uselib=134,
          mknod=133, modify_ldt=154, pivot_root=155, chroot=161, acct=163, mount=165, umount2=166, swapon=167,
          swapoff=168, reboot=169, iopl=172, ioperm=173, init_module=175, delete_module=176, quotactl=179,
          lookup_dcookie=212, kexec_load=246, add_key=248, request_key=249, keyctl=250, inotify_init=253,
          mknodat=259, unshare=272, inotify_init1=294, fanotify_init=300, prlimit64=302, name_to_handle_at=303,
          open_by_handle_at=304, setns=308, process_vm_readv=310, process_vm_writev=311, kcmp=312,
          finit_module=313, memfd_create=319, kexec_file_load=320, bpf=321, execveat=322, userfaultfd=323,
          perf_event_open=298, io_uring_setup=425, io_uring_enter=426, io_uring_register=427, open_tree=428,
          move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433, clone3=435, pidfd_getfd=438,
          mount_setattr=442, quotactl_fd=443, memfd_secret=447, shmget=29, semget=64, msgget=68, ioctl=16,
          capset=126)
NEWEST_REVIEWED = 456
# Never needed by the code; they reach outside the sandbox, widen the kernel's attack surface, watch the
# host's files (inotify), or take memory no rlimit counts (System V IPC, memfd).
DENIED = """execve execveat ptrace process_vm_readv process_vm_writev mount umount2 pivot_root chroot unshare
setns bpf perf_event_open userfaultfd io_uring_setup io_uring_enter io_uring_register keyctl add_key
request_key kexec_load kexec_file_load init_module finit_module delete_module reboot swapon swapoff acct syslog
quotactl quotactl_fd open_by_handle_at name_to_handle_at memfd_create memfd_secret fsopen fsmount fsconfig
fspick move_mount open_tree mount_setattr pidfd_getfd kcmp lookup_dcookie uselib iopl ioperm modify_ldt mknod
mknodat shmget msgget semget inotify_init inotify_init1 fanotify_init""".split()
NAMESPACE_FLAGS = (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID,
                   CLONE_NEWNET)
AF_UNIX, SOL_SOCKET, TIOCSTI, F_SETPIPE_SZ = 1, 1, 0x5412, 1031
SOCKET_BUFFERS = (7, 8, 32, 33)   # SO_SNDBUF, SO_RCVBUF and their FORCE forms: kernel memory past RLIMIT_AS

libc = ctypes.CDLL(None, use_errno=True)


def call(result, what):
    if result < 0 if isinstance(result, int) else not result:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else os.fsencode(s)
    call(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


class Seccomp:
    """The filter, built once with libseccomp (ctypes) and loaded by each confined process."""

    class ArgCmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

    ALLOW = 0x7fff0000
    NE, EQ, MASKED_EQ = 1, 4, 7

    def __init__(self):
        lib = self.lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                               ctypes.POINTER(self.ArgCmp)]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        self.ctx = call(lib.seccomp_init(self.ALLOW), "seccomp_init")
        eperm, enosys = 0x00050000 | 1, 0x00050000 | 38
        for name in DENIED:
            self.rule(eperm, NR[name])
        self.rule(enosys, NR["clone3"])   # glibc falls back to clone, whose flags the filter can read
        for flag in NAMESPACE_FLAGS:
            self.rule(eperm, NR["clone"], (0, self.MASKED_EQ, flag, flag))
        self.rule(eperm, NR["socket"], (0, self.NE, AF_UNIX, 0))   # no network family at all
        self.rule(eperm, NR["ioctl"], (1, self.MASKED_EQ, 0xFFFFFFFF, TIOCSTI))
        for option in SOCKET_BUFFERS:
            self.rule(eperm, NR["setsockopt"], (1, self.EQ, SOL_SOCKET, 0), (2, self.EQ, option, 0))
        self.rule(eperm, NR["fcntl"], (1, self.EQ, F_SETPIPE_SZ, 0))
        self.rule(eperm, NR["prlimit64"], (0, self.NE, 0, 0))   # its own limits only (raising them fails anyway)
        for nr in range(NEWEST_REVIEWED + 1, 512):
            self.rule(enosys, nr)

    def rule(self, action, nr, *conditions):
        args = (self.ArgCmp * len(conditions))(*[self.ArgCmp(*c) for c in conditions])
        call(self.lib.seccomp_rule_add_array(self.ctx, action, nr, len(conditions), args), f"seccomp rule {nr}")

    def load(self):
        call(self.lib.seccomp_load(self.ctx), "seccomp_load")


# ---- launcher ---------------------------------------------------------------------------------------------

def launch():
    request = marshal.loads(read_exactly(0, int.from_bytes(read_exactly(0, 8), "little")))   # made by tools.py
    result_fd = os.dup(1)   # the result line's one way out; fd 1 itself is made useless for everything below
    os.dup2(os.open("/", os.O_RDONLY), 1)
    root = host_root()
    lifeline_r, lifeline_w = os.pipe()   # EOF on it tells the supervisor the launcher is gone
    try:
        if os.uname().machine != "x86_64":
            raise OSError(0, f"the sandbox supports x86_64 Linux only, not {os.uname().machine}")
        seccomp = Seccomp()
        uid, gid = os.geteuid(), os.getegid()
        flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
        call(libc.unshare(flags | (0 if root else CLONE_NEWUSER)), "unshare")
        if not root:   # one uid in the namespace: ours, as its root, with capabilities only inside it
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        call(libc.sethostname(b"sandbox", 7), "sethostname")
    except OSError as e:
        return report(result_fd, {"unavailable": str(e)})
    # Fresh uids per call (when root), worker and supervisor apart: rlimits on processes count per uid, a
    # process can change the limits of another of its uid, and nothing on the host belongs to them.
    uids = (0x40000000 + 2 * os.getpid(), 0x40000001 + 2 * os.getpid()) if root else (None, None)
    pid = os.fork()
    if pid == 0:
        os.close(lifeline_w)
        try:
            supervise(request, seccomp, uids, lifeline_r, result_fd)
        except BaseException:   # a bug here must still end pid 1, taking the namespace with it
            import traceback
            report(result_fd, {"unavailable": "sandbox supervisor failed: " + traceback.format_exc(limit=3)})
        os._exit(0)
    # The supervisor stops the code at the deadline; this is for a supervisor kept busy past it.
    pidfd = os.pidfd_open(pid)
    if not select.select([pidfd], [], [], max(0.0, request["deadline"] + GRACE - time.monotonic()))[0]:
        os.kill(pid, signal.SIGKILL)
        report(result_fd, {"ok": False, "output": "", "timeout": True})
    os.waitpid(pid, 0)
    os._exit(0)


def host_root() -> bool:
    """Root of the host, not of a user namespace (a container's root may be one; its uids are not ours)."""
    with open("/proc/self/uid_map") as f:
        return os.geteuid() == 0 and f.read().split() == ["0", "0", "4294967295"]


def read_exactly(fd, n):
    """Unbuffered: what follows the header must stay in the pipe until the supervisor reads it."""
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise EOFError("the request ended early")
        data += chunk
    return data


def report(fd, result: dict):
    """The result line; tools.py reads the last line back with ast.literal_eval (plain str, int and bool
    values). It starts on a new line, so a line cut off by a kill cannot run into it."""
    data = ("\n" + repr(result) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


# ---- supervisor (pid 1) ---------------------------------------------------------------------------------

def supervise(request, seccomp, uids, lifeline, result_fd):
    arm_parent_death(lifeline)
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # pid 1 ignores default-action signals from inside: all of them
    worker_uid, supervisor_uid = uids
    try:
        build_root(worker_uid)
    except OSError as e:
        return report(result_fd, {"unavailable": str(e)})
    (out_r, out_w), (ready_r, ready_w) = os.pipe(), os.pipe()
    calls = [os.pipe(), os.pipe()] if request["has_tests"] else None
    pid = os.fork()
    if pid == 0:
        os.close(result_fd)
        work(request, seccomp, worker_uid, [out_w, ready_w] + ([calls[0][0], calls[1][1]] if calls else []))
    for fd in (out_w, ready_w) + ((calls[0][0], calls[1][1]) if calls else ()):
        os.close(fd)
    os.chdir("/")
    confine(seccomp, supervisor_uid, request["memory_mb"], request["cpu_seconds"])
    arm_parent_death(lifeline)   # changing uid cleared it
    sys.stdout = sys.stderr = Discard()   # what the tests print goes nowhere, least of all into the result
    output = Output(out_r, request["max_output"])
    # The worker says it is confined on a pipe it closes before the code runs: whatever the code does later,
    # it cannot make a working sandbox look unavailable, nor the reverse.
    if os.read(ready_r, 1) != b"1":
        output.pump(time.monotonic() + 1, os.pidfd_open(pid))
        output.take_rest()
        return report(result_fd, {"unavailable": output.text()})
    deadline = request["deadline"]
    if calls:
        # Read only now, after the fork: the worker's memory never held the tests (it could scan it for answers).
        tests = b"".join(iter(lambda: os.read(0, 1 << 16), b"")).decode("utf-8", "surrogatepass")
        passed, message = judge(tests, request["entry_point"], Calls(calls[0][1], calls[1][0], output, deadline))
        message = message.encode("utf-8", "backslashreplace").decode()[:request["max_output"]]
        return report(result_fd, {"ok": passed, "output": message})
    if not output.pump(deadline, os.pidfd_open(pid)):
        os.kill(-1, signal.SIGKILL)   # from pid 1: every other process of the namespace
        return report(result_fd, {"ok": False, "output": output.text(), "timeout": True})
    output.take_rest()   # without waiting for the pipe's end: a daemon the worker left may hold it open
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    report(result_fd, {"ok": code == 0, "output": output.text(), "exit": code})


def arm_parent_death(lifeline):
    call(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
    if select.select([lifeline], [], [], 0)[0]:
        os._exit(1)   # the launcher died before the signal was armed


class Discard:
    def write(self, s):
        return len(s)

    def flush(self):
        pass


def build_root(worker_uid):
    """A tmpfs root holding read-only binds of the stdlib and the system libraries, and a writable /tmp.

    Each stdlib directory appears at the path this interpreter knows it by (its sys.path entry, symlinks and
    all). Every source is opened before the new root's tmpfs covers /tmp (the stdlib may live under it) and
    bound through its descriptor, without submounts (they would stay writable)."""
    stdlib = [p for p in sys.path if os.path.isdir(p)]   # -I -S: the stdlib and lib-dynload only
    sources = {}
    for path in sorted(set(stdlib) | set(map(os.path.realpath, library_dirs()))):
        if not any(path.startswith(b + "/") for b in sources):
            sources[path] = os.open(path, os.O_PATH | os.O_DIRECTORY)
    hide = [site for site in (os.path.join(p, "site-packages") for p in stdlib) if os.path.isdir(site)]
    links = [(link, os.readlink(link)) for link in ("/lib", "/lib64") if os.path.islink(link)]
    mount(None, "/", None, MS_REC | MS_PRIVATE)   # nothing below propagates back to the host
    new = "/tmp"   # any existing directory will do as the mount point: this mount is ours alone
    mount("sandbox", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    os.mkdir(new + "/tmp")   # first: a stdlib that lives under /tmp is bound inside it
    owner = f",uid={worker_uid},gid={worker_uid}" if worker_uid is not None else ""
    mount("tmp", new + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={TMP_BYTES},nr_inodes=4096,mode=0700{owner}")
    for path, fd in sources.items():
        os.makedirs(new + path)
        mount(f"/proc/self/fd/{fd}", new + path, None, MS_BIND)
        mount(None, new + path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)
    for link, target in links:   # merged-/usr systems: /lib -> usr/lib, as the loader expects
        if not os.path.lexists(new + link):
            os.symlink(target, new + link)
    for site in hide:   # installed packages are not the stdlib
        mount("empty", new + site, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k")
    os.chdir(new)
    call(libc.syscall(NR["pivot_root"], b".", b"."), "pivot_root")   # the old root is stacked on top of "/"
    call(libc.umount2(b".", MNT_DETACH), "umount old root")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    missing = [p for p in stdlib if not os.path.isdir(p)]
    if missing:
        raise OSError(0, f"the stdlib directories {missing} are not visible inside the sandbox")


def library_dirs():
    """Where the stdlib's extension modules find their shared libraries (libffi, libz, libcrypto...): the
    multiarch or lib64 directories, and those of every library loaded now; not all of /usr/lib."""
    arch = os.uname().machine + "-linux-gnu"
    dirs = {p for p in (f"/usr/lib/{arch}", f"/lib/{arch}", "/usr/lib64", "/lib64") if os.path.isdir(p)}
    with open("/proc/self/maps") as f:   # address perms offset dev inode path (the path may hold spaces)
        for fields in (line.rstrip("\n").split(maxsplit=5) for line in f):
            if len(fields) == 6 and fields[5].startswith("/") and ".so" in fields[5]:
                dirs.add(os.path.dirname(fields[5]))
    return sorted(d for d in dirs if os.path.isdir(d)) or ["/usr/lib", "/lib"]


def confine(seccomp, uid, memory_mb, cpu_seconds):
    """Drop every privilege for good: the worker, and after forking it the supervisor (with its own uid)."""
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)   # root -> an unused uid: all capabilities gone
    else:   # user namespace: we are its root; give up the capabilities it granted
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)()
        call(libc.syscall(NR["capset"], header, data), "capset")
    call(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl")   # no ptrace, no core, no /proc/<pid>/mem by peers
    memory = memory_mb << 20
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu_seconds),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, TMP_BYTES),
                         (resource.RLIMIT_NOFILE, MAX_FILES), (resource.RLIMIT_NPROC, MAX_TASKS),
                         (resource.RLIMIT_MEMLOCK, 0), (resource.RLIMIT_MSGQUEUE, 0),
                         (resource.RLIMIT_SIGPENDING, 64)):
        resource.setrlimit(limit, (value, value))
    call(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")
    seccomp.load()


class Output:
    """The worker's stdout and stderr: the first max_output characters, then a marker and the tail."""

    TAIL = 500

    def __init__(self, fd, max_output):
        self.fd, self.max_bytes, self.max_output = fd, 4 * max_output, max_output
        self.head, self.tail, self.dropped, self.open = bytearray(), b"", False, True

    def add(self, chunk):
        room = self.max_bytes - len(self.head)
        self.head += chunk[:room]
        if len(chunk) > room:
            self.tail, self.dropped = (self.tail + chunk[room:])[-4 * self.TAIL:], True

    def pump(self, deadline, fd, write=False) -> bool:
        """Keep reading the output until `fd` is readable (writable) (True) or the deadline passes (False)."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            reading = [self.fd] if self.open else []
            ready, writable, _ = select.select(reading + ([] if write else [fd]), [fd] if write else [], [],
                                               remaining)
            if fd in ready or writable:
                return True
            if ready:
                chunk = os.read(self.fd, 1 << 16)
                self.add(chunk) if chunk else setattr(self, "open", False)

    def take_rest(self):
        """What is in the pipe now, at most 64 reads: a process still writing cannot keep us here."""
        os.set_blocking(self.fd, False)
        for _ in range(64 if self.open else 0):
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                return
            self.add(chunk)

    def text(self):
        text = self.head.decode(errors="replace")
        if len(text) > self.max_output or self.dropped:
            tail = self.tail.decode(errors="replace")[-self.TAIL:] if self.dropped else ""
            return text[:self.max_output].rstrip("\n") + "\n... [output truncated] ...\n" + tail.strip("\n")
        return text.rstrip("\n")


# ---- worker ---------------------------------------------------------------------------------------------

def work(request, seccomp, uid, fds):
    """Runs in the forked child; never returns. fds: output, ready, and in check mode calls in, replies out."""
    try:
        high = [os.dup2(fd, 100 + i) for i, fd in enumerate(fds)]   # out of the way of the renumbering below
        empty_r, _ = os.pipe()
        for target, fd in zip((0, 1, 2, 3, 4, 5), [empty_r, high[0], *high]):   # stdin at EOF
            os.dup2(fd, target)
        os.closerange(2 + len(fds), 2**31 - 1)   # fd 3 ready, 4 and 5 the calls
        os.chdir("/tmp")
        confine(seccomp, uid, request["memory_mb"], request["cpu_seconds"])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the size limit fails instead of killing
        stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)
        sys.stdout = sys.stderr = stdout
        os.write(3, b"1")
        os.close(3)
    except BaseException as e:
        os.write(2, f"the sandbox could not confine the worker: {e}".encode())
        os._exit(1)
    status, scope = 1, {"__name__": "__main__", "__builtins__": builtins}
    try:
        run_cell(request["program"], scope)
        if len(fds) > 2:
            serve_calls(scope[request["entry_point"]], 4, 5)
        status = 0
    except BaseException as e:   # SystemExit too: exiting early is not success
        scope.clear()   # the code's objects (a memory bomb's too) go before the error is formatted
        e.__traceback__ = None
        import traceback
        print("".join(traceback.format_exception_only(e)).rstrip("\n"))
    finally:
        try:
            sys.stdout.flush()
        finally:
            os._exit(status)


def run_cell(code, scope):
    """Like a REPL cell: the repr of a final expression statement is printed (the C-level _ast: no `ast` import)."""
    tree = compile(code, "<sandbox>", "exec", _ast.PyCF_ONLY_AST)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], _ast.Expr) else None
    exec(compile(tree, "<sandbox>", "exec"), scope)
    if last is not None:
        value = eval(compile(_ast.Expression(last.value), "<sandbox>", "eval"), scope)
        if value is not None:
            print(repr(value))


def serve_calls(fn, req_fd, resp_fd):
    """Answer the judge's calls of the entry point until it closes the pipe."""
    import json
    for line in os.fdopen(req_fd, "rb"):
        try:
            args, kwargs = decode(json.loads(line))
            reply = json.dumps({"value": encode(fn(*args, **kwargs))})
        except Exception as e:
            reply = json.dumps({"raised": type(e).__name__, "message": str(e)[:1000]})
        if len(reply) > MAX_MESSAGE:
            reply = json.dumps({"raised": "ValueError", "message": "the result is too large to check"})
        data = (reply + "\n").encode()
        while data:
            data = data[os.write(resp_fd, data):]


# ---- judge (check mode, in the supervisor) ----------------------------------------------------------------

class Calls:
    """The judge's end of the pipes to the worker: requests out, reply lines in, while the worker's output
    keeps draining (no thread: the supervisor takes no share of the worker's budget), never past the deadline."""

    def __init__(self, req_fd, resp_fd, output, deadline):
        self.req_fd, self.resp_fd, self.output, self.deadline, self.buffer = req_fd, resp_fd, output, deadline, b""
        os.set_blocking(req_fd, False)

    def send(self, data: bytes):
        while data:
            if not self.output.pump(self.deadline, self.req_fd, write=True):
                raise TimeoutError("the solution did not take its arguments in time")
            try:
                data = data[os.write(self.req_fd, data):]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise RuntimeError("the solution's process ended") from None

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            if not self.output.pump(self.deadline, self.resp_fd):
                raise TimeoutError("the solution did not answer in time")
            chunk = os.read(self.resp_fd, 1 << 16)
            if not chunk:
                raise RuntimeError("the solution's process ended")
            self.buffer += chunk
            if len(self.buffer) > MAX_MESSAGE + 1:
                raise RuntimeError("the solution's answer is too large")
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line


def judge(tests, entry_point, calls: Calls):
    """Run the trusted tests here; only plain data comes back from the worker, so it cannot fake a pass."""
    import json
    import traceback

    def candidate(*args, **kwargs):
        calls.send((json.dumps([encode(args), encode(kwargs)]) + "\n").encode())
        reply = json.loads(calls.line())
        if "raised" in reply:
            kind = getattr(builtins, str(reply["raised"]), None)
            # only ordinary builtin errors; StopIteration would end a test's generator early, as if passed
            if not (isinstance(kind, type) and issubclass(kind, Exception)) or \
                    issubclass(kind, (StopIteration, StopAsyncIteration)):
                kind = RuntimeError
            raise kind(str(reply["message"]))
        return decode(reply["value"])

    candidate.__name__ = entry_point
    try:
        scope = {"__name__": "__main__", "__builtins__": builtins}
        exec(compile(tests, "<tests>", "exec"), scope)
        scope[entry_point] = candidate   # tests that name the function itself get the solution too
        scope["check"](candidate)
        return True, ""
    except BaseException as e:
        lines = "".join(traceback.format_exception_only(e)).strip().splitlines()
        return False, lines[-1] if lines else type(e).__name__


# Plain data only: the judge rebuilds builtin values, so no object of the code's making (a lying __eq__, a str
# subclass) reaches the tests. Subclasses (Counter, namedtuple...) cross as their base type; ints of any size
# cross (big ones in hex: json refuses to print ints of over 4,300 digits).
def encode(v):
    if v is None or v is True or v is False:
        return v
    if isinstance(v, int):
        v = int.__index__(v)
        return v if -2**63 < v < 2**63 else {"int": format(v, "x")}
    if isinstance(v, float):
        return {"float": float.__repr__(v)}
    if isinstance(v, complex):
        return {"complex": [float.__repr__(v.real), float.__repr__(v.imag)]}
    if isinstance(v, str):
        return str.__str__(v)
    if isinstance(v, bytes):
        return {"bytes": bytes.hex(v)}
    for kind in (list, tuple, set, frozenset):
        if isinstance(v, kind):
            return {kind.__name__: [encode(x) for x in kind.__iter__(v)]}
    if isinstance(v, dict):
        return {"dict": [[encode(k), encode(x)] for k, x in dict.items(v)]}
    raise TypeError(f"a {type(v).__name__} cannot be passed between the tests and the solution (plain data only)")


def decode(v):
    if v is None or type(v) in (bool, int, str):
        return v
    if type(v) is list:   # the top-level [args, kwargs] pair
        return [decode(x) for x in v]
    (kind, x), = v.items()
    if kind == "int":
        return int(x, 16)
    if kind == "float":
        return float(x)
    if kind == "complex":
        return complex(float(x[0]), float(x[1]))
    if kind == "bytes":
        return bytes.fromhex(x)
    if kind == "dict":
        return {decode(k): decode(y) for k, y in x}
    return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[kind](decode(y) for y in x)


if __name__ == "__main__":
    launch()
