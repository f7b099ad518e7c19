"""DocVQA's metrics (ANLS, exact match), the question-only guesser, and per-system summaries.

ANLS is written here because the `anls` module of the `evaluate` hub uses a similarity as a distance and applies
no threshold.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from docvlm.conversations import as_answers

ANLS_THRESHOLD = 0.5


def normalize(text: str) -> str:
    """DocVQA's normalisation: lowercase, strip, collapse whitespace."""
    return " ".join(str(text).lower().split())


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers, threshold: float = ANLS_THRESHOLD) -> float:
    """Max over gold answers of 1 - NL, where NL = Levenshtein / longer length; 0 when NL >= threshold."""
    pred = normalize(prediction)
    best = 0.0
    for gold in map(normalize, as_answers(answers)):
        longest = max(len(gold), len(pred))
        nl = levenshtein(gold, pred) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def exact_match(prediction: str, answers) -> float:
    return float(normalize(prediction) in {normalize(a) for a in as_answers(answers)})


def question_only_baseline(train_questions, train_answers):
    """A blind guesser: the most common training answer for the same question (or overall). It shows how much
    of a score needs no image at all, so learning to read is not confused with learning the answer prior."""
    by_question = defaultdict(Counter)
    overall = Counter()
    for question, answers in zip(train_questions, train_answers, strict=True):
        answer = as_answers(answers)[0] if as_answers(answers) else ""
        by_question[normalize(question)][answer] += 1
        overall[answer] += 1
    fallback = overall.most_common(1)[0][0] if overall else ""

    def guess(question: str) -> str:
        counts = by_question.get(normalize(question))
        return counts.most_common(1)[0][0] if counts else fallback

    return guess


def summarize(items: list[dict], systems: list[str]) -> dict:
    """Mean ANLS / EM per system, overall and per group."""
    summary = {"count": len(items), "systems": {}}
    for system in systems:
        scores = {
            "anls": sum(i[f"{system}_anls"] for i in items) / max(len(items), 1),
            "exact_match": sum(i[f"{system}_em"] for i in items) / max(len(items), 1),
        }
        if items and f"{system}_stopped" in items[0]:
            scores["stopped"] = sum(i[f"{system}_stopped"] for i in items) / len(items)
        groups = defaultdict(list)
        for item in items:
            if item.get("group") is not None:
                groups[item["group"]].append(item[f"{system}_anls"])
        if groups:
            scores["anls_by_group"] = {g: sum(v) / len(v) for g, v in sorted(groups.items())}
        summary["systems"][system] = scores
    return summary


def score_items(items: list[dict], system: str, predictions: list[dict]) -> None:
    for item, pred in zip(items, predictions, strict=True):
        item[system] = pred["answer"]
        item[f"{system}_anls"] = anls(pred["answer"], item["answers"])
        item[f"{system}_em"] = exact_match(pred["answer"], item["answers"])
        if "stopped" in pred:
            item[f"{system}_stopped"] = pred["stopped"]
