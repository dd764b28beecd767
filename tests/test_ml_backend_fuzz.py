"""Fuzz the HTTP API from its own OpenAPI description with a seeded, bounded generator.

Bodies are drawn from each operation's request schema and then broken in every way a client can break
them (wrong types, missing fields, junk bytes, huge or deep values, random label configs and contexts).
The backend must answer every one with 2xx or a 4xx carrying a message: never a 500, never a dead server.
"""

from __future__ import annotations

import json
import random

import pytest
from labelstudio_helpers import (
    FakeLabelStudio,
    UvicornThread,
    encode_image,
    private_embedding_store,  # noqa: F401 - autouse: a store of this module's own
    synthetic_image,
)

ITERATIONS = 400
SEED = 20261122
GOOD_CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="brush" toName="image">'
               '<Label value="Object"/></BrushLabels><KeyPointLabels name="kp" toName="image" smart="true">'
               '<Label value="Object"/></KeyPointLabels><RectangleLabels name="rect" toName="image" smart="true">'
               '<Label value="Object"/></RectangleLabels></View>')
JUNK = [None, True, False, 0, -1, 1e308, float("nan"), "", "x" * 5000, "\u0000\ud7ff\U0001F600", [], {},
        [[[[[[[]]]]]]], {"a": {"b": {"c": {}}}}, 2**70, -0.0]
CONFIGS = [GOOD_CONFIG, "", "<View/>", "<View", "not xml", "<!DOCTYPE x [<!ENTITY a 'a'>]><View/>",
           '<View><Image name="image" value="$image"/></View>',
           '<View><Image name="i" value="$img"/><Brush name="b" toName="i"/></View>',
           '<View><Image name="image" value="$image"/><BrushLabels name="b" toName="nope"/></View>',
           GOOD_CONFIG.replace("$image", "$other"), "<a>" * 300 + "</a>" * 300]
IMAGES = ["/data/upload/1/a.png", "/data/upload/1/missing.png", "http://10.0.0.1/x.png", "s3://b/k.png",
          "gs://b/k", "file:///etc/passwd", "//host/x", "javascript:alert(1)", "", "/" * 3000, 42, None,
          "/data/local-files/?d=../../etc/passwd", "data:image/png;base64,AAAA"]


def schema_ref_path(ref: str) -> list[str]:
    return ref.lstrip("#/").split("/")


def deref(schema: dict, spec: dict) -> dict:
    seen = 0
    while isinstance(schema, dict) and "$ref" in schema and seen < 20:
        node = spec
        for part in schema_ref_path(schema["$ref"]):
            node = node[part]
        schema, seen = node, seen + 1
    return schema


def generate(schema: dict, spec: dict, rng: random.Random, depth: int = 0):
    """A value valid for `schema` (most of the time) — the starting point for mutations."""
    schema = deref(schema, spec)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return generate(rng.choice(schema[key]), spec, rng, depth + 1)
    kind = schema.get("type")
    if depth > 6:
        return None
    if kind == "object" or "properties" in schema:
        out = {}
        for name, sub in schema.get("properties", {}).items():
            if name in schema.get("required", []) or rng.random() < 0.7:
                out[name] = generate(sub, spec, rng, depth + 1)
        return out
    if kind == "array":
        return [generate(schema.get("items", {}), spec, rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "string":
        return rng.choice(["", "1.1", "abc", GOOD_CONFIG, "http://127.0.0.1:1"])
    if kind == "integer":
        return rng.choice([0, 1, -5, 2**31])
    if kind == "number":
        return rng.choice([0.0, 50.0, -1.5, 1e9])
    if kind == "boolean":
        return rng.random() < 0.5
    return rng.choice(JUNK[:6])


def context_region(rng: random.Random) -> object:
    kind = rng.choice(["keypointlabels", "rectanglelabels", "brushlabels", "keypoint", "polygon", 7, None])
    value = {"x": rng.choice([50, 0, 100, 101, -3, "5", None, float("inf")]),
             "y": rng.choice([50, 0.001, 99.999, 1e6, None]),
             "width": rng.choice([10, 0, -5, None, "w"]), "height": rng.choice([10, 0, 300, None]),
             "rotation": rng.choice([0, 45, 720, "r", None]),
             "keypointlabels": rng.choice([["Object"], [], ["Nope"], "Object", None]),
             "rectanglelabels": rng.choice([["Object"], [None], None])}
    region = {"type": kind, "from_name": rng.choice(["kp", "rect", "brush", "zzz", None]),
              "to_name": rng.choice(["image", "image", "other", None, 3]),
              "original_width": rng.choice([160, 120, 0, -1, 1.5, 10**7, None, "w"]),
              "original_height": rng.choice([120, 160, 0, None, 10**7]),
              "is_positive": rng.choice([True, False, None, "no", 1]),
              "value": value if rng.random() < 0.9 else rng.choice(JUNK)}
    if rng.random() < 0.3:
        region.pop(rng.choice(list(region)))
    return region if rng.random() < 0.95 else rng.choice(JUNK)


def predict_body(rng: random.Random) -> object:
    body = {"tasks": [{"id": rng.choice([1, "1", None, -1]), "data": {"image": rng.choice(IMAGES)}}
                      for _ in range(rng.choice([1, 1, 2, 0]))],
            "label_config": rng.choice(CONFIGS), "project": rng.choice(["1.1", 1, None, {}]),
            "params": {"context": {"result": [context_region(rng) for _ in range(rng.choice([0, 1, 2, 3, 700]))]}
                       if rng.random() < 0.7 else rng.choice([None, {}, {"result": None}, {"result": "x"}, []])}}
    if rng.random() < 0.3:
        mutate(body, rng)
    return body


def mutate(value, rng: random.Random):
    """Replace, delete or add one random node somewhere inside `value` (in place); returns the new root."""
    if not isinstance(value, (dict, list)) or not value or rng.random() < 0.15:
        return rng.choice(JUNK)
    if isinstance(value, dict):
        key = rng.choice(list(value))
        action = rng.random()
        if action < 0.3:
            del value[key]
        elif action < 0.4:
            value[rng.choice(["extra", "tasks", "context", "\u2603"])] = rng.choice(JUNK)
        else:
            value[key] = mutate(value[key], rng)
    else:
        i = rng.randrange(len(value))
        value[i] = mutate(value[i], rng)
    return value


@pytest.fixture(scope="module")
def server(tiny_random_checkpoint):
    from tinysam_kit.integrations.labelstudio import BackendSettings, create_app

    images = {"/data/upload/1/a.png": encode_image(synthetic_image(160, 120))}
    with FakeLabelStudio(images) as ls:
        settings = BackendSettings.from_env({}, model=str(tiny_random_checkpoint), label_studio_url=ls.url,
                                            points_per_side=4, max_request_bytes=4 * 1024 * 1024,
                                            fetch_timeout=5.0)
        with UvicornThread(create_app(settings)) as srv:
            yield srv


def test_fuzz_never_500_never_dead(server):
    import httpx

    rng = random.Random(SEED)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        spec = client.get("/openapi.json").json()
        operations = [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()]
        assert {"/health", "/setup", "/predict", "/webhook", "/versions"} <= set(spec["paths"])
        statuses: dict[int, int] = {}
        failures = []
        for i in range(ITERATIONS):
            path, method, op = operations[i % len(operations)]
            body_schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            roll = rng.random()
            content: bytes | None = None
            if method == "get":
                pass
            elif roll < 0.1:
                content = rng.choice([b"", b"{", b"\xff\xfe\x00", b"[]", b"null", b'{"tasks": [' * 2000,
                                      b'"' + b"a" * 100 + b'"', b"1e999999"])
            elif path == "/predict" and roll < 0.8:
                content = json.dumps(predict_body(rng), allow_nan=True).encode()
            elif body_schema is not None:
                body = generate(body_schema, spec, rng)
                if roll < 0.95:
                    body = mutate(body, rng)
                content = json.dumps(body, allow_nan=True).encode()
            else:
                content = json.dumps(rng.choice(JUNK), allow_nan=True).encode()
            resp = client.request(method.upper(), path, content=content,
                                  headers={"content-type": rng.choice(["application/json"] * 4 + ["text/plain"])})
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            if resp.status_code >= 500 or (resp.status_code >= 400 and not resp.json().get("detail")):
                failures.append((path, resp.status_code, resp.text[:300], content[:300] if content else None))
            if i % 50 == 0:
                assert client.get("/health").status_code == 200, "server died"
        # huge inputs: many context regions, a body over the size limit, deep nesting
        huge = {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}], "label_config": GOOD_CONFIG,
                "params": {"context": {"result": [context_region(random.Random(1))] * 5000}}}
        assert client.post("/predict", json=huge).status_code == 413
        big = b'{"tasks": [{"data": {"image": "' + b"a" * (5 * 1024 * 1024) + b'"}}]}'
        assert client.post("/predict", content=big, headers={"content-type": "application/json"}).status_code == 413
        deep = b'{"tasks": [' + b"[" * 5000 + b"]" * 5000 + b"]}"
        resp = client.post("/predict", content=deep, headers={"content-type": "application/json"})
        assert resp.status_code in (400, 422) and resp.json()["detail"]
        assert client.get("/health").status_code == 200
        assert not failures, failures[:5]
        # the generator reached both the happy path and the error paths
        assert statuses.get(200, 0) > 20 and statuses.get(422, 0) > 20, statuses
        print(f"fuzz statuses: {dict(sorted(statuses.items()))}")
