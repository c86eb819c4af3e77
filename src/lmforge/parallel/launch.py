"""Launching N processes of an lmforge command through torchrun (``python -m torch.distributed.run``).

Knows the command line torchrun takes (one node: ``--standalone``, a rendezvous on a free local port;
several: the static rendezvous at ``--master-addr:--master-port`` with this node's ``--node-rank``
and a join timeout), how ``lmforge pretrain --nproc N ...`` becomes ``torchrun ... -m lmforge
pretrain ...`` (the same arguments minus the launch flags), whether this process already runs
under torchrun (``under_torchrun``), and the job's exit status: 0 when every rank succeeded, else
the status of the rank that failed first (the "root cause" of the failure summary torchrun prints;
the ranks torchrun then ends are its consequence), a rank killed by signal S counting as 128 + S.
A rendezvous that times out (a node that never started, a wrong address) is reported naming
``dist_timeout``, the setting that bounds it. Knows nothing of training.

torchrun passes Ctrl-C on to the ranks (they stop together at a step boundary with one checkpoint,
``train.loop``) and, when one rank dies, ends the others (SIGTERM, then SIGKILL after its
shutdown timeout): the job then fails with the last complete checkpoint on disk.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

# the flags this module consumes (their values follow them, or come after "=")
LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")

_RDZV_FAILED = re.compile(r"RendezvousTimeoutError|DistStoreError|RendezvousConnectionError|"
                          r"Timed out after \d+ seconds waiting for clients|timed out|Connection refused",
                          re.IGNORECASE)
_EXITCODE = re.compile(r"exitcode\s*:\s*(-?\d+)")


def under_torchrun(env=None) -> bool:
    """Whether this process is a rank that torchrun (or a launcher setting its variables) started."""
    env = os.environ if env is None else env
    return "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env)


def strip_launch_flags(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` and the other launch flags."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def torchrun_command(args: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
                     master_addr: str = "127.0.0.1", master_port: int = 0, rdzv_timeout: float = 300) -> list[str]:
    """The torchrun command line that runs ``python -m lmforge <args>`` on ``nproc`` ranks of this node."""
    for k, v in (("nproc", nproc), ("nnodes", nnodes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{k}: expected a positive integer, got {v!r}")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"node_rank: {node_rank} is not in [0, nnodes={nnodes})")
    if rdzv_timeout <= 0:
        raise ValueError(f"dist_timeout: the rendezvous timeout must be > 0 seconds, got {rdzv_timeout}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes == 1:
        cmd += ["--standalone"]
    else:
        if not master_port:
            raise ValueError(f"master_port: nnodes = {nnodes} needs the port every node meets at "
                             "(--master-port P, the same on every node)")
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={master_addr}",
                f"--master-port={master_port}", f"--rdzv-conf=timeout={max(1, int(round(rdzv_timeout)))}"]
    return cmd + ["-m", "lmforge", *args]


def _worst(codes: list[int], status: int, root: int | None = None) -> int:
    """The job's exit status: the failed rank's that torchrun names the root cause (the first to fail:
    the others are often only its consequence, ended by torchrun), else the worst of ``codes``, else
    torchrun's own; a rank killed by signal S counts as 128 + S."""
    def norm(c):
        return 128 - c if c < 0 else c

    if root is not None and root != 0:
        return norm(root)
    failed = [norm(c) for c in codes if c != 0]
    if failed:
        return max(failed)
    return norm(status)


def launch(args: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0, master_addr: str = "127.0.0.1",
           master_port: int = 0, rdzv_timeout: float = 300, env: dict | None = None) -> int:
    """Run ``python -m lmforge <args>`` on ``nproc`` ranks here (of ``nnodes`` nodes) through torchrun;
    return the job's exit status (0 when every rank succeeded, else the first failed rank's). Collective
    over the nodes: every node runs this with its own ``node_rank`` and the same master address and
    port. torchrun's output passes through (stderr is also read for the failure summary)."""
    cmd = torchrun_command(args, nproc, nnodes, node_rank, master_addr, master_port, rdzv_timeout)
    e = {**os.environ, **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID", "GROUP_RANK"):
        e.pop(k, None)  # (a launcher inside a rank would otherwise hand its place to the job)
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    e["PYTHONPATH"] = os.pathsep.join(p for p in (src, e.get("PYTHONPATH", "")) if p)  # the same lmforge
    proc = subprocess.Popen(cmd, env=e, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
    codes: list[int] = []
    rdzv, root = [], []

    def pump():
        in_root = False
        for line in proc.stderr:
            sys.stderr.write(line)
            in_root = in_root or "Root Cause" in line
            m = _EXITCODE.search(line)
            if m:
                codes.append(int(m.group(1)))
                if in_root and not root:
                    root.append(int(m.group(1)))
            if _RDZV_FAILED.search(line):
                rdzv.append(line.strip())
        sys.stderr.flush()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    interrupted = False
    while True:
        try:
            status = proc.wait()
            break
        except KeyboardInterrupt:  # torchrun has the Ctrl-C too and passes it to the ranks: wait for them
            interrupted = True
    t.join(timeout=10)
    if status != 0 and rdzv and not codes:
        where = f"{master_addr}:{master_port}" if nnodes > 1 else "this machine"
        print(f"lmforge: error: the rendezvous of {nnodes} node(s) at {where} did not complete within "
              f"dist_timeout = {rdzv_timeout:g} s (--set dist_timeout=SECONDS): start every node (the same "
              f"--nnodes, --master-addr and --master-port, each its own --node-rank) within that time",
              file=sys.stderr)
    worst = _worst(codes, status, root[0] if root else None)
    if interrupted and worst in (0, 1):
        return 130
    return worst


def relaunch(argv: list[str], cfg, nproc: int, nnodes: int, node_rank: int = 0, master_addr: str = "127.0.0.1",
             master_port: int = 0) -> int:
    """``lmforge STAGE ... --nproc N``: the same command under torchrun (minus the launch flags); with
    ``parallel = "none"`` the ranks run DDP (``--set parallel=ddp`` is added, and said)."""
    import logging

    args = strip_launch_flags(list(argv))
    if cfg.parallel == "none":
        logging.getLogger("lmforge.parallel").info(
            f"--nproc {nproc}{f' --nnodes {nnodes}' if nnodes > 1 else ''} with parallel = 'none': running "
            "parallel = 'ddp' (set parallel to choose another strategy)")
        args += ["--set", "parallel=ddp"]
    for k, v in (("nproc", nproc), ("nnodes", nnodes)):
        args += ["--set", f"{k}={v}"]
    return launch(args, nproc, nnodes, node_rank, master_addr, master_port, rdzv_timeout=cfg.dist_timeout)


def add_launch_flags(p) -> None:
    """The launch flags of a training subcommand (pretrain, sft, dpo)."""
    g = p.add_argument_group("launch (torchrun; docs/distributed.md)")
    g.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="processes on this machine (runs the command under torchrun; default: the config's nproc, 1)")
    g.add_argument("--nnodes", type=int, default=None, metavar="M", help="machines taking part (default 1)")
    g.add_argument("--node-rank", type=int, default=0, metavar="R", help="this machine's place, 0..M-1")
    g.add_argument("--master-addr", default="127.0.0.1", metavar="ADDR", help="node 0's address (nnodes > 1)")
    g.add_argument("--master-port", type=int, default=0, metavar="PORT", help="node 0's port (nnodes > 1)")


def maybe_launch(a, cfg) -> int | None:
    """For a subcommand handler: when ``--nproc`` / ``--nnodes`` (or the config's ``nproc`` / ``nnodes``) ask
    for more than one process and this process is not already a rank, run the job under torchrun and
    return its exit status; else None (this process trains)."""
    from .._config import UsageError

    for k in ("nproc", "nnodes"):
        v = getattr(a, k, None)
        if v is not None and v < 1:
            raise UsageError(f"--{k}: expected a positive integer, got {v}")
    if under_torchrun():
        return None
    nproc = a.nproc if getattr(a, "nproc", None) is not None else cfg.nproc
    nnodes = a.nnodes if getattr(a, "nnodes", None) is not None else cfg.nnodes
    if nproc <= 1 and nnodes <= 1:
        return None
    argv = getattr(a, "_argv", None)
    if argv is None:
        raise UsageError("--nproc: the command line to launch is unknown (call lmforge.cli.main)")
    try:  # the launch's own settings, checked before anything starts
        torchrun_command([], nproc, nnodes, a.node_rank, a.master_addr, a.master_port, cfg.dist_timeout)
    except ValueError as e:
        raise UsageError(str(e).replace("master_port:", "--master-port:").replace("node_rank:", "--node-rank:")) \
            from None
    return relaunch(argv, cfg, nproc, nnodes, a.node_rank, a.master_addr, a.master_port)

