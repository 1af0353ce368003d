"""VQAv2-style answer normalisation shared by every text metric in vlm_lit.eval."""

from __future__ import annotations

import re

# Marks the official VQAv2 evaluation treats as punctuation. Apostrophes, colons and
# periods are deliberately absent: apostrophes belong to contractions, periods have
# their own digit-aware rule below, and colons are kept by the official script.
_PUNCTUATION: tuple[str, ...] = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)

# "1,000" anywhere in the answer switches punctuation from "replace by a space" to "delete",
# so the number survives as "1000" instead of becoming "1 000".
_DIGIT_COMMA = re.compile(r"\d,\d")

# A period is removed unless a digit follows it: "3.5" keeps its decimal point, while
# "yes." and "5." lose the trailing period. (The official regex intends to also protect
# periods *preceded* by a digit, but its look-behind is malformed and never applies; we
# reproduce what it actually does.)
_PERIOD = re.compile(r"\.(?!\d)")

_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Counting answers are compared as digits; "none" counts as zero, as in VQAv2.
_NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}


def _build_contractions() -> dict[str, str]:
    """Map apostrophe-less spellings ("dont", "wouldnt've") to the canonical contraction."""
    canonical = (
        "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't "
        "hadn't've hasn't haven't he'd he'd've he'll he's how'd how'll how's i'd i'd've "
        "i'll i'm i've isn't it'd it'd've it'll it's let's ma'am mightn't mightn't've "
        "might've mustn't must've needn't o'clock oughtn't shan't she'd she'd've she'll "
        "she's should've shouldn't shouldn't've somebody'd someone'd someone'll "
        "something'd that's there'd there're there's they'd they'd've they'll they're "
        "they've wasn't we'd we'd've we'll we're we've weren't what'll what're what's "
        "what've when's where'd where's where've who'd who'll who're who's who've why'll "
        "why're why's won't would've wouldn't wouldn't've y'all you'd you'd've you'll "
        "you're you've"
    ).split()
    table: dict[str, str] = {}
    for word in canonical:
        table[word.replace("'", "")] = word
        # Double contractions are also written with only one apostrophe ("couldnt've",
        # "couldn'tve"); both spellings map to the canonical form.
        if word.count("'") == 2:
            first, second = word.index("'"), word.rindex("'")
            table[word[:first] + word[first + 1 :]] = word
            table[word[:second] + word[second + 1 :]] = word
    # Words whose apostrophe-less form is itself an ordinary English word are not rewritten:
    # "its", "shed", "shell", "well", "were", "wed", "ill", "hell", "id", "lets" and "whore"
    # stay as written, because rewriting them would corrupt correct answers.
    for ordinary in (
        "its",
        "shed",
        "shell",
        "well",
        "were",
        "wed",
        "ill",
        "hell",
        "id",
        "lets",
        "whore",
    ):
        table.pop(ordinary, None)
    return table


_CONTRACTIONS: dict[str, str] = _build_contractions()


def _strip_punctuation(text: str) -> str:
    """Apply the VQAv2 punctuation rules (see the module constants for the why)."""
    delete_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # A mark touching a space ("yes, it is") is deleted; a mark joining two words
        # ("black-and-white") becomes a space so the words stay separate.
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD.sub("", out)


def _digits_articles_contractions(text: str) -> str:
    """Lower-case, map number words to digits, drop articles, canonicalise contractions."""
    words: list[str] = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """Normalise a free-form answer the way the official VQAv2 evaluation does.

    Steps, in order: newlines/tabs become spaces and the ends are stripped; punctuation
    is deleted when it touches a space or when the answer contains a digit-comma-digit
    group ("1,000" -> "1000"), otherwise replaced by a space ("red/blue" -> "red blue");
    periods not followed by a digit are removed ("yes." -> "yes", "3.5" kept); the text
    is lower-cased and split on whitespace; the number words "zero".."ten" (and "none")
    become digits; the articles a/an/the are dropped; apostrophe-less contractions
    ("dont") get their apostrophe back ("don't"). Words are re-joined with one space.

    Example: ``normalize_answer("  The Two dogs.\\n")`` -> ``"2 dogs"``.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_strip_punctuation(text))
