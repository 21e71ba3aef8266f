import dataclasses

import pytest
import torch

from kd_ref import tasks
from kd_ref.recipe import Recipe, check_schedule
from kd_ref.runtime import Runtime

TASK = tasks.SegTask()
RECIPE = dataclasses.replace(Recipe(task="seg"), num_classes=3, data="synthetic")


def test_seg_eval_counts_upsampled_argmax_against_the_labels():
    state = TASK.new_eval_state(RECIPE)
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1] = 1.0                                           # class 1 everywhere
    target = torch.tensor([[[1, 1, 0, 0], [2, 255, 1, 1]]], dtype=torch.uint8)
    TASK.update_eval_state(state, {"logits": logits}, {"targets": target, "names": ["a.png"]}, None)
    assert state["cm"].tolist() == [[0, 2, 0], [0, 4, 0], [0, 1, 0]]
    assert TASK.finish_eval_state(state, Runtime(torch.device("cpu")))["IoU"][1] == pytest.approx(100 * 4 / 7)


def test_seg_eval_names_the_images_whose_labels_the_model_cannot_predict():
    state = TASK.new_eval_state(RECIPE)
    target = torch.tensor([[[0, 7], [255, 1]]], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"--data synthetic: city/b.png has labels the model cannot predict "
                                         r"\(confusion_matrix: values \[7\] outside \[0, 3\).*\): the model predicts 3 "):
        TASK.update_eval_state(state, {"logits": torch.zeros(1, 3, 2, 2)}, {"targets": target, "names": ["city/b.png"]},
                               None)


def test_synthetic_seed_fixes_the_scenes_across_recipe_seeds():
    recipe = dataclasses.replace(RECIPE, synthetic_train=2, synthetic_val=2, synthetic_size=(32, 32), crop=(32, 32),
                                 scales=(1.0, 1.0))

    def labels(**fields):
        dataset, _ = TASK.build_data(dataclasses.replace(recipe, **fields), "val", None)
        return torch.stack([torch.as_tensor(dataset[index]["target"]) for index in range(len(dataset))])

    assert torch.equal(labels(seed=1, synthetic_seed=0), labels(seed=0))
    assert torch.equal(labels(seed=1), labels(seed=1, synthetic_seed=1))
    assert not torch.equal(labels(seed=1), labels(seed=0)), "None: the scenes follow the recipe's seed"
    with pytest.raises(ValueError, match=r"^synthetic_seed -1: expected a non-negative integer, or None"):
        check_schedule(dataclasses.replace(recipe, synthetic_seed=-1))  # with the recipe, before any training
