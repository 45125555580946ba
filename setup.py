from setuptools import find_packages, setup

setup(
    name="longctx_megatron",
    version="0.1.0",
    description="Megatron-style training of long-context language models with heterogeneous attention",
    packages=find_packages(include=["longctx_megatron", "longctx_megatron.*"]),
    python_requires=">=3.10",
    # Pinned so that the CPU build installs on CPU machines; GPU users install the CUDA build of the
    # same version first (see README), which satisfies the pin.
    install_requires=["torch==2.13.0", "numpy", "pyyaml"],
    extras_require={
        "dev": [
            "pytest",
            "pytest-xdist",
            "pytest-timeout",
            "sentencepiece",
            "tensorboard",
            "transformers",
            "safetensors",
            "ruff",
            # Megatron-LM's own library, the oracle of the compatibility tests (its indexed-dataset
            # writer, split rule, ...). Its only hard requirements are torch, numpy and packaging.
            "megatron-core==0.16.1",
            # Weight-only int8 for inference (--quantize int8); it declares no requirements, so it
            # never pulls another torch.
            "torchao==0.18.0",
            # lm-evaluation-harness: the longctx model adapter (longctx_megatron/eval/lm_eval_adapter.py)
            # is tested against it offline; it needs torch but admits 2.13.
            "lm-eval==0.4.13",
            # RULER's synthetic tasks in lm-eval draw their keys from it (lm-eval's "ruler" extra).
            "wonderwords==3.0.1",
            # --tokenizer-type TikTokenizer is tested against megatron-core with it; optional at run
            # time (a clear error names it). It needs only regex and requests.
            "tiktoken==0.14.0",
            # --wandb-project is tested with it offline; optional at run time (a clear error names it).
            # It does not pull torch.
            "wandb==0.31.0",
        ],
        "gpu": ["flash-attn"],
    },
)
