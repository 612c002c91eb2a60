"""What the package hands a transformers model besides tokens: position ids, and the KV cache under the keyword of
the installed transformers version.

transformers renamed `past_key_values` to `cache` (argument and output field); releases since then still accept
the old name with a deprecation warning, until its removal. Calls into transformers models go through
[`with_cache`][bebop_trl.modeling.model_inputs.with_cache] and
[`cache_of`][bebop_trl.modeling.model_inputs.cache_of], which use the installed version's name.
"""

import inspect
from typing import Any

import torch
from transformers import LlamaModel


CACHE_KEYWORD = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def with_cache(cache: Any) -> dict[str, Any]:
    """The keyword argument that hands `cache` to a transformers model's forward."""
    return {CACHE_KEYWORD: cache}


def cache_of(output: Any) -> Any:
    """The KV cache a transformers model's forward returned."""
    return getattr(output, CACHE_KEYWORD)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Position ids that skip padding on either side (as `generate` computes them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
