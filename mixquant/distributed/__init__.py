"""Several processes, one model: tensor parallelism (parallel_state.py: the process group and its collectives;
executor.py: the worker processes and how the driver runs a step on all of them)."""
