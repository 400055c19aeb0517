"""The LLM call layer: one `Client` interface (`complete(request) -> Response`), a cached,
rate-limited, retrying, budgeted implementation over an OpenAI-compatible endpoint, and
typed failures. Used by the explainers and the simulators. Importing it has no side effects."""

from builder.llm.client import CachedClient, CallSettings, CallStats, openai_client
from builder.llm.types import Client, FailureKind, LLMFailure, Request, Response, Usage

__all__ = ["CachedClient", "CallSettings", "CallStats", "Client", "FailureKind", "LLMFailure", "Request", "Response",
           "Usage", "openai_client"]
