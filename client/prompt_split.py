"""Split a text-to-video prompt into an object part and a background part.

FlexCache's decoupled lookup embeds three texts per cache entry (full prompt, object, background)
so that a miss on the whole prompt can still borrow an object donor and a background donor. This
module produces the two texts with a fast, deterministic, offline rule/lexicon parser -- no model,
no downloads, no torch -- because it runs on every request, on the worker's request path.

How it works (see docs/prompt_split.md for the full description and the measured accuracy):

1. The prompt is tokenised into words and punctuation (keeping character offsets, so every output
   part is made of verbatim slices of the input).
2. Sentences (``. ! ?``) are cut into chunks at ``, ; :``. Each chunk gets a *lead* phrase (the noun
   phrase it opens with, looking through frame words: "a tableau of alley", "the edge of a cliff",
   "close-up of a dog") and the lead's head word is looked up in lexicons:
   scene/place nouns, time of day, weather, light, camera/style. A chunk whose lead is a scene, a time,
   weather, light, camera or style phrase is background; a chunk that opens with a place preposition
   ("in a forest", "at sunset", "against a backdrop of ...") is background unless its noun is an
   attribute (clothing, body part); a chunk that opens with a participle or only adjectives inherits
   the label of the chunk before it ("The street is damp, creating a mirror effect").
3. Inside an object chunk, a place prepositional phrase whose noun is a scene word ("running *on the
   beach at sunset*", "drifting left *over a striped blue background*") is cut out to the background,
   up to the next clause break (", while", "and <verb>", ...).
4. Inside a background chunk opened by a pattern/scene phrase, "behind/in front of/under/with X" or
   "featuring/showing X" with a non-scene X hands X back to the object ("blue stripes behind *a small
   red square moving left*", "a checkered yellow background with *a large red square*"). So is what a
   camera move lands on or follows ("the camera zooms in on *a cat*", "the camera tracks *a red car*").
5. Context decides for words that are background as a phrase but things as a subject: a celestial
   body, a single cloud or a camera-named thing (drone, frame, painting) heading a clause's subject
   phrase before its verb is an object ("*The sun rises*", "*A black drone is floating* in the air",
   but "drone shot of a beach", "at sunset under the moon"); so is one with a material ("a metal
   frame"), and so is the first of coordinated subjects before a verb ("*A black drone and a blue
   drone are floating*"). A noun, an -s word and a determiner or object pronoun read the -s word as
   the verb ("One person *hands* a camera", "the broomstick *catches* it mid-air"), a passive agent
   ends a place phrase ("thrown into the air | *by the pillow*"), and a thing's possessive inside a
   place phrase stays with the object ("flies | *the sloth's* | path"). A weather mass (fog, mist,
   steam, smoke) stays weather as a subject ("Mist rises from the waterfall") but is a thing when its
   subject phrase carries a place of its own before the verb ("*mist* | in a rainforest | *comes into
   contact with a cold metal surface*"), and "as" before a bare subject and its finite verb opens a
   clause as "as the ..." does ("as *steam from a boiling pot comes* ...", not "as if", "as well as").

Style and camera words ("cinematic, 4k, slow pan", "in the style of Van Gogh", "front view") are part
of the background text -- they set the global look, which the background donor supplies -- and are
also reported on their own in ``PromptSplit.style`` (a subset of the background) for callers that want
to embed the setting without them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["PromptSplit", "PromptSplitter", "split_prompt"]


@dataclass(frozen=True)
class PromptSplit:
    """Result of :func:`split_prompt`.

    ``object``: subjects, count, attributes and action ("" when the prompt is a pure scene).
    ``background``: scene, setting, time, weather, light, camera and style ("" when there is none).
    ``style``: the camera/style/quality part of ``background`` alone (always a subset of it).
    """

    object: str
    background: str
    style: str = ""


# --------------------------------------------------------------------------------------------------
# Lexicons. Written from general knowledge of scene vocabularies (Places365-like place categories,
# landscape and weather words, cinematography terms). The VBench scene labels were read while
# writing SCENE_WORDS, so VBench scene recall is NOT a held-out figure; see docs/prompt_split.md.
# --------------------------------------------------------------------------------------------------


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


SCENE_WORDS: frozenset[str] = _words(
    """
    background backdrop backdrops scenery landscape landscapes setting surroundings environment
    horizon sky skies skyline cityscape seascape panorama vista outdoors indoors interior exterior
    world universe space cosmos galaxy nebula atmosphere air mid-air midair
    forest forests woods woodland jungle rainforest grove orchard park parks garden gardens meadow
    meadows field fields prairie grassland savanna savannah steppe plain plains pasture farmland
    farm ranch vineyard countryside desert dune dunes oasis canyon gorge ravine valley valleys hill
    hills hillside mountain mountains mountainside peak peaks summit ridge cliff cliffs cliffside
    volcano crater cave cavern tundra glacier iceberg icefield snowfield marsh swamp wetland bog
    beach beaches shore shoreline coast coastline seashore seaside sea ocean oceans bay harbor
    harbour port pier dock docks marina lagoon lake lakes lakeside lakeshore pond river riverbank
    riverside stream creek brook waterfall waterfalls rapids fountain reef seabed seafloor underwater
    island islands waves wave surf water waters sand snow ice grass lawn moss rocks boulders trees
    treetops foliage bushes flowers wildflowers sunflowers clouds fog mist
    city cities town village downtown suburb suburbs neighborhood neighbourhood street streets road
    roads avenue boulevard highway freeway motorway alley alleyway archway clearing lane path
    pathway trail sidewalk
    crosswalk intersection plaza courtyard driveway parking lot bridge tunnel railway
    railroad tracks track platform station subway metro airport runway raceway racetrack stadium
    arena court pitch rink slope slopes campus campsite camp playground carnival fairground
    carrousel carousel amusement cemetery graveyard ruins ruin construction site junkyard dump
    factory industrial warehouse area district zone market marketplace bazaar mall supermarket
    store shop shops bakery boutique pharmacy cafe cafeteria restaurant diner bar pub club
    nightclub hotel lobby hospital clinic school classroom university library museum gallery
    theater theatre cinema studio office laboratory lab church cathedral temple mosque shrine
    monastery palace castle fortress mansion villa house houses home cottage cabin hut barn
    farmhouse skyscraper skyscrapers building buildings tower towers lighthouse windmill arch
    gate wall walls rooftop roof balcony terrace porch patio backyard yard garage basement attic
    cellar room rooms bedroom bathroom kitchen livingroom hall hallway corridor staircase stairs
    ballroom gym gymnasium pool nursery dormitory jail prison cell booth aquarium zoo greenhouse
    conservatory observatory train-station
    floor ground earth land terrain stage set scene
    """
)

# Multi-word scene names whose head alone would mislead ("living room" is fine via "room").
SCENE_PHRASES: frozenset[str] = frozenset(
    {
        "parking lot",
        "golf course",
        "food court",
        "phone booth",
        "gas station",
        "train station",
        "outer space",
        "night sky",
        "town square",
        "ski slope",
        "ski resort",
        "ski run",
        "public square",
        "city square",
        "coral reef",
        "swimming pool",
        "movie theater",
        "city street",
    }
)

TIME_WORDS: frozenset[str] = _words(
    """
    night nights nighttime night-time midnight evening evenings dusk twilight sunset sunsets sundown
    dawn daybreak sunrise morning mornings daytime noon midday afternoon day days spring summer
    autumn winter springtime summertime wintertime season hour
    """
)

WEATHER_WORDS: frozenset[str] = _words(
    """
    rain rainfall raindrops drizzle downpour storm storms thunderstorm thunder lightning snowfall
    snowstorm blizzard hail fog mist haze smog wind breeze gale sunshine sunlight moonlight
    starlight stars starry clouds cloud overcast rainbow aurora weather sun moon
    """
)

LIGHT_WORDS: frozenset[str] = _words(
    """
    lighting lights glow glowing illumination shadows shade shadow sunbeams rays candlelight
    firelight lamplight neon silhouette silhouettes hues bokeh ambiance ambience mood tones
    """
)

STYLE_WORDS: frozenset[str] = _words(
    """
    cinematic cinematography 4k 8k hd uhd hdr realistic photorealistic hyperrealistic
    realism surreal surrealism style styles stylized view views shot shots angle close-up closeup
    close-ups pan pans panning zoom zooms zooming tilt tilts tracking dolly aerial drone footage
    frame frames timelapse time-lapse slow-motion motion lens focus film movie camera cameras
    animation animated anime cartoon watercolor watercolour painting oil sketch drawing pixel
    render rendering 3d 2d illustration vintage monochrome grayscale sepia black-and-white
    photograph photography photo picture image video clip scene scenes composition perspective
    quality resolution detailed masterpiece ukiyo ukiyo-e cyberpunk steampunk impressionism
    impressionist baroque minimalist noir documentary vlog pov first-person third-person
    wide-angle fisheye macro telephoto handheld static still sequence transition
    """
)

# Nouns that are background or camera words as a phrase ("at sunset under the moon", "drone shot",
# "a painting of a fox") but objects when they are the grammatical subject of a verb in the chunk's
# lead ("The moon rises", "A black drone is floating", "The wooden frame turned into ..."). Celestial
# bodies and a single cloud are moving things a video follows; a camera-named thing that acts is a
# thing. Exact forms (no plural folding): "clouds roll in" stays weather, "a cloud changes" is a thing.
SUBJECT_NOUNS: frozenset[str] = _words(
    """
    sun suns moon moons star stars planet planets comet comets meteor meteors asteroid asteroids
    cloud rainbow
    drone drones frame frames painting paintings picture pictures photo photos photograph
    photographs sketch drawing drawings
    """
)

# Weather masses (and their kin): background as a subject too ("Mist rises from the waterfall", "fog
# rolls in"), but a thing when the subject phrase carries a place of its own before its verb ("as mist
# in a rainforest comes into contact with a cold metal surface", "steam from a boiling pot comes ...").
MASS_NOUNS: frozenset[str] = _words("fog mist haze smog smoke steam vapor vapour")

# Plants (scene words as a setting): the subject of a prompt that names nothing else ("Flowers sway").
PLANT_WORDS: frozenset[str] = _words(
    "flower wildflower sunflower tree palm grass bush plant leaf leave fern moss rose tulip daisy lily"
)

# Words after "as" that open no clause ("as if", "as well as", "as soon as").
_AS_NOT_CLAUSE: frozenset[str] = _words("if though well soon much many long far usual such part opposed")

# Materials: a SUBJECT_NOUNS head with one of these before it is a thing ("a metal frame").
MATERIAL_WORDS: frozenset[str] = _words(
    "wooden wood metal metallic glass plastic steel iron stone brick paper cardboard leather ceramic "
    "marble bronze copper brass gold silver golden silver plush rubber"
)

# Verbs after which a camera/frame subject stays the camera ("the frame shows", "the drone shot pans").
CAMERA_VERBS: frozenset[str] = _words(
    "pans pan zooms zoom tilts tilt tracks track cuts cut fades fade transitions transition orbits orbit "
    "circles circle focuses focus shows show captures capture reveals reveal features feature depicts"
)

# Camera moves whose landing point is the subject ("zooms in on a cat", "pans to a cyclist"), the
# prepositions that name that point, and verbs whose direct object the camera follows.
CAMERA_MOVES: frozenset[str] = _words(
    "zoom zooms zooming zoomed pan pans panning panned focus focuses focusing focused tilt tilts tilting "
    "cut cuts cutting move moves moving shift shifts shifting push pushes pushing close closes closing "
    "linger lingers lingering settle settles settling"
)
TARGET_PREPS: frozenset[str] = _words("on onto at upon")
FOLLOW_VERBS: frozenset[str] = _words(
    "follows following tracks tracking approaches approaching circles circling orbits orbiting"
)
_MOVE_PARTICLES: frozenset[str] = _words("in out up down back closer over across around then")
_FOLLOW = _words("follows following")  # a chunk's lead that introduces what the camera follows

# Words of a camera move that names no target of its own ("the camera circles around", "pan left").
_ORBIT_MOVES: frozenset[str] = CAMERA_MOVES | FOLLOW_VERBS | _words("circle circles orbit dolly truck")

_BE: frozenset[str] = _words("is are was were be being been")

# Words that make a noun phrase an attribute of the subject, not a place ("in a red dress").
ATTRIBUTE_WORDS: frozenset[str] = _words(
    """
    dress dresses suit suits shirt shirts t-shirt coat coats jacket jackets hat hats cap uniform
    uniforms costume costumes robe robes gown clothes clothing outfit outfits sweater hoodie jeans
    pants trousers skirt shoes boots gloves scarf glasses sunglasses helmet armor armour mask
    hand hands arm arms mouth teeth eye eyes face head hair fur paw paws lap arms tail wings
    pajamas pyjamas bikini swimsuit apron overalls kimono sari tuxedo
    """
)

# "a view of X", "the edge of a cliff", "a group of people": look through to X.
FRAME_WORDS: frozenset[str] = _words(
    """
    view views shot close-up closeup footage video image photo picture clip scene tableau glimpse
    panorama vista time-lapse timelapse portrait depiction painting illustration rendering sketch
    edge edges top bottom side sides middle center centre corner corners heart depths depth
    surface banks bank outskirts foot base interior inside outside part end rest front back
    group groups couple pair herd flock school pack swarm crowd team family bunch lot lots
    number dozens hundreds thousands series row rows line lines cluster collection set angle angles
    animation animations film movie cartoon
    """
)

# A quantifier-ish frame word: looks through but its head is an object group ("a group of people").
PATTERN_WORDS: frozenset[str] = _words(
    """
    stripes stripe striped checkerboard checkers checks checkered grid gradient pattern patterns dots polka
    texture textures noise wallpaper tiles mosaic backdrop background backgrounds
    """
)

PLACE_PREPS: frozenset[str] = _words(
    """
    in inside within on onto upon at over above across along alongside through throughout into
    under underneath beneath below among amongst amid amidst around near beside by against behind
    between beyond past toward towards down up out off from atop outside during before
    """
)

# Prepositions that introduce a background phrase even when the noun is not in a lexicon, when
# they open a chunk ("In a quiet corner, ...", "Against soft light, ...").
DEFAULT_BG_PREPS: frozenset[str] = _words(
    "in inside within at amid amidst among amongst throughout across along against beneath under "
    "underneath during over above atop beyond"
)

# Prepositions after which a non-scene noun is handed back to the object in a background chunk.
FRONT_PREPS: frozenset[str] = _words("behind beneath under below underneath around")

RELATIONAL_WORDS: frozenset[str] = _words("left right top bottom front middle side")

DETERMINERS: frozenset[str] = _words(
    "a an the this that these those his her its their our my your some many several few two three "
    "four five six seven eight nine ten one each every all both another other no lone single"
)

SUBORDINATORS: frozenset[str] = _words("as while when whilst then meanwhile and but so suddenly")

PRONOUNS: frozenset[str] = _words("he she they it we i you him them someone somebody everyone")
_OBJ_PRONOUNS: frozenset[str] = _words("it him them us me")  # after a noun and an -s word: the -s word is a verb

# Verbs that introduce the subject from a style/scene frame: "A whimsical scene, featuring a bear".
PRESENT_VERBS: frozenset[str] = _words(
    "featuring features showcasing showcases showing shows depicting depicts including includes "
    "focusing focuses highlighting highlights presenting presents starring capturing captures "
    "records recording documents documenting"
)

CLAUSE_BREAKERS: frozenset[str] = _words("while whilst as then who whose which that where when")

AUX_VERBS: frozenset[str] = _words(
    "is are was were be being been has have had can could will would may might must do does did "
    "appears appear seems seem becomes become remains remain stands stand sits sit lies lie "
    "walks walk runs run flies fly moves move swims swim rises rise falls fall looks look gets get "
    "comes come goes go plays play holds hold dances dance jumps jump rides ride drives drive "
    "stretches stretch glides glide floats float drifts drift rolls roll spins spin turns turn "
    "crashes crash flows flow sways sway shines shine sets set begins begin starts start captures "
    "capture shows show reveals reveal features feature fills fill covers cover hangs hang teem "
    "teems line lines wears wear carries carry eats eat drinks drink reads read writes write sings "
    "sing talks talk stares stare gazes gaze watches watch waits wait leans lean lands land "
    "displays display unfolds unfold stretch grazes graze towers tower perches perch glistens glisten "
    "sparkles sparkle emerges emerge enters enter leaves leave"
)

ADJECTIVES: frozenset[str] = _words(
    """
    red orange yellow green blue purple violet pink brown black white gray grey golden silver dark
    light bright pale small large big tiny huge giant little tall short long wide narrow old young
    new ancient modern beautiful pretty cute serene tranquil peaceful quiet calm busy bustling
    vibrant colorful colourful lush dense vast cozy cosy rustic soft warm cool cold hot gentle
    majestic mysterious misty foggy snowy rainy sunny cloudy stormy windy lonely lone empty crowded
    weathered cobblestone wooden stone brick concrete glass metal steel dramatic ominous eerie
    magical mystical whimsical elegant luxurious grand sleek shiny glossy smooth rough wet damp
    dry fresh clear deep high low distant nearby urban rural tropical natural casual tense
    professional happy sad joyful playful lively slowly quickly gently very really
    """
)

_NOUN_LY = _words("family lily belly jelly fly butterfly dragonfly firefly holy italy july rally ally")

_NOUN_ING = _words(
    "building buildings painting paintings ceiling ceilings clothing evening evenings morning "
    "mornings ring rings king kings thing things string strings spring wing wings swing swings "
    "lighting setting settings ending landing pudding wedding sibling siblings duckling ducklings "
    "seedling seedlings icing railing railings awning awnings dumpling dumplings sapling saplings "
    "offing opening clearing crossing crossings earring earrings stocking stockings bedding "
    "housing filling"
)

_TOKEN_RE = re.compile(r"[A-Za-z0-9]+(?:[-'\u2019][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")
_SENT_END = frozenset(".!?")
_CHUNK_END = frozenset(",;:")

_OBJ, _BG, _UNK = 0, 1, 2


_ADJ_SUFFIXES = ("al", "ic", "ful", "ous", "ive", "ish", "less", "ent", "ant", "able", "ible", "ary")


# Common nouns that end like adjectives ("Table, zoom in" is a thing, not an adjective before a comma).
_NOUN_ADJ: frozenset[str] = _words(
    "table tables cable cables vegetable vegetables timetable animal animals crystal crystals metal "
    "metals petal petals pedal pedals sandal sandals medal medals signal signals festival hospital "
    "canal canals portal portals capital mosaic picnic clinic student students parent "
    "parents agent agents serpent serpents patient patients element elements instrument instruments "
    "monument monuments ornament ornaments garment garments apartment tournament experiment "
    "elephant elephants plant plants giant giants merchant merchants infant infants pheasant "
    "pheasants servant servants peasant peasants assistant restaurant olive olives detective "
    "detectives locomotive locomotives archive library canary canaries secretary radish handful"
)


def _is_adj(word: str) -> bool:
    """Known adjective, or an adjective-looking word ("majestic", "peaceful", "formal")."""
    return word in ADJECTIVES or (len(word) > 4 and word.endswith(_ADJ_SUFFIXES) and word not in _NOUN_ADJ)


def _singular(word: str) -> str:
    """Cheap plural folding so lexicons need only one form."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


class PromptSplitter:
    """Rule/lexicon prompt splitter; lexicons are injectable for ablations (leave-label-out)."""

    def __init__(
        self,
        scene_words: Iterable[str] = SCENE_WORDS,
        scene_phrases: Iterable[str] = SCENE_PHRASES,
    ) -> None:
        self.scene = frozenset(scene_words)
        self.scene_phrases = frozenset(scene_phrases)
        self.bg_words = self.scene | TIME_WORDS | WEATHER_WORDS | LIGHT_WORDS
        self.style = STYLE_WORDS

    # -- word classes ----------------------------------------------------------------------------
    def _in(self, word: str, lexicon: frozenset[str]) -> bool:
        return word in lexicon or _singular(word) in lexicon

    def _is_verbish(self, words: list[str], i: int) -> bool:
        """Heuristic verb test: auxiliaries/common verbs, or -ing/-ed forms that are not nouns."""
        w = words[i]
        if w in AUX_VERBS:
            return True
        if w in _NOUN_ING or w in ADJECTIVES:
            return False
        return len(w) > 4 and (w.endswith("ing") or w.endswith("ed"))

    def _head_class(self, words: list[str], start: int, end: int, subject: bool = False) -> tuple[int, int]:
        """Classify the noun phrase words[start:end]: returns (class, index after the phrase)."""
        cls, j, _ = self._head_class3(words, start, end, subject)
        return cls, j

    def _head_class3(self, words: list[str], start: int, end: int, subject: bool = False) -> tuple[int, int, int]:
        """Classify the noun phrase words[start:end]: (class, index after it, style-prefix end).

        The phrase ends at the first preposition/verb/breaker; "X of Y" with a frame word X is looked
        through, and when X is a camera/style word ("close-up of a dog") the third value is the index
        after "of" so the caller can give "close-up of" to the style part. Classes: 0 scene/time/
        weather/light, 1 style, 2 attribute, 3 pattern, 4 other noun, 5 no noun.

        ``subject``: the phrase opens a clause (a chunk's lead, or the words after "and"), so a
        SUBJECT_NOUNS head followed by its verb ("The moon rises", "A drone is floating") is class 4.
        A noun followed by an -s word and a determiner reads the -s word as the verb ("One person
        hands a camera ..."), so the phrase ends there.
        """
        j = start
        head_idx = -1
        through = start
        while j < end:
            w = words[j]
            if w in _CHUNK_END and (head_idx < 0 or _is_adj(words[head_idx])):
                j += 1  # "A large, rustic barn": a comma between adjectives
                continue
            if w in _CHUNK_END or w in _SENT_END:
                break
            if w == "of" and head_idx >= 0:
                hw = words[head_idx]
                if self._in(hw, FRAME_WORDS) or hw in RELATIONAL_WORDS or self._in(hw, PATTERN_WORDS):
                    if self._in(hw, self.style):
                        through = j + 1
                    j += 1
                    head_idx = -1
                    continue
                # "a field of sunflowers": the first noun decides.
                break
            if w in PLACE_PREPS or w in CLAUSE_BREAKERS or w in {"with", "of", "like", "for", "to"}:
                break
            if (
                j > start
                and self._is_verbish(words, j)
                and (words[j] in AUX_VERBS or (head_idx >= 0 and words[head_idx] not in ADJECTIVES))
                and (
                    not (j + 1 < end and self._in(words[j + 1], self.bg_words))
                    or (w in _BE and words[j + 1].endswith("ing"))  # "The sun is setting behind ..."
                )
            ):
                break
            if (
                j > start
                and head_idx == j - 1
                and len(w) > 3
                and w.endswith("s")
                and not w.endswith("ss")
                and j + 1 < end
                and (words[j + 1] in DETERMINERS or words[j + 1] in _OBJ_PRONOUNS)
                and words[head_idx] not in DETERMINERS
                and not _is_adj(words[head_idx])
                and (
                    words[head_idx] in {"camera", "cameras"}
                    or not self._in(w, self.bg_words | self.style | PATTERN_WORDS)
                )
            ):
                # "One person hands a camera", "The camera tracks a car", "the broomstick catches it
                # mid-air": noun, -s verb, determiner or object pronoun.
                break
            if len(w) > 4 and w.endswith("ly") and w not in _NOUN_LY:
                if head_idx >= 0 and words[head_idx] not in ADJECTIVES:
                    break
                j += 1
                continue
            if w not in DETERMINERS and w not in {"and", "or", "&"} and w.isascii():
                head_idx = j
            j += 1
        if head_idx < 0:
            return 5, j, through
        hw = words[head_idx]
        prev = words[head_idx - 1] if head_idx > start else ""
        verb = words[j] if j < end and self._is_verbish(words, j) else ""
        if (
            head_idx > start
            and hw.endswith("s")
            and not self._in(hw, self.bg_words | self.style | ATTRIBUTE_WORDS)
            and (self._in(prev, self.bg_words) or self._in(prev, self.style))
        ):
            # "A picturesque university campus unfolds": the -s word is the verb, not the head.
            verb = hw
            hw, prev = prev, words[head_idx - 2] if head_idx - 1 > start else ""
        if subject and verb and verb not in CAMERA_VERBS and hw in SUBJECT_NOUNS:
            # "The sun rises", "A black drone is floating": the subject of a verb is an object.
            return 4, j, through
        if subject and not verb and (
            (hw in SUBJECT_NOUNS and self._coordinated_subject(words, j))
            or (
                (hw in SUBJECT_NOUNS or hw in MASS_NOUNS)
                and j < end
                and words[j] in PLACE_PREPS
                and self._clause_verb(words, start, end) >= 0
            )
        ):
            # "A black drone and a blue drone are floating": the verb comes after the second subject;
            # "mist in a rainforest comes into contact": after the subject's place phrase.
            return 4, j, through
        if hw in SUBJECT_NOUNS and any(w in MATERIAL_WORDS for w in words[start:head_idx]):
            # "into a metal frame", "a wooden drone": camera words take no material, things do.
            return 4, j, through
        if hw in RELATIONAL_WORDS and self._in(prev, self.style):
            # "pan left", "truck right": a direction after a camera move.
            hw, prev = prev, ""
        if f"{prev} {hw}" in self.scene_phrases:
            return 0, j, through
        if self._in(hw, self.style):
            return 1, j, through
        if self._in(hw, ATTRIBUTE_WORDS):
            return 2, j, through
        if self._in(hw, PATTERN_WORDS):
            return 3, j, through
        if self._in(hw, self.bg_words):
            return 0, j, through
        if (
            (j >= end or words[j] in _CHUNK_END)
            and _is_adj(hw)
            and all(_is_adj(w) or w in DETERMINERS or w in _CHUNK_END for w in words[start:j])
        ):
            return 5, j, through
        return 4, j, through

    def _coordinated_subject(self, words: list[str], j: int) -> bool:
        """True when words[j:] is "and/or <noun phrase> <verb>" (not a camera verb): the phrase before
        j is the first of coordinated subjects ("A black drone and a blue drone are floating")."""
        if j + 1 >= len(words) or words[j] not in {"and", "or"} or words[j + 1] not in DETERMINERS:
            return False
        cls, k = self._head_class(words, j + 1, len(words), subject=True)
        return cls == 4 and k < len(words) and self._is_verbish(words, k) and words[k] not in CAMERA_VERBS

    def _clause_verb(self, words: list[str], i: int, end: int) -> int:
        """Index of the finite verb of a clause whose subject noun phrase starts at words[i], after at
        most one prepositional phrase that modifies the subject ("steam from a boiling pot *comes*",
        "mist in a rainforest *comes*", "rain *continues*"); -1 where no such verb follows. Finite only
        (an auxiliary, or an -s/-ed word), so "such as dogs running" is no clause; a camera verb is
        none ("the frame shows")."""
        cls, k = self._head_class(words, i, end)
        if cls not in (0, 4):
            return -1
        if k < end and (words[k] in PLACE_PREPS or words[k] == "of"):
            cls, k = self._head_class(words, k + 1, end)
            if cls == 5:
                return -1
        if k >= end or words[k] in CAMERA_VERBS:
            return -1
        w = words[k]
        finite = w in AUX_VERBS or (len(w) > 3 and not w.endswith("ss") and (w.endswith("s") or w.endswith("ed")))
        return k if finite and w not in _NOUN_ING and not self._in(w, self.bg_words | self.style) else -1

    # -- main ------------------------------------------------------------------------------------
    def split(self, text: str) -> PromptSplit:
        """Split ``text``; raises ValueError on empty or whitespace-only input."""
        if not isinstance(text, str):
            raise TypeError(f"split_prompt expects str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("split_prompt: prompt is empty or whitespace-only")
        spans = [(m.start(), m.end()) for m in _TOKEN_RE.finditer(text)]
        words = [text[a:b].lower().replace("\u2019", "'") for a, b in spans]
        n = len(words)
        labels = [_OBJ] * n
        styles = [False] * n

        # Chunks: (start, end) token ranges, plus the index of the sentence they belong to.
        # A comma after a noun-less fragment ("In a lush, vibrant forest") does not end the chunk.
        # "while/where/as <subject>" and "and <determiner|pronoun>" start a new clause-chunk.
        chunks: list[tuple[int, int, int]] = []
        s = 0
        sent = 0
        for i, w in enumerate(words):
            if w in _CHUNK_END and i > s and all(self._is_filler(x) for x in words[s:i]):
                continue
            if w in _CHUNK_END or w in _SENT_END:
                if i > s:
                    chunks.append((s, i, sent))
                if w in _SENT_END:
                    sent += 1
                s = i + 1
            elif (
                i > s
                and i + 1 < n
                and (
                    w in {"while", "whilst", "where"}
                    or (w in {"as", "and"} and (words[i + 1] in DETERMINERS or words[i + 1] in PRONOUNS))
                    or (
                        w == "as"
                        and words[i + 1].isalpha()
                        and words[i + 1] not in _AS_NOT_CLAUSE
                        and self._clause_verb(words, i + 1, n) >= 0
                    )
                )
            ):
                chunks.append((s, i, sent))
                s = i
        if s < n:
            chunks.append((s, n, sent))

        chunk_lead: list[int] = []
        for a, b, _ in chunks:
            chunk_lead.append(self._label_chunk(words, a, b, labels, styles))
        for k in range(len(chunks) - 1):
            if chunk_lead[k] == _BG and self._orbited(words, chunks[k], chunks[k + 1]):
                a, b, _ = chunks[k]
                chunk_lead[k] = _OBJ
                for t in range(a, b):
                    labels[t], styles[t] = _OBJ, False

        # Resolve 'unknown' chunks (participle clauses, bare adjectives): inherit from the previous
        # chunk of the same sentence, else from the next one, else object.
        resolved = list(chunk_lead)
        for k, (_a, _b, sk) in enumerate(chunks):
            if resolved[k] != _UNK:
                continue
            lab = _UNK
            for m in range(k - 1, -1, -1):
                if chunks[m][2] != sk:
                    break
                if resolved[m] != _UNK:
                    lab = resolved[m]
                    break
            if lab == _UNK:
                for m in range(k + 1, len(chunks)):
                    if chunks[m][2] != sk:
                        break
                    if chunk_lead[m] != _UNK:
                        lab = chunk_lead[m]
                        break
            resolved[k] = _OBJ if lab == _UNK else lab
        for k, (a, b, _) in enumerate(chunks):
            for i in range(a, b):
                if labels[i] == _UNK:
                    labels[i] = resolved[k]
        # Punctuation takes the label of the token before it.
        for i, w in enumerate(words):
            if (w in _CHUNK_END or w in _SENT_END) and i > 0:
                labels[i] = labels[i - 1]
            elif (w in _CHUNK_END or w in _SENT_END) and i == 0:
                labels[i] = _OBJ

        if all(lab != _OBJ for lab in labels):
            self._plant_subject(words, chunks, labels, styles)
        obj = self._assemble(text, spans, words, [lab == _OBJ for lab in labels])
        bg = self._assemble(text, spans, words, [lab == _BG for lab in labels])
        sty = self._assemble(text, spans, words, [st and lab == _BG for st, lab in zip(styles, labels, strict=True)])
        return PromptSplit(object=obj, background=bg, style=sty)

    def _label_chunk(self, words: list[str], a: int, b: int, labels: list[int], styles: list[bool]) -> int:
        """Label tokens of one chunk in place; return the chunk's lead label (_OBJ/_BG/_UNK)."""
        i = a
        while i < b and (words[i] in SUBORDINATORS or words[i] in {"where", "whilst"}):
            i += 1
        if i >= b:
            for t in range(a, b):
                labels[t] = _UNK
            return _UNK
        w0 = words[i]
        lead: int
        rest: int
        if w0 in PLACE_PREPS or w0 == "with":
            # Chunk opens with a preposition: "in a forest", "at sunset", "on the left of a cat".
            cls, end = self._head_class(words, i + 1, b)
            if w0 == "with" or cls == 2 or (w0 == "on" and i + 2 < b and words[i + 2] in RELATIONAL_WORDS):
                lead = _UNK
            elif cls in (0, 1, 3) or w0 in DEFAULT_BG_PREPS or cls == 5:
                lead = _BG
            else:
                lead = _UNK
            if lead == _BG:
                for t in range(a, b):
                    labels[t] = _BG
                    styles[t] = cls == 1
                return _BG
            rest = end
            for t in range(a, end):
                labels[t] = lead
        elif (w0 in PRESENT_VERBS or w0 in _FOLLOW) and i + 1 < b:
            # "featuring a majestic zebra ... in a savanna", "(the camera moves ...), following several
            # people": the introduced noun phrase decides.
            cls, end = self._head_class(words, i + 1, b)
            lead = _BG if cls in (0, 1, 3) else _OBJ
            labels[i] = _BG if w0 in PRESENT_VERBS else lead  # "following a dog" stays whole
            for t in range(i + 1, end):
                labels[t] = lead
            rest = end
        elif (
            self._is_verbish(words, i)
            and i + 1 < b
            and (
                words[i + 1] in DETERMINERS
                or words[i + 1] in PLACE_PREPS
                or words[i + 1] in ADJECTIVES
                or words[i + 1] in {"with", "by", "to", "up", "down", "off", "out", "away"}
            )
        ):
            # Participle clause with no subject: "creating a mirror effect", "frozen in time".
            lead = _UNK
            rest = i + 1
            for t in range(a, rest):
                labels[t] = _UNK
        else:
            cls, end, through = self._head_class3(words, i, b, subject=True)
            if cls in (0, 3):
                lead = _BG
            elif cls == 1:
                lead = _BG
                # A lead that is only style words ("cinematic", "4k", "front view") is style.
                for t in range(a, end):
                    styles[t] = True
            elif cls == 5:
                lead = _UNK
            else:
                lead = _OBJ
            for t in range(a, end):
                labels[t] = lead
            if lead == _OBJ and through > i:
                # "close-up of a corgi": the camera words go to the background's style part.
                for t in range(a, through):
                    labels[t] = _BG
                    styles[t] = True
            rest = end
            if w0 in PRONOUNS:
                lead = _OBJ
                for t in range(a, end):
                    labels[t] = _OBJ
        self._label_tail(words, rest, b, lead, labels, styles)
        return lead

    def _label_tail(self, words: list[str], i: int, b: int, lead: int, labels: list[int], styles: list[bool]) -> None:
        """Label the rest of a chunk after its lead: cut out place phrases, hand back objects."""
        cur = lead
        while i < b:
            w = words[i]
            if w in PLACE_PREPS or (w == "surrounded" and i + 1 < b and words[i + 1] == "by"):
                j = i + 2 if w == "surrounded" else i + 1
                if w == "in" and j + 1 < b and words[j] == "front" and words[j + 1] == "of":
                    j += 2
                    w = "behind"
                cls, end = self._head_class(words, j, b)
                relational = w == "on" and j + 1 < b and words[j + 1] in RELATIONAL_WORDS
                if lead != _BG and not relational and cls in (0, 1, 3):
                    # Place/style phrase inside an object chunk: background up to the clause break.
                    stop = self._clause_end(words, end, b)
                    for t in range(i, stop):
                        labels[t] = _BG
                        styles[t] = cls == 1
                    if cls == 0:
                        self._give_possessor(words, j, end, labels)
                    i = stop
                    cur = lead
                    continue
                if lead == _BG and cls == 4 and (
                    w in FRONT_PREPS or (w in TARGET_PREPS and self._camera_target(words, i, b))
                ):
                    # "blue stripes behind a small red square moving left": the square is the object;
                    # so is what a camera move lands on ("the camera zooms in on a cat sleeping").
                    stop = self._clause_end(words, end, b)
                    labels[i] = _BG
                    for t in range(i + 1, stop):
                        labels[t] = _OBJ
                    i = stop
                    cur = lead
                    continue
            elif lead == _BG and i + 1 < b and (
                (w == "to" and self._camera_target(words, i, b))  # "the camera pans to a cyclist"
                or w in PRESENT_VERBS or w in FOLLOW_VERBS or w == "with"
            ):
                cls, end = self._head_class(words, i + 1, b)
                if cls == 4:
                    stop = self._clause_end(words, end, b)
                    labels[i] = _BG
                    for t in range(i + 1, stop):
                        labels[t] = _OBJ
                    # Place phrases inside the handed-back part still go to the background.
                    self._label_tail(words, end, stop, _OBJ, labels, styles)
                    i = stop
                    continue
            elif w in CLAUSE_BREAKERS or (w == "and" and i + 1 < b and self._starts_clause(words, i + 1, b)):
                cur = lead
            labels[i] = cur
            i += 1

    @staticmethod
    def _is_filler(w: str) -> bool:
        """Words that cannot end a noun phrase: a fragment of only these continues past a comma."""
        return (
            w in DETERMINERS
            or w in ADJECTIVES
            or w in PLACE_PREPS
            or w in SUBORDINATORS
            or w in _CHUNK_END
            or (w.endswith("ly") and w not in _NOUN_LY)
        )

    def _starts_clause(self, words: list[str], i: int, b: int) -> bool:
        """True when the words after "and" start a new action/subject rather than continue a place."""
        w = words[i]
        if w in PRONOUNS or self._is_verbish(words, i):
            return True
        if w in DETERMINERS:
            cls, _ = self._head_class(words, i, b, subject=True)
            return cls in (2, 4)
        return False

    def _give_possessor(self, words: list[str], j: int, end: int, labels: list[int]) -> None:
        """In a place phrase words[j:end] sent to the background, hand a possessor that is a thing
        back to the object: "flies into the sloth's path" -> object "the sloth's", background "into
        ... path". A scene/light/style possessor ("the castle's courtyard") stays background."""
        bg = self.bg_words | self.style | PATTERN_WORDS
        for k in range(j, end):
            w = words[k]
            if not (w.endswith("'s") or w.endswith("s'")):
                continue
            stem = w[:-2] if w.endswith("'s") else w[:-1]
            if stem and stem not in PRONOUNS and not self._in(stem, bg):
                for t in range(j, k + 1):
                    labels[t] = _OBJ
            return

    def _plant_subject(self, words: list[str], chunks: list[tuple[int, int, int]], labels: list[int],
                       styles: list[bool]) -> None:
        """A prompt with no object so far: the first chunk led by a plant, if its verb follows, makes the
        plant and its verb the subject ("Flowers sway | in the wind", "Time-lapse of | white hyacinth
        flowers blooming"), though plants are scene words as a setting ("a meadow of wildflowers",
        "under the trees")."""
        for a, b, _ in chunks:
            cls, end, through = self._head_class3(words, a, b, subject=True)
            if cls != 0 or end >= b or end == a or _singular(words[end - 1]) not in PLANT_WORDS:
                continue
            w = words[end]
            if not (self._is_verbish(words, end) or (w.endswith("s") and not w.endswith("ss") and len(w) > 3)):
                return
            stop = end + 1
            while stop < b and len(words[stop]) > 4 and words[stop].endswith("ly") and words[stop] not in _NOUN_LY:
                stop += 1
            for t in range(through if through > a else a, stop):
                labels[t], styles[t] = _OBJ, False
            return

    def _orbited(self, words: list[str], chunk: tuple[int, int, int], after: tuple[int, int, int]) -> bool:
        """True when `chunk` is only a noun phrase naming a camera-named thing or a celestial body and
        the next chunk of its sentence is a camera move with no target of its own: "Drone, the camera
        circles around", "Moon, zoom in" (what the camera moves around is the subject; a structure or
        a place stays the scene, as VBench labels "castle" or "lighthouse")."""
        (a, b, sent), (c, d, sent_after) = chunk, after
        if sent != sent_after or not any(w in _ORBIT_MOVES for w in words[c:d]):
            return False
        _, end = self._head_class(words, a, b)
        head = words[end - 1] if end > a else ""
        if end != b or head not in SUBJECT_NOUNS:
            return False
        camera = self.style | _ORBIT_MOVES | _MOVE_PARTICLES | RELATIONAL_WORDS | DETERMINERS
        return all(self._in(w, camera) or w in _BE or w in _CHUNK_END for w in words[c:d])

    def _camera_target(self, words: list[str], i: int, end: int) -> bool:
        """True when words[i] ("on", "to", "at") follows a camera move ("zooms in on", "pans slowly to")
        and what follows up to the clause end names no direction ("pans to the left") and no scene,
        light or style word ("focusing on the castle's grandeur", "the section of the staircase")."""
        k = i - 1
        while k >= 0 and (words[k] in _MOVE_PARTICLES or (len(words[k]) > 4 and words[k].endswith("ly"))):
            k -= 1
        if k < 0 or words[k] not in CAMERA_MOVES:
            return False
        bg = self.bg_words | self.style | PATTERN_WORDS
        for w in words[i + 1 : self._clause_end(words, i + 1, end)]:
            w = w.removesuffix("'s")
            if w in RELATIONAL_WORDS or w in {"distance", "viewer"} or self._in(w, bg):
                return False
        return True

    def _clause_end(self, words: list[str], i: int, b: int) -> int:
        """End of a place phrase: the next clause breaker, "and <new clause>", a passive agent
        ("thrown into the air *by the pillow*": the agent is an actor, so an object), or the chunk end."""
        while i < b:
            w = words[i]
            if w in CLAUSE_BREAKERS and w not in {"that", "which"}:
                return i
            if w == "by" and i + 1 < b and words[i + 1] in DETERMINERS and self._head_class(words, i + 1, b)[0] == 4:
                return i
            if w in AUX_VERBS and w.endswith("s"):
                return i
            if w == "and" and i + 1 < b and self._starts_clause(words, i + 1, b):
                return i
            i += 1
        return b

    @staticmethod
    def _assemble(text: str, spans: list[tuple[int, int]], words: list[str], keep: list[bool]) -> str:
        """Join runs of kept tokens as verbatim slices, trimming dangling punctuation/function words."""
        runs: list[str] = []
        i = 0
        n = len(spans)
        lead_trim = SUBORDINATORS | {"or", "with"}
        tail_trim = PLACE_PREPS | SUBORDINATORS | {"with", "of", "or", "the", "a", "an", "to", "by"}
        while i < n:
            if not keep[i]:
                i += 1
                continue
            j = i
            while j + 1 < n and keep[j + 1]:
                j += 1
            a, b = i, j
            while a <= b and (words[a] in _CHUNK_END or words[a] in lead_trim or words[a] in _SENT_END):
                a += 1
            while b >= a and (words[b] in _CHUNK_END or words[b] in tail_trim):
                b -= 1
            if a <= b:
                runs.append(text[spans[a][0] : spans[b][1]])
            i = j + 1
        out = ""
        for r in runs:
            if not out:
                out = r
            elif out[-1] in _SENT_END:
                out += " " + r
            else:
                out += ", " + r
        return out


_DEFAULT = PromptSplitter()


def split_prompt(text: str) -> PromptSplit:
    """Split a text-to-video prompt into object and background parts (deterministic, offline).

    Raises ValueError for empty or whitespace-only prompts: they carry no content to cache on.
    """
    return _DEFAULT.split(text)
