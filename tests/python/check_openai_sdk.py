"""Calls the server through the official `openai` Python SDK, as a user who
has never seen our API would (see .ci/run). The server runs the built-in
world model with a user key. Usage:
    python3 check_openai_sdk.py http://127.0.0.1:PORT USER_KEY
"""
import base64
import io
import json
import sys
import urllib.request

import openai
from openai import OpenAI

url, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
checks = 0


def check(condition, what):
    global checks
    if not condition:
        print(f"FAILED: {what}")
        sys.exit(1)
    checks += 1


served = client.models.list().data
active = next(m for m in served if m.model_extra["active"])
side = active.model_extra["generated_image_size"]
size = f"{side}x{side}"

# An image the world model knows, drawn by the server itself.
images = client.images.generate(
    prompt="a photo of a green triangle",
    n=2,
    size=size,
    extra_body={"seed": 7, "cfg_weight": 2.0, "temperature": 0.7},
)
check(len(images.data) == 2, "images.generate gives n images")
png = base64.b64decode(images.data[0].b64_json)
check(png[:8] == b"\x89PNG\r\n\x1a\n", "b64_json is a PNG")
first = images.data[0].model_extra
check(first["sample_id"] != images.data[1].model_extra["sample_id"], "each image is its own sample")
check(images.model_extra["model"], "the response names the model version")

linked = client.images.generate(prompt="a photo of a red circle", response_format="url")
link = linked.data[0].url
check(link.startswith(url) and "/v1/images/" in link, f"url points at our image endpoint: {link}")
request = urllib.request.Request(link, headers={"Authorization": f"Bearer {key}"})
with urllib.request.urlopen(request) as response:
    check(response.read()[:4] == b"\x89PNG", "the linked image downloads with the key")

data_url = "data:image/png;base64," + base64.b64encode(png).decode()
question = [
    {"type": "text", "text": "How many objects are in the image?"},
    {"type": "image_url", "image_url": {"url": data_url}},
]

chat = client.chat.completions.create(
    model="ulm-r1",
    messages=[{"role": "user", "content": question}],
    n=2,
    max_tokens=16,
    temperature=0.7,
    seed=3,
    logprobs=True,
)
check(len(chat.choices) == 2, "chat n=2 gives two choices")
for choice in chat.choices:
    check(choice.message.role == "assistant", "assistant message")
    check(isinstance(choice.message.content, str) and choice.message.content, "content is text")
    check(choice.finish_reason in ("stop", "length"), "finish_reason")
    tokens = choice.logprobs.content
    check(tokens and all(t.logprob <= 0 for t in tokens), "logprobs per token")
    check("".join(t.token for t in tokens) == choice.message.content, "logprob tokens spell the content")
check(chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 0, "usage counts")
sample_id = chat.choices[0].model_extra["sample_id"]

stream = client.chat.completions.create(
    model="ulm-r1",
    messages=[{"role": "user", "content": question}],
    max_completion_tokens=16,
    seed=3,
    stream=True,
    stream_options={"include_usage": True},
)
text, finish, streamed_id, usage = "", None, None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        text += choice.delta.content or ""
        if choice.finish_reason:
            finish = choice.finish_reason
            streamed_id = choice.model_extra["sample_id"]
check(text and finish in ("stop", "length"), f"streamed text and finish: {text!r} {finish}")
check(streamed_id, "the last chunk names the sample")
check(usage is not None and usage.completion_tokens > 0, "the usage chunk")
same = client.chat.completions.create(
    model="ulm-r1",
    messages=[{"role": "user", "content": question}],
    max_tokens=16,
    seed=3,
)
check(same.choices[0].message.content == text, "streaming and not streaming agree at one seed")

# The feedback on an answer refers to the sample id the SDK returned.
body = json.dumps({"sample_id": sample_id, "key": "correct", "score": 1.0}).encode()
request = urllib.request.Request(
    f"{url}/v1/feedback",
    data=body,
    headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
)
with urllib.request.urlopen(request) as response:
    check(response.status == 201 or response.status == 200, "feedback on a chat sample is stored")

# Errors arrive as the SDK's exceptions, with our code and message.
try:
    client.images.generate(prompt="a blue square", size="1024x1024")
    check(False, "a size the model does not make is refused")
except openai.UnprocessableEntityError as e:
    check(e.code == "invalid_parameter" and size in e.message, f"size error: {e.code} {e.message}")
try:
    client.chat.completions.create(
        model="ulm-r1",
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
    )
    check(False, "an http image URL is refused")
except openai.UnprocessableEntityError as e:
    check(e.code == "invalid_image" and "fetches nothing" in e.message, f"http URL error: {e.message}")
try:
    OpenAI(base_url=f"{url}/v1", api_key="wrong-key", max_retries=0).models.list()
    check(False, "a wrong key is refused")
except openai.AuthenticationError as e:
    check(e.type == "authentication_error", f"auth error type: {e.type}")

models = client.models.list()
check(any(m.id == chat.model for m in models.data), "models.list names the version that answered")

print(f"openai SDK {openai.__version__}: {checks} checks passed")
