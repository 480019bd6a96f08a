"""One settings table feeds flags, env and YAML; unknown keys and bad values are clear errors."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from flexcache.daemon.config import (
    CONFIG_FILE,
    OPTIONS,
    ConfigError,
    add_flags,
    from_args,
    markdown_table,
    parse_size,
    resolve,
    service_links,
)
from flexcache.daemon.metrics import Metrics
from flexcache.daemon.steps import StepTable


def test_defaults() -> None:
    config = resolve(env={})
    assert config.max_bytes == 10 << 30 and config.eviction_policy == "utility" and config.index_backend == "edge"
    assert config.skip_thresholds[0] == (0.95, 0.5)


def test_precedence_yaml_then_env_then_flags() -> None:
    yaml_values = {"max_bytes": "1GiB", "eviction_policy": "lru", "workers": 4}
    env = {"FLEXCACHE_MAX_BYTES": "2GiB", "FLEXCACHE_WORKERS": "8"}
    config = resolve(yaml_values, env, {"workers": "2", "max_bytes": None})
    assert (config.max_bytes, config.eviction_policy, config.workers) == (2 << 30, "lru", 2)


@pytest.mark.parametrize(("layer", "values", "message"), [
    ("yaml", {"max_byte": "1GiB"}, "config file: unknown setting 'max_byte'"),
    ("env", {"FLEXCACHE_MAXBYTES": "1"}, "environment: unknown setting FLEXCACHE_MAXBYTES"),
    ("yaml", {"max_bytes": "lots"}, "max_bytes: not a size"),
    ("yaml", {"eviction_policy": "fifo"}, "eviction_policy must be one of lru, lcbfu, utility"),
    ("env", {"FLEXCACHE_FSYNC": "maybe"}, "FLEXCACHE_FSYNC: fsync: not a boolean"),
    ("yaml", {"low_watermark": 0.99, "high_watermark": 0.9}, "low_watermark <= high_watermark"),
    ("yaml", {"skip_thresholds": "0.9"}, "expected similarity:fraction"),
    ("yaml", {"skip_thresholds": "0.95:0.1,0.9:0.4"}, "similarity 0.95 grants less than 0.9"),
    ("yaml", {"skip_thresholds_by_namespace": {"*/wan*": "0.9:2"}}, "[*/wan*]"),
    ("yaml", {"index_backend": "qdrant"}, "needs qdrant_url"),
    ("env", {"FLEXCACHE_UTILITY_HALF_LIFE": "0"}, "utility_half_life must be positive"),
    ("yaml", {"utility_prior_steps": -1}, "utility_prior_steps must be at least 0"),
])
def test_errors(layer: str, values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(values, {}) if layer == "yaml" else resolve(None, values)
    assert message in str(info.value)


def test_kubernetes_service_links_are_not_typos() -> None:
    env = {"FLEXCACHE_SERVICE_HOST": "10.0.0.1", "FLEXCACHE_SERVICE_PORT": "50051",
           "FLEXCACHE_SERVICE_PORT_GRPC": "50051", "FLEXCACHE_PORT": "tcp://10.0.0.1:50051",
           "FLEXCACHE_PORT_50051_TCP": "tcp://10.0.0.1:50051", "FLEXCACHE_PORT_50051_TCP_ADDR": "10.0.0.1",
           "FLEXCACHE_METRICS_SERVICE_HOST": "10.0.0.2", "FLEXCACHE_WORKERS": "3"}
    assert resolve(None, env).workers == 3
    with pytest.raises(ConfigError, match="FLEXCACHE_METRICS_PORT"):
        resolve(None, {"FLEXCACHE_METRICS_PORT": "9464"})  # a plausible typo, not a service link
    assert service_links(env) == sorted(set(env) - {"FLEXCACHE_WORKERS"})


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return parser.parse_args(argv)


def test_config_file_from_flag_or_env(tmp_path: Path) -> None:
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("eviction_policy: lru\n")
    second.write_text("eviction_policy: lcbfu\n")
    assert from_args(serve_args(), {"FLEXCACHE_CONFIG": str(first)}).eviction_policy == "lru"
    assert from_args(serve_args("--config", str(second)), {"FLEXCACHE_CONFIG": str(first)}).eviction_policy == "lcbfu"
    assert from_args(serve_args("--config", ""), {"FLEXCACHE_CONFIG": str(first)}).eviction_policy == "utility"
    assert from_args(serve_args(), {"FLEXCACHE_CONFIG": ""}).eviction_policy == "utility"
    assert from_args(serve_args(), {}).eviction_policy == "utility"


def test_config_file_row_in_the_table() -> None:
    (row,) = [line for line in markdown_table().splitlines() if line.startswith("| `config` ")]
    assert f"`{CONFIG_FILE.flag}` | `{CONFIG_FILE.env}`" in row


def test_thresholds_per_namespace_glob() -> None:
    config = resolve({"skip_thresholds_by_namespace": {"*/wan2.1-*/*": "0.97:0.4"}}, {})
    table = StepTable(config.skip_thresholds, config.skip_thresholds_by_namespace)
    assert table.granted_steps(0.96, 50, "acme/wan2.1-14b/832x480x81/flow/50") == 0
    assert table.granted_steps(0.98, 50, "acme/wan2.1-14b/832x480x81/flow/50") == 20
    assert table.granted_steps(0.96, 50, "acme/hunyuan/1280x720x129/flow/50") == 25
    assert table.granted_steps(0.96, 1, "acme/hunyuan/1280x720x129/flow/1") == 0  # nothing left to skip


def test_sizes() -> None:
    assert parse_size("512MiB") == 512 << 20 and parse_size("2GB") == 2_000_000_000 and parse_size(4096) == 4096
    with pytest.raises(ValueError):
        parse_size("-1")


def test_readme_tables_are_current() -> None:
    table = markdown_table()
    for option in OPTIONS:
        assert f"`{option.env}`" in table
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert table in readme, "README's settings table is stale: regenerate with `flexcache config-table`"
    assert Metrics().markdown_table() in readme, "README's metrics table is stale: `flexcache metrics-table`"


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flexcache.daemon.cli", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_cli_rejects_bad_config_with_a_sentence(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_bytes: 1GiB\nevict_policy: lru\n")
    result = run_cli("serve", "--config", str(bad), "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == "flexcache serve: config file: unknown setting 'evict_policy'"
    result = run_cli("serve", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "cannot read config file" in result.stderr
    result = run_cli("serve", "--max-byte", "1GiB")  # abbreviations would hide typos
    assert result.returncode == 2 and "unrecognized arguments: --max-byte" in result.stderr


def test_cli_port_in_use(daemon, tmp_path: Path) -> None:  # more in test_cli.py
    result = run_cli("serve", "--data-dir", str(tmp_path / "second"), "--listen", daemon.target,
                     "--metrics-listen", "")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"flexcache serve: cannot listen on {daemon.target}: the address is in use " \
                                    "(is another daemon running?)"


def test_cli_stats(daemon, tmp_path: Path) -> None:
    result = run_cli("stats", "--target", daemon.target, "--json")
    assert result.returncode == 0 and '"evictionPolicy": "utility"' in result.stdout
    dead = run_cli("stats", "--target", "127.0.0.1:1", "--timeout", "1")
    assert dead.returncode == 1 and dead.stderr.startswith("flexcache stats: 127.0.0.1:1: UNAVAILABLE")
