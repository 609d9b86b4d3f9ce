"""``ptycho-flavor``: the command line of mlflow-ptycho-flavor (also ``python -m mlflow_ptycho_flavor``).

Commands:
    demo           simulate a scan, log + register the shipped model in MLflow, reload, stitch, write a PNG
    inspect        describe a bundle or a logged model (manifest, architecture, parameters, hashes)
    predict        reconstruct an NPZ scan (upstream's schema or ptychodus's conventions), stitched, with a PNG
    convert        turn a Lightning checkpoint (.ckpt) or a TensorFlow wts.h5.zip into a PyTorch bundle
    log            log an existing wts.h5.zip (e.g. trained by upstream PtychoPINN) into MLflow
    fetch          write a logged model's bundle where a consumer expects it (ptychodus's model.zip), verified
    serve          run ``mlflow models serve`` for a ptycho_torch model with the right flags
    simulate       write a simulated scan (upstream's NPZ schema)
    spark-predict  batch inference on Spark (needs the ``spark`` extra)

User mistakes print one line ``error: ...`` and exit with status 2; no traceback. Arguments are checked before
any output is written or any run is started, and bundle paths never import MLflow (``predict`` and ``inspect`` of a
``wts.h5.zip`` work where MLflow is not installed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from mlflow_ptycho_flavor.errors import PredictionInputError, PtychoFlavorError
from mlflow_ptycho_flavor.model.inference import INPUT_KINDS

__all__ = ["main", "build_parser", "interpreter_env"]

EXIT_USAGE = 2


class CliError(Exception):
    """A user mistake reported as one line."""


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def interpreter_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus ``extra``, with the running interpreter's ``bin`` folder first on ``PATH``.

    ``mlflow models serve --env-manager local`` starts ``uvicorn`` by name (``bash -c "exec uvicorn ..."``), so it
    must find the ``uvicorn`` installed next to this interpreter even when the venv is not activated (e.g.
    ``/path/to/venv/bin/ptycho-flavor serve`` run from a plain shell). ``sys.executable`` is deliberately not
    resolved: a venv's ``bin/python`` is a symlink to the base interpreter, and the venv's folder is the one wanted.
    """
    env = {**os.environ, **(extra or {})}
    bin_dir = os.path.dirname(os.path.abspath(sys.executable))
    entries = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    env["PATH"] = os.pathsep.join([bin_dir, *entries])
    return env


def _load_any(target: str, device: str | None):
    """A PtychoTorchModel from a bundle path (no MLflow needed), a model directory or any MLflow model URI."""
    from mlflow_ptycho_flavor.bundle import looks_like_bundle_path, resolve_bundle_path

    if looks_like_bundle_path(target):
        from mlflow_ptycho_flavor.model.inference import PtychoTorchModel

        path = resolve_bundle_path(target)
        if not path.exists():
            raise CliError(f"no bundle at {path}")
        return PtychoTorchModel.from_bundle(path, device)
    from mlflow_ptycho_flavor.flavor import load_model

    if "://" not in target and ":" not in target.split("/")[0] and not Path(target).exists():
        raise CliError(f"{target!r} is neither a file, a model directory, nor a models:/ or runs:/ URI")
    return load_model(target, device=device)


def _print_table(rows: Sequence[tuple[str, Any]]) -> None:
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")


def _set_tracking(uri: str | None) -> str:
    import mlflow

    if uri:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    return mlflow.get_tracking_uri()


def _experiment(name: str, artifact_root: Path | None) -> str:
    """Create/select an experiment; new ones keep their artifacts under ``artifact_root`` when given."""
    import mlflow

    client = mlflow.MlflowClient()
    existing = client.get_experiment_by_name(name)
    if existing is None:
        location = artifact_root.resolve().as_uri() if artifact_root is not None else None
        experiment_id = client.create_experiment(name, artifact_location=location)
    else:
        experiment_id = existing.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


# ----------------------------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    from mlflow_ptycho_flavor.bundle import looks_like_bundle_path, read_bundle, resolve_bundle_path
    from mlflow_ptycho_flavor.network import describe_architecture

    target = args.target
    model_dir = None
    if not looks_like_bundle_path(target):
        from mlflow_ptycho_flavor import FLAVOR_NAME
        from mlflow_ptycho_flavor.flavor import env as _mlflow_env

        model_dir = _mlflow_env.download_model(target, None)
        conf = _mlflow_env.flavor_configuration(model_dir, FLAVOR_NAME)
        target = os.path.join(model_dir, conf.get("bundle", "wts.h5.zip"))
    contents = read_bundle(resolve_bundle_path(target))
    network = contents.build_network("cpu", adopt_weights=True)
    report = {
        "bundle": str(contents.path),
        "bytes": contents.path.stat().st_size,
        "manifest_models": contents.manifest["models"],
        "version": contents.version,
        "backend": contents.backend,
        "scaling_metadata": contents.metadata is not None,
        **describe_architecture(contents.network_config),
        "gridsize": contents.params["gridsize"],
        "intensity_scale (params)": contents.intensity_scale,
        "state_dict keys": len(contents.state_dict),
        "parameters": sum(p.numel() for p in network.parameters()),
        "hashes verified": (
            f"{len(contents.hashes_verified)}/{len(contents.manifest.get('sha256') or {})}"
            if contents.manifest.get("sha256")
            else "none recorded (upstream bundle)"
        ),
    }
    if model_dir is not None:
        report["model directory"] = model_dir
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"ptycho_torch bundle {contents.path}")
        _print_table(list(report.items())[1:])
    return 0


def _parse_scale(scale: str) -> tuple[str, float | None]:
    """``--scale`` -> (normalize, factor), with the model's own rule for factors (finite, > 0)."""
    if scale == "dataset":
        return "dataset", None
    if scale == "one":
        return "none", None
    try:
        factor = float(scale)
    except ValueError as exc:
        raise CliError(f"--scale must be 'dataset', 'one' or a number, got {scale[:100]!r}") from exc
    from mlflow_ptycho_flavor.model.inference import prepare_scale

    try:
        prepare_scale(factor, 1)
    except PredictionInputError as exc:
        raise CliError(f"--scale {scale[:100]}: {exc}") from exc
    return "none", factor


def _check_output_path(option: str, value: str | None) -> None:
    if value is not None and Path(value).is_dir():
        raise CliError(f"{option} {value} is a directory; give a file name")


def _predict_dataset(model, dataset, *, batch_size: int | None, stitch: bool, normalize: str, factor: float | None):
    """Group (CONFIG-001: the global holds the bundle's params), predict, optionally stitch."""
    import numpy as np

    from mlflow_ptycho_flavor.model.grouping import group_patterns

    groups = group_patterns(dataset.diff3d, dataset.xcoords, dataset.ycoords)
    patches = model.predict(groups.diffraction, factor, batch_size=batch_size, normalize=normalize, progress=True)
    stitched = None
    if stitch:
        from mlflow_ptycho_flavor.model.stitching import stitch_patches

        stitched = stitch_patches(patches, groups.positions if groups.positions.shape[1] > 1 else groups.positions[:, 0])
    return groups, np.asarray(patches), stitched


def _ptychodus_options_given(args: argparse.Namespace) -> bool:
    return bool(args.counts) or any(
        value is not None for value in (args.positions_order, args.bad_pixels, args.normalization)
    )


def _load_scan(args: argparse.Namespace, normalize: str, factor: float | None):
    """The scan as amplitudes, and the (normalize, factor) pair to predict it with.

    Data in ptychodus's conventions (any of ``--counts``, ``--positions-order``, ``--bad-pixels``,
    ``--normalization`` given, or a file :func:`looks_like_ptychodus_npz` recognises) are read by
    :func:`load_ptychodus_npz`; with ``--scale dataset`` the factor then follows ``--normalization``. Anything
    else is read as upstream's schema by :func:`load_npz`.
    """
    from mlflow_ptycho_flavor.sim.ptychodus import load_ptychodus_npz, looks_like_ptychodus_npz

    if not _ptychodus_options_given(args) and not looks_like_ptychodus_npz(args.data):
        from mlflow_ptycho_flavor.sim.dataset import load_npz

        return load_npz(args.data), normalize, factor
    data = load_ptychodus_npz(
        args.data,
        positions=args.positions_order or "xy",
        bad_pixels=args.bad_pixels or "mask",
        normalization=args.normalization or "upstream",
        input_kind="counts" if args.counts else None,
    )
    done = {"mask": "set to 0", "inpaint": "inpainted", "ignore": "kept as stored"}[data.bad_pixel_method]
    bad = "none in the file" if data.bad_pixels is None else f"{int(data.bad_pixels.sum())} {done}"
    print(
        f"ptychodus-format data: diff3d as {data.input_kind}"
        f"{' (amplitude = sqrt(counts))' if data.input_kind == 'counts' else ''}, bad pixels {bad}, positions "
        f"{args.positions_order or 'xy'}, probe mode {data.probe_mode_index} of {len(data.probe_modes)}"
        + (f", {data.normalization} normalization (scale {data.scale:.6g})" if normalize == "dataset" else "")
    )
    if normalize == "dataset":
        return data.dataset, "none", data.scale
    return data.dataset, normalize, factor


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from mlflow_ptycho_flavor._io import atomic_write

    # Every argument is checked before anything is read, computed or written.
    if args.png and args.patches_only:
        raise CliError("--png needs the stitched object; drop --patches-only")
    if args.batch_size is not None and args.batch_size < 1:
        raise CliError(f"--batch-size must be a positive integer, got {args.batch_size}")
    normalize, factor = _parse_scale(args.scale)
    if args.normalization is not None and normalize != "dataset":
        raise CliError(
            f"--normalization {args.normalization} chooses the convention of the dataset factor (--scale dataset); "
            f"drop it, or drop --scale {args.scale[:100]}"
        )
    _check_output_path("-o", args.output)
    _check_output_path("--png", args.png)
    dataset, normalize, factor = _load_scan(args, normalize, factor)
    model = _load_any(args.model, args.device)
    started = time.perf_counter()
    groups, patches, stitched = _predict_dataset(
        model, dataset, batch_size=args.batch_size, stitch=not args.patches_only, normalize=normalize, factor=factor
    )
    elapsed = time.perf_counter() - started
    arrays: dict[str, Any] = {
        "patches": patches,
        "positions": groups.positions,
        "indices": groups.indices,
    }
    if stitched is not None:
        arrays.update(object=stitched.obj, coverage=stitched.coverage, origin=np.asarray(stitched.origin))
    out = atomic_write(args.output, lambda handle: np.savez(handle, **arrays))
    print(f"predicted {patches.shape[0]} patch groups of shape {patches.shape[1:]} in {elapsed:.2f} s -> {out}")
    if args.png:
        from mlflow_ptycho_flavor.sim.plotting import save_reconstruction_figure

        truth = mask = None
        recon = stitched.obj
        if dataset.objectGuess is not None:
            from mlflow_ptycho_flavor.model.stitching import crop_to_object

            recon, mask = crop_to_object(stitched, dataset.objectGuess.shape)
            truth = dataset.objectGuess
        save_reconstruction_figure(args.png, recon, truth=truth, mask=mask, title=f"{args.model}")
        print(f"figure -> {args.png}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from mlflow_ptycho_flavor.convert import convert_any

    result = convert_any(args.src, args.dst, intensity_scale=args.intensity_scale)
    print(f"converted {result.source_kind.value.replace('_', ' ')} {result.source} -> {result.bundle}")
    _print_table(
        [
            ("source sha256", result.source_sha256),
            ("source bytes", result.source_size),
            ("bundle bytes", result.bundle.stat().st_size),
        ]
    )
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle)
    if not bundle.exists():
        raise CliError(f"no bundle at {bundle}")
    if args.alias and not args.registered_model_name:
        raise CliError("--alias needs --registered-model-name (an alias points at a registered model version)")
    import mlflow

    from mlflow_ptycho_flavor.flavor import env as _mlflow_env
    from mlflow_ptycho_flavor.flavor import log_model, validate_model_path

    # Refusals happen here, before a run exists: a refused log leaves nothing in the tracking store.
    validate_model_path(bundle)
    _mlflow_env.validate_registry_names(args.registered_model_name, args.alias)
    uri = _set_tracking(args.tracking_uri)
    if args.experiment:
        _experiment(args.experiment, None)
    run = mlflow.start_run(run_name=args.run_name)
    try:
        info = log_model(str(bundle), name=args.name, registered_model_name=args.registered_model_name)
    except BaseException:
        # What only the conversion itself can find (a damaged checkpoint) fails here: the empty run is removed
        # rather than left behind as FAILED.
        mlflow.end_run(status="FAILED")
        mlflow.MlflowClient().delete_run(run.info.run_id)
        raise
    mlflow.end_run()
    if args.registered_model_name and args.alias:
        version = info.registered_model_version
        mlflow.MlflowClient().set_registered_model_alias(args.registered_model_name, args.alias, version)
    print(f"logged {bundle} to {uri}")
    _print_table(
        [
            ("run", run.info.run_id),
            ("model uri", info.model_uri),
            ("runs uri", f"runs:/{run.info.run_id}/{args.name}"),
            ("registered", f"models:/{args.registered_model_name}/{info.registered_model_version}"
             if args.registered_model_name else "no"),
        ]
    )
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from mlflow_ptycho_flavor.fetch import fetch_bundle

    if args.tracking_uri:
        _set_tracking(args.tracking_uri)
    fetched = fetch_bundle(args.model_uri, args.to, layout=args.layout)
    print(f"fetched {args.model_uri} -> {fetched.path}")
    _print_table([("bundle", fetched.bundle), ("sha256 (verified)", fetched.sha256), ("bytes", fetched.size_bytes)])
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    # This interpreter's MLflow (never another one found on PATH), with this interpreter's bin folder on PATH so
    # that MLflow finds the uvicorn next to it when the venv is not activated.
    command = [sys.executable, "-m", "mlflow", "models", "serve",
               "-m", args.model_uri, "-h", args.host, "-p", str(args.port), "--env-manager", args.env_manager]
    if args.workers:
        command += ["-w", str(args.workers)]
    print("exec:", " ".join(command), flush=True)
    if args.dry_run:
        return 0
    os.execve(command[0], command, interpreter_env())
    return 0  # pragma: no cover


def cmd_simulate(args: argparse.Namespace) -> int:
    from mlflow_ptycho_flavor.sim.dataset import save_npz
    from mlflow_ptycho_flavor.sim.simulate import simulate_dataset

    _check_output_path("output", args.output)
    dataset = simulate_dataset(N=args.N, nphotons=args.nphotons, seed=args.seed)  # checks sizes before allocating
    save_npz(dataset, args.output)
    print(f"simulated {dataset.n_patterns} patterns of {dataset.N}x{dataset.N} -> {args.output}")
    return 0


def cmd_spark_predict(args: argparse.Namespace) -> int:
    try:
        from mlflow_ptycho_flavor.flavor.spark_job import run_batch_inference
    except ImportError as exc:
        raise CliError(f"spark-predict needs pyspark: pip install 'mlflow-ptycho-flavor[spark]' ({exc})") from exc
    if args.batch_size is not None and args.batch_size < 1:
        raise CliError(f"--batch-size must be a positive integer, got {args.batch_size}")
    stats = run_batch_inference(
        args.model_uri, args.input, args.output, master=args.master, output_format=args.output_format,
        batch_size=args.batch_size, normalize=args.normalize, input_kind=args.input_kind,
        env_manager=args.env_manager, overwrite=args.overwrite,
    )
    _print_table(list(stats.items()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mlflow_ptycho_flavor.demo import run_demo

    summary = run_demo(
        args.out_dir,
        quick=args.quick,
        from_scratch=args.from_scratch,
        steps=args.steps,
        seed=args.seed,
        tracking_uri=args.tracking_uri,
        registered_model_name=args.registered_model_name,
    )
    print()
    print("mlflow-ptycho-flavor demo")
    _print_table(list(summary.items()))
    return 0


# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from mlflow_ptycho_flavor.fetch import FETCH_LAYOUTS

    parser = argparse.ArgumentParser(
        prog="ptycho-flavor",
        description="PtychoPINN PyTorch models (wts.h5.zip) as MLflow models: demo, inspect, predict, convert, log, "
        "serve.",
        epilog="Run 'ptycho-flavor <command> --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    demo = sub.add_parser("demo", help="simulate, log+register a model, reload, stitch, write a PNG (< 1 min)",
                          description="The end-to-end demo: simulate a fresh ptychography scan, take the small "
                          "physics-informed model shipped with the package (trained offline by "
                          "scripts/train_demo_bundle.py on another object; --from-scratch trains one here), log and "
                          "register its wts.h5.zip in MLflow, load it back through mlflow.pyfunc and through the "
                          "standalone zip, reconstruct every position, align the patches' phases, stitch them with "
                          "probe weights, and write a PNG beside the ground truth.")
    demo.add_argument("--out-dir", default="demo_output", help="where the bundle, data and PNG go (default: %(default)s)")
    demo.add_argument("--quick", action="store_true",
                      help="smoke run: an 8x8 scan, and with --from-scratch a few seconds of training")
    demo.add_argument("--from-scratch", action="store_true",
                      help="train a new network on the scan here instead of starting from the shipped bundle")
    demo.add_argument("--steps", type=int, default=None,
                      help="training steps (implies --from-scratch; default: the trainer's preset)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the simulation and training (default: %(default)s)")
    demo.add_argument("--tracking-uri", default=None,
                      help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///<out-dir>/mlflow.db)")
    demo.add_argument("--registered-model-name", default="ptycho-demo", help="registry name (default: %(default)s)")
    demo.set_defaults(func=cmd_demo)

    inspect = sub.add_parser("inspect", help="describe a wts.h5.zip or a logged model",
                             description="Print the manifest, backend, version, the params that drive the "
                             "architecture, the parameter count and whether member hashes verified.")
    inspect.add_argument("target", help="a wts.h5.zip path, a model directory, or a models:/ / runs:/ URI")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=cmd_inspect)

    predict = sub.add_parser("predict", help="reconstruct an NPZ scan (patches or stitched object)",
                             description="Reconstruct a scan stored in upstream's NPZ schema (diff3d amplitudes, "
                             "xcoords, ycoords, probeGuess) or in ptychodus's conventions (integer counts, a "
                             "(modes, N, N) probe, a bad_pixels mask; recognised by any of these, or chosen by the "
                             "--counts/--positions-order/--bad-pixels/--normalization options) with a bundle or a "
                             "logged model. The object is stitched unless --patches-only.")
    predict.add_argument("model", help="a wts.h5.zip path, a model directory, or a models:/ / runs:/ URI")
    predict.add_argument("data", help="NPZ with diff3d (amplitudes, or photon counts), xcoords, ycoords")
    predict.add_argument("-o", "--output", required=True, help="output NPZ (patches, positions, object, coverage)")
    predict.add_argument("--png", default=None, help="also write a PNG of the stitched object")
    stitching = predict.add_mutually_exclusive_group()
    stitching.add_argument("--stitch", action="store_true", help="stitch the patches into the object (the default)")
    stitching.add_argument("--patches-only", action="store_true", help="skip stitching")
    predict.add_argument("--scale", default="dataset",
                         help="input factor: 'dataset' (the normalization factor over the scan, default), 'one', or a number")
    predict.add_argument("--counts", action="store_true",
                         help="diff3d holds photon counts (amplitude = sqrt(counts)); implied when diff3d is integer")
    predict.add_argument("--positions-order", choices=["xy", "yx"], default=None,
                         help="xy: xcoords is the column (ptychodus's export, upstream's schema; default); yx: the "
                         "file's pair is [row, column]")
    predict.add_argument("--bad-pixels", choices=["mask", "inpaint", "ignore"], default=None,
                         help="the file's bad_pixels: mask = set to 0 as ptychodus's export does (default), inpaint = "
                         "mean of valid neighbours (models trained on complete patterns), ignore = keep the values")
    predict.add_argument("--normalization", choices=["upstream", "ptychodus"], default=None,
                         help="convention of --scale dataset: upstream = sqrt((N/2)^2 / mean sum amp^2), what "
                         "bundles are trained with (default); ptychodus = sqrt(N^2 / ...), twice that, as "
                         "ptychodus's torch path computes it")
    predict.add_argument("--batch-size", type=int, default=None, help="patterns per forward pass (default: 16 on CPU, 256 on a GPU)")
    predict.add_argument("--device", default=None, help="'cpu', 'cuda:0' or 'auto' (default: auto)")
    predict.set_defaults(func=cmd_predict)

    convert = sub.add_parser("convert", help="turn a Lightning checkpoint or a TensorFlow archive into a bundle",
                             description="Detect what SRC is and convert it exactly into a standalone PyTorch "
                             "wts.h5.zip: a Lightning checkpoint (.ckpt) of upstream's current training, or a "
                             "TensorFlow PtychoPINN wts.h5.zip (no TensorFlow needed). Anything else is refused "
                             "with one line saying what it is; nothing is written then.")
    convert.add_argument("src", help="the .ckpt file or TensorFlow wts.h5.zip (or a folder holding it)")
    convert.add_argument("dst", help="the bundle to write: out/wts.h5.zip, out/wts.h5, model.zip, or an existing folder")
    convert.add_argument("--intensity-scale", type=float, default=None,
                         help="checkpoints only: the physics scale to record in params.dill (default 1.0; "
                         "a checkpoint does not hold it, and inference does not use it)")
    convert.set_defaults(func=cmd_convert)

    log = sub.add_parser("log", help="log an existing wts.h5.zip into MLflow (optionally register)",
                         description="Log a bundle byte-for-byte as a ptycho_torch MLflow model. A Lightning "
                         "checkpoint or a TensorFlow archive is converted on the way in (the TensorFlow archive "
                         "is also kept in the model, byte for byte).")
    log.add_argument("bundle", help="the wts.h5.zip (or .ckpt / TensorFlow wts.h5.zip) to log")
    log.add_argument("--name", default="model", help="model name inside the run (default: %(default)s)")
    log.add_argument("--registered-model-name", default=None, help="also register under this name")
    log.add_argument("--alias", default=None, help="set this alias on the new version (needs --registered-model-name)")
    log.add_argument("--experiment", default=None, help="experiment name (default: MLflow's default)")
    log.add_argument("--run-name", default=None, help="run name")
    log.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's default)")
    log.set_defaults(func=cmd_log)

    fetch = sub.add_parser("fetch", help="write a logged model's bundle where a consumer expects it (model.zip ...)",
                           description="Download the wts.h5.zip of a logged ptycho_torch model, check it against "
                           "the bundle_sha256 its MLmodel records, and write it atomically: as TO/model.zip (what "
                           "ptychodus's batch mode reads from its input folder), as TO/wts.h5.zip (upstream "
                           "PtychoPINN's name), or as the whole model directory TO. Needs only mlflow-skinny (no "
                           "pandas). A bundle whose hash differs is refused and nothing is written.")
    fetch.add_argument("model_uri", help="models:/name@alias, models:/name/3, runs:/<run_id>/<name>, or a model directory")
    fetch.add_argument("--to", required=True, help="the folder to write into (created when missing)")
    fetch.add_argument("--as", dest="layout", choices=FETCH_LAYOUTS, default="model.zip",
                       help="model.zip (ptychodus, default), wts.h5.zip (upstream), or dir (TO becomes the model "
                       "directory; it must be absent or empty)")
    fetch.add_argument("--tracking-uri", default=None,
                       help="MLflow tracking and registry URI (default: MLflow's, e.g. MLFLOW_TRACKING_URI)")
    fetch.set_defaults(func=cmd_fetch)

    serve = sub.add_parser("serve", help="serve a model with mlflow models serve",
                           description="Hand over to 'mlflow models serve' with --env-manager local. POST "
                           "/invocations with {\"inputs\": [...]} returns {\"predictions\": {\"real\": ..., "
                           "\"imag\": ...}}; params output_format=amp_phase selects amplitude/phase.")
    serve.add_argument("model_uri", help="models:/name@alias, runs:/..., or a model directory")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    serve.add_argument("--port", type=int, default=5000, help="port (default: %(default)s)")
    serve.add_argument("--workers", type=int, default=None, help="server workers")
    serve.add_argument("--env-manager", default="local", choices=["local", "virtualenv", "uv", "conda"],
                       help="environment manager (default: %(default)s)")
    serve.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    serve.set_defaults(func=cmd_serve)

    simulate = sub.add_parser("simulate", help="write a simulated scan as NPZ",
                              description="Simulate a seeded ptychography scan in upstream's NPZ schema.")
    simulate.add_argument("output", help="the NPZ to write")
    simulate.add_argument("--N", type=int, default=64, help="pattern size (default: %(default)s)")
    simulate.add_argument("--nphotons", type=float, default=1e6, help="mean counts per pattern (default: %(default)s)")
    simulate.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    simulate.set_defaults(func=cmd_simulate)

    spark = sub.add_parser("spark-predict", help="batch inference on Spark (NPZ/Parquet in, Parquet out)",
                           description="Run mlflow.pyfunc.spark_udf over an NPZ or Parquet input on a Spark "
                           "session and write Parquet.")
    spark.add_argument("model_uri", help="models:/name@alias, runs:/..., or a model directory")
    spark.add_argument("input", help="NPZ (upstream schema) or Parquet in the documented layout")
    spark.add_argument("output", help="Parquet output")
    spark.add_argument("--master", default=None,
                       help="Spark master of the session started here, e.g. 'local[4]' (default: the master "
                            "spark-submit was given when run under it, else local[*])")
    spark.add_argument("--output-format", default="real_imag", choices=["real_imag", "amp_phase"],
                       help="result columns: real/imag (lossless, default) or amplitude/phase")
    spark.add_argument("--batch-size", type=int, default=None,
                       help="rows per pyfunc call (spark.sql.execution.arrow.maxRecordsPerBatch) and network chunk")
    spark.add_argument("--normalize", default="none", choices=["none", "dataset"],
                       help="dataset: upstream's normalization factor over the whole NPZ (computed on the driver)")
    spark.add_argument("--input-kind", default="amplitude", choices=list(INPUT_KINDS),
                       help="counts: photon counts as ptychodus stores them (whole numbers); intensity: any "
                            "non-negative intensities; both are square-rooted before the network")
    spark.add_argument("--env-manager", default="local", choices=["local", "virtualenv", "uv", "conda"],
                       help="local: executors use this Python environment; otherwise MLflow rebuilds the model's")
    spark.add_argument("--overwrite", action="store_true", help="replace an existing output")
    spark.set_defaults(func=cmd_spark_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ptycho-flavor`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - only user-facing classes are reported; anything else re-raises
        if not _is_user_error(exc):
            raise
        message = getattr(exc, "message", None) or str(exc)
        print(f"error: {message.strip().splitlines()[0] if message.strip() else type(exc).__name__}", file=sys.stderr)
        return EXIT_USAGE


def _is_user_error(exc: BaseException) -> bool:
    """The classes reported as one ``error:`` line. ``MlflowException`` is checked only when MLflow was imported
    (by a command that needed it): a bundle-only command never imports MLflow just to name its error class."""
    if isinstance(exc, (CliError, PtychoFlavorError, FileNotFoundError, IsADirectoryError, PermissionError)):
        return True
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    return mlflow_exceptions is not None and isinstance(exc, mlflow_exceptions.MlflowException)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
