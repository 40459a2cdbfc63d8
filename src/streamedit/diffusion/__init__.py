"""Denoising with upstream's arithmetic: sigmas, FlowMatch Euler, the VAE around it (``denoiser.py``); compiling
it is ``accel.compile_main``."""
