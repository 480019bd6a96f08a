"""Ground real text-to-video prompts in the reference world, so real prompt suites can drive it.

The reference model only knows its procedural world (coloured shapes over patterned backgrounds),
so a prompt such as "a stop sign in a still frame" means nothing to it. The serving benchmark still
wants its traffic to have the structure of real traffic: which requests repeat, which are
paraphrases, which share a subject or a scene. `Grounder.spec(prompt)` keeps that structure by a
semantic projection:

- the prompt is split into its object and background parts (`prompt_split`; an empty part falls
  back to the whole prompt);
- the object part goes to the nearest of the world's 336 single objects ("a small red square moving
  left"), the background part to the nearest of its 37 backgrounds ("a plain purple background"),
  by cosine similarity of MiniLM embeddings; an object the background would hide (same colour, or
  blue/green on the sky scene) is skipped for the next nearest.

So prompts that share a subject share a world object, prompts that share a scene share a world
background, colour words carry over ("a red stop sign" -> a red object), and the mapping is a pure
function of the text (deterministic, offline). It is a stand-in, stated as such: the projected
prompt is what the model renders and what its quality is scored on.
"""

from __future__ import annotations

import itertools
from functools import cached_property

import numpy as np

from flexcache.client.prompt_split import split_prompt
from flexcache_model import text

from . import world

__all__ = ["Grounder"]


def _object_text(o: world.ObjectSpec) -> str:
    return f"a {o.size} {o.color} {o.shape} {world.motion_phrases(o.motion)[0]}"


class Grounder:
    """Maps any prompt to a complete single-object `world.ClipSpec` (see the module docstring)."""

    @cached_property
    def _objects(self) -> tuple[list[world.ObjectSpec], np.ndarray]:
        specs = [world.ObjectSpec(shape=s, color=c, size=z, motion=m) for s, c, z, m in
                 itertools.product(world.SHAPES, world.OBJ_COLORS, world.SIZES, world.MOTIONS)]
        return specs, text.embed([_object_text(o) for o in specs])

    @cached_property
    def _backgrounds(self) -> tuple[list[tuple[str, str | None]], np.ndarray]:
        backgrounds = [(t, None) if t in world.SCENES else (t, c)
                       for t in world.BG_TYPES for c in ([None] if t in world.SCENES else world.BG_COLORS)]
        return backgrounds, text.embed([world.background_phrase(t, c) for t, c in backgrounds])

    def spec(self, prompt: str) -> world.ClipSpec:
        parts = split_prompt(prompt)
        obj_vec, bg_vec = text.embed([parts.object or prompt, parts.background or prompt])
        backgrounds, bg_table = self._backgrounds
        bg_type, bg_color = backgrounds[int(np.argmax(bg_table @ bg_vec))]
        objects, obj_table = self._objects
        hidden = {bg_color} | ({"blue", "green"} if bg_type == "sky" else set())
        for i in np.argsort(-(obj_table @ obj_vec), kind="stable"):
            if objects[i].color not in hidden:
                return world.ClipSpec(objects=(objects[i],), bg_type=bg_type, bg_color=bg_color)
        raise AssertionError("every background leaves some object colour visible")

    @staticmethod
    def caption(spec: world.ClipSpec, variant: int) -> str:
        """One wording of the spec; `variant` picks the template and phrases (a paraphrase)."""
        return world.caption(spec, np.random.default_rng([7, variant]))
