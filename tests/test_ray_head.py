import urllib.error
import urllib.request

import pytest
from ray_head import wait_for_job


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_head_requires_token_and_runs_a_job(ray_head):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{ray_head.dashboard_url}/api/jobs/", timeout=10)
    assert err.value.code == 401
    client = ray_head.job_client()
    job_id = client.submit_job(entrypoint="python -c 'import ray; ray.init(); print(42)'")
    assert wait_for_job(ray_head, job_id, timeout_s=180) == "SUCCEEDED"
    assert "42" in client.get_job_logs(job_id)
