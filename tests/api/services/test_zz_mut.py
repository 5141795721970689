import collections
import tests.api.services.test_ledger_properties as m
from api.core import ledger
calls = collections.Counter()

def test_mut(tmp_path, monkeypatch):
    import api.services.settlement as st
    orig_requeue = st.requeue_job
    def requeue_and_refund(session, settings, storage, job, code, message):
        calls["requeue"] += 1
        orig_requeue(session, settings, storage, job, code, message)
        ledger.refund(session, job.id)
    monkeypatch.setattr("api.runner.runner.requeue_job", requeue_and_refund)
    for name in ("submit", "claim", "succeed", "fail", "retry", "cancel", "lose_lease", "grant", "expire"):
        f = getattr(m.LedgerMachine, name)
        def wrap(self, *a, _f=f, _n=name, **k):
            calls[_n] += 1
            return _f(self, *a, **k)
        wrap.__dict__.update(f.__dict__)
        # keep hypothesis rule metadata
    try:
        m.test_ledger_properties(tmp_path)
    finally:
        print(dict(calls))
