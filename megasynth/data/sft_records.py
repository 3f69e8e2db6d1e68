"""SFT record formats: a JSON object -> the conversation (or pair) it stands for, validated.

The formats and their rules are docs/sft.md's; this module only reads records. A bad record
raises RecordProblem (megasynth.data.readers adds FILE:LINE).
"""

from __future__ import annotations

from dataclasses import dataclass

from megasynth.chat import check_messages
from megasynth.data.readers import RecordProblem

FORMATS = ("prompt_response", "alpaca", "chat", "pair")
# The keys that identify each format (format "auto" looks for them in the first record, in this order).
FORMAT_KEYS = {"chat": ("messages",), "alpaca": ("instruction", "output"), "prompt_response": ("prompt", "response"),
               "pair": ("source", "target")}
ALPACA_JOIN = "\n\n"  # between an alpaca record's instruction and its non-empty input


@dataclass(frozen=True)
class SftOptions:
    """How records become examples (everything a worker needs besides the tokenizer)."""

    fmt: str  # one of FORMATS (resolved: never "auto")
    max_len: int | None = None  # longest example in tokens (EOD included); None: no limit
    truncate: bool = False  # cut examples longer than max_len instead of refusing them
    skip_bad: bool = False  # count and skip bad records instead of raising BadInputError
    batch_size: int = 512  # records per chunk handed to a worker
    max_bad_shown: int = 5  # how many bad locations the summary keeps
    separator: str | None = None  # pair records: the token between source and target (None: <|sep|>)

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {self.fmt!r}")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")
        if self.truncate and self.max_len is None:
            raise ValueError("truncate needs max_len")


def detect_format(obj: dict) -> str | None:
    """The format whose keys the record has (FORMAT_KEYS order), or None."""
    for fmt, keys in FORMAT_KEYS.items():
        if all(k in obj for k in keys):
            return fmt
    return None


def _text_field(obj: dict, key: str, fmt: str, *, allow_empty: bool = False) -> str:
    if key not in obj:
        keys = ", ".join(map(repr, list(obj)[:10])) or "none"
        raise RecordProblem(f"no field {key!r} (format {fmt} needs {', '.join(FORMAT_KEYS[fmt])}; keys: {keys})")
    value = obj[key]
    if not isinstance(value, str):
        raise RecordProblem(f"field {key!r} is {type(value).__name__}, expected a string")
    if not allow_empty and not value.strip():
        raise RecordProblem(f"field {key!r} is empty")
    return value


def record_turns(obj: dict, fmt: str) -> tuple[list[str], list[str]]:
    """(roles, contents) of the conversation a prompt_response / alpaca / chat record stands for (RecordProblem
    when it is bad)."""
    if fmt == "chat":
        messages = obj.get("messages")
        if messages is None and "messages" not in obj:
            raise RecordProblem(f"no field 'messages' (format chat; keys: {', '.join(map(repr, list(obj)[:10]))})")
        problem = check_messages(messages)
        if problem:
            raise RecordProblem(problem)
        return [m["role"] for m in messages], [m["content"] for m in messages]
    if fmt == "prompt_response":
        prompt, answer = _text_field(obj, "prompt", fmt), _text_field(obj, "response", fmt)
    elif fmt == "alpaca":
        prompt, answer = _text_field(obj, "instruction", fmt), _text_field(obj, "output", fmt)
        extra = obj.get("input")
        if extra is not None and not isinstance(extra, str):
            raise RecordProblem(f"field 'input' is {type(extra).__name__}, expected a string")
        if extra and extra.strip():
            prompt = prompt + ALPACA_JOIN + extra
    else:
        raise ValueError(f"not a conversation format: {fmt!r}")
    return ["user", "assistant"], [prompt, answer]


def record_messages(obj: dict, fmt: str) -> list[dict]:
    """The conversation a prompt_response / alpaca / chat record stands for, as {"role", "content"} messages."""
    roles, contents = record_turns(obj, fmt)
    return [{"role": r, "content": c} for r, c in zip(roles, contents)]


def record_texts(obj: dict, fmt: str) -> tuple[list[str], list[str]]:
    """(roles, texts) of any record; a pair is ("source", "target")."""
    if fmt == "pair":
        return ["source", "target"], [_text_field(obj, "source", fmt), _text_field(obj, "target", fmt)]
    return record_turns(obj, fmt)


def check_texts(texts: list[str], line: str, forbidden: tuple[str, ...]) -> None:
    """RecordProblem for a text holding a lone surrogate or one of the format's own special tokens."""
    if "\\ud" in line or "\\uD" in line:  # JSON escapes can spell lone surrogates, which are not text
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RecordProblem(f"a text holds a lone surrogate escape (\\u{ord(text[e.start]):04x})") from None
    for text in texts:
        for special in forbidden:
            if special in text:
                raise RecordProblem(f"a text holds the special token {special!r}, which the format itself uses")
