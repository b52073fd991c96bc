"""The config file contract: defaults, durations, and errors that name file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from discoveryd import config
from discoveryd.config import ConfigError, parse_duration, split_hostport


def load_text(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "discoveryd.yaml"
    path.write_text(text)
    return config.load(path)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text)
    return err.value.problems


def test_empty_file_gives_the_documented_defaults(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "")
    assert cfg.registries == ()
    assert cfg.xds.listen == "127.0.0.1:15010"
    assert cfg.xds.debounce_after == pytest.approx(0.1)
    assert cfg.xds.debounce_max == pytest.approx(1.0)
    assert cfg.dns.listen == ["127.0.0.1:15053"]
    assert cfg.dns.ttl == 30.0 and cfg.dns.forward == [] and cfg.dns.zones == []
    assert cfg.admin.listen == "127.0.0.1:15014"
    assert cfg.base_dir == tmp_path


def test_the_embedded_default_config_is_valid() -> None:
    cfg = config.load(Path(__file__).parents[2] / "config" / "discoveryd.yaml")
    assert [r.source for r in cfg.registries] == ["files/local"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("100ms", 0.1), ("5s", 5.0), ("1m", 60.0), ("1h", 3600.0), ("2", 2.0), (1.5, 1.5), ("0.5s", 0.5)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["soon", "5 parsecs", "-1s", -3, True, None])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("127.0.0.1:53", ("127.0.0.1", 53)), ("[::1]:15053", ("::1", 15053)), ("localhost:1", ("localhost", 1))],
)
def test_hostport(value: str, expected: tuple[str, int]) -> None:
    assert split_hostport(value) == expected


def test_listen_addresses_may_take_port_zero_and_adapters_share_the_parser() -> None:
    import adapters.toolkit.hostport
    import adapters.toolkit.location
    import discoveryd.hostport
    import discoveryd.location

    assert split_hostport("127.0.0.1:0") == ("127.0.0.1", 0)  # listen: the system picks the port
    with pytest.raises(ValueError, match="1-65535"):
        discoveryd.hostport.split_hostport("127.0.0.1:0")  # an address to connect to needs a real one
    with pytest.raises(ValueError, match="only an IPv6 address"):
        split_hostport("[name]:53")
    assert adapters.toolkit.hostport.split_hostport is discoveryd.hostport.split_hostport
    assert adapters.toolkit.location.yaml_line is discoveryd.location.yaml_line


def test_unknown_key_names_the_key_and_line(tmp_path: Path) -> None:
    out = problems(tmp_path, "xds:\n  listen: 127.0.0.1:15010\n  debounce: 1s\n")
    assert out == [f"{tmp_path / 'discoveryd.yaml'}:3: xds.debounce: unknown key"]


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, "dns:\n  listen: [127.0.0.1:15053]\n  ttl: forever\n")
    assert line.startswith(f"{tmp_path / 'discoveryd.yaml'}:3: dns.ttl: ")
    assert "'forever' is not a duration" in line


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    out = problems(tmp_path, "dns:\n  ttl: x\n  forward: [not-an-ip]\nadmin:\n  listen: nope\n")
    keys = sorted(p.split(": ")[1] for p in out)
    assert keys == ["admin.listen", "dns.forward[0]", "dns.ttl"]


def test_unknown_registry_kind(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, "registries:\n  - kind: zookeeper\n    name: zk\n")
    assert ":2: registries[0].kind: unknown registry kind 'zookeeper'" in line
    assert "files" in line  # the installed kinds are listed


def test_registry_keys_are_validated_by_the_adapter_model(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, "registries:\n  - kind: files\n    name: a\n    paths: [x/]\n    colour: blue\n")
    assert line.endswith(":5: registries[0].colour: unknown key")


def test_duplicate_registry(tmp_path: Path) -> None:
    text = "registries:\n  - {kind: files, name: a, paths: [x]}\n  - {kind: files, name: a, paths: [y]}\n"
    (line,) = problems(tmp_path, text)
    assert ":3: registries[1].name: files/a is already defined by registries[0]" in line


def test_invalid_yaml_points_at_the_line(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, "xds:\n  listen: [unclosed\n")
    assert line.startswith(f"{tmp_path / 'discoveryd.yaml'}:")
    assert "invalid YAML" in line


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(tmp_path / "nope.yaml")
    assert "nope.yaml: cannot read" in err.value.problems[0]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert problems(tmp_path, "- a\n- b\n") == [
        f"{tmp_path / 'discoveryd.yaml'}:1: the config must be a mapping of sections"
    ]
