"""Config sections for parallelism and activation checkpointing; the model architecture
section is :class:`megatron.model.args.ModelArgs`."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.neox_arguments.fields import key


@dataclass(frozen=True)
class ParallelismArgs:
    pipe_parallel_size: int = key(
        0, "Pipeline stages. 0 trains the plain model without the pipeline engine; 1 or more "
        "builds a DeepSpeed PipelineModule with that many stages.", origin="Meg")
    model_parallel_size: int = key(1, "Tensor (model) parallel size.", origin="Meg")
    pipe_partition_method: str = key(
        "type:transformer|mlp", "How layers are spread over pipeline stages: 'parameters', "
        "'uniform', or 'type:<regex>' (balance the layers whose class name matches).",
        origin="Meg")
    sequence_parallel: bool = key(
        False, "Split the norm and dropout regions along the sequence across the tensor-parallel "
        "group (needs model_parallel_size > 1 to have an effect).")
    expert_interval: int = key(2, "Every n-th layer is a mixture-of-experts layer.",
                               unsupported="mixture-of-experts layers are not supported")
    expert_model_parallel_size: int = key(
        1, "Expert-parallel size: each MoE layer's experts are split over this many "
        "data-parallel ranks, which exchange tokens all-to-all.", origin="Meg")
    moe_expert_parallel_size: int = key(
        1, "GPT-NeoX's name for expert_model_parallel_size.")
    is_pipe_parallel: bool = key(False, "True when the pipeline engine is used "
                                 "(pipe_parallel_size >= 1).", derived=True)
    world_size: int = key(1, "Total number of ranks of the job.", derived=True)
    data_parallel_size: int = key(1, "world_size / (pipeline stages x model_parallel_size).",
                                  derived=True)
    global_num_gpus: int = key(1, "GPT-NeoX's name of world_size: all ranks of the job.",
                               derived=True)


@dataclass(frozen=True)
class ActivationCheckpointArgs:
    """Activation checkpointing (recomputation) through DeepSpeed's checkpointing module;
    see :mod:`megatron.parallel.activation_checkpointing`."""

    checkpoint_activations: bool = key(
        False, "Recompute each chunk of layers in the backward pass instead of keeping its "
        "activations (only the chunk's inputs are kept).", origin="Meg")
    checkpoint_num_layers: int = key(1, "Layers per checkpointed chunk.", origin="Meg")
    deepspeed_activation_checkpointing: bool = key(
        True, "Configure DeepSpeed's activation checkpointing with partition_activations, "
        "checkpoint_in_cpu, contiguous_checkpointing, synchronize_each_layer and "
        "profile_backward; false leaves it unconfigured (those keys then have no effect, as "
        "in GPT-NeoX).", origin="Meg")
    partition_activations: bool = key(
        False, "Each tensor-parallel rank keeps only its 1/model_parallel_size slice of every "
        "checkpointed input; the slices are all-gathered for the recomputation. Not applied "
        "again where sequence_parallel already splits the activations.", origin="Meg")
    contiguous_checkpointing: bool = key(
        False, "Copy the partitioned checkpoints into one preallocated buffer per input "
        "(less fragmentation); needs partition_activations.", origin="Meg")
    checkpoint_in_cpu: bool = key(
        False, "Keep the checkpointed inputs in host memory and move them back for the "
        "recomputation (on CPU ranks they are in host memory anyway).", origin="Meg")
    synchronize_each_layer: bool = key(
        False, "Synchronize the device at the start and end of every checkpointed chunk, "
        "forward and backward.", origin="Meg")
    profile_backward: bool = key(
        False, "Print the forward and backward time of every checkpointed chunk (rank 0).",
        origin="Meg")
    distribute_checkpointed_activations: bool = key(
        False, "Megatron name for partition_activations.", origin="Meg")


def expert_parallel_size(p: ParallelismArgs) -> int:
    """The expert-parallel size: ``expert_model_parallel_size``, or GPT-NeoX's
    ``moe_expert_parallel_size`` when only that one is set."""
    if p.expert_model_parallel_size != 1:
        return p.expert_model_parallel_size
    return p.moe_expert_parallel_size
