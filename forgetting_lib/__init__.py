"""forgetting_lib: reproduce and extend the forgetting experiments of Marek et al. (2026).

The four-step workflow lives in one module each: `tokenizer` (train SentencePiece), `binarize`
(corpus -> uint16 token file), `train` (pretraining and finetuning), with `corpora`, `data`,
`model`, `losses`, `checkpoint` and `runs` underneath.
"""

__version__ = "0.1.0"
