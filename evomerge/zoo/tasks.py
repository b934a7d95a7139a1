"""The zoo's skills, as generated text: each example is a prompt, the right answer and three
near-miss distractors (lm-eval scores the four choices by log-likelihood).

- add:        "47+18=" -> " 65"                   (two-digit addition)
- cipher:     "enc 4071=" -> " rqup"              (digits written in the cipher alphabet)
- reverse:    "rev 83920=" -> " 02938"            (string reversal)
- cipher_add: "add ru+qi=" -> " ut"               (addition written in the cipher: needs two
                                                   skills at once; no expert is trained on it)
- enc_add:    "enc 47+18=" -> " yt"               (a sum answered in the cipher)
- decode:     "dec rqup=" -> " 4071"              (cipher letters read back as digits)
- dec_add:    "add ru+qi=" -> " 65"               (a sum of numbers written in the cipher,
                                                   answered in digits)
- read:       "rev мбд=" -> " 207"                (numbers written in Cyrillic letters, one
                                                   letter a digit, read by five tasks: dec,
                                                   rev, max, first, last; answered in digits)
- cy_add:     "кд+мб=" -> " 122"                  (the real zoo's composition target: a sum
                                                   in add's own syntax, its numbers in the
                                                   letters read knows; no expert is trained
                                                   on it)

The Cyrillic letters are one token each and never merge in SmolLM2's tokenizer, so a number in
letters has as many tokens as in digits; the Latin cipher's pairs merge ("ru", "qi").
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

CIPHER = "qwertyuiop"  # digit d is written CIPHER[d]
LETTERS = "бгджзклмнп"  # digit d is written LETTERS[d] in the read tasks and cy_add
SKILLS = ("add", "cipher", "reverse")
TARGET = "cipher_add"


def encode(digits: str) -> str:
    return "".join(CIPHER[int(d)] for d in digits)


def in_letters(text: str) -> str:
    """Every digit of `text` written as its Cyrillic letter; the rest kept."""
    return "".join(LETTERS[int(c)] if c.isdigit() else c for c in text)


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    distractors: tuple[str, str, str]

    @property
    def key(self) -> str:
        return self.prompt


def _distinct(rng: random.Random, answer: str, make: Callable[[], str]) -> tuple[str, str, str]:
    out: list[str] = []
    while len(out) < 3:
        candidate = make()
        if candidate != answer and candidate not in out and candidate:
            out.append(candidate)
    return tuple(out)  # type: ignore[return-value]


def _near_number(rng: random.Random, value: int) -> str:
    return str(max(0, value + rng.choice([-11, -10, -9, -2, -1, 1, 2, 9, 10, 11])))


def _mutate(rng: random.Random, text: str, alphabet: str) -> str:
    i = rng.randrange(len(text))
    return text[:i] + rng.choice(alphabet.replace(text[i], "")) + text[i + 1 :]


def _sum(rng: random.Random, prompt: Callable[[int, int], str]) -> Example:
    """Two two-digit numbers, their sum in digits, near misses as distractors."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    answer = str(a + b)
    return Example(
        prompt(a, b),
        f" {answer}",
        tuple(f" {d}" for d in _distinct(rng, answer, lambda: _near_number(rng, a + b))),
    )


def add(rng: random.Random) -> Example:
    return _sum(rng, lambda a, b: f"{a}+{b}=")


def cipher(rng: random.Random) -> Example:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5)))
    answer = encode(digits)
    return Example(
        f"enc {digits}=",
        f" {answer}",
        tuple(f" {d}" for d in _distinct(rng, answer, lambda: _mutate(rng, answer, CIPHER))),
    )


def reverse(rng: random.Random) -> Example:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5)))
    answer = digits[::-1]
    return Example(
        f"rev {digits}=",
        f" {answer}",
        tuple(
            f" {d}"
            for d in _distinct(
                rng,
                answer,
                lambda: _mutate(rng, answer, "0123456789") if rng.random() < 0.7 else digits,
            )
        ),
    )


def cipher_add(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    answer = encode(str(a + b))
    return Example(
        f"add {encode(str(a))}+{encode(str(b))}=",
        f" {answer}",
        tuple(
            f" {encode(d)}" for d in _distinct(rng, str(a + b), lambda: _near_number(rng, a + b))
        ),
    )


def enc_add(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    answer = encode(str(a + b))
    return Example(
        f"enc {a}+{b}=",
        f" {answer}",
        tuple(
            f" {encode(d)}" for d in _distinct(rng, str(a + b), lambda: _near_number(rng, a + b))
        ),
    )


def decode(rng: random.Random) -> Example:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5)))
    return Example(
        f"dec {encode(digits)}=",
        f" {digits}",
        tuple(f" {d}" for d in _distinct(rng, digits, lambda: _mutate(rng, digits, "0123456789"))),
    )


def dec_add(rng: random.Random) -> Example:
    return _sum(rng, lambda a, b: f"add {encode(str(a))}+{encode(str(b))}=")


def _digits(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5)))


def _reading(rng: random.Random, written: Callable[[str], str]) -> Example:
    """One of the five reading tasks, its numbers written by `written`."""
    kind = rng.choice(("dec", "rev", "max", "first", "last"))
    if kind == "max":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        answer = str(max(a, b))
        near = lambda: str(min(a, b)) if rng.random() < 0.4 else _near_number(rng, max(a, b))  # noqa: E731
        prompt = f"max {written(f'{a},{b}')}="
    else:
        digits = _digits(rng)
        if kind in ("first", "last"):
            answer = digits[0] if kind == "first" else digits[-1]
            near = lambda: rng.choice("0123456789")  # noqa: E731
        else:
            answer = digits if kind == "dec" else digits[::-1]
            near = lambda: _mutate(rng, answer, "0123456789")  # noqa: E731
        prompt = f"{kind} {written(digits)}="
    return Example(prompt, f" {answer}", tuple(f" {d}" for d in _distinct(rng, answer, near)))


def read(rng: random.Random) -> Example:
    return _reading(rng, in_letters)


def read_digits(rng: random.Random) -> Example:
    """The reading tasks in plain digits: what the read expert's adapters learn first, before
    its letters' embeddings learn to stand for the digits."""
    return _reading(rng, str)


def cy_add(rng: random.Random) -> Example:
    return _sum(rng, lambda a, b: f"{in_letters(str(a))}+{in_letters(str(b))}=")


GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "add": add,
    "cipher": cipher,
    "reverse": reverse,
    "cipher_add": cipher_add,
    "enc_add": enc_add,
    "decode": decode,
    "dec_add": dec_add,
    "read": read,
    "read_digits": read_digits,
    "cy_add": cy_add,
}


def split(task: str, seed: int, sizes: dict[str, int], exclude: set[str] = frozenset()):
    """Disjoint named splits of one task (no prompt appears twice, none from `exclude`)."""
    rng = random.Random(f"{task}:{seed}")
    seen = set(exclude)
    out: dict[str, list[Example]] = {}
    for name, size in sizes.items():
        examples = []
        while len(examples) < size:
            example = GENERATORS[task](rng)
            if example.key not in seen:
                seen.add(example.key)
                examples.append(example)
        out[name] = examples
    return out


def noise_line(rng: random.Random) -> str:
    """Pre-training text: the tasks' surface forms with random (mostly wrong) answers, so the
    base knows the formats and the alphabet but none of the skills."""
    kind = rng.choice(["add", "enc", "rev", "cadd", "digits", "letters"])
    digits = lambda n: "".join(rng.choice("0123456789") for _ in range(n))  # noqa: E731
    if kind == "add":
        return f"{rng.randint(10, 99)}+{rng.randint(10, 99)}= {rng.randint(20, 198)}"
    if kind == "enc":
        return f"enc {digits(rng.randint(3, 5))}= {encode(digits(rng.randint(3, 5)))}"
    if kind == "rev":
        return f"rev {digits(rng.randint(3, 5))}= {digits(rng.randint(3, 5))}"
    if kind == "cadd":
        return f"add {encode(digits(2))}+{encode(digits(2))}= {encode(digits(rng.randint(2, 3)))}"
    if kind == "digits":
        return " ".join(digits(rng.randint(1, 5)) for _ in range(rng.randint(2, 6)))
    return " ".join(encode(digits(rng.randint(1, 5))) for _ in range(rng.randint(2, 6)))
