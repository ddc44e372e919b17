import os

# Tests run on the CPU with float32 defaults unless a test opts into float64 locally.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _share_compiles_between_tests():
    """One XLA compilation cache per test run, shared by the xdist workers: many tests compile the same tiny
    programs (the tiny flow model, its sampler, the train step), and a compile served from the cache is not
    paid twice. The controlling process makes a fresh directory (workers inherit it through the environment)
    and removes it at the end, so each run starts cold like CI. ``DSO_JAX_TEST_JIT_CACHE=off`` disables it."""
    import tempfile

    import jax

    path = os.environ.get("DSO_JAX_TEST_JIT_CACHE", "")
    if path == "off":
        return None, False
    owner = not path
    if owner:
        path = tempfile.mkdtemp(prefix="dso_jax_test_jit_cache_")
        os.environ["DSO_JAX_TEST_JIT_CACHE"] = path
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path, owner


_CACHE_DIR, _OWN_CACHE = _share_compiles_between_tests()


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        import shutil

        shutil.rmtree(_CACHE_DIR, ignore_errors=True)
