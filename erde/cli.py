"""`erde`: train teachers and students, calibrate, export, evaluate, inspect, serve.

Every command prints one clear line and exits non-zero on bad options or missing data,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from erde.losses import LossConfig

COMMANDS_GROUP = "erde.commands"  # entry points that add verbs (pyproject.toml: the service's `serve`)
EPILOG = """Typical run on Fashion-MNIST (apt-get install -y dataset-fashion-mnist):
  erde train-teacher --arch resnet20 --out runs/teacher
  erde export runs/teacher --store runs/store --name teacher --version 1
  erde distill --teacher runs/store/teacher/1 --loss erde --arch resnet8-slim --out runs/erde
  erde export runs/erde --name fashion-mnist --version 1
  erde evaluate runs/store/teacher/1 model_store/fashion-mnist/1 --out reports/"""


def _add_training_options(p: argparse.ArgumentParser, default_arch: str, default_epochs: int) -> None:
    from erde.data import DATASETS
    from erde.nets import list_models

    p.add_argument("--out", required=True, help="run folder (config, checkpoints, log, final weights)")
    p.add_argument("--arch", default=default_arch, choices=list_models(), help="registered architecture")
    p.add_argument("--dataset", default="fashion-mnist", choices=DATASETS)
    p.add_argument("--data-dir", help="dataset folder (Fashion-MNIST default: /usr/share/datasets/fashion-mnist; "
                                      "imagefolder: a folder with train/ and test/)")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR/SVHN (needs network)")
    p.add_argument("--image-size", type=int, default=32, help="imagefolder: side images are resized to")
    p.add_argument("--image-mode", default="RGB", choices=("L", "RGB"), help="imagefolder: grayscale or colour")
    p.add_argument("--epochs", type=int, default=default_epochs)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (cosine schedule)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of train held out for validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--max-train-batches", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--channels-last", action="store_true", help="NHWC tensors (GPU only; ignored on a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward passes (GPU; slow to start)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                   "(its own options; only --device, --threads, --channels-last and --compile come from here)")


def _train_config(args: argparse.Namespace, loss: LossConfig, teacher: str | None):
    from erde.runs import TrainConfig

    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise ValueError("--epochs and --batch-size must be at least 1 and --lr positive")
    return TrainConfig(out_dir=args.out, arch=args.arch, dataset=args.dataset, data_dir=args.data_dir,
                       download=args.download, image_size=args.image_size, image_mode=args.image_mode,
                       val_fraction=args.val_fraction, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, threads=args.threads,
                       device=args.device, teacher=teacher, loss=loss, max_train_batches=args.max_train_batches,
                       channels_last=args.channels_last, compile=args.compile)


def cmd_train_teacher(args: argparse.Namespace) -> None:
    from erde.losses import LossConfig
    from erde.train import train

    out = train(_train_config(args, LossConfig(kind="ce"), None), resume=args.resume)
    print(f"teacher trained: {out}")


def cmd_distill(args: argparse.Namespace) -> None:
    from erde.losses import LossConfig
    from erde.train import train

    loss = LossConfig(kind=args.loss, temperature=args.temperature, alpha=args.alpha, beta=args.beta,
                      gamma=args.gamma, entropy_last_exit=args.entropy_last_exit,
                      entropy_replaces=args.entropy_replaces, gamma_ramp=args.gamma_ramp)
    teacher = None if args.loss == "ce" else args.teacher
    if args.loss != "ce" and not args.teacher:
        raise ValueError(f"--loss {args.loss} needs --teacher (an exported artifact folder)")
    out = train(_train_config(args, loss, teacher), resume=args.resume)
    print(f"student trained: {out}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from erde.runs import calibrate_run

    curve = calibrate_run(Path(args.run), points=args.points)
    print(f"calibration written: {Path(args.run) / 'calibration.json'} ({len(curve.points)} thresholds)")


def cmd_export(args: argparse.Namespace) -> None:
    from erde.export import export_run

    path = export_run(Path(args.run), Path(args.store), args.name, str(args.version), overwrite=args.overwrite,
                      latency_repeats=args.latency_repeats)
    print(f"artifact written: {path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from erde.evaluate import evaluate_artifacts

    table = evaluate_artifacts([Path(a) for a in args.artifacts], Path(args.out), data_dir=args.data_dir,
                               budgets=args.budgets, title=args.title)
    print(table)


def cmd_info(args: argparse.Namespace) -> None:
    from erde.store import read_artifact

    art = read_artifact(Path(args.artifact))
    m = art.manifest
    keys = ("name", "version", "classes", "input", "arch", "macs_per_exit", "exit_latency", "test_metrics")
    summary = {k: m[k] for k in keys if k in m}  # exit_latency: only in artifacts exported since it exists
    print(json.dumps(summary, indent=2))


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """Every verb; for a verb another package registered (`erde serve`), that verb and the other registered
    ones only. The training verbs' options need torch (architectures, datasets, loss defaults), and a
    server started by `erde serve` imports none (docs/architecture.md, "No torch in the server")."""
    parser = argparse.ArgumentParser(prog="erde", description="Early-exit students distilled with ERDE.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    registered = {command.name: command for command in entry_points(group=COMMANDS_GROUP)}
    if verb not in registered:
        add_training_commands(sub)
    for name in sorted(registered):  # the service adds `serve` this way, so erde never imports the service
        registered[name].load()(sub)
    return parser


def add_training_commands(sub: argparse._SubParsersAction) -> None:
    from erde.losses import LossConfig

    p = sub.add_parser("train-teacher", help="train an early-exit teacher (CE at every exit)")
    _add_training_options(p, "resnet20", 15)
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("distill", help="train a student from a frozen teacher (ERDE, KD) or alone (CE)")
    _add_training_options(p, "resnet8-slim", 15)
    p.add_argument("--teacher", help="exported teacher artifact folder (needed for erde and kd)")
    p.add_argument("--loss", default="erde", choices=("erde", "kd", "ce"))
    defaults = LossConfig()
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="KD temperature T")
    p.add_argument("--alpha", type=float, default=defaults.alpha, help="weight of CE")
    p.add_argument("--beta", type=float, default=defaults.beta, help="weight of KD")
    p.add_argument("--gamma", type=float, default=defaults.gamma, help="weight of the ERDE entropy term")
    p.add_argument("--entropy-last-exit", action="store_true", help="ablation: entropy term at the last exit too")
    p.add_argument("--entropy-replaces", action="store_true",
                   help="ablation: on teacher-wrong samples the entropy term replaces CE (where it applies)")
    p.add_argument("--gamma-ramp", type=float, default=defaults.gamma_ramp,
                   help="ablation: γ rises linearly from 0 over this fraction of training (0: constant)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("calibrate", help="sweep the entropy threshold on the validation split")
    p.add_argument("run", help="finished run folder")
    p.add_argument("--points", type=int, default=401, help="number of thresholds in the sweep")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("export", help="write a run as a verified model_store artifact")
    p.add_argument("run", help="finished run folder (calibrated first if it is not)")
    p.add_argument("--store", default="model_store", help="model store root")
    p.add_argument("--name", required=True, help="model name (letters, digits, '-', '_')")
    p.add_argument("--version", type=int, required=True, help="positive integer version")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version")
    p.add_argument("--latency-repeats", type=int, default=50,
                   help="timed runs per exit for the latency in the manifest, on this machine (0: none)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="test-split accuracy vs MACs of artifacts: table, plot, histograms")
    p.add_argument("artifacts", nargs="+", help="artifact folders")
    p.add_argument("--out", default="reports", help="folder for the markdown table and PNG plots")
    p.add_argument("--data-dir", help="dataset folder, as in training")
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.35, 0.25, 0.15])
    p.add_argument("--title", default="evaluation", help="name of the report files")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("info", help="print an artifact's manifest summary (verifies it first)")
    p.add_argument("artifact")
    p.set_defaults(func=cmd_info)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyboardInterrupt) as exc:
        message = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
        print(f"erde {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
