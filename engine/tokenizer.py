"""Tokenizer and chat template (transformers' fast tokenizer) plus incremental detokenization."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer


class Tokenizer:
    def __init__(self, path: Path, extra_eos_ids: tuple[int, ...] = ()) -> None:
        self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        eos = {self.hf.eos_token_id, *extra_eos_ids} - {None}
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.vocab_size = len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self.hf.convert_ids_to_tokens(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.hf.chat_template:
            raise ValueError("this model has no chat template; use /v1/completions")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError("each message needs a 'role' and 'content'")
        try:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:   # jinja errors from the template itself, e.g. an unsupported role
            raise ValueError(f"chat template failed: {e}") from e


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding the whole sequence.

    Decodes a short window [prefix_offset, len) and emits what lies beyond [prefix_offset,
    read_offset); a trailing U+FFFD means a multi-byte character is still incomplete, so it waits.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-6:])   # a little prompt context so leading spaces decode right
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        text = decode(self.ids[self.prefix_offset:], self.skip)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""
