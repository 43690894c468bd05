"""Worker processes for the torch.distributed tests (gloo on CPU): each rank trains, then
saves what it saw and where it ended for the test process to hold against the oracle."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import dpseg
from tests.test_engine_oracle import SmallSegNet, seg_loss_mean, seg_loss_sum


def data(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n, 4, 4, 2), generator=g)
    return x, y


def init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def train(rank: int, world: int, port: int, out: str, cfg: dict) -> None:
    """cfg: reduction, sigma, C, steps, physical (None: plain steps), batch, seed."""
    init(rank, world, port)
    try:
        torch.manual_seed(cfg.get("model_seed", 0))
        model = SmallSegNet().double()
        x, y = data(cfg.get("n", 12))
        ddp = DistributedDataParallel(model)
        secure = cfg.get("secure", False)
        if secure:
            import warnings

            warnings.simplefilter("ignore")
        engine = dpseg.PrivacyEngine(accountant="rdp", secure_mode=secure)
        loader = DataLoader(TensorDataset(x, y, torch.arange(len(x))), batch_size=cfg["batch"])
        pmodel, opt, loader = engine.make_private(
            module=ddp,
            optimizer=torch.optim.SGD(ddp.parameters(), lr=1.0),
            data_loader=loader,
            noise_multiplier=cfg["sigma"],
            max_grad_norm=cfg["C"],
            loss_reduction=cfg["reduction"],
            noise_seed=None if secure else cfg["seed"],
            # Declared (q = batch / n per rank's loader = the global rate, E = that batch):
            # add/remove adjacency, the single-process accountant's.
            sample_rate=cfg["batch"] / cfg.get("n", 12),
            expected_batch_size=cfg["batch"],
        )
        loss_fn = seg_loss_mean if cfg["reduction"] == "mean" else seg_loss_sum
        seen, states = [], [{k: v.clone() for k, v in model.state_dict().items()}]
        it = iter(loader)
        for _ in range(cfg["steps"]):
            xb, yb, idx = next(it)
            if cfg.get("physical") is None:
                opt.zero_grad()
                loss_fn(pmodel(xb), yb).backward()
                opt.step()
            else:  # the logical batch in physical batches, as BatchMemoryManager does
                chunks = list(
                    zip(xb.split(cfg["physical"]), yb.split(cfg["physical"]), strict=True)
                )
                chunks = chunks or [(xb, yb)]
                for k, (xc, yc) in enumerate(chunks):
                    opt.zero_grad()
                    loss_fn(pmodel(xc), yc).backward()
                    opt.signal_skip_step(k < len(chunks) - 1)
                    opt.step()
            seen.append(idx)
            states.append({k: v.clone() for k, v in model.state_dict().items()})
        torch.save(
            {
                "seen": seen,
                "states": states,
                "steps_taken": opt.steps_taken,
                "history": list(engine.accountant.history),
                "epsilon": engine.get_epsilon(1e-5),
                "expected_batch": opt.expected_batch_size,
                "noise_seed": None if secure else opt.noise_seed,
                "grad_sync": ddp.require_backward_grad_sync,
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def batch_memory_manager(rank: int, world: int, port: int, out: str, cfg: dict) -> None:
    """The public BatchMemoryManager under DDP: ranks with different physical batch counts."""
    init(rank, world, port)
    try:
        torch.manual_seed(0)
        model = SmallSegNet().double()
        x, y = data(cfg.get("n", 12))
        ddp = DistributedDataParallel(model)
        loader = DataLoader(TensorDataset(x, y, torch.arange(len(x))), batch_size=cfg["batch"])
        pmodel, opt, loader = dpseg.PrivacyEngine(accountant="rdp").make_private(
            module=ddp, optimizer=torch.optim.SGD(ddp.parameters(), lr=1.0), data_loader=loader,
            noise_multiplier=cfg["sigma"], max_grad_norm=cfg["C"], noise_seed=cfg["seed"],
            sample_rate=cfg["batch"] / cfg.get("n", 12), expected_batch_size=cfg["batch"],
        )  # fmt: skip
        seen, states, current = [], [{k: v.clone() for k, v in model.state_dict().items()}], []
        with dpseg.BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=cfg["physical"], optimizer=opt
        ) as physical:
            for xb, yb, idx in physical:
                opt.zero_grad()
                seg_loss_mean(pmodel(xb), yb).backward()
                before = opt.steps_taken
                opt.step()
                current.append(idx)
                if opt.steps_taken > before:
                    seen.append(torch.cat(current))
                    current = []
                    states.append({k: v.clone() for k, v in model.state_dict().items()})
        torch.save({"seen": seen, "states": states, "steps_taken": opt.steps_taken},
                   os.path.join(out, f"rank{rank}.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


PATIENT_OF_ITEM = [0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 5, 5]  # 6 patients of 1 to 3 items


def patient_units(rank: int, world: int, port: int, out: str, cfg: dict) -> None:
    """Declared patients (k items each) through BatchMemoryManager under DDP: each rank
    clips its own patients, whole."""
    init(rank, world, port)
    try:
        torch.manual_seed(0)
        model = SmallSegNet().double()
        x, y = data(len(PATIENT_OF_ITEM))
        ddp = DistributedDataParallel(model)
        loader = DataLoader(TensorDataset(x, y, torch.arange(len(x))), batch_size=4)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pmodel, opt, loader = dpseg.PrivacyEngine(accountant="rdp").make_private(
                module=ddp, optimizer=torch.optim.SGD(ddp.parameters(), lr=1.0),
                data_loader=loader, noise_multiplier=0.0, max_grad_norm=cfg["C"],
                noise_seed=cfg["seed"], sample_rate=cfg["q"], expected_batch_size=cfg["expected"],
                patient_ids=PATIENT_OF_ITEM, items_per_patient=cfg["k"],
            )  # fmt: skip
        seen, states, current = [], [{k: v.clone() for k, v in model.state_dict().items()}], []
        with dpseg.BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=cfg["physical"], optimizer=opt
        ) as physical:
            for _ in range(cfg["passes"]):
                for xb, yb, idx in physical:
                    opt.zero_grad()
                    seg_loss_mean(pmodel(xb), yb).backward()
                    before = opt.steps_taken
                    opt.step()
                    current.append(idx)
                    if opt.steps_taken > before:
                        seen.append(torch.cat(current))
                        current = []
                        states.append({k: v.clone() for k, v in model.state_dict().items()})
        torch.save({"seen": seen, "states": states, "steps_taken": opt.steps_taken},
                   os.path.join(out, f"rank{rank}.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


def refuse_static_graph(rank: int, world: int, port: int, out: str, cfg: dict) -> None:
    init(rank, world, port)
    try:
        model = SmallSegNet().double()
        ddp = DistributedDataParallel(model, static_graph=True)
        x, y = data()
        try:
            dpseg.PrivacyEngine().make_private(
                module=ddp, optimizer=torch.optim.SGD(ddp.parameters(), lr=1.0),
                data_loader=DataLoader(TensorDataset(x, y), batch_size=4),
                noise_multiplier=1.0, max_grad_norm=1.0,
            )  # fmt: skip
            message = ""
        except ValueError as exc:
            message = str(exc)
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()
