from kvfabric.operator.reconcile import _merge_conditions, pool_status


def conds(status: dict) -> dict:
    return {c["type"]: c for c in status["conditions"]}


def rolled(desired: int, ready: int, generation: int = 2) -> dict:
    return {
        "desiredNumberScheduled": desired,
        "numberReady": ready,
        "updatedNumberScheduled": desired,
        "observedGeneration": generation,
    }


def test_status_follows_the_daemonset() -> None:
    s = pool_status(rolled(3, 3), 4, 1 << 30, 2)
    assert (s["nodesDesired"], s["nodesReady"], s["capacity"]) == (3, 3, str(3 << 30))
    assert conds(s)["Ready"]["status"] == "True" and conds(s)["Degraded"]["status"] == "False"
    assert conds(s)["Ready"]["observedGeneration"] == 4
    s = pool_status(rolled(3, 1), 4, 1 << 30, 2)
    assert conds(s)["Ready"]["status"] == "False" and conds(s)["Degraded"]["status"] == "True"
    s = pool_status(None, 1, 1 << 30)
    assert s["nodesDesired"] == 0 and conds(s)["Ready"]["reason"] == "NoNodes"


def test_transition_time_kept_while_status_unchanged() -> None:
    old = [{"type": "Ready", "status": "False", "lastTransitionTime": "T0", "reason": "a", "message": ""}]
    new = [{"type": "Ready", "status": "False", "lastTransitionTime": "T1", "reason": "b", "message": ""}]
    assert _merge_conditions(old, new)[0]["lastTransitionTime"] == "T0"
    flipped = [{**new[0], "status": "True"}]
    assert _merge_conditions(old, flipped)[0]["lastTransitionTime"] == "T1"


def test_ready_waits_for_the_rollout() -> None:
    # the DaemonSet controller has not seen the latest template yet: old agents do not count
    s = pool_status(rolled(2, 2, generation=1), 5, 1 << 30, 2)
    assert conds(s)["Ready"]["status"] == "False"
    # one of two agents runs the new template; the other (ready) still runs the old one
    mid = {**rolled(2, 2), "updatedNumberScheduled": 1}
    s = pool_status(mid, 5, 1 << 30, 2)
    assert conds(s)["Ready"]["status"] == "False" and s["nodesReady"] == 1
    assert conds(pool_status(rolled(2, 2), 5, 1 << 30, 2))["Ready"]["status"] == "True"
