"""The text of a completion as its tokens arrive: UTF-8-safe decoding, stop sequences and EOS.

Pure (a tokenizer at most), so the server's streamed text is testable without a server. The
server's generation loop is host/generate.py's; this only turns its tokens into text.
"""

from __future__ import annotations

from gpt_fpga.quantize.tokenizer import StreamDecoder, TextCodec


class StopScanner:
    """Cuts text at the first stop sequence. A tail that may be the start of one is held back until
    the next piece shows whether it is, so streamed text never shows part of a stop sequence."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The text that is safe to emit now; after a stop sequence, nothing more."""
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out
        keep = self._held_back()
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out

    def _held_back(self) -> int:
        """Length of the longest end of `pending` that begins some stop sequence."""
        for n in range(min(len(self.pending), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        """At the end of generation: what was held back was not a stop sequence after all."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class CompletionText:
    """Text deltas of one completion, token by token.

    The EOS token ends the text without adding its own ("<|endoftext|>"), as OpenAI's servers do; a
    model without a tokenizer gives its ids as text, "5 17 300 ", as `gpt-fpga generate` prints them."""

    def __init__(self, codec: TextCodec | None, prompt_ids: list[int], stops: list[str], eos: int | None):
        self.decoder = StreamDecoder(codec, prompt_ids) if codec is not None else None
        self.scanner = StopScanner(stops)
        self.eos = eos
        self.ended_by_eos = False

    @property
    def stopped(self) -> bool:
        """A stop sequence or EOS ended the text: the finish reason is "stop"."""
        return self.scanner.stopped or self.ended_by_eos

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        if token == self.eos:
            self.ended_by_eos = True
            return self.finish()
        piece = self.decoder.push(token) if self.decoder is not None else f"{token} "
        return self.scanner.push(piece)

    def finish(self) -> str:
        """What is still held back when generation ends."""
        tail = self.decoder.flush() if self.decoder is not None and not self.scanner.stopped else ""
        return self.scanner.push(tail) + self.scanner.flush()
