"""Training data: which utterances each (language, task) pair uses, and their inputs.

Every check that can fail on the manifest runs here, before a model is loaded: an empty
selection, missing references, audio longer than Whisper's 30 s, and missing audio files
(skipped and counted; an error past a threshold).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..data.manifest import Utterance
from ..errors import LorsError
from ..evaluation.decode import check_references

Pair = tuple[str, str]
"""(language, task), e.g. ``("de", "asr")``."""


@dataclass
class PairData:
    """The train and dev utterances of one (language, task) pair."""

    language: str
    task: str
    train: list[Utterance]
    dev: list[Utterance]

    @property
    def name(self) -> str:
        return f"{self.language}-{self.task}"


@dataclass
class Selection:
    """The pairs' data plus what was skipped on the way."""

    pairs: list[PairData]
    missing_audio: list[str] = field(default_factory=list)
    """``"id: path"`` of each skipped utterance whose audio file is missing."""

    @property
    def utterances(self) -> list[Utterance]:
        """Every selected utterance once (pairs of one language share their audio)."""
        seen: dict[str, Utterance] = {}
        for pair in self.pairs:
            for utt in pair.train + pair.dev:
                seen.setdefault(utt.id, utt)
        return list(seen.values())

    @property
    def longest_seconds(self) -> float:
        return max(u.duration for u in self.utterances)


def select(utterances: Sequence[Utterance], pairs: Sequence[Pair], source: str, *,
           train_split: str = "train", dev_split: str = "dev", limit: int | None = None,
           dev_limit: int | None = None, max_missing_fraction: float = 0.1,
           max_seconds: float = 30.0) -> Selection:
    """Pick each pair's train and dev utterances from a manifest's ``utterances``.

    ``limit``/``dev_limit`` keep the first n of each (manifest order). Utterances whose audio
    file is missing are skipped and counted; more than ``max_missing_fraction`` of the
    selection missing is an error. LorsError, naming the manifest ``source``, for an empty
    train selection, a missing reference, or a clip longer than ``max_seconds``.
    """
    if not pairs:
        raise LorsError("no (language, task) pairs to train on; pass --languages and --tasks")
    chosen, missing, total = [], [], 0
    for language, task in pairs:
        parts = {}
        for split, cap in ((train_split, limit), (dev_split, dev_limit)):
            group = [u for u in utterances if u.language == language and u.split == split]
            group = group[:cap] if cap is not None else group
            total += len(group)
            present = [u for u in group if Path(u.audio).is_file()]
            missing += [(u.id, u.audio) for u in group if not Path(u.audio).is_file()]
            parts[split] = present
        if not parts[train_split]:
            have = Counter((u.language, u.split) for u in utterances)
            found = ", ".join(f"{lang}/{split}: {n}" for (lang, split), n in sorted(have.items()))
            raise LorsError(f"no {train_split} utterances with audio for {language}/{task} in "
                            f"{source} (it has {found or 'nothing'}); check --languages, "
                            "the split names and the audio paths")
        for utt in parts[train_split] + parts[dev_split]:
            _check_utterance(utt, task, source, max_seconds)
        chosen.append(PairData(language, task, parts[train_split], parts[dev_split]))
    if total and len(missing) / total > max_missing_fraction:
        raise LorsError(f"{len(missing)} of {total} selected utterances in {source} have no audio "
                        f"file (first: {missing[0][1]}), more than the allowed "
                        f"{max_missing_fraction:.0%}; fix the paths or re-render the speech")
    return Selection(chosen, sorted({uid: f"{uid}: {audio}" for uid, audio in missing}.values()))


def _check_utterance(utt: Utterance, task: str, source: str, max_seconds: float) -> None:
    check_references([utt], task, source)
    if utt.duration > max_seconds:
        raise LorsError(f"utterance {utt.id!r} in {source} is {utt.duration:.1f} s long; Whisper "
                        f"takes at most {max_seconds:g} s. Split or drop it")


def disjoint_training(utterances: Sequence[Utterance], languages: Sequence[str], source: str,
                      needed: int | None = None, split: str = "train") -> list[Utterance]:
    """``utterances`` with each sentence trained on in one language only (as in CoVoST 2,
    where every language has its own sentences).

    A sentence is identified by its English translation (the rows of a parallel bank share
    it), else by its transcript. The ``split`` sentences that several of ``languages`` hold
    are dealt out in turn, in order of first appearance, to the languages that hold them;
    each language keeps only its own. Other splits and languages are unchanged. LorsError,
    before any training, when a language would keep fewer than ``needed`` (or no) sentences.
    """
    wanted = set(languages)
    holders: dict[str, list[str]] = {}
    for utt in utterances:
        if utt.split == split and utt.language in wanted:
            holders.setdefault(utt.translation or utt.transcript, []).append(utt.language)
    owner = {}
    dealt = Counter()
    for key, langs in holders.items():
        ordered = sorted(set(langs), key=list(languages).index)
        owner[key] = min(ordered, key=lambda lang: (dealt[lang], ordered.index(lang)))
        dealt[owner[key]] += 1
    kept = [u for u in utterances if u.split != split or u.language not in wanted
            or owner[u.translation or u.transcript] == u.language]
    counts = Counter(u.language for u in kept if u.split == split and u.language in wanted)
    short = {lang: counts[lang] for lang in languages if counts[lang] < max(needed or 1, 1)}
    if short:
        raise LorsError(f"data.disjoint_languages: {source} has {len(holders)} distinct {split} "
                        f"sentences for {len(wanted)} languages, so each keeps about "
                        f"{len(holders) // max(len(wanted), 1)}: "
                        + ", ".join(f"{lang} {n}" for lang, n in short.items())
                        + (f", fewer than train_per_pair = {needed}" if needed else "")
                        + f". Lower train_per_pair, use fewer languages, or a corpus with at "
                        f"least {len(wanted) * max(needed or 1, 1)} {split} sentences")
    return kept
