"""The quality table of SBP (megasynth.synth.sbp.quality) in Markdown: results.md and what tools/synth_quality.py
prints."""

from __future__ import annotations

METRICS = ("repetition", "duplicate", "non_factual", "pair_irrelevance", "pair_copying")
# Yang et al. 2025, the 200B-scale synthesizer's row of the quality table (shares of synthetic documents).
PAPER_ROW = {"repetition": 0.043, "duplicate": 0.008, "non_factual": 0.151, "pair_irrelevance": 0.256,
             "pair_copying": 0.001}


def _cell(metric: dict) -> str:
    if metric.get("status") == "n/a":
        return "n/a"
    if metric["share"] is None:
        return "— (0 judged)" if "failed" in metric else "—"
    text = f"{100 * metric['share']:.1f}% ({metric['count']}/{metric['n']})"
    text += f", {metric['failed']} failed" if metric.get("failed") else ""
    return text + (f", {metric['unanswered']} unanswered" if metric.get("unanswered") else "")


def render_table(results: dict) -> str:
    """The quality table in Markdown: this run, the real-pair reference and the paper's 200B-scale row."""
    n = results["settings"]["sample"]
    header = ["row", "documents", "repetition", f"duplicate@{min(n, results['rows']['synthetic']['documents'])}",
              "non-factual", "pair-irrelevance", "pair-copying"]
    labels = {"synthetic": "synthetic (this run)", "reference": "real neighbour pairs (reference)"}
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, row in results["rows"].items():
        lines.append("| " + " | ".join([labels.get(name, name), str(row["documents"])] +
                                       [_cell(row[m]) for m in METRICS]) + " |")
    paper = results["paper"]
    lines.append("| paper, 200B scale (Yang et al. 2025) | — | " +
                 " | ".join(f"{100 * paper[m]:.1f}%" + (" (@1M)" if m == "duplicate" else "") for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(results: dict) -> str:
    """results.md: the table, the definitions with this run's thresholds, and a note on each row."""
    s, rows = results["settings"], results["rows"]
    notes = [f"- {name}: {note}" for name, row in rows.items() for note in row["notes"]]
    cosines = ", ".join(f"{name} {row['pair_irrelevance']['mean_cosine']:.3f}" for name, row in rows.items()
                        if row["pair_irrelevance"]["mean_cosine"] is not None)
    syn, cor = results["synthetic"], results["corpus"]
    lines = [
        "# Synthetic data quality", "",
        (f"Synthetic prefix `{syn['prefix']}` ({syn['documents']} documents), corpus `{cor['prefix']}` "
         f"({cor['documents']} documents). Each cell is the share of the row's sampled documents that fail the "
         "test (count/n). Lower is better in every column."), "",
        render_table(results),
        "Definitions (docs/sbp.md; token n-grams are of token ids, the trailing EOD removed):", "",
        (f"- repetition: 1 - distinct/all token {s['repetition_n']}-grams of the document > "
         f"{s['repetition_threshold']}"),
        (f"- duplicate@N: another document of the same row's sample has token {s['duplicate_n']}-gram-set Jaccard "
         f">= {s['duplicate_threshold']} (MinHash LSH candidates, {s['num_perm']} permutations, confirmed exactly)"),
        (f"- non-factual: the LLM judge's verdict is non_factual (rate over verdicts received; failed requests and "
         f"malformed replies are counted apart; up to {s['judge_sample']} documents per row; n/a without a judge)"),
        (f"- pair-irrelevance: cosine(embedding(document), embedding(seed)) < {s['irrelevance_threshold']} "
         f"(`{results['embed_model']}`, first {s['embed_max_tokens']} tokens; mean cosine: {cosines})"),
        (f"- pair-copying: >= {s['copy_threshold']:.0%} of the document's distinct token {s['copy_n']}-grams occur "
         "in its seed"),
        "", "Rows:", "", *notes,
        ("- paper: Yang et al. 2025, Synthetic bootstrapped pretraining, the 200B-scale synthesizer; its "
         "definitions differ in detail (its duplicate rate is within 1M documents), so compare orders of "
         "magnitude, not decimals."), "",
    ]
    return "\n".join(lines)
