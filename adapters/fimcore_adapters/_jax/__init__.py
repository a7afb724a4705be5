"""Private implementation of :mod:`fimcore_adapters.jax` (public names are re-exported there)."""
