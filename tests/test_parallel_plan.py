"""The memory planner: the ZeRO paper's anchor, the activation formulas on a worked example, exact
mode against the bytes one process really holds, ``lmforge plan`` and its bad inputs."""
from __future__ import annotations

import json

import pytest
import torch

from lmforge.parallel import plan as P


def test_zero_paper_figure1_anchor():
    # Rajbhandari et al. 2020, Figure 1: Psi = 7.5B, N_d = 64, K = 12 -> 120, 31.4, 16.6, 1.9 GB
    got = {s: sum(P.model_state_bytes(7.5e9, s, 64).values()) / P.GB for s in ("ddp", "zero1", "zero2", "zero3")}
    assert got["ddp"] == pytest.approx(120.0)
    assert got["zero1"] == pytest.approx(31.40625)  # 4 x 7.5 + 12 x 7.5 / 64
    assert got["zero2"] == pytest.approx(16.640625)  # 2 x 7.5 + 14 x 7.5 / 64
    assert got["zero3"] == pytest.approx(1.875)
    assert [round(got[s], 1) for s in ("ddp", "zero1", "zero2", "zero3")] == [120.0, 31.4, 16.6, 1.9]
    # the paper's unit is 1e9 bytes: in GiB the baseline would read 111.8
    assert round(120e9 / 2 ** 30, 1) == 111.8
    assert sum(P.model_state_bytes(7.5e9, "fsdp", 64).values()) == sum(P.model_state_bytes(7.5e9, "zero3", 64).values())


def test_zero_anchor_through_the_cli(capsys):
    from lmforge.cli import main

    assert main(["plan", "--params", "7.5e9", "--gpus", "64", "--strategy", "all", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    rows = {r["strategy"]: r for r in p["rows"]}
    states = {k: round(r["params_gb"] + r["grads_gb"] + r["optim_gb"], 1) for k, r in rows.items()}
    assert (states["ddp"], states["zero1"], states["zero2"], states["zero3"]) == (120.0, 31.4, 16.6, 1.9)
    assert main(["plan", "--params", "7.5e9", "--gpus", "64"]) == 0
    table = capsys.readouterr().out
    assert "120.00" in table and "31.41" in table and "16.64" in table and "1.88" in table


def test_activation_formulas_worked_example():
    # GPT-3 175B's layer (Korthikanti et al. 2022): s = 2048, h = 12288, a = 96 (5as/h = 80), b = 1, t = 8
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    sbh = s * b * h
    assert 5 * a * s / h == 80
    f = P.activation_bytes_per_layer
    assert f(s, b, h, a) == sbh * 114  # 34 + 80
    assert f(s, b, h, a, t=t) == sbh * 23  # 10 + 24/8 + 80/8
    assert f(s, b, h, a, t=t, sequence_parallel=True) == sbh * 114 / 8
    assert f(s, b, h, a, t=t, sequence_parallel=True, recompute="selective") == sbh * 34 / 8
    assert f(s, b, h, a, t=t, recompute="selective") == sbh * 13
    assert f(s, b, h, a, recompute="selective") == sbh * 34
    assert f(s, b, h, a, t=t, recompute="full") == 2 * sbh
    assert f(s, 2, h, a) == 2 * f(s, 1, h, a)  # linear in the micro-batch
    # the whole model: L layers + the fp32 logits; full recompute adds one layer's working set
    v, L = 50257, 96
    assert P.activation_bytes(s, b, h, a, L, v) == L * sbh * 114 + 4 * s * b * v
    assert P.activation_bytes(s, b, h, a, L, v, recompute="full") == L * 2 * sbh + sbh * 114 + 4 * s * b * v
    assert P.activation_bytes(s, b, h, a, L, v, precision="fp32") == 2 * L * sbh * 114 + 4 * s * b * v
    with pytest.raises(ValueError, match="recompute"):
        f(s, b, h, a, recompute="some")


def test_tp_divides_only_the_split_matrices():
    sh = P.shape_of(preset="llama-1b")
    assert 0 < sh.tp_sharded < sh.n_params  # embeddings, norms: replicated
    one = P.model_state_bytes(sh.n_params, "tp", 8, tp=8, tp_sharded=sh.tp_sharded)
    assert one["params"] == pytest.approx(2 * ((sh.n_params - sh.tp_sharded) + sh.tp_sharded / 8))
    # tp+fsdp divides the TP-local states by the data-parallel degree
    two = P.model_state_bytes(sh.n_params, "tp+fsdp", 16, tp=8, tp_sharded=sh.tp_sharded)
    assert two["optim"] == pytest.approx(one["optim"] / 2)


def test_plan_largest_micro_batch_and_recommendation():
    sh = P.shape_of(preset="gpt2-124m")
    p = P.plan(sh, 2, P.parse_memory("16GB"), seq_len=1024, micro_batch=1)
    rows = {r["strategy"]: r for r in p["rows"]}
    for r in rows.values():
        static = (r["params_gb"] + r["grads_gb"] + r["optim_gb"]) * P.GB
        per = (r["activations_gb"] * P.GB)  # at micro-batch 1
        mb = r["max_micro_batch"]
        assert static + mb * per <= 16e9 < static + (mb + 1) * per
    assert rows["zero2"]["max_micro_batch"] >= rows["ddp"]["max_micro_batch"]
    assert p["recommendation"].startswith("ddp")
    # 7.5B on 8 x 80 GB with a 2048 context: DDP does not fit, sharding does
    big = P.plan(P.shape_of(params=7.5e9, n_layer=32, d_model=4096, n_head=32, vocab_size=50257), 8,
                 P.parse_memory("80GB"), seq_len=2048, recompute="full")
    rows = {r["strategy"]: r for r in big["rows"]}
    assert not rows["ddp"]["fits"] and rows["fsdp"]["fits"]
    assert not big["recommendation"].startswith("ddp")
    # selective and full recompute fit larger micro-batches
    mbs = [P.plan(sh, 2, 80e9, seq_len=1024, recompute=r, strategies=["ddp"])["rows"][0]["max_micro_batch"]
           for r in ("none", "selective", "full")]
    assert mbs[0] < mbs[1] < mbs[2]
    nothing = P.plan(P.shape_of(params=7.5e9), 1, P.parse_memory("16GB"))
    assert nothing["recommendation"].startswith("nothing fits")


def test_parse_memory_units():
    assert P.parse_memory("80GB") == 80e9
    assert P.parse_memory("24GiB") == 24 * 2 ** 30
    assert P.parse_memory("512MB") == 512e6
    assert P.parse_memory("40") == 40e9
    for bad in ("lots", "-3GB", "0"):
        with pytest.raises(ValueError, match="gpu-memory"):
            P.parse_memory(bad)


def test_plan_bad_inputs():
    sh = P.shape_of(preset="gpt2-124m")
    with pytest.raises(ValueError, match="--tp 5 does not divide --gpus 8"):
        P.plan(sh, 8, 80e9, tp=5)
    with pytest.raises(ValueError, match="heads"):
        P.plan(sh, 16, 80e9, tp=16)  # 12 heads
    with pytest.raises(ValueError, match="--gpus"):
        P.plan(sh, 0, 80e9)
    with pytest.raises(ValueError, match="--strategy"):
        P.plan(sh, 2, 80e9, strategies=["zero4"])
    with pytest.raises(ValueError, match="exactly one"):
        P.shape_of(preset="tiny", params=1e9)
    with pytest.raises(ValueError, match="unknown preset"):
        P.shape_of(preset="gpt5")
    with pytest.raises(ValueError, match="--params"):
        P.shape_of(params=-1)


def test_cli_usage_errors(capsys, tmp_path):
    from lmforge.cli import main

    assert main(["plan", "--preset", "gpt2-124m", "--gpus", "2", "--tp", "3"]) == 2
    assert "--tp 3 does not divide --gpus 2" in capsys.readouterr().err
    assert main(["plan", "--preset", "nope", "--gpus", "2"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["plan", "--params", "1e9", "--gpus", "2", "--gpu-memory", "much"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert main(["plan", "--config", str(bad), "--gpus", "2"]) == 2
    assert "not JSON" in capsys.readouterr().err
    assert main(["plan", "--config", str(tmp_path / "none.json"), "--gpus", "2"]) == 1
    assert "no such file" in capsys.readouterr().err


def test_config_file_equals_preset(tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.model import preset

    cfg = preset("tiny-llama")
    (tmp_path / "config.json").write_text(json.dumps({"format": "lmforge.model", "model": cfg.to_dict()}))
    a = P.shape_of(config=str(tmp_path))
    b = P.shape_of(preset="tiny-llama")
    assert (a.n_params, a.tp_sharded, a.muon_params) == (b.n_params, b.tp_sharded, b.muon_params)
    assert a.n_params == cfg.num_params()  # GQA and SwiGLU sizes from the model's own count
    assert main(["plan", "--config", str(tmp_path / "config.json"), "--gpus", "2", "--gpu-memory", "1GB",
                 "--precision", "fp32", "--optimizer", "muon"]) == 0
    assert "recommendation:" in capsys.readouterr().out


def test_muon_keeps_fewer_optimizer_bytes():
    sh = P.shape_of(preset="llama-1b")
    adam = P.model_state_bytes(sh.n_params, "ddp", 1)["optim"]
    share = sh.muon_params / sh.n_params
    muon = P.model_state_bytes(sh.n_params, "ddp", 1, optimizer="muon", muon_share=share)["optim"]
    assert muon == pytest.approx(12 * (sh.n_params - sh.muon_params) + 8 * sh.muon_params)
    assert muon < adam


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_exact_mode_equals_one_process_measured(optimizer):
    import parallel_harness as H
    from lmforge.model.transformer import Transformer

    got = H.mini_train("none", steps=2, accum=1, optimizer=optimizer, memory=True)["memory"]
    want = P.state_bytes(Transformer(H.tiny_config()), "none", 1, optimizer)
    assert got == want
    n = sum(p.numel() for p in Transformer(H.tiny_config()).parameters())
    assert want["params"] == want["grads"] == 4 * n
    if optimizer == "adamw":
        assert want["optim"] == 8 * n + 4 * len(list(Transformer(H.tiny_config()).parameters()))


def test_measured_bytes_counts_shared_storage_once():
    from lmforge.model.transformer import Transformer
    import parallel_harness as H

    net = Transformer(H.tiny_config(tie_embeddings=True))
    n = sum(p.numel() for p in net.parameters())  # parameters() yields the tied weight once
    m = P.measured_bytes(net, [])
    assert m == {"params": 4 * n, "grads": 0, "optim": 0}
    assert P.state_bytes(net, "none", 1)["params"] == 4 * n
    # a view into a flat buffer counts the buffer
    flat = torch.zeros(10)
    a, b = torch.nn.Parameter(flat[:4]), torch.nn.Parameter(flat[4:])
    mod = torch.nn.Module()
    mod.a, mod.b = a, b
    assert P.measured_bytes(mod, [])["params"] == 40


def test_exact_mode_sharding_rules():
    # FSDP2: 5 rows on 2 ranks -> chunks of 3 and 2 rows, storage padded to 3 on both
    lin = torch.nn.Module()
    lin.blocks = []
    lin.w = torch.nn.Parameter(torch.zeros(5, 4))
    r0 = P.state_bytes(lin, "fsdp", 2, rank=0)
    r1 = P.state_bytes(lin, "fsdp", 2, rank=1)
    assert r0["params"] == r1["params"] == 3 * 4 * 4
    assert r0["optim"] == 2 * 3 * 4 * 4 + 4 and r1["optim"] == 2 * 2 * 4 * 4 + 4
    # ZeRO: 20 elements on 3 ranks -> pieces of 7 (padded: ZeRO-1/2 hold the whole parameter, and ZeRO-1
    # the whole gradient, in flat buffers of 3 x 7), the step whole
    z1 = P.state_bytes(lin, "zero1", 3)
    assert z1 == {"params": 84, "grads": 84, "optim": 2 * 7 * 4 + 4}
    assert P.state_bytes(lin, "zero2", 3)["grads"] == 28
    assert P.state_bytes(lin, "zero3", 3)["params"] == 28
    with pytest.raises(ValueError, match="strategy"):
        P.state_bytes(lin, "zero4", 2)


def test_tp_rows_follow_lmforge_strategies():
    sh = P.shape_of(preset="llama-1b")  # 32 heads, 8 key/value heads
    assert sh.n_kv_head == 8
    with pytest.raises(ValueError, match="key/value heads"):
        P.plan(sh, 16, 80e9, tp=16)  # 16 divides the 32 heads but not the 8 key/value heads
    rows = {r["strategy"]: r for r in P.plan(sh, 16, 80e9, seq_len=2048, tp=8)["rows"]}
    assert (rows["tp+fsdp"]["tp"], rows["tp+fsdp"]["dp"]) == (8, 2)
    assert rows["tp"]["tp"] == 16 and not rows["tp"]["fits"]  # "tp" splits over every device: 8 kv heads
    assert any("do not divide" in n for n in rows["tp"]["notes"])
    # sequence parallel divides every activation by t; TP alone only part of them
    sp = P.plan(sh, 8, 80e9, seq_len=2048, tp=8, sequence_parallel=True, strategies=["tp"])["rows"][0]
    no = P.plan(sh, 8, 80e9, seq_len=2048, tp=8, strategies=["tp"])["rows"][0]
    assert sp["activations_gb"] < no["activations_gb"]


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3", "fsdp"])
def test_analytic_fp32_agrees_with_exact_mode(strategy):
    # tiny-llama's shapes divide by 2: no padding, so the two faces of the planner differ only by AdamW's
    # 4-byte step per tensor (whole on every rank), which the analytic K leaves out
    from lmforge.model import preset
    from lmforge.model.transformer import Transformer

    net = Transformer(preset("tiny-llama"))
    n = sum(p.numel() for p in net.parameters())
    tensors = len(list(net.parameters()))
    exact = P.state_bytes(net, strategy, 2, "adamw")
    approx = P.model_state_bytes(n, strategy, 2, precision="fp32")
    assert exact["params"] == approx["params"] and exact["grads"] == approx["grads"]
    assert exact["optim"] - 4 * tensors == approx["optim"]


def test_frozen_parameters_count_as_weights_only():
    import parallel_harness as H
    from lmforge.model.transformer import Transformer
    from lmforge.train.optim import build_optimizers

    net = Transformer(H.tiny_config())
    for p in net.blocks[0].parameters():
        p.requires_grad_(False)
    opts = build_optimizers(net, "adamw", fused=False)
    x = torch.randint(0, 64, (2, 9))
    net(x[:, :-1], x[:, 1:])[1].backward()
    for o in opts:
        o.step()
    net(x[:, :-1], x[:, 1:])[1].backward()
    assert P.measured_bytes(net, opts) == P.state_bytes(net, "none", 1, "adamw")
    frozen = sum(p.numel() for p in net.blocks[0].parameters())
    full = P.state_bytes(Transformer(H.tiny_config()), "none", 1)
    got = P.state_bytes(net, "none", 1)
    assert got["params"] == full["params"] and got["grads"] == full["grads"] - 4 * frozen
    assert P.state_bytes(net, "zero3", 2)["params"] == full["params"] // 2  # even shapes: halves
