"""A tiny byte-level BPE tokenizer for the demo and the tests, trained on the spot, offline.

Real checkpoints ship their own tokenizer; the reference model only needs *a* tokenizer whose ids fit its
vocabulary, that round-trips any text (byte level, so no unknown tokens), and that needs no download. Training a
few hundred merges on the paragraphs below takes a few milliseconds and is deterministic.
"""

from __future__ import annotations

from functools import lru_cache

BOS_TOKEN = "<|begin_text|>"
EOS_TOKEN = "<|end_text|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)

#: Target vocabulary: the 256 byte symbols, the 3 special tokens, and merges up to this size. The reference
#: model's ``tiny_config()`` uses a vocabulary of the same size.
VOCAB_SIZE = 320

TRAINING_TEXT = (
    "A looped language model reads its prompt once, then runs the same block of layers again and again. "
    "Each pass takes the current latent state and the embedded tokens, and writes a new state. "
    "When the state stops changing, the model has settled, and more passes add little.",
    "The recorder attaches hooks to the block that ends an iteration. It copies the state after every pass "
    "into a file on disk, in chunks, so that a long run never has to fit in memory at once.",
    "Later, the analysis reads the file back without the model. It measures how far the state moves from one "
    "iteration to the next, how the predicted token changes, and where the trajectory comes to rest.",
    "Some tokens are easy: the state converges in a handful of steps. Other tokens are hard, and the state "
    "keeps wandering, orbiting, or sliding slowly towards a fixed point that it reaches only much later.",
    "The weather was mild that morning. She walked to the station, bought a paper, and read about the harbour, "
    "the new bridge over the river, and the long debate in the town council about the price of bread.",
    "Numbers matter too: 1, 2, 3, 10, 42, 100 and 2025 appear in tables, dates and counts. "
    "Punctuation, such as commas, full stops, colons: and semicolons; helps the merges learn short pieces.",
)


def train_bpe(texts, vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``, with the special tokens above.

    Seeded with every byte, so any UTF-8 text encodes, not just the characters seen in ``texts``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def as_transformers(tokenizer):
    """Wrap a ``tokenizers.Tokenizer`` as a ``PreTrainedTokenizerFast`` with bos/eos/pad set."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )


@lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """Train once per process; the JSON is immutable, so every caller gets a fresh, independent tokenizer."""
    return train_bpe(TRAINING_TEXT).to_str()


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` (byte-level BPE, <= ``VOCAB_SIZE`` ids) with bos/eos/pad special tokens."""
    from tokenizers import Tokenizer

    return as_transformers(Tokenizer.from_str(_trained_tokenizer_json()))
