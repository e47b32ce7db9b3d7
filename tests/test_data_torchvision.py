import pytest
import torch
from builders import coco_tree, save_image, voc_devkit
from torchvision.datasets import CocoDetection, ImageFolder, Kitti, VOCDetection

from lightning_moondream.api.models import Box
from lightning_moondream.data import (
    CelebALandmarks,
    ClassificationQuestions,
    from_torchvision,
)


def ids(dataset):
    return sorted(dataset[i].id for i in range(len(dataset)))


def test_coco_detection_reads_annotations_not_images(tmp_path):
    annotation = coco_tree(tmp_path)
    dataset = CocoDetection(str(tmp_path / "images"), str(annotation))
    samples = from_torchvision(dataset, negative_rate=1.0)
    assert ids(samples) == [
        "1.jpg#cat",
        "1.jpg#dog",
        "2.jpg#cat",
        "2.jpg#dog",
        "3.jpg#cat",
        "3.jpg#dog",
    ]
    cat = next(s for s in (samples[i] for i in range(len(samples))) if s.id == "1.jpg#cat")
    assert cat.boxes[0] == Box(x_min=0.1, y_min=0.1, x_max=0.3, y_max=0.3)
    assert isinstance(cat.image, str)


def test_voc_detection_with_custom_class_names(tmp_path):
    voc_devkit(tmp_path / "VOCdevkit" / "VOC2012")
    dataset = VOCDetection(str(tmp_path), year="2012", image_set="train", download=False)
    samples = from_torchvision(dataset, skill="query", questions=["count"])
    assert ids(samples) == ["a.jpg#count:cell", "a.jpg#count:virus", "b.jpg#count:virus"]
    counts = {samples[i].id: samples[i].answers for i in range(len(samples))}
    assert counts["a.jpg#count:cell"] == ("2", "two")


def test_generic_wrapper_path_on_kitti(tmp_path):
    raw = tmp_path / "Kitti" / "raw" / "training"
    save_image(raw / "image_2" / "000000.png", (200, 100))
    (raw / "label_2").mkdir(parents=True)
    (raw / "label_2" / "000000.txt").write_text(
        "Car 0.00 0 -1.5 20.0 10.0 120.0 60.0 1.5 1.6 3.9 1.0 1.5 8.0 0.0\n"
        "Pedestrian 0.00 0 0.2 150.0 0.0 170.0 100.0 1.7 0.6 0.8 2.0 1.6 9.0 0.1\n"
    )
    dataset = Kitti(str(tmp_path), train=True, download=False)
    samples = from_torchvision(dataset, skill="point")
    assert len(samples) == 2
    car = samples[0]
    assert car.object == "Car" and car.boxes == (Box(x_min=0.1, y_min=0.1, x_max=0.6, y_max=0.6),)
    encoded = car.encoded()
    assert encoded.image.startswith("data:image/jpeg") and encoded.image_size == (200, 100)


def test_classification_questions_from_image_folder(tmp_path):
    save_image(tmp_path / "cats" / "1.jpg")
    save_image(tmp_path / "dogs" / "2.jpg")
    dataset = ImageFolder(str(tmp_path), transform=lambda image: torch.zeros(1))
    questions = ClassificationQuestions(dataset)
    assert [questions[i].answers for i in range(2)] == [("cats",), ("dogs",)]
    assert questions[0].image.endswith("1.jpg")


def test_celeba_landmarks_from_dataset_items(tmp_path):
    from PIL import Image

    class Faces(torch.utils.data.Dataset):
        target_type = ["landmarks"]

        def __len__(self):
            return 1

        def __getitem__(self, index):
            return Image.new("RGB", (100, 200)), torch.tensor(
                [30, 40, 70, 40, 50, 100, 35, 150, 65, 150]
            )

    samples = CelebALandmarks(Faces())
    assert len(samples) == 5
    nose = samples[2]
    assert nose.object == "nose" and (nose.points[0].x, nose.points[0].y) == (0.5, 0.5)
    with pytest.raises(ValueError, match="target_type"):
        CelebALandmarks(type("Attr", (), {"target_type": ["attr"]})())
