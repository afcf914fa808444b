"""Verifiable instruction checks for the IFEval categories used by the OT-steering paper.

Written from the category descriptions (IFEval, Zhou et al. 2023; instruction ids and kwargs
names follow the `google/IFEval` data so its records can be scored directly). Supported ids:

=====================================  ==============================================================
id                                     passes when
=====================================  ==============================================================
keywords:forbidden_words               none of `forbidden_words` occurs as a whole word (any case)
keywords:existence                     every one of `keywords` occurs (any case)
keywords:frequency                     `keyword` occurs `relation` ("less than" / "at least") `frequency` times
keywords:letter_frequency              `letter` occurs `let_relation` `let_frequency` times (any case)
change_case:capital_word_frequency     all-capital words occur `capital_relation` `capital_frequency` times
change_case:english_capital            the response is all upper case
change_case:english_lowercase          the response is all lower case
detectable_format:title                a title in double angular brackets, <<like this>>
detectable_format:json_format          the whole response (``` fences allowed) parses as JSON
detectable_format:number_bullet_lists  exactly `num_bullets` markdown bullet lines ("* " or "- ")
detectable_format:number_highlighted_sections  at least `num_highlights` *highlighted* sections
length_constraints:number_sentences    sentence count `relation` `num_sentences`
punctuation:no_comma                   no comma (ASCII "," or full-width "，")
startend:end_checker                   the response ends with `end_phrase` (any case, trailing space ignored)
=====================================  ==============================================================

Loose scoring (IFEval's): a check also passes if it passes on the response with its first line,
last line or both removed, or with '*' removed.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping, Sequence

_RELATIONS = ("less than", "at least")


def _compare(count: int, relation: str, value: int) -> bool:
    if relation not in _RELATIONS:
        raise ValueError(f"relation must be one of {_RELATIONS}; got {relation!r}.")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"the count to compare with must be an int; got {value!r}.")
    return count < value if relation == "less than" else count >= value


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?", text)


def forbidden_words(response: str, *, forbidden_words: Sequence[str]) -> bool:
    return not any(re.search(r"\b" + re.escape(w) + r"\b", response, flags=re.IGNORECASE) for w in forbidden_words)


def keyword_existence(response: str, *, keywords: Sequence[str]) -> bool:
    return all(re.search(re.escape(k), response, flags=re.IGNORECASE) for k in keywords)


def keyword_frequency(response: str, *, keyword: str, frequency: int, relation: str) -> bool:
    return _compare(len(re.findall(re.escape(keyword), response, flags=re.IGNORECASE)), relation, frequency)


def letter_frequency(response: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    if not isinstance(letter, str) or len(letter) != 1:
        raise ValueError(f"letter must be one character; got {letter!r}.")
    return _compare(response.lower().count(letter.lower()), let_relation, let_frequency)


def capital_word_frequency(response: str, *, capital_frequency: int, capital_relation: str) -> bool:
    count = sum(1 for w in _words(response) if w.isupper())
    return _compare(count, capital_relation, capital_frequency)


def english_capital(response: str) -> bool:
    return response.isupper()


def english_lowercase(response: str) -> bool:
    return response.islower()


def title(response: str) -> bool:
    return any(t.strip() for t in re.findall(r"<<([^\n]+?)>>", response))


def json_format(response: str) -> bool:
    text = response.strip()
    text = re.sub(r"^```(?:json|JSON|Json)?\s*", "", text)
    text = re.sub(r"\s*```$", "", text).strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def bullet_list_count(response: str, *, num_bullets: int) -> bool:
    star = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dash = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(star) + len(dash) == num_bullets


def highlighted_sections(response: str, *, num_highlights: int) -> bool:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", response) if h.strip("*").strip()]
    return len(single) + len(double) >= num_highlights


def count_sentences(text: str) -> int:
    """Sentences ended by . ! ? (or 。！？), ignoring a few common abbreviations and decimals.

    Example:
        >>> count_sentences("Dr. Who is 3.5 feet tall. Really? Yes!")
        3
    """
    cleaned = re.sub(r"\b(?:Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|vs|etc|e\.g|i\.e)\.", "ABBR", text)
    cleaned = re.sub(r"(\d)\.(\d)", r"\1\2", cleaned)
    parts = [p for p in re.split(r"(?<=[.!?。！？])\s*", cleaned) if p.strip()]
    return len(parts)


def sentence_count(response: str, *, num_sentences: int, relation: str) -> bool:
    return _compare(count_sentences(response), relation, num_sentences)


def no_comma(response: str) -> bool:
    return "," not in response and "，" not in response


def end_phrase(response: str, *, end_phrase: str) -> bool:
    return response.strip().lower().endswith(end_phrase.strip().lower())


INSTRUCTION_CHECKS: dict[str, Callable[..., bool]] = {
    "keywords:forbidden_words": forbidden_words,
    "keywords:existence": keyword_existence,
    "keywords:frequency": keyword_frequency,
    "keywords:letter_frequency": letter_frequency,
    "change_case:capital_word_frequency": capital_word_frequency,
    "change_case:english_capital": english_capital,
    "change_case:english_lowercase": english_lowercase,
    "detectable_format:title": title,
    "detectable_format:json_format": json_format,
    "detectable_format:number_bullet_lists": bullet_list_count,
    "detectable_format:number_highlighted_sections": highlighted_sections,
    "length_constraints:number_sentences": sentence_count,
    "punctuation:no_comma": no_comma,
    "startend:end_checker": end_phrase,
}


def _loose_variants(response: str) -> list[str]:
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    variants = [response, first, last, both]
    return variants + [v.replace("*", "") for v in variants]


def check_instruction(instruction_id: str, response: str, *, loose: bool = False, **kwargs: Any) -> bool:
    """Whether `response` satisfies one verifiable instruction (IFEval id and kwargs).

    Example:
        >>> check_instruction("punctuation:no_comma", "No commas here.")
        True
        >>> check_instruction("keywords:frequency", "cat cat dog", keyword="cat", frequency=2, relation="at least")
        True
    """
    if instruction_id not in INSTRUCTION_CHECKS:
        raise KeyError(f"Unsupported instruction {instruction_id!r}; supported: {sorted(INSTRUCTION_CHECKS)}.")
    if not isinstance(response, str):
        raise TypeError(f"response must be a str; got {type(response).__name__}.")
    fn = INSTRUCTION_CHECKS[instruction_id]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        if not loose:
            return bool(fn(response, **kwargs))
        return any(bool(fn(v, **kwargs)) for v in _loose_variants(response) if v.strip())
    except TypeError as error:
        raise TypeError(f"{instruction_id}: wrong keyword arguments {sorted(kwargs)} ({error}).") from None


def instruction_following(
    responses: Sequence[str],
    records: Sequence[Mapping[str, Any]],
    *,
    loose: bool = False,
    unsupported: str = "skip",
) -> dict[str, Any]:
    """IFEval-style accuracy: `prompt_level` (all instructions of a prompt pass) and
    `instruction_level` (fraction of instructions passed), over the supported instruction ids;
    `by_instruction` maps each instruction id to [passed, total] (per-constraint accuracy).

    `records[i]` has `instruction_id_list` and `kwargs` (a list of dicts), as in google/IFEval
    and `diffusion_lens.prompts.load_ifeval`. `unsupported="skip"` drops unknown ids (counted in
    `n_skipped`); "raise" raises. Prompts left with no supported instruction are not scored.

    Example:
        >>> recs = load_ifeval(path="ifeval.jsonl")
        >>> out = model.generate([r["prompt"] for r in recs], gen_length=256)
        >>> instruction_following(out.texts, recs)["prompt_level"]
    """
    if len(responses) != len(records):
        raise ValueError(f"Got {len(responses)} responses for {len(records)} records; they must pair up.")
    if unsupported not in ("skip", "raise"):
        raise ValueError(f"unsupported must be 'skip' or 'raise'; got {unsupported!r}.")
    prompt_pass, inst_pass, inst_total, skipped, scored = 0, 0, 0, 0, 0
    by_instruction: dict[str, list[int]] = {}
    for response, record in zip(responses, records):
        ids = list(record["instruction_id_list"])
        kwargs_list = list(record.get("kwargs") or [{}] * len(ids))
        if len(kwargs_list) != len(ids):
            raise ValueError(f"Record has {len(ids)} instruction ids but {len(kwargs_list)} kwargs entries.")
        results = []
        for iid, kw in zip(ids, kwargs_list):
            if iid not in INSTRUCTION_CHECKS:
                if unsupported == "raise":
                    raise KeyError(f"Unsupported instruction {iid!r}.")
                skipped += 1
                continue
            results.append(check_instruction(iid, response, loose=loose, **(kw or {})))
            counts = by_instruction.setdefault(iid, [0, 0])
            counts[0] += results[-1]
            counts[1] += 1
        if not results:
            continue
        scored += 1
        prompt_pass += all(results)
        inst_pass += sum(results)
        inst_total += len(results)
    return {
        "prompt_level": prompt_pass / scored if scored else float("nan"),
        "instruction_level": inst_pass / inst_total if inst_total else float("nan"),
        "n_prompts": scored,
        "n_instructions": inst_total,
        "n_skipped": skipped,
        "by_instruction": by_instruction,
    }


__all__ = ["INSTRUCTION_CHECKS", "check_instruction", "count_sentences", "instruction_following"]
