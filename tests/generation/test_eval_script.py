"""eval.py through deepy.py on two tensor-parallel CPU ranks, with lm_eval tasks defined from
local JSONL files (nothing is downloaded). The results are recomputed here from the model's
logits directly."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation_helpers import REPO_ROOT, check_run, run_script, tiny_checkpoint  # noqa: E402

from megatron.tokenizer import build_tokenizer  # noqa: E402
from tests.distributed import free_port  # noqa: E402

MC = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "label": 0},
    {"question": "def add(a, b): return", "choices": ["a + b", "a - b"], "label": 0},
    {"question": "Fire is", "choices": ["cold", "hot"], "label": 1},
    {"question": "import", "choices": [" os", " sys", " re"], "label": 2},
]
DOCS = [{"text": "The quick brown fox jumps over the lazy dog."},
        {"text": "for i in range(10):\n    print(i)"}]

TASKS = {
    "tiny_mc.yaml": """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""",
    "tiny_ppl.yaml": """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/docs.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
""",
    "tiny_gen.yaml": """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/mc.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
""",
}


def write_tasks(root: Path) -> Path:
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC))
    (tasks / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, text in TASKS.items():
        (tasks / name).write_text(text.format(dir=tasks))
    return tasks


@torch.no_grad()
def logprob(model, context: str, continuation: str) -> float:
    tok = build_tokenizer("CharLevelTokenizer")
    ctx = tok.tokenize(context) or [0]
    cont = tok.tokenize(continuation)
    logprobs = torch.log_softmax(model(torch.tensor([ctx + cont[:-1]]))[0], dim=-1)
    return sum(float(logprobs[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


@pytest.mark.slow
def test_eval_script_runs_local_tasks_and_reports_the_models_numbers(tmp_path):
    config, _, model = tiny_checkpoint(tmp_path, tp=2, seed=4)
    tasks = write_tasks(tmp_path)
    prefix = tmp_path / "results" / "tiny"
    proc = run_script(
        REPO_ROOT / "deepy.py", REPO_ROOT / "eval.py", config, "--eval_tasks", "tiny_mc",
        "tiny_ppl", "tiny_gen", "--eval_include_path", tasks, "--eval_results_prefix", prefix,
        "--num_gpus", "2", "--master_port", str(free_port()), cwd=tmp_path,
        env={"HF_DATASETS_CACHE": str(tmp_path / "hf_cache")})
    stdout = check_run(proc)
    results = json.loads(Path(f"{prefix}_results.json").read_text())["results"]
    assert "|tiny_mc" in stdout and "bits_per_byte" in stdout

    correct = 0
    for doc in MC:
        scores = [logprob(model, doc["question"], " " + c) for c in doc["choices"]]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    assert results["tiny_mc"]["acc,none"] == pytest.approx(correct / len(MC))

    nll = -sum(logprob(model, "", d["text"]) for d in DOCS)
    n_bytes = sum(len(d["text"].encode()) for d in DOCS)
    assert results["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(
        nll / n_bytes / math.log(2), rel=1e-4)
    assert 0.0 <= results["tiny_gen"]["exact_match,none"] <= 1.0


def test_eval_errors_are_one_line(tmp_path):
    from generation_helpers import MODEL, resolved

    from megatron.evaluation.runner import run_tasks
    from megatron.neox_arguments import ConfigError

    config, _, _ = tiny_checkpoint(tmp_path)
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf_cache"), "MASTER_PORT": str(free_port())}
    proc = run_script(REPO_ROOT / "eval.py", config, cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "error (rank 0): eval_tasks: no tasks given (e.g. --eval_tasks lambada_openai)"
    cfg = resolved({**MODEL, "eval_tasks": ["a", "b"],
                    "eval_include_path": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="eval_include_path: .*nowhere is not a directory"):
        run_tasks(None, cfg)
