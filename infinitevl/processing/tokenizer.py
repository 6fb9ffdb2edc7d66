"""Tokenizers: the Qwen2 tokenizer shipped with the official checkpoints, or a byte-level one for tiny models.

The official folders carry tokenizer.json / tokenizer_config.json and a chat template; `load_tokenizer` reads them
with transformers. `byte_level_tokenizer` builds, without any download or training data, a tokenizer whose special
tokens sit at the ids a (tiny) config names: bytes 0..255, then reserved slots, then the ChatML and vision tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

# Qwen2-VL's ChatML template with vision placeholders (the default system prompt is Qwen's).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_NAMES = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "vision_token_id": "<|vision_pad|>",
    "bos_token_id": "<|endoftext|>",
    "eos_token_id": "<|im_end|>",
}


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    folder = Path(folder)
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{folder} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    from transformers.utils import logging as hf_logging

    # AutoTokenizer peeks at config.json, whose model type transformers does not know; that is expected here
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # A tokenizer_config.json that names its class needs no config.json; reading that file would fail on layer
        # types transformers does not know (the v2 variants' sink_sliding_attention / block_sparse_attention).
        tok_cfg = folder / "tokenizer_config.json"
        named = tok_cfg.exists() and "tokenizer_class" in json.loads(tok_cfg.read_text())
        kwargs = {"config": PretrainedConfig()} if named else {}
        tok = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if not getattr(tok, "chat_template", None):
        template = folder / "chat_template.json"
        if template.exists():
            tok.chat_template = json.loads(template.read_text())["chat_template"]
        else:
            tok.chat_template = CHAT_TEMPLATE
    return tok


def byte_level_tokenizer(
    vocab_size: int, special_ids: dict[str, int], im_start_id: int, corpus: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the specials at the given ids. Without a corpus: no merges, one token per UTF-8 byte.
    With one: merges learned from it fill every id below the first special one (a compact tokenizer for a small
    domain, deterministic for a given corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    first_special = min(min(special_ids.values()), im_start_id)
    if corpus:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        trainer = trainers.BpeTrainer(
            vocab_size=first_special, initial_alphabet=alphabet, show_progress=False, special_tokens=[]
        )
        tok.train_from_iterator(corpus, trainer)
    else:
        vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: _byte_of(c)))}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    vocab = tok.get_vocab()
    names = {v: SPECIAL_NAMES[k] for k, v in special_ids.items() if k in SPECIAL_NAMES}
    names[im_start_id] = "<|im_start|>"
    if min(names) < len(vocab) or max(names) >= vocab_size:
        raise ValueError(f"special ids must lie in [{len(vocab)}, {vocab_size})")
    # added tokens take consecutive ids, so fill the gaps with reserved tokens
    added = [names.get(i, f"<|reserved_{i}|>") for i in range(len(vocab), vocab_size)]
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    for i, name in names.items():
        assert fast.convert_tokens_to_ids(name) == i, (name, i)
    return fast


def _byte_of(ch: str) -> int:
    """The byte a ByteLevel alphabet character stands for (GPT-2's printable remapping)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping, n = {}, 0
    for b in range(256):
        if b in printable:
            mapping[chr(b)] = b
        else:
            mapping[chr(256 + n)] = b
            n += 1
    return mapping[ch]


IM_START_ID = 375  # where the tiny configurations keep <|im_start|> (their other special ids are in the config)


def tokenizer_for(config, corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer whose special tokens sit at `config`'s ids (see `byte_level_tokenizer`)."""
    ids = {k: getattr(config, k) for k in SPECIAL_NAMES}
    return byte_level_tokenizer(config.text.vocab_size, ids, im_start_id=IM_START_ID, corpus=corpus)
