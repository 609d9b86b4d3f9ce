"""Spark batch inference (``mlflow_ptycho_flavor.flavor.spark``) on a local ``local[2]`` session.

Every Spark result is checked against in-process pyfunc predictions of the same saved model. One module-scoped
SparkSession (UI off, bound to 127.0.0.1, scratch dirs under tmp) serves all tests; the network is the
cheapest N=64 configuration (n_filters_scale=1, no CBAM, object_big/probe_big off) with He-scaled conv weights,
so that different inputs give clearly different outputs.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyspark", reason="pyspark is not installed (pip install 'mlflow-ptycho-flavor[spark]')")
if shutil.which("java") is None:
    pytest.skip("Spark needs a Java runtime (java is not on PATH)", allow_module_level=True)

import torch  # noqa: E402

from mlflow_ptycho_flavor import cli  # noqa: E402
from mlflow_ptycho_flavor.flavor import spark as ptycho_spark  # noqa: E402
from mlflow_ptycho_flavor.flavor.spark_job import run_batch_inference  # noqa: E402
from mlflow_ptycho_flavor.errors import PredictionInputError  # noqa: E402
from mlflow_ptycho_flavor.model.inference import encode_output  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

N = 64
M = 300
ATOL = 1e-6  # exact on CPU in practice; the bound leaves room for a different conv algorithm per batch size


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    session = ptycho_spark.local_spark_session(
        "local[2]", tmp_dir=tmp_path_factory.mktemp("spark"), log_level="ERROR"
    )
    yield session
    session.stop()


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory):
    from mlflow_ptycho_flavor.flavor import save_model
    from mlflow_ptycho_flavor.network import NetworkConfig, PtychoPINNNetwork

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = PtychoPINNNetwork(
            NetworkConfig(N=N, n_filters_scale=1, cbam_encoder=False, object_big=False, probe_big=False)
        ).eval()
    with torch.no_grad():
        for tensor in network.state_dict().values():
            if tensor.is_floating_point() and tensor.dim() >= 3:
                tensor.mul_(math.sqrt(6.0))
    path = tmp_path_factory.mktemp("model") / "model"
    save_model(network, path)
    return str(path)


@pytest.fixture(scope="module")
def pyfunc_model(model_uri):
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(model_uri)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(7)
    amplitudes = (3.0 * rng.random((M, N, N))).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, M)
    return amplitudes, scale


@pytest.fixture(scope="module")
def reference(pyfunc_model, inputs):
    """In-process pyfunc predictions, complex64 (M, 1, N, N)."""
    amplitudes, scale = inputs
    result = pyfunc_model.predict({"diffraction": amplitudes, "scale": scale})
    assert result.dtype == np.complex64 and result.shape == (M, 1, N, N)
    assert np.abs(result[0] - result[1]).max() > 1e-3  # inputs matter: an order mix-up would show
    return result


def _close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_udf_matches_in_process_predictions(spark, model_uri, inputs, reference):
    from pyspark.sql import functions as F

    amplitudes, scale = inputs
    df = spark.createDataFrame(
        ptycho_spark._arrow_table(amplitudes[:, None], {"scale": scale})
    )
    assert df.rdd.getNumPartitions() == 2
    udf = ptycho_spark.spark_udf(spark, model_uri)
    table = (
        df.withColumn("prediction", udf(ptycho_spark.model_input(df)))
        .select("index", F.col("prediction.real").alias("real"), F.col("prediction.imag").alias("imag"))
        .toArrow()
    )
    index = table.column("index").to_numpy()
    assert sorted(index) == list(range(M))
    real = np.stack(table.column("real").to_numpy(zero_copy_only=False))
    imag = np.stack(table.column("imag").to_numpy(zero_copy_only=False))
    assert real.dtype == np.float32 and real.shape == (M, N * N)
    want = reference[index].reshape(M, -1)
    np.testing.assert_allclose(real, want.real, rtol=0, atol=ATOL)
    np.testing.assert_allclose(imag, want.imag, rtol=0, atol=ATOL)


def test_spark_predict_numpy_returns_input_order(spark, model_uri, inputs, reference):
    amplitudes, scale = inputs
    order = np.random.default_rng(1).permutation(M)[:48]
    before = spark.conf.get(ptycho_spark.ARROW_BATCH_CONF)
    # repartition shuffles rows across 3 partitions; batch_size=16 bounds each pyfunc call
    got = ptycho_spark.spark_predict(
        spark, model_uri, amplitudes[order], scale=scale[order], batch_size=16, num_partitions=3
    )
    _close(got, reference[order])
    assert spark.conf.get(ptycho_spark.ARROW_BATCH_CONF) == before  # restored


def test_spark_predict_dataframe_amp_phase(spark, model_uri, inputs, reference):
    amplitudes, scale = inputs
    rows = 24
    x, y = np.arange(rows) * 2.5, np.arange(rows) * -1.0
    df = spark.createDataFrame(
        ptycho_spark._arrow_table(amplitudes[:rows, None], {"scale": scale[:rows], "x": x, "y": y})
    ).withColumnRenamed("index", "pattern")
    out = ptycho_spark.spark_predict(spark, model_uri, df, output_format="amp_phase")
    assert out.schema["prediction"].dataType.simpleString() == ptycho_spark.AMP_PHASE_RESULT_TYPE
    table = out.select("pattern", "x", "y", "prediction.amplitude", "prediction.phase").toArrow()
    pattern = table.column("pattern").to_numpy()
    want = encode_output(reference[pattern], "amp_phase")
    np.testing.assert_array_equal(table.column("x").to_numpy(), x[pattern])
    np.testing.assert_array_equal(table.column("y").to_numpy(), y[pattern])
    for name in ("amplitude", "phase"):
        got = np.stack(table.column(name).to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(got, want[name].reshape(rows, -1), rtol=0, atol=ATOL)


def test_plain_mlflow_spark_udf_resolves_auto_to_real_imag(spark, model_uri, inputs, reference):
    """Without params the pyfunc sees output_format='auto' and, inside a Spark task, answers real/imag.

    Positional UDF arguments reach the model as columns "0" (diffraction) and "1" (scale).
    """
    import mlflow.pyfunc

    amplitudes, scale = inputs
    df = spark.createDataFrame(ptycho_spark._arrow_table(amplitudes[:8, None], {"scale": scale[:8]}))
    udf = mlflow.pyfunc.spark_udf(spark, model_uri, result_type=ptycho_spark.REAL_IMAG_RESULT_TYPE)
    table = df.select("index", udf("diffraction", "scale").alias("p")).select("index", "p.real", "p.imag").toArrow()
    want = reference[table.column("index").to_numpy()].reshape(8, -1)
    for name, part in (("real", want.real), ("imag", want.imag)):
        got = np.stack(table.column(name).to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(got, part, rtol=0, atol=ATOL)


def test_batch_inference_npz_to_parquet(spark, model_uri, pyfunc_model, inputs, tmp_path, capsys):
    import pyarrow.parquet as pq

    from mlflow_ptycho_flavor.sim.dataset import PtychoDataset, save_npz

    amplitudes, _ = inputs
    rng = np.random.default_rng(3)
    dataset = PtychoDataset(
        diff3d=amplitudes[-20:] * 40.0,  # not normalized: normalize='dataset' brings it back to scale
        xcoords=rng.uniform(40, 80, 20),
        ycoords=rng.uniform(40, 80, 20),
        probeGuess=np.ones((N, N), np.complex64),
    )
    save_npz(dataset, tmp_path / "scan.npz")
    output = tmp_path / "out.parquet"
    code = cli.main(
        [
            "spark-predict", model_uri, str(tmp_path / "scan.npz"), str(output),
            "--master", "local[2]", "--batch-size", "8", "--normalize", "dataset",
        ]
    )
    assert code == 0
    report = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if line.strip())
    assert report["n_patterns"] == "20" and report["N"] == str(N) and report["C"] == "1"
    assert report["input_format"] == "npz" and report["master"] == "local[2]"  # the running session was used
    table = pq.read_table(output).sort_by("index")
    assert table.column_names == ["index", "x", "y", "scan_index", "scale", "real", "imag"]
    np.testing.assert_array_equal(table.column("index").to_numpy(), np.arange(20))
    np.testing.assert_array_equal(table.column("x").to_numpy(), dataset.xcoords)
    want = pyfunc_model.predict(dataset.diff3d, params={"normalize": "dataset"}).reshape(20, -1)
    for name, part in (("real", want.real), ("imag", want.imag)):
        got = np.stack(table.column(name).to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(got, part, rtol=0, atol=ATOL)
    with pytest.raises(FileExistsError):
        run_batch_inference(model_uri, tmp_path / "scan.npz", output, spark=spark)


def test_batch_inference_takes_photon_counts_from_the_command_line(spark, model_uri, pyfunc_model, inputs, tmp_path):
    """``spark-predict --input-kind counts``: ptychodus-style whole-number counts, square-rooted in the UDF, give
    what the pyfunc model gives for the same counts."""
    import pyarrow.parquet as pq

    from mlflow_ptycho_flavor.sim.dataset import PtychoDataset, save_npz

    amplitudes, _ = inputs
    counts = np.rint((amplitudes[:10] * 6.0) ** 2).astype(np.float32)
    dataset = PtychoDataset(diff3d=counts, xcoords=np.arange(10.0), ycoords=np.arange(10.0),
                            probeGuess=np.ones((N, N), np.complex64))
    save_npz(dataset, tmp_path / "counts.npz")
    output = tmp_path / "out.parquet"
    assert cli.main(["spark-predict", model_uri, str(tmp_path / "counts.npz"), str(output), "--master", "local[2]",
                     "--input-kind", "counts"]) == 0
    table = pq.read_table(output).sort_by("index")
    want = pyfunc_model.predict(counts, params={"input_kind": "counts"}).reshape(10, -1)
    for name, part in (("real", want.real), ("imag", want.imag)):
        np.testing.assert_allclose(np.stack(table.column(name).to_numpy(zero_copy_only=False)), part, rtol=0, atol=ATOL)


def test_batch_inference_parquet_layout(spark, model_uri, inputs, reference, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    amplitudes, scale = inputs
    rows = 12
    table = pa.table(
        {
            "id": pa.array([f"p{i}" for i in range(rows)]),
            "diffraction": pa.array(list(amplitudes[:rows].reshape(rows, -1)), type=pa.list_(pa.float32())),
            "scale": pa.array(scale[:rows]),
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    stats = run_batch_inference(
        model_uri, tmp_path / "in.parquet", tmp_path / "out.parquet", output_format="amp_phase", spark=spark
    )
    assert stats["n_patterns"] == rows and stats["columns"] == ["id", "scale", "amplitude", "phase"]
    out = pq.read_table(tmp_path / "out.parquet")
    order = [int(name[1:]) for name in out.column("id").to_pylist()]
    want = encode_output(reference[order], "amp_phase")
    for name in ("amplitude", "phase"):
        got = np.stack(out.column(name).to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(got, want[name].reshape(rows, -1), rtol=0, atol=ATOL)


def test_refused_inputs(spark, model_uri, inputs, tmp_path):
    amplitudes, _ = inputs
    with pytest.raises(PredictionInputError, match="complex numbers cannot cross Arrow"):
        ptycho_spark.spark_udf(spark, model_uri, output_format="complex")
    with pytest.raises(PredictionInputError, match="stitch"):
        ptycho_spark.spark_udf(spark, model_uri, params={"stitch": True})
    with pytest.raises(PredictionInputError, match="normalize='dataset'"):
        ptycho_spark.spark_udf(spark, model_uri, params={"normalize": "dataset"})
    with pytest.raises(TypeError, match="result_type"):
        ptycho_spark.spark_udf(spark, model_uri, result_type="double")
    with pytest.raises(PredictionInputError, match="C=1, N=64"):
        ptycho_spark.spark_predict(spark, model_uri, np.zeros((2, 32, 32), np.float32))
    with pytest.raises(PredictionInputError, match="dtype"):
        ptycho_spark.spark_predict(spark, model_uri, np.zeros((2, N, N), np.complex64))
    with pytest.raises(PredictionInputError, match="`diffraction` column"):
        ptycho_spark.spark_predict(spark, model_uri, spark.createDataFrame([(1.0,)], "scale double"))
    with pytest.raises(PredictionInputError, match="array<float>"):
        ptycho_spark.spark_predict(spark, model_uri, spark.createDataFrame([("a",)], "diffraction string"))
    assert ptycho_spark.spark_predict(spark, model_uri, amplitudes[:0]).shape == (0, 1, N, N)
    with pytest.raises(PredictionInputError, match=".npz"):
        (tmp_path / "data.csv").write_text("x")
        run_batch_inference(model_uri, tmp_path / "data.csv", tmp_path / "o", spark=spark)
