"""Real labelled text for the MiniLM quality suite, read from installed packages only.

Every label comes from a human-made or measured resource shipped in a package, never
from templates, so the tasks carry real noise and real structure:

- ``sentiment``: VADER's lexicon (vaderSentiment), ~7500 words and emoticons with the mean
  valence human raters gave them; positive vs negative, near-neutral (|v| < 0.5) dropped.
- ``name_gender``: first names of gender_guesser's data file (Joerg Michael's nam_dict),
  male vs female; names the file marks ambiguous or mostly-one-gender dropped.
- ``name_origin``: the same file's per-country frequency columns; a name is labelled with
  the region group of the countries it is used in, kept only when that is ONE group.
- ``langid``: wordfreq's top words of six languages; a word is kept only when none of the
  other five languages has it among its top 50k (accents stripped, as the tokenizer does).
- ``word_freq``: English words of wordfreq in three Zipf-frequency bands with gaps between
  them (common / mid / rare), so each label is a clear-cut measured fact.

Examples are deduplicated under the tokenizer's own normalization (lower case, accents
stripped): two spellings that reach the model as the same input can neither straddle a
split nor carry two labels. Classes are balanced (each class as large as the smallest,
capped), so chance is 1 / classes, and splits are drawn with a fixed seed per task.
"""

from __future__ import annotations

import random
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

SPLITS = ("train", "val", "test")
MAX_TRAIN = 3000
MAX_EVAL = 600
"""Caps of the train and of each evaluation split (val, test), summed over classes."""
EVAL_FRACTION = 0.2
"""Share of each class held out for val and again for test (when the caps allow)."""


@dataclass(frozen=True)
class TaskData:
    """One task's splits: texts and integer labels indexing ``classes``."""

    name: str
    classes: tuple[str, ...]
    texts: dict[str, list[str]]
    labels: dict[str, list[int]]

    def size(self, split: str) -> int:
        return len(self.labels[split])


def normalize(text: str) -> str:
    """What the uncased BERT tokenizer sees: lower case, accents (combining marks) stripped."""
    decomposed = unicodedata.normalize("NFD", text.lower())
    return "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn")


def _dedupe(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """class -> texts, one text per normalized form; forms seen with two labels dropped."""
    first: dict[str, tuple[str, str]] = {}
    conflicted: set[str] = set()
    for text, label in sorted(pairs):
        key = normalize(text)
        if not key.strip():
            continue
        if key in first:
            if first[key][1] != label:
                conflicted.add(key)
            continue
        first[key] = (text, label)
    by_class: dict[str, list[str]] = defaultdict(list)
    for key, (text, label) in first.items():
        if key not in conflicted:
            by_class[label].append(text)
    return by_class


def _split(name: str, by_class: dict[str, list[str]]) -> TaskData:
    """Balanced, seeded train / val / test split of class -> texts."""
    classes = tuple(sorted(by_class))
    k = len(classes)
    n = min(len(v) for v in by_class.values())
    n_eval = min(int(n * EVAL_FRACTION), MAX_EVAL // k)
    n_train = min(n - 2 * n_eval, MAX_TRAIN // k)
    rng = random.Random(f"minilm-suite/{name}")
    parts: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for label, cls in enumerate(classes):
        items = sorted(by_class[cls])
        rng.shuffle(items)
        parts["val"] += [(t, label) for t in items[:n_eval]]
        parts["test"] += [(t, label) for t in items[n_eval : 2 * n_eval]]
        parts["train"] += [(t, label) for t in items[2 * n_eval : 2 * n_eval + n_train]]
    for rows in parts.values():
        rng.shuffle(rows)
    return TaskData(
        name=name,
        classes=classes,
        texts={s: [t for t, _ in rows] for s, rows in parts.items()},
        labels={s: [y for _, y in rows] for s, rows in parts.items()},
    )


# --------------------------------------------------------------------------- sources


def _sentiment() -> dict[str, list[str]]:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    lexicon: dict[str, float] = SentimentIntensityAnalyzer().lexicon
    pairs = [(w, "positive" if v > 0 else "negative") for w, v in lexicon.items() if abs(v) >= 0.5]
    return _dedupe(pairs)


NAME_REGIONS: dict[str, tuple[str, ...]] = {
    "english": ("great_britain", "ireland", "usa"),
    "romance": (
        "italy",
        "malta",
        "portugal",
        "spain",
        "france",
        "belgium",
        "luxembourg",
        "romania",
    ),
    "germanic": ("the_netherlands", "east_frisia", "germany", "austria", "swiss"),
    "nordic": ("iceland", "denmark", "norway", "sweden", "finland", "estonia"),
    "slavic_baltic": (
        "latvia",
        "lithuania",
        "poland",
        "czech_republic",
        "slovakia",
        "bulgaria",
        "bosniaand",
        "croatia",
        "kosovo",
        "macedonia",
        "montenegro",
        "serbia",
        "slovenia",
        "russia",
        "belarus",
        "moldova",
        "ukraine",
    ),
    "turkic_arabic": ("turkey", "arabia", "azerbaijan", "the_stans", "albania"),
    "east_asian": ("china", "japan", "korea", "vietnam"),
}
"""Region groups of gender_guesser's country columns (countries left out: too mixed)."""


@cache
def _names() -> list[tuple[str, str, list[str]]]:
    """(gender code, name, countries the name is used in) of every nam_dict entry."""
    import gender_guesser
    from gender_guesser.detector import Detector

    path = Path(gender_guesser.__file__).parent / "data" / "nam_dict.txt"
    countries: list[str] = list(Detector.COUNTRIES)
    out: list[tuple[str, str, list[str]]] = []
    # Lines end in "$\r\n"; splitlines() also splits on "\r", leaving "...$" lines.
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line or line[0] in "#=":
            continue
        code, name = line.split()[:2]
        cols = line[30 : 30 + len(countries)]
        used = [countries[i] for i, ch in enumerate(cols) if not ch.isspace()]
        # "+" joins the parts of compound names ("Abdel+Aziz"), as the detector reads them.
        out.append((code, name.replace("+", " "), used))
    return out


def _name_gender() -> dict[str, list[str]]:
    genders = {"M": "male", "F": "female"}
    return _dedupe((name, genders[code]) for code, name, _ in _names() if code in genders)


def _name_origin() -> dict[str, list[str]]:
    region_of = {c: r for r, cs in NAME_REGIONS.items() for c in cs}
    pairs = []
    for _, name, used in _names():
        regions = {region_of.get(c, "") for c in used}
        if len(regions) == 1 and "" not in regions:
            pairs.append((name, regions.pop()))
    return _dedupe(pairs)


LANGS = ("de", "en", "es", "fr", "it", "nl")
LANG_TOP = 20000
LANG_EXCLUSIVE = 50000


def _is_word(w: str) -> bool:
    return len(w) >= 3 and w.isalpha()


def _langid() -> dict[str, list[str]]:
    from wordfreq import top_n_list

    wide = {lang: {normalize(w) for w in top_n_list(lang, LANG_EXCLUSIVE)} for lang in LANGS}
    pairs = []
    for lang in LANGS:
        others = set().union(*(wide[o] for o in LANGS if o != lang))
        for w in top_n_list(lang, LANG_TOP):
            if _is_word(w) and normalize(w) not in others:
                pairs.append((w, lang))
    return _dedupe(pairs)


FREQ_BANDS: dict[str, tuple[float, float]] = {
    "common": (4.3, 9.0),
    "mid": (3.3, 3.7),
    "rare": (2.3, 2.6),
}
"""Zipf-frequency bands (log10 per billion words) of the word_freq classes, with gaps."""


def _word_freq() -> dict[str, list[str]]:
    from wordfreq import top_n_list, zipf_frequency

    pairs = []
    for w in top_n_list("en", 120000):
        if not (_is_word(w) and w.isascii()):
            continue
        z = zipf_frequency(w, "en")
        for band, (lo, hi) in FREQ_BANDS.items():
            if lo <= z < hi:
                pairs.append((w, band))
    return _dedupe(pairs)


SOURCES: dict[str, Callable[[], dict[str, list[str]]]] = {
    "sentiment": _sentiment,
    "name_gender": _name_gender,
    "name_origin": _name_origin,
    "langid": _langid,
    "word_freq": _word_freq,
}


@cache
def load_task(name: str) -> TaskData:
    """The task's balanced, seeded splits (same content in every process)."""
    if name not in SOURCES:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(SOURCES)}")
    return _split(name, SOURCES[name]())
