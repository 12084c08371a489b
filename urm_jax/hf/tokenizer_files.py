"""What the model card needs of a checkpoint's tokenizer, read from its JSON files.

`convert to_hf` writes a model card whose usage snippet depends on two facts about the tokenizer:
its chat template (a string, or none) and whether the template's turn markers are single tokens
of the vocabulary (`urm_jax.data.tokenization.chat_format`). Loading the tokenizer with
transformers to learn them imports transformers and torch (seconds, most of a small export's
time); both facts are in tokenizer.json / tokenizer_config.json / special_tokens_map.json /
added_tokens.json / chat_template.jinja, read here the way transformers reads them.

Where the JSON cannot answer as transformers would (no tokenizer.json: the vocabulary lives in a
sentencepiece tokenizer.model; or a tokenizer class of the directory's own code, `auto_map`,
which `load_tokenizer` refuses), `card_tokenizer` falls back to `load_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from urm_jax.data.tokenization import load_tokenizer
from urm_jax.validate import read_json

# tokenizer_config.json / special_tokens_map.json keys whose values transformers adds to the
# vocabulary as whole tokens when they are missing from it (besides added_tokens_decoder)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                      "mask_token")
SPECIAL_TOKEN_LISTS = ("additional_special_tokens", "extra_special_tokens")


class TokenizerFiles:
    """The card's view of a tokenizer, from its files: `chat_template` as transformers sets it
    (chat_template.jinja over tokenizer_config.json's `chat_template`; a list of named templates
    becomes a dict, None when absent) and the token <-> id maps of the vocabulary
    (tokenizer.json's model vocab and added tokens, tokenizer_config.json's
    added_tokens_decoder, added_tokens.json, and special tokens missing from them, which
    transformers appends). Offers the two lookups `chat_format` uses, with transformers' results
    for single tokens: `convert_tokens_to_ids` (int, or None for a string that is not one token)
    and `convert_ids_to_tokens`."""

    def __init__(self, directory: Path, tokenizer_json: dict, config: dict, special_map: dict,
                 added: dict):
        self.directory = directory
        template = config.get("chat_template")
        jinja = directory / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        if isinstance(template, (list, tuple)):
            template = {t["name"]: t["template"] for t in template}
        self.chat_template = template
        ids: dict[str, int] = {}
        vocab = (tokenizer_json.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
            ids.update({tok: i for tok, i in vocab.items() if isinstance(i, int)})
        elif isinstance(vocab, list):  # Unigram: [piece, score] pairs, the id is the position
            ids.update({entry[0]: i for i, entry in enumerate(vocab) if isinstance(entry, list) and entry})
        extra = [(t.get("content"), t.get("id")) for t in tokenizer_json.get("added_tokens") or []
                 if isinstance(t, dict)]
        extra += [(t.get("content"), _int(i)) for i, t in (config.get("added_tokens_decoder") or {}).items()
                  if isinstance(t, dict)]
        extra += list(added.items())
        for token, index in extra:
            if isinstance(token, str) and isinstance(index, int):
                ids[token] = index
        for source in (config, special_map):
            for token in _special_tokens(source):
                if token not in ids:  # appended by transformers after the vocabulary
                    ids[token] = max(ids.values(), default=-1) + 1
        self._ids = ids
        self._tokens = {index: token for token, index in ids.items()}
        for token, index in extra:  # an added token wins an id it shares with the model vocab
            if isinstance(token, str) and isinstance(index, int):
                self._tokens[index] = token

    def convert_tokens_to_ids(self, token: str) -> int | None:
        """The id of `token` when it is one token of the vocabulary, else None."""
        return self._ids.get(token)

    def convert_ids_to_tokens(self, index: int) -> str | None:
        """The token of id `index`, None for an id outside the vocabulary."""
        return self._tokens.get(index)


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _special_tokens(source: dict) -> list[str]:
    """The special-token strings a tokenizer config names (a value is a string or an
    AddedToken-style object with `content`)."""
    values = [source.get(key) for key in SPECIAL_TOKEN_KEYS]
    for key in SPECIAL_TOKEN_LISTS:
        listed = source.get(key)
        values += listed if isinstance(listed, list) else []
    values = [v.get("content") if isinstance(v, dict) else v for v in values]
    return [v for v in values if isinstance(v, str)]


def _read_object(path: Path) -> dict:
    """The JSON object in `path` ({} when the file is absent); MetadataError naming the file when
    it is not one (`read_json`)."""
    return read_json(path) if path.is_file() else {}


def card_tokenizer(directory: str | Path) -> Any:
    """What `urm_jax.hf.card` reads of the tokenizer in `directory`: None when it ships none (the
    condition `load_tokenizer` uses), a `TokenizerFiles` read from its JSON when it has a
    tokenizer.json and no tokenizer class of its own code, else `load_tokenizer`'s tokenizer
    (transformers). MetadataError names a tokenizer file that is not a JSON object."""
    directory = Path(directory)
    config_file, full = directory / "tokenizer_config.json", directory / "tokenizer.json"
    if not config_file.is_file() and not full.is_file():
        return None
    config = _read_object(config_file)
    auto_map = config.get("auto_map")
    own_code = isinstance(auto_map, dict) and "AutoTokenizer" in auto_map
    if not full.is_file() or own_code:
        return load_tokenizer(directory)  # judges (and refuses) a tokenizer of its own code
    return TokenizerFiles(directory, _read_object(full), config,
                          _read_object(directory / "special_tokens_map.json"),
                          _read_object(directory / "added_tokens.json"))
