import os
import tempfile

import jax

# a shared persistent compilation cache: the tests compile the same tiny steps many times
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "jaxformers-test-jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
