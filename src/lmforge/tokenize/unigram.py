"""Unigram language-model tokenizer (SentencePiece style).

Knows pieces with log-probability scores, the ``▁`` whitespace convention,
byte fallback, Viterbi segmentation, n-best lists, sampling (subword
regularization) and EM training. Normalization comes from ``spm_model.py``.

Segmentation: the text is normalized, then every way of covering it with
pieces forms a lattice; Viterbi picks the path with the highest total score
(sum of log-probabilities). A character no piece covers becomes ``<unk>``
(score = lowest piece score - 10), or, with byte fallback, its UTF-8 bytes as
``<0xXX>`` pieces. Scores add in float32 and ties go to the earlier start, as
in sentencepiece, so imported models segment identically.

Training (EM, as in the sentencepiece paper): seed the vocabulary with all
characters and the most frequent substrings of the words; then repeat: two
EM rounds (E: expected piece counts by forward-backward over each word's
lattice; M: new log-probabilities with a digamma/Bayesian update), then drop
the pieces whose removal loses the least likelihood (keep 75% each round)
until 1.1 x the target size, then keep the best pieces by score
(``unigram_train.py``).
"""
from __future__ import annotations

import heapq
import math
import random
import struct
from typing import Iterable, Sequence

from . import native
from .base import Tokenizer, hf_added_tokens
from .spm_model import (BYTE, CONTROL, NORMAL, SPACE, UNKNOWN, USER_DEFINED, Normalizer, SPModel,
                        parse_message, read_model, write_model)

_F = struct.Struct("f")


def f32(x: float) -> float:
    """Round a Python float to the nearest float32 (sentencepiece scores add in float32)."""
    return _F.unpack(_F.pack(x))[0]


class Unigram(Tokenizer):
    kind = "unigram"

    def __init__(self, pieces: Sequence[tuple[str, float, int]], *, byte_fallback: bool = False,
                 unk_id: int | None = None, charsmap: bytes = b"", normalizer_name: str = "identity",
                 add_dummy_prefix: bool = True, remove_extra_whitespaces: bool = True,
                 escape_whitespaces: bool = True, treat_whitespace_as_suffix: bool = False,
                 special_tokens: dict[str, int] | None = None, sentencepiece: SPModel | None = None):
        self.pieces = [(p, f32(s), int(t)) for p, s, t in pieces]
        # the .model fields lmforge does not interpret (trainer spec, denormalizer, ...), kept for the
        # round trip: ``save_sentencepiece`` writes them back (``spm_model`` module docstring)
        self.sp_raw = SPModel(pieces=[])
        if sentencepiece is not None:
            self.sp_raw.trainer_spec = sentencepiece.trainer_spec
            self.sp_raw.normalizer_spec = sentencepiece.normalizer_spec
            self.sp_raw.other = sentencepiece.other
        if unk_id is None:
            unk_id = next((i for i, (_, _, t) in enumerate(self.pieces) if t == UNKNOWN), None)
        if unk_id is None or not 0 <= unk_id < len(self.pieces):
            raise ValueError("Unigram vocabulary has no <unk> piece")
        self.unk_id = unk_id
        if special_tokens is None:
            special_tokens = {p: i for i, (p, _, t) in enumerate(self.pieces) if t == CONTROL}
        super().__init__(special_tokens)
        self.byte_fallback = byte_fallback
        self.normalizer_name = normalizer_name
        self.charsmap = charsmap
        self.norm_opts = dict(add_dummy_prefix=add_dummy_prefix, remove_extra_whitespaces=remove_extra_whitespaces,
                              escape_whitespaces=escape_whitespaces,
                              treat_whitespace_as_suffix=treat_whitespace_as_suffix)
        user = [p for p, _, t in self.pieces if t == USER_DEFINED]
        self.normalizer = Normalizer(charsmap, user_defined=user, **self.norm_opts)
        self.piece_ids: dict[str, int] = {}
        for i, (p, _, t) in enumerate(self.pieces):
            self.piece_ids.setdefault(p, i)
        # the lattice uses NORMAL and USER_DEFINED pieces (UNUSED ones are skipped, as in sentencepiece)
        self.lattice_pieces: dict[bytes, int] = {}
        for i, (p, _, t) in enumerate(self.pieces):
            if t in (NORMAL, USER_DEFINED) and p:
                self.lattice_pieces.setdefault(p.encode("utf-8"), i)
        normal = [s for _, s, t in self.pieces if t == NORMAL]
        self.min_score = min(normal) if normal else 0.0
        self.max_score = max(normal) if normal else 0.0
        self.unk_score = f32(self.min_score - 10.0)
        self.max_piece_bytes = max((len(b) for b in self.lattice_pieces), default=1)
        self.byte_ids = {}
        if byte_fallback:
            for i, (p, _, t) in enumerate(self.pieces):
                if t == BYTE:
                    self.byte_ids[int(p[3:5], 16)] = i
            if len(self.byte_ids) != 256:
                raise ValueError(f"byte_fallback needs 256 <0xXX> pieces, found {len(self.byte_ids)}")
        self._native = None
        self._native_tried = False

    # ---- segmentation -----------------------------------------------------------------
    def _get_native(self):
        if not self._native_tried:
            self._native_tried = True
            if native.AVAILABLE and hasattr(native._native, "Unigram"):
                self._native = native.make_unigram(
                    self, {i for i, (_, _, t) in enumerate(self.pieces) if t == USER_DEFINED})
                self._threads_parallel = self._native is not None
        return self._native

    def viterbi(self, normalized: str) -> list[tuple[int, int, int]]:
        """Best segmentation of a normalized string as ``(start_byte, end_byte, piece_id)``
        (``piece_id`` is ``unk_id`` for uncovered characters)."""
        nat = self._get_native()
        data = normalized.encode("utf-8")
        if nat is not None:
            return nat.viterbi(data)
        return self._viterbi_py(data)

    def _viterbi_py(self, data: bytes) -> list[tuple[int, int, int]]:
        n = len(data)
        if n == 0:
            return []
        best = [0.0] * (n + 1)
        start = [-1] * (n + 1)
        pid = [-1] * (n + 1)
        get = self.lattice_pieces.get
        pieces = self.pieces
        maxb = self.max_piece_bytes
        pos = 0
        while pos < n:
            here = best[pos]
            mblen = min((1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)[data[pos] >> 4], n - pos)
            single = False
            end = pos + 1
            lim = min(n, pos + maxb)
            while end <= lim:
                i = get(data[pos:end])
                if i is not None:
                    _, sc, typ = pieces[i]
                    if typ == USER_DEFINED:
                        cand = (f32((end - pos) * self.max_score) - 0.1) + here
                        better = start[end] == -1 or cand > best[end]
                        cand = f32(cand)
                    else:
                        cand = f32(sc + here)
                        better = start[end] == -1 or cand > best[end]
                    if better:
                        best[end], start[end], pid[end] = cand, pos, i
                    if end - pos == mblen:
                        single = True
                end += 1
            if not single:
                e = pos + mblen
                cand = f32(self.unk_score + here)
                if start[e] == -1 or cand > best[e]:
                    best[e], start[e], pid[e] = cand, pos, self.unk_id
            pos += mblen
        out = []
        e = n
        while e > 0:
            s = start[e]
            out.append((s, e, pid[e]))
            e = s
        out.reverse()
        return out

    def _ids_from_path(self, data: bytes, path) -> list[int]:
        ids: list[int] = []
        prev_unk = False
        for s, e, i in path:
            if i == self.unk_id:
                if self.byte_fallback:
                    ids.extend(self.byte_ids[b] for b in data[s:e])
                elif not prev_unk:  # runs of unknown characters become one <unk>
                    ids.append(i)
                prev_unk = True
            else:
                ids.append(i)
                prev_unk = False
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        norm = self.normalizer.normalize(text)
        data = norm.encode("utf-8")
        nat = self._get_native()
        path = nat.viterbi(data) if nat is not None else self._viterbi_py(data)
        return self._ids_from_path(data, path)

    def encode_pieces(self, text: str) -> list[str]:
        return [self.id_to_token(i) for i in self.encode_ordinary(text)]

    # ---- lattice: n-best and sampling ---------------------------------------------------
    def _lattice(self, data: bytes):
        """Nodes by start position: ``begins[pos] = [(end, piece_id, score)]``."""
        n = len(data)
        begins: list[list[tuple[int, int, float]]] = [[] for _ in range(n + 1)]
        get = self.lattice_pieces.get
        pos = 0
        while pos < n:
            mblen = min((1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)[data[pos] >> 4], n - pos)
            single = False
            for end in range(pos + 1, min(n, pos + self.max_piece_bytes) + 1):
                i = get(data[pos:end])
                if i is not None:
                    _, sc, typ = self.pieces[i]
                    if typ == USER_DEFINED:
                        sc = (end - pos) * self.max_score - 0.1
                    begins[pos].append((end, i, sc))
                    single |= end - pos == mblen
            if not single:
                begins[pos].append((pos + mblen, self.unk_id, self.unk_score))
            pos += mblen
        return begins

    def nbest(self, text: str, n: int) -> list[tuple[list[int], float]]:
        """The ``n`` best segmentations with their scores, best first (exact, by A* search
        with the backward Viterbi score as heuristic)."""
        data = self.normalizer.normalize(text).encode("utf-8")
        L = len(data)
        if L == 0:
            return [([], 0.0)]
        begins = self._lattice(data)
        # h[pos] = best score from pos to the end
        h = [-math.inf] * (L + 1)
        h[L] = 0.0
        for pos in range(L - 1, -1, -1):
            for end, _, sc in begins[pos]:
                if h[end] + sc > h[pos]:
                    h[pos] = h[end] + sc
        results = []
        counter = 0
        agenda = [(-h[0], counter, 0, 0.0, ())]
        while agenda and len(results) < n:
            negf, _, pos, g, path = heapq.heappop(agenda)
            if pos == L:
                results.append((self._ids_from_path(data, path), g))
                continue
            for end, i, sc in begins[pos]:
                counter += 1
                heapq.heappush(agenda, (-(g + sc + h[end]), counter, end, g + sc, path + ((pos, end, i),)))
        return results

    def sample(self, text: str, alpha: float = 0.1, rng: random.Random | None = None) -> list[int]:
        """Sample one segmentation with probability proportional to exp(alpha * score)
        (subword regularization; forward filtering, backward sampling)."""
        rng = rng or random
        data = self.normalizer.normalize(text).encode("utf-8")
        L = len(data)
        if L == 0:
            return []
        begins = self._lattice(data)
        ends: list[list[tuple[int, int, float]]] = [[] for _ in range(L + 1)]
        for pos in range(L + 1):
            for end, i, sc in begins[pos]:
                ends[end].append((pos, i, sc))
        fwd = [-math.inf] * (L + 1)
        fwd[0] = 0.0
        for pos in range(1, L + 1):
            vals = [fwd[s] + alpha * sc for s, _, sc in ends[pos] if fwd[s] > -math.inf]
            if vals:
                m = max(vals)
                fwd[pos] = m + math.log(sum(math.exp(v - m) for v in vals))
        path = []
        pos = L
        while pos > 0:
            cands = ends[pos]
            weights = [math.exp(fwd[s] + alpha * sc - fwd[pos]) if fwd[s] > -math.inf else 0.0 for s, _, sc in cands]
            s, i, _ = rng.choices(cands, weights=weights)[0]
            path.append((s, pos, i))
            pos = s
        path.reverse()
        return self._ids_from_path(data, path)

    # ---- decoding and vocabulary --------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        out = bytearray()
        for i in ids:
            if not 0 <= i < len(self.pieces):
                raise ValueError(f"token id {i} is not in the vocabulary (size {len(self.pieces)})")
            p, _, t = self.pieces[i]
            if t == BYTE:
                out.append(int(p[3:5], 16))
            elif t == CONTROL:
                continue
            elif t == UNKNOWN:
                out += " \u2047 ".encode()
            else:
                out += p.encode("utf-8")
        text = out.decode("utf-8", errors="replace").replace(SPACE, " ")
        if self.norm_opts["add_dummy_prefix"] and not self.norm_opts["treat_whitespace_as_suffix"]:
            text = text[1:] if text.startswith(" ") else text
        return text.encode("utf-8")

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def id_to_token(self, i: int) -> str:
        if not 0 <= i < len(self.pieces):
            raise KeyError(f"token id {i} is not in the vocabulary")
        return self.pieces[i][0]

    def token_to_id(self, token: str) -> int | None:
        return self.piece_ids.get(token)

    def score(self, i: int) -> float:
        return self.pieces[i][1]

    # ---- files --------------------------------------------------------------------------
    def _to_dict(self) -> dict:
        import base64

        return {"pieces": [list(p) for p in self.pieces], "byte_fallback": self.byte_fallback,
                "unk_id": self.unk_id, "normalizer": self.normalizer_name,
                "precompiled_charsmap": base64.b64encode(self.charsmap).decode("ascii"), **self.norm_opts,
                **({"sentencepiece": self.sp_raw.raw()} if self.sp_raw.raw() else {})}

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "Unigram":
        import base64

        raw = None
        if d.get("sentencepiece"):
            if not isinstance(d["sentencepiece"], dict):
                raise ValueError(f"{source}: sentencepiece: expected an object of base64 protobuf messages, got "
                                 f"{type(d['sentencepiece']).__name__}")
            raw = SPModel(pieces=[])
            raw.set_raw(d["sentencepiece"], source)
        try:
            return cls([tuple(p) for p in d["pieces"]], byte_fallback=d.get("byte_fallback", False),
                       unk_id=d.get("unk_id"), charsmap=base64.b64decode(d.get("precompiled_charsmap", "")),
                       normalizer_name=d.get("normalizer", "identity"),
                       add_dummy_prefix=d.get("add_dummy_prefix", True),
                       remove_extra_whitespaces=d.get("remove_extra_whitespaces", True),
                       escape_whitespaces=d.get("escape_whitespaces", True),
                       treat_whitespace_as_suffix=d.get("treat_whitespace_as_suffix", False),
                       special_tokens=d.get("special_tokens"), sentencepiece=raw)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: bad Unigram tokenizer ({e})") from None

    @classmethod
    def from_sentencepiece(cls, path) -> "Unigram":
        m = read_model(path)
        if m.model_type != 1:
            kind = {2: "BPE", 3: "WORD", 4: "CHAR"}.get(m.model_type, str(m.model_type))
            raise ValueError(f"{path}: sentencepiece model type {kind} is not supported (only UNIGRAM)")
        return cls(m.pieces, byte_fallback=m.byte_fallback, unk_id=m.unk_id, charsmap=m.precompiled_charsmap,
                   normalizer_name=m.normalizer_name, add_dummy_prefix=m.add_dummy_prefix,
                   remove_extra_whitespaces=m.remove_extra_whitespaces, escape_whitespaces=m.escape_whitespaces,
                   treat_whitespace_as_suffix=m.treat_whitespace_as_suffix, sentencepiece=m)

    def sentencepiece_specials(self) -> dict[str, int]:
        """The ids sentencepiece gives ``unk``, ``bos``, ``eos`` and ``pad`` in this model (from the
        trainer spec read with it, whatever the pieces are called; ``<s>``/``</s>``/``<pad>`` by name
        for a model lmforge made); a role with no piece (id -1) is left out."""
        from .spm_model import write_model

        m = SPModel(pieces=self.pieces, unk_id=self.unk_id, byte_fallback=self.byte_fallback,
                    trainer_spec=self.sp_raw.trainer_spec)
        trainer = next(v for fno, _, v in parse_message(write_model(m)) if fno == 2)  # as the writer writes it
        out = {}
        for fno, wt, v in parse_message(trainer):
            if fno in (40, 41, 42, 43):
                i = v - (1 << 64) if v >= 1 << 63 else v
                if i >= 0:
                    out[("unk", "bos", "eos", "pad")[fno - 40]] = i
        return out

    def save_sentencepiece(self, path) -> None:
        """Write a sentencepiece ``.model`` that the ``sentencepiece`` package loads: for a model read
        from a ``.model`` (directly or through lmforge JSON), every field it had."""
        from .._io import atomic_open

        m = SPModel(pieces=self.pieces, byte_fallback=self.byte_fallback, unk_id=self.unk_id,
                    normalizer_name=self.normalizer_name, precompiled_charsmap=self.charsmap,
                    add_dummy_prefix=self.norm_opts["add_dummy_prefix"],
                    remove_extra_whitespaces=self.norm_opts["remove_extra_whitespaces"],
                    escape_whitespaces=self.norm_opts["escape_whitespaces"],
                    treat_whitespace_as_suffix=self.norm_opts["treat_whitespace_as_suffix"],
                    trainer_spec=self.sp_raw.trainer_spec, normalizer_spec=self.sp_raw.normalizer_spec,
                    other=self.sp_raw.other)
        with atomic_open(path, "wb") as f:
            f.write(write_model(m))

    def to_hf(self) -> dict:
        if self.charsmap:
            import base64

            normalizer = {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(self.charsmap).decode()}
        else:
            normalizer = None
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": hf_added_tokens(self.special_tokens),
            "normalizer": normalizer,
            "pre_tokenizer": {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "always",
                              "split": False},
            "post_processor": None,
            "decoder": {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "always", "split": False},
            "model": {"type": "Unigram", "unk_id": self.unk_id, "byte_fallback": self.byte_fallback,
                      "vocab": [[p, s] for p, s, _ in self.pieces]},
        }

    @classmethod
    def from_hf(cls, d: dict, path) -> "Unigram":
        m = d["model"]
        specials = {a["content"]: a["id"] for a in d.get("added_tokens", [])}
        pieces = []
        for i, (p, s) in enumerate(m["vocab"]):
            t = NORMAL
            if i == m.get("unk_id"):
                t = UNKNOWN
            elif p in specials:
                t = CONTROL
            elif len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
                t = BYTE
            pieces.append((p, s, t))
        norm = d.get("normalizer")
        charsmap = b""
        if norm and norm.get("type") == "Precompiled":
            import base64

            charsmap = base64.b64decode(norm["precompiled_charsmap"])
        elif norm:
            raise ValueError(f"{path}: Unigram with normalizer {norm.get('type')!r} is not supported")
        return cls(pieces, byte_fallback=m.get("byte_fallback", False), unk_id=m.get("unk_id"), charsmap=charsmap,
                   special_tokens=specials)

    # ---- training -------------------------------------------------------------------------
    @classmethod
    def train(cls, data, vocab_size: int, **options) -> "Unigram":
        from .unigram_train import train_unigram

        return train_unigram(cls, data, vocab_size, **options)
