"""The offline lm-evaluation-harness tasks in docs/lm_eval/ (run by docs/lm_eval/run.sh, lm-eval not installed here)."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "docs" / "lm_eval"


def test_items_are_well_formed_multiple_choice():
    items = [json.loads(line) for line in (TASKS / "labkit_mc.jsonl").read_text().splitlines()]
    assert len(items) == 20
    for item in items:
        assert set(item) == {"question", "choices", "answer"}, item
        assert item["question"].endswith("?") and len(set(item["choices"])) == len(item["choices"]) == 4, item
        assert isinstance(item["answer"], int) and 0 <= item["answer"] < 4, item
    assert len({item["question"] for item in items}) == len(items)


def test_each_task_reads_the_items_from_a_path_relative_to_the_repository_root():
    configs = sorted(TASKS.glob("*.yaml"))
    assert [c.stem for c in configs] == ["labkit_gen", "labkit_mc"]
    for config in configs:
        text = config.read_text()
        assert re.search(rf"^task: {config.stem}$", text, re.M), config
        files = re.findall(r"^\s+test: (\S+)$", text, re.M)
        assert files == ["docs/lm_eval/labkit_mc.jsonl"] and (ROOT / files[0]).is_file(), config
