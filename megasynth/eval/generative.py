"""Generative QA: sample an answer (greedy by default), then exact match and token F1 against the gold answers.
Normalisation, prompts, stopping rules and chat rendering: docs/eval.md ("Prompts", "Metrics").
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from megasynth.eval.multiple_choice import FEWSHOT_DELIMITER, TARGET_DELIMITER, draw_fewshot
from megasynth.generate import generate

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(a).split()) for a in answers)


_newline_cache: dict[str, frozenset[int]] = {}


def newline_token_ids(tokenizer) -> frozenset[int]:
    """Ids whose decoded text contains a newline (a generated answer ends at the first one)."""
    key = tokenizer.identity()["sha256"]
    if key not in _newline_cache:
        _newline_cache[key] = frozenset(i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i]))
    return _newline_cache[key]


def prompt_text(examples: Sequence, index: int, *, fewshot_pool=(), num_fewshot: int = 0, seed: int = 1234,
                template=None) -> str:
    """The text the model continues for examples[index]; with a chat template (megasynth.chat.ChatTemplate) the
    plain text as a user turn plus the generation prompt."""
    shots = draw_fewshot(fewshot_pool, num_fewshot, seed, index)
    text = "".join(s.prompt + TARGET_DELIMITER + s.answers[0] + FEWSHOT_DELIMITER for s in shots)
    text += examples[index].prompt
    return text if template is None else template.user_prompt(text)


def evaluate_generative(model, tokenizer, examples: Sequence, indices: Sequence[int], *, fewshot_pool=(),
                        num_fewshot: int = 0, seed: int = 1234, batch_size: int = 16, max_new_tokens: int = 32,
                        temperature: float = 0.0, start_ids: Sequence[int] = (), template=None) -> list[dict]:
    """Per-example records {"index", "id", "prediction", "answers", "exact_match", "f1"} for examples[i], i in
    `indices` (this rank's share; indices also seed few-shot draws and sampling streams)."""
    limit = model.cfg.max_seq_len - max_new_tokens
    if limit < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                         f"max_seq_len={model.cfg.max_seq_len}")
    texts = [prompt_text(examples, i, fewshot_pool=fewshot_pool, num_fewshot=num_fewshot, seed=seed,
                         template=template) for i in indices]
    prompts = [(list(start_ids) + tokenizer.encode(text))[-limit:] for text in texts]
    stops = newline_token_ids(tokenizer)
    end_of_turn = template.end_of_turn_id if template is not None else None
    if end_of_turn is not None:
        stops = stops | {end_of_turn}
    # Similar lengths together: less padding per batch.
    order = sorted(range(len(prompts)), key=lambda j: len(prompts[j]))
    outputs: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        outs = generate(model, [prompts[j] for j in chunk], max_new_tokens=max_new_tokens, temperature=temperature,
                        eod_id=tokenizer.eod_id, stop_ids=stops, seed=seed, row_ids=[indices[j] for j in chunk])
        for j, out in zip(chunk, outs):
            outputs[j] = out
    records = []
    for i, out in zip(indices, outputs):
        if out and out[-1] in (tokenizer.eod_id, end_of_turn):
            out = out[:-1]
        prediction = tokenizer.decode(out).split("\n", 1)[0].strip()
        answers = examples[i].answers
        records.append({"index": i, "id": examples[i].id, "prediction": prediction, "answers": answers,
                        "exact_match": exact_match(prediction, answers), "f1": token_f1(prediction, answers)})
    return records
