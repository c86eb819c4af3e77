"""Runs untrusted generated Python (a completion plus its unit tests) in a separate process, under limits.

Knows how to start a fresh interpreter in a throwaway directory, fence it in (Linux namespaces,
resource limits, a pids cgroup where one is writable), capture its output and say why it ended
(``Outcome.status``). Knows nothing of tasks or pass@k: the harness builds the program text
(prompt + completion + test) and counts the passes.

What the child gets (``run_python``):

* a fresh ``python -I -S`` (the harness's interpreter; isolated mode, no site: the standard library
  only), an EMPTY environment (the interpreter's own PEP 538 ``LC_CTYPE`` is removed again), stdin
  from /dev/null, as working directory a new temporary directory holding ``main.py`` (removed
  afterwards, whatever the program left in it);
* resource limits set before the program's interpreter starts (``Limits``): RLIMIT_CPU (CPU
  seconds of each process, rounded up to whole seconds), RLIMIT_AS (address space: a large allocation raises ``MemoryError``), RLIMIT_FSIZE
  (largest file it may write), RLIMIT_NOFILE, RLIMIT_NPROC and RLIMIT_CORE = 0;
* its own session and process group; at the wall-clock limit (or when it is done) the whole group,
  the PID namespace and the cgroup are killed, so no process it started outlives the call;
* stdout and stderr through pipes, each capped at ``Limits.output_bytes`` (more: killed, status
  ``output_limit``).

Isolation, where Linux allows it (unprivileged user namespaces; checked by ``network_isolation()``):
a new user namespace (the caller's uid mapped to root inside), a new network namespace (only a
loopback device, down: no connection to anything, the host's loopback included), a new PID
namespace (the program cannot see or signal the harness; the sandbox's own init is PID 1, because
the kernel drops signals such as SIGXCPU sent to a PID 1 without a handler, and the program is PID 2;
when the program ends, init ends and the kernel kills whatever is left) and a new mount namespace in
which every mount is remounted read-only except a bind of the work directory: the program can write
only there (and to device nodes such as /dev/null). So /tmp and /dev/shm are read-only too: ``tempfile``
and ``multiprocessing`` locks fail; generated code should write in its current directory.
Where namespaces are not available, ``run_python`` refuses (``SandboxUnavailable``, saying why)
unless ``allow_network=True``; then only the limits, the empty environment, the work directory and
the process-group kill apply, and nothing stops writes elsewhere that the user may make.
``allow_network=True`` also leaves out the network namespace where it is available.

RLIMIT_NPROC counts a user's processes, and the kernel does not enforce it for real root. In a new
user namespace the count is per namespace (each run counts only its own processes); without one it
would count every process of the user, so there the limit is the user's current count plus
``nproc``. When the harness runs as root, a pids cgroup (v1 ``pids`` hierarchy or cgroup v2 with the
pids controller, if writable) with ``pids.max`` carries the limit instead; with neither, a fork bomb
is stopped only by the wall-clock limit.

This is a guard against accidents of generated code (a loop that never ends, a huge allocation,
a fork, a stray write or download), NOT a security boundary against a determined attacker: the
program runs with the caller's uid on the host kernel, can read every file the caller can, and a
mount or ptrace call made on purpose may undo parts of it. Run hostile code in a VM or container.

Statuses (``STATUSES``):

* ``passed``: exited 0 within every limit.
* ``failed``: exited non-zero (an exception, a failing assert, ``sys.exit(n)``, a syntax error).
* ``timeout``: still running at ``Limits.wall_s``; killed with every process it started.
* ``cpu_limit``: used ``Limits.cpu_s`` CPU seconds (SIGXCPU, or SIGKILL at the hard limit).
* ``memory``: hit the address-space limit (``MemoryError`` in the program).
* ``killed``: died of another signal (a segfault, an abort, an outside SIGKILL such as the OOM killer's).
* ``error``: the sandbox could not run the program (setup failed: namespaces, mounts, exec); the
  message is in ``stderr``. Scored as a failure, but it is the harness's fault, not the sample's.
* ``output_limit``: wrote more than ``Limits.output_bytes`` to stdout or stderr, or a file larger
  than ``Limits.fsize_mb`` (``OSError`` EFBIG).
"""
from __future__ import annotations

import itertools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Limits", "Outcome", "STATUSES", "SandboxUnavailable", "run_python", "run_many", "network_isolation"]

STATUSES = ("passed", "failed", "timeout", "cpu_limit", "memory", "killed", "error", "output_limit")

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
RUNNER_TAG = "lmforge-sandbox-runner"  # in every sandboxed interpreter's command line (tests look for leftovers)


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot isolate the program as asked (no namespaces here) and the caller did not opt out."""


@dataclass(frozen=True)
class Limits:
    cpu_s: float = 5.0  # CPU seconds of each process (RLIMIT_CPU soft; hard = soft + 1)
    wall_s: float = 10.0  # wall-clock seconds for the whole run
    memory_mb: int = 512  # address space of each process (RLIMIT_AS)
    fsize_mb: int = 8  # largest file a process may write (RLIMIT_FSIZE)
    nproc: int = 16  # processes the program may have at once, itself included
    nofile: int = 64  # open file descriptors per process (RLIMIT_NOFILE)
    output_bytes: int = 1 << 20  # cap on each of stdout and stderr

    def __post_init__(self):
        for name in ("cpu_s", "wall_s", "memory_mb", "fsize_mb", "nproc", "nofile", "output_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"Limits.{name} must be a positive number, got {v!r}")
        for name in ("memory_mb", "fsize_mb", "nproc", "nofile", "output_bytes"):
            if not float(getattr(self, name)).is_integer():
                raise ValueError(f"Limits.{name} must be a whole number, got {getattr(self, name)!r}")
        if self.memory_mb < 32:
            raise ValueError(f"Limits.memory_mb={self.memory_mb}: a Python interpreter needs at least 32 MB "
                             "of address space to start")
        if self.nofile < 8:
            raise ValueError(f"Limits.nofile={self.nofile}: the interpreter needs at least 8 descriptors")


@dataclass
class Outcome:
    passed: bool
    status: str  # one of STATUSES
    returncode: int | None  # the program's exit code, -N for a signal N, None when it never ran or was killed by us
    stdout: str
    stderr: str
    wall_s: float


# The supervisor: the first process (python -I -S -c _SUPERVISOR CONFIG). It joins the cgroup,
# enters the namespaces, makes the filesystem read-only but the work dir, forks the program's
# process (PID 1 of the new PID namespace), sets its limits and execs a fresh interpreter running
# _RUNNER. It reports on the status pipe (one JSON object a line) and exits with the program's status.
_SUPERVISOR = r'''
import json, os, sys
cfg = json.loads(sys.argv[1])
fd = cfg["fd"]
def say(**k):
    try:
        os.write(fd, (json.dumps(k) + "\n").encode())
    except OSError:
        pass
def fail(msg):
    say(setup_error=msg)
    os._exit(125)
flags = cfg["unshare"]
wd = cfg["workdir"]
if cfg["cgroup"]:
    try:
        with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError as e:
        fail("cannot join the pids cgroup %s: %s" % (cfg["cgroup"], e))
if flags:
    if flags & 0x30020000 != 0x30020000:  # mounts below must only ever touch a new mount namespace
        fail("namespaces must include CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWPID, got flags %#x" % flags)
    import ctypes, re
    libc = ctypes.CDLL(None, use_errno=True)
    def mount(src, tgt, fstype, fl):
        enc = lambda s: None if s is None else s.encode()
        if libc.mount(enc(src), enc(tgt), enc(fstype), ctypes.c_ulong(fl), None) != 0:
            return os.strerror(ctypes.get_errno())
        return None
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(flags) != 0:
        fail("unshare(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWPID%s) failed: %s"
             % ("|CLONE_NEWNET" if flags & 0x40000000 else "", os.strerror(ctypes.get_errno())))
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", "0 %d 1" % uid), ("gid_map", "0 %d 1" % gid)):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
    except OSError as e:
        fail("cannot map the user into the new user namespace: %s" % e)
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
    MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
    keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
            "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
    e = mount(None, "/", None, MS_REC | MS_PRIVATE)
    if e:
        fail("cannot make the mounts private: %s" % e)
    e = mount(wd, wd, None, MS_BIND | MS_REC)
    if e:
        fail("cannot bind the work directory %s: %s" % (wd, e))
    unesc = lambda s: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)
    pseudo = {"proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "securityfs", "debugfs", "tracefs",
              "bpf", "pstore", "fusectl", "configfs", "binfmt_misc", "autofs", "efivarfs", "hugetlbfs"}
    with open("/proc/self/mountinfo") as f:
        mounts = []
        for l in f:
            pre, _, post = l.partition(" - ")
            mounts.append((unesc(pre.split()[4]), pre.split()[5].split(","), (post.split() or ["?"])[0]))
    for mp, opts, fstype in mounts:
        if mp == wd or mp.startswith(wd + "/") or "ro" in opts:
            continue
        fl = MS_REMOUNT | MS_BIND | MS_RDONLY
        for o in opts:
            fl |= keep.get(o, 0)
        e = mount(None, mp, None, fl)
        if e and fstype not in pseudo:  # a writable filesystem left writable: refuse rather than pretend
            fail("cannot make %s (%s) read-only: %s" % (mp, fstype, e))
def report(status, ru):
    cpu = ru.ru_utime + ru.ru_stime
    if os.WIFSIGNALED(status):
        say(signal=os.WTERMSIG(status), cpu_s=cpu)
        os._exit(128 + os.WTERMSIG(status))
    say(exit=os.WEXITSTATUS(status), cpu_s=cpu)
    os._exit(os.WEXITSTATUS(status))
def program():
    try:
        import resource
        for name, soft, hard in cfg["rlimits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-c", cfg["runner"], str(fd)], {})
    except BaseException as e:
        say(setup_error="cannot start the program: %s: %s" % (type(e).__name__, e))
    os._exit(125)
pid = os.fork()
if pid == 0:
    try:
        os.chdir(wd)  # onto the writable bind, not the read-only directory under it
    except OSError as e:
        say(setup_error="cannot enter the work directory: %s" % e)
        os._exit(125)
    if not flags & 0x20000000:
        program()
    # PID 1 of the new namespace: the kernel drops signals PID 1 has no handler for (SIGXCPU, SIGTERM),
    # so the program runs as its child, PID 2; this init reaps orphans until the program ends
    mount("proc", "/proc", "proc", 2 | 4 | 8)  # this namespace's processes only; best effort
    child = os.fork()
    if child == 0:
        program()
    while True:
        try:
            got, status, ru = os.wait4(-1, 0)
        except ChildProcessError:
            os._exit(125)
        if got == child:
            report(status, ru)
say(pid1=pid)
_, status, ru = os.wait4(pid, 0)
if not flags & 0x20000000:
    report(status, ru)
if os.WIFSIGNALED(status):
    say(init_signal=os.WTERMSIG(status))
os._exit(125)
'''

# The program's interpreter: runs main.py as __main__ and notes on the status pipe which exception
# ended it (a MemoryError or an EFBIG is a limit, not a wrong answer).
_RUNNER = "# " + RUNNER_TAG + r'''
import os, sys
fd = int(sys.argv[1])
sys.argv = ["main.py"]
os.environ.pop("LC_CTYPE", None)  # set by the interpreter's own C-locale coercion (PEP 538): the env was empty
try:
    with open("main.py", encoding="utf-8") as f:
        src = f.read()
    exec(compile(src, "main.py", "exec"), {"__name__": "__main__", "__file__": "main.py"})
except BaseException as e:
    if not isinstance(e, SystemExit):
        try:
            os.write(fd, ('{"exc": "%s", "errno": %d}\n' % (type(e).__name__, getattr(e, "errno", 0) or 0)).encode())
        except Exception:
            pass
        e.__traceback__ = e.__traceback__.tb_next  # the traceback from main.py on, not this frame
        sys.excepthook(type(e), e, e.__traceback__)
        sys.exit(1)
    raise
'''

_probe_cache: dict[bool, str | None] = {}
_counter = itertools.count()


def network_isolation() -> str | None:
    """None when programs can run in their own user, network, PID and mount namespaces here; otherwise
    why not (the reason ``run_python`` gives when it refuses). Checked once per process by running a
    program that must see no network and a read-only filesystem."""
    if True not in _probe_cache:
        _probe_cache[True] = _probe()
    return _probe_cache[True]


def _probe() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"namespaces are Linux-only; this is {sys.platform}"
    try:
        mx = Path("/proc/sys/user/max_user_namespaces").read_text().strip()
        if mx == "0":
            return "user namespaces are disabled (/proc/sys/user/max_user_namespaces = 0)"
    except OSError:
        pass
    probe = ("import socket, os\n"
             "assert [l for l in open('/proc/net/dev').read().splitlines()[2:] if not l.strip().startswith('lo:')] == []\n"
             "p = '/etc/.lmforge-sandbox-probe-%d' % os.getppid()\n"
             "try:\n    os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY))\nexcept OSError:\n    pass\n"
             "else:\n    os.unlink(p)\n    raise SystemExit('/etc is writable: the read-only remount did not hold')\n")
    out = _run(probe, Limits(cpu_s=5, wall_s=20), _FLAGS_ALL)
    if out.status != "passed":
        why = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.status
        if "unshare" in why and "Operation not permitted" in why:
            why += (" (unprivileged user namespaces are not allowed here: see kernel.unprivileged_userns_clone "
                    "or an AppArmor restriction such as kernel.apparmor_restrict_unprivileged_userns)")
        return f"the namespace sandbox does not work here: {why}"
    return None


_FLAGS_ALL = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET


def run_python(code: str, limits: Limits = Limits(), *, allow_network: bool = False) -> Outcome:
    """Run ``code`` (a whole Python program, e.g. prompt + completion + tests) in the sandbox and say how it
    ended. Never raises for anything the program does; raises ``SandboxUnavailable`` when namespaces are
    not available and ``allow_network`` is False, TypeError for non-str code or limits."""
    if not isinstance(code, str):
        raise TypeError(f"run_python: code must be a str (a Python program), got {type(code).__name__}")
    if not isinstance(limits, Limits):
        raise TypeError(f"run_python: limits must be a sandbox.Limits, got {type(limits).__name__}")
    reason = network_isolation()
    if reason is None:
        flags = _FLAGS_ALL & ~(CLONE_NEWNET if allow_network else 0)
    elif allow_network:
        flags = 0
    else:
        raise SandboxUnavailable(
            f"refusing to run generated code: {reason}. Without a network namespace the program could reach the "
            "network and write outside its directory; pass allow_network=True (lmforge eval: --allow-network) "
            "to run it with only resource limits, a throwaway directory and an empty environment")
    return _run(code, limits, flags)


def run_many(codes, limits: Limits = Limits(), workers: int = 2, *, allow_network: bool = False) -> list[Outcome]:
    """``run_python`` on each program, ``workers`` at a time; the outcomes in the order of ``codes``."""
    codes = list(codes)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"run_many: workers must be an int >= 1, got {workers!r}")
    for i, c in enumerate(codes):
        if not isinstance(c, str):
            raise TypeError(f"run_many: codes[{i}] must be a str (a Python program), got {type(c).__name__}")
    if not codes:
        return []
    network_isolation()  # probe once, before the threads
    with ThreadPoolExecutor(max_workers=min(workers, len(codes))) as ex:
        return list(ex.map(lambda c: run_python(c, limits, allow_network=allow_network), codes))


# ---- the parent side ----

def _pids_cgroup_root() -> Path | None:
    """A writable directory of a pids cgroup hierarchy (root only), or None."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for l in lines:
        pre, _, post = l.partition(" - ")
        fields, tail = pre.split(), post.split()
        if len(tail) < 3 or len(fields) < 5:
            continue
        mp = Path(fields[4])
        if tail[0] == "cgroup" and "pids" in tail[2].split(","):
            return mp if os.access(mp, os.W_OK) else None
        if tail[0] == "cgroup2":
            try:
                if "pids" in (mp / "cgroup.subtree_control").read_text().split() and os.access(mp, os.W_OK):
                    return mp
            except OSError:
                pass
    return None


_CGROUP_ROOT: list = []


def _make_cgroup(limit: int) -> Path | None:
    if not _CGROUP_ROOT:
        _CGROUP_ROOT.append(_pids_cgroup_root())
    root = _CGROUP_ROOT[0]
    if root is None:
        return None
    cg = root / f"lmforge-sandbox-{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:8]}"
    try:
        cg.mkdir()
        (cg / "pids.max").write_text(str(limit))
        return cg
    except OSError:
        _remove_cgroup(cg)
        _CGROUP_ROOT[0] = None  # not usable after all: stop trying
        return None


def _cgroup_pids(cg: Path) -> list[int]:
    try:
        return [int(p) for p in (cg / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _remove_cgroup(cg: Path) -> None:
    for _ in range(100):
        for p in _cgroup_pids(cg):
            _kill(p)
        try:
            cg.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _user_process_count() -> int:
    uid = os.getuid()
    n = 0
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if p.stat().st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def _rlimits(limits: Limits, flags: int) -> list:
    cpu = max(1, int(limits.cpu_s + 0.999))
    mem = int(limits.memory_mb) << 20
    fsize = int(limits.fsize_mb) << 20
    nproc = int(limits.nproc) + 2  # + the supervisor and the namespace's init, counted in the same user namespace
    if not flags & CLONE_NEWUSER and sys.platform.startswith("linux"):
        nproc += _user_process_count()  # no namespace: the count is every process of this user
    return [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_AS", mem, mem), ("RLIMIT_FSIZE", fsize, fsize),
            ("RLIMIT_NOFILE", int(limits.nofile), int(limits.nofile)), ("RLIMIT_NPROC", nproc, nproc),
            ("RLIMIT_CORE", 0, 0)]


def _rmtree(path: str) -> None:
    def onerror(func, p, exc):
        # a directory the program made unreadable (chmod 0): give it back to us. Never through a symlink
        # (chmod follows links: a link to /etc must not make /etc 0700)
        for q in (os.path.dirname(p), p):
            try:
                if (q == path or q.startswith(path + os.sep)) and not os.path.islink(q):
                    os.chmod(q, 0o700)
            except OSError:
                pass
        try:
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=onerror)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


def _run(code: str, limits: Limits, flags: int) -> Outcome:
    t0 = time.perf_counter()
    wd = os.path.realpath(tempfile.mkdtemp(prefix="lmforge-sandbox-"))
    cg = None
    proc = None
    r_status = w_status = -1
    out = {1: bytearray(), 2: bytearray()}
    notes: dict = {}
    timed_out = over_output = False
    try:
        with open(os.path.join(wd, "main.py"), "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(code)
        cg = _make_cgroup(int(limits.nproc) + 2)
        r_status, w_status = os.pipe()
        cfg = {"fd": w_status, "unshare": flags, "workdir": wd, "cgroup": str(cg) if cg else None,
               "python": sys.executable, "runner": _RUNNER, "rlimits": _rlimits(limits, flags)}
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _SUPERVISOR, json.dumps(cfg)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env={}, cwd=wd, start_new_session=True, pass_fds=(w_status,))
        except OSError as e:
            return Outcome(False, "error", None, "", f"sandbox: cannot start {sys.executable}: {e}",
                           time.perf_counter() - t0)
        os.close(w_status)
        w_status = -1
        status_buf = bytearray()
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, 1)
        sel.register(proc.stderr, selectors.EVENT_READ, 2)
        sel.register(r_status, selectors.EVENT_READ, 0)
        deadline = t0 + float(limits.wall_s)
        drain_until = None
        while sel.get_map():
            now = time.perf_counter()
            if drain_until is None and _exited(proc):
                # the supervisor is gone: nothing it started may outlive it; read what is left
                _cleanup(proc, notes, cg, status_buf)
                drain_until = now + 0.5
            limit_t = drain_until if drain_until is not None else deadline
            if now >= limit_t:
                if drain_until is None:
                    timed_out = True
                break
            for key, _ in sel.select(min(limit_t - now, 0.05)):
                fd = key.fileobj if isinstance(key.fileobj, int) else key.fileobj.fileno()
                data = os.read(fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                if key.data == 0:
                    if len(status_buf) < 1 << 16:  # a few lines of JSON; the program could write there too
                        status_buf += data
                    continue
                buf = out[key.data]
                room = int(limits.output_bytes) - len(buf)
                buf += data[:max(room, 0)]
                if len(data) > room:
                    over_output = True
            if over_output:
                break
        sel.close()
        _cleanup(proc, notes, cg, status_buf)
        proc.wait()
        _parse_notes(status_buf, notes)
    finally:
        if proc is not None and proc.returncode is None:  # an exception here (KeyboardInterrupt): stop it all
            _cleanup(proc, notes, cg, bytearray())
            proc.wait()
        for fd in (r_status, w_status):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if proc is not None:
            for s in (proc.stdout, proc.stderr):
                if s is not None:
                    s.close()
        if cg is not None:
            _remove_cgroup(cg)
        _rmtree(wd)
    wall = time.perf_counter() - t0
    stdout = out[1].decode("utf-8", "replace")
    stderr = out[2].decode("utf-8", "replace")
    status, rc = _classify(notes, timed_out, over_output, limits, proc.returncode)
    if status == "error" and "setup_error" in notes:
        stderr = (stderr + ("\n" if stderr else "") + "sandbox: " + notes["setup_error"])
    elif status == "timeout":
        stderr += f"\nsandbox: killed after the wall-clock limit of {limits.wall_s} s"
    elif status == "output_limit" and over_output:
        stderr += f"\nsandbox: killed for writing more than {int(limits.output_bytes)} bytes to stdout or stderr"
    return Outcome(status == "passed", status, rc, stdout, stderr, wall)


def _parse_notes(buf: bytearray, notes: dict) -> None:
    for line in bytes(buf).decode("utf-8", "replace").splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict):
            for k, v in d.items():
                notes.setdefault(k, v)


def _cleanup(proc, notes: dict, cg, status_buf: bytearray) -> None:
    """Kill everything the run started: the program's first process (its PID namespace dies with it) while
    the supervisor still holds it (so the pid cannot have been reused), then the process group, then
    whatever is left in the cgroup."""
    _parse_notes(status_buf, notes)
    pid1 = notes.get("pid1")
    if isinstance(pid1, int) and pid1 > 1 and not _exited(proc):
        _kill(pid1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if cg is not None:
        for p in _cgroup_pids(cg):
            _kill(p)


def _exited(proc) -> bool:
    """Has the supervisor ended? Without reaping it: while it is a zombie its pid (= its process group's id)
    cannot be reused, so killing the group cannot hit an unrelated process."""
    if proc.returncode is not None:
        return True
    if not hasattr(os, "waitid"):  # macOS before Python 3.13
        return proc.poll() is not None
    try:
        r = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return r is not None


def _classify(notes: dict, timed_out: bool, over_output: bool, limits: Limits, sup_rc) -> tuple[str, int | None]:
    if "exit" in notes:
        rc = notes["exit"]
    elif "signal" in notes:
        rc = -int(notes["signal"])
    else:
        rc = None
    if timed_out:
        return "timeout", rc
    if over_output:
        return "output_limit", rc
    if "setup_error" in notes:
        return "error", rc
    if "signal" in notes:
        sig = int(notes["signal"])
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and notes.get("cpu_s", 0) >= int(limits.cpu_s + 0.999)):
            return "cpu_limit", rc
        if sig == signal.SIGXFSZ:
            return "output_limit", rc
        return "killed", rc
    if "exit" not in notes:  # the supervisor died without a word
        return ("killed" if sup_rc is not None and sup_rc < 0 else "error"), rc
    exc = notes.get("exc")
    if exc == "MemoryError":
        return "memory", rc
    if notes.get("errno") == 27:  # EFBIG: RLIMIT_FSIZE (Python ignores SIGXFSZ, so the write fails)
        return "output_limit", rc
    return ("passed" if rc == 0 else "failed"), rc
