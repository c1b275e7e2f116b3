"""Checks of the keys that reach an outside package or service: Comet logging, the upload of
checkpoints to S3 and bitsandbytes' 8-bit Adam. Each missing package or impossible value is a
one-line error before any rank starts (``deepy.py --dry-run`` included)."""

from __future__ import annotations

import importlib.util
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron.neox_arguments.config import NeoXConfig
    from megatron.neox_arguments.resolve import Locator

S3_MIN_PART = 5 * 1024 * 1024  # S3 refuses smaller parts (all but the last)
S3_MAX_PART = 5 * 1024 * 1024 * 1024


def importable(module: str) -> bool:
    """Whether ``import module`` would find the package (without importing it)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def s3_bucket_and_prefix(path: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``; ValueError otherwise."""
    if not path.startswith("s3://") or not path[5:].split("/", 1)[0]:
        raise ValueError(f"{path!r} is not an s3://bucket[/prefix] path")
    bucket, _, prefix = path[5:].partition("/")
    return bucket, prefix.strip("/")


def check_services(cfg: NeoXConfig, loc: Locator) -> None:
    lg, ck, opt = cfg.logging, cfg.checkpoint, cfg.optim
    if lg.use_comet and not importable("comet_ml"):
        raise loc.error("use_comet", message="needs the comet_ml package (pip install comet_ml)")
    if ck.s3_path is not None:
        try:
            s3_bucket_and_prefix(ck.s3_path)
        except ValueError as exc:
            raise loc.error("s3_path", message=str(exc)) from None
        if not ck.save:
            raise loc.error("s3_path", "save", message="uploads saved checkpoints: set save")
        if not importable("boto3"):
            raise loc.error("s3_path", message="needs the boto3 package (pip install boto3)")
    if not S3_MIN_PART <= ck.s3_chunk_size <= S3_MAX_PART:
        raise loc.error("s3_chunk_size", message=(
            f"{ck.s3_chunk_size} bytes: S3 takes parts of 5 MiB ({S3_MIN_PART}) to 5 GiB"))
    if opt.use_bnb_optimizer:
        if opt.optimizer_type not in ("Adam", "AdamW"):
            raise loc.error("use_bnb_optimizer", "optimizer", message=(
                "selects bitsandbytes' 8-bit Adam, for optimizer.type Adam or AdamW, not "
                f"{opt.optimizer_type}"))
        if cfg.model.pos_emb == "learned":
            raise loc.error("use_bnb_optimizer", "pos_emb", message=(
                "with learned position embeddings GPT-NeoX also swaps them for bitsandbytes' "
                "StableEmbedding (a LayerNorm after the table), which is not provided; use "
                "another pos_emb (rotary, alibi, ...) with the 8-bit optimizer"))
        if not importable("bitsandbytes"):
            raise loc.error("use_bnb_optimizer", message=(
                "needs the bitsandbytes package (pip install bitsandbytes)"))
