"""Issue 17 (item 2): the optimal-transport paper's protocol on the embedded model, and its command."""

import json

import pytest

from diffusion_lens.__main__ import main
from diffusion_lens.evals import generate_texts, instruction_following
from diffusion_lens.steering import AffineMap
from diffusion_lens.studies.ot_protocol import METHODS, run_ot_protocol, toy_sets, wilson_interval, write_protocol

from tests.test_abliterate import model  # noqa: F401  (module fixture: tiny-refusal)

OPTS = dict(gen_length=8, steps=8, block_length=8)


@pytest.fixture(scope="module")
def sets():
    return toy_sets(n_calibration=16, n_validation=4, n_test=8)


@pytest.fixture(scope="module")
def result(model, sets):
    return run_ot_protocol(model, **sets, strengths=(0.5, 1.0), generate_kwargs=OPTS, batch_size=8, log=lambda _: None)


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.27754, abs=1e-5))
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.23659, abs=1e-5) and high == pytest.approx(0.76341, abs=1e-5)
    with pytest.raises(ValueError, match="0 <= passed <= total"):
        wilson_interval(3, 2)


def test_toy_sets_pair_requests_with_their_instructions(sets):
    assert len(sets["positive"]) == len(sets["negative"]) == 16
    assert all(p.startswith(n) and p != n for p, n in zip(sets["positive"], sets["negative"]))
    ids = {r["instruction_id_list"][0] for r in sets["test"]}
    assert ids <= {"change_case:english_capital", "startend:end_checker"} and len(sets["test"]) == 8
    assert {r["kwargs"][0].get("end_phrase") for r in sets["test"] + sets["validation"]} >= {"DONE", "完成"}


def test_every_method_is_chosen_on_validation_and_scored_on_test(result, model, sets):
    assert list(result.methods) == list(METHODS)
    for name, res in result.methods.items():
        for score in (res.prompt_level, res.instruction_level, *res.by_instruction.values()):
            assert score["low"] <= score["accuracy"] <= score["high"] and score["n"] > 0
        assert set(res.validation) == set(res.choice)
        for setting, tried in res.validation.items():  # the best validation score; ties: the first, weaker value
            assert res.choice[setting] == next(value for value, acc in tried.items() if acc == max(tried.values()))
    assert result.methods["none"].choice == {} and set(result.methods["linear"].choice) == {"strength"}
    assert set(result.methods["addition"].choice) == {"layer", "alpha"}
    # the unsteered row is exactly instruction_following on the test responses
    texts = generate_texts(model, [r["prompt"] for r in sets["test"]], batch_size=8, **OPTS)
    direct = instruction_following(texts, sets["test"])
    assert result.methods["none"].instruction_level["accuracy"] == direct["instruction_level"]
    assert result.constraints == sorted(direct["by_instruction"])
    table = result.table().splitlines()
    assert len(table) == 1 + len(METHODS) and "Linear-ACT" in table[-1]


def test_outputs_are_written_and_the_maps_reload(result, tmp_path):
    written = write_protocol(result, tmp_path / "ot")
    assert {p.name for p in written} == {"results.json", "table.txt", "radar.png", "mean.safetensors",
                                         "gaussian.safetensors", "linear.safetensors"}
    saved = json.loads((tmp_path / "ot" / "results.json").read_text())
    assert saved["methods"]["linear"]["choice"] == result.methods["linear"].choice
    assert AffineMap.load(tmp_path / "ot" / "maps" / "linear.safetensors").sites == result.maps["linear"].sites
    assert not list((tmp_path / "ot").rglob(".*.partial"))


def test_bad_input_is_refused(model, sets):
    with pytest.raises(ValueError, match="choose some of"):
        run_ot_protocol(model, **sets, methods=["linear", "steer"])
    with pytest.raises(ValueError, match="strengths must be"):
        run_ot_protocol(model, **sets, strengths=(0.0, 1.0))
    with pytest.raises(ValueError, match="lack 'prompt' or 'instruction_id_list'"):
        run_ot_protocol(model, **{**sets, "test": [{"prompt": "hi"}]})
    with pytest.raises(ValueError, match="Give --positive, --negative, --validation and --test for a model other"):
        main(["ot-protocol", "some/other-model", "--out", "x"])
    with pytest.raises(ValueError, match="Give all of --positive"):
        main(["ot-protocol", "tiny-refusal", "--out", "x", "--positive", "p.txt"])


def test_command_runs_on_the_embedded_model(tmp_path, capsys):
    main(["ot-protocol", "tiny-refusal", "--out", str(tmp_path / "cli"), "--n-calibration", "8", "--n-validation", "2",
          "--n-test", "4", "--methods", "none,mean", "--gen-length", "8", "--steps", "8", "--block-length", "8"])
    out = capsys.readouterr().out
    assert "Mean-ACT" in out and (tmp_path / "cli" / "maps" / "mean.safetensors").exists()
