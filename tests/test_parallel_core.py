"""The core of distributed training: DDP (the strategy contract's step on 2 gloo ranks equals one
process), the loader's rank sharding (disjoint shares whose union is the one-process batch) and its
resume across world sizes, the launcher's command line and exit status. The trainer on 2 ranks:
tests/test_parallel_train.py; launching: tests/test_parallel_launch.py."""
import numpy as np
import pytest

from parallel_harness import assert_same_training, mini_train, run_ranks


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_step_equals_one_process(optimizer):
    """3 steps, grad_accum 2 under no_sync, clipping at 0.3 (it binds here): losses, gradient norms
    and every final parameter as one process on the global batch of 8, within 1e-5."""
    ref = mini_train("none", optimizer=optimizer, grad_clip=0.3)
    got = run_ranks(2, "parallel_harness:mini_train", parallel="ddp", optimizer=optimizer, grad_clip=0.3)
    assert_same_training(ref, got[0])
    assert got[0]["describe"] == {"strategy": "ddp", "world_size": 2, "dp_size": 2, "tp_size": 1}
    assert got[1]["state"] is None and got[1]["losses"] == got[0]["losses"]
    assert min(ref["gnorms"]) > 0.3  # the clip binds: equal norms are not an accident of no clipping


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpus_texts):
    from lmforge.train.trainer import text_to_shards

    d = tmp_path_factory.mktemp("shards")
    t = d / "t.txt"
    t.write_text("".join(corpus_texts[:1])[:30_000])
    text_to_shards(str(t), "char", d / "data")
    return d / "data"


@pytest.mark.parametrize("mode", ["windows", "bos"])
def test_loader_ranks_are_disjoint_and_their_union_is_the_one_process_batch(shards, mode):
    from lmforge.data.loader import ShardLoader

    one = ShardLoader(shards, "train", 8, 16, mode=mode, seed=3)
    ranks = [ShardLoader(shards, "train", 4, 16, mode=mode, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(5):
        rows = [ld.batch_rows(step) for ld in ranks]
        assert not set(rows[0]) & set(rows[1])
        assert sorted(np.concatenate(rows)) == list(one.batch_rows(step))
        b1 = one.next()
        bs = [ld.next() for ld in ranks]
        assert np.array_equal(np.concatenate([b.x for b in bs]), b1.x)
        assert np.array_equal(np.concatenate([b.y for b in bs]), b1.y)


def test_loader_state_resumes_across_world_sizes(shards):
    """Saved at 2 ranks x 4 rows, resumed at 1 x 8 and 4 x 2: the next global rows are the ones an
    uninterrupted 2-rank run reads; a state whose global rows per step differ is refused, naming both."""
    from lmforge.data.loader import ShardLoader

    two = [ShardLoader(shards, "train", 4, 16, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        for ld in two:
            ld.next()
    state = two[0].state_dict()
    want = np.concatenate([ld.next().x for ld in two])
    one = ShardLoader(shards, "train", 8, 16, seed=1)
    one.load_state_dict(state)
    assert np.array_equal(one.next().x, want)
    four = [ShardLoader(shards, "train", 2, 16, seed=1, rank=r, world_size=4) for r in range(4)]
    for ld in four:
        ld.load_state_dict(state)
    assert np.array_equal(np.concatenate([ld.next().x for ld in four]), want)
    with pytest.raises(ValueError, match=r"world_size=2 x batch_size=4 = 8 rows per step.*world_size=1 x "
                                         r"batch_size=4 = 4"):
        ShardLoader(shards, "train", 4, 16, seed=1).load_state_dict(state)


def test_mixture_loader_shards_and_resumes_across_world_sizes(shards):
    from lmforge.data.loader import MixtureLoader, ShardLoader

    def mix(B, r, W):
        return MixtureLoader([ShardLoader(shards, "train", B, 16, seed=s) for s in (1, 2)], [0.3, 0.7], seed=5,
                             rank=r, world_size=W)

    one = mix(8, 0, 1)
    two = [mix(4, r, 2) for r in range(2)]
    for _ in range(2):
        assert np.array_equal(np.concatenate([ld.next().x for ld in two]), one.next().x)
    state = two[1].state_dict()
    assert state == two[0].state_dict() | {"world_size": 2}
    four = [mix(2, r, 4) for r in range(4)]
    for ld in four:
        ld.load_state_dict(state)
    assert np.array_equal(np.concatenate([ld.next().x for ld in four]), one.next().x)
    with pytest.raises(ValueError, match="rows per step"):
        mix(8, 0, 2).load_state_dict(state)


def test_launch_command_lines():
    from lmforge.parallel.launch import _worst, strip_launch_flags, torchrun_command

    argv = ["--log-level", "debug", "pretrain", "--nproc", "2", "--text", "t.txt", "--nnodes=2", "--node-rank", "1",
            "--master-addr", "10.0.0.1", "--master-port=2950", "--set", "nproc=2"]
    assert strip_launch_flags(argv) == ["--log-level", "debug", "pretrain", "--text", "t.txt", "--set", "nproc=2"]
    one = torchrun_command(["pretrain"], 2)
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m", "lmforge",
                       "pretrain"]
    two = torchrun_command(["pretrain"], 1, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=2950,
                           rdzv_timeout=7)
    assert "--node-rank=1" in two and "--master-port=2950" in two and "--rdzv-conf=timeout=7" in two
    with pytest.raises(ValueError, match="master_port"):
        torchrun_command(["pretrain"], 1, nnodes=2)
    with pytest.raises(ValueError, match="node_rank"):
        torchrun_command(["pretrain"], 1, nnodes=2, node_rank=2, master_port=1)
    with pytest.raises(ValueError, match="nproc"):
        torchrun_command(["pretrain"], 0)
    # the job's status: the first failed rank's (torchrun's root cause); a signal S is 128 + S
    assert _worst([], 0) == 0 and _worst([2, 2], 1, root=2) == 2 and _worst([-15, -9], 1, root=-9) == 137
    assert _worst([], 1) == 1 and _worst([1, 2], 1) == 2 and _worst([], -9) == 137


def test_per_rank_batch_and_settings():
    from lmforge.parallel.base import Strategy
    from lmforge.parallel.env import DistEnv
    from lmforge.train.loop import LoopConfig, check_loop_config, per_rank_batch

    s = Strategy(LoopConfig(), DistEnv(rank=0, world_size=4))
    assert per_rank_batch(LoopConfig(global_batch_size=32, grad_accum=2), s).batch_size == 4
    assert per_rank_batch(LoopConfig(batch_size=3), s).batch_size == 3
    with pytest.raises(ValueError, match=r"global_batch_size = 12 is not a multiple of the 4 data-parallel .*"
                                         r"grad_accum = 2 \(= 8\)"):
        per_rank_batch(LoopConfig(global_batch_size=12, grad_accum=2), s)
    for bad, msg in ((dict(parallel="dpp"), "parallel: unknown strategy 'dpp'"), (dict(nproc=0), "nproc"),
                     (dict(dist_timeout=0), "dist_timeout"), (dict(global_batch_size=-1), "global_batch_size")):
        with pytest.raises(ValueError, match=msg):
            check_loop_config(LoopConfig(max_steps=1, **bad))


def test_bad_launch_flags_are_usage_errors(tmp_path, capsys):
    """Refused before anything starts (exit status 2, the flag named)."""
    from lmforge.cli import main

    (tmp_path / "t.txt").write_text("x" * 2000)
    base = ["pretrain", "--text", str(tmp_path / "t.txt"), "--max-steps", "1", "--out", str(tmp_path / "r")]
    assert main([*base, "--nproc", "0"]) == 2
    assert "--nproc: expected a positive integer, got 0" in capsys.readouterr().err
    assert main([*base, "--nproc", "1", "--nnodes", "2"]) == 2
    assert "--master-port: nnodes = 2 needs the port" in capsys.readouterr().err
    assert main([*base, "--nproc", "1", "--nnodes", "2", "--node-rank", "2", "--master-port", "29999"]) == 2
    assert "--node-rank: 2 is not in [0, nnodes=2)" in capsys.readouterr().err
    assert main([*base, "--set", "parallel=zero9"]) == 2
    assert "parallel: unknown strategy 'zero9'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
