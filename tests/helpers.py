"""Helpers shared by the tests."""


def quick(output_dir, *extra):
    """Arguments for a few-step run of the tiny recipe."""
    return [
        "--config",
        "recipes/tiny_docvqa.yaml",
        "--output_dir",
        str(output_dir),
        "--max_train_samples",
        "16",
        "--max_eval_samples",
        "8",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
        *extra,
    ]
