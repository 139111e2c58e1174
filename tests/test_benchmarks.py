"""bagel.benchmarks: every adapter round-trips a small fixture in its public format (items, exact prompts, output
layout, deterministic scores equal to hand-computed ones, judge plumbing)."""
import base64, io, json, math
from pathlib import Path

import pytest
from PIL import Image

from bagel.benchmarks import (COT_PREFIX, GEditBench, GenEval, ImgEdit, KRISBench, MathVista, MMBench, MME, MMMU, MMVet,
                              POPE, RISEBench, WISE, get_benchmark)
from bagel.eval import ScriptedEngine, read_done, run

SUFFIX = " Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."

def png(color=(200, 10, 10), size=(20, 16)) -> bytes:
    b = io.BytesIO(); Image.new("RGB", size, color).save(b, format="PNG"); return b.getvalue()

def write_img(path: Path, color=(200, 10, 10), size=(20, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True); path.write_bytes(png(color, size)); return path

def write_parquet(path: Path, rows: list):
    import pyarrow as pa, pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True); pq.write_table(pa.Table.from_pylist(rows), path)

def answers(table: dict):
    "A scripted engine answering by item id; it records the prompts and the number of input images it saw."
    seen = {}
    def text(item):
        seen[item.id] = (item.prompt, len(item.images)); return table[item.id]
    def image(item, k):
        seen[item.id] = (item.prompt, len(item.images)); return Image.new("RGB", (32, 24), (10 + 40 * k, 100, 100))
    return ScriptedEngine(image=image, text=text), seen

# ---------------------------------------------------------------- generation

def test_geneval(tmp_path):
    meta = [{"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
            {"tag": "position", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat left of a dog"}]
    (tmp_path / "data").mkdir(); (tmp_path / "data" / "evaluation_metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    eng, seen = answers({})
    out = tmp_path / "out"
    res = run(GenEval(), eng, tmp_path / "data", out, {"n_samples": 2}, judge=lambda p, m: m["tag"] == "colors", verbose=False)
    assert seen["00001"][0] == "a photo of a cat left of a dog"
    assert json.loads((out / "00000" / "metadata.jsonl").read_text()) == meta[0]
    assert sorted(p.name for p in (out / "00001" / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert res["metrics"] == {"colors": 1.0, "position": 0.0, "overall": 0.5}
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["tag"] for r in rows} == {"colors", "position"}
    assert GenEval().defaults["n_samples"] == 4 and GenEval().defaults["cfg_interval"] == (0.0, 1.0)

def test_wise(tmp_path):
    rows = [{"Prompt": f"p{i}", "Explanation": "", "Category": "", "Subcategory": "", "prompt_id": i, "Hint": ""} for i in (3, 450, 705)]
    (tmp_path / "final_data.json").write_text(json.dumps(rows))
    scores = {"3": (2, 2, 2), "450": (1, 0, 2), "705": (0, 2, 1)}
    judge = lambda item, path: dict(zip(("consistency", "realism", "aesthetic_quality"), scores[str(item["prompt_id"])]))
    out = tmp_path / "out"
    res = run(WISE(), ScriptedEngine(), tmp_path, out, judge=judge, verbose=False)["metrics"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["3.png", "450.png", "705.png"]
    assert res["Cultural"] == pytest.approx(1.0) and res["Time"] == pytest.approx(0.45) and res["Biology"] == pytest.approx(0.25)
    assert res["overall"] == pytest.approx((1.0 + 0.45 + 0.25) / 3)

def test_gedit(tmp_path):
    rows = [{"task_type": "background_change", "key": "k1", "instruction": "make the sky red", "instruction_language": "en",
             "input_image": {"bytes": png(), "path": None}},
            {"task_type": "color_alter", "key": "k2", "instruction": "turn it blue", "instruction_language": "en",
             "input_image": {"bytes": png((0, 0, 200)), "path": None}},
            {"task_type": "color_alter", "key": "k3", "instruction": "变蓝", "instruction_language": "cn",
             "input_image": {"bytes": png(), "path": None}}]
    write_parquet(tmp_path / "data" / "data" / "train-00000-of-00001.parquet", rows)
    sc = {"k1": ([8, 6], [9, 4]), "k2": (4, 9), "k3": (1, 1)}
    out = tmp_path / "out"
    eng, seen = answers({})
    res = run(GEditBench(), eng, tmp_path / "data", out, judge=lambda m, s, e: dict(zip(("SC", "PQ"), sc[m["key"]])), verbose=False)["metrics"]
    assert (out / "gen_image/fullset/color_alter/en/k2.png").exists() and (out / "gen_image/fullset/color_alter/en/k2_SRCIMG.png").exists()
    assert (out / "gen_image/fullset/color_alter/cn/k3.png").exists()
    assert seen["color_alter/en/k2"] == ("turn it blue", 1)
    assert res["en/SC"] == pytest.approx((6 + 4) / 2) and res["en/PQ"] == pytest.approx((4 + 9) / 2)
    assert res["en/O"] == pytest.approx((math.sqrt(24) + 6) / 2) and res["cn/O"] == pytest.approx(1.0)
    assert (out / "gpt4o/eval_results_new/color_alter_en_vie_score.csv").exists()
    assert GEditBench().defaults["cfg_renorm_type"] == "text_channel" and GEditBench().vit == "vlm"

def test_imgedit(tmp_path):
    root = tmp_path / "Benchmark" / "singleturn"
    write_img(root / "animal" / "1.jpg"); write_img(root / "style" / "2.jpg")
    (root / "singleturn.json").write_text(json.dumps({
        "a1": {"id": "animal/1.jpg", "prompt": "replace the cat with a dog", "edit_type": "replace"},
        "b2": {"id": "style/2.jpg", "prompt": "make it a watercolor", "edit_type": "style"}}))
    (root / "judge_prompt.json").write_text(json.dumps({"replace": "Rate the edit: <edit_prompt>", "style": "Style: <edit_prompt>"}))
    asked = []
    def judge(prompt, src, edited):
        asked.append(prompt); return "Prompt Compliance: 4\nVisual Naturalness: 2\n" if "dog" in prompt else "Score: 5"
    out = tmp_path / "out"
    res = run(ImgEdit(), ScriptedEngine(), tmp_path, out, judge=judge, verbose=False)["metrics"]
    assert (out / "bagel" / "a1.png").exists() and (out / "bagel" / "b2.png").exists()
    assert "Rate the edit: replace the cat with a dog" in asked
    assert res == {"replace": 3.0, "style": 5.0, "overall": 4.0}
    assert json.loads((out / "typescore.json").read_text())["overall"] == 4.0 and "a1" in json.loads((out / "result.json").read_text())

def test_kris(tmp_path):
    write_img(tmp_path / "KRIS_Bench" / "count_change" / "1.jpg")
    for n in ("a.jpg", "b.jpg"): write_img(tmp_path / "KRIS_Bench" / "multi" / n)
    (tmp_path / "final_data.json").write_text(json.dumps([
        {"id": 1, "type": "count_change", "ori_img": "1.jpg", "ins_en": "add one apple", "explain_en": ""},
        {"id": 2, "type": "multi", "ori_img": ["a.jpg", "b.jpg"], "ins_en": "combine them", "explain_en": ""}]))
    eng, seen = answers({})
    out = tmp_path / "out"
    judge = lambda item, srcs, edited: {"consistency": 5, "instruction": 3} if item["id"] == 1 else {"consistency": 1, "instruction": 1, "knowledge": None}
    res = run(KRISBench(), eng, tmp_path, out, judge=judge, verbose=False)["metrics"]
    assert seen["multi/2"] == ("combine them", 2)
    assert (out / "bagel" / "count_change" / "1.png").exists() and (out / "bagel" / "multi" / "2.png").exists()
    assert res == {"count_change": 75.0, "multi": 0.0, "overall": 37.5}

def test_rise(tmp_path):
    write_img(tmp_path / "data" / "images" / "t.png"); write_img(tmp_path / "data" / "images" / "l.png")
    (tmp_path / "data" / "datav2_total_w_subtask.json").write_text(json.dumps([
        {"image": "images/t.png", "instruction": "show it in 10 years", "category": "temporal", "index": "t1", "subtask": "life"},
        {"image": "images/l.png", "instruction": "solve the maze", "category": "logical", "index": "l1", "subtask": "maze"}]))
    j = {"t1": {"consistency": 5, "reasoning": 5, "plausibility": 5}, "l1": {"consistency": 3, "reasoning": 1, "plausibility": None}}
    out = tmp_path / "out"
    res = run(RISEBench(), ScriptedEngine(), tmp_path, out, judge=lambda item, s, e: j[item["index"]], verbose=False)["metrics"]
    assert (out / "bagel" / "temporal" / "t1.png").exists() and (out / "bagel" / "logical" / "l1.png").exists()
    assert res["temporal/accuracy"] == 1.0 and res["logical/accuracy"] == 0.0 and res["accuracy"] == 0.5
    assert res["score"] == pytest.approx((5 + max(1, (0.9 + 0.7) / 2)) / 2)
    assert RISEBench().defaults["cfg_img_scale"] == 2.0

def test_generation_without_judge_writes_files_and_no_scores(tmp_path):
    (tmp_path / "final_data.json").write_text(json.dumps([{"Prompt": "p", "prompt_id": 1}]))
    s = run(WISE(), ScriptedEngine(), tmp_path, tmp_path / "o", verbose=False)
    assert s["metrics"] == {} and "needs a judge" in s["note"] and (tmp_path / "o" / "images" / "1.png").exists()

# ---------------------------------------------------------------- understanding

def test_mme(tmp_path):
    q = tmp_path / "Your_Results"; q.mkdir()
    (q / "count.txt").write_text("a.jpg\tIs there one cat? Please answer yes or no.\tYes\n"
                                 "a.jpg\tAre there two cats? Please answer yes or no.\tNo\n"
                                 "b.jpg\tIs there a dog? Please answer yes or no.\tYes\n"
                                 "b.jpg\tIs there a cow? Please answer yes or no.\tNo\n")
    (q / "artwork.txt").write_text("c.jpg\tIs it by Monet? Please answer yes or no.\tNo\nc.jpg\tIs it by Degas? Please answer yes or no.\tYes\n")
    (q / "code_reasoning.txt").write_text("d.png\tDoes it print 3? Please answer yes or no.\tYes\nd.png\tDoes it print 4? Please answer yes or no.\tNo\n")
    root = tmp_path / "MME_Benchmark_release_version"
    for t, n in (("count", "a.jpg"), ("count", "b.jpg"), ("code_reasoning", "d.png")): write_img(root / t / n)
    write_img(root / "artwork" / "images" / "c.jpg")
    table = {"count/0000": "Yes", "count/0001": "yes, two", "count/0002": "True", "count/0003": "No.",
             "artwork/0000": "no", "artwork/0001": "no", "code_reasoning/0000": "yes", "code_reasoning/0001": "no"}
    eng, seen = answers(table)
    out = tmp_path / "out"
    m = run(MME(), eng, tmp_path, out, verbose=False)["metrics"]
    assert seen["count/0000"] == ("Is there one cat? Please answer yes or no." + SUFFIX, 1)
    assert m["count/acc"] == 75.0 and m["count/acc+"] == 50.0 and m["artwork/acc"] == 50.0 and m["artwork/acc+"] == 0.0
    assert m["Perception"] == 125.0 + 50.0 and m["Cognition"] == 200.0 and m["total"] == 375.0
    assert (out / "count.txt").read_text().splitlines()[1] == "a.jpg\tAre there two cats? Please answer yes or no.\tNo\tyes"
    assert MME().defaults["max_new_tokens"] == 20

def _b64(color) -> str: return base64.b64encode(png(color)).decode()

def test_mmbench(tmp_path):
    import pandas as pd
    rows = [{"index": 0, "question": "What color?", "hint": "Look closely.", "A": "red", "B": "blue", "C": None, "D": None,
             "answer": "A", "category": "color", "l2-category": "attr", "split": "dev", "image": _b64((200, 0, 0))},
            {"index": 1000000, "question": "What color?", "hint": "Look closely.", "A": "blue", "B": "red", "C": None, "D": None,
             "answer": "B", "category": "color", "l2-category": "attr", "split": "dev", "image": "0"},
            {"index": 1, "question": "How many?", "hint": None, "A": "1", "B": "2", "C": "3", "D": None,
             "answer": "C", "category": "count", "l2-category": "attr", "split": "dev", "image": _b64((0, 0, 200))}]
    pd.DataFrame(rows).to_csv(tmp_path / "mmbench_dev_20230712.tsv", sep="\t", index=False)
    eng, seen = answers({"0": "A", "1000000": "A", "1": "The answer is C."})
    out = tmp_path / "out"
    m = run(MMBench(), eng, tmp_path, out, verbose=False)["metrics"]
    assert seen["0"][0] == f"Look closely.\nWhat color?\nA. red\nB. blue\n{LETTER}"
    assert seen["1"][0] == f"How many?\nA. 1\nB. 2\nC. 3\n{LETTER}"
    assert m["acc"] == pytest.approx(200 / 3) and m["circular_acc"] == 50.0
    table = out / "results.xlsx" if (out / "results.xlsx").exists() else out / "results.tsv"
    assert table.exists()
    if table.suffix == ".tsv": assert list(pd.read_csv(table, sep="\t")["prediction"]) == ["A", "A", "C"]
    assert MMBench("cn").items(tmp_path)[0].prompt.endswith("\n请直接回答选项字母。")

def _mmmu_rows():
    img = {"bytes": png(size=(10, 6)), "path": None}
    return [{"id": "validation_Art_1", "question": "Which <image 1>?", "options": "['x', 'y', 'z']", "image_1": img, "image_2": img,
             "answer": "B", "question_type": "multiple-choice"},
            {"id": "validation_Art_2", "question": "Which style?", "options": "['a', 'b']", "image_1": img, "image_2": None,
             "answer": "A", "question_type": "multiple-choice"},
            {"id": "validation_Math_1", "question": "What is 2+2?", "options": "[]", "image_1": img, "image_2": None,
             "answer": "4", "question_type": "open"}]

def test_mmmu_direct(tmp_path):
    write_parquet(tmp_path / "Art" / "validation-00000-of-00001.parquet", _mmmu_rows()[:2])
    write_parquet(tmp_path / "Math" / "validation-00000-of-00001.parquet", _mmmu_rows()[2:])
    sizes = {}
    from bagel.eval import load_image
    def text(item):
        sizes[item.id] = [load_image(s).size for s in item.images]
        return {"validation_Art_1": "B", "validation_Art_2": "B. b", "validation_Math_1": "4.0"}[item.id]
    out = tmp_path / "out"
    m = run(MMMU(), ScriptedEngine(text=text), tmp_path, out, verbose=False)["metrics"]
    assert sizes["validation_Art_1"] == [(20, 12), (10, 6)]          # the first image upscaled 2x, the second as is
    items = {it.id: it for it in MMMU().items(tmp_path)}
    assert items["validation_Art_1"].prompt == f"Which <image 1>?\nA. x\nB. y\nC. z\n{LETTER}"
    assert items["validation_Math_1"].prompt == "What is 2+2?\n" + SUFFIX.strip()
    assert m == {"multiple_choice": 0.5, "open": 1.0, "overall": pytest.approx(2 / 3)}
    assert json.loads((out / "prediction.json").read_text()) == {"validation_Art_1": "B", "validation_Art_2": "B", "validation_Math_1": "4.0"}
    assert MMMU().defaults["max_new_tokens"] == 10

def test_mmmu_cot(tmp_path):
    write_parquet(tmp_path / "Art" / "validation-00000-of-00001.parquet", _mmmu_rows())
    text = lambda it: {"validation_Art_1": "<think> y fits </think> B", "validation_Art_2": "<think>A</think> C"}.get(it.id, "<think></think> 5")
    out = tmp_path / "out"
    b = get_benchmark("mmmu_cot")
    m = run(b, ScriptedEngine(text=text), tmp_path, out, verbose=False)["metrics"]
    p = {it.id: it.prompt for it in b.items(tmp_path)}
    assert p["validation_Art_1"] == f"{COT_PREFIX}\nQuestion: Which <image 1>?\nOptions:\nA. x\nB. y\nC. z\n{LETTER}"
    assert p["validation_Math_1"].startswith("You should first think about the reasoning process in the mind and then provide the user with the answer. The reasoning")
    assert m == {"multiple_choice": 0.5, "open": 0.0, "overall": pytest.approx(1 / 3)}
    assert len((out / "results.jsonl").read_text().splitlines()) == 3
    m2 = run(b, ScriptedEngine(text=text), tmp_path, out, judge=lambda meta, resp: True, verbose=False)["metrics"]
    assert m2["open"] == 1.0

def test_mmvet(tmp_path):
    write_img(tmp_path / "images" / "v1_0.png"); write_img(tmp_path / "images" / "v1_1.png")
    (tmp_path / "llava-mm-vet.jsonl").write_text(json.dumps({"question_id": 0, "image": "v1_0.png", "text": "What is it?"}) + "\n" +
                                                 json.dumps({"question_id": 1, "image": "v1_1.png", "text": "Read the sign."}) + "\n")
    (tmp_path / "mm-vet.json").write_text(json.dumps({"v1_0": {"answer": "cat", "capability": ["rec"]},
                                                      "v1_1": {"answer": "stop", "capability": ["ocr", "rec"]}}))
    eng, seen = answers({"v1_0": "a cat", "v1_1": "go"})
    out = tmp_path / "out"
    m = run(MMVet(), eng, tmp_path, out, judge=lambda item, a: float(item["answer"] in a), verbose=False)["metrics"]
    assert seen["v1_1"][0] == "Read the sign."
    assert json.loads((out / "results.json").read_text()) == {"v1_0": "a cat", "v1_1": "go"}
    assert m == {"ocr": 0.0, "rec": 50.0, "total": 50.0}

def test_mathvista(tmp_path):
    img = {"bytes": png(), "path": None}
    rows = [{"pid": "1", "question": "q1", "query": "Hint: ... Question: q1 Choices: (A) 3 (B) 5", "decoded_image": img, "choices": ["3", "5"],
             "answer": "5", "question_type": "multi_choice", "answer_type": "text", "precision": None, "unit": None},
            {"pid": "2", "question": "q2", "query": "Question: q2 (two decimals)", "decoded_image": img, "choices": None,
             "answer": "1.25", "question_type": "free_form", "answer_type": "float", "precision": 2.0, "unit": None},
            {"pid": "3", "question": "q3", "query": "Question: q3", "decoded_image": img, "choices": None,
             "answer": "7", "question_type": "free_form", "answer_type": "integer", "precision": None, "unit": None}]
    write_parquet(tmp_path / "data" / "testmini-00000-of-00001.parquet", rows)
    eng, seen = answers({"1": "B", "2": "1.249", "3": "8"})
    out = tmp_path / "out"
    m = run(MathVista(), eng, tmp_path, out, verbose=False)["metrics"]
    assert seen["2"][0] == "Question: q2 (two decimals)"
    assert m == {"free_form": 0.5, "multi_choice": 1.0, "accuracy": pytest.approx(2 / 3)}
    assert json.loads((out / "score.json").read_text())["accuracy"] == pytest.approx(2 / 3)
    m2 = run(MathVista(), eng, tmp_path, out, judge=lambda item, r: "7" if item["pid"] == "3" else r, verbose=False)["metrics"]
    assert m2["accuracy"] == 1.0

def test_pope(tmp_path):
    qs, ann = [], {"random": [], "popular": []}
    labels = {"random": ["yes", "yes", "no", "no"], "popular": ["yes", "no"]}
    qid = 0
    for cat, ls in labels.items():
        for k, lab in enumerate(ls):
            qid += 1; name = f"COCO_val2014_{qid:012d}.jpg"
            write_img(tmp_path / "val2014" / name)
            qs.append({"question_id": qid, "image": name, "text": f"Is there a thing {k} in the image?", "category": cat})
            ann[cat].append({"question_id": k, "image": name, "text": "...", "label": lab})
    (tmp_path / "llava_pope_test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    for cat, rows in ann.items(): write_img(tmp_path / "x.png"); (tmp_path / "coco" / f"coco_pope_{cat}.json").parent.mkdir(exist_ok=True); \
        (tmp_path / "coco" / f"coco_pope_{cat}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    replies = {"random/1": "Yes", "random/2": "No, there is not.", "random/3": "Yes.", "random/4": "No",
               "popular/5": "yes", "popular/6": "Yes, a cat."}
    eng, seen = answers(replies)
    out = tmp_path / "out"
    m = run(POPE(), eng, tmp_path, out, verbose=False)["metrics"]
    assert seen["random/1"][0] == "Is there a thing 0 in the image?" + SUFFIX
    # random: TP=1 FN=1 FP=1 TN=1; popular: TP=1 FP=1
    assert (m["random/acc"], m["random/precision"], m["random/recall"], m["random/f1"], m["random/yes_ratio"]) == (0.5, 0.5, 0.5, 0.5, 0.5)
    assert (m["popular/acc"], m["popular/precision"], m["popular/recall"], m["popular/yes_ratio"]) == (0.5, 0.5, 1.0, 1.0)
    assert m["acc"] == 0.5 and m["f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert len((out / "results.jsonl").read_text().splitlines()) == 6

def test_oracle_answers_score_full_marks(tmp_path):
    "Ground-truth answers reach 100% on the exact scorers (MME acc+, MMBench circular, POPE F1)."
    q = tmp_path / "Your_Results"; q.mkdir()
    (q / "color.txt").write_text("a.jpg\tIs it red?\tYes\na.jpg\tIs it blue?\tNo\n")
    write_img(tmp_path / "MME_Benchmark_release_version" / "color" / "a.jpg")
    m = run(MME(), ScriptedEngine(text=lambda it: it.meta["gt"]), tmp_path, tmp_path / "o", verbose=False)["metrics"]
    assert m["color/acc"] == 100.0 and m["color/acc+"] == 100.0 and m["total"] == 200.0

def test_bad_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no final_data.json under"): WISE().items(tmp_path)
    with pytest.raises(ValueError, match="needs --data"): MMMU().items(None)
    with pytest.raises(FileNotFoundError, match="no validation-\\*.parquet"): MMMU().items(tmp_path)
    with pytest.raises(ValueError, match="lang must be"): MMBench("de")
    (tmp_path / "llava_pope_test.jsonl").write_text(json.dumps({"question_id": 1, "image": "x.jpg", "text": "?", "category": "random"}) + "\n")
    with pytest.raises(ValueError, match="no label for question 1"): POPE().items(tmp_path)
