"""Benchmark the latent codec: bytes per cached prompt vs NIRVANA-style storage, speed, x0 error.

    .venv/bin/python -m bench.bench_codec              # synthetic Wan 2.1 / Open-Sora 1.2 latents
    .venv/bin/python -m bench.bench_codec --npy a.npy b.npy --name wan-real   # real latents [C, T, H, W]

Prints one markdown table.  Real VAE latents are not available here, so the default data is a
synthetic generator (see ``synthetic_latent``); ``bench_latents`` is the hook for real ones.

Counting: "bytes/prompt" = codec blob + 8 bytes of seed (FlexCache stores x0 once and rebuilds step
K).  NIRVANA-style = five fp16 latents of the same shape.  Encode / decode MB/s = bytes of the
*original* array (fp32: 4 B per value) divided by wall time (median of repeats, default threads).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flexcache.client import codec

WAN_480P = (16, 21, 60, 104)  # Wan 2.1, 81 frames 480x832: 4x temporal (1 + 80/4), 8x spatial
OPENSORA_720P = (4, 15, 90, 160)  # Open-Sora 1.2, 51 frames 720x1280: 8x spatial; its VAE maps each
#                                   17-frame chunk to 5 latent frames (~3.4x), so 51 frames -> 15
SEED_BYTES = 8


def synthetic_latent(shape: Sequence[int], seed: int, texture: float = 0.3, beta: float = 1.6,
                     temporal_stretch: float = 2.0) -> np.ndarray:
    """A stand-in for a VAE video latent [C, T, H, W], fp32.

    Per channel: a Gaussian random field with a power-law amplitude spectrum |f|^-beta over
    (t, h, w) (all scales at once: smooth blobs, edges, detail; temporal frequencies stretched by
    ``temporal_stretch`` so it is smoother in time than in space, as consecutive latent frames of a
    video are), normalised to unit variance, mixed with white "texture" carrying ``texture`` of the
    variance (fine grain the smooth field cannot predict), then scaled and shifted per channel with
    std U(1.1, 3.3) and mean U(-1, 1.5), about the spread of the Wan 2.1 VAE channel statistics.
    """
    rng = np.random.default_rng(seed)
    c, *rest = shape
    t, h, w = rest
    ft = np.fft.fftfreq(t)[:, None, None] * temporal_stretch
    fh = np.fft.fftfreq(h)[None, :, None]
    fw = np.fft.rfftfreq(w)[None, None, :]
    f = np.sqrt(ft**2 + fh**2 + fw**2)
    f[0, 0, 0] = 1.0
    amp = f ** (-beta)
    amp[0, 0, 0] = 0.0
    means = rng.uniform(-1.0, 1.5, c)
    stds = rng.uniform(1.1, 3.3, c)
    out = np.empty(shape, np.float32)
    for i in range(c):
        smooth = np.fft.irfftn(np.fft.rfftn(rng.standard_normal(rest)) * amp, s=rest, axes=(0, 1, 2))
        smooth /= smooth.std()
        v = math.sqrt(1 - texture) * smooth + math.sqrt(texture) * rng.standard_normal(rest)
        out[i] = means[i] + stds[i] * v
    return out


@dataclass
class Setting:
    label: str
    kwargs: dict
    dictionary: bool = False


DEFAULT_SETTINGS = [
    Setting("raw (fp32 as is)", {"chain": "raw"}),
    Setting("fp16+shuffle+zstd", {"chain": "fp16+shuffle+zstd"}),
    Setting("bf16+shuffle+zstd", {"chain": "bf16+shuffle+zstd"}),
    Setting("int8+zstd (per-channel range)", {"chain": "int8+zstd"}),
    Setting("int4+zstd (per-channel range)", {"chain": "int4+zstd"}),
    Setting("budget 0 (lossless)", {"max_rel_error": 0.0}),
    Setting("budget 1e-3", {"max_rel_error": 1e-3}),
    Setting("budget 5e-3", {"max_rel_error": 5e-3}),
    Setting("budget 1e-2", {"max_rel_error": 1e-2}),
    Setting("budget 2e-2", {"max_rel_error": 2e-2}),
    Setting("budget 3e-2", {"max_rel_error": 3e-2}),
    Setting(f"budget {codec.DEFAULT_MAX_REL_ERROR:g} (default)", {}),
    Setting(f"budget {codec.DEFAULT_MAX_REL_ERROR:g} + dictionary", {}, dictionary=True),
]


@dataclass
class Row:
    data: str
    setting: str
    chain: str
    bytes_per_prompt: float
    nirvana_bytes: int
    fp16_bytes: int
    encode_mbps: float
    decode_mbps: float
    rel_rmse: float


def _median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_latents(latents: Sequence[np.ndarray], name: str, settings: Sequence[Setting] = DEFAULT_SETTINGS,
                  dict_samples: Sequence[np.ndarray] = (), dtype: str | None = None,
                  enc_repeats: int = 3, dec_repeats: int = 5) -> list[Row]:
    """Measure every setting on these latents (the hook for real model latents: pass them here).

    ``latents``: arrays [C, T, H, W] (fp32, fp16, or bf16 as uint16 with dtype='bfloat16');
    ``dict_samples``: other latents of the same namespace to train the dictionary on (without
    them the dictionary rows are skipped: training on the test latents would flatter it).
    """
    rows = []
    dictionary = None
    if dict_samples and any(s.dictionary for s in settings):
        dictionary = codec.train_dictionary(dict_samples, dtype=dtype)
    for s in settings:
        if s.dictionary and dictionary is None:
            continue
        sizes, enc, dec, errs, chains = [], [], [], [], set()
        for x in latents:
            kw = dict(s.kwargs, dtype=dtype, dictionary=dictionary if s.dictionary else None)
            blob = codec.encode(x, **kw)
            enc.append(x.nbytes / _median_time(lambda x=x, kw=kw: codec.encode(x, **kw), enc_repeats))
            dd = dictionary if s.dictionary else None
            dec.append(x.nbytes / _median_time(lambda blob=blob, dd=dd: codec.decode(blob, dictionary=dd),
                                               dec_repeats))
            y = codec.decode(blob, dictionary=dictionary if s.dictionary else None)
            errs.append(codec.relative_rmse(x, y, dtype=dtype))
            info = codec.inspect(blob)
            assert abs(info.achieved_rel_error - errs[-1]) <= 1e-3 * errs[-1] + 1e-7
            sizes.append(len(blob) + SEED_BYTES)
            chains.add(info.chain)
        n = latents[0].size
        rows.append(Row(name, s.label, "/".join(sorted(chains)), statistics.mean(sizes), 5 * 2 * n, 2 * n,
                        statistics.median(enc) / 1e6, statistics.median(dec) / 1e6, max(errs)))
    return rows


def markdown(rows: Sequence[Row]) -> str:
    out = ["| data | setting | chain chosen | bytes / prompt | vs NIRVANA (5 x fp16) | vs 1 x fp16 "
           "| encode MB/s | decode MB/s | rel. RMSE x0 |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.data} | {r.setting} | {r.chain} | {r.bytes_per_prompt / 1e6:.3f} MB "
                   f"| {r.nirvana_bytes / r.bytes_per_prompt:.1f}x | {r.fp16_bytes / r.bytes_per_prompt:.2f}x "
                   f"| {r.encode_mbps:.0f} | {r.decode_mbps:.0f} | {r.rel_rmse:.2e} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--npy", nargs="*", default=[], help="real latents, one .npy [C, T, H, W] each")
    ap.add_argument("--name", default="real", help="label for --npy latents")
    ap.add_argument("--dtype", default=None, help="'bfloat16' if the --npy arrays are bf16 bit patterns")
    ap.add_argument("--quick", action="store_true", help="one latent, fewer repeats (smoke run)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows: list[Row] = []
    if args.npy:
        lat = [np.load(p, allow_pickle=False) for p in args.npy]
        half = len(lat) // 2
        rows += bench_latents(lat[half:] or lat, args.name, dict_samples=lat[:half], dtype=args.dtype)
    else:
        n = 1 if args.quick else 2
        reps = {"enc_repeats": 1, "dec_repeats": 2} if args.quick else {}
        for shape, label, texture in [(WAN_480P, "Wan 2.1 480p", 0.3), (OPENSORA_720P, "Open-Sora 1.2 720p", 0.3),
                                      (WAN_480P, "Wan 2.1 480p, smoother (texture 0.1)", 0.1)]:
            lat = [synthetic_latent(shape, seed=i, texture=texture) for i in range(n)]
            dsamp = [synthetic_latent(shape, seed=100 + i, texture=texture) for i in range(2)]
            rows += bench_latents(lat, f"{label} {list(shape)}", dict_samples=dsamp, **reps)
        x = synthetic_latent(WAN_480P, seed=0)
        fp16_set = [Setting(f"budget {codec.DEFAULT_MAX_REL_ERROR:g} (default)", {}),
                    Setting("budget 0 (lossless)", {"max_rel_error": 0.0})]
        rows += bench_latents([x.astype(np.float16)], "Wan 2.1 480p, fp16 input", fp16_set, **reps)
        rows += bench_latents([codec.fp32_to_bf16(x)], "Wan 2.1 480p, bf16 input", fp16_set, dtype="bfloat16",
                              **reps)
    print(markdown(rows))
    print(f"\n({time.perf_counter() - t0:.0f} s; MB/s counts original-dtype bytes: fp32 4 B, fp16/bf16 2 B "
          f"per value; decode includes checksum, zstd, unshuffle, dequantize)")


if __name__ == "__main__":
    main()
