"""The TagMask-Synth class vocabulary: English nouns and their deterministic, compositional appearance.

Thing classes are real concrete nouns (compounds, irregular plurals, synonyms). Each gets a unique combination of
shape, texture, part layout and two palette colours, drawn from `vocab_seed`; any two classes differ in at least
two of those five attributes, and every attribute value is shared by many classes, so recognising a class means
combining several cues. Stuff classes (sky, grass, ...) are background regions with a fixed colour and noise texture.
Class id 0 is "unlabelled"; stuff classes come first (1..n_stuff), then things.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "star", "ring", "cross", "hexagon", "crescent", "ellipse",
          "heart", "arrow", "semicircle", "trapezoid")
TEXTURES = ("outlined", "stripes_h", "stripes_v", "stripes_d", "checker", "dots", "gradient", "concentric", "halves")
PARTS = ("none", "head", "wheels", "ears", "tail", "legs", "antenna", "handle", "wings")

# Saturated, mutually distinct colours; names only appear in classes.json, never in captions.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "orange": (240, 140, 30), "yellow": (240, 215, 50), "lime": (150, 215, 50),
    "green": (35, 140, 60), "teal": (25, 140, 140), "cyan": (90, 205, 240), "blue": (40, 70, 200),
    "purple": (125, 55, 185), "pink": (245, 135, 185), "brown": (125, 75, 35), "white": (240, 240, 240),
    "black": (25, 25, 25), "grey": (128, 128, 128),
}
MIN_COLOUR_CONTRAST = 110.0  # primary/secondary RGB distance, so textures and parts stay visible after JPEG

# One line per thing noun: `name[|plural][ = synonym[|plural], ...]`; regular plurals are derived.
_THINGS = {
    "animal": """
dog = puppy|puppies
cat = kitten
horse = pony|ponies
cow
sheep|sheep
pig
goat
chicken = hen
duck
goose|geese
turkey
rabbit = bunny|bunnies
mouse|mice
rat
squirrel
fox
wolf|wolves
bear
deer|deer
moose|moose
elephant
giraffe
zebra
lion
tiger
leopard
monkey
gorilla
kangaroo
koala
panda
camel
donkey
hippo
rhino
owl
eagle
parrot
penguin
pigeon
swan
flamingo
frog
turtle
snake
lizard
crocodile
fish|fish
shark
whale
dolphin
octopus|octopuses
crab
lobster
snail
butterfly
bee
spider
ladybug
hamster
hedgehog
goldfish|goldfish
jellyfish|jellyfish
peacock
ostrich
raccoon
beaver
otter
bull
calf|calves
unicorn
dragon
""",
    "person": """
person|people
man|men
woman|women
child|children = kid
baby = infant
soldier
chef
doctor
farmer
police officer
firefighter
astronaut
clown
pirate
knight
king
queen
""",
    "vehicle": """
car = automobile
bus
truck = lorry|lorries
fire truck = fire engine
police car
school bus
taxi = cab
van
bicycle = bike
motorcycle = motorbike
scooter
train
tram
airplane = plane
helicopter
boat
ship
sailboat
canoe
kayak
submarine
tractor
ambulance
rocket
skateboard
sled
wagon
jeep
hot air balloon
sports car
limousine
bulldozer
forklift
""",
    "food": """
apple
banana
orange
lemon
pear
grape
strawberry
cherry
pineapple
watermelon
peach
mango|mangoes
carrot
potato|potatoes
tomato|tomatoes
onion
mushroom
pepper
cucumber
pumpkin
egg
loaf|loaves
sandwich
hamburger = burger
hot dog
pizza
donut = doughnut
cake
cookie
cupcake
pie
pretzel
croissant
muffin
pancake
waffle
taco
burrito
ice cream
popsicle
lollipop
chocolate bar
coconut
avocado
kiwi
candy cane
""",
    "furniture": """
chair
table
couch = sofa
bed
bench
lamp
desk
shelf|shelves
stool
cabinet
dresser
wardrobe
mirror
clock
vase
pillow = cushion
blanket
curtain
door
window
fireplace
bathtub
sink
toilet
refrigerator = fridge
oven
microwave
toaster
kettle
teapot
television = tv
computer
laptop
keyboard
monitor
cell phone = smartphone
remote control
camera
radio
speaker
""",
    "music": """
guitar
piano
violin
drum
trumpet
flute
harp
saxophone
ukulele
accordion
microphone
""",
    "kitchen": """
cup
mug
bowl
plate
fork
spoon
knife|knives
bottle
wine glass
jar
frying pan
pot
spatula
ladle
cutting board
bucket
basket
tin can
""",
    "object": """
hammer
screwdriver
wrench
shovel = spade
rake
axe
ladder
paintbrush
broom
toolbox
flashlight = torch
lantern
candle
key
padlock
umbrella
suitcase
backpack = rucksack
handbag = purse
wallet
briefcase
book
notebook
pencil
pen
crayon
ruler
envelope
stapler
calculator
globe
telescope
microscope
magnifying glass
compass
trophy
medal
crown
helmet
hat
shoe
boot
sock
glove
scarf|scarves
necktie = tie
shirt
dress
jacket
coat
sweater
belt
necklace
bracelet
kite
balloon
""",
    "sport": """
soccer ball
basketball
baseball
tennis ball
golf ball
beach ball
bowling ball
baseball bat
tennis racket
frisbee
surfboard
snowboard
hockey stick
dumbbell
teddy bear
doll
toy car
robot
""",
    "outdoor": """
traffic light
stop sign
fire hydrant
parking meter
street lamp
mailbox
fountain
statue
tent
flag
windmill
lighthouse
tower
house
barn
castle
church
tree
bush
flower
cactus|cacti
sunflower
tulip
palm tree
potted plant
gate
campfire
snowman|snowmen
scarecrow
birdhouse
wheelbarrow
trash can
billboard
""",
    "misc": """
bell
anchor
sword
shield
feather
seashell
bone
skull
nest
leaf|leaves
acorn
pinecone
gift box
light bulb
battery
fan
heater
vacuum cleaner
washing machine
sewing machine
typewriter
printer
tablet
joystick
cassette
piggy bank
hourglass
""",
}


@dataclass(frozen=True)
class StuffSpec:
    name: str
    synonyms: tuple[str, ...]
    prepositions: tuple[str, ...]  # how a caption places things on/in/against it
    rgb: tuple[int, int, int]
    rgb2: tuple[int, int, int]  # second colour that the noise texture blends towards
    texture: str  # see render.STUFF_TEXTURES
    amplitude: float  # 0..1 strength of the texture
    position: str  # "top", "any", "bottom": where the region goes in a horizontal layout


# Fixed order: n_stuff_classes takes a prefix, so the common ones come first.
STUFF: tuple[StuffSpec, ...] = (
    StuffSpec("sky", (), ("under the", "against the"), (130, 185, 235), (235, 240, 250), "blotchy", 0.5, "top"),
    StuffSpec("grass", (), ("on the", "in the"), (70, 140, 50), (40, 95, 30), "streaks_v", 0.8, "bottom"),
    StuffSpec("water", (), ("in the", "by the", "near the"), (40, 90, 160), (110, 160, 210), "ripples", 0.6, "any"),
    StuffSpec("sand", (), ("on the",), (215, 190, 130), (180, 150, 95), "fine", 0.6, "bottom"),
    StuffSpec("snow", (), ("in the", "on the"), (240, 240, 245), (200, 210, 230), "blotchy", 0.4, "bottom"),
    StuffSpec("road", ("street",), ("on the", "by the"), (80, 80, 85), (120, 120, 120), "fine", 0.5, "bottom"),
    StuffSpec("wall", (), ("against the", "by the", "in front of the"), (190, 165, 145), (150, 110, 90),
              "tiles", 0.7, "any"),
    StuffSpec("floor", (), ("on the",), (150, 110, 70), (110, 75, 45), "streaks_h", 0.7, "bottom"),
    StuffSpec("field", ("meadow",), ("in the",), (175, 170, 70), (130, 125, 45), "streaks_v", 0.6, "bottom"),
    StuffSpec("mountain", (), ("near the", "below the"), (110, 100, 115), (80, 70, 85), "ripples", 0.5, "top"),
    StuffSpec("forest", (), ("in the", "near the"), (30, 80, 40), (60, 115, 45), "blotchy", 0.8, "any"),
    StuffSpec("dirt", (), ("on the", "in the"), (120, 90, 60), (90, 65, 40), "blotchy", 0.6, "bottom"),
    StuffSpec("pavement", ("sidewalk",), ("on the",), (165, 160, 155), (125, 120, 115), "tiles", 0.6, "bottom"),
    StuffSpec("ceiling", (), ("under the",), (220, 220, 205), (180, 180, 170), "tiles", 0.4, "top"),
    StuffSpec("carpet", (), ("on the",), (150, 40, 50), (110, 25, 35), "fine", 0.6, "bottom"),
    StuffSpec("gravel", (), ("on the",), (140, 135, 125), (95, 90, 85), "speckle", 0.8, "bottom"),
    StuffSpec("mud", (), ("in the",), (90, 70, 45), (65, 50, 30), "blotchy", 0.5, "bottom"),
    StuffSpec("ice", (), ("on the",), (200, 230, 240), (160, 200, 220), "streaks_h", 0.4, "bottom"),
    StuffSpec("fog", (), ("in the",), (200, 200, 205), (175, 175, 185), "blotchy", 0.3, "any"),
)


def pluralize(noun: str) -> str:
    """Regular English plural of a (possibly compound) noun: the last word inflects."""
    head, _, last = noun.rpartition(" ")
    if last.endswith(("s", "x", "z", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


def _parse_form(text: str) -> tuple[str, str]:
    name, _, plural = text.strip().partition("|")
    return name.strip(), (plural.strip() or pluralize(name.strip()))


def thing_nouns() -> list[tuple[str, str, str, tuple[tuple[str, str], ...]]]:
    """(category, name, plural, ((synonym, plural), ...)) for every thing noun, in table order."""
    out = []
    for category, block in _THINGS.items():
        for line in block.strip().splitlines():
            main, _, syns = line.partition("=")
            name, plural = _parse_form(main)
            synonyms = tuple(_parse_form(s) for s in syns.split(",") if s.strip())
            out.append((category, name, plural, synonyms))
    return out


MAX_THING_CLASSES = len(thing_nouns())
MAX_STUFF_CLASSES = len(STUFF)


@dataclass(frozen=True)
class ThingAppearance:
    shape: str
    texture: str
    part: str
    primary: str  # palette colour names
    secondary: str

    def signature(self) -> tuple[str, str, str, str, str]:
        return (self.shape, self.texture, self.part, self.primary, self.secondary)


@dataclass(frozen=True)
class ClassInfo:
    id: int
    name: str
    kind: str  # "thing" | "stuff"
    plural: str | None  # None for stuff (mass nouns)
    synonyms: tuple[str, ...]
    synonym_plurals: tuple[str | None, ...]
    category: str
    thing: ThingAppearance | None = None
    stuff: StuffSpec | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "name": self.name, "kind": self.kind, "plural": self.plural,
                             "synonyms": list(self.synonyms), "synonym_plurals": list(self.synonym_plurals),
                             "category": self.category}
        if self.thing is not None:
            a = self.thing
            d["appearance"] = {"shape": a.shape, "texture": a.texture, "part": a.part, "primary": a.primary,
                               "secondary": a.secondary, "primary_rgb": list(PALETTE[a.primary]),
                               "secondary_rgb": list(PALETTE[a.secondary])}
        if self.stuff is not None:
            s = self.stuff
            d["appearance"] = {"texture": s.texture, "rgb": list(s.rgb), "rgb2": list(s.rgb2),
                               "amplitude": s.amplitude, "position": s.position}
            d["prepositions"] = list(s.prepositions)
        return d


@dataclass
class Vocabulary:
    classes: list[ClassInfo]  # index == id; classes[0] is the unlabelled placeholder
    vocab_seed: int
    stuff_ids: np.ndarray = field(init=False)
    thing_ids: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.stuff_ids = np.array([c.id for c in self.classes if c.kind == "stuff"], dtype=np.int64)
        self.thing_ids = np.array([c.id for c in self.classes if c.kind == "thing"], dtype=np.int64)

    @property
    def n_classes(self) -> int:
        """Number of ids including 0, i.e. max id + 1."""
        return len(self.classes)

    def __getitem__(self, class_id: int) -> ClassInfo:
        return self.classes[class_id]

    def to_json(self) -> dict[str, Any]:
        return {"format": "ttd-synth-classes", "version": 1, "vocab_seed": self.vocab_seed, "unlabelled_id": 0,
                "n_stuff": int(len(self.stuff_ids)), "n_thing": int(len(self.thing_ids)),
                "classes": [c.to_json() for c in self.classes[1:]]}

    def json_bytes(self) -> bytes:
        return (json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n").encode("utf-8")

    def digest(self) -> str:
        return hashlib.sha256(self.json_bytes()).hexdigest()


def _colour_pairs() -> list[tuple[str, str]]:
    names = list(PALETTE)
    pairs = []
    for a in names:
        for b in names:
            if a != b and float(np.linalg.norm(np.subtract(PALETTE[a], PALETTE[b]))) >= MIN_COLOUR_CONTRAST:
                pairs.append((a, b))
    return pairs


def _assign_appearances(n: int, seed: int) -> list[ThingAppearance]:
    """Sequential draws with rejection: class i depends only on classes < i, so a bigger vocabulary keeps the
    appearance of the smaller one; every pair of classes differs in >= 2 of the 5 attributes."""
    rng = np.random.default_rng([seed, 7919])
    pairs = _colour_pairs()
    chosen: list[ThingAppearance] = []
    sigs = np.zeros((0, 5), dtype=np.int64)
    while len(chosen) < n:
        pair = pairs[int(rng.integers(len(pairs)))]
        cand = ThingAppearance(SHAPES[int(rng.integers(len(SHAPES)))], TEXTURES[int(rng.integers(len(TEXTURES)))],
                               PARTS[int(rng.integers(len(PARTS)))], pair[0], pair[1])
        code = np.array([SHAPES.index(cand.shape), TEXTURES.index(cand.texture), PARTS.index(cand.part),
                         list(PALETTE).index(cand.primary), list(PALETTE).index(cand.secondary)])
        if len(sigs) and int((sigs != code).sum(axis=1).min()) < 2:
            continue
        chosen.append(cand)
        sigs = np.vstack([sigs, code])
    return chosen


def build_vocabulary(n_thing_classes: int, n_stuff_classes: int, vocab_seed: int = 0) -> Vocabulary:
    """The deterministic vocabulary: `vocab_seed` picks which nouns (a seeded permutation, so growing
    `n_thing_classes` only appends classes) and their appearance."""
    nouns = thing_nouns()
    if not 1 <= n_thing_classes <= len(nouns):
        raise ValueError(f"n_thing_classes must be in 1..{len(nouns)}, got {n_thing_classes}")
    if not 1 <= n_stuff_classes <= len(STUFF):
        raise ValueError(f"n_stuff_classes must be in 1..{len(STUFF)}, got {n_stuff_classes}")
    order = np.random.default_rng([vocab_seed, 104729]).permutation(len(nouns))[:n_thing_classes]
    looks = _assign_appearances(n_thing_classes, vocab_seed)
    classes = [ClassInfo(0, "unlabelled", "none", None, (), (), "none")]
    for spec in STUFF[:n_stuff_classes]:
        classes.append(ClassInfo(len(classes), spec.name, "stuff", None, spec.synonyms,
                                 tuple(None for _ in spec.synonyms), "stuff", stuff=spec))
    for idx, look in zip(order, looks):
        category, name, plural, syns = nouns[int(idx)]
        classes.append(ClassInfo(len(classes), name, "thing", plural, tuple(s for s, _ in syns),
                                 tuple(p for _, p in syns), category, thing=look))
    return Vocabulary(classes, vocab_seed)
