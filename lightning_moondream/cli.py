"""The ``lightning-moondream`` command.

- ``fit``, ``validate``, ``test``, ``predict``: ``LightningCLI`` over ``MoondreamRLModule``
  and ``MoondreamDataModule`` (or any subclass), configured by YAML (``--config``).
- ``serve``: the local tuning service over HTTP.
- ``adapters list|delete|checkpoints|metrics``: housekeeping of adapters and checkpoints,
  in either wire dialect (``--dialect``).
- ``evaluate``: models times datasets in one table (``lightning_moondream.evaluation``).
- ``label``: a model's boxes or points for images, as COCO, YOLO or Label Studio files.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_moondream.api import MissingAPIKeyError, TuningAPIError, TuningClient
from lightning_moondream.data import MoondreamDataModule
from lightning_moondream.module import MoondreamRLModule
from lightning_moondream.session import LOCAL_SERVICE_DIR, NoLocalServiceDataError, ServiceChoice

SUBCOMMANDS: dict[str, str] = {
    "fit": "tune an adapter by RL on a dataset (YAML config with --config)",
    "validate": "score an adapter on the validation data",
    "test": "score an adapter on the test data",
    "predict": "answer the prediction data with an adapter",
    "evaluate": "compare models on datasets and Moondream's benchmarks in one table",
    "label": "label images with a model's boxes or points (COCO, YOLO, Label Studio)",
    "serve": "run the local tuning service over HTTP",
    "adapters": "list and delete adapters and their checkpoints",
}
"""Every subcommand with its one-line summary, as ``--help`` lists them."""

MODEL_CLASS_PATH = f"{MoondreamRLModule.__module__}.{MoondreamRLModule.__qualname__}"
"""The model of ``fit``, ``validate``, ``test`` and ``predict`` unless ``--model`` names another."""


def _overview() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [
        f"usage: lightning-moondream {{{','.join(SUBCOMMANDS)}}} ...",
        "",
        "Tune Moondream adapters by RL through Moondream's tuning API, or a local service.",
        "",
        "subcommands:",
        *(f"  {name:<{width}}  {summary}" for name, summary in SUBCOMMANDS.items()),
        "",
        "Run `lightning-moondream SUBCOMMAND --help` for its options.",
    ]
    return "\n".join(lines)


class MoondreamCLI(LightningCLI):
    """``LightningCLI`` with the Moondream module and data module as defaults."""

    def __init__(self, args: Sequence[str] | None = None) -> None:
        super().__init__(
            MoondreamRLModule,
            MoondreamDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=list(args) if args is not None else None,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Make ``MoondreamRLModule`` the model when neither a config nor ``--model`` names one."""
        parser.set_defaults({"model": {"class_path": MODEL_CLASS_PATH}})


def _client(args: argparse.Namespace) -> TuningClient:
    """The client of the service inspected; a local one must already hold data.

    Raises:
        NoLocalServiceDataError: If the local service's folder holds no data (the
            service would otherwise create an empty store there).
    """
    choice = ServiceChoice(base_url=args.base_url, local_dir=args.local_dir, dialect=args.dialect)
    if choice.uses_local_service:
        choice.existing_data_dir()
    return choice.client()


def _adapters_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-moondream adapters",
        description="List and delete adapters and their checkpoints. The API key comes from "
        "MOONDREAM_API_KEY; --local-dir inspects a local service's data folder instead, and "
        "with neither a key nor a base URL the local service of ./moondream-local-service "
        "is inspected.",
    )
    parser.add_argument(
        "--base-url", default=None, help="API base URL (default: MOONDREAM_TUNING_URL or the cloud)"
    )
    parser.add_argument(
        "--local-dir",
        default=None,
        help=f"data folder of a local tuning service (a run's <default_root_dir>/{LOCAL_SERVICE_DIR})",
    )
    parser.add_argument(
        "--dialect",
        choices=("auto", "adapters", "finetunes"),
        default="auto",
        help="wire dialect of the service: the spec's /adapters, the SDK's /finetunes, or "
        "auto (found with read-only requests)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list adapters")
    delete = commands.add_parser(
        "delete",
        help="delete adapters, or checkpoints given as refs (adapter/chk_id or finetune_id@step)",
    )
    delete.add_argument("ids", nargs="+")
    checkpoints = commands.add_parser("checkpoints", help="list the checkpoints of an adapter")
    checkpoints.add_argument("adapter_id")
    metrics = commands.add_parser("metrics", help="the metrics logged for a finetune, by step")
    metrics.add_argument("adapter_id")
    return parser


def _housekeeping(client: TuningClient, args: argparse.Namespace) -> None:
    if args.command == "list":
        print(f"{'adapter_id':<34} {'rank':>4}  {'train_steps':>11}  {'created_at':<26} name")
        for adapter in client.adapters.iter(limit=100):
            steps = "" if adapter.train_steps is None else str(adapter.train_steps)
            print(
                f"{adapter.adapter_id:<34} {adapter.rank:>4}  {steps:>11}  {adapter.created_at!s:<26} {adapter.name}"
            )
    elif args.command == "checkpoints":
        print(f"{'ref':<44} {'step':>6}  {'created_at':<26} model_id")
        for checkpoint in client.checkpoints.iter(args.adapter_id, limit=100):
            step = "" if checkpoint.step is None else str(checkpoint.step)
            created = checkpoint.created_at or checkpoint.created_at_ms
            print(f"{checkpoint.ref:<44} {step:>6}  {created!s:<26} {checkpoint.model_id or ''}")
    elif args.command == "metrics":
        print(f"{'step':>6}  {'name':<32} value")
        for metric in client.metrics.read(args.adapter_id):
            print(f"{metric['step']:>6}  {metric['name']:<32} {metric['value']}")
    else:
        for item in args.ids:
            if "/" in item or "@" in item:
                client.checkpoints.delete(item)
            else:
                client.adapters.delete(item)
            print(f"deleted {item}")


def adapters_main(argv: Sequence[str]) -> int:
    """``lightning-moondream adapters``: list and delete adapters and checkpoints."""
    args = _adapters_parser().parse_args(list(argv))
    try:
        with _client(args) as client:
            _housekeeping(client, args)
    except MissingAPIKeyError:
        print(
            "error: no API key: set the MOONDREAM_API_KEY environment variable, or inspect "
            "a local tuning service's data with --local-dir FOLDER (a run keeps it in "
            f"<default_root_dir>/{LOCAL_SERVICE_DIR})",
            file=sys.stderr,
        )
        return 1
    except (TuningAPIError, NoLocalServiceDataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def label_main(argv: Sequence[str]) -> int:
    """``lightning-moondream label``: label images with a model; the exit status."""
    from lightning_moondream.labelling.command import label_main as run_label

    return run_label(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``lightning-moondream``."""
    # Lightning's own deprecation notice, raised inside Lightning on every run: nothing a
    # user of this command can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance.treespec, LeafSpec.")
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] in ("-h", "--help"):
        print(_overview())
        raise SystemExit(0 if arguments else 2)
    if not arguments[0].startswith("-") and arguments[0] not in SUBCOMMANDS:
        print(_overview(), file=sys.stderr)
        print(f"\nerror: unknown subcommand {arguments[0]!r}", file=sys.stderr)
        raise SystemExit(2)
    if arguments and arguments[0] == "serve":
        from lightning_moondream.server.serve import main as serve_main

        serve_main(arguments[1:])
        return
    if arguments and arguments[0] == "adapters":
        status = adapters_main(arguments[1:])
        if status:
            raise SystemExit(status)
        return
    if arguments and arguments[0] == "evaluate":
        from lightning_moondream.evaluation import evaluate_main

        raise SystemExit(evaluate_main(arguments[1:]))
    if arguments[0] == "label":
        raise SystemExit(label_main(arguments[1:]))
    # Given no argv, LightningCLI reads sys.argv itself; passing it as args would make it
    # echo the whole command line, API key included, in a warning.
    MoondreamCLI(arguments if argv is not None else None)


if __name__ == "__main__":
    main()
