"""Hugging Face <-> this framework: logits, exact round trips, greedy generation, errors.

Tiny random ``transformers`` models of every supported shape (GQA, partial rotary, parallel
residual, tied and untied embeddings, biases on and off, a sliding window) go through
:mod:`megatron.conversion.hf_to_neox` at TP=1/TP=2 and the plain and pipeline layouts, and
back through :mod:`megatron.conversion.neox_to_hf`; the command lines in ``tools/ckpts/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conversion_helpers import (  # noqa: E402
    config_from_values,
    hf_logits,
    load_hf,
    neox_config,
    neox_logits,
    random_tokens,
    run_script,
    tiny_hf_model,
    tokenizer_size,
    train_tokenizer,
)

from megatron.checkpoint.weights import inspect_checkpoint  # noqa: E402
from megatron.conversion import hf_to_neox, neox_to_hf  # noqa: E402
from megatron.conversion.hf_mapping import ConversionError, export_architecture  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402

PARTIAL_HALF = {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}
CASES = {
    "neox_parallel_untied_bias": ("gpt_neox", dict(use_parallel_residual=True,
                                                   tie_word_embeddings=False)),
    "neox_sequential_tied_nobias": ("gpt_neox", dict(
        use_parallel_residual=False, tie_word_embeddings=True, attention_bias=False,
        hidden_act="gelu_new", rope_parameters=PARTIAL_HALF, layer_norm_eps=1e-3)),
    "llama_gqa_untied": ("llama", dict(num_key_value_heads=2)),
    "llama_mha_tied_bias": ("llama", dict(tie_word_embeddings=True, attention_bias=True,
                                          mlp_bias=True, rms_norm_eps=1e-3)),
    "mistral_gqa_window": ("mistral", dict(num_key_value_heads=2, sliding_window=8)),
}
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    tok_json = train_tokenizer(root / "tok")
    n = tokenizer_size(tok_json)
    vocab = -(-n // 64) * 64 + 64  # padding rows the tokenizer never produces
    dirs = {name: tiny_hf_model(kind, root / name, tok_json, vocab_size=vocab, seed=i, **kw)
            for i, (name, (kind, kw)) in enumerate(sorted(CASES.items()))}
    return {"dirs": dirs, "tokenizer": tok_json, "n_tokens": n, "vocab": vocab, "root": root}


def _to_neox(models, name: str, tp: int = 1, pp: int = 0) -> tuple[Path, Path]:
    out = models["root"] / f"neox_{name}_tp{tp}_pp{pp}"
    if not (out / "latest").is_file():
        hf_to_neox.convert(str(models["dirs"][name]), str(out), tp=tp, pp=pp)
    return out, out / "neox_config.yml"


@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_to_neox_logits_match(models, name):
    ckpt, config = _to_neox(models, name)
    tokens = random_tokens(models["n_tokens"])
    ours = neox_logits(ckpt, [config], tokens)
    theirs = hf_logits(models["dirs"][name], tokens)
    diff = (ours - theirs).abs().max().item()
    print(f"\n{name}: max |dlogit| {diff:.3g} (logits up to {theirs.abs().max():.3g})")
    assert theirs.abs().max() > 1.0  # not a degenerate model
    assert diff < TOLERANCE


ROUND_TRIPS = [("neox_parallel_untied_bias", 2, 0), ("neox_sequential_tied_nobias", 1, 2),
               ("llama_gqa_untied", 2, 2), ("llama_mha_tied_bias", 2, 0),
               ("mistral_gqa_window", 1, 0)]


@pytest.mark.parametrize("name,tp,pp", ROUND_TRIPS)
def test_round_trip_gives_identical_tensors(models, name, tp, pp):
    ckpt, config = _to_neox(models, name, tp, pp)
    info = inspect_checkpoint(ckpt)
    assert (info.layout, info.tp_size) == ("pipeline" if pp else "plain", tp)
    arch = {"gpt_neox": "neox", "llama": "llama", "mistral": "llama"}[CASES[name][0]]
    back = models["root"] / f"back_{name}"
    neox_to_hf.convert(str(ckpt), str(back), arch, "fp32", [str(config)])
    original, returned = load_hf(models["dirs"][name]), load_hf(back)
    assert type(returned) is type(original)
    a, b = original.state_dict(), returned.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for field in ("vocab_size", "tie_word_embeddings", "num_key_value_heads", "rope_parameters",
                  "layer_norm_eps", "rms_norm_eps", "use_parallel_residual", "sliding_window",
                  "attention_bias", "mlp_bias", "intermediate_size", "max_position_embeddings"):
        assert getattr(original.config, field, None) == getattr(returned.config, field, None), \
            field
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(back), local_files_only=True)
    from megatron.tokenizer import build_tokenizer

    ours = build_tokenizer("HFTokenizer", vocab_file=str(models["tokenizer"]))
    text = "def f(x):\n    return x + 1  # naïve café"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.tokenize(text)
    assert returned.config.eos_token_id == ours.eod


def _tp2_logits(rank, world, ckpt, config, tokens, n_tokens):
    from megatron.model import GPTModel, gather_logits
    from megatron.parallel import ParallelState, RankTopology
    from megatron.text_generation.model_setup import load_weights

    state = ParallelState.initialize(RankTopology(world, 2, 1), rank)
    cfg = neox_config([config]).with_vocab_size(n_tokens)
    model = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                     state=state)
    load_weights(model, cfg, state, str(ckpt))
    with torch.no_grad():
        return gather_logits(model.eval()(tokens), state).float()


@pytest.mark.distributed
def test_tp2_checkpoints_give_hf_logits(models):
    tokens = random_tokens(models["n_tokens"], seed=5)
    for name in ("neox_parallel_untied_bias", "llama_gqa_untied"):
        ckpt, config = _to_neox(models, name, tp=2)
        results = run_distributed(_tp2_logits, 2, str(ckpt), str(config), tokens,
                                  models["n_tokens"])
        theirs = hf_logits(models["dirs"][name], tokens)
        diff = (results[0] - theirs).abs().max().item()
        print(f"\n{name} TP=2: max |dlogit| {diff:.3g}")
        assert torch.equal(results[0], results[1])
        assert diff < TOLERANCE


@pytest.mark.parametrize("name", ["neox_parallel_untied_bias", "llama_gqa_untied",
                                  "mistral_gqa_window"])
def test_greedy_generation_matches_hf(models, name):
    from megatron.model import GPTModel
    from megatron.parallel import ParallelState
    from megatron.text_generation import SamplingParams, TokenGenerator, load_weights

    ckpt, config = _to_neox(models, name)
    cfg = neox_config([config]).with_vocab_size(models["n_tokens"])
    state = ParallelState.single()
    model = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                     state=state)
    load_weights(model, cfg, state, str(ckpt))
    model.eval()
    prompt = random_tokens(models["n_tokens"], batch=1, seq=6, seed=11)
    hf = load_hf(models["dirs"][name])
    with torch.no_grad():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                          max_new_tokens=20, eos_token_id=0, pad_token_id=1,
                          suppress_tokens=list(range(models["n_tokens"], models["vocab"])))
    expected = out[0, prompt.shape[1]:].tolist()
    if 0 in expected:
        expected = expected[: expected.index(0)]
    for recompute in (False, True):
        gen = TokenGenerator(model, state, eod=0, vocab_size=models["n_tokens"],
                             recompute=recompute)
        result = gen.generate(prompt[0].tolist(), SamplingParams(), max_new_tokens=20)
        assert result.tokens == expected, recompute
    assert len(expected) >= 5


BAD_EXPORTS = [
    (dict(norm="rmsnorm"), "neox", "norm: rmsnorm cannot be expressed by GPTNeoXForCausalLM"),
    (dict(num_kv_heads=2), "neox", "num_kv_heads: GPTNeoXForCausalLM has no grouped-query"),
    (dict(activation="swiglu"), "neox", "activation: swiglu cannot be expressed"),
    (dict(norm="rmsnorm", activation="swiglu", rotary_pct=0.5), "llama",
     "rotary_pct: partial rotary"),
    (dict(activation="swiglu"), "llama", "norm: layernorm cannot be expressed by Llama"),
    (dict(pos_emb="learned"), "neox", "pos_emb: learned position encoding"),
    (dict(norm="rmsnorm", activation="swiglu", attention_config=[[["local", "global"], 2]],
          sliding_window_width=4), "llama", "attention_config:"),
    (dict(norm="rmsnorm", activation="swiglu", attention_config=[[["local"], 2]],
          sliding_window_width=4), "llama", "use_bias_in_attn_linear: MistralForCausalLM"),
    (dict(use_qk_layernorm=True), "neox", "use_qk_layernorm: not expressible"),
]


@pytest.mark.parametrize("values,arch,message", BAD_EXPORTS)
def test_export_rejects_what_hf_cannot_express(values, arch, message):
    cfg = config_from_values(**values)
    with pytest.raises(ConversionError, match=message.replace("(", r"\(")):
        export_architecture(cfg.model, arch)


def test_llama_with_local_layers_exports_as_mistral():
    cfg = config_from_values(norm="rmsnorm", activation="swiglu", use_bias_in_attn_linear=False,
                             use_bias_in_mlp=False, attention_config=[[["local"], 2]],
                             sliding_window_width=4)
    assert export_architecture(cfg.model, "llama") == "mistral"


def test_unsupported_hf_models_fail_with_one_line(tmp_path, models):
    from transformers import GPT2Config, LlamaConfig

    GPT2Config(n_layer=1, n_embd=32, n_head=4).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(ConversionError, match="config.json: model_type 'gpt2' is not supported"):
        hf_to_neox.convert(str(tmp_path / "gpt2"), str(tmp_path / "out"))
    LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64,
                rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
                ).save_pretrained(str(tmp_path / "scaled"))
    with pytest.raises(ConversionError, match="rope_type 'linear' is not supported"):
        hf_to_neox.convert(str(tmp_path / "scaled"), str(tmp_path / "out2"))
    with pytest.raises(ConversionError, match="does not split over --tp 3"):
        hf_to_neox.convert(str(models["dirs"]["llama_gqa_untied"]),
                                   str(tmp_path / "out3"), tp=3)


def test_command_line_errors_are_one_line(tmp_path):
    proc = run_script("tools/ckpts/convert_hf_to_neox.py", "--hf_dir", tmp_path / "nope",
                      "--output_dir", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip() == \
        f"convert_hf_to_neox.py: error: {tmp_path / 'nope'}: Hugging Face model directory not found"
    proc = run_script("tools/ckpts/convert_neox_to_hf.py", "--input_dir", tmp_path,
                      "--output_dir", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"convert_neox_to_hf.py: error: {tmp_path}: not a checkpoint (no 'latest' file and no "
        "model-state files)"]


@pytest.mark.parametrize("kind", ["GPT2BPETokenizer", "SPMTokenizer"])
def test_tokenizer_files_load_with_autotokenizer(tmp_path, kind):
    from types import SimpleNamespace

    from conversion_helpers import corpus
    from transformers import AutoTokenizer

    from megatron.conversion.hf_files import export_tokenizer
    from megatron.data.preprocess.tokenizer_training import train_bpe, train_sentencepiece
    from megatron.tokenizer import build_tokenizer

    if kind == "SPMTokenizer":
        files = {"vocab_file": train_sentencepiece(corpus(), 400, tmp_path)["model_file"],
                 "merge_file": None}
    else:
        bpe = train_bpe(corpus(), 400, tmp_path)
        files = {"vocab_file": bpe["vocab_file"], "merge_file": bpe["merge_file"]}
    ours = build_tokenizer(kind, **files)
    out = tmp_path / "hf"
    out.mkdir()
    note = export_tokenizer(SimpleNamespace(tokenizer_type=kind, **files), ours, out)
    assert note == f"tokenizer ({kind}) saved"
    hf_tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = "def f(x):\n    return x + 1  # the cafe is open"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.tokenize(text)
    assert hf_tok.eos_token_id == ours.eod


NEOX_ONLY = {  # shapes Hugging Face never produces, exported exactly
    "no_mlp_norm_bias_gptj_tied": ("neox", dict(
        gpt_j_residual=True, gpt_j_tied=True, use_bias_in_mlp=False, use_bias_in_norms=False,
        rotary_pct=0.5)),
    "shared_layers_tanh_gelu": ("neox", dict(num_layers=4, num_unique_layers=2,
                                             openai_gelu=True, no_weight_tying=True)),
    "geglu_rmsnorm_tied": ("llama", dict(norm="rmsnorm", activation="geglu",
                                         intermediate_size=40, rms_norm_epsilon=1e-5)),
}


@pytest.mark.parametrize("name", sorted(NEOX_ONLY))
def test_framework_only_shapes_export_with_the_same_logits(tmp_path, name):
    from conversion_helpers import perturb

    from megatron.checkpoint.weights import write_checkpoint
    from megatron.model import GPTModel
    from megatron.parallel import ParallelState

    arch, values = NEOX_ONLY[name]
    cfg = config_from_values(**values)
    torch.manual_seed(0)
    model = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                     state=ParallelState.single())
    perturb(model, 1, scale=0.3)
    write_checkpoint(tmp_path / "ck", model.state_dict(), cfg.model,
                     config_yaml=cfg.merged.to_yaml())
    notes = neox_to_hf.convert(str(tmp_path / "ck"), str(tmp_path / "hf"), arch)
    assert notes[-1] == "no tokenizer files: CharLevelTokenizer has no Hugging Face form"
    tokens = random_tokens(256, seq=16)
    with torch.no_grad():
        ours = model.eval()(tokens).float()
    diff = (ours - hf_logits(tmp_path / "hf", tokens)).abs().max().item()
    print(f"\n{name}: max |dlogit| {diff:.3g}")
    assert ours.abs().max() > 1.0 and diff < TOLERANCE


def test_llama2_shaped_mlp_exports_its_real_width_and_imports_back(tmp_path):
    """A scaled-down Llama-2-7B MLP (GPT-NeoX's intermediate_size 8 x hidden with
    mlp_multiple_of: 512 / 64 -> 176 per half, as 32768 / 4096 -> 11008)."""
    import dataclasses
    import json

    from conversion_helpers import perturb
    from transformers import AutoConfig

    from megatron.checkpoint.weights import write_checkpoint
    from megatron.conversion.hf_mapping import neox_values_from_hf
    from megatron.model import GPTModel
    from megatron.model.args import ModelArgs, mlp_width
    from megatron.parallel import ParallelState

    cfg = config_from_values(hidden_size=64, intermediate_size=512, mlp_multiple_of=16,
                             norm="rmsnorm", activation="swiglu", no_weight_tying=True,
                             use_bias_in_attn_linear=False, use_bias_in_mlp=False)
    torch.manual_seed(0)
    model = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                     state=ParallelState.single())
    assert model.layers[0].mlp.dense_4h_to_h.weight.shape == (64, 176)
    perturb(model, 1, scale=0.3)
    write_checkpoint(tmp_path / "ck", model.state_dict(), cfg.model,
                     config_yaml=cfg.merged.to_yaml())
    neox_to_hf.convert(str(tmp_path / "ck"), str(tmp_path / "hf"), "llama")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["intermediate_size"] == 176
    tokens = random_tokens(256, seq=16)
    with torch.no_grad():
        ours = model.eval()(tokens).float()
    assert (ours - hf_logits(tmp_path / "hf", tokens)).abs().max().item() < TOLERANCE
    arch, values = neox_values_from_hf(AutoConfig.from_pretrained(str(tmp_path / "hf")))
    names = {f.name for f in dataclasses.fields(ModelArgs)}
    back = ModelArgs(**{k: v for k, v in values.items() if k in names})
    assert arch == "llama" and mlp_width(back, back.activation) == 176


def test_bias_gelu_fusion_exports_the_tanh_gelu() -> None:
    from megatron.conversion.hf_mapping import hf_config
    from megatron.model.args import ModelArgs

    def act(**flags: bool) -> str:
        model = ModelArgs(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                          max_position_embeddings=16, pos_emb="rotary", **flags)
        return hf_config(model, "neox", vocab_size=128, special={},
                         dtype=torch.float32).hidden_act

    assert act() == "gelu"
    assert act(bias_gelu_fusion=True) == act(openai_gelu=True) == "gelu_pytorch_tanh"
