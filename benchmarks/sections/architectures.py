"""Section 6: the neural-operator family next to the CNN — size, standalone load and predict, side by side.

One seeded ``ffno`` network (upstream's CI architecture, default widths: docs/bundle-format.md §8.6) is saved as a
bundle next to the CNN of the main model set; both are loaded with ``load_torch_bundle`` and run through
``PtychoTorchModel.predict`` at the same batch, all four timings interleaved in each repeat. Informational: the
architectures do different work, so there is no target.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchmarks.config import Context
from benchmarks.harness import inner_count
from benchmarks.models import inputs
from benchmarks.records import RecordTable, SectionResult, Stats, column

__all__ = ["KEY", "TITLE", "ArchitectureRow", "run"]

KEY = "architectures"
TITLE = "6. Architectures: the FNO family next to the CNN"
#: The batch both architectures predict at.
BATCH = 16


@dataclass(frozen=True)
class ArchitectureRow:
    """One architecture's bundle, its load time and its predict time (all rows interleaved)."""

    architecture: str = column("architecture")
    N: int = column("N")
    parameters: int = column("parameters")
    bundle_bytes: int = column("bundle bytes", "bytes")
    load: Stats = column("load_torch_bundle")
    predict: Stats = column(f"predict, batch {BATCH}")
    samples_per_s: float = column("samples/s", "g")


def _ffno_bundle(work: Path, N: int) -> Path:
    import torch

    from mlflow_ptycho_flavor import save_torch_bundle
    from mlflow_ptycho_flavor.network import FnoNetworkConfig, build_network

    torch.manual_seed(0)
    network = build_network(FnoNetworkConfig(N=N, C_model=1, architecture="ffno")).eval()
    return save_torch_bundle(network, work / f"ffno_n{N}" / "wts.h5.zip")


def run(ctx: Context) -> SectionResult:
    from mlflow_ptycho_flavor import PtychoTorchModel, load_torch_bundle

    cfg = ctx.cfg
    cnn = ctx.models[1] if 1 in ctx.models else ctx.models[ctx.main_gridsize]
    bundles = {"cnn": cnn.bundle, "ffno": _ffno_bundle(ctx.work, cnn.N)}
    models = {name: PtychoTorchModel.from_bundle(path, cfg.device) for name, path in bundles.items()}
    candidates: dict[str, Callable[[], Any]] = {}
    for name, path in bundles.items():
        channels = models[name].channels
        x = inputs(BATCH, channels, cnn.N, seed=11)
        candidates[f"load {name}"] = lambda path=path: load_torch_bundle(path, device=cfg.device)
        candidates[f"predict {name}"] = lambda model=models[name], x=x: model.predict(x)
    inner = {key: inner_count(ctx.timer.once(fn), cfg.sample_seconds) for key, fn in candidates.items()}
    stats = ctx.timer.interleave(candidates, cfg.repeats, inner=inner)
    rows = [
        ArchitectureRow(
            architecture=name,
            N=models[name].N,
            parameters=sum(p.numel() for p in models[name].network.parameters()),
            bundle_bytes=path.stat().st_size,
            load=stats[f"load {name}"],
            predict=stats[f"predict {name}"],
            samples_per_s=BATCH / stats[f"predict {name}"].median,
        )
        for name, path in bundles.items()
    ]
    intro = (f"The CNN (gridsize 1, n_filters_scale={cnn.filters}) and a seeded `ffno` with upstream's default "
             f"widths (fno_width 32, fno_modes 12, 4 blocks, 2 refiners), both N={cnn.N}, on `{cfg.device}`; "
             f"`PtychoTorchModel.predict` at batch {BATCH}. Informational (no target): the FNO's spectral layers do "
             "different work per pixel than the CNN's convolutions.")
    return SectionResult(KEY, TITLE, intro, [RecordTable(ArchitectureRow, rows, "Data")], [])
