"""MSCOCO instances file → real-image sets by dominant category."""

import json

import pytest

from m2m_ray.data.coco_sets import CocoFormatError, coco_sets, default_images_root


def _instances(path, annotations, images=8):
    data = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 100, "height": 100}
                   for i in range(1, images + 1)],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"},
                       {"id": 3, "name": "car"}],
        "annotations": [{"id": n, "image_id": i, "category_id": c, "area": a, "iscrowd": crowd}
                        for n, (i, c, a, crowd) in enumerate(annotations)],
    }
    path.write_text(json.dumps(data))
    return str(path)


ANNOTATIONS = [
    (1, 18, 3000, 0), (1, 1, 1000, 0), (1, 1, 1500, 0),  # dog 3000 > person 2500
    (2, 1, 4000, 0),
    (3, 18, 500, 0), (3, 1, 9000, 1),  # the person is a crowd: dog
    (4, 1, 2000, 0), (4, 3, 2000, 0),  # tie: the smaller category id (person)
    (5, 18, 6000, 0),
    (6, 3, 100, 0),  # car, 1% of the image
    (7, 1, 5000, 0),
    # image 8: no annotation
]


def test_groups_by_dominant_category(tmp_path):
    ann = _instances(tmp_path / "instances_val2017.json", ANNOTATIONS)
    grouping = coco_sets(ann, images_root="/data/val2017")
    by_category = {s.category: s.image_ids for s in grouping.sets}
    assert by_category == {"person": [2, 4, 7], "car": [6], "dog": [1, 3, 5]}
    assert [s.set_id for s in grouping.sets] == ["coco-1-000", "coco-3-000", "coco-18-000"]
    assert grouping.sets[0].image_uris[0] == "/data/val2017/000000000002.jpg"
    assert grouping.counts["without_annotations"] == 1 and grouping.counts["grouped"] == 7

    crowd = {s.category: s.image_ids for s in coco_sets(ann, "/x", include_crowd=True).sets}
    assert crowd["person"] == [2, 3, 4, 7]

    chunked = coco_sets(ann, "/x", images_per_set=2, min_area_fraction=0.05)
    assert [(s.set_id, s.image_ids) for s in chunked.sets] == [("coco-1-000", [2, 4]),
                                                               ("coco-18-000", [1, 3])]
    assert chunked.counts["below_min_area"] == 1 and chunked.counts["in_too_small_sets"] == 2
    dogs = coco_sets(ann, "/x", categories=["dog"])
    assert [s.category for s in dogs.sets] == ["dog"] and dogs.counts["other_categories"] == 4


def test_default_image_folder_and_bad_files(tmp_path):
    assert default_images_root("/coco/annotations/instances_val2017.json") == "/coco/val2017"
    assert (default_images_root("s3://b/coco/annotations/instances_train2014.json")
            == "s3://b/coco/train2014")
    with pytest.raises(ValueError, match="cannot infer the image folder"):
        default_images_root("/coco/labels.json")
    bad = _instances(tmp_path / "instances_x.json", [(99, 1, 10, 0)])
    with pytest.raises(CocoFormatError, match="refers to image 99"):
        coco_sets(bad)
    (tmp_path / "broken.json").write_text('{"images": [{"id": 1}], "annotations": []}')
    with pytest.raises(CocoFormatError, match=r"images\[0\] lacks \['file_name'\]"):
        coco_sets(str(tmp_path / "broken.json"), "/x")
    ann = _instances(tmp_path / "instances_y.json", ANNOTATIONS)
    with pytest.raises(ValueError, match=r"categories \['zebra'\] are not in"):
        coco_sets(ann, "/x", categories=["zebra"])
