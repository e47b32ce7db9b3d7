"""Client of the Moondream tuning API: typed requests, errors and retries.

Example:
    >>> from lightning_moondream.api import TuningClient, DetectRequest
    >>> client = TuningClient()  # key from MOONDREAM_API_KEY
    >>> adapter = client.adapters.create("vehicles", rank=16)
    >>> request = DetectRequest(object="car", image_url="street.jpg")
    >>> response = client.rollouts(adapter.adapter_id, request, num_rollouts=4,
    ...                            ground_truth={"boxes": [...]})
    >>> client.train_step(adapter.adapter_id, [response.to_group()])
"""

from lightning_moondream.api.client import (
    DEFAULT_BASE_URL,
    AsyncTuningClient,
    RolloutCall,
    TuningClient,
    resolve_api_key,
    resolve_base_url,
)
from lightning_moondream.api.errors import (
    AmbiguousRequestError,
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    MissingAPIKeyError,
    NotFoundError,
    RateLimitError,
    ServerError,
    TuningAPIError,
    UnsupportedFeatureError,
)
from lightning_moondream.api.limiter import RateLimiter
from lightning_moondream.api.loop import BackgroundLoop
from lightning_moondream.api.models import (
    Adapter,
    AdapterPage,
    AnyRequest,
    Box,
    Checkpoint,
    CheckpointPage,
    DetectGroundTruth,
    DetectRequest,
    GroundTruth,
    Point,
    PointGroundTruth,
    PointRequest,
    QueryRequest,
    Rollout,
    RolloutsResponse,
    Settings,
    TrainGroup,
    TrainStepResult,
    inference_model_id,
)
from lightning_moondream.api.retry import RetryPolicy
from lightning_moondream.api.usage import UsageStats

__all__ = [
    "DEFAULT_BASE_URL",
    "APIConnectionError",
    "APITimeoutError",
    "Adapter",
    "AdapterPage",
    "AmbiguousRequestError",
    "AnyRequest",
    "AsyncTuningClient",
    "AuthenticationError",
    "BackgroundLoop",
    "Box",
    "Checkpoint",
    "CheckpointPage",
    "ConflictError",
    "DetectGroundTruth",
    "DetectRequest",
    "GroundTruth",
    "InvalidRequestError",
    "MissingAPIKeyError",
    "NotFoundError",
    "Point",
    "PointGroundTruth",
    "PointRequest",
    "QueryRequest",
    "RateLimitError",
    "RateLimiter",
    "RetryPolicy",
    "Rollout",
    "RolloutCall",
    "RolloutsResponse",
    "ServerError",
    "Settings",
    "TrainGroup",
    "TrainStepResult",
    "TuningAPIError",
    "TuningClient",
    "UnsupportedFeatureError",
    "UsageStats",
    "inference_model_id",
    "resolve_api_key",
    "resolve_base_url",
]
