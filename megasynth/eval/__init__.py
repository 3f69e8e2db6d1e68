"""Evaluation: task files (tasks.py), log-likelihood scoring (loglik.py), multiple choice and closed-book
QuALITY (multiple_choice.py), generative QA (generative.py), perplexity (perplexity.py), the data-parallel
runner (harness.py) and the report files (report.py). Command line: tools/eval.py; schemas: docs/eval.md.
"""
