"""sentencepiece ``.model`` files and sentencepiece text normalization.

Knows the protobuf wire format (just enough of it to read ``ModelProto`` and
to write one back), the double-array trie of the precompiled character map
(darts-clone layout) and the normalizer's whitespace rules. Knows nothing
about segmentation: see ``unigram.py``.

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
    if wt == 5:
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
    trainer_fields: list = field(default_factory=list)


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
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"{path}: corrupt or truncated sentencepiece model ({e})") from None
    if not m.pieces:
        raise ValueError(f"{path}: sentencepiece model has no pieces (corrupt or not a .model file)")
    return m


def write_model(m: SPModel) -> bytes:
    """Serialize a ``ModelProto`` (what ``sentencepiece`` loads)."""
    out = bytearray()
    for piece, score, typ in m.pieces:
        body = _field(1, 2, piece.encode("utf-8")) + _field(2, 5, struct.pack("<f", score))
        if typ != NORMAL:
            body += _field(3, 0, typ)
        out += _field(1, 2, body)
    tr = _field(3, 0, m.model_type) + _field(4, 0, len(m.pieces))
    tr += _field(24, 0, int(m.treat_whitespace_as_suffix)) + _field(35, 0, int(m.byte_fallback))
    tr += _field(40, 0, m.unk_id)
    byname = {p: i for i, (p, _, t) in enumerate(m.pieces) if t == CONTROL}
    for fno, name in ((41, "<s>"), (42, "</s>"), (43, "<pad>")):
        tr += _field(fno, 0, byname.get(name, -1))
    out += _field(2, 2, tr)
    ns = _field(1, 2, m.normalizer_name.encode("utf-8"))
    if m.precompiled_charsmap:
        ns += _field(2, 2, m.precompiled_charsmap)
    ns += _field(3, 0, int(m.add_dummy_prefix)) + _field(4, 0, int(m.remove_extra_whitespaces))
    ns += _field(5, 0, int(m.escape_whitespaces))
    out += _field(3, 2, ns)
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
