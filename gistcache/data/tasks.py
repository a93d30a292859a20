"""Built-in, offline instruction-tuning tasks for gist-token demos.

Generates a small Alpaca-shaped data set ({"instruction", "input", "output", "family"}) from the
standard library alone -- no network, no data files -- deterministically from a seed, so a demo can
train gist tokens on any fresh machine. About forty task families (string edits, arithmetic, list
operations, formatting, unit conversions, rule-based classification, input-free questions) each
have several instruction phrasings and a random input generator; answers are computed, so they are
always correct. Many families share an input format (a word, "12, 7", a phrase), so one input gets
different outputs under different instructions, which forces a model to read the instruction.
Families marked ``held_out=True`` never appear in training rows; they are for evaluation.

Long prompts are a table apart (``LONG_FAMILIES``, ``make_long_tasks``), so the short set's rows stay as
they were: a made-up rule (a code word added to a word) shown by 10-99 worked examples (about 150-1,300
tokens), then a new word; the held-out family uses rules of another shape. Plain look-ups (a code book of
made-up words, a staff directory) were tried first and the 135M base model reading the full prompt answered
none of them; this family it answers (the measurement is in ``make_long_tasks``'s docstring).

Public API: ``FAMILIES`` (tuple of TaskFamily), ``HELD_OUT_FAMILIES`` (their names),
``make_builtin_tasks(num_examples, *, seed, held_out)``, ``LONG_FAMILIES``, ``LONG_HELD_OUT_FAMILIES`` and
``make_long_tasks(num_examples, *, seed, held_out)``.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from typing import Callable, Union

__all__ = ["FAMILIES", "HELD_OUT_FAMILIES", "LONG_FAMILIES", "LONG_HELD_OUT_FAMILIES", "TaskFamily",
           "make_builtin_tasks", "make_long_tasks"]

# --- Small built-in vocabularies ---

WORDS: tuple[str, ...] = (
    "apple", "river", "stone", "house", "table", "water", "light", "green",
    "music", "happy", "chair", "bread", "cloud", "dream", "earth", "field",
    "garden", "heart", "island", "jacket", "kitten", "lemon", "mountain", "night",
    "ocean", "paper", "queen", "rabbit", "summer", "tiger", "umbrella", "valley",
    "window", "yellow", "zebra", "animal", "basket", "candle", "dinner", "engine",
    "forest", "guitar", "hammer", "winter", "jungle", "ladder", "market", "number",
    "orange", "pencil", "rocket", "silver", "travel", "violin", "wallet", "bottle",
    "button", "castle", "doctor", "family", "flower", "friend", "planet", "school",
    "spring", "street", "letter", "mirror", "monkey", "pocket", "purple", "shadow",
    "sister", "spider", "turtle", "butter", "carpet", "cookie", "dragon", "farmer",
    "honey", "horse", "money", "mouse", "plant", "smile", "sugar", "train",
    "storm", "truck", "glass", "grape", "beach", "brick", "clock", "snake",
    "piano", "robot", "sheep", "tooth",
)
PALINDROMES: tuple[str, ...] = (
    "level", "radar", "noon", "civic", "kayak", "refer", "madam", "rotor", "racecar", "stats",
)
POSITIVE: tuple[str, ...] = ("good", "great", "happy", "wonderful", "excellent", "lovely", "fun", "amazing")
NEGATIVE: tuple[str, ...] = ("bad", "awful", "sad", "terrible", "boring", "horrible", "poor", "ugly")
NOUNS: tuple[str, ...] = ("movie", "meal", "trip", "book", "game", "show", "party", "song")
DAYS: tuple[str, ...] = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS: tuple[str, ...] = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)
JSON_KEYS: tuple[str, ...] = ("color", "name", "city", "animal", "fruit", "item", "word", "place")
VOWELS = "aeiou"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
PRIMES = tuple(n for n in range(2, 101) if all(n % d for d in range(2, int(n**0.5) + 1)))

# A generator returns (input, output) or (input, output, params); params fill
# ``{placeholders}`` in the instruction templates.
Generated = Union[tuple[str, str], tuple[str, str, dict]]


@dataclass(frozen=True)
class TaskFamily:
    """One kind of task: instruction phrasings plus an input/answer generator."""

    name: str
    instructions: tuple[str, ...]
    generate: Callable[[random.Random], Generated]
    held_out: bool = False

    def example(self, rng: random.Random) -> dict[str, str]:
        """Draw one row using ``rng``."""
        result = self.generate(rng)
        inp, out = result[0], result[1]
        params = result[2] if len(result) > 2 else {}
        instruction = rng.choice(self.instructions).format(**params)
        return {"instruction": instruction, "input": inp, "output": out, "family": self.name}


# --- Input helpers ---

def _word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def _phrase(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(2, 4))


def _numbers(rng: random.Random, lo: int = 1, hi: int = 99) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(3, 6))]


def _join(items) -> str:
    return ", ".join(str(x) for x in items)


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _on_word(transform: Callable[[str], str]) -> Callable[[random.Random], Generated]:
    """Generator for families whose input is one random word."""
    def generate(rng: random.Random) -> Generated:
        w = _word(rng)
        return w, transform(w)
    return generate


def _on_numbers(transform: Callable[[list[int]], str]) -> Callable[[random.Random], Generated]:
    """Generator for families whose input is a list like "12, 7, 40"."""
    def generate(rng: random.Random) -> Generated:
        nums = _numbers(rng)
        return _join(nums), transform(nums)
    return generate


def _on_pair(lo: int, hi: int, transform: Callable[[int, int], int]) -> Callable[[random.Random], Generated]:
    """Generator for families whose input is two integers "a, b" with a >= b."""
    def generate(rng: random.Random) -> Generated:
        a, b = sorted((rng.randint(lo, hi), rng.randint(lo, hi)), reverse=True)
        return _join((a, b)), str(transform(a, b))
    return generate


def _on_int(lo: int, hi: int, transform: Callable[[int], str]) -> Callable[[random.Random], Generated]:
    """Generator for families whose input is one integer in [lo, hi]."""
    def generate(rng: random.Random) -> Generated:
        n = rng.randint(lo, hi)
        return str(n), transform(n)
    return generate


# --- Generators: string edits ---

def _lowercase(rng):
    w = _word(rng)
    mixed = "".join(c.upper() if rng.random() < 0.5 else c for c in w)
    shown = rng.choice([w.upper(), w.capitalize(), mixed if mixed != w else w.upper()])
    return shown, w


def _capitalize_words(rng):
    words = _phrase(rng)
    return " ".join(words), " ".join(w.capitalize() for w in words)


def _replace_char(rng):
    w = _word(rng)
    old = rng.choice(sorted(set(w)))
    new = rng.choice([c for c in LETTERS if c not in w])
    return w, w.replace(old, new), {"old": old, "new": new}


# --- Generators: arithmetic and lists (shared "a, b, ..." input format) ---

def _reverse_list(rng):
    items = _numbers(rng) if rng.random() < 0.5 else _phrase(rng)
    return _join(items), _join(items[::-1])


def _sum_list(rng):
    nums = _numbers(rng, 1, 20)
    return _join(nums), str(sum(nums))


def _list_length(rng):
    items = _numbers(rng) if rng.random() < 0.5 else _phrase(rng)
    return _join(items), str(len(items))


def _deduplicate(rng):
    nums = [rng.randint(1, 9) for _ in range(rng.randint(4, 6))]
    nums.insert(rng.randint(0, len(nums)), rng.choice(nums))  # guarantee a repeat
    return _join(nums), _join(dict.fromkeys(nums))


def _first_k(rng):
    k = rng.randint(2, 3)
    nums = [rng.randint(1, 99) for _ in range(rng.randint(k + 2, 6))]
    return _join(nums), _join(nums[:k]), {"k": k}


# --- Generators: formatting ---

def _comma_list(rng):
    words = _phrase(rng)
    return " ".join(words), _join(words)


def _date_format(rng):
    y, m, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return f"{y:04d}-{m:02d}-{d:02d}", f"{MONTHS[m - 1]} {d}, {y}"


def _make_json(rng):
    key, value = rng.choice(JSON_KEYS), _word(rng)
    return f"{key}: {value}", json.dumps({key: value})


# --- Generators: unit conversions (bare number in, number plus unit out) ---

def _celsius_to_fahrenheit(rng):
    c = rng.randrange(-40, 101, 5)  # multiples of 5 convert exactly
    return str(c), f"{c * 9 // 5 + 32} degrees Fahrenheit"


# --- Generators: rule-based classification ---

def _sentiment(rng):
    positive = rng.random() < 0.5
    adj = rng.choice(POSITIVE if positive else NEGATIVE)
    return f"The {rng.choice(NOUNS)} was {adj}.", "positive" if positive else "negative"


def _is_prime(rng):
    n = rng.choice(PRIMES) if rng.random() < 0.5 else rng.randint(2, 100)
    return str(n), _yes_no(n in PRIMES)


def _is_palindrome(rng):
    w = rng.choice(PALINDROMES) if rng.random() < 0.5 else _word(rng)
    return w, _yes_no(w == w[::-1])


def _vowel_or_consonant(rng):
    c = rng.choice(VOWELS) if rng.random() < 0.4 else rng.choice([x for x in LETTERS if x not in VOWELS])
    return c, "vowel" if c in VOWELS else "consonant"


def _weekend_or_weekday(rng):
    day = rng.choice(DAYS[5:]) if rng.random() < 0.4 else rng.choice(DAYS[:5])
    return day, "weekend" if day in DAYS[5:] else "weekday"


# --- Generators: no input (the question lives in the instruction) ---

def _day_after(rng):
    i = rng.randrange(7)
    return "", DAYS[(i + 1) % 7], {"day": DAYS[i]}


def _letter_after(rng):
    i = rng.randrange(25)
    return "", LETTERS[i + 1], {"letter": LETTERS[i]}


# --- The family table ---

def _f(name, generate, *instructions, held_out=False) -> TaskFamily:
    return TaskFamily(name, tuple(instructions), generate, held_out)


FAMILIES: tuple[TaskFamily, ...] = (
    # string edits
    _f("reverse_word", _on_word(lambda w: w[::-1]),
       "Reverse the letters of this word.", "Write the word backwards.",
       "Spell the given word in reverse order.", "Return the word with its letters reversed.",
       "What is this word when read from right to left?"),
    _f("uppercase", _on_word(str.upper),
       "Convert the word to uppercase.", "Write this word in capital letters.",
       "Make every letter of the word uppercase.", "Return the word in all caps.",
       "Rewrite the given word using only uppercase letters."),
    _f("lowercase", _lowercase,
       "Convert the word to lowercase.", "Write this word in small letters.",
       "Make every letter of the word lowercase.", "Return the word with no capital letters.",
       "Rewrite the given word using only lowercase letters."),
    _f("remove_vowels", _on_word(lambda w: "".join(c for c in w if c not in VOWELS)),
       "Remove all vowels from the word.", "Delete every vowel in this word.",
       "Write the word without its vowels.", "Return the word with a, e, i, o and u taken out.",
       "Strip the vowels from the given word."),
    _f("count_letters", _on_word(lambda w: str(len(w))),
       "How many letters are in this word?", "Count the characters in the word.",
       "Give the length of the word.", "Return the number of letters in the given word.",
       "Tell me how long this word is, in letters."),
    _f("count_vowels", _on_word(lambda w: str(sum(c in VOWELS for c in w))),
       "How many vowels are in this word?", "Count the vowels in the word.",
       "Give the number of vowels in the given word.", "Return how many of the letters are vowels.",
       "Count how many times a, e, i, o or u appears in the word."),
    _f("first_letter", _on_word(lambda w: w[0]),
       "What is the first letter of the word?", "Give the word's first letter.",
       "Return only the first character of the word.", "Which letter does this word start with?",
       "Write the initial letter of the given word."),
    _f("last_letter", _on_word(lambda w: w[-1]),
       "What is the last letter of the word?", "Give the word's final letter.",
       "Return only the last character of the word.", "Which letter does this word end with?",
       "Write the final letter of the given word."),
    _f("capitalize_words", _capitalize_words,
       "Capitalize each word.", "Make the first letter of every word uppercase.",
       "Convert the phrase to title case.", "Rewrite the words so each one starts with a capital letter.",
       "Return the phrase with every word capitalized."),
    _f("replace_char", _replace_char,
       "Replace every '{old}' in the word with '{new}'.", "Change each letter {old} to {new} in the word.",
       "Swap all occurrences of '{old}' for '{new}'.",
       "Rewrite the word, putting '{new}' wherever '{old}' appears.",
       "Substitute the letter {new} for the letter {old} throughout the word."),
    _f("sort_letters", _on_word(lambda w: "".join(sorted(w))),
       "Sort the letters of the word alphabetically.", "Arrange the word's letters in alphabetical order.",
       "Put the letters of this word in order from a to z.", "Return the letters of the word sorted.",
       "Rearrange the characters of the word into alphabetical order.", held_out=True),
    # arithmetic
    _f("add", _on_pair(1, 99, lambda a, b: a + b),
       "Add the two numbers.", "What is the sum of these two numbers?", "Compute the total of the numbers.",
       "Return the first number plus the second.", "Add these numbers together and give the result."),
    _f("subtract", _on_pair(1, 99, lambda a, b: a - b),
       "Subtract the second number from the first.", "What is the first number minus the second?",
       "Compute the difference of the two numbers.", "Take the second number away from the first.",
       "Return the result of subtracting the second number from the first."),
    _f("multiply", _on_pair(2, 12, lambda a, b: a * b),
       "Multiply the two numbers.", "What is the product of these numbers?",
       "Compute the first number times the second.", "Return the result of multiplying the numbers.",
       "Give the product of the two given numbers."),
    _f("parity", _on_int(1, 999, lambda n: "odd" if n % 2 else "even"),
       "Is this number even or odd?", "Say whether the number is even or odd.",
       "Classify the number as even or odd.", "Answer even or odd for the given number.",
       "Tell me if the number is odd or even."),
    _f("max_of_list", _on_numbers(lambda ns: str(max(ns))),
       "Find the largest number in the list.", "What is the maximum of these numbers?",
       "Return the biggest number.", "Give the highest value in the list.",
       "Which number in the list is the greatest?"),
    _f("min_of_list", _on_numbers(lambda ns: str(min(ns))),
       "Find the smallest number in the list.", "What is the minimum of these numbers?",
       "Return the lowest number.", "Give the smallest value in the list.",
       "Which number in the list is the least?", held_out=True),
    # list operations
    _f("sort_numbers", _on_numbers(lambda ns: _join(sorted(ns))),
       "Sort the numbers in ascending order.", "Arrange the numbers from smallest to largest.",
       "Put these numbers in increasing order.", "Return the list sorted from low to high.",
       "Order the numbers so the smallest comes first."),
    _f("reverse_list", _reverse_list,
       "Reverse the order of the list.", "Write the items in reverse order.", "Return the list backwards.",
       "List the items from last to first.", "Flip the order of the given items."),
    _f("sum_list", _sum_list,
       "Add up all the numbers in the list.", "What is the sum of the list?",
       "Compute the total of every number given.", "Return the sum of all the numbers.",
       "Give the result of adding every number in the list."),
    _f("list_length", _list_length,
       "How many items are in the list?", "Count the items in the list.",
       "Give the number of elements in the list.", "Return the length of the list.",
       "Tell me how many entries the list has."),
    _f("deduplicate", _deduplicate,
       "Remove the duplicate numbers, keeping the first occurrence.",
       "Write the list without repeats, in original order.", "Delete repeated numbers from the list.",
       "Return each number only once, keeping the order.",
       "Drop any number that already appeared earlier in the list.", held_out=True),
    _f("first_k", _first_k,
       "Return the first {k} items of the list.", "Give only the first {k} numbers.",
       "Keep the first {k} elements and drop the rest.", "Write the leading {k} numbers of the list.",
       "Take the first {k} entries from the list."),
    # formatting
    _f("comma_list", _comma_list,
       "Turn these words into a comma-separated list.", "Separate the words with commas.",
       "Write the words as a list joined by commas.", "Put a comma and a space between the words.",
       "Format the words as a comma-separated list."),
    _f("wrap_brackets", _on_word(lambda w: f"[{w}]"),
       "Wrap the word in square brackets.", "Put square brackets around the word.",
       "Enclose the given word in square brackets.", "Return the word surrounded by square brackets.",
       "Add an opening and a closing square bracket around the word.", held_out=True),
    _f("date_format", _date_format,
       "Rewrite the date as month name, day and year.", "Convert this ISO date into a written-out date.",
       "Format the date like 'March 5, 2020'.", "Write the date using the full month name.",
       "Change the date from YYYY-MM-DD to Month D, YYYY."),
    _f("make_json", _make_json,
       "Turn the key and value into a JSON object.", "Write this pair as JSON.",
       "Format the key-value pair as a JSON object.", "Return a JSON object with this key and value.",
       "Convert the given key and value into JSON."),
    # unit conversions
    _f("km_to_m", _on_int(1, 50, lambda n: f"{n * 1000} meters"),
       "Convert this many kilometers to meters.", "How many meters is this many kilometers?",
       "Express the distance in kilometers as meters.", "Change the kilometers into meters.",
       "Give the number of meters in the given kilometers."),
    _f("hours_to_minutes", _on_int(1, 24, lambda n: f"{n * 60} minutes"),
       "Convert this many hours to minutes.", "How many minutes are in this many hours?",
       "Express the hours as minutes.", "Change the hours into minutes.",
       "Give the number of minutes in the given hours."),
    _f("minutes_to_seconds", _on_int(1, 60, lambda n: f"{n * 60} seconds"),
       "Convert this many minutes to seconds.", "How many seconds are in this many minutes?",
       "Express the minutes as seconds.", "Change the minutes into seconds.",
       "Give the number of seconds in the given minutes."),
    _f("kg_to_g", _on_int(1, 50, lambda n: f"{n * 1000} grams"),
       "Convert this many kilograms to grams.", "How many grams is this many kilograms?",
       "Express the mass in kilograms as grams.", "Change the kilograms into grams.",
       "Give the number of grams in the given kilograms.", held_out=True),
    _f("celsius_to_fahrenheit", _celsius_to_fahrenheit,
       "Convert this Celsius temperature to Fahrenheit.", "What is this many degrees Celsius in Fahrenheit?",
       "Express the temperature in degrees Fahrenheit.", "Change the temperature from Celsius to Fahrenheit.",
       "Give the Fahrenheit value of this Celsius temperature."),
    # rule-based classification
    _f("sentiment", _sentiment,
       "Is this sentence positive or negative?", "Classify the sentiment as positive or negative.",
       "Say whether the sentence sounds positive or negative.", "Label the sentiment of the sentence.",
       "Answer positive or negative for the given sentence."),
    _f("is_prime", _is_prime,
       "Is this number prime? Answer yes or no.", "Say yes if the number is prime, otherwise no.",
       "Tell me whether the number is a prime number.", "Answer yes or no: is the given number prime?",
       "Check if the number is prime and reply yes or no."),
    _f("is_palindrome", _is_palindrome,
       "Is this word a palindrome? Answer yes or no.",
       "Say yes if the word reads the same backwards, otherwise no.",
       "Tell me whether the word is a palindrome.", "Answer yes or no: is the given word a palindrome?",
       "Check if the word is spelled the same in both directions."),
    _f("vowel_or_consonant", _vowel_or_consonant,
       "Is this letter a vowel or a consonant?", "Classify the letter as vowel or consonant.",
       "Say whether the given letter is a vowel or a consonant.", "Answer vowel or consonant for this letter.",
       "Tell me if the letter is a consonant or a vowel.", held_out=True),
    _f("weekend_or_weekday", _weekend_or_weekday,
       "Is this day a weekday or on the weekend?", "Classify the day as weekday or weekend.",
       "Say whether the given day is a weekday or a weekend day.", "Answer weekday or weekend for this day.",
       "Tell me if the day falls on the weekend or a weekday."),
    # no input: the question lives in the instruction
    _f("day_after", _day_after,
       "Name the day after {day}.", "Which day of the week comes after {day}?", "What day follows {day}?",
       "Give the day of the week that comes right after {day}.", "If today is {day}, what day is tomorrow?"),
    _f("letter_after", _letter_after,
       "Name the letter after '{letter}' in the alphabet.", "Which letter comes right after '{letter}'?",
       "What is the next letter of the alphabet after '{letter}'?",
       "Give the letter that follows '{letter}' in the alphabet.",
       "In the alphabet, what letter comes after '{letter}'?"),
)


HELD_OUT_FAMILIES: frozenset[str] = frozenset(f.name for f in FAMILIES if f.held_out)


# --- Public entry point ---

def _family_rng(seed: int, name: str) -> random.Random:
    """A per-family generator, stable across processes (crc32, not hash())."""
    return random.Random(seed * 4_294_967_296 + zlib.crc32(name.encode("utf-8")))


def make_builtin_tasks(num_examples: int, *, seed: int = 0, held_out: bool = False) -> list[dict[str, str]]:
    """num_examples rows, each {"instruction", "input", "output", "family"}; rows come from the
    training families (held_out=False) or only from the held-out families (held_out=True),
    round-robin over families so that every family appears when num_examples >= number of families.
    Same arguments -> same rows."""
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    families = [f for f in FAMILIES if f.held_out == held_out]
    random.Random(seed).shuffle(families)  # seed-dependent but fixed round-robin order
    rngs = [_family_rng(seed, f.name) for f in families]
    rows = []
    for i in range(num_examples):
        k = i % len(families)
        rows.append(families[k].example(rngs[k]))
    return rows


# --- Long prompts: families whose instruction is hundreds of tokens and whose answer only the prompt gives ---

ONSETS = ("b", "bl", "br", "d", "dr", "f", "fl", "g", "gl", "gr", "k", "kr", "m", "n", "p", "pl", "pr", "s", "sk",
          "sl", "st", "t", "tr", "v", "z")
NUCLEI = ("a", "e", "i", "o", "u", "oo", "ee", "ai")
CODAS = ("ck", "n", "rp", "x", "m", "sh", "lt", "nd", "b", "g", "zz", "rk", "p", "t")


def _code_words(rng: random.Random, n: int) -> list[str]:
    """n distinct made-up words ('blick', 'stoorp', 'zaimsh'), none an English word of WORDS."""
    out: dict[str, None] = {}
    while len(out) < n:
        w = rng.choice(ONSETS) + rng.choice(NUCLEI) + rng.choice(CODAS)
        if rng.random() < 0.3:
            w += rng.choice(NUCLEI) + rng.choice(CODAS)
        if w not in WORDS:
            out[w] = None
    return list(out)


RULES: tuple[str, ...] = ("{word}-{code}", "{code} {word}", "{word} {code}", "{code}-{word}")
HELD_OUT_RULES: tuple[str, ...] = ("<{code}>{word}</{code}>", "[{code}: {word}]")


# The characters the held-out rules write around the word and code; no varied shape (below) uses one, so the
# held-out family stays a shape never trained on.
HELD_OUT_MARKS: frozenset[str] = frozenset("".join(HELD_OUT_RULES).replace("{word}", "").replace("{code}", "")) - {" "}
SHAPE_SEPARATORS: tuple[str, ...] = ("-", " ", "_", "+", "=", "~", ".", ", ", " | ", " # ", "*", "@", " & ", "")
SHAPE_WRAPS: tuple[tuple[str, str], ...] = (("(", ")"), ('"', '"'), ("'", "'"), ("*", "*"), ("|", "|"), ("_", "_"),
                                            ("~", "~"), ("#", "#"), ("!", "!"), ("%", "%"), ("(", ")!"), ("^", "^"))


def _varied_rule(rng: random.Random) -> str:
    """A rule shape drawn per prompt: the code before, after or on both sides of the word, joined by a separator,
    the code, the word or the whole optionally wrapped in marks ('(blick)_{word}', '#{word}# + blick'); no
    character of HELD_OUT_MARKS, so the gist learns to carry a form it has not seen, not the held-out ones."""
    code, word = "{code}", "{word}"
    opening, closing = rng.choice(SHAPE_WRAPS)
    wrapped = rng.choice(("code", "word", "all", "none"))
    if wrapped == "code":
        code = opening + code + closing
    elif wrapped == "word":
        word = opening + word + closing
    parts = rng.choice(((code, word), (word, code), (code, word, code)))
    rule = rng.choice(SHAPE_SEPARATORS[:-1] if wrapped == "none" else SHAPE_SEPARATORS).join(parts)
    return opening + rule + closing if wrapped == "all" else rule


def _word_rule(lo: int, hi: int, rules: tuple[str, ...] | Callable[[random.Random], str]):
    """Many worked examples of one made-up rule on a word: a rule of `rules` ({word}, {code}), or one drawn by
    it, with a made-up code word drawn per prompt; the input is a word not among the examples. n in [lo, hi]
    examples."""
    def generate(rng: random.Random) -> Generated:
        rule = rules(rng) if callable(rules) else rng.choice(rules)
        code = _code_words(rng, 1)[0]
        words = rng.sample(WORDS, min(rng.randint(lo, hi), len(WORDS) - 1) + 1)
        query, shown = words[0], words[1:]
        table = "\n\n".join(f"Input: {w}\nOutput: {rule.format(word=w, code=code)}" for w in shown)
        return query, rule.format(word=query, code=code), {"table": table}
    return generate


_RULE_INSTRUCTIONS = (
    "Learn the rule from these worked examples.\n\n{table}\n\nApply the same rule to the next input. "
    "Answer with the output only.",
    "Every input below is rewritten by one rule.\n\n{table}\n\nRewrite the next input by the same rule. "
    "Answer with the output only.",
)

# Long prompts (hundreds to about 1,300 tokens) whose answer only the prompt gives: a made-up rule (a code word
# added to a word) shown by 10-99 worked examples, then a new word. Kept apart from FAMILIES (the short
# built-in set keeps its rows); measured before adding (make_long_tasks). The held-out family uses rules of
# another shape.
LONG_FAMILIES: tuple[TaskFamily, ...] = (
    _f("long_word_rule", _word_rule(10, 99, RULES), *_RULE_INSTRUCTIONS),
    _f("long_word_rule_wrap", _word_rule(10, 99, HELD_OUT_RULES), *_RULE_INSTRUCTIONS, held_out=True),
)
LONG_HELD_OUT_FAMILIES: frozenset[str] = frozenset(f.name for f in LONG_FAMILIES if f.held_out)
# The training family with a rule shape drawn per prompt (`gist data long --shapes varied`), apart from
# LONG_FAMILIES so that the default rows stay as they were.
LONG_VARIED_FAMILY = _f("long_word_shape", _word_rule(10, 99, _varied_rule), *_RULE_INSTRUCTIONS)
# Every worked example's output is the same made-up word (`gist data long --shapes label`): the answer holds
# nothing of the input, so answering with the input scores 0 (the echo control), and only a cache that carries the
# made-up word's surface form can answer.
LONG_LABEL_FAMILY = _f("long_word_label", _word_rule(10, 99, ("{code}",)), *_RULE_INSTRUCTIONS)
SHAPES = ("fixed", "varied", "label")


def make_long_tasks(num_examples: int, *, seed: int = 0, held_out: bool = False,
                    shapes: str = "fixed") -> list[dict[str, str]]:
    """num_examples rows of the long families, as `make_builtin_tasks` (round-robin, seeded): the training
    family (held_out=False) or the held-out one; shapes="varied": the training family whose rule shape is
    drawn per prompt (LONG_VARIED_FAMILY) instead of one of four; shapes="label": every output is one made-up
    word whatever the input (LONG_LABEL_FAMILY), an echo-free check.

    Measured before adding (smollm2-135m base model, greedy, chat template, 30 rows each, seed 0; the full
    prompt vs the template alone, as `gist eval`'s base / none build them):

        family                prompt tokens (min/median/max)   EM full / none    ROUGE-L full / none
        long_word_rule        202 / 701 / 1257                 5/30 / 0/30       47.1 / 0.4
        long_word_rule_wrap   247 / 764 / 1605                 7/30 / 0/30       49.2 / 1.5

    Plain look-ups fail on this model: a code book of 20-100 made-up words -> English words (175-1066
    tokens, as "code = word" lines or as Input/Output pairs) scored 0/30 both ways.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    if shapes not in SHAPES:
        raise ValueError(f"shapes must be one of {', '.join(SHAPES)}, got {shapes!r}")
    if shapes != "fixed" and held_out:
        raise ValueError(f"the {shapes} shapes are a family of their own; the held-out family has its own shapes")
    own = {"varied": LONG_VARIED_FAMILY, "label": LONG_LABEL_FAMILY}
    families = [own[shapes]] if shapes in own else [f for f in LONG_FAMILIES if f.held_out == held_out]
    rngs = [_family_rng(seed, f.name) for f in families]
    return [families[i % len(families)].example(rngs[i % len(families)]) for i in range(num_examples)]
