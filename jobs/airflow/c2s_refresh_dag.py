"""Airflow: the weekly incremental refresh as a SparkSubmitOperator task (apache-airflow-providers-apache-spark).

Copy into the DAGs folder; the `spark_default` connection names the cluster (spark://host:7077, yarn or
k8s://...). Executors get the project as the zip `make pyfiles` builds (or run the ETL image). The Airflow
worker runs spark-submit, so it needs Java 17 and the project's dependencies (client deploy mode: the driver
runs there too, and the task log ends with the refresh's JSON line; in cluster deploy mode that line is in the
driver's log instead).
"""

from __future__ import annotations

import pendulum
from airflow import DAG
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

C2S = "/opt/c2s"  # where the project (and dist/c2s_corpus.zip) lives on the Airflow worker

with DAG(
    dag_id="c2s_corpus_refresh",
    schedule="0 3 * * 1",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one build per corpus directory at a time
    tags=["c2s", "corpus"],
) as dag:
    SparkSubmitOperator(
        task_id="refresh",
        application=f"{C2S}/jobs/refresh.py",
        py_files=f"{C2S}/dist/c2s_corpus.zip",
        conn_id="spark_default",
        application_args=[
            "--census-version", "stable", "--organisms", "homo_sapiens", "--obs-filter", "is_primary_data == True",
            "--output-dir", "s3://my-bucket/c2s/corpus", "--keep-versions", "4",
        ],
        conf={"spark.executorEnv.NUMBA_CACHE_DIR": "/tmp/numba-cache", "spark.task.maxFailures": "4"},
        executor_cores=4,
        executor_memory="16g",
        driver_memory="8g",
        retries=1,
    )
