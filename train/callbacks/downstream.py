"""In-loop downstream evaluation (as OLMo-core's): multiple-choice tasks scored by log-likelihood inside the
training run, without exporting; logged as `downstream/TASK/acc` (and `downstream/TASK/acc_norm`).

Examples, prompts, choices and gold answers come from lm-evaluation-harness's own task definitions (the repo's
shipped tasks in train/lm_eval_tasks/ first: KoBEST from data/eval/kobest/, NSMC), so the scores are what
`python -m train.lm_eval` reports on the same checkpoint and examples: the context and each `target_delimiter +
choice` are encoded as the harness's HF model does (whole string encoded, the context's ids split off, trailing
spaces of the context moved to the continuation, no bos), truncated on the left to the model's context, and the
choice with the highest summed log-likelihood is the prediction (acc_norm: divided by the choice's characters).
Each rank scores an equal share of the examples; the counts are summed over ranks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from train.callbacks.base import Callback, StepResult
from train.config import InLoopEvalConfig
from train.engine.distributed import all_reduce_sum

REPO = Path(__file__).resolve().parents[2]
TASKS_DIR = REPO / "train" / "lm_eval_tasks"
EVAL_DATA = REPO / "data" / "eval"


def shipped_tasks(out_dir: Path) -> Path:
    """Copy the repo's task folder (YAMLs and their `!function` modules) with the YAMLs' data paths made absolute
    (the harness resolves them from cwd). Tasks named like the harness's own (kobest_*) override them."""
    for src in TASKS_DIR.rglob("*"):
        dst = out_dir / src.relative_to(TASKS_DIR)
        if src.is_dir() or "__pycache__" in src.parts:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix == ".yaml":
            dst.write_text(src.read_text().replace("DATA_DIR", str(EVAL_DATA)))
        elif src.suffix == ".py":
            dst.write_bytes(src.read_bytes())
    return out_dir


def shipped_task_names() -> list[str]:
    return sorted(p.stem.lstrip("_") for p in TASKS_DIR.rglob("*.yaml"))


def task_manager(tmp: Path):
    """lm-eval's TaskManager with the shipped tasks (offline: no hub access)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(shipped_tasks(tmp)))


def load_examples(names: list[str], limit: int | None, tmp: Path) -> dict[str, list[dict]]:
    """{task: [{"context", "choices" (with the delimiter), "gold", "lengths"}]}: the first `limit` test (else
    validation) documents of each multiple-choice task, as the harness builds them zero-shot."""
    from lm_eval.tasks import get_task_dict

    manager = task_manager(tmp)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"eval.downstream: unknown task(s) {unknown}; shipped tasks are {shipped_task_names()}")
    out = {}
    for name, task in _leaves(get_task_dict(list(names), manager)):
        if task.OUTPUT_TYPE != "multiple_choice":
            raise ValueError(f"eval.downstream: {name} is not a multiple-choice task (output_type {task.OUTPUT_TYPE})")
        docs = list(task.test_docs() if task.has_test_docs() else task.validation_docs())
        docs = docs[:limit] if limit else docs
        delim = task.config.target_delimiter
        rows = []
        for doc in docs:
            choices = list(task.doc_to_choice(doc))
            gold = task.doc_to_target(doc)
            gold = choices.index(gold) if isinstance(gold, str) else int(gold)
            rows.append({"context": task.doc_to_text(doc), "choices": [f"{delim}{c}" for c in choices], "gold": gold,
                         "lengths": [float(len(c)) for c in choices]})  # fmt: skip
        out[name] = rows
    return out


def _leaves(task_dict: dict):
    """(name, task) of every task in lm-eval's (possibly nested, grouped) task dict."""
    for key, value in task_dict.items():
        if isinstance(value, dict):
            yield from _leaves(value)
        else:
            yield getattr(key, "group_name", None) or getattr(value, "task_name", None) or str(key), value


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of context and continuation ids (HFLM._encode_pair for causal models)."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def choice_loglikelihoods(forward, requests: list[tuple[list[int], list[int]]], max_len: int, batch_size: int,
                          device, pad_id: int = 0, n_batches: int | None = None) -> list[float]:  # fmt: skip
    """Summed log-probability of each (context ids, continuation ids); `forward(x) -> logits`. Inputs are the last
    max_len + 1 ids without the final one (as the harness). `n_batches` pads with dummy forwards so that every rank
    runs as many (ZeRO-3 gathers parameters inside forward)."""
    out = []
    total = max(n_batches or 0, -(-len(requests) // batch_size))
    for b in range(total):
        chunk = requests[b * batch_size : (b + 1) * batch_size]
        rows = [(ctx + cont)[-(max_len + 1) :][:-1] for ctx, cont in chunk] or [[pad_id]]
        width = max(len(r) for r in rows)
        x = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r)] = torch.tensor(r)
        logp = torch.log_softmax(forward(x.to(device)).float(), -1)
        for i, (_, cont) in enumerate(chunk):
            end = len(rows[i])
            pos = torch.arange(end - len(cont), end, device=logp.device)
            out.append(logp[i, pos, torch.tensor(cont, device=logp.device)].sum().item())
    return out


def score_examples(forward, tok, examples: list[dict], max_len: int, batch_size: int, device,
                   n_batches: int | None = None) -> tuple[float, float, int]:  # fmt: skip
    """(correct, correct by length-normalised log-likelihood, examples) over `examples`."""
    requests = [encode_pair(tok, ex["context"], c) for ex in examples for c in ex["choices"]]
    lls = choice_loglikelihoods(forward, requests, max_len, batch_size, device, n_batches=n_batches)
    correct = correct_norm = 0.0
    i = 0
    for ex in examples:
        k = len(ex["choices"])
        ll = lls[i : i + k]
        i += k
        pred = max(range(k), key=lambda j: ll[j])  # first maximum, as numpy.argmax
        pred_norm = max(range(k), key=lambda j: ll[j] / ex["lengths"][j])
        correct += pred == ex["gold"]
        correct_norm += pred_norm == ex["gold"]
    return correct, correct_norm, len(examples)


class DownstreamEval(Callback):
    """Scores `eval.downstream` tasks every `eval.downstream_every` steps (and at the last step) on
    `eval.downstream_limit` examples each, split over the ranks."""

    def __init__(self, cfg: InLoopEvalConfig, every: int, max_steps: int, tok, max_len: int, batch_size: int) -> None:
        import tempfile

        self.every, self.max_steps, self.tok, self.max_len = every, max_steps, tok, max_len
        self.batch_size = batch_size
        with tempfile.TemporaryDirectory() as tmp:
            self.examples = load_examples(list(cfg.downstream), cfg.downstream_limit, Path(tmp))

    def due(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.max_steps)

    def post_step(self, result: StepResult, metrics: dict) -> None:
        if self.due(result.step):
            metrics.update(self.evaluate())

    def evaluate(self) -> dict[str, float]:
        d, engine = self.trainer.d, self.trainer.engine
        engine.eval()
        out = {}
        for name, examples in self.examples.items():
            mine = examples[d.rank :: d.world_size]
            # Every rank runs as many forwards as the busiest one (collectives inside ZeRO-3's forward).
            most = max(sum(len(e["choices"]) for e in examples[r :: d.world_size]) for r in range(d.world_size))
            n_batches = -(-most // self.batch_size)
            correct, correct_norm, n = score_examples(lambda x: engine.forward(x, None).logits, self.tok, mine,
                                                      self.max_len, self.batch_size, d.device, n_batches)  # fmt: skip
            correct, correct_norm, n = all_reduce_sum([correct, correct_norm, n], d.device)
            out[f"downstream/{name}/acc"] = correct / n
            out[f"downstream/{name}/acc_norm"] = correct_norm / n
        engine.train()
        return out
