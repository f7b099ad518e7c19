"""DocVQA metrics (ANLS, exact match), batched greedy generation, and the before/after evaluation report.

ANLS is written here because the `anls` module of the `evaluate` hub uses a similarity as a distance and applies
no threshold.
"""

from __future__ import annotations

import time
from pathlib import Path

from docvlm.evaluation.generation import _Rows, generate
from docvlm.evaluation.metrics import anls, exact_match, question_only_baseline, score_items, summarize
from docvlm.evaluation.report import report_meta, terminal_summary, write_report
from docvlm.prompts import Prompt


class HeldOutScores:
    """ANLS and exact match of the first `count` held-out questions, answered greedily by the model as it is: what
    the trainer logs at each evaluation (eval_anls, eval_exact_match). Each process answers a shard of them."""

    def __init__(self, rows, processor, prompt: Prompt, max_new_tokens: int, batch_size: int, count: int, **options):
        """`options`: generate's workers, sort_by_length and features."""
        self.rows = rows.select(range(min(count, len(rows))))
        self.processor, self.prompt = processor, prompt
        self.max_new_tokens, self.batch_size, self.options = max_new_tokens, batch_size, options

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
            texts=_texts(shard),
            **self.options,
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
    **options,
) -> dict:
    """Generate on eval_rows with the adapter (after) and, if asked, without it (before); write the report, each
    question with its page(s) named (relative to `page_base`, the dataset's folder, or by content digest).
    `options`: generate's workers, sort_by_length and features (a vision feature cache: each page through the tower
    once, for both passes).

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
    options = {"texts": _texts(shard), **options}
    features = options.get("features")
    counted = (features.misses, features.hits) if features is not None else None  # a training's cache counts on
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
                generate(model, processor, rows, prompt, max_new_tokens, batch_size, "before (base)", **options),
            )
        systems.append("before")
    score_items(
        items,
        "after",
        generate(model, processor, rows, prompt, max_new_tokens, batch_size, "after (adapter)", **options),
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
        "batch_size": batch_size,
    }
    if features is not None:  # this process's: pages the tower computed, and pages read back for another question
        meta["tower_pages_computed"] = features.misses - counted[0]
        meta["tower_pages_read"] = features.hits - counted[1]
    summary = summarize(items, systems)
    if state.is_main_process:
        write_report(out_dir, items, summary, meta)
        print(terminal_summary(summary, meta, out_dir))
    return {**meta, **summary}


def _texts(rows) -> list[dict]:
    """Each row without its pages, for ordering rows by prompt length without decoding a page."""
    return rows.remove_columns([name for name in ("image",) if name in rows.column_names]).to_list()


def generation_options(training_args, eval_args, features=None) -> dict:
    """generate's options as the recipe sets them: its DataLoader workers, length sorting and feature cache."""
    return {
        "workers": training_args.dataloader_num_workers,
        "sort_by_length": eval_args.eval_sort_by_length,
        "features": features,
    }


def load_trained(model_args, training_args, base_path: str, run_dir: Path):
    """A training run's model, whole on this process's device, as `docvlm.train` trained it: the 4-bit base with
    the saved adapter, or the saved full weights when no adapter was trained."""
    from peft import PeftModel

    from docvlm.modes import whole_model_loading
    from docvlm.training.modeling import load_model
    from docvlm.training.precision import training_dtype

    dtype = training_dtype(training_args)
    with whole_model_loading():
        if not (Path(run_dir) / "adapter_config.json").is_file():
            return load_model(model_args, dtype, str(run_dir), training_args.trust_remote_code, quantize=False).eval()
        base = load_model(model_args, dtype, base_path, training_args.trust_remote_code)
        return PeftModel.from_pretrained(base, str(run_dir)).eval()


def run_eval(argv: list[str] | None = None) -> dict:
    """`docvlm eval --config recipe.yaml [--adapter DIR]`: before/after report for a trained adapter."""
    from accelerate import PartialState

    from docvlm import speedups
    from docvlm.errors import UserError
    from docvlm.prepare import prepare
    from docvlm.recipe.parse import parse_recipe

    recipe = parse_recipe(argv)
    data_args, model_args, training_args, eval_args = recipe
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
    # the training rows are read for the blind-guess baseline only: not screened
    prepared = prepare(recipe, screen_train=False, processor_path=str(adapter), check_targets=False)
    if PartialState().is_main_process:
        prepared.data_report.write(out_dir)
    # process-wide settings, such as the attention kernel: generation meets a new length at every token
    switches = speedups.apply(speedups.BEFORE_LOADING, speedups.SwitchContext(training_args, prepared.family))
    model = load_trained(model_args, training_args, prepared.path, adapter)
    # the switches that make the model answer as it was trained, and serve pages as training did (the cache)
    switches.model = model.get_base_model() if hasattr(model, "get_base_model") else model
    speedups.apply_for_evaluation(switches)
    return evaluate_model(
        model,
        prepared.processor,
        prepared.eval_rows,
        prepared.prompt,
        eval_args.eval_max_new_tokens,
        training_args.per_device_eval_batch_size,
        out_dir,
        {**report_meta(data_args, model_args, adapter, recipe.source), **prepared.data_report.report_meta()},
        compare_base=eval_args.eval_compare_base,
        train_rows=prepared.train_rows,
        page_base=prepared.page_base(),
        **generation_options(training_args, eval_args, switches.cache),
    )
