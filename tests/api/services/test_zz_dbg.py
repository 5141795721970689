import collections
import tests.api.services.test_ledger_properties as m
from api.core import ledger
calls = collections.Counter()

def test_dbg(tmp_path, monkeypatch):
    orig_se = m.Runner._settle_error
    orig_ss = m.Runner._settle_success
    orig_claim = m.Runner.claim_next
    def se(self, job_id, error): calls["settle_error_"+error.code] += 1; return orig_se(self, job_id, error)
    def ss(self, job_id, d): calls["settle_success"] += 1; return orig_ss(self, job_id, d)
    def cl(self):
        j = orig_claim(self); calls["claim_" + ("none" if j is None else "job")] += 1; return j
    monkeypatch.setattr(m.Runner, "_settle_error", se)
    monkeypatch.setattr(m.Runner, "_settle_success", ss)
    monkeypatch.setattr(m.Runner, "claim_next", cl)
    try:
        m.test_ledger_properties(tmp_path)
    finally:
        print("CALLS", dict(calls))

def test_mut(tmp_path, monkeypatch):
    import api.services.settlement as st
    orig_requeue = st.requeue_job
    def requeue_and_refund(session, settings, storage, job, code, message):
        orig_requeue(session, settings, storage, job, code, message)
        ledger.refund(session, job.id)
    monkeypatch.setattr("api.runner.runner.requeue_job", requeue_and_refund)
    m.test_ledger_properties(tmp_path)

def test_mut2(tmp_path, monkeypatch):
    import api.services.settlement as st
    orig = st.finish_job
    def fj(session, storage, job, status, error, metrics=None):
        if status.value == "canceled" and job.status == "running":
            status = type(status)("succeeded")
        return orig(session, storage, job, status, error, metrics)
    monkeypatch.setattr("api.runner.runner.finish_job", fj)
    m.test_ledger_properties(tmp_path)
