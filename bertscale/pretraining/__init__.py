"""The parts of `bertscale pretrain` (bertscale.pretrain, whose `train` is their outline); see
that module's docstring for which part does what."""
