"""Fine-tuning entrypoints: GLUE (nine tasks), SQuAD v1.1 / v2.0, SWAG and CoNLL-2003 NER,
sharing one checkpoint loader and one training loop (`common`), with the official metrics
(`metrics`, `seqeval`). The command is `bertscale finetune glue|squad|swag|ner` (`cli`).
"""
