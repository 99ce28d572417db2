"""Prompts, tokenisation and truncation, with the checkpoint's own tokenizer files.

Prompts (no chat template): query `"query: " + text`, passage `"passage: " + text`, image
`"passage: <img>" + "<IMG_CONTEXT>" × (tokens_per_tile · tiles) + "</img> "`, image+text the image part then the
text. The tokenizer prepends BOS. `<IMG_CONTEXT>` ids are inserted as ids, not spelled out: they are atomic
special tokens, so the result is identical and tokenising stays cheap.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tokenizers import Tokenizer

from model.config import ModelConfig

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


class Truncate(str, enum.Enum):
    NONE = "NONE"
    START = "START"  # keep the last tokens
    END = "END"  # keep the first tokens


class InputTooLongError(ValueError):
    def __init__(self, num_tokens: int, max_tokens: int):
        super().__init__(f"Input length {num_tokens} exceeds maximum allowed token size {max_tokens}")
        self.num_tokens, self.max_tokens = num_tokens, max_tokens


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    bos: int
    img_start: int
    img_end: int
    img_context: int


class Prompter:
    """Builds token ids for one input. Thread-safe: `tokenizers` encodes without shared mutable state."""

    def __init__(self, tokenizer: Tokenizer, cfg: ModelConfig, bos_token: str):
        self.tokenizer = tokenizer
        self.cfg = cfg
        ids = {tok: tokenizer.token_to_id(tok) for tok in (bos_token, IMG_START, IMG_END, IMG_CONTEXT)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer has no {missing} token(s)")
        self.special = SpecialIds(ids[bos_token], ids[IMG_START], ids[IMG_END], ids[IMG_CONTEXT])
        if self.special.img_context != cfg.img_context_token_id:
            raise ValueError(f"tokenizer's {IMG_CONTEXT} id {self.special.img_context} differs from "
                             f"config.img_context_token_id {cfg.img_context_token_id}")
        probe = tokenizer.encode("x").ids
        if not probe or probe[0] != self.special.bos:
            raise ValueError("tokenizer does not prepend BOS (expected a Llama-3 post-processor)")

    @classmethod
    def from_dir(cls, path: str | Path, cfg: ModelConfig) -> Prompter:
        path = Path(path)
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        bos = "<|begin_of_text|>"
        config_file = path / "tokenizer_config.json"
        if config_file.exists():
            token = json.loads(config_file.read_text()).get("bos_token") or bos
            bos = token["content"] if isinstance(token, dict) else token
        return cls(tokenizer, cfg, bos)

    def prefix(self, input_type: str) -> str:
        if input_type == "query":
            return self.cfg.query_prefix + " "
        if input_type == "passage":
            return self.cfg.passage_prefix + " "
        raise ValueError(f"input_type must be 'query' or 'passage'; got {input_type!r}")

    def encode(self, text: str | None, tiles: int, input_type: str,
               truncate: Truncate | str = Truncate.NONE, max_tokens: int | None = None) -> np.ndarray:
        """Token ids [L] int32 for one input with `tiles` image tiles (0 for text).

        Truncation cuts text tokens only: BOS, the prefix and the image tokens are always kept.
        """
        head = self._head(tiles, input_type)
        text = text or ""
        enc = self.tokenizer.encode(head + text)
        return self._finish(enc.ids, lambda: enc.offsets, head, bool(text), tiles, Truncate(truncate), max_tokens)

    def encode_batch(self, texts: Sequence[str], input_types: Sequence[str],
                     truncates: Sequence[Truncate | str], max_tokens: Sequence[int | None]
                     ) -> list[np.ndarray | Exception]:
        """`encode` for many text inputs in one tokenizer call (Rust, in parallel, without the GIL, and without
        character offsets, which only an input to be truncated needs: that one is encoded again with them): token
        ids, or the exception that input raised, in its own slot."""
        out: list[np.ndarray | Exception | None] = [None] * len(texts)
        prompts = []
        for i, (text, input_type, truncate) in enumerate(zip(texts, input_types, truncates)):
            try:
                prompts.append((i, self._head(0, input_type), text or "", Truncate(truncate)))
            except ValueError as e:
                out[i] = e
        # encode_batch_fast (tokenizers >= 0.20) skips the offsets; the same ids either way.
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encodings = encode([head + text for _, head, text, _ in prompts]) if prompts else []
        for (i, head, text, truncate), enc in zip(prompts, encodings):
            try:
                out[i] = self._finish(enc.ids, lambda p=head + text: self.tokenizer.encode(p).offsets, head,
                                      bool(text), 0, truncate, max_tokens[i])
            except ValueError as e:
                out[i] = e
        return out  # type: ignore[return-value]

    def _head(self, tiles: int, input_type: str) -> str:
        return self.prefix(input_type) + (f"{IMG_START}{IMG_END} " if tiles else "")

    def _finish(self, token_ids: list[int], offsets: Callable[[], list[tuple[int, int]]], head: str, has_text: bool,
                tiles: int, truncate: Truncate, max_tokens: int | None) -> np.ndarray:
        """The tokenizer's ids -> the prompt's ids: image tokens inserted, truncated to `max_tokens` as asked.
        `offsets` gives each token's character span, read only when truncating."""
        ids = np.asarray(token_ids, dtype=np.int32)
        if tiles:
            at = int(np.flatnonzero(ids == self.special.img_start)[0]) + 1
            image = np.full(tiles * self.cfg.tokens_per_tile, self.special.img_context, dtype=np.int32)
            ids = np.concatenate([ids[:at], image, ids[at:]])
        if max_tokens is None or len(ids) <= max_tokens:
            return ids
        # Tokens that lie wholly inside the prompt head (BOS has an empty span at 0) are protected;
        # a token straddling the boundary (" hello" taking the head's space) counts as text.
        fixed = len(ids)
        if has_text:
            fixed = sum(1 for _, end in offsets() if end <= len(head) - (1 if tiles else 0))
            fixed += tiles * self.cfg.tokens_per_tile
        if truncate is Truncate.NONE or fixed > max_tokens:
            raise InputTooLongError(len(ids), max_tokens)
        keep = max_tokens - fixed
        head_ids, text_ids = ids[:fixed], ids[fixed:]
        text_ids = text_ids[:keep] if truncate is Truncate.END else text_ids[len(text_ids) - keep:]
        return np.concatenate([head_ids, text_ids])
