"""One run: `model`, `losses`, `lora`, `sampling` (KV-cache sampler), `data` (rows, splits,
batches), `replay` (real and self-generated replay sources), `regularisers` (the method registry),
`step` (optimizer and the jitted train step), `evaluate`, `checkpoint`, `finetune` (parents),
`assemble` (everything a run builds before its loop) and `train` (`train_and_evaluate`)."""
