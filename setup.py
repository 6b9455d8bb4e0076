"""Hangang: an open pretraining framework for Korean-centric foundation models."""

from setuptools import setup

setup(
    name="hangang",
    version="0.1.0",
    description="Pretrain Korean-centric LLMs on licensed data with DeepSpeed ZeRO, from one node to many",
    python_requires=">=3.10",
    packages=["model", "tokenizer", "data_pipeline", "train", "launch"],
    install_requires=[
        "torch>=2.4",
        # The DeepSpeed versions train/engine/deepspeed_compat.py's workarounds were checked on (see its canaries).
        "deepspeed>=0.19.8,<0.20",
        "sentencepiece>=0.2",
        "datasets>=3.0",
        "wandb>=0.18",
        "hydra-core>=1.3",
        "safetensors>=0.4",
        "numpy",
        "pyarrow",
        "tqdm",
        "matplotlib",
        "pyyaml",
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "hf": ["transformers>=4.45", "tokenizers>=0.20"],
        # Morpheme-aware pre-segmentation (tokenizer.pre_segment=kiwi) and Mistral's reference tokenizers.
        "tokenizer": ["kiwipiepy>=0.20", "mistral-common>=1.5"],
        # datasketch: the reference the tests hold our MinHash LSH banding to; import-linter: `make lint-imports`.
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.1",
            "hypothesis>=6",
            "ruff>=0.6",
            "kiwipiepy>=0.20",
            "datasketch>=2.0",
            "import-linter>=2.1",
            "ray>=2.9",  # the slow Ray tests of tests/data_pipeline/test_engine.py
        ],
        "eval": ["lm-eval>=0.4.5", "accelerate"],
        # data.engine=ray (python -m data_pipeline.prepare ... data.engine=ray, launch/ray_slurm.sbatch).
        "ray": ["ray>=2.9"],
        # data_pipeline.bench_datatrove: the comparison with datatrove's MinHash dedup (BENCHMARKS.md).
        "datatrove": ["datatrove>=0.4", "orjson"],
        "slurm": ["hydra-submitit-launcher>=1.2"],
    },
)
