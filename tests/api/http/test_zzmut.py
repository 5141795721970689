from tests.api.http.test_authorization import *  # noqa
from tests.api.http import test_authorization as t
from api.services.jobs import JobService
from api.services.uploads import UploadService

async def test_mut_jobs(world, monkeypatch):
    orig = JobService.get
    monkeypatch.setattr(JobService, "get", lambda self, user, job_id: orig(self, None, job_id))
    await t.test_route_authorization(world)

async def test_mut_upload(world, monkeypatch):
    orig = UploadService.get
    monkeypatch.setattr(UploadService, "get", lambda self, user, uid: orig(self, type("U", (), {"id": "x"})(), uid) if False else __import__("api.db.tables", fromlist=["Upload"]) and self.db.read().__enter__().get(__import__("api.db.tables", fromlist=["Upload"]).Upload, uid))
    await t.test_route_authorization(world)
