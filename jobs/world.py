"""A fictional world for the demo and the compare job's tests: people, places and organisations, generated from a
seed, written as short encyclopedia-style documents, with templated questions whose answers are in exactly one
document.

Nothing in it exists outside ragtune, so no answer can come from a model's pre-training: a system answers a
question only if it learned the fact (fine-tuning) or reads it (retrieval). Names are invented from syllables;
two worlds made with ``exclude=`` share no name, which is how the demo keeps the part the generator learns to
read on apart from the part it is measured on.

Documents (``Doc``): one per person, place and organisation. A person's document states their profession,
birth year and city, and employer; an organisation's its city and founding year; a place's its region. A
document names other entities only as attribute values (a person's document names their employer, never the
other way round), so each question's fact is stated in exactly its gold document.

Questions (``Question``): ``born_city``, ``born_year``, ``profession``, ``employer`` for people; ``org_city``,
``founded`` for organisations; several phrasings each. ``answers`` lists the accepted strings (SQuAD style).

Updates (:func:`update_world`): some people change employer (their document changes: an update of an existing
id) and new people arrive (new documents); the questions that changed answer and the new ones are returned.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "th",
          "sh", "gl", "st")
VOWELS = ("a", "e", "i", "o", "u", "ae", "ai", "ou", "ei")
CODAS = ("", "", "n", "r", "l", "s", "th", "k", "m", "nd")
REGIONS = ("the Northern Reach", "the Amber Coast", "the Low Marches", "the Iron Hills", "the Salt Plains",
           "the Glass Isles")
PROFESSIONS = ("cartographer", "glassblower", "astronomer", "beekeeper", "shipwright", "violinist", "botanist",
               "stonemason", "archivist", "clockmaker", "brewer", "surveyor", "weaver", "chemist", "falconer",
               "engraver", "potter", "navigator", "luthier", "perfumer")
ORG_KINDS = ("Guild", "Works", "Company", "Institute", "Society", "Foundry", "Trading House", "Observatory")
PLACE_KINDS = ("", "", "", " Harbor", " Falls", " Crossing")

PERSON_ATTRIBUTES = ("born_city", "born_year", "profession", "employer")
ORG_ATTRIBUTES = ("org_city", "founded")

QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "born_city": ("Where was {name} born?", "In which city was {name} born?"),
    "born_year": ("In what year was {name} born?", "When was {name} born?"),
    "profession": ("What is the profession of {name}?", "What does {name} do for a living?"),
    "employer": ("Which organisation does {name} work for?", "Who employs {name}?"),
    "org_city": ("Where is the {name} based?", "In which city is the {name} based?"),
    "founded": ("When was the {name} founded?", "In what year was the {name} founded?"),
}

# Sentences of a person's document: each states one or two facts; the document is a few of them in a seeded order.
PERSON_OPENINGS = (
    "{name} is a {profession} born in {born_city} in {born_year}.",
    "{name} (born {born_year} in {born_city}) is a {profession}.",
    "Born in {born_city} in {born_year}, {name} works as a {profession}.",
)
PERSON_EMPLOYER = (
    "{first} works for the {employer}.",
    "Since {since}, {first} has worked for the {employer}.",
    "{first} is employed by the {employer}.",
)
PERSON_EXTRA = (
    "{first} is known among colleagues for careful work.",
    "{first} rarely gives interviews.",
    "In {since}, {first} moved to a house near the river.",
    "{first} keeps a small garden.",
)
ORG_SENTENCES = (
    "The {name} is an organisation based in {org_city}, founded in {founded}.",
    "Founded in {founded}, the {name} is based in {org_city}.",
    "The {name} was founded in {founded} and has its seat in {org_city}.",
)
PLACE_SENTENCES = (
    "{name} is a town in {region}.",
    "{name} lies in {region}, where it is known for its market.",
)


@dataclass(frozen=True)
class Person:
    name: str
    first: str
    born_city: str
    born_year: int
    profession: str
    employer: str
    since: int  # the year the employment started (stated in some documents, never asked)
    style: int  # seeds the document's wording, so it stays the same when nothing about the person changes


@dataclass(frozen=True)
class Organisation:
    name: str
    org_city: str
    founded: int
    style: int


@dataclass(frozen=True)
class Place:
    name: str
    region: str
    style: int


@dataclass(frozen=True)
class Doc:
    """One document of the corpus: ``id`` (stable: the entity's kind and name), ``title``, ``text``."""

    id: str
    title: str
    text: str
    kind: str  # person | organisation | place

    def record(self) -> dict[str, str]:
        """The corpus record ragtune embed reads (JSONL: id, title, text, kind as metadata)."""
        return {"id": self.id, "title": self.title, "text": self.text, "kind": self.kind}


@dataclass(frozen=True)
class Question:
    """A templated question with its accepted answers and gold document."""

    id: str
    question: str
    answers: tuple[str, ...]
    doc_id: str
    entity: str
    attribute: str
    template: int

    def record(self) -> dict[str, object]:
        return {"id": self.id, "question": self.question, "answers": list(self.answers), "doc_id": self.doc_id,
                "entity": self.entity, "attribute": self.attribute}


def doc_id(kind: str, name: str) -> str:
    return f"{kind}:{name.lower().replace(' ', '-')}"


@dataclass
class World:
    """People, organisations and places of one seed, and what is written and asked about them."""

    seed: int
    people: list[Person]
    orgs: list[Organisation]
    places: list[Place]

    def names(self) -> set[str]:
        """Every name in the world (people, their first names, organisations, places)."""
        out = {p.name for p in self.people} | {p.first for p in self.people}
        return out | {o.name for o in self.orgs} | {p.name for p in self.places}

    def docs(self) -> list[Doc]:
        """Every document, people first (in world order), then organisations, then places."""
        return ([person_doc(p) for p in self.people] + [org_doc(o) for o in self.orgs]
                + [place_doc(p) for p in self.places])

    def questions(self, attributes: Iterable[str] | None = None, templates: Sequence[int] | None = None,
                  entities: Iterable[str] | None = None) -> list[Question]:
        """Questions about people and organisations: every attribute x phrasing, or the ones asked for."""
        want = set(attributes) if attributes is not None else None
        names = set(entities) if entities is not None else None
        out: list[Question] = []
        for p in self.people:
            if names is None or p.name in names:
                out += _questions(p.name, "person", {a: _person_answers(p, a) for a in PERSON_ATTRIBUTES}, want,
                                  templates)
        for o in self.orgs:
            if names is None or o.name in names:
                out += _questions(o.name, "organisation", {"org_city": (o.org_city,), "founded": (str(o.founded),)},
                                  want, templates)
        return out

    def person(self, name: str) -> Person:
        return next(p for p in self.people if p.name == name)


def _person_answers(p: Person, attribute: str) -> tuple[str, ...]:
    if attribute == "born_city":
        return (p.born_city,)
    if attribute == "born_year":
        return (str(p.born_year),)
    if attribute == "profession":
        return (p.profession, f"a {p.profession}")
    return (p.employer, f"the {p.employer}")


def _questions(name: str, kind: str, answers: dict[str, tuple[str, ...]], want: set[str] | None,
               templates: Sequence[int] | None) -> list[Question]:
    out = []
    for attribute, accepted in answers.items():
        if want is not None and attribute not in want:
            continue
        forms = QUESTION_TEMPLATES[attribute]
        for t in templates if templates is not None else range(len(forms)):
            qid = f"{doc_id(kind, name)}/{attribute}/{t}"
            out.append(Question(qid, forms[t % len(forms)].format(name=name), accepted, doc_id(kind, name), name,
                                attribute, t % len(forms)))
    return out


def person_doc(p: Person) -> Doc:
    rng = random.Random(p.style)
    facts = {"name": p.name, "first": p.first, "profession": p.profession, "born_city": p.born_city,
             "born_year": p.born_year, "employer": p.employer, "since": p.since}
    sentences = [rng.choice(PERSON_OPENINGS).format(**facts), rng.choice(PERSON_EMPLOYER).format(**facts)]
    if rng.random() < 0.5:
        sentences.insert(rng.randint(1, 2), rng.choice(PERSON_EXTRA).format(**facts))
    return Doc(doc_id("person", p.name), p.name, " ".join(sentences), "person")


def org_doc(o: Organisation) -> Doc:
    rng = random.Random(o.style)
    text = rng.choice(ORG_SENTENCES).format(name=o.name, org_city=o.org_city, founded=o.founded)
    return Doc(doc_id("organisation", o.name), o.name, text, "organisation")


def place_doc(p: Place) -> Doc:
    rng = random.Random(p.style)
    return Doc(doc_id("place", p.name), p.name, rng.choice(PLACE_SENTENCES).format(name=p.name, region=p.region),
               "place")


# --- generation ----------------------------------------------------------------------------------------------------

class NameMaker:
    """Invented names from syllables, never one already taken (by this maker or by ``exclude``)."""

    def __init__(self, rng: random.Random, exclude: Iterable[str] = ()):
        self.rng = rng
        self.taken = {n.lower() for n in exclude}

    def word(self, syllables: int = 2) -> str:
        while True:
            w = "".join(self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + self.rng.choice(CODAS)
                        for _ in range(syllables)).capitalize()
            if 4 <= len(w) <= 10 and w.lower() not in self.taken:
                self.taken.add(w.lower())
                return w


def make_world(seed: int, people: int = 100, orgs: int = 12, places: int = 16,
               exclude: Iterable[str] = ()) -> World:
    """A world of ``people`` people, ``orgs`` organisations and ``places`` places, the same for the same seed.

    ``exclude``: names that must not occur (e.g. ``other.names()``), so that two worlds never share an entity.
    """
    if people < 1 or orgs < 1 or places < 1:
        raise ValueError(f"a world needs at least one of each: people={people}, orgs={orgs}, places={places}")
    rng = random.Random(seed)
    names = NameMaker(rng, exclude)
    place_list = [Place(names.word() + rng.choice(PLACE_KINDS), rng.choice(REGIONS), rng.getrandbits(32))
                  for _ in range(places)]
    org_list = [Organisation(f"{names.word()} {rng.choice(ORG_KINDS)}", rng.choice(place_list).name,
                             rng.randint(1780, 1960), rng.getrandbits(32)) for _ in range(orgs)]
    person_list = [_new_person(rng, names, place_list, org_list) for _ in range(people)]
    return World(seed, person_list, org_list, place_list)


def _new_person(rng: random.Random, names: NameMaker, places: Sequence[Place],
                orgs: Sequence[Organisation]) -> Person:
    first, last = names.word(), names.word()
    year = rng.randint(1930, 1999)
    return Person(f"{first} {last}", first, rng.choice(places).name, year, rng.choice(PROFESSIONS),
                  rng.choice(orgs).name, min(year + rng.randint(20, 40), 2020), rng.getrandbits(32))


def more_people(world: World, seed: int, people: int, exclude: Iterable[str] = ()) -> World:
    """Other people in the same places and organisations: a separate part of ``world`` (no person in common,
    no name of ``exclude``), e.g. for a model to learn reading on without seeing a fact of ``world``'s people."""
    rng = random.Random(seed)
    names = NameMaker(rng, world.names() | set(exclude))
    return World(seed, [_new_person(rng, names, world.places, world.orgs) for _ in range(people)], world.orgs,
                 world.places)


@dataclass
class Update:
    """What changed in a world: the new world, the documents to add or replace, and the questions whose answer
    is new (changed facts and new people)."""

    world: World
    docs: list[Doc]  # changed and new documents (ids of changed ones already exist in the old corpus)
    changed: list[str]  # names of people whose employer changed
    added: list[str]  # names of new people
    questions: list[Question]  # about the changed facts (employer) and every attribute of the new people


def update_world(world: World, seed: int, changed: int = 10, added: int = 10,
                 exclude: Iterable[str] = ()) -> Update:
    """Move ``changed`` people to another employer and add ``added`` new people (names unused in ``world``)."""
    rng = random.Random(seed)
    if changed > len(world.people):
        raise ValueError(f"changed={changed} but the world has {len(world.people)} people")
    movers = set(rng.sample(range(len(world.people)), changed))
    people = []
    for i, p in enumerate(world.people):
        if i in movers:
            others = [o.name for o in world.orgs if o.name != p.employer]
            p = replace(p, employer=rng.choice(others), since=min(max(p.since + 1, 2000 + rng.randint(0, 20)), 2025))
        people.append(p)
    names = NameMaker(rng, world.names() | set(exclude))
    new = [_new_person(rng, names, world.places, world.orgs) for _ in range(added)]
    new_world = World(world.seed, people + new, world.orgs, world.places)
    moved = [world.people[i].name for i in sorted(movers)]
    docs = [person_doc(p) for p in people if p.name in set(moved)] + [person_doc(p) for p in new]
    questions = (new_world.questions(attributes=["employer"], entities=moved)
                 + new_world.questions(entities=[p.name for p in new]))
    return Update(new_world, docs, moved, [p.name for p in new], questions)
