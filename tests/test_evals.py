"""Issue 5, evaluations: refusal judge on crafted strings, instruction checks, scores, prompt loaders
(local files written here; the hub is never contacted) and plots."""

import json

import pytest
import torch

from diffusion_lens import prompts as P
from diffusion_lens.evals import (
    EXTENDED_MARKERS,
    check_instruction,
    count_left_masked,
    instruction_following,
    is_refusal,
    kl_divergence,
    log_odds,
    normalize_text,
    refusal_rate,
)

REFUSAL_TABLE = [
    ("I'm sorry, but I can't help with that.", True),
    ("I\u2019m sorry, but I can\u2019t help with that.", True),  # curly apostrophes
    ("I  AM\n\nSORRY to say this", True),  # case and whitespace
    ("**I cannot** do this.", True),  # markdown emphasis
    ("As an AI developed to help, ...", True),
    ("Well... I am unable to comply.", True),  # marker anywhere in the response
    ("", True),  # empty response counts as refusal
    ("   \n\t ", True),
    ("抱歉，我不能帮助你。", True),
    ("我无法提供这些信息。", True),
    ("对不起", True),
    ("Sure! Here is a recipe for bread.", False),
    ("I can help: first, preheat the oven.", False),
    ("The cannon fired.", False),
    ("好的，这是答案。", False),
]


@pytest.mark.parametrize("text,expected", REFUSAL_TABLE)
def test_refusal_markers_on_crafted_strings(text, expected):
    assert is_refusal(text) is expected


def test_refusal_rate_normalisation_and_custom_markers():
    assert normalize_text("I\u2019M  *Sorry*,\n\tfriend ") == "i'm sorry, friend"
    texts = [t for t, _ in REFUSAL_TABLE]
    assert refusal_rate(texts) == sum(e for _, e in REFUSAL_TABLE) / len(REFUSAL_TABLE)
    assert is_refusal("That would be illegal.", markers=EXTENDED_MARKERS)
    assert not is_refusal("That would be illegal.")
    with pytest.raises(TypeError, match="list of strings"):
        refusal_rate("I cannot")
    with pytest.raises(ValueError, match="empty"):
        refusal_rate([])
    with pytest.raises(ValueError, match="non-empty"):
        is_refusal("x", markers=[""])


INSTRUCTION_TABLE = [
    ("keywords:forbidden_words", "I like apples.", {"forbidden_words": ["pear", "plum"]}, True),
    ("keywords:forbidden_words", "I like Pears and plums.", {"forbidden_words": ["plums"]}, False),
    ("keywords:existence", "Red, Green and blue", {"keywords": ["green", "BLUE"]}, True),
    ("keywords:existence", "Red only", {"keywords": ["green"]}, False),
    ("keywords:frequency", "cat dog cat cat", {"keyword": "cat", "frequency": 3, "relation": "at least"}, True),
    ("keywords:frequency", "cat dog cat cat", {"keyword": "cat", "frequency": 3, "relation": "less than"}, False),
    ("keywords:letter_frequency", "banana", {"letter": "a", "let_frequency": 3, "let_relation": "at least"}, True),
    ("keywords:letter_frequency", "bAnAnA", {"letter": "a", "let_frequency": 3, "let_relation": "less than"}, False),
    ("change_case:capital_word_frequency", "THE cat IS HERE", {"capital_frequency": 3, "capital_relation": "at least"}, True),
    ("change_case:capital_word_frequency", "THE cat", {"capital_frequency": 1, "capital_relation": "less than"}, False),
    ("change_case:english_capital", "ALL CAPS HERE!", {}, True),
    ("change_case:english_capital", "Not all caps", {}, False),
    ("change_case:english_lowercase", "all lower here.", {}, True),
    ("change_case:english_lowercase", "Mixed case", {}, False),
    ("detectable_format:title", "<<My Poem>>\nRoses are red", {}, True),
    ("detectable_format:title", "<< >> no title", {}, False),
    ("detectable_format:json_format", '```json\n{"a": [1, 2]}\n```', {}, True),
    ("detectable_format:json_format", "{'a': 1}", {}, False),
    ("detectable_format:number_bullet_lists", "* one\n* two\n- three", {"num_bullets": 3}, True),
    ("detectable_format:number_bullet_lists", "* one\n* two", {"num_bullets": 3}, False),
    ("detectable_format:number_highlighted_sections", "*one* and **two**", {"num_highlights": 2}, True),
    ("detectable_format:number_highlighted_sections", "*one* only", {"num_highlights": 2}, False),
    ("length_constraints:number_sentences", "One. Two! Three? Dr. Who is 3.5 feet.", {"num_sentences": 5, "relation": "less than"}, True),
    ("length_constraints:number_sentences", "One. Two.", {"num_sentences": 3, "relation": "at least"}, False),
    ("punctuation:no_comma", "No commas here.", {}, True),
    ("punctuation:no_comma", "Yes, here.", {}, False),
    ("punctuation:no_comma", "中文，逗号", {}, False),
    ("startend:end_checker", "Thanks. Any other questions?  ", {"end_phrase": "any other questions?"}, True),
    ("startend:end_checker", "Any other questions? Bye", {"end_phrase": "Any other questions?"}, False),
]


@pytest.mark.parametrize("iid,response,kwargs,expected", INSTRUCTION_TABLE)
def test_instruction_checks(iid, response, kwargs, expected):
    assert check_instruction(iid, response, **kwargs) is expected


def test_instruction_following_scores_and_loose_mode():
    records = [
        {"instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"], "kwargs": [{}, {}]},
        {"instruction_id_list": ["startend:end_checker", "unknown:thing"], "kwargs": [{"end_phrase": "done"}, {}]},
    ]
    scores = instruction_following(["all lower no comma", "Sure, done"], records)
    assert scores["prompt_level"] == 1.0 and scores["instruction_level"] == 1.0 and scores["n_skipped"] == 1
    scores = instruction_following(["all lower, comma", "Sure, done"], records)
    assert scores["prompt_level"] == 0.5 and scores["instruction_level"] == pytest.approx(2 / 3)
    assert scores["by_instruction"] == {"punctuation:no_comma": [0, 1], "change_case:english_lowercase": [1, 1],
                                        "startend:end_checker": [1, 1]}
    assert check_instruction("detectable_format:json_format", 'Here:\n{"a": 1}\nThanks', loose=True)
    assert not check_instruction("detectable_format:json_format", 'Here:\n{"a": 1}\nThanks')
    with pytest.raises(KeyError, match="Unsupported instruction"):
        check_instruction("language:response_language", "hi")
    with pytest.raises(KeyError):
        instruction_following(["x", "y"], records, unsupported="raise")
    with pytest.raises(ValueError, match="relation"):
        check_instruction("keywords:frequency", "a", keyword="a", frequency=1, relation="more than")
    with pytest.raises(TypeError, match="wrong keyword"):
        check_instruction("punctuation:no_comma", "a", foo=1)
    with pytest.raises(ValueError, match="pair up"):
        instruction_following(["x"], records)


def test_scores_are_exact():
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(log_odds(logits, torch.tensor([0, 1])), torch.tensor([0.0], dtype=torch.float64))
    torch.testing.assert_close(log_odds(logits, torch.tensor([2])), torch.tensor([0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    expected = 0.5 * torch.log(torch.tensor(0.5 / 0.9, dtype=torch.float64)) + 0.5 * torch.log(torch.tensor(0.5 / 0.1, dtype=torch.float64))
    torch.testing.assert_close(kl_divergence(p.log(), q.log())[0], expected)
    seqs = torch.tensor([[1, 310, 310, 5], [310, 2, 3, 4]])
    assert count_left_masked(seqs, 310).tolist() == [2, 1]
    assert count_left_masked(seqs, 310, response_start=2).tolist() == [1, 0]
    with pytest.raises(TypeError, match="integer tensor"):
        count_left_masked(seqs.float(), 310)


# ----------------------------------------------------------------------------- prompt loaders
def test_loaders_read_local_files_with_hub_or_normalised_columns(tmp_path):
    csv_path = tmp_path / "jbb.csv"
    csv_path.write_text("Index,Goal,Category\n0,Write a bad thing,Harassment\n1,Do another,Malware\n", encoding="utf-8")
    jbb = P.load_jailbreakbench(path=csv_path)
    assert jbb.column_names == ["prompt", "category", "source", "id"]
    assert jbb["prompt"] == ["Write a bad thing", "Do another"] and jbb["category"] == ["Harassment", "Malware"]
    adv = tmp_path / "advbench.csv"
    adv.write_text("goal,target\nHow to x,Sure\nHow to y,Sure\nHow to z,Sure\n", encoding="utf-8")
    assert P.load_advbench(path=adv, limit=2)["prompt"] == ["How to x", "How to y"]
    alpaca = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": "Give three tips.", "input": "", "output": "..."},
            {"instruction": "Translate", "input": "hola", "output": "hello"},
            {"instruction": "Name a colour.", "input": "", "output": "red"}]
    alpaca.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    harmless = P.load_alpaca(path=alpaca)
    assert harmless["prompt"] == ["Give three tips.", "Name a colour."]  # non-empty input dropped
    hb = tmp_path / "harmbench.json"
    hb.write_text(json.dumps([{"prompt": "Bad A", "category": "chemical"}]), encoding="utf-8")
    assert P.load_harmbench(path=hb)["category"] == ["chemical"]


def test_ifeval_loader_and_records(tmp_path):
    path = tmp_path / "ifeval.jsonl"
    row = {"key": 1000, "prompt": "Write without commas.", "instruction_id_list": ["punctuation:no_comma", "keywords:existence"],
           "kwargs": [{"keywords": None}, {"keywords": ["sun"]}]}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    ds = P.load_ifeval(path=path)
    assert ds["id"] == ["1000"] and ds["instruction_id_list"] == [["punctuation:no_comma", "keywords:existence"]]
    recs = P.ifeval_records(ds)
    assert recs[0]["kwargs"] == [{}, {"keywords": ["sun"]}]
    assert instruction_following(["The sun is up"], recs)["prompt_level"] == 1.0


def test_offline_errors_are_clear(tmp_path):
    with pytest.raises(OSError, match="Offline.*path="):
        P.load_advbench(offline=True)
    with pytest.raises(KeyError, match="Unknown prompt set"):
        P.load_prompts("nope", offline=True)
    with pytest.raises(FileNotFoundError):
        P.load_alpaca(path=tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected one of"):
        P.load_alpaca(path=bad)
    with pytest.raises(ValueError, match="Unsupported prompt file type"):
        P.load_alpaca(path=tmp_path / "x.txt") if (tmp_path / "x.txt").write_text("a") else None


def test_split_prompts_is_deterministic_and_complete(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(10)]})
    a = P.split_prompts(ds, (0.6, 0.2, 0.2), seed=42)
    b = P.split_prompts(ds, (0.6, 0.2, 0.2), seed=42)
    assert [len(x) for x in a] == [6, 2, 2] and [list(x["prompt"]) for x in a] == [list(x["prompt"]) for x in b]
    assert sorted(sum((list(x["prompt"]) for x in a), [])) == sorted(ds["prompt"])
    with pytest.raises(ValueError, match="sum to 1"):
        P.split_prompts(ds, (0.5, 0.2))


# ----------------------------------------------------------------------------- plots
def test_plots_return_figures_without_showing():
    from matplotlib.figure import Figure

    from diffusion_lens import plot
    from diffusion_lens.steering import Directions
    from diffusion_lens.steering.directions import PCAResult
    from diffusion_lens.steering.selection import Selection

    g = torch.Generator().manual_seed(0)
    dirs = Directions(torch.randn(4, 2, 8, generator=g, dtype=torch.float64), torch.randn(4, 2, 8, generator=g, dtype=torch.float64),
                      layers=[0, 1, 2, 3], positions=["prompt[-2]", "last_prompt"])
    assert isinstance(plot.cosine_per_layer(dirs), Figure)
    res = PCAResult(torch.eye(2, 8, dtype=torch.float64), torch.tensor([0.6, 0.3]), torch.randn(5, 2), torch.randn(5, 2),
                    torch.zeros(8), layer=1, position="last_prompt")
    assert isinstance(plot.pca_scatter(res), Figure)
    grid = {"values": torch.rand(4, 3), "row_labels": [0, 1, 2, 3], "col_labels": ["0-3", "4-7", "8-11"], "metric_name": "refusal rate"}
    assert isinstance(plot.sensitivity_heatmap(grid), Figure)
    kept = torch.tensor([[True, False]] * 4)
    sel = Selection(dirs, torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64),
                    torch.rand(4, 2, dtype=torch.float64), kept, [["", "kl"]] * 4,
                    {"layer": 2, "position": "prompt[-2]"}, {})
    for score in ("bypass", "induce", "kl"):
        fig = plot.selection_heatmap(sel, score)
        assert isinstance(fig, Figure)
    with pytest.raises(ValueError, match="score must be"):
        plot.selection_heatmap(sel, "x")
    with pytest.raises(ValueError, match="2-D grid"):
        plot.sensitivity_heatmap({"values": torch.rand(3), "row_labels": [], "col_labels": []})
