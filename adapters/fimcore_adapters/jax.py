"""JAX adapter (stub while building)."""
import jax  # noqa: F401
from ._jax._checks import gradient_dtype
from ._jax.generic import per_sample_gram, value_grad_and_gram
from ._jax.flax_gram import FlaxGram, flax_per_sample_gram, flax_value_grad_and_gram
