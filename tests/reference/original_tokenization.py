"""Independent reference ("oracle") for the original's prompt tokens and training labels, written from the authors'
code (CircleRadon/TokenPacker, a LLaVA-1.5 fork pinned to transformers 4.31: `llava/mm_utils.py`,
`llava/conversation.py`, `llava/train/train.py`) and transformers 4.31's slow `LlamaTokenizer`, not from
`tokenpacker_hf`.

Contents:
- `SentencePieceBPE`: SentencePiece's BPE encoding (identity normaliser, spaces as `▁`, the dummy prefix always
  added, byte fallback) from a vocabulary and merge ranks, in plain Python.
- `SlowLlamaTokenizer`: transformers 4.31's slow LLaMA tokenizer over any SentencePiece encoder: `tokenizer(text)`
  with BOS, split at the special tokens, and the `legacy` rule for the text after a special token.
- `tokenizer_image_token`: the original's prompt tokenisation (chunks split at `<image>`, `-200` between them).
- `expand_image_placeholders`: each `-200` replaced by its image tokens as `prepare_inputs_labels_for_multimodal`
  lays them out (pad: T tokens; slice: rows of tiles with separators, then the thumbnail).
- `preprocess_multimodal`, `vicuna_v1_prompt`, `preprocess_v1`: the original's training data path (sample
  rendering and per-round label masking).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
DEFAULT_IMAGE_TOKEN = "<image>"
SPIECE_UNDERLINE = "\u2581"
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class SentencePieceBPE:
    """SentencePiece BPE encoding from `vocab` (pieces in id order) and `merges` (pairs, highest priority first).

    `encode(text)` returns pieces: spaces become `▁`, `▁` is prepended (add_dummy_prefix, also before a leading
    space), the adjacent pair of highest priority is merged until none is left (leftmost first on ties), and a
    piece missing from the vocabulary falls back to its UTF-8 bytes `<0xXX>`. An empty text gives no pieces.
    """

    def __init__(self, vocab: Sequence[str], merges: Sequence[tuple[str, str]]):
        self.ids = {piece: index for index, piece in enumerate(vocab)}
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}

    def encode(self, text: str) -> list[str]:
        if not text:
            return []
        pieces = list(SPIECE_UNDERLINE + text.replace(" ", SPIECE_UNDERLINE))
        while len(pieces) > 1:
            rank, index = min(
                (self.ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(pieces, pieces[1:], strict=False))
            )
            if rank == float("inf"):
                break
            pieces[index : index + 2] = [pieces[index] + pieces[index + 1]]
        out = []
        for piece in pieces:
            out += [piece] if piece in self.ids else [f"<0x{byte:02X}>" for byte in piece.encode()]
        return out

    def piece_to_id(self, piece: str) -> int:
        return self.ids.get(piece, self.ids["<unk>"])


class SlowLlamaTokenizer:
    """transformers 4.31's slow `LlamaTokenizer` (`use_fast=False`, as the original trains and evaluates) over a
    SentencePiece encoder: `encode(text) -> pieces` and `piece_to_id(piece) -> id` (unknown pieces -> unk).

    `tokenizer(text).input_ids` is BOS + the pieces of `tokenize(text)`. `tokenize` splits the text at the special
    tokens (`<s>`, `</s>`, `<unk>`: AddedTokens without lstrip/rstrip, so no whitespace is stripped around them)
    and encodes each segment with the dummy prefix. With `legacy=False`, 4.31 first replaces `▁` by spaces and
    prepends one `▁` to the text (so only the first segment starts with it), and for every other segment that does
    not start with a space it cuts `▁` from the first piece (dropping a piece that was only `▁`).
    """

    def __init__(
        self,
        encode: Callable[[str], list[str]],
        piece_to_id: Callable[[str], int],
        legacy: bool,
        bos_token_id: int = 1,
        special_tokens: Sequence[str] = ("<unk>", "<s>", "</s>"),
    ):
        self.encode, self.piece_to_id, self.legacy = encode, piece_to_id, legacy
        self.bos_token_id = bos_token_id
        self.special_tokens = sorted(special_tokens, key=len, reverse=True)

    def __call__(self, text: str) -> Encoding:
        return Encoding([self.bos_token_id] + [self.piece_to_id(piece) for piece in self.tokenize(text)])

    def tokenize(self, text: str) -> list[str]:
        if not self.legacy:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        pieces = []
        for segment in self.split_special(text):
            if segment in self.special_tokens:
                pieces.append(segment)
            elif segment:
                pieces.extend(self._tokenize(segment))
        return pieces

    def split_special(self, text: str) -> list[str]:
        segments, start, position = [], 0, 0
        while position < len(text):
            token = next((t for t in self.special_tokens if text.startswith(t, position)), None)
            if token is None:
                position += 1
                continue
            segments += [text[start:position], token]
            position = start = position + len(token)
        return segments + [text[start:]]

    def _tokenize(self, text: str) -> list[str]:
        is_first = False
        if not self.legacy:
            is_first = text.startswith(SPIECE_UNDERLINE)
            if is_first:
                text = text[1:]
        tokens = self.encode(text)
        if (
            not self.legacy
            and not is_first
            and not text.startswith(" ")
            and tokens
            and tokens[0].startswith(SPIECE_UNDERLINE)
        ):
            tokens = ([tokens[0][1:]] if len(tokens[0]) > 1 else []) + tokens[1:]
        return tokens


class Encoding:
    def __init__(self, input_ids: list[int]):
        self.input_ids = input_ids


def tokenizer_image_token(prompt: str, tokenizer: SlowLlamaTokenizer, image_token_index: int = IMAGE_TOKEN_INDEX):
    """`llava/mm_utils.py::tokenizer_image_token`, as in the original."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X), strict=True) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])

    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def expand_image_placeholders(
    values: Sequence[int],
    grids: Sequence[tuple[int, int]],
    mode: str,
    tokens_per_tile: int,
    image_value: int,
    separator_values: tuple[int, int],
) -> list[int]:
    """`values` with the k-th `-200` replaced by image k's positions as `prepare_inputs_labels_for_multimodal`
    splices them: pad mode `tokens_per_tile` positions; slice mode, per row of the (rows, cols) grid, each tile
    followed by the tile separator, the row's last by the row separator, then when rows·cols > 1 the thumbnail
    and a row separator. Image positions are `image_value`, separators `separator_values` (e.g. their token ids,
    or -100 twice for labels)."""
    out, grid_iter = [], iter(grids)
    tile = [image_value] * tokens_per_tile
    comma, newline = separator_values
    for value in values:
        if value != IMAGE_TOKEN_INDEX:
            out.append(value)
            continue
        rows, cols = next(grid_iter)
        if mode != "slice":
            out += tile
            continue
        for _ in range(rows):
            for col in range(cols):
                out += tile + [comma if col < cols - 1 else newline]
        if rows * cols > 1:
            out += tile + [newline]
    return out


def preprocess_multimodal(sources: list[list[dict]]) -> list[list[dict]]:
    """`llava/train/train.py::preprocess_multimodal` for the released models' settings (is_multimodal,
    mm_use_im_start_end False, conversation version v1); works on a deep copy."""
    sources = copy.deepcopy(sources)
    for source in sources:
        for sentence in source:
            if DEFAULT_IMAGE_TOKEN in sentence["value"]:
                sentence["value"] = sentence["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
                sentence["value"] = DEFAULT_IMAGE_TOKEN + "\n" + sentence["value"]
                sentence["value"] = sentence["value"].strip()
    return sources


def vicuna_v1_prompt(messages: Sequence[tuple[str, str | None]], system: str = VICUNA_V1_SYSTEM) -> str:
    """`Conversation.get_prompt()` of `conv_vicuna_v1` (SeparatorStyle.TWO, sep " ", sep2 "</s>"); a message of
    None is the generation prompt `ROLE:`."""
    seps = [" ", "</s>"]
    ret = system + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


def preprocess_v1(
    sources: list[list[dict]], tokenizer: SlowLlamaTokenizer, has_image: bool, pad_token_id: int = 0
) -> tuple[list[int], list[int]]:
    """`llava/train/train.py::preprocess_v1` for one sample: (input_ids, labels) with `-200` per image. The pad
    token is `<unk>` (id 0), as the original sets for vicuna; a sample whose round lengths do not add up to its
    length is masked entirely, as the original does ("tokenization mismatch")."""
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    source = sources[0]
    if roles[source[0]["from"]] != "USER":
        source = source[1:]
    messages = []
    for j, sentence in enumerate(source):
        role = roles[sentence["from"]]
        assert role == ("USER", "ASSISTANT")[j % 2], j
        messages.append((role, sentence["value"]))
    conversation = vicuna_v1_prompt(messages)

    def tokenize(text: str) -> list[int]:
        return tokenizer_image_token(text, tokenizer) if has_image else tokenizer(text).input_ids

    input_ids = tokenize(conversation)
    target = list(input_ids)
    sep = " " + "ASSISTANT" + ": "
    total_len = sum(token != pad_token_id for token in target)
    rounds = conversation.split("</s>")
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for rou in rounds:
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenize(rou))
        instruction_len = len(tokenize(parts[0])) - 2
        target[cur_len : cur_len + instruction_len] = [IGNORE_INDEX] * len(target[cur_len : cur_len + instruction_len])
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * len(target[cur_len:])
    if cur_len != total_len:  # the original checks this only below model_max_length, which these samples are
        target = [IGNORE_INDEX] * len(target)
    return input_ids, target
