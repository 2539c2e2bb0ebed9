"""Result post-processing (disfluency, word filter, ITN, punctuation) and the WER measure."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from asrd.engines.base import EngineWord
from asrd.events import Word
from asrd.params import SessionParams, WordFilter
from asrd.textproc import (
    apply_word_filter,
    inverse_normalize,
    postprocess,
    punctuate,
    remove_disfluencies,
)
from asrd.wer import normalize, wer, word_errors


def words(text: str) -> list[Word]:
    """Words 100 ms apart, each 90 ms long."""
    return [Word(t, i * 100, i * 100 + 90) for i, t in enumerate(text.split())]


def texts(ws: list[Word] | tuple[Word, ...]) -> str:
    return " ".join(w.text for w in ws)


ALL = SessionParams(
    disfluency=True,
    special_word_filter=WordFilter(system_reserved_filter=True, remove=("foo",), mask=("secret",)),
    enable_inverse_text_normalization=True,
    enable_punctuation_prediction=True,
)

# --- postprocess as a whole --------------------------------------------------------------


def test_nothing_asked_nothing_changed() -> None:
    ws = words("uh twenty three damn")
    text, out = postprocess(ws, SessionParams())
    assert text == "uh twenty three damn"
    assert out == tuple(ws)


def test_empty_input() -> None:
    assert postprocess([], ALL) == ("", ())
    assert postprocess([], SessionParams()) == ("", ())


def test_everything_filtered_gives_empty_result() -> None:
    assert postprocess(words("uh um foo"), ALL) == ("", ())


def test_all_steps_in_order() -> None:
    text, out = postprocess(words("um what is twenty five percent of the secret uh number"), ALL)
    assert text == "What is 25% of the ****** number?"
    assert text == texts(out)
    # "twenty five percent" spans its three words: 200..290, 300..390, 400..490.
    assert out[2] == Word("25%", 300, 590)


def test_engine_words_are_accepted() -> None:
    engine_words = [EngineWord("i", 0, 100), EngineWord("am", 100, 200)]
    text, out = postprocess(engine_words, ALL)
    assert text == "I am."
    assert out == (Word("I", 0, 100), Word("am.", 100, 200))
    assert all(type(w) is Word for w in out)


def test_duck_typed_words_are_accepted() -> None:
    @dataclass
    class Token:
        text: str
        start_ms: int
        end_ms: int

    assert postprocess([Token("hello", 0, 5)], ALL) == ("Hello.", (Word("Hello.", 0, 5),))


def test_empty_word_texts_are_dropped() -> None:
    assert postprocess([Word("", 0, 1), Word("ok", 1, 2)], SessionParams()) == (
        "ok",
        (Word("ok", 1, 2),),
    )


def test_text_and_words_always_agree() -> None:
    samples = [
        "uh one hundred and five damn apples",
        "nineteen eighty four",
        "secret secret foo",
        "i i i",
        "three point one four percent",
    ]
    for sample in samples:
        text, out = postprocess(words(sample), ALL)
        assert text == texts(out)
        for w in out:
            assert w.start_ms <= w.end_ms
        for a, b in itertools.pairwise(out):
            assert a.end_ms <= b.start_ms


# --- disfluency --------------------------------------------------------------------------


def test_fillers_removed_case_insensitively() -> None:
    out = remove_disfluencies(words("Uh I um think er that hmm ah mm works"))
    assert texts(out) == "I think that works"


def test_meaningful_lookalikes_are_kept() -> None:
    assert texts(remove_disfluencies(words("oh well mhm like umbrella"))) == (
        "oh well mhm like umbrella"
    )


def test_fillers_keep_times_of_the_other_words() -> None:
    out = remove_disfluencies(words("uh yes"))
    assert out == [Word("yes", 100, 190)]


# --- special_word_filter -----------------------------------------------------------------


def test_remove_and_mask_whole_words_case_insensitively() -> None:
    wf = WordFilter(remove=("Foo",), mask=("bar", "SECRET"))
    out = apply_word_filter(words("FOO food Bar barn Secret secrets"), wf)
    assert texts(out) == "food *** barn ****** secrets"


def test_mask_keeps_length_and_times() -> None:
    out = apply_word_filter(words("a password here"), WordFilter(mask=("password",)))
    assert out[1] == Word("********", 100, 190)


def test_mask_keeps_surrounding_punctuation() -> None:
    out = apply_word_filter([Word('"Secret,"', 0, 10)], WordFilter(mask=("secret",)))
    assert out == [Word('"******,"', 0, 10)]


def test_system_reserved_filter() -> None:
    sample = words("well damn that is Bullshit scrap class")
    assert texts(apply_word_filter(sample, WordFilter())) == texts(sample)
    out = apply_word_filter(sample, WordFilter(system_reserved_filter=True))
    assert texts(out) == "well **** that is ******** scrap class"


def test_remove_wins_over_mask_and_reserved() -> None:
    wf = WordFilter(system_reserved_filter=True, remove=("damn",), mask=("damn", "x"))
    assert texts(apply_word_filter(words("damn x"), wf)) == "*"


def test_phrases() -> None:
    wf = WordFilter(remove=("credit card",), mask=("top secret plan", "top"))
    out = apply_word_filter(words("my Credit Card is the top secret plan top credit"), wf)
    assert texts(out) == "my is the *** ****** **** *** credit"
    assert out[2] == Word("the", 400, 490)


def test_empty_entries_are_ignored() -> None:
    wf = WordFilter(remove=("", "  "), mask=("...",))
    assert texts(apply_word_filter(words("a b"), wf)) == "a b"


def test_filter_entries_match_the_written_numbers_itn_makes() -> None:
    """A client lists the words it sees in results: with ITN on, those are digits."""
    wf = WordFilter(remove=("12:30",), mask=("25", "twenty two"))
    params = SessionParams(special_word_filter=wf, enable_inverse_text_normalization=True)
    text, out = postprocess(words("it costs twenty five dollars at twelve thirty"), params)
    assert text == "it costs ** dollars at"
    assert out[2] == Word("**", 200, 390)
    # Spoken forms are still filtered before ITN reads them.
    assert postprocess(words("twenty two or twenty three"), params)[0] == "****** *** or 23"


def test_filter_everything() -> None:
    assert apply_word_filter(words("foo foo"), WordFilter(remove=("foo",))) == []
    assert apply_word_filter([], WordFilter(remove=("foo",))) == []


# --- inverse text normalisation ---------------------------------------------------------


@pytest.mark.parametrize(
    ("spoken", "written"),
    [
        ("twenty three", "23"),
        ("one hundred and five", "105"),
        ("one hundred five", "105"),
        ("two thousand twenty six", "2026"),
        ("two thousand and ten", "2010"),
        ("three point five", "3.5"),
        ("three point one four one five", "3.1415"),
        ("zero point five", "0.5"),
        ("three point oh five", "3.05"),
        ("fifty percent", "50%"),
        ("one percent", "1%"),
        ("three point five per cent", "3.5%"),
        ("ten", "10"),
        ("nineteen", "19"),
        ("ninety nine", "99"),
        ("twelve hundred", "1200"),
        ("twenty five hundred", "2500"),
        ("eleven hundred and one", "1101"),
        ("a thousand", "a thousand"),
        ("a hundred and twenty", "120"),
        ("a thousand two hundred", "1200"),
        ("a million and one", "1000001"),
        ("a hundred percent", "a hundred percent"),
        ("two million three hundred thousand and one", "2300001"),
        ("one billion", "1000000000"),
        ("nineteen eighty four", "1984"),
        ("twenty twenty six", "2026"),
        ("nineteen oh five", "1905"),
        ("two thousand three thousand", "2000 3000"),
        ("one hundred and", "100 and"),
        ("one hundred and the", "100 and the"),
        ("five hundred six hundred", "500 600"),
        ("one hundred and two hundred", "100 and 200"),
        ("one hundred and twenty two hundred", "100 and 2200"),
        ("five hundred six thousand", "506000"),
        ("twenty zero", "20 zero"),
        ("three point o five", "3.05"),  # pocketsphinx spells "oh" "o" too
    ],
)
def test_numbers(spoken: str, written: str) -> None:
    assert texts(inverse_normalize(words(spoken))) == written


@pytest.mark.parametrize(
    ("spoken", "written"),
    [
        ("twelve thirty", "12:30"),
        ("seven fifteen", "7:15"),
        ("three twenty", "3:20"),
        ("ten twenty", "10:20"),
        ("eleven fifty nine", "11:59"),
        ("twelve twelve", "12:12"),
        ("nine oh five", "9:05"),
        ("nine o five", "9:05"),
        ("twelve o'clock", "12:00"),
        ("twelve o clock", "12:00"),
        ("one o'clock", "1:00"),
        ("meet at seven fifteen tomorrow", "meet at 7:15 tomorrow"),
        ("at twelve thirty pm", "at 12:30 pm"),
    ],
)
def test_times(spoken: str, written: str) -> None:
    """An hour one..twelve said as one word, then minutes or o'clock."""
    assert texts(inverse_normalize(words(spoken))) == written


@pytest.mark.parametrize(
    ("spoken", "written"),
    [
        ("nineteen ninety nine", "1999"),
        ("nineteen eighty four", "1984"),
        ("sixteen sixty six", "1666"),
        ("eighteen twelve", "1812"),
        ("twenty twenty six", "2026"),
        ("twenty ten", "2010"),
        ("nineteen oh five", "1905"),
        ("nineteen o five", "1905"),
        ("twenty oh five", "2005"),
        ("in twenty twenty one", "in 2021"),
        ("two thousand and five", "2005"),
    ],
)
def test_years(spoken: str, written: str) -> None:
    """A first half thirteen..twenty said as one word, then two digits."""
    assert texts(inverse_normalize(words(spoken))) == written


@pytest.mark.parametrize(
    ("spoken", "written"),
    [
        # Neither a time (minutes past 59, hour past 12 or said in two words) nor a year.
        ("twelve ninety nine", "12 99"),
        ("eleven sixty six", "11 66"),
        ("twenty one thirty", "21 30"),
        ("twelve five", "12 five"),
        ("thirteen o'clock", "13 o'clock"),
        ("zero thirty", "zero 30"),
        # The second number is a quantity of its own.
        ("three twenty dollar bills", "three 20 dollar bills"),
        ("fifteen twenty dollar bills", "15 20 dollar bills"),
        ("five ten minute breaks", "five 10 minute breaks"),
        ("twelve thirty per person", "12 30 per person"),
        ("nineteen twenty percent", "19 20%"),
        ("twelve thirty percent", "12 30%"),
        ("nineteen ninety nine point five", "19 99.5"),
        ("nineteen fifty thousand", "19 50000"),
        ("twenty twenty first", "20 twenty first"),
        ("twelve thirty first", "12 thirty first"),
        # Inside a run of number words: a phone number, a list.
        ("five five five oh one two three", "five five five oh one two three"),
        ("five five five twelve thirty", "five five five 12 30"),
        ("nine oh five five five five", "nine oh five five five five"),
        ("nineteen ninety nine twenty twenty", "19 99 20 20"),
        ("twelve fifteen twenty", "12 15 20"),
    ],
)
def test_adjacent_numbers_stay_apart(spoken: str, written: str) -> None:
    """Two numbers said in a row that are no time or year are not merged into one."""
    assert texts(inverse_normalize(words(spoken))) == written


def test_times_and_years_span_their_words() -> None:
    out = inverse_normalize(words("at twelve o clock in nineteen ninety nine"))
    assert out == [
        Word("at", 0, 90),
        Word("12:00", 100, 390),
        Word("in", 400, 490),
        Word("1999", 500, 790),
    ]


@pytest.mark.parametrize(
    "spoken",
    [
        "one of them",
        "no one",
        "zero",
        "one two three",
        "three four",
        "hundred",
        "thousand",
        "point five",
        "nine oh",
    ],
)
def test_lone_small_numbers_and_stray_number_words_stay_words(spoken: str) -> None:
    assert texts(inverse_normalize(words(spoken))) == spoken


@pytest.mark.parametrize(
    "spoken",
    [
        "the twenty first century",
        "on the thirty first of may",
        "a twenty second delay",
        "one hundred and first",
        "two thousand and tenth",
        "the one hundred twentieth anniversary",
    ],
)
def test_ordinals_stay_words_whole(spoken: str) -> None:
    """Not "the 20 first century": the cardinal start of an ordinal is not a number."""
    assert texts(inverse_normalize(words(spoken))) == spoken


def test_cardinals_next_to_ordinals_still_convert() -> None:
    assert texts(inverse_normalize(words("twenty seconds"))) == "20 seconds"
    assert texts(inverse_normalize(words("the first twenty"))) == "the first 20"
    assert texts(inverse_normalize(words("twenty three first"))) == "23 first"


def test_numbers_at_start_middle_and_end() -> None:
    out = inverse_normalize(words("forty two is the answer to six times seven hundred"))
    assert texts(out) == "42 is the answer to six times 700"
    out = inverse_normalize(words("he turned twenty one"))
    assert texts(out) == "he turned 21"


@pytest.mark.parametrize(
    ("spoken", "merged"),
    [
        ("about one hundred and five people", ["about", "105", "people"]),
        ("paid a hundred and fifty dollars", ["paid", "150", "dollars"]),  # spans the "a"
    ],
)
def test_merged_number_spans_its_words(spoken: str, merged: list[str]) -> None:
    out = inverse_normalize(words(spoken))
    assert out == [
        Word(merged[0], 0, 90),
        Word(merged[1], 100, 490),
        Word(merged[2], 500, 590),
    ]


@pytest.mark.parametrize(
    ("spoken", "written"),
    [
        ("twenty-five", "25"),
        ("forty-five percent", "45%"),
        ("three hundred and seventy-five", "375"),
        ("twenty-five hundred", "2500"),
        ("twelve forty-five", "12:45"),
        ("nineteen seventy-five", "1975"),
        ("twenty twenty-five", "2025"),
        ("the twenty-first century", "the twenty-first century"),
        ("one hundred twenty-first", "one hundred twenty-first"),
    ],
)
def test_hyphenated_tens(spoken: str, written: str) -> None:
    """The pocketsphinx model has "twenty-five" and the like as one word."""
    assert texts(inverse_normalize(words(spoken))) == written


def test_number_words_are_matched_case_insensitively() -> None:
    assert texts(inverse_normalize(words("Twenty Three"))) == "23"


# --- punctuation -------------------------------------------------------------------------


def test_statement() -> None:
    assert texts(punctuate(words("he might even have been made amiable"))) == (
        "He might even have been made amiable."
    )


@pytest.mark.parametrize(
    "first",
    ["what", "who", "how", "why", "is", "are", "do", "does", "can", "where", "what's", "won't"],
)
def test_questions(first: str) -> None:
    out = punctuate(words(f"{first} it works"))
    assert texts(out) == f"{first.capitalize()} it works?"


def test_a_question_stays_one_when_its_first_word_is_masked_or_removed() -> None:
    """The word filter runs before punctuation: whether the sentence asks is decided before
    it, and again after it when it removed the words in front of a question word."""
    masked = SessionParams(
        enable_punctuation_prediction=True,
        special_word_filter=WordFilter(mask=("what",)),
    )
    assert postprocess(words("what is this"), masked)[0] == "**** is this?"
    removed = SessionParams(
        enable_punctuation_prediction=True,
        special_word_filter=WordFilter(remove=("why",)),
    )
    assert postprocess(words("why not"), removed)[0] == "Not?"
    exposed = SessionParams(
        enable_punctuation_prediction=True,
        special_word_filter=WordFilter(remove=("basically",)),
    )
    assert postprocess(words("basically what is it"), exposed)[0] == "What is it?"
    assert postprocess(words("basically it is"), exposed)[0] == "It is."
    plain = SessionParams(enable_punctuation_prediction=True)
    assert postprocess(words("what's up"), plain)[0] == "What's up?"
    assert postprocess(words("the end"), plain)[0] == "The end."


def test_i_is_capitalised() -> None:
    assert texts(punctuate(words("so i think i'm right and i'll go"))) == (
        "So I think I'm right and I'll go."
    )


def test_single_word_and_existing_marks() -> None:
    assert punctuate(words("yes")) == [Word("Yes.", 0, 90)]
    assert texts(punctuate([Word("really?", 0, 1)])) == "Really?"
    assert texts(punctuate([Word("23", 0, 1)])) == "23."
    assert texts(punctuate([Word("****", 0, 1)])) == "****."
    assert texts(punctuate([Word("你好。", 0, 1)])) == "你好。"
    assert texts(punctuate([Word("好吗？", 0, 1)])) == "好吗？"
    assert punctuate([]) == []


# --- WER ---------------------------------------------------------------------------------


def test_normalize() -> None:
    assert normalize("<s> And(2) Mr. JOHN, s. don't cold-hearted! </s>") == [
        "and",
        "mr",
        "john",
        "s",
        "don't",
        "cold",
        "hearted",
    ]
    assert normalize("[NOISE] <sil> 'quoted' ") == ["quoted"]
    assert normalize("") == []


def test_word_errors() -> None:
    assert word_errors([], []) == 0
    assert word_errors([], ["a"]) == 1
    assert word_errors(["a"], []) == 1
    assert word_errors("a b c".split(), "a b c".split()) == 0
    assert word_errors("a b c".split(), "a x c".split()) == 1  # substitution
    assert word_errors("a b c".split(), "a c".split()) == 1  # deletion
    assert word_errors("a b c".split(), "a b b c".split()) == 1  # insertion
    assert word_errors("a b c d".split(), "b c d e".split()) == 2
    assert word_errors("the cat".split(), "cat the dog".split()) == 2  # insert, keep, sub


def test_corpus_wer_weights_by_reference_length() -> None:
    # 1 error in 4 words + 1 error in 1 word = 2 / 5, not the mean of 25% and 100%.
    assert wer(["a b c d", "e"], ["a b c x", "f"]) == pytest.approx(0.4)
    assert wer(["Hello, World."], ["hello world"]) == 0.0
    assert wer([""], [""]) == 0.0
    assert wer([""], ["a"]) == float("inf")
    with pytest.raises(ValueError):
        wer(["a"], [])
