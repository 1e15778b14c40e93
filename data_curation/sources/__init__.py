"""Registry of CT-3M sources: one adapter per public dataset, plus the generic ``folder`` source.

``REGISTRY`` maps the source name (used in configs, on the command line and as the first part of sample keys) to
its :class:`SourceAdapter`. The order is the paper's list; it is also the de-duplication priority (the earlier
source keeps a volume that several datasets redistribute) unless the config overrides it.
"""
from __future__ import annotations

from data_curation.sources import (
    abdomenatlas,
    abdomenct1k,
    amos22,
    btcv,
    chaos,
    ctorg,
    folder,
    kits23,
    lits,
    msd,
    pancreas_ct,
    totalseg,
    word,
)
from data_curation.sources.base import SourceAdapter

_ORDER = [
    btcv.ADAPTER,
    pancreas_ct.ADAPTER,
    chaos.ADAPTER,
    lits.ADAPTER,
    kits23.ADAPTER,
    word.ADAPTER,
    abdomenct1k.ADAPTER,
    amos22.ADAPTER,
    *msd.ADAPTERS,
    ctorg.ADAPTER,
    totalseg.ADAPTER,
    abdomenatlas.ADAPTER,
    folder.ADAPTER,
]
REGISTRY: dict[str, SourceAdapter] = {a.name: a for a in _ORDER}

__all__ = ["REGISTRY", "SourceAdapter"]
