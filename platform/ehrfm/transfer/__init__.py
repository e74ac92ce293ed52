"""Transfer learning: prediction windows from labels + timelines, the risk model (decoder + head),
fine-tuning on Ray Train, zero-shot risk from generated trajectories."""
