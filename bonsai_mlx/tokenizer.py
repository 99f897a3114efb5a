"""Opening the text encoder's tokenizer from a model folder, through safe_files.

transformers parses the tokenizer files itself; before it does, every file it may read
is checked to be a regular file inside the model directory and under its size cap, the
JSON ones to be JSON objects, and a folder asking for custom code (`auto_map`) is
refused: nothing from a model folder runs as code. Once loaded, the tokenizer must pad
on the right with a pad token, fit the embedding table, and render the chat template.
"""

from __future__ import annotations

from .errors import ConfigError, UnsafeFileError, WeightsError
from .safe_files import MAX_CONFIG_BYTES, MAX_TOKENIZER_BYTES, ModelFolder, read_bytes, read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Files AutoTokenizer may open in a tokenizer folder: JSON objects, and other files by size.
_JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "config.json",
               "chat_template.json", "generation_config.json")
_OTHER_FILES = {"tokenizer.json": MAX_TOKENIZER_BYTES, "vocab.json": MAX_TOKENIZER_BYTES,
                "merges.txt": MAX_TOKENIZER_BYTES, "tokenizer.model": MAX_TOKENIZER_BYTES,
                "chat_template.jinja": MAX_CONFIG_BYTES}


def has_tokenizer(folder) -> bool:
    import os

    return any(os.path.lexists(folder / f) for f in TOKENIZER_FILES)


def describe(folder: ModelFolder) -> str:
    """The folder and the tokenizer files in it, as messages name a tokenizer."""
    present = [n for n in (*_JSON_FILES, *_OTHER_FILES) if folder.exists(n)]
    return f"{folder.path} ({', '.join(sorted(present))})"


def check_tokenizer_files(folder: ModelFolder) -> None:
    for name in _JSON_FILES:
        if folder.exists(name):
            data = read_json(folder.file(name, "tokenizer file"), "tokenizer file")
            if "auto_map" in data:
                raise UnsafeFileError(f"{folder.path / name} asks for custom tokenizer code (auto_map); "
                                      "bonsai_mlx never runs code from a model folder")
    for name, cap in _OTHER_FILES.items():
        if folder.exists(name):
            read_bytes(folder.file(name, "tokenizer file"), cap, "tokenizer file", WeightsError)
    if folder.exists("additional_chat_templates"):
        sub = folder.subfolder("additional_chat_templates")
        for f in sub.glob("*"):
            read_bytes(sub.file(f.name, "chat template"), MAX_CONFIG_BYTES, "chat template", WeightsError)


def load_tokenizer(folder: ModelFolder, vocab_rows: int):
    """transformers' tokenizer from `folder`, checked for klein's prompt encoding and
    against an embedding table of `vocab_rows` rows."""
    check_tokenizer_files(folder)
    from transformers import AutoTokenizer  # heavy import, only when loading

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder.path), trust_remote_code=False, local_files_only=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # transformers raises many types; the Rust tokenizers panic as BaseException
        raise WeightsError(f"could not load the tokenizer from {describe(folder)}: {type(e).__name__}: {e}") from None
    where = describe(folder)
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ConfigError(f"the tokenizer in {where} has no pad token; klein pads prompts to a fixed length")
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise ConfigError(f"the tokenizer in {where} pads on the left; the klein prompt encoding needs right padding")
    if len(tokenizer) > vocab_rows or not 0 <= tokenizer.pad_token_id < vocab_rows:
        raise WeightsError(f"the tokenizer in {where} has {len(tokenizer)} tokens (pad id {tokenizer.pad_token_id}), "
                           f"but the text encoder's embedding has {vocab_rows} rows: they do not belong together")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"the tokenizer in {where} has no chat template; klein wraps prompts in Qwen3's")
    probe = "a bonsai probe 7f3a"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
    except Exception as e:  # jinja2 errors of a broken template
        raise ConfigError(f"the chat template of the tokenizer in {where} does not render: {e}") from None
    if not isinstance(text, str) or probe not in text:
        raise ConfigError(f"the chat template of the tokenizer in {where} leaves the prompt out of what it "
                          "renders; every image would ignore its prompt")
    return tokenizer
