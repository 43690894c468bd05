"""`dpseg federate` and the federated `dpseg demo` (parsers and their run functions).

dpseg.cli adds these with the other commands; user errors raise dpseg.cli.UsageError
(imported when a command runs, since dpseg.cli imports this module).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from dpseg.cli_types import UsageError, add_freed_memory_option, csv_list
from dpseg.federated.demo import DEMO
from dpseg.federated.partition import PARTITIONS
from dpseg.federated.site import ENGINES
from dpseg.federated.strategies import STRATEGIES
from dpseg.train.config import LR_SCHEDULES, NORMALIZE

__all__ = ["DEMO", "add_demo_parser", "add_federate_parser", "config_from_args"]


def _engine_rounds(text: str) -> dict:
    out = {}
    for item in csv_list(str)(text):
        name, sep, n = item.partition("=")
        if not sep or name not in ENGINES or not n.isdigit() or int(n) < 1:
            raise argparse.ArgumentTypeError(
                f"--engine-rounds takes ENGINE=ROUNDS items, e.g. opacus=2; got {item!r}"
            )
        out[name] = int(n)
    return out


def _engines(text: str) -> tuple[str, ...]:
    names = csv_list(str)(text)
    bad = [n for n in names if n not in ENGINES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"engines must be from {','.join(ENGINES)}, got {text!r}")
    return names


def add_federate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "federate",
        help="federated DP training across sites, with the training-time penalty",
        description=(
            "Simulates K hospitals in one process: each trains a 3D U-Net on its own patients "
            "with DP-SGD (sample-level DP, the patient is the privacy unit) and a server "
            "aggregates the updates. Writes OUT/report.json, OUT/report.md and PNG plots, and "
            "a checkpoint after every round (--resume continues a killed run, epsilon intact). "
            "--compare dpseg,opacus,none runs the same workload under each engine, rounds "
            "interleaved, and reports the time per round and Dice of each beside non-private "
            "training."
        ),
    )
    data = p.add_argument_group("data")
    src = data.add_mutually_exclusive_group()
    src.add_argument(
        "--data", type=Path, help="MSD folder (dataset.json may give each case a 'site')"
    )
    src.add_argument(
        "--phantoms", type=int, metavar="N", help="generate N CT phantoms into OUT/phantoms"
    )
    data.add_argument(
        "--sites", type=int, metavar="K", help="number of sites (scanners for --phantoms)"
    )
    data.add_argument(
        "--partition",
        choices=PARTITIONS,
        default="site",
        help="site: by dataset.json 'site'; iid, quantity, dirichlet: split into --sites",
    )
    data.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet concentration (quantity, dirichlet)"
    )
    data.add_argument("--test-fraction", type=float, default=0.25, help="held-out cases per site")
    data.add_argument("--size", type=int, default=32, help="phantom edge in voxels")
    data.add_argument(
        "--split",
        default=None,
        metavar="FILE[:KEY]",
        help="use only the cases of list KEY (default 'train') of a split file, e.g. "
        "docs/results/hippocampus/split.json: the sites partition them and hold their "
        "--test-fraction out of them; no other case is loaded",
    )
    data.add_argument(
        "--normalize",
        choices=NORMALIZE,
        default="auto",
        help="intensities: auto windows CT, scales other modalities by each volume's "
        "0.5-99.5 percentiles",
    )

    fed = p.add_argument_group("federation")
    fed.add_argument("--rounds", type=int, default=5)
    fed.add_argument(
        "--train-sites",
        type=csv_list(str),
        default=(),
        metavar="S1,S2",
        help="only these sites train (e.g. site0: a site alone); every site's held-out "
        "patients are still scored",
    )
    fed.add_argument(
        "--engine-rounds",
        type=_engine_rounds,
        default={},
        metavar="E=N,...",
        help="fewer rounds for some engines of --compare, e.g. opacus=2: their time per round "
        "is measured, their Dice not reported as final",
    )
    steps = fed.add_mutually_exclusive_group()
    steps.add_argument(
        "--local-steps", type=int, default=None, help="DP-SGD steps per site per round (default 4)"
    )
    steps.add_argument(
        "--local-epochs", type=int, default=None, help="epochs of 1/q steps per round instead"
    )
    fed.add_argument(
        "--fraction", type=float, default=1.0, help="fraction of sites sampled per round"
    )
    fed.add_argument("--strategy", choices=STRATEGIES, default="fedavg")
    fed.add_argument("--mu", type=float, default=0.01, help="FedProx proximal weight")
    fed.add_argument(
        "--server-lr",
        type=float,
        default=None,
        help="server step (1 for fedavg/fedprox, 1e-2 for fedadam/fedyogi)",
    )
    fed.add_argument("--beta1", type=float, default=0.9)
    fed.add_argument("--beta2", type=float, default=0.99)
    fed.add_argument("--tau", type=float, default=1e-3, help="FedAdam/FedYogi adaptivity")

    model = p.add_argument_group("model and local training")
    model.add_argument(
        "--spatial-dims",
        type=int,
        choices=(2, 3),
        default=3,
        help="3: 3-D patches (default); 2: a 2-D U-Net on one axial slice per patient per "
        "draw (the privacy unit stays the patient)",
    )
    model.add_argument(
        "--channels", type=csv_list(int), default=(8, 16, 32), help="U-Net widths, e.g. 8,16,32"
    )
    model.add_argument(
        "--upsample",
        choices=("interp", "transpose"),
        default="interp",
        help="interp (default, every engine): Opacus has no ConvTranspose3d rule",
    )
    model.add_argument(
        "--patch", type=int, default=32, help="patch edge (divisible by 2^(levels-1))"
    )
    model.add_argument("--p-foreground", type=float, default=0.5)
    model.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    model.add_argument("--lr", type=float, default=3e-3)
    model.add_argument(
        "--dp-lr",
        type=float,
        default=None,
        help="learning rate of the DP engines (default --lr); noisy DP gradients often want a "
        "larger step than clean ones",
    )
    model.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default="constant",
        help="cosine: each round's local learning rate falls along a cosine from the given "
        "one (round 1) towards 1/20 of it (reached as the last round ends); DP's noisy steps "
        "need it to settle",
    )
    model.add_argument(
        "--batch",
        dest="batch_size",
        type=int,
        default=4,
        help="expected (Poisson) batch size, patients: each site's normaliser",
    )
    model.add_argument(
        "--sample-rate",
        type=float,
        default=None,
        help="each site's Poisson rate q, a public constant: with it nothing a site releases "
        "depends on its number of cases and epsilon is for add/remove adjacency; without it "
        "q = 1 / ceil(cases / batch) makes each site's size public (replace-one adjacency)",
    )
    model.add_argument(
        "--items-per-patient",
        type=int,
        default=1,
        help="patches (2-D: slices) each sampled patient brings, averaged before clipping "
        "(default 1)",
    )

    priv = p.add_argument_group("privacy")
    priv.add_argument("--engine", choices=ENGINES, default="dpseg")
    priv.add_argument(
        "--privacy-unit",
        default="patient",
        metavar="NAME",
        help="what the ledgers and the report call each case (default patient): say 'case' "
        "when a subject may have several cases; a name only, refused on --resume if changed",
    )
    priv.add_argument(
        "--compare",
        type=_engines,
        default=None,
        metavar="E1,E2,...",
        help="run these engines side by side, e.g. dpseg,opacus,none",
    )
    noise = priv.add_mutually_exclusive_group()
    noise.add_argument("--noise-multiplier", type=float, default=None, help="sigma (default 1.0)")
    noise.add_argument(
        "--target-epsilon",
        type=float,
        default=None,
        help="calibrate sigma per site to reach this epsilon after all rounds",
    )
    priv.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping bound C")
    priv.add_argument("--delta", type=float, default=1e-5)
    priv.add_argument(
        "--max-epsilon",
        type=float,
        default=None,
        help="a site stops once its next round would pass this",
    )
    priv.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    priv.add_argument(
        "--client-clip",
        type=float,
        default=None,
        help="client-level DP: clip each site's update to this norm",
    )
    priv.add_argument(
        "--client-noise", type=float, default=1.0, help="client-level noise multiplier"
    )

    sec = p.add_argument_group("what the server accepts and sees (docs/flower.md, threat model)")
    sec.add_argument(
        "--max-update-norm", type=float, default=None, metavar="S",
        help="refuse for its round a site's update whose L2 norm passes S (a broken or "
        "hostile site); under --secagg the sum of n sites must stay within n S",
    )  # fmt: skip
    sec.add_argument(
        "--secagg", action="store_true",
        help="--runtime flower: secure aggregation with Flower's SecAgg+: the server learns "
        "only the sum of the sites' updates (at least 3 sites a round; not with --client-clip)",
    )  # fmt: skip
    sec.add_argument(
        "--secagg-clip-range", type=float, default=1.0, metavar="C",
        help="SecAgg+ quantises each weighted update coordinate over [-C, C]; a site whose "
        "update passes C refuses to send it (default 1.0)",
    )  # fmt: skip
    sec.add_argument(
        "--secagg-bits", type=int, default=22, metavar="B",
        help="SecAgg+ quantisation levels 2^B (default 22: one step is 2C / 2^22)",
    )  # fmt: skip
    sec.add_argument(
        "--share-site-stats", action="store_true",
        help="--runtime flower: sites also send their training loss, held-out Dice, case "
        "counts and timings, computed without DP noise (the report marks them outside "
        "epsilon); case names never leave a site",
    )  # fmt: skip
    sec.add_argument(
        "--tls", action="store_true",
        help="--runtime flower: TLS with a fresh CA, and SuperNode authentication (each "
        "site's key registered at the SuperLink)",
    )  # fmt: skip
    priv.add_argument("--opacus-mode", choices=("hooks", "functorch"), default="hooks")
    priv.add_argument("--backend", default="auto", help="dpseg fused-op backend")

    run = p.add_argument_group("run")
    run.add_argument("--out", type=Path, required=False, help="run folder (required)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    run.add_argument(
        "--seed", type=int, default=0, help="public seed: data split, phantoms, model init"
    )
    run.add_argument(
        "--secret-seed",
        type=int,
        default=None,
        help="fix the secret that keys every site's Poisson draws and noise and the server's "
        "sampling (default: fresh OS entropy, kept in OUT/secret.key, and on Flower each "
        "site's in its state-dir): for tests and reproductions only, since whoever knows it "
        "can replay the batches and the noise",
    )
    run.add_argument("--eval-overlap", type=float, default=0.25, help="sliding-window overlap")
    run.add_argument(
        "--eval-every",
        type=int,
        default=1,
        help="validate the global model every N rounds (and after the last; default 1)",
    )
    run.add_argument("--no-plots", action="store_true")
    run.add_argument(
        "--runtime",
        choices=("simulator", "flower"),
        default="simulator",
        help="simulator: all sites in this process; flower: a local Flower deployment (a "
        "SuperLink and one SuperNode per site on 127.0.0.1; needs pip install 'dpseg[flower]')",
    )
    add_freed_memory_option(p)
    p.set_defaults(func=run_federate)
    return p


def config_from_args(args):
    from dpseg.federated.runner import FederatedConfig

    engines = args.compare if args.compare else (args.engine,)
    local_steps = args.local_steps
    if local_steps is None and args.local_epochs is None:
        local_steps = 4
    return FederatedConfig(
        data=str(args.data) if args.data else None, phantoms=args.phantoms, sites=args.sites,
        partition=args.partition, alpha=args.alpha, test_fraction=args.test_fraction,
        size=args.size, split=args.split, normalize=args.normalize,
        spatial_dims=args.spatial_dims, channels=tuple(args.channels),
        upsample=args.upsample, patch=args.patch,
        p_foreground=args.p_foreground, rounds=args.rounds, local_steps=local_steps,
        local_epochs=args.local_epochs, fraction=args.fraction, strategy=args.strategy,
        mu=args.mu, server_lr=args.server_lr, beta1=args.beta1, beta2=args.beta2, tau=args.tau,
        optimizer=args.optimizer, lr=args.lr, dp_lr=args.dp_lr, batch_size=args.batch_size,
        sample_rate=args.sample_rate, items_per_patient=args.items_per_patient,
        privacy_unit=args.privacy_unit,
        lr_schedule=args.lr_schedule, engines=engines,
        noise_multiplier=1.0 if args.noise_multiplier is None else args.noise_multiplier,
        target_epsilon=args.target_epsilon, max_grad_norm=args.max_grad_norm, delta=args.delta,
        max_epsilon=args.max_epsilon, accountant=args.accountant, opacus_mode=args.opacus_mode,
        backend=args.backend, client_clip=args.client_clip, client_noise=args.client_noise,
        max_update_norm=args.max_update_norm, secagg=args.secagg,
        secagg_clip_range=args.secagg_clip_range, secagg_bits=args.secagg_bits,
        share_site_stats=args.share_site_stats,
        device=args.device, seed=args.seed, secret_seed=args.secret_seed,
        eval_overlap=args.eval_overlap,
        engine_rounds=dict(args.engine_rounds), eval_every=args.eval_every,
        train_sites=tuple(args.train_sites),
    )  # fmt: skip


def _run(cfg, out: Path, resume: bool, plots: bool) -> int:
    from dpseg.data import DataError
    from dpseg.federated.runner import SetupError, run_federation

    try:
        cfg.check()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        run_federation(cfg, out, resume=resume, plots=plots)
    except (DataError, SetupError) as exc:
        raise UsageError(str(exc)) from None
    return 0


def run_federate(args) -> int:

    if args.out is None:
        raise UsageError("--out RUN is required: the folder for the report and checkpoints")
    if args.data is None and args.phantoms is None:
        raise UsageError("give the data: --data DIR (an MSD folder) or --phantoms N --sites K")
    if getattr(args, "runtime", "simulator") == "flower":
        return _run_flower(
            config_from_args(args), args.out, args.resume, not args.no_plots, tls=args.tls
        )
    flower_only = [f for f, on in (("--tls", args.tls), ("--share-site-stats",
                                   args.share_site_stats)) if on]  # fmt: skip
    if flower_only:
        raise UsageError(
            f"{', '.join(flower_only)}: for --runtime flower (in one process nothing travels "
            "and nothing leaves a site)"
        )
    return _run(config_from_args(args), args.out, args.resume, not args.no_plots)


def _run_flower(cfg, out: Path, resume: bool, plots: bool, tls: bool = False) -> int:
    import importlib.util

    from dpseg.data import DataError

    if importlib.util.find_spec("flwr") is None:
        raise UsageError(
            "--runtime flower needs the Flower package, which is not installed: "
            "pip install 'dpseg[flower]' (or use --runtime simulator)"
        )
    from dpseg.federated.flower.deploy import FlowerDeploymentError, run_flower_deployment
    from dpseg.federated.runner import SetupError

    try:
        cfg.check()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        run_flower_deployment(cfg, out, plots=plots, resume=resume, tls=tls)
    except (DataError, SetupError) as exc:
        raise UsageError(str(exc)) from None
    except FlowerDeploymentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# --- demo ---------------------------------------------------------------------------------
def add_demo_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="federated DP training on CT phantoms: 3 sites, dpseg vs Opacus vs non-private "
        "(a few minutes on CPU)",
        description=(
            "Generates 1200 CT phantoms from 3 simulated scanners (one hospital each), trains a "
            "small 2-D U-Net on their axial slices federated (FedAvg) with DP at epsilon 8 per "
            "site under dpseg and without DP on the same data and seeds, times 2 rounds of "
            "Opacus, and prints Dice and epsilon per site, the training-time penalty of dpseg "
            "and of Opacus, and what it all means. --single-site runs the earlier one-site DP "
            "demo instead."
        ),
    )
    p.add_argument(
        "--out", type=Path, default=None, help="run folder (default: a new temporary folder)"
    )
    p.add_argument("--rounds", type=int, default=DEMO["rounds"])
    p.add_argument("--local-steps", type=int, default=DEMO["local_steps"])
    p.add_argument("--compare", type=_engines, default=DEMO["engines"], metavar="E1,E2,...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--single-site", action="store_true", help="the one-site DP demo (dpseg.demo)")
    add_freed_memory_option(p)
    p.set_defaults(func=run_demo)
    return p


def run_demo(args) -> int:
    import json

    from dpseg.federated.demo import story
    from dpseg.federated.runner import FederatedConfig

    if args.single_site:
        from dpseg.demo import run_demo as single_site_demo

        single_site_demo(seed=args.seed)
        return 0
    if args.rounds < 1 or args.local_steps < 1:
        raise UsageError("--rounds and --local-steps must be >= 1")
    out = args.out or Path(tempfile.mkdtemp(prefix="dpseg-demo-"))
    settings = {**DEMO, "rounds": args.rounds, "local_steps": args.local_steps}
    settings["engines"] = tuple(args.compare)
    settings["engine_rounds"] = {
        e: n for e, n in DEMO["engine_rounds"].items() if e in settings["engines"]
    }
    cfg = FederatedConfig(**settings, seed=args.seed)
    print(
        f"Federated demo: {cfg.phantoms} CT phantoms ({cfg.size}^3) from {cfg.sites} scanners, one "
        f"hospital each; a 2-D U-Net on axial slices, FedAvg, {cfg.rounds} rounds x "
        f"{cfg.local_steps} local steps, DP at epsilon {cfg.target_epsilon:g} per site; engines "
        f"{', '.join(cfg.engines)}"
        + "".join(f" ({e}: {n} rounds, for timing)" for e, n in cfg.engine_rounds.items())
        + f"; run folder {out}",
        flush=True,
    )
    code = _run(cfg, out, resume=False, plots=True)
    print()
    print(story(json.loads((out / "report.json").read_text()), out))
    return code
