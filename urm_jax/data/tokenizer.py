"""Build the real Llama-3.1 tokenizer offline, in Skywork-Reward / URM form.

Nothing can come from the HF hub here, but Meta's ``llama-models`` wheel (PyPI) ships the
Llama-3 tiktoken BPE file.  We convert it with transformers' ``TikTokenConverter`` into a fast
tokenizer whose ids equal Meta's, then reproduce what URM-LLaMa-3.1-8B ships (Skywork's
tokenizer):

* the 128000 BPE tokens with Meta's own pre-tokenizer regex (read from ``llama_models``);
* Llama-3.1's 256 special tokens at ids 128000..128255, named as in HF's Llama-3.1 files;
* ``[PAD]`` at id 128256 (vocabulary 128257, the size of URM's embedding matrix);
* BOS added by the post-processor, and Llama-3's chat template with the BOS removed, so
  ``apply_chat_template(..., tokenize=False)`` then ``tokenizer(text)`` gives exactly one BOS.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import AddedToken, processors
from transformers import PreTrainedTokenizerFast

from urm_jax.io_utils import atomic_dir

# Bump when anything below changes the saved files, so stale caches are not reused.
BUILD_VERSION = "v1"

BOS_TOKEN = "<|begin_of_text|>"
EOT_TOKEN = "<|eot_id|>"
PAD_TOKEN = "[PAD]"
PAD_ID = 128256
VOCAB_SIZE = 128257

# The tokens Llama-3.1 gives a name; every other slot of the 256 is reserved.
_LLAMA31_NAMED = {
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
}

# Llama-3's template (HF Meta-Llama-3.x-Instruct) minus `bos_token +` on the first message:
# Skywork's choice, because the tokenizer's post-processor adds the BOS itself.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_INSTALL_HINT = (
    "building the Llama-3 tokenizer offline needs Meta's `llama-models` wheel and `tiktoken`: "
    "pip install 'urm-jax[tokenizer]'"
)


def _meta():
    """Meta's tokenizer module and its BPE loader, or a clear install hint."""
    try:
        from llama_models.llama3 import tokenizer as meta_tokenizer
        from llama_models.tokenizer_utils import load_bpe_file
    except ImportError as e:  # tiktoken is imported by llama_models' tokenizer module
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    return meta_tokenizer, load_bpe_file


def meta_model_path() -> Path:
    """Path of the tiktoken BPE file inside the installed ``llama-models`` wheel."""
    meta_tokenizer, _ = _meta()
    path = Path(meta_tokenizer.__file__).parent / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llama-models install; {_INSTALL_HINT}")
    return path


def llama31_special_tokens() -> list[str]:
    """The 256 special token names for ids 128000..128255, in id order.

    The slots come from ``llama_models``' own list (so the named ids are Meta's).  Newer
    llama-models releases name two slots for Llama-3.2 (``<|step_id|>`` 128005, ``<|image|>``
    128011); HF's Llama-3.1 files, which Skywork/URM ship, call every non-named slot
    ``<|reserved_special_token_K|>`` with K counting up from 0 in id order (so 128005 is
    ``_2``, 128011 ``_3`` and 128255 ``_247``, as in transformers' Llama-3.1 converter).
    """
    meta_tokenizer, _ = _meta()
    # Meta builds the list inside Tokenizer.__init__, so read it off Meta's (cached) instance.
    meta = meta_tokenizer.Tokenizer.get_instance()
    by_id = sorted(meta.special_tokens.items(), key=lambda kv: kv[1])
    if len(by_id) != 256 or by_id[0][1] != 128000:
        raise RuntimeError(f"unexpected llama_models special tokens: {len(by_id)} from id {by_id[0][1]}")
    names, k = [], 0
    for name, _ in by_id:
        if name in _LLAMA31_NAMED:
            names.append(name)
        else:
            names.append(f"<|reserved_special_token_{k}|>")
            k += 1
    return names


def build_llama3_tokenizer() -> PreTrainedTokenizerFast:
    """Build the URM/Skywork Llama-3.1 fast tokenizer (vocab 128257) from Meta's BPE file."""
    meta_tokenizer, load_bpe_file = _meta()
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _MetaConverter(TikTokenConverter):
        # Read the ranks with Meta's own loader: the same bytes->rank map Meta encodes with,
        # and no side copy in tiktoken's /tmp cache.
        @staticmethod
        def load_tiktoken_bpe(path):
            return load_bpe_file(Path(path))

    # Meta's pre-tokenizer regex, taken from its tokenizer class rather than retyped here.
    backend = _MetaConverter(str(meta_model_path()), pattern=meta_tokenizer.Tokenizer.pat_str).converted()
    if backend.get_vocab_size() != 128000:
        raise RuntimeError(f"expected 128000 BPE tokens, got {backend.get_vocab_size()}")

    # Added in id order, so they land on 128000..128255, then [PAD] on 128256.
    specials = llama31_special_tokens() + [PAD_TOKEN]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    for i, t in enumerate(specials):
        if backend.token_to_id(t) != 128000 + i:
            raise RuntimeError(f"{t} got id {backend.token_to_id(t)}, expected {128000 + i}")

    # As in Llama-3's tokenizer.json: byte-level offsets, then BOS in front of each sequence.
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, 128000)],
            ),
        ]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOT_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=131072,  # Llama-3.1's context length
        clean_up_tokenization_spaces=True,
    )
    if len(tok) != VOCAB_SIZE:
        raise RuntimeError(f"built tokenizer has {len(tok)} tokens, expected {VOCAB_SIZE}")
    return tok


def save_llama3_tokenizer(out_dir: str | Path) -> Path:
    """Build and ``save_pretrained`` the tokenizer into ``out_dir`` atomically.

    Files are written into a temporary sibling directory that is renamed into place, so a
    crash never leaves a half-written tokenizer directory.  An existing ``out_dir`` is replaced.
    """

    out_dir = Path(out_dir).expanduser().resolve()
    with atomic_dir(out_dir, overwrite=True) as tmp:
        build_llama3_tokenizer().save_pretrained(str(tmp))
    return out_dir


def cached_llama3_tokenizer_dir() -> Path:
    """Directory holding the saved tokenizer, built once per cache.

    The cache root is ``$URM_JAX_CACHE`` or ``~/.cache/urm_jax``; the directory name carries
    ``BUILD_VERSION``.  Safe with concurrent builders (pytest-xdist): the loser of the final
    rename keeps the winner's copy.
    """
    root = Path(os.environ.get("URM_JAX_CACHE") or Path.home() / ".cache" / "urm_jax").expanduser()
    target = root / f"llama3-tokenizer-{BUILD_VERSION}"
    if (target / "tokenizer.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        build_llama3_tokenizer().save_pretrained(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (rename onto a non-empty directory fails).
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
