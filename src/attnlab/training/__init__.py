"""Training: the loop (set-up, one step, logging/checkpointing, finish), the token budget and lr schedule,
resumable checkpoints, weight snapshots at initialization and every validation point and data parallelism under torchrun.
Stage: train.
"""
