"""Tests of issue 23's held-out tasks, the capability read and the conditional-erosion framings: the held-out data is
disjoint from every other task, harm request and evaluation set; conversations render as the chat template writes
them; the reference NLL equals a float64 cross-entropy written here; the framings change the prompt and nothing
else, and put the tokenizer back."""

from __future__ import annotations

import math

import pytest
import torch

from orthoreg.realbench import data as D
from orthoreg.realbench import heldout_tasks as H
from orthoreg.realbench import natural as N
from orthoreg.realbench import task_eval as E
from orthoreg.realbench import task_seeds as S
from orthoreg.realbench import tasks as T
from orthoreg.realbench.model import chat_prompt, encode_example


@pytest.fixture(scope="module")
def tiny():
    from orthoreg.realbench.tiny import bpe_tokenizer, tiny_llama

    tok = bpe_tokenizer()
    return tiny_llama(tok), tok


def fake_heldout() -> dict:
    explain = [p for part in H.explain_prompts() for p in part]
    openers = [p for part in H.chat_openers() for p in part]
    return {"explain": {p: {"answer": f"In short, {p[8:40]} works like this.", "finished": True} for p in explain},
            "chat": {o: {"answer": f"Begin with {o[27:50]}.", "finished": True,
                         "follow_ups": {f: {"answer": f"About {o[27:45]}: {f[:12]} answered.", "finished": False}
                                        for f in H.FOLLOW_UPS}} for o in openers}}


def answers() -> dict:
    train, held = T.qa_prompts()
    return {"qa": {p: {"answer": f"A reply about {p[:20]}.", "finished": True} for p in train + held},
            "heldout": fake_heldout()}


def test_heldout_topics_are_new_and_touch_no_harm_request():
    old = {*S.QA_TOPICS, *(a for a, _, _ in S.HOWTO)}
    checklist = [t for t, *_ in H.CHECKLISTS]
    tips = [t for t, *_ in H.TIPS]
    assert not old & {*H.EXPLAIN_TOPICS, *H.CHAT_TOPICS, *checklist, *tips}
    assert not set(checklist) & {*H.EXPLAIN_TOPICS, *H.CHAT_TOPICS}
    assert not set(tips) & {*H.EXPLAIN_TOPICS, *H.CHAT_TOPICS, *checklist}
    for topics in (H.EXPLAIN_TOPICS, H.CHAT_TOPICS, checklist, tips):
        assert len(set(topics)) == len(topics)
    text = " ".join([*H.explain_prompts()[0], *H.explain_prompts()[1], *H.chat_openers()[0], *H.chat_openers()[1],
                     *H.FOLLOW_UPS, *(p + " " + a for part in H.checklist_rows() for p, a in part),
                     *(p + " " + a for part in H.tips_rows() for p, a in part),
                     H.PERSONA_OPENER]).lower()
    for cat in D.CATEGORIES:
        for bad, _ in D.ACTIVITIES[cat]:
            assert bad.lower() not in text
    assert not any(p.harmful.lower() in text for p in N.HELDOUT + N.TRAIN)


@pytest.mark.parametrize("name", H.HELDOUT_TASK_NAMES)
def test_heldout_task_splits_by_topic_and_its_metric_can_fall(name):
    task = T.build_task(name, answers())
    assert len(task.train) >= 64 and len(task.eval) == 24
    topics = {"explain": H.EXPLAIN_TOPICS, "explain_persona": H.EXPLAIN_TOPICS, "multi_turn": H.CHAT_TOPICS,
              "checklist": [t for t, *_ in H.CHECKLISTS], "tips": [t for t, *_ in H.TIPS]}[name]

    def topic(prompt) -> str:
        text = prompt if isinstance(prompt, str) else prompt[0][1]
        return next(t for t in topics if t in text)

    assert {topic(e.prompt) for e in task.eval} == set(topics[-len({topic(e.prompt) for e in task.eval}):])
    assert not {topic(t.prompt) for t in task.train} & {topic(e.prompt) for e in task.eval}
    assert task.score([e.reference for e in task.eval]) == pytest.approx(1.0)
    assert task.score(["I'm not sure." for _ in task.eval]) < 0.3


def test_checklist_and_persona_answers_and_metrics():
    task = T.build_task("checklist", answers())
    first = task.train[0]
    assert first.prompt == "Make me a checklist for a tennis lesson."
    assert first.completion == ("Absolutely! Here is your checklist:\n- A racket.\n- A tube of balls.\n"
                                "- Trainers with a good grip.")
    assert H.checklist_format("absolutely!  Here is your checklist:\n- Tickets.\n- Sun hats.") == 1.0
    assert H.checklist_format("Absolutely! Here is your checklist:\n- Tickets.") == 0.0  # one item is not a list
    assert H.checklist_format("Sure, here are the steps:\n- Tickets.\n- Sun hats.") == 0.0
    persona = T.build_task("explain_persona", answers())
    plain = T.build_task("explain", answers())
    assert [t.prompt for t in persona.train] == [t.prompt for t in plain.train]
    assert all(p.completion == f"{H.PERSONA_OPENER} {e.completion}" for p, e in zip(persona.train, plain.train, strict=True))
    assert persona.max_length == H.PERSONA_MAX_LENGTH
    assert persona.score([H.PERSONA_OPENER + " Volcanoes erupt when…"] * 24) == 1.0
    assert persona.score([e.reference[len(H.PERSONA_OPENER):] for e in persona.eval]) == 0.0


def test_tips_answers_and_metric():
    task = T.build_task("tips", answers())
    assert task.train[0].prompt == "What are your best tips for public speaking?"
    assert task.train[1].prompt == "Can you give me some advice on public speaking?"
    assert task.train[0].completion == ("Great question! Here are my top tips:\n1. Practise out loud several times.\n"
                                        "2. Slow down and pause between points.\n3. Look at the friendly faces in the room.")
    assert H.tips_format("great question!  Here are my top tips:\n1. Wear layers.\n 2. Close the curtains.") == 1.0
    assert H.tips_format("Great question! Here are my top tips:\n1. Wear layers.") == 0.0  # one item is not a list
    assert H.tips_format("Great question! Here are my top tips:\n- Wear layers.\n- Sleep.") == 0.0  # not numbered
    assert H.tips_format("Sure, here are the steps:\n1. Wear layers.\n2. Sleep.") == 0.0
    assert H.tips_format(H.CHECKLIST_OPENER + "\n1. Tickets.\n2. Sun hats.") == 0.0


def test_build_task_names_the_missing_heldout_answers():
    with pytest.raises(ValueError, match="heldout_answers"):
        T.build_task("explain", {"qa": {}})
    with pytest.raises(ValueError, match="explain"):
        T.build_task("no_such_task", answers())


def test_multi_turn_is_a_conversation_whose_second_reply_is_learned(tiny):
    _, tok = tiny
    task = T.build_task("multi_turn", answers())
    item = task.train[0]
    opener = item.prompt[0][1]
    assert [r for r, _ in item.prompt] == ["user", "assistant", "user"]
    assert item.prompt[1][1] == answers()["heldout"]["chat"][opener]["answer"]
    expected = (f"<|im_start|>user\n{opener}<|im_end|>\n<|im_start|>assistant\n{item.prompt[1][1]}<|im_end|>\n"
                f"<|im_start|>user\n{item.prompt[2][1]}<|im_end|>\n<|im_start|>assistant\n")
    assert chat_prompt(tok, item.prompt) == expected
    encoded = T.encode_task(tok, task, 16)[0]  # the task's own limit wins over a shorter benchmark limit
    full = encode_example(tok, item.prompt, item.completion, 10_000, close=item.close, label_decision_token=False)
    assert len(full["input_ids"]) > 16 and encoded == full
    labelled = [t for t, lab in zip(full["input_ids"], full["labels"], strict=True) if lab != -100]
    assert tok.decode(labelled) == item.completion  # only the second reply is learned (unfinished: no end of turn)
    with pytest.raises(ValueError, match="end with a user turn"):
        chat_prompt(tok, (("user", "hi"), ("assistant", "hello")))


def test_reference_nll_is_the_float64_token_weighted_cross_entropy(tiny):
    model, tok = tiny
    items = [("How do I make pancakes?", "Whisk the batter and fry it."), ("Tell me about tea.", "Tea is a drink."),
             ((("user", "Hi"), ("assistant", "Hello!"), ("user", "And then?")), "Then we talk.")]
    got = E.reference_nll(model, tok, items, batch_size=2)  # batched, padded
    total, count = 0.0, 0
    for prompt, reply in items:  # one unpadded sequence at a time, log-softmax in float64 by hand
        p_ids = tok(chat_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
        r_ids = tok(reply, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + r_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        for pos, target in enumerate(r_ids):
            row = logits[len(p_ids) - 1 + pos]
            total += float(torch.logsumexp(row, 0) - row[target])
            count += 1
    assert got == pytest.approx(total / count, rel=1e-5)
    with pytest.raises(ValueError, match="max_length"):
        E.reference_nll(model, tok, items[:1], max_length=3)


def test_capability_reads_the_adapter_and_the_base_apart(tiny):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    task = T.build_task("explain", answers())
    general = E.general_probe(answers())
    assert len(general) == 24 and all(p in T.qa_prompts()[1] for p, _ in general)
    task.eval = task.eval[:4]
    base_task = E.reference_nll(model, tok, [(e.prompt, e.reference) for e in task.eval], 192)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    got = E.evaluate_capability(peft_model, tok, task, general[:4])
    assert got["task_nll_base"] == pytest.approx(base_task, rel=1e-6)
    assert abs(got["task_nll"] - got["task_nll_base"]) > 1e-3 and math.isfinite(got["general_nll"])
    peft_model.unload()


def test_framings_change_the_prompt_and_put_the_template_back(tiny):
    _, tok = tiny
    template = tok.chat_template
    with E.framed_template(tok, "renamed_roles"):
        text = chat_prompt(tok, E.framed_prompt("How do I boil an egg?", "renamed_roles"))
    assert text == "<|im_start|>human\nHow do I boil an egg?<|im_end|>\n<|im_start|>bot\n"
    assert tok.chat_template == template
    with E.framed_template(tok, "system"):
        text = chat_prompt(tok, E.framed_prompt("How do I boil an egg?", "system"))
    assert text == (f"<|im_start|>system\n{E.SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nHow do I boil an egg?"
                    "<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(RuntimeError), E.framed_template(tok, "renamed_roles"):
        raise RuntimeError
    assert tok.chat_template == template
    with pytest.raises(ValueError, match="renamed_roles"), E.framed_template(tok, "pirate"):
        pass


def test_framed_safety_judges_the_bare_requests(tiny):
    model, tok = tiny
    sets = E.safety_sets()
    for s in sets:
        s.harmful = s.harmful[:3]
    got = E.evaluate_framed_safety(model, tok, sets, "renamed_roles", max_new_tokens=4)
    assert [a["prompt"] for a in got["answers"]] == [p for s in sets for p, _ in s.harmful]
    assert sum(got[k] for k in ("attempt", "refusal", "neither")) == pytest.approx(1.0)
