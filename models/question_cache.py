"""The question-state cache: a frozen LLM's text states, computed once per distinct question.

The LLM of the receipt counter reads only the question tokens (never the image), so while its
weights cannot change, the states of a question are a pure function of its token ids. For the
default question every image of every batch asks the same thing: the LLM then runs once, not once
per batch.

Validity rule (checked on every call, in this order):
1. **The LLM must be frozen**: no parameter requires grad, and it is deterministic (eval mode, or
   train mode without active dropout: no `nn.Dropout` with p > 0, including LoRA's, and a config
   `attention_dropout` of 0). Otherwise the LLM runs as usual and the cache is emptied, so states
   computed before the LLM trained are never served after it.
2. **The LLM's fingerprint must match the one the entries were computed under**: which module the
   LLM is (`model.language` replaced), its parameter names (LoRA injection and merging add or remove
   parameters), each parameter's dtype and device (`.to(...)`, `.half()`), autocast (on, dtype) and
   inference mode. A mismatch empties the cache.
3. **Weight loads empty it**: `InternVL2MultimodalModel` registers a `load_state_dict` post-hook on
   its LLM that calls `clear()`; `load_state_dict`, `safetensors.torch.load_model` and accelerate's
   `load_state` (resume) all go through `load_state_dict`.

What the rule cannot see is a change of frozen LLM weights outside `load_state_dict`: an in-place
write (`param.copy_(...)` under `torch.no_grad()`) or a parameter replaced by another of the same
name, dtype and device. Code that does that calls `model.question_cache.clear()` afterwards.

Entries are keyed by a row's token ids and attention mask up to its last real token. The LLM is
causal, so the states of those positions do not depend on what follows (padding, or a longer
question elsewhere in the batch); positions after the last real token are masked out of the
pooling, and the cache fills them with zeros.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Hashable

import torch
import torch.nn.functional as F
from torch import nn

QuestionKey = tuple[tuple[int, ...], tuple[int, ...]]  # (token ids, attention mask) up to the last real token


def llm_is_frozen(language: nn.Module) -> bool:
    """True when `language` neither trains nor draws random numbers in its forward (rule 1 above)."""
    if any(p.requires_grad for p in language.parameters()):
        return False
    if not language.training:
        return True
    dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in language.modules())
    # transformers' decoder layers apply attention dropout functionally, from the config, in train mode only.
    return not dropout and not getattr(language.config, "attention_dropout", 0.0)


def llm_fingerprint(language: nn.Module) -> Hashable:
    """What cached states depend on besides the weights' values (rule 2 above)."""
    params = tuple((name, p.dtype, p.device) for name, p in language.named_parameters())
    device_type = next(language.parameters()).device.type
    autocast = torch.is_autocast_enabled(device_type)
    autocast_dtype = torch.get_autocast_dtype(device_type) if autocast else None
    # A weak reference: equal while it is the same live module, and it does not keep a replaced LLM alive.
    return weakref.ref(language), params, autocast, autocast_dtype, torch.is_inference_mode_enabled()


def question_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[QuestionKey]:
    """(B, T) ids and mask -> one key per row: ids and mask up to and including the last real token."""
    keys = []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        length = max((i + 1 for i, m in enumerate(mask) if m), default=0)
        keys.append((tuple(ids[:length]), tuple(mask[:length])))
    return keys


class QuestionStateCache:
    """LLM last hidden states per distinct question, least recently used entries evicted first.

    Args:
        max_entries: distinct questions kept; a batch with more new ones than this still works (the
            LLM runs for them), they just do not all stay cached.
    """

    def __init__(self, max_entries: int = 128) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[QuestionKey, torch.Tensor] = OrderedDict()  # key -> (L, D)
        self._fingerprint: Hashable = None

    def __len__(self) -> int:
        return len(self._entries)

    def __getstate__(self) -> dict:
        """A copy (`copy.deepcopy` of the model) starts empty: entries belong to one LLM, held by weak reference."""
        return {"max_entries": self.max_entries}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_entries"])

    def clear(self) -> None:
        """Forget every entry (after an in-place write to the LLM's weights, for example)."""
        self._entries.clear()
        self._fingerprint = None

    def text_states(self, language: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
                    ) -> torch.Tensor:
        """The LLM's last hidden states for the questions, from the cache where the rule allows.

        Args:
            language: the LLM (a transformers base model returning `last_hidden_state`).
            input_ids: (B, T) question tokens.
            attention_mask: (B, T), 1 for real tokens.

        Returns:
            (B, T, D) states; on the cached path positions after a row's last real token are zeros.
        """
        if not llm_is_frozen(language):
            self.clear()
            return language(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        fingerprint = llm_fingerprint(language)
        if fingerprint != self._fingerprint:
            self.clear()
            self._fingerprint = fingerprint
        keys = question_keys(input_ids, attention_mask)
        unique = list(dict.fromkeys(keys))
        found = self._compute_missing(language, unique, keys, input_ids, attention_mask)
        width = input_ids.shape[1]
        table = torch.stack([F.pad(found[k], (0, 0, 0, width - found[k].shape[0])) for k in unique])  # (U, T, D)
        rows = torch.tensor([unique.index(k) for k in keys], device=table.device)
        return table[rows]  # (B, T, D)

    def _compute_missing(self, language: nn.Module, unique: list[QuestionKey], keys: list[QuestionKey],
                         input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[QuestionKey, torch.Tensor]:
        """States of every key in `unique`: cached ones looked up, the others from one LLM forward."""
        found = {}
        for key in unique:
            if key in self._entries:
                self._entries.move_to_end(key)
                found[key] = self._entries[key]
        missing = [k for k in unique if k not in found]
        if missing:
            rows = [keys.index(k) for k in missing]
            length = max(1, max(len(k[0]) for k in missing))
            out = language(input_ids=input_ids[rows, :length],
                           attention_mask=attention_mask[rows, :length]).last_hidden_state  # (M, L, D)
            for key, states in zip(missing, out):
                found[key] = states[:len(key[0])].clone()  # not a view: keep no other row alive
                self._store(key, found[key])
        return found

    def _store(self, key: QuestionKey, states: torch.Tensor) -> None:
        self._entries[key] = states
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
