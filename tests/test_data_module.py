import pickle

import pytest
import yaml
from builders import coco_tree
from jsonargparse import ArgumentParser

from lightning_moondream.data import (
    DatasetError,
    DetectSample,
    MoondreamDataModule,
    QuerySample,
    SampleList,
    SyntheticShapes,
)


def test_synthetic_samples_per_skill():
    dataset = SyntheticShapes("val", num_images=3, skills=("detect", "point", "query"), size=64)
    skills = {dataset[i].skill for i in range(len(dataset))}
    assert skills == {"detect", "point", "query"}
    first = dataset[0]
    assert first.id.startswith("synthetic-val-0#detect:") and first.image_size == (64, 64)
    again = SyntheticShapes("val", num_images=3, skills=("detect", "point", "query"), size=64)[0]
    assert (again.id, again.boxes) == (first.id, first.boxes)
    fixed = SyntheticShapes("train", num_images=4, skills=("query",), tasks_per_image=2)
    assert len(fixed) == 8 and all(isinstance(fixed[i], QuerySample) for i in range(8))
    with pytest.raises(ValueError, match=r"skills"):
        SyntheticShapes(skills=("dance",))


def test_module_encodes_in_two_workers():
    module = MoondreamDataModule(
        train={"source": "synthetic", "num_images": 6, "size": 64},
        val="synthetic",
        batch_size=4,
        num_workers=2,
        max_side=32,
    )
    module.setup("fit")
    batches = list(module.train_dataloader())
    samples = [sample for batch in batches for sample in batch]
    assert isinstance(batches[0], list) and len(batches[0]) == 4
    assert len(samples) == len(module.datasets["train"])
    assert all(
        isinstance(s, DetectSample) and s.image.startswith("data:image/jpeg") for s in samples
    )
    assert all(s.image_size == (64, 64) for s in samples)
    assert module.datasets["val"][0].id.startswith("synthetic-val-")
    pickle.dumps(samples[0])


def test_module_mixes_weighted_sources(tmp_path):
    coco_tree(tmp_path)
    module = MoondreamDataModule(
        train=[
            {"source": str(tmp_path), "weight": 0.0},
            {"source": "synthetic", "num_images": 2, "skills": ["query"], "weight": 1.0},
        ],
        batch_size=5,
        seed=1,
    )
    module.setup("fit")
    samples = [s for batch in module.train_dataloader() for s in batch]
    assert len(samples) == len(module.datasets["train"])
    assert all(isinstance(s, QuerySample) for s in samples)


def test_module_eval_order_and_missing_stage(tmp_path):
    data = SampleList([DetectSample(f"{tmp_path}/nope{i}.jpg", "x", ()) for i in range(2)])
    module = MoondreamDataModule(test=data, eval_batch_size=2)
    with pytest.raises(ValueError, match=r"no train source"):
        module.train_dataloader()
    with pytest.raises(DatasetError, match=r"nope0\.jpg"):
        next(iter(module.test_dataloader()))


def test_module_init_args_parse_from_yaml():
    parser = ArgumentParser()
    parser.add_class_arguments(MoondreamDataModule, "data")
    config = yaml.safe_load(
        """
data:
  train: {source: synthetic, num_images: 4, skills: [detect]}
  val: [{source: synthetic, weight: 1.0, num_images: 2}]
  test: some/folder
  batch_size: 2
  max_side: 512
"""
    )
    parsed = parser.parse_object(config)
    init = parser.instantiate(parsed).data
    assert isinstance(init, MoondreamDataModule)
    assert init.sources["train"] == {"source": "synthetic", "num_images": 4, "skills": ["detect"]}
    assert init.sources["test"] == "some/folder" and init.options.max_side == 512


def test_evaluation_data_is_shared_by_processes_without_repeats() -> None:
    from lightning_moondream.data.sharding import UnpaddedShardSampler

    data = list(range(5))
    shares = [list(UnpaddedShardSampler(data, num_replicas=2, rank=rank)) for rank in (0, 1)]
    assert shares == [[0, 2, 4], [1, 3]]
    assert [len(UnpaddedShardSampler(data, 2, rank)) for rank in (0, 1)] == [3, 2]


def test_evaluation_data_smaller_than_the_run_is_refused() -> None:
    from types import SimpleNamespace

    data = MoondreamDataModule(
        val={"source": "synthetic", "num_images": 1, "skills": ["point"]}, num_workers=0
    )
    # The trainer of a two-process run, as far as the data module asks it.
    data.trainer = SimpleNamespace(world_size=64, global_rank=0)  # type: ignore[assignment]
    with pytest.raises(ValueError, match="for 64 processes: each process needs at least one"):
        data.val_dataloader()
