"""Exercises the server through a Python client generated from the committed
openapi/openapi.json by openapi-python-client (see .ci/run). Usage:
    python3 check_generated_client.py http://127.0.0.1:PORT
"""
import base64
import sys

from ulm_r1_server_client import AuthenticatedClient
from ulm_r1_server_client.api.feedback import post_feedback
from ulm_r1_server_client.api.inference import answer, generate
from ulm_r1_server_client.api.models import list_models
from ulm_r1_server_client.api.operations import healthz
from ulm_r1_server_client.api.samples import get_image, get_sample
from ulm_r1_server_client.models import (
    AnswerRequest,
    AnswerResponse,
    ErrorBody,
    FeedbackItem,
    FeedbackResponse,
    GenerateRequest,
    GenerateResponse,
    SampleView,
)

# A 2x2 RGB PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGP8z8DAwMDAxMDAwMDAAAANHQEDasKb6QAAAABJRU5ErkJggg=="
)

checks = 0


def check(condition, what):
    global checks
    if not condition:
        print(f"FAILED: {what}")
        sys.exit(1)
    checks += 1


def main(base_url):
    client = AuthenticatedClient(base_url=base_url, token="unused-with-no-auth")
    health = healthz.sync(client=client)
    check(health is not None and health.status == "ok", "healthz")
    models = list_models.sync(client=client)
    check(models is not None and models.data[0].demo, "list_models reports the demo model")

    gen = generate.sync(client=client, body=GenerateRequest(prompt="a red circle", n=2, seed=5))
    check(isinstance(gen, GenerateResponse) and len(gen.images) == 2, "generate returns two images")
    check(gen.images[0].seed == 5 and gen.images[1].seed == 6, "seeds are seed + i")
    sample_id = gen.images[0].sample_id

    png = get_image.sync_detailed(sample_id, client=client)
    check(png.status_code == 200 and png.content.startswith(b"\x89PNG"), "get_image returns a PNG")
    check(png.content == base64.b64decode(gen.images[0].png_base64), "the stored PNG is the returned one")

    ans = answer.sync(
        client=client,
        body=AnswerRequest(image=base64.b64encode(PNG).decode(), question="What colour?", n=2, max_new_tokens=6),
    )
    check(isinstance(ans, AnswerResponse) and len(ans.samples) == 2, "answer returns two samples")

    fb = post_feedback.sync(
        client=client, body=FeedbackItem(sample_id=sample_id, key="quality", score=0.9, client_id="py-1")
    )
    check(isinstance(fb, FeedbackResponse) and fb.items[0].status.value == "created", "feedback is stored")

    sample = get_sample.sync(sample_id, client=client)
    check(isinstance(sample, SampleView) and len(sample.feedback) == 1, "the sample carries its feedback")

    missing = get_sample.sync("no-such-sample", client=client)
    check(isinstance(missing, ErrorBody) and missing.error.code == "not_found", "errors parse as ErrorBody")

    bad = generate.sync(client=client, body=GenerateRequest(prompt="", n=1))
    check(isinstance(bad, ErrorBody) and bad.error.code == "invalid_parameter", "validation errors parse")
    print(f"{checks} passed, 0 failed")


if __name__ == "__main__":
    main(sys.argv[1])
