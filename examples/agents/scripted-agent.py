#!/usr/bin/env python3
"""The scripted agent: plays one role of the pipeline with no model.

Interface (see README.md in this directory):
  cwd                the work item's checkout (its branch is checked out)
  ORCH_WORK_ITEM     the work item key, e.g. ORCH-65              (required)
  ORCH_STAGE         the stage to work, e.g. review               (required)
  ORCH_AGENT         the role; must be the stage's agent if given (optional)
  ORCH_SCRIPTED_REJECT  comma-separated stages whose agent gives a negative verdict on
                     its FIRST run for this work item (review, testing, deploy-staging,
                     deploy), to exercise the rollback path       (optional)
When ORCH_WORK_ITEM or ORCH_STAGE is unset, they are read from the command-line arguments
(e.g. the CLI's `-p <prompt>`): the first `work_item: KEY` / `"work_item": "KEY"` and
`stage: STAGE` found; else from the prompt on stdin, where the launcher writes the task:
its own lines `- work_item: KEY` and `- stage: STAGE` (quoted outside text, `> ...`, never
counts). Other arguments (`--output-format json`, ...) are ignored.

It writes the stage's artifacts under docs/work-items/<KEY>/ with the frontmatter of
docs/artifacts.md, makes a real code change in the development stage, and prints one
result object shaped like `claude -p --output-format json` on stdout. Exit 0 on success,
1 (with an error result) on bad input. It never commits: the launcher does.
"""

import hashlib
import json
import os
import re
import sys
import time
import uuid

AGENT_OF_STAGE = {
    "analysis": "analyst",
    "architecture": "architect",
    "development": "developer",
    "review": "reviewer",
    "testing": "tester",
    "deploy-staging": "deployer",
    "deploy": "deployer",
}

# stage -> (file, verdict field, pass value, negative value); None: a document.
VERDICTS = {
    "review": ("review.md", "review_verdict", "APPROVED", "CHANGES_REQUESTED"),
    "testing": ("test-report.md", "test_status", "PASSED", "FAILED"),
    "deploy-staging": ("staging.md", "staging_status", "SUCCESS", "FAILED"),
    "deploy": ("deploy.md", "deploy_status", "SUCCESS", "FAILED"),
}
DOCUMENTS = {
    "analysis": ("analysis.md", "Analysis"),
    "architecture": ("architecture.md", "Architecture"),
    "development": ("development.md", "Development notes"),
}
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*-[0-9]+$")

# List prices per million tokens, to report a plausible cost.
PRICE_IN, PRICE_OUT, PRICE_CACHE_READ, PRICE_CACHE_WRITE = 3.0, 15.0, 0.30, 3.75


def result(text, *, ok=True, turns=2, usage=None, started=None):
    usage = usage or {
        "input_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 0,
    }
    cost = (
        usage["input_tokens"] * PRICE_IN
        + usage["output_tokens"] * PRICE_OUT
        + usage["cache_read_input_tokens"] * PRICE_CACHE_READ
        + usage["cache_creation_input_tokens"] * PRICE_CACHE_WRITE
    ) / 1e6
    duration = int((time.monotonic() - started) * 1000) if started else 0
    return {
        "duration_api_ms": duration,
        "stop_reason": "end_turn" if ok else None,
        "session_id": str(uuid.uuid4()),
        "total_cost_usd": round(cost, 6),
        "usage": dict(usage, service_tier="standard"),
        "modelUsage": {
            "scripted-agent": {
                "inputTokens": usage["input_tokens"],
                "outputTokens": usage["output_tokens"],
                "cacheReadInputTokens": usage["cache_read_input_tokens"],
                "cacheCreationInputTokens": usage["cache_creation_input_tokens"],
                "costUSD": round(cost, 6),
            }
        },
        "permission_denials": [],
        "terminal_reason": "completed" if ok else "error",
        "is_error": not ok,
        "num_turns": turns,
        "subtype": "success",
        "api_error_status": None,
        "result": text,
        "type": "result",
        "duration_ms": duration,
        "uuid": str(uuid.uuid4()),
    }


def fail(msg):
    print(json.dumps(result(f"scripted agent: {msg}", ok=False, turns=0)))
    sys.exit(1)


def read_field(path, field):
    """The value of frontmatter `field` in `path`, or None."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    for line in text.splitlines()[1:]:
        if line.strip() == "---":
            break
        k, sep, v = line.partition(":")
        if sep and k.strip().lower() == field:
            return v.strip().strip("\"'")
    return None


_STDIN = None


def from_stdin(name):
    """The task's own line `- name: VALUE` in the prompt on stdin (read once; not a tty)."""
    global _STDIN
    if _STDIN is None:
        try:
            _STDIN = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
        except (OSError, ValueError):
            _STDIN = ""
    m = re.search(r"^- " + re.escape(name) + r": ([A-Za-z0-9_-]+)", _STDIN, re.M)
    return m.group(1) if m else ""


def from_args(name):
    """The value of `name` in the arguments: `name: v`, `"name": "v"`, `name=v`."""
    pat = re.compile(r'(?<![A-Za-z0-9_])["\']?' + re.escape(name) + r'["\']?\s*[:=]\s*["\'`]?([A-Za-z0-9_-]+)')
    for arg in sys.argv[1:]:
        m = pat.search(arg)
        if m:
            return m.group(1)
    return ""


def write(path, fields, title, body):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    front = "".join(f"{k}: {v}\n" for k, v in fields.items())
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"---\n{front}---\n# {title}\n\n{body.strip()}\n")


def main():
    started = time.monotonic()
    key = (
        os.environ.get("ORCH_WORK_ITEM", "").strip()
        or from_args("work_item")
        or from_stdin("work_item")
    )
    stage = (
        os.environ.get("ORCH_STAGE", "").strip() or from_args("stage") or from_stdin("stage")
    ).lower()
    agent = os.environ.get("ORCH_AGENT", "").strip().lower()
    if not KEY_RE.match(key):
        fail(f"ORCH_WORK_ITEM must be a work item key like ORCH-65, not {key!r}")
    if stage not in AGENT_OF_STAGE:
        fail(f"ORCH_STAGE must be one of {', '.join(AGENT_OF_STAGE)}, not {stage!r}")
    if agent and agent != AGENT_OF_STAGE[stage]:
        fail(f"stage {stage} is the {AGENT_OF_STAGE[stage]}'s, not the {agent}'s")
    agent = AGENT_OF_STAGE[stage]
    reject = {s.strip().lower() for s in os.environ.get("ORCH_SCRIPTED_REJECT", "").split(",")}

    d = os.path.join("docs", "work-items", key)
    written = []
    if stage in DOCUMENTS:
        name, title = DOCUMENTS[stage]
        path = os.path.join(d, name)
        rnd = int(read_field(path, "round") or 0) + 1
        fields = {"work_item": key, "author": agent, "round": rnd}
        if stage == "development":
            # A real code change, redone on every round (a rollback sends the developer back).
            mod = re.sub(r"[^a-z0-9]", "_", key.lower())
            code = os.path.join("scripted", f"{mod}.py")
            os.makedirs("scripted", exist_ok=True)
            with open(code, "w", encoding="utf-8") as f:
                f.write(
                    f'"""Written by the scripted developer for {key}, round {rnd}."""\n\n\n'
                    f"def {mod}_round():\n    return {rnd}\n"
                )
            written.append(code)
            body = f"Implemented {key} in `{code}` (round {rnd}).\n\nHow to check: `python3 {code}`."
        else:
            body = f"The scripted {agent} worked stage {stage} of {key} (round {rnd})."
        write(path, fields, title, body)
        written.append(path)
        summary = f"{title} written."
    else:
        name, field, good, bad = VERDICTS[stage]
        path = os.path.join(d, name)
        # Negative only on the first run of the stage: the round after a rollback passes.
        first = read_field(path, field) is None
        verdict = bad if (stage in reject and first) else good
        fields = {"work_item": key, "author": agent, field: verdict}
        if stage == "deploy" and verdict == good:
            sha = os.popen("git rev-parse HEAD 2>/dev/null").read().strip()
            if sha:
                fields["deployed_sha"] = sha
            # What production ran before: the base the branch started from.
            base = os.popen("git merge-base HEAD origin/main 2>/dev/null").read().strip()
            if base:
                fields["previous_sha"] = base
        title = {"review": "Review", "testing": "Test report", "deploy-staging": "Staging", "deploy": "Deploy"}[stage]
        write(path, fields, title, f"The scripted {agent} says {field}: {verdict} for {key}.")
        written.append(path)
        summary = f"{title}: {verdict}."

    # Plausible usage, stable per (work item, stage) so runs are reproducible.
    h = int(hashlib.sha256(f"{key}/{stage}".encode()).hexdigest()[:8], 16)
    usage = {
        "input_tokens": 1800 + h % 2000,
        "cache_creation_input_tokens": 400 + h % 500,
        "cache_read_input_tokens": 6000 + h % 9000,
        "output_tokens": 120 + h % 900,
    }
    print(json.dumps(result(summary + " Files: " + ", ".join(written), turns=1 + len(written), usage=usage, started=started)))


if __name__ == "__main__":
    main()
