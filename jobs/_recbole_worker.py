"""Time RecBole 1.2.1's KD_DAGFM phase by phase on MovieLens-100K.

This script runs inside the RecBole virtual environment
(``scripts/setup_recbole_venv.sh``), never in kd-dagfm's own: it imports
only RecBole, torch and the standard library. ``jobs/recbole_compare.py``
starts it as a subprocess and reads the JSON it writes.

For each phase it builds RecBole's model and trainer and times every call
of ``Trainer._train_epoch``, which is the whole training epoch: data loader,
forward, backward and Adam. After each epoch it evaluates on the validation
split and keeps the best epoch's weights, which it finally evaluates on the
test split. The next phase warm-starts from a ``{"state_dict": ...}`` file,
the format RecBole's own ``warm_up`` loads.

Usage (from the RecBole environment):
    python jobs/_recbole_worker.py --output result.json --workdir DIR \
        --epochs 3 --threads 2 --teacher crossnet
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import time
from typing import Any

import torch

PHASES = ("teacher_training", "distillation", "finetuning")
# RecBole's teacher class names for kd-dagfm's teacher values.
TEACHER_CLASSES = {"crossnet": "CrossNet", "cin": "CIN"}
# The seven MovieLens-100K fields kd-dagfm's RecBole converter keeps.
LOAD_COLUMNS = {
    "inter": ["user_id", "item_id", "rating"],
    "user": ["user_id", "age", "gender", "occupation"],
    "item": ["item_id", "release_year", "class"],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="JSON file to write")
    parser.add_argument(
        "--workdir", required=True, help="directory for RecBole's checkpoints"
    )
    parser.add_argument("--epochs", type=int, default=3, help="epochs per phase")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--teacher", default="crossnet", choices=TEACHER_CLASSES)
    parser.add_argument("--student_type", default="outer", choices=("inner", "outer"))
    parser.add_argument("--batch_size", type=int, default=2048)
    parser.add_argument("--eval_batch_size", type=int, default=8192)
    parser.add_argument("--embedding_size", type=int, default=16)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--t_depth", type=int, default=3)
    parser.add_argument("--seed", type=int, default=2022)
    parser.add_argument(
        "--phases", default=",".join(PHASES), help="comma-separated phases, in order"
    )
    return parser.parse_args()


def recbole_config(args: argparse.Namespace) -> Any:
    from recbole.config import Config

    config_dict = {
        "load_col": LOAD_COLUMNS,
        "threshold": {"rating": 4},
        "train_neg_sample_args": None,
        "eval_args": {
            "split": {"RS": [0.8, 0.1, 0.1]},
            "order": "RO",
            "group_by": None,
            "mode": "labeled",
        },
        "metrics": ["AUC", "LogLoss"],
        "valid_metric": "AUC",
        "train_batch_size": args.batch_size,
        "eval_batch_size": args.eval_batch_size,
        "epochs": args.epochs,
        "teacher": TEACHER_CLASSES[args.teacher],
        "type": args.student_type,
        "embedding_size": args.embedding_size,
        "depth": args.depth,
        "t_depth": args.t_depth,
        "phase": "teacher_training",
        "seed": args.seed,
        "reproducibility": True,
        "use_gpu": False,
        "device": "cpu",
        "checkpoint_dir": os.path.join(args.workdir, "saved"),
        "show_progress": False,
        "state": "WARNING",
    }
    return Config(model="KD_DAGFM", dataset="ml-100k", config_dict=config_dict)


def run_phase(
    config: Any, datasets: tuple[Any, Any, Any], phase: str, epochs: int
) -> dict[str, Any]:
    from recbole.utils import get_model, get_trainer, init_seed

    train_data, valid_data, test_data = datasets
    config["phase"] = phase
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to("cpu")
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    epoch_wall_s: list[float] = []
    epoch_cpu_s: list[float] = []
    valid_auc: list[float] = []
    valid_log_loss: list[float] = []
    train_loss: list[float] = []
    eval_wall_s: list[float] = []
    best_auc = float("-inf")
    best_state: dict[str, torch.Tensor] = {}
    for epoch in range(epochs):
        wall, cpu = time.perf_counter(), time.process_time()
        loss = trainer._train_epoch(train_data, epoch, show_progress=False)
        epoch_wall_s.append(time.perf_counter() - wall)
        epoch_cpu_s.append(time.process_time() - cpu)
        train_loss.append(float(loss) / len(train_data))

        started = time.perf_counter()
        result = trainer.evaluate(valid_data, load_best_model=False)
        eval_wall_s.append(time.perf_counter() - started)
        valid_auc.append(float(result["auc"]))
        valid_log_loss.append(float(result["logloss"]))
        if valid_auc[-1] > best_auc:
            best_auc = valid_auc[-1]
            best_state = copy.deepcopy(model.state_dict())

    model.load_state_dict(best_state)
    test = trainer.evaluate(test_data, load_best_model=False)
    return {
        "model": model,
        "result": {
            "phase": phase,
            "examples_per_epoch": len(train_data.dataset),
            "steps_per_epoch": len(train_data),
            "epoch_wall_s": epoch_wall_s,
            "epoch_cpu_s": epoch_cpu_s,
            "eval_wall_s": eval_wall_s,
            "valid_examples": len(valid_data.dataset),
            "train_loss": train_loss,
            "valid_auc": valid_auc,
            "valid_log_loss": valid_log_loss,
            "test_auc": float(test["auc"]),
            "test_log_loss": float(test["logloss"]),
            "teacher_parameters": sum(
                p.numel() for p in model.teacher_network.parameters()
            ),
            "student_parameters": sum(
                p.numel() for p in model.student_network.parameters()
            ),
            "num_fields": int(model.num_feature_field),
        },
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.workdir, exist_ok=True)

    import recbole
    from recbole.data import create_dataset, data_preparation

    config = recbole_config(args)
    started = time.perf_counter()
    dataset = create_dataset(config)
    datasets = data_preparation(config, dataset)
    load_s = time.perf_counter() - started

    phases = [p for p in args.phases.split(",") if p]
    results = []
    for phase in phases:
        outcome = run_phase(config, datasets, phase, args.epochs)
        results.append(outcome["result"])
        warm_up = os.path.join(args.workdir, f"{phase}.pth")
        torch.save({"state_dict": outcome["model"].state_dict()}, warm_up)
        config["warm_up"] = warm_up

    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(
            {
                "recbole_version": recbole.__version__,
                "torch_version": torch.__version__,
                "python_version": platform.python_version(),
                "threads": torch.get_num_threads(),
                "data_path": config["data_path"],
                "load_s": load_s,
                "phases": results,
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
