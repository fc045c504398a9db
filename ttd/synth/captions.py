"""TagMask-Synth captions: templates filled with noun phrases, with the exact character span of every class mention.

A caption mixes visible thing mentions, stuff mentions, mentions of objects that are NOT in the image, and words
that are not visible (participles, prepositions, abstract nouns such as "day" or "moment", non-visual adjectives
such as "lovely"). Colour words never appear: they are visible but are not class mentions. A `CaptionStyle` holds
one split's statistics: alt-text style for pre-training (mostly the main subject), multi-object for the corpus to
label and the eval set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pydantic
from pydantic import Field

from ttd.synth.render import randint, weighted_index
from ttd.synth.vocabulary import ClassInfo, Vocabulary


class CaptionStyle(pydantic.BaseModel):
    """Statistics of one split's captions. Probabilities are per caption unless said otherwise."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    n_visible_weights: list[float] = Field(
        [0.1, 0.35, 0.35, 0.2], min_length=1,
        description="Relative weights of mentioning 1, 2, 3, ... visible things; a draw above the number of "
                    "visible thing classes is clamped to it.")
    p_mention_dominant: float = Field(0.9, ge=0, le=1, description="The dominant thing (if any) is mentioned.")
    p_dominant_first: float = Field(0.6, ge=0, le=1,
                                    description="A mentioned dominant thing comes first; otherwise order is random.")
    size_bias: float = Field(0.5, ge=0, description="Other mentioned things are drawn with weight pixels**size_bias.")
    p_stuff_mention: float = Field(0.5, ge=0, le=1, description="A place phrase names a visible stuff region.")
    p_second_stuff: float = Field(0.25, ge=0, le=1,
                                  description="Given a place phrase, it names a second visible stuff region too.")
    p_absent: float = Field(0.25, ge=0, le=1, description="An object that is NOT in the image is mentioned.")
    p_absent_stuff: float = Field(0.05, ge=0, le=1,
                                  description="Given a place phrase, it names a stuff class that is not in the image.")
    p_abstract: float = Field(0.35, ge=0, le=1, description="A tail with abstract nouns (day, moment, weekend).")
    p_adjective: float = Field(0.15, ge=0, le=1, description="Per noun phrase: a non-visual adjective (lovely).")
    p_lead: float = Field(0.3, ge=0, le=1, description="A lead-in such as 'a photo of'.")
    p_plural: float = Field(0.05, ge=0, le=1,
                            description="Per single-instance mention: plural as a style choice ('dogs on grass').")
    p_count: float = Field(0.6, ge=0, le=1, description="Per multi-instance mention: a number word ('two dogs').")
    p_synonym: float = Field(0.2, ge=0, le=1, description="Per mention of a class with synonyms: use a synonym.")
    p_capitalize: float = Field(0.3, ge=0, le=1, description="Capitalise the first letter.")
    p_period: float = Field(0.2, ge=0, le=1, description="End with a full stop.")
    # Web alt-text (CC3M) habits; 0 in the older presets, which then draw exactly what they drew before.
    p_medium: float = Field(0.0, ge=0, le=1, description="Name the picture rather than its content first: 'stock "
                            "photo of', 'vector illustration of', 'close-up view of' (nouns for what is not drawn).")
    p_stuff_adjective: float = Field(0.0, ge=0, le=1, description="Name a visible stuff region by its adjective "
                                     "('on a snowy day', 'in a grassy area'): a visible thing named by a word that is "
                                     "not a noun.")
    p_outside: float = Field(0.0, ge=0, le=1, description="Mention something outside the mask vocabulary and not "
                             "drawn ('held by a person', 'for the kids').")


MULTI_OBJECT = CaptionStyle()
ALT_TEXT = CaptionStyle(
    n_visible_weights=[0.86, 0.11, 0.03], p_mention_dominant=0.95, p_dominant_first=0.95, size_bias=2.0,
    p_stuff_mention=0.2, p_second_stuff=0.0, p_absent=0.3, p_absent_stuff=0.1, p_abstract=0.45, p_adjective=0.3,
    p_lead=0.4, p_plural=0.1, p_count=0.3, p_synonym=0.25, p_capitalize=0.5, p_period=0.3)
# Multi-object captions with web alt-text's habits, calibrated on the validation split so that the noun-parsing
# baseline lands where the paper's does on CC3M-TagMask (P 59.8, R 83.7): P 58.9, R 84.5 here
# (experiments/calibrate_captions.py; docs/SYNTH.md).
CC3M_HABITS = {"p_medium": 0.3, "p_stuff_adjective": 0.6, "p_outside": 0.2}
CC3M = MULTI_OBJECT.model_copy(update=CC3M_HABITS)
# Alt-text (mostly the main subject) with the same habits: the pre-training split's default, so the base model's
# text tower sees the words the labelled captions use for what is not drawn ('stock photo', 'on a snowy day', 'for
# the kids') in pre-training, as CLIP does on the web. Without them 40 of the val captions' words never occur in
# pre-training and pixel-tag scoring selects them (docs/BENCHMARKS.md, "Base model, issue 16").
CC3M_ALT_TEXT = ALT_TEXT.model_copy(update=CC3M_HABITS)
PRESETS = {"cc3m": CC3M, "multi_object": MULTI_OBJECT, "alt_text": ALT_TEXT, "cc3m_alt_text": CC3M_ALT_TEXT}

# Sentence frames. {L}: the visible things; {P}: a place phrase (stuff); {A}: an absent object with its article;
# {An}: a bare absent noun. Every word outside the slots is a non-visible word.
FRAMES: tuple[str, ...] = (
    "{L}", "{L} waiting", "{L} resting", "{L} posing for a photo", "just {L}", "{L}, as usual", "{L} doing nothing",
    "{L} on display", "{L} seen from here", "{L} at rest",
    "{L} {P}", "{L} waiting {P}", "{L} resting {P}", "{L} seen {P}", "{P}: {L}", "{L} spotted {P}",
    "{L} out {P}", "{L} relaxing {P}",
    "{L} waiting for {A}", "{L} ready for {A}", "{L} looking for {A}", "{L} but no {An}", "{L} dreaming of {A}",
    "{L} next to where {A} used to be", "{L} after {A} left", "{L} instead of {A}", "{L} and no {An} in sight",
    "{L} {P} waiting for {A}", "{L} {P}, no {An} in sight", "{L} {P} looking for {A}", "{L} {P} ready for {A}",
    "{L} waiting for {A} {P}",
)
# Used when no thing is visible: {S} is a stuff noun phrase.
EMPTY_FRAMES: tuple[str, ...] = ("{S}", "just {S}", "nothing but {S}", "{S}, no {An} in sight",
                                 "{S} waiting for {A}")
LEADS = ("a photo of ", "photo of ", "an image of ", "a picture of ", "look at ", "we spotted ", "i love ",
         "check out ", "stock photo: ", "so happy to see ", "throwback to ")
TAILS = (" on a quiet morning", " at the end of the day", " during the weekend", ", what a moment",
         ", a lovely time", " for the first time", " after a long day", ", just another day", ", life is good",
         ", the perfect view", " at this time of year", " before the holidays", " on a sunday afternoon",
         " in the evening", ", a moment to remember")
ADJECTIVES = ("beautiful", "lovely", "typical", "nice", "favourite", "happy", "famous", "wonderful", "perfect",
              "random", "local", "classic", "amazing", "cute", "lonely")
PAIR_JOINERS = (" and ", " and ", " with ", " next to ", " near ", " beside ")
STUFF_JOINERS = (" near the ", " by the ")
# Alt-text lead-ins that name the medium: every noun in them is not drawn.
MEDIA = ("stock photo of ", "vector illustration of ", "illustration of ", "close-up view of ", "a view of ",
         "concept: ", "cartoon of ", "background with ", "portrait of ", "stock image of ", "digital art of ",
         "template with ")
# Adjectives naming a stuff class (by class name): the word is a visible mention that is not a noun.
STUFF_ADJECTIVES = {"sky": ("sunny", "cloudy"), "grass": ("grassy",), "water": ("watery",), "sand": ("sandy",),
                    "snow": ("snowy",), "field": ("rural",), "mountain": ("mountainous", "alpine"),
                    "forest": ("wooded", "forested"), "dirt": ("dusty",), "mud": ("muddy",), "ice": ("icy", "frozen"),
                    "fog": ("foggy", "misty"), "pavement": ("paved",), "carpet": ("carpeted",), "gravel": ("stony",),
                    "road": ("urban",)}
STUFF_ADJECTIVE_FRAMES = (" on a {} day", " in a {} area", ", {} scene", " in {} weather", " on a {} afternoon",
                          " in a {} setting")
# Things outside the mask vocabulary, never drawn.
OUTSIDE = (" at the office", " for my family", " by a tourist", " during a trip", " from my collection",
           " for the wedding", " at the market", " in the museum")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SLOT = re.compile(r"\{(L|P|A|An|S)\}")


def filler_words() -> set[str]:
    """Every word the templates can add around mentions (all of them are non-visible)."""
    text = " ".join(FRAMES + EMPTY_FRAMES + LEADS + TAILS + ADJECTIVES + PAIR_JOINERS + STUFF_JOINERS + NUMBERS
                    + MEDIA + OUTSIDE + tuple(f.format("") for f in STUFF_ADJECTIVE_FRAMES))
    text = _SLOT.sub(" ", text) + " a an the some several"
    return set(re.findall(r"[a-z]+", text.lower()))


@dataclass(frozen=True)
class ThingFact:
    class_id: int
    pixels: int
    n_instances: int  # visible instances (at least 1)
    dominant: bool


@dataclass(frozen=True)
class Mention:
    text: str  # caption[start:end]
    lemma: str  # singular surface form (the synonym if one was used)
    start: int
    end: int
    class_id: int
    visible: bool
    pixels: int
    n_instances: int
    dominant: bool


@dataclass(frozen=True)
class _Span:
    text: str
    lemma: str
    class_id: int
    visible: bool
    pixels: int
    n_instances: int
    dominant: bool


Piece = str | _Span


def article(word: str) -> str:
    w = word.lower()
    if w.startswith(("hour", "honest", "heir")):
        return "an"
    if w[:1] in "aeiou" and not w.startswith(("uni", "use", "uku", "ute", "eu", "one")):
        return "an"
    return "a"


class CaptionMaker:
    """Builds one caption per scene from a style; all randomness comes from the caller's per-sample generator."""

    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab
        self.frames: dict[tuple[bool, bool], list[str]] = {}
        for f in FRAMES:
            self.frames.setdefault(("{P}" in f, "{A" in f), []).append(f)

    def make(self, rng: np.random.Generator, things: list[ThingFact], stuff: dict[int, int], present: set[int],
             style: CaptionStyle) -> tuple[str, list[Mention]]:
        """`things`: visible thing classes; `stuff`: visible stuff class -> pixels; `present`: every class id
        with at least one pixel (never named as absent)."""
        chosen = self._choose_things(rng, things, style)
        want_place = rng.random() < style.p_stuff_mention
        want_absent = rng.random() < style.p_absent
        place = self._place(rng, stuff, present, style) if want_place else None
        absent = self._absent_class(rng, present) if want_absent else None
        slots: dict[str, list[Piece]] = {}
        if absent is not None:
            slots["A"] = self._absent_np(rng, absent, style, bare=False)
            slots["An"] = self._absent_np(rng, absent, style, bare=True)
        if place is not None:
            slots["P"] = place
        if chosen:
            slots["L"] = self._thing_list(rng, chosen, style)
            options = self.frames[(place is not None, absent is not None)]
            frame = options[randint(rng, len(options))]
        else:
            if not stuff:
                raise ValueError("a scene with neither visible things nor visible stuff")
            cid = self._weighted(rng, list(stuff), list(stuff.values()), 1.0)
            slots["S"] = ["the ", self._stuff_span(cid, stuff[cid], True)]
            options = [f for f in EMPTY_FRAMES if ("{A" in f) == (absent is not None)]
            frame = options[randint(rng, len(options))]
        pieces: list[Piece] = []
        if frame.startswith("{L}") and style.p_medium and rng.random() < style.p_medium:
            pieces.append(MEDIA[randint(rng, len(MEDIA))])
        elif frame.startswith("{L}") and rng.random() < style.p_lead:
            pieces.append(LEADS[randint(rng, len(LEADS))])
        pos = 0
        for m in _SLOT.finditer(frame):
            pieces.append(frame[pos:m.start()])
            pieces.extend(slots[m.group(1)])
            pos = m.end()
        pieces.append(frame[pos:])
        if style.p_stuff_adjective and rng.random() < style.p_stuff_adjective:
            pieces.extend(self._stuff_adjective(rng, stuff, place))
        if style.p_outside and rng.random() < style.p_outside:
            pieces.append(OUTSIDE[randint(rng, len(OUTSIDE))])
        if rng.random() < style.p_abstract:
            pieces.append(TAILS[randint(rng, len(TAILS))])
        if rng.random() < style.p_period:
            pieces.append(".")
        return _assemble(pieces, capitalize=rng.random() < style.p_capitalize)

    # ------------------------------------------------------------ which things

    def _choose_things(self, rng: np.random.Generator, things: list[ThingFact], style: CaptionStyle) -> list[ThingFact]:
        if not things:
            return []
        k = min(1 + weighted_index(rng, style.n_visible_weights), len(things))
        dominant = next((t for t in things if t.dominant), None)
        chosen: list[ThingFact] = []
        if dominant is not None and rng.random() < style.p_mention_dominant:
            chosen.append(dominant)
        rest = [t for t in things if t not in chosen]
        while len(chosen) < k and rest:
            pick = self._weighted(rng, rest, [t.pixels for t in rest], style.size_bias)
            chosen.append(pick)
            rest.remove(pick)
        if not (chosen and chosen[0].dominant and rng.random() < style.p_dominant_first):
            chosen = [chosen[i] for i in rng.permutation(len(chosen))]
        return chosen

    @staticmethod
    def _weighted(rng: np.random.Generator, items: list, weights: list[int], power: float):
        return items[weighted_index(rng, [float(w) ** power for w in weights])]

    # ------------------------------------------------------------ noun phrases

    def _thing_list(self, rng: np.random.Generator, chosen: list[ThingFact], style: CaptionStyle) -> list[Piece]:
        nps = [self._thing_np(rng, t, style) for t in chosen]
        if len(nps) == 1:
            return nps[0]
        if len(nps) == 2:
            return [*nps[0], PAIR_JOINERS[randint(rng, len(PAIR_JOINERS))], *nps[1]]
        out: list[Piece] = []
        last_sep = (" and ", ", and ", " and ")[randint(rng, 3)]
        for i, np_ in enumerate(nps):
            if i:
                out.append(last_sep if i == len(nps) - 1 else ", ")
            out.extend(np_)
        return out

    def _forms(self, rng: np.random.Generator, info: ClassInfo, style: CaptionStyle) -> tuple[str, str]:
        """(singular, plural) surface forms: the class name or, sometimes, one of its synonyms."""
        if info.synonyms and rng.random() < style.p_synonym:
            i = randint(rng, len(info.synonyms))
            return info.synonyms[i], info.synonym_plurals[i] or info.synonyms[i]
        return info.name, info.plural or info.name

    def _thing_np(self, rng: np.random.Generator, t: ThingFact, style: CaptionStyle) -> list[Piece]:
        info = self.vocab[t.class_id]
        singular, plural_form = self._forms(rng, info, style)
        plural = t.n_instances >= 2 or rng.random() < style.p_plural
        adj = ADJECTIVES[randint(rng, len(ADJECTIVES))] + " " if rng.random() < style.p_adjective else ""
        if plural and t.n_instances >= 2:
            if rng.random() < style.p_count:
                det = NUMBERS[min(t.n_instances, 9)] + " "
            else:
                dets = ("", "some ", "the ") + (("several ",) if t.n_instances >= 3 else ())
                det = dets[randint(rng, len(dets))]
        elif plural:
            det = ""
        else:
            r = rng.random()
            det = "the " if r < 0.2 else "" if r < 0.3 else article(adj or singular) + " "
        word = plural_form if plural else singular
        span = _Span(word, singular, t.class_id, True, t.pixels, t.n_instances, t.dominant)
        return [det + adj, span]

    def _absent_class(self, rng: np.random.Generator, present: set[int]) -> int | None:
        ids = self.vocab.thing_ids
        for _ in range(16):  # almost always succeeds at once: a scene holds a handful of hundreds of classes
            cid = int(ids[randint(rng, len(ids))])
            if cid not in present:
                return cid
        missing = [int(c) for c in ids if int(c) not in present]
        return missing[randint(rng, len(missing))] if missing else None

    def _absent_np(self, rng: np.random.Generator, cid: int, style: CaptionStyle, bare: bool) -> list[Piece]:
        info = self.vocab[cid]
        singular, plural_form = self._forms(rng, info, style)
        plural = rng.random() < (0.6 if bare else 0.2)
        word = plural_form if plural else singular
        if bare:
            det = ""
        elif plural:
            det = ("the ", "some ", "")[randint(rng, 3)]
        else:
            det = "the " if rng.random() < 0.3 else article(singular) + " "
        return [det, _Span(word, singular, cid, False, 0, 0, False)]

    def _stuff_span(self, cid: int, pixels: int, visible: bool) -> _Span:
        info = self.vocab[cid]
        return _Span(info.name, info.name, cid, visible, pixels, 1 if visible else 0, False)

    def _stuff_word(self, rng: np.random.Generator, cid: int, pixels: int, visible: bool,
                    style: CaptionStyle) -> _Span:
        info = self.vocab[cid]
        word = info.name
        if info.synonyms and rng.random() < style.p_synonym:
            word = info.synonyms[randint(rng, len(info.synonyms))]
        return _Span(word, word, cid, visible, pixels, 1 if visible else 0, False)

    def _place(self, rng: np.random.Generator, stuff: dict[int, int], present: set[int],
               style: CaptionStyle) -> list[Piece] | None:
        """'on the grass' (visible), sometimes 'on the grass near the water', sometimes a stuff class that is
        not in the image."""
        if rng.random() < style.p_absent_stuff:
            missing = [int(c) for c in self.vocab.stuff_ids if int(c) not in present]
            if missing:
                cid = missing[randint(rng, len(missing))]
                return self._place_phrase(rng, cid, 0, False, style)
        if not stuff:
            return None
        cid = self._weighted(rng, list(stuff), list(stuff.values()), 1.0)
        out = self._place_phrase(rng, cid, stuff[cid], True, style)
        others = [c for c in stuff if c != cid]
        if others and rng.random() < style.p_second_stuff:
            c2 = others[randint(rng, len(others))]
            out += [STUFF_JOINERS[randint(rng, len(STUFF_JOINERS))], self._stuff_word(rng, c2, stuff[c2], True,
                                                                                          style)]
        return out

    def _stuff_adjective(self, rng: np.random.Generator, stuff: dict[int, int], place: list[Piece] | None
                         ) -> list[Piece]:
        """' on a snowy day': a visible stuff region that has an adjective and is not already named."""
        named = {p.class_id for p in place or [] if isinstance(p, _Span)}
        options = [c for c in stuff if c not in named and self.vocab[c].name in STUFF_ADJECTIVES]
        if not options:
            return []
        cid = options[randint(rng, len(options))]
        words = STUFF_ADJECTIVES[self.vocab[cid].name]
        word = words[randint(rng, len(words))]
        frame = STUFF_ADJECTIVE_FRAMES[randint(rng, len(STUFF_ADJECTIVE_FRAMES))]
        before, after = frame.split("{}")
        return [before, _Span(word, word, cid, True, stuff[cid], 1, False), after]

    def _place_phrase(self, rng: np.random.Generator, cid: int, pixels: int, visible: bool,
                      style: CaptionStyle) -> list[Piece]:
        preps = self.vocab[cid].stuff.prepositions
        return [preps[randint(rng, len(preps))] + " ", self._stuff_word(rng, cid, pixels, visible, style)]


def _assemble(pieces: list[Piece], capitalize: bool) -> tuple[str, list[Mention]]:
    parts: list[str] = []
    mentions: list[Mention] = []
    pos = 0
    for p in pieces:
        if isinstance(p, str):
            text = p
        else:
            text = p.text
            mentions.append(Mention(text, p.lemma, pos, pos + len(text), p.class_id, p.visible, p.pixels,
                                    p.n_instances, p.dominant))
        parts.append(text)
        pos += len(text)
    caption = "".join(parts)
    if capitalize and caption:
        caption = caption[0].upper() + caption[1:]
        if mentions and mentions[0].start == 0:
            m = mentions[0]
            mentions[0] = Mention(caption[m.start:m.end], m.lemma, m.start, m.end, m.class_id, m.visible, m.pixels,
                                  m.n_instances, m.dominant)
    return caption, mentions
