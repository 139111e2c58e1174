"""ShapesWorld: determinism, the on-disk formats read back as spec §6.7 describes them, and the exact judge."""
import io, json, random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from bagel.shapesworld import (BACKGROUNDS, CELLS, COLORS, SHAPES, TAGS, Obj, Scene, apply_edit, ask, degrade,
                               edit_sample, heldout, judge_agrees, parse, random_scene, render, scene_spec, score_edit,
                               parse_background, score_t2i, score_vqa, spec_holds, t2i_sample, vqa_sample, write_shapesworld)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sw") / "shapesworld"
    return write_shapesworld(root, n_t2i=120, n_edit=60, n_vlm=40, size=64, seed=3, rows_per_file=50, row_group_size=10)


def test_deterministic_for_a_seed(tmp_path):
    a = write_shapesworld(tmp_path / "a", n_t2i=30, n_edit=20, n_vlm=10, seed=5, rows_per_file=20, row_group_size=5)
    b = write_shapesworld(tmp_path / "b", n_t2i=30, n_edit=20, n_vlm=10, seed=5, rows_per_file=20, row_group_size=5)
    c = write_shapesworld(tmp_path / "c", n_t2i=30, n_edit=20, n_vlm=10, seed=6, rows_per_file=20, row_group_size=5)
    d = write_shapesworld(tmp_path / "d", n_t2i=30, n_edit=20, n_vlm=10, seed=5, rows_per_file=20, row_group_size=5, workers=2)
    assert a["vlm_jsonl"].read_text() == d["vlm_jsonl"].read_text()                 # a process pool writes the same bytes
    assert all(p.read_bytes() == (d["vlm_images"] / p.name).read_bytes() for p in a["vlm_images"].iterdir())
    for key in ("t2i", "editing"):
        ta = [pq.read_table(p).to_pylist() for p in a[key]]
        assert ta == [pq.read_table(p).to_pylist() for p in b[key]] == [pq.read_table(p).to_pylist() for p in d[key]]
        assert ta != [pq.read_table(p).to_pylist() for p in c[key]]
    assert a["vlm_jsonl"].read_text() == b["vlm_jsonl"].read_text()
    assert (a["vlm_images"] / "000003.png").read_bytes() == (b["vlm_images"] / "000003.png").read_bytes()
    assert random_scene(random.Random(9)) == random_scene(9) != random_scene(10)
    assert render(random_scene(9), 96).tobytes() == render(random_scene(9), 96).tobytes()


def test_t2i_parquet_format(world):
    assert [p.name for p in world["t2i"]] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    n = 0
    for path in world["t2i"]:
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow == pa.schema([("image", pa.binary()), ("captions", pa.string())])
        assert pf.metadata.num_row_groups == -(-pf.metadata.num_rows // 10) >= 2
        for g in range(pf.metadata.num_row_groups):               # read row group by row group, as the reader does
            for row in pf.read_row_group(g).to_pylist():
                img = Image.open(io.BytesIO(row["image"]))
                assert img.format == "PNG" and img.size == (64, 64)
                caps = json.loads(row["captions"])
                assert isinstance(caps, dict) and list(caps) == [f"caption_{k}" for k in range(4)]
                assert all(isinstance(v, str) and v.strip() for v in caps.values())
                n += 1
    assert n == 120


def test_edit_parquet_format(world):
    info = json.loads(world["parquet_info"].read_text())
    assert set(info) == {f"editing/{p.name}" for p in world["editing"]}       # keys: data_dir/filename, data_dir as in the yaml
    for path in world["editing"]:
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow == pa.schema([("image_list", pa.list_(pa.binary())),
                                             ("instruction_list", pa.list_(pa.list_(pa.string())))])
        assert info[f"editing/{path.name}"] == {"num_row_groups": pf.metadata.num_row_groups}
        for row in pf.read().to_pylist():
            assert 2 <= len(row["image_list"]) <= 3 and len(row["instruction_list"]) == len(row["image_list"]) - 1
            assert all(len(alts) == 3 and all(a and not a.endswith(".") for a in alts) for alts in row["instruction_list"])
            imgs = [Image.open(io.BytesIO(b)).convert("RGB") for b in row["image_list"]]
            assert all(x.tobytes() != y.tobytes() for x, y in zip(imgs, imgs[1:]))     # each step changes the image


def test_vlm_jsonl_and_yamls(world):
    root = world["root"]
    lines = [json.loads(l) for l in world["vlm_jsonl"].read_text().splitlines()]
    assert len(lines) == 40
    for line in lines:
        assert set(line) == {"image", "conversations"} and (world["vlm_images"] / line["image"]).is_file()
        conv = line["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and 2 <= len(conv) <= 6
        assert conv[0]["value"].startswith("<image>\n") and sum(t["value"].count("<image>") for t in conv) == 1
    info = yaml.safe_load(world["dataset_info"].read_text())
    assert info == {"t2i_pretrain": {"shapesworld": {"data_dir": "t2i", "num_files": 3, "num_total_samples": 120}},
                    "unified_edit": {"shapesworld": {"data_dir": "editing", "parquet_info_path": "editing/parquet_info.json",
                                                     "num_files": 2, "num_total_samples": 60}},
                    "vlm_sft": {"shapesworld": {"data_dir": "vlm/images", "jsonl_path": "vlm/shapesworld_vlm.jsonl",
                                                "num_total_samples": 40}}}
    for group in info.values():                                   # relative to the yaml's folder
        for k in ("data_dir", "parquet_info_path", "jsonl_path"):
            if k in group["shapesworld"]: assert (root / group["shapesworld"][k]).exists()
    mix = yaml.safe_load(world["mix"].read_text())
    assert set(mix) == {"t2i_pretrain", "unified_edit", "vlm_sft"}
    assert all(g["dataset_names"] == ["shapesworld"] and len(g["num_used_data"]) == 1 for g in mix.values())
    assert mix["t2i_pretrain"]["image_transform_args"] == {"image_stride": 16, "max_image_size": 64, "min_image_size": 64}
    assert mix["unified_edit"]["vit_image_transform_args"]["image_stride"] == 14
    assert mix["vlm_sft"]["image_transform_args"]["image_stride"] == 14 and mix["t2i_pretrain"]["num_used_data"] == [3]


def test_absolute_paths_and_overwrite(tmp_path):
    p = write_shapesworld(tmp_path / "w", n_t2i=5, n_edit=5, n_vlm=5, absolute_paths=True)
    info = yaml.safe_load(p["dataset_info"].read_text())
    d = info["unified_edit"]["shapesworld"]["data_dir"]
    assert d == str((tmp_path / "w" / "editing").resolve())
    assert list(json.loads(p["parquet_info"].read_text())) == [f"{d}/part-00000.parquet"]
    with pytest.raises(FileExistsError, match="overwrite=True"): write_shapesworld(tmp_path / "w", n_t2i=5, n_edit=5, n_vlm=5)
    q = write_shapesworld(tmp_path / "w", n_t2i=7, n_edit=5, n_vlm=5, overwrite=True)
    assert pq.ParquetFile(q["t2i"][0]).metadata.num_rows == 7
    assert sorted(x.name for x in (tmp_path / "w").iterdir()) == sorted(["t2i", "editing", "vlm", "dataset_info.yaml", "mix.yaml"])
    with pytest.raises(ValueError, match="row_group_size"): write_shapesworld(tmp_path / "v", row_group_size=0)
    with pytest.raises(ValueError, match="size must be"): write_shapesworld(tmp_path / "v", size=8)


def test_judge_agrees_on_clean_renders():
    scenes = [random_scene(random.Random(f"pytest/{i}")) for i in range(1000)]
    assert np.mean([judge_agrees(s, render(s, 64)) for s in scenes]) >= 0.99
    assert np.mean([judge_agrees(s, render(s, 128)) for s in scenes[:200]]) >= 0.99
    assert np.mean([judge_agrees(s, render(s, 512)) for s in scenes[:10]]) >= 0.99
    every = Scene(tuple(Obj(SHAPES[i % 4], list(COLORS)[i % 6], ("small", "large")[i % 2], c) for i, c in enumerate(CELLS)), "gray")
    assert judge_agrees(every, render(every, 64)) and judge_agrees(every, render(every, 200))
    wrong = Scene(every.objects[:-1], "gray")
    assert not judge_agrees(wrong, render(every, 64))                       # a missing object is noticed


def test_judge_under_mild_degradation():
    # soft edges are the normal case for generated images: the judge must survive mild blur and JPEG
    scenes = [random_scene(random.Random(f"soft/{i}")) for i in range(60)]
    for kind, s in (("blur", 0.7), ("jpeg", 85)):
        assert np.mean([judge_agrees(sc, degrade(render(sc, 64), kind, s, i)) for i, sc in enumerate(scenes)]) >= 0.95
    assert np.mean([judge_agrees(sc, render(sc, 64, aa=4)) for sc in scenes]) >= 0.95


def test_captions_true_and_judged():
    n_false = 0
    for i in range(400):
        s = t2i_sample(random.Random(f"cap/{i}"), TAGS[i % len(TAGS)])
        assert s["spec"]["tag"] == TAGS[i % len(TAGS)]
        assert spec_holds(s["spec"], s["scene"].objects) and spec_holds(scene_spec(s["scene"]), s["scene"].objects)
        img = render(s["scene"], 64)
        assert score_t2i(s["spec"], img) and score_t2i(scene_spec(s["scene"]), img)
        other = t2i_sample(random.Random(f"other/{i}"), s["spec"]["tag"])["scene"]   # another scene of the same tag:
        truth = spec_holds(s["spec"], other.objects)                                 # the judge's verdict is the truth
        assert score_t2i(s["spec"], render(other, 64)) == truth
        n_false += not truth
    assert n_false > 200                                                             # ... which is mostly "no"


def test_edits_change_exactly_what_they_say():
    for i in range(150):
        e = edit_sample(random.Random(f"edit/{i}"))
        for a, b, spec in zip(e["scenes"], e["scenes"][1:], e["specs"]):
            assert apply_edit(a, spec) == b
            gone, new = set(a.keys()) - set(b.keys()), set(b.keys()) - set(a.keys())
            op = spec["op"]
            if op == "add": assert not gone and new == {Obj(**spec["obj"]).key}
            elif op == "remove": assert not new and gone == {Obj(**spec["target"]).key}
            elif op == "swap": assert {k[3] for k in gone} == {k[3] for k in new} and len(new) == 2
            else:
                field = {"recolor": 1, "resize": 2, "move": 3}[op]
                (g,), (n,) = gone, new
                assert [x != y for x, y in zip(g, n)] == [k == field for k in range(4)]
            others = [o for o in a.objects if o.key not in gone]
            assert all(o in b.objects for o in others)                 # untouched objects keep even their jitter
            assert score_edit(a, spec, render(b)) and not score_edit(a, spec, render(a))


def test_vqa_answers_exact():
    for i in range(200):
        v = vqa_sample(random.Random(f"vqa/{i}"))
        objs = parse(render(v["scene"], 64))
        for q, spec in v["qa"]:
            assert score_vqa(spec, spec["answer"])
            t = spec["type"]
            if t == "count": assert spec["answer"] == str(sum(all(getattr(o, k) == x for k, x in spec["filter"].items()) for o in objs))
            if t in ("color", "shape", "position") and "target" in spec:
                o = next(o for o in objs if o.cell == spec["target"]["cell"])
                assert spec["answer"] == {"color": o.color, "shape": o.shape, "position": o.cell}[t]
            wrong = {"count": str(int(spec["answer"]) + 1) if t == "count" else None, "exists": "yes" if spec["answer"] == "no" else "no"}
            if t in ("exists", "relation"): assert not score_vqa(spec, wrong["exists"])
            if t == "count": assert not score_vqa(spec, wrong["count"])
    assert score_vqa({"type": "count", "answer": "2"}, "There are two.") and not score_vqa({"type": "count", "answer": "2"}, "2 or 3")


def test_heldout_is_a_separate_stream():
    train = {json.dumps(t2i_sample(random.Random(f"shapesworld/train/t2i/0/{i}"))["scene"].to_dict()) for i in range(100)}
    items = list(heldout(100, "t2i", seed=0))
    assert sum(json.dumps(i["scene"].to_dict()) in train for i in items) < 10
    assert [i["prompt"] for i in items] == [i["prompt"] for i in heldout(100, "t2i", seed=0)]
    assert [i["prompt"] for i in items] != [i["prompt"] for i in heldout(100, "t2i", seed=1)]
    for i in heldout(30, "edit"): assert score_edit(i["source"], i["spec"], render(i["target"]))
    for i in heldout(30, "vqa"): assert score_vqa(i["spec"], i["answer"]) and i["question"] == i["spec"]["question"]
    assert Scene.from_dict(items[0]["scene"].to_dict()) == items[0]["scene"]


def test_malformed_inputs_get_clear_errors():
    img = render(random_scene(1), 64)
    with pytest.raises(TypeError, match="PIL.Image"): parse(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(TypeError, match="PIL.Image"): score_t2i({"include": [{"shape": "circle"}]}, "img.png")
    with pytest.raises(ValueError, match="too small"): parse(Image.new("RGB", (8, 8)))
    with pytest.raises(ValueError, match="non-empty 'include'"): score_t2i({"tag": "counting"}, img)
    with pytest.raises(ValueError, match="unknown color"): score_t2i({"include": [{"shape": "circle", "color": "pink"}]}, img)
    with pytest.raises(ValueError, match="earlier requirement"):
        score_t2i({"include": [{"shape": "circle"}, {"shape": "square", "position": ["near", 0]}]}, img)
    with pytest.raises(ValueError, match="'op' in"): score_edit(random_scene(1), {"op": "rotate"}, img)
    with pytest.raises(ValueError, match="not in the scene"):
        score_edit(random_scene(1), {"op": "remove", "target": {"shape": "circle", "color": "red", "size": "small", "cell": "nowhere"}}, img)
    with pytest.raises(ValueError, match="'type' in"): score_vqa({"answer": "3"}, "3")
    with pytest.raises(TypeError, match="must be a str"): score_vqa({"type": "count", "answer": "3"}, None)
    with pytest.raises(ValueError, match="unknown question type"): ask(0, random_scene(0), "why")
    with pytest.raises(ValueError, match="unknown background"): Scene((), "black")
    with pytest.raises(ValueError, match="dx, dy"): Obj("circle", "red", "small", "top", dx=2)
    with pytest.raises(ValueError, match="aa must be"): render(random_scene(0), 64, aa=8)
    with pytest.raises(ValueError, match="unknown held-out kind"): heldout(1, "audio")
    assert parse(Image.new("RGBA", (64, 64), (0, 0, 0, 0))) == [] and parse_background(Image.new("LA", (64, 64))) == "white"  # transparent: white
    assert set(BACKGROUNDS) == {"white", "gray"}


def test_blobs_are_not_shapes():
    "Generated images are imperfect: a blob that matches no shape's outline must not pass as one."
    from PIL import Image, ImageDraw, ImageFilter
    import bagel.shapesworld as S
    img = Image.new("RGB", (64, 64), S.BACKGROUNDS["white"])
    d = ImageDraw.Draw(img)
    d.ellipse((4, 4, 30, 14), fill=S.COLORS["red"])           # a flat smear, far from every template
    d.polygon([(40, 40), (60, 44), (44, 60), (58, 58), (36, 52)], fill=S.COLORS["blue"])   # a star-ish splat
    objs = S.parse(img.filter(ImageFilter.GaussianBlur(0.6)))
    assert objs and all(o.shape == S.UNKNOWN for o in objs), objs
