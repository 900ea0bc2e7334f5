"""Generate the bundled tiny assets: toy datasets, a Mistral-like tokenizer and a tiny config.

``python -m zephyr_lit.assets.generate [--out DIR]`` writes, under DIR (default: this folder):

* ``data/ultrachat_tiny/data/{train,test}_sft-00000-of-00001.jsonl``: rows shaped like
  ``HuggingFaceH4/ultrachat_200k`` (``prompt``, ``prompt_id``, ``messages``);
* ``data/ultrachat_tiny/exact_match.jsonl``: held-out questions with one checkable reply;
* ``data/ultrafeedback_tiny/data/{train,test}_prefs-00000-of-00001.jsonl``: rows shaped like
  ``HuggingFaceH4/ultrafeedback_binarized``;
* ``tiny-mistral/``: a byte-fallback BPE tokenizer with Mistral's special ids and a
  ``MistralConfig`` (config only; the trainer random-inits the weights).

Test prompts are never training prompts, but they reword trained facts: every sum, capital and
odd question of the test splits is taught by train_sft (test_prefs': also scored by train_prefs),
and test_prefs asks trained everyday questions in held-out wordings with trained replies as the
chosen ones, so that a held-out preference pair is answerable from training. Only test_sft keeps a
few everyday questions held out entirely. train_prefs then scores, under training wordings, each
test_prefs pair's own chosen and rejected replies, and several wrong sums and capitals for each of
its sums and countries (DPO pushes down only the rejected replies it is shown).

Everything is seeded, so two runs give byte-identical files. The tasks are ones a ~1M
parameter model learns in minutes on a CPU: small sums, a capitals table, and answering in
pirate voice exactly when the system prompt asks for it (the Zephyr model card's demo).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import shutil
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from zephyr_lit.assets.pirate import sounds_like_pirate
from zephyr_lit.chat import ZEPHYR_CHAT_TEMPLATE, render

ASSETS_DIR = Path(__file__).resolve().parent
SEED = 1234
K = TypeVar("K")

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPACE = "\u2581"  # SentencePiece's "▁"
VOCAB_SIZE = 1024
N_BYTE_TOKENS = 256
MODEL_MAX_LENGTH = 1024

SFT_DIR = "data/ultrachat_tiny"
PREF_DIR = "data/ultrafeedback_tiny"
MODEL_DIR = "tiny-mistral"
EVAL_DIR = "data/eval"  # eval_sets.py: MT-Bench and AlpacaEval question files, judge prompts
GENERATED = (SFT_DIR, PREF_DIR, MODEL_DIR, EVAL_DIR)  # folders this script owns and rewrites

# ---------------------------------------------------------------------------------------------
# Content tables
# ---------------------------------------------------------------------------------------------

PIRATE_SYSTEM_PROMPTS = {  # prompt -> sampling weight; the first one is the model card's
    "You are a friendly chatbot who always responds in the style of a pirate": 4,
    "You are a friendly chatbot who always answers like a pirate.": 2,
    "You are a cheerful assistant who always talks like a pirate.": 2,
    "Always reply in the voice of a friendly pirate.": 2,
}
PLAIN_SYSTEM_PROMPTS = {  # None: no system turn at all, as in ultrachat
    None: 6,
    "You are a helpful assistant.": 2,
    "You are a helpful, concise assistant.": 1,
    "Answer the user's questions clearly and briefly.": 1,
}
PIRATE_OPENERS = (
    "Arr!",
    "Arr, matey!",
    "Ahoy, matey!",
    "Ahoy there!",
    "Avast, me hearty!",
    "Yo ho ho!",
    "Arr, me hearty!",
)
# Plain-voice lead-ins, used only in rejected replies so that a plain answer to a pirate
# request can be as long as the pirate one.
PLAIN_OPENERS = ("Sure!", "Of course!", "Certainly!", "Happy to help!", "Good question!")

ARITH_TRAIN_TEMPLATES = (
    "What is {a} + {b}?",
    "What's {a} plus {b}?",
    "Calculate {a} + {b}.",
    "Add {a} and {b}.",
    "What do you get if you add {a} and {b}?",
    "What is the sum of {a} and {b}?",
)
ARITH_TEST_TEMPLATES = ("How much is {a} plus {b}?",)
ARITH_FOLLOW_UPS = ("And what is {a} + {b}?", "Now add {a} and {b}.", "What about {a} + {b}?")
OPERANDS = range(21)

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Russia": "Moscow",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Mexico": "Mexico City",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Nigeria": "Abuja",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Sweden": "Stockholm",
    "Norway": "Oslo",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Ireland": "Dublin",
    "Belgium": "Brussels",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "South Korea": "Seoul",
    "Iran": "Tehran",
    "Morocco": "Rabat",
    "Ghana": "Accra",
    "Iceland": "Reykjavik",
    "New Zealand": "Wellington",
    "Ukraine": "Kyiv",
}
CAPITAL_TRAIN_TEMPLATES = (
    "What is the capital of {c}?",
    "What's the capital of {c}?",
    "Which city is the capital of {c}?",
    "Name the capital of {c}.",
    "Tell me the capital of {c}.",
    "What city is the capital of {c}?",
    "What is {c}'s capital city?",
    "Capital of {c}?",
)
CAPITAL_TEST_TEMPLATES = ("Do you know the capital of {c}?",)
CAPITAL_FOLLOW_UPS = ("What about {c}?", "And the capital of {c}?")

# Everyday questions: (question, plain reply, pirate reply without its opener).
EVERYDAY = (
    ("What should I eat for breakfast?",
     "A bowl of oatmeal with fresh fruit is a healthy way to start the day.",
     "Start yer day with a bowl o' oats and fresh fruit, and ye'll be ready to sail!"),
    ("How can I fall asleep faster?",
     "Keep a regular bedtime, put away screens an hour before bed, and keep your room cool and dark.",
     "Turn in at the same bell each night, stow yer screens, and keep yer cabin cool and dark!"),
    ("Why is the sky blue?",
     "Sunlight scatters off the air, and blue light scatters the most, so the sky looks blue.",
     "The sun's light be scattered by the air, and the blue scatters most, so the sky be blue as the sea!"),
    ("Can you suggest a good name for a cat?",
     "How about Luna, Milo, or Pepper? They are short and easy to call.",
     "Name the wee beast Captain Whiskers or Salty Pete, says I!"),
    ("How do I make a cup of tea?",
     "Boil water, pour it over a tea bag, wait three to five minutes, then remove the bag.",
     "Boil yer water, pour it over the leaves, wait a few minutes, and drink it down, me hearty!"),
    ("What is a fun hobby to try?",
     "Gardening is relaxing and rewarding, and you can start with a few pots on a windowsill.",
     "Try tying knots or carving wood, the finest pastimes on any ship!"),
    ("How do I stay warm in winter?",
     "Wear layers, keep your head and hands covered, and drink something hot.",
     "Bundle up in layers, cover yer head and hands, and warm yer belly with a hot drink!"),
    ("What is the best way to learn a new language?",
     "Practice a little every day, listen to native speakers, and try to speak from the start.",
     "Practice a bit every day and chatter with the locals at every port, matey!"),
    ("How often should I water a cactus?",
     "Water a cactus about once every two weeks, and let the soil dry out completely in between.",
     "Give yer cactus a splash every fortnight, and let the soil dry out like a desert island!"),
    ("Why do cats purr?",
     "Cats purr when they feel content, and sometimes to calm themselves when stressed.",
     "A cat purrs when it be content, like a sailor with a full belly of grub!"),
    ("What should I pack for a beach trip?",
     "Bring sunscreen, a towel, water, a hat, and a snack.",
     "Pack sunscreen, a towel, fresh water, a hat, and some grub for the voyage!"),
    ("How can I be more productive?",
     "Make a short list of tasks each morning and do the hardest one first.",
     "Make a list o' tasks each morning and tackle the hardest one first, ye scallywag!"),
    ("What is a good way to relax after work?",
     "Take a short walk, listen to music, or read a few pages of a book.",
     "Take a stroll along the dock, sing a shanty, or read a few pages of a good yarn!"),
    ("How do I cook rice?",
     "Rinse one cup of rice, add two cups of water, bring it to a boil, then simmer it covered for fifteen minutes.",
     "Rinse a cup o' rice, add two cups o' water, boil it, then let it simmer for fifteen minutes, matey!"),
    ("Why do leaves change color in the fall?",
     "In autumn trees stop making green chlorophyll, so the yellow and red colors underneath show through.",
     "When autumn comes the trees stop making their green, and the gold and red be showing through like treasure!"),
    ("How can I save money?",
     "Set a monthly budget, cook at home more often, and put a little aside every payday.",
     "Keep a budget, cook yer own grub, and stash a few coins in yer chest every payday!"),
    ("What is the tallest animal?",
     "The giraffe is the tallest land animal, and some grow taller than five meters.",
     "The giraffe be the tallest beast on land, near as tall as a ship's mast!"),
    ("How do plants make food?",
     "Plants use sunlight, water, and carbon dioxide to make sugar in a process called photosynthesis.",
     "Plants catch the sunlight and turn water and air into sugar, a trick called photosynthesis, arr!"),
    ("What is a healthy snack?",
     "An apple with a spoonful of peanut butter is tasty and filling.",
     "An apple with a dab o' peanut butter be a fine and filling snack!"),
    ("How do I keep my houseplants alive?",
     "Give them bright indirect light, water only when the top of the soil is dry, and do not overwater.",
     "Give them bright light, water them only when the soil be dry, and never drown them, ye hear?"),
    ("Why is the ocean salty?",
     "Rivers carry minerals from rocks into the sea, and when the water evaporates the salt stays behind.",
     "Rivers wash salt from the rocks into the sea, and when the water rises to the sky the salt stays behind!"),
    ("What is the fastest land animal?",
     "The cheetah is the fastest land animal and can sprint faster than one hundred kilometers per hour.",
     "The cheetah be the swiftest beast on land, faster than any ship under full sail!"),
    ("How can I get better at drawing?",
     "Draw a little every day, study simple shapes, and copy drawings you admire.",
     "Sketch a bit every day, study simple shapes, and copy the maps and pictures ye admire!"),
    ("What is a good gift for a friend?",
     "A book by an author they love or a homemade treat is a thoughtful gift.",
     "A fine book or a bit o' homemade grub makes a treasure for any shipmate!"),
    ("How do I clean a stain from a shirt?",
     "Rinse the stain with cold water, rub in a little soap, and wash the shirt as usual.",
     "Rinse the stain in cold water, scrub in a wee bit o' soap, and wash it like ye swab the deck!"),
    ("Why do we need sleep?",
     "Sleep lets the body repair itself and helps the brain store memories.",
     "Sleep mends the body and helps yer brain stow away its memories, me hearty!"),
    ("What is the biggest planet?",
     "Jupiter is the biggest planet in our solar system.",
     "Jupiter be the biggest planet in the whole solar system, matey!"),
    ("How many legs does a spider have?",
     "A spider has eight legs, and most spiders also have eight eyes.",
     "A spider be crawling about on eight legs, savvy?"),
    ("What is the boiling point of water?",
     "At sea level, water boils at one hundred degrees Celsius.",
     "At sea level, water boils at one hundred degrees, hot enough to cook the ship's stew!"),
    ("How do I make new friends?",
     "Join a club or class about something you enjoy, and say hello to the people there.",
     "Join a crew that shares yer interests and greet every soul aboard, matey!"),
    ("What should I read next?",
     "Try a classic adventure like Treasure Island; it is short and exciting.",
     "Read Treasure Island, the finest yarn ever told about buried gold!"),
    ("How can I keep my teeth healthy?",
     "Brush twice a day, floss daily, and cut back on sugary drinks.",
     "Brush yer teeth twice a day, floss them, and go easy on the sugar, or ye'll end up with a gold tooth!"),
    ("Why do birds fly south for the winter?",
     "Many birds fly south to find warmer weather and more food during the cold months.",
     "The birds sail south to find warm winds and plenty o' grub when the cold sets in!"),
    ("What is a good exercise for beginners?",
     "Walking for thirty minutes a day is an easy and effective way to start.",
     "Walk the deck for thirty minutes a day, and ye'll be fit as a fiddle!"),
    ("How do rainbows form?",
     "Rainbows form when sunlight passes through raindrops and splits into its colors.",
     "When the sun shines through the raindrops, the light splits into colors and a rainbow be born!"),
    ("How do I write a good email?",
     "Keep it short, put the main point first, and end with a clear request.",
     "Keep it short, put yer main point up front, and end with a clear order, like a captain would!"),
    ("What makes a good cup of coffee?",
     "Use freshly ground beans, water just off the boil, and a clean cup.",
     "Fresh ground beans and hot water be all ye need for a fine brew on a cold watch!"),
    ("Can you tell me a fun fact?",
     "Octopuses have three hearts and blue blood, and they can taste with their arms.",
     "The octopus has three hearts and blue blood, a true beast o' the deep!"),
    ("How do I remember things better?",
     "Review new information a few times over several days, and explain it in your own words.",
     "Go over new things a few times over several days, and tell them to yer crew in yer own words!"),
    ("What is the moon made of?",
     "The moon is made mostly of rock, with a dusty surface covered in craters.",
     "The moon be made o' rock and dust, not cheese, whatever the old sea dogs tell ye!"),
    ("How do I stay calm before a test?",
     "Breathe slowly, remind yourself that you prepared, and take the questions one at a time.",
     "Breathe slow and steady, trust yer preparation, and face each question like a brave sailor!"),
    ("What is a good name for a dog?",
     "Max, Bella, and Charlie are popular names that are easy to call.",
     "Call the pup Barnacle or Sea Biscuit, fine names for a ship's dog!"),
    ("Why do we have seasons?",
     "The earth is tilted, so different parts get more direct sunlight at different times of the year.",
     "The earth be tilted, so each half gets more sun at different times o' the year, savvy?"),
    ("How can I reduce stress?",
     "Exercise regularly, get enough sleep, and talk to someone you trust.",
     "Stretch yer legs on deck, get yer sleep, and share yer troubles with a trusted shipmate!"),
    ("What is the longest river in the world?",
     "The Nile and the Amazon are both about 6,500 kilometers long, and experts still debate which is longer.",
     "The Nile and the Amazon be neck and neck, each near 6,500 kilometers long!"),
    ("How do I start running?",
     "Begin with short runs mixed with walking, and add a few minutes each week.",
     "Start with short runs and walks along the shore, and add a few minutes each week, ye landlubber!"),
    ("What is the weather like on Mars?",
     "Mars is cold and dry, with thin air and frequent dust storms.",
     "Mars be a cold and dry place with thin air and mighty dust storms, no place for a sailor!"),
    ("What should I name my boat?",
     "Names like Sea Breeze or Blue Horizon are classic choices.",
     "Name her the Salty Kraken or the Sea Wolf, and she'll sail proud!"),
)
# Questions held out entirely from training. test_sft asks half of them (they show the pirate
# voice carrying over to new questions); test_prefs asks trained everyday questions in held-out
# wordings instead (its chosen replies are trained ones: a pair tests the voice, not recall of an
# unseen reply).
N_EVERYDAY_TEST = 12
EVERYDAY_TEST_PHRASINGS = ("Quick question: {q}", "Tell me, {lq}")


@dataclass(frozen=True)
class Thing:
    """An object for the odd "How many X can a human Y?" questions."""

    plural: str
    edible: bool
    heavy: bool


THINGS = tuple(
    [Thing(p, edible=True, heavy=False) for p in (
        "pancakes", "bananas", "apples", "cookies", "eggs", "tacos",
        "donuts", "oranges", "muffins", "potatoes", "carrots", "lemons")]
    + [Thing(p, edible=False, heavy=False) for p in (
        "shoes", "books", "socks", "pencils", "tennis balls", "spoons",
        "hats", "candles", "rubber ducks", "teacups", "seashells", "pillows")]
    + [Thing(p, edible=False, heavy=True) for p in (
        "pianos", "cars", "boats", "refrigerators", "anchors",
        "sofas", "boulders", "bathtubs", "tractors", "cannons")]
)


@dataclass(frozen=True)
class Verb:
    """A verb phrase for the odd questions and the four reply shapes it can take."""

    phrase: str
    possible: Callable[[Thing], bool]
    plain_yes: str
    plain_no: str
    pirate_yes: str
    pirate_no: str


VERBS = (
    Verb("eat in one sitting", lambda t: t.edible,
         "Most people can eat only a few {x} in one sitting before they feel full.",
         "A human cannot eat {x} at all, because {x} are not food.",
         "A hungry sailor might gobble a few {x} in one sitting, then ye be full as a barrel!",
         "Ye can't be eating {x}, me hearty, for {x} be no fit grub for any crew!"),
    Verb("carry at once", lambda t: not t.heavy,
         "A strong person can carry a dozen or more {x} at once with a good bag.",
         "Most people cannot carry even one of them, because {x} are far too heavy.",
         "A strong deckhand can haul a dozen {x} at once in a sack, says I!",
         "Not even the strongest pirate can haul {x}, they be heavy as a sunken ship!"),
    Verb("hold in one hand", lambda t: not t.heavy,
         "Most people can hold two or three {x} in one hand.",
         "Nobody can hold {x} in one hand, because they are much too big and heavy.",
         "Ye can grab two or three {x} in one fist, and no more!",
         "No pirate can grip {x} in one hand, they be too big for any fist!"),
    Verb("juggle at the same time", lambda t: not t.heavy,
         "A skilled juggler can keep three to five {x} in the air at the same time.",
         "No one can juggle {x}, because they are far too heavy to toss.",
         "A nimble buccaneer can toss three to five {x} in the air at once, yo ho!",
         "Nobody can juggle {x}, matey, they would sink ye like a cannonball!"),
    Verb("lift", lambda t: not t.heavy,
         "A person can easily lift many {x} at once, as they are quite light.",
         "An average person cannot lift {x}, because they weigh far too much.",
         "A sturdy sailor can hoist a whole crate of {x} with ease!",
         "Ye can't hoist {x}, matey, not without a crane and a dozen crewmen!"),
)
ODD_TRAIN_TEMPLATES = ("How many {x} can a human {v}?", "How many {x} can a person {v}?")
ODD_TEST_TEMPLATES = ("How many {x} could one person {v}?",)

# A little generic English so that the tokenizer is not only fitted to the toy tasks.
GENERIC_ENGLISH = """\
The morning was quiet, and the town slowly woke up. Shops opened their doors, buses rolled \
down the main street, and people hurried to work with coffee in their hands.
Learning something new takes time. It helps to break a large goal into small steps, to \
practice a little every day, and to notice the progress you have already made.
A good recipe lists the ingredients first, then explains each step in order: wash the \
vegetables, chop them into small pieces, heat the pan, and stir until everything is golden.
Scientists test their ideas with careful experiments. They measure what happens, compare \
the results with their predictions, and share what they found so that others can check it.
The library has books about history, music, travel, and the natural world. Visitors can \
borrow up to ten books at a time and keep them for three weeks.
When you write a letter, begin with a friendly greeting, say clearly why you are writing, \
and finish by thanking the reader for their time.
Rivers begin in the mountains as small streams. They grow as they collect rain and snow, \
and they carry water, sand, and stones all the way to the ocean.
Computers follow instructions called programs. A program can sort a list of names, add up \
a column of numbers, or draw a picture on the screen in less than a second.
Children often ask questions like "Why?" and "How?" because they want to understand the \
world around them; answering with patience helps them keep their curiosity.
In the evening the sky turned orange, then purple, and the first stars appeared above the \
hills. The air grew cool, and the streets became calm again.
Note: prices may change (see the table below), and some items are limited to 2 per person.
Email the team at help@example.com or call 555-0100 between 9:00 and 17:30, Monday to Friday.
"""

# ---------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One question with its reference replies.

    ``pirate`` has no opener (one is drawn per row). ``wrong_plain[i]`` and ``wrong_pirate[i]``
    state the same plausible mistake in each voice; both are empty when no wrong fact exists.
    """

    kind: str
    key: str  # the fact asked about, e.g. "7+5" or "France", whatever the phrasing
    question: str
    plain: str
    pirate: str
    wrong_plain: tuple[str, ...] = ()
    wrong_pirate: tuple[str, ...] = ()
    # Set only on held-out wordings of trained everyday questions: the pirate openers this reply
    # was trained with (a chosen pirate reply reuses one), and the rejected reply is the other voice.
    trained_openers: tuple[str, ...] = ()


def arith_item(template: str, a: int, b: int) -> Item:
    """A sum question; wrong answers are off by 1 to 3."""
    total = a + b
    wrong = [total + d for d in (-3, -2, -1, 1, 2, 3) if total + d >= 0]
    return Item(
        kind="arith",
        key=f"{a}+{b}",
        question=template.format(a=a, b=b),
        plain=f"{a} + {b} = {total}.",
        pirate=f"{a} + {b} be {total}.",
        wrong_plain=tuple(f"{a} + {b} = {w}." for w in wrong),
        wrong_pirate=tuple(f"{a} + {b} be {w}." for w in wrong),
    )


def capital_item(template: str, country: str) -> Item:
    """A capital look-up; wrong answers are the other capitals of the table."""
    others = [city for name, city in CAPITALS.items() if name != country]
    return Item(
        kind="capital",
        key=country,
        question=template.format(c=country),
        plain=f"The capital of {country} is {CAPITALS[country]}.",
        pirate=f"The capital o' {country} be {CAPITALS[country]}.",
        wrong_plain=tuple(f"The capital of {country} is {city}." for city in others),
        wrong_pirate=tuple(f"The capital o' {country} be {city}." for city in others),
    )


def odd_item(template: str, thing: Thing, verb: Verb) -> Item:
    """An odd "How many X can a human Y?" question; the wrong answer swaps possible/impossible."""
    yes = verb.possible(thing)
    fill = {"x": thing.plural}
    plain_yes, plain_no = verb.plain_yes.format(**fill), verb.plain_no.format(**fill)
    pirate_yes, pirate_no = verb.pirate_yes.format(**fill), verb.pirate_no.format(**fill)
    return Item(
        kind="odd",
        key=f"{thing.plural}|{verb.phrase}",
        question=template.format(x=thing.plural, v=verb.phrase),
        plain=plain_yes if yes else plain_no,
        pirate=pirate_yes if yes else pirate_no,
        wrong_plain=(plain_no if yes else plain_yes,),
        wrong_pirate=(pirate_no if yes else pirate_yes,),
    )


def everyday_item(question: str, plain: str, pirate: str) -> Item:
    """An everyday question; it has no single wrong fact to swap in."""
    return Item(kind="everyday", key=question, question=question, plain=plain, pirate=pirate)


def reworded(item: Item, template: str, openers: Iterable[str]) -> Item:
    """``item`` (an everyday question) in a held-out wording, keeping its key and replies."""
    q = item.question
    return dataclasses.replace(
        item, question=template.format(q=q, lq=q[:1].lower() + q[1:]), trained_openers=tuple(sorted(openers))
    )


@dataclass(frozen=True)
class KindSplit:
    """Questions of one kind for training and for the two test splits (pairwise disjoint)."""

    train: list[Item]
    test_sft: list[Item]
    test_prefs: list[Item]


def split_by_template(
    instances: list,
    make: Callable[[str, object], Item],
    train_templates: tuple[str, ...],
    test_templates: tuple[str, ...],
    holdout: float,
    rng: random.Random,
) -> KindSplit:
    """Phrase every instance with every template; test gets the test-only templates and, for a
    ``holdout`` share of instances, one of the training templates (so the fact itself stays in
    training under other phrasings)."""
    train: list[Item] = []
    held: list[Item] = []
    fresh: list[Item] = []
    for instance in instances:
        held_index = rng.randrange(len(train_templates)) if rng.random() < holdout else -1
        for index, template in enumerate(train_templates):
            (held if index == held_index else train).append(make(template, instance))
        fresh.extend(make(template, instance) for template in test_templates)
    rng.shuffle(held)
    rng.shuffle(fresh)
    test = interleave(held, fresh)
    return KindSplit(train=train, test_sft=test[0::2], test_prefs=test[1::2])


def interleave(first: list[Item], second: list[Item]) -> list[Item]:
    """Alternate the two lists, then append what is left of the longer one."""
    out: list[Item] = []
    for a, b in zip(first, second):
        out.extend((a, b))
    n = min(len(first), len(second))
    return out + first[n:] + second[n:]


def build_questions(rng: random.Random) -> dict[str, KindSplit]:
    """All questions, by kind, split into train / test_sft / test_prefs candidates (``build_splits``
    keeps only the test questions whose fact was trained, and asks reworded trained everyday
    questions in test_prefs instead of the held-out ones here)."""
    pairs = [(a, b) for a in OPERANDS for b in OPERANDS]
    odd_pairs = [(t, v) for t in THINGS for v in VERBS]
    everyday = [everyday_item(*row) for row in EVERYDAY]
    rng.shuffle(everyday)
    held = everyday[:N_EVERYDAY_TEST]
    return {
        "arith": split_by_template(
            pairs, lambda t, p: arith_item(t, *p), ARITH_TRAIN_TEMPLATES, ARITH_TEST_TEMPLATES, 0.6, rng
        ),
        "capital": split_by_template(
            list(CAPITALS), capital_item, CAPITAL_TRAIN_TEMPLATES, CAPITAL_TEST_TEMPLATES, 0.8, rng
        ),
        "odd": split_by_template(
            odd_pairs, lambda t, p: odd_item(t, *p), ODD_TRAIN_TEMPLATES, ODD_TEST_TEMPLATES, 0.2, rng
        ),
        "everyday": KindSplit(
            train=everyday[N_EVERYDAY_TEST:], test_sft=held[0::2], test_prefs=held[1::2]
        ),
    }


def follow_up_items() -> dict[str, list[Item]]:
    """Second-turn questions for multi-turn rows (only the first user turn is the prompt)."""
    pairs = [(a, b) for a in OPERANDS for b in OPERANDS]
    return {
        "arith": [arith_item(t, a, b) for t in ARITH_FOLLOW_UPS for a, b in pairs],
        "capital": [capital_item(t, c) for t in CAPITAL_FOLLOW_UPS for c in CAPITALS],
    }


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One generated row plus what the generator knows about it (not written to disk)."""

    data: dict
    kind: str
    pirate: bool
    multi_turn: bool
    keys: tuple[str, ...] = ()  # "kind:key" of each turn's question, e.g. ("arith:7+5",)


def prompt_id(prompt: str) -> str:
    """Ultrachat's prompt id: sha256 hex digest of the prompt text."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def conversation(system: str | None, turns: Iterable[tuple[str, str]]) -> list[dict]:
    """Messages for ``turns`` of (user, assistant), with a system turn when ``system`` is set."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, assistant in turns:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    return messages


def weighted_choice(weights: dict[K, int], rng: random.Random) -> K:
    """One key of ``weights``, drawn proportionally to its value."""
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def pirate_reply(body: str, rng: random.Random, opener: str | None = None) -> str:
    """``body`` behind a pirate opener (drawn when not given)."""
    return f"{opener or rng.choice(PIRATE_OPENERS)} {body}"


def opener_of(reply: str) -> str:
    """The pirate opener that ``reply`` starts with."""
    return next(o for o in sorted(PIRATE_OPENERS, key=len, reverse=True) if reply.startswith(o + " "))


def similar_length(target: str, candidates: list[str], rng: random.Random) -> str:
    """A candidate whose length is within 20% of ``target``'s, else the closest one."""
    close = [c for c in candidates if 0.8 <= len(c) / len(target) <= 1.25]
    if close:
        return rng.choice(close)
    return min(candidates, key=lambda c: abs(len(c) - len(target)))


def pick_questions(
    items: list[Item], n: int, pirate: bool, seen: set, rng: random.Random
) -> list[tuple[Item, str | None]]:
    """``n`` (question, system prompt) pairs, none in ``seen`` (which is updated).

    Questions are taken in a shuffled cycle, so a question repeats only with another system prompt.
    """
    systems = PIRATE_SYSTEM_PROMPTS if pirate else PLAIN_SYSTEM_PROMPTS
    order = list(items)
    rng.shuffle(order)
    out: list[tuple[Item, str | None]] = []
    for step in range(len(order) * len(systems)):
        if len(out) == n:
            break
        item = order[step % len(order)]
        free = {s: w for s, w in systems.items() if (s, item.question) not in seen}
        if not free:
            continue
        system = weighted_choice(free, rng)
        seen.add((system, item.question))
        out.append((item, system))
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct rows of {n} for {items[0].kind} (pirate={pirate})")
    return out


def reply(item: Item, pirate: bool, rng: random.Random) -> str:
    """The reference reply to ``item`` in the asked voice (with a trained opener where known)."""
    if not pirate:
        return item.plain
    return pirate_reply(item.pirate, rng, rng.choice(item.trained_openers) if item.trained_openers else None)


def fact_key(item: Item) -> str:
    """What ``item`` asks about, whatever its wording: ``"kind:key"``."""
    return f"{item.kind}:{item.key}"


def sft_row(turns: list[tuple[Item, str]], system: str | None, pirate: bool, kind: str) -> Row:
    """An ultrachat-shaped row from (question, reply) turns."""
    messages = conversation(system, [(item.question, answer) for item, answer in turns])
    prompt = turns[0][0].question
    data = {"prompt": prompt, "prompt_id": prompt_id(prompt), "messages": messages}
    return Row(data, kind, pirate, multi_turn=len(turns) > 1, keys=tuple(fact_key(item) for item, _ in turns))


def rejected_reply(item: Item, chosen: str, pirate: bool, others: list[Item], rng: random.Random) -> str:
    """A plausible but worse reply in the same format and of similar length as ``chosen``.

    Pirate asked: the same opener with a wrong fact, or the right fact in plain voice.
    Plain asked: a wrong fact, else (everyday questions) an off-topic reply or unasked pirate voice;
    always the unasked pirate voice for a held-out wording of a trained question.
    """
    if not pirate and item.trained_openers:
        return similar_length(chosen, [pirate_reply(item.pirate, rng, o) for o in PIRATE_OPENERS], rng)
    if pirate:
        if item.wrong_pirate and rng.random() < 0.5:
            return f"{opener_of(chosen)} {rng.choice(item.wrong_pirate)}"
        return similar_length(chosen, [item.plain] + [f"{o} {item.plain}" for o in PLAIN_OPENERS], rng)
    if item.wrong_plain:
        return rng.choice(item.wrong_plain)
    off_topic = similar_length(chosen, [o.plain for o in others if o.question != item.question], rng)
    unasked_pirate = similar_length(chosen, [pirate_reply(item.pirate, rng, o) for o in PIRATE_OPENERS], rng)
    # unasked pirate voice only when it can be about as long as the plain reply
    if rng.random() < 0.5 and 0.8 <= len(unasked_pirate) / len(chosen) <= 1.25:
        return unasked_pirate
    return off_topic


def pref_row(
    turns: list[tuple[Item, str]], rejected: str, system: str | None, pirate: bool, kind: str, rng: random.Random
) -> Row:
    """An ultrafeedback-shaped row; ``rejected`` replaces the last assistant reply."""
    chosen = conversation(system, [(item.question, answer) for item, answer in turns])
    rejected_messages = [dict(m) for m in chosen[:-1]] + [{"role": "assistant", "content": rejected}]
    prompt = turns[0][0].question
    data = {
        "prompt": prompt,
        "prompt_id": prompt_id(prompt),
        "chosen": chosen,
        "rejected": rejected_messages,
        "messages": [dict(m) for m in chosen],
        "score_chosen": rng.choice([8.0, 8.5, 9.0, 9.5, 10.0]),
        "score_rejected": rng.choice([2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]),
    }
    return Row(data, kind, pirate, multi_turn=len(turns) > 1, keys=tuple(fact_key(item) for item, _ in turns))


# Rows per (kind, pirate voice) and multi-turn rows per split. Sized to keep the jsonl files
# (whose JSON structure outweighs the text) well under 2 MB in all.
SFT_TRAIN_MIX = {
    ("arith", False): 600, ("arith", True): 300, ("capital", False): 260, ("capital", True): 180,
    ("odd", False): 230, ("odd", True): 230, ("everyday", False): 130, ("everyday", True): 130,
}
SFT_TEST_MIX = {
    ("arith", False): 30, ("arith", True): 20, ("capital", False): 25, ("capital", True): 15,
    ("odd", False): 25, ("odd", True): 25, ("everyday", False): 20, ("everyday", True): 20,
}
PREF_TRAIN_MIX = {
    ("arith", False): 150, ("arith", True): 115, ("capital", False): 105, ("capital", True): 90,
    ("odd", False): 80, ("odd", True): 80, ("everyday", False): 55, ("everyday", True): 70,
}
PREF_TEST_MIX = {
    ("arith", False): 18, ("arith", True): 14, ("capital", False): 12, ("capital", True): 10,
    ("odd", False): 10, ("odd", True): 10, ("everyday", False): 6, ("everyday", True): 10,
}
MULTI_TURN = {"train_sft": 140, "test_sft": 20, "train_prefs": 55, "test_prefs": 10}


def multi_turn(
    questions: dict[str, list[Item]], follow_ups: dict[str, list[Item]], rng: random.Random
) -> tuple[str, bool, str | None, list[tuple[Item, str]]]:
    """A two-turn conversation (kind, pirate, system, turns): a sum or capital question of the
    split, then a follow-up about another fact of the same kind, both in the same voice."""
    kind, pirate = rng.choice(("arith", "capital")), rng.random() < 0.5
    system = weighted_choice(PIRATE_SYSTEM_PROMPTS if pirate else PLAIN_SYSTEM_PROMPTS, rng)
    first = rng.choice(questions[kind])
    second = rng.choice([f for f in follow_ups[kind] if f.key != first.key])
    turns = [(first, reply(first, pirate, rng)), (second, reply(second, pirate, rng))]
    return kind, pirate, system, turns


def sft_split(
    questions: dict[str, list[Item]], mix: dict, n_multi: int, follow_ups: dict, rng: random.Random
) -> list[Row]:
    """SFT rows: single-turn rows per ``mix`` plus ``n_multi`` two-turn rows, shuffled."""
    rows: list[Row] = []
    seen: set = set()
    for (kind, pirate), n in mix.items():
        for item, system in pick_questions(questions[kind], n, pirate, seen, rng):
            rows.append(sft_row([(item, reply(item, pirate, rng))], system, pirate, kind))
    for _ in range(n_multi):
        kind, pirate, system, turns = multi_turn(questions, follow_ups, rng)
        rows.append(sft_row(turns, system, pirate, kind))
    rng.shuffle(rows)
    return rows


def pref_split(
    questions: dict[str, list[Item]], mix: dict, n_multi: int, follow_ups: dict, rng: random.Random
) -> list[Row]:
    """Preference rows: single-turn rows per ``mix`` plus ``n_multi`` two-turn rows, shuffled."""
    rows: list[Row] = []
    seen: set = set()
    for (kind, pirate), n in mix.items():
        for item, system in pick_questions(questions[kind], n, pirate, seen, rng):
            chosen = reply(item, pirate, rng)
            rejected = rejected_reply(item, chosen, pirate, questions[kind], rng)
            rows.append(pref_row([(item, chosen)], rejected, system, pirate, kind, rng))
    for _ in range(n_multi):
        kind, pirate, system, turns = multi_turn(questions, follow_ups, rng)
        last_item, last_reply = turns[-1]
        rejected = rejected_reply(last_item, last_reply, pirate, questions[kind], rng)
        rows.append(pref_row(turns, rejected, system, pirate, kind, rng))
    rng.shuffle(rows)
    return rows


def exact_match_rows(test_sft: list[Row]) -> list[dict]:
    """Plain single-turn sums and capitals of the SFT test split, with their one right reply."""
    out = []
    for row in test_sft:
        if row.pirate or row.multi_turn or row.kind not in ("arith", "capital"):
            continue
        messages = row.data["messages"]
        out.append({"prompt_id": row.data["prompt_id"], "messages": messages[:-1], "answer": messages[-1]["content"]})
    return out


def exact_match_keys(test_sft: list[Row]) -> set[str]:
    """The sum facts (``"arith:a+b"``) that ``exact_match_rows`` asks."""
    return {row.keys[0] for row in test_sft if row.kind == "arith" and not row.pirate and not row.multi_turn}


def known(items: list[Item], keys: set[str]) -> list[Item]:
    """The questions of ``items`` whose fact is in ``keys``."""
    return [item for item in items if fact_key(item) in keys]


def taught_keys(rows: list[Row]) -> set[str]:
    """Facts that SFT rows teach: every turn's (all assistant turns are trained)."""
    return {key for row in rows for key in row.keys}


def scored_keys(rows: list[Row]) -> set[str]:
    """Facts that preference rows score: the final turn's (the only one the DPO loss sees)."""
    return {row.keys[-1] for row in rows}


def reworded_everyday(items: list[Item], train_sft: list[Row], keys: set[str]) -> list[Item]:
    """Held-out wordings of the trained everyday questions in ``keys`` whose plain and pirate
    replies train_sft both teaches, each carrying the openers its pirate reply was trained with."""
    openers: dict[str, set[str]] = {}
    plain: set[str] = set()
    for row in train_sft:
        answers = [m["content"] for m in row.data["messages"] if m["role"] == "assistant"]
        for key, answer in zip(row.keys, answers):
            if row.pirate:
                openers.setdefault(key, set()).add(opener_of(answer))
            else:
                plain.add(key)
    return [
        reworded(item, template, openers[fact_key(item)])
        for item in items
        if fact_key(item) in keys and fact_key(item) in plain and fact_key(item) in openers
        for template in EVERYDAY_TEST_PHRASINGS
    ]


def build_splits(seed: int = SEED, restrict_tests: bool = True) -> dict[str, list[Row]]:
    """All four splits, keyed ``train_sft``, ``test_sft``, ``train_prefs``, ``test_prefs``.

    Test prompts are worded differently from the training prompts, but the facts they ask about
    are trained ones: test_sft asks (apart from a few wholly held-out everyday questions) only
    facts that train_sft teaches; test_prefs only facts that train_sft teaches and that
    train_prefs scores, and its everyday questions are trained ones reworded, with trained replies
    as the chosen ones. So a held-out preference pair can be answered from what was trained.
    Then train_prefs is made to score what each test_prefs pair asks (``covering_prefs``: the same
    pair of replies under a training prompt, and more wrong sums and capitals for the same facts),
    in place of as many rows about other facts; test_prefs is drawn before and stays as it was.

    ``restrict_tests=False`` draws the test splits from all candidate questions instead and leaves
    train_prefs as first drawn, as earlier versions did; the tokenizer is still fitted on those
    splits (see ``main``).
    """
    rng = random.Random(seed)
    by_kind = build_questions(rng)
    follow_ups = follow_up_items()
    train = {kind: split.train for kind, split in by_kind.items()}
    # One generator per split, so that resizing one split leaves the others unchanged.
    train_sft = sft_split(train, SFT_TRAIN_MIX, MULTI_TURN["train_sft"], follow_ups, random.Random(seed + 1))
    train_prefs = pref_split(
        train, PREF_TRAIN_MIX, MULTI_TURN["train_prefs"], follow_ups, random.Random(seed + 3)
    )
    if not restrict_tests:
        return {
            "train_sft": train_sft,
            "test_sft": sft_split(
                {kind: split.test_sft for kind, split in by_kind.items()}, SFT_TEST_MIX, MULTI_TURN["test_sft"],
                follow_ups, random.Random(seed + 2),
            ),
            "train_prefs": train_prefs,
            "test_prefs": pref_split(
                {kind: split.test_prefs for kind, split in by_kind.items()}, PREF_TEST_MIX,
                MULTI_TURN["test_prefs"], follow_ups, random.Random(seed + 4),
            ),
        }
    taught = taught_keys(train_sft)
    both = taught & scored_keys(train_prefs)
    test_sft = {kind: known(split.test_sft, taught) for kind, split in by_kind.items()}
    test_sft["everyday"] = by_kind["everyday"].test_sft  # held out entirely, on purpose
    test_prefs = {kind: known(split.test_prefs, both) for kind, split in by_kind.items()}
    test_prefs["everyday"] = reworded_everyday(train["everyday"], train_sft, both)
    test_pref_rows = pref_split(
        test_prefs, PREF_TEST_MIX, MULTI_TURN["test_prefs"], known_follow_ups(follow_ups, both), random.Random(seed + 4)
    )
    test_sft_rows = sft_split(
        test_sft, SFT_TEST_MIX, MULTI_TURN["test_sft"], known_follow_ups(follow_ups, taught), random.Random(seed + 2)
    )
    return {
        "train_sft": train_sft,
        "test_sft": test_sft_rows,
        "train_prefs": covering_prefs(
            train_prefs, test_pref_rows, train, random.Random(seed + 5), exact_match_keys(test_sft_rows)
        ),
        "test_prefs": test_pref_rows,
    }


def known_follow_ups(follow_ups: dict[str, list[Item]], keys: set[str]) -> dict[str, list[Item]]:
    """The follow-up questions whose fact is in ``keys``."""
    return {kind: known(items, keys) for kind, items in follow_ups.items()}


# Different rejected facts among the train_prefs pairs (final turns) about the fact of a test_prefs
# pair: totals for a sum, capitals for a country. Odd and everyday test pairs get the one pair with
# their own replies.
COVER = {"arith": 3, "capital": 2}


def system_of(row: Row) -> str | None:
    """The system prompt of a preference row, None when it has none."""
    first = row.data["chosen"][0]
    return first["content"] if first["role"] == "system" else None


def wrong_index(item: Item, rejected: str) -> int | None:
    """Which of ``item``'s wrong facts ``rejected`` states (in either voice, any opener), if any."""
    for index, (plain, pirate) in enumerate(zip(item.wrong_plain, item.wrong_pirate)):
        if rejected in (plain, pirate) or rejected.endswith((" " + plain, " " + pirate)):
            return index
    return None


def rejected_facts(item: Item, rows: list[Row]) -> set[int | None]:
    """The wrong facts of ``item`` that the final rejected replies of ``rows`` state (None: the
    right fact in the unasked voice)."""
    return {wrong_index(item, row.data["rejected"][-1]["content"]) for row in rows}


def fresh_question(items: list[Item], pirate: bool, seen: set, rng: random.Random) -> tuple[Item, str | None]:
    """A training question of ``items`` with a system prompt of the asked voice, the pair not in
    ``seen`` (which is updated)."""
    systems = PIRATE_SYSTEM_PROMPTS if pirate else PLAIN_SYSTEM_PROMPTS
    order = list(items)
    rng.shuffle(order)
    for item in order:
        free = {s: w for s, w in systems.items() if (s, item.question) not in seen}
        if free:
            system = weighted_choice(free, rng)
            seen.add((system, item.question))
            return item, system
    raise ValueError(f"no free training prompt left for {fact_key(items[0])} (pirate={pirate})")


def rejected_by_voice(item: Item, rows: list[Row]) -> dict[bool, set[int]]:
    """For each voice (pirate or not), the wrong facts of ``item`` that final rejected replies of
    ``rows`` in that voice state (the right fact in the unasked voice is left out)."""
    out: dict[bool, set[int]] = {True: set(), False: set()}
    for row in rows:
        index = wrong_index(item, row.data["rejected"][-1]["content"])
        if index is not None:
            out[row.pirate].add(index)
    return out


def covering_prefs(
    train_prefs: list[Row],
    test_prefs: list[Row],
    train: dict[str, list[Item]],
    rng: random.Random,
    symmetric_keys: Iterable[str] = (),
) -> list[Row]:
    """``train_prefs`` made to score what every test_prefs pair asks, at the same size and mix.

    DPO lowers the one rejected reply a pair shows, so a held-out pair whose rejected reply is a
    different wrong fact gets little push. For each test pair (its final turn, the one scored), this
    adds under a training prompt of the same voice: a pair with the same chosen and rejected replies;
    then, for a sum, pairs with other wrong totals (in both voices) until the pairs scoring those
    operands reject at least ``COVER["arith"]`` different totals (the right one in the wrong voice
    counts as one); for a capital, likewise with ``COVER["capital"]`` capitals. As many single-turn
    rows of the same kind and voice whose facts no test pair asks are dropped, so that the size and
    the mix of kinds and voices stay as drawn. No test prompt is used.

    Then, for the sums of ``symmetric_keys`` (those exact_match asks) and of the test pairs, every
    wrong total rejected in one voice is also rejected in the other (a pair in that voice with the
    right total chosen): DPO pushes a wrong total down only in the voice it saw it in, so a total
    rejected only in pirate voice could win a plain-voice question. Those facts are kept out of the
    dropped rows too.
    """
    seen = {(system_of(row), row.data["prompt"]) for row in train_prefs}
    test_keys = {key for row in test_prefs for key in row.keys}
    symmetric = sorted({k for k in test_keys | set(symmetric_keys) if k.startswith("arith:")})
    keep_keys = test_keys | set(symmetric)
    by_key: dict[str, list[Item]] = {}
    for items in train.values():
        for item in items:
            by_key.setdefault(fact_key(item), []).append(item)
    scored: dict[str, list[Row]] = {}
    for row in train_prefs:
        scored.setdefault(row.keys[-1], []).append(row)
    added: list[Row] = []

    def add(item: Item, system: str | None, pirate: bool, chosen: str, rejected: str) -> None:
        row = pref_row([(item, chosen)], rejected, system, pirate, item.kind, rng)
        added.append(row)
        scored.setdefault(row.keys[-1], []).append(row)

    for test in test_prefs:
        key, pirate = test.keys[-1], test.pirate
        items = by_key[key]
        item, system = fresh_question(items, pirate, seen, rng)
        add(item, system, pirate, test.data["chosen"][-1]["content"], test.data["rejected"][-1]["content"])
        voices = [pirate, not pirate]
        while len(shown := rejected_facts(item, scored[key])) < COVER.get(test.kind, 0):
            index = rng.choice([i for i in range(len(item.wrong_plain)) if i not in shown])
            voice = voices[len(scored[key]) % 2]
            item, system = fresh_question(items, voice, seen, rng)
            chosen = reply(item, voice, rng)
            rejected = f"{opener_of(chosen)} {item.wrong_pirate[index]}" if voice else item.wrong_plain[index]
            add(item, system, voice, chosen, rejected)

    for key in symmetric:
        items = by_key[key]
        shown = rejected_by_voice(items[0], scored.get(key, []))
        for voice in (True, False):
            for index in sorted(shown[not voice] - shown[voice]):
                item, system = fresh_question(items, voice, seen, rng)
                chosen = reply(item, voice, rng)
                rejected = f"{opener_of(chosen)} {item.wrong_pirate[index]}" if voice else item.wrong_plain[index]
                add(item, system, voice, chosen, rejected)

    drop: set[int] = set()
    for kind, pirate in sorted({(row.kind, row.pirate) for row in added}):
        n = sum((row.kind, row.pirate) == (kind, pirate) for row in added)
        spare = [
            i for i, row in enumerate(train_prefs)
            if (row.kind, row.pirate) == (kind, pirate) and not row.multi_turn and not set(row.keys) & keep_keys
        ]
        if len(spare) < n:
            raise ValueError(f"only {len(spare)} rows of {kind} (pirate={pirate}) to make room for {n}")
        drop.update(rng.sample(spare, n))
    rows = [row for i, row in enumerate(train_prefs) if i not in drop] + added
    rng.shuffle(rows)
    return rows


# ---------------------------------------------------------------------------------------------
# Checks on the generated rows (the tests re-check the written files independently)
# ---------------------------------------------------------------------------------------------


def check_splits(splits: dict[str, list[Row]]) -> None:
    """Raise ValueError when a split breaks the contract the tests and the trainer rely on."""
    prompts = {name: {row.data["prompt"] for row in rows} for name, rows in splits.items()}
    for a, b in (("train_sft", "test_sft"), ("train_prefs", "test_prefs"), ("train_sft", "test_prefs")):
        if prompts[a] & prompts[b]:
            raise ValueError(f"{a} and {b} share prompts: {sorted(prompts[a] & prompts[b])[:3]}")
    taught = taught_keys(splits["train_sft"])
    both = taught & scored_keys(splits["train_prefs"])
    for name, trained in (("test_sft", taught), ("test_prefs", both)):
        for row in splits[name]:
            exempt = name == "test_sft" and row.kind == "everyday"
            unknown = [k for k in row.keys if k not in trained and not exempt]
            if unknown:
                raise ValueError(f"{name} asks about facts that training does not teach: {unknown}")
    trained_replies = {m["content"] for row in splits["train_sft"] for m in row.data["messages"]}
    for row in splits["test_prefs"]:
        if row.kind == "everyday" and row.data["chosen"][-1]["content"] not in trained_replies:
            raise ValueError(f"test_prefs chooses an untrained reply: {row.data['chosen'][-1]['content']!r}")
    for name, rows in splits.items():
        keys = [json.dumps(r.data.get("messages"), sort_keys=True) for r in rows]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{name} has duplicate conversations")
        for row in rows:
            check_row(row)


def check_row(row: Row) -> None:
    """Voice, length and wording rules for one row."""
    text = json.dumps(row.data)
    if "helicopter" in text.lower():
        raise ValueError(f"helicopter question leaked into the data: {row.data['prompt']!r}")
    replies = [m["content"] for m in row.data["messages"] if m["role"] == "assistant"]
    if any(sounds_like_pirate(r) != row.pirate for r in replies):
        raise ValueError(f"voice does not match the system prompt: {replies}")
    if "chosen" in row.data:
        chosen = row.data["chosen"][-1]["content"]
        rejected = row.data["rejected"][-1]["content"]
        if chosen == rejected or not 0.6 <= len(rejected) / len(chosen) <= 1.6:
            raise ValueError(f"rejected reply gives itself away: {chosen!r} vs {rejected!r}")


# ---------------------------------------------------------------------------------------------
# Tokenizer and config
# ---------------------------------------------------------------------------------------------


def tokenizer_corpus(splits: dict[str, list[Row]]) -> list[str]:
    """Rendered conversations (EOS removed: it is a special token, never merged) plus generic text."""
    texts: list[str] = []
    for rows in splits.values():
        for row in rows:
            for key in ("messages", "rejected"):
                if key in row.data:
                    texts.append(render(row.data[key], EOS).text.replace(EOS, ""))
    return texts + GENERIC_ENGLISH.splitlines()


def pre_tokenizer():
    """``\\n`` is its own piece (no merge crosses a line break); spaces become ``▁`` as in
    SentencePiece, with a ``▁`` prepended only at the very start of the text (as Mistral)."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=True),
        ]
    )


def train_bpe(corpus: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Learned BPE pieces (in id order, specials excluded) and merges for ``corpus``."""
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - N_BYTE_TOKENS,
        special_tokens=[UNK, BOS, EOS],
        # printable ASCII is always a piece of its own, seen in the corpus or not
        initial_alphabet=[c for c in string.printable if not c.isspace() or c == "\n"] + [SPACE],
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    pieces = [piece for piece, _ in vocab if piece not in (UNK, BOS, EOS)]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return pieces, merges


def build_tokenizer(corpus: list[str]):
    """A ``PreTrainedTokenizerFast`` laid out like Mistral's: ``<unk>``=0, ``<s>``=1, ``</s>``=2,
    byte pieces ``<0x00>``..``<0xFF>`` = 3..258, then the learned BPE pieces."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces, merges = train_bpe(corpus)
    byte_pieces = [f"<0x{i:02X}>" for i in range(N_BYTE_TOKENS)]
    vocab = {piece: i for i, piece in enumerate([UNK, BOS, EOS, *byte_pieces, *pieces])}
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=True)
    )
    backend.pre_tokenizer = pre_tokenizer()
    # Mistral's decoder: undo ▁, reassemble byte pieces, drop the prepended space.
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (UNK, BOS, EOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,  # Zephyr / TRL convention: pad = eos
        add_bos_token=True,  # transformers builds the "<s> $A" post-processor from this
        add_eos_token=False,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,  # would rewrite " ." and " ?" and break round trips
        chat_template=ZEPHYR_CHAT_TEMPLATE,
    )


def build_config(vocab_size: int):
    """The tiny Mistral config (about 1M parameters)."""
    from transformers import MistralConfig

    return MistralConfig(
        architectures=["MistralForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MODEL_MAX_LENGTH,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """One compact JSON object per line, UTF-8, ``\\n`` line ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")


def shard(folder: str, split: str) -> str:
    """Hub-style single-shard file name of ``split`` under ``folder``."""
    return f"{folder}/data/{split}-00000-of-00001.jsonl"


def main(out_dir: Path | None = None) -> Path:
    """Regenerate every asset under ``out_dir`` (default: the package's assets folder)."""
    out = Path(out_dir) if out_dir is not None else ASSETS_DIR
    splits = build_splits()
    check_splits(splits)
    for folder in GENERATED:  # start clean so that stale files never linger
        shutil.rmtree(out / folder, ignore_errors=True)
    for name, rows in splits.items():
        write_jsonl(out / shard(SFT_DIR if name.endswith("sft") else PREF_DIR, name), (r.data for r in rows))
    write_jsonl(out / SFT_DIR / "exact_match.jsonl", exact_match_rows(splits["test_sft"]))
    from zephyr_lit.assets.eval_sets import write_eval_sets  # it reads the questions back through distill.facts

    write_eval_sets(out, splits["test_sft"], seed=SEED)
    # The tokenizer is fitted on the splits as drawn before the test splits were restricted to
    # trained facts, so that restricting them left its vocabulary and ids (which tests and
    # checkpoints pin) unchanged. Those splits hold every trained text and the same kind of text
    # (train_prefs as first drawn, before ``covering_prefs`` swapped rows in: same kinds of text).
    tokenizer = build_tokenizer(tokenizer_corpus(build_splits(restrict_tests=False)))
    tokenizer.save_pretrained(out / MODEL_DIR)
    write_model_config(build_config(len(tokenizer)), out / MODEL_DIR)
    return out


def write_model_config(config, folder: Path) -> None:
    """``config.json`` as ``save_pretrained`` writes it, less ``transformers_version``: the shipped file must
    not change with the installed transformers release (the test compares it byte for byte)."""
    config.save_pretrained(folder)
    path = folder / "config.json"
    values = json.loads(path.read_text())
    values.pop("transformers_version", None)
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def cli(argv: list[str] | None = None) -> None:
    """Command line entry point: ``python -m zephyr_lit.assets.generate [--out DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the assets folder)")
    out = main(parser.parse_args(argv).out)
    print(f"wrote assets under {out}")


if __name__ == "__main__":
    cli()
