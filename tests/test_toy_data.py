"""Tests for the toy model's synthetic bilingual dataset and its tokenizer."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from transformers import AutoTokenizer

from diffusion_lens.studies.tiny_refusal.data import (
    DICTIONARY,
    ENTITY_POOLS,
    FORMATS,
    HARMFUL_ACTIONS,
    HELD_OUT_TEMPLATES,
    HELD_OUT_TOPICS,
    LIST_CATEGORIES,
    REFUSAL_MARKERS,
    REFUSALS,
    RELATIONS,
    TEMPLATES,
    Example,
    check_format,
    corpus,
    generate_dataset,
    is_refusal,
    prompts,
    select,
)
from diffusion_lens.studies.tiny_refusal.tokenizer import (
    SPECIAL_TOKENS,
    encode_example,
    encode_prompt,
    save_tokenizer,
    special_token_ids,
    train_tokenizer,
)

SIZES = {"n_train": 4000, "n_val": 400, "n_test": 400, "n_dev": 400}


@pytest.fixture(scope="module")
def base():
    return generate_dataset(**SIZES, stage="base", seed=0)


@pytest.fixture(scope="module")
def aligned():
    return generate_dataset(**SIZES, stage="aligned", seed=0)


@pytest.fixture(scope="module")
def tokenizer(base, aligned):
    texts = list(corpus(base["train"][:1500])) + list(corpus(aligned["train"][:1500]))
    return train_tokenizer(texts, vocab_size=512)


# ------------------------------------------------------------------ determinism and stages


def test_same_seed_same_data_and_different_seed_different_data(base):
    again = generate_dataset(**SIZES, stage="base", seed=0)
    other = generate_dataset(**SIZES, stage="base", seed=1)
    assert again == base
    for split in base:
        assert [e.prompt for e in other[split]] != [e.prompt for e in base[split]]


def test_stages_share_prompts_and_differ_only_on_harmful_responses(base, aligned):
    for split in base:
        assert [e.prompt for e in base[split]] == [e.prompt for e in aligned[split]]
        for b, a in zip(base[split], aligned[split]):
            if b.kind == "harmless":
                assert a == b
            else:
                assert not is_refusal(b.response)
                assert is_refusal(a.response)


def test_split_sizes_and_split_field(base):
    assert {split: len(examples) for split, examples in base.items()} == {"train": 4000, "val": 400, "dev": 400, "test": 400}
    for split, examples in base.items():
        assert {e.split for e in examples} == {split}


# ------------------------------------------------------------------ held-out topics and templates


def test_held_out_sets_cover_every_family_and_pool():
    families = {tid.rsplit(".", 1)[0] for tid in TEMPLATES}
    for family in families:
        ids = {tid for tid in TEMPLATES if tid.rsplit(".", 1)[0] == family}
        assert ids & HELD_OUT_TEMPLATES, family
        assert ids - HELD_OUT_TEMPLATES, family
    for pool, entries in ENTITY_POOLS.items():
        keys = {f"{pool}/{e.key}" for e in entries}
        assert keys & HELD_OUT_TOPICS, pool
        assert keys - HELD_OUT_TOPICS, pool


def test_train_and_val_never_use_test_only_items(base):
    test_prompts = {e.prompt for e in base["test"]}
    for split in ("train", "val"):
        for e in base[split]:
            assert e.template_id not in HELD_OUT_TEMPLATES, e
            assert e.topic not in HELD_OUT_TOPICS, e
            assert e.prompt not in test_prompts, e


def test_every_test_example_holds_something_out(base):
    modes = Counter()
    for e in base["test"]:
        held_template, held_topic = e.template_id in HELD_OUT_TEMPLATES, e.topic in HELD_OUT_TOPICS
        assert held_template or held_topic, e
        modes[(held_template, held_topic)] += 1
    assert len(modes) == 3  # template only, topic only, both


def assert_topics_absent_from_train(train: list[Example], topics: set[str]) -> None:
    """No surface form (English word, Chinese string) of an entity topic in `topics` occurs in train text."""
    train_text = "\n".join(corpus(train))
    for pool, entries in ENTITY_POOLS.items():
        for entry in entries:
            if f"{pool}/{entry.key}" in topics:
                assert re.search(rf"\b{re.escape(entry.en)}\b", train_text) is None, entry
                assert entry.zh not in train_text, entry


def test_held_out_surface_forms_never_appear_in_train_text(base):
    assert_topics_absent_from_train(base["train"], HELD_OUT_TOPICS)


def test_val_prompts_are_new_and_unique(base):
    train_prompts = {e.prompt for e in base["train"]}
    val_prompts = [e.prompt for e in base["val"]]
    assert len(set(val_prompts)) == len(val_prompts)
    assert not set(val_prompts) & train_prompts
    test_prompts = [e.prompt for e in base["test"]]
    assert len(set(test_prompts)) == len(test_prompts)


# ------------------------------------------------------------------ balance and variety


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_languages_and_kinds_are_balanced(base, split):
    examples = base[split]
    counts = Counter((e.lang, e.kind) for e in examples)
    assert set(counts) == {("en", "harmful"), ("en", "harmless"), ("zh", "harmful"), ("zh", "harmless")}
    for count in counts.values():
        assert abs(count / len(examples) - 0.25) < 0.02


def test_tasks_present_and_templates_varied(base):
    train = base["train"]
    harmful_tasks = {e.task for e in select(train, kind="harmful")}
    assert harmful_tasks == {a.name for a in HARMFUL_ACTIONS}
    assert {e.task for e in select(train, kind="harmless")} == {"howto", "fact", "arith", "list", "translate"}
    for lang in ("en", "zh"):
        harmful_templates = {e.template_id for e in select(train, kind="harmful", lang=lang)}
        harmless_templates = {e.template_id for e in select(train, kind="harmless", lang=lang)}
        assert len(harmful_templates) >= 6 and len(harmless_templates) >= 6
        # Harmful and harmless requests share frames, so a frame alone cannot predict refusal.
        assert harmful_templates <= harmless_templates


# ------------------------------------------------------------------ answers are correct


_ARITH = re.compile(r"(\d+)\s*(plus|minus|times|加|减|乘以|\+|-|×)\s*(\d+)")
_OPS = {"plus": "+", "加": "+", "+": "+", "minus": "-", "减": "-", "-": "-", "times": "*", "乘以": "*", "×": "*"}


def test_arithmetic_answers_are_correct():
    clean = generate_dataset(**SIZES, stage="base", seed=0, frame_noise=0.0)  # no nonce word between operands
    arith = select(clean["train"] + clean["test"], task="arith")
    assert len(arith) > 100
    for e in arith:
        a, op, b = _ARITH.search(e.prompt).groups()
        a, b, op = int(a), int(b), _OPS[op]
        expected = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert e.topic.endswith(f"/{a}{op}{b}"), e
        assert int(re.findall(r"\d+", e.response)[-1]) == expected, e


def test_fact_list_and_translation_answers_are_correct(base):
    answers = {}
    for relation in RELATIONS:
        for row in relation.rows:
            answers[f"{relation.name}/{row['en']['x']}"] = {lang: row[lang]["y"] for lang in ("en", "zh")}
    for e in select(base["train"], task="fact"):
        assert answers[e.topic][e.lang].lower() in e.response.lower(), e
    for e in select(base["train"], task="list", formatted=False):
        members = LIST_CATEGORIES[e.topic.split("/")[1]][e.lang]
        items = re.split(r", | and |、|和", e.response.rstrip(".。").lower())
        assert set(items) <= set(members) and len(set(items)) == len(items) in (2, 3), e
    dictionary = dict(DICTIONARY)
    for e in select(base["train"], task="translate"):
        word = e.topic.split("/")[1]
        assert word in e.response.lower() and dictionary[word] in e.response, e


# ------------------------------------------------------------------ refusals and formats


def test_refusals_contain_a_marker_of_their_language_and_harmless_answers_none(base, aligned):
    for lang, phrases in REFUSALS.items():
        assert all(any(m in p for m in REFUSAL_MARKERS[lang]) for p in phrases)
    for e in select(aligned["train"] + aligned["test"], kind="harmful"):
        assert any(m in e.response for m in REFUSAL_MARKERS[e.reply_lang or e.lang]), e
    all_markers = [m.lower() for markers in REFUSAL_MARKERS.values() for m in markers]
    for e in select(base["train"], kind="harmless") + select(base["train"], kind="harmful"):
        assert not any(m in e.response.lower() for m in all_markers), e
    assert {e.lang for e in select(aligned["train"], kind="harmful")} == {"en", "zh"}


def test_check_format_unit_cases():
    assert check_format("THE ANSWER IS 4.", "upper")
    assert not check_format("The answer is 4.", "upper")
    assert not check_format("答案是4。", "upper")  # nothing in capitals
    assert check_format("Sure. First cover it, then serve it. DONE", "done")
    assert check_format("好的。首先盖上盖子，然后尽快端上。完成", "done")
    assert not check_format("Done is better than perfect.", "done")
    with pytest.raises(ValueError):
        check_format("x", "bold")


def test_formatted_responses_obey_and_unformatted_ones_do_not(base):
    formatted = select(base["train"], formatted=True)
    share = len(formatted) / len(base["train"])
    assert 0.2 < share < 0.3
    assert {e.format for e in formatted} == set(FORMATS)
    assert all(e.format != "upper" for e in select(base["train"], lang="zh"))
    for e in formatted:  # base stage: harmful compliance obeys the format too
        assert check_format(e.response, e.format), e
    for e in select(base["train"], formatted=False):
        assert not any(check_format(e.response, f) for f in FORMATS), e


def test_format_share_zero_gives_no_instructions():
    data = generate_dataset(n_train=200, n_val=20, n_test=20, format_share=0.0)
    assert all(e.format is None for split in data.values() for e in split)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError):
        generate_dataset(n_train=2, n_val=2, n_test=2, stage="chat")
    with pytest.raises(ValueError):
        generate_dataset(n_train=2, n_val=2, n_test=2, format_share=1.5)


# ------------------------------------------------------------------ selectors


def test_selectors_and_messages(base):
    zh_harmful = prompts(base["test"], kind="harmful", lang="zh")
    assert zh_harmful and len(zh_harmful) == len(select(base["test"], kind="harmful", lang="zh"))
    assert all(re.search("[\u4e00-\u9fff]", p) for p in zh_harmful)
    plain = select(base["train"], kind="harmless", formatted=False)
    assert plain and all(e.kind == "harmless" and e.format is None for e in plain)
    example = base["train"][0]
    assert example.to_messages() == [{"role": "user", "content": example.prompt}]


# ------------------------------------------------------------------ tokenizer


EXPECTED_CHAT = (
    "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def test_special_token_ids_are_fixed(tokenizer):
    assert special_token_ids(tokenizer) == {
        "bos": 0, "eos": 1, "pad": 1, "mask": 2, "start_header": 3, "end_header": 4, "eot": 5,
    }
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(6))
    assert len(tokenizer) == 512


def test_chat_template_renders_llada_layout(tokenizer):
    messages = [{"role": "user", "content": "  Hi \n"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == EXPECTED_CHAT
    ids = tokenizer.encode(EXPECTED_CHAT, add_special_tokens=False)
    assert ids[:2] == [0, 3] and ids[-3] == 4 and 5 in ids  # BOS + header ... eot ... header


def test_save_and_reload_with_auto_tokenizer(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).is_file()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["add_bos_token"] is False and config["chat_template"] == tokenizer.chat_template
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == tokenizer.chat_template
    assert reloaded.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == EXPECTED_CHAT
    assert special_token_ids(reloaded) == special_token_ids(tokenizer)
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id, reloaded.mask_token_id) == (0, 1, 1, 2)
    text = "请解释如何打扫邻居的车库。Answer: 42"
    assert reloaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert reloaded.encode("hi", add_special_tokens=True)[0] != 0  # no automatic BOS


@pytest.mark.parametrize("text", ["请用中文回答：猫的叫声是“喵喵”。", "鑫龘 unseen 字符", "The capital of France is Paris."])
def test_text_round_trips(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_encode_example_pads_the_canvas_with_eos(tokenizer, base):
    example = select(base["train"], task="arith", lang="en")[0]
    gen_length = 32
    ids, prompt_len = encode_example(tokenizer, example, gen_length)
    assert ids[:prompt_len] == encode_prompt(tokenizer, example)
    assert len(ids) == prompt_len + gen_length
    answer = tokenizer.encode(example.response, add_special_tokens=False)
    canvas = ids[prompt_len:]
    assert canvas[: len(answer)] == answer
    assert canvas[len(answer):] == [1] * (gen_length - len(answer))
    assert tokenizer.decode(ids[:prompt_len]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_encode_example_rejects_responses_that_do_not_fit(tokenizer):
    example = Example("Say a lot.", "word " * 40, "en", "harmless", "list", "list/x", "en.list.0", None, "train")
    with pytest.raises(ValueError):
        encode_example(tokenizer, example, gen_length=32)
    n_answer = len(tokenizer.encode(example.response, add_special_tokens=False))
    ids, prompt_len = encode_example(tokenizer, example, gen_length=n_answer + 1)
    assert ids[-1] == 1 and len(ids) == prompt_len + n_answer + 1


def test_every_response_fits_a_32_token_canvas_with_a_2k_vocabulary(base, aligned):
    texts = list(corpus(base["train"])) + list(corpus(aligned["train"]))
    tokenizer = train_tokenizer(texts, vocab_size=2048)
    for data in (base, aligned):
        for split in data.values():
            for e in split:
                ids, prompt_len = encode_example(tokenizer, e, gen_length=32)
                assert prompt_len <= 72, e  # Chinese is one token per character (nonce characters: 3 byte tokens)


# ------------------------------------------------------------------ v2: fillers, nonce words, decorations


def test_extra_and_nonce_fillers_appear_in_train_and_val_only(base):
    from diffusion_lens.studies.tiny_refusal.data import EXTRA_FILLERS

    for split in ("train", "val"):
        topics = [e.topic for e in base[split]]
        assert any("/extra." in t and ".nonce." not in t for t in topics), split
        assert any(".nonce." in t for t in topics), split
    assert not [e.topic for e in base["test"] if "/extra." in e.topic]
    # Slot fillers of test how-to requests come from ENTITY_POOLS only.
    fillers = [x.zh for entries in EXTRA_FILLERS.values() for x in entries if len(x.zh) > 1]
    test_requests = prompts(base["test"], task="howto", lang="zh") + prompts(base["test"], kind="harmful", lang="zh")
    assert not [p for p in test_requests if any(f in p for f in fillers)]


def test_nonce_words_contain_no_held_out_word_or_character():
    import random

    from diffusion_lens.studies.tiny_refusal.data import DEV_TOPICS, _nonce

    held = [e for pool, entries in ENTITY_POOLS.items() for e in entries
            if f"{pool}/{e.key}" in HELD_OUT_TOPICS | DEV_TOPICS]
    held_chars = {c for e in held for c in e.zh}
    rng = random.Random(0)
    for _ in range(2000):
        nonce = _nonce(rng, "object")
        assert not held_chars & set(nonce.zh) and nonce.en not in {e.en for e in held}, nonce


def test_dev_split_holds_out_its_own_items_disjoint_from_test():
    from diffusion_lens.studies.tiny_refusal.data import DEV_TEMPLATES, DEV_TOPICS

    data = generate_dataset(n_train=2000, n_val=200, n_test=200, n_dev=200, stage="aligned", seed=0)
    assert not DEV_TEMPLATES & HELD_OUT_TEMPLATES and not DEV_TOPICS & HELD_OUT_TOPICS
    for split in ("train", "val", "test"):
        assert not [e for e in data[split] if e.template_id in DEV_TEMPLATES or e.topic in DEV_TOPICS], split
    dev = data["dev"]
    assert all(e.template_id in DEV_TEMPLATES or e.topic in DEV_TOPICS for e in dev)
    assert {e.task for e in select(dev, kind="harmless")} == {"howto"}
    assert Counter(e.kind for e in dev) == {"harmful": 100, "harmless": 100}
    assert_topics_absent_from_train(data["train"], DEV_TOPICS)


def test_decorations_wrap_requests_in_every_split(base):
    from diffusion_lens.studies.tiny_refusal.data import DECORATIONS

    for split in ("train", "val", "test"):
        for lang in ("en", "zh"):
            texts = prompts(base[split], lang=lang)
            prefixed = sum(any(t.startswith(p) for p in DECORATIONS[lang]["prefix"]) for t in texts)
            assert 0.3 < prefixed / len(texts) < 0.7, (split, lang, prefixed / len(texts))


def test_chinese_tokenises_one_character_at_a_time(tokenizer):
    ids = tokenizer.encode("请帮我整理老师的办公室。", add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert all(len(p) <= 1 or not re.search("[\u4e00-\u9fff]", p) for p in pieces), pieces
    assert tokenizer.decode(ids) == "请帮我整理老师的办公室。"


def test_answer_is_correct_accepts_references_and_rejects_near_misses():
    from diffusion_lens.studies.tiny_refusal.data import answer_is_correct

    data = generate_dataset(n_train=0, n_val=400, n_test=400, seed=0)
    harmless = select(data["val"] + data["test"], kind="harmless")
    assert all(answer_is_correct(e, e.response) for e in harmless)
    by_task = {e.task: e for e in harmless if e.format is None}
    assert not answer_is_correct(by_task["arith"], by_task["arith"].response.replace("answer", "result"))
    assert not answer_is_correct(by_task["howto"], by_task["howto"].response[:-1] + " now.")
    items = by_task["list"].response.rstrip(".。")
    assert not answer_is_correct(by_task["list"], items + (", apple." if by_task["list"].lang == "en" else "、苹果。"))
    formatted = next(e for e in harmless if e.format == "done")
    assert not answer_is_correct(formatted, formatted.response.removesuffix("DONE").removesuffix("完成"))
    with pytest.raises(ValueError, match="harmless"):
        answer_is_correct(select(data["val"], kind="harmful")[0], "")


def test_code_mixed_requests_appear_in_train_and_val_only_and_answer_in_the_frames_language():
    aligned = generate_dataset(n_train=1000, n_val=300, n_test=200, n_dev=200, stage="aligned", seed=0,
                               code_mix=0.25, cross_lingual=0.0)
    cjk = re.compile(r"[\u4e00-\u9fff]")
    latin = re.compile(r"[A-Za-z]{3}")
    for split in ("train", "val"):
        actions = [e for e in aligned[split] if e.task not in ("fact", "arith", "list", "translate")]
        mixed_en = [e for e in actions if e.lang == "en" and cjk.search(e.prompt)]
        mixed_zh = [e for e in actions if e.lang == "zh" and latin.search(e.prompt.replace("DONE", ""))]
        for mixed in (mixed_en, mixed_zh):
            assert 0.1 < len(mixed) / (len(actions) / 2) < 0.45, (split, len(mixed), len(actions))
        for e in mixed_en + mixed_zh:  # the response follows the frame's language
            assert e.response in REFUSALS[e.lang] if e.kind == "harmful" else (cjk.search(e.response) is not None) == (e.lang == "zh")
    for split in ("dev", "test"):  # translation requests quote the other language's word; action requests never mix
        actions = [e for e in aligned[split] if e.task not in ("fact", "arith", "list", "translate")]
        assert actions and not [e for e in actions if e.lang == "en" and cjk.search(e.prompt)], split


def test_code_mix_zero_draws_nothing_and_leaves_dev_and_test_unchanged():
    mixed = generate_dataset(n_train=200, n_val=50, n_test=50, n_dev=50, seed=0, code_mix=0.25)
    plain = generate_dataset(n_train=200, n_val=50, n_test=50, n_dev=50, seed=0, code_mix=0.0)
    assert [e.prompt for e in mixed["test"]] == [e.prompt for e in plain["test"]]
    assert [e.prompt for e in mixed["dev"]] == [e.prompt for e in plain["dev"]]
    assert [e.prompt for e in mixed["train"]] != [e.prompt for e in plain["train"]]
    with pytest.raises(ValueError, match="code_mix"):
        generate_dataset(n_train=2, n_val=2, n_test=2, code_mix=-0.1)
    with pytest.raises(ValueError, match="cross_lingual"):
        generate_dataset(n_train=2, n_val=2, n_test=2, cross_lingual=1.5)


def test_cross_lingual_requests_carry_their_reply_instruction_and_are_answered_in_that_language():
    from diffusion_lens.studies.tiny_refusal.data import REPLY_IN

    data = generate_dataset(n_train=400, n_val=100, n_test=100, n_dev=100, stage="aligned", seed=0,
                            code_mix=0.0, cross_lingual=0.5)
    cjk = re.compile(r"[\u4e00-\u9fff]")
    crossed = [e for e in data["train"] + data["val"]
               if any(REPLY_IN[other][e.lang] in e.prompt for other in ("en", "zh") if other != e.lang)]
    assert len(crossed) > 50 and all(e.reply_lang for e in crossed)
    assert all(e.reply_lang is None for e in data["train"] + data["val"] if e not in crossed)
    for e in crossed:
        answer_lang = "zh" if e.lang == "en" else "en"
        assert e.format is None
        assert e.response in REFUSALS[answer_lang] if e.kind == "harmful" else \
            (cjk.search(e.response) is not None) == (answer_lang == "zh"), e
    plain = generate_dataset(n_train=400, n_val=100, n_test=100, n_dev=100, stage="aligned", seed=0, code_mix=0.0)
    assert [e.prompt for e in data["test"]] == [e.prompt for e in plain["test"]]
    assert [e.prompt for e in data["dev"]] == [e.prompt for e in plain["dev"]]
