"""SFT records -> (tokens, loss mask) for a chunk: the work a preprocess_sft worker does.

The record formats (a JSON object -> the conversation or pair it stands for; a bad record raises RecordProblem,
to which megasynth.data.readers adds FILE:LINE), the two encodings (whole text, pieces) and their refusals:
docs/sft.md ("Records to tokens and a mask").
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass

import numpy as np

from megasynth.chat import (IM_END, IM_START, PAIR_SEPARATOR, ConversationError, check_messages, load_chat_template,
    special_token_id, text_start_ids)
from megasynth.data.preprocess import EncodedChunk, build_encoder
from megasynth.data.readers import BadInputError, Chunk, Parsed, RecordProblem, lone_surrogate, parse_json_chunk
from megasynth.tokenizer import Tokenizer, TokenizerError

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


def _text_field(obj: dict, key: str, fmt: str) -> str:
    if key not in obj:
        keys = ", ".join(map(repr, list(obj)[:10])) or "none"
        raise RecordProblem(f"no field {key!r} (format {fmt} needs {', '.join(FORMAT_KEYS[fmt])}; keys: {keys})")
    value = obj[key]
    if not isinstance(value, str):
        raise RecordProblem(f"field {key!r} is {type(value).__name__}, expected a string")
    if not value.strip():
        raise RecordProblem(f"field {key!r} is empty")
    return value


def record_texts(obj: dict, fmt: str) -> tuple[list[str], list[str]]:
    """(roles, texts) of a record: the conversation a prompt_response / alpaca / chat record stands for, or a
    pair's ("source", "target"); RecordProblem when it is bad."""
    if fmt == "pair":
        return ["source", "target"], [_text_field(obj, "source", fmt), _text_field(obj, "target", fmt)]
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


# -- encoding -----------------------------------------------------------------------------------------------------
# Tokens on each side of a piece boundary that are re-tokenized jointly. The left side of an answer is the
# template's header (few distinct pairs); one token on the right keeps the checks cached across records.
_LEFT, _RIGHT = 2, 1
_SHORT = 32  # pieces up to this many characters have their tokens cached (template glue such as "\n")
MERGED = ("tokenizing the record in one go puts no token boundary where {what} starts (e.g. it opens with "
          "whitespace that merges with the template's newline); the targets would not be the tokens the model "
          "sees (see megasynth/data/sft_encode.py)")


class SftEncoder:
    """Parses a chunk of records and turns them into (tokens, lengths, loss mask); docs/sft.md says how."""

    def __init__(self, tokenizer: Tokenizer, options: SftOptions, dtype):
        self.tokenizer, self.options, self.dtype = tokenizer, options, np.dtype(dtype)
        self.eod_id = tokenizer.eod_id
        eod_text = tokenizer.decode([tokenizer.eod_id])
        if options.fmt == "pair":
            self.template = None
            self.separator = options.separator or PAIR_SEPARATOR
            self.sep_id = special_token_id(tokenizer, self.separator)
            if self.sep_id is None or self.sep_id == tokenizer.eod_id:
                raise TokenizerError(separator_problem(tokenizer, self.separator))
            specials = (self.separator,)
        else:
            self.template = load_chat_template(tokenizer)
            specials = self.template.special_tokens
            if self.template.end_of_turn_id is not None:  # a one-token end-of-turn marker is special too
                specials = (*specials, self.template.end_of_turn)
        # The EOD's text is forbidden only where it encodes to the EOD (SentencePiece's </s> is a control id that
        # no text produces, and decodes to "").
        if special_token_id(tokenizer, eod_text) == tokenizer.eod_id:
            specials = (*specials, eod_text)
        self.specials = tuple(dict.fromkeys(specials))
        # Every other string the tokenizer turns into a special id is refused in a text too: the
        # template's markers are special ids, the content never produces one (a record is tokenized in one go).
        others = [s for s in tokenizer.special_texts if s not in self.specials]
        self._other_specials = re.compile("|".join(map(re.escape, sorted(others, key=len, reverse=True)))) \
            if others else None
        self.whole = self.template is None or self.template.builtin
        # A special token to continue after (docs/sft.md), and what the tokenizer opens a text with.
        self.anchor = next((s for s in self.specials if special_token_id(tokenizer, s) is not None), None)
        self.lead = text_start_ids(tokenizer, self.anchor) if self.anchor else []
        if self.whole and self.template is not None:
            self.im_start, self.im_end = (special_token_id(tokenizer, t) for t in (IM_START, IM_END))
            self.header = self._continued(["assistant\n"])[0]
        self._short: dict[tuple, list[int]] = {}  # (opens a record, text) -> tokens of short pieces
        self._boundary: dict[tuple, bool] = {}  # (left ids, right ids) -> the joint tokenization agrees

    def worker_spec(self, tokenizer_path: str | os.PathLike) -> tuple:
        return build_encoder, (SftEncoder, os.fspath(tokenizer_path), self.options, self.dtype.name)

    # -- records ------------------------------------------------------------------------------------------------
    def convert(self, obj: dict, line: str):
        """Record -> (rendered text, assistant flag per message) on the whole-text path, (text, None) for a
        pair, [(text, is_target)] pieces on the template path; RecordProblem for a bad record."""
        fmt = self.options.fmt
        roles, texts = record_texts(obj, fmt)
        if (code := lone_surrogate(line, texts)) is not None:
            raise RecordProblem(f"a text holds a lone surrogate escape (\\u{code:04x})")
        for text in texts:
            for special in self.specials:
                if special in text:
                    raise RecordProblem(f"a text holds the special token {special!r}, which the format itself uses")
        if self._other_specials is not None:
            for text in texts:
                if found := self._other_specials.search(text):
                    raise RecordProblem(f"a text holds {found.group()!r}, a special token of the tokenizer: content "
                                        "must not produce special ids")
        if fmt == "pair":
            return texts[0] + self.separator + texts[1], None
        if self.whole:
            text = "".join([f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in zip(roles, texts)])
            return text, [role == "assistant" for role in roles]
        try:
            return self.template.segments([{"role": r, "content": c} for r, c in zip(roles, texts)])
        except ConversationError as e:
            raise RecordProblem(str(e)) from None

    def __call__(self, chunk: Chunk) -> EncodedChunk:
        parsed, records = parse_json_chunk(chunk, self.convert, self.options.skip_bad)
        if not self.whole:
            return self._finish(parsed, *self._pieces_to_arrays(self.encode_records(records)))
        tokens, lengths = self.tokenizer.encode_batch_array([text for text, _ in records], dtype=self.dtype)
        # The EOD after each record, in one numpy call (append_eod would copy every record's id list).
        tokens = np.insert(tokens, np.cumsum(lengths), np.array(self.eod_id, dtype=tokens.dtype))
        lengths += 1
        find = self._pair_mask if self.template is None else self._chatml_mask
        mask, problems = find(tokens, lengths, records)
        return self._finish(parsed, tokens, mask, lengths, problems)

    # -- the whole-text path ------------------------------------------------------------------------------------
    def _counted(self, tokens, ends, token_id, wanted, problems, what):
        """Positions of token_id; a record where it does not occur `wanted` times gets a problem."""
        at = np.flatnonzero(tokens == token_id)
        counts = np.bincount(np.searchsorted(ends, at, side="right"), minlength=len(ends))
        for r in np.flatnonzero(counts != wanted):
            problems[r] = (f"the tokenizer gives {counts[r]} {what} ids where the record has {wanted[r]} (it does "
                           "not keep the special token whole here)")
        return at, counts == wanted

    def _pair_mask(self, tokens, lengths, records):
        ends = np.cumsum(lengths)
        problems: list[str | None] = [None] * len(records)
        seps, ok = self._counted(tokens, ends, self.sep_id, np.ones(len(records), np.int64), problems,
                                 self.separator)
        seps = seps[ok[np.searchsorted(ends, seps, side="right")]]
        mark = np.zeros(tokens.size + 1, np.int32)
        mark[seps + 1] += 1  # the target, through the EOD
        mark[ends[ok]] -= 1
        return np.cumsum(mark[:-1]) > 0, problems

    def _chatml_mask(self, tokens, lengths, records):
        ends = np.cumsum(lengths)
        problems: list[str | None] = [None] * len(records)
        messages = np.fromiter(map(len, (flags for _, flags in records)), np.int64, len(records))
        starts, ok_s = self._counted(tokens, ends, self.im_start, messages, problems, IM_START)
        stops, ok_e = self._counted(tokens, ends, self.im_end, messages, problems, IM_END)
        good = ok_s & ok_e
        if not good.all():  # leave out the odd records' ids: the k-th id of each is the k-th message again
            starts = starts[good[np.searchsorted(ends, starts, side="right")]]
            stops = stops[good[np.searchsorted(ends, stops, side="right")]]
        assistant = np.fromiter(itertools.chain.from_iterable(flags for (_, flags), g in zip(records, good) if g),
                                np.bool_)
        owner = np.repeat(np.flatnonzero(good), messages[good])[assistant]
        opens, closes = starts[assistant], stops[assistant]
        first = opens + 1 + len(self.header)  # the answer's first token
        fits = first < closes
        for j, h in enumerate(self.header):
            fits &= tokens[np.minimum(opens + 1 + j, tokens.size - 1)] == h
        for r in np.unique(owner[~fits]):
            problems[r] = MERGED.format(what="an assistant answer")
        mark = np.zeros(tokens.size + 1, np.int32)
        mark[first[fits]] += 1  # the answer, through its <|im_end|>
        mark[closes[fits] + 1] -= 1
        return np.cumsum(mark[:-1]) > 0, problems

    # -- the pieces path ----------------------------------------------------------------------------------------
    def _continued(self, texts: list[str]) -> list[list[int]]:
        """Tokens of texts that continue a record: without what the tokenizer puts at the start of a text."""
        if not self.lead:
            return self.tokenizer.encode_batch(texts)
        cut = len(self.lead) + 1
        return [ids[cut:] for ids in self.tokenizer.encode_batch([self.anchor + t for t in texts])]

    def _encode(self, texts: list[str], first: list[bool]) -> list[list[int]]:
        """Tokens of each text (first: it opens a record); short ones come from (and go to) a cache."""
        keys = [(f or not self.lead, t) for t, f in zip(texts, first)]  # without a lead both encode alike
        todo = [k for k in dict.fromkeys(keys) if len(k[1]) > _SHORT or k not in self._short]
        opening = [k for k in todo if k[0]]
        cont = [k for k in todo if not k[0]]
        fresh = dict(zip(opening, self.tokenizer.encode_batch([t for _, t in opening])))
        fresh.update(zip(cont, self._continued([t for _, t in cont])))
        for k in todo:
            if len(k[1]) <= _SHORT and len(self._short) < 100_000:
                self._short[k] = fresh[k]
        return [fresh[k] if k in fresh else self._short[k] for k in keys]

    def _boundary_key(self, left_text: str, left: list[int], right_text: str, right: list[int]):
        """None when nothing can merge across this piece boundary (a special token on either side), else the
        key of its check in self._boundary: the boundary tokens' ids, or where they do not decode to the text
        around the boundary (part of a UTF-8 character, a dummy-prefix space) the characters around it."""
        if left_text.endswith(self.specials) or right_text.startswith(self.specials):
            return None  # special tokens are split off before anything else: nothing merges across them
        key = (tuple(left[-_LEFT:]), tuple(right[:_RIGHT]))
        if key not in self._boundary:
            lt, rt = self.tokenizer.decode(key[0]), self.tokenizer.decode(key[1])
            if not (left_text.endswith(lt) and right_text.startswith(rt)):
                key = (left_text[-8:], right_text[:8])
        return key

    def _check_boundaries(self, keys) -> None:
        """Fill self._boundary for the keys not known yet: does tokenizing the text around the boundary in one go
        give the same tokens as tokenizing each side? One batched encode for all of them."""
        todo = [k for k in dict.fromkeys(keys) if k is not None and k not in self._boundary]
        texts = [(self.tokenizer.decode(k[0]), self.tokenizer.decode(k[1])) if isinstance(k[0], tuple) else k
                 for k in todo]
        ids = self._continued([t for lt, rt in texts for t in (lt, rt, lt + rt)])
        for n, key in enumerate(todo):
            a, b, joint = ids[3 * n: 3 * n + 3]
            self._boundary[key] = joint == a + b

    def encode_records(self, records: list[list[tuple[str, bool]]]) -> list[tuple[list, list, str | None]]:
        """Per record given as pieces: (token runs, their is-target flags, problem). The runs are the pieces'
        tokens and the final EOD; one batched encode for all pieces, one for the boundary checks not known yet."""
        texts = [text for pieces in records for text, _ in pieces]
        first = [k == 0 for pieces in records for k in range(len(pieces))]
        ids = iter(self._encode(texts, first))
        per_record = [list(itertools.islice(ids, len(pieces))) for pieces in records]
        keys = [[self._boundary_key(pieces[k][0], piece_ids[k], pieces[k + 1][0], piece_ids[k + 1])
                 for k in range(len(pieces) - 1)] for pieces, piece_ids in zip(records, per_record)]
        self._check_boundaries(k for record_keys in keys for k in record_keys)
        out = []
        for pieces, piece_ids, record_keys in zip(records, per_record, keys):
            bad = next((k for k, key in enumerate(record_keys) if key is not None and not self._boundary[key]), None)
            if bad is not None:
                out.append(([], [], MERGED.format(what=f"piece {bad + 2} ({pieces[bad + 1][0][:20]!r})")))
            else:
                out.append(([*piece_ids, [self.eod_id]], [*(target for _, target in pieces), False], None))
        return out

    def _pieces_to_arrays(self, encoded):
        runs = [run for record_runs, _, _ in encoded for run in record_runs]
        flags = [flag for _, record_flags, _ in encoded for flag in record_flags]
        run_lengths = np.fromiter(map(len, runs), dtype=np.int64, count=len(runs))
        tokens = np.fromiter(itertools.chain.from_iterable(runs), dtype=self.dtype, count=int(run_lengths.sum()))
        mask = np.repeat(np.array(flags, dtype=np.bool_), run_lengths)  # one flag per run, not per token
        lengths = np.fromiter((sum(map(len, r)) for r, _, _ in encoded), np.int64, len(encoded))
        return tokens, mask, lengths, [problem for _, _, problem in encoded]

    # -- both ---------------------------------------------------------------------------------------------------
    def _finish(self, parsed: Parsed, tokens, mask, lengths, problems) -> EncodedChunk:
        """Apply max_len / truncate and drop the records with a problem (or raise for the first of them)."""
        opts = self.options
        long = lengths > opts.max_len if opts.max_len is not None else np.zeros(len(lengths), np.bool_)
        if not long.any() and not any(problems):
            return EncodedChunk(tokens, lengths, mask, parsed, 0)
        ends = np.cumsum(lengths)
        keep_t, keep_m, keep_n, positions, truncated = [], [], [], [], 0
        for r, position in enumerate(parsed.positions):
            problem, n = problems[r], int(lengths[r])
            t, m = tokens[ends[r] - n: ends[r]], mask[ends[r] - n: ends[r]]
            if problem is None and long[r]:
                if not opts.truncate:
                    problem = f"{n:,} tokens, more than --max-len {opts.max_len:,} (or pass --truncate)"
                else:
                    # The first max_len - 1 tokens, then EOD as context: the text did not end there.
                    t = np.append(t[:opts.max_len - 1], np.array([self.eod_id], t.dtype))
                    m = np.append(m[:opts.max_len - 1], False)
                    n = opts.max_len
                    if not m.any():
                        problem = f"no target token left after truncating to --max-len {opts.max_len:,}"
                    truncated += problem is None
            if problem is not None:
                err = BadInputError(f"{parsed.file}:{position}", problem)
                if not opts.skip_bad:
                    raise err
                parsed.bad.append(err)
                continue
            keep_t.append(t)
            keep_m.append(m)
            keep_n.append(n)
            positions.append(position)
        parsed.bad.sort(key=lambda e: int(e.location.rsplit(":", 1)[1]))
        parsed.positions = positions
        cat = (lambda parts, dtype: np.concatenate(parts) if parts else np.empty(0, dtype))
        return EncodedChunk(cat(keep_t, tokens.dtype), np.array(keep_n, dtype=np.int64), cat(keep_m, np.bool_),
                            parsed, truncated)


def separator_problem(tokenizer: Tokenizer, separator: str) -> str:
    """The one line refusing a pair separator that is not one id of the tokenizer."""
    how = ("train one with tools/train_tokenizer.py --chat-tokens, or pass --separator TOKEN naming a token that is "
           "one id (an existing special or reserved token)") if separator == PAIR_SEPARATOR else \
          "pass --separator TOKEN naming a token that is one id (an existing special or reserved token)"
    if special_token_id(tokenizer, separator) == tokenizer.eod_id:
        return (f"{tokenizer.path}: the pair separator {separator!r} is this tokenizer's end-of-document token; "
                "pass --separator TOKEN naming another single-id token (an existing special or reserved token)")
    return f"{tokenizer.path}: the pair separator {separator!r} is not one token of this tokenizer; {how}"
