"""llama.cpp as the oracle for lmforge's GGUF export and import (llama-cpp-python built from source).

For Llama-, Qwen2- and Qwen3-shaped tiny lmforge models (rows of 256, so every type's blocks fit) with
a BPE tokenizer lmforge trained: llama.cpp tokenizes the mixed sample as lmforge does; its logits on
lmforge's F32 file match lmforge's within 1e-3, and on the F16 / Q8_0 / Q4_0 / Q4_K files within each
type's stated error (``TOL``); greedy text is identical for F32 and Q8_0; lmforge's Q4_K blocks against
llama.cpp's own quantizer (``llama_model_quantize``, Q4_K_S and Q4_K_M) on lmforge's F32 file; and
llama.cpp's quantized files import into lmforge with llama.cpp's logits.

Where the errors come from. lmforge's logits on a quantized file use the file's dequantized weights
in fp32; llama.cpp multiplies Q8_0 / Q4_0 / Q4_K weights by activations it quantizes itself (to Q8_0
blocks, Q8_K for the K types), so the two differ by that activation rounding: ``TOL`` bounds it
(max |logit difference| relative to the logits' spread), measured here with room to spare.
"""
import numpy as np
import pytest
import torch

from lmforge.model.config import make as make_config
from lmforge.model.transformer import Transformer
from lmforge.quant import gguf as G
from lmforge.quant import gguf_model as gm
from lmforge.tokenize.special import TokenSpec, default_special_tokens

from conftest import assert_informative
from mixed_sample import MIXED

llama_cpp = pytest.importorskip("llama_cpp")
torch.set_num_threads(1)

ARCHS = {
    "llama": dict(qkv_bias=False),
    "qwen2": dict(qkv_bias=True, tie_embeddings=True),
    "qwen3": dict(qk_norm=True, head_dim=32),  # n_head * head_dim = 128 != d_model (attn_output rows: 128)
}
# max |lmforge logits - llama.cpp logits| / (the logits' standard deviation), per type, llama.cpp running the
# file and lmforge the same file's dequantized weights (the difference is llama.cpp's activation rounding)
TOL = {"f32": None, "f16": 2e-3, "q8_0": 2e-2, "q4_0": 2e-2, "q4_k": 2e-2}
PROMPT = "KING HENRY. Once more unto the breach, dear friends, once more;\n  Or close the wall up"


@pytest.fixture(scope="module")
def tok(corpus_files):
    from lmforge import tokenize

    text = corpus_files[0].read_text(encoding="utf-8")[:150000] + "".join(MIXED) * 3
    return tokenize.train("bpe", [text], 500, special_tokens=default_special_tokens("bpe"), show_progress=False)


def tiny(arch, vocab):
    kw = dict(vocab_size=vocab, n_layer=2, d_model=256, n_head=4, n_kv_head=2, d_ff=512, max_seq_len=128,
              norm="rmsnorm", norm_bias=False, pos="rope", mlp="swiglu", mlp_bias=False, out_bias=False,
              tie_embeddings=False, rope_theta=10000.0, arch=arch, **ARCHS[arch])
    torch.manual_seed(0)
    m = Transformer(make_config(**kw)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the near-identity init: every weight matters, greedy text depends on the prompt
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else 0.06))
    return m


@pytest.fixture(scope="module")
def files(tok, tmp_path_factory):
    """arch -> (model, {type: path}) for every arch and type."""
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch in ARCHS:
        m = tiny(arch, tok.vocab_size + 12)  # 12 placeholder ids past the tokenizer's
        out[arch] = (m, {t: gm.export_gguf(m, d / f"{arch}-{t}.gguf", tok, type=t) for t in gm.TYPES})
    return out


def llama(path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_ubatch=128, logits_all=True,
                           n_threads=1, verbose=False)


def cpp_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def ours_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def cpp_greedy(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out


def ours_greedy(model, ids, n):
    x = list(ids)
    with torch.no_grad():
        for _ in range(n):
            x.append(int(model(torch.tensor([x]))[0, -1].argmax()))
    return x[len(ids):]


def test_tokenizes_like_lmforge(tok, files):
    spec = TokenSpec.for_tokenizer(tok)
    llm = llama(files["qwen3"][1]["q4_0"])
    for s in MIXED + [PROMPT, "<|user|>hi<|end|><|assistant|>"]:
        b = s.encode("utf-8")
        assert llm.tokenize(b, add_bos=False, special=True) == tok.encode(s, allowed_special="all"), s
        assert llm.tokenize(b, add_bos=False, special=False) == tok.encode(s, disallowed_special=()), s
        assert llm.tokenize(b, add_bos=True, special=False) == spec.encode_prompt(tok, s), s  # BOS per TokenSpec
        ids = tok.encode(s, disallowed_special=())
        assert llm.detokenize(ids) == tok.decode_bytes(ids), s
    assert llm.token_bos() == spec.bos and llm.token_eos() == spec.stop[0]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_and_greedy_text_match(arch, tok, files):
    model, paths = files[arch]
    ids = TokenSpec.for_tokenizer(tok).encode_prompt(tok, PROMPT)
    ref = ours_logits(model, ids)
    spread = float(ref.std())
    for t, path in paths.items():
        llm = llama(path)
        got = cpp_logits(llm, ids)
        if t == "f32":
            assert np.abs(got - ref).max() < 1e-3, (arch, np.abs(got - ref).max())
        else:  # lmforge on the same file's weights
            back, _, _ = gm.import_gguf(path)
            mine = ours_logits(back, ids)
            rel = np.abs(got - mine).max() / spread
            assert rel < TOL[t], (arch, t, rel)
        if t in ("f32", "q8_0"):  # greedy text: llama.cpp's own KV cache and loop against lmforge's
            want = ours_greedy(model if t == "f32" else gm.import_gguf(path)[0], ids, 24)
            got_g = cpp_greedy(llm, ids, 24)
            assert got_g == want, (arch, t)
            assert tok.decode(got_g) == tok.decode(want)
        llm.close() if hasattr(llm, "close") else None
    prompts = [tok.encode(p) for p in ("To be, or not", "The king is", "What say you")]
    assert_informative([ours_greedy(model, p, 8) for p in prompts])


def _quantize(src, dst, ftype, pure=False):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 1
    params.pure = pure
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0
    return dst


@pytest.mark.parametrize("ftype", ["Q4_K_S", "Q4_K_M"])
def test_q4_k_blocks_match_llama_cpp_quantizer(ftype, files, tmp_path):
    """lmforge's Q4_K against llama.cpp's ``llama_model_quantize`` on lmforge's F32 file, tensor by tensor
    where both wrote Q4_K: dequantized values within the format's error of each other."""
    model, paths = files["llama"]
    theirs = G.read_gguf(_quantize(paths["f32"], tmp_path / "q.gguf", getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")))
    ours = G.read_gguf(paths["q4_k"])
    f32 = G.read_gguf(paths["f32"])
    compared = same_bytes = total = 0
    for name, ti in theirs.tensors.items():
        if ti.type != G.GGMLType.Q4_K:
            continue
        assert ours.tensors[name].type == G.GGMLType.Q4_K
        w = f32.array(name)
        a, b = ours.array(name), theirs.array(name)
        # a Q4_K value is off the original by at most half a step of its sub-block (scale d * sc / 2) plus the
        # min's rounding; the two quantizers run the same search, so they agree far closer than that
        step = (w.reshape(-1, 32).max(1) - w.reshape(-1, 32).min(1)) / 15
        diff = np.abs(a - b).reshape(-1, 32).max(1)
        assert (diff <= step + 1e-6).all(), name
        ra, rb = np.abs(a - w).mean(), np.abs(b - w).mean()
        assert ra <= rb * 1.02, (name, ra, rb)  # lmforge's is as close to the original as llama.cpp's
        same_bytes += int(np.sum(np.frombuffer(ours.raw(name), np.uint8) == np.frombuffer(theirs.raw(name), np.uint8)))
        total += ti.nbytes
        compared += 1
    assert compared >= 4
    assert same_bytes / total > 0.99, same_bytes / total  # (ggml's reference quantizer, reproduced)
    for f in (theirs, ours, f32):
        f.close()


@pytest.mark.parametrize("arch,ftype", [("llama", "Q4_K_M"), ("qwen3", "Q8_0"), ("qwen2", "Q4_0")])
def test_llama_cpp_quantized_files_import(arch, ftype, tok, files, tmp_path):
    """A file llama.cpp's quantizer wrote (its mix of types: Q6_K for some tensors in Q4_K_M) loads into lmforge
    with llama.cpp's logits; Q8_0 / Q4_0 linears kept quantized as IntLinear give the same numbers."""
    from lmforge.quant.linear import IntLinear

    model, paths = files[arch]
    q = _quantize(paths["f32"], tmp_path / "q.gguf", getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}"))
    back, tok2, spec = gm.import_gguf(q)
    assert back.cfg == model.cfg and spec == TokenSpec.for_tokenizer(tok)
    ids = spec.encode_prompt(tok2, PROMPT)
    ref = ours_logits(back, ids)
    got = cpp_logits(llama(q), ids)
    assert np.abs(got - ref).max() / ref.std() < TOL["q4_k" if "K" in ftype else ftype.lower()]
    kept, _, _ = gm.import_gguf(q, dequantize=False)
    n = sum(isinstance(m, IntLinear) for m in kept.modules())
    if ftype in ("Q8_0", "Q4_0"):
        assert n >= 4 * model.cfg.n_layer - (1 if ftype == "Q4_0" else 0)
    assert np.abs(ours_logits(kept, ids) - ref).max() < 1e-4
