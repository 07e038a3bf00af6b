"""Text -> token files: `corpora` (where text comes from: sample, hf, files), `tokenizer`
(SentencePiece with dataset-id and EOS tokens; `load_tokenizer` also reads a Hugging Face model's
tokenizer, `hf_tokenizer`, and `sp_to_hf` exports ours to that format), `binarize` (token files
with sidecars: uint16 ids, uint32 past 65,536), `benchmarks` (multiple-choice evaluation sets)."""
