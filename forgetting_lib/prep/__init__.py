"""Text -> token files: `corpora` (where text comes from: sample, hf, files), `tokenizer`
(SentencePiece with dataset-id and EOS tokens), `binarize` (uint16 token files with sidecars)."""
