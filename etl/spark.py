"""The Spark session: whatever spark-submit configured, else a local one with the UI, the stage bars and the
JVM's start-up chatter off (Spark's own log lines reach the terminal at SPARK_LOG_LEVEL: none unless
--log-level debug)."""

from __future__ import annotations

import os
import sys
import tempfile

from etl.sources.base import InputError

_OUR_JVM = False  # this process launched the JVM (plain python), rather than spark-submit


def get_spark(app: str = "c2s-corpus", master: str | None = None):
    from pyspark.sql import SparkSession

    # Workers must run this interpreter (the project's venv), also when launched from plain python.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app)
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    from pyspark import SparkConf, SparkContext

    # under spark-submit the driver gets the JVM's gateway port; from plain python, pyspark launches the JVM as
    # a "pyspark-shell", which spark-submit gives master local[*] (no retries) and the stage bars
    global _OUR_JVM
    if SparkContext._gateway is None:
        _OUR_JVM = "PYSPARK_GATEWAY_PORT" not in os.environ
    ours = _OUR_JVM
    if ours and SparkContext._gateway is None and "PYSPARK_SUBMIT_ARGS" not in os.environ:
        os.environ["PYSPARK_SUBMIT_ARGS"] = (f"--driver-java-options -Dlog4j2.configurationFile=file:{_log4j2()} "
                                             "--conf spark.ui.showConsoleProgress=false pyspark-shell")
    # the JVM first: a SparkConf made before it exists has none of spark-submit's settings (its --master
    # would be ignored for local[*]); under spark-submit this connects to the JVM spark-submit started
    SparkContext._ensure_initialized()
    conf = SparkConf()  # picks up spark-submit's settings
    if master or ours or not conf.contains("spark.master"):
        # local[*, 4]: like a cluster, retry a task whose Python worker died (plain local[*] never retries)
        builder = builder.master(master or "local[*,4]")
        builder = builder.config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
    builder = (
        builder.config("spark.python.worker.reuse", "true")
        # a Python worker that dies (a native crash in a reader) reports its Python stack, not a bare EOFException
        .config("spark.python.worker.faulthandler.enabled", conf.get("spark.python.worker.faulthandler.enabled", "true"))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.task.maxFailures", conf.get("spark.task.maxFailures", "4"))
    )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("SPARK_LOG_LEVEL", "WARN"))
    return spark


def _log4j2() -> str:
    """A log4j2 configuration at SPARK_LOG_LEVEL (default OFF; INFO with --log-level debug) to stderr, written once per level: without
    one, the JVM prints its default-profile notice and WARN lines before setLogLevel can act."""
    level = os.environ.get("SPARK_LOG_LEVEL", "OFF").lower()
    path = os.path.join(tempfile.gettempdir(), f"c2s-spark-log4j2-v3-{level}.properties")
    if not os.path.isfile(path):
        text = "\n".join([
            f"rootLogger.level = {level}", "rootLogger.appenderRef.stderr.ref = console",
            "appender.console.type = Console", "appender.console.name = console",
            "appender.console.target = SYSTEM_ERR", "appender.console.layout.type = PatternLayout",
            "appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex",
            # the shell's logger at the root's level: Spark then prints no "Setting default log level" notice
            *(f"logger.{k}.name = {n}\nlogger.{k}.level = {level}" for k, n in (
                ("repl", "org.apache.spark.repl.Main"), ("gateway", "org.apache.spark.api.python.PythonGatewayServer"),
                ("submit", "org.apache.spark.deploy.SparkSubmit"))), ""])
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return path


def task_cores(spark) -> int:
    return int(spark.sparkContext.getConf().get("spark.task.cpus", "1"))


class _ListParam:
    """Accumulator of error messages (the first few are kept)."""

    def zero(self, value):
        return []

    def addInPlace(self, a, b):
        return (a + b)[:10]


PROGRESS_INTERVAL_S = 2.0  # how often the driver looks at a running job


class SparkJob:
    """One Spark action, run with progress logs and with input errors raised on the driver as one line.

    Tasks report an input error by adding its message to `errors` (instead of raising, which Spark would
    retry and wrap in several tracebacks); a monitor thread cancels the job when one arrives. Tasks add the
    cells they finish to `cells`; the monitor logs each finished tenth (or every minute) with cells/s and an
    ETA, as Spark users expect from its console progress.
    """

    def __init__(self, spark, label: str, *, total_cells: int, total_tasks: int, interval_s: float | None = None):
        sc = spark.sparkContext
        self.sc, self.label = sc, label
        self.total_cells, self.total_tasks = max(int(total_cells), 1), max(int(total_tasks), 1)
        self.errors = sc.accumulator([], _ListParam())
        self.cells = sc.accumulator(0)
        self.interval_s = PROGRESS_INTERVAL_S if interval_s is None else interval_s

    def _monitor(self, group: str, stop) -> None:
        import logging
        import time

        log = logging.getLogger("etl")
        t0 = time.monotonic()
        last_share, last_log = -1, t0
        while not stop.wait(self.interval_s):
            if self.errors.value:
                self.sc.cancelJobGroup(group)
                return
            cells = self.cells.value
            share = int(10 * cells / self.total_cells)
            now = time.monotonic()
            if cells and (share > last_share or now - last_log > 60):
                rate = cells / (now - t0)
                eta = (self.total_cells - cells) / rate if rate > 0 else float("inf")
                log.info("%s: %d%% (%s of %s cells), %s cells/s, ETA %s", self.label, 100 * cells // self.total_cells,
                         f"{cells:,}", f"{self.total_cells:,}", f"{rate:,.0f}", _duration(eta))
                last_share, last_log = share, now

    def run(self, action):
        """Run `action()` (the Spark action) in a job group; returns its result, or raises the first input error."""
        import threading
        import uuid

        group = f"c2s-{self.label}-{uuid.uuid4().hex[:8]}"
        self.sc.setJobGroup(group, self.label)
        import logging
        import time

        stop = threading.Event()
        monitor = threading.Thread(target=self._monitor, args=(group, stop), name="spark-progress", daemon=True)
        t0 = time.monotonic()
        monitor.start()
        try:
            result = action()
        except Exception:
            if self.errors.value:
                raise InputError(self.errors.value[0]) from None
            raise
        finally:
            stop.set()
            monitor.join(timeout=5)
            self.sc.setLocalProperty("spark.jobGroup.id", None)
        if self.errors.value:
            raise InputError(self.errors.value[0])
        took = time.monotonic() - t0
        logging.getLogger("etl").info("%s: done, %s cells in %s (%s cells/s)", self.label, f"{self.cells.value:,}",
                                      _duration(took), f"{self.cells.value / max(took, 1e-9):,.0f}")
        return result


def _duration(s: float) -> str:
    if s == float("inf"):
        return "?"
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")
