"""Post-processing of recognised English words: what the client's session parameters ask for.

Runs in the gateway on every partial and final result, so it works on the word list (text
and times stay consistent: a merged number spans its words) with precompiled sets and plain
string operations. Steps, in this order, each switched by a :class:`SessionParams` flag:

1. ``disfluency``: drop filler words (uh, um, er, ...).
2. ``special_word_filter``: remove listed words, mask others with ``*`` (plus a built-in list
   of profanities with ``system_reserved_filter``); case-insensitive, whole words or phrases.
3. ``enable_inverse_text_normalization``: spoken numbers to digits ("twenty three" -> "23",
   "twelve thirty" -> "12:30"); the word filter then runs once more, on the digits.
4. ``enable_punctuation_prediction``: rule based, because pocketsphinx emits no punctuation
   and asrd has no punctuation model: capitalise the sentence and "I", end it with "?" when
   it opens with a question word, "." otherwise.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from functools import lru_cache
from typing import Protocol

from asrd.events import Word
from asrd.params import SessionParams, WordFilter

__all__ = [
    "FILLER_WORDS",
    "QUESTION_WORDS",
    "RESERVED_WORDS",
    "TimedWord",
    "apply_word_filter",
    "inverse_normalize",
    "postprocess",
    "punctuate",
    "remove_disfluencies",
]


class TimedWord(Protocol):
    """Anything with a word's text and times: :class:`asrd.events.Word`, engine words."""

    @property
    def text(self) -> str: ...
    @property
    def start_ms(self) -> int: ...
    @property
    def end_ms(self) -> int: ...


# Hesitations only: "oh", "well", "like" carry meaning too often to be dropped blindly, and
# "mhm"/"uh-huh" mean yes.
FILLER_WORDS = frozenset(
    {
        "uh", "uhh", "um", "umm", "uhm", "er", "err", "erm", "ah", "ahh", "eh", "hm", "hmm",
        "mm", "mmm",
    }
)  # fmt: skip

# system_reserved_filter: masked whole words (inflections listed, no substring matching, so
# "scrap" or "class" are never hit).
RESERVED_WORDS = frozenset(
    {
        "fuck", "fucks", "fucked", "fucking", "fucker", "fuckers", "motherfucker",
        "motherfuckers", "shit", "shits", "shitty", "bullshit", "bitch", "bitches", "bastard",
        "bastards", "asshole", "assholes", "cunt", "cunts", "dickhead", "dickheads", "twat",
        "wanker", "wankers", "slut", "sluts", "whore", "whores", "damn", "goddamn",
        "goddamned",
    }
)  # fmt: skip

QUESTION_WORDS = frozenset(
    {
        "what", "who", "whom", "whose", "which", "when", "where", "why", "how",
        "is", "are", "am", "was", "were", "do", "does", "did", "can", "could", "would",
        "should", "shall", "isn't", "aren't", "wasn't", "weren't", "don't", "doesn't",
        "didn't", "can't", "couldn't", "wouldn't", "shouldn't", "won't", "hasn't", "haven't",
        "hadn't", "what's", "who's", "where's", "when's", "why's", "how's", "what're",
        "who're", "where're",
    }
)  # fmt: skip

_EDGE_PUNCT = string.punctuation


def _key(text: str) -> str:
    """Comparison form of a word: lower case without surrounding punctuation."""
    return text.strip(_EDGE_PUNCT).lower()


# --- 1. disfluency -----------------------------------------------------------------------


def remove_disfluencies(words: Sequence[Word]) -> list[Word]:
    """Drop hesitation fillers (:data:`FILLER_WORDS`), whatever their case."""
    return [w for w in words if _key(w.text) not in FILLER_WORDS]


# --- 2. special_word_filter --------------------------------------------------------------


class _CompiledFilter:
    """Single words in sets; phrases indexed by their first word, longest first."""

    __slots__ = ("mask", "phrases", "remove")

    def __init__(self, wf: WordFilter) -> None:
        self.remove: set[str] = set()
        self.mask: set[str] = set(RESERVED_WORDS) if wf.system_reserved_filter else set()
        self.phrases: dict[str, list[tuple[tuple[str, ...], bool]]] = {}
        # Remove wins over mask: listed last, so it overrides.
        for entries, remove in ((wf.mask, False), (wf.remove, True)):
            for entry in entries:
                parts = tuple(k for k in (_key(p) for p in entry.split()) if k)
                if not parts:
                    continue
                if len(parts) == 1:
                    (self.remove if remove else self.mask).add(parts[0])
                    if remove:
                        self.mask.discard(parts[0])
                else:
                    self.phrases.setdefault(parts[0], []).append((parts, remove))
        for candidates in self.phrases.values():
            candidates.sort(key=lambda c: (-len(c[0]), not c[1]))


@lru_cache(maxsize=256)
def _compile(wf: WordFilter) -> _CompiledFilter:
    return _CompiledFilter(wf)


def _masked(text: str) -> str:
    """Every character of the word becomes ``*``; surrounding punctuation stays."""
    core = text.strip(_EDGE_PUNCT)
    if not core:
        return text
    start = text.index(core)
    return text[:start] + "*" * len(core) + text[start + len(core) :]


def apply_word_filter(words: Sequence[Word], wf: WordFilter) -> list[Word]:
    """Remove or mask the words and phrases of ``wf``; the longest matching phrase wins."""
    f = _compile(wf)
    keys = [_key(w.text) for w in words]
    out: list[Word] = []
    i = 0
    n = len(words)
    while i < n:
        key = keys[i]
        for parts, remove in f.phrases.get(key, ()):
            end = i + len(parts)
            if end <= n and tuple(keys[i:end]) == parts:
                if not remove:
                    out.extend(Word(_masked(w.text), w.start_ms, w.end_ms) for w in words[i:end])
                i = end
                break
        else:
            w = words[i]
            if key in f.remove:
                pass
            elif key in f.mask:
                out.append(Word(_masked(w.text), w.start_ms, w.end_ms))
            else:
                out.append(w)
            i += 1
    return out


# --- 3. inverse text normalisation ------------------------------------------------------

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9,
}  # fmt: skip
_TEENS = {
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
}  # fmt: skip
_TENS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
    "eighty": 80, "ninety": 90,
}  # fmt: skip
# The pocketsphinx model spells some of these as one word ("twenty-five", "forty-five").
_HYPHENATED = {
    f"{tens}-{unit}": tens_value + unit_value
    for tens, tens_value in _TENS.items()
    for unit, unit_value in _UNITS.items()
    if unit_value > 0
}
_SCALES = {"thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_NUMBER_START = frozenset(_UNITS.keys() | _TEENS.keys() | _TENS.keys() | _HYPHENATED.keys())
_SCALE_OR_HUNDRED = frozenset({*_SCALES, "hundred"})
# "Oh" said for zero; pocketsphinx also spells that sound "o" ("nine o five").
_ZERO_WORDS = frozenset({"oh", "o"})
_DIGIT_WORDS = {**_UNITS, "oh": 0, "o": 0}
_UNIT_ORDINALS = (
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
)  # fmt: skip
# Ordinals a cardinal can run into: "twenty first", "one hundred and tenth", "one hundred
# twenty-first".
_ORDINALS = frozenset(
    {
        *_UNIT_ORDINALS,
        "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth",
        "seventeenth", "eighteenth", "nineteenth", "twentieth", "thirtieth", "fortieth",
        "fiftieth", "sixtieth", "seventieth", "eightieth", "ninetieth", "hundredth",
        "thousandth", "millionth", "billionth",
        *(f"{tens}-{unit}" for tens in _TENS for unit in _UNIT_ORDINALS),
    }
)  # fmt: skip
# After one of these, a number is a quantity of its own, never the minutes of a time or the
# second half of a year: "three twenty dollar bills" are three $20 bills, "nineteen twenty
# percent" is 19 20%, "twelve thirty per person" is no time. ("second" is in _ORDINALS.)
_QUANTITY_WORDS = frozenset(
    {
        "point", "percent", "per", *_SCALE_OR_HUNDRED, *_ORDINALS,
        "dollar", "dollars", "cent", "cents", "pound", "pounds", "euro", "euros", "yuan",
        "seconds", "minute", "minutes", "hour", "hours", "day", "days", "week", "weeks",
        "month", "months", "year", "years",
    }
)  # fmt: skip


class _Number:
    """A cardinal parsed from words[start:end]."""

    __slots__ = ("end", "start", "value")

    def __init__(self, start: int, end: int, value: int) -> None:
        self.start = start
        self.end = end
        self.value = value


def _two_digits(keys: Sequence[str], j: int) -> tuple[int, int] | None:
    """``units | teen | tens [unit] | tens-unit`` at keys[j]: (value, next index), or None."""
    if j >= len(keys):
        return None
    k = keys[j]
    if k in _TEENS:
        return _TEENS[k], j + 1
    if k in _HYPHENATED:
        return _HYPHENATED[k], j + 1
    if k in _TENS:
        value = _TENS[k]
        if j + 1 < len(keys) and keys[j + 1] in _UNITS and keys[j + 1] != "zero":
            return value + _UNITS[keys[j + 1]], j + 2
        return value, j + 1
    if k in _UNITS:
        return _UNITS[k], j + 1
    return None


def _parse_below_thousand(keys: Sequence[str], i: int) -> tuple[int, int] | None:
    """Parse ``[units|teen|tens [unit]] [hundred [and] [units|teen|tens [unit]]]``.

    Returns (value, next index) or None when keys[i] starts no number. "twenty five
    hundred" = 2500 and "twelve hundred" = 1200 as spoken.
    """
    n = len(keys)
    first = _two_digits(keys, i)
    if first is None:
        return None
    value, j = first
    if j < n and keys[j] == "hundred" and value > 0:
        value *= 100
        j += 1
        tail_at = j + 1 if j < n and keys[j] == "and" else j
        tail = _two_digits(keys, tail_at)
        # A tail followed by its own "hundred" starts the next number: "five hundred six
        # hundred" is 500 600, not "506 hundred".
        if tail is not None and tail[0] > 0 and not (tail[1] < n and keys[tail[1]] == "hundred"):
            value += tail[0]
            j = tail[1]
    return value, j


def _parse_cardinal(keys: Sequence[str], i: int) -> _Number | None:
    """A whole cardinal: groups below a thousand, each but the last followed by a scale.

    Scales must decrease ("two million three thousand"); "and" may follow a scale when a
    group follows it. A group followed by a scale that is not smaller ends the number there,
    so "two thousand three thousand" is two numbers.
    """
    if keys[i] not in _NUMBER_START:
        return None
    n = len(keys)
    total = 0
    last_scale: int | None = None
    j = i  # end of what has been consumed
    resume = i  # where the next group may start (after an optional "and")
    while True:
        group = _parse_below_thousand(keys, resume)
        if group is None:
            break
        value, after = group
        scale = _SCALES.get(keys[after]) if after < n else None
        if scale is not None and value > 0 and (last_scale is None or scale < last_scale):
            total += value * scale
            last_scale = scale
            j = after + 1
            resume = j + 1 if j < n and keys[j] == "and" else j
            continue
        if scale is None and (last_scale is None or value < last_scale):
            total += value
            j = after
        break
    if j == i:
        return None
    return _Number(i, j, total)


def _a_scale(keys: Sequence[str], i: int) -> _Number | None:
    """A number said with "a" for "one": "a hundred and twenty" is 120, not "a hundred and
    20". Only when more number words follow the scale: "a hundred" alone stays words."""
    alt = list(keys)
    alt[i] = "one"
    number = _parse_cardinal(alt, i)
    return number if number is not None and number.end > i + 2 else None


def _ordinal_end(keys: Sequence[str], number: _Number) -> int | None:
    """End of an ordinal that ``number`` is the start of, or None.

    "twenty first" is 21st, not "20 first": a cardinal ending in a tens word, "hundred" or a
    scale (then maybe "and") that runs into an ordinal word is part of that ordinal.
    """
    last = keys[number.end - 1]
    if last not in _TENS and last not in _SCALE_OR_HUNDRED:
        return None
    j = number.end
    if last in _SCALE_OR_HUNDRED and j < len(keys) and keys[j] == "and":
        j += 1
    return j + 1 if j < len(keys) and keys[j] in _ORDINALS else None


def _second_half(keys: Sequence[str], j: int) -> tuple[str, int] | None:
    """The minutes of a time or the second half of a year at keys[j]: (two digits, end).

    "thirty" -> "30", "forty five" -> "45", "oh five" / "o five" -> "05"; a lone unit
    ("twelve five") or "zero" is none.
    """
    n = len(keys)
    if j < n and keys[j] in _ZERO_WORDS:
        if j + 1 < n and keys[j + 1] in _UNITS and _UNITS[keys[j + 1]] > 0:
            return f"0{_UNITS[keys[j + 1]]}", j + 2
        return None
    half = _two_digits(keys, j)
    if half is None or half[0] < 10:
        return None
    return str(half[0]), half[1]


def _time_or_year(keys: Sequence[str], number: _Number) -> tuple[str, int] | None:
    """Two numbers said together as one time or year: (text, end), or None to keep them apart.

    ``number`` must be one word, the hour or the first half:

    - hour 1..12 + "o'clock" (or "o clock"): "twelve o'clock" -> "12:00".
    - hour 1..12 + minutes 10..59 or "oh" digit: "twelve thirty" -> "12:30", "nine oh five"
      -> "9:05". Ten to twelve are times, not the years 1000-1299, which speech rarely names.
    - thirteen..twenty + 10..99 or "oh" digit: a year, "nineteen ninety nine" -> "1999",
      "twenty oh five" -> "2005".

    Anything else stays two numbers: "twelve ninety nine" -> "12 99", "twenty one thirty" ->
    "21 30". So do pairs inside a run of number words (a phone number, a list: "five five
    five oh one" must not end in a time) and pairs whose second number a _QUANTITY_WORDS
    word claims.
    """
    i = number.start
    j = number.end
    n = len(keys)
    first = number.value
    if j - i != 1 or (i > 0 and keys[i - 1] in _NUMBER_START):
        return None
    if 1 <= first <= 12:
        if j < n and keys[j] == "o'clock":
            return f"{first}:00", j + 1
        if j + 1 < n and keys[j] == "o" and keys[j + 1] == "clock":
            return f"{first}:00", j + 2
    half = _second_half(keys, j)
    if half is None:
        return None
    digits, end = half
    if end < n and (keys[end] in _NUMBER_START or keys[end] in _QUANTITY_WORDS):
        return None
    if 1 <= first <= 12 and int(digits) < 60:
        return f"{first}:{digits}", end
    if 13 <= first <= 20:
        return f"{first}{digits}", end
    return None


def inverse_normalize(words: Sequence[Word]) -> list[Word]:
    """Spoken English numbers to digits, in AP style.

    Cardinals ("one hundred and five" and "a hundred and five" -> "105", but "a hundred"
    stays; "two thousand twenty six" -> "2026"), decimals ("three point one four" -> "3.14"),
    percentages ("fifty percent" -> "50%"), and times and years said as two numbers
    ("twelve thirty" -> "12:30", "nineteen eighty four" -> "1984"; the rules are those of
    :func:`_time_or_year`). Other numbers said in a row stay apart rather than merge into
    one nobody said ("twenty one thirty" -> "21 30").
    A lone zero..nine stays a word ("one of them", "no one"; so do digit strings, "one two
    three", which count as often as they spell a code) unless it has a decimal part or a
    percent sign. No digit grouping commas; ordinals ("twenty first", "one hundred and
    tenth") and currencies are left as words.
    """
    keys = [_key(w.text) for w in words]
    n = len(words)
    out: list[Word] = []
    i = 0
    while i < n:
        number = _parse_cardinal(keys, i)
        if number is None and keys[i] == "a" and i + 1 < n and keys[i + 1] in _SCALE_OR_HUNDRED:
            number = _a_scale(keys, i)
        if number is None:
            out.append(words[i])
            i += 1
            continue
        ordinal_end = _ordinal_end(keys, number)
        if ordinal_end is not None:
            out.extend(words[i:ordinal_end])
            i = ordinal_end
            continue
        pair = _time_or_year(keys, number)
        if pair is not None:
            text, end = pair
            out.append(Word(text, words[i].start_ms, words[end - 1].end_ms))
            i = end
            continue
        text = str(number.value)
        end = number.end
        is_word_digit = number.value < 10 and end - i == 1
        # Decimal part: "point" and digit words.
        if end + 1 < n and keys[end] == "point" and keys[end + 1] in _DIGIT_WORDS:
            digits = []
            j = end + 1
            while j < n and keys[j] in _DIGIT_WORDS:
                digits.append(str(_DIGIT_WORDS[keys[j]]))
                j += 1
            text = f"{text}.{''.join(digits)}"
            end = j
            is_word_digit = False
        if end < n and keys[end] == "percent":
            text += "%"
            end += 1
            is_word_digit = False
        elif end + 1 < n and keys[end] == "per" and keys[end + 1] == "cent":
            text += "%"
            end += 2
            is_word_digit = False
        if is_word_digit:
            out.append(words[i])
            i += 1
            continue
        out.append(Word(text, words[i].start_ms, words[end - 1].end_ms))
        i = end
    return out


# --- 4. punctuation ----------------------------------------------------------------------

# Marks that already close a sentence, also the full-width ones of an engine that writes its
# own punctuation (and sends text without words: sentences.py punctuates that text too).
_SENTENCE_ENDS = frozenset(".?!。？！…")
_I_FORMS = {"i": "I", "i'm": "I'm", "i'll": "I'll", "i've": "I've", "i'd": "I'd"}


def punctuate(words: Sequence[Word], *, question: bool | None = None) -> list[Word]:
    """Capitalise the first word and "I", close the sentence with "." or "?".

    ``question``: whether the sentence is one, also when a word filter masked or removed its
    first word (by default from the first word here)."""
    if not words:
        return []
    out = [Word(_I_FORMS.get(w.text.lower(), w.text), w.start_ms, w.end_ms) for w in words]
    first = out[0]
    if first.text[:1].islower():
        out[0] = Word(first.text[0].upper() + first.text[1:], first.start_ms, first.end_ms)
    last = out[-1]
    if last.text[-1:] not in _SENTENCE_ENDS:
        if question is None:
            question = _is_question(words)
        mark = "?" if question else "."
        out[-1] = Word(last.text + mark, last.start_ms, last.end_ms)
    return out


def _is_question(words: Sequence[Word]) -> bool:
    return bool(words) and _key(words[0].text) in QUESTION_WORDS


# --- all together -----------------------------------------------------------------------


def postprocess(words: Sequence[TimedWord], params: SessionParams) -> tuple[str, tuple[Word, ...]]:
    """Apply the steps the session asked for; returns (text, words), text = words joined."""
    result = [w if type(w) is Word else Word(w.text, w.start_ms, w.end_ms) for w in words]
    result = [w for w in result if w.text]
    if params.disfluency:
        result = remove_disfluencies(result)
    # A question before the filter masks or removes its first word ("**** is this?"), or
    # after it removed words in front of one ("foo what is it" -> "What is it?").
    question = _is_question(result)
    if params.special_word_filter is not None:
        result = apply_word_filter(result, params.special_word_filter)
        question = question or _is_question(result)
    if params.enable_inverse_text_normalization:
        result = inverse_normalize(result)
        if params.special_word_filter is not None:
            # Again on the written forms the client sees: an entry "25" or "12:30" must match
            # "twenty five" once ITN wrote it so. What the first pass masked stays masked.
            result = apply_word_filter(result, params.special_word_filter)
    if params.enable_punctuation_prediction:
        result = punctuate(result, question=question)
    return " ".join(w.text for w in result), tuple(result)
