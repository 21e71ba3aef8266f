"""Presets of kd_ref/configs.py: the baseline twins of ``register`` and the task-loss weights of the KD rows."""
import dataclasses

from kd_ref import configs


def test_register_twin_drops_the_distillation_fields_or_takes_the_extended_recipe(monkeypatch):
    monkeypatch.setattr(configs, "PRESETS", {})
    plain = configs.Recipe(iters=10, grad_clip=1.0)
    distilled = dataclasses.replace(plain, method="kd", teacher="pspnet_r101", method_options={"tau": 2.0},
                                    student_init="trained.pt", task_loss_weight=0.5)
    configs.register("kd_row", distilled)
    assert configs.PRESETS["kd_row_baseline"] == dataclasses.replace(plain, teacher="pspnet_r101")
    # a distillation config that also changes the optimisation names the recipe it extends
    configs.register("clipped_row", dataclasses.replace(distilled, grad_clip=35.0), baseline=configs.Recipe(iters=10))
    assert configs.PRESETS["clipped_row_baseline"] == configs.Recipe(iters=10, teacher="pspnet_r101")
    configs.register("demo", distilled, baseline=False)
    assert "demo_baseline" not in configs.PRESETS


def test_every_baseline_twin_trains_the_student_alone_with_the_teacher_kept():
    defaults = configs.Recipe()
    twins = {name[:-len("_baseline")]: twin for name, twin in configs.PRESETS.items() if name.endswith("_baseline")}
    assert len(twins) > 30
    for name, twin in twins.items():
        assert all(getattr(twin, key) == getattr(defaults, key) for key in configs.DISTILLATION_FIELDS), name
        assert twin.teacher == configs.PRESETS[name].teacher and twin.student == configs.PRESETS[name].student
    # GDD's detection config adds gradient clipping 35; the baseline (gdd.md §6) has none
    assert configs.PRESETS["gdd_faster_rcnn_r50_fpn_2x_coco"].grad_clip == 35.0
    assert configs.PRESETS["gdd_faster_rcnn_r50_fpn_2x_coco_baseline"].grad_clip is None


def test_cifar_kd_rows_weight_the_task_loss_as_mdistiller():
    for student in ("resnet8x4", "wrn_40_1", "wrn_16_2", "resnet20", "resnet32"):
        kd = configs.PRESETS[f"kd_{student}_cifar100"]
        assert (kd.task_loss_weight, kd.method_options) == (0.1, {"tau": 4.0, "loss_weight": 0.9})
        over_kd = configs.PRESETS[f"sokd_kd_{student}_cifar100"]
        assert over_kd.task_loss_weight == 0.1 and over_kd.method_options["base"] == "kd"
        assert over_kd.method_options["base_options"]["kd"] == kd.method_options
        # the final code's SoKD row (no base) and DIST keep CE at weight 1 (sokd.md §5, dist.md §4)
        assert configs.PRESETS[f"sokd_{student}_cifar100"].task_loss_weight == 1.0
    assert configs.PRESETS["dist_resnet8x4_cifar100"].task_loss_weight == 1.0
    assert configs.default_preset("cls", "kd", "cifar100") == "kd_resnet8x4_cifar100"
