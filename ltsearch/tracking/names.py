"""Keys MLflow accepts, whatever the user named a row, a column, a sweep or a metric.

Why: MLflow refuses a param, metric or tag key outside `[A-Za-z0-9_./\\- :]`, one that reads as another path
(`a//b`, `a/`, `./a`) or one over 250 characters, and it refuses the whole request with it: an ablation whose
rows are named like a paper's table (`+ RSG`, `λ=0.5`) lost every param of its parent run. The store's writer
maps each key here before it leaves ltsearch (store.py), and readers map the keys they look up the same way.

The rules, chosen so that the same name gives the same key on every machine and in every run:
1. A key valid everywhere MLflow runs is kept as it is: ASCII letters, digits, `_ - . /` and space, no path
   that normalises to another, at most 250 characters. (Linux also takes `:` and non-ASCII letters; a Windows
   client refuses `:`, and ASCII keys are typed the same in every search filter.)
2. Other characters are spelled out: `+` plus, `=` eq, `<` lt, `>` gt, `*` and `×` times, `%` pct, `&` and,
   `|` or, `±` pm, `≤` le, `≥` ge, `≠` ne, `→` to, Greek letters by name (`λ` lambda, `Λ` Lambda); a spelled-out
   word is joined to a neighbouring letter or digit by `_` (`λ=0.5` -> `lambda_eq_0.5`). Accents are dropped
   (`é` -> `e`), other whitespace becomes a space, other punctuation (`( ) [ ] : , ' "` ...) becomes `_`, and any
   other character is its code point (`中` -> `u4e2d`).
3. Path segments that are empty, `.` or `..` become `_`; a key is never empty.
4. A key cut to 250 characters ends in `-` and the first 8 hex digits of the SHA-256 of the original name.
5. Within one set of keys (one request: a run's params, one write of tags or metrics), two names never share a
   key: when spelled-out names meet each other or a kept name, each spelled-out one ends in `-` and 8 hex digits
   of its own SHA-256 (more in the unlikely case that it still meets another). A name needing no suffix gets none.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import unicodedata
from typing import Iterable

#: MLflow's MAX_ENTITY_KEY_LENGTH (mlflow/utils/validation.py); run names share it (the runs.name column)
MAX_KEY_LENGTH = 250
#: the artifact holding a run's whole mapping, original name -> MLflow key
NAMES_FILE = "ltsearch_names.json"
HASH_DIGITS = 8
_VALID = re.compile(r"[A-Za-z0-9_./\- ]+")
_WORDS = {"+": "plus", "=": "eq", "<": "lt", ">": "gt", "*": "times", "×": "times", "%": "pct", "&": "and", "|": "or",
          "±": "pm", "≤": "le", "≥": "ge", "≠": "ne", "→": "to", "∞": "inf", "−": "minus"}
_GREEK_SPELLING = {"lamda": "lambda"}  # Unicode's name for λ


def is_valid_key(name: str) -> bool:
    """True when MLflow takes `name` as a param, metric and tag key on every platform (rule 1)."""
    norm = posixpath.normpath(name)
    return (0 < len(name) <= MAX_KEY_LENGTH and _VALID.fullmatch(name) is not None and norm == name
            and norm != "." and not norm.startswith(("..", "/")))


def mlflow_key(name: str) -> str:
    """The key one name gets on its own (rules 1-4); what a reader looks up, e.g. `best/<objective>`."""
    if is_valid_key(name):
        return name
    key = _paths(_spelled(name))
    return key if len(key) <= MAX_KEY_LENGTH else _suffixed(key, name, HASH_DIGITS)


def mlflow_keys(names: Iterable[str]) -> dict[str, str]:
    """Each name's key, never two alike (rule 5); depends on the set of names, never on their order."""
    wanted = {name: mlflow_key(name) for name in sorted(set(names))}
    count: dict[str, int] = {}
    for key in wanted.values():
        count[key] = count.get(key, 0) + 1
    taken = {key for name, key in wanted.items() if count[key] == 1 or key == name}
    out: dict[str, str] = {}
    for name, key in wanted.items():
        if count[key] > 1 and key != name:
            key = _unique(key, name, taken)
            taken.add(key)
        out[name] = key
    return out


def mlflow_run_name(name: str) -> str:
    """A run name: any characters, but at most 250 of them (the store's column); a cut one ends in its hash."""
    return name if len(name) <= MAX_KEY_LENGTH else _suffixed(name, name, HASH_DIGITS)


def _unique(key: str, name: str, taken: set[str]) -> str:
    digits = HASH_DIGITS
    while (candidate := _suffixed(key, name, digits)) in taken:
        digits += 4
    return candidate


def _suffixed(key: str, name: str, digits: int) -> str:
    suffix = "-" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:digits]
    return key[: MAX_KEY_LENGTH - len(suffix)] + suffix


def _spelled(name: str) -> str:
    """Rule 2: each character as itself, a word, `_` or a space; words are set apart from letters and digits by `_`."""
    out = ""
    after_word = False
    for char in name:
        text, word = _character(char)
        if text and out and (word and out[-1].isalnum() or after_word and text[0].isalnum()):
            out += "_"
        out += text
        after_word = word and bool(text)
    return out


def _character(char: str) -> tuple[str, bool]:
    """(its spelling, whether that is a word to set apart)."""
    if _VALID.fullmatch(char):
        return char, False
    if char in _WORDS:
        return _WORDS[char], True
    if char.isspace():
        return " ", False
    if char.isascii():
        return "_", False
    plain = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
    if plain and plain != char and all(c.isascii() for c in plain):
        return _spelled(plain), not plain.isalnum()
    described = unicodedata.name(char, "").split()
    if described[:1] == ["GREEK"] and "LETTER" in described:
        letter = described[described.index("LETTER") + 1].lower()
        letter = _GREEK_SPELLING.get(letter, letter)
        return (letter.capitalize() if "CAPITAL" in described else letter), True
    return f"u{ord(char):04x}", True


def _paths(key: str) -> str:
    """Rule 3: no segment MLflow would read as another path."""
    parts = ["_" if part in ("", ".", "..") else part for part in key.split("/")]
    joined = "/".join(parts)
    return "_" + joined if joined.startswith("..") else joined
