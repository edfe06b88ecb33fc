"""`prompt_chars_limit`: the characters-per-token bound that lets a server refuse a prompt before
tokenizing it. It must never be wrong (no text that fits may be refused), so it is checked against
real encodings of awkward text, and it must say "no bound" for the tokenizers that can fold any
number of characters into one token."""
from __future__ import annotations

import random

import pytest
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import model_factory

from pagoda.engine.processing.tokenizer import max_chars_per_token, prompt_chars_limit

CORPUS = [*model_factory._TOKENIZER_CORPUS, "café naïve Ωμέγα 東京 👋🏽 " * 3,
          "e\u0301 \u1100\u1161\u11a8 " * 3]
BYTE_TOKENS = [f"<0x{byte:02X}>" for byte in range(256)]


def wrap(tokenizer: Tokenizer, **kwargs) -> transformers.PreTrainedTokenizerFast:
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **kwargs)


def trained_bpe(model: models.BPE, special_tokens: list[str], normalizer=None, pre_tokenizer=None) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special_tokens, show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tokenizer


def sentencepiece_like(normalizer=None) -> transformers.PreTrainedTokenizerFast:
    """Llama-2 / Mistral style: '▁' for spaces, BPE with byte fallback (unknown characters -> bytes)."""
    steps = [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")] + ([normalizer] if normalizer else [])
    tokenizer = trained_bpe(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True),
                            ["<unk>", "<s>", "</s>"] + BYTE_TOKENS, normalizers.Sequence(steps))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return wrap(tokenizer, unk_token="<unk>")


def awkward_texts(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abc xyz,.!?\n\t") + ["  ", "    ", "é", "e\u0301", "\u1100\u1161\u11a8", "東", "👋🏽",
                                            "\U0001F600", "<|im_start|>", "\x00", "\u200b", "ﬁ",
                                            "Ω\u0314\u0342\u0345", "�"]
    texts = [" " * 5000, "\n" * 3000, "e\u0301" * 2000, "👋🏽" * 1000, "<|endoftext|>" * 300, "☃" * 2000]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400))) for _ in range(200)]
    return texts


@pytest.mark.parametrize("make", [
    model_factory.build_tiny_tokenizer,
    sentencepiece_like,
    lambda: sentencepiece_like(normalizers.NFC()),
    lambda: sentencepiece_like(normalizers.NFKC()),
], ids=["byte-level BPE", "sentencepiece BPE", "with NFC", "with NFKC"])
def test_the_bound_holds_on_awkward_text(make):
    tokenizer = make()
    chars_per_token = max_chars_per_token(tokenizer)
    assert chars_per_token is not None
    for text in awkward_texts():
        num_tokens = len(tokenizer.encode(text, add_special_tokens=False))
        assert len(text) <= num_tokens * chars_per_token, (text[:40], num_tokens, chars_per_token)
    assert prompt_chars_limit(tokenizer, 8192) == 8192 * chars_per_token


def test_composing_normalizers_widen_the_bound_four_times():
    assert max_chars_per_token(sentencepiece_like(normalizers.NFC())) == 4 * max_chars_per_token(sentencepiece_like())


def _byte_level(**changes) -> Tokenizer:
    tokenizer = trained_bpe(models.BPE(), ["<|endoftext|>"], pre_tokenizer=pre_tokenizers.ByteLevel())
    for name, value in changes.items():
        setattr(tokenizer, name, value)
    return tokenizer


@pytest.mark.parametrize("make, folds", [
    (lambda: wrap(trained_bpe(models.BPE(unk_token="<unk>", fuse_unk=True), ["<unk>"])), "☃" * 500),
    (lambda: wrap(_byte_level(normalizer=normalizers.Strip())), " " * 500 + "a"),
    (lambda: wrap(_byte_level(normalizer=normalizers.Replace(Regex(" +"), " "))), "a" + " " * 500 + "b"),
    (lambda: wrap(_byte_level(normalizer=normalizers.BertNormalizer())), "a" + "\x01" * 500),
    (lambda: wrap(_byte_level(pre_tokenizer=pre_tokenizers.Whitespace())), " " * 500 + "a"),
    (lambda: wrap(_byte_level(pre_tokenizer=pre_tokenizers.Split(" ", "removed"))), " " * 500 + "a"),
    (lambda: wrap(trained_wordpiece()), "a" * 500),
    (lambda: with_added(AddedToken("<mask>", rstrip=True)), "<mask>" + " " * 500),
], ids=["fused unknown", "Strip", "regex Replace", "BERT normalizer", "Whitespace", "Split removed", "WordPiece",
        "added token eats spaces"])
def test_no_bound_where_one_token_can_hold_any_number_of_characters(make, folds):
    tokenizer = make()
    assert len(tokenizer.encode(folds, add_special_tokens=False)) <= 3      # ~500 characters, a token or two
    assert max_chars_per_token(tokenizer) is None and prompt_chars_limit(tokenizer, 8192) is None


def trained_wordpiece() -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(CORPUS, trainer=trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[UNK]"], show_progress=False))
    return tokenizer


def with_added(token: AddedToken) -> transformers.PreTrainedTokenizerFast:
    tokenizer = wrap(_byte_level())
    tokenizer.add_tokens([token])
    return tokenizer


def test_no_tokenizer_no_bound():
    assert prompt_chars_limit(None, 8192) is None
    assert max_chars_per_token(object()) is None            # a tokenizer without a Rust backend
