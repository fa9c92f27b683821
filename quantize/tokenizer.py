"""Thin wrapper over `tokenizers.Tokenizer` with streaming-safe decoding."""

from __future__ import annotations

from pathlib import Path

from gpt_fpga.contract.errors import InputError


class TextCodec:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a plain Exception
            raise InputError(f"{path}: cannot load tokenizer: {e}") from None

    @classmethod
    def from_bytes(cls, blob, origin: str = "embedded tokenizer") -> "TextCodec":
        from tokenizers import Tokenizer

        self = cls.__new__(cls)
        try:
            self.tok = Tokenizer.from_str(bytes(blob).decode("utf-8"))
        except Exception as e:
            raise InputError(f"{origin}: cannot load tokenizer: {e}") from None
        return self

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


class StreamDecoder:
    """Yields the new text as ids arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, codec: TextCodec, prompt_ids):
        self.codec, self.ids = codec, list(prompt_ids)
        self.emitted = codec.decode(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""  # a multi-byte character is still arriving
        new, self.emitted = text[len(self.emitted):], text
        return new

    def flush(self) -> str:
        """Whatever is still held back when generation ends (an incomplete character shows as U+FFFD)."""
        text = self.codec.decode(self.ids)
        new = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return new
