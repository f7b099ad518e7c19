"""compile_text_layers: what compiling leaves alive after the first step is kept out of the collector's walks."""


def test_garbage_alive_after_the_first_step_is_frozen_once():
    import gc

    from transformers import TrainerControl, TrainerState, TrainingArguments

    from docvlm.speedups.compile_layers import freeze_garbage_after_first_step

    callback, state = freeze_garbage_after_first_step(), TrainerState()
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    gc.unfreeze()
    try:
        state.global_step = 1
        callback.on_step_end(args, state, TrainerControl())
        frozen = gc.get_freeze_count()
        assert frozen > 0  # what the first step left alive is out of the collector's reach
        garbage = [object() for _ in range(1000)]
        state.global_step = 2
        callback.on_step_end(args, state, TrainerControl())
        assert gc.get_freeze_count() == frozen  # later steps' objects are collected as usual
        del garbage
    finally:
        gc.unfreeze()
