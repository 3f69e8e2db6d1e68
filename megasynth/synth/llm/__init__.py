"""The LLM side of the synthetic pipelines: one async client for any OpenAI-compatible endpoint (client.py:
limits, retries, JSON replies, ledger, budget), its settings and flags (settings.py), versioned prompt files
(prompts/), and the runner that every LLM method (EntiGraph, rephrase) is built on (runner.py)."""

from megasynth.synth.llm.batch import Batch
from megasynth.synth.llm.client import LLMClient
from megasynth.synth.llm.ledger import LedgerError
from megasynth.synth.llm.settings import LLMSettings, add_llm_arguments, settings_from_args
from megasynth.synth.llm.types import BudgetExceeded, LLMRequest, LLMResult, Usage

__all__ = ["Batch", "BudgetExceeded", "LLMClient", "LLMRequest", "LLMResult", "LLMSettings", "LedgerError", "Usage",
           "add_llm_arguments", "settings_from_args"]
