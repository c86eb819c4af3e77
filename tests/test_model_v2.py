"""The model package's shape: config tree and old flat files, layer patterns, registries, components'
facts (init coverage, counts), one mask builder, hidden states apart from logits, wrappers from outside."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from lmforge.model import ModelConfig, load, make_config, preset, save
from lmforge.model.config import LEGACY, LayerSpec, normalize, select_layers
from lmforge.model.layers import causal_mask
from lmforge.model.registry import ATTENTION, FEEDFORWARD, register_feedforward
from lmforge.model.surgery import replace_linear
from lmforge.model.transformer import Transformer

V = 97


def tiny(**kw):
    torch.manual_seed(0)
    return Transformer(make_config(vocab_size=V, n_layer=3, n_head=4, d_model=32, max_seq_len=64, **kw)).eval()


# ---- config ----
def test_flat_nested_and_dotted_forms_are_one_config():
    flat = make_config(n_head=4, n_kv_head=2, d_model=64, mlp="swiglu", mlp_bias=False, sliding_window=8,
                       arch="mistral")
    nested = ModelConfig.from_dict({"d_model": 64, "hf_family": "mistral",
                                    "attn": {"n_head": 4, "n_kv_head": 2, "sliding_window": 8},
                                    "ffn": {"activation": "swiglu", "bias": False}})
    dotted = ModelConfig.from_dict({"d_model": 64, "hf_family": "mistral", "attn.n_head": 4, "attn.n_kv_head": 2,
                                    "attn.sliding_window": 8, "ffn.activation": "swiglu", "ffn.bias": False})
    assert flat == nested == dotted
    assert ModelConfig.from_dict(flat.to_dict()) == flat  # the tree round-trips through JSON
    assert ModelConfig.from_dict(json.loads(json.dumps(flat.to_dict()))) == flat
    assert set(LEGACY) >= {"n_head", "mlp", "arch", "d_ff", "qk_norm"}


def test_unknown_fields_are_named_with_a_hint():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['n_heads'\].*did you mean 'n_head'"):
        normalize({"attn": {"n_heads": 4}})
    with pytest.raises(ValueError, match="unknown field"):
        make_config(n_layers=3)


def test_an_old_flat_checkpoint_loads(tmp_path):
    m = tiny(mlp="swiglu", norm="rmsnorm", pos="rope", n_kv_head=2, qkv_bias=False, arch="llama")
    save(m, tmp_path / "m")
    c = json.loads((tmp_path / "m" / "config.json").read_text())
    old = {"vocab_size": V, "n_layer": 3, "n_head": 4, "d_model": 32, "max_seq_len": 64, "mlp": "swiglu",
           "norm": "rmsnorm", "pos": "rope", "n_kv_head": 2, "qkv_bias": False, "arch": "llama", "d_ff": None,
           "head_dim": None, "out_bias": True, "mlp_bias": True, "qk_norm": False, "sliding_window": None}
    c["model"] = old  # config.json as lmforge wrote it before the tree
    (tmp_path / "m" / "config.json").write_text(json.dumps(c))
    back, _ = load(tmp_path / "m")
    assert back.cfg == m.cfg
    x = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)


def test_layer_patterns_resolve_to_specs():
    assert select_layers("every:2", 6, "x") == [False, True] * 3  # Qwen2-MoE's decoder_sparse_step
    assert select_layers("from:1", 4, "x") == [False, True, True, True]  # DeepSeek's first-k-dense
    assert select_layers([0, 3], 4, "x") == [True, False, False, True]
    with pytest.raises(ValueError, match="outside 0..3"):
        select_layers([4], 4, "moe_layers")
    with pytest.raises(ValueError, match="expected 'all'"):
        select_layers("some", 4, "window_layers")
    cfg = preset("tiny-mixtral", n_layer=4, moe_layers="from:1", sliding_window=16, window_layers=[1, 2])
    assert [s.ffn for s in cfg.layer_specs()] == ["dense", "moe", "moe", "moe"]
    assert [s.window for s in cfg.layer_specs()] == [None, 16, 16, None]
    m = Transformer(cfg)
    assert [type(b.mlp).__name__ for b in m.blocks] == ["DenseMLP", "MoE", "MoE", "MoE"]
    assert [s.window for s in m.cache_specs()] == [None, 16, 16, None]


def test_per_layer_window_changes_only_its_layers():
    base = tiny(pos="rope")
    x = torch.randint(0, V, (1, 40))
    for layers, differs in (([], False), ([1], True)):
        m = tiny(pos="rope", sliding_window=4, window_layers=layers)
        m.load_state_dict(base.state_dict())
        assert (not torch.allclose(m(x), base(x), atol=1e-6)) == differs


# ---- components own their facts ----
def test_counts_are_the_components():
    from lmforge.model import PRESETS

    for name in PRESETS:  # every preset builds (each component initializes all it owns) and counts itself
        cfg = preset(name)
        with torch.device("meta"):
            m = Transformer(cfg)
        assert cfg.num_params() == sum(p.numel() for p in m.parameters())
        assert cfg.num_active_params() <= cfg.num_params()
    assert preset("gpt2-124m").num_params() == 124_439_808  # GPT-2 small, tied
    moe = preset("tiny-mixtral")
    m = Transformer(moe)
    E, k = moe.moe.n_experts, moe.moe.top_k
    expert = 3 * moe.d_model * moe.d_expert
    assert moe.num_params() - moe.num_active_params() == moe.n_layer * (E - k) * expert


def test_a_parameter_without_init_is_an_error():
    class Leaky(FEEDFORWARD["dense"]):
        def __init__(self, cfg, spec):
            super().__init__(cfg, spec)
            self.extra = nn.Parameter(torch.empty(3))  # not covered by reset_parameters

    register_feedforward("leaky-test")(Leaky)
    try:
        cfg = make_config(vocab_size=V, n_layer=1, n_head=2, d_model=16)
        object.__setattr__(cfg, "layer_specs", lambda: [LayerSpec(0, ffn="leaky-test")])
        with pytest.raises(RuntimeError, match=r"no initialization for \['blocks.0.mlp.extra'\]"):
            Transformer(cfg)
    finally:
        FEEDFORWARD.pop("leaky-test")


def test_init_is_written_out():
    m = Transformer(make_config(vocab_size=V, n_layer=4, n_head=2, d_model=64, max_seq_len=32))
    std = m.cfg.init_std
    assert abs(m.blocks[0].attn.qkv.weight.std().item() - std) < 0.003
    assert abs(m.blocks[0].mlp.proj.weight.std().item() - std / (2 * 4) ** 0.5) < 0.002  # depth-scaled
    assert torch.all(m.blocks[0].attn.qkv.bias == 0) and torch.all(m.blocks[0].attn_norm.weight == 1)
    z = Transformer(make_config(vocab_size=V, n_layer=2, n_head=2, d_model=16, zero_init_proj=True))
    assert torch.all(z.blocks[1].attn.proj.weight == 0) and torch.all(z.blocks[1].mlp.proj.weight == 0)
    moe = Transformer(preset("tiny-mixtral", zero_init_proj=True))
    assert torch.all(moe.blocks[0].mlp.w_out == 0) and moe.blocks[0].mlp.w_in.std() > 0.01


def test_registries_hold_the_builtin_kinds():
    assert set(ATTENTION) >= {"causal"} and set(FEEDFORWARD) >= {"dense", "moe"}
    with pytest.raises(ValueError, match="already registered"):
        register_feedforward("dense")(type("Other", (nn.Module,), {}))
    with pytest.raises(ValueError, match="attn.kind: unknown attention 'mla'"):
        make_config(attn={"kind": "mla"})


# ---- one mask builder ----
def test_mask_builder_cases():
    q = torch.arange(4)[None]
    m = causal_mask(q, q)[0, 0]
    assert torch.equal(m, torch.ones(4, 4, dtype=torch.bool).tril())
    w = causal_mask(q, q, window=2)[0, 0]
    assert w.sum(1).tolist() == [1, 2, 2, 2]
    pad = causal_mask(q, q, key_valid=torch.tensor([[0, 1, 1, 1]]))[0, 0]
    assert pad[0].tolist() == [True, False, False, False]  # a padding query sees itself, not nothing
    assert pad[2].tolist() == [False, True, True, False]
    doc = torch.tensor([[0, 0, 1, 1]])
    d = causal_mask(q, q, q_doc=doc, k_doc=doc)[0, 0]
    assert d[3].tolist() == [False, False, True, True]
    step = causal_mask(torch.tensor([[5]]), torch.arange(6)[None], window=3)[0, 0]  # a decode step at 5
    assert step.tolist() == [[False, False, False, True, True, True]]


def test_window_and_left_padding_equal_the_unpadded_row():
    m = tiny(pos="rope", sliding_window=5)
    x = torch.randint(0, V, (2, 20))
    am = torch.ones(2, 20, dtype=torch.long)
    am[1, :3] = 0  # left padding
    alone = m(x[1:, 3:])  # row 1 without its padding, from position 0
    pos = (am.cumsum(1) - 1).clamp(min=0)
    with_pos = m(x, attention_mask=am, position_ids=pos)
    torch.testing.assert_close(with_pos[1, 3:], alone[0], atol=1e-5, rtol=1e-5)


# ---- hidden states apart from logits ----
def test_hidden_states_and_logits_at():
    m = tiny(pos="rope", tie_embeddings=False, logit_softcap=20.0)
    x = torch.randint(0, V, (2, 11))
    full = m(x)
    h = m.hidden_states(x)
    assert h.shape == (2, 11, 32)
    torch.testing.assert_close(m.compute_logits(h), full, rtol=0, atol=0)
    torch.testing.assert_close(m(x, logits_at="last"), full[:, -1:], rtol=1e-6, atol=1e-6)
    idx = torch.tensor([[3, 7], [0, 10]])
    torch.testing.assert_close(m(x, logits_at=idx), full[torch.arange(2)[:, None], idx], rtol=1e-6, atol=1e-6)


# ---- wrappers from outside ----
def test_the_model_never_imports_train():
    code = ("import sys, torch; from lmforge.model import preset, Transformer;"
            "m = Transformer(preset('tiny-mixtral')); m(torch.zeros(1, 4, dtype=torch.long));"
            "bad = [k for k in sys.modules if k.startswith(('lmforge.train', 'lmforge.infer'))];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_building_counting_and_loading_a_model_import_no_dynamo(tmp_path):
    """torch's normal_ on the meta device imports torch._dynamo (seconds): a model built to be counted
    or loaded into must not pay it (a generate call builds its cache from the model's specs)."""
    code = ("import sys, torch; from lmforge.model import preset, Transformer, save, load;"
            "c = preset('tiny-mixtral'); c.num_params(); c.flops_per_token();"
            "m = Transformer(preset('tiny-llama', vocab_size=50)); save(m, sys.argv[1]); load(sys.argv[1]);"
            "from lmforge.infer.loop import generate; generate(m.eval(), [1, 2], 3, temperature=0);"
            "assert 'torch._dynamo' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], check=True)


def test_recompute_wrapper_keeps_names_and_gradients():
    from lmforge.train.recompute import apply_recompute

    m = tiny(pos="rope").train()
    names = list(m.state_dict())
    x = torch.randint(0, V, (2, 16))
    _, loss = m(x, x)
    loss.backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    for policy in ("full", "selective", "every:2"):
        m.zero_grad()
        apply_recompute(m, policy)
        assert list(m.state_dict()) == names
        _, loss = m(x, x)
        loss.backward()
        for n, p in m.named_parameters():
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6)
    apply_recompute(m, "none")
    assert all("forward" not in b.__dict__ for b in m.blocks)


def test_replace_linear_swaps_chosen_layers():
    class Scaled(nn.Linear):
        pass

    m = tiny()
    x = torch.randint(0, V, (1, 8))
    before = m(x)

    def make(name, lin):
        new = Scaled(lin.in_features, lin.out_features, bias=lin.bias is not None)
        new.load_state_dict(lin.state_dict())
        return new
    names = replace_linear(m, make, "blocks.*.attn.qkv")
    assert names == [f"blocks.{i}.attn.qkv" for i in range(3)]
    assert all(type(b.attn.qkv) is Scaled for b in m.blocks) and type(m.blocks[0].attn.proj) is nn.Linear
    torch.testing.assert_close(m(x), before, rtol=0, atol=0)
    assert replace_linear(m, make, lambda n, mod: n == "lm_head") == ["lm_head"]
    with pytest.raises(TypeError, match="not a module"):
        replace_linear(m, lambda n, mod: 3, "blocks.0.mlp.fc")
