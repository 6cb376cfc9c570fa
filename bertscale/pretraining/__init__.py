"""The parts of `bertscale pretrain` (bertscale.pretraining.train, whose `train` is their
outline over the trainer core); see that module's docstring for which part does what."""
