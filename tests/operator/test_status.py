from kvfabric.operator.reconcile import _merge_conditions, pool_status


def conds(status: dict) -> dict:
    return {c["type"]: c for c in status["conditions"]}


def test_status_follows_the_daemonset() -> None:
    s = pool_status({"desiredNumberScheduled": 3, "numberReady": 3}, 4, 1 << 30)
    assert (s["nodesDesired"], s["nodesReady"], s["capacity"]) == (3, 3, str(3 << 30))
    assert conds(s)["Ready"]["status"] == "True" and conds(s)["Degraded"]["status"] == "False"
    assert conds(s)["Ready"]["observedGeneration"] == 4
    s = pool_status({"desiredNumberScheduled": 3, "numberReady": 1}, 4, 1 << 30)
    assert conds(s)["Ready"]["status"] == "False" and conds(s)["Degraded"]["status"] == "True"
    s = pool_status(None, 1, 1 << 30)
    assert s["nodesDesired"] == 0 and conds(s)["Ready"]["reason"] == "NoNodes"


def test_transition_time_kept_while_status_unchanged() -> None:
    old = [{"type": "Ready", "status": "False", "lastTransitionTime": "T0", "reason": "a", "message": ""}]
    new = [{"type": "Ready", "status": "False", "lastTransitionTime": "T1", "reason": "b", "message": ""}]
    assert _merge_conditions(old, new)[0]["lastTransitionTime"] == "T0"
    flipped = [{**new[0], "status": "True"}]
    assert _merge_conditions(old, flipped)[0]["lastTransitionTime"] == "T1"
