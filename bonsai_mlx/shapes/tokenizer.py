"""The demo model's tokenizer: a byte-level BPE trained offline on the task's prompts.

It is laid out like Qwen3's, so the klein prompt path (chat template, right padding to a
fixed length, hidden-state taps) runs on it unchanged: `tokenizer.json` (the `tokenizers`
model) and `tokenizer_config.json` (chat template, special tokens, pad token). Byte-level
BPE encodes any text; on the task's prompts every word is one token, because merges never
cross the pre-tokenizer's word boundaries and the merge budget exceeds what the corpus has.
"""

from __future__ import annotations

import json
from pathlib import Path

from .scenes import CATEGORIES, all_specs

PAD = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL = [PAD, IM_START, IM_END]
THINK = ["<think>", "</think>"]  # plain added tokens, as in Qwen3
VOCAB_LIMIT = 2048

# One user turn (and optional system / assistant turns) in Qwen3's chat format; with
# enable_thinking=False the generation prompt ends in an empty think block, as klein renders.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


def render_chat(prompt: str) -> str:
    """What the template renders for one user prompt with thinking disabled."""
    return f"{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n<think>\n\n</think>\n\n"


def corpus() -> list[str]:
    prompts = ["", *(s.prompt for c in CATEGORIES for s in all_specs(c))]
    return [render_chat(p) for p in prompts]


def build_tokenizer(out_dir: str | Path) -> Path:
    """Train the BPE and write tokenizer.json + tokenizer_config.json into out_dir."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_LIMIT, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "special": t in SPECIAL, "lstrip": False, "rstrip": False,
                                       "normalized": False, "single_word": False} for t in SPECIAL + THINK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": PAD,
        "unk_token": None,
        "padding_side": "right",
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def vocab_size(tokenizer_dir: str | Path, multiple: int = 64) -> int:
    """The embedding rows a text encoder for this tokenizer needs, rounded up like real checkpoints."""
    n = len(json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())["model"]["vocab"])
    return -(-(n + len(THINK)) // multiple) * multiple
