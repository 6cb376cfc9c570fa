"""Fine-tuning: GLUE (nine tasks), SQuAD v1.1 / v2.0, SWAG and CoNLL-2003 NER (`glue`, `squad`,
`swag`, `ner`, each reading its files, scoring with the official metrics: `metrics`, `seqeval`),
on the trainer core (bertscale.training) through one run's outline (`train`), its data (`data`),
models (`models`), prediction (`predict`), the lr x seed grid (`grid`) and its results
(`results`); typed recipes (`recipe`). The command is `bertscale finetune`
(bertscale.commands.finetune)."""
