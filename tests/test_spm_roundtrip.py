"""The sentencepiece ``.model`` writer keeps every field it read (issue 15): a model trained by the
real sentencepiece with unusual settings (special ids and names, user-defined and control symbols,
nmt_nfkc_cf, byte fallback, a denormalizer) survives load -> write, directly and through lmforge
JSON, field by field, and the sentencepiece library encodes with the copy as with the original."""
import pytest
from mixed_sample import MIXED

from lmforge.cli import main
from lmforge.tokenize import load
from lmforge.tokenize.spm_model import parse_message

spm = pytest.importorskip("sentencepiece")

SAMPLE = MIXED + ["a<sep>b [MASK] <ctl1> <start> x", "ＡＢＣ Straße ÉCOLE ﬁne", "aaa a a"]


@pytest.fixture(scope="module")
def unusual_model(tmp_path_factory, corpus_files):
    d = tmp_path_factory.mktemp("spm-unusual")
    (d / "corpus.txt").write_text("".join(p.read_text(encoding="utf-8") for p in corpus_files[:3]), encoding="utf-8")
    (d / "denorm.tsv").write_text("61\t41\n2581 2581\t20\n")  # 'a' -> 'A' when decoding, "▁▁" -> " "
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "m"), vocab_size=1200, model_type="unigram",
        normalization_rule_name="nmt_nfkc_cf", byte_fallback=True, unk_id=3, bos_id=5, eos_id=0, pad_id=7,
        unk_piece="<unknown>", bos_piece="<start>", eos_piece="<end>", pad_piece="<padding>",
        user_defined_symbols=["<sep>", "[MASK]"], control_symbols=["<ctl1>", "<ctl2>"],
        denormalization_rule_tsv=str(d / "denorm.tsv"), character_coverage=0.9999, minloglevel=2)
    return d / "m.model"


def _fields(blob: bytes) -> dict:
    """A message as {field: [values]}, nested messages (the specs, the pieces) decoded too."""
    out: dict = {}
    for fno, wt, v in parse_message(blob):
        out.setdefault(fno, []).append(bytes(v) if isinstance(v, (bytes, memoryview)) else v)
    return out


def _compare(a: bytes, b: bytes) -> list[str]:
    """Field-by-field differences of two ModelProtos (sentencepiece's protobuf classes when the
    protobuf package is there, else lmforge's wire-format parser)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        pb = None
    diffs = []
    if pb is not None:
        ma, mb = pb.ModelProto(), pb.ModelProto()
        ma.ParseFromString(a)
        mb.ParseFromString(b)
        def repeated(desc):
            return desc.is_repeated if hasattr(desc, "is_repeated") else desc.label == desc.LABEL_REPEATED

        for top in ma.DESCRIPTOR.fields:  # trainer_spec, normalizer_spec, denormalizer_spec, ...
            if top.message_type is None or repeated(top):
                continue
            if ma.HasField(top.name) != mb.HasField(top.name):
                diffs.append(f"{top.name}: present {ma.HasField(top.name)} != {mb.HasField(top.name)}")
            fa, fb = getattr(ma, top.name), getattr(mb, top.name)
            for desc in fa.DESCRIPTOR.fields:
                va, vb = getattr(fa, desc.name), getattr(fb, desc.name)
                if va != vb or (not repeated(desc) and fa.HasField(desc.name) != fb.HasField(desc.name)):
                    diffs.append(f"{top.name}.{desc.name}: {str(va)[:80]!r} != {str(vb)[:80]!r}")
        if [(p.piece, p.score, p.type) for p in ma.pieces] != [(p.piece, p.score, p.type) for p in mb.pieces]:
            diffs.append("pieces differ")
        return diffs
    fa, fb = _fields(a), _fields(b)
    if set(fa) != set(fb):
        diffs.append(f"top-level fields {sorted(fa)} != {sorted(fb)}")
    names = {1: "pieces", 2: "trainer_spec", 3: "normalizer_spec", 4: "self_test_data", 5: "denormalizer_spec"}
    for fno in sorted(set(fa) | set(fb)):
        for k, (x, y) in enumerate(zip(fa.get(fno, []), fb.get(fno, []))):
            sx, sy = _fields(x), _fields(y)
            for f2 in sorted(set(sx) | set(sy)):
                if sx.get(f2) != sy.get(f2):
                    diffs.append(f"{names.get(fno, fno)}[{k}] field {f2}: {str(sx.get(f2))[:80]} != "
                                 f"{str(sy.get(f2))[:80]}")
        if len(fa.get(fno, [])) != len(fb.get(fno, [])):
            diffs.append(f"{names.get(fno, fno)}: {len(fa.get(fno, []))} != {len(fb.get(fno, []))} entries")
    return diffs


def _same_for_sentencepiece(orig, copy):
    a, b = spm.SentencePieceProcessor(model_file=str(orig)), spm.SentencePieceProcessor(model_file=str(copy))
    assert (b.unk_id(), b.bos_id(), b.eos_id(), b.pad_id()) == (a.unk_id(), a.bos_id(), a.eos_id(), a.pad_id()) \
        == (3, 5, 0, 7)
    assert [b.id_to_piece(i) for i in range(b.get_piece_size())] == [a.id_to_piece(i) for i in range(a.get_piece_size())]
    assert [b.is_control(i) for i in range(8)] == [a.is_control(i) for i in range(8)]
    assert b.encode(SAMPLE) == a.encode(SAMPLE)
    ids = a.encode(SAMPLE)
    assert b.decode(ids) == a.decode(ids)  # the denormalizer runs on both
    assert a.decode(a.encode("a cat")) == "A cAt"  # ... and it is really there


def test_written_model_keeps_every_field(unusual_model, tmp_path):
    tok = load(unusual_model)
    tok.save_sentencepiece(tmp_path / "copy.model")
    orig, copy = unusual_model.read_bytes(), (tmp_path / "copy.model").read_bytes()
    assert _compare(orig, copy) == []
    assert copy == orig  # nothing changed, so nothing moved: the same bytes
    top = _fields(orig)
    tr = _fields(top[2][0])
    assert tr[45] == [b"<unknown>"] and tr[46] == [b"<start>"] and tr[31] == [b"<sep>", b"[MASK]"]
    assert 5 in top  # the denormalizer spec was in the original, and so in the copy
    _same_for_sentencepiece(unusual_model, tmp_path / "copy.model")
    assert tok.sentencepiece_specials() == {"unk": 3, "bos": 5, "eos": 0, "pad": 7}
    # lmforge's own encoding of the same model agrees with sentencepiece's
    sp = spm.SentencePieceProcessor(model_file=str(unusual_model))
    assert [tok.encode(t, disallowed_special=()) for t in SAMPLE] == sp.encode(SAMPLE)


def test_round_trip_through_lmforge_json_and_the_cli(unusual_model, tmp_path, capsys):
    assert main(["tokenizer", "import", "--tokenizer", str(unusual_model), "--out", str(tmp_path / "tok")]) == 0
    assert main(["tokenizer", "export", "--tokenizer", str(tmp_path / "tok"), "--format", "sentencepiece",
                 "--out", str(tmp_path / "again.model")]) == 0
    capsys.readouterr()
    again = (tmp_path / "again.model").read_bytes()
    assert _compare(unusual_model.read_bytes(), again) == []
    assert again == unusual_model.read_bytes()
    _same_for_sentencepiece(unusual_model, tmp_path / "again.model")


def test_changed_pieces_keep_special_ids_consistent(unusual_model, tmp_path):
    """The writer updates what follows from the pieces: here the pieces are reordered (the unk and
    bos pieces move), so unk_id / bos_id follow them by name, and the rest of the spec stays."""
    from lmforge.tokenize import Unigram

    tok = load(unusual_model)
    pieces = list(tok.pieces)
    pieces[3], pieces[5] = pieces[5], pieces[3]  # <start> to id 3, <unknown> to id 5
    moved = Unigram(pieces, byte_fallback=tok.byte_fallback, charsmap=tok.charsmap,
                    normalizer_name=tok.normalizer_name, sentencepiece=tok.sp_raw)
    moved.save_sentencepiece(tmp_path / "moved.model")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "moved.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (5, 3, 0, 7)
    diffs = _compare(unusual_model.read_bytes(), (tmp_path / "moved.model").read_bytes())
    moved_fields = (" field 40:", " field 41:", ".unk_id:", ".bos_id:")  # by number (own parser) or by name
    assert diffs and all(d.startswith("pieces") or any(k in d for k in moved_fields) for d in diffs), diffs
