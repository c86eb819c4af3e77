"""The bridge to the optional C extension ``_native`` (tokenizer hot loops).

Knows which operations have a C path and how to hand them Python objects;
every function here has a pure-Python twin that is the readable reference
(tests check that both give the same results). Set ``LMFORGE_NO_NATIVE=1`` to
force the Python paths.
"""
from __future__ import annotations


from .._io import native_extension

_native = native_extension("lmforge.tokenize._native")
AVAILABLE = _native is not None

# pre-tokenization patterns with a hand-written C matcher
PATTERN_IDS = {"gpt2": 1, "cl100k": 2}


def make_bpe(tok):
    """A C encoder for a ``ByteBPE`` (or None when not possible)."""
    if not AVAILABLE:
        return None
    keys = []
    vals = []
    for (a, b), (prio, r) in tok.pairs.items():
        keys.append((a << 32) | b)
        vals.append((prio << 32) | r)
    whole = {t: i for t, i in tok.bytes_to_id.items()} if tok.whole_word else {}
    pid = PATTERN_IDS.get(tok.pattern_name or "", 0)
    enc = _native.BPE(keys, vals, list(tok.byte_ids), whole, pid)
    if pid:
        return _Encoder(enc, None)
    return _Encoder(enc, tok._re)


class _Encoder:
    __slots__ = ("enc", "rx")

    def __init__(self, enc, rx):
        self.enc = enc
        self.rx = rx

    def encode(self, text: str) -> list[int]:
        if self.rx is None:
            return self.enc.encode(text)
        return self.enc.encode_chunks(self.rx.findall(text))


def count_chunks_into(counts, text: str, pattern_name: str) -> None:
    _native.count_chunks(text, PATTERN_IDS[pattern_name], counts)


def bpe_train(words, freqs, n_merges, min_frequency, show_progress):
    from .._progress import bar as tqdm

    bar = tqdm(total=n_merges, desc="bpe merges", disable=not show_progress, leave=False)
    last = [0]

    def progress(n):
        bar.update(n - last[0])
        last[0] = n

    merges, tokens = _native.bpe_train(list(words), list(freqs), int(n_merges), int(min_frequency), progress)
    bar.close()
    return [tuple(m) for m in merges], tokens


def make_unigram(tok, user_defined: set[int]):
    """A C Viterbi encoder for a ``Unigram`` (lattice pieces only); ``user_defined``: the ids of its
    user-defined pieces (the caller knows the piece types: ``spm_model``)."""
    pieces, ids, scores, user = [], [], [], []
    for b, i in tok.lattice_pieces.items():
        pieces.append(b)
        ids.append(i)
        scores.append(tok.pieces[i][1])
        user.append(i in user_defined)
    return _native.Unigram(pieces, ids, scores, user, tok.unk_id, tok.unk_score, tok.max_score)


def unigram_estep(words, counts, names, scores, max_len):
    return _native.unigram_estep(list(words), [float(c) for c in counts], list(names), [float(s) for s in scores],
                                 int(max_len))


def unigram_viterbi_batch(words, names, scores, max_len, exclude=None):
    return _native.unigram_viterbi_batch(list(words), list(names), [float(s) for s in scores], int(max_len),
                                         exclude)
