"""The model side of FlexCache (the `model` extra: torch and the offline text encoder).

- `text`: prompt embeddings from the offline MiniLM encoder the extra installs.
- `reference`: a small reference video diffusion model and its worker, trained on CPU, that the
  tests, benchmarks and demo serve through the cache. It is a test bed, not production code:
  production workers keep their own pipeline and use `flexcache.client`.
"""
