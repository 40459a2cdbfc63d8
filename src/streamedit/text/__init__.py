"""The Qwen3-VL text conditioning: ``exact.py`` (numerically upstream's ``encode_prompt``), ``fast.py``
(static shapes, sync-free: what ``accel.compile_te`` compiles and CUDA-graphs), ``fp8.py`` (FP8 Linears, an approximation); ``base.py``
the protocol both meet (what the engine calls)."""
