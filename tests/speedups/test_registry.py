"""The registry of memory and speed switches (docvlm.speedups): each switch is declared once, in its own module, and
everything else is made from the declarations: the recipe's fields and help, the checks when a recipe is read, what
a launch mode or a machine without a GPU does to it, the family refusals, the application and the plan."""

import functools
import re
from pathlib import Path

import pytest

from docvlm import speedups
from docvlm.errors import UserError
from docvlm.recipe.parse import parse_recipe

ROOT = Path(__file__).resolve().parents[2]
# Where a switch's field may be named besides its declaration: what users set and read, and what checks it.
OUTSIDE_THE_PACKAGE = ("tests", "docs", "recipes", "benchmarks", "README.md", "accelerate_configs")


def declaration_file(setting_name: str) -> Path:
    switch = switch_of(setting_name)
    module = next(m for m in vars(speedups).values() if getattr(m, "__file__", None) and _declares(m, switch))
    return Path(module.__file__).resolve()


def _declares(module, switch) -> bool:
    return any(value is switch for value in vars(module).values())


@functools.cache
def repository_texts() -> dict[Path, str]:
    """Every text file of the repository: its code, tests, docs and recipes."""
    texts = {}
    for folder in ("src", "tests", "docs", "recipes", "benchmarks", "accelerate_configs"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".md", ".yaml", ".yml") and "egg-info" not in str(path):
                texts[path.resolve()] = path.read_text(errors="replace")
    texts[(ROOT / "README.md").resolve()] = (ROOT / "README.md").read_text()
    return texts


def files_naming(name: str) -> list[Path]:
    """Every text file of the repository that names the field."""
    pattern = re.compile(rf"\b{name}\b")
    return [path for path, text in repository_texts().items() if pattern.search(text)]


SETTINGS = [setting.name for switch in speedups.SWITCHES for setting in switch.settings]


def switch_of(setting_name: str):
    return next(s for s in speedups.SWITCHES if setting_name in [x.name for x in s.settings])


@pytest.mark.parametrize("name", SETTINGS)
def test_a_switch_is_named_in_the_package_only_where_it_is_declared(name):
    """Adding a switch touches one module plus its tests (and the docs and recipes that use it). In the package,
    its field is named in its own module, and in the module of a switch that declares it needs this one or must
    follow it."""
    declared = declaration_file(name)
    this = switch_of(name).name
    needing = {
        declaration_file(s.name) for s in speedups.SWITCHES if (s.requires and s.requires[0] == this) or this in s.after
    }
    elsewhere = [p.relative_to(ROOT) for p in files_naming(name) if p != declared and p not in needing]
    inside = [str(p) for p in elsewhere if p.parts[0] not in OUTSIDE_THE_PACKAGE]
    print(f"{name}: {declared.relative_to(ROOT)}; also {', '.join(map(str, elsewhere)) or 'nowhere'}")
    assert inside == [], f"{name} ({declared.relative_to(ROOT)}) is also named in {inside}"


def test_the_recipe_fields_come_from_the_declarations_with_their_defaults_and_help():
    from dataclasses import fields

    from docvlm.recipe.schema import TrainConfig

    by_name = {f.name: f for f in fields(TrainConfig)}
    for switch in speedups.SWITCHES:
        for setting in switch.settings:
            assert by_name[setting.name].default == setting.default
            assert by_name[setting.name].metadata["help"] == setting.help


def test_what_a_switch_needs_is_refused_when_the_recipe_is_read_naming_both():
    tiny = ["--config", "recipes/tiny_docvqa.yaml"]
    for switch in speedups.SWITCHES:
        if not switch.requires:
            continue
        needed = speedups.BY_NAME[switch.requires[0]]
        on = {"vision_feature_cache": "memory"}.get(switch.name, "true")
        off = {"vision_feature_cache": "off"}.get(needed.name, "false")
        argv = [*tiny, f"--{switch.name}", on, f"--{needed.name}", off]
        with pytest.raises(UserError, match=rf"{switch.name} is \w+ but {needed.name} is {off}: .* Turn {needed.name}"):
            parse_recipe(argv)


def test_launch_modes_turn_off_or_refuse_switches_as_declared_and_say_so():
    from docvlm.modes import DDP, FSDP, SINGLE, ZERO2, ZERO3

    for mode in (SINGLE, DDP, ZERO2, ZERO3, FSDP):
        _, _, args, _ = parse_recipe(["--config", "recipes/docvqa_qlora.yaml"])
        refused = [s for s in speedups.SWITCHES if s.is_on(args) and mode in s.refused_in]
        if refused:
            with pytest.raises(UserError, match=f"{refused[0].name} is .*, but .*{mode}"):
                speedups.settle(mode, args, "cuda")
            continue
        turned_off = [s for s in speedups.SWITCHES if s.is_on(args) and mode in s.turned_off_in]
        changes = speedups.settle(mode, args, "cuda")
        assert [line.split(":")[0] for line in changes] == [s.name for s in turned_off]
        assert not any(s.is_on(args) for s in turned_off)
        assert bool(turned_off) is (mode != SINGLE)  # the flagship's offload leaves in every multi-process mode


def test_a_machine_without_a_gpu_gets_what_each_switch_declares_for_it():
    _, _, args, _ = parse_recipe(["--config", "recipes/docvqa_qlora.yaml", "--cudnn_attention", "false"])
    changes = speedups.settle("one process", args, "cpu")
    assert changes == ["vision_tower_offload: false (on the cpu it has nothing to move)"]
    assert args.vision_tower_offload is False and args.cudnn_attention is False  # no cuDNN off the GPU, quietly


def test_every_switch_with_a_family_capability_names_one_the_family_base_has():
    from docvlm.families import Family

    for switch in speedups.SWITCHES:
        if switch.family_hook:
            assert hasattr(Family, switch.family_hook), switch.name
            assert not getattr(Family(), switch.family_hook), f"a family offers {switch.name} only by saying so"


def test_stages_apply_in_registry_order_and_a_switch_that_finds_nothing_is_refused():
    calls = []
    context = speedups.SwitchContext(args=None)
    fake = [
        speedups.Switch(
            settings=(speedups.base.Setting(name, bool, False, ""),),
            is_on=lambda args: True,
            apply={speedups.LOADED: lambda run, name=name: calls.append(name) or name != "third"},
            lacks="third thing",
        )
        for name in ("first", "second", "third")
    ]
    original = speedups.SWITCHES
    speedups.SWITCHES = tuple(fake)
    try:
        context.args = type("Args", (), {"first": True, "second": True, "third": True})()
        with pytest.raises(UserError, match="third is true, but the model has no third thing"):
            speedups.apply(speedups.LOADED, context)
    finally:
        speedups.SWITCHES = original
    assert calls == ["first", "second", "third"]


def test_an_order_that_breaks_what_a_switch_must_follow_is_refused():
    assert all(  # the shipped order keeps every declared dependency
        speedups.SWITCHES.index(speedups.BY_NAME[name]) < speedups.SWITCHES.index(switch)
        for switch in speedups.SWITCHES
        for name in switch.after
    )
    fused = speedups.BY_NAME["fused_rms_norms"]
    lean = speedups.BY_NAME["connector_lean_activations"]
    with pytest.raises(RuntimeError, match="fused_rms_norms must come after connector_lean_activations"):
        speedups._check_order((fused, lean))
