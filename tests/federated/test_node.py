"""The node side's own checks (no coordinator, no Flower run)."""

import pytest


def test_round_urls_only_where_the_coordinator_points():
    from contributor_client.flower import same_origin

    mine = {"model.safetensors": "http://127.0.0.1:9/objects/a?sig=1", "config.json": "http://127.0.0.1:9/objects/b"}
    given = {"model.safetensors": "http://127.0.0.1:9/objects/a?sig=2", "config.json": "http://10.0.0.1/internal"}
    got = same_origin(given, mine)
    assert got == {"model.safetensors": given["model.safetensors"], "config.json": mine["config.json"]}


def test_node_config_problems_are_named(tmp_path):
    from flwr.app import Context, RecordDict

    from contributor_client.flower import NodeConfigError, data_size, node_settings

    def ctx(**nc):
        return Context(run_id=1, node_id=1, node_config=nc, state=RecordDict(), run_config={})

    with pytest.raises(NodeConfigError, match="domain"):
        node_settings(ctx())
    with pytest.raises(NodeConfigError, match="does not exist"):
        node_settings(ctx(domain="go", **{"data-dir": str(tmp_path / "nope")}))
    (tmp_path / "go").mkdir()
    (tmp_path / "go" / "train.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    with pytest.raises(NodeConfigError, match="token-file"):
        node_settings(ctx(domain="go", **{"data-dir": str(tmp_path / "go"), "token-file": str(tmp_path / "t")}))
    (tmp_path / "t").write_text("elf_secret\n")
    n = node_settings(ctx(domain="go", **{"data-dir": str(tmp_path / "go"), "token-file": str(tmp_path / "t"),
                                          "coordinator-url": "http://127.0.0.1:1", "max-steps": 5}))
    assert n.token == "elf_secret" and n.max_steps == 5 and n.url == "http://127.0.0.1:1"
    assert data_size(n.data) == (2, (tmp_path / "go" / "train.jsonl").stat().st_size)
