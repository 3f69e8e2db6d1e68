"""Multiple-choice evaluation by log-likelihood (lm-evaluation-harness style), including closed-book QuALITY:
acc and acc_norm, the prompts, few-shot draws and chat rendering are docs/eval.md's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megasynth.eval.loglik import score_continuations
from megasynth.eval.tasks import MultipleChoiceExample, QualityExample, TaskError

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class PromptOptions:
    quality_title: bool = True  # show the article's title in closed-book QuALITY prompts
    quality_answer: str = "text"  # "text": score option texts; "letter": list options, score their letters


def render(example, options: PromptOptions) -> tuple[str, list[str], int]:
    """(prompt, choices as scored without the delimiter, gold index) of one example."""
    if isinstance(example, MultipleChoiceExample):
        return example.context, example.choices, example.gold
    if isinstance(example, QualityExample):
        head = f"Title: {example.title}\n" if options.quality_title and example.title else ""
        if options.quality_answer == "letter":
            if len(example.options) > len(LETTERS):
                raise TaskError(f"line {example.line}: {len(example.options)} options, "
                                f"more than {len(LETTERS)} letters")
            listed = "".join(f"\n{LETTERS[i]}. {opt}" for i, opt in enumerate(example.options))
            letters = list(LETTERS[: len(example.options)])
            return f"{head}Question: {example.question}{listed}\nAnswer:", letters, example.gold
        if options.quality_answer != "text":
            raise ValueError(f"quality_answer must be 'text' or 'letter', got {options.quality_answer!r}")
        return f"{head}Question: {example.question}\nAnswer:", example.options, example.gold
    raise TypeError(f"not a multiple-choice example: {type(example).__name__}")


def draw_fewshot(pool: Sequence, k: int, seed: int, index: int) -> list:
    """k distinct pool examples, a function of (seed, index) only, so sharding never changes a prompt."""
    if k == 0:
        return []
    if k > len(pool):
        raise ValueError(f"{k}-shot needs at least {k} examples with \"split\": \"fewshot\", the file has {len(pool)}")
    rng = np.random.default_rng([seed, index])
    return [pool[int(j)] for j in rng.choice(len(pool), size=k, replace=False)]


def context_text(example, options: PromptOptions, *, fewshot_pool=(), num_fewshot: int = 0, seed: int = 1234,
                 index: int = 0, template=None) -> tuple[str, list[str], int, str]:
    """(context text, choices, gold index, delimiter before a choice) of examples[index]; with a chat template
    (megasynth.chat.ChatTemplate) the context is the plain one as a user turn plus the generation prompt."""
    prompt, choices, gold = render(example, options)
    shots = (render(shot, options) for shot in draw_fewshot(fewshot_pool, num_fewshot, seed, index))
    text = "".join(p + TARGET_DELIMITER + c[g] + FEWSHOT_DELIMITER for p, c, g in shots) + prompt
    if template is None:
        return text, choices, gold, TARGET_DELIMITER
    return template.user_prompt(text), choices, gold, ""


def evaluate_multiple_choice(model, tokenizer, examples: Sequence, indices: Sequence[int], *, fewshot_pool=(),
                             num_fewshot: int = 0, seed: int = 1234, batch_size: int = 16,
                             start_ids: Sequence[int] = (), options: PromptOptions | None = None,
                             template=None) -> list[dict]:
    """Per-example records {"index", "id", "gold", "pred", "pred_norm", "acc", "acc_norm", "logliks"} for
    examples[i] (i in `indices`: this rank's share; `indices` also seed the few-shot draws). template: a
    megasynth.chat.ChatTemplate to wrap each context in (docs/eval.md), or None."""
    options = options or PromptOptions()
    requests, spans, meta = [], [], []
    for i in indices:
        ex = examples[i]
        text, choices, gold, delimiter = context_text(ex, options, fewshot_pool=fewshot_pool,
                                                      num_fewshot=num_fewshot, seed=seed, index=i, template=template)
        ctx = list(start_ids) + tokenizer.encode(text)
        first = len(requests)
        for choice in choices:
            requests.append((ctx, tokenizer.encode(delimiter + choice)))
        spans.append((first, len(requests)))
        meta.append((i, ex, choices, gold))
    scores = score_continuations(model, requests, batch_size=batch_size)
    records = []
    for (first, end), (i, ex, choices, gold) in zip(spans, meta):
        ll = np.array([s.logprob for s in scores[first:end]])
        lengths = np.array([float(len(c)) for c in choices])
        pred, pred_norm = int(np.argmax(ll)), int(np.argmax(ll / lengths))  # argmax: first index on ties
        records.append({"index": i, "id": ex.id, "gold": gold, "pred": pred, "pred_norm": pred_norm,
                        "acc": float(pred == gold), "acc_norm": float(pred_norm == gold),
                        "logliks": [round(float(x), 6) for x in ll]})
    return records
