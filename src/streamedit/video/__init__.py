"""Video files: PyAV decode (``reader.py``) and encode with audio through an interruption-safe writer
(``writer.py``), both imported from ``io.py``; the working geometry (aspect-preserving size, centre crop,
resize; ``geometry.py``), whole clips and synthetic test clips (``clips.py``)."""
