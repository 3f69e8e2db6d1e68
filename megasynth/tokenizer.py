"""One tokenizer interface over SentencePiece models and Hugging Face `tokenizers` files.

    tok = load_tokenizer("tok/")            # a directory, a tokenizer.json, or a SentencePiece .model
    ids = tok.encode("Hello", append_eod=True)
    tok.decode(ids), tok.vocab_size, tok.eod_id, tok.identity()

Special tokens, whole-text encoding and the identity hash: docs/training.md ("Tokenizers").
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megasynth.io import atomic_copy, atomic_files, atomic_write_json

EOD_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
HF_FILE = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
HF_SPECIAL_MAP = "special_tokens_map.json"
SP_FILE = "tokenizer.model"

# Threads a batched encode may use inside one process: None leaves each library's default (all cores).
_num_threads: int | None = None


class TokenizerError(ValueError):
    """A tokenizer path that cannot be loaded or used; the message names the path and what is wrong."""


def limit_tokenizer_threads(n: int) -> None:
    """Make batched encoding in this process (and in processes it starts later) use at most n threads.

    Data-parallel tools run one single-threaded tokenizer per worker process; letting each of them also start
    a thread per core would oversubscribe the machine. Hugging Face's thread pool reads its environment once,
    at its first parallel call, so call this before encoding anything.
    """
    global _num_threads
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    _num_threads = n
    os.environ["TOKENIZERS_PARALLELISM"] = "false" if n == 1 else "true"
    os.environ["RAYON_NUM_THREADS"] = str(n)


def tokenizer_threads() -> int | None:
    """The limit set by limit_tokenizer_threads, None without one."""
    return _num_threads


def _sha256_of(path: Path, extra: dict) -> str:
    """sha256 of the file's bytes, then of `extra` as canonical JSON."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


class Tokenizer(ABC):
    """What the rest of megasynth needs from a tokenizer; see load_tokenizer()."""

    type: str
    path: str  # the file or directory it was loaded from (absolute)
    _file: Path  # the file whose bytes define the tokenizer (hashed by identity(), copied by save())
    vocab_size: int  # rows the model's embedding needs: every id, special tokens included, is below it
    eod_id: int
    bos_id: int | None
    ignored_from_file: dict = {}  # settings of the file that would cut or pad texts, switched off at load
    # The jinja2 chat template of a Hugging Face tokenizer directory (chat_template.jinja, else tokenizer_config's
    # "chat_template"), None without one; megasynth.chat renders it, or its built-in template when None.
    chat_template: str | None = None
    # The special-token strings a chat template may use, as transformers passes them (bos_token, eos_token, ...).
    template_tokens: dict = {}

    @abstractmethod
    def _encode_batch_raw(self, texts: list[str], parse_special: bool = True) -> list[list[int]]:
        """Ids of each text with no special token added (special-token strings as text unless parse_special)."""

    @property
    @abstractmethod
    def special_texts(self) -> tuple[str, ...]:
        """The strings that encode to a special id with parse_special=True and as text without (docs/training.md)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of these ids, special tokens included as text."""

    @abstractmethod
    def save(self, directory: str | os.PathLike) -> None:
        """Write the files that load_tokenizer(directory) needs to rebuild this tokenizer."""

    def encode(self, text: str, *, add_bos: bool = False, append_eod: bool = False,
               parse_special: bool = True) -> list[int]:
        return self.encode_batch([text], add_bos=add_bos, append_eod=append_eod, parse_special=parse_special)[0]

    def encode_batch(self, texts: list[str], *, add_bos: bool = False, append_eod: bool = False,
                     parse_special: bool = True) -> list[list[int]]:
        """parse_special=False for text from data or an LLM: special-token strings stay text (docs/training.md)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings; use encode() for one string")
        texts = list(texts)
        prefix = [self._require_bos()] if add_bos else []
        suffix = [self.eod_id] if append_eod else []
        ids = self._encode_batch_raw(texts, parse_special)
        if prefix or suffix:
            ids = [prefix + one + suffix for one in ids]
        return ids

    def encode_batch_array(self, texts: list[str], *, add_bos: bool = False, append_eod: bool = False,
                           dtype=np.int64, parse_special: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, lengths): every text's ids concatenated into one array, and int64 lengths per text.

        The preprocessor's fast path: one array per batch instead of a Python list per document.
        """
        ids = self.encode_batch(texts, add_bos=add_bos, append_eod=append_eod, parse_special=parse_special)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        # Straight into the target dtype, no intermediate list: measured half the cost of np.array(list) and
        # cheaper than an array per document (about 1.5% of the encode time for a byte-level BPE). An id that
        # does not fit `dtype` raises OverflowError instead of wrapping.
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
        return flat, lengths

    def identity(self) -> dict:
        """What a dataset's sidecar records about the tokenizer that made it. "whole_text": every text is
        encoded whole (never truncated or padded); "ignored_from_file" (only when there was something to
        ignore) holds the truncation/padding settings of a tokenizer.json that loading switched off."""
        specials = {"eod_id": self.eod_id, "bos_id": self.bos_id}
        ident = {
            "type": self.type,
            "path": self.path,
            "sha256": _sha256_of(self._file, specials),
            "vocab_size": self.vocab_size,
            **specials,
            "whole_text": True,
        }
        if self.ignored_from_file:
            ident["ignored_from_file"] = json.loads(json.dumps(self.ignored_from_file))  # a copy callers may keep
        return ident

    def _require_bos(self) -> int:
        if self.bos_id is None:
            raise TokenizerError(f"{self.path}: add_bos was asked for but this tokenizer has no BOS token")
        return self.bos_id

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{self.path}: id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json, with special-token names from a tokenizer_config.json."""

    type = "huggingface"

    def __init__(self, json_path: Path, origin: Path):
        import tokenizers  # noqa: PLC0415 - only HF users pay for the import

        self.path = str(origin.resolve())
        self._file = json_path
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(json_path))
        except Exception as e:  # the Rust loader raises a bare Exception with its parse error
            raise TokenizerError(f"{json_path}: not a Hugging Face tokenizer.json ({e})") from e
        # Truncation and padding saved in the file would apply to every encode (and to encode_batch_fast):
        # long documents cut to max_length, short ones filled with pad ids. We always tokenize the whole text.
        ignored = {"truncation": self._tok.truncation, "padding": self._tok.padding}
        self.ignored_from_file = {k: v for k, v in ignored.items() if v is not None}
        self._tok.no_truncation()
        self._tok.no_padding()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # Added tokens may leave holes above the base vocabulary: the embedding needs max id + 1 rows.
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        config = self._read_config(json_path.parent)
        self.eod_token = self._find_special(config, "eos_token", EOD_NAMES, required=True)
        self.eod_id = self._tok.token_to_id(self.eod_token)
        self.bos_token = self._find_special(config, "bos_token", BOS_NAMES, required=False)
        self.bos_id = None if self.bos_token is None else self._tok.token_to_id(self.bos_token)
        self._config = config
        self._batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # no offsets: faster
        self._text_batch = None  # the same tokenizer with encode_special_tokens on, made at first use
        self.chat_template = _read_chat_template(json_path.parent, config)
        self.template_tokens = {"bos_token": self.bos_token, "eos_token": self.eod_token}
        for key in ("unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                self.template_tokens[key] = value

    @staticmethod
    def _read_config(directory: Path) -> dict:
        """tokenizer_config.json merged over special_tokens_map.json (either may be absent)."""
        merged: dict = {}
        for name in (HF_SPECIAL_MAP, HF_CONFIG):
            path = directory / name
            if not path.is_file():
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise TokenizerError(f"{path}: not readable JSON ({e})") from e
            if not isinstance(data, dict):
                raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
            merged.update(data)
        return merged

    def _find_special(self, config: dict, key: str, names: Sequence[str], *, required: bool) -> str | None:
        if key in config and config[key] is not None:
            value = config[key]
            name = value.get("content") if isinstance(value, dict) else value  # older configs store AddedToken dicts
            if not isinstance(name, str) or self._tok.token_to_id(name) is None:
                raise TokenizerError(f"{self._file.parent / HF_CONFIG}: {key} {value!r} is not a token of "
                                     f"{self._file}")
            return name
        for name in names:
            if self._tok.token_to_id(name) is not None:
                return name
        if required:
            raise TokenizerError(
                f"{self._file}: no end-of-document token: tokenizer_config.json names no eos_token and none of "
                f"{', '.join(names)} is in the vocabulary. Add one (tokenizer.add_special_tokens(['<|endoftext|>']) "
                f"then tokenizer.save(...)) or set \"eos_token\" in {HF_CONFIG} to an existing token")
        return None

    def _encode_batch_raw(self, texts: list[str], parse_special: bool = True) -> list[list[int]]:
        batch = self._batch if parse_special or not self.special_texts else self._text_encoder()
        return [e.ids for e in batch(texts, add_special_tokens=False)]

    def _text_encoder(self):
        """encode_batch of a copy with encode_special_tokens: special added tokens are not split out of the text
        but tokenised by the model like any other text (a second object, so the switch is never flipped under
        a concurrent encode)."""
        if self._text_batch is None:
            import tokenizers  # noqa: PLC0415

            core = tokenizers.Tokenizer.from_str(self._tok.to_str())  # truncation and padding already off
            core.encode_special_tokens = True
            self._text_core = core
            self._text_batch = getattr(core, "encode_batch_fast", core.encode_batch)
        return self._text_batch

    @property
    def special_texts(self) -> tuple[str, ...]:
        if not hasattr(self, "_special_texts"):
            added = self._tok.get_added_tokens_decoder()
            self._special_texts = tuple(added[i].content for i in sorted(added) if added[i].special)
        return self._special_texts

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        atomic_copy(self._file, out / HF_FILE)
        # Everything lives in tokenizer.json, so the generic fast class reproduces it exactly; a model-specific
        # class from the original config could expect files we do not copy (a slow tokenizer's vocab files).
        config = {k: v for k, v in self._config.items() if k not in ("auto_map", "tokenizer_file")}
        config.update(tokenizer_class="PreTrainedTokenizerFast", eos_token=self.eod_token, bos_token=self.bos_token)
        config.setdefault("clean_up_tokenization_spaces", False)  # decoding must give back the text, spaces included
        if self.chat_template is not None:  # it may have come from a chat_template.jinja that is not copied
            config["chat_template"] = self.chat_template
        atomic_write_json(out / HF_CONFIG, config)


def _read_chat_template(directory: Path, config: dict) -> str | None:
    """The chat template as transformers finds it: chat_template.jinja beside the config, else its
    "chat_template" (a string, or a list of {"name", "template"} of which "default" is the one used)."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja_file}: not readable ({e})") from e
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise TokenizerError(f"{directory / HF_CONFIG}: \"chat_template\" must be a string or a list of "
                         f"{{\"name\", \"template\"}} with a \"default\" one, got {value!r:.80}")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a SentencePiece .model, a Hugging Face tokenizer.json, or a directory holding one of them.

    In a directory, tokenizer.json wins over tokenizer.model (a Hugging Face folder often holds both, and the
    .json is what its fast tokenizer runs); a directory with neither may hold exactly one other *.model file.
    """
    from megasynth.tokenizer_sp import SentencePieceTokenizer  # noqa: PLC0415 (it builds on this module)

    origin = Path(path)
    if origin.is_dir():
        if (origin / HF_FILE).is_file():
            return HFTokenizer(origin / HF_FILE, origin)
        if (origin / SP_FILE).is_file():
            return SentencePieceTokenizer(origin / SP_FILE, origin)
        models = sorted(origin.glob("*.model"))
        if len(models) == 1:
            return SentencePieceTokenizer(models[0], origin)
        found = ", ".join(p.name for p in models) if models else "neither"
        raise TokenizerError(f"{origin}: a tokenizer directory must hold {HF_FILE} or {SP_FILE} (found {found})")
    if origin.is_file():
        if origin.suffix == ".json":
            return HFTokenizer(origin, origin)
        if origin.suffix == ".model":
            return SentencePieceTokenizer(origin, origin)
        raise TokenizerError(f"{origin}: not a tokenizer file: expected a SentencePiece .model, a Hugging Face "
                             "tokenizer.json, or a directory holding one of them")
    raise TokenizerError(f"{origin}: no such tokenizer file or directory")


# -- training ------------------------------------------------------------------------------------------------------
BPE_EOD = "<|endoftext|>"
MAX_SP_LINE_BYTES = 16384  # SentencePiece skips longer training sentences; documents are fed line by line


# Every file a tokenizer directory can hold: Tokenizer.save and the trainers write some of them, and a stale one
# of the others would shadow the new tokenizer (a tokenizer.json left from an earlier BPE beside a new
# tokenizer.model), so a new tokenizer replaces all of them and nothing else in the directory.
TOKENIZER_FILES = (HF_FILE, HF_CONFIG, HF_SPECIAL_MAP, SP_FILE, "tokenizer.vocab", "chat_template.jinja")


def _training_dir(out: Path, commit: str) -> contextlib.AbstractContextManager[Path]:
    """A temp directory beside `out` to train into; on success the tokenizer files in it are published into `out`
    as one set (megasynth.io.atomic_files, `commit` last), replacing the old tokenizer files and leaving any other
    file in `out` alone. On an error nothing changes. Whether an existing tokenizer may be replaced is the
    caller's decision (tools/train_tokenizer.py asks for --overwrite)."""
    if out.exists() and not out.is_dir():
        raise TokenizerError(f"{out}: exists and is not a directory")
    return atomic_files(out, TOKENIZER_FILES, commit=commit, replace=True)


def train_bpe_tokenizer(texts, output_dir: str | os.PathLike, *, vocab_size: int, min_frequency: int = 2,
                        special_tokens: Sequence[str] = (), progress: bool = False,
                        chat_template: str | None = None) -> Tokenizer:
    """Train a byte-level BPE (Hugging Face `tokenizers`) on an iterable of texts; write tokenizer.json and a
    tokenizer_config.json (eos_token <|endoftext|>, and `chat_template` when given) that transformers'
    AutoTokenizer loads; return it loaded.

    Byte-level: every string encodes (no unknown token) and decodes back to itself exactly.
    """
    from tokenizers import Tokenizer as HFCore  # noqa: PLC0415
    from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    specials = list(dict.fromkeys([BPE_EOD, *special_tokens]))  # EOD first: id 0
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise TokenizerError(f"--vocab-size {vocab_size} is below the {len(alphabet)} byte symbols plus "
                             f"{len(specials)} special tokens a byte-level BPE needs")
    core = HFCore(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=progress)
    core.train_from_iterator(texts, trainer)
    out = Path(output_dir)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": BPE_EOD,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,  # decoding must give the text back, spaces included
        "model_max_length": 2**60,  # no length limit of its own: the model's sequence length decides
    }
    if chat_template is not None:  # where transformers (and megasynth.chat) look for one
        config["chat_template"] = chat_template
    with _training_dir(out, commit=HF_FILE) as tmp:
        core.save(str(tmp / HF_FILE))
        atomic_write_json(tmp / HF_CONFIG, config)
    return load_tokenizer(out)


def train_sentencepiece_tokenizer(texts, output_dir: str | os.PathLike, *, vocab_size: int, model_type: str = "unigram",
                                  special_tokens: Sequence[str] = (), threads: int | None = None) -> Tokenizer:
    """Train a SentencePiece model (unk 0, BOS 1, EOS 2 = end of document) on an iterable of texts; write
    tokenizer.model and tokenizer.vocab; return it loaded.

    Lossless settings: no normalization, whitespace kept as is, and byte fallback for characters outside the
    vocabulary, so decode(encode(text)) == text.
    """
    import sentencepiece as spm  # noqa: PLC0415

    def lines():
        # SentencePiece trains on sentences, one per line: feed each document's non-blank lines.
        for text in texts:
            for line in text.split("\n"):
                if line.strip():
                    yield line

    out = Path(output_dir)
    with _training_dir(out, commit=SP_FILE) as tmp:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines(), model_prefix=str(tmp / "tokenizer"), vocab_size=vocab_size,
                model_type=model_type, normalization_rule_name="identity", remove_extra_whitespaces=False,
                byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
                character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                user_defined_symbols=list(special_tokens), max_sentence_length=MAX_SP_LINE_BYTES,
                num_threads=threads or os.cpu_count() or 1, minloglevel=2)
        except RuntimeError as e:  # e.g. "Vocabulary size is too high" for a small corpus
            raise TokenizerError(f"{out}: SentencePiece training failed: {e}") from e
    return load_tokenizer(out)
