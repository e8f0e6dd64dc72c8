"""The InternVL checkpoint's tokenizer, loaded without remote code.

Qwen2-based folders (both layouts) carry a tokenizer transformers knows (`AutoTokenizer`). InternLM2-based
original folders name their remote `InternLM2Tokenizer`; it is a sentencepiece model (`tokenizer.model`),
which transformers' `LlamaTokenizer` reads (needs the `sentencepiece` package: `pip install -e .[internlm2]`).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, LlamaTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.utils import is_sentencepiece_available

_SENTENCEPIECE_CLASSES = ("InternLM2Tokenizer", "InternLM2TokenizerFast")


def load_tokenizer(checkpoint: str | Path, trust_remote_code: bool = False, config: PretrainedConfig | None = None
                   ) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, with a pad token (right padding: the LLM is causal, pooling is masked).

    `config` is the model's config when the caller has read it already (an original folder's config.json
    is not one transformers can read, and AutoTokenizer would warn trying).

    Raises:
        ImportError: an InternLM2 sentencepiece tokenizer without the sentencepiece package (how to install).
    """
    folder = Path(checkpoint)
    tokenizer_class = _tokenizer_class(folder)
    if tokenizer_class in _SENTENCEPIECE_CLASSES:
        if not is_sentencepiece_available():
            raise ImportError(f"{folder}: its {tokenizer_class} is a sentencepiece model; reading it needs the "
                              f"sentencepiece package: pip install -e .[internlm2]")
        # InternLM2Tokenizer = sentencepiece with a BOS token and no EOS appended, no legacy space handling
        tokenizer = LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True, add_eos_token=False,
                                                   legacy=False)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), trust_remote_code=trust_remote_code, config=config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _tokenizer_class(folder: Path) -> str | None:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("tokenizer_class")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
