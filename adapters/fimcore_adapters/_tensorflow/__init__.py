"""Private implementation of :mod:`fimcore_adapters.tensorflow` (imports TensorFlow)."""
