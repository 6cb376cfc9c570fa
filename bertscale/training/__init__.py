"""The trainer core that pretraining and fine-tuning both run on: the engine interface and its
two engines, the loop's counters, the decisions ranks take together, the exit codes, rank 0's
reporter, and the one checkpoint layer (`bertscale.training.checkpoint`)."""
