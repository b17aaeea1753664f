"""`convtune param-groups` and `convtune schedule`: see what the optimizer factory and a schedule will
do before spending GPU-hours. Both build models without pretrained weights, so they run offline."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "param-groups",
        help="show the optimizer parameter groups (layer ids, lr_scale, weight decay) for a model",
        description=(
            "Build MODEL (any timm model; no pretrained weights are loaded) and print the parameter groups "
            "the optimizer factory creates: layer id, tensor and parameter counts, lr_scale and weight decay. "
            "lr_scale = layer_decay ** (N + 1 - layer_id)."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="timm model name, e.g. convnextv2_tiny or vit_base_patch16_224")
    p.add_argument("--layer-decay", type=float, default=1.0, metavar="D",
                   help="layer-wise LR decay rate in (0, 1]; 1.0 (default) disables it")
    p.add_argument("--layer-decay-type", choices=["single", "group"], default="single",
                   help="ConvNeXt-V2 layer-id mode: every block its own id (single, default) or 12 groups")
    p.add_argument("--weight-decay", type=float, default=0.05, metavar="W", help="weight decay (default 0.05)")
    p.add_argument("--no-weight-decay", nargs="+", default=[], metavar="PATTERN",
                   help="extra parameter-name glob patterns exempt from weight decay, e.g. 'head.*'")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")
    p.add_argument("--json", action="store_true",
                   help="print JSON: one record per parameter {name, layer_id, lr_scale, weight_decay} plus the groups")
    p.set_defaults(handler=run_param_groups)

    s = sub.add_parser(
        "schedule",
        help="print or plot the learning rate at every optimizer update of a schedule",
        description=(
            "Evaluate a per-update LR schedule (the one the trainer applies; every group's LR is this value times "
            "its lr_scale). Lengths are in epochs of --steps-per-epoch updates, or --warmup-steps in updates."
        ),
    )
    from trainers.schedules import SCHEDULE_NAMES, WARMUP_MODES

    s.add_argument("name", metavar="NAME", choices=SCHEDULE_NAMES, help=f"one of: {', '.join(SCHEDULE_NAMES)}")
    s.add_argument("--lr", type=float, default=1e-3, help="peak (base) LR (default 1e-3)")
    s.add_argument("--min-lr", type=float, default=0.0, help="floor of cosine/linear/poly/cosine_restarts (default 0)")
    s.add_argument("--epochs", type=float, default=10, help="training length in epochs (default 10)")
    s.add_argument("--steps-per-epoch", type=int, default=100, help="optimizer updates per epoch (default 100)")
    warm = s.add_mutually_exclusive_group()
    warm.add_argument("--warmup-epochs", type=float, default=0.0, help="warmup length in epochs (default 0)")
    warm.add_argument("--warmup-steps", type=int, default=None, help="warmup length in updates (overrides epochs)")
    s.add_argument("--warmup-mode", choices=WARMUP_MODES, default="linear", help="linear ramp or constant factor")
    s.add_argument("--warmup-start-factor", type=float, default=0.0,
                   help="warmup starts at this fraction of the LR (default 0; STMixer uses 1/3)")
    s.add_argument("--milestones", type=float, nargs="+", default=[], metavar="EPOCH",
                   help="multistep: epochs at which the LR is multiplied by --gamma")
    s.add_argument("--step-size", type=float, default=None, metavar="EPOCHS", help="step: epochs between decays")
    s.add_argument("--gamma", type=float, default=0.1, help="multistep/step decay factor (default 0.1)")
    s.add_argument("--cycles", type=int, default=1, help="cosine_restarts: number of cycles (default 1)")
    s.add_argument("--power", type=float, default=1.0, help="poly: power (default 1.0)")
    s.add_argument("--json", action="store_true", help="print the LR at every update as a JSON list")
    s.add_argument("--plot", metavar="FILE.png", help="write a plot of the schedule to this PNG file")
    s.set_defaults(handler=run_schedule)


def _error(message: str) -> int:
    print(f"convtune: error: {message}", file=sys.stderr)
    return 2


def run_param_groups(args: argparse.Namespace) -> int:
    import timm

    from trainers.param_groups import build_param_groups, group_summaries, param_group_table, param_records

    if not timm.is_model(args.model):
        import difflib

        close = difflib.get_close_matches(args.model, timm.list_models(), n=5)
        return _error(f"unknown timm model {args.model!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = timm.create_model(args.model, pretrained=False, **kwargs)
    try:
        groups = build_param_groups(
            model, model_name=args.model, layer_decay=args.layer_decay, layer_decay_type=args.layer_decay_type,
            weight_decay=args.weight_decay, no_weight_decay=args.no_weight_decay,
        )
    except ValueError as exc:
        return _error(str(exc))
    if args.json:
        print(json.dumps({
            "model": args.model,
            "layer_decay": args.layer_decay,
            "layer_decay_type": args.layer_decay_type,
            "params": [
                {k: r[k] for k in ("name", "layer_id", "lr_scale", "weight_decay")}
                for r in param_records(model, groups, model_name=args.model, layer_decay_type=args.layer_decay_type)
            ],
            "groups": group_summaries(groups),
        }, indent=1))
    else:
        print(f"{args.model}: layer_decay={args.layer_decay:g} ({args.layer_decay_type}), "
              f"weight_decay={args.weight_decay:g}, {len(groups)} groups")
        print(param_group_table(groups), end="")
    return 0


def run_schedule(args: argparse.Namespace) -> int:
    from trainers.schedules import build_epoch_schedule

    try:
        schedule = build_epoch_schedule(
            args.name, base_lr=args.lr, epochs=args.epochs, updates_per_epoch=args.steps_per_epoch,
            warmup_epochs=args.warmup_epochs, warmup_steps=args.warmup_steps, milestones=args.milestones,
            step_size=args.step_size, warmup_mode=args.warmup_mode, warmup_start_factor=args.warmup_start_factor,
            min_lr=args.min_lr, gamma=args.gamma, cycles=args.cycles, power=args.power,
        )
    except ValueError as exc:
        return _error(str(exc))
    values = schedule.values()
    if args.plot:
        plot_schedule(schedule, values, args.plot, args.steps_per_epoch)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(values))
    elif not args.plot:
        total = schedule.total_steps
        marks = sorted({0, schedule.warmup_steps, *schedule.milestones, total - 1,
                        *range(0, total, max(1, total // 10))} - {total} | {total - 1})
        print(f"{args.name}: {total} updates, warmup {schedule.warmup_steps}, peak {max(values):.6g}, "
              f"final {values[-1]:.6g}")
        print(f"{'step':>8}  {'epoch':>8}  {'lr':>12}")
        for k in marks:
            if 0 <= k < total:
                print(f"{k:>8}  {k / args.steps_per_epoch:>8.3f}  {values[k]:>12.6g}")
    return 0


def plot_schedule(schedule, values: list[float], path: str, steps_per_epoch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    epochs = [k / steps_per_epoch for k in range(len(values))]
    ax.plot(epochs, values, lw=1.6)
    if schedule.warmup_steps:
        ax.axvline(schedule.warmup_steps / steps_per_epoch, color="grey", ls=":", lw=1, label="end of warmup")
        ax.legend(loc="upper right")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{schedule.name} (peak {schedule.base_lr:g}, {schedule.total_steps} updates)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
