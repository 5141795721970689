"""Post-processing operations on the ffmpeg binary imageio-ffmpeg ships (no GPU, no hand-written video code).

upscale, interpolate, trim, loop, concat, watermark, audio, export. The API validates and prices
pipelines with :func:`parse_params`, :func:`infer_output` and :func:`operation_price` (static,
cheap: nothing runs); the postprocess deployment runs :func:`run_operation`. No api/serve imports.
"""

from models.postprocess.catalog import (
    OPERATIONS,
    OperationBounds,
    OperationCatalog,
    OperationCatalogError,
    OperationError,
    OperationPrices,
    OperationResources,
    OperationServing,
    load_operation_catalog,
)
from models.postprocess.ffmpeg import (
    OperationCanceled,
    OperationFailed,
    ProgressParser,
    probe,
    probe_audio,
    run_ffmpeg,
)
from models.postprocess.ops import CONTENT_TYPES, OperationResult, run_operation
from models.postprocess.spec import (
    PARAMS,
    RESOLVED_KEYS,
    MediaInfo,
    frames_at,
    infer_output,
    input_fields,
    operation_price,
    parse_params,
)

__all__ = [
    "CONTENT_TYPES", "OPERATIONS", "PARAMS", "RESOLVED_KEYS", "MediaInfo", "OperationBounds", "OperationCanceled",
    "OperationCatalog", "OperationCatalogError", "OperationError", "OperationFailed", "OperationPrices",
    "OperationResources", "OperationResult", "OperationServing", "ProgressParser", "frames_at", "infer_output",
    "input_fields", "load_operation_catalog", "operation_price", "parse_params", "probe", "probe_audio", "run_ffmpeg",
    "run_operation",
]
