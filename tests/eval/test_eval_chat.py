"""eval --chat: task prompts become one user turn of the chat template with its generation prompt (the text
written out here independently of megasynth.chat), scored against a plain forward; without a template nothing
changes."""

import numpy as np
import pytest
import torch

from megasynth.chat import IM_END, IM_START, TRAINING_SPECIAL_TOKENS, load_chat_template
from megasynth.config import ModelConfig
from megasynth.eval.generative import prompt_text
from megasynth.eval.harness import EvalSettings, run_task
from megasynth.eval.multiple_choice import (
    PromptOptions,
    context_text,
    evaluate_multiple_choice,
)
from megasynth.eval.tasks import GenerativeExample, MultipleChoiceExample, Task
from megasynth.model import build_model
from megasynth.tokenizer import train_bpe_tokenizer

TEXT = ["Question: What is the capital of France?\nAnswer: Paris", "Question: What is two plus three?\nAnswer: five"]
MC = [MultipleChoiceExample("a", 1, "Question: What is the capital of France?\nAnswer:", ["Paris", "Rome"], 0),
      MultipleChoiceExample("b", 2, "Question: What is the capital of Italy?\nAnswer:", ["Paris", "Rome"], 1)]
GEN = [GenerativeExample("g", 1, "Question: What is two plus three?\nAnswer:", ["five", "5"]),
       GenerativeExample("h", 2, "Question: What is ten minus four?\nAnswer:", ["six", "6"])]


def chatml_user(text):
    return f"{IM_START}user\n{text}{IM_END}\n{IM_START}assistant\n"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_bpe_tokenizer(TEXT * 20, tmp_path_factory.mktemp("tok"), vocab_size=320,
                               special_tokens=list(TRAINING_SPECIAL_TOKENS))


@pytest.fixture(scope="module")
def model(tok):
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=48,
                      max_seq_len=128, rope_theta=10000.0, init_std=0.3)
    return build_model(cfg, "cpu", seed=0).eval()


def test_prompts_are_a_user_turn_of_the_template_and_unchanged_without_one(tok):
    template = load_chat_template(tok)
    plain, choices, gold, delimiter = context_text(MC[1], PromptOptions(), fewshot_pool=MC[:1], num_fewshot=1, index=1)
    assert plain == MC[0].context + " Paris\n\n" + MC[1].context and delimiter == " "  # the non-chat prompt
    chat, choices2, gold2, delimiter2 = context_text(MC[1], PromptOptions(), fewshot_pool=MC[:1], num_fewshot=1,
                                                     index=1, template=template)
    assert chat == chatml_user(plain) == template.render([{"role": "user", "content": plain}],
                                                         add_generation_prompt=True)
    assert (choices2, gold2, delimiter2) == (choices, gold, "")
    plain = prompt_text(GEN, 1, fewshot_pool=GEN[:1], num_fewshot=1)
    assert plain == GEN[0].prompt + " five\n\n" + GEN[1].prompt
    assert prompt_text(GEN, 1, fewshot_pool=GEN[:1], num_fewshot=1, template=template) == chatml_user(plain)


def loglik_ref(model, ctx, cont) -> float:
    seq = torch.tensor([list(ctx) + list(cont)])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq)[0].double(), dim=-1)
    return sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(cont))


def test_chat_scores_choices_after_the_assistant_header(tok, model):
    template = load_chat_template(tok)
    records = evaluate_multiple_choice(model, tok, MC, [0, 1], template=template)
    for record, ex in zip(records, MC):
        ctx = tok.encode(chatml_user(ex.context))  # no start token: the template opens the text
        want = [loglik_ref(model, ctx, tok.encode(choice)) for choice in ex.choices]
        np.testing.assert_allclose(record["logliks"], want, atol=1e-4)
    task = Task(name="mc", path="mc.jsonl", type="multiple_choice", examples=MC)
    result, _ = run_task(model, tok, task, EvalSettings(chat=True), template)
    assert result["config"]["chat_template"] == {"name": template.name, "sha256": template.sha256}
    assert result["config"]["start_token"] is False
    with pytest.raises(ValueError, match="needs the chat template"):
        run_task(model, tok, task, EvalSettings(chat=True))
