"""Everyday chat requests from hand-written templates and subjects.

  python -m flexdraft_vllm.training.everyday_prompts --out flexdraft_vllm/data/everyday_prompts.jsonl

Self-synthesised prompts are what a 135M model writes after its chat
template's user turn: mostly garbled fragments and code-flavoured text, few
clean everyday requests. The chat set users send (and the held-out chat
prompts in flexdraft_vllm/data/chat_prompts.jsonl) are short, clean requests:
explain, how do I, give me tips, write a short poem. This module crosses
request templates with subjects that fit them ("Explain {a concept} in simple
terms.", "Give me {n} tips for {an activity}."), each bare and with a
style request ("Keep it short."), and writes every combination, shuffled
with a fixed seed so the first N are a sample across templates. No prompt
equals one of the held-out chat prompts (checked, case and punctuation
aside), and subjects those prompts are about are left out of the lists.
Pure Python, no model: the same file on every machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
from pathlib import Path

from flexdraft_vllm.prompts import chat_prompts

CONCEPTS = [
    "how a refrigerator keeps food cold", "black holes", "the stock market", "compound interest", "evolution",
    "the immune system", "plate tectonics", "electricity", "how batteries store energy", "volcanoes",
    "the human brain", "supply and demand", "cloud computing", "the Roman Empire", "magnetism",
    "how earthquakes happen", "nuclear energy", "the digestive system", "artificial intelligence", "blockchain",
    "the French Revolution", "how a microwave oven heats food", "ocean currents", "the speed of light",
    "how GPS finds your location", "taxes", "the carbon cycle", "how the eye sees colour", "antibiotics",
    "the Industrial Revolution", "how soap cleans", "interest rates", "the printing press", "solar panels",
    "how a car engine works", "the periodic table", "muscle growth", "how memory works", "the Cold War",
    "how 3D printing works",
]
ACTIVITIES = [
    "learning to cook", "staying focused while working from home", "keeping a tidy kitchen", "traveling on a budget",
    "making new friends in a new city", "learning to play the guitar", "taking better photos with a phone",
    "writing a cover letter", "growing tomatoes", "staying motivated at the gym", "managing time at university",
    "hosting a dinner party", "keeping a journal", "starting a small business", "learning to swim as an adult",
    "reducing screen time", "organizing a small closet", "giving a wedding toast", "training a new puppy",
    "drinking less coffee", "sleeping on a long flight", "meal prepping for the week", "saving for a vacation",
    "decluttering a garage", "being more confident in meetings", "painting a room", "learning to draw",
    "staying warm in winter", "keeping kids busy on a road trip", "negotiating a salary",
]
TASKS = [
    "change a flat tire", "clean a cast iron pan", "make homemade bread", "unclog a sink", "iron a shirt",
    "set up a home Wi-Fi network", "remove a coffee stain from a carpet", "make a paper airplane",
    "brew cold brew coffee", "fold a fitted sheet", "cook rice on the stove", "write a formal complaint letter",
    "back up my photos", "sew a button back on", "make a smoothie", "choose a good watermelon",
    "tie a tie", "start a compost bin", "hang a picture frame", "make scrambled eggs", "clean my laptop keyboard",
    "keep cut flowers fresh longer", "make a simple salad dressing", "wash a wool sweater", "jump-start a car battery",
]
THINGS = [
    "the moon", "a rainy morning", "a city at night", "friendship", "a mountain lake", "winter", "an old library",
    "a cup of coffee", "the first day of spring", "a busy train station", "the stars", "a garden after rain",
    "a lighthouse", "childhood", "the desert", "a quiet forest", "a thunderstorm", "the sea in winter",
    "a candle", "a long journey home",
]
PAIRS = [
    ("a crocodile", "an alligator"), ("a hurricane", "a tornado"), ("baking soda", "baking powder"),
    ("a latte", "a cappuccino"), ("a credit card", "a debit card"), ("a swamp", "a marsh"), ("a frog", "a toad"),
    ("affect", "effect"), ("a mortgage", "a rent agreement"),
    ("a rabbit", "a hare"), ("a simile", "a metaphor"), ("a comet", "an asteroid"), ("a village", "a town"),
    ("an ape", "a monkey"), ("a cold", "the flu"), ("stocks", "bonds"), ("a violin", "a viola"),
    ("a hill", "a mountain"), ("a novel", "a short story"), ("HTTP", "HTTPS"), ("a star", "a planet"),
    ("a dolphin", "a porpoise"), ("a crown", "a tiara"), ("a river", "a stream"),
]
FOODS = ["green tea", "oatmeal", "blueberries", "spinach", "walnuts", "yogurt", "salmon", "dark chocolate",
         "bananas", "lentils", "olive oil", "broccoli", "eggs", "avocados", "carrots", "garlic", "almonds",
         "sweet potatoes", "ginger", "beans"]
LISTS = ["famous painters", "animals that live in the Arctic", "board games for families", "countries in South America",
         "classic novels", "musical instruments", "ways to save energy at home", "herbs for cooking",
         "inventions of the twentieth century", "birds found in cities", "easy houseplants", "rivers in Europe",
         "jobs that involve working outdoors", "sports played with a ball", "things to do in a park",
         "vegetables that grow fast", "gifts for a new neighbour", "ancient wonders of the world",
         "questions to ask at a first meeting", "snacks for a long hike"]
PHENOMENA = ["thunder", "earthquakes", "hiccups", "ocean waves", "wind", "fog", "the northern lights", "rust",
             "yawning", "snow", "deserts", "jet lag", "goosebumps", "static electricity", "echoes", "ice ages",
             "sunburn", "food to spoil", "leaves to change colour in autumn", "a solar eclipse"]
DEVICES = ["a refrigerator", "a smartphone camera", "a dishwasher", "a thermostat", "a touch screen",
           "a hot air balloon", "a submarine", "a wind turbine", "a smoke detector", "a credit card payment",
           "a compass", "noise-cancelling headphones", "an elevator", "a washing machine", "a search engine",
           "a helicopter", "a printer", "a bicycle gear", "a microwave", "a lock and key"]
SKILLS = ["writing", "memory", "time management", "cooking", "handwriting", "patience", "negotiation",
          "concentration", "drawing", "chess", "typing speed", "posture", "spelling", "mental math",
          "leadership", "storytelling", "critical thinking", "photography", "singing", "budgeting"]
PLACES = ["a rainforest", "a busy market", "the surface of Mars", "an old castle", "a coral reef", "a snowy village",
          "a space station", "a farm in summer", "a night market", "the bottom of the ocean", "a desert oasis",
          "a medieval town", "a big city airport", "a bakery early in the morning", "a mountain cabin"]
CHARACTERS = [("a young inventor", "builds a robot"), ("a brave cat", "gets lost in the city"),
              ("an old fisherman", "finds a message in a bottle"), ("a shy student", "joins the school band"),
              ("a dragon", "is afraid of fire"), ("a robot", "learns to paint"), ("two friends", "get lost in the woods"),
              ("a grandmother", "learns to use a computer"), ("a little bird", "cannot fly yet"),
              ("a detective", "solves a mystery at a bakery"), ("a girl", "finds a secret door in her house"),
              ("a baker", "makes a cake for the king"), ("a squirrel", "prepares for winter"),
              ("a boy", "wants to be an astronaut"), ("a tired dog", "finds a new home")]
CHOICES = ["working from home", "buying a used car", "living in a big city", "learning online", "owning a cat",
           "electric scooters", "renting instead of buying a home", "social media", "a four-day work week",
           "solar power", "homeschooling", "public transport", "self-driving cars", "fast food", "nuclear power"]
RECIPES = ["banana bread", "vegetable soup", "guacamole", "fried rice", "chocolate chip cookies", "lemonade",
           "tomato pasta sauce", "a fruit salad", "hummus", "pizza dough", "french toast", "chili", "potato salad",
           "a grilled cheese sandwich", "apple crumble"]
EMAILS = ["asking a landlord to fix a leaking tap", "thanking a friend for a gift", "asking for a day off",
          "welcoming a new team member", "rescheduling a meeting", "asking a neighbour to keep the noise down",
          "congratulating a colleague on a promotion", "inviting friends to a picnic",
          "apologizing for missing a meeting", "asking a professor for a recommendation letter"]
TRIPS = ["a beach holiday", "a business trip", "a ski trip", "a week in Japan", "a long train journey",
         "a hiking trip in the mountains", "a music festival", "a road trip with kids", "a city break in Rome",
         "a summer camp"]
FIELDS = ["psychology", "astronomy", "philosophy", "architecture", "geology", "linguistics", "statistics",
          "anthropology", "marine biology", "game theory", "quantum physics", "sociology", "archaeology",
          "meteorology", "nutrition"]
AILMENTS = ["hiccups", "goosebumps", "jet lag", "sunburn", "headaches", "cramps", "brain freeze", "motion sickness",
            "wrinkly fingers in water", "allergies"]
HISTORIES = ["the bicycle", "the telephone", "chocolate", "the Olympic Games", "paper money", "coffee", "the internet",
             "jazz", "the printing press", "tea", "photography", "the calendar"]
FUN_FACTS = ["octopuses", "the ocean", "honey", "the human body", "volcanoes", "penguins", "the Sahara", "elephants",
             "lightning", "ants", "the Eiffel Tower", "sharks", "trees", "the Moon", "cats"]
TO_NAME = ["a coffee shop", "a pet goldfish", "a book club", "a bakery", "a hiking group", "a podcast about history",
           "a small garden", "a fantasy kingdom", "a robot", "a lemonade stand"]
NUMBERS = ["three", "five"]
# how users qualify a request; every prompt comes bare and with each of these
STYLES = ["", " Keep it short.", " Please answer in a few sentences.", " Use a friendly tone."]

# (template, {slot: values}); values of a tuple slot fill {a} and {b}
TEMPLATES = [
    ("Explain {x} in simple terms.", {"x": CONCEPTS}),
    ("Can you explain {x} to a ten-year-old?", {"x": CONCEPTS}),
    ("What is {x}?", {"x": FIELDS}),
    ("Give me {n} tips for {x}.", {"n": NUMBERS, "x": ACTIVITIES}),
    ("What are some good ways to get better at {x}?", {"x": ACTIVITIES}),
    ("How do I {x}?", {"x": TASKS}),
    ("Give me step-by-step instructions to {x}.", {"x": TASKS}),
    ("Write a short poem about {x}.", {"x": THINGS}),
    ("Write a haiku about {x}.", {"x": THINGS}),
    ("Write a short description of {x}.", {"x": THINGS + PLACES}),
    ("What is the difference between {a} and {b}?", {"ab": PAIRS}),
    ("What are the health benefits of eating {x}?", {"x": FOODS}),
    ("Is {x} good for you?", {"x": FOODS}),
    ("List five {x}.", {"x": LISTS}),
    ("Tell me about some {x}.", {"x": LISTS}),
    ("What causes {x}?", {"x": PHENOMENA}),
    ("Why do we get {x}?", {"x": AILMENTS}),
    ("How does {x} work?", {"x": DEVICES}),
    ("How can I improve my {x}?", {"x": SKILLS}),
    ("Describe {x} to someone who has never been there.", {"x": PLACES}),
    ("Write a short story about {a} who {b}.", {"ab": CHARACTERS}),
    ("What are the pros and cons of {x}?", {"x": CHOICES}),
    ("Give me a simple recipe for {x}.", {"x": RECIPES}),
    ("Write a polite email {x}.", {"x": EMAILS}),
    ("What should I pack for {x}?", {"x": TRIPS}),
    ("Summarize the history of {x} in a few sentences.", {"x": HISTORIES}),
    ("Tell me a fun fact about {x}.", {"x": FUN_FACTS}),
    ("Suggest a good name for {x}.", {"x": TO_NAME}),
]


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", s.lower()).strip()


def _fill(template: str, slots: dict) -> list[str]:
    names = list(slots)
    out = []
    for values in itertools.product(*(slots[n] for n in names)):
        kw = {}
        for n, v in zip(names, values):
            if n == "ab":
                kw["a"], kw["b"] = v
            else:
                kw[n] = v
        out.append(template.format(**kw))
    return out


def everyday_prompts(seed: int = 0) -> list[str]:
    held = {_norm(p) for p in chat_prompts()}  # the held-out chat prompts: never produced
    prompts = list(dict.fromkeys(p + style for t, s in TEMPLATES for p in _fill(t, s) for style in STYLES))
    prompts = [p[0].upper() + p[1:] for p in prompts if _norm(p) not in held]
    random.Random(seed).shuffle(prompts)
    return prompts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="flexdraft_vllm/data/everyday_prompts.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    prompts = everyday_prompts(args.seed)
    Path(args.out).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    print(f"{len(prompts)} prompts -> {args.out}")


if __name__ == "__main__":
    main()
