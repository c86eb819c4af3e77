"""HF parity, both directions: GPT-2, Llama (with Llama-3 RoPE scaling), Mistral
(sliding window), Qwen2 (qkv bias), Qwen3 (QK-norm, head_dim apart) with tiny
random configs; batch > 1 with left padding; logits within 1e-4 in fp32. Every
built-in preset exports to its family (the CPU-sized ones with parity checked
against transformers and a round trip back to the same config), ReLU² travels as
relu(gate) * up with gate = up, missing biases as zeros; a model its arch cannot
express is refused before training (recipe validation, ``lmforge pretrain``)."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.model import ModelConfig, load, make_config, save  # noqa: E402
from lmforge.model.hf import export_hf, import_hf  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402

V = 97


def hf_tiny(arch):
    """A tiny random HF model of each family (no downloads)."""
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if arch == "gpt2":
        c = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0,
                                    embd_pdrop=0, attn_pdrop=0)
    elif arch == "llama":
        c = transformers.LlamaConfig(**common, rope_theta=5000.0, attention_bias=True,
                                     rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    elif arch == "mistral":
        c = transformers.MistralConfig(**common, sliding_window=5)
    elif arch == "qwen2":
        c = transformers.Qwen2Config(**common)
    else:
        c = transformers.Qwen3Config(**{**common, "tie_word_embeddings": True}, head_dim=24)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(c, attn_implementation="eager").eval()
    with torch.no_grad():  # make every parameter count: random norms and biases too
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name or "ln" in name else 0.1 * torch.randn_like(p))
    return m


def batch(vocab=V):
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def compare(ours, theirs, ids, mask, pos):
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, position_ids=pos)
        b = theirs(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        real = mask.bool()
        err = (a[real] - b[real]).abs().max().item()
        # and without padding, the fast causal path
        a2 = ours(ids[:1])
        b2 = theirs(input_ids=ids[:1]).logits
        err2 = (a2 - b2).abs().max().item()
    return err, err2


ARCHS = ["gpt2", "llama", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_import_from_hf_matches(arch, tmp_path):
    hf = hf_tiny(arch)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours, _ = import_hf(tmp_path)
    ours.eval()
    assert ours.cfg.hf_family == arch
    err, err2 = compare(ours, hf, *batch())
    assert err < 1e-4 and err2 < 1e-4, (err, err2)


def lmforge_tiny(arch):
    base = dict(vocab_size=V, n_layer=2, n_head=4, d_model=64, max_seq_len=64, arch=arch)
    if arch == "gpt2":
        cfg = make_config(**base)
    else:
        llama = dict(norm="rmsnorm", norm_bias=False, mlp="swiglu", pos="rope", qkv_bias=False, out_bias=False,
                     mlp_bias=False, tie_embeddings=False, n_kv_head=2, d_ff=96, norm_eps=1e-6)
        extra = {"llama": dict(rope_scaling={"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                               n_kv_head=1),
                 "mistral": dict(sliding_window=5),
                 "qwen2": dict(qkv_bias=True, rope_theta=1e6),
                 "qwen3": dict(qk_norm=True, head_dim=24, tie_embeddings=True)}[arch]
        cfg = make_config(**{**base, **llama, **extra})
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("arch", ARCHS)
def test_export_to_hf_matches(arch, tmp_path):
    ours = lmforge_tiny(arch)
    export_hf(ours, tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["model_type"] == arch
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    err, err2 = compare(ours, hf, *batch())
    assert err < 1e-4 and err2 < 1e-4, (err, err2)
    # and back again: identical tensors
    back, _ = import_hf(tmp_path)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_sdpa_attention_in_hf_agrees_too(tmp_path):
    ours = lmforge_tiny("mistral")
    export_hf(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    err, err2 = compare(ours, hf, *batch())
    assert err < 1e-4 and err2 < 1e-4


def test_lmforge_checkpoint_roundtrip(tmp_path, corpus_files):
    from lmforge import tokenize

    tok = tokenize.train("bpe", [str(corpus_files[0])], 300, special_tokens=["<|endoftext|>"], show_progress=False)
    import dataclasses

    m = Transformer(dataclasses.replace(lmforge_tiny("qwen3").cfg, vocab_size=320)).eval()
    save(m, tmp_path / "ck", tokenizer=tok)
    m2, tok2 = load(tmp_path / "ck")
    ids = torch.randint(0, 320, (2, 10))
    assert torch.equal(m(ids), m2(ids))
    assert tok2.encode("To be") == tok.encode("To be")
    assert m2.lm_head.weight is m2.tok_emb.weight  # still tied
    # a tokenizer with more tokens than the model has embeddings is refused, when saving and when loading
    with pytest.raises(ValueError, match="tokenizer has 300 tokens but the model only 97"):
        save(lmforge_tiny("qwen3"), tmp_path / "bad", tokenizer=tok)
    save(lmforge_tiny("qwen3"), tmp_path / "bad")
    tok.save(tmp_path / "bad" / "tokenizer.lmforge.json")  # put there by hand
    with pytest.raises(ValueError, match="tokenizer has 300 tokens but the model only 97"):
        load(tmp_path / "bad")


def test_export_refuses_what_the_family_cannot_express(tmp_path):
    m = lmforge_tiny("llama")
    with pytest.raises(ValueError, match="cannot export as gpt2: ModelConfig.norm"):
        export_hf(m, tmp_path, arch="gpt2")
    cfg = make_config(vocab_size=V, n_layer=1, n_head=2, d_model=32, qk_norm=True)
    with pytest.raises(ValueError, match="qk_norm"):
        export_hf(Transformer(cfg), tmp_path, arch="gpt2")
    with pytest.raises(ValueError, match="cannot export as qwen3: ModelConfig.attn.qk_norm must be True"):
        export_hf(m, tmp_path / "out", arch="qwen3")
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize("kw,msg", [
    (dict(n_head=5, d_model=64), "n_head: 5 heads do not divide d_model=64"),
    (dict(n_head=4, n_kv_head=3, d_model=64), "n_kv_head: 3 key/value heads must divide n_head=4"),
    (dict(mlp="swish"), "ffn.activation: expected"),
    (dict(pos="rope", head_dim=7, d_model=28, n_head=4), "RoPE needs an even head dimension"),
])
def test_inconsistent_config_is_rejected(kw, msg):
    with pytest.raises(ValueError, match=msg):
        make_config(**kw)


def test_bad_checkpoints(tmp_path):
    m = lmforge_tiny("llama")
    save(m, tmp_path / "a")
    # truncated weights
    p = tmp_path / "a" / "model.safetensors"
    data = p.read_bytes()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "b" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read the weights"):
        load(tmp_path / "b")
    # weights of another architecture
    other = lmforge_tiny("gpt2")
    save(other, tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    with pytest.raises(ValueError, match="unexpected tensor|has shape"):
        load(tmp_path / "c")


def test_gelu_tanh_kernel_matches_pytorch():
    import os

    from lmforge.model import kernels

    if os.environ.get("LMFORGE_REQUIRE_NATIVE") == "1":
        assert kernels.AVAILABLE, "the lmforge.model._kernels C extension did not build"
    x = torch.cat([torch.linspace(-30, 30, 20001), torch.randn(3 << 20)]).requires_grad_()
    g = torch.randn_like(x)
    ref = torch.nn.functional.gelu(x, approximate="tanh")
    ours = kernels.gelu_tanh(x)
    assert (ref - ours).abs().max() < 1e-6
    gr, = torch.autograd.grad(ref, x, g)
    go, = torch.autograd.grad(ours, x, g)
    assert (gr - go).abs().max() < 2e-5
    assert torch.isnan(kernels.gelu_tanh(torch.tensor([float("nan")]))).all()
    # far tails: the backward works from (y, s), which must not break where s rounds to 0 or 1
    big = torch.tensor([-1e30, -1e4, -20.0, 20.0, 1e4, 1e30], requires_grad=True)
    ref = torch.nn.functional.gelu(big, approximate="tanh")
    ours = kernels.gelu_tanh(big)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6)
    gr, = torch.autograd.grad(ref.sum(), big)
    go, = torch.autograd.grad(ours.sum(), big)
    ok = torch.isfinite(gr)  # PyTorch's own gradient overflows at 1e30 (x^3)
    assert ok.sum() >= 4 and torch.allclose(go[ok], gr[ok], atol=1e-6)


@pytest.mark.parametrize("N,V", [(2048, 2048), (1024, 65), (7, 50304), (1 << 16, 1)])
def test_fused_cross_entropy_matches_pytorch(N, V):
    import os

    from lmforge.model import kernels

    if os.environ.get("LMFORGE_REQUIRE_NATIVE") == "1":
        assert kernels.AVAILABLE, "the lmforge.model._kernels C extension did not build"
    torch.manual_seed(N)
    x = (torch.randn(N, V) * 4).requires_grad_()
    t = torch.randint(0, V, (N,))
    t[::5] = -100
    g = torch.tensor(1.7)
    for reduction in ("mean", "sum"):
        ref = torch.nn.functional.cross_entropy(x, t, reduction=reduction)
        ours = kernels.cross_entropy(x, t, reduction=reduction)
        assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-5), reduction
        gr, = torch.autograd.grad(ref, x, g)
        go, = torch.autograd.grad(ours, x, g)
        assert (gr - go).abs().max() <= 4e-6 * gr.abs().max(), reduction
        assert (go[::5] == 0).all()  # ignored rows
    # another ignore_index, and every row ignored (PyTorch gives NaN for the mean)
    t2 = torch.where(t < 0, torch.full_like(t, 3 % V), t)
    assert torch.allclose(kernels.cross_entropy(x, t2, ignore_index=3 % V),
                          torch.nn.functional.cross_entropy(x, t2, ignore_index=3 % V), rtol=1e-6, atol=1e-5,
                          equal_nan=True)
    assert torch.isnan(kernels.cross_entropy(x, torch.full_like(t, -100)))


def test_fused_cross_entropy_edges():
    from lmforge.model import kernels

    x = torch.randn(256, 300)  # large enough for the kernel (smaller ones go to PyTorch)
    t = torch.randint(0, 300, (256,))
    y = x.clone()
    y[5, 7] = float("-inf")  # a masked logit is fine
    t[5] = 8
    assert torch.allclose(kernels.cross_entropy(y, t), torch.nn.functional.cross_entropy(y, t), rtol=1e-6)
    for bad in (float("nan"), float("inf")):  # a NaN or +inf logit makes the loss NaN (the trainer stops on it)
        y = x.clone()
        y[9, 1] = bad
        assert torch.isnan(kernels.cross_entropy(y, t))
    t[40] = 300
    bad_target = "target 300 at row 40 is outside" if kernels.AVAILABLE else "out of bounds"  # PyTorch's words
    with pytest.raises(IndexError, match=bad_target):
        kernels.cross_entropy(x, t)
    # what the kernel does not take goes to PyTorch: same answers
    xd = x.double()
    assert torch.allclose(kernels.cross_entropy(xd, t.clamp(max=299)).float(),
                          torch.nn.functional.cross_entropy(x, t.clamp(max=299)), rtol=1e-5)
    t[200] = -5  # with the rows split over threads, the first bad row is the one reported
    with pytest.raises(IndexError, match=bad_target):
        kernels.cross_entropy(x, t)


def _attention_case(B, H, T, D, layout, seed=0):
    torch.manual_seed(seed)
    if layout == "qkv":  # views of one projection's output, as the model passes them
        leaf = torch.randn(B, T, 3 * H * D, requires_grad=True)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in leaf.split(H * D, dim=-1))
        leaves = [leaf]
    else:
        leaves = [torch.randn(B, H, T, D, requires_grad=True) for _ in range(3)]
        q, k, v = leaves
    return q, k, v, leaves


@pytest.mark.parametrize("B,H,T,D,layout", [(2, 3, 1, 16, "bhtd"), (2, 3, 7, 16, "bhtd"), (1, 2, 17, 32, "bhtd"),
                                            (3, 2, 50, 48, "bhtd"), (2, 2, 130, 64, "qkv"), (1, 1, 300, 128, "bhtd"),
                                            (4, 6, 100, 64, "qkv")])
def test_causal_attention_kernel_matches_sdpa(B, H, T, D, layout):
    import os

    from lmforge.model import kernels

    if os.environ.get("LMFORGE_REQUIRE_NATIVE") == "1":
        assert kernels.ATTENTION, "the lmforge.model._attention C extension did not build"
    q, k, v, leaves = _attention_case(B, H, T, D, layout)
    y = kernels.causal_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert y.shape == ref.shape and (y - ref).abs().max() < 2e-6
    g = torch.randn_like(ref)
    gy = torch.autograd.grad(y, leaves, g)
    for a, b in zip(gy, torch.autograd.grad(ref, leaves, g)):
        assert (a - b).abs().max() < 1e-5
    # one thread or several: each (batch, head) pair is one thread's, so the numbers are the same bits
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = kernels.causal_attention(q, k, v)
        g1 = torch.autograd.grad(y1, leaves, g)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y1, y)
    assert all(torch.equal(a, b) for a, b in zip(g1, gy))


def test_causal_attention_kernel_edges():
    from lmforge.model import kernels

    q, k, v, _ = _attention_case(2, 2, 40, 32, "bhtd")
    bad = v.detach().clone()
    bad[1, 0, 3, 5] = float("nan")  # a NaN reaches every later query of that head (the trainer stops on it)
    y = kernels.causal_attention(q.detach(), k.detach(), bad)
    # (earlier queries of the same 6-row tile may get it too: 0 * NaN in the tile's product)
    assert torch.isnan(y[1, 0, 3:, 5]).all() and not torch.isnan(y[0]).any() and not torch.isnan(y[1, 1]).any()
    bad = q.detach().clone()
    bad[0, 1, 9, 0] = float("nan")
    y = kernels.causal_attention(bad, k.detach(), v.detach())
    assert torch.isnan(y[0, 1, 9]).all() and torch.isfinite(y[0, 1, :9]).all()
    # what the kernel does not take goes to SDPA: same answers
    long = torch.randn(1, 1, 4097, 64)  # T x D past the kernel's cache-sized limit
    for args in ((q.double(), k.double(), v.double()), (q[..., :24], k[..., :24], v[..., :24]), (long,) * 3):
        ref = torch.nn.functional.scaled_dot_product_attention(*args, is_causal=True)
        assert torch.allclose(kernels.causal_attention(*args), ref)


def test_kernels_without_openmp_use_pthreads():
    """Where no OpenMP runtime is loaded the kernels start their own threads: same numbers."""
    import os
    import subprocess
    import sys
    import tempfile

    from lmforge.model import kernels

    if not kernels.ATTENTION:
        assert os.environ.get("LMFORGE_REQUIRE_NATIVE") != "1", "the lmforge.model._attention C extension did not build"
        pytest.skip("no attention kernel on this machine (no AVX2, or not built)")
    code = ("import torch; from lmforge.model import kernels as K; torch.manual_seed(0); "
            "q, k, v = torch.randn(3, 4, 6, 100, 64).unbind(0); torch.set_num_threads(2); "
            "print(K._attention.threads()); torch.save(K.causal_attention(q, k, v), __import__('sys').argv[1])")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "y.pt")
        r = subprocess.run([sys.executable, "-c", code, out], env={**os.environ, "LMFORGE_NO_OPENMP": "1"},
                           capture_output=True, text=True, check=True)
        assert r.stdout.strip() == "pthreads"
        torch.manual_seed(0)
        q, k, v = torch.randn(3, 4, 6, 100, 64).unbind(0)
        assert torch.equal(torch.load(out), kernels.causal_attention(q, k, v))
    if sys.platform.startswith("linux") and os.environ.get("LMFORGE_NO_OPENMP") != "1":  # wheels load libgomp
        assert kernels._attention.threads() == "openmp"


# ---- every preset exports; ReLU², zero biases; what cannot export fails early ----------

from lmforge.model.config import PRESETS, preset  # noqa: E402
from lmforge.model.hf import check_exportable, export_status  # noqa: E402

CPU_SIZED = [n for n in PRESETS if preset(n).num_params() < 20_000_000]  # not gpt2-124m/350m, llama-1b


def perturbed(cfg):
    """A model of ``cfg`` with every parameter random and non-degenerate: norm (and QK-norm)
    weights away from 1, biases away from 0, zero-initialized projections filled."""
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.add_(0.05 * torch.randn_like(p))
    return m


def same_model(a: ModelConfig, b: ModelConfig) -> None:
    """The fields that shape the function (derived sizes, not how they were spelled; not init-only fields)."""
    skip = {"attn.n_kv_head", "attn.head_dim", "ffn.d_ff", "init_std", "zero_init_proj", "dropout"}
    if a.norm == "rmsnorm":
        skip.add("norm_bias")  # RMSNorm has none either way

    def flat(c):
        out = {}
        for k, v in c.to_dict().items():
            for kk, vv in (v.items() if isinstance(v, dict) and k != "rope_scaling" else [(None, v)]):
                out[k if kk is None else f"{k}.{kk}"] = vv
        return {k: v for k, v in out.items() if k not in skip}
    da, db = flat(a), flat(b)
    assert da == db
    assert (a.kv_heads, a.hd, a.ff) == (b.kv_heads, b.hd, b.ff)


def export_and_compare(ours, tmp_path, arch=None):
    """Export, load with transformers, compare logits; import back: same config, tensors, logits."""
    cfg = ours.cfg
    export_hf(ours, tmp_path, arch=arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask, pos = batch(cfg.vocab_size)
    if cfg.pos == "learned":  # left padding moves no position past max_seq_len here
        assert ids.shape[1] <= cfg.max_seq_len
    err, err2 = compare(ours, hf, ids, mask, pos)
    assert err < 1e-4 and err2 < 1e-4, (err, err2)
    back, _ = import_hf(tmp_path)
    same_model(back.cfg, cfg)
    assert back.cfg.hf_family == (arch or cfg.hf_family)
    own, theirs = ours.state_dict(), back.state_dict()
    assert set(own) == set(theirs)
    for k, v in own.items():
        assert torch.equal(v, theirs[k]), k
    with torch.no_grad():
        assert torch.equal(ours(ids), back.eval()(ids))
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_names_a_family_that_expresses_it(name):
    cfg = preset(name)
    assert cfg.hf_family != "none", f"preset {name} is not exported"
    check_exportable(cfg, cfg.hf_family)
    st = export_status(cfg)
    assert st["exports"] and st["why"] is None and cfg.hf_family in st["expressible_as"]


@pytest.mark.parametrize("name", CPU_SIZED)
def test_cpu_presets_export_with_parity(name, tmp_path):
    cfg = preset(name)
    conf = export_and_compare(perturbed(cfg), tmp_path)
    assert conf["model_type"] == cfg.hf_family
    if name == "shakespeare-cpu":  # ReLU² as a gated ReLU with gate = up
        assert conf["hidden_act"] == "relu" and conf["model_type"] == "qwen3"
        from safetensors.torch import load_file

        t = load_file(tmp_path / "model.safetensors")
        assert torch.equal(t["model.layers.2.mlp.gate_proj.weight"], t["model.layers.2.mlp.up_proj.weight"])
    if name == "baby-gpt":  # exact GELU, every bias written as zeros
        assert conf["activation_function"] == "gelu"
        from safetensors.torch import load_file

        t = load_file(tmp_path / "model.safetensors")
        assert not t["transformer.h.0.attn.c_attn.bias"].any() and not t["transformer.ln_f.bias"].any()


ODD = {  # choices the families express only through the identities (ReLU², zero biases)
    "llama-relu2-biases": (dict(norm="rmsnorm", mlp="relu2", pos="rope", qkv_bias=True, out_bias=False,
                                mlp_bias=True, n_kv_head=2, tie_embeddings=False), "llama"),
    "qwen2-no-qkv-bias": (dict(norm="rmsnorm", mlp="swiglu", d_ff=96, pos="rope", qkv_bias=False, out_bias=False,
                               mlp_bias=False), "qwen2"),
    "qwen3-out-bias-only": (dict(norm="rmsnorm", mlp="relu2", pos="rope", qk_norm=True, qkv_bias=False,
                                 out_bias=True, mlp_bias=False, head_dim=24), "qwen3"),
    "gpt2-relu2-some-biases": (dict(mlp="relu2", qkv_bias=False, norm_bias=False, tie_embeddings=False), "gpt2"),
    "mistral-relu2": (dict(norm="rmsnorm", mlp="relu2", pos="rope", qkv_bias=False, out_bias=False,
                           mlp_bias=False, sliding_window=5, n_kv_head=1), "mistral"),
}


@pytest.mark.parametrize("name", list(ODD))
def test_identities_export_with_parity(name, tmp_path):
    kw, arch = ODD[name]
    cfg = make_config(vocab_size=V, n_layer=2, n_head=4, d_model=64, max_seq_len=64, arch=arch, **kw)
    export_and_compare(perturbed(cfg), tmp_path)


def test_gated_relu_is_refused_on_import(tmp_path):
    from safetensors.torch import load_file, save_file

    from lmforge.model import load_config

    export_hf(perturbed(preset("shakespeare-cpu", vocab_size=V)), tmp_path)
    assert load_config(tmp_path).ffn.activation == "relu2"  # from the few tensors it reads
    t = load_file(tmp_path / "model.safetensors")
    t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"] * 1.5
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"gate_proj.weight != up_proj.weight \(layer 1\) is a gated ReLU"):
        import_hf(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match="needs the weights"):
        from lmforge.model.hf import config_from_hf

        config_from_hf(conf)


@pytest.mark.parametrize("kw,arch,msg", [
    (dict(pos="learned"), "qwen3", "ModelConfig.pos must be 'rope'"),
    (dict(logit_softcap=30.0), "qwen3", "logit_softcap must be None"),
    (dict(sliding_window=8), "qwen3", "attn.sliding_window must be None"),
    (dict(sliding_window=8, qk_norm=False), "llama", "attn.sliding_window must be None"),
    (dict(), "llama", "attn.qk_norm must be False"),
    (dict(qk_norm=False), "qwen3", "attn.qk_norm must be True"),
    (dict(qk_norm=False, qkv_bias=True), "mistral", "attn.qkv_bias must be False"),
    (dict(qk_norm=False, out_bias=True), "qwen2", "attn.out_bias must be False"),
    (dict(mlp_bias=True), "qwen3", "ffn.bias must be False"),
    (dict(mlp="gelu"), "qwen3", "ffn.activation must be one of swiglu, relu2"),
    (dict(qk_norm=False, rope_scaling={"type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
     "qwen2", "rope_scaling must be None"),
    (dict(), "gpt2", "norm must be 'layernorm'"),
    (dict(norm="layernorm", pos="learned", mlp="swiglu", qk_norm=False), "gpt2", "ffn.activation must be one of"),
    (dict(norm="layernorm", pos="learned", qk_norm=False, n_kv_head=1), "gpt2", "attn.n_kv_head must be None"),
    (dict(), "none", "hf_family 'none' means the model is not exported"),
])
def test_check_exportable_names_the_field(kw, arch, msg):
    cfg = preset("shakespeare-cpu", **kw)
    with pytest.raises(ValueError, match=msg):
        check_exportable(cfg, arch)


def test_recipe_that_cannot_export_fails_validation_before_any_work(tmp_path):
    from lmforge.cli import main
    from lmforge.pipeline import load_recipe

    learned = 'train.model={"mlp": "swiglu", "d_ff": 256, "arch": "qwen3", "pos": "learned"}'
    with pytest.raises(ValueError, match=r"train: model.hf_family = 'qwen3' but cannot export as qwen3: "
                                         r"ModelConfig.pos must be 'rope'"):
        load_recipe("default", [learned])
    # a model not tied to a family, exported as one that cannot express it
    sets = ['train.model={"arch": "none", "pos": "learned"}', "export.arch=qwen3"]
    with pytest.raises(ValueError, match="export: cannot export as qwen3: ModelConfig.pos must be 'rope'"):
        load_recipe("default", sets)
    with pytest.raises(ValueError, match="export: the model's arch is 'none'"):
        load_recipe("default", ['train.model={"arch": "none"}'])
    load_recipe("default", ['train.model={"arch": "none"}', "export.arch=none"])  # the stage skips: fine
    assert main(["run", "default", "--set", learned, "--runs", str(tmp_path / "runs"), "-q"]) == 2
    assert not (tmp_path / "runs").exists()  # nothing fetched, tokenized or trained


def test_pretrain_refuses_a_model_its_arch_cannot_express(tmp_path, corpus_files):
    from lmforge.cli import main

    out = tmp_path / "run"
    args = ["pretrain", "--text", str(corpus_files[0]), "--preset", "shakespeare-cpu", "--max-steps", "1",
            "--out", str(out), "-q"]
    assert main(args + ["--set", "model.pos=learned"]) == 2
    assert not out.exists()  # before the tokenizer, the data and the first step


def test_model_info_names_the_hf_family(tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.model import save

    assert main(["model", "info"]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in table[1:] if line.split()[0] in PRESETS}
    assert set(rows) == set(PRESETS)
    assert rows["shakespeare-cpu"].endswith("qwen3") and rows["baby-gpt"].endswith("gpt2")
    assert "4 x 96" in rows["shakespeare-cpu"] and f"{preset('shakespeare-cpu').num_params():,}" in rows["shakespeare-cpu"]
    assert main(["model", "info", "shakespeare-cpu"]) == 0
    assert "HF export         qwen3 (Qwen3ForCausalLM)" in capsys.readouterr().out
    assert main(["model", "info", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["hf_export"]["arch"] for r in listed}["baby-gpt"] == "gpt2"
    # a checkpoint that is not exported says so, and which families could take it
    save(Transformer(preset("tiny-llama", arch="none", vocab_size=V)), tmp_path / "m")
    assert main(["model", "info", str(tmp_path / "m")]) == 0
    assert "not by default: arch is 'none' (not exported); expressible as llama, mistral, qwen2" in \
        capsys.readouterr().out
    assert main(["model", "info", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert "neither a preset nor a model directory" in err and "shakespeare-cpu" in err


@pytest.mark.parametrize("name", ["baby-gpt", "shakespeare-cpu"])
def test_a_trained_cpu_preset_exports_with_its_tokenizer(name, tmp_path, corpus_files):
    """The user's path: `lmforge pretrain --preset NAME` (its own recipe and tokenizer), then
    `lmforge export`; transformers tokenizes like lmforge and computes the same logits."""
    from lmforge.cli import main

    text = tmp_path / "plays.txt"
    text.write_text(corpus_files[0].read_text(encoding="utf-8")[:40000], encoding="utf-8")
    run, hf_dir = tmp_path / "run", tmp_path / "hf"
    assert main(["pretrain", "--text", str(text), "--preset", name, "--max-steps", "2", "--set", "eval_every=0",
                 "--set", "final_eval_batches=1", "--set", "peak_flops=1e11", "--out", str(run), "-q"]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(hf_dir)]) == 0
    ours, tok = load(run)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    sample = "KING.\nMy lords, to be, or not to be:\n  that is the question."
    ids = hf_tok(sample)["input_ids"]
    assert ids == tok.encode(sample) and hf_tok.decode(ids) == sample
    x = torch.tensor([ids[:ours.cfg.max_seq_len]])
    with torch.no_grad():
        assert (ours.eval()(x) - hf(input_ids=x).logits).abs().max() < 1e-4
        back, tok2 = load(hf_dir)
        same_model(back.cfg, ours.cfg)
        assert torch.equal(back.eval()(x), ours(x)) and tok2.encode(sample) == ids


def test_char_tokenizer_as_hf_wordlevel(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from lmforge.tokenize.char import CharTokenizer
    from lmforge.tokenize.formats import load_hf, save_hf

    tok = CharTokenizer.train(["To be, or not to be?\n  That is\tthe question: é"], special_tokens=["<|endoftext|>"],
                              unk="?")
    save_hf(tok, tmp_path / "tokenizer.json")
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "that is\n\n  not the question ... zz é"  # '.', 'z' are outside the alphabet: the unk, '?'
    ids = tok.encode(text)
    assert theirs.encode(text).ids == ids and ids.count(tok.token_to_id("?")) == 5
    assert theirs.decode(ids) == tok.decode(ids)
    assert theirs.token_to_id("<|endoftext|>") == tok.special_tokens["<|endoftext|>"]
    back = load_hf(tmp_path / "tokenizer.json")
    assert (back.chars, back.special_tokens, back.unk) == (tok.chars, tok.special_tokens, tok.unk)
    d = json.loads((tmp_path / "tokenizer.json").read_text())
    d["model"]["vocab"]["ab"] = len(d["model"]["vocab"])
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="read only as lmforge's character tokenizer"):
        load_hf(tmp_path / "tokenizer.json")
