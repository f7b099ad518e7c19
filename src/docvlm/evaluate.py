"""DocVQA metrics (ANLS, exact match), batched greedy generation, and the before/after evaluation report.

ANLS is written here because the `anls` module of the `evaluate` hub uses a similarity as a distance and applies
no threshold.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from docvlm.card import held_out_units, small_held_out_note
from docvlm.collator import Prompt, as_answers, pages_of, prompt_text
from docvlm.families import family_of_processor
from docvlm.modeling import autocast_for

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


@torch.no_grad()
def generate(
    model,
    processor,
    rows,
    prompt: Prompt,
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generating",
    leave: bool = True,
) -> list[dict]:
    """Greedy answers to rows (dicts with `image` and `question`, or `messages`: answered after its last user turn),
    batched with left padding; generation stops where the model's family closes a turn, or at the end of sequence.

    Returns one dict per row: the answer text and whether the model stopped by itself.
    """
    from tqdm.auto import tqdm

    tokenizer = processor.tokenizer
    stop_ids = family_of_processor(processor).stop_ids(tokenizer)
    device = next(p for p in model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    from accelerate import PartialState

    quiet = not PartialState().is_local_main_process  # one progress bar a machine under multi-process launches
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", disable=quiet, leave=leave):
        batch_rows = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        ims = [pages_of(row, f"Item {start + i}") for i, row in enumerate(batch_rows)]
        prompts = [prompt_text(processor, prompt, row, len(pages)) for row, pages in zip(batch_rows, ims, strict=True)]
        batch = processor(text=prompts, images=ims, padding=True, padding_side="left", return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_for(model):
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
        for row in generated[:, batch["input_ids"].shape[1] :].tolist():
            stopped = any(t in stop_ids for t in row)
            if stopped:
                row = row[: min(row.index(t) for t in stop_ids if t in row)]
            outputs.append({"answer": tokenizer.decode(row, skip_special_tokens=True).strip(), "stopped": stopped})
    model.train(was_training)
    return outputs


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


def loss_figure(log_history: list[dict]):
    """Train (and eval) loss against step, or None when nothing was logged.

    The loss falls by orders of magnitude (~10 for a random model to ~0.1), so the y axis is logarithmic: on a
    linear one the whole second half of a run is a flat line at the bottom."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o", label="eval loss", markersize=5)
    if all(loss > 0 for _, loss in train + evals):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (log scale)" if ax.get_yscale() == "log" else "loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_loss(trainer_state: Path, out_png: Path) -> bool:
    """loss.png from trainer_state.json; False when there is nothing to plot."""
    if not trainer_state.is_file():
        return False
    fig = loss_figure(json.loads(trainer_state.read_text()).get("log_history", []))
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(out_png)
    plt.close(fig)
    return True


SYSTEM_TITLES = {
    "blind": "question-only guess (no image)",
    "before": "before (base model)",
    "after": "after (base + adapter)",
}


def write_report(out_dir: Path, items: list[dict], summary: dict, meta: dict) -> str:
    """predictions.jsonl, report.json and report.md (with the loss plot when there is a trainer_state.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.jsonl", "w") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    report = {**meta, **summary}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))

    lines = [
        f"# Evaluation: {meta.get('recipe', '')}",
        "",
        f"{summary['count']} held-out questions from `{meta.get('dataset')}` (split `{meta.get('split')}`), "
        f"model `{meta.get('model')}`, adapter `{meta.get('adapter')}`{adapter_step_text(meta)}.",
        *data_lines(meta, summary["count"]),
        "",
        "| system | ANLS | exact match | stopped at end of answer |",
        "|---|---|---|---|",
    ]
    for system, scores in summary["systems"].items():
        stopped = f"{scores['stopped']:.0%}" if "stopped" in scores else "-"
        lines.append(
            f"| {SYSTEM_TITLES.get(system, system)} | {scores['anls']:.3f} | {scores['exact_match']:.3f} | {stopped} |"
        )
    systems = summary["systems"]
    if "after" in systems and ({"before", "blind"} & set(systems)):
        gains = [
            f"**{systems['after']['anls'] - systems[other]['anls']:+.3f}** over {title}"
            for other, title in (("before", "the base model"), ("blind", "the question-only guess"))
            if other in systems
        ]
        lines += ["", f"ANLS gain: {'; '.join(gains)}."]
    grouped = [s for s in systems if "anls_by_group" in systems[s]]
    if grouped:
        groups = sorted(systems[grouped[0]]["anls_by_group"])
        lines += ["", "ANLS by group:", "", "| group | " + " | ".join(grouped) + " |", "|---|" + "---|" * len(grouped)]
        for g in groups:
            lines.append(
                f"| {g} | " + " | ".join(f"{systems[s]['anls_by_group'].get(g, 0):.3f}" for s in grouped) + " |"
            )
    lines += [
        "",
        f"Generation: {meta['seconds']:.1f} s for {meta['generated']} answers "
        f"({meta['generated'] / max(meta['seconds'], 1e-9):.2f} examples/s) on {meta['device']}.",
    ]
    if plot_loss(out_dir / "trainer_state.json", out_dir / "loss.png"):
        lines += ["", "![training loss](loss.png)"]
    examples = items[:5]
    if examples:
        lines += [
            "",
            "Examples:",
            "",
            "| question | gold | " + " | ".join(summary["systems"]) + " |",
            "|---|---|" + "---|" * len(summary["systems"]),
        ]
        for item in examples:
            cells = [item["question"], " / ".join(as_answers(item["answers"]))] + [
                str(item.get(s, "")) for s in summary["systems"]
            ]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    text = "\n".join(lines) + "\n"
    (out_dir / "report.md").write_text(text)
    return text


class _Rows:
    """The eval split's rows, their pages decoded batch by batch: a DocVQA scan is ~4 MB once decoded."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


class HeldOutScores:
    """ANLS and exact match of the first `count` held-out questions, answered greedily by the model as it is: what
    the trainer logs at each evaluation (eval_anls, eval_exact_match). Each process answers a shard of them."""

    def __init__(self, rows, processor, prompt: Prompt, max_new_tokens: int, batch_size: int, count: int):
        self.rows = rows.select(range(min(count, len(rows))))
        self.processor, self.prompt = processor, prompt
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def __call__(self, model) -> dict[str, float]:
        from accelerate import PartialState
        from accelerate.utils import gather_object

        state = PartialState()
        shard = self.rows
        if state.num_processes > 1:
            shard = shard.shard(num_shards=state.num_processes, index=state.process_index, contiguous=True)
        answers = generate(
            model,
            self.processor,
            _Rows(shard),
            self.prompt,
            self.max_new_tokens,
            self.batch_size,
            desc="held-out ANLS",
            leave=False,  # one bar an evaluation, inside the training bar
        )
        scores = [
            (anls(predicted["answer"], gold), exact_match(predicted["answer"], gold))
            for predicted, gold in zip(answers, shard["answers"], strict=True)
        ]
        if state.num_processes > 1:
            scores = gather_object(scores)
        count = max(len(scores), 1)
        return {"anls": sum(a for a, _ in scores) / count, "exact_match": sum(e for _, e in scores) / count}


def evaluate_model(
    model,
    processor,
    eval_rows,
    prompt: Prompt,
    max_new_tokens: int,
    batch_size: int,
    out_dir: Path,
    meta: dict,
    compare_base: bool = True,
    train_rows=None,
    page_base: Path | None = None,
) -> dict:
    """Generate on eval_rows with the adapter (after) and, if asked, without it (before); write the report, each
    question with its page(s) named (relative to `page_base`, the dataset's folder, or by content digest).

    Under a multi-process launch (DDP: every process holds the whole model) each process answers a contiguous
    shard of the rows and the main process gathers them, so the report is the one a single process writes, once."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from docvlm.data import page_names

    state = PartialState()
    started = time.perf_counter()
    shard = eval_rows
    if state.num_processes > 1:
        shard = eval_rows.shard(num_shards=state.num_processes, index=state.process_index, contiguous=True)
    questions = list(shard["question"])
    rows = _Rows(shard)
    groups = list(shard["group"]) if "group" in shard.column_names else [None] * len(questions)
    pages = page_names(shard, page_base)
    items = [
        {"row": r, "pages": p, "question": q, "answers": a, "group": g}
        for r, p, q, a, g in zip(shard["row"], pages, questions, shard["answers"], groups, strict=True)
    ]
    systems = []
    if train_rows is not None:
        guess = question_only_baseline(train_rows["question"], train_rows["answers"])
        score_items(items, "blind", [{"answer": guess(q)} for q in questions])
        systems.append("blind")
    if compare_base and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            score_items(
                items,
                "before",
                generate(model, processor, rows, prompt, max_new_tokens, batch_size, desc="before (base)"),
            )
        systems.append("before")
    score_items(
        items,
        "after",
        generate(model, processor, rows, prompt, max_new_tokens, batch_size, desc="after (adapter)"),
    )
    systems.append("after")
    if state.num_processes > 1:
        items = sorted(gather_object(items), key=lambda item: item["row"])
    meta = {
        **meta,
        "seconds": time.perf_counter() - started,
        "generated": len(items) * sum(system in ("before", "after") for system in systems),
        "device": str(next(model.parameters()).device),
        "processes": state.num_processes,
    }
    summary = summarize(items, systems)
    if state.is_main_process:
        write_report(out_dir, items, summary, meta)
        print(terminal_summary(summary, meta, out_dir))
    return {**meta, **summary}


def adapter_step_text(meta: dict) -> str:
    """' (step 100, the best eval_anls 0.62)' when the adapter is a best checkpoint's, else ' (step N)'."""
    if "adapter_step" not in meta:
        return ""
    best = meta.get("best_metric")
    if best:
        ((metric, value),) = best.items()
        return f" (step {meta['adapter_step']}: the best evaluation by {metric}, {value:.3f})"
    return f" (step {meta['adapter_step']})"


def data_lines(meta: dict, count: int) -> list[str]:
    """What report.md says of the held-out pages and the skipped rows (from data_report.json's counts)."""
    lines = []
    held = (meta.get("data") or {}).get("held_out")
    if held:
        lines += [
            "",
            f"Held out by eval_split_size: {held_out_units(held)} of {held['units']}, with their "
            f"{held['held_out_questions']} questions, none of them trained on; data_report.json lists them.",
        ]
    skipped = (meta.get("skipped") or {}).get("by_reason") or {}
    if skipped:
        listed = ", ".join(f"{entry['count']} {reason}" for reason, entry in skipped.items())
        lines += ["", f"Skipped before training: {listed} (data_report.json lists every row)."]
    note = small_held_out_note(count)
    return lines + (["", f"**{note}**"] if note else [])


def terminal_summary(summary: dict, meta: dict, out_dir: Path) -> str:
    """The report's headline for the terminal: plain aligned text, with the full report's path."""
    lines = [
        f"Evaluation: {summary['count']} held-out questions from {meta.get('dataset')} (split {meta.get('split')})"
    ]
    for system, scores in summary["systems"].items():
        stopped = f"  stopped {scores['stopped']:.0%}" if "stopped" in scores else ""
        title = SYSTEM_TITLES.get(system, system)
        lines.append(f"  {title:<32} ANLS {scores['anls']:.3f}  exact match {scores['exact_match']:.3f}{stopped}")
    lines.append(f"Full report: {Path(out_dir) / 'report.md'}")
    return "\n".join(lines)


def report_meta(data_args, model_args, adapter_dir: Path, recipe: str) -> dict:
    """What the report says it evaluated; `recipe` is the recipe the command was given."""
    return {
        "recipe": recipe,
        "model": model_args.model_name_or_path,
        "dataset": data_args.dataset_name,
        "split": data_args.dataset_test_split,
        "adapter": Path(adapter_dir).as_posix(),
    }


def load_trained(model_args, training_args, base_path: str, run_dir: Path):
    """A training run's model, whole on this process's device, as `docvlm.train` trained it: the 4-bit base with
    the saved adapter, or the saved full weights when no adapter was trained."""
    from peft import PeftModel

    from docvlm.distributed import whole_model_loading
    from docvlm.modeling import load_model, training_dtype

    dtype = training_dtype(training_args)
    with whole_model_loading():
        if not (Path(run_dir) / "adapter_config.json").is_file():
            return load_model(model_args, dtype, str(run_dir), training_args.trust_remote_code, quantize=False).eval()
        base = load_model(model_args, dtype, base_path, training_args.trust_remote_code)
        return PeftModel.from_pretrained(base, str(run_dir)).eval()


def run_eval(argv: list[str] | None = None) -> dict:
    """`docvlm eval --config recipe.yaml [--adapter DIR]`: before/after report for a trained adapter."""
    from accelerate import PartialState

    from docvlm import tiny
    from docvlm.config import UserError, parse_recipe, recipe_argument
    from docvlm.data import DataReport, dataset_folder, load_splits
    from docvlm.hub import check_recipe_sources
    from docvlm.modeling import load_processor, model_path
    from docvlm.preflight import warn_long_answers
    from docvlm.runtime import disable_cudnn_attention
    from docvlm.screen import screen_split

    data_args, model_args, training_args, eval_args = parse_recipe(argv)
    adapter = Path(eval_args.adapter or training_args.output_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"No adapter in {adapter}: train first (`make train`) or pass --adapter <folder>.")
    out_dir = Path(eval_args.eval_output_dir or adapter / "eval")
    if out_dir.resolve() == adapter.resolve():
        raise UserError(
            f"eval_output_dir is the adapter folder {adapter}, whose report.md is the one training wrote: "
            "leave eval_output_dir unset (<adapter>/eval) or name another folder."
        )
    if (out_dir / "report.json").is_file():
        print(f"Replacing the earlier evaluation in {out_dir}/ (report.md, report.json, predictions.jsonl).")
    check_recipe_sources(model_args, data_args)
    path = model_path(model_args)
    data_report = DataReport(data_args.dataset_name)
    train_rows, eval_rows = load_splits(data_args, report=data_report)
    processor = load_processor(model_args, str(adapter))
    eval_rows, _ = screen_split(
        eval_rows, processor, data_args, training_args.max_length, data_args.dataset_test_split, data_report
    )
    if PartialState().is_main_process:
        data_report.write(out_dir)
    warn_long_answers(processor.tokenizer, eval_rows, eval_args.eval_max_new_tokens)
    if not training_args.cudnn_attention:
        disable_cudnn_attention()  # generation meets a new length at every token
    model = load_trained(model_args, training_args, path, adapter)
    return evaluate_model(
        model,
        processor,
        eval_rows,
        Prompt.of(data_args),
        eval_args.eval_max_new_tokens,
        training_args.per_device_eval_batch_size,
        out_dir,
        {**report_meta(data_args, model_args, adapter, recipe_argument(argv)), **data_report.report_meta()},
        compare_base=eval_args.eval_compare_base,
        train_rows=train_rows,
        page_base=dataset_folder(tiny.resolve(data_args.dataset_name)),
    )
