"""Switch Keras to float64 end to end for a test module, and restore it afterwards."""

import contextlib


@contextlib.contextmanager
def keras_float64():
    """Set Keras' floatx and dtype policy to float64 inside the block (Keras caches the policy it
    derived from floatx, so both are set and both are restored)."""
    import keras  # imported here: this module is collected even where Keras is absent

    old, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(old)
        keras.config.set_dtype_policy(policy)
