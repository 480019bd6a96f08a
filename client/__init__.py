"""FlexCache client: look up, fetch and store latents from inside a diffusion worker."""

from .client import CacheClient, Candidate, Fetched, Hit, LookupResult, Namespace, Rebuild

__all__ = ["CacheClient", "Candidate", "Fetched", "Hit", "LookupResult", "Namespace", "Rebuild"]
