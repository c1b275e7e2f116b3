"""End to end through deepy.py on two CPU ranks: a Hugging Face model converted to this
framework is finetuned by train.py (TP=2 plain layout, PP=2 pipeline layout) whose first loss is
the HF model's loss on the same batch; the trained checkpoints convert back to HF with the same
logits, and generate.py on TP=2 decodes the same greedy tokens as HF's ``generate``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conversion_helpers import (  # noqa: E402
    check_run,
    deepy,
    hf_logits,
    load_hf,
    neox_config,
    neox_logits,
    random_tokens,
    run_script,
    tiny_hf_model,
    tokenizer_size,
    train_tokenizer,
    write_dataset,
)

from megatron.conversion import hf_to_neox, neox_to_hf  # noqa: E402

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    tok = train_tokenizer(root / "tok")
    n = tokenizer_size(tok)
    prefix = write_dataset(root / "corpus", tok)
    return {"root": root, "tokenizer": tok, "n": n, "vocab": -(-n // 64) * 64,
            "data": prefix}


def training_config(work, name: str) -> Path:
    values = {
        "data_path": str(work["data"]), "split": "100,0,0", "seq_length": 32,
        "optimizer": {"type": "AdamW", "params": {"lr": 1.0e-3, "betas": [0.9, 0.95]}},
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "train_iters": 2, "lr_decay_style": "constant", "warmup": 0.0, "log_interval": 1,
        "do_valid": False, "do_test": False, "num_workers": 0, "seed": 1234, "finetune": True,
        "save": str(work["root"] / f"{name}_trained"), "log_dir": str(work["root"] / f"{name}_logs"),
        "hidden_dropout": 0.0, "attention_dropout": 0.0,
    }  # fmt: skip
    path = work["root"] / f"{name}_train.yml"
    path.write_text(yaml.safe_dump(values))
    return path


def logged_losses(log_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["lm_loss"] for r in records if r.get("type") == "train"}


@torch.no_grad()
def hf_first_batch_loss(hf_dir: Path, config_files: list[Path], n_tokens: int) -> float:
    """The HF model's loss on the first micro batch the trainer draws (same data pipeline)."""
    from megatron.parallel import ParallelState
    from megatron.training.data_setup import build_datasets, lm_batch, loader, sample_budget

    cfg = neox_config(config_files).with_vocab_size(n_tokens)
    train_set, _, _ = build_datasets(cfg, sample_budget(cfg))
    raw = next(iter(loader(train_set, cfg, ParallelState.single(), 0)))
    batch = lm_batch(raw, cfg, 0, torch.device("cpu"))
    logits = load_hf(hf_dir)(batch.tokens).logits.float()
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(),
                                               reduction="none")
    mask = batch.loss_mask.flatten().float()
    return float((losses * mask).sum() / mask.sum())


def _tp2_logits(rank, world, ckpt, config_files, tokens, n_tokens):
    from megatron.model import GPTModel, gather_logits
    from megatron.parallel import ParallelState, RankTopology
    from megatron.text_generation.model_setup import load_weights

    state = ParallelState.initialize(RankTopology(world, 2, 1), rank)
    cfg = neox_config(config_files).with_vocab_size(n_tokens)
    model = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                     state=state)
    load_weights(model, cfg, state, ckpt)
    with torch.no_grad():
        return gather_logits(model.eval()(tokens), state).float()


def test_llama_tp2_finetune_export_and_generate(work):
    from tests.distributed import run_distributed

    root = work["root"]
    hf_dir = tiny_hf_model("llama", root / "hf_llama", work["tokenizer"],
                           vocab_size=work["vocab"], num_key_value_heads=2)
    converted = root / "llama_tp2"
    check_run(run_script("tools/ckpts/convert_hf_to_neox.py", "--hf_dir", hf_dir,
                         "--output_dir", converted, "--tp", "2", "--pp", "0"))
    model_yml, train_yml = converted / "neox_config.yml", training_config(work, "llama")
    check_run(deepy("train.py", model_yml, train_yml, num_gpus=2))

    losses = logged_losses(root / "llama_logs")
    expected = hf_first_batch_loss(hf_dir, [model_yml, train_yml], work["n"])
    print(f"\nllama TP=2 first loss {losses[1]:.6f}, HF {expected:.6f}")
    assert losses[1] == pytest.approx(expected, abs=1e-4)
    assert math.isfinite(losses[2]) and losses[2] != losses[1]

    trained = root / "llama_trained"
    exported = root / "llama_exported"
    neox_to_hf.convert(str(trained), str(exported), "llama", "fp32")
    tokens = random_tokens(work["n"], seed=3)
    ours = run_distributed(_tp2_logits, 2, str(trained), [str(model_yml)], tokens, work["n"])
    theirs = hf_logits(exported, tokens)
    diff = (ours[0] - theirs).abs().max().item()
    print(f"llama TP=2 trained -> HF: max |dlogit| {diff:.3g}")
    assert diff < TOLERANCE
    assert not torch.allclose(theirs, hf_logits(hf_dir, tokens))  # training changed the model

    from megatron.tokenizer import build_tokenizer

    tok = build_tokenizer("HFTokenizer", vocab_file=str(work["tokenizer"]))
    prompts = ["def main():", "The class"]
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out_file = root / "generated.jsonl"
    check_run(deepy("generate.py", model_yml, "--load", trained, "--text_gen_type", "input-file",
                    "--sample_input_file", root / "prompts.txt", "--sample_output_file",
                    out_file, "--temperature", "0", "--maximum_tokens", "12", num_gpus=2))
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    hf = load_hf(exported)
    for prompt, record in zip(prompts, records, strict=True):
        ids = torch.tensor([tok.tokenize(prompt)])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=12, eos_token_id=tok.eod, pad_token_id=1,
                              suppress_tokens=list(range(work["n"], work["vocab"])))
        new = out[0, ids.shape[1]:].tolist()
        new = new[: new.index(tok.eod)] if tok.eod in new else new
        assert record["tokens"] == new and record["context"] == prompt
        assert record["text"] == tok.detokenize(new)


def test_neox_pp2_finetune_and_export(work):
    root = work["root"]
    hf_dir = tiny_hf_model("gpt_neox", root / "hf_neox", work["tokenizer"],
                           vocab_size=work["vocab"], seed=4, use_parallel_residual=True)
    converted = root / "neox_pp2"
    hf_to_neox.convert(str(hf_dir), str(converted), tp=1, pp=2)
    model_yml, train_yml = converted / "neox_config.yml", training_config(work, "neox")
    check_run(deepy("train.py", model_yml, train_yml, num_gpus=2))

    losses = logged_losses(root / "neox_logs")
    expected = hf_first_batch_loss(hf_dir, [model_yml, train_yml], work["n"])
    print(f"\nneox PP=2 first loss {losses[1]:.6f}, HF {expected:.6f}")
    assert losses[1] == pytest.approx(expected, abs=1e-4)
    assert math.isfinite(losses[2])

    trained = root / "neox_trained"
    assert any(p.name.startswith("layer_") for p in (trained / "global_step2").iterdir())
    exported = root / "neox_exported"
    out = check_run(run_script("tools/ckpts/convert_neox_to_hf.py", "--input_dir",
                               trained / "global_step2", "--output_dir", exported,
                               "--architecture", "neox"))
    assert "read pipeline checkpoint" in out and "GPTNeoXForCausalLM" in out
    tokens = random_tokens(work["n"], seed=8)
    ours = neox_logits(trained, [trained / "global_step2" / "configs" / "merged.yml"], tokens)
    diff = (ours - hf_logits(exported, tokens)).abs().max().item()
    print(f"neox PP=2 trained -> HF: max |dlogit| {diff:.3g}")
    assert diff < TOLERANCE
