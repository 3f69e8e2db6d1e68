"""Runs evaluation tasks and perplexity on one process or data-parallel under torchrun, with exact reduction
(docs/eval.md, "Data-parallel runs").

    settings = EvalSettings(num_fewshot=5)
    result, records = run_task(model, tokenizer, load_task("qa.jsonl"), settings)   # rank 0: all records
    result, _ = run_perplexity(model, "data/valid", settings, seq_len=1024)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megasynth.data.indexed import IndexedDataset
from megasynth.distributed import all_gather_object, is_distributed, rank_and_world
from megasynth.eval.generative import evaluate_generative
from megasynth.eval.multiple_choice import PromptOptions, evaluate_multiple_choice
from megasynth.eval.perplexity import perplexity_metrics, perplexity_sums
from megasynth.eval.tasks import Task
from megasynth.generate import default_start_ids

METRICS = {"multiple_choice": ("acc", "acc_norm"), "quality": ("acc", "acc_norm"),
           "generative": ("exact_match", "f1")}


@dataclass
class EvalSettings:
    num_fewshot: int = 0
    seed: int = 1234  # few-shot draws and (temperature > 0) sampling streams
    batch_size: int = 16
    max_new_tokens: int = 32  # generative tasks
    temperature: float = 0.0  # generative tasks; 0 = greedy
    quality_title: bool = True  # closed-book QuALITY prompts show the article title
    quality_answer: str = "text"  # "text" scores option texts, "letter" lists options and scores A/B/C/D
    start_token: bool = True  # contexts start with BOS (or EOD when there is no BOS)
    document_masking: bool = True  # perplexity: attend within documents, as in training
    chat: bool = False  # prompts are a user turn in the tokenizer's chat template (run_task gets the template)


def all_reduce_sums(values: list[float]) -> list[float]:
    """Element-wise sums over ranks, in float64 (counts stay exact)."""
    if not is_distributed():
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather_records(records: list[dict]) -> list[dict] | None:
    """Every rank's records on rank 0, in example order (None on other ranks)."""
    everything = all_gather_object(records)
    if rank_and_world()[0] != 0:
        return None
    return sorted((r for part in everything for r in part), key=lambda r: r["index"])


def task_config(task: Task, settings: EvalSettings, template=None) -> dict:
    """The settings that affect this task's numbers (recorded beside its metrics)."""
    config = {"num_fewshot": settings.num_fewshot, "seed": settings.seed,
              "start_token": settings.start_token and template is None}
    if template is not None:
        config["chat_template"] = {"name": template.name, "sha256": template.sha256}
    if task.type == "generative":
        config.update(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature)
    if task.type == "quality":
        config.update(title=settings.quality_title, answer_format=settings.quality_answer)
    return config


def run_task(model, tokenizer, task: Task, settings: EvalSettings, template=None) -> tuple[dict, list[dict] | None]:
    """({"type", "file", "n", "metrics", "config"}, per-example records on rank 0 / None elsewhere). template:
    the megasynth.chat.ChatTemplate prompts are wrapped in (settings.chat), or None."""
    if settings.chat and template is None:
        raise ValueError("settings.chat needs the chat template (megasynth.chat.load_chat_template(tokenizer))")
    rank, world = rank_and_world()
    indices = list(range(rank, len(task.examples), world))
    # A chat template writes its own opening tokens (as generate.py --chat).
    start_ids = default_start_ids(tokenizer) if settings.start_token and template is None else []
    common = dict(fewshot_pool=task.fewshot, num_fewshot=settings.num_fewshot, seed=settings.seed,
                  batch_size=settings.batch_size, start_ids=start_ids, template=template)
    if task.type == "generative":
        records = evaluate_generative(model, tokenizer, task.examples, indices, max_new_tokens=settings.max_new_tokens,
                                      temperature=settings.temperature, **common)
    else:
        options = PromptOptions(quality_title=settings.quality_title, quality_answer=settings.quality_answer)
        records = evaluate_multiple_choice(model, tokenizer, task.examples, indices, options=options, **common)
    names = METRICS[task.type]
    sums = all_reduce_sums([sum(r[m] for r in records) for m in names] + [float(len(records))])
    n = sums[-1]
    result = {"type": task.type, "file": task.path, "n": int(n),
              "metrics": {m: s / n for m, s in zip(names, sums)}, "config": task_config(task, settings, template)}
    return result, gather_records(records)


def run_perplexity(model, prefix: str, settings: EvalSettings, *, seq_len: int,
                   num_windows: int | None = None) -> dict:
    """{"type": "perplexity", "file", "n" (predicted tokens), "metrics": {"loss", "ppl"}, "windows", "config"}."""
    rank, world = rank_and_world()
    ds = IndexedDataset(prefix)
    sums = perplexity_sums(model, ds, seq_len=seq_len, num_windows=num_windows, batch_size=settings.batch_size,
                           document_masking=settings.document_masking, rank=rank, world_size=world)
    keys = ("nll", "tokens", "windows")
    reduced = dict(zip(keys, all_reduce_sums([sums[k] for k in keys])))
    m = perplexity_metrics(reduced)
    return {"type": "perplexity", "file": prefix, "n": m["tokens"], "windows": m["windows"],
            "metrics": {"loss": m["loss"], "ppl": m["ppl"]},
            "config": {"seq_len": seq_len, "num_windows": num_windows, "document_masking": settings.document_masking}}
