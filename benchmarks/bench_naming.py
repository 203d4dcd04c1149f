#!/usr/bin/env python3
"""Offline subject naming on the bundled sample's pages, against DreamBench's own names.

    python benchmarks/bench_naming.py --output benchmarks/results/naming.json --doc docs/subject-naming.md

Every product page of ``sample/crawl.parquet`` shows one DreamBench subject (its ``note`` column says which);
``tests/data/dreambench_subjects.csv`` (copied from DreamBench) gives that subject's class noun and whether it
is alive. The page's kept images are named as the ``demo`` profile names them: each image's cleaned alt text
(the ``alt_text`` caption backend) and the page URL through :func:`transforms.naming.name_subject`. The blog
post that mixes two products must get no subject.

Reported: class noun exact, subject containing the expected class noun (whole words, singular or plural),
subject equal to DreamBench's name of the subject (``wolf_plushie`` -> "wolf plushie", ``dog2`` -> "dog"),
``is_live`` correct; the same with only the slug and only the texts as evidence (what each source adds);
and the time to build the lexicon and to name one cluster. The sample's alt texts name each subject by its
DreamBench class (``scripts/build_sample.py`` planted them), so the texts alone find every class; the
slugs carry the subjects' own names. With ``--doc`` the table between the
``<!-- naming-table -->`` markers of that Markdown file is rewritten.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import re
import sys
import time
from typing import Any

import pyarrow.parquet as pq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.common import header, write_results  # noqa: E402
from transforms.caption import clean_alt_text  # noqa: E402
from transforms.naming import build_lexicon, imagenet_categories, load_lexicon, name_subject, singular  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
SAMPLE = os.path.join(ROOT, "sample", "crawl.parquet")
SUBJECTS = os.path.join(ROOT, "tests", "data", "dreambench_subjects.csv")
START, END = "<!-- naming-table -->", "<!-- /naming-table -->"
METRICS = ("class_noun", "subject_names_class", "subject_is_dreambench_name", "is_live")


def sample_pages(path: str = SAMPLE) -> list[dict[str, Any]]:
    """The sample's pages with kept images: URL, each image's alt text, and the DreamBench subject(s) shown."""
    table = pq.read_table(path, columns=["text", "expected", "expected_page", "note"]).to_pylist()
    pages: dict[str, dict[str, Any]] = collections.OrderedDict()
    for row in table:
        if row["expected"] != "kept":
            continue
        page = pages.setdefault(row["expected_page"], {"page_url": row["expected_page"], "texts": [],
                                                       "dreambench": set()})
        page["texts"].append(row["text"])
        page["dreambench"].update(re.findall(r"DreamBench (\w+)/\d+", row["note"] or ""))
    return list(pages.values())


def dreambench_subjects(path: str = SUBJECTS) -> dict[str, dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        return {row["subject"]: {"class_noun": row["class_name"], "is_live": row["prompt_set"] == "live"}
                for row in csv.DictReader(f)}


def names(phrase: str | None, noun: str) -> bool:
    """Whether a phrase contains a noun as whole words (its last word singular or plural)."""
    if not phrase:
        return False
    words = [singular(w) for w in re.findall(r"[^\W_]+", phrase.lower())]
    target = [singular(w) for w in noun.lower().split()]
    return any(words[i:i + len(target)] == target for i in range(len(words) - len(target) + 1))


def evaluate(pages: list[dict[str, Any]], subjects: dict[str, dict[str, Any]], use_slug: bool = True,
             use_texts: bool = True) -> dict[str, Any]:
    rows, hits = [], collections.Counter()
    for page in pages:
        texts = [(clean_alt_text(text),) for text in page["texts"]] if use_texts else [() for _ in page["texts"]]
        got = name_subject(page["page_url"] if use_slug else None, texts)
        if len(page["dreambench"]) == 1:
            (db,) = page["dreambench"]
            want = subjects[db]
            ok = {"class_noun": got.class_noun == want["class_noun"],
                  "subject_names_class": names(got.subject, want["class_noun"]),
                  "subject_is_dreambench_name": got.subject == re.sub(r"\d+$", "", db).replace("_", " "),
                  "is_live": got.is_live is want["is_live"]}
            expected = {"dreambench": db, "class_noun": want["class_noun"], "is_live": want["is_live"]}
        else:  # a page mixing subjects: the right answer is no subject
            ok = {key: got.subject is None for key in METRICS}
            expected = {"dreambench": "+".join(sorted(page["dreambench"])), "class_noun": None, "is_live": None}
        hits.update(key for key, value in ok.items() if value)
        rows.append({"page_url": page["page_url"], "expected": expected,
                     "produced": {"subject": got.subject, "class_noun": got.class_noun, "is_live": got.is_live,
                                  "score": got.score, "evidence": got.evidence},
                     "correct": ok})
    n = len(pages)
    return {"pages": n, "accuracy": {key: round(hits[key] / n, 3) for key in METRICS},
            "correct": {key: hits[key] for key in METRICS}, "rows": rows}


def timings(pages: list[dict[str, Any]], repeat: int) -> dict[str, float]:
    t0 = time.perf_counter()
    categories = imagenet_categories()
    t1 = time.perf_counter()
    build_lexicon(categories)
    t2 = time.perf_counter()
    load_lexicon()
    inputs = [(page["page_url"], [(clean_alt_text(text),) for text in page["texts"]]) for page in pages]
    start = time.perf_counter()
    for _ in range(repeat):
        for url, texts in inputs:
            name_subject(url, texts)
    per_cluster = (time.perf_counter() - start) / (repeat * len(inputs))
    return {"read_imagenet_names_ms": round((t1 - t0) * 1e3, 2), "build_lexicon_ms": round((t2 - t1) * 1e3, 2),
            "name_one_cluster_us": round(per_cluster * 1e6, 1), "clusters_timed": repeat * len(inputs)}


def markdown(result: dict[str, Any]) -> str:
    def cell(value: Any) -> str:
        return "—" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    def mark(ok: bool, sign: str = "✗") -> str:
        return "" if ok else f" {sign}"

    lines = ["| page (path) | DreamBench subject | expected class, live | subject | class noun | live |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in result["both"]["rows"]:
        url = re.sub(r"^https?://[^/]+", "", row["page_url"])
        e, p, ok = row["expected"], row["produced"], row["correct"]
        lines.append(f"| `{url}` | {e['dreambench']} | {cell(e['class_noun'])}, {cell(e['is_live'])} "
                     f"| {cell(p['subject'])}{mark(ok['subject_is_dreambench_name'], '≠')} "
                     f"| {cell(p['class_noun'])}{mark(ok['class_noun'])} | {cell(p['is_live'])}{mark(ok['is_live'])} |")
    lines += ["", "| evidence used | class noun exact | subject contains the class noun | subject = DreamBench's name "
                  "| is_live correct |", "| --- | --- | --- | --- | --- |"]
    for name, label in (("both", "slug + texts + lexicon"), ("texts_only", "texts + lexicon"),
                        ("slug_only", "slug + lexicon")):
        c, n = result[name]["correct"], result[name]["pages"]
        lines.append(f"| {label} | " + " | ".join(f"{c[key]}/{n}" for key in METRICS) + " |")
    t = result["timing"]
    lines += ["", f"Lexicon: {result['lexicon']['entries']} entries ({result['lexicon']['source']}), read in "
                  f"{t['read_imagenet_names_ms']} ms and built in {t['build_lexicon_ms']} ms; naming one cluster "
                  f"takes {t['name_one_cluster_us']} µs (mean of {t['clusters_timed']}, one CPU core). "
                  f"≠: subject differs from DreamBench's name; ✗: wrong. Generated by `benchmarks/bench_naming.py` "
                  f"({result['created'][:10]})."]
    return "\n".join(lines)


def rewrite_doc(path: str, table: str) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} ... {END} markers")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{before}{START}\n{table}\n{END}{after}")
    print(f"table written to {path}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="benchmarks/results/naming.json")
    parser.add_argument("--doc", default=None, help="Markdown file whose naming table to rewrite")
    parser.add_argument("--repeat", type=int, default=50, help="passes over the pages for the timing")
    args = parser.parse_args(argv)
    pages, subjects = sample_pages(), dreambench_subjects()
    lexicon = load_lexicon()
    result = header("naming")
    result["lexicon"] = {"entries": len(lexicon.entries), "source": lexicon.source}
    result["both"] = evaluate(pages, subjects)
    result["texts_only"] = evaluate(pages, subjects, use_slug=False)
    result["slug_only"] = evaluate(pages, subjects, use_texts=False)
    result["timing"] = timings(pages, args.repeat)
    for name in ("both", "texts_only", "slug_only"):
        print(f"{name:10s} {result[name]['correct']} of {result[name]['pages']}")
    print(result["timing"])
    write_results(args.output, result)
    if args.doc:
        rewrite_doc(args.doc, markdown(result))
    return result


if __name__ == "__main__":
    main()
