#!/usr/bin/env bash
# Synthetic bootstrapped pretraining end to end, in one command: corpus -> tokenizer -> prefixes -> base model
# -> embeddings -> pairs -> pair dataset -> synthesizer -> synthetic data -> quality -> compute-matched
# baseline / SBP / oracle runs -> runs/sbp/report.md. Every stage is the project's own command-line tool,
# printed before it runs (examples/sbp/pipeline.py is the driver; see its --help).
#
#   bash examples/sbp/run.sh --quick          # about 10 minutes on 2 CPU cores
#   bash examples/sbp/run.sh --tiny           # seconds of compute per stage: the test suite's check
#   bash examples/sbp/run.sh --out DIR ...    # somewhere other than runs/sbp
#
# Uses the repository's .venv when there is one, else $PYTHON, else python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [[ -n "${PYTHON:-}" ]]; then py="$PYTHON"; elif [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
exec "$py" examples/sbp/pipeline.py "$@"
