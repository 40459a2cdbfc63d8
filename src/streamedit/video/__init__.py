"""Video files: PyAV decode/encode with audio and an interruption-safe writer (``io.py``), the working
geometry (aspect-preserving size, centre crop, resize; ``geometry.py``), whole clips and synthetic test
clips (``clips.py``)."""
