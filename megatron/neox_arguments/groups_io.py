"""Config sections for data, tokenizer, logging, text generation/evaluation and the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron.neox_arguments.fields import key


@dataclass(frozen=True)
class DataArgs:
    data_path: str | None = key(None, "Prefix of one preprocessed dataset (.bin/.idx) that "
                                "`split` divides into train/valid/test.", origin="Meg")
    split: str = key("969, 30, 1", "Train/valid/test proportions of data_path, e.g. "
                     "'949,50,1'.", origin="Meg")
    train_data_paths: list[str] | None = key(None, "Dataset prefixes blended for training.")
    valid_data_paths: list[str] | None = key(None, "Dataset prefixes for validation.")
    test_data_paths: list[str] | None = key(None, "Dataset prefixes for testing.")
    train_data_weights: list[float] | None = key(None, "Blending weights of train_data_paths.")
    valid_data_weights: list[float] | None = key(None, "Blending weights of valid_data_paths.")
    test_data_weights: list[float] | None = key(None, "Blending weights of test_data_paths.")
    train_label_data_paths: list[str] | None = key(
        None, "Label datasets aligned with train_data_paths (-100 masks a position).")
    valid_label_data_paths: list[str] | None = key(None, "Labels for valid_data_paths.")
    test_label_data_paths: list[str] | None = key(None, "Labels for test_data_paths.")
    weight_by_num_documents: bool = key(
        False, "Derive blending weights from the datasets' document counts.")
    weighted_sampler_alpha: float = key(
        1.0, "With weight_by_num_documents: weights proportional to num_docs ** alpha.")
    data_impl: Literal["infer", "mmap", "cached"] = key(
        "infer", "Indexed dataset implementation (mmap is the one written by the tools).",
        origin="Meg")
    mmap_warmup: bool = key(False, "Read the memory-mapped files once at start.", origin="Meg")
    num_workers: int = key(2, "Data loader worker processes.", origin="Meg")
    use_shared_fs: bool = key(
        True, "The data directory is shared by all nodes: one rank builds the index cache for "
        "everyone (false: one rank per node).")
    eod_mask_loss: bool = key(False, "Exclude end-of-document tokens from the loss.",
                              origin="Meg")
    reset_position_ids: bool = key(False, "Restart position ids after each end-of-document "
                                   "token.", origin="Meg")
    reset_attention_mask: bool = key(
        False, "Documents packed into one sample do not attend to each other.", origin="Meg")
    short_seq_prob: float = key(0.1, "Probability of a short sequence (BERT-style data only).",
                                origin="Meg",
                                unsupported="short sequences belong to BERT-style datasets, "
                                "which are not provided (GPT datasets always fill seq_length)")
    pack_impl: Literal["packed", "unpacked", "pack_until_overflow"] = key(
        "packed", "How documents fill samples: packed (concatenated across document "
        "boundaries) or unpacked (one document per sample, padded; labels -100 on the padding). "
        "GPT-NeoX's pack_until_overflow is refused.")
    dataset_impl: Literal["gpt2", "pairwise"] = key(
        "gpt2", "Dataset type: gpt2, or pairwise (chosen/rejected pairs from the pos_*/neg_* "
        "paths, one pair per sample, unpacked).")
    allow_chopped: bool = key(
        True, "One document per sample (pack_impl: unpacked, dataset_impl: pairwise): documents "
        "longer than seq_length + 1 tokens are cut to fit (true) or left out (false; for a "
        "pair: when either side is too long). Packed data ignores it.")
    data_cache_dir: str | None = key(
        None, "Where the sample-index cache goes; unset: next to the data.", origin="Here")
    fim_rate: float = key(
        0.0, "Set by GPT-NeoX's FIM configs: share of documents rearranged for "
        "fill-in-the-middle training.",
        unsupported="fill-in-the-middle training is not provided (and not one of GPT-NeoX's "
        "arguments; its FIM configs set it)")
    extra_sentinel_tokens: int = key(
        0, "Set by GPT-NeoX's FIM configs: sentinel tokens added to the tokenizer for "
        "fill-in-the-middle training.",
        unsupported="fill-in-the-middle training is not provided (and not one of GPT-NeoX's "
        "arguments; its FIM configs set it)")


@dataclass(frozen=True)
class TokenizerArgs:
    tokenizer_type: Literal[
        "GPT2BPETokenizer", "HFTokenizer", "HFGPT2Tokenizer", "SPMTokenizer",
        "CharLevelTokenizer", "TiktokenTokenizer",
    ] = key("GPT2BPETokenizer", "Tokenizer kind.", origin="Meg")  # fmt: skip
    vocab_file: str | None = key(None, "Vocabulary file (vocab.json, tokenizer.json, a "
                                 "SentencePiece model or a tiktoken encoding).", origin="Meg")
    merge_file: str | None = key(None, "BPE merges file (GPT2BPETokenizer).", origin="Meg")
    padded_vocab_size: int | None = key(
        None, "Vocabulary size padded to make_vocab_size_divisible_by x model_parallel_size.",
        derived=True)


@dataclass(frozen=True)
class LoggingArgs:
    log_dir: str | None = key(None, "Directory for metrics.jsonl and the run log.")
    tensorboard_dir: str | None = key(None, "Write TensorBoard event files here.")
    log_interval: int = key(100, "Log training metrics every this many iterations.",
                            origin="Meg")
    log_grad_pct_zeros: bool = key(
        False, "At log steps, log the percentage of zero entries of each parameter's gradient "
        "(pct_grad_zeros/<name>; over the full parameter).")
    log_param_norm: bool = key(
        False, "At log steps, log each parameter's L2 norm (parameter_norms/<name>).")
    log_grad_norm: bool = key(
        False, "At log steps, log each parameter's gradient L2 norm (gradient_norms/<name>).")
    log_optimizer_states: bool = key(
        False, "At log steps, log the L2 norm of each optimizer state tensor "
        "(optimizer_state_norms/<index>_<state>, e.g. exp_avg).")
    log_gradient_noise_scale: bool = key(
        False, "Estimate the gradient noise scale B_simple (McCandlish et al.) from the "
        "gradients of single steps and of gradient_noise_scale_n_batches consecutive steps; "
        "logged as train/noise_scale.")
    gradient_noise_scale_n_batches: int = key(
        5, "Steps averaged for the large-batch gradient of the noise scale (at least 2).")
    gradient_noise_scale_cpu_offload: bool = key(
        False, "Keep the noise scale's gradient buffer in host memory.")
    char_level_ppl: bool = key(
        False, "Also log the character-level perplexity of evaluations "
        "(lm_loss_char_lvl_ppl: exp(loss x tokens per character)).")
    use_wandb: bool = key(False, "Log to Weights & Biases (offline mode works without "
                          "network: WANDB_MODE=offline).")
    wandb_project: str = key("neox", "W&B project.")
    wandb_group: str | None = key(None, "W&B group (a run id is appended).")
    wandb_team: str | None = key(None, "W&B team/entity.")
    wandb_host: str = key("https://api.wandb.ai", "W&B server.")
    wandb_init_all_ranks: bool = key(False, "Start a W&B run on every rank, not only rank 0.")
    wandb_run_name: str | None = key(None, "W&B run name.")
    git_hash: str | None = key(None, "Git revision of the code, recorded in the run log header.")
    memory_profiling: bool = key(
        False, "Record the CUDA allocator's history and write its snapshot "
        "(memory_profiling_path/mem_snapshot.pickle) after iteration profile_step_stop; "
        "CUDA ranks only.")
    memory_profiling_path: str | None = key(None, "Directory of the memory snapshot.")
    profile: bool = key(
        False, "Record a PyTorch profiler trace of the steps after iteration "
        "profile_step_start up to iteration profile_step_stop, in tensorboard_dir "
        "(<log_dir>/profile without one): TensorBoard / Perfetto trace files per rank.")
    profile_step_start: int = key(10, "The profiled steps start after this iteration.")
    profile_step_stop: int = key(12, "Last profiled iteration.")
    use_comet: bool | None = key(
        None, "Log the training and evaluation scalars (the TensorBoard/W&B ones) to a Comet "
        "experiment on the writing rank (comet_ml package; COMET_API_KEY online, or "
        "COMET_START_ONLINE=false for an offline archive, written to COMET_OFFLINE_DIRECTORY "
        "or else <log_dir>/comet).")
    comet_workspace: str | None = key(
        None, "Comet workspace; unset: the user's default workspace.")
    comet_project: str | None = key(
        None, "Comet project; unset: Comet's Uncategorized Experiments project.")
    comet_experiment_name: str | None = key(
        None, "Name of the Comet experiment; unset: a random name.")
    comet_tags: list | None = key(None, "Tags attached to the Comet experiment.")
    comet_others: dict | None = key(
        None, "Custom metadata attached to the Comet experiment (Comet's log_others).")


@dataclass(frozen=True)
class TextGenArgs:
    text_gen_type: Literal["unconditional", "input-file", "interactive", "precompute"] = key(
        "unconditional", "Generation mode; precompute writes the reference log-probabilities "
        "of the post-training data (precompute_model_name, docs/post_training.md).")
    temperature: float = key(0.0, "Sampling temperature; 0 is greedy.")
    top_p: float = key(0.0, "Nucleus sampling threshold (0 disables).")
    top_k: int = key(0, "Sample from the k most likely tokens (0 disables).")
    return_logits: bool = key(False, "Also return the logits of generated tokens.")
    maximum_tokens: int = key(64, "Tokens to generate per sample.")
    prompt_end: str = key("\n", "Separator between prompts in an input file.")
    sample_input_file: str | None = key(None, "Prompts, one per line (input-file mode).")
    sample_output_file: str = key("samples.txt", "Output JSON lines.")
    num_samples: int = key(1, "Unconditional samples to generate.")
    recompute: bool = key(False, "Recompute the whole sequence at each step instead of using "
                          "a KV cache.")
    eval_results_prefix: str = key("", "Prefix of the evaluation results file.")
    eval_tasks: list[str] | None = key(None, "lm-evaluation-harness tasks to run.")
    eval_batch_size: int | None = key(None, "Batch size for evaluation (default micro batch).")
    eval_num_fewshot: int | None = key(None, "Few-shot examples per task.")
    eval_limit: int | None = key(None, "Evaluate only this many examples per task.")
    eval_include_path: str | None = key(None, "Directory with extra lm-evaluation-harness "
                                        "task definitions (YAML).")


@dataclass(frozen=True)
class OtherArgs:
    distributed_backend: Literal["nccl", "gloo", "mpi", "ccl"] | None = key(
        None, "torch.distributed backend; unset: nccl on GPUs, gloo on CPU ranks.",
        origin="Meg")
    local_rank: int | None = key(
        None, "Set by the launcher.", origin="Meg",
        unsupported="the launcher gives each rank its local rank (--local_rank, LOCAL_RANK); a "
        "config file cannot set it")
    rank: int | None = key(
        None, "Set by the launcher.", origin="Meg",
        unsupported="the launcher gives each rank its global rank (RANK); a config file cannot "
        "set it")
    lazy_mpu_init: bool = key(False, "Skip distributed init (external frameworks).",
                              origin="Meg",
                              unsupported="handing distributed initialization to an external "
                              "manager is not provided; the ranks always initialize it at start")
    adlr_autoresume: bool = key(False, "ADLR cluster autoresume.", origin="Meg",
                                unsupported="ADLR autoresume is not supported; SIGTERM saves "
                                "a checkpoint instead (save_on_signal)")
    adlr_autoresume_interval: int = key(1000, "ADLR autoresume check interval.", origin="Meg",
                                        unsupported="ADLR autoresume is not supported, so its "
                                        "interval has nothing to set")
    deepscale: bool = key(False, "Legacy DeepSpeed flag (ignored).", origin="DSL",
                          hint="deprecated DeepSpeed flag that GPT-NeoX ignores as well")
    deepscale_config: str | None = key(
        None, "Legacy DeepSpeed config file.", origin="DSL",
        unsupported="a separate DeepSpeed JSON file is not read; put its blocks "
        "(zero_optimization, fp16, ...) into the YAML config")
    deepspeed: bool = key(True, "Always true: training runs through DeepSpeed.", origin="DSL",
                          unsupported="training always runs through DeepSpeed")
    user_script: str | None = key(None, "The script deepy.py launched.", derived=True)
    config_files: dict | None = key(None, "The merged config files (name -> text).",
                                    derived=True)
