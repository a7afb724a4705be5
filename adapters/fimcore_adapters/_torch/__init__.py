"""Private implementation of :mod:`fimcore_adapters.torch` (layer rules, cost model, generic path).

Nothing here is public API; import from :mod:`fimcore_adapters.torch`.
"""
