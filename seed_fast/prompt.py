"""The image vocabulary and the prompt format of a SEED LLM, without torch.

`seed_fast.models.llm.seed_llm.SeedLLM` and the onnxruntime runtime (`seed_fast.export.runtime`) both build
their token ids here, so an exported model reads exactly the prompts the torch one does.

An image in a token sequence is `<img>` + 32 image tokens + `</img>`. Image token `<img_XXXXX>` has
id `base + code`, where `base` is the text vocabulary size, then `<img>` = base + 8192 and
`</img>` = base + 8193: for LLaMA's 32000 text tokens that is SEED-LLaMA's released layout
(vocabulary 40194).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"
BOI_TOKEN, EOI_TOKEN = "<img>", "</img>"
IMAGE_TOKEN_TEXT = re.compile(r"</?img>|<img_\d+>")  # what a text tokenizer would read as image-vocabulary tokens


class PromptError(ValueError):
    """A prompt that does not fit its images, or holds an image token's text."""


def image_token(code: int) -> str:
    return f"<img_{code:05d}>"


@dataclass(frozen=True)
class ImageVocab:
    """Where the image tokens sit in the LM's vocabulary."""

    base: int  # id of <img_00000>: the size of the text vocabulary
    num_codes: int = 8192
    tokens_per_image: int = 32

    @property
    def boi(self) -> int:
        return self.base + self.num_codes

    @property
    def eoi(self) -> int:
        return self.base + self.num_codes + 1

    @property
    def size(self) -> int:
        """The smallest LM vocabulary that holds the image tokens."""
        return self.base + self.num_codes + 2

    def code_id(self, code: int) -> int:
        return self.base + code

    def image_ids(self, codes) -> list[int]:
        """One image's codes -> `<img>` + image tokens + `</img>` ids."""
        return [self.boi] + [self.base + int(c) for c in codes] + [self.eoi]

    def token_names(self) -> list[str]:
        return [image_token(c) for c in range(self.num_codes)] + [BOI_TOKEN, EOI_TOKEN]


@dataclass(frozen=True)
class PromptTemplate:
    """How a request becomes text. `<image>` marks where an image's tokens go.

    chat:     wraps the user's turn (`{prompt}`), e.g. Vicuna's "USER: {prompt}\\nASSISTANT:"
    caption:  the default captioning turn
    answer:   a question about an image (`{question}`)
    generate: an image request (`{text}`); `<img>` is appended after the chat wrapper
    """

    name: str
    chat: str = "{prompt}"
    caption: str = "<image>"
    answer: str = "<image>{question}"
    generate: str = "{text}"
    add_bos: bool = True


SEED_LLAMA_CAPTION = "<image>Please provide an accurate and concise description of the given image."
TEMPLATES = {
    "seed-llama-8b": PromptTemplate("seed-llama-8b", chat="USER: {prompt}\nASSISTANT:", caption=SEED_LLAMA_CAPTION),
    "seed-llama-14b": PromptTemplate("seed-llama-14b", chat="[INST] {prompt} [/INST]\n", caption=SEED_LLAMA_CAPTION),
    "seed-opt": PromptTemplate(
        "seed-opt",
        caption="<image>a photo of",
        answer="<image>Question: {question} Short answer.",
        generate="Generate an image {text}",
    ),
    "plain": PromptTemplate("plain"),
}


def get_template(template: str | dict | PromptTemplate) -> PromptTemplate:
    """A template by name, from its saved fields (seed_llm.json, the ONNX manifest), or as given."""
    if isinstance(template, PromptTemplate):
        return template
    if isinstance(template, dict):
        return PromptTemplate(**template)
    if template not in TEMPLATES:
        raise ValueError(
            f"unknown prompt template {template!r}; choose from {sorted(TEMPLATES)} or pass a PromptTemplate"
        )
    return TEMPLATES[template]


def encode_prompt(
    text: str,
    codes: Sequence | None,
    *,
    template: PromptTemplate,
    vocab: ImageVocab,
    text_ids: Callable[[str], list[int]],
    bos_id: int | None,
    chat: bool = True,
    where: str = "prompt",
) -> list[int]:
    """One prompt with `<image>` placeholders -> token ids, each placeholder replaced by an image's
    `<img>` + codes + `</img>`. codes: one row of codes per placeholder, in order. text_ids: the text
    tokenizer, without special tokens. Raises PromptError naming `where`."""
    if not isinstance(text, str):
        raise PromptError(f"{where} must be a string, got {type(text).__name__}")
    n_images = 0 if codes is None else len(codes)
    if text.count(IMAGE_PLACEHOLDER) != n_images:
        raise PromptError(
            f"{where} has {text.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholder(s) "
            f"but {n_images} image(s) were given: {text!r}"
        )
    typed = IMAGE_TOKEN_TEXT.search(text)
    if typed:
        raise PromptError(
            f"{where} contains {typed.group(0)!r}, an image token's text; images enter a prompt as images or "
            f"codes at {IMAGE_PLACEHOLDER} placeholders, never as typed text: {text!r}"
        )
    if chat:
        text = template.chat.format(prompt=text)
    ids = [bos_id] if template.add_bos and bos_id is not None else []
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        ids += text_ids(piece) if piece else []
        if i < n_images:
            ids += vocab.image_ids(codes[i])
    return ids


def unconditional_ids(template: PromptTemplate, vocab: ImageVocab, bos_id: int | None) -> list[int]:
    """The prompt `<img>` alone (LaVIT-style guidance and SEED's negative embedding)."""
    return ([bos_id] if template.add_bos and bos_id is not None else []) + [vocab.boi]


# ------------------------------------------------------------------------ image codes
# The checks of an image-code batch that SeedTokenizer / SeedLLM (torch) and the runtime (numpy) share,
# so that both refuse the same input with the same words. `error` is the caller's exception class.


def check_codes_dtype(dtype, is_integer: bool, error: type = ValueError) -> None:
    if not is_integer:
        raise error(f"codes must be integers (int64 / int32), got {str(dtype).replace('torch.', '')}")


def check_codes_shape(shape: tuple, num_codes: int, error: type = ValueError) -> None:
    """Codes must be (B, num_codes) with B > 0."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        hint = " (one image? add a batch dimension: codes[None])" if len(shape) == 1 else ""
        raise error(f"codes must have shape (B, {num_codes}), got {shape}{hint}")
    if shape[0] == 0:
        raise error("codes is an empty batch (B = 0)")
    if shape[1] != num_codes:
        raise error(f"each image needs exactly {num_codes} codes, got {shape[1]} (shape {shape})")


def check_codes_range(lo: int, hi: int, codebook_size: int, first_bad, error: type = ValueError) -> None:
    """lo / hi: the batch's extremes; first_bad() -> the (row, column) of the first code out of range,
    called only then."""
    if lo < 0 or hi >= codebook_size:
        raise error(
            f"codes must lie in [0, {codebook_size}), got values in [{lo}, {hi}] "
            f"(first bad at index {tuple(int(i) for i in first_bad())})"
        )
