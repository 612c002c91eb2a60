"""The keyword of a transformers model's KV cache, across the transformers versions the package supports.

transformers renamed `past_key_values` to `cache` (argument and output field); releases since then still accept
the old name with a deprecation warning, until its removal. Calls into transformers models go through
[`with_cache`][bebop_trl.modeling.transformers_cache.with_cache] and
[`cache_of`][bebop_trl.modeling.transformers_cache.cache_of], which use the installed version's name.
"""

import inspect
from typing import Any

from transformers import LlamaModel


CACHE_KEYWORD = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def with_cache(cache: Any) -> dict[str, Any]:
    """The keyword argument that hands `cache` to a transformers model's forward."""
    return {CACHE_KEYWORD: cache}


def cache_of(output: Any) -> Any:
    """The KV cache a transformers model's forward returned."""
    return getattr(output, CACHE_KEYWORD)
