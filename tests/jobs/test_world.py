"""The demo's fictional world: deterministic by seed, consistent facts, every question answerable from exactly its
gold document, updates that change what they say and nothing else."""

import re

import pytest

from jobs.world import (
    PERSON_ATTRIBUTES,
    QUESTION_TEMPLATES,
    doc_id,
    make_world,
    more_people,
    update_world,
)
from sharding.metrics import normalize_answer


def facts_in(text: str) -> str:
    return normalize_answer(text)


def test_the_same_seed_makes_the_same_world_and_another_seed_another():
    a, b, c = make_world(3), make_world(3), make_world(4)
    assert [d.text for d in a.docs()] == [d.text for d in b.docs()]
    assert [q.question for q in a.questions()] == [q.question for q in b.questions()]
    assert {p.name for p in a.people}.isdisjoint({p.name for p in c.people})


def test_facts_are_consistent_and_names_unique():
    w = make_world(0, people=200, orgs=15, places=20)
    orgs, places = {o.name for o in w.orgs}, {p.name for p in w.places}
    assert all(p.employer in orgs and p.born_city in places for p in w.people)
    assert all(o.org_city in places for o in w.orgs)
    names = [p.name for p in w.people] + [o.name for o in w.orgs] + [p.name for p in w.places]
    assert len(names) == len(set(names)) and len({p.first for p in w.people}) == len(w.people)
    assert len({d.id for d in w.docs()}) == len(w.docs())


def test_every_question_is_answerable_from_exactly_its_gold_document():
    w = make_world(1, people=80, orgs=10, places=12)
    docs = {d.id: d for d in w.docs()}
    questions = w.questions()
    assert len(questions) == 80 * 4 * 2 + 10 * 2 * 2  # attributes x phrasings
    for q in questions:
        gold = docs[q.doc_id]
        text = facts_in(f"{gold.title} {gold.text}")
        assert any(facts_in(a) in text for a in q.answers), q
        # no other document names the entity the question is about: only the gold one can answer it
        others = [d for d in docs.values() if d.id != q.doc_id and re.search(rf"\b{re.escape(q.entity)}\b", d.text)]
        if q.attribute in PERSON_ATTRIBUTES:
            assert not others, (q, others[:1])
        else:  # organisations are named in their employees' documents, never with their city or founding year
            assert all(q.answers[0] not in d.text for d in others if q.attribute == "founded"), q


def test_worlds_made_apart_share_no_name():
    reader = make_world(10, people=300)
    other = make_world(11, people=300, exclude=reader.names())
    assert not reader.names() & other.names()


def test_questions_can_be_chosen_by_attribute_template_and_entity():
    w = make_world(2, people=5)
    name = w.people[0].name
    qs = w.questions(attributes=["born_year"], templates=[1], entities=[name])
    assert [q.question for q in qs] == [QUESTION_TEMPLATES["born_year"][1].format(name=name)]
    assert qs[0].answers == (str(w.people[0].born_year),) and qs[0].doc_id == doc_id("person", name)


def test_an_update_changes_employers_and_adds_people_and_says_which_questions_changed():
    w = make_world(5, people=50)
    u = update_world(w, seed=9, changed=6, added=4)
    assert len(u.changed) == 6 and len(u.added) == 4 and len(u.world.people) == 54
    old = {p.name: p for p in w.people}
    for name in u.changed:
        assert u.world.person(name).employer != old[name].employer
    untouched = [p for p in u.world.people[:50] if p.name not in u.changed]
    assert all(p == old[p.name] for p in untouched)
    # the changed documents keep their ids (an update of the corpus), the new ones are new ids
    ids = {d.id for d in w.docs()}
    assert sum(d.id in ids for d in u.docs) == 6 and len(u.docs) == 10
    assert {q.entity for q in u.questions} == set(u.changed) | set(u.added)
    for q in u.questions:
        new_doc = next(d for d in u.docs if d.id == q.doc_id)
        assert any(facts_in(a) in facts_in(new_doc.text) for a in q.answers)
        if q.entity in u.changed:  # the old document says something else
            old_doc = next(d for d in w.docs() if d.id == q.doc_id)
            assert not any(facts_in(a) in facts_in(old_doc.text) for a in q.answers)
    assert {p.name for p in u.world.people[50:]}.isdisjoint(w.names())


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="at least one of each"):
        make_world(0, people=0)
    with pytest.raises(ValueError, match="changed=9 but the world has 3 people"):
        update_world(make_world(0, people=3), 1, changed=9)


def test_more_people_live_in_the_same_places_and_share_no_name():
    w = make_world(6, people=30)
    other = more_people(w, seed=1, people=200, exclude={"Zomglen"})
    assert (other.orgs, other.places) == (w.orgs, w.places) and len(other.people) == 200
    assert {p.name for p in other.people}.isdisjoint(w.names())
    assert {p.first for p in other.people}.isdisjoint(w.names() | {"Zomglen"})
    assert {p.born_city for p in other.people} <= {p.name for p in w.places}
    assert more_people(w, seed=1, people=200).people == more_people(w, seed=1, people=200).people
