"""LoRA (lmforge.align.lora): parity with PEFT both ways on the HF export, merge exactness, rsLoRA,
dropout, what trains, target patterns and bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from lmforge.align.lora import (LoRAConfig, LoRALinear, Unit, apply_lora, load_peft, lora_modules, lora_parameters,
                                merge, merge_and_unload, save_peft, unmerge)
from lmforge.model import make_config, preset
from lmforge.model.hf import export_hf
from lmforge.model.transformer import Transformer

torch.set_num_threads(1)
V = 64
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA = dict(norm="rmsnorm", norm_bias=False, mlp="swiglu", pos="rope", qkv_bias=False, out_bias=False,
             mlp_bias=False, n_kv_head=2, d_ff=48, tie_embeddings=False)
MODELS = {  # name -> (ModelConfig fields); all 2 layers, 4 heads, d_model 32
    "qwen3": dict(arch="qwen3", **LLAMA, qk_norm=True, head_dim=12),  # GQA 4:2, head_dim != d/H, q/k norms
    "llama": dict(arch="llama", **{**LLAMA, "n_kv_head": 1}),  # MQA
    "qwen2": dict(arch="qwen2", **{**LLAMA, "qkv_bias": True}),
    "llama-relu2": dict(arch="llama", **{**LLAMA, "mlp": "relu2"}),  # exported as gate_proj = up_proj
    "gpt2": dict(arch="gpt2"),  # Conv1D in HF: PEFT's fan_in_fan_out
}


def tiny(name: str, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(make_config(**{**dict(vocab_size=V, n_layer=2, n_head=4, d_model=32, max_seq_len=32),
                                   **MODELS[name], **kw}))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # off the near-identity init, so every weight shows in the logits
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def randomize(params, seed: int = 1, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(seed))


def hf_model(d):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()


def err(a, b) -> float:
    return (a - b).abs().max().item()


# ---- PEFT parity -----------------------------------------------------------------------------------

CASES = {  # model -> LoRAConfig of the lmforge adapter PEFT must reproduce
    "qwen3": LoRAConfig(r=4, alpha=8),
    "llama": LoRAConfig(r=3, alpha=5, rslora=True, targets=["q", "v", "down"]),
    "qwen2": LoRAConfig(r=2, alpha=4, targets=["blocks.1.*", "model.layers.0.self_attn.k_proj"]),  # some layers
    "llama-relu2": LoRAConfig(r=2, alpha=2, targets=["all-linear"]),
    "gpt2": LoRAConfig(r=4, alpha=16, targets=["q", "c_proj", "mlp.fc"]),  # q: the whole c_attn
}


@pytest.mark.parametrize("name", list(CASES))
def test_peft_loads_lmforge_adapter_with_equal_logits(name, tmp_path):
    peft = pytest.importorskip("peft")
    m = tiny(name)
    export_hf(m, tmp_path / "hf")
    apply_lora(m, CASES[name])
    randomize(lora_parameters(m))
    save_peft(m, tmp_path / "ad", base=str(tmp_path / "hf"))
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    c = CASES[name]
    assert (conf["peft_type"], conf["task_type"], conf["r"], conf["lora_alpha"], conf["use_rslora"]) == \
        ("LORA", "CAUSAL_LM", c.r, c.alpha, c.rslora)
    assert conf["base_model_name_or_path"] == str(tmp_path / "hf") and conf["fan_in_fan_out"] == (name == "gpt2")
    base = hf_model(tmp_path / "hf")
    with torch.no_grad():
        base_logits = base(tokens()).logits
        pm = peft.PeftModel.from_pretrained(base, tmp_path / "ad").eval()
        ours, theirs = m(tokens()), pm(tokens()).logits
    assert err(ours, theirs) < 1e-4, err(ours, theirs)
    assert err(theirs, base_logits) > 1e-2  # the adapter does something, so equality means something
    # the tensors PEFT loaded are ours, under the names and shapes PEFT itself gives them
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    theirs_sd = get_peft_model_state_dict(pm)
    assert sorted(saved) == sorted(theirs_sd)
    for k, v in saved.items():
        assert torch.equal(v, theirs_sd[k]), k


@pytest.mark.parametrize("name", ["qwen3", "llama", "gpt2"])
def test_adapter_trained_with_peft_loads_into_lmforge(name, tmp_path):
    peft = pytest.importorskip("peft")
    m = tiny(name)
    export_hf(m, tmp_path / "hf")
    hf = hf_model(tmp_path / "hf")
    targets = ["c_attn", "c_proj", "c_fc"] if name == "gpt2" else ALL7
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=6, lora_dropout=0.1, target_modules=targets,
                                                 fan_in_fan_out=name == "gpt2", task_type="CAUSAL_LM"))
    randomize([p for n, p in pm.named_parameters() if "lora_B" in n], scale=0.05)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    for step in range(3):  # trained by PEFT: A and B both move
        x = tokens(step)
        opt.zero_grad()
        pm(x, labels=x).loss.backward()
        opt.step()
    pm.eval()
    pm.save_pretrained(tmp_path / "ad")
    fresh = tiny(name)
    names = load_peft(fresh, tmp_path / "ad")
    assert len(names) == (8 if name == "gpt2" else 14)  # every PEFT module (c_proj: attn and mlp), one unit each
    with torch.no_grad():
        e = err(fresh(tokens(9)), pm(tokens(9)).logits)
        assert e < 1e-4, e
        assert err(fresh(tokens(9)), tiny(name)(tokens(9))) > 1e-2
    assert all(m.lora_dropout == 0.1 for m in lora_modules(fresh).values())


def test_peft_rank_and_alpha_patterns_round_trip(tmp_path):
    """PEFT's rank_pattern / alpha_pattern (per-module rank and alpha) load, and save back as PEFT reads them."""
    peft = pytest.importorskip("peft")
    m = tiny("qwen3")
    export_hf(m, tmp_path / "hf")
    pm = peft.get_peft_model(hf_model(tmp_path / "hf"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
        rank_pattern={"q_proj": 2}, alpha_pattern={"model.layers.1.self_attn.v_proj": 3}))
    randomize([p for n, p in pm.named_parameters() if "lora_" in n])
    pm.eval().save_pretrained(tmp_path / "ad")
    load_peft(m, tmp_path / "ad")
    q = lora_modules(m)["blocks.0.attn.qkv"]
    assert q.lora_A["q"].shape[0] == 2 and q.scaling["q"] == pytest.approx(8 / math.sqrt(2))
    assert lora_modules(m)["blocks.1.attn.qkv"].scaling["v"] == pytest.approx(3 / 2)
    with torch.no_grad():
        assert err(m(tokens()), pm(tokens()).logits) < 1e-4
    save_peft(m, tmp_path / "ad2")
    again = peft.PeftModel.from_pretrained(hf_model(tmp_path / "hf"), tmp_path / "ad2").eval()
    with torch.no_grad():
        assert err(m(tokens()), again(tokens()).logits) < 1e-4


@pytest.mark.parametrize("preset_name", ["tiny-qwen2-moe", "tiny-mixtral"])
def test_moe_adapters_in_peft(preset_name, tmp_path):
    """MoE models: attention, a shared expert's linears and its gate adapt; experts and routers do not."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    m = Transformer(preset(preset_name, vocab_size=V)).eval()
    export_hf(m, tmp_path / "hf")
    shared = preset_name == "tiny-qwen2-moe"
    names = apply_lora(m, LoRAConfig(r=2, targets=["all-linear"] + (["shared_gate"] if shared else [])))
    assert not any("router" in n for n in names)
    assert any("shared" in n for n in names) == shared
    randomize(lora_parameters(m))
    save_peft(m, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(hf_model(tmp_path / "hf"), tmp_path / "ad").eval()
    with torch.no_grad():
        assert err(m(tokens()), pm(tokens()).logits) < 1e-4


# ---- the arithmetic -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen3", "gpt2", "llama-relu2"])
def test_merge_unmerge_and_unload_are_exact(name, tmp_path):
    m = tiny(name)
    base_sd = {k: v.clone() for k, v in m.state_dict().items()}
    apply_lora(m, LoRAConfig(r=4, alpha=8))
    randomize(lora_parameters(m))
    x = tokens()
    with torch.no_grad():
        adapted = m(x)
        merge(m)
        assert all(mod.merged for mod in lora_modules(m).values())
        assert err(m(x), adapted) < 1e-5
        merge(m)  # twice is once
        assert err(m(x), adapted) < 1e-5
        unmerge(m)
        for k, v in base_sd.items():
            assert err(m.state_dict()[k], v) <= 1e-6, k
        assert err(m(x), adapted) < 1e-5
        plain = merge_and_unload(m)
    assert plain is m and not lora_modules(m)
    assert all(type(mod) is nn.Linear for mod in m.modules() if isinstance(mod, nn.Linear))
    assert sorted(m.state_dict()) == sorted(base_sd)
    assert all(p.requires_grad for p in m.parameters())
    with torch.no_grad():
        assert err(m(x), adapted) < 1e-5
    # a plain model again: it saves, loads and exports as one
    from lmforge.model import load, save

    save(m, tmp_path / "merged")
    back, _ = load(tmp_path / "merged")
    with torch.no_grad():
        assert err(back.eval()(x), adapted) < 1e-5
    export_hf(m, tmp_path / "hf")


def test_forward_is_the_lora_formula_and_rslora_scales_by_sqrt_r():
    lin = nn.Linear(6, 10)
    x = torch.randn(3, 6)
    for rslora, scale in ((False, 12 / 4), (True, 12 / 2)):
        m = LoRALinear(lin, [Unit("o", ("o",), 0, 10, ("o",))], {"o": 4}, {"o": scale}, 0.0, "llama", rslora)
        randomize(m.lora_B.values())
        A, B = m.lora_A["o"], m.lora_B["o"]
        want = lin(x) + scale * x @ A.T @ B.T
        assert err(m(x), want) < 1e-5
    # through apply_lora: the scale each config asks for
    for rslora, r, alpha in ((False, 4, 8), (True, 4, 8), (True, 9, 3)):
        mod = tiny("qwen3")
        apply_lora(mod, LoRAConfig(r=r, alpha=alpha, rslora=rslora))
        want = alpha / math.sqrt(r) if rslora else alpha / r
        assert all(s == pytest.approx(want) for mm in lora_modules(mod).values() for s in mm.scaling.values())


def test_init_is_peft_s_and_starts_at_the_base_model():
    m = tiny("qwen3")
    x = tokens()
    with torch.no_grad():
        before = m(x)
    apply_lora(m, LoRAConfig(r=8))
    with torch.no_grad():
        assert torch.equal(m(x), before) or err(m(x), before) < 1e-6  # B = 0
    for mod in lora_modules(m).values():
        for k in mod.units:
            A, B = mod.lora_A[k], mod.lora_B[k]
            assert not B.any()
            bound = 1 / math.sqrt(mod.in_features)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
            assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound and A.std() > 0.4 * bound


def test_dropout_acts_in_train_mode_only_and_on_the_adapter_only():
    m = tiny("qwen3")
    apply_lora(m, LoRAConfig(r=4, dropout=0.5))
    x = tokens()
    with torch.no_grad():
        base_out = m(x)  # B = 0: dropout on the adapter input changes nothing, in either mode
        m.train()
        assert err(m(x), base_out) < 1e-6
        randomize(lora_parameters(m))
        a, b = m(x), m(x)
        assert err(a, b) > 1e-3  # two masks
        m.eval()
        c, d = m(x), m(x)
        assert torch.equal(c, d)
        no_drop = tiny("qwen3")
        apply_lora(no_drop, LoRAConfig(r=4))
        for p, q in zip(lora_parameters(no_drop), lora_parameters(m)):
            p.copy_(q)
        assert err(no_drop(x), c) < 1e-6


def test_only_adapters_train():
    m = tiny("qwen3")
    base = {k: v.clone() for k, v in m.state_dict().items()}
    names = apply_lora(m, LoRAConfig(r=4, targets=["q", "v", "o"]))
    params = lora_parameters(m)
    assert {id(p) for p in m.parameters() if p.requires_grad} == {id(p) for p in params}
    # q (32 -> 4*12), v (32 -> 2*12), o (48 -> 32), per layer: r (in + out) each
    assert sum(p.numel() for p in params) == 2 * 4 * ((32 + 48) + (32 + 24) + (48 + 32))
    assert len(names) == 6 and names[:3] == ["blocks.0.attn.qkv:q", "blocks.0.attn.qkv:v", "blocks.0.attn.proj"]
    opt = torch.optim.SGD(params, lr=0.1)
    losses = []
    m.train()
    for _ in range(5):
        x = tokens()
        _, loss = m(x[:, :-1], targets=x[:, 1:])
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in m.parameters() if not p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for k, v in base.items():  # the base weights did not move (the adapters' keys are new)
        assert torch.equal(m.state_dict()[k], v), k
    sd = m.state_dict()
    assert "blocks.0.attn.qkv.lora_A.q" in sd and "blocks.0.attn.qkv.weight" in sd


def test_target_patterns():
    def units(name, targets, **kw):
        return apply_lora(tiny(name, **kw), LoRAConfig(targets=targets))

    every = units("qwen3", ["all-linear"])
    assert len(every) == 14
    assert units("qwen3", ["q"]) == units("qwen3", ["q_proj"]) == ["blocks.0.attn.qkv:q", "blocks.1.attn.qkv:q"]
    assert units("qwen3", ["model.layers.1.self_attn.q_proj"]) == ["blocks.1.attn.qkv:q"]
    assert units("qwen3", ["blocks.1.attn.qkv"]) == [f"blocks.1.attn.qkv:{p}" for p in "qkv"]
    assert units("qwen3", ["blocks.0.attn.qkv:v", "model.layers.*.mlp.up_proj"]) == \
        ["blocks.0.attn.qkv:v", "blocks.0.mlp.fc:up", "blocks.1.mlp.fc:up"]
    assert units("qwen3", ["fc"]) == units("qwen3", ["gate", "up"])
    assert units("qwen3", ["proj"]) == units("qwen3", ["o", "down"])
    assert units("gpt2", ["k"]) == units("gpt2", ["c_attn"]) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert units("gpt2", ["c_proj"]) == units("gpt2", ["o", "down"])  # PEFT's suffix rule: both c_proj
    assert units("llama-relu2", ["gate"]) == ["blocks.0.mlp.fc", "blocks.1.mlp.fc"]  # gate = up: one matrix
    # a model that exports nowhere gets the natural split
    assert len(units("qwen3", ["all-linear"], logit_softcap=30.0)) == 14


def test_layout_follows_the_arch_a_model_exports_as():
    m = tiny("qwen3")
    apply_lora(m, LoRAConfig(arch="qwen3", targets=["q_proj"]))
    assert list(lora_modules(m)["blocks.0.attn.qkv"].units) == ["q"]
    m2 = tiny("llama-relu2")
    with pytest.raises(ValueError, match="unknown HF family 'bert'"):
        apply_lora(m2, LoRAConfig(arch="bert"))


# ---- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, msg", [
    (dict(r=0), r"LoRAConfig.r: expected an integer >= 1, got 0"),
    (dict(r=2.5), r"LoRAConfig.r"),
    (dict(alpha=0), r"LoRAConfig.alpha: expected a number > 0"),
    (dict(dropout=1.0), r"LoRAConfig.dropout: expected a number in \[0, 1\)"),
    (dict(targets="q_proj"), r"LoRAConfig.targets: expected a non-empty list"),
    (dict(targets=[]), r"LoRAConfig.targets"),
    (dict(targets=["q", "lm_head", "attn.nope"]), r"\['lm_head', 'attn.nope'\] select no adaptable linear"),
    (dict(targets=["gate"]), r"\['gate'\] select no adaptable linear"),  # GPT-2's MLP has no gate
])
def test_bad_configs(kw, msg):
    m = tiny("gpt2")
    with pytest.raises(ValueError, match=msg):
        apply_lora(m, LoRAConfig(**kw))
    assert not lora_modules(m) and all(p.requires_grad for p in m.parameters())  # untouched


def test_apply_twice_is_refused():
    m = tiny("qwen3")
    apply_lora(m, LoRAConfig())
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(m, LoRAConfig())


@pytest.fixture
def adapter(tmp_path):
    m = tiny("qwen3")
    apply_lora(m, LoRAConfig(r=4, targets=["q", "v"]))
    randomize(lora_parameters(m))
    return save_peft(m, tmp_path / "ad")


def _edit_config(d, **kw):
    p = d / "adapter_config.json"
    c = json.loads(p.read_text())
    for k, v in kw.items():
        if v is KeyError:
            c.pop(k)
        else:
            c[k] = v
    p.write_text(json.dumps(c))


@pytest.mark.parametrize("edit, msg", [
    (dict(r=KeyError), r"adapter_config.json: missing field 'r'"),
    (dict(lora_alpha=KeyError), r"missing field 'lora_alpha'"),
    (dict(peft_type="PREFIX_TUNING"), r"peft_type 'PREFIX_TUNING' is not supported"),
    (dict(use_dora=True), r"use_dora=True: DoRA .* is not supported"),
    (dict(bias="all"), r"bias 'all' is not supported"),
    (dict(modules_to_save=["lm_head"]), r"modules_to_save=\['lm_head'\]"),
    (dict(r=8), r"tensor base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has shape \(4, 32\), "
                r"this model's .* needs \(8, 32\)"),
    (dict(r="4"), r"r: expected an integer >= 1, got '4'"),
])
def test_bad_adapter_configs(adapter, edit, msg):
    _edit_config(adapter, **edit)
    m = tiny("qwen3")
    with pytest.raises(ValueError, match=msg):
        load_peft(m, adapter)
    assert not lora_modules(m)


def _edit_tensors(d, fn):
    from safetensors.torch import load_file, save_file

    p = d / "adapter_model.safetensors"
    t = load_file(p)
    fn(t)
    save_file(t, p)


def test_adapter_for_another_base_model(adapter):
    wider = tiny("qwen3", d_model=48)
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight has shape \(4, 32\), this model's "
                                         r"model.layers.0.self_attn.q_proj needs \(4, 48\)"):
        load_peft(wider, adapter)
    deeper_adapter_dir = adapter.parent / "deep"
    deep = tiny("qwen3", n_layer=3)
    apply_lora(deep, LoRAConfig(targets=["q"]))
    save_peft(deep, deeper_adapter_dir)
    with pytest.raises(ValueError, match=r"has no adaptable module 'model.layers.2.self_attn.q_proj' "
                                         r"\(an adapter for another base model\?\)"):
        load_peft(tiny("qwen3"), deeper_adapter_dir)
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn"):
        gpt = tiny("gpt2")
        apply_lora(gpt, LoRAConfig(targets=["c_attn"]))
        save_peft(gpt, adapter.parent / "g")
        load_peft(tiny("qwen3"), adapter.parent / "g")


def test_bad_adapter_tensors(adapter, tmp_path):
    k = "base_model.model.model.layers.0.self_attn.q_proj"
    _edit_tensors(adapter, lambda t: t.pop(f"{k}.lora_B.weight"))
    with pytest.raises(ValueError, match=rf"{k}.lora_B.weight is missing"):
        load_peft(tiny("qwen3"), adapter)
    _edit_tensors(adapter, lambda t: t.update({f"{k}.lora_magnitude_vector.weight": torch.ones(32)}))
    with pytest.raises(ValueError, match=r"lora_magnitude_vector.weight' is not a LoRA A or B weight"):
        load_peft(tiny("qwen3"), adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: cannot read the tensors"):
        load_peft(tiny("qwen3"), adapter)
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"only pickle adapter_model.bin"):
        load_peft(tiny("qwen3"), adapter)
    with pytest.raises(FileNotFoundError, match=r"no adapter_config.json"):
        load_peft(tiny("qwen3"), tmp_path / "nowhere")
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config.json: not valid JSON"):
        load_peft(tiny("qwen3"), adapter)


def test_relu2_gate_and_up_must_agree(tmp_path):
    peft = pytest.importorskip("peft")
    m = tiny("llama-relu2")
    export_hf(m, tmp_path / "hf")
    pm = peft.get_peft_model(hf_model(tmp_path / "hf"), peft.LoraConfig(r=2, target_modules=["gate_proj", "up_proj"]))
    randomize([p for n, p in pm.named_parameters() if "lora_" in n])
    pm.save_pretrained(tmp_path / "ad")
    with pytest.raises(ValueError, match=r"gate_proj and .*up_proj have different adapters, but this model's "
                                         r"ReLU² MLP \(blocks.0.mlp.fc\) is one matrix"):
        load_peft(m, tmp_path / "ad")
    pm2 = peft.get_peft_model(hf_model(tmp_path / "hf"), peft.LoraConfig(r=2, target_modules=["gate_proj"]))
    pm2.save_pretrained(tmp_path / "ad2")
    with pytest.raises(ValueError, match=r"gate_proj is adapted but not .*up_proj"):
        load_peft(tiny("llama-relu2"), tmp_path / "ad2")


def test_save_errors_write_nothing(adapter):
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_peft(tiny("qwen3"), adapter)
    capped = tiny("qwen3", logit_softcap=30.0)  # exports to no HF family
    apply_lora(capped, LoRAConfig(targets=["q"]))
    with pytest.raises(ValueError, match=r"save_peft: the adapter is for the HF export, and cannot export as "
                                         r"llama: ModelConfig.logit_softcap"):
        save_peft(capped, adapter)
    gpt = tiny("gpt2")
    apply_lora(gpt, LoRAConfig(targets=["c_attn"]))
    with pytest.raises(ValueError, match=r"cannot export as llama"):
        save_peft(gpt, adapter, arch="llama")
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before


def test_save_load_round_trip_is_exact(adapter):
    m = tiny("qwen3")
    names = load_peft(m, adapter)
    assert names == ["blocks.0.attn.qkv:q", "blocks.0.attn.qkv:v", "blocks.1.attn.qkv:q", "blocks.1.attn.qkv:v"]
    again = adapter.parent / "again"
    save_peft(m, again)
    assert (again / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    assert json.loads((again / "adapter_config.json").read_text()) == \
        json.loads((adapter / "adapter_config.json").read_text())
    assert {id(p) for p in m.parameters() if p.requires_grad} == {id(p) for p in lora_parameters(m)}
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        load_peft(m, adapter)


def test_adapters_for_a_model_transformers_wrote(tmp_path):
    """An HF model lmforge imports (not an lmforge export): PEFT's adapter loads, and lmforge's adapter
    applies to the original directory in PEFT."""
    peft = pytest.importorskip("peft")
    from hf_fixtures import make_tiny_hf_chat_model

    from lmforge.model import load

    d = make_tiny_hf_chat_model(tmp_path, "qwen2")
    x = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    pm = peft.get_peft_model(hf_model(d), peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL7))
    randomize([p for n, p in pm.named_parameters() if "lora_B" in n], scale=0.05)
    pm.eval().save_pretrained(tmp_path / "theirs")
    ours, _ = load(d)
    load_peft(ours.eval(), tmp_path / "theirs")
    with torch.no_grad():
        assert err(ours(x), pm(x).logits) < 1e-4
    mine, _ = load(d)
    apply_lora(mine.eval(), LoRAConfig(r=2, targets=["k", "up"]))
    randomize(lora_parameters(mine))
    save_peft(mine, tmp_path / "mine", base=str(d))
    pm2 = peft.PeftModel.from_pretrained(hf_model(d), tmp_path / "mine").eval()
    with torch.no_grad():
        assert err(mine(x), pm2(x).logits) < 1e-4


def test_a_model_that_exports_nowhere_by_default(tmp_path):
    """hf_family "none": the natural split; save_peft for a family named, load_peft reads the keys."""
    m = tiny("qwen3", arch="none")
    apply_lora(m, LoRAConfig(r=2, targets=["k", "down"]))
    randomize(lora_parameters(m))
    with pytest.raises(ValueError, match="cannot export as llama"):
        save_peft(m, tmp_path / "ad")  # (qk_norm: qwen3-shaped, the llama layout is only a layout)
    save_peft(m, tmp_path / "ad", arch="qwen3")
    back = tiny("qwen3", arch="none")
    assert load_peft(back, tmp_path / "ad") == ["blocks.0.attn.qkv:k", "blocks.0.mlp.proj",
                                                 "blocks.1.attn.qkv:k", "blocks.1.mlp.proj"]
    with torch.no_grad():
        assert torch.equal(back(tokens()), m(tokens()))


@pytest.mark.parametrize("name", ["qwen3", "gpt2"])
def test_gradients_equal_peft_s(name, tmp_path):
    """Training is the same computation: the loss's gradient on every A and B equals PEFT's."""
    peft = pytest.importorskip("peft")
    m = tiny(name)
    export_hf(m, tmp_path / "hf")
    apply_lora(m, LoRAConfig(r=3, alpha=6))
    randomize(lora_parameters(m))
    save_peft(m, tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(hf_model(tmp_path / "hf"), tmp_path / "ad", is_trainable=True)
    x = tokens(3)
    _, loss = m(x[:, :-1], targets=x[:, 1:])
    loss.backward()
    theirs = pm(x, labels=x).loss
    theirs.backward()
    assert abs(loss.item() - theirs.item()) < 1e-5
    grads = {n.replace(".default", ""): p.grad for n, p in pm.named_parameters() if "lora_" in n}
    n_checked = 0
    for mod in lora_modules(m).values():
        for k, u in mod.units.items():
            for ab, p in (("lora_A", mod.lora_A[k]), ("lora_B", mod.lora_B[k])):
                g = grads[f"base_model.model.{u.hf[0]}.{ab}.weight"]
                assert err(p.grad, g) < 1e-5 * max(1.0, g.abs().max().item()), (u.hf[0], ab)
                n_checked += 1
    assert n_checked == len(grads) and n_checked > 0
