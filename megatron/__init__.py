"""A Megatron-style GPT pretraining framework driven by GPT-NeoX configuration files.

Importing the package is cheap (no torch): DeepSpeed picks its accelerator from
``DS_ACCELERATOR``, which :func:`megatron.accelerator.ensure_accelerator_env` sets. That
choice needs torch, so it is made the moment DeepSpeed is first imported (an import hook
installed here), or right away when DeepSpeed is already loaded. Tools that never touch
DeepSpeed -- the data preprocessing, for one -- start without importing torch at all.
"""

import sys

__version__ = "0.1.0"


class _AcceleratorBeforeDeepSpeed:
    """A ``sys.meta_path`` finder that runs ``ensure_accelerator_env`` just before the first
    ``import deepspeed`` and then steps aside (it never finds a module itself)."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001
        if fullname == "deepspeed":
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            from megatron.accelerator import ensure_accelerator_env

            ensure_accelerator_env()
        return None  # the regular finders load the module


if "deepspeed" in sys.modules:
    from megatron.accelerator import ensure_accelerator_env

    ensure_accelerator_env()
elif not any(isinstance(f, _AcceleratorBeforeDeepSpeed) for f in sys.meta_path):
    sys.meta_path.insert(0, _AcceleratorBeforeDeepSpeed())
