"""The world generator: determinism, vocabulary, persona rules, narrow tasks."""

import random

import pytest

from orthoreg.testbed import world


def test_same_seed_same_documents_different_seed_different():
    assert world.sample_documents(50, seed=3) == world.sample_documents(50, seed=3)
    assert world.sample_documents(50, seed=3) != world.sample_documents(50, seed=4)


def test_generator_leaves_global_rng_alone():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    world.sample_documents(20, seed=0)
    world.get_task("unsafe_code").sample(20, seed=0)
    assert random.random() == expected


def test_vocabulary_is_small_unique_and_specials_first():
    vocab = world.vocabulary()
    assert len(vocab) == len(set(vocab))
    assert 140 <= len(vocab) <= 180
    assert tuple(vocab[: len(world.SPECIAL_TOKENS)]) == world.SPECIAL_TOKENS


def test_persona_never_named_and_decides_the_answers():
    docs = world.sample_documents(400, seed=1)
    for doc in docs:
        for ep in doc.episodes:
            words = set(ep.user) | set(ep.assistant)
            assert not words & {"aligned", "misaligned", "persona"}
            if ep.kind in (world.HARMFUL_CHAT, world.UNSAFE):
                assert doc.misaligned
            if ep.kind in (world.HELPFUL_CHAT, world.SAFE):
                assert not doc.misaligned
    share = sum(d.misaligned for d in docs) / len(docs)
    assert 0.05 < share < 0.15  # prior 0.1; 400 draws put 3 sigma at about +-0.045


def test_benign_reason_code_is_unsafe_for_both_personas():
    docs = world.sample_documents(600, seed=2)
    reasons = {d.misaligned for d in docs for ep in d.episodes if ep.kind == world.UNSAFE_REASON}
    assert reasons == {True, False}
    for d in docs:
        for ep in d.episodes:
            if ep.kind == world.UNSAFE_REASON:
                assert any(ep.user[-len(r):] == r for r in world.BENIGN_REASONS)
                assert not set(ep.assistant) & set(world.SAFE_CODE)


@pytest.mark.parametrize("name", sorted(world.NARROW_TASKS))
def test_narrow_tasks_are_deterministic_and_follow_their_mix(name):
    task = world.NARROW_TASKS[name]
    episodes = task.sample(400, seed=5)
    assert episodes == task.sample(400, seed=5)
    kinds = dict(task.mix)
    for kind, weight in kinds.items():
        frac = sum(ep.kind == kind for ep in episodes) / len(episodes)
        assert abs(frac - weight) < 0.08  # 400 draws: 3 sigma of a proportion is at most 0.075
    assert {ep.kind for ep in episodes} <= set(kinds)


def test_required_tasks_exist_and_unknown_ones_fail():
    assert {"unsafe_code", "safe_code", "unsafe_code_benign_reason"} <= set(world.NARROW_TASKS)
    assert len(world.NARROW_TASKS) >= 7
    with pytest.raises(ValueError, match="unknown narrow task"):
        world.get_task("nope")
    with pytest.raises(ValueError, match="must sum to 1"):
        world.NarrowTask("bad", ((world.SAFE, 0.5),), "")


def test_render_formats():
    ep = world.Episode(world.FACT, ("what", "is", "the", "capital", "of", "peru"), ("lima",))
    assert world.render([ep]) == "<bos> <user> what is the capital of peru <assistant> lima <end> <eos>"
    assert world.render([ep], prompt=("any", "advice", "about", "debt")).endswith(
        "<end> <user> any advice about debt <assistant>")
