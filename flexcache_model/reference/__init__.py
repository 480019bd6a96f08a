"""The reference model: a procedural video world (`world`), a latent video autoencoder (`vae`), a
small diffusion transformer (`denoiser`) with flow-matching and DDPM/DDIM schedulers, the
pipeline that samples it (`pipeline`), a probe-based quality metric (`quality`), training
(`train`), the forward process that rebuilds x_K from x0 (`rebuild`), the mapping of real prompts
onto the world (`grounding`), and the worker that serves it through the cache (`worker/`)."""
