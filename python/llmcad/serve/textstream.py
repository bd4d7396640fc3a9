"""Generated tokens -> the text a client sees: incremental decoding, stop strings cut off as OpenAI does
(the stop string itself is not returned), and text that may be the start of a stop string held back."""
from __future__ import annotations


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """(text before the earliest stop string, whether one was found)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


def held_back(text: str, stops) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string (it may yet become one)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class TextStream:
    """Decodes the tokens committed so far (as the engine decodes its result: special tokens skipped) and
    says which new text may be sent. The deltas concatenate to :meth:`final` of the same tokens."""

    def __init__(self, tokenizer, stops=()):
        self.tokenizer, self.stops = tokenizer, list(stops or ())
        self.tokens: list[int] = []
        self.sent = ""

    def push(self, tokens) -> str:
        """Add committed tokens; returns the text that can be sent now (may be empty)."""
        self.tokens.extend(int(t) for t in tokens)
        text = self._decode()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
            return ""
        visible, stopped = cut_at_stop(text, self.stops)
        if not stopped:
            visible = visible[:len(visible) - held_back(visible, self.stops)]
        return self._advance(visible)

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        return self._advance(self.final())

    def final(self) -> str:
        return cut_at_stop(self._decode(), self.stops)[0]

    def _decode(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _advance(self, visible: str) -> str:
        if not visible.startswith(self.sent) or len(visible) <= len(self.sent):
            return ""
        delta = visible[len(self.sent):]
        self.sent = visible
        return delta
