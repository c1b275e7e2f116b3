"""Launching jobs: what ``python deepy.py <script> <configs>`` does before and while ranks run.

* :mod:`megatron.launch.cli`: deepy.py's command line (argument parsing, config merge and
  validation, dry run, then the launch);
* :mod:`megatron.launch.plan`: hosts and slots, the launcher-specific settings and the
  DeepSpeed runner command (:func:`~megatron.launch.plan.plan_launch`);
* :mod:`megatron.launch.supervise`: running that command and watching the job;
* :mod:`megatron.launch.failures`: the output lines that report a failed rank or node;
* :mod:`megatron.launch.rank_guard`: the small parent of each rank
  (``python -m megatron.launch.rank_guard``);
* :mod:`megatron.launch.cluster_env`: rank, world size and rendezvous from Slurm or MPI
  variables, read by the ranks themselves at start-up.

This package imports none of its modules here: the rank guard, started once per rank, loads
only the standard library.
"""
