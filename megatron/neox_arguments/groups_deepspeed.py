"""Config sections passed to DeepSpeed: engine settings and the launcher (runner) options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron.neox_arguments.fields import key


@dataclass(frozen=True)
class DeepSpeedArgs:
    zero_optimization: dict | None = key(
        None, "ZeRO block {stage: 0-3, allgather_bucket_size, reduce_bucket_size, overlap_comm, "
        "contiguous_gradients, offload_optimizer, offload_param, ...}.", origin="DSC")
    zero_stage: int | None = key(
        None, "ZeRO stage, written to zero_optimization.stage (the block's own value wins when "
        "both are given); resolved to the stage in effect.")
    zero_reduce_scatter: bool | None = key(
        None, "ZeRO: average gradients with reduce/reduce-scatter instead of all-reduce "
        "(zero_optimization.reduce_scatter; the block's value wins).")
    zero_contiguous_gradients: bool | None = key(
        None, "ZeRO: copy gradients into one contiguous buffer as they are produced "
        "(zero_optimization.contiguous_gradients; the block's value wins).")
    zero_reduce_bucket_size: int | None = key(
        None, "ZeRO: elements reduced at a time (zero_optimization.reduce_bucket_size; the "
        "block's value wins).")
    zero_allgather_bucket_size: int | None = key(
        None, "ZeRO: elements all-gathered at a time (zero_optimization.allgather_bucket_size; "
        "the block's value wins).")
    scheduler: dict | None = key(
        None, "DeepSpeed LR scheduler block, with optimizer type OneBitAdam only (DeepSpeed "
        "builds that optimizer and this schedule); every other optimizer follows the lr_* keys.",
        origin="DSC")
    steps_per_print: int = key(10, "DeepSpeed's own progress print interval.", origin="DSC")
    wall_clock_breakdown: bool = key(
        False, "Time forward, backward, optimizer and data loading and print the breakdown.",
        origin="DSC")
    dump_state: bool = key(False, "Print DeepSpeed's state after initialization.", origin="DSC")
    prescale_gradients: bool = key(False, "Scale gradients before the all-reduce.",
                                   origin="DSC")
    gradient_predivide_factor: float = key(1.0, "Divide gradients by this before averaging.",
                                           origin="DSC")
    sparse_gradients: bool = key(False, "Sparse embedding gradients.", origin="DSC",
                                 unsupported="sparse_gradients was removed from DeepSpeed")
    flops_profiler: dict | None = key(None, "DeepSpeed flops profiler block.", origin="DSC")
    autotuning: dict | None = key(
        None, "DeepSpeed autotuning block.", origin="DSC",
        unsupported="DeepSpeed's autotuner is not supported (see autotuning_run); the block "
        "alone would only profile a few steps and then end the run")
    activation_checkpointing: dict | None = key(
        None, "DeepSpeed activation checkpointing block (normally derived from the "
        "checkpoint_* keys).", origin="DSC")
    comms_logger: dict | None = key(None, "DeepSpeed communication logger block.",
                                    origin="DSC")
    tensorboard: dict | None = key(None, "DeepSpeed's own TensorBoard monitor block.",
                                   origin="DSC")
    wandb: dict | None = key(None, "DeepSpeed's own W&B monitor block.", origin="DSC")
    csv_monitor: dict | None = key(None, "DeepSpeed CSV monitor block.", origin="DSC")
    elasticity: dict | None = key(None, "DeepSpeed elasticity block.", origin="DSC",
                                  unsupported="elasticity was removed from DeepSpeed")
    data_efficiency: dict | None = key(
        None, "DeepSpeed data efficiency block.", origin="DSC",
        unsupported="DeepSpeed's data efficiency library (curriculum data sampling, random-LTD) "
        "works only through a data loader DeepSpeed builds and a converted model; the trainer "
        "feeds its own data pipeline")
    sparse_attention: dict | None = key(
        None, "DeepSpeed sparse attention block.", origin="DSC",
        unsupported="DeepSpeed sparse attention needs its GPU (triton) kernels, which are not "
        "provided")
    curriculum_learning: dict | None = key(
        None, "Sequence-length curriculum: DeepSpeed's curriculum block {enabled, "
        "curriculum_type: seqlen, min_difficulty, max_difficulty, schedule_type, "
        "schedule_config}; each training batch is cut to the scheduled length.", origin="DSC")
    curriculum_seqlen: int = key(
        0, "Not a setting: the curriculum's length of each step is logged under this name.",
        derived=True)
    compression_training: dict | None = key(
        None, "DeepSpeed compression block.", origin="DSC",
        unsupported="the compression library was removed from DeepSpeed")
    checkpoint: dict | None = key(None, "DeepSpeed checkpoint block.", origin="DSC")
    deepspeed_extra_args: dict | None = key(
        None, "Extra keys copied verbatim into the DeepSpeed config.")


@dataclass(frozen=True)
class LauncherArgs:
    hostfile: str | None = key(
        None, "MPI-style hostfile ('worker-0 slots=8' per line); DeepSpeed's default "
        "/job/hostfile is used when it exists.", origin="DSL")
    include: str | None = key(
        None, "Resources to use, NODE_SPEC[@NODE_SPEC ...] with NODE_SPEC=NAME[:SLOT[,SLOT]].",
        origin="DSL")
    exclude: str | None = key(None, "Resources to leave out (same format as include).",
                              origin="DSL")
    num_nodes: int = key(-1, "Use the first N hosts of the hostfile (-1: all).", origin="DSL")
    num_gpus: int | None = key(
        None, "Ranks per node: GPUs on a GPU machine, CPU processes on a CPU machine "
        "(unset: all GPUs, or 1 CPU rank).", origin="DSL")
    master_port: int = key(29500, "Port of the rendezvous on the first node.", origin="DSL")
    master_addr: str | None = key(None, "Address of the first node (inferred when unset).",
                                  origin="DSL")
    launcher: Literal["pdsh", "openmpi", "mvapich", "slurm", "mpich", "impi"] = key(
        "pdsh", "Multi-node launcher backend.", origin="DSL")
    force_multi: bool = key(False, "Use the multi-node launcher even on one node.",
                            origin="DSL")
    detect_nvlink_pairs: bool = key(
        False, "Remap GPUs so NVLink pairs are adjacent.", origin="DSL",
        unsupported="NVLink pair detection is an option of DeeperSpeed's runner that "
        "DeepSpeed's runner lacks; order the GPUs with CUDA_VISIBLE_DEVICES instead")
    autotuning_run: str | None = key(
        None, "Run DeepSpeed's autotuner ('tune' or 'run').", origin="DSL",
        unsupported="DeepSpeed's autotuner is not supported: it starts its own experiment "
        "runs from a DeepSpeed config file and measures them on GPUs; tune the batch size and "
        "ZeRO settings by hand")
    no_ssh_check: bool = key(False, "Skip the passwordless-ssh check on multi-node launches.",
                             origin="DSL")
    comment: str | None = key(None, "Slurm --comment for srun.", origin="DSL")
    account: str | None = key(None, "Slurm --account for srun.", origin="DSL")
    deepspeed_mpi: bool = key(
        False, "Discover rank, world size and master address from the MPI environment.")
    deepspeed_slurm: bool = key(
        False, "Discover rank, world size and master address from the Slurm environment.")
    num_cpu_threads_per_rank: int | None = key(
        None, "torch threads per CPU rank (unset: the node's cores divided by its ranks).",
        origin="Here")
