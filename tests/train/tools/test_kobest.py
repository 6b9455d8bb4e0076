"""KoBEST offline: our task configs are lm-evaluation-harness's own apart from the data source; the shipped data
is complete and licensed; `train.lm_eval` scores it offline to the accuracy computed by hand from per-choice
log-likelihoods; the in-loop evaluator gives the same accuracies as `train.lm_eval` on the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tests.helpers import REPO, run_module, torchrun_pretrain, train_args

lm_eval = pytest.importorskip("lm_eval")
UPSTREAM = Path(lm_eval.__file__).parent / "tasks" / "kobest"
OURS = REPO / "train" / "lm_eval_tasks" / "kobest"
DATA = REPO / "data" / "eval" / "kobest"
TASKS = ["boolq", "copa", "hellaswag", "sentineg", "wic"]
DATA_SOURCE = {"dataset_path", "dataset_name", "dataset_kwargs"}


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def _yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_Loader)


@pytest.mark.parametrize("task", TASKS)
def test_task_config_is_upstreams_but_for_the_data_source(task):
    ours, upstream = _yaml(OURS / f"kobest_{task}.yaml"), _yaml(UPSTREAM / f"kobest_{task}.yaml")
    assert {k: v for k, v in ours.items() if k not in DATA_SOURCE} == {
        k: v for k, v in upstream.items() if k not in DATA_SOURCE
    }
    assert ours["dataset_path"] == "parquet" and "dataset_name" not in ours
    files = ours["dataset_kwargs"]["data_files"]
    for split in (upstream["training_split"], upstream["validation_split"], upstream["test_split"]):
        assert files[split] == f"DATA_DIR/kobest/{task}/{split}.parquet"
        assert (DATA / task / f"{split}.parquet").is_file()


def test_helpers_and_group_are_upstreams():
    assert (OURS / "utils.py").read_bytes() == (UPSTREAM / "utils.py").read_bytes()
    assert _yaml(OURS / "_kobest.yaml") == _yaml(UPSTREAM / "_kobest.yaml")


def test_shipped_data_is_complete_and_licensed():
    rows = {"boolq": 1404, "copa": 1000, "hellaswag": 500, "sentineg": 397, "wic": 1260}  # KoBEST v1.0 test sets
    for task, n in rows.items():
        table = pq.read_table(DATA / task / "test.parquet")
        assert table.num_rows == n and "label" in table.column_names
    text = (DATA / "LICENSE.txt").read_text()
    assert "CC-BY-SA-4.0" in text and "KoBEST" in text and "Kim" in text
    assert sum(f.stat().st_size for f in DATA.rglob("*.parquet")) < 4_000_000


def _hand_accuracy(hf_dir: Path, task: str, limit: int) -> tuple[float, list[list[float]]]:
    """Accuracy by hand: transformers' model and tokenizer, the prompt of lm-eval's KoBEST definition written out
    here, each choice's summed log-probability, the argmax against the gold label."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    docs = pq.read_table(DATA / task / "test.parquet").to_pylist()[:limit]
    correct, all_lls = 0, []
    for doc in docs:
        if task == "copa":
            connector = {"원인": " 왜냐하면", "결과": " 그래서"}[doc["question"].strip()]
            ctx, choices = f"{doc['premise']} {connector}", [doc["alternative_1"], doc["alternative_2"]]
        elif task == "hellaswag":
            ctx, choices = f"문장: {doc['context']}", [doc[f"ending_{i}"] for i in range(1, 5)]
        else:  # boolq; the context's trailing space belongs to the continuation, as lm-eval encodes it
            ctx, choices = f"{doc['paragraph']} 질문: {doc['question']} 답변:", [" 아니오", " 예"]
        lls = []
        for choice in choices:
            cont = choice if task == "boolq" else " " + choice
            n_ctx = len(tok(ctx, add_special_tokens=False).input_ids)
            whole = tok(ctx + cont, add_special_tokens=False).input_ids
            n_cont = len(whole) - n_ctx
            whole = whole[-(model.config.max_position_embeddings + 1) :]  # the harness keeps the end of a long input
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits.double()[0], -1)
            lls.append(sum(logp[i - 1, whole[i]].item() for i in range(len(whole) - n_cont, len(whole))))
        all_lls.append(lls)
        correct += max(range(len(lls)), key=lambda j: lls[j]) == doc["label"]
    return correct / len(docs), all_lls


@pytest.mark.slow
def test_kobest_runs_offline_to_the_hand_computed_accuracy(trained_run):
    limit = 8
    proc = run_module("train.lm_eval", f"run.dir={trained_run}", "tasks=[kobest_copa,kobest_hellaswag,kobest_boolq]",
                      f"limit={limit}", env={"HF_DATASETS_CACHE": str(trained_run / "hf_cache")})  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    saved = json.loads((trained_run / "lm_eval.json").read_text())
    for task in ("copa", "hellaswag", "boolq"):
        r = result[f"kobest_{task}"]
        assert r["n"] == limit and r["metric"] == "acc" and saved[f"kobest_{task}"]["score"] == r["score"]
        hand, _ = _hand_accuracy(trained_run / "hf", task, limit)
        assert r["score"] == pytest.approx(hand), task
    # The scores also went to the run's (offline) W&B run.
    assert any(b"lm_eval/kobest_copa/acc" in f.read_bytes() for f in (trained_run / "wandb").rglob("*.wandb"))


@pytest.mark.slow
def test_in_loop_downstream_equals_lm_eval(tiny_tokenizer, tiny_data, tmp_path):
    run_dir, limit = tmp_path / "run", 6
    torchrun_pretrain(*train_args(tiny_tokenizer, tiny_data, run_dir, "model.max_seq_len=512",
                                  "eval.downstream=[kobest_copa,kobest_hellaswag]", "eval.downstream_every=5",
                                  f"eval.downstream_limit={limit}", "train.eval_every=0"))  # fmt: skip
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in rows if "downstream/kobest_copa/acc" in r}
    assert sorted(logged) == [5, 10]
    proc = run_module("train.lm_eval", f"run.dir={run_dir}", "tasks=[kobest_copa,kobest_hellaswag]", f"limit={limit}",
                      env={"HF_DATASETS_CACHE": str(tmp_path / "hf_cache")})  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for task in ("kobest_copa", "kobest_hellaswag"):
        assert logged[10][f"downstream/{task}/acc"] == pytest.approx(result[task]["metrics"]["acc"])
        if "acc_norm" in result[task]["metrics"]:
            assert logged[10][f"downstream/{task}/acc_norm"] == pytest.approx(result[task]["metrics"]["acc_norm"])
    # The in-loop scorer's per-choice log-likelihoods are the hand computation's (transformers on the export).
    from tokenizer.tokenizer import Tokenizer
    from train.callbacks.downstream import load_examples, score_examples
    from train.checkpoint.weights import load_model

    model, _ = load_model(run_dir)
    examples = load_examples(["kobest_copa"], limit, tmp_path / "tasks")["kobest_copa"]
    correct, _, n = score_examples(lambda x: model(x).logits, Tokenizer.from_dir(tiny_tokenizer), examples, 512, 4,
                                   torch.device("cpu"))  # fmt: skip
    hand, _ = _hand_accuracy(run_dir / "hf", "copa", limit)
    assert n == limit and correct / n == pytest.approx(hand)
