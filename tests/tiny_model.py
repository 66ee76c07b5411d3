"""A tiny Llama and tokenizer built from a config (no downloads), saved as a local model directory."""

import os

import torch

TEXTS = [
    "def add(a, b):\n    return a + b\n\nThe function adds two numbers and returns the sum.",
    "A list is a mutable sequence. Lists may be built with square brackets, with a comprehension, or with list().",
    "Exceptions are raised with raise and handled with try and except; finally always runs.",
    "The with statement wraps a block in a context manager, whose __enter__ and __exit__ run around it.",
    "Dictionaries map hashable keys to values; iteration follows insertion order since Python 3.7.",
    "Generators produce values lazily with yield, suspending their frame between values.",
] * 6


def build_tokenizer(texts=TEXTS):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=320, min_frequency=1, special_tokens=["<s>", "</s>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_model(vocab_size, layers=3, width=32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def save_tiny(directory, **shape):
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), **shape)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_corpus(directory, texts=TEXTS):
    path = os.path.join(directory, "corpus.jsonl")
    import json

    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path
