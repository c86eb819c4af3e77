"""Two "nodes" on loopback: two ``lmforge pretrain --nnodes 2`` launches on one machine (node ranks 0
and 1, one process each, torchrun's static rendezvous at 127.0.0.1:P) train one DDP run."""
import json

from parallel_harness import free_port
from test_parallel_launch import lmforge, pretrain_args, text_file  # noqa: F401 (the fixture)


def test_two_nodes_on_loopback(text_file, tmp_path):  # noqa: F811
    """Two launches with --nnodes 2 (node ranks 0 and 1, one process each) meet at 127.0.0.1:P."""
    port = str(free_port())
    args = pretrain_args(text_file, tmp_path / "run", "--nproc", "1", "--nnodes", "2", "--master-addr", "127.0.0.1",
                         "--master-port", port, "--set", "dist_timeout=120")
    nodes = [lmforge([*args, "--node-rank", str(r)]) for r in (0, 1)]
    try:
        res = [p.communicate(timeout=240) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(nodes, res):
        assert p.returncode == 0, err[-3000:]
    fin = json.loads((tmp_path / "run" / "final.json").read_text())
    assert fin["parallel"]["world_size"] == 2 and fin["step"] == 3
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["train"]["nnodes"] == 2
