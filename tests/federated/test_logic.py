"""The round's decisions as plain functions: who trains, retries, time-outs, the status."""

from coordinator.federated import logic
from coordinator.federated.logic import DomainHistory, NodeReport

DOMAINS = {"python": None, "go": None, "bible": None, "old": "the domain is retired"}


def test_plan_one_node_per_new_domain_and_reasons_for_the_rest():
    reports = [
        NodeReport("1", domain="python", data_bytes=100),
        NodeReport("2", domain="python", data_bytes=500),  # more data: this one trains python
        NodeReport("3", domain="go", data_bytes=10),
        NodeReport("4", domain="bible"),  # bible already has a live ELM
        NodeReport("5", domain="old"),  # retired
        NodeReport("6", domain="unknown"),
        NodeReport("7", replied=False, error="no answer within 5 s"),
        NodeReport("8", domain="go", error="ClientError: token revoked"),
        NodeReport("9"),  # no domain in its node config
    ]
    hist = {"bible": DomainHistory(done="contribution 3 is evaluated"), "go": DomainHistory(failures=1)}
    d = logic.plan(reports, hist, DOMAINS, max_attempts=3)
    assert {n for n, x in d.items() if x.trains} == {"2", "3"}
    assert d["2"].attempt == 1 and d["3"].attempt == 2  # go failed once before: this is its retry
    assert d["1"].status == "skipped" and "node 2" in d["1"].reason
    assert d["4"].status == "skipped" and "contribution 3" in d["4"].reason
    assert d["5"].status == "skipped" and "retired" in d["5"].reason
    assert d["6"].status == "skipped" and "not registered" in d["6"].reason
    assert d["7"].status == "timed_out"
    assert d["8"].status == "failed" and "token revoked" in d["8"].reason
    assert d["8"].attempt == 2 and not d["8"].trains  # counts as go's second failed attempt
    assert d["9"].status == "failed" and "domain" in d["9"].reason


def test_a_domain_that_keeps_failing_is_no_longer_asked():
    r = [NodeReport("1", domain="go")]
    assert logic.plan(r, {"go": DomainHistory(failures=2)}, DOMAINS, 3)["1"].attempt == 3
    d = logic.plan(r, {"go": DomainHistory(failures=3)}, DOMAINS, 3)["1"]
    assert not d.trains and "3 rounds in a row" in d.reason


def test_outcomes_of_replies():
    assert logic.outcome(None, "result", 30).status == "timed_out"
    assert logic.outcome("the node's ClientApp failed", "result", 30).status == "failed"
    assert logic.outcome({"other": {}}, "result", 30).status == "failed"
    o = logic.outcome({"result": {"ok": False, "error": "DataError: bad\x00line"}}, "result", 30)
    assert o.status == "failed" and o.error == "DataError: bad line"
    o = logic.outcome({"result": {"ok": True, "contribution-id": 7}}, "result", 30)
    assert o.ok and logic.contribution_id(o) == 7
    # ids must be sane integers, whatever a node sends
    for bad in (-1, True, 1.5, "7", 2**70, float("nan")):
        assert logic.contribution_id(logic.outcome({"result": {"ok": True, "contribution-id": bad}}, "result", 1)) is None
    assert logic.train_metrics({"metrics": {"loss": 2.5, "bad": float("inf"), "x": "s"}}) == {"loss": 2.5}
    rep = logic.node_report("5", {"node": {"ok": True, "domain": "Not A Domain!", "documents": 3}}, 10)
    assert rep.domain is None and rep.documents == 3


def test_round_status():
    S, F, T, K = "submitted", "failed", "timed_out", "skipped"
    assert logic.final_status([S, S, K]) == "succeeded"
    assert logic.final_status([S, F, T]) == "partial"
    assert logic.final_status([S, K, T]) == "partial"  # a node silent at the query is a failure too
    assert logic.final_status([F, T]) == "failed"
    assert logic.final_status([K]) == "empty"
    assert logic.final_status([], error="no Flower node connected") == "failed"
    assert logic.final_status([S], cancelled=True) == "cancelled"
    assert logic.final_status([S, F], error="boom") == "partial"  # what arrived is kept


def test_elm_names_avoid_names_in_use():
    assert logic.elm_name("go", 4, set()) == "go"
    assert logic.elm_name("go", 4, {"go"}) == "go-r4"
    assert logic.elm_name("go", 4, {"go", "go-r4"}) == "go-r4-2"


def test_config_round_trip_and_train_record():
    c = logic.RoundConfig.from_dict({"steps": 12, "unknown": 1, "lr": None})
    assert c.steps == 12 and c.lr == 5e-4
    assert logic.RoundConfig.from_dict(c.to_dict()) == c
    from coordinator.federated.protocol import TRAIN_KEYS

    assert tuple(c.train_record()) == TRAIN_KEYS
    # the node reads back the TrainConfig the coordinator meant: one object on both sides
    from btm.train import TrainConfig

    sent = logic.RoundConfig.from_dict({"steps": 40, "batch_size": 8, "block_size": 64, "lr": 1e-3}).train_record()
    got = TrainConfig.from_record(sent, progress=False)
    assert (got.steps, got.batch_size, got.block_size, got.lr, got.warmup, got.precision) == (
        40, 8, 64, 1e-3, TrainConfig.warmup, "auto")
    assert TrainConfig.from_record({"steps": "5", "lr": "0.01"}) == TrainConfig(steps=5, lr=0.01)  # wire strings cast


def test_client_and_server_speak_the_same_protocol():
    from contributor_client import flower
    from coordinator.federated import protocol as p

    assert (flower.NODE, flower.BRANCH, flower.INIT, flower.TRAIN, flower.RESULT, flower.METRICS) == (
        p.NODE, p.BRANCH_REC, p.INIT, p.TRAIN_REC, p.RESULT, p.METRICS)
    handlers = set(flower.app._registered_funcs)  # what the ClientApp answers to
    assert {"query.default", "query.branch", "train.default"} <= handlers
    assert {p.QUERY + ".default", p.BRANCH, p.TRAIN + ".default"} <= handlers
