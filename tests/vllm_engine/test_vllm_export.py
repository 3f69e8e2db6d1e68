"""Export fidelity against the real engine (issue 20, item 4): a checkpoint trained here and exported with
tools/export_hf.py serves in vLLM as it samples in megasynth.

- base model: greedy continuations (temperature 0) of token-id prompts from /v1/completions agree token for token
  with megasynth.generate (fp32, CPU), EOS included, with the same finish (EOS or length) and the same text;
- SFT'd model: /v1/chat/completions formats the conversation with our chat template (the prompt ids vLLM reports
  are what megasynth.chat renders and our tokenizer encodes), and its greedy answer is ours; it stops at the
  template's end-of-turn token as `tools/generate.py --chat` does.

vLLM runs `--dtype float32 --enforce-eager` (tests/vllm_engine/vllm_server.py): its CPU attention and matmuls sum in
other orders than ours, so logits differ by rounding (~1e-6); the models are trained until they have memorised
their text, so greedy choices have margins far above that (the test reports the margin where it fails).
"""

from __future__ import annotations

import json

import pytest
import torch

from megasynth.chat import load_chat_template
from megasynth.generate import generate, load_model_and_tokenizer

MAX_NEW = 24


@pytest.fixture(scope="module")
def base(vllm_models):
    model, _, tok, _ = load_model_and_tokenizer(vllm_models.base)
    return model, tok


def _prompts(tok) -> list[list[int]]:
    """Token-id prompts: starts of the memorised sentences, mid-sentence cuts, one token, text it never saw."""
    texts = ["The quick", "A list keeps", "Dictionaries map", "The", "Strings are", "A generator yields",
             "Exceptions propagate up the", "Sorting is", "The os module talks to", "hello world, said nobody"]
    prompts = [tok.encode(t) for t in texts]
    return [*prompts, [tok.encode("A")[0]]]


def _margin(model, ids: list[int]) -> float:
    """Top-1 minus top-2 logit of our model after `ids` (how decided the greedy choice there is)."""
    with torch.no_grad():
        top = model(torch.tensor([ids]))[0, -1].topk(2).values
    return float(top[0] - top[1])


def _first_difference(model, prompt, ours, theirs) -> str:
    n = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return (f"prompt {prompt}: ours {ours}, vLLM {theirs}; first difference at new token {n} "
            f"(our top-1 minus top-2 logit there: {_margin(model, [*prompt, *ours[:n]]):.3g})")


def test_greedy_completions_match_megasynth_generate(base, vllm_base_server):
    model, tok = base
    prompts = _prompts(tok)
    ours = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=0, eod_id=tok.eod_id)
    # The model writes varied text: not one continuation repeated, not one token everywhere.
    assert len({tuple(o) for o in ours}) >= len(prompts) - 2 and len({t for o in ours for t in o}) > 30, ours
    reply = vllm_base_server.post("/v1/completions", {
        "prompt": prompts, "max_tokens": MAX_NEW, "temperature": 0, "return_token_ids": True,
    })
    choices = sorted(reply["choices"], key=lambda c: c["index"])
    assert len(choices) == len(prompts)
    problems = []
    for prompt, mine, choice in zip(prompts, ours, choices):
        assert choice["prompt_token_ids"] == prompt  # token-id prompts are taken as they are (no BOS added)
        if choice["token_ids"] != mine:
            problems.append(_first_difference(model, prompt, mine, choice["token_ids"]))
            continue
        stopped = mine[-1] == tok.eod_id
        assert choice["finish_reason"] == ("stop" if stopped else "length"), (prompt, choice)
        assert choice["text"] == tok.decode(mine[:-1] if stopped else mine), (prompt, choice)
    assert not problems, "\n".join(problems)
    assert any(o[-1] == tok.eod_id for o in ours) and any(o[-1] != tok.eod_id for o in ours)  # both finishes seen


CONVERSATIONS = [
    [{"role": "user", "content": "What does a list keep?"}],
    [{"role": "user", "content": "What are tuples?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Is sorting stable?"}],
    [{"role": "user", "content": "What is json for?"}, {"role": "assistant", "content": "The json module."},
     {"role": "user", "content": "What is a class?"}],
]


def _chat(server, messages) -> dict:
    return server.post("/v1/chat/completions", {"messages": messages, "max_tokens": MAX_NEW, "temperature": 0,
                                                "return_token_ids": True, "skip_special_tokens": False})


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_chat_completions_use_our_template_and_answer_as_we_do(vllm_models, vllm_sft_server, index):
    messages = CONVERSATIONS[index]
    model, _, tok, _ = load_model_and_tokenizer(vllm_models.sft)
    template = load_chat_template(tok)
    prompt = tok.encode(template.render(messages, add_generation_prompt=True))
    reply = _chat(vllm_sft_server, messages)
    assert reply["prompt_token_ids"] == prompt, (tok.decode(reply["prompt_token_ids"]), tok.decode(prompt))
    # tools/generate.py --chat stops at the template's end-of-turn token (<|im_end|>) or EOD, whichever comes first.
    ours = generate(model, [prompt], max_new_tokens=MAX_NEW, temperature=0, eod_id=tok.eod_id,
                    stop_ids=[template.end_of_turn_id])[0]
    theirs = reply["choices"][0]["token_ids"]
    assert theirs[:len(ours)] == ours, _first_difference(model, prompt, ours, theirs)


def test_chat_completions_stop_at_the_end_of_turn(vllm_models, vllm_sft_server):
    """An exported chat model must end its turn where our sampler does (tools/generate.py --chat, and what SFT
    trained it to do): at the template's end-of-turn token <|im_end|>. vLLM knows its stop tokens only from the
    export (eos_token_id of config.json / generation_config.json). A logit bias makes <|im_end|> the model's
    first choice whatever its weights, so the answer is that one token if vLLM stops there, and <|im_end|>
    repeated to max_tokens if it does not."""
    _, _, tok, _ = load_model_and_tokenizer(vllm_models.sft)
    end_of_turn = load_chat_template(tok).end_of_turn_id
    assert end_of_turn is not None and end_of_turn != tok.eod_id
    reply = vllm_sft_server.post("/v1/chat/completions", {
        "messages": CONVERSATIONS[0], "max_tokens": 4, "temperature": 0, "return_token_ids": True,
        "skip_special_tokens": False, "logit_bias": {str(end_of_turn): 100}})
    choice = reply["choices"][0]
    assert choice["token_ids"] == [end_of_turn] and choice["finish_reason"] == "stop", (
        f"vLLM did not stop at the end of turn {end_of_turn} (<|im_end|>): it generated {choice['token_ids']} "
        f"({choice['finish_reason']}); the export's eos_token_id is "
        f"{json.loads((vllm_models.hf_sft / 'generation_config.json').read_text())['eos_token_id']}")
