"""The repository root must never hide a dependency: Python started there (`python -m pytest`, a REPL, a notebook,
`python -c`) puts the root first on sys.path, and our top-level `kernels/` folder shares its name with Hugging
Face's `kernels` package, which transformers imports."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# `-c` puts '' (the working directory) first on sys.path; the script also inserts the root explicitly, so the
# test means the same under any runner.
_IMPORTS = """
import sys
sys.path.insert(0, {root!r})
import kernels
from transformers import Qwen3Config, Qwen3ForCausalLM
import sentence_transformers
import megasynth.kernels as mk
model = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16))
print("kernels from", kernels.__file__)
print("ours", mk.rms_norm.__module__, mk.__path__[-1])
"""


def test_root_first_on_sys_path_imports_transformers_and_sentence_transformers():
    proc = subprocess.run([sys.executable, "-c", _IMPORTS.format(root=str(ROOT))], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels_line = next(line for line in proc.stdout.splitlines() if line.startswith("kernels from"))
    # Hugging Face's package (a regular package in site-packages), never our folder.
    assert str(ROOT / "kernels") not in kernels_line, kernels_line
    assert "megasynth.kernels.rms_norm" in proc.stdout


def test_top_level_kernels_folder_is_no_regular_package():
    # What makes the test above hold on every machine: a folder without __init__.py is at most a namespace
    # portion, which loses to a regular package anywhere on sys.path.
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "megasynth" / "kernels" / "__init__.py").is_file()
