"""The Spark session: whatever spark-submit configured, else a local one with the UI off."""

from __future__ import annotations

import os
import sys


def get_spark(app: str = "c2s-corpus", master: str | None = None):
    from pyspark.sql import SparkSession

    # Workers must run this interpreter (the project's venv), also when launched from plain python.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app)
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    from pyspark import SparkConf

    conf = SparkConf()  # picks up spark-submit's settings
    if master or not conf.contains("spark.master"):
        builder = builder.master(master or "local[*]")
        builder = builder.config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
    builder = (
        builder.config("spark.python.worker.reuse", "true")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.task.maxFailures", conf.get("spark.task.maxFailures", "4"))
    )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("SPARK_LOG_LEVEL", "WARN"))
    return spark


def task_cores(spark) -> int:
    return int(spark.sparkContext.getConf().get("spark.task.cpus", "1"))
