# Copyright 2026 The tokenpacker_hf authors. Licensed under the Apache License, Version 2.0.
"""Processor of TokenPacker: images and prompts in, the exact token layout of the original models out.

Each `<image>` in a prompt is expanded at the id level (never by string replacement, so separators cannot merge
with neighbouring text) into the layout the original TokenPacker / TokenPacker-HD models were trained with:
T image ids in pad/square mode; in slice mode, per grid row the row's tiles joined by the tile separator and
closed by the row separator, then the thumbnail and a row separator.

The text around the images is tokenised as the original's `tokenizer_image_token` did with its slow SentencePiece
tokenizer (transformers 4.31): the prompt is split at `<image>`, each chunk is tokenised as a text of its own (so it
starts with the SentencePiece dummy prefix `▁`), only the first chunk keeps its BOS, and the chunks are joined by
the image token. Inside a chunk, the text after a special token such as `</s>` follows the tokenizer's `legacy`
setting as the slow tokenizer did: see `TokenPackerProcessor.encode_prompt`.
"""

import bisect
import itertools
from pathlib import Path
from typing import Any

from transformers import AutoImageProcessor, AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin

from .configuration_tokenpacker import TokenPackerConfig
from .image_processing_tokenpacker import (
    TokenPackerImageProcessor,
    TokenPackerImagesKwargs,
    flatten_images,
    has_thumbnail,
    num_tiles,
)


def with_image_and_pad_tokens(tokenizer: Any, image_token: str = "<image>") -> Any:
    """`tokenizer` with `image_token` as one special token (added when absent) and a pad token (`<unk>`, else the
    end-of-sequence token, when it has none). Raises if `image_token` still encodes to several tokens."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    ids = tokenizer.encode(f"a{image_token}b", add_special_tokens=False)
    if ids.count(image_token_id) != 1:
        pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(image_token, add_special_tokens=False))
        raise ValueError(
            f"expected {image_token!r} to be one token of the tokenizer, but it encodes as {pieces}; make it a "
            f"special token (tokenizer.add_tokens([{image_token!r}], special_tokens=True))"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


def tower_normalisation(vision_model_name_or_path: str) -> dict[str, list[float]]:
    """`image_mean` and `image_std` from a vision checkpoint's preprocessor config; {} when it has none."""
    try:
        tower_processor = AutoImageProcessor.from_pretrained(vision_model_name_or_path)
    except OSError:
        return {}
    return {"image_mean": list(tower_processor.image_mean), "image_std": list(tower_processor.image_std)}


VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# The original `vicuna_v1` prompt format, shipped beside this module as a readable template. A copy of this module
# running as remote code has no file beside it: a saved folder brings its own `chat_template.jinja` instead.
VICUNA_V1_CHAT_TEMPLATE_FILE = Path(__file__).with_name("chat_template.jinja")


def vicuna_v1_chat_template() -> str | None:
    """The package's `vicuna_v1` chat template (with `{% generation %}` around what the model generates); None
    where this module runs without the template file beside it (as remote code)."""
    if not VICUNA_V1_CHAT_TEMPLATE_FILE.is_file():
        return None
    return VICUNA_V1_CHAT_TEMPLATE_FILE.read_text(encoding="utf-8")


class TokenPackerProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: TokenPackerImagesKwargs


def count_image_tokens(rows: int, cols: int, tokens_per_tile: int, image_mode: str = "slice") -> int:
    """Sequence positions one image takes: `T` in pad/square mode; in slice mode `T + 1` for a 1×1 grid and
    `(n + 1)(T + 1)` for n = rows·cols > 1 (n tiles and the thumbnail, each followed by one separator)."""
    if image_mode != "slice":
        return tokens_per_tile
    return num_tiles((rows, cols)) * (tokens_per_tile + 1)


def pad_expanded(
    tokenizer: Any,
    sequences: list[list[int]],
    padding: bool | str = True,
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
    padding_side: str | None = None,
    return_tensors: str | None = None,
) -> Any:
    """Expanded id sequences padded by the tokenizer's own `pad`, with the attention mask built from their lengths:
    a mask derived from ids would hide the slice-mode row separator wherever it equals the pad id (`<unk>` with the
    LLaMA vocabulary), so `pad` is handed a mask of ones and only extends it with zeros.

    Returns:
        `BatchEncoding` with `input_ids` and `attention_mask` (`[batch, length]` lists, or tensors).
    """
    return tokenizer.pad(
        {"input_ids": sequences, "attention_mask": [[1] * len(sequence) for sequence in sequences]},
        padding=padding, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side,
        return_tensors=return_tensors,
    )  # fmt: skip


def pad_row(row: list, count: int, value: Any, side: str) -> list:
    """`row` with `count` copies of `value` on `side` ("left" or "right")."""
    return [value] * count + row if side == "left" else row + [value] * count


class TokenPackerProcessor(ProcessorMixin):
    r"""
    Wraps a tokenizer and a [`TokenPackerImageProcessor`] into a single processor.

    Args:
        image_processor ([`TokenPackerImageProcessor`]): Its `image_mode` decides the token layout.
        tokenizer ([`PreTrainedTokenizerBase`]): Must know `image_token` as a single token.
        chat_template (`str`, *optional*): Defaults to the original `vicuna_v1` prompt format.
        image_token (`str`, defaults to `"<image>"`): Placeholder, one per image, in prompts.
        num_image_tokens (`int`, defaults to 144): Tokens per tile T = (G/s)² of the model
            (`config.num_image_tokens`); see [`~TokenPackerProcessor.from_config`].
        tile_separator, row_separator (`str` or `int`, default `","` and `"\n"`): Slice-mode separators. A
            string is looked up with `tokenizer.convert_tokens_to_ids` as the original does; with the LLaMA
            vocabulary `"\n"` is no token and falls back to `<unk>` (id 0), which is what the released
            TokenPacker-HD models saw. An int is used as the id itself.

    Calling it returns `input_ids`, `attention_mask` (from real padding only: the separator can equal the pad
    id), and with images `pixel_values` `[total_tiles, 3, S, S]` and `image_grids` `[num_images, 2]`. On request
    it also returns `text_replacement_offsets` and `offset_mapping`, what serving engines (vLLM's Transformers
    backend) and `apply_chat_template(..., return_assistant_tokens_mask=True)` read (see `__call__`).
    """

    valid_processor_kwargs = TokenPackerProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        num_image_tokens: int = 144,
        tile_separator: str | int = ",",
        row_separator: str | int = "\n",
        **kwargs,
    ):
        if chat_template is None:
            chat_template = vicuna_v1_chat_template()
        if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be a positive int, got {num_image_tokens!r}")
        self.image_token = image_token
        self.num_image_tokens = num_image_tokens
        self.tile_separator = tile_separator
        self.row_separator = row_separator
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_config(cls, config: Any, image_processor=None, tokenizer=None, **kwargs) -> "TokenPackerProcessor":
        """A processor matching a `TokenPackerConfig`: T = `config.num_image_tokens`, and a default image
        processor with the vision tower's tile size when none is given."""
        if image_processor is None:
            image_processor = TokenPackerImageProcessor.from_vision_config(config.vision_config)
        if image_processor.tile_size != config.vision_config.image_size:
            raise ValueError(
                f"image_processor.tile_size ({image_processor.tile_size}) must equal the vision tower's "
                f"image_size ({config.vision_config.image_size})"
            )
        kwargs.setdefault("num_image_tokens", config.num_image_tokens)
        return cls(image_processor=image_processor, tokenizer=tokenizer, **kwargs)

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str,
        text_model_name_or_path: str,
        image_mode: str = "pad",
        max_slices: int = 9,
        chat_template: str | None = None,
        image_token: str = "<image>",
        **config_kwargs,
    ) -> "TokenPackerProcessor":
        """The processor of a new model composed with `TokenPackerForConditionalGeneration.from_vision_text_pretrained`
        (pass it the same `config_kwargs`, and this processor).

        The tokenizer is the LLM's, with `image_token` added as a special token when absent and a pad token (its
        `<unk>`, else its end-of-sequence token) when it has none; the image processor tiles at the tower's
        `image_size` and normalises with the tower's own mean and std (CLIP's when the checkpoint has no
        preprocessor config); `chat_template` defaults to the original `vicuna_v1` format.
        """
        config = TokenPackerConfig.from_vision_text_pretrained(
            vision_model_name_or_path, text_model_name_or_path, **config_kwargs
        )
        tokenizer = with_image_and_pad_tokens(AutoTokenizer.from_pretrained(text_model_name_or_path), image_token)
        image_processor = TokenPackerImageProcessor.from_vision_config(
            config.vision_config,
            image_mode=image_mode,
            max_slices=max_slices,
            **tower_normalisation(vision_model_name_or_path),
        )
        return cls.from_config(
            config,
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=chat_template,
            image_token=image_token,
        )

    @property
    def image_token_id(self) -> int:
        """Id of `image_token`; it must be a single token of the tokenizer."""
        token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer has no token {self.image_token!r} (got id {token_id}); add it as a special token "
                f"(and resize the model's embeddings) first"
            )
        return token_id

    def _separator_id(self, separator: str | int) -> int:
        if isinstance(separator, int):
            return separator
        token_id = self.tokenizer.convert_tokens_to_ids(separator)
        if token_id is None:  # the original's slow LLaMA tokenizer returns unk for unknown pieces
            token_id = self.tokenizer.unk_token_id
        return token_id

    @property
    def separator_ids(self) -> tuple[int, int]:
        """(tile separator id, row separator id) as inserted in slice mode."""
        return self._separator_id(self.tile_separator), self._separator_id(self.row_separator)

    @property
    def image_mode(self) -> str:
        return self.image_processor.image_mode

    def image_token_layout(self, grid: tuple[int, int], image_mode: str | None = None) -> list[int]:
        """Ids replacing one `<image>` with tile grid (rows, cols), in the original's layout.

        Pad/square: T image ids. Slice: for each row `F , F , ... F \\n`, then if rows·cols > 1 the thumbnail
        `F \\n`, where F is a run of T image ids, `,` the tile separator id and `\\n` the row separator id.
        """
        image_mode = image_mode or self.image_mode
        tile = [self.image_token_id] * self.num_image_tokens
        if image_mode != "slice":
            return tile
        tile_separator, row_separator = self.separator_ids
        rows, cols = grid
        row = (tile + [tile_separator]) * (cols - 1) + tile + [row_separator]
        layout = row * rows
        if has_thumbnail(grid):
            layout += tile + [row_separator]
        return layout

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Tokenises `text`, expands each `<image>` into its token layout and preprocesses `images`.

        Args:
            images: one image, a list (in prompt order across the batch) or one list per prompt.
            text: a prompt or a list of prompts, with one `image_token` per image.
            padding, padding_side, truncation, max_length, pad_to_multiple_of, return_tensors, ...: as for
                tokenizers. Padding happens after expansion; truncation never cuts an image's tokens.
            return_text_replacement_offsets: also return, per prompt, one dict per image as transformers'
                `get_text_with_replacements` gives them: `type` "image", `span` of its `<image>` in the prompt,
                `new_span` in the expanded text (each `<image>` replaced by its `replacement`), `text` and
                `replacement`, the layout written as text that the tokenizer encodes back to exactly the
                layout's ids (raises if it cannot, unless offsets are asked for too: transformers' assistant
                masks read the replacements only as character spans). `image_grids` then comes as a list of
                `[2]` tensors, one entry per image, since engines split tensor fields into per-image items by
                tiles.
            return_offsets_mapping: also return `offset_mapping`, per token its `(start, end)` in the expanded
                text ((0, 0) at padding, empty for added tokens); needs a fast tokenizer.

        Returns:
            `BatchFeature` with `input_ids` and `attention_mask` (lists, or `[batch, seq]` with
            `return_tensors="pt"`), plus `pixel_values` `[total_tiles, 3, S, S]` and `image_grids`
            `[num_images, 2]` when images are given, and `text_replacement_offsets` / `offset_mapping`
            `[batch, seq, 2]` when asked for.
        """
        if text is None:
            raise ValueError("expected a prompt (text) with one image token per image, got text=None")
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if texts is None or not all(isinstance(prompt, str) for prompt in texts):
            raise ValueError(f"text must be a string or a list of strings, got {type(text).__name__}")
        if not texts:
            raise ValueError("expected at least one prompt, got an empty list of texts")
        output_kwargs = self._merge_kwargs(
            TokenPackerProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs = output_kwargs["text_kwargs"]
        images_kwargs = output_kwargs["images_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        # transformers 5.23/5.24 keep this flag at the top level and mirror it into text_kwargs (as ProcessorMixin
        # reads it).
        return_replacements = bool(
            text_kwargs.pop("return_text_replacement_offsets", output_kwargs.get("return_text_replacement_offsets"))
        )
        return_offsets = bool(text_kwargs.get("return_offsets_mapping"))
        if return_offsets and not self.tokenizer.is_fast:
            raise ValueError(
                f"return_offsets_mapping needs character offsets, i.e. a fast tokenizer; got "
                f"{type(self.tokenizer).__name__}"
            )

        add_special_tokens = text_kwargs.get("add_special_tokens", True)
        encoded = [self.encode_prompt(prompt, add_special_tokens) for prompt in texts]
        empty = [index for index, (ids, _) in enumerate(encoded) if not ids]
        if empty:
            raise ValueError(f"expected prompts that give at least one token, but prompts {empty} give none")
        image_token_id = self.image_token_id
        images_per_prompt = [ids.count(image_token_id) for ids, _ in encoded]
        image_list = self._check_image_counts(images, images_per_prompt)

        image_inputs: dict[str, Any] = {}
        grids: list[tuple[int, int]] = []
        if image_list:
            image_inputs = dict(self.image_processor(image_list, **{**images_kwargs, "return_tensors": "pt"}))
            grids = [tuple(grid) for grid in image_inputs["image_grids"].tolist()]
        image_mode = images_kwargs.get("image_mode") or self.image_mode
        # Only the offsets need the layouts as text; each distinct grid is written (and checked) once. Engines
        # (vLLM) re-encode the replacement texts and ask for no offsets; with offsets the texts only place spans.
        replacements = (
            {grid: self._image_replacement(grid, image_mode, check=not return_offsets) for grid in set(grids)}
            if return_replacements or return_offsets
            else {}
        )

        sequences, image_spans, token_offsets, replacement_offsets = [], [], [], []
        grid_iter = iter(grids)
        for prompt, (ids, offsets) in zip(texts, encoded, strict=True):
            placeholders = iter(self._placeholder_spans(prompt))
            sequence, spans, positions, entries = [], [], [], []
            gained = 0  # characters the replacements so far add to the prompt: the shift into the expanded text
            for index, token_id in enumerate(ids):
                if token_id != image_token_id:
                    sequence.append(token_id)
                    if return_offsets:
                        begin, end = offsets[index]
                        positions.append((begin + gained, end + gained))
                    continue
                grid = next(grid_iter)
                layout = self.image_token_layout(grid, image_mode)
                spans.append((len(sequence), len(sequence) + len(layout)))
                sequence.extend(layout)
                if replacements:
                    replacement, piece_spans = replacements[grid]
                    begin, end = next(placeholders)
                    new_begin = begin + gained
                    entries.append({
                        "type": "image",
                        "span": (begin, end),
                        "new_span": (new_begin, new_begin + len(replacement)),
                        "text": self.image_token,
                        "replacement": replacement,
                    })  # fmt: skip
                    if return_offsets:
                        positions.extend((new_begin + piece_begin, new_begin + piece_end)
                                         for piece_begin, piece_end in piece_spans)  # fmt: skip
                    gained += len(replacement) - (end - begin)
            sequences.append(sequence)
            image_spans.append(spans)
            token_offsets.append(positions)
            replacement_offsets.append(entries)

        if text_kwargs.get("truncation") not in (None, False, "do_not_truncate"):
            windows = self._truncation_windows(sequences, image_spans, text_kwargs.get("max_length"))
            # Offsets keep pointing into the whole expanded text; truncation never cuts an image, so every
            # replacement entry stays valid.
            sequences = [sequence[window] for sequence, window in zip(sequences, windows, strict=True)]
            token_offsets = [positions[window] for positions, window in zip(token_offsets, windows, strict=True)]
        input_ids, attention_mask, offset_mapping = self._pad(sequences, text_kwargs, token_offsets)
        if return_tensors is not None and len({len(ids) for ids in input_ids}) > 1:
            raise ValueError(
                f"prompts expand to different lengths {[len(ids) for ids in input_ids]}; pass padding=True to "
                f"return tensors"
            )
        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if return_offsets:
            data["offset_mapping"] = offset_mapping
        if return_replacements:
            data["text_replacement_offsets"] = replacement_offsets
        data.update(image_inputs)
        skip_tensor_conversion = list(self.skip_tensor_conversion)
        if return_replacements and image_inputs:
            # Serving engines (vLLM's Transformers backend) split every tensor field into per-image items by rows
            # per image's tiles, right for `pixel_values [tiles, ...]` but not for the one row per image of
            # `image_grids`; a list is taken as one entry per image. Engines ask for replacement offsets, so
            # that is when the grids come as a list; the model accepts both forms.
            data["image_grids"] = list(image_inputs["image_grids"].unbind(0))
            skip_tensor_conversion.append("image_grids")
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=skip_tensor_conversion)

    def _image_replacement(
        self, grid: tuple[int, int], image_mode: str, check: bool = True
    ) -> tuple[str, list[tuple[int, int]]]:
        """The text that stands for one image's layout (`image_token_layout(grid, image_mode)`) in
        `text_replacement_offsets`, and each layout id's character span in it.

        Serving engines (vLLM's Transformers backend) encode this text alone with
        `tokenizer.encode(text, add_special_tokens=False)` and put the ids they get into the prompt, so it must
        give back exactly the layout. Each id is written as the tokenizer decodes it alone (`<image>`, `,`, and
        `<unk>` for the LLaMA vocabulary's row separator), and with `check` the round trip is checked: a tokenizer
        that encodes the text otherwise (a SentencePiece one with `legacy=True` reads `,` after `<image>` as `▁,`)
        raises, rather than describe ids the model was never given. Without `check` the text only gives
        character positions (offsets for assistant masks), which need no round trip.
        """
        layout = self.image_token_layout(grid, image_mode)
        image_token_id = self.image_token_id
        pieces = {
            token_id: self.image_token if token_id == image_token_id else self.tokenizer.decode([token_id])
            for token_id in set(layout)
        }
        ends = list(itertools.accumulate(len(pieces[token_id]) for token_id in layout))
        text = "".join(pieces[token_id] for token_id in layout)
        encoded = self.tokenizer.encode(text, add_special_tokens=False) if check else layout
        if encoded != layout:
            position = next((i for i, pair in enumerate(zip(encoded, layout, strict=False)) if pair[0] != pair[1]),
                            min(len(encoded), len(layout)))  # fmt: skip
            found = self.tokenizer.convert_ids_to_tokens(encoded[position : position + 1]) or ["nothing"]
            expected = self.tokenizer.convert_ids_to_tokens(layout[position : position + 1]) or ["nothing"]
            raise ValueError(
                f"cannot write the {image_mode}-mode layout of a {grid[0]}x{grid[1]} grid as text: the tokenizer "
                f"encodes its text back to {len(encoded)} ids instead of {len(layout)}, with {found[0]!r} instead "
                f"of {expected[0]!r} at position {position}; text_replacement_offsets (what vLLM serves from) "
                f"would describe ids the model never sees. Use separators that the tokenizer encodes alone "
                f"(special tokens), or a SentencePiece tokenizer with legacy=False"
            )
        return text, [(end - len(pieces[token_id]), end) for token_id, end in zip(layout, ends, strict=True)]

    def _placeholder_spans(self, prompt: str) -> list[tuple[int, int]]:
        """Character span of each `image_token` in `prompt`, found as `encode_prompt` splits the prompt."""
        ends = itertools.accumulate(len(chunk) + len(self.image_token) for chunk in prompt.split(self.image_token)[:-1])
        return [(end - len(self.image_token), end) for end in ends]

    def encode_prompt(
        self, prompt: str, add_special_tokens: bool = True
    ) -> tuple[list[int], list[tuple[int, int]] | None]:
        """Ids of `prompt` before image expansion (one image token id per `image_token`), as the original's
        `tokenizer_image_token`, and each id's character span in `prompt` (None for a tokenizer without offsets).

        The prompt is split at `image_token` and each chunk is tokenised as a text of its own, so a chunk after an
        image starts with the SentencePiece dummy prefix (`<image>`, `▁`, `<0x0A>`, ... for `<image>\\n`) whatever
        the tokenizer's `legacy` setting; only the first chunk keeps its BOS. See `_encode_chunk` for the text after
        a special token inside a chunk. Tokens the tokenizer adds (BOS) have empty spans.

        A prompt that starts with the BOS token written out (as the chat template renders it) gets that BOS and no
        second one, whatever `add_special_tokens` says: TRL and transformers tokenise rendered chats with
        `add_special_tokens=False`, the original always had one BOS, and the text after it is tokenised as the
        start of a text, as the original's was.
        """
        bos = self.tokenizer.bos_token
        if not bos or not prompt.startswith(bos):
            return self._encode_chunks(prompt, add_special_tokens)
        ids, offsets = self._encode_chunks(prompt[len(bos) :], add_special_tokens=True)
        if ids[:1] == [self.tokenizer.bos_token_id]:  # the BOS the tokenizer added stands for the written one
            ids, offsets = ids[1:], offsets[1:] if offsets is not None else None
        ids = [self.tokenizer.bos_token_id] + ids
        if offsets is not None:
            offsets = [(0, len(bos))] + [(begin + len(bos), end + len(bos)) for begin, end in offsets]
        return ids, offsets

    def _encode_chunks(self, prompt: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]] | None]:
        """`encode_prompt` for a prompt that does not start with a written BOS."""
        with_offsets = self.tokenizer.is_fast
        legacy = self._sentencepiece_legacy() if with_offsets else None
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        start = 0
        for index, chunk in enumerate(prompt.split(self.image_token)):
            chunk_ids, chunk_offsets = self._encode_chunk(chunk, add_special_tokens, with_offsets, legacy)
            if index:
                # The original keeps the first chunk's BOS only (`tokenizer_image_token` drops x[0] of the others).
                if add_special_tokens and chunk_ids[:1] == [self.tokenizer.bos_token_id]:
                    chunk_ids, chunk_offsets = chunk_ids[1:], chunk_offsets[1:]
                ids.append(self.image_token_id)
                offsets.append((start - len(self.image_token), start))
            ids.extend(chunk_ids)
            offsets.extend(
                (begin + start, end + start) if end > begin else (start, start) for begin, end in chunk_offsets
            )
            start += len(chunk) + len(self.image_token)
        return ids, offsets if with_offsets else None

    def _sentencepiece_legacy(self) -> bool | None:
        """For a SentencePiece-style tokenizer (its BPE model has `▁` pieces: `▁a` gives `▁a` or `▁`, `a`): its
        `legacy` setting, from the attribute or the saved `tokenizer_config.json`, and True when it has none
        (transformers 4.31's default). None for any other tokenizer (byte-level ones).

        The model is asked rather than the tokenizer because transformers 5.23 turns a `tokenizer.model` into a
        fast tokenizer without the dummy prefix (5.24 adds it)."""
        try:
            probe = self.tokenizer.backend_tokenizer.model.tokenize("\u2581a")
        except Exception:  # a model without `▁` and without an unknown token cannot encode it: not SentencePiece
            return None
        if not probe or not probe[0].value.startswith("\u2581"):
            return None
        legacy = getattr(self.tokenizer, "legacy", None)
        if legacy is None:
            legacy = self.tokenizer.init_kwargs.get("legacy")
        return True if legacy is None else bool(legacy)

    def _encode_chunk(
        self, chunk: str, add_special_tokens: bool, with_offsets: bool, legacy: bool | None
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and offsets (an empty list without offsets) of one chunk between images, as the original's slow
        tokenizer (transformers 4.31) gave them for `tokenizer(chunk).input_ids`.

        A SentencePiece-style tokenizer (`legacy` is not None, see `_sentencepiece_legacy`) is split at the
        special tokens written in the chunk (`</s>` in multi-turn prompts) and each text segment is encoded as
        SentencePiece did (`_sentencepiece_encode`: the dummy prefix `▁` on every segment, even one that starts
        with a space). With `legacy=False` the slow tokenizer then cut that prefix from the first piece of a
        segment after a special token, unless the segment starts with a space: `</s>USER:` gives `US`, `ER`, `:`
        (not a fast tokenizer's `USER`, `:`), and a piece that is only `▁` disappears. Any other tokenizer (the
        byte-level ones) encodes the chunk itself.
        """
        encoded = self.tokenizer(chunk, add_special_tokens=add_special_tokens, return_offsets_mapping=with_offsets)
        ids = list(encoded["input_ids"])
        offsets = [tuple(span) for span in encoded["offset_mapping"]] if with_offsets else []
        if legacy is None or not with_offsets:
            return ids, offsets
        special_ids = set(self.tokenizer.added_tokens_decoder)
        fixed_ids: list[int] = []
        fixed_offsets: list[tuple[int, int]] = []
        # The text segment being read starts at `segment_start` (None after an added EOS) and follows a special
        # token written in the chunk when `after_special`; `flush` encodes it once its end is known.
        segment_start, after_special = 0, False

        def flush(segment_end: int) -> None:
            if segment_start is None or segment_end <= segment_start:
                return
            segment_ids, segment_offsets = self._sentencepiece_encode(chunk[segment_start:segment_end], segment_start)
            # 4.31 first turned `▁` into spaces, so a segment starting with either keeps its prefix.
            if after_special and not legacy and not chunk[segment_start:segment_end].startswith((" ", "\u2581")):
                segment_ids, segment_offsets = self._cut_dummy_prefix(segment_ids, segment_offsets)
            fixed_ids.extend(segment_ids)
            fixed_offsets.extend(segment_offsets)

        for token_id, (begin, end) in zip(ids, offsets, strict=True):
            if token_id not in special_ids:
                continue
            if end > begin:  # a special token written in the chunk: it ends the segment before it
                flush(begin)
                segment_start, after_special = end, True
            elif fixed_ids or segment_start != 0:  # added by the tokenizer after the text (EOS), not before (BOS)
                flush(len(chunk))
                segment_start = None
            fixed_ids.append(token_id)
            fixed_offsets.append((begin, end))
        flush(len(chunk))
        return fixed_ids, fixed_offsets

    def _sentencepiece_encode(self, text: str, start: int) -> tuple[list[int], list[tuple[int, int]]]:
        """SentencePiece's encoding of `text` (no special tokens in it) with the tokenizer's own BPE model: spaces
        as `▁` and the dummy prefix `▁` always added, which a fast Metaspace pre-tokenizer skips for a text that
        already starts with a space (`" grabbed"` is `▁`, `▁gra`, `bb`, `ed` in SentencePiece). Offsets are
        shifted by `start`; a piece that is only the dummy prefix has an empty span."""
        normalised = "\u2581" + text.replace(" ", "\u2581")
        pieces = self.tokenizer.backend_tokenizer.model.tokenize(normalised)
        # The model's offsets count bytes; char_ends[i] is the byte offset where character i ends.
        char_ends = list(itertools.accumulate(len(character.encode()) for character in normalised))
        spans = []
        for piece in pieces:
            begin = bisect.bisect_right(char_ends, piece.offsets[0])
            end = bisect.bisect_left(char_ends, piece.offsets[1])
            # Character 0 of `normalised` is the dummy prefix, which has no character in the text.
            spans.append((max(begin - 1, 0) + start, end + start))
        return [piece.id for piece in pieces], spans

    def _cut_dummy_prefix(
        self, ids: list[int], offsets: list[tuple[int, int]]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """`ids` with `▁` cut from the first piece, as the slow non-legacy tokenizer of transformers 4.31 did for
        text after a special token; a cut piece missing from the vocabulary becomes `<unk>`."""
        first = self.tokenizer.convert_ids_to_tokens(ids[0]) if ids else ""
        if not first.startswith("\u2581"):
            return ids, offsets
        if first == "\u2581":
            return ids[1:], offsets[1:]
        cut_id = self.tokenizer.convert_tokens_to_ids(first[1:])
        return [self.tokenizer.unk_token_id if cut_id is None else cut_id] + ids[1:], offsets

    def _check_image_counts(self, images: Any, images_per_prompt: list[int]) -> list[Any]:
        """The flat image list, after checking it holds exactly one image per image token (per prompt if
        images come as one list per prompt)."""
        expected = sum(images_per_prompt)
        if images is None:
            if expected:
                raise ValueError(
                    f"the prompts hold {expected} {self.image_token} tokens ({images_per_prompt} per prompt) but "
                    f"no images were given"
                )
            return []
        nested = (
            isinstance(images, (list, tuple))
            and len(images) == len(images_per_prompt)
            and all(isinstance(item, (list, tuple)) for item in images)
        )
        if nested:
            found = [len(flatten_images(item)) for item in images]
            if found != images_per_prompt:
                raise ValueError(
                    f"expected {images_per_prompt} images per prompt (one per {self.image_token} token), got {found}"
                )
        image_list = flatten_images(images)
        if len(image_list) != expected:
            raise ValueError(
                f"expected {expected} images (one per {self.image_token} token in the prompts, "
                f"{images_per_prompt} per prompt), got {len(image_list)} images"
            )
        return image_list

    def _truncation_windows(
        self, sequences: list[list[int]], image_spans: list[list[tuple[int, int]]], max_length: int | None
    ) -> list[slice]:
        """The part of each sequence kept by truncation to `max_length` on the tokenizer's truncation side; raises
        rather than cutting into (or dropping) an image's tokens."""
        if max_length is None:
            max_length = self.tokenizer.model_max_length
        left = self.tokenizer.truncation_side == "left"
        windows = []
        for index, (sequence, spans) in enumerate(zip(sequences, image_spans, strict=True)):
            if len(sequence) <= max_length:
                windows.append(slice(None))
                continue
            if spans:
                # Shortest length that keeps every image whole: from the first image's start (left truncation)
                # or up to the last image's end (right truncation).
                needed = len(sequence) - spans[0][0] if left else spans[-1][1]
                if needed > max_length:
                    raise ValueError(
                        f"truncation to max_length={max_length} would cut the image tokens of prompt {index}: it "
                        f"needs at least {needed} tokens to keep its {len(spans)} image(s) whole "
                        f"({len(sequence)} tokens in all); raise max_length or use fewer/smaller images"
                    )
            windows.append(slice(-max_length, None) if left else slice(None, max_length))
        return windows

    def _pad(
        self, sequences: list[list[int]], text_kwargs: dict, offsets: list[list[tuple[int, int]]]
    ) -> tuple[list[list[int]], list[list[int]], list[list[tuple[int, int]]]]:
        """Pads after expansion with `pad_expanded`, and the per-token character `offsets` to the same lengths
        with (0, 0) as a tokenizer's are."""
        side = text_kwargs.get("padding_side") or self.tokenizer.padding_side
        padding = text_kwargs.get("padding", False)
        # `max_length` also bounds truncation; padding reads it only when asked to pad to it.
        max_length = text_kwargs.get("max_length") if padding == "max_length" else None
        padded = pad_expanded(
            self.tokenizer, sequences, padding=padding, max_length=max_length,
            pad_to_multiple_of=text_kwargs.get("pad_to_multiple_of"), padding_side=side,
        )  # fmt: skip
        offset_mapping = [
            pad_row(positions, len(ids) - len(sequence), (0, 0), side)
            for positions, ids, sequence in zip(offsets, padded["input_ids"], sequences, strict=True)
        ]
        return padded["input_ids"], padded["attention_mask"], offset_mapping

    def _get_num_multimodal_tokens(self, image_sizes: list[tuple[int, int]] | None = None, **kwargs) -> MultiModalData:
        """Per image (height, width): the positions its `<image>` expands to and the tiles it yields, without
        running the image processor on pixels. `image_mode`, `max_slices` and `tile_size` in `kwargs` (flat or
        in an `images_kwargs` dict) override the image processor's settings as they do in a call.

        Returns:
            `MultiModalData(num_image_tokens=[...], num_image_patches=[...])`.
        """
        if image_sizes is None:
            return MultiModalData()
        # The image options a call takes, flat or under `images_kwargs`, decide the grids: vLLM passes its
        # `mm_processor_kwargs` here as they are given.
        options = {**kwargs, **(kwargs.get("images_kwargs") or {})}
        image_mode = options.get("image_mode") or self.image_mode
        grid_options = {key: options.get(key) for key in ("max_slices", "tile_size")}
        grids = [
            self.image_processor.get_image_grid(height, width, image_mode, **grid_options)
            for height, width in image_sizes
        ]
        return MultiModalData(
            num_image_tokens=[count_image_tokens(*grid, self.num_image_tokens, image_mode) for grid in grids],
            num_image_patches=[num_tiles(grid) for grid in grids],
        )

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grids"]


__all__ = [
    "TokenPackerProcessor",
    "count_image_tokens",
    "pad_expanded",
    "pad_row",
    "vicuna_v1_chat_template",
    "VICUNA_V1_SYSTEM",
]
