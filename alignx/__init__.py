"""AlignX: align one base LLM on helpfulness, harmlessness and honesty.

Stage 1 trains one prompt-injected LoRA expert per axis (Ray Train + DeepSpeed); Stage 2
routes each request to the right expert with the calibrated MoCaE router.
"""

from alignx.axes import AXES, Axis
from alignx.config import AlignXConfig, AlignXConfigError, load_config

__version__ = "0.1.0"

__all__ = ["AXES", "AlignXConfig", "AlignXConfigError", "Axis", "__version__", "load_config"]
