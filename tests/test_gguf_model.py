"""lmforge model <-> GGUF (lmforge.quant.gguf_model): round trips, the permutation, the tokenizer keys,
quantized import as IntLinear, refusals and errors. (llama.cpp itself: tests/test_gguf_llamacpp.py.)"""
import dataclasses
import json

import numpy as np
import pytest
import torch

from lmforge.model.config import make as make_config
from lmforge.model.transformer import Transformer
from lmforge.quant import gguf as G
from lmforge.quant import gguf_model as gm
from lmforge.tokenize.special import TokenSpec, default_special_tokens

from mixed_sample import MIXED

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok(corpus_files):
    from lmforge import tokenize

    text = corpus_files[0].read_text(encoding="utf-8")[:100000] + "".join(MIXED)
    return tokenize.train("bpe", [text], 400, special_tokens=default_special_tokens("bpe"), show_progress=False)


def tiny(arch, **kw):
    base = dict(vocab_size=416, n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=96, max_seq_len=64,
                norm="rmsnorm", norm_bias=False, pos="rope", mlp="swiglu", mlp_bias=False, qkv_bias=arch == "qwen2",
                out_bias=False, qk_norm=arch == "qwen3", tie_embeddings=arch == "qwen2", arch=arch)
    base.update(kw)
    torch.manual_seed(0)
    m = Transformer(make_config(**base)).eval()
    with torch.no_grad():  # every weight matters (norms off 1, biases off 0)
        for p in m.parameters():
            p.add_((0.1 if p.dim() == 1 else 0.05) * torch.randn_like(p))
    return m


CASES = {
    "llama": dict(qkv_bias=True, out_bias=True, mlp_bias=True,  # llama.cpp's llama takes every bias
                  rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64}),
    "qwen2": dict(),
    "qwen3": dict(head_dim=32, n_kv_head=1),  # n_head * head_dim != d_model
}


def ids_of(tok, vocab):
    x = tok.encode("".join(MIXED[:3]), allowed_special="all")[:48]
    return torch.tensor([x])


@pytest.mark.parametrize("arch", list(CASES))
def test_f32_round_trip_is_exact(arch, tok, tmp_path):
    m = tiny(arch, **CASES[arch])
    spec = TokenSpec.for_tokenizer(tok)
    p = gm.export_gguf(m, tmp_path / "m.gguf", tok, spec)
    back, tok2, spec2 = gm.import_gguf(p)
    assert back.cfg == m.cfg
    own, theirs = m.state_dict(), back.state_dict()
    assert set(own) == set(theirs)
    for k, v in own.items():
        assert torch.equal(v, theirs[k]), k
    x = ids_of(tok, m.cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(m(x), back(x))
    assert spec2 == spec
    for s in MIXED:
        assert tok2.encode(s, allowed_special="all") == tok.encode(s, allowed_special="all")
        assert tok2.encode(s, disallowed_special=()) == tok.encode(s, disallowed_special=())
    assert tok2.vocab_size == tok.vocab_size and tok2.special_tokens == tok.special_tokens


def test_the_file_llama_cpp_reads(tok, tmp_path):
    """Keys, tensor names, GGUF shapes (ne0 first), tokens padded to the model's vocabulary, the llama
    Q/K permutation (rows of a head interleaved) and none for qwen."""
    m = tiny("llama", **CASES["llama"])
    f = G.read_gguf(gm.export_gguf(m, tmp_path / "l.gguf", tok))
    md, cfg = f.metadata, m.cfg
    assert md["general.architecture"] == "llama" and md["general.file_type"] == 0
    assert (md["llama.embedding_length"], md["llama.block_count"], md["llama.feed_forward_length"]) == (64, 2, 96)
    assert (md["llama.attention.head_count"], md["llama.attention.head_count_kv"]) == (4, 2)
    assert md["llama.attention.key_length"] == md["llama.rope.dimension_count"] == 16
    assert abs(md["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-12
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "llama-bpe"  # cl100k, whole words
    assert f.types["tokenizer.ggml.token_type"] == (G.GGUFValueType.ARRAY, G.GGUFValueType.INT32)
    toks, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    assert len(toks) == cfg.vocab_size == 416 and tok.vocab_size == 400
    assert toks[400:] == [f"[PAD{i}]" for i in range(400, 416)] and set(types[400:]) == {gm.UNUSED}
    for s, i in tok.special_tokens.items():
        assert toks[i] == s and types[i] == gm.CONTROL
    assert toks[tok.encode(" the")[0]] == "Ġthe" and types[tok.encode(" the")[0]] == gm.NORMAL
    spec = TokenSpec.for_tokenizer(tok)
    assert md["tokenizer.ggml.bos_token_id"] == spec.bos and md["tokenizer.ggml.eos_token_id"] == spec.stop[0]
    assert md["tokenizer.ggml.add_bos_token"] is True and md["tokenizer.chat_template"] == spec.chat_template
    assert f.tensors["blk.0.attn_q.weight"].shape == (64, 64) and f.tensors["blk.0.attn_k.weight"].shape == (64, 32)
    assert f.tensors["token_embd.weight"].shape == (64, 416) and "output.weight" in f.tensors
    assert f.tensors["blk.1.ffn_down.weight"].shape == (96, 64)
    q = m.blocks[0].attn.qkv.weight[:64].detach()
    got = torch.from_numpy(f.array("blk.0.attn_q.weight"))
    D = 16  # GGUF row 2j+h of a head = lmforge row h*D/2+j
    for head in range(4):
        for j in range(D // 2):
            for h in range(2):
                assert torch.equal(got[head * D + 2 * j + h], q[head * D + h * D // 2 + j])
    assert torch.equal(torch.from_numpy(f.array("blk.0.attn_q.bias")),
                       gm.permute_rope(m.blocks[0].attn.qkv.bias[:64].detach(), 4))
    freqs = f.array("rope_freqs.weight")
    assert freqs.shape == (8,) and freqs[0] == 1.0 and abs(freqs[-1] - 8.0) < 1e-5  # short wavelengths unscaled
    f.close()
    m = tiny("qwen2")
    f = G.read_gguf(gm.export_gguf(m, tmp_path / "q.gguf", tok))
    assert torch.equal(torch.from_numpy(f.array("blk.0.attn_q.weight")), m.blocks[0].attn.qkv.weight[:64])
    assert "output.weight" not in f.tensors  # tied
    f.close()


def test_types_and_the_q4_k_fallback(tok, tmp_path):
    m = tiny("qwen3", d_model=256, d_ff=512, head_dim=32)  # attn_output rows: 4 * 32 = 128
    sizes = {}
    for t in gm.TYPES:
        f = G.read_gguf(gm.export_gguf(m, tmp_path / f"{t}.gguf", tok, type=t))
        types = {n: ti.type for n, ti in f.tensors.items()}
        assert types["blk.0.attn_norm.weight"] == types["blk.0.attn_q_norm.weight"] == G.GGMLType.F32
        want = {"f32": G.GGMLType.F32, "f16": G.GGMLType.F16, "q8_0": G.GGMLType.Q8_0, "q4_0": G.GGMLType.Q4_0,
                "q4_k": G.GGMLType.Q4_K}[t]
        assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == want
        if t == "q4_k":
            assert types["blk.0.attn_output.weight"] == G.GGMLType.Q4_0
            assert f.metadata["lmforge.fallback"] == ["blk.0.attn_output.weight", "blk.1.attn_output.weight"]
        assert f.metadata["general.file_type"] == gm.FILE_TYPE[t]
        sizes[t] = (tmp_path / f"{t}.gguf").stat().st_size
        back, _, _ = gm.import_gguf(tmp_path / f"{t}.gguf")
        w, w2 = m.blocks[1].mlp.fc.weight, back.blocks[1].mlp.fc.weight
        err = (w - w2).abs().max().item()
        bound = {"f32": 0, "f16": 1e-3 * w.abs().max().item(),  # half a step of each format at this scale
                 "q8_0": w.abs().max().item() / 127, "q4_0": w.abs().max().item() / 7,
                 "q4_k": w.abs().max().item() / 7}[t]
        assert err <= bound, (t, err, bound)
        f.close()
    assert sizes["f32"] > 1.9 * sizes["f16"] > 3.5 * sizes["q8_0"] > 6 * sizes["q4_0"]


@pytest.mark.parametrize("t,bits", [("q8_0", 8), ("q4_0", 4)])
def test_q8_0_and_q4_0_import_as_int_linear(t, bits, tok, tmp_path):
    from lmforge.quant.linear import IntLinear

    m = tiny("llama", qkv_bias=True)
    p = gm.export_gguf(m, tmp_path / "m.gguf", tok, type=t)
    deq, _, _ = gm.import_gguf(p)
    q, _, _ = gm.import_gguf(p, dequantize=False)
    for name in ("blocks.0.attn.qkv", "blocks.1.attn.proj", "blocks.0.mlp.fc", "blocks.1.mlp.proj", "lm_head"):
        mod = q.get_submodule(name)
        assert isinstance(mod, IntLinear), name
        assert mod.qconfig() == {"format": "int", "bits": bits, "granularity": "group", "group_size": 32,
                                 "sym": True, "in_perm": False}
        assert torch.equal(mod.dequantize(), deq.get_submodule(name).weight), name  # the same numbers exactly
    assert torch.equal(q.blocks[0].attn.qkv.bias, m.blocks[0].attn.qkv.bias)
    # the codes are the file's: a Q8_0 block of absmax scaling holds +-127 (Q4_0: -8) somewhere
    codes = q.blocks[0].mlp.fc.codes()
    assert int(codes.abs().max()) == (127 if bits == 8 else 8) and int(codes.min()) >= -(2 ** (bits - 1))
    x = ids_of(tok, m.cfg.vocab_size)
    with torch.no_grad():
        assert (q(x) - deq(x)).abs().max() < 1e-4


def test_an_int_linear_model_exports(tok, tmp_path):
    """A quantized lmforge model (IntLinear) exports through its dequantized weights."""
    from lmforge.quant.linear import IntLinear
    from lmforge.model.surgery import replace_linear

    m = tiny("qwen3")
    replace_linear(m, lambda n, lin: IntLinear.from_linear(lin, bits=8, granularity="group", group_size=32),
                   "blocks.*")
    back, _, _ = gm.import_gguf(gm.export_gguf(m, tmp_path / "m.gguf", tok))
    assert torch.equal(back.blocks[0].mlp.fc.weight, m.blocks[0].mlp.fc.dequantize())


@pytest.mark.parametrize("kw,arch,msg", [
    (dict(mlp="relu2"), "qwen3", "ModelConfig.ffn.activation must be 'swiglu'"),
    (dict(mlp="gelu"), "llama", "ModelConfig.ffn.activation"),
    (dict(norm="layernorm"), "llama", "ModelConfig.norm must be 'rmsnorm'"),
    (dict(pos="learned"), "qwen2", "ModelConfig.pos must be 'rope'"),
    (dict(logit_softcap=30.0), "llama", "ModelConfig.logit_softcap"),
    (dict(sliding_window=16), "llama", "ModelConfig.attn.sliding_window"),
    (dict(moe=dict(n_experts=2, top_k=1, d_expert=32), arch="mixtral"), "llama", "ModelConfig.moe"),
    (dict(qk_norm=True), "llama", "ModelConfig.attn.qk_norm must be False"),
    (dict(qk_norm=False), "qwen3", "ModelConfig.attn.qk_norm must be True"),
    (dict(out_bias=True), "qwen2", "ModelConfig.attn.out_bias"),
    (dict(mlp_bias=True), "qwen3", "ModelConfig.ffn.bias"),
    (dict(head_dim=8), "qwen2", "ModelConfig.attn.head_dim"),
    (dict(rope_scaling=CASES["llama"]["rope_scaling"]), "qwen3", "ModelConfig.rope_scaling"),
])
def test_refuses_what_llama_cpp_cannot_run(kw, arch, msg, tok, tmp_path):
    base = dict(qk_norm=arch == "qwen3", arch=arch)
    base.update(kw)
    m = tiny(base.pop("arch"), **base)
    out = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match="cannot export as GGUF " + arch + ": " + msg.replace("(", r"\(")):
        gm.export_gguf(m, out, tok, arch=arch)
    assert not out.exists()


def test_bad_arguments_and_no_partial_file(tok, tmp_path):
    m = tiny("qwen3")
    out = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match=r"arch: 'gpt2' is not a GGUF architecture"):
        gm.export_gguf(m, out, tok, arch="gpt2")
    with pytest.raises(ValueError, match=r"ModelConfig.hf_family: 'mistral'"):
        gm.export_gguf(tiny("mistral", qk_norm=False), out, tok)
    with pytest.raises(ValueError, match=r"type: 'q5_k' is not one lmforge writes"):
        gm.export_gguf(m, out, tok, type="q5_k")
    with pytest.raises(ValueError, match="tokenizer: None"):
        gm.export_gguf(m, out, None)
    odd = tiny("qwen3", d_model=48, n_head=3, n_kv_head=1)
    with pytest.raises(ValueError, match=r"tensor token_embd.weight has rows of 48 values, which blocks of 32 do not divide"):
        gm.export_gguf(odd, out, tok, type="q8_0")
    assert not out.exists() and not list(tmp_path.iterdir())
    gm.export_gguf(odd, out, tok, type="f16")  # any row length
    before = out.read_bytes()
    with pytest.raises(ValueError, match="rows of 48"):
        gm.export_gguf(odd, out, tok, type="q4_k")
    assert out.read_bytes() == before  # a failed export leaves the old file alone
    nan = tiny("qwen3")
    with torch.no_grad():
        nan.blocks[1].mlp.proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"tensor 'blk.1.ffn_down.weight': non-finite values"):
        gm.export_gguf(nan, tmp_path / "nan.gguf", tok, type="q8_0")
    assert not (tmp_path / "nan.gguf").exists()
    small = tiny("qwen3", vocab_size=300)
    with pytest.raises(ValueError, match="the tokenizer has 400 tokens but the model only 300 embeddings"):
        gm.export_gguf(small, out, tok)


def test_tokenizers_llama_cpp_cannot_reproduce(tok, tmp_path, corpus_files):
    from lmforge import tokenize
    from lmforge.tokenize.bpe import ByteBPE

    m = tiny("qwen3")
    wp = tokenize.train("wordpiece", [corpus_files[0].read_text(encoding="utf-8")[:20000]], 300,
                        show_progress=False)
    with pytest.raises(ValueError, match="tokenizer: a WordPiece has no GGUF form"):
        gm.export_gguf(m, tmp_path / "x.gguf", wp)
    custom = ByteBPE(tok.tokens, merges=tok.merges, pattern=r"\w+|\s+|[^\w\s]+", special_tokens=tok.special_tokens)
    with pytest.raises(ValueError, match=r"tokenizer.pattern: .* is no llama.cpp pre-tokenizer's regex"):
        gm.export_gguf(m, tmp_path / "x.gguf", custom)
    nfc = ByteBPE(tok.tokens, merges=tok.merges, special_tokens=tok.special_tokens, normalizer="nfc")
    with pytest.raises(ValueError, match="tokenizer.normalizer: 'nfc'"):
        gm.export_gguf(m, tmp_path / "x.gguf", nfc)
    # cl100k without whole words is llama.cpp's "dbrx" (same regex, merges only)
    merges_only = ByteBPE(tok.tokens, merges=tok.merges, special_tokens=tok.special_tokens, whole_word=False)
    assert gm.pre_tokenizer(merges_only) == "dbrx"
    back, tok2, _ = gm.import_gguf(gm.export_gguf(m, tmp_path / "d.gguf", merges_only))
    assert tok2.whole_word is False and tok2.encode(MIXED[0]) == merges_only.encode(MIXED[0])
    # gpt2's pattern: llama.cpp's "gpt-2" merges only; with whole words it maps only where that changes nothing
    g = ByteBPE(tok.tokens, merges=tok.merges, pattern="gpt2", special_tokens=tok.special_tokens, whole_word=False)
    assert gm.pre_tokenizer(g) == "gpt-2"
    first = tok.tokens.index(tok.tokens[tok.merges[0][2]])
    rigged = list(tok.merges)
    rigged.remove(next(x for x in rigged if x[2] == first))  # a token merges alone no longer build
    gw = ByteBPE(tok.tokens, merges=rigged, pattern="gpt2", special_tokens=tok.special_tokens, whole_word=True)
    with pytest.raises(ValueError, match=r"tokenizer.whole_word: True differs from llama.cpp's 'gpt-2'"):
        gm.pre_tokenizer(gw)


def _write(path, md, tensors):
    G.write_gguf(path, md, tensors)
    return path


def test_import_errors_name_the_file_and_field(tok, tmp_path):
    m = tiny("qwen2")
    good = gm.export_gguf(m, tmp_path / "good.gguf", tok)
    f = G.read_gguf(good)
    md = dict(f.metadata)
    md["tokenizer.ggml.token_type"] = (G.GGUFValueType.INT32, md["tokenizer.ggml.token_type"])
    tensors = [(n, f.array(n), G.GGMLType.F32, ti.array_shape) for n, ti in f.tensors.items()]
    f.close()
    md.pop("general.alignment")

    def variant(name, **changes):
        d = {**md, **changes}
        for k, v in list(d.items()):
            if v is None:
                del d[k]
        return _write(tmp_path / name, d, tensors)

    p = variant("arch.gguf", **{"general.architecture": "gpt2"})
    with pytest.raises(ValueError, match=rf"{p}: general.architecture: 'gpt2' is not one lmforge imports"):
        gm.import_gguf(p)
    p = variant("pre.gguf", **{"tokenizer.ggml.pre": "deepseek-coder"})
    with pytest.raises(ValueError, match=rf"{p}: tokenizer.ggml.pre: 'deepseek-coder'"):
        gm.import_gguf(p)
    p = variant("nokey.gguf", **{"qwen2.block_count": None})
    with pytest.raises(ValueError, match=rf"{p}: missing metadata key 'qwen2.block_count'"):
        gm.import_gguf(p)
    p = variant("spm.gguf", **{"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match=rf"{p}: tokenizer.ggml.model: 'llama'"):
        gm.import_gguf(p)
    p = variant("moe.gguf", **{"qwen2.expert_count": 4})
    with pytest.raises(ValueError, match=rf"{p}: qwen2.expert_count: 4"):
        gm.import_gguf(p)
    p = _write(tmp_path / "notensor.gguf", md, [t for t in tensors if t[0] != "blk.1.ffn_up.weight"])
    with pytest.raises(ValueError, match=rf"{p}: missing tensor 'blk.1.ffn_up.weight'"):
        gm.import_gguf(p)
    edited = json.loads(md["lmforge.model"])
    edited["n_layer"] = 3
    p = variant("edited.gguf", **{"lmforge.model": json.dumps(edited)})
    with pytest.raises(ValueError, match=rf"{p}: lmforge.model says n_layer=3"):
        gm.import_gguf(p)
    raw = good.read_bytes()
    (tmp_path / "magic.gguf").write_bytes(b"GGUX" + raw[4:])
    with pytest.raises(ValueError, match="magic"):
        gm.import_gguf(tmp_path / "magic.gguf")
    (tmp_path / "short.gguf").write_bytes(raw[:len(raw) - 100])
    with pytest.raises(ValueError, match="truncated tensor data"):
        gm.import_gguf(tmp_path / "short.gguf")


def test_a_gguf_without_lmforge_keys_imports_from_the_standard_ones(tok, tmp_path):
    """What another converter writes (no lmforge.* keys): the config and TokenSpec from GGUF's own keys."""
    m = tiny("qwen3", head_dim=32)
    f = G.read_gguf(gm.export_gguf(m, tmp_path / "a.gguf", tok))
    md = {k: v for k, v in f.metadata.items() if not k.startswith("lmforge.") and k != "general.alignment"}
    md["tokenizer.ggml.token_type"] = (G.GGUFValueType.INT32, md["tokenizer.ggml.token_type"])
    md["qwen3.attention.layer_norm_rms_epsilon"] = (G.GGUFValueType.FLOAT32, 1e-5)
    md["qwen3.rope.freq_base"] = (G.GGUFValueType.FLOAT32, 10000.0)
    tensors = [(n, f.array(n), G.GGMLType.F32, ti.array_shape) for n, ti in f.tensors.items()]
    f.close()
    back, tok2, spec = gm.import_gguf(_write(tmp_path / "b.gguf", md, tensors))
    for k in ("vocab_size", "n_layer", "d_model", "norm_eps", "rope_theta", "tie_embeddings", "n_head", "kv_heads",
              "hd", "ff", "max_seq_len"):
        assert getattr(back.cfg, k) == getattr(m.cfg, k), k
    assert back.cfg.attn.qk_norm and not back.cfg.attn.qkv_bias
    x = ids_of(tok, 416)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    want = TokenSpec.for_tokenizer(tok)
    assert (spec.bos, spec.add_bos, spec.pad, spec.template, spec.chat_template) == \
           (want.bos, want.add_bos, want.pad, want.template, want.chat_template)
    assert spec.stop == want.stop[:2]  # eos and eot: what GGUF's keys hold


def test_cli_export_gguf(tok, tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.model import save

    m = tiny("qwen3")
    save(m, tmp_path / "ck", tokenizer=tok)
    out = tmp_path / "m.gguf"
    assert main(["export", "--checkpoint", str(tmp_path / "ck"), "--format", "gguf", "--type", "q8_0",
                 "--out", str(out)]) == 0
    assert "qwen3, q8_0" in capsys.readouterr().out
    f = G.read_gguf(out)
    assert f.tensors["blk.0.ffn_up.weight"].type == G.GGMLType.Q8_0
    f.close()
    back, _, spec = gm.import_gguf(out)
    assert spec == TokenSpec.for_tokenizer(tok)
    assert main(["export", "--checkpoint", str(tmp_path / "ck"), "--format", "gguf", "--arch", "gpt2",
                 "--out", str(tmp_path / "g.gguf")]) != 0
    assert "arch: 'gpt2' is not a GGUF architecture" in capsys.readouterr().err
    assert not (tmp_path / "g.gguf").exists()
    assert main(["export", "--checkpoint", str(tmp_path / "ck"), "--type", "q8_0", "--out", str(tmp_path / "h")]) != 0
    assert "--type applies to --format gguf" in capsys.readouterr().err


def test_cli_exports_a_quantized_checkpoint(tok, tmp_path):
    """`lmforge quantize` output (save_quantized) exports too: its dequantized weights, as --type."""
    from lmforge.cli import main
    from lmforge.quant.api import quantize
    from lmforge.quant.checkpoint import save_quantized
    from lmforge.quant.config import QuantConfig

    m = tiny("llama")
    quantize(m, QuantConfig(method="rtn", bits=8, granularity="group", group_size=32), progress=False)
    save_quantized(m, tmp_path / "q", tokenizer=tok)
    out = tmp_path / "q.gguf"
    assert main(["export", "--checkpoint", str(tmp_path / "q"), "--format", "gguf", "--out", str(out)]) == 0
    back, _, _ = gm.import_gguf(out)
    assert torch.equal(back.blocks[1].mlp.proj.weight, m.blocks[1].mlp.proj.dequantize())
