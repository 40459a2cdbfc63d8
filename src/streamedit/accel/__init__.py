"""Speed machinery with no effect on results: CUDA graphs on any stream (``graphs.py``), persistent
compile caches and whole saved functions (``compile_cache.py``), exact fused kernels (``kernels.py``), and how
the engine's parts are compiled with them: the denoiser (``compile_main.py``), the fast text encoder (``compile_te.py``)."""
