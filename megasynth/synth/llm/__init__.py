"""The LLM side of the synthetic pipelines: one async client for any OpenAI-compatible endpoint (client.py:
limits, retries, JSON replies, ledger, budget), its settings and flags (settings.py), versioned prompt files
(prompts/), and the runner that every LLM method (EntiGraph, rephrase) is built on (runner.py)."""

from megasynth.synth.llm.client import (
    DETAIL_CHARS, Batch, BudgetExceeded, LLMBackend, LLMClient, LLMRequest, LLMResult, LLMSettings, LedgerError,
    Usage, add_llm_arguments, repair_message, settings_from_args,
)

__all__ = ["DETAIL_CHARS", "Batch", "BudgetExceeded", "LLMBackend", "LLMClient", "LLMRequest", "LLMResult",
           "LLMSettings", "LedgerError", "Usage", "add_llm_arguments", "repair_message", "settings_from_args"]
