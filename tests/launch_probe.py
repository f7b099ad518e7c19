"""Launched by tests/training/test_launch.py under a multi-process accelerate config: train the tiny recipe, then
compare the trained model's logits (sharded under ZeRO-3 / FSDP) with those of the adapter it saved, reloaded
whole, and with the base model (the control); the main process writes {"reload_max_logit_diff": ...,
"reload_base_max_logit_diff": ...} to the JSON file named first.

    accelerate launch --config_file accelerate_configs/<x>.yaml tests/launch_probe.py out.json --config ...
"""

import json
import sys

from benchmarks.bench import reload_logit_difference
from docvlm import train


def main() -> None:
    result_file, *argv = sys.argv[1:]
    trainer, _ = train.run(argv)
    difference = reload_logit_difference(trainer, trainer.train_dataset)
    if trainer.accelerator.is_main_process:
        with open(result_file, "w") as handle:
            json.dump(difference, handle)


if __name__ == "__main__":
    main()
