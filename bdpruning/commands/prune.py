"""``bdprune prune``: the pruning defense, from a model and clean validation data to B'.

``--criterion`` picks what chooses the channels: ``activation`` (the lab's, the default: mean
activation of one layer), ``clp`` (data-free Lipschitz bounds), ``anp`` (masks learned under
adversarial perturbations) or ``rnp`` (unlearn, then recover masks); the last three cover every
conv layer (or ``--layers``). Pruning, the sweep, thresholds and saving B' are shared.
"""

from __future__ import annotations

import argparse

from .options import add_model_arguments, add_tf32_argument, model_options, trainer_options

__all__ = ["add_arguments", "run"]


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r}: thresholds are positive numbers of points (0 < T <= 100)")
    return value


def _budget(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of points (or 'none')") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r}: the budget is a number of points in 0..100")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Keras .h5, ONNX file or bdpruning model directory")
    parser.add_argument("--clean-valid", required=True, help="clean validation set (HDF5 data/label)")
    parser.add_argument("--poisoned-valid", help="poisoned validation set; its labels hold the attacker's target")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    parser.add_argument("--thresholds", type=_threshold, nargs="+",
                        help="accuracy drops (points) at which to save a repaired model (default: 2 4 10 for "
                             "--criterion activation; none for the others, which save their own choice)")
    parser.add_argument("--layer", default="conv_3", help="conv layer whose channels are pruned")
    parser.add_argument("--rank-layer", default="pool_3", help="layer whose mean activations rank the channels")
    parser.add_argument("--full-sweep", action="store_true", help="prune every channel, not only up to the last threshold")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0, help="seed for torch (the sweep itself is deterministic)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--allow-chance-baseline", action="store_true",
                        help="run even when the model is at chance level on the clean data (an untrained model on "
                             "purpose); by default that stops the run: the model and the data do not fit")
    add_model_arguments(parser)
    add_tf32_argument(parser)
    add_criterion_arguments(parser)


def add_criterion_arguments(parser: argparse.ArgumentParser) -> None:
    """``--criterion`` and the settings of CLP, ANP and RNP (defaults: the authors')."""
    group = parser.add_argument_group("criteria (clp, anp, rnp: every conv layer unless --layers)")
    group.add_argument("--criterion", choices=["activation", "clp", "anp", "rnp"], default="activation",
                       help="what chooses the channels to prune (default: activation, the lab's)")
    group.add_argument("--layers", nargs="+", help="conv layers clp/anp/rnp cover (default: every conv layer)")
    group.add_argument("--u", type=float, default=3.0,
                       help="clp: prune channels whose bound exceeds the layer's mean + u std (default: 3)")
    group.add_argument("--mask-threshold", type=float, default=0.2,
                       help="anp/rnp: prune channels whose mask falls below this (default: 0.2)")
    group.add_argument("--prune-count", type=int, help="anp/rnp: prune the N lowest masks instead")
    group.add_argument("--images", type=int, default=500,
                       help="anp/rnp: clean images to learn on, drawn with --seed (default: 500)")
    group.add_argument("--iterations", type=int, default=2000, help="anp: mask updates (default: 2000)")
    group.add_argument("--eps", type=float, default=0.4, help="anp: perturbation bound (default: 0.4)")
    group.add_argument("--alpha", type=float, default=0.2, help="anp: weight of the clean loss (default: 0.2)")
    group.add_argument("--unlearn-epochs", type=int, default=20, help="rnp: most unlearning epochs (default: 20)")
    group.add_argument("--recover-epochs", type=int, default=20, help="rnp: mask-learning epochs (default: 20)")
    group.add_argument("--stop-accuracy", type=float, default=0.2,
                       help="rnp: unlearn until clean accuracy falls to this fraction (default: 0.2)")
    group.add_argument("--train-batch-size", type=int, default=128, help="anp/rnp: training batch (default: 128)")
    group.add_argument("--max-accuracy-drop", type=_budget, default=5.0, metavar="POINTS",
                       help="clp/anp/rnp: cap the criterion's choice at the most-pruned step of its own order whose "
                            "clean-accuracy drop, on clean images it did not learn from, is at most POINTS "
                            "(default: 5; 'none': the criterion's raw choice)")
    group.add_argument("--clp-all-convs", action="store_true",
                       help="clp: also score convs without a BatchNorm (ours; the authors cover BatchNorm layers only)")
    group.add_argument("--anp-clip-noise", action="store_true",
                       help="anp: clip the perturbations to [-eps, eps] after each step (ours; the authors do not)")
    group.add_argument("--unlearn-lr", type=float, default=0.01,
                       help="rnp: unlearning rate (default: 0.01, the authors'; smaller suits 0..255 inputs)")
    group.add_argument("--rnp-stop-per-batch", action="store_true",
                       help="rnp: stop unlearning at the first batch at --stop-accuracy (ours; the authors: per epoch)")
    group.add_argument("--zero-shift", action="store_true",
                       help="anp/rnp: prune the shift too (the channel emits 0; the authors keep the shift)")
    group.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu", "cuda"],
                       help="where Lightning runs: anp/rnp training, a data-parallel sweep "
                            "(default: auto, a GPU when there is one)")
    group.add_argument("--devices", type=int, default=1, help="Lightning processes/GPUs (default: 1)")
    group.add_argument("--strategy", default="auto", choices=["auto", "ddp", "ddp_spawn"],
                       help="with --devices > 1: ddp or ddp_spawn")


def make_criterion(args: argparse.Namespace):
    """The criterion object that ``args`` describe (not for ``activation``)."""
    import sys

    from ..criteria import ANP, CLP, RNP

    if args.criterion == "clp":
        return CLP(u=args.u, layers=args.layers, convs_without_batchnorm=args.clp_all_convs)
    # Lightning's banners, tips and warnings only with -v; one progress bar per stage
    options = trainer_options(args, progress=sys.stderr.isatty() and not args.no_progress, verbose=bool(args.verbose))
    shared = dict(images=args.images, threshold=args.mask_threshold, count=args.prune_count,
                  batch_size=args.train_batch_size, seed=args.seed, layers=args.layers, trainer_options=options,
                  keep_shift=not args.zero_shift)
    if args.criterion == "anp":
        return ANP(eps=args.eps, alpha=args.alpha, iterations=args.iterations, clip_noise=args.anp_clip_noise,
                   **shared)
    return RNP(stop_accuracy=args.stop_accuracy, unlearn_epochs=args.unlearn_epochs, unlearn_lr=args.unlearn_lr,
               recover_epochs=args.recover_epochs, stop_per_batch=args.rnp_stop_per_batch, **shared)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..workflows.prune import prune_stage
    from ..workflows.summary import LabSummary

    torch.manual_seed(args.seed)
    summary = prune_stage(
        args.model, args.clean_valid, args.out, None if args.criterion == "activation" else make_criterion(args),
        poisoned_valid=args.poisoned_valid, thresholds=args.thresholds, layer=args.layer,
        rank_layer=args.rank_layer, full_sweep=args.full_sweep, device=args.device, batch_size=args.batch_size,
        force=args.force, progress=not args.no_progress, tf32=args.tf32,
        trainer_options=trainer_options(args),
        max_accuracy_drop=None if args.criterion == "activation" else args.max_accuracy_drop,
        model_options=model_options(args), allow_chance=args.allow_chance_baseline,
    )
    if summary is None:  # an extra process of a ddp launch: the first one writes and reports
        return 0
    base = summary.baseline
    if isinstance(summary, LabSummary):
        print(f"baseline: clean accuracy {base.clean_accuracy:.2f} %, ASR {_asr(base.attack_success_rate)} %")
        print(f"{'threshold':>9}  {'channels':>8}  {'clean acc':>9}  {'ASR':>6}  model")
    else:
        chosen = summary.chosen.at
        print(f"{summary.criterion}: {summary.channels} channels of {', '.join(summary.layers)} scored "
              f"in {summary.seconds:.1f} s")
        print(f"baseline: clean accuracy {base.clean_accuracy:.2f} %, ASR {_asr(base.attack_success_rate)} %")
        pruned = ", ".join(f"{layer} {len(c)}" for layer, c in chosen.pruned_channels.items()) or "none"
        budget = summary.budget
        if budget is not None:
            print(f"its own choice: {budget['raw']} channels: clean accuracy {budget['raw_clean_accuracy']:.2f} %, "
                  f"ASR {_asr(budget['raw_attack_success_rate'])} % ({budget['raw_held_out_drop']:.1f} points lost "
                  f"on {budget['held_out']} clean images it did not learn from)")
        label = f"its choice within the {budget['max_drop']:g}-point budget" if budget is not None else "its choice"
        print(f"{label}: {chosen.channels_pruned} channels ({pruned}): clean accuracy "
              f"{chosen.clean_accuracy:.2f} %, ASR {_asr(chosen.attack_success_rate)} %"
              + (f"  -> {chosen.model_dir}" if chosen.model_dir else ""))
    for entry in summary.thresholds:
        if entry.reached:
            at = entry.at
            print(f"{entry.threshold:>8g}%  {at.channels_pruned:>8}  {at.clean_accuracy:>9.2f}"
                  f"  {_asr(at.attack_success_rate)}  {at.model_dir}")
        else:
            print(f"{entry.threshold:>8g}%  {'never reached':>30}")
    print(f"results in {args.out}")
    return 0


def _asr(value: float | None) -> str:
    return "-" if value is None else f"{value:6.2f}"
