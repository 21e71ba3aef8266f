"""kd_ref/cli.py and the command-line surface: names equal the registries, --help is complete and answers
without importing torch, argument errors are one line, --list-presets lists every preset."""
import os
import subprocess
import sys

import pytest

import evaluate
import train
from kd_ref import cli, datasets, methods, tasks
from kd_ref.presets import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_names_offered_on_the_command_line_are_the_registries():
    assert set(cli.TASKS) == set(tasks.TASKS)
    assert set(cli.METHODS) == set(methods.METHODS)
    for task in cli.TASKS:
        assert tuple(cli.DATA[task]) == tuple(tasks.TASKS[task].data_sets), task
    assert datasets.SUPPORTED_DATA is cli.DATA
    assert cli.INPUT_SIZE_FIELD == {name: task.size_field for name, task in tasks.TASKS.items()}


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv", [["--help"], ["--iters", "0"], ["--method", "nonsense"], ["--crop", "0", "0"]])
def test_help_and_argument_errors_answer_before_torch_is_imported(argv):
    result = _python(f"import sys, train\n"
                     f"try:\n    train.parse_args({argv!r})\nexcept SystemExit as done:\n    code = done.code\n"
                     f"print('torch' in sys.modules, code)")
    assert result.stdout.split()[-2:] == ["False", "0" if argv == ["--help"] else "2"], result.stderr


TORCH_UNIMPORTABLE = "import sys\nsys.modules['torch'] = None  # any import of torch now fails\nimport train\n"


def test_list_presets_and_an_unknown_preset_answer_without_torch():
    listing = _python(TORCH_UNIMPORTABLE + "sys.exit(train.run(['--list-presets']))")
    assert listing.returncode == 0, listing.stderr
    assert "gdd_pspnet_r18_cityscapes_baseline" in listing.stdout and "synthetic_depth_skd" in listing.stdout
    unknown = _python(TORCH_UNIMPORTABLE + "sys.exit(train.run(['--preset', 'gdd_nonsense']))")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == ("error: --preset gdd_nonsense: unknown; python train.py --list-presets "
                                      "lists them")


def test_presets_import_no_torch():
    result = _python("import sys\nfrom kd_ref import presets\nprint(len(presets.PRESETS), "
                     "presets.default_preset('det', 'gkd', 'coco'), 'torch' in sys.modules)")
    assert result.stdout.split()[1:] == ["gkd_retinanet_r50_fpn_2x_coco", "False"], result.stderr
    assert int(result.stdout.split()[0]) == len(PRESETS)


@pytest.mark.parametrize("tool", [train, evaluate])
def test_every_flag_says_what_it_does_and_choices_are_listed(tool, capsys):
    assert tool.run(["--help"]) == 0
    text = capsys.readouterr().out
    for action in tool.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
        if action.choices:
            assert all(str(choice) in text for choice in action.choices), action.option_strings
    assert "--task" in text and "--data" in text


def test_argument_errors_are_one_line_naming_the_flag(capsys):
    for argv, flag in ((["--iters", "-5"], "--iters"), (["--lr", "-1"], "--lr"), (["--batch-size", "0"], "--batch-size"),
                       (["--resume", "--overwrite"], "--resume and --overwrite")):
        assert train.run(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and flag in err[0], err


def test_list_presets_shows_every_preset_once_under_its_paper(capsys):
    assert train.run(["--list-presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in lines if line.startswith("  ")]
    assert sorted(listed) == sorted(PRESETS)
    assert "GDD, Generative Denoise Distillation (arXiv:2401.08332)" in lines
    row = lines.index(next(line for line in lines if line.split() and line.split()[0] == "gdd_pspnet_r18_cityscapes"))
    assert lines[row + 1].split()[0] == "gdd_pspnet_r18_cityscapes_baseline", "a baseline twin follows its row"
    assert "pspnet_r18 <- pspnet_r101, cityscapes 512x512" in lines[row]
    # each row's reference launch, with the reference's process count
    assert lines[row].endswith("; torchrun --nproc_per_node=8 train.py --preset gdd_pspnet_r18_cityscapes")
    original = next(line for line in lines if line.split() and line.split()[0] == "skd_pspnet_r18_cityscapes_original")
    assert original.endswith("; torchrun --nproc_per_node=1 train.py --preset skd_pspnet_r18_cityscapes_original")
