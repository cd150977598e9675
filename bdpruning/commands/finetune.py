"""``bdprune finetune``: fine-pruning. Fine-tune a repaired model B' on clean validation data with
its pruned channels held at zero; clean accuracy and ASR before and after every epoch.

The output directory is itself a model directory (``bdprune goodnet --repaired OUT`` takes it)
plus ``finetune.json``, ``finetune.csv`` and ``finetune.png``. ``--devices 2 --strategy ddp``
runs data-parallel processes (Lightning re-runs this command in each; only the first writes).
"""

from __future__ import annotations

import argparse

from .options import add_lightning_arguments, add_model_arguments, lightning_options, model_options

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..pruning.finetuning import DEFAULT_LR, OPTIMIZERS

    parser.add_argument("--model", required=True,
                        help="the repaired model B' (bdpruning model directory, Keras .h5 or ONNX file)")
    parser.add_argument("--clean-valid", required=True, help="clean data to fine-tune on (HDF5 data/label)")
    parser.add_argument("--poisoned-valid", help="poisoned validation set, for the ASR (labels: the attacker's target)")
    parser.add_argument("--clean-test", help="held-out clean set to evaluate on instead of --clean-valid")
    parser.add_argument("--poisoned-test", help="held-out poisoned set to evaluate on instead of --poisoned-valid")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs, at least 1 (default: 10)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                        help="adam, or sgd with momentum 0.9 (default: adam)")
    parser.add_argument("--lr", type=float,
                        help="learning rate (default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order (default: 0)")
    parser.add_argument("--layer",
                        help="for a model without pruning masks: the layer whose all-zero channels stay zero "
                             "(default: a saved B' keeps its masks; conv_3 for a DeepID .h5)")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    add_model_arguments(parser)
    add_lightning_arguments(parser)
    parser.set_defaults(batch_size=64)  # a training batch; the evaluation uses the same


def _cell(value: float | None, suffix: str = " %") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"


def _print_table(result) -> None:
    print(f"{'':<8} {'clean accuracy':>15} {'ASR':>10} {'train loss':>11}")
    for row in result.history:
        name = "before" if row.epoch == 0 else f"epoch {row.epoch}"
        loss = "-" if row.train_loss is None else f"{row.train_loss:.4f}"
        print(f"{name:<8} {_cell(row.clean_accuracy):>15} {_cell(row.attack_success_rate):>10} {loss:>11}")
    before, after = result.before, result.after
    print(f"clean accuracy {_cell(before.clean_accuracy)} -> {_cell(after.clean_accuracy)}, "
          f"ASR {_cell(before.attack_success_rate)} -> {_cell(after.attack_success_rate)} "
          f"(on {result.sets['clean_eval']}"
          + (f" and {result.sets['poisoned_eval']})" if result.sets["poisoned_eval"] else ")"))


def run(args: argparse.Namespace) -> int:
    from ..runtime.atomic import prepare_out_dir
    from ..errors import BdpruningError, file_error
    from ..pruning.finetuning import keep_pruned_at_zero
    from ..workflows.finetune import save_finetune_run
    from ..lightning_modules.finetune import finetune_model
    from ..models.loading import load_model

    if args.poisoned_test and not args.clean_test:
        raise BdpruningError(f"{args.poisoned_test}: --poisoned-test needs --clean-test")
    out = prepare_out_dir(args.out, args.force)
    model = load_model(args.model, device="cpu", **model_options(args))
    try:
        keep_pruned_at_zero(model, args.layer)
    except BdpruningError as exc:
        raise file_error(args.model, str(exc)) from None
    clean_eval = args.clean_test or args.clean_valid
    poisoned_eval = args.poisoned_test or args.poisoned_valid  # poisoned data is never trained on
    result = finetune_model(
        model, args.clean_valid, args.epochs, clean_eval=clean_eval, poisoned_eval=poisoned_eval,
        optimizer=args.optimizer, lr=args.lr, seed=args.seed, layer=args.layer, **lightning_options(args),
    )
    if result is None:  # an extra ddp process: the first one writes and reports
        return 0
    result.extra["model"] = args.model
    save_finetune_run(result, out, force=args.force)
    print(f"model  {args.model}  (pruned: "
          + ", ".join(f"{layer} {len(channels)} channels" for layer, channels in result.pruned.items())
          + f"); {args.epochs} epochs in {result.seconds:.1f} s")
    _print_table(result)
    print(f"fine-tuned model and finetune.json/csv/png in {out}")
    return 0
