"""eval.py: evaluate the checkpoint named by ``load`` with the lm-evaluation-harness.

Keys: ``eval_tasks`` (task names, required), ``eval_num_fewshot``, ``eval_limit``,
``eval_batch_size`` (default ``train_micro_batch_size_per_gpu``), ``eval_include_path`` (a
directory of extra task YAMLs for ``lm_eval.tasks.TaskManager``; when it defines every task
asked for, lm_eval's built-in tasks are not indexed) and ``eval_results_prefix``:
rank 0 writes ``<eval_results_prefix>_results.json`` (``eval_results.json`` when the prefix is
empty) and prints the results table. Every rank runs the evaluation (see
:mod:`megatron.evaluation.adapter`); ``seed`` seeds sampling and lm_eval's few-shot draws.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Any

import torch.distributed as dist

from megatron.neox_arguments import ConfigError, NeoXConfig


def results_path(cfg: NeoXConfig) -> Path:
    prefix = cfg.textgen.eval_results_prefix
    return Path(f"{prefix}_results.json" if prefix else "eval_results.json")


def task_manager(tasks: list[str], include: str | None) -> Any:
    """An ``lm_eval`` TaskManager knowing ``tasks``: only ``include``'s task YAMLs when they
    define every one of them (indexing lm_eval's thousands of built-in tasks takes a while),
    otherwise the built-in tasks and ``include``'s."""
    from lm_eval.tasks import TaskManager

    if include:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(t in set(local.all_tasks) for t in tasks):
            return local
    manager = TaskManager(include_path=include) if include else TaskManager()
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown:
        raise ConfigError(f"eval_tasks: unknown task {unknown[0]!r} (not among lm_eval's tasks"
                          f"{' or those in ' + include if include else ''})")
    return manager


def eval_batch_size(cfg: NeoXConfig) -> int:
    """``eval_batch_size``, else the training micro batch, else 1."""
    return cfg.textgen.eval_batch_size or cfg.training.train_micro_batch_size_per_gpu or 1


def run_tasks(adapter: Any, cfg: NeoXConfig) -> dict[str, Any] | None:
    """``lm_eval.simple_evaluate`` over ``eval_tasks`` with this run's settings (None on the
    ranks where lm_eval reports nothing: those with ``LOCAL_RANK`` other than 0)."""
    from lm_eval import simple_evaluate

    tg = cfg.textgen
    if not tg.eval_tasks:
        raise ConfigError("eval_tasks: no tasks given (e.g. --eval_tasks lambada_openai)")
    include = tg.eval_include_path
    if include is not None and not Path(include).is_dir():
        raise ConfigError(f"eval_include_path: {include} is not a directory")
    manager = task_manager(list(tg.eval_tasks), include)
    seed = cfg.training.seed
    results = simple_evaluate(
        model=adapter, tasks=list(tg.eval_tasks), num_fewshot=tg.eval_num_fewshot,
        limit=tg.eval_limit, task_manager=manager, bootstrap_iters=0, log_samples=False,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed,
    )  # fmt: skip
    return dict(results) if results is not None else None


def write_results(results: dict[str, Any], path: Path) -> None:
    from lm_eval.utils import handle_non_serializable

    keep = {k: results[k] for k in ("results", "versions", "n-shot", "higher_is_better",
                                    "n-samples", "config", "group_subtasks") if k in results}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(keep, indent=2, default=handle_non_serializable))


def main(argv: list[str] | None = None, *, stdout: IO[str] | None = None) -> int:
    """eval.py: start up, load the checkpoint, run the tasks, write and print the results."""
    from megatron.evaluation.adapter import NeoXEvalAdapter
    from megatron.runtime import start
    from megatron.text_generation.generation import TokenGenerator
    from megatron.text_generation.model_setup import load_inference_model

    rt = start(argv, purpose="eval")
    cfg, tokenizer = rt.cfg, rt.tokenizer
    out = stdout or sys.stdout
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    log = (lambda msg: print(msg, file=out, flush=True)) if rank0 else (lambda msg: None)
    model = load_inference_model(cfg, rt.state, rt.device, tracker=rt.tracker, log=log)
    generator = TokenGenerator(model, rt.state, eod=tokenizer.eod,
                               vocab_size=tokenizer.vocab_size, seed=cfg.training.seed)
    adapter = NeoXEvalAdapter(generator, tokenizer, batch_size=eval_batch_size(cfg))
    results = run_tasks(adapter, cfg)
    if rank0:
        if results is None:
            raise RuntimeError("lm_eval returned no results on rank 0")
        from lm_eval.utils import make_table

        path = results_path(cfg)
        write_results(results, path)
        print(make_table(results), file=out, flush=True)
        print(f"wrote {path}", file=out, flush=True)
    return 0
