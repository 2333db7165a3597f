"""The trainer's parts: train state and optimiser, the jitted step, checkpoints, preemption, the loop."""
