"""A tiny causal language model built offline in a second: for tests of the LM generators."""

from __future__ import annotations

from pathlib import Path

#: Words the tiny tokenizer knows; anything else becomes [UNK].
TINY_WORDS = (  # noqa: SIM905
    "< > [ ] ( ) : . , ? ! user assistant system answer question the a an is of to and in with "
    "statement work how does what passages passage number cite using only below context manager "
    "python try except finally for loop if else class def return raise exception"
).split()

#: A minimal chat template: ``< user > {content} < assistant >``.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}< {{ message['role'] }} > {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}< assistant >{% endif %}"
)


def build_tiny_causal_lm(
    path: Path, *, chat_template: bool = True, seed: int = 0, min_new_tokens: int | None = None
) -> Path:
    """Save a randomly initialised 2-layer Llama and a word-level tokenizer to ``path``; return it.

    ``min_new_tokens`` goes into its generation config: every answer is then at least that long.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {token: i for i, token in enumerate([*specials, *TINY_WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call, unused-ignore]
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    )
    if chat_template:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=vocab["[PAD]"],
        bos_token_id=vocab["[BOS]"],
        eos_token_id=vocab["[EOS]"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if min_new_tokens is not None:
        model.generation_config.min_new_tokens = min_new_tokens
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
