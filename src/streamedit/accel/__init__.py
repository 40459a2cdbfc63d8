"""Speed machinery with no effect on results: CUDA graphs on any stream (``graphs.py``), persistent
compile caches and whole saved functions (``compile_cache.py``), exact fused kernels (``kernels.py``)."""
