"""llama.cpp as the oracle for lmforge's GGUF export and import (llama-cpp-python built from source).

For Llama-, Qwen2- and Qwen3-shaped tiny lmforge models (rows of 256, so every type's blocks fit) with
a BPE tokenizer lmforge trained: llama.cpp tokenizes the mixed sample as lmforge does; its logits on
lmforge's F32 file match lmforge's within 1e-3, and on the F16 / Q8_0 / Q4_0 / Q4_K files within each
type's stated error (``TOL``); greedy text is identical for F32 and Q8_0; lmforge's Q4_K blocks are the
bytes llama.cpp's own quantizer (``llama_model_quantize``, Q4_K_S and Q4_K_M) writes from lmforge's F32
file, within the format's error of the original; and
llama.cpp's quantized files import into lmforge with llama.cpp's logits.

Where the errors come from. lmforge's logits on a quantized file use the file's dequantized weights
in fp32; llama.cpp multiplies F16 weights by activations it rounds to F16, and Q8_0 / Q4_0 / Q4_K
weights by activations it quantizes itself (to Q8_0 blocks of 32; Q8_K blocks of 256 for the K types).
So on the same file the two differ by that activation rounding alone: ``TOL`` bounds it, as max and mean
|logit difference| over the logits' standard deviation (measured on these models, max / mean:
F16 0.005-0.011 / 0.001; Q8_0 0.10-0.17 / 0.018-0.027; Q4_0 0.10-0.21 / 0.018-0.025; Q4_K 0.16-0.27 /
0.026-0.037: roughly a tenth of what 4-bit weight rounding moves the same logits, 1.9-2.9 std). Greedy
text under Q8_0 is compared on models with clear winners (a sharpened head, ``sharpened``): random
models have near-ties that llama.cpp's 8-bit activations flip, and the test asserts the margin it relies on.
"""
import dataclasses

import numpy as np
import pytest
import torch

from lmforge.model.config import make as make_config
from lmforge.model.transformer import Transformer
from lmforge.quant import gguf as G
from lmforge.quant import gguf_model as gm
from lmforge.tokenize.special import TokenSpec, default_special_tokens

from conftest import assert_informative, in_ci
from mixed_sample import MIXED

try:
    import llama_cpp
except ImportError:
    if in_ci():  # `make test` installs it (Makefile: $(VENV)/.llamacpp): the oracle must not skip in CI
        raise
    pytest.skip("llama-cpp-python not installed (`make llama-cpp` builds it)", allow_module_level=True)
torch.set_num_threads(1)

ARCHS = {
    # every bias (permuted with its rows), heads of 32 (n_head * head_dim = 128 != d_model) and Llama-3 rope
    # scaling (rope_freqs): frequency bands below, inside and above the interpolated one
    "llama": dict(qkv_bias=True, out_bias=True, mlp_bias=True, head_dim=32, rope_theta=500000.0,
                  rope_scaling={"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64}),
    "qwen2": dict(qkv_bias=True, tie_embeddings=True),
    "qwen3": dict(qk_norm=True, qkv_bias=True),  # (llama.cpp's qwen3 reads q/k/v biases when a file has them)
}
# (max, mean) |lmforge logits - llama.cpp logits| / (the logits' standard deviation) per type, llama.cpp running
# the file and lmforge the same file's dequantized weights: llama.cpp's activation rounding (about 2x measured)
TOL = {"f16": (0.03, 0.003), "q8_0": (0.35, 0.05), "q4_0": (0.35, 0.05), "q4_k": (0.5, 0.07)}
PROMPT = "KING HENRY. Once more unto the breach, dear friends, once more;\n  Or close the wall up"


@pytest.fixture(scope="module")
def tok(corpus_files):
    from lmforge import tokenize

    text = corpus_files[0].read_text(encoding="utf-8")[:150000] + "".join(MIXED) * 3
    return tokenize.train("bpe", [text], 500, special_tokens=default_special_tokens("bpe"), show_progress=False)


def tiny(arch, vocab):
    kw = dict(vocab_size=vocab, n_layer=2, d_model=256, n_head=4, n_kv_head=2, d_ff=512, max_seq_len=128,
              norm="rmsnorm", norm_bias=False, pos="rope", mlp="swiglu", mlp_bias=False, out_bias=False,
              tie_embeddings=False, arch=arch)
    kw.update(ARCHS[arch])
    torch.manual_seed(0)
    m = Transformer(make_config(**kw)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the near-identity init: every weight matters, greedy text depends on the prompt
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else 0.1))
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
                           n_threads=1, type_k=0, type_v=0, verbose=False)  # (GGML_TYPE_F32 caches: f16 is the default)


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


def within(got, mine, t, what):
    spread = float(mine.std())
    d = np.abs(got - mine)
    assert d.max() / spread < TOL[t][0] and d.mean() / spread < TOL[t][1], (what, t, d.max() / spread,
                                                                           d.mean() / spread)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match(arch, tok, files):
    model, paths = files[arch]
    ids = TokenSpec.for_tokenizer(tok).encode_prompt(tok, PROMPT)
    ref = ours_logits(model, ids)
    for t, path in paths.items():
        llm = llama(path)
        got = cpp_logits(llm, ids)
        if t == "f32":
            assert np.abs(got - ref).max() < 1e-3, (arch, np.abs(got - ref).max())
            # greedy text: llama.cpp's own KV cache and loop against lmforge's
            want = ours_greedy(model, ids, 24)
            assert cpp_greedy(llm, ids, 24) == want, arch
        else:  # lmforge on the same file's weights
            back, _, _ = gm.import_gguf(path)
            within(got, ours_logits(back, ids), t, arch)
        llm.close()
    prompts = [tok.encode(p) for p in ("To be, or not", "The king is", "What say you")]
    assert_informative([ours_greedy(model, p, 8) for p in prompts])


def sharpened(arch, vocab, n_text):
    """A model whose next token has a clear winner: the residual stream carries a large token embedding and
    the head adds a random permutation of the embeddings (a bigram), so the blocks' context decides some
    steps, and every step's winner leads by more than llama.cpp's 8-bit activations move a logit."""
    m = tiny(arch, vocab)
    if m.cfg.tie_embeddings:
        m = Transformer(dataclasses.replace(m.cfg, tie_embeddings=False)).eval()
        m.load_state_dict({**tiny(arch, vocab).state_dict()}, strict=False)
    g = torch.Generator().manual_seed(2)
    perm = torch.randperm(n_text, generator=g)  # over the tokenizer's ids (the placeholders never win)
    with torch.no_grad():
        E = m.tok_emb.weight
        E.mul_(20.0)
        W = m.lm_head.weight
        W[:n_text] += 3.0 * E[perm] / E[perm].norm(dim=1, keepdim=True)
        W[n_text:] = 0
    return m


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_text_is_identical_under_q8_0(arch, tok, tmp_path):
    m = sharpened(arch, tok.vocab_size + 12, tok.vocab_size)
    path = gm.export_gguf(m, tmp_path / "m.gguf", tok, type="q8_0")
    back, _, _ = gm.import_gguf(path)
    ids = TokenSpec.for_tokenizer(tok).encode_prompt(tok, PROMPT)
    llm = llama(path)
    got = cpp_greedy(llm, ids, 24)
    want = ours_greedy(back, ids, 24)
    assert got == want and tok.decode(got) == tok.decode(want)
    assert ours_greedy(m, ids, 24) == want  # (the fp32 model's too)
    # not luck: at every step lmforge's winner leads its runner-up by more than twice what llama.cpp's activation
    # rounding moved that lead
    seq = ids + want
    cpp = cpp_logits(llm, seq)[len(ids) - 1:-1]
    mine = ours_logits(back, seq)[len(ids) - 1:-1]
    order = np.argsort(mine, axis=1)
    w, r = order[:, -1], order[:, -2]
    rows = np.arange(len(want))
    lead = mine[rows, w] - mine[rows, r]
    moved = np.abs((cpp[rows, w] - cpp[rows, r]) - lead)
    assert (lead > 2 * moved).all(), (lead.round(3).tolist(), moved.round(3).tolist())
    llm.close()
    prompts = [tok.encode(p) for p in ("To be, or not", "The king is", "What say you")]
    assert_informative([ours_greedy(back, p, 8) for p in prompts])


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
    where both wrote Q4_K: the same bytes, so dequantized values equal and within the format's error."""
    model, paths = files["llama"]
    theirs = G.read_gguf(_quantize(paths["f32"], tmp_path / "q.gguf", getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")))
    ours = G.read_gguf(paths["q4_k"])
    f32 = G.read_gguf(paths["f32"])
    compared = 0
    for name, ti in theirs.tensors.items():
        if ti.type != G.GGMLType.Q4_K:
            continue
        assert ours.tensors[name].type == G.GGMLType.Q4_K
        # with no importance matrix llama.cpp runs ggml's quantize_row_q4_K_ref: lmforge's blocks are its bytes
        assert bytes(ours.raw(name)) == bytes(theirs.raw(name)), name
        # and so within the format's error of the original: a 4-bit code spans a sub-block of 32 values in 15
        # steps of (its range / 15), and the search lands within about one step (measured <= 0.98)
        w = f32.array(name).reshape(-1, 32)
        a = ours.array(name).reshape(-1, 32)
        assert (np.abs(a - w).max(1) <= 1.25 * (w.max(1) - w.min(1)) / 15).all(), name
        compared += 1
    assert compared >= 8
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
    within(cpp_logits(llama(q), ids), ref, "q4_k" if "K" in ftype else ftype.lower(), arch)
    kept, _, _ = gm.import_gguf(q, dequantize=False)
    n = sum(isinstance(m, IntLinear) for m in kept.modules())
    # Q8_0 / Q4_0 files: every linear (llama.cpp wrote the tied qwen2's token_embd Q6_K); Q4_K_M: none
    assert n == (4 * model.cfg.n_layer + (not model.cfg.tie_embeddings) if ftype in ("Q8_0", "Q4_0") else 0)
    assert np.abs(ours_logits(kept, ids) - ref).max() < 1e-4
