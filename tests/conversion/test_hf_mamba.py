"""Mamba models <-> Hugging Face ``MambaForCausalLM`` (configs built here, nothing downloaded):
logits both ways, an exact round trip, a tensor-parallel import, and the refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conversion_helpers import (  # noqa: E402
    config_from_values,
    hf_logits,
    hf_tokenizer,
    load_hf,
    neox_logits,
    perturb,
    random_tokens,
    tokenizer_size,
    train_tokenizer,
)

from megatron.conversion import hf_to_neox, neox_to_hf  # noqa: E402
from megatron.conversion.hf_mapping import ConversionError, export_architecture  # noqa: E402

TOLERANCE = 1e-4
MAMBA = {"attention_config": [[["mamba"], 2]], "norm": "rmsnorm", "pos_emb": "none",
         "rms_norm_epsilon": 1e-5}


@pytest.fixture(scope="module")
def hf_mamba(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("hf_mamba")
    tok_json = train_tokenizer(root / "tok")
    n = tokenizer_size(tok_json)
    vocab = -(-n // 64) * 64
    config = transformers.MambaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                                      state_size=16, expand=2, conv_kernel=4,
                                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(config)
    perturb(model, 1)
    hf_dir = root / "hf"
    model.save_pretrained(str(hf_dir))
    hf_tokenizer(tok_json).save_pretrained(str(hf_dir))
    return {"dir": hf_dir, "root": root, "n_tokens": n}


def test_hf_to_neox_logits_and_exact_round_trip(hf_mamba):
    out = hf_mamba["root"] / "neox"
    hf_to_neox.convert(str(hf_mamba["dir"]), str(out))
    tokens = random_tokens(hf_mamba["n_tokens"], seq=24)
    theirs = hf_logits(hf_mamba["dir"], tokens)
    ours = neox_logits(out, [out / "neox_config.yml"], tokens)[..., :theirs.shape[-1]]
    diff = (ours - theirs).abs().max().item()
    print(f"\nHF -> neox mamba: max |dlogit| {diff:.3g}")
    assert theirs.abs().max() > 1.0 and diff < TOLERANCE
    back = hf_mamba["root"] / "back"
    neox_to_hf.convert(str(out), str(back), "mamba", "fp32", [str(out / "neox_config.yml")])
    original, returned = load_hf(hf_mamba["dir"]), load_hf(back)
    assert type(returned) is type(original)
    a, b = original.state_dict(), returned.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for field in ("hidden_size", "state_size", "expand", "conv_kernel", "time_step_rank",
                  "layer_norm_epsilon", "use_conv_bias", "use_bias", "tie_word_embeddings"):
        assert getattr(original.config, field) == getattr(returned.config, field), field


def test_tensor_parallel_import_gives_the_same_logits(hf_mamba):
    out = hf_mamba["root"] / "neox_tp2"
    hf_to_neox.convert(str(hf_mamba["dir"]), str(out), tp=2)
    tokens = random_tokens(hf_mamba["n_tokens"], seq=16, seed=3)
    theirs = hf_logits(hf_mamba["dir"], tokens)
    ours = neox_logits(out, [out / "neox_config.yml"], tokens)[..., :theirs.shape[-1]]
    assert (ours - theirs).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("tied", [True, False])
def test_neox_to_hf_logits_match(tmp_path, tied):
    from megatron.checkpoint.weights import write_checkpoint
    from megatron.model import GPTModel
    from megatron.parallel import ParallelState

    cfg = config_from_values(**MAMBA, hidden_size=48, no_weight_tying=not tied,
                             expansion_factor=3, mamba_use_bias_in_conv=tied)
    torch.manual_seed(0)
    model = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                     state=ParallelState.single())
    perturb(model, 1, scale=0.3)
    write_checkpoint(tmp_path / "ck", model.state_dict(), cfg.model,
                     config_yaml=cfg.merged.to_yaml())
    neox_to_hf.convert(str(tmp_path / "ck"), str(tmp_path / "hf"), "mamba")
    assert type(load_hf(tmp_path / "hf")).__name__ == "MambaForCausalLM"
    tokens = random_tokens(256, seq=20)
    with torch.no_grad():
        ours = model.eval()(tokens).float()
    diff = (ours - hf_logits(tmp_path / "hf", tokens)).abs().max().item()
    print(f"\nneox -> HF mamba (tied={tied}): max |dlogit| {diff:.3g}")
    assert ours.abs().max() > 1.0 and diff < TOLERANCE


@pytest.mark.parametrize("values, message", [
    ({**MAMBA, "attention_config": [[["mamba", "global"], 2]]},
     "attention_config: MambaForCausalLM has a Mamba block in every layer"),
    ({**MAMBA, "norm": "layernorm"}, "norm: MambaForCausalLM uses RMSNorm"),
    ({**MAMBA, "pos_emb": "learned"}, "pos_emb: MambaForCausalLM has no position embedding"),
    ({**MAMBA, "mamba_use_bias_in_linears": True}, "mamba_use_bias_in_linears"),
    ({**MAMBA, "expansion_factor": 1.5}, "expansion_factor: MambaForCausalLM's expand"),
])  # fmt: skip
def test_export_refuses_what_mamba_cannot_express(values, message):
    with pytest.raises(ConversionError, match=message):
        export_architecture(config_from_values(**values).model, "mamba")
