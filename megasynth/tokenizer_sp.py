"""SentencePiece models behind megasynth.tokenizer's interface (load them with load_tokenizer; docs/training.md)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megasynth.io import atomic_copy
from megasynth.tokenizer import BOS_NAMES, EOD_NAMES, SP_FILE, Tokenizer, TokenizerError, tokenizer_threads


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece .model; EOD is the model's EOS piece, BOS its BOS piece (when it has one)."""

    type = "sentencepiece"

    def __init__(self, model_path: Path, origin: Path):
        import sentencepiece as spm  # noqa: PLC0415

        self.path = str(origin.resolve())
        self._file = model_path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(model_path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{model_path}: not a SentencePiece model ({e})") from e
        self.vocab_size = self._sp.get_piece_size()
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"{model_path}: the SentencePiece model has no EOS piece (it was trained with "
                                 "eos_id=-1), so there is no end-of-document id. Retrain it with an EOS id, e.g. "
                                 "tools/train_tokenizer.py --type sentencepiece")
        self.eod_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        # Candidates by name first (cheap); only then is the model read for which of them are user-defined.
        named = {piece for i in range(self.vocab_size) if not self._sp.IsControl(i) and not self._sp.IsUnknown(i)
                 and _is_special_name(piece := self._sp.IdToPiece(i))}
        user = {piece for piece, t, _ in _sp_pieces(self._sp.serialized_model_proto()) if t == 4} if named else set()
        self._special_texts = tuple(sorted(named & user, key=self._sp.PieceToId))
        self._text_sp = None  # the model with those pieces made control pieces, made at first use

    @property
    def special_texts(self) -> tuple[str, ...]:
        return self._special_texts

    def _processor(self, parse_special: bool):
        """The processor to encode with: for text (parse_special False), one whose special user-defined pieces
        are control pieces, which SentencePiece never produces from text; every other piece is unchanged."""
        if parse_special or not self._special_texts:
            return self._sp
        if self._text_sp is None:
            import sentencepiece as spm  # noqa: PLC0415

            proto = _sp_user_pieces_to_control(self._sp.serialized_model_proto(), set(self._special_texts))
            self._text_sp = spm.SentencePieceProcessor(model_proto=proto)
        return self._text_sp

    def _threads(self) -> int:
        threads = tokenizer_threads()
        return -1 if threads is None else threads  # -1: SentencePiece's own default

    def _encode_batch_raw(self, texts: list[str], parse_special: bool = True) -> list[list[int]]:
        return self._processor(parse_special).encode(texts, add_bos=False, add_eos=False, num_threads=self._threads())

    def encode_batch_array(self, texts, *, add_bos=False, append_eod=False, dtype=np.int64, parse_special=True):
        if add_bos:
            self._require_bos()
        # SentencePiece hands back one numpy array per text: no Python int per token.
        arrays = self._processor(parse_special).encode(list(texts), add_bos=add_bos, add_eos=append_eod,
                                                       num_threads=self._threads(), return_type="numpy")
        lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int64)
        return flat.astype(dtype, copy=False), lengths

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(self._check_ids(ids))

    def save(self, directory: str | os.PathLike) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        atomic_copy(self._file, out / SP_FILE)
        vocab = self._file.with_suffix(".vocab")
        if vocab.is_file():  # a human-readable listing, not needed to load; kept for people reading the folder
            atomic_copy(vocab, out / "tokenizer.vocab")


_SPECIAL_NAME = re.compile(r"<\|[^\s|]+\|>")


def _is_special_name(piece: str) -> bool:
    """A SentencePiece user-defined piece that names a special token: <|...|>, or an EOD / BOS name."""
    return piece in EOD_NAMES or piece in BOS_NAMES or _SPECIAL_NAME.fullmatch(piece) is not None


def _varint(buf, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf, i: int, end: int):
    """(field number, wire type, offset of the value, offset after it) of each field of the protobuf message in
    buf[i:end]; for a length-delimited field (wire type 2) the value starts after its length."""
    while i < end:
        key, i = _varint(buf, i)
        at, wire = i, key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        elif wire == 2:
            n, at = _varint(buf, i)
            i = at + n
        else:
            raise TokenizerError(f"unexpected wire type {wire} in a SentencePiece model")
        yield key >> 3, wire, at, i


def _sp_pieces(buf):
    """(piece, type, offset of the type's varint or None) of every piece of a serialized SentencePiece ModelProto,
    read from the wire format (field 1 is the repeated SentencePiece {1: piece, 2: score, 3: type}; type 1
    NORMAL when absent, 3 CONTROL, 4 USER_DEFINED). Avoids a protobuf dependency."""
    for number, wire, start, end in _fields(buf, 0, len(buf)):
        if number == 1 and wire == 2:  # one SentencePiece
            piece, type_at = None, None
            for k, w, at, after in _fields(buf, start, end):
                if k == 1 and w == 2:
                    piece = bytes(buf[at:after]).decode("utf-8", "replace")
                elif k == 3 and w == 0:
                    type_at = at
            yield piece, (1 if type_at is None else _varint(buf, type_at)[0]), type_at


def _sp_user_pieces_to_control(proto: bytes, pieces: set[str]) -> bytes:
    """The serialized ModelProto with the USER_DEFINED (4) pieces named in `pieces` retyped CONTROL (3): the
    same one-byte varint, edited in place, so no length changes."""
    buf = bytearray(proto)
    for piece, kind, type_at in list(_sp_pieces(bytes(buf))):
        if kind == 4 and piece in pieces:
            buf[type_at] = 3
    return bytes(buf)
