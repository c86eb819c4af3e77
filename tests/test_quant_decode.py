"""Quantized decode in the C step (lmforge.infer.fastpath + _decode.c): IntLinear layers (int8, 2..4-bit codes)
against IntLinear's PyTorch forward, bit-identical across batch sizes and thread counts, the layouts it declines
(and why), and quantized checkpoints through the engine, ``lmforge.load`` and ``lmforge generate``."""
import json
import os

import pytest
import torch

from lmforge.infer import fastpath
from lmforge.infer.cache import KVCache
from lmforge.infer.engine import Engine
from lmforge.infer.fastpath import FastDecoder
from lmforge.infer.paged import BlockPool
from lmforge.infer.sampling import SamplingParams
from lmforge.model import make_config
from lmforge.model.surgery import replace_linear
from lmforge.model.transformer import Transformer
from lmforge.quant import formats as fm
from lmforge.quant.api import quantize
from lmforge.quant.config import QuantConfig
from lmforge.quant.linear import FP8Linear, IntLinear

pytestmark = pytest.mark.skipif(not fastpath.AVAILABLE and os.environ.get("LMFORGE_REQUIRE_NATIVE") != "1",
                                reason="the C extension is not built")

V = 97


@pytest.fixture(autouse=True)
def one_torch_thread():
    """PyTorch's reference forwards on one thread (tiny models; OpenMP's spinning costs more than it gives on a
    busy machine). The C step's thread counts are set per test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def model_for(d_model=64, n_head=4, **over):
    cfg = dict(vocab_size=V, n_layer=2, n_head=n_head, d_model=d_model, max_seq_len=64, norm="rmsnorm",
               mlp="swiglu", pos="rope", n_kv_head=2, qk_norm=True, qkv_bias=False, out_bias=False, mlp_bias=False,
               tie_embeddings=False)
    cfg.update(over)
    torch.manual_seed(0)
    m = Transformer(make_config(**cfg)).eval()
    with torch.no_grad():  # move off the init (ones, zeros) so every weight matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def quantized(qc: dict, **over):
    m = model_for(**over)
    quantize(m, QuantConfig(method="rtn", **qc), progress=False)
    return m


# (name, QuantConfig fields, model overrides)
LAYOUTS = [
    ("int8-channel", dict(bits=8), {}),
    ("int8-g32", dict(bits=8, granularity="group", group_size=32), {}),
    ("int8-g8-gpt2-biases", dict(bits=8, granularity="group", group_size=8), dict(norm="layernorm", mlp="gelu",
                                                                                 pos="learned", qk_norm=False,
                                                                                 qkv_bias=True, out_bias=True,
                                                                                 mlp_bias=True)),
    ("int8-tensor", dict(bits=8, granularity="tensor"), {}),
    ("int4-g32", dict(bits=4, granularity="group", group_size=32), {}),
    ("int4-g64-asym", dict(bits=4, granularity="group", group_size=64, sym=False), {}),
    ("int4-channel-asym-head", dict(bits=4, granularity="channel", sym=False, skip=[]), {}),
    ("int3-g32", dict(bits=3, granularity="group", group_size=32), {}),
    ("int2-tensor-asym", dict(bits=2, granularity="tensor", sym=False), {}),
]


@pytest.mark.parametrize("name,qc,over", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_quantized_step_matches_intlinear_forward(name, qc, over):
    m = quantized(qc, **over)
    assert FastDecoder.why_not(m) is None
    assert isinstance(m.blocks[0].attn.qkv, IntLinear) and isinstance(m.lm_head, IntLinear) == ("skip" in qc)
    ids = torch.randint(0, V, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(ids)[0]
        cache = KVCache(m.cfg, 1, 40)
        m(ids[:, :6], cache=cache)
        fd = FastDecoder(m)
        fd.bind(cache.k, cache.v)
        for t in range(6, 24):
            lg = fd.step([int(ids[0, t])], [t], [[0]])[0]
            assert (lg - full[t]).abs().max() <= 1e-4 * full[t].abs().max(), (name, t)
            assert int(lg.argmax()) == int(full[t].argmax())


@pytest.mark.skipif(not fastpath.AVAILABLE, reason="the C extension is not built")
def test_plain_c_kernels_match_too():
    """The baseline build of the kernels (what runs on a CPU without AVX2) against the same reference."""
    from lmforge.infer import _decode

    was = _decode.simd()
    try:
        _decode.simd(0)
        assert _decode.simd() is False
        for qc in (dict(bits=8, granularity="group", group_size=16), dict(bits=4, granularity="group", group_size=64,
                                                                           sym=False)):
            m = quantized(qc)
            ids = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(5))
            with torch.no_grad():
                full = m(ids)[0]
                cache = KVCache(m.cfg, 1, 16)
                fd = FastDecoder(m)
                fd.bind(cache.k, cache.v)
                lg = fd.step(ids[0].tolist(), list(range(10)), [[0]] * 10)
            assert ((lg - full).abs().amax(1) <= 1e-4 * full.abs().amax(1)).all(), qc
    finally:
        _decode.simd(int(was))


def test_act_order_permutation_is_gathered():
    """An IntLinear with in_perm (GPTQ act-order: stored column j is input column in_perm[j]) runs in the C step
    and equals the PyTorch forward; without the gather the result would be far off."""
    m = model_for()
    g = torch.Generator().manual_seed(3)

    def permuted(name, lin):
        perm = torch.randperm(lin.in_features, generator=g)
        bits, G = (4, 32) if "mlp" in name else (8, 16)
        w = lin.weight.detach()[:, perm]  # the stored (permuted) columns
        codes, s, z = fm.rtn_quantize(w, bits, "group", G, True)
        return IntLinear.from_codes(codes, s, z, bits, "group", G, True, bias=lin.bias, in_perm=perm)

    replace_linear(m, permuted, lambda n, _: n != "lm_head")
    assert m.blocks[1].mlp.proj.in_perm is not None and FastDecoder.why_not(m) is None
    ids = torch.randint(0, V, (1, 12), generator=g)
    with torch.no_grad():
        full = m(ids)[0]
        cache = KVCache(m.cfg, 1, 16)
        fd = FastDecoder(m)
        fd.bind(cache.k, cache.v)
        for t in range(12):
            lg = fd.step([int(ids[0, t])], [t], [[0]])[0]
            assert (lg - full[t]).abs().max() <= 1e-4 * full[t].abs().max(), t


@pytest.mark.parametrize("qc", [dict(bits=8, granularity="group", group_size=32, skip=[]),
                                dict(bits=4, granularity="group", group_size=32, sym=False, skip=[])],
                         ids=["int8-g32", "int4-g32-asym"])
def test_bit_identical_across_batch_sizes_and_threads(qc):
    """Each row's logits are the same bits whatever rows share its step (1..8) and however many threads split
    the rows (d_model 128: every linear is big enough to be shared out)."""
    m = quantized(qc, d_model=128)
    g = torch.Generator().manual_seed(4)
    seqs = torch.randint(0, V, (8, 7), generator=g).tolist()
    tables = [[i] for i in range(8)]

    def run(B, threads):
        pool = BlockPool(m.cfg, num_blocks=8, block_size=8)
        fd = FastDecoder(m, threads=threads)
        fd.bind(pool.k, pool.v)
        out = [fd.step([seqs[b][t] for b in range(B)], [t] * B, tables[:B]) for t in range(7)]
        return torch.stack(out, 1)  # (B, T, V)

    ref = run(8, 1)
    for threads in (1, 2, 3):
        for B in range(1, 9):
            if (B, threads) != (8, 1):
                assert torch.equal(run(B, threads), ref[:B]), (B, threads)
    # and a prefill chunk (rows of one sequence in one call) gives its rows the same bits as token by token
    pool = BlockPool(m.cfg, num_blocks=8, block_size=8)
    fd = FastDecoder(m, threads=2)
    fd.bind(pool.k, pool.v)
    chunk = fd.step(seqs[0], list(range(7)), [[0]] * 7)
    assert torch.equal(chunk, ref[0])


def swapped(make, names=("blocks.1.mlp.fc",)):
    m = model_for()
    replace_linear(m, make, lambda n, _: n in names)
    return m


def test_declines_layouts_it_does_not_implement_with_the_layer_and_why():
    lin = torch.nn.Linear(64, 64, bias=False)
    cases = [
        (swapped(lambda n, l: IntLinear.from_linear(l, 6, "group", 32)), ["blocks.1.mlp.fc", "6-bit"]),
        (swapped(lambda n, l: IntLinear.from_linear(l, 8, "channel", sym=False)),
         ["blocks.1.mlp.fc", "8-bit asymmetric"]),
        (swapped(lambda n, l: IntLinear.from_linear(l, 4, "group", 16)),
         ["blocks.1.mlp.fc", "groups of 16", "multiple of 32"]),
        (swapped(lambda n, l: FP8Linear.from_linear(l)), ["blocks.1.mlp.fc", "FP8Linear"]),
    ]
    for m, words in cases:
        why = FastDecoder.why_not(m)
        assert why is not None and all(w in why for w in words), (why, words)
        with pytest.raises(ValueError, match="does not apply"):
            FastDecoder(m)
    # a buffer that is not what the layout says: named, with what was expected
    m = swapped(lambda n, l: IntLinear.from_linear(l, 4, "group", 32))
    m.blocks[1].mlp.fc.qweight = m.blocks[1].mlp.fc.qweight.t().contiguous().t()
    assert "blocks.1.mlp.fc.qweight is not contiguous" in FastDecoder.why_not(m)
    m = swapped(lambda n, l: IntLinear.from_linear(l, 8, "group", 32))
    m.blocks[1].mlp.fc.scales = m.blocks[1].mlp.fc.scales.double()
    assert "blocks.1.mlp.fc.scales is torch.float64" in FastDecoder.why_not(m)
    # a subclass is not the class the C step knows
    sub = type("MyIntLinear", (IntLinear,), {})
    m = swapped(lambda n, l: sub.from_linear(l, 8))
    assert "MyIntLinear, not exactly a Linear or an IntLinear" in FastDecoder.why_not(m)
    # the C step itself refuses a group that does not divide the inputs or is not a multiple of its step
    from lmforge.infer._decode import qmatmul

    q = IntLinear.from_linear(lin, 4, "group", 32)
    x, y = torch.randn(1, 64), torch.empty(1, 64)
    for kind, G in ((2, 16), (1, 12), (3, 32)):
        with pytest.raises(ValueError, match="expected kind 1"):
            qmatmul((kind, G, q.qweight.data_ptr(), q.scales.data_ptr(), 0, 0, 0, 8.0), x.data_ptr(), y.data_ptr(),
                    1, 64, 64, 1)


def greedy_pytorch(m, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_engine_runs_a_quantized_model_through_the_c_step():
    m = quantized(dict(bits=4, granularity="group", group_size=32))
    eng = Engine(m, num_blocks=16, block_size=8, eos_token_id=None)
    assert eng.fast is not None
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [11] * 9]
    outs = eng.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))
    assert outs == [greedy_pytorch(m, p, 12) for p in prompts]
    # a layout the C step declines still generates, in PyTorch
    m6 = quantized(dict(bits=6, granularity="group", group_size=32))
    eng = Engine(m6, num_blocks=16, block_size=8, eos_token_id=None)
    assert eng.fast is None
    assert eng.generate([[1, 2, 3]], SamplingParams(max_tokens=6, temperature=0.0)) == [greedy_pytorch(m6, [1, 2, 3], 6)]


@pytest.fixture(scope="module")
def bpe(corpus_files):
    from lmforge import tokenize
    from lmforge.tokenize.special import default_special_tokens

    return tokenize.train("bpe", [str(corpus_files[0])], 400, special_tokens=default_special_tokens("bpe"),
                          show_progress=False)


def test_quantized_checkpoint_through_load_and_generate_cli(bpe, tmp_path, capsys):
    """A save_quantized directory opens with lmforge.load (the C step) and ``lmforge generate --checkpoint``,
    and both generate what the in-memory quantized model generates in PyTorch."""
    import lmforge
    from lmforge.cli import main
    from lmforge.infer.llm import load_with_tokenizer
    from lmforge.quant.checkpoint import save_quantized
    from lmforge.tokenize.special import TokenSpec

    m = quantized(dict(bits=8, granularity="group", group_size=32), vocab_size=bpe.vocab_size)
    save_quantized(m, tmp_path / "q", tokenizer=bpe)
    model, tok, spec = load_with_tokenizer(tmp_path / "q")
    assert isinstance(model.blocks[0].mlp.fc, IntLinear) and FastDecoder.why_not(model) is None
    prompt = "To be, or not"
    ids = TokenSpec.for_tokenizer(bpe).encode_prompt(bpe, prompt)
    want = greedy_pytorch(m, ids, 8)
    lm = lmforge.load(tmp_path / "q")
    assert lm.engine.fast is not None
    got = lm.generate(ids, max_tokens=8, temperature=0.0).token_ids  # (ends at a stop id, included)
    assert got and got == want[:len(got)] and (len(got) == 8 or got[-1] in spec.stop)
    assert main(["generate", "--checkpoint", str(tmp_path / "q"), "--temperature", "0", "--max-tokens", "8",
                 "--json", prompt]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stop = set(spec.stop)
    cut = next((i for i, t in enumerate(want) if t in stop), len(want))
    assert out["completion"] == bpe.decode(want[:cut])
