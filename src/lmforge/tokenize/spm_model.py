"""sentencepiece ``.model`` files and sentencepiece text normalization.

Knows the protobuf wire format (just enough of it to read ``ModelProto`` and
to write one back), the double-array trie of the precompiled character map
(darts-clone layout) and the normalizer's whitespace rules. Knows nothing
about segmentation: see ``unigram.py``.

Round trip: ``read_model`` keeps every field it does not interpret as raw
protobuf (the whole ``TrainerSpec``: special-token ids and pieces whatever their
names, user-defined and control symbols, training settings; the normalizer's
other fields, e.g. ``normalization_rule_tsv``; the ``denormalizer_spec``;
``self_test_data`` and unknown fields), and ``write_model`` writes them back,
changing only the fields that follow from the pieces and the tokenizer's
settings (vocab_size, unk/bos/eos/pad ids when the piece they named has moved,
byte_fallback, ...). A model read and written unchanged is byte-identical. The
denormalizer is kept, not applied: ``decode`` does not run its rules.

The normalizer, as sentencepiece runs it: take the longest prefix of the rest
of the input found in the character map (e.g. NFKC rules), else one UTF-8
character as is (invalid bytes become U+FFFD); drop leading spaces, collapse
runs of spaces, drop trailing spaces (``remove_extra_whitespaces``); write
spaces as ``▁`` (``escape_whitespaces``); prepend one ``▁``
(``add_dummy_prefix``). User-defined symbols are copied without normalization.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

SPACE = "\u2581"

# ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# ---- protobuf wire format ----------------------------------------------------------------

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ValueError("varint too long")


def parse_message(buf: bytes) -> list[tuple[int, int, object]]:
    """Decode one protobuf message into ``(field_number, wire_type, value)`` triples."""
    out, pos, n = [], 0, len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        fno, wt = key >> 3, key & 7
        if wt == 0:
            v, pos = _varint(buf, pos)
        elif wt == 1:
            if pos + 8 > n:
                raise ValueError("truncated fixed64")
            v = buf[pos:pos + 8]
            pos += 8
        elif wt == 2:
            ln, pos = _varint(buf, pos)
            if pos + ln > n:
                raise ValueError("truncated length-delimited field")
            v = buf[pos:pos + ln]
            pos += ln
        elif wt == 5:
            if pos + 4 > n:
                raise ValueError("truncated fixed32")
            v = buf[pos:pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        out.append((fno, wt, v))
    return out


def _enc_varint(v: int) -> bytes:
    if v < 0:
        v += 1 << 64
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(fno: int, wt: int, payload) -> bytes:
    key = _enc_varint((fno << 3) | wt)
    if wt == 0:
        return key + _enc_varint(int(payload))
    if wt == 2:
        return key + _enc_varint(len(payload)) + payload
    if wt in (1, 5):
        return key + payload
    raise ValueError(wt)


@dataclass
class SPModel:
    pieces: list[tuple[str, float, int]]
    model_type: int = 1  # UNIGRAM=1, BPE=2, WORD=3, CHAR=4
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_id: int = 0
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    trainer_fields: list = field(default_factory=list)  # decoded (field, wire type, value) of TrainerSpec
    # raw protobuf kept for the round trip (None: not read from a .model; the writer makes its own)
    trainer_spec: bytes | None = None  # the TrainerSpec message as read
    normalizer_spec: bytes | None = None  # the NormalizerSpec message as read
    other: bytes = b""  # top-level fields besides pieces / trainer / normalizer (denormalizer_spec = 5,
    #                     self_test_data = 4, unknown ones), as read, in order

    def raw(self) -> dict:
        """The kept raw messages, base64 (for a JSON file); ``{}`` when there are none."""
        import base64

        out = {}
        for k in ("trainer_spec", "normalizer_spec", "other"):
            v = getattr(self, k)
            if v:
                out[k] = base64.b64encode(v).decode("ascii")
        return out

    def set_raw(self, d: dict | None, source: str = "<dict>") -> None:
        import base64
        import binascii

        for k, v in (d or {}).items():
            if k not in ("trainer_spec", "normalizer_spec", "other"):
                raise ValueError(f"{source}: sentencepiece.{k}: unknown field (expected trainer_spec, "
                                 "normalizer_spec or other)")
            try:
                blob = base64.b64decode(v, validate=True)
                parse_message(blob)
            except (binascii.Error, TypeError, ValueError) as e:
                raise ValueError(f"{source}: sentencepiece.{k}: not base64 of a protobuf message ({e})") from None
            setattr(self, k, blob)


def read_model(path) -> SPModel:
    try:
        raw = open(path, "rb").read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such sentencepiece model file") from None
    if not raw:
        raise ValueError(f"{path}: empty file; expected a sentencepiece .model (protobuf)")
    try:
        top = parse_message(raw)
        m = SPModel(pieces=[])
        for fno, wt, v in top:
            if fno == 1 and wt == 2:
                piece, score, typ = "", 0.0, NORMAL
                for f2, w2, v2 in parse_message(v):
                    if f2 == 1:
                        piece = v2.decode("utf-8")
                    elif f2 == 2:
                        score = struct.unpack("<f", v2)[0]
                    elif f2 == 3:
                        typ = v2
                m.pieces.append((piece, score, typ))
            elif fno == 2 and wt == 2:
                m.trainer_spec = bytes(v)
                for f2, w2, v2 in parse_message(v):
                    m.trainer_fields.append((f2, w2, v2))
                    if f2 == 3:
                        m.model_type = v2
                    elif f2 == 35:
                        m.byte_fallback = bool(v2)
                    elif f2 == 24:
                        m.treat_whitespace_as_suffix = bool(v2)
                    elif f2 == 40:
                        m.unk_id = v2
            elif fno == 3 and wt == 2:
                m.normalizer_spec = bytes(v)
                for f2, w2, v2 in parse_message(v):
                    if f2 == 1:
                        m.normalizer_name = v2.decode("utf-8")
                    elif f2 == 2:
                        m.precompiled_charsmap = bytes(v2)
                    elif f2 == 3:
                        m.add_dummy_prefix = bool(v2)
                    elif f2 == 4:
                        m.remove_extra_whitespaces = bool(v2)
                    elif f2 == 5:
                        m.escape_whitespaces = bool(v2)
            else:
                m.other += _field(fno, wt, v)
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"{path}: corrupt or truncated sentencepiece model ({e})") from None
    if not m.pieces:
        raise ValueError(f"{path}: sentencepiece model has no pieces (corrupt or not a .model file)")
    return m


def _as_int32(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _merged(raw: bytes | None, values: dict[int, tuple[int, object]], defaults: dict[int, object]) -> bytes:
    """A message: the fields of ``raw`` in their order, those in ``values`` (field -> (wire type,
    value)) replaced by the new value; a field of ``values`` that ``raw`` lacks is added (in field
    order) unless it equals its default (absent means default in proto2)."""
    out = bytearray()
    done = set()
    fields = parse_message(raw) if raw else []
    pending = sorted(f for f in values if f not in {fno for fno, _, _ in fields}
                     and values[f][1] != defaults.get(f, object()))
    for fno, wt, v in fields:
        while pending and pending[0] < fno:  # keep field-number order, as protobuf writes
            f = pending.pop(0)
            out += _field(f, *values[f])
        if fno in values:
            if fno in done:
                continue  # a scalar written twice: the last wins in protobuf; write it once
            done.add(fno)
            out += _field(fno, *values[fno])
        else:
            out += _field(fno, wt, v)
    for f in pending:
        out += _field(f, *values[f])
    return bytes(out)


def _special(m: SPModel, tr: list, id_field: int, piece_field: int, default_id: int, default_piece: str,
             names: tuple[str, ...]) -> int:
    """The id of the unk/bos/eos/pad piece: the trainer spec's, while its piece is still there;
    else a CONTROL piece of the same name (its ``*_piece`` or one of ``names``); else -1."""
    old = {f: v for f, _, v in tr}
    want = bytes(old[piece_field]).decode("utf-8") if piece_field in old else default_piece
    i = _as_int32(old.get(id_field, default_id))
    if 0 <= i < len(m.pieces) and m.pieces[i][0] == want:
        return i
    types = (UNKNOWN,) if id_field == 40 else (CONTROL,)
    for name in (want, *names):
        for j, (p, _, t) in enumerate(m.pieces):
            if p == name and t in types:
                return j
    return -1


def write_model(m: SPModel) -> bytes:
    """Serialize a ``ModelProto`` (what ``sentencepiece`` loads): the pieces, and the trainer and
    normalizer specs as read (``m.trainer_spec`` / ``m.normalizer_spec``, when present) with the
    fields that follow from the pieces and settings brought up to date; the other top-level
    fields (denormalizer, self-test data) as read."""
    out = bytearray()
    for piece, score, typ in m.pieces:
        body = _field(1, 2, piece.encode("utf-8")) + _field(2, 5, struct.pack("<f", score))
        if typ != NORMAL:
            body += _field(3, 0, typ)
        out += _field(1, 2, body)
    tr = parse_message(m.trainer_spec) if m.trainer_spec else []
    values: dict[int, tuple[int, object]] = {3: (0, m.model_type), 4: (0, len(m.pieces)),
                                             24: (0, int(m.treat_whitespace_as_suffix)),
                                             35: (0, int(m.byte_fallback)), 40: (0, m.unk_id)}
    if m.unk_id != _as_int32({f: v for f, _, v in tr}.get(40, 0)) or not tr:
        values[45] = (2, m.pieces[m.unk_id][0].encode("utf-8"))
    for id_field, piece_field, default_id, default_piece, names in (
            (41, 46, 1, "<s>", ("<|bos|>",)), (42, 47, 2, "</s>", ("<|eos|>", "<|endoftext|>")),
            (43, 48, -1, "<pad>", ("<|pad|>",))):
        i = _special(m, tr, id_field, piece_field, default_id, default_piece, names)
        values[id_field] = (0, i)
        if i >= 0:
            values[piece_field] = (2, m.pieces[i][0].encode("utf-8"))
    defaults = {3: 1, 4: 8000, 24: 0, 35: 0, 40: 0, 41: 1, 42: 2, 43: -1, 45: b"<unk>", 46: b"<s>", 47: b"</s>",
                48: b"<pad>"}
    if not tr:  # a model lmforge made: write every field, as before
        defaults = {}
    out += _field(2, 2, _merged(m.trainer_spec, values, defaults))
    nvalues = {1: (2, m.normalizer_name.encode("utf-8")), 2: (2, bytes(m.precompiled_charsmap)),
               3: (0, int(m.add_dummy_prefix)), 4: (0, int(m.remove_extra_whitespaces)),
               5: (0, int(m.escape_whitespaces))}
    ndefaults = {2: b"", 3: 1, 4: 1, 5: 1} if m.normalizer_spec else {2: b""}
    out += _field(3, 2, _merged(m.normalizer_spec, nvalues, ndefaults))
    out += m.other
    return bytes(out)


# ---- the precompiled character map (darts-clone double array) -----------------------------

class CharsMap:
    """Longest-prefix lookup in sentencepiece's precompiled normalization map.

    Blob layout: ``<uint32 trie size in bytes><trie units (uint32 each)><normalized strings, NUL-ended>``.
    A unit packs: bit 8 = has_leaf, bits 0-7 (+ bit 31) = label, the rest = offset."""

    def __init__(self, blob: bytes):
        if len(blob) <= 4:
            raise ValueError("precompiled charsmap is too short")
        (size,) = struct.unpack_from("<I", blob, 0)
        if size >= len(blob) or size % 4:
            raise ValueError("precompiled charsmap: trie size exceeds the blob")
        self.units = struct.unpack_from(f"<{size // 4}I", blob, 4)
        self.normalized = blob[4 + size:]
        self._cache: dict[bytes, tuple[int, str]] = {}

    def longest_prefix(self, key: bytes, pos: int) -> tuple[int, bytes] | None:
        """(length, replacement bytes) of the longest rule matching ``key[pos:]``, or None."""
        units = self.units
        node = 0
        unit = units[0]
        node ^= (unit >> 10) << ((unit & (1 << 9)) >> 6)
        best = None
        n = len(key)
        for i in range(pos, n):
            c = key[i]
            node ^= c
            if node >= len(units):
                break
            unit = units[node]
            if (unit & ((1 << 31) | 0xFF)) != c:
                break
            node ^= (unit >> 10) << ((unit & (1 << 9)) >> 6)
            if (unit >> 8) & 1:
                value = units[node] & ((1 << 31) - 1)
                best = (i + 1 - pos, value)
        if best is None:
            return None
        length, value = best
        end = self.normalized.index(b"\0", value)
        return length, self.normalized[value:end]


def _one_char_len(b: int) -> int:
    return (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)[b >> 4]


class Normalizer:
    def __init__(self, charsmap: bytes = b"", add_dummy_prefix=True, remove_extra_whitespaces=True,
                 escape_whitespaces=True, treat_whitespace_as_suffix=False, user_defined: list[str] = ()):
        self.map = CharsMap(charsmap) if charsmap else None
        self.charsmap_blob = bytes(charsmap or b"")
        self.flags = (add_dummy_prefix * 1) | (remove_extra_whitespaces * 2) | (escape_whitespaces * 4) | (
            treat_whitespace_as_suffix * 8)
        self.add_dummy_prefix = add_dummy_prefix
        self.remove_extra_whitespaces = remove_extra_whitespaces
        self.escape_whitespaces = escape_whitespaces
        self.suffix = treat_whitespace_as_suffix
        self.user_defined = sorted({u.encode("utf-8") for u in user_defined if u}, key=len, reverse=True)

    def _prefix(self, data: bytes, pos: int) -> tuple[bytes, int]:
        """(normalized bytes, consumed length) for the input at ``pos``."""
        for u in self.user_defined:
            if data.startswith(u, pos):
                return u, len(u)
        if self.map is not None:
            hit = self.map.longest_prefix(data, pos)
            if hit is not None:
                return hit[1], hit[0]
        ln = _one_char_len(data[pos])
        chunk = data[pos:pos + ln]
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            return "\ufffd".encode(), 1
        return chunk, ln

    def normalize(self, text: str) -> str:
        from . import native

        if native.AVAILABLE:
            return native._native.sp_normalize(text.encode("utf-8", errors="surrogatepass"), self.charsmap_blob,
                                               self.flags, self.user_defined).decode("utf-8")
        return self.normalize_py(text)

    def normalize_py(self, text: str) -> str:
        """The pure-Python path (the readable reference for the C one)."""
        data = text.encode("utf-8", errors="surrogatepass")
        n = len(data)
        pos = 0
        if self.remove_extra_whitespaces:
            while pos < n:
                sp, ln = self._prefix(data, pos)
                if sp != b" ":
                    break
                pos += ln
        if pos >= n:
            return ""
        ws = SPACE.encode() if self.escape_whitespaces else b" "
        out = bytearray()
        if not self.suffix and self.add_dummy_prefix:
            out += ws
        prev_space = self.remove_extra_whitespaces
        while pos < n:
            sp, ln = self._prefix(data, pos)
            if prev_space:
                sp = sp.lstrip(b" ") if sp.startswith(b" ") else sp
            if sp:
                out += sp.replace(b" ", ws) if self.escape_whitespaces else sp
                prev_space = sp.endswith(b" ")
            pos += ln
            if not self.remove_extra_whitespaces:
                prev_space = False
        if self.remove_extra_whitespaces:
            while out.endswith(ws):
                del out[-len(ws):]
        if self.suffix and self.add_dummy_prefix:
            out += ws
        return out.decode("utf-8")
