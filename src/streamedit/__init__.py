"""streamedit: real-time video stylization with an instruction-edit diffusion model."""

from .engine import EngineConfig, StreamEngine
from .errors import StreameditError
from .models import Models, load_models

__all__ = ["load_models", "Models", "StreamEngine", "EngineConfig", "StreameditError"]
__version__ = "0.1.0"
