"""Procedural video world: specs, captions, caption parsing and rendering.

The world is small enough that a latent diffusion model can be trained on CPU, yet has the
structure real prompts have: one or two objects (shape, colour, size, motion) over a background
(type, colour), paraphrased captions, and object/background halves of a prompt. Every clip comes
with per-frame ground-truth object masks, so object/background decoupling can be measured.

numpy only: no torch import here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np

T, H, W = 8, 32, 32  # frames, height, width of every clip

SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
OBJ_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "purple")
SIZES: tuple[str, ...] = ("small", "large")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "bouncing", "rotating", "growing")
BG_TYPES: tuple[str, ...] = ("solid", "gradient", "stripes", "checker", "noise", "sky", "night")
BG_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "gray", "orange")
SCENES: tuple[str, ...] = ("sky", "night")  # background types with a fixed palette (no colour)

RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.10, 0.80, 0.20),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "white": (0.97, 0.97, 0.97),
    "purple": (0.62, 0.15, 0.85),
    "gray": (0.50, 0.50, 0.50),
    "orange": (0.98, 0.55, 0.08),
}

# Vocabulary for parse_caption: word -> canonical value.
_COLOR_WORDS = {c: c for c in RGB} | {"grey": "gray", "violet": "purple", "crimson": "red"}
_SHAPE_WORDS = {
    "square": "square", "box": "square", "block": "square", "cube": "square",
    "circle": "circle", "ball": "circle", "disc": "circle", "disk": "circle", "dot": "circle",
    "triangle": "triangle", "cross": "cross", "plus": "cross",
}
_SIZE_WORDS = {"small": "small", "tiny": "small", "little": "small", "large": "large", "big": "large",
               "huge": "large"}
_MOTION_WORDS = {
    "left": "left", "leftward": "left", "leftwards": "left",
    "right": "right", "rightward": "right", "rightwards": "right",
    "up": "up", "upward": "up", "upwards": "up", "rising": "up", "rises": "up", "climbing": "up",
    "down": "down", "downward": "down", "downwards": "down", "falling": "down", "falls": "down",
    "sinking": "down",
    "bouncing": "bouncing", "bounces": "bouncing", "bounce": "bouncing", "hopping": "bouncing",
    "rotating": "rotating", "rotates": "rotating", "spinning": "rotating", "spins": "rotating",
    "turning": "rotating",
    "growing": "growing", "grows": "growing", "expanding": "growing", "swelling": "growing",
}
_BG_WORDS = {
    "plain": "solid", "solid": "solid", "uniform": "solid",
    "gradient": "gradient", "fading": "gradient",
    "stripes": "stripes", "striped": "stripes", "stripe": "stripes",
    "checker": "checker", "checkered": "checker", "checkerboard": "checker", "checks": "checker",
    "noise": "noise", "noisy": "noise", "grainy": "noise", "speckled": "noise",
    "sky": "sky", "grass": "sky", "meadow": "sky",
    "night": "night", "stars": "night", "starry": "night",
}


@dataclass(frozen=True)
class ObjectSpec:
    """One moving object. Fields are None only in specs parsed from free text."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None
    motion: str | None = None


@dataclass(frozen=True)
class ClipSpec:
    """A whole clip: one or two objects over one background."""

    objects: tuple[ObjectSpec, ...] = field(default_factory=tuple)
    bg_type: str | None = None
    bg_color: str | None = None  # None for scenes (sky, night)

    def attributes(self) -> list[tuple[str, str]]:
        """The (attribute, value) pairs this spec asserts; what prompt fidelity is scored on."""
        out: list[tuple[str, str]] = []
        for o in self.objects:
            for name in ("shape", "color", "size", "motion"):
                v = getattr(o, name)
                if v is not None:
                    out.append((name, v))
        if self.bg_type is not None:
            out.append(("bg_type", self.bg_type))
        if self.bg_color is not None:
            out.append(("bg_color", self.bg_color))
        return out


def random_spec(rng: np.random.Generator, p_two: float = 0.2) -> ClipSpec:
    """Draw a complete clip spec; objects never share the background's colour (invisible)."""
    bg_type = str(rng.choice(BG_TYPES))
    bg_color = None if bg_type in SCENES else str(rng.choice(BG_COLORS))
    n = 2 if rng.random() < p_two else 1
    objs: list[ObjectSpec] = []
    for _ in range(n):
        colors = [c for c in OBJ_COLORS if c != bg_color and c not in {o.color for o in objs}]
        if bg_type == "sky":
            colors = [c for c in colors if c not in ("blue", "green")]
        objs.append(ObjectSpec(shape=str(rng.choice(SHAPES)), color=str(rng.choice(colors)),
                               size=str(rng.choice(SIZES)), motion=str(rng.choice(MOTIONS))))
    return ClipSpec(objects=tuple(objs), bg_type=bg_type, bg_color=bg_color)


# ----------------------------------------------------------------------------- captions

_MOTION_PHRASES = {
    "left": ["moving left", "drifting left", "sliding to the left", "moving to the left", "gliding leftward"],
    "right": ["moving right", "drifting right", "sliding to the right", "moving to the right",
              "gliding rightward"],
    "up": ["moving up", "rising", "drifting upward", "floating up", "climbing upward"],
    "down": ["moving down", "falling", "sinking down", "drifting downward", "dropping down"],
    "bouncing": ["bouncing", "bouncing up and down", "hopping"],
    "rotating": ["rotating", "spinning", "turning in place", "spinning around"],
    "growing": ["growing", "expanding", "growing bigger", "swelling"],
}
_BG_PHRASES = {
    "solid": ["a plain {c} background", "a solid {c} backdrop", "a uniform {c} background"],
    "gradient": ["a {c} gradient", "a {c} gradient background", "a fading {c} backdrop"],
    "stripes": ["{c} stripes", "a striped {c} background", "a background of {c} stripes"],
    "checker": ["a {c} checkerboard", "a checkered {c} background", "{c} checks"],
    "noise": ["a noisy {c} texture", "{c} noise", "a grainy {c} background"],
    "sky": ["a blue sky over green grass", "sky over grass", "a meadow under a blue sky"],
    "night": ["a night sky with stars", "a starry night", "stars at night"],
}
_OBJ_FIRST = ["{o} over {b}", "{o} on {b}", "{o} in front of {b}", "{o}, {b}"]
_BG_FIRST = ["{b} behind {o}", "{b} with {o}", "{b}, {o}", "on {b}, {o}"]


def motion_phrases(motion: str) -> list[str]:
    """The wordings captions use for a motion, canonical first."""
    return list(_MOTION_PHRASES[motion])


def background_phrase(bg_type: str, bg_color: str | None, variant: int = 0) -> str:
    """One wording of a background (variant 0 is the canonical one)."""
    phrases = _BG_PHRASES[bg_type]
    return _articles(re.sub(r"\s+", " ", phrases[variant % len(phrases)].format(c=bg_color or "")).strip())


def object_phrase(o: ObjectSpec, rng: np.random.Generator | None = None) -> str:
    """Noun phrase for one object, e.g. 'a small red square drifting left'."""
    rng = rng or np.random.default_rng(0)
    words = ["a"]
    if o.size is not None and (rng.random() < 0.8):
        words.append(o.size)
    if o.color is not None:
        words.append(o.color)
    words.append(o.shape or "shape")
    if o.motion is not None:
        words.append(str(rng.choice(_MOTION_PHRASES[o.motion])))
    return " ".join(words)


def caption_parts(spec: ClipSpec, rng: np.random.Generator | None = None) -> tuple[str, str]:
    """(object part, background part) of a caption; later work looks the two up separately."""
    rng = rng or np.random.default_rng(0)
    obj = " and ".join(object_phrase(o, rng) for o in spec.objects)
    if spec.bg_type is None:
        bg = "a background"
    else:
        bg = background_phrase(spec.bg_type, spec.bg_color, int(rng.integers(len(_BG_PHRASES[spec.bg_type]))))
    return _articles(obj), bg


# Words spelled with a vowel but said with a consonant ("you", "w"), which keep "a": a uniform, a
# unicorn, a university, a user, a utility, a euro, a ewe, a one-off. "un" before a vowel is "an" (an
# unusual, an unaware) except "uni-" (a unit, a union), bar "unim-" and "unin-" (an unimportant).
_CONSONANT_SOUND = r"(?:uni(?![mn])|u[bfgklrstv][aeiou]|eu|ewe|one\b|once\b)"


def _articles(text: str) -> str:
    """'a orange' -> 'an orange', by the sound that follows, not the letter: 'a uniform' stays."""
    return re.sub(rf"\ba (?=[aeiou])(?!{_CONSONANT_SOUND})", "an ", text)


def caption(spec: ClipSpec, rng: np.random.Generator | None = None) -> str:
    """A caption from one of several templates, object-first or background-first."""
    rng = rng or np.random.default_rng(0)
    obj, bg = caption_parts(spec, rng)
    templates = _OBJ_FIRST if rng.random() < 0.6 else _BG_FIRST
    return str(rng.choice(templates)).format(o=obj, b=bg)


def parse_caption(text: str) -> ClipSpec:
    """Vocabulary-based parse of any prompt into a (possibly partial) spec.

    Objects are anchored on shape words; a colour/size just before a shape belongs to it and motion
    words up to the next shape belong to it. Colours next to a background word are the background's.
    """
    toks = re.findall(r"[a-z]+", text.lower())
    shape_idx = [i for i, t in enumerate(toks) if t in _SHAPE_WORDS]
    bg_idx = [i for i, t in enumerate(toks) if t in _BG_WORDS or t in ("background", "backdrop")]
    used: set[int] = set()
    objs: list[ObjectSpec] = []
    for j, si in enumerate(shape_idx):
        color = size = motion = None
        for k in range(si - 1, max(-1, si - 4), -1):
            if toks[k] in _COLOR_WORDS and color is None:
                color = _COLOR_WORDS[toks[k]]
                used.add(k)
            elif toks[k] in _SIZE_WORDS and size is None:
                size = _SIZE_WORDS[toks[k]]
            elif k in bg_idx or toks[k] in _SHAPE_WORDS:
                break
        end = shape_idx[j + 1] if j + 1 < len(shape_idx) else len(toks)
        for k in range(si + 1, end):
            if toks[k] in _MOTION_WORDS:
                motion = _MOTION_WORDS[toks[k]]
                break
            if toks[k] in _BG_WORDS and _BG_WORDS[toks[k]] not in ("sky",):
                break
        objs.append(ObjectSpec(shape=_SHAPE_WORDS[toks[si]], color=color, size=size, motion=motion))
    bg_type = bg_color = None
    types = [_BG_WORDS[toks[i]] for i in bg_idx if toks[i] in _BG_WORDS]
    if "night" in types:
        bg_type = "night"
    elif "sky" in types:
        bg_type = "sky"
    elif types:
        bg_type = types[0]
    elif bg_idx:
        bg_type = "solid"
    if bg_type is not None and bg_type not in SCENES:
        for i in bg_idx:
            for k in (i - 1, i - 2, i + 1, i + 2, i + 3):
                if 0 <= k < len(toks) and k not in used and toks[k] in _COLOR_WORDS:
                    bg_color = _COLOR_WORDS[toks[k]]
                    break
            if bg_color is not None:
                break
    return ClipSpec(objects=tuple(objs), bg_type=bg_type, bg_color=bg_color)


# ----------------------------------------------------------------------------- rendering

def complete_spec(spec: ClipSpec, rng: np.random.Generator) -> ClipSpec:
    """Fill the None fields of a (parsed) spec at random, so any prompt can be rendered."""
    full = random_spec(rng)
    objs = spec.objects or full.objects[:1]
    filled = []
    for i, o in enumerate(objs):
        d = full.objects[min(i, len(full.objects) - 1)]
        filled.append(ObjectSpec(o.shape or d.shape, o.color or d.color, o.size or d.size,
                                 o.motion or d.motion))
    bg_type = spec.bg_type or full.bg_type
    bg_color = spec.bg_color
    if bg_type in SCENES:
        bg_color = None
    elif bg_color is None:
        bg_color = full.bg_color or "gray"
    return replace(spec, objects=tuple(filled), bg_type=bg_type, bg_color=bg_color)


def _background(bg_type: str, bg_color: str | None, rng: np.random.Generator) -> np.ndarray:
    """Static background [3,H,W]; muted colours so bright objects stay visible."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    c = np.array(RGB.get(bg_color or "gray", RGB["gray"]), np.float32)[:, None, None]
    dark = 0.25 * c
    if bg_type == "solid":
        img = 0.6 * c * np.ones((1, H, W), np.float32)
    elif bg_type == "gradient":
        a = (yy / (H - 1))[None]
        img = (1 - a) * 0.8 * c + a * dark
    elif bg_type == "stripes":
        phase = rng.integers(0, 8)
        m = (((xx + phase) // 4) % 2)[None]
        img = m * 0.7 * c + (1 - m) * dark
    elif bg_type == "checker":
        m = (((xx // 8) + (yy // 8)) % 2)[None]
        img = m * 0.7 * c + (1 - m) * dark
    elif bg_type == "noise":
        n = rng.random((1, H // 4, W // 4)).astype(np.float32)
        n = np.kron(n, np.ones((1, 4, 4), np.float32))
        img = (0.2 + 0.6 * n) * c
    elif bg_type == "sky":
        horizon = int(rng.integers(18, 24))
        sky = np.array([0.35, 0.6, 0.95], np.float32)[:, None, None]
        grass = np.array([0.15, 0.55, 0.12], np.float32)[:, None, None]
        m = (yy < horizon)[None]
        img = np.where(m, sky * (0.8 + 0.2 * yy[None] / H), grass * np.ones((1, H, W), np.float32))
    elif bg_type == "night":
        img = np.array([0.03, 0.04, 0.15], np.float32)[:, None, None] * np.ones((1, H, W), np.float32)
        k = int(rng.integers(10, 16))
        ys, xs = rng.integers(0, H, k), rng.integers(0, W, k)
        img = img.copy()
        img[:, ys, xs] = 0.95
    else:
        raise ValueError(f"unknown background type {bg_type!r}")
    return np.clip(img, 0, 1).astype(np.float32)


def _shape_mask(shape: str, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    """Boolean [H,W] mask of a shape with half-size r centred at (cy, cx), rotated by angle."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
    dy, dx = yy - cy, xx - cx
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy
    if shape == "square":
        return (np.abs(u) <= r) & (np.abs(v) <= r)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "triangle":
        # upright triangle: apex at top, base at bottom
        return (v <= r * 0.8) & (v >= -r) & (np.abs(u) <= (v + r) * 0.55)
    if shape == "cross":
        t = r * 0.38
        return ((np.abs(u) <= r) & (np.abs(v) <= t)) | ((np.abs(v) <= r) & (np.abs(u) <= t))
    raise ValueError(f"unknown shape {shape!r}")


def _trajectory(o: ObjectSpec, rng: np.random.Generator) -> list[tuple[float, float, float, float]]:
    """Per-frame (cy, cx, r, angle) for one object."""
    r0 = 4.0 if o.size == "small" else 6.5
    speed = 2.0
    travel = speed * (T - 1)
    lo, hi = r0 + 1, H - r0 - 1
    cy, cx = rng.uniform(lo, hi), rng.uniform(lo, hi)
    if o.motion == "left":
        cx = rng.uniform(lo + travel, max(lo + travel, hi) + 1e-3)
    elif o.motion == "right":
        cx = rng.uniform(lo, max(lo, hi - travel) + 1e-3)
    elif o.motion == "up":
        cy = rng.uniform(lo + travel, max(lo + travel, hi) + 1e-3)
    elif o.motion == "down":
        cy = rng.uniform(lo, max(lo, hi - travel) + 1e-3)
    elif o.motion == "bouncing":
        cy = H - r0 - 1
    elif o.motion in ("growing", "rotating"):
        cy, cx = rng.uniform(12, 20), rng.uniform(12, 20)
    out = []
    for t in range(T):
        y, x, r, a = cy, cx, r0, 0.0
        if o.motion == "left":
            x = cx - speed * t
        elif o.motion == "right":
            x = cx + speed * t
        elif o.motion == "up":
            y = cy - speed * t
        elif o.motion == "down":
            y = cy + speed * t
        elif o.motion == "bouncing":
            y = cy - 12.0 * abs(np.sin(np.pi * t / 4.0))
        elif o.motion == "rotating":
            a = (np.pi / 2) * t / (T - 1) * 1.5
        elif o.motion == "growing":
            r = 2.5 + (r0 + 2.5 - 2.5) * t / (T - 1)
        out.append((float(y), float(x), float(r), float(a)))
    return out


def render(spec: ClipSpec, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Render a clip: video float32 [T,3,H,W] in [0,1] and object masks bool [T,H,W].

    The seed fixes everything the spec leaves open (positions, texture, unspecified fields).
    """
    rng = np.random.default_rng(seed)
    spec = complete_spec(spec, rng)
    bg = _background(spec.bg_type or "solid", spec.bg_color, rng)
    video = np.repeat(bg[None], T, axis=0).copy()
    masks = np.zeros((T, H, W), bool)
    for o in spec.objects:
        col = np.array(RGB[o.color or "white"], np.float32)[:, None]
        for t, (y, x, r, a) in enumerate(_trajectory(o, rng)):
            m = _shape_mask(o.shape or "square", y, x, r, a)
            video[t][:, m] = col
            masks[t] |= m
    return video, masks


def sample_dataset(n: int, seed: int = 0, captions_per_clip: int = 1
                   ) -> tuple[list[ClipSpec], list[list[str]], np.ndarray, np.ndarray]:
    """n random clips: specs, captions, videos uint8 [n,T,3,H,W] and masks bool [n,T,H,W]."""
    rng = np.random.default_rng(seed)
    specs, caps = [], []
    videos = np.zeros((n, T, 3, H, W), np.uint8)
    masks = np.zeros((n, T, H, W), bool)
    for i in range(n):
        s = random_spec(rng)
        v, m = render(s, seed=int(rng.integers(1 << 31)))
        specs.append(s)
        caps.append([caption(s, rng) for _ in range(captions_per_clip)])
        videos[i] = np.round(v * 255).astype(np.uint8)
        masks[i] = m
    return specs, caps, videos, masks
