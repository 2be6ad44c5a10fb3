"""Captions, generations and exports raise no deprecation from the newest transformers, diffusers and
peft that the bounds allow (what `make test` installs). Each call runs with FutureWarning and
DeprecationWarning turned into errors, and with the three libraries' loggers watched for their
deprecation notices (transformers logs some of them instead of warning)."""

import contextlib
import logging
import warnings

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from seed_fast.default_model import load_default  # noqa: E402
from seed_fast.synthetic import sample_images  # noqa: E402

LIBRARIES = ("transformers", "diffusers", "peft")


class _Notices(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = []

    def emit(self, record):
        text = record.getMessage()
        if "deprecat" in text.lower():
            self.seen.append(f"{record.name}: {text}")


@contextlib.contextmanager
def no_deprecations():
    handler = _Notices()
    loggers = [logging.getLogger(name) for name in LIBRARIES]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
                warnings.simplefilter("error", category)
            yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    assert not handler.seen, handler.seen


@pytest.fixture(scope="module")
def default():
    return load_default()


def test_the_guard_catches_a_deprecation():
    with pytest.raises(FutureWarning):
        with no_deprecations():
            warnings.warn("`past_key_values` is deprecated", FutureWarning)
    with pytest.raises(AssertionError, match="deprecated"):
        with no_deprecations():
            logging.getLogger("transformers.generation").warning("`x` is deprecated. Use `y` instead.")


def test_captions_and_answers(default):
    images = sample_images(2, seed=3)[0]
    with no_deprecations():
        default.llm.caption(images, max_new_tokens=6)
        default.llm.answer(images, "what color?", max_new_tokens=3)


def test_generation_with_guidance(default):
    with no_deprecations():
        default.llm.generate_images(
            ["one red circle", "two blue squares"], num_inference_steps=2, guidance_scale=2.0, progress=False
        )


def test_stock_unclip_generation_and_peft_lora():
    from seed_fast.models.decoders.unclip import tiny_unclip_pipeline
    from seed_fast.models.llm.seed_llm import SeedLLM

    with no_deprecations():
        llm = SeedLLM.from_config("tiny-llama", seed=1)
        llm.diffusion = tiny_unclip_pipeline(embed_dim=llm.tokenizer.config.detokenizer.out_dim, seed=0)
        llm.add_lora()
        llm.caption(sample_images(1, seed=4)[0], max_new_tokens=4)
        llm.generate_images(["red"], num_inference_steps=2, guidance_scale=3.0, height=64, width=64, progress=False)


def test_export(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from seed_fast.default_model import DEFAULT_DIR
    from seed_fast.export import export_onnx

    with no_deprecations():
        export_onnx(["all"], tmp_path, checkpoint=DEFAULT_DIR, progress=False)
