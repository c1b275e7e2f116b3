from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent


def _reqs(name: str) -> list[str]:
    lines = (here / "requirements" / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


setup(
    name="megatron-neox",
    version="0.1.0",
    description="Megatron-style GPT pretraining with GPT-NeoX configs, DeepSpeed, TP/PP/ZeRO",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron", "megatron.*"]),
    py_modules=["deepy"],
    install_requires=_reqs("requirements.txt"),
    extras_require={
        "dev": _reqs("requirements-dev.txt"),
        "wandb": _reqs("requirements-wandb.txt"),
        "eval": _reqs("requirements-eval.txt"),
        "mpi": _reqs("requirements-mpi.txt"),
    },
)
