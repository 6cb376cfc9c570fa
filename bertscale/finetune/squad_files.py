"""SQuAD's files read into one `SquadFile` (articles, paragraphs, questions and their
answers, as the official evaluation reads them); featurizing, decoding and the run are
bertscale.finetune.squad.

Files: the official JSON, or Hugging Face's SQuAD (rajpurkar/squad, squad_v2): a split's
Parquet file (`plain_text/validation-00000-of-00001.parquet`) or `save_to_disk` folder with
columns id, title, context, question and answers {text: [...], answer_start: [...]}. Its rows
are grouped back into articles (consecutive equal titles) and paragraphs (consecutive equal
contexts), the layout the official evaluation reads; in v2.0 a question without answers is
unanswerable.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertscale.errors import UserError
from bertscale.files import read_text


@dataclass
class SquadExample:
    qid: str
    question: str
    context_index: int
    """Index into SquadFile.contexts (questions of one paragraph share it)."""
    answers: list[tuple[str, int]]
    """(text, character start) of each gold answer; empty for an unanswerable question."""
    is_impossible: bool = False


@dataclass
class SquadFile:
    path: Path
    version: str
    dataset: list[dict[str, Any]]
    """The file's "data" list, as the official evaluation reads it."""
    contexts: list[str]
    examples: list[SquadExample]

    @property
    def has_answers(self) -> bool:
        """Whether the file can be scored: v2.0 always (an empty list means "no answer");
        v1.1 when every question has gold answers (a file without them is a test set)."""
        return self.version == "2.0" or all(e.answers for e in self.examples)


_VERSIONS = ("1.1", "2.0")


def _line_of(text: str, qid: str) -> int | None:
    m = re.search(r'"id"\s*:\s*' + re.escape(json.dumps(qid)), text)
    return text.count("\n", 0, m.start()) + 1 if m else None


def _table_files(path: Path) -> list[Path] | None:
    """The Parquet / Arrow files of Hugging Face's SQuAD at `path` (a file, or a save_to_disk
    folder), or None for the official JSON."""
    from bertscale.data import tables

    if path.is_dir() and tables.is_saved_dataset(path):
        return tables.saved_dataset_files(path)
    if path.is_file() and tables.file_kind(path) is not None:
        return [path]
    return None


def _squad_from_table(files: list[Path], version: str) -> dict[str, Any]:
    """Hugging Face's SQuAD rows -> the official JSON layout (articles, paragraphs, qas)."""
    from bertscale.data import tables

    articles: list[dict[str, Any]] = []
    empty = answered = 0
    for path in files:
        rows = tables.iter_rows(path, ["id", "title", "context", "question", "answers"],
                                "; is this Hugging Face's SQuAD?")
        for row, (qid, title, context, question, answers) in rows:
            if isinstance(answers, dict):   # datasets' Sequence of a dict: a struct of lists
                texts, starts = answers.get("text") or [], answers.get("answer_start") or []
                if len(texts) != len(starts):
                    raise UserError(f"{path}: row {row} (question {qid}): answers has "
                                    f"{len(texts)} texts but {len(starts)} answer_starts")
                answers = [{"text": t, "answer_start": a} for t, a in zip(texts, starts)]
            elif not isinstance(answers, list):
                raise UserError(f"{path}: row {row} (question {qid}): answers is "
                                f"{type(answers).__name__}, not a struct of lists")
            if not articles or articles[-1]["title"] != title:
                articles.append({"title": title, "paragraphs": []})
            paras = articles[-1]["paragraphs"]
            if not paras or paras[-1]["context"] != context:
                paras.append({"context": context, "qas": []})
            qa: dict[str, Any] = {"id": qid, "question": question, "answers": answers}
            if version == "2.0":
                qa["is_impossible"] = not answers
            paras[-1]["qas"].append(qa)
            empty += not answers
            answered += bool(answers)
    if version == "1.1" and empty and answered:
        raise UserError(f"{files[0]}: {empty} questions have no answer: this is SQuAD v2.0; run "
                        f"with --version 2.0")
    return {"version": version if version == "1.1" else "v2.0", "data": articles}


# Over ruff's complexity limit on purpose: one check per malformed field of a SQuAD file.
def read_squad(path: str | Path, version: str) -> SquadFile:  # noqa: C901
    """Read and check an official SQuAD JSON file of the stated version."""
    path = Path(path)
    if version not in _VERSIONS:
        raise UserError(f"--version {version!r}: choose 1.1 or 2.0")
    table = _table_files(path)
    if table is not None:
        text, top = "", _squad_from_table(table, version)
    else:
        text = read_text(path)
        try:
            top = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column "
                            f"{e.colno})") from None
    if not isinstance(top, dict) or not isinstance(top.get("data"), list):
        raise UserError(f"{path}: not a SQuAD file (expected an object with a \"data\" list of "
                        f"articles)")

    def where(qid: str | None, article: int, para: int) -> str:
        line = _line_of(text, qid) if qid is not None else None
        loc = f"{path}:{line}" if line else str(path)
        title = top["data"][article].get("title", article) if article < len(top["data"]) else article
        return f"{loc}: article {title!r}, paragraph {para}" + (f", question {qid}" if qid else "")

    file_version = str(top.get("version", "")).lstrip("v")
    contexts: list[str] = []
    examples: list[SquadExample] = []
    seen: set[str] = set()
    for ai, article in enumerate(top["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise UserError(f"{path}: article {ai} has no \"paragraphs\" list")
        for pi, para in enumerate(article["paragraphs"]):
            if not isinstance(para.get("context"), str) or not isinstance(para.get("qas"), list):
                raise UserError(f"{where(None, ai, pi)}: needs a \"context\" string and a "
                                f"\"qas\" list")
            context = para["context"]
            contexts.append(context)
            for qa in para["qas"]:
                qid = qa.get("id")
                if not isinstance(qid, str) or not isinstance(qa.get("question"), str):
                    raise UserError(f"{where(None, ai, pi)}: a question lacks its \"id\" or "
                                    f"\"question\" string")
                if qid in seen:
                    raise UserError(f"{where(qid, ai, pi)}: question id appears twice")
                seen.add(qid)
                impossible = qa.get("is_impossible")
                if version == "1.1" and (impossible is not None or file_version == "2.0"):
                    raise UserError(f"{where(qid, ai, pi)}: this is a SQuAD v2.0 file "
                                    f"(is_impossible fields / version {top.get('version')!r}); "
                                    f"run with --version 2.0")
                if version == "2.0" and not isinstance(impossible, bool):
                    hint = ("this looks like a SQuAD v1.1 file; run with --version 1.1"
                            if impossible is None else "it must be true or false")
                    raise UserError(f"{where(qid, ai, pi)}: no boolean \"is_impossible\" field "
                                    f"({hint})")
                answers_raw = qa.get("answers")
                if not isinstance(answers_raw, list):
                    raise UserError(f"{where(qid, ai, pi)}: \"answers\" must be a list")
                if impossible and answers_raw:
                    raise UserError(f"{where(qid, ai, pi)}: is_impossible is true but it has "
                                    f"answers (unanswerable questions keep their spans in "
                                    f"\"plausible_answers\")")
                answers = []
                for a in answers_raw:
                    if (not isinstance(a, dict) or not isinstance(a.get("text"), str)
                            or not isinstance(a.get("answer_start"), int)):
                        raise UserError(f"{where(qid, ai, pi)}: each answer needs \"text\" and "
                                        f"an integer \"answer_start\"")
                    if not 0 <= a["answer_start"] <= len(context):
                        raise UserError(f"{where(qid, ai, pi)}: answer_start {a['answer_start']} "
                                        f"is outside the context ({len(context)} characters)")
                    answers.append((a["text"], a["answer_start"]))
                examples.append(SquadExample(qid, qa["question"], len(contexts) - 1, answers,
                                             bool(impossible)))
    if not examples:
        raise UserError(f"{path}: the file has no questions")
    return SquadFile(path, version, top["data"], contexts, examples)
