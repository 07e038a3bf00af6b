"""The error every tokenizer module raises. It lives apart so that the SentencePiece module
(`tokenizer`) and the Hugging Face one (`hf_tokenizer`) share it without importing each other."""


class TokenizerError(ValueError):
    """A tokenizer folder is missing, incomplete or inconsistent, or training input is bad."""
